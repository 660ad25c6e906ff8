//! The renewal arithmetic, all of it, as pure functions: when a certificate is due (ARI
//! window or one third of its lifetime left, the emergency point, the spacing of orders),
//! the backoffs (orders, Secret writes, loop restarts; with jitter) and the CA's hourly
//! limit on failed validations. Every input (the clock, the random draw) is a parameter, so
//! the arithmetic is tested without waiting; the state machine (`state.rs`) decides with it.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    time::Duration,
};

use sidecert_runtime::Backoff;
use time::OffsetDateTime;

/// The validity period of a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Lifetime {
    pub fn length(&self) -> time::Duration {
        (self.not_after - self.not_before).max(time::Duration::ZERO)
    }

    /// When one third of the lifetime is left.
    pub fn one_third_left(&self) -> OffsetDateTime {
        self.not_after.saturating_sub(self.length() / 3)
    }

    /// When one twentieth of the lifetime is left: past this, renew whatever ARI says.
    pub fn emergency(&self) -> OffsetDateTime {
        self.not_after.saturating_sub(self.length() / 20)
    }
}

/// A renewal window suggested by the CA (ARI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: OffsetDateTime,
    pub end: OffsetDateTime,
}

/// Why a renewal moment was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A random moment in the CA's suggested window.
    Ari,
    /// One third of the lifetime left (minus jitter).
    OneThird,
    /// Less than 1/20 of the lifetime left.
    Emergency,
}

/// The planned renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub renew_at: OffsetDateTime,
    pub reason: Reason,
}

/// Plans the renewal of a certificate.
///
/// `u` is a uniform random draw in `[0, 1)`. With an ARI window the moment is
/// `start + u * (end - start)` (RFC 9773 §4.2; a moment in the past means "now"); without,
/// it is
/// one third of the lifetime before expiry, made earlier by up to 1/30 of the lifetime so
/// that replicas of many Pods do not renew in lockstep. Either way the moment is never later
/// than the emergency point (1/20 of the lifetime left).
pub fn plan(lifetime: Lifetime, ari: Option<Window>, now: OffsetDateTime, u: f64) -> Plan {
    let u = if u.is_nan() { 1.0 } else { u.clamp(0.0, 1.0) };
    let emergency = lifetime.emergency();
    let (at, reason) = match ari {
        Some(w) if w.end >= w.start => (
            w.start.saturating_add((w.end - w.start) * u).max(now),
            Reason::Ari,
        ),
        _ => (
            lifetime
                .one_third_left()
                .saturating_sub(lifetime.length() / 30 * u),
            Reason::OneThird,
        ),
    };
    if at >= emergency || now >= emergency {
        Plan {
            renew_at: emergency.min(at),
            reason: Reason::Emergency,
        }
    } else {
        Plan { renew_at: at, reason }
    }
}

/// The shortest pause after a successful order before the next one for the same
/// certificate, whatever the CA's renewal window says (no tight loop on a CA that keeps
/// saying "renew now"): a tenth of the lifetime, at most an hour.
pub fn min_reorder_interval(lifetime: Lifetime) -> Duration {
    Duration::try_from(lifetime.length() / 10)
        .unwrap_or(Duration::ZERO)
        .min(Duration::from_secs(3600))
}

/// The backoff between failed orders, from `--retry-base` doubling to `--retry-cap`.
pub fn retry_backoff(base: Duration, cap: Duration) -> Backoff {
    let base = base.max(Duration::from_secs(1));
    Backoff::new(base, cap.max(base))
}

/// When the next order may start after `failures` failed ones in a row: the jittered
/// backoff (`u` in `[0, 1]`), or the CA's `Retry-After` if that is later.
pub fn order_retry_at(
    backoff: Backoff,
    failures: u32,
    u: f64,
    retry_after: Option<OffsetDateTime>,
    now: OffsetDateTime,
) -> OffsetDateTime {
    let at = after(now, backoff.jittered(failures, u));
    retry_after.map_or(at, |r| at.max(r))
}

/// When the next order may start after a successful one (see [`min_reorder_interval`]).
pub fn reorder_not_before(lifetime: Lifetime, now: OffsetDateTime) -> OffsetDateTime {
    after(now, min_reorder_interval(lifetime))
}

/// The backoff between attempts to write an issued certificate into the Secret.
pub const WRITE_BACKOFF: Backoff = Backoff::new(Duration::from_secs(2), Duration::from_secs(60));

/// When the next write of an issued certificate is tried after `write_failures` failed ones.
pub fn write_retry_at(write_failures: u32, u: f64, now: OffsetDateTime) -> OffsetDateTime {
    after(now, WRITE_BACKOFF.jittered(write_failures, u))
}

