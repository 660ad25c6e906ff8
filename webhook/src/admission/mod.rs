//! Admission: the AdmissionReview [`codec`], the [`reviewer`] that turns a body into an
//! answer (pure decision, live re-check, side effects), and the [`http`] handlers.

pub mod codec;
pub mod http;
pub mod reviewer;

pub use crate::readiness::Readiness;
pub use codec::{Request, parse, respond};
pub use http::{AppState, close_when_draining, routes};
pub use reviewer::{LIVE_LOOKUP_TIMEOUT, Reviewer};
