//! What talks to the API server for admission: the watch [`cache`]s the pure selection reads,
//! the [`live`] re-check of a Pod the caches may have missed, the [`executor`] of
//! [`crate::mutate::Effect`]s, the [`namespaces`] sidecert serves, the conditional [`delete`]
//! of what it read, and the [`client`] itself.

pub mod cache;
pub mod claims;
pub mod client;
pub mod delete;
pub mod executor;
pub mod live;
pub mod namespaces;

pub use cache::Cache;
pub use executor::Executor;
pub use namespaces::NamespaceGate;
