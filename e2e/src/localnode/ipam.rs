//! Pod IP allocation from the bridge's CIDR.

use std::{collections::BTreeSet, net::Ipv4Addr};

use crate::{Error, Result};

/// An IPv4 network in CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    pub network: Ipv4Addr,
    pub prefix_len: u8,
}

impl std::str::FromStr for Ipv4Cidr {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason: &str| Error::invalid("CIDR", format!("{s:?}: {reason}"));
        let (addr, len) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| bad("expected a.b.c.d/len"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad("bad address"))?;
        let prefix_len: u8 = len.parse().map_err(|_| bad("bad prefix length"))?;
        if !(8..=30).contains(&prefix_len) {
            return Err(bad("prefix length must be 8..=30"));
        }
        let mask = u32::MAX << (32 - u32::from(prefix_len));
        Ok(Self {
            network: Ipv4Addr::from(u32::from(addr) & mask),
            prefix_len,
        })
    }
}

impl std::fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

/// Hands out addresses `.10` to `.250` of the network (capped below the broadcast
/// address), lowest free first, so freed addresses are reused.
#[derive(Debug, Clone)]
pub struct IpPool {
    first: u32,
    last: u32,
    used: BTreeSet<u32>,
}

impl IpPool {
    pub fn new(cidr: Ipv4Cidr) -> Self {
        let net = u32::from(cidr.network);
        let broadcast = net | (u32::MAX >> u32::from(cidr.prefix_len));
        Self {
            first: net + 10,
            last: (net + 250).min(broadcast - 1),
            used: BTreeSet::new(),
        }
    }

    /// Takes `preferred` if it is in range and free, else the lowest free address.
    pub fn allocate(&mut self, preferred: Option<Ipv4Addr>) -> Option<Ipv4Addr> {
        if let Some(p) = preferred.map(u32::from)
            && (self.first..=self.last).contains(&p)
            && self.used.insert(p)
        {
            return Some(Ipv4Addr::from(p));
        }
        let free = (self.first..=self.last).find(|a| !self.used.contains(a))?;
        self.used.insert(free);
        Some(Ipv4Addr::from(free))
    }

    pub fn release(&mut self, ip: Ipv4Addr) {
        self.used.remove(&u32::from(ip));
    }

    pub fn in_use(&self) -> usize {
        self.used.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn pool() -> IpPool {
        IpPool::new("10.213.0.0/24".parse().unwrap())
    }

    #[test]
    fn parses_cidr() {
        let c: Ipv4Cidr = "10.213.0.7/24".parse().unwrap();
        assert_eq!(c.network, Ipv4Addr::new(10, 213, 0, 0));
        assert_eq!(c.to_string(), "10.213.0.0/24");
        assert!("10.213.0.0".parse::<Ipv4Cidr>().is_err());
        assert!("10.213.0.0/33".parse::<Ipv4Cidr>().is_err());
        assert!("x/24".parse::<Ipv4Cidr>().is_err());
    }

    #[test]
    fn allocates_from_10_to_250_and_reuses() {
        let mut p = pool();
        let a = p.allocate(None).unwrap();
        let b = p.allocate(None).unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 213, 0, 10));
        assert_eq!(b, Ipv4Addr::new(10, 213, 0, 11));
        p.release(a);
        assert_eq!(p.allocate(None), Some(a));
        assert_eq!(p.in_use(), 2);
    }

    #[test]
    fn honours_preferred_when_free_and_in_range() {
        let mut p = pool();
        let want = Ipv4Addr::new(10, 213, 0, 42);
        assert_eq!(p.allocate(Some(want)), Some(want));
        // Taken: falls back to the lowest free.
        assert_eq!(p.allocate(Some(want)), Some(Ipv4Addr::new(10, 213, 0, 10)));
        // Out of range: ignored.
        assert_eq!(
            p.allocate(Some(Ipv4Addr::new(10, 213, 0, 1))),
            Some(Ipv4Addr::new(10, 213, 0, 11))
        );
    }

    #[test]
    fn exhausts_after_241_addresses() {
        let mut p = pool();
        for _ in 0..241 {
            assert!(p.allocate(None).is_some());
        }
        assert_eq!(p.allocate(None), None);
    }

    #[test]
    fn small_network_stays_below_broadcast() {
        let mut p = IpPool::new("10.0.0.0/28".parse().unwrap());
        let all: Vec<_> = std::iter::from_fn(|| p.allocate(None)).collect();
        assert_eq!(all.first(), Some(&Ipv4Addr::new(10, 0, 0, 10)));
        assert_eq!(all.last(), Some(&Ipv4Addr::new(10, 0, 0, 14)));
    }
}
