//! What one client may hold of the HTTPS server: connections (counted from accept to close)
//! and review slots (from before the body is read until the answer), each bounded per source
//! address and in total, and the deadline for reading a body. The flags are
//! [`crate::config::LimitArgs`].

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use actix_web::{
    error::PayloadError,
    web::{Bytes, BytesMut},
};
use futures::{Stream, StreamExt};
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

pub use sidecert_runtime::limit::{ConnectionLimiter, ConnectionSlot, Refused, Reserved, key};

use crate::config::LimitArgs;

/// The limits, resolved from the flags (a per-address limit never exceeds its total).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub request_read_timeout: Duration,
    pub connections: usize,
    pub connections_per_address: usize,
    pub reviews: usize,
    pub reviews_per_address: usize,
    /// Addresses whose connections and reviews count only against the per-address limits.
    pub reserved: Reserved,
}

impl Limits {
    pub fn from_args(args: &LimitArgs) -> Self {
        let n = |v: u32| usize::try_from(v).unwrap_or(usize::MAX).max(1);
        let (connections, reviews) = (n(args.max_connections), n(args.max_concurrent_reviews));
        Self {
            request_read_timeout: args.request_read_timeout,
            connections,
            connections_per_address: n(args.max_connections_per_address).min(connections),
            reviews,
            reviews_per_address: n(args.max_concurrent_reviews_per_address).min(reviews),
            reserved: args.reserved_sources.clone(),
        }
    }
}

impl Limits {
    /// A counter of connections with these limits.
    pub fn connection_limiter(&self) -> ConnectionLimiter {
        ConnectionLimiter::new(self.connections, self.connections_per_address)
            .with_reserved(self.reserved.clone())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::from_args(&LimitArgs::default())
    }
}

/// Review slots, per source address and in total. A review that finds none waits for one,
/// first come first served, until its deadline: a burst of the API server's is smoothed
/// rather than refused, and a client over its share waits only for its own slots.
#[derive(Debug, Clone)]
pub struct ReviewLimiter {
    total: Arc<Semaphore>,
    /// The reserved addresses' own total: one address's share, for all of them.
    reserved_total: Arc<Semaphore>,
    by_address: Arc<Mutex<HashMap<IpAddr, Arc<Semaphore>>>>,
    per_address: usize,
    reserved: Reserved,
}

impl ReviewLimiter {
    pub fn new(limits: &Limits) -> Self {
        Self {
            total: Arc::new(Semaphore::new(limits.reviews)),
            reserved_total: Arc::new(Semaphore::new(limits.reviews_per_address)),
            by_address: Arc::default(),
            per_address: limits.reviews_per_address,
            reserved: limits.reserved.clone(),
        }
    }

    /// Waits until `deadline` for a slot of `ip`'s (when the peer is known) and then one of
    /// the total (a reserved `ip`: of the reserved addresses' own total).
    pub async fn acquire(&self, ip: Option<IpAddr>, deadline: Instant) -> Result<ReviewSlot, Refused> {
        let own = match ip.map(key) {
            Some(ip) => {
                let share = Share::new(self, ip);
                let permit = tokio::time::timeout_at(deadline, share.semaphore.clone().acquire_owned())
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .ok_or(Refused::PerAddress)?;
                Some((permit, share))
            }
            None => None,
        };
        let pool = if ip.is_some_and(|ip| self.reserved.contains(ip)) {
            &self.reserved_total
        } else {
            &self.total
        };
        let total = tokio::time::timeout_at(deadline, pool.clone().acquire_owned())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or(Refused::Total)?;
        Ok(ReviewSlot {
            _total: total,
            _own: own,
        })
    }

