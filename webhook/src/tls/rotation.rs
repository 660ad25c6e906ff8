//! The rotation rules, pure and clocked by the caller: when the serving certificate is due,
//! which step the CA Secret takes ([`ca_step`]), when to sign with the next CA, and how long
//! to sleep until the next deadline.

use std::time::Duration;

use time::OffsetDateTime;

/// How often the live `caBundle` and the Secret are checked even without a watch event.
pub const RECHECK: Duration = Duration::from_secs(30);
/// How often a missing configuration is looked for besides its watch.
pub const CONFIG_RECHECK: Duration = Duration::from_secs(5);

fn far_future() -> OffsetDateTime {
    time::PrimitiveDateTime::MAX.assume_utc()
}

/// `t + d`, saturating.
pub fn later(t: OffsetDateTime, d: Duration) -> OffsetDateTime {
    time::Duration::try_from(d)
        .ok()
        .and_then(|d| t.checked_add(d))
        .unwrap_or_else(far_future)
}

/// `t - d`, saturating.
pub fn earlier(t: OffsetDateTime, d: Duration) -> OffsetDateTime {
    time::Duration::try_from(d)
        .ok()
        .and_then(|d| t.checked_sub(d))
        .unwrap_or(time::PrimitiveDateTime::MIN.assume_utc())
}

/// Whether the serving certificate should be re-issued: less than `rotate_before` left —
/// unless it already lasts as long as its CA, so that a new one would not last longer.
pub fn serving_due(
    not_after: OffsetDateTime,
    ca_not_after: OffsetDateTime,
    rotate_before: Duration,
    now: OffsetDateTime,
) -> bool {
    now >= earlier(not_after, rotate_before) && not_after < ca_not_after
}

/// A running CA rollover as this replica sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rollover {
    /// When the next CA was written (the Secret's annotation; `None` when it is missing).
    pub started: Option<OffsetDateTime>,
    /// This replica serves a certificate from the next CA.
    pub serving_next: bool,
}

/// What to do with the CA Secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaStep {
    Keep,
    /// Write a next CA beside the current one.
    StartRollover,
    /// Make the next CA the current one and drop the old.
    Promote,
    /// The current CA has expired and there is no next one: replace it (an overlap would
    /// not help, nothing trusts an expired CA).
    Replace,
}

/// The CA step at `now`: start a rollover when the current CA has less than `rotate_before`
/// left; promote once this replica serves from the next CA and `2 × delay` has passed since
/// the rollover started (every replica has had `delay` to switch). An expired CA is replaced,
/// or its next one promoted, at once.
pub fn ca_step(
    current_not_after: OffsetDateTime,
    rollover: Option<Rollover>,
    now: OffsetDateTime,
    rotate_before: Duration,
    delay: Duration,
) -> CaStep {
    match rollover {
        None if now >= current_not_after => CaStep::Replace,
        None if now >= earlier(current_not_after, rotate_before) => CaStep::StartRollover,
        // The current CA has expired: the next one is all there is.
        Some(_) if now >= current_not_after => CaStep::Promote,
        None => CaStep::Keep,
        Some(r) if r.serving_next && r.started.is_none_or(|t| now >= later(t, delay.saturating_mul(2))) => {
            CaStep::Promote
        }
        Some(_) => CaStep::Keep,
    }
}

/// Whether to sign the serving certificate with the next CA: once it has stood in the live
/// `caBundle` for `delay` (as seen by this replica).
pub fn sign_with_next(
    next_in_bundle_since: Option<OffsetDateTime>,
    now: OffsetDateTime,
    delay: Duration,
) -> bool {
    next_in_bundle_since.is_some_and(|t| now >= later(t, delay))
}

