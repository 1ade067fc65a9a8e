use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::latency::{LatencyWindow, RateTarget};
use super::service::Hedge;
use crate::budget::Budget;
use crate::metrics::{HedgeMetrics, Lazy};
use crate::retry::RetryErrors;
use crate::timeout::TaskLocal;

/// How the hedge delay is chosen.
#[derive(Debug)]
pub(crate) enum Delay {
    Fixed(Duration),
    Percentile {
        window: LatencyWindow,
        initial: Duration,
        /// Moves the percentile to hedge a share of requests; `None` keeps it fixed.
        rate: Option<RateTarget>,
    },
}

/// Settings and state shared by every clone of one hedge layer.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) delay: Delay,
    pub(crate) max_attempts: u32,
    pub(crate) budget: Option<Budget>,
    pub(crate) deposit: bool,
    pub(crate) metrics: Lazy<HedgeMetrics>,
}

impl Shared {
    /// The delay before the next attempt.
    pub(crate) fn delay(&self) -> Duration {
        match &self.delay {
            Delay::Fixed(delay) => *delay,
            Delay::Percentile {
                window, initial, ..
            } => window.percentile().unwrap_or(*initial),
        }
    }

    /// Counts a hedge sent, for a rate target.
    pub(crate) fn hedged(&self) {
        if let Delay::Percentile {
            rate: Some(rate), ..
        } = &self.delay
        {
            rate.hedged();
        }
    }

    /// How long an attempt is expected to take, to judge whether it can meet a deadline.
    pub(crate) fn expected(&self) -> Duration {
        match &self.delay {
            Delay::Fixed(delay) => *delay,
            Delay::Percentile {
                window, initial, ..
            } => window.median().unwrap_or(*initial),
        }
    }

    pub(crate) fn record(&self, latency: Duration) {
        if let Delay::Percentile { window, rate, .. } = &self.delay {
            if window.record(latency) {
                if let Some(rate) = rate {
                    rate.adjust(window);
                }
                if let Some(delay) = window.percentile() {
                    self.metrics.get().delay.set(delay.as_secs_f64());
                }
            }
        }
    }
}

/// A [`Layer`] that sends another attempt when the first is slow.
///
/// Built once with [`HedgeLayer::builder`]; every clone of the layer and every service it
/// makes share one latency window, one budget and one set of metric series.
///
/// ```
/// use std::time::Duration;
/// use towerguard::budget::Budget;
/// use towerguard::hedge::HedgeLayer;
///
/// // Hedge about 2% of requests (the delay follows), from a budget of at most 5%.
/// let hedge = HedgeLayer::builder()
///     .name("backend")
///     .hedge_rate(0.02)
///     .budget(Budget::new(0.05, 1.0))
///     .build();
/// // Or always after the 95th percentile of recent latencies.
/// let p95 = HedgeLayer::builder().percentile(0.95).build();
/// // Or after a fixed delay.
/// let fixed = HedgeLayer::builder()
///     .fixed_delay(Duration::from_millis(20))
///     .build();
/// # let _ = (hedge, fixed);
/// ```
#[must_use]
pub struct HedgeLayer<P = RetryErrors, C = TaskLocal> {
    shared: Arc<Shared>,
    policy: P,
    carrier: C,
}

impl<P: Clone, C: Clone> Clone for HedgeLayer<P, C> {
    fn clone(&self) -> Self {
        HedgeLayer {
            shared: self.shared.clone(),
            policy: self.policy.clone(),
            carrier: self.carrier.clone(),
        }
    }
}

impl<P: fmt::Debug, C> fmt::Debug for HedgeLayer<P, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HedgeLayer")
            .field("shared", &self.shared)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Default for HedgeLayer {
    /// [`HedgeLayer::builder`]'s defaults.
    fn default() -> Self {
        Self::builder().build()
    }
}

impl HedgeLayer {
    /// Starts a builder: two attempts at most; the delay is the percentile of the last
    /// 1,000 to 2,000 successful attempts that hedges about 4% of requests (see
    /// [`hedge_rate`](HedgeBuilder::hedge_rate)), 10 ms until 20 have been seen; hedges
    /// spend from a budget of 10% of successful requests plus 1 per second.
    pub fn builder() -> HedgeBuilder {
        HedgeBuilder {
            settings: Settings {
                name: "default".to_owned(),
                fixed: None,
                percentile: 0.96,
                rate: Some(0.04),
                window: 1_000,
                min_samples: 20,
                initial: Duration::from_millis(10),
                max_attempts: 2,
                budget: Some(Budget::new(0.1, 1.0)),
                deposit: true,
            },
            policy: RetryErrors,
            carrier: TaskLocal,
        }
    }
}

impl<P, C> HedgeLayer<P, C> {
    /// The current hedge delay.
    pub fn current_delay(&self) -> Duration {
        self.shared.delay()
    }
}

/// Configures a [`HedgeLayer`]; [`build`](Self::build) makes its shared state once.
#[must_use]
#[derive(Debug, Clone)]
pub struct HedgeBuilder<P = RetryErrors, C = TaskLocal> {
    settings: Settings,
    policy: P,
    carrier: C,
}