/// The backoff between restarts of a certificate's loop (its watches or its Lease failed).
pub const RESTART_BACKOFF: Backoff = Backoff::new(Duration::from_secs(5), Duration::from_secs(300));
/// A loop that ran this long before it failed starts the restart count afresh.
pub const RESTART_RESET_AFTER: Duration = Duration::from_secs(600);

/// The renewal moment of the certificate held: [`plan`]'s, or now for one from another
/// ACME server (replaced at once rather than at its renewal time).
pub fn renew_at(
    lifetime: Lifetime,
    ari: Option<Window>,
    foreign: bool,
    now: OffsetDateTime,
    u: f64,
) -> OffsetDateTime {
    if foreign {
        now
    } else {
        plan(lifetime, ari, now, u).renew_at
    }
}

/// When the next order is due: the renewal moment (now with no certificate), but never
/// before the backoff's `not_before` nor before the hourly validation limit allows it.
pub fn due(
    renew_at: Option<OffsetDateTime>,
    not_before: OffsetDateTime,
    limit_allows_at: OffsetDateTime,
    now: OffsetDateTime,
) -> OffsetDateTime {
    renew_at.unwrap_or(now).max(not_before).max(limit_allows_at)
}

/// The holder rewrites a certificate the Secret lost at most this often.
pub const RESTORE_GUARD: Duration = Duration::from_secs(30);

/// Whether the guard since the last write (or restore) has passed.
pub fn restore_allowed(last_write: Option<OffsetDateTime>, now: OffsetDateTime) -> bool {
    last_write.is_none_or(|t| now - t > RESTORE_GUARD)
}

/// When to look again at a Secret that lost the certificate while the guard holds.
pub fn restore_wake(last_write: OffsetDateTime) -> OffsetDateTime {
    after(last_write, RESTORE_GUARD + Duration::from_millis(100))
}

/// The holder wakes at least this often, whatever the renewal moment.
pub const LEADER_MAX_SLEEP: Duration = Duration::from_secs(6 * 3600);
/// A replica that does not hold the Lease looks again this often (changes of the Secret and
/// of the Lease wake it before).
pub const FOLLOWER_SLEEP: Duration = Duration::from_secs(3600);

/// When to wake when nothing is to be done now: at the due moment (at most
/// [`LEADER_MAX_SLEEP`] ahead) for the holder, [`FOLLOWER_SLEEP`] ahead otherwise; earlier
/// for a pending restore or a recheck of the ARI window.
pub fn wake_at(
    leader: bool,
    due: OffsetDateTime,
    restore: Option<OffsetDateTime>,
    ari_recheck: Option<OffsetDateTime>,
    now: OffsetDateTime,
) -> OffsetDateTime {
    let at = if leader {
        due.min(after(now, LEADER_MAX_SLEEP))
    } else {
        after(now, FOLLOWER_SLEEP)
    };
    let at = restore.map_or(at, |r| at.min(r));
    match ari_recheck {
        Some(r) if leader && r > now => at.min(r),
        _ => at,
    }
}

/// When to ask for the ARI window again: the CA's `Retry-After`, within 10 s and 6 h.
pub fn ari_recheck_at(retry_after: Duration, now: OffsetDateTime) -> OffsetDateTime {
    after(
        now,
        retry_after.clamp(Duration::from_secs(10), Duration::from_secs(6 * 3600)),
    )
}

/// Let's Encrypt allows 5 failed validations per account, hostname and hour.
pub const MAX_FAILED_VALIDATIONS_PER_HOUR: usize = 5;

/// Remembers failed validations per domain, to stay under the CA's hourly limit.
#[derive(Debug, Default, Clone)]
pub struct ValidationLimiter {
    failures: HashMap<String, VecDeque<OffsetDateTime>>,
}

impl ValidationLimiter {
    pub fn record_failure(&mut self, domain: &str, now: OffsetDateTime) {
        let q = self.failures.entry(domain.to_owned()).or_default();
        q.push_back(now);
        while q.len() > MAX_FAILED_VALIDATIONS_PER_HOUR {
            q.pop_front();
        }
    }

    /// The failures as unix seconds per domain, to share through the certificate's Lease.
    pub fn to_record(&self) -> BTreeMap<String, Vec<i64>> {
        self.failures
            .iter()
            .map(|(d, q)| (d.clone(), q.iter().map(|t| t.unix_timestamp()).collect()))
            .collect()
    }

