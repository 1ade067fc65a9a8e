//! Exponential backoff with full jitter, and the small random source it draws from.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Exponential backoff with full jitter: before retry `n` (0 for the first retry), wait a
/// uniformly random time in `[0, min(cap, base × 2ⁿ)]`.
///
/// ```
/// use std::time::Duration;
/// use towerguard::retry::Backoff;
///
/// let backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
/// assert!(backoff.ceiling(0) == Duration::from_millis(10));
/// assert!(backoff.ceiling(20) == Duration::from_secs(1));
/// assert!(backoff.delay(3, 0.5) <= Duration::from_millis(80));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
}

impl Default for Backoff {
    /// 25 ms doubling up to 1 s.
    fn default() -> Self {
        Backoff::new(Duration::from_millis(25), Duration::from_secs(1))
    }
}

impl Backoff {
    /// Starts at `base`, doubles per retry, never above `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap: cap.max(base),
        }
    }

    /// The first wait's bound.
    pub(crate) fn base(&self) -> Duration {
        self.base
    }

    /// The bound no wait exceeds.
    pub(crate) fn cap(&self) -> Duration {
        self.cap
    }

    /// The upper bound of the wait before retry `retry` (0-based).
    pub fn ceiling(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The wait before retry `retry` for a uniform draw `unit` in `[0, 1)`.
    pub fn delay(&self, retry: u32, unit: f64) -> Duration {
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.ceiling(retry).mul_f64(unit)
    }
}

/// A small, fast, lock-free pseudo-random source (SplitMix64) for jitter. Not for secrets.
#[derive(Debug)]
pub(crate) struct Jitter(AtomicU64);

impl Jitter {
    pub(crate) fn new() -> Self {
        // Seeded from the clock and an address: different per process and instance.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let local = 0u8;
        Jitter(AtomicU64::new(seed ^ (&local as *const u8 as u64)))
    }

    /// The process's source, shared by every retry layer (drawn from only when a retry
    /// waits).
    pub(crate) fn global() -> &'static Jitter {
        static GLOBAL: std::sync::OnceLock<Jitter> = std::sync::OnceLock::new();
        GLOBAL.get_or_init(Jitter::new)
    }

    /// A uniform draw in `[0, 1)`.
    pub(crate) fn unit(&self) -> f64 {
        let mut z = self
            .0
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn delays_stay_within_the_jitter_bounds(
            base_ms in 1u64..1_000,
            cap_ms in 1u64..60_000,
            retry in 0u32..100,
            unit in 0.0f64..1.0,
        ) {
            let backoff = Backoff::new(Duration::from_millis(base_ms), Duration::from_millis(cap_ms));
            let delay = backoff.delay(retry, unit);
            let ceiling = backoff.ceiling(retry);
            prop_assert!(delay <= ceiling);
            prop_assert!(ceiling <= Duration::from_millis(cap_ms.max(base_ms)));
            let exponential = Duration::from_millis(base_ms).saturating_mul(1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX));
            prop_assert!(ceiling <= exponential);
        }

        #[test]
        fn jitter_draws_are_in_the_unit_interval(_n in 0u8..10) {
            let jitter = Jitter::new();
            for _ in 0..1_000 {
                let u = jitter.unit();
                prop_assert!((0.0..1.0).contains(&u));
            }
        }
    }

    #[test]
    fn full_jitter_spreads_over_the_whole_range() {
        let jitter = Jitter::new();
        let draws: Vec<f64> = (0..10_000).map(|_| jitter.unit()).collect();
        let low = draws.iter().filter(|u| **u < 0.1).count();
        let high = draws.iter().filter(|u| **u >= 0.9).count();
        assert!(low > 500 && high > 500, "low {low} high {high}");
    }
}
