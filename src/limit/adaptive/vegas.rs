use std::time::Duration;

use super::{may_grow, Algorithm, Sample};

/// A latency-based limit in the style of TCP Vegas.
///
/// Samples are averaged over a window (32 by default) so that latency jitter does not read
/// as queueing. It keeps the lowest window latency seen as the no-load latency, and
/// estimates how many
/// requests are queued in the backend as `limit × (1 − no_load / latency)`. With `step =
/// max(1, log10(limit))`: a queue under `step` grows the limit by `6 × step`, under
/// `3 × step` by `step`; a queue over `6 × step` shrinks it by `step`; a drop shrinks it by
/// `step`. The limit settles where the backend holds a small queue: near its capacity.
///
/// Under sustained overload latency stays high against the no-load latency, so the queue
/// estimate keeps the limit from growing; the no-load latency never rises by itself.
///
/// ```
/// use towerguard::limit::adaptive::Vegas;
/// let vegas = Vegas::new(20, 1, 1_000);
/// # let _ = vegas;
/// ```
#[derive(Debug, Clone)]
pub struct Vegas {
    initial: usize,
    min: usize,
    max: usize,
    limit: f64,
    no_load: Option<Duration>,
    window: usize,
}

impl Vegas {
    /// Starts at `initial` and stays within `min..=max`.
    pub fn new(initial: usize, min: usize, max: usize) -> Self {
        let min = min.max(1);
        let max = max.max(min);
        let initial = initial.clamp(min, max);
        Vegas {
            initial,
            min,
            max,
            limit: initial as f64,
            no_load: None,
            window: 32,
        }
    }

    /// How many samples are averaged into one update (at least 1, default 32).
    pub fn window(mut self, samples: usize) -> Self {
        self.window = samples.max(1);
        self
    }

    /// The no-load latency estimate: the lowest latency seen so far.
    pub fn no_load_latency(&self) -> Option<Duration> {
        self.no_load
    }
}

impl Algorithm for Vegas {
    fn initial_limit(&self) -> usize {
        self.initial
    }

    fn window(&self) -> usize {
        self.window
    }

    fn update(&mut self, current: usize, sample: Sample) -> usize {
        // Follow the limiter if it moved the limit (e.g. clamped it).
        if (self.limit.round() as usize) != current {
            self.limit = current as f64;
        }
        let latency = sample.latency.max(Duration::from_micros(1));
        // The baseline is the shortest latency seen: a window's fastest request met the
        // least queueing.
        let fastest = sample.min_latency.clamp(Duration::from_micros(1), latency);
        let step = self.limit.log10().max(1.0);
        let next = match self.no_load {
            _ if sample.dropped => self.limit - step,
            None => {
                self.no_load = Some(fastest);
                self.limit
            }
            Some(no_load) if fastest < no_load => {
                self.no_load = Some(fastest);
                self.limit
            }
            Some(_) if !may_grow(current, &sample) => self.limit,
            Some(no_load) => {
                let queue = self.limit * (1.0 - no_load.as_secs_f64() / latency.as_secs_f64());
                if queue <= step {
                    self.limit + 6.0 * step
                } else if queue < 3.0 * step {
                    self.limit + step
                } else if queue > 6.0 * step {
                    // Far over: give back half of the excess at once, so a limit that
                    // starts high reaches the backend's capacity in a few windows.
                    self.limit - step.max((queue - 6.0 * step) / 2.0)
                } else {
                    self.limit
                }
            }
        };
        self.limit = next.clamp(self.min as f64, self.max as f64);
        self.limit.round() as usize
    }
}