    /// Adds the failures another replica recorded (the same failure is counted once).
    pub fn merge(&mut self, record: &BTreeMap<String, Vec<i64>>) {
        for (domain, seconds) in record {
            let q = self.failures.entry(domain.clone()).or_default();
            let mut all: Vec<OffsetDateTime> = q
                .iter()
                .copied()
                .chain(
                    seconds
                        .iter()
                        .filter_map(|s| OffsetDateTime::from_unix_timestamp(*s).ok()),
                )
                .collect();
            all.sort();
            all.dedup_by_key(|t| t.unix_timestamp());
            let skip = all.len().saturating_sub(MAX_FAILED_VALIDATIONS_PER_HOUR);
            *q = all.into_iter().skip(skip).collect();
        }
    }

    /// The earliest moment an order for `domains` stays within the limit (`now` if it does).
    pub fn allowed_at<'a>(
        &self,
        domains: impl IntoIterator<Item = &'a String>,
        now: OffsetDateTime,
    ) -> OffsetDateTime {
        let hour = time::Duration::HOUR;
        domains
            .into_iter()
            .filter_map(|d| self.failures.get(d))
            .filter(|q| q.len() >= MAX_FAILED_VALIDATIONS_PER_HOUR)
            .filter_map(|q| q.front().map(|oldest| oldest.saturating_add(hour)))
            .fold(now, OffsetDateTime::max)
    }
}

/// `t + d`, saturating at the last moment `time` can hold instead of panicking: the moments
/// here come from input (a certificate in the Secret, the CA's ARI window, the failure record
/// on the Lease, which any container sharing the Pod's ServiceAccount may write) and the
/// durations from flags.
pub fn after(t: OffsetDateTime, d: Duration) -> OffsetDateTime {
    t.saturating_add(time::Duration::try_from(d).unwrap_or(time::Duration::MAX))
}