    /// Source addresses with a review in flight or waiting.
    pub fn addresses(&self) -> usize {
        self.by_address
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// A holder of one address's semaphore; the map forgets the address when its last holder
/// goes.
#[derive(Debug)]
struct Share {
    map: Arc<Mutex<HashMap<IpAddr, Arc<Semaphore>>>>,
    ip: IpAddr,
    semaphore: Arc<Semaphore>,
}

impl Share {
    fn new(limiter: &ReviewLimiter, ip: IpAddr) -> Self {
        let semaphore = limiter
            .by_address
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(ip)
            .or_insert_with(|| Arc::new(Semaphore::new(limiter.per_address)))
            .clone();
        Self {
            map: limiter.by_address.clone(),
            ip,
            semaphore,
        }
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        // Only the map's reference and this one left (under the lock, nobody can take a new
        // one): no other holder, no waiter, no permit.
        if map
            .get(&self.ip)
            .is_some_and(|s| Arc::ptr_eq(s, &self.semaphore) && Arc::strong_count(s) == 2)
        {
            map.remove(&self.ip);
        }
    }
}

/// A review slot, held until the answer is sent.
#[derive(Debug)]
pub struct ReviewSlot {
    _total: OwnedSemaphorePermit,
    // (permit, share): the permit goes first, so the share then sees its address unused.
    _own: Option<(OwnedSemaphorePermit, Share)>,
}

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body not received within the read timeout")]
    Timeout,
    #[error("request body is over the limit of {0} bytes")]
    TooLarge(usize),
    #[error("reading the request body: {0}")]
    Payload(#[from] PayloadError),
}

/// Reads a body of at most `limit` bytes, all of it before `deadline`. `expected` is the
/// Content-Length (reserved up front; untouched pages cost nothing until written).
pub async fn read_body(
    mut payload: impl Stream<Item = Result<Bytes, PayloadError>> + Unpin,
    expected: Option<usize>,
    limit: usize,
    deadline: Instant,
) -> Result<BytesMut, BodyError> {
    if let Some(n) = expected.filter(|n| *n > limit) {
        return Err(BodyError::TooLarge(n));
    }
    let mut body = BytesMut::with_capacity(expected.unwrap_or(8 * 1024));
    let read = async {
        while let Some(chunk) = payload.next().await {
            let chunk = chunk?;
            if body.len().saturating_add(chunk.len()) > limit {
                return Err(BodyError::TooLarge(body.len().saturating_add(chunk.len())));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(())
    };
    tokio::time::timeout_at(deadline, read)
        .await
        .map_err(|_| BodyError::Timeout)??;
    Ok(body)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn limits(connections: usize, per_address: usize) -> Limits {
        Limits {
            request_read_timeout: Duration::from_secs(1),
            connections,
            connections_per_address: per_address,
            reviews: connections,
            reviews_per_address: per_address,
            reserved: Reserved::default(),
        }
    }

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn per_address_limits_are_capped_by_the_total() {
        let l = Limits::from_args(&LimitArgs {
            max_connections: 4,
            max_connections_per_address: 10,
            max_concurrent_reviews: 2,
            max_concurrent_reviews_per_address: 3,
            ..LimitArgs::default()
        });
        assert_eq!((l.connections_per_address, l.reviews_per_address), (4, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn reviews_wait_for_a_slot_until_the_deadline() {
        let r = ReviewLimiter::new(&limits(3, 2));
        let soon = || Instant::now() + Duration::from_secs(1);
        let a1 = r.acquire(Some(A), soon()).await.unwrap();
        let _a2 = r.acquire(Some(A), soon()).await.unwrap();
        assert_eq!(r.acquire(Some(A), soon()).await.unwrap_err(), Refused::PerAddress);
        let _b1 = r.acquire(Some(B), soon()).await.unwrap();
        assert_eq!(r.acquire(Some(B), soon()).await.unwrap_err(), Refused::Total);
        assert_eq!(r.acquire(None, soon()).await.unwrap_err(), Refused::Total);

        // A waiter gets the slot that frees up before its deadline.
        let waiter = tokio::spawn({
            let r = r.clone();
            async move { r.acquire(Some(A), Instant::now() + Duration::from_secs(5)).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(a1);
        assert!(waiter.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn addresses_are_forgotten_when_their_last_review_ends() {
        let r = ReviewLimiter::new(&limits(3, 1));
        let soon = || Instant::now() + Duration::from_millis(50);
        let a = r.acquire(Some(A), soon()).await.unwrap();
        assert!(r.acquire(Some(A), soon()).await.is_err());
        assert_eq!(r.addresses(), 1);
        drop(a);
        assert_eq!(r.addresses(), 0);
    }
}
