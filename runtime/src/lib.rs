//! Runtime pieces that both binaries use, written once: the retry backoff, the shutdown
//! signal, the duration syntax of every flag, joining and leaving a Lease election, and the
//! per-address connection limit of their servers.
//!
//! The sidecar links this crate but not the webhook: nothing here knows about admission.

// Input reaches almost every function here: no slicing or indexing that can panic (`get`
// instead); tests may index.
#![cfg_attr(not(test), deny(clippy::indexing_slicing, clippy::string_slice))]

pub mod backoff;
pub mod duration;
pub mod election;
pub mod limit;
pub mod signal;

pub use backoff::Backoff;
pub use duration::{format_duration, parse_duration};
pub use election::{Election, LeaseSpec};
pub use limit::{ConnectionLimiter, ConnectionSlot, Refused};
pub use signal::shutdown_signal;
