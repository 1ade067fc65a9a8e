//! A sliding-window latency percentile, lock-free, at microsecond resolution.
//!
//! Latencies go into log-linear buckets (16 per power of two, so a bucket is at most about
//! 6% wide) of two histograms: the current one, and the previous full one. When the
//! current one holds `window` samples, the previous is cleared and becomes the current,
//! so the percentile covers the last `window` to `2 × window` samples. Recording is two
//! atomic increments; the percentile is recomputed by the recorder that lands on every
//! 32nd sample and read by everyone else from one atomic.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
    percentile: f64,
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
            .field("percentile", &self.percentile)
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
            percentile: percentile.clamp(0.0, 1.0),
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
            .store(value_at(rank(self.percentile)), Ordering::Relaxed);
        self.median.store(value_at(rank(0.5)), Ordering::Relaxed);
    }

    /// The configured percentile of the window, once there are enough samples.
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
}
