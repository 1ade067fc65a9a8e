use std::time::Duration;

use super::{may_grow, Algorithm, Sample};

/// Additive increase, multiplicative decrease.
///
/// Each successful sample with at least half the limit in use adds one; each dropped
/// sample (or one slower than the optional latency threshold) multiplies the limit by the
/// backoff ratio. Under sustained overload the drops keep pulling it down, so it cannot
/// drift upward.
///
/// ```
/// use towerguard::limit::adaptive::Aimd;
/// let aimd = Aimd::new(10, 1, 200).backoff_ratio(0.8);
/// # let _ = aimd;
/// ```
#[derive(Debug, Clone)]
pub struct Aimd {
    initial: usize,
    min: usize,
    max: usize,
    backoff_ratio: f64,
    latency_threshold: Option<Duration>,
}

impl Aimd {
    /// Starts at `initial`, stays within `min..=max`; backoff ratio 0.9.
    pub fn new(initial: usize, min: usize, max: usize) -> Self {
        let min = min.max(1);
        let max = max.max(min);
        Aimd {
            initial: initial.clamp(min, max),
            min,
            max,
            backoff_ratio: 0.9,
            latency_threshold: None,
        }
    }

    /// The factor applied on a drop, clamped to `0.5..=0.99`.
    pub fn backoff_ratio(mut self, ratio: f64) -> Self {
        self.backoff_ratio = if ratio.is_finite() {
            ratio.clamp(0.5, 0.99)
        } else {
            0.9
        };
        self
    }

    /// Treats a sample slower than `threshold` as a drop.
    pub fn latency_threshold(mut self, threshold: Duration) -> Self {
        self.latency_threshold = Some(threshold);
        self
    }
}

impl Algorithm for Aimd {
    fn initial_limit(&self) -> usize {
        self.initial
    }

    fn update(&mut self, current: usize, sample: Sample) -> usize {
        let slow = self
            .latency_threshold
            .is_some_and(|threshold| sample.latency > threshold);
        let next = if sample.dropped || slow {
            (current as f64 * self.backoff_ratio).floor() as usize
        } else if may_grow(current, &sample) {
            current + 1
        } else {
            current
        };
        next.clamp(self.min, self.max)
    }
}
