//! The ACME side (RFC 8555, instant-acme): the HTTP client, the account, and one order.

pub mod account;
pub mod client;
pub mod order;

pub use account::{Eab, create_account, restore_account};
pub use client::AcmeHttp;
pub use order::{Issued, OrderRequest, Publisher, order};