/// What the builder sets besides the policy and the carrier.
#[derive(Debug, Clone)]
struct Settings {
    name: String,
    fixed: Option<Duration>,
    percentile: f64,
    rate: Option<f64>,
    window: u64,
    min_samples: u64,
    initial: Duration,
    max_attempts: u32,
    budget: Option<Budget>,
    deposit: bool,
}

impl<P, C> HedgeBuilder<P, C> {
    /// The instance name, the `name` label of every metric (default `"default"`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.settings.name = name.into();
        self
    }

    /// Hedge after this percentile (`0.0..=1.0`) of recent successful latencies, always
    /// (no [`hedge_rate`](Self::hedge_rate)).
    pub fn percentile(mut self, percentile: f64) -> Self {
        self.settings.percentile = if percentile.is_finite() {
            percentile.clamp(0.0, 1.0)
        } else {
            0.95
        };
        self.settings.rate = None;
        self.settings.fixed = None;
        self
    }

    /// Hedge about this share of requests (`0.001..=0.5`, default 0.04): the delay is a
    /// percentile of recent successful latencies that moves until the share of requests
    /// hedged is `rate`.
    ///
    /// A fixed percentile hedges its complement of the requests whose latency follows the
    /// recent ones, plus every request that is slow for another reason (a slow replica, a
    /// pause), and is late when the latencies are coarse (a timer's millisecond). Aiming
    /// at a share spends what you meant to spend and no more: when 2% of calls hang, a 4%
    /// rate hedges those and the slowest 2% of the rest, at the earliest delay that allows.
    /// The percentile stays between `1 − rate / 4` and the median. The budget still caps
    /// what is spent; keep `rate` below its ratio.
    pub fn hedge_rate(mut self, rate: f64) -> Self {
        self.settings.rate = Some(if rate.is_finite() { rate } else { 0.04 });
        self.settings.fixed = None;
        self
    }

    /// The sliding window: the percentile covers the last `samples` to `2 × samples`
    /// successful attempts.
    pub fn window(mut self, samples: u64) -> Self {
        self.settings.window = samples.max(1);
        self
    }

    /// The delay used until `min_samples` successful attempts have been seen.
    pub fn initial_delay(mut self, delay: Duration, min_samples: u64) -> Self {
        self.settings.initial = delay;
        self.settings.min_samples = min_samples.max(1);
        self
    }

    /// Hedge after a fixed delay instead of a percentile.
    pub fn fixed_delay(mut self, delay: Duration) -> Self {
        self.settings.fixed = Some(delay);
        self
    }

    /// Attempts in all, the first included (at least 1; 1 turns hedging off).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.settings.max_attempts = attempts.max(1);
        self
    }

    /// The budget hedges spend from (share one with a retry layer).
    pub fn budget(mut self, budget: Budget) -> Self {
        self.settings.budget = Some(budget);
        self
    }

    /// No budget: a uniformly slow backend then gets up to `max_attempts` times the load.
    pub fn without_budget(mut self) -> Self {
        self.settings.budget = None;
        self
    }

    /// Whether successful requests deposit into the budget (default yes). Turn it off when
    /// a retry layer outside shares the budget and deposits already.
    pub fn deposit(mut self, deposit: bool) -> Self {
        self.settings.deposit = deposit;
        self
    }

    /// Which requests may be hedged (those the policy can replay), and which responses
    /// may not win while another attempt is under way (those it would retry).
    pub fn policy<Q>(self, policy: Q) -> HedgeBuilder<Q, C> {
        HedgeBuilder {
            settings: self.settings,
            policy,
            carrier: self.carrier,
        }
    }

    /// Where each attempt's scope (cancellation token and deadline) is put besides the
    /// task-local: with the `http` feature, `towerguard::http::HttpExtensions` puts it in
    /// the request's extensions too, so a losing attempt sees its token cancelled there.
    pub fn carrier<C2>(self, carrier: C2) -> HedgeBuilder<P, C2> {
        HedgeBuilder {
            settings: self.settings,
            policy: self.policy,
            carrier,
        }
    }

    /// Builds the layer and its shared state.
    pub fn build(self) -> HedgeLayer<P, C> {
        let settings = self.settings;
        let delay = match settings.fixed {
            Some(delay) => Delay::Fixed(delay),
            None => {
                let rate = settings.rate.map(RateTarget::new);
                let percentile = rate
                    .as_ref()
                    .map_or(settings.percentile, RateTarget::initial_percentile);
                Delay::Percentile {
                    window: LatencyWindow::new(settings.window, settings.min_samples, percentile),
                    initial: settings.initial,
                    rate,
                }
            }
        };
        HedgeLayer {
            shared: Arc::new(Shared {
                delay,
                max_attempts: settings.max_attempts,
                budget: settings.budget,
                deposit: settings.deposit,
                metrics: Lazy::new(settings.name, HedgeMetrics::register),
            }),
            policy: self.policy,
            carrier: self.carrier,
        }
    }
}

impl<S, P: Clone, C: Clone> Layer<S> for HedgeLayer<P, C> {
    type Service = Hedge<S, P, C>;

    fn layer(&self, inner: S) -> Self::Service {
        let delay = self.shared.delay();
        self.shared.metrics.get().delay.set(delay.as_secs_f64());
        Hedge::from_parts(
            inner,
            self.policy.clone(),
            self.carrier.clone(),
            self.shared.clone(),
        )
    }
}
