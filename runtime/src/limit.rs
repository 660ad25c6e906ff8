//! Connections counted per source address and in total, refused at once over either limit:
//! what keeps one client (a Pod that can reach a port) from holding all of a server's
//! connections. Both binaries' servers use it. Addresses in a [`Reserved`] list (the API
//! server's) never count against the total: they share a pool of their own, the size of one
//! address's limit, so however many clients fill the total, they still get in, and a wide
//! list costs no more than one address.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
};

/// The address a limit is counted against: IPv4-mapped IPv6 addresses as their IPv4 one.
pub fn key(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// Source addresses (CIDRs, or single addresses) whose connections and reviews are kept
/// apart from the totals: the API server's, typically.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reserved(Arc<[ipnet::IpNet]>);

impl Reserved {
    /// Parses `10.0.0.0/24,192.0.2.7,fd00::/64` (comma-separated; blanks ignored). An
    /// address without a prefix length is that address alone; an IPv4-mapped IPv6 entry is
    /// its IPv4 one. Refused: a CIDR with host bits set (`10.0.0.10/8`, most likely a typo)
    /// and a zero-length prefix (every address).
    pub fn parse(list: &str) -> Result<Self, String> {
        let nets = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                let net = s
                    .parse::<ipnet::IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| format!("{s:?} is not an address or CIDR (e.g. 10.0.0.0/24)"))?;
                let net = match (net, net.addr().to_canonical()) {
                    (ipnet::IpNet::V6(v6), IpAddr::V4(v4)) if v6.prefix_len() >= 96 => {
                        ipnet::IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).map_err(|e| e.to_string())?
                    }
                    _ => net,
                };
                if net.trunc() != net {
                    return Err(format!("{s:?} has host bits set: did you mean {}?", net.trunc()));
                }
                if net.prefix_len() == 0 {
                    return Err(format!("{s:?} is every address: nothing would be kept apart"));
                }
                Ok(net)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self(nets.into()))
    }

    /// Whether `ip` (IPv4-mapped IPv6 as its IPv4 address) is reserved.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = key(ip);
        self.0.iter().any(|n| n.contains(&ip))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Display for Reserved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&list.join(","))
    }
}

#[derive(Debug, Default)]
struct Counts {
    /// Connections from addresses that are not reserved.
    total: usize,
    /// Connections from reserved addresses (their own pool).
    reserved: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// Open connections, per source address and in total; [`Self::admit`] refuses at once.
#[derive(Debug, Clone)]
pub struct ConnectionLimiter {
    counts: Arc<Mutex<Counts>>,
    total: usize,
    per_address: usize,
    reserved: Reserved,
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
            reserved: Reserved::default(),
        }
    }

    /// The same limits, with `reserved` addresses kept apart from the total.
    pub fn with_reserved(mut self, reserved: Reserved) -> Self {
        self.reserved = reserved;
        self
    }

    /// Counts a new connection from `ip`, or says which limit it is over. The connection is
    /// counted until the returned slot is dropped.
    pub fn admit(&self, ip: IpAddr) -> Result<ConnectionSlot, Refused> {
        let ip = key(ip);
        let reserved = self.reserved.contains(ip);
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let mine = c.by_address.get(&ip).copied().unwrap_or(0);
        if mine >= self.per_address {
            return Err(Refused::PerAddress);
        }
        if reserved {
            // One address's worth, for all of them together.
            if c.reserved >= self.per_address {
                return Err(Refused::Total);
            }
            c.reserved = c.reserved.saturating_add(1);
        } else {
            if c.total >= self.total {
                return Err(Refused::Total);
            }
            c.total = c.total.saturating_add(1);
        }
        c.by_address.insert(ip, mine.saturating_add(1));
        Ok(ConnectionSlot {
            counts: self.counts.clone(),
            ip,
            reserved,
        })
    }

    /// Open connections from `ip`.
    pub fn open_from(&self, ip: IpAddr) -> usize {
        let c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        c.by_address.get(&key(ip)).copied().unwrap_or(0)
    }

    /// Open connections in total, but those from reserved addresses.
    pub fn open(&self) -> usize {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner).total
    }
}

/// One counted connection; dropping it (when the connection closes) uncounts it.
#[derive(Debug)]
pub struct ConnectionSlot {
    counts: Arc<Mutex<Counts>>,
    ip: IpAddr,
    reserved: bool,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if self.reserved {
            c.reserved = c.reserved.saturating_sub(1);
        } else {
            c.total = c.total.saturating_sub(1);
        }
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
    fn a_reserved_address_gets_in_past_the_total_but_not_past_its_own_limit() {
        let reserved = Reserved::parse(" 10.0.0.0/30, fd00::1 ,").unwrap();
        assert!(reserved.contains(A) && reserved.contains(B));
        assert!(reserved.contains(IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped())));
        assert!(!reserved.contains(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 4))));
        assert!(
            reserved.contains("fd00::1".parse().unwrap()) && !reserved.contains("fd00::2".parse().unwrap())
        );
        let c = ConnectionLimiter::new(2, 2).with_reserved(Reserved::parse("10.0.0.1").unwrap());
        let other: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9));
        let (_o1, _o2) = (c.admit(other).unwrap(), c.admit(other).unwrap());
        assert_eq!(c.admit(B).unwrap_err(), Refused::Total);
        let a1 = c.admit(A).unwrap();
        let _a2 = c.admit(A).unwrap();
        assert_eq!(c.admit(A).unwrap_err(), Refused::PerAddress);
        assert_eq!((c.open(), c.open_from(A)), (2, 2));
        drop(a1);
        assert_eq!((c.open(), c.open_from(A)), (2, 1));
        for bad in [
            "10.0.0.0/33",
            "shop",
            "10.0.0.1/8/1",
            "10.1.2.3/8",
            "0.0.0.0/0",
            "::/0",
        ] {
            assert!(Reserved::parse(bad).is_err(), "{bad}");
        }
        let mapped = Reserved::parse("::ffff:10.0.0.1").unwrap();
        assert_eq!(mapped.to_string(), "10.0.0.1/32");
        assert!(mapped.contains(A));
        // Reserved addresses share one address's worth: a wide list costs no more.
        let wide = ConnectionLimiter::new(4, 2).with_reserved(Reserved::parse("10.0.0.0/24").unwrap());
        let (_a, _b) = (wide.admit(A).unwrap(), wide.admit(B).unwrap());
        assert_eq!(
            wide.admit(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 3))).unwrap_err(),
            Refused::Total
        );
        assert_eq!(wide.open(), 0);
    }

    #[test]
    fn limits_are_at_least_one_and_per_address_at_most_the_total() {
        let c = ConnectionLimiter::new(0, 5);
        let _a = c.admit(A).unwrap();
        assert_eq!(c.admit(B).unwrap_err(), Refused::Total);
    }
}
