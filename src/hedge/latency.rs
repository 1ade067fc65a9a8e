//! A sliding-window latency percentile, lock-free, at microsecond resolution.
//!
//! Latencies go into log-linear buckets (16 per power of two, so a bucket is at most about
//! 6% wide) of two histograms: the current one, and the previous full one. When the
//! current one holds `window` samples, the previous is cleared and becomes the current,
//! so the percentile covers the last `window` to `2 × window` samples. Recording is two
//! atomic increments; the percentile is recomputed by the recorder that lands on every
//! 32nd sample and read by everyone else from one atomic.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

const SUB_BITS: u32 = 4;
const SUB: usize = 1 << SUB_BITS;
const BUCKETS: usize = (64 - SUB_BITS as usize + 1) * SUB;
const RECOMPUTE_EVERY: u64 = 32;

fn bucket_of(micros: u64) -> usize {
    if micros < SUB as u64 {
        return micros as usize;
    }
    let exponent = 63 - micros.leading_zeros();
    let sub = (micros >> (exponent - SUB_BITS)) as usize & (SUB - 1);
    (exponent - SUB_BITS + 1) as usize * SUB + sub
}

/// The highest value a bucket holds.
fn upper_of(bucket: usize) -> u64 {
    if bucket < SUB {
        return bucket as u64;
    }
    let exponent = (bucket / SUB) as u32 + SUB_BITS - 1;
    let sub = (bucket % SUB) as u64;
    let lower = (SUB as u64 + sub) << (exponent - SUB_BITS);
    lower + (1u64 << (exponent - SUB_BITS)) - 1
}

struct Histogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
        }
    }

    fn clear(&self) {
        for bucket in self.buckets.iter() {
            bucket.store(0, Ordering::Relaxed);
        }
        self.count.store(0, Ordering::Relaxed);
    }
}

pub(crate) struct LatencyWindow {
    histograms: [Histogram; 2],
    current: AtomicUsize,
    rotating: AtomicBool,
    window: u64,
    recorded: AtomicU64,
    min_samples: u64,
    /// The percentile to report, as the bits of an `f64` (a rate target moves it).
    percentile: AtomicU64,
    /// The highest bucket ever used: recomputing scans no further.
    highest: AtomicUsize,
    /// Cached results, in microseconds; `u64::MAX` until there are enough samples.
    at_percentile: AtomicU64,
    median: AtomicU64,
}

