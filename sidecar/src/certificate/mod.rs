//! One certificate's lifecycle: the pure decisions ([`state`]: what to do next;
//! [`schedule`]: when, all the date arithmetic; [`x509`]: what a certificate says) and the
//! executor that performs them ([`task`]).

pub mod schedule;
pub mod state;
pub mod task;
pub mod x509;
