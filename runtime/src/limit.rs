//! Connections counted per source address and in total, refused at once over either limit:
//! what keeps one client (a Pod that can reach a port) from holding all of a server's
//! connections. Both binaries' servers use it.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
};

/// The address a limit is counted against: IPv4-mapped IPv6 addresses as their IPv4 one.
pub fn key(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// Open connections, per source address and in total; [`Self::admit`] refuses at once.
#[derive(Debug, Clone)]
pub struct ConnectionLimiter {
    counts: Arc<Mutex<Counts>>,
    total: usize,
    per_address: usize,
}

/// Why a connection or a review was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("too many from this address")]
    PerAddress,
    #[error("too many in total")]
    Total,
}

impl Refused {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refused::PerAddress => "per_address",
            Refused::Total => "total",
        }
    }
}

impl ConnectionLimiter {
    /// At most `total` connections, and `per_address` from one address (each at least 1).
    pub fn new(total: usize, per_address: usize) -> Self {
        let total = total.max(1);
        Self {
            counts: Arc::default(),
            total,
            per_address: per_address.clamp(1, total),
        }
    }

    /// Counts a new connection from `ip`, or says which limit it is over. The connection is
    /// counted until the returned slot is dropped.
    pub fn admit(&self, ip: IpAddr) -> Result<ConnectionSlot, Refused> {
        let ip = key(ip);
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let mine = c.by_address.get(&ip).copied().unwrap_or(0);
        if mine >= self.per_address {
            return Err(Refused::PerAddress);
        }
        if c.total >= self.total {
            return Err(Refused::Total);
        }
        c.total = c.total.saturating_add(1);
        c.by_address.insert(ip, mine.saturating_add(1));
        Ok(ConnectionSlot {
            counts: self.counts.clone(),
            ip,
        })
    }

    /// Open connections from `ip`.
    pub fn open_from(&self, ip: IpAddr) -> usize {
        let c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        c.by_address.get(&key(ip)).copied().unwrap_or(0)
    }

    /// Open connections in total.
    pub fn open(&self) -> usize {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner).total
    }
}

/// One counted connection; dropping it (when the connection closes) uncounts it.
#[derive(Debug)]
pub struct ConnectionSlot {
    counts: Arc<Mutex<Counts>>,
    ip: IpAddr,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_address.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.by_address.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn connections_per_address_then_total() {
        let c = ConnectionLimiter::new(3, 2);
        let a1 = c.admit(A).unwrap();
        let _a2 = c.admit(A).unwrap();
        assert_eq!(c.admit(A).unwrap_err(), Refused::PerAddress);
        // An IPv4-mapped IPv6 address is the same address.
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped());
        assert_eq!(c.admit(mapped).unwrap_err(), Refused::PerAddress);
        let _b1 = c.admit(B).unwrap();
        assert_eq!(c.admit(B).unwrap_err(), Refused::Total);
        drop(a1);
        assert_eq!((c.open_from(A), c.open()), (1, 2));
        let _b2 = c.admit(B).unwrap();
        assert_eq!(c.open_from(B), 2);
    }

    #[test]
    fn limits_are_at_least_one_and_per_address_at_most_the_total() {
        let c = ConnectionLimiter::new(0, 5);
        let _a = c.admit(A).unwrap();
        assert_eq!(c.admit(B).unwrap_err(), Refused::Total);
    }
}