/// How long to sleep: until the earliest deadline still ahead, at most `max`, at least 100 ms.
pub fn next_wake(
    now: OffsetDateTime,
    deadlines: impl IntoIterator<Item = OffsetDateTime>,
    max: Duration,
) -> Duration {
    deadlines
        .into_iter()
        .filter(|d| *d > now)
        .map(|d| Duration::try_from(d - now).unwrap_or(max))
        .min()
        .unwrap_or(max)
        .clamp(Duration::from_millis(100), max.max(Duration::from_millis(100)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn t0() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_893_456_000).unwrap()
    }
    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn serving_rotation_decisions() {
        let not_after = t0() + time::Duration::minutes(40);
        let ca_end = t0() + time::Duration::days(1);
        let before = 20 * MIN;
        assert!(!serving_due(not_after, ca_end, before, t0()));
        assert!(!serving_due(
            not_after,
            ca_end,
            before,
            t0() + time::Duration::minutes(19)
        ));
        assert!(serving_due(
            not_after,
            ca_end,
            before,
            t0() + time::Duration::minutes(20)
        ));
        assert!(serving_due(
            not_after,
            ca_end,
            before,
            t0() + time::Duration::hours(2)
        ));
        // Capped by the CA: a new one would not last longer.
        assert!(!serving_due(
            ca_end,
            ca_end,
            before,
            ca_end - time::Duration::minutes(1)
        ));
    }

    #[test]
    fn ca_rollover_decisions() {
        let end = t0() + time::Duration::days(365);
        let before = Duration::from_secs(90 * 86400);
        let delay = 30 * Duration::from_secs(1);
        let keep = ca_step(end, None, t0(), before, delay);
        assert_eq!(keep, CaStep::Keep);
        let start_at = end - time::Duration::days(90);
        assert_eq!(
            ca_step(end, None, start_at - time::Duration::seconds(1), before, delay),
            CaStep::Keep
        );
        assert_eq!(ca_step(end, None, start_at, before, delay), CaStep::StartRollover);

        let started = Some(start_at);
        let r = |serving_next| {
            Some(Rollover {
                started,
                serving_next,
            })
        };
        // Not serving from the next CA yet: never promote.
        assert_eq!(
            ca_step(end, r(false), start_at + time::Duration::hours(1), before, delay),
            CaStep::Keep
        );
        // Serving from it, but not 2 × delay yet.
        assert_eq!(
            ca_step(
                end,
                r(true),
                start_at + time::Duration::seconds(59),
                before,
                delay
            ),
            CaStep::Keep
        );
        assert_eq!(
            ca_step(
                end,
                r(true),
                start_at + time::Duration::seconds(60),
                before,
                delay
            ),
            CaStep::Promote
        );
        // No start time recorded: promote as soon as this replica serves from the next CA.
        // Expired: replace, or promote whatever the replica serves.
        assert_eq!(ca_step(end, None, end, before, delay), CaStep::Replace);
        assert_eq!(ca_step(end, r(false), end, before, delay), CaStep::Promote);
        let unknown = Some(Rollover {
            started: None,
            serving_next: true,
        });
        assert_eq!(ca_step(end, unknown, t0(), before, delay), CaStep::Promote);
    }

    #[test]
    fn switch_to_the_next_ca_after_the_delay() {
        let delay = Duration::from_secs(30);
        assert!(!sign_with_next(None, t0(), delay));
        assert!(!sign_with_next(
            Some(t0()),
            t0() + time::Duration::seconds(29),
            delay
        ));
        assert!(sign_with_next(
            Some(t0()),
            t0() + time::Duration::seconds(30),
            delay
        ));
    }

    #[test]
    fn wake_at_the_earliest_deadline_ahead() {
        let d = |s| t0() + time::Duration::seconds(s);
        assert_eq!(
            next_wake(t0(), [d(10), d(5), d(-3)], RECHECK),
            Duration::from_secs(5)
        );
        assert_eq!(next_wake(t0(), [d(100)], RECHECK), RECHECK);
        assert_eq!(next_wake(t0(), [], RECHECK), RECHECK);
        assert_eq!(
            next_wake(t0(), [t0() + time::Duration::milliseconds(1)], RECHECK),
            Duration::from_millis(100)
        );
        assert_eq!(later(t0(), Duration::MAX), far_future());
    }
}