impl std::fmt::Debug for LatencyWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyWindow")
            .field("window", &self.window)
            .field("percentile", &self.percentile_wanted())
            .field("recorded", &self.recorded.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl LatencyWindow {
    pub(crate) fn new(window: u64, min_samples: u64, percentile: f64) -> Self {
        LatencyWindow {
            histograms: [Histogram::new(), Histogram::new()],
            current: AtomicUsize::new(0),
            rotating: AtomicBool::new(false),
            window: window.max(1),
            recorded: AtomicU64::new(0),
            min_samples: min_samples.max(1),
            percentile: AtomicU64::new(percentile.clamp(0.0, 1.0).to_bits()),
            highest: AtomicUsize::new(0),
            at_percentile: AtomicU64::new(u64::MAX),
            median: AtomicU64::new(u64::MAX),
        }
    }

    /// Counts one latency in; true when the percentiles were recomputed.
    pub(crate) fn record(&self, latency: Duration) -> bool {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let current = &self.histograms[self.current.load(Ordering::Acquire)];
        let bucket = bucket_of(micros);
        current.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        if bucket > self.highest.load(Ordering::Relaxed) {
            self.highest.fetch_max(bucket, Ordering::Relaxed);
        }
        let in_current = current.count.fetch_add(1, Ordering::AcqRel) + 1;
        if in_current >= self.window && !self.rotating.swap(true, Ordering::AcqRel) {
            let next = 1 - self.current.load(Ordering::Acquire);
            self.histograms[next].clear();
            self.current.store(next, Ordering::Release);
            self.rotating.store(false, Ordering::Release);
        }
        let recorded = self.recorded.fetch_add(1, Ordering::Relaxed) + 1;
        let due = recorded >= self.min_samples
            && (recorded == self.min_samples || recorded.is_multiple_of(RECOMPUTE_EVERY));
        if due {
            self.recompute();
        }
        due
    }

    fn recompute(&self) {
        let mut counts = [0u64; BUCKETS];
        let mut total = 0u64;
        let used = (self.highest.load(Ordering::Relaxed) + 1).min(BUCKETS);
        for histogram in &self.histograms {
            for (count, bucket) in counts[..used].iter_mut().zip(histogram.buckets.iter()) {
                let n = bucket.load(Ordering::Relaxed);
                *count += n;
                total += n;
            }
        }
        if total == 0 {
            return;
        }
        let rank = |p: f64| ((p * total as f64).ceil() as u64).clamp(1, total);
        let value_at = |target: u64| {
            let mut seen = 0;
            for (bucket, count) in counts[..used].iter().enumerate() {
                seen += count;
                if seen >= target {
                    return upper_of(bucket);
                }
            }
            upper_of(BUCKETS - 1)
        };
        self.at_percentile
            .store(value_at(rank(self.percentile_wanted())), Ordering::Relaxed);
        self.median.store(value_at(rank(0.5)), Ordering::Relaxed);
    }

    /// The percentile the window reports (`0.0..=1.0`).
    pub(crate) fn percentile_wanted(&self) -> f64 {
        f64::from_bits(self.percentile.load(Ordering::Relaxed))
    }

    /// Reports another percentile from the next recomputation on.
    pub(crate) fn set_percentile(&self, percentile: f64) {
        self.percentile
            .store(percentile.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
    }

    /// Latencies counted in so far.
    pub(crate) fn recorded(&self) -> u64 {
        self.recorded.load(Ordering::Relaxed)
    }

    /// The wanted percentile of the window, once there are enough samples.
    pub(crate) fn percentile(&self) -> Option<Duration> {
        match self.at_percentile.load(Ordering::Relaxed) {
            u64::MAX => None,
            micros => Some(Duration::from_micros(micros)),
        }
    }

    /// The median of the window, once there are enough samples.
    pub(crate) fn median(&self) -> Option<Duration> {
        match self.median.load(Ordering::Relaxed) {
            u64::MAX => None,
            micros => Some(Duration::from_micros(micros)),
        }
    }
}

/// Moves a window's percentile so that about `target` of the requests are hedged.
///
/// Each time the window recomputes (every 32nd sample), the share of hedges among the
/// samples since the last time is compared with the target, and the share of latencies
/// above the percentile is multiplied by `exp(0.02 × (target − share) / target)`: it
/// settles where the hedged share is the target on average, and stays between a quarter
/// of the target and one half.
///
/// Where slow requests are a fixed share (a slow replica, a garbage collection), the
/// percentile settles where the remaining hedges go to the slowest of the others.
pub(crate) struct RateTarget {
    target: f64,
    hedged: AtomicU64,
    state: Mutex<RateState>,
}

struct RateState {
    hedged: u64,
    recorded: u64,
    tail: f64,
}

impl RateTarget {
    /// `target` is clamped to `0.001..=0.5`.
    pub(crate) fn new(target: f64) -> Self {
        let target = if target.is_finite() { target } else { 0.0 };
        let target = target.clamp(0.001, 0.5);
        RateTarget {
            target,
            hedged: AtomicU64::new(0),
            state: Mutex::new(RateState {
                hedged: 0,
                recorded: 0,
                tail: target,
            }),
        }
    }

    /// The percentile to start from.
    pub(crate) fn initial_percentile(&self) -> f64 {
        1.0 - self.target
    }

    /// Counts one hedge sent.
    pub(crate) fn hedged(&self) {
        self.hedged.fetch_add(1, Ordering::Relaxed);
    }

    /// Measures the share hedged since the last call and moves `window`'s percentile.
    pub(crate) fn adjust(&self, window: &LatencyWindow) {
        // One adjustment at a time; a recomputation that finds another under way skips.
        let Ok(mut state) = self.state.try_lock() else {
            return;
        };
        let hedged = self.hedged.load(Ordering::Relaxed);
        let recorded = window.recorded();
        let samples = recorded.saturating_sub(state.recorded);
        if samples == 0 {
            return;
        }
        let share = hedged.saturating_sub(state.hedged) as f64 / samples as f64;
        state.hedged = hedged;
        state.recorded = recorded;
        let step = (0.02 * (self.target - share) / self.target).exp();
        state.tail = (state.tail * step).clamp(self.target / 4.0, 0.5);
        window.set_percentile(1.0 - state.tail);
    }
}

impl std::fmt::Debug for RateTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateTarget")
            .field("target", &self.target)
            .field("hedged", &self.hedged.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn every_value_lands_in_a_bucket_that_holds_it(micros in 0u64..u64::MAX / 2) {
            let bucket = bucket_of(micros);
            prop_assert!(bucket < BUCKETS);
            prop_assert!(upper_of(bucket) >= micros);
            if bucket > 0 {
                prop_assert!(upper_of(bucket - 1) < micros);
            }
        }
    }

    #[test]
    fn buckets_are_at_most_about_six_percent_wide() {
        for micros in [17u64, 100, 999, 2_000, 12_345, 100_000, 7_000_000] {
            let upper = upper_of(bucket_of(micros));
            assert!(
                (upper - micros) as f64 <= micros as f64 * 0.0625,
                "{micros} -> {upper}"
            );
        }
    }

    #[test]
    fn percentiles_follow_the_samples_and_the_window_slides() {
        let window = LatencyWindow::new(1_000, 100, 0.95);
        assert_eq!(window.percentile(), None);
        // 95% at 2 ms, 5% at 100 ms.
        for i in 0..2_000u64 {
            let ms = if i % 20 == 19 { 100 } else { 2 };
            window.record(Duration::from_millis(ms));
        }
        let p95 = window.percentile().unwrap();
        assert!(
            p95 >= Duration::from_millis(2) && p95 < Duration::from_micros(2_200),
            "{p95:?}"
        );
        // The distribution shifts: everything now takes 10 ms.
        for _ in 0..3_000 {
            window.record(Duration::from_millis(10));
        }
        let p95 = window.percentile().unwrap();
        assert!(
            p95 >= Duration::from_millis(10) && p95 < Duration::from_micros(10_700),
            "{p95:?}"
        );
        let median = window.median().unwrap();
        assert!(median >= Duration::from_millis(10), "{median:?}");
    }

    /// Latencies of 2 to 6 ms in a fixed scrambled order, and 2% of 100 ms (a slow share
    /// the hedges must cover); a request is hedged when its latency is above the delay.
    /// Returns the share hedged over the last `tail` requests.
    fn hedged_share(target: f64, start: f64, requests: u64, tail: u64) -> f64 {
        let window = LatencyWindow::new(1_000, 20, start);
        let rate = RateTarget::new(target);
        let mut hedged_at_end = 0;
        for i in 0..requests {
            let x = i.wrapping_mul(7_919) % 100;
            let latency = if x < 2 {
                Duration::from_millis(100)
            } else {
                Duration::from_micros(2_000 + (i.wrapping_mul(104_729) % 4_000))
            };
            let delay = window.percentile().unwrap_or(Duration::from_millis(10));
            if latency > delay {
                rate.hedged();
                if i >= requests - tail {
                    hedged_at_end += 1;
                }
            }
            // The hedge wins a slow request (its own latency is recorded), and loses a fast
            // one; the slow attempt it beat is never recorded.
            let recorded = if x < 2 {
                Duration::from_micros(2_000 + (i.wrapping_mul(31) % 4_000))
            } else {
                latency
            };
            if window.record(recorded) {
                rate.adjust(&window);
            }
        }
        hedged_at_end as f64 / tail as f64
    }

    #[test]
    fn a_rate_target_moves_the_percentile_until_that_share_is_hedged() {
        for target in [0.03, 0.05, 0.1] {
            let share = hedged_share(target, 1.0 - target, 60_000, 20_000);
            assert!(
                (share - target).abs() <= target * 0.25,
                "target {target}: {share} hedged"
            );
        }
    }

    #[test]
    fn a_rate_target_below_the_slow_share_keeps_the_percentile_high() {
        // 2% are slow and must be hedged; a 1% target cannot be met, and the percentile,
        // started at the median, goes up to its bound (a quarter of the target below 1).
        let share = hedged_share(0.01, 0.5, 60_000, 20_000);
        assert!((0.02..0.03).contains(&share), "{share} hedged");
    }
}