/// Converts a wall-clock moment into a delay from `now` (zero if it is past).
pub fn delay_until(at: OffsetDateTime, now: OffsetDateTime) -> Duration {
    Duration::try_from(at - now).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use time::{Duration as TD, macros::datetime};

    use super::*;

    fn days(nb: OffsetDateTime, d: i64) -> Lifetime {
        Lifetime {
            not_before: nb,
            not_after: nb + TD::days(d),
        }
    }

    const T0: OffsetDateTime = datetime!(2026-01-01 00:00 UTC);

    #[test]
    fn one_third_rule_scales_with_lifetime() {
        for d in [6, 45, 90] {
            let l = days(T0, d);
            let p = plan(l, None, T0, 0.0);
            assert_eq!(p.reason, Reason::OneThird);
            assert_eq!(p.renew_at, T0 + TD::days(d) * 2 / 3);
            let late = plan(l, None, T0, 0.999_999);
            assert!(late.renew_at < p.renew_at);
            assert!(late.renew_at >= p.renew_at - l.length() / 30);
        }
    }

    #[test]
    fn ari_picks_a_moment_in_the_window() {
        let l = days(T0, 90);
        let w = Window {
            start: T0 + TD::days(50),
            end: T0 + TD::days(52),
        };
        assert_eq!(plan(l, Some(w), T0, 0.0).renew_at, w.start);
        assert_eq!(plan(l, Some(w), T0, 0.5).renew_at, T0 + TD::days(51));
        assert_eq!(plan(l, Some(w), T0, 0.5).reason, Reason::Ari);
        // A moment in the window is drawn even when the window already began ...
        let now = T0 + TD::days(51);
        assert_eq!(
            plan(l, Some(w), now, 0.75).renew_at,
            T0 + TD::days(51) + TD::hours(12)
        );
        // ... and a drawn moment in the past means now.
        assert_eq!(plan(l, Some(w), now, 0.25).renew_at, now);
    }

    #[test]
    fn emergency_wins_over_a_late_ari_window() {
        let l = days(T0, 90);
        let w = Window {
            start: T0 + TD::days(89),
            end: T0 + TD::days(90),
        };
        let p = plan(l, Some(w), T0, 0.5);
        assert_eq!(p.reason, Reason::Emergency);
        assert_eq!(p.renew_at, T0 + TD::days(90) - TD::days(90) / 20);
        // Short certificate (120 s): emergency at 6 s before expiry.
        let short = Lifetime {
            not_before: T0,
            not_after: T0 + TD::seconds(120),
        };
        let now = T0 + TD::seconds(115);
        let p = plan(short, None, now, 0.0);
        assert_eq!(p.reason, Reason::Emergency);
        assert!(p.renew_at <= now);
    }

    #[test]
    fn reorders_are_spaced() {
        let short = Lifetime {
            not_before: T0,
            not_after: T0 + TD::seconds(120),
        };
        assert_eq!(min_reorder_interval(short), Duration::from_secs(12));
        assert_eq!(min_reorder_interval(days(T0, 90)), Duration::from_secs(3600));
    }

    #[test]
    fn backoff_grows_caps_and_never_collapses() {
        let base = Duration::from_secs(60);
        let cap = Duration::from_secs(4 * 3600);
        let backoff = |failures, base, cap, u| retry_backoff(base, cap).jittered(failures, u);
        assert_eq!(backoff(1, base, cap, 1.0), base);
        assert_eq!(backoff(1, base, cap, 0.0), base / 2);
        assert_eq!(backoff(3, base, cap, 1.0), base * 4);
        assert_eq!(backoff(30, base, cap, 1.0), cap);
        assert_eq!(backoff(u32::MAX, base, cap, 0.0), cap / 2);
        assert!(backoff(1, base, cap, 0.0) >= Duration::from_secs(30));
    }

    #[test]
    fn validation_limit_survives_a_round_trip_through_the_lease() {
        let mut a = ValidationLimiter::default();
        let d = "a.example".to_owned();
        for m in 0..3 {
            a.record_failure(&d, T0 + TD::minutes(m));
        }
        // Another replica saw the same three and two more: five in all, counted once each.
        let mut b = ValidationLimiter::default();
        b.merge(&a.to_record());
        b.record_failure(&d, T0 + TD::minutes(3));
        b.record_failure(&d, T0 + TD::minutes(4));
        a.merge(&b.to_record());
        assert_eq!(a.to_record()[&d].len(), 5);
        assert_eq!(a.allowed_at([&d], T0 + TD::minutes(5)), T0 + TD::HOUR);
        // Garbage in the record is skipped, not a panic.
        a.merge(&BTreeMap::from([(d.clone(), vec![i64::MAX])]));
        assert_eq!(a.to_record()[&d].len(), 5);
    }

    #[test]
    fn validation_limit_is_five_per_hour() {
        let mut l = ValidationLimiter::default();
        let d = vec!["a.example".to_owned(), "b.example".to_owned()];
        for i in 0..4 {
            l.record_failure("a.example", T0 + TD::minutes(i));
        }
        assert_eq!(l.allowed_at(&d, T0 + TD::minutes(5)), T0 + TD::minutes(5));
        l.record_failure("a.example", T0 + TD::minutes(10));
        assert_eq!(l.allowed_at(&d, T0 + TD::minutes(11)), T0 + TD::HOUR);
        l.record_failure("a.example", T0 + TD::minutes(61));
        // the oldest in the last five is now minute 1
        assert_eq!(l.allowed_at(&d, T0 + TD::minutes(60)), T0 + TD::minutes(61));
        assert_eq!(l.allowed_at(&d, T0 + TD::minutes(62)), T0 + TD::minutes(62));
    }

    #[test]
    fn delays_never_go_negative() {
        assert_eq!(delay_until(T0, T0 + TD::seconds(5)), Duration::ZERO);
        assert_eq!(delay_until(T0 + TD::seconds(5), T0), Duration::from_secs(5));
    }

    #[test]
    fn moments_at_the_edge_of_time_saturate_instead_of_panicking() {
        let end = OffsetDateTime::new_utc(time::Date::MAX, time::Time::MAX);
        let start = OffsetDateTime::new_utc(time::Date::MIN, time::Time::MIDNIGHT);
        // A failure record forged on the Lease with the last representable moment.
        let mut l = ValidationLimiter::default();
        for _ in 0..MAX_FAILED_VALIDATIONS_PER_HOUR {
            l.record_failure("a.example", end);
        }
        let d = ["a.example".to_owned()];
        assert_eq!(l.allowed_at(&d, T0), end);
        // Absurd backoffs and moments near the end of time.
        let huge = retry_backoff(Duration::from_secs(1), Duration::MAX);
        assert_eq!(order_retry_at(huge, u32::MAX, 1.0, None, end), end);
        assert_eq!(write_retry_at(u32::MAX, 1.0, end), end);
        assert_eq!(restore_wake(end), end);
        assert_eq!(ari_recheck_at(Duration::MAX, end), end);
        assert_eq!(wake_at(false, end, None, None, end), end);
        // A certificate (from the Secret) valid from the first to the last moment, an ARI
        // window as wide, a NaN draw.
        let l = Lifetime {
            not_before: start,
            not_after: end,
        };
        let _ = plan(l, Some(Window { start, end }), T0, f64::NAN);
        let _ = plan(l, None, T0, f64::NAN);
        let _ = reorder_not_before(l, end);
    }
}
