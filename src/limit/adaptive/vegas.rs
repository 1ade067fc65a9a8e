use std::time::Duration;

use super::{may_grow, Algorithm, Sample};

/// Windows after which, with no window at half the limit or under, a probe holds the limit
/// at half for one window to read the latency without a queue.
const PROBE_EVERY: usize = 32;

/// Probes at half the limit per probe that reads a quarter of the limit too.
const QUARTER_EVERY: usize = 4;

/// How far above the fastest request the unqueued latency must be for the probes to
/// check whether it is the backend's own spread: under it, the estimate against the
/// fastest holds a limit of 130 or more.
const SPREAD: f64 = 0.1;

/// A latency-based limit in the style of TCP Vegas.
///
/// Samples are averaged over a window (32 by default) so that latency jitter does not read
/// as queueing. Two estimates of the queue in the backend bound the limit, and the lower
/// of the two limits they allow wins:
///
/// - Against the fastest request (classic Vegas): the lowest latency seen is the no-load
///   latency, and `limit × (1 − no_load / latency)` the queue. With `step = max(1,
///   log10(limit))`: a queue under `step` allows `6 × step` more, under `3 × step` one
///   `step` more; over `6 × step` it takes the limit down. Latency that merely varies
///   reads as a queue here too, so this estimate can only hold a queue of several steps.
/// - Against the unqueued latency: the mean latency of a window with at most half the
///   limit in flight, which met no queue of ours and shows the backend's own spread. A
///   window of a busy limiter seldom has one, so every 32 windows a probe holds the limit
///   at half for one window to read it (at once when there is no reading yet). The queue
///   `limit × (1 − unqueued / latency)` over half a request (or over twice what the
///   windows' own noise makes of it) takes the limit down by `step`; under it the limit
///   grows by `step / 8`, faster after 8 such windows in a row. This holds the limit at
///   the backend's capacity with next to no queue, whatever its latency spread.
///
/// A backend's own spread still bounds the first estimate, and so the limit: a latency
/// that varies between 1 and 2 times its base reads as a queue of a third of the limit.
/// So when the unqueued latency is more than 10% above the fastest, every fourth probe
/// reads a quarter of the limit too, for one more window. If the latency there is the
/// same as at half (within 10%, or three times the windows' noise), half the limit met
/// no queue in the backend either: the unqueued latency is the backend's own, and it
/// replaces the fastest request as the first estimate's no-load latency. If it is lower,
/// the probe at half was itself over capacity (as when the limit starts far above it)
/// and the fastest request stays the no-load latency.
///
/// A drop (a timeout or an overload answer) takes the limit down by `step`. Under
/// sustained overload latency stays high against both baselines, so the limit does not
/// drift up; the no-load latency never rises by itself.
///
/// A probe costs throughput for one window in 33: about half the limit for its length;
/// the reading at a quarter, when taken, three quarters of the limit for one more.
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
    /// The mean latency of the latest windows that met no queue of ours (at most half
    /// the limit in flight), smoothed.
    unqueued: Option<f64>,
    /// Windows since the last one that met no queue.
    since_unqueued: usize,
    /// The probe under way, if any.
    probe: Probe,
    /// Probes at half the limit so far.
    probes: usize,
    /// The mean latency the last probe read at half the limit, in seconds.
    half_reading: Option<f64>,
    /// Whether the last pair of probes read the same latency at a quarter of the limit
    /// as at half: then half the limit met no queue in the backend either, and the
    /// unqueued latency is the backend's own, not a queue's.
    flat: bool,
    /// Windows in a row that showed no queue against the unqueued latency.
    clear: usize,
    /// The previous window's mean latency, in seconds.
    last: Option<f64>,
    /// How much a window's mean differs from the one before, relative, smoothed.
    noise: f64,
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
            unqueued: None,
            since_unqueued: 0,
            probe: Probe::None,
            probes: 0,
            half_reading: None,
            flat: false,
            clear: 0,
            last: None,
            noise: 0.0,
        }
    }

    /// How many samples are averaged into one update (at least 1, default 32).
    pub fn window(mut self, samples: usize) -> Self {
        self.window = samples.max(1);
        self
    }

    /// The mean latency of a window that met no queue of ours, smoothed over such windows
    /// (`None` until one was seen).
    pub fn unqueued_latency(&self) -> Option<Duration> {
        self.unqueued.map(Duration::from_secs_f64)
    }

    /// The limit a probe holds: half the limit, not under the minimum.
    fn probe_level(&self) -> usize {
        ((self.limit / 2.0).round() as usize).max(self.min)
    }

    /// The second probe's level: a quarter of the limit, not under the minimum.
    fn quarter_level(&self) -> usize {
        ((self.limit / 4.0).round() as usize).max(self.min)
    }

    /// Whether the latency at half the limit is the backend's own: the last probes read
    /// it no higher at half the limit than at a quarter (within the windows' noise).
    pub fn unqueued_is_flat(&self) -> bool {
        self.flat
    }

    /// Takes a window's mean latency as met without a queue of ours.
    fn read_unqueued(&mut self, latency: Duration) {
        let latency = latency.as_secs_f64();
        self.unqueued = Some(self.unqueued.map_or(latency, |old| (old + latency) / 2.0));
        self.since_unqueued = 0;
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
        let latency = sample.latency.max(Duration::from_micros(1));
        let level = self.probe_level();
        match self.probe {
            Probe::None => {}
            // Hold the limit at half until a whole window was admitted under it.
            Probe::Half if sample.in_flight > level => return level,
            Probe::Half => {
                self.read_unqueued(latency);
                self.half_reading = Some(latency.as_secs_f64());
                let quarter = self.quarter_level();
                // The second reading only where it can change the limit (the unqueued
                // latency well above the fastest: a spread the estimate against the
                // fastest reads as a queue), and then every fourth probe: it costs
                // three quarters of the limit for a window.
                let spread = match (self.unqueued, self.no_load) {
                    (Some(unqueued), Some(fastest)) => {
                        unqueued > fastest.as_secs_f64() * (1.0 + SPREAD)
                    }
                    _ => false,
                };
                if !spread || quarter >= level {
                    // Nothing for a reading at a quarter to decide, or no room for one.
                    self.flat = false;
                }
                self.probes += usize::from(spread);
                if spread && quarter < level && self.probes % QUARTER_EVERY == 1 {
                    self.probe = Probe::Quarter;
                    return quarter;
                }
                self.probe = Probe::None;
                return self.limit.round() as usize;
            }
            Probe::Quarter if sample.in_flight > self.quarter_level() => {
                return self.quarter_level()
            }
            Probe::Quarter => {
                self.probe = Probe::None;
                // Queueing in the backend raises the latency with the load; the
                // backend's own spread does not. Flat: at most 10% (or three times the
                // windows' noise) higher at half the limit than at a quarter.
                let quarter = latency.as_secs_f64();
                let tolerance = (3.0 * self.noise).max(0.1);
                self.flat = self
                    .half_reading
                    .is_some_and(|half| half <= quarter * (1.0 + tolerance));
                return self.limit.round() as usize;
            }
        }
        // Follow the limiter if it moved the limit (e.g. clamped it).
        if (self.limit.round() as usize) != current {
            self.limit = current as f64;
        }
        let mean = latency.as_secs_f64();
        if let Some(last) = self.last.replace(mean) {
            self.noise += ((mean / last - 1.0).abs() - self.noise) / 16.0;
        }
        if sample.in_flight <= level {
            self.read_unqueued(latency);
        } else {
            self.since_unqueued += 1;
        }
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
                // When the probes showed the unqueued latency to be the backend's own,
                // it is the no-load latency: the fastest request would read the
                // backend's spread as a queue.
                let no_load = match self.unqueued {
                    Some(unqueued) if self.flat => unqueued.max(no_load.as_secs_f64()),
                    _ => no_load.as_secs_f64(),
                };
                let queue = self.limit * (1.0 - no_load / mean);
                let by_mean = if queue <= step {
                    self.limit + 6.0 * step
                } else if queue < 3.0 * step {
                    self.limit + step
                } else if queue > 6.0 * step {
                    // Far over: give back half of the excess at once, so a limit that
                    // starts high reaches the backend's capacity in a few windows.
                    self.limit - step.max((queue - 6.0 * step) / 2.0)
                } else {
                    self.limit
                };
                // The queue against the latency met without one: latency that merely
                // varies shows in both, so this reads only what queueing adds, and can
                // hold a queue much smaller than the estimate against the fastest.
                let by_unqueued = match self.unqueued {
                    Some(unqueued) => {
                        let queue = self.limit * (1.0 - unqueued / mean);
                        // Half a request, or twice what the windows' noise makes of it.
                        let low = (2.0 * self.limit * self.noise).max(0.5);
                        if queue > low {
                            self.clear = 0;
                            self.limit - step
                        } else if queue >= -2.0 * low {
                            // Slowly at first, faster once no queue has shown for a while.
                            self.clear += 1;
                            self.limit + step / 8.0 * self.clear.saturating_sub(8).max(1) as f64
                        } else {
                            f64::INFINITY
                        }
                    }
                    None => f64::INFINITY,
                };
                by_mean.min(by_unqueued)
            }
        };
        self.limit = next.clamp(self.min as f64, self.max as f64);
        let current = self.limit.round() as usize;
        let level = self.probe_level();
        let due = self.unqueued.is_none() || self.since_unqueued >= PROBE_EVERY;
        if due && level < current && may_grow(current, &sample) {
            self.probe = Probe::Half;
            return level;
        }
        current
    }
}

/// Which reading a probe is taking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    None,
    /// At half the limit: the unqueued latency.
    Half,
    /// Then at a quarter: whether the latency at half was the backend's own.
    Quarter,
}
