//! Admission: the AdmissionReview [`codec`], the [`reviewer`] that turns a body into an
//! answer (pure decision, live re-check, side effects), the [`http`] handlers, and the
//! [`limits`] on what one client may hold of the server.

pub mod codec;
pub mod http;
pub mod limits;
pub mod reviewer;

pub use crate::readiness::Readiness;
pub use codec::{Request, parse, respond};
pub use http::{AppState, close_when_draining, routes};
pub use limits::{ConnectionLimiter, Limits, ReviewLimiter};
pub use reviewer::{LIVE_LOOKUP_TIMEOUT, Reviewer};
