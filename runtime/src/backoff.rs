//! Exponential backoff: `base * 2^(failures - 1)`, capped.

use std::time::Duration;

/// An exponential backoff with a cap: the delay after the first failure is `base`, and it
/// doubles with each further failure until it reaches `cap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Backoff {
    pub const fn new(base: Duration, cap: Duration) -> Self {
        Self { base, cap }
    }

    /// The delay after `failures` consecutive failures (1 = the first; 0 counts as 1).
    pub fn delay(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(31);
        self.base.saturating_mul(1u32 << exp).min(self.cap)
    }

    /// [`Self::delay`] scaled into `[1/2, 1]` of itself by `u` in `[0, 1]` ("equal jitter":
    /// never shorter than half, so no tight loop even with bad luck).
    pub fn jittered(&self, failures: u32, u: f64) -> Duration {
        let u = if u.is_nan() { 1.0 } else { u.clamp(0.0, 1.0) };
        let delay = self.delay(failures);
        // `mul_f64` panics when the product rounds past Duration::MAX (a base or cap of
        // centuries, from a flag): keep the unjittered delay then.
        Duration::try_from_secs_f64(delay.as_secs_f64() * (0.5 + 0.5 * u)).unwrap_or(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_base_and_caps() {
        let b = Backoff::new(Duration::from_secs(2), Duration::from_secs(300));
        assert_eq!(b.delay(0), Duration::from_secs(2));
        assert_eq!(b.delay(1), Duration::from_secs(2));
        assert_eq!(b.delay(3), Duration::from_secs(8));
        assert_eq!(b.delay(40), Duration::from_secs(300));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn jitter_stays_within_half_and_whole() {
        let b = Backoff::new(Duration::from_secs(60), Duration::from_secs(3600));
        assert_eq!(b.jittered(1, 1.0), Duration::from_secs(60));
        assert_eq!(b.jittered(1, 0.0), Duration::from_secs(30));
        assert_eq!(b.jittered(3, 1.0), Duration::from_secs(240));
        assert_eq!(b.jittered(30, 1.0), Duration::from_secs(3600));
        assert_eq!(b.jittered(u32::MAX, 0.0), Duration::from_secs(1800));
        assert_eq!(b.jittered(1, -1.0), Duration::from_secs(30));
        assert_eq!(b.jittered(1, f64::NAN), Duration::from_secs(60));
        let huge = Backoff::new(Duration::MAX, Duration::MAX);
        assert_eq!(huge.jittered(u32::MAX, 1.0), Duration::MAX);
    }
}
