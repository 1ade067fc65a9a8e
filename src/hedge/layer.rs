use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::latency::LatencyWindow;
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
            Delay::Percentile { window, initial } => window.percentile().unwrap_or(*initial),
        }
    }

    /// How long an attempt is expected to take, to judge whether it can meet a deadline.
    pub(crate) fn expected(&self) -> Duration {
        match &self.delay {
            Delay::Fixed(delay) => *delay,
            Delay::Percentile { window, initial } => window.median().unwrap_or(*initial),
        }
    }

    pub(crate) fn record(&self, latency: Duration) {
        if let Delay::Percentile { window, .. } = &self.delay {
            window.record(latency);
            if let Some(delay) = window.percentile() {
                self.metrics.get().delay.set(delay.as_secs_f64());
            }
        }
    }
}

/// A [`Layer`] that sends another attempt when the first is slow.
///
/// ```
/// use std::time::Duration;
/// use towerguard::budget::Budget;
/// use towerguard::hedge::HedgeLayer;
///
/// // Hedge after the 95th percentile of recent latencies, for at most 5% of requests.
/// let hedge = HedgeLayer::new()
///     .name("backend")
///     .percentile(0.95)
///     .budget(Budget::new(0.05, 1.0));
/// // Or after a fixed delay.
/// let fixed = HedgeLayer::new().fixed_delay(Duration::from_millis(20));
/// # let _ = (hedge, fixed);
/// ```
pub struct HedgeLayer<P = RetryErrors, C = TaskLocal> {
    shared: Arc<Shared>,
    policy: P,
    carrier: C,
    settings: Settings,
}

/// The builder's settings; the shared state is rebuilt from them when they change.
#[derive(Debug, Clone)]
struct Settings {
    name: String,
    fixed: Option<Duration>,
    percentile: f64,
    window: u64,
    min_samples: u64,
    initial: Duration,
    max_attempts: u32,
    budget: Option<Budget>,
    deposit: bool,
}

impl Settings {
    fn build(&self) -> Arc<Shared> {
        let metrics = Lazy::new(self.name.clone(), HedgeMetrics::register);
        let delay = match self.fixed {
            Some(delay) => Delay::Fixed(delay),
            None => Delay::Percentile {
                window: LatencyWindow::new(self.window, self.min_samples, self.percentile),
                initial: self.initial,
            },
        };
        Arc::new(Shared {
            delay,
            max_attempts: self.max_attempts,
            budget: self.budget.clone(),
            deposit: self.deposit,
            metrics,
        })
    }
}

impl<P: Clone, C: Clone> Clone for HedgeLayer<P, C> {
    fn clone(&self) -> Self {
        HedgeLayer {
            shared: self.shared.clone(),
            policy: self.policy.clone(),
            carrier: self.carrier.clone(),
            settings: self.settings.clone(),
        }
    }
}

impl<P: fmt::Debug, C> fmt::Debug for HedgeLayer<P, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HedgeLayer")
            .field("settings", &self.settings)
            .field("policy", &self.policy)
            .finish()
    }
}

impl Default for HedgeLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl HedgeLayer {
    /// Two attempts at most; the delay is the 95th percentile of the last 1,000 to 2,000
    /// successful attempts, 10 ms until 20 have been seen; hedges spend from a budget of
    /// 10% of successful requests plus 1 per second.
    pub fn new() -> Self {
        let settings = Settings {
            name: "default".to_owned(),
            fixed: None,
            percentile: 0.95,
            window: 1_000,
            min_samples: 20,
            initial: Duration::from_millis(10),
            max_attempts: 2,
            budget: Some(Budget::new(0.1, 1.0)),
            deposit: true,
        };
        HedgeLayer {
            shared: settings.build(),
            policy: RetryErrors,
            carrier: TaskLocal,
            settings,
        }
    }
}

impl<P, C> HedgeLayer<P, C> {
    fn with(mut self, f: impl FnOnce(&mut Settings)) -> Self {
        f(&mut self.settings);
        self.shared = self.settings.build();
        self
    }

    /// The instance name, the `name` label of every metric (default `"default"`).
    pub fn name(self, name: impl Into<String>) -> Self {
        let name = name.into();
        self.with(|s| s.name = name)
    }

    /// Hedge after this percentile (`0.0..=1.0`) of recent successful latencies.
    pub fn percentile(self, percentile: f64) -> Self {
        let percentile = if percentile.is_finite() {
            percentile.clamp(0.0, 1.0)
        } else {
            0.95
        };
        self.with(|s| {
            s.percentile = percentile;
            s.fixed = None;
        })
    }

    /// The sliding window: the percentile covers the last `samples` to `2 × samples`
    /// successful attempts.
    pub fn window(self, samples: u64) -> Self {
        self.with(|s| s.window = samples.max(1))
    }

    /// The delay used until `min_samples` successful attempts have been seen.
    pub fn initial_delay(self, delay: Duration, min_samples: u64) -> Self {
        self.with(|s| {
            s.initial = delay;
            s.min_samples = min_samples.max(1);
        })
    }

    /// Hedge after a fixed delay instead of a percentile.
    pub fn fixed_delay(self, delay: Duration) -> Self {
        self.with(|s| s.fixed = Some(delay))
    }

    /// Attempts in all, the first included (at least 1; 1 turns hedging off).
    pub fn max_attempts(self, attempts: u32) -> Self {
        self.with(|s| s.max_attempts = attempts.max(1))
    }

    /// The budget hedges spend from (share one with a retry layer).
    pub fn budget(self, budget: Budget) -> Self {
        self.with(|s| s.budget = Some(budget))
    }

    /// No budget: a uniformly slow backend then gets up to `max_attempts` times the load.
    pub fn without_budget(self) -> Self {
        self.with(|s| s.budget = None)
    }

    /// Whether successful requests deposit into the budget (default yes). Turn it off when
    /// a retry layer outside shares the budget and deposits already.
    pub fn deposit(self, deposit: bool) -> Self {
        self.with(|s| s.deposit = deposit)
    }

    /// Which requests may be hedged (those the policy can replay), and which responses
    /// may not win while another attempt is under way (those it would retry).
    pub fn policy<Q>(self, policy: Q) -> HedgeLayer<Q, C> {
        HedgeLayer {
            shared: self.shared,
            policy,
            carrier: self.carrier,
            settings: self.settings,
        }
    }

    /// Where each attempt's scope (cancellation token and deadline) is put besides the
    /// task-local: `towerguard::http::HttpExtensions` puts it in the
    /// request's extensions too, so a losing attempt sees its token cancelled there.
    pub fn carrier<C2>(self, carrier: C2) -> HedgeLayer<P, C2> {
        HedgeLayer {
            shared: self.shared,
            policy: self.policy,
            carrier,
            settings: self.settings,
        }
    }

    /// The current hedge delay.
    pub fn current_delay(&self) -> Duration {
        self.shared.delay()
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
