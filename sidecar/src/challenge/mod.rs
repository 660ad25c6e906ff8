//! HTTP-01: the responder every replica runs, the key authorizations shared through the
//! certificate's Lease, and the wait for the Ingress route before the CA validates.

pub mod lease;
pub mod responder;
pub mod route;
