use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tower_layer::Layer;

use super::backoff::Backoff;
use super::policy::RetryErrors;
use super::service::Retry;
use crate::budget::Budget;
use crate::metrics::{Lazy, RetryMetrics};

/// State shared by every clone of one retry layer.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) settings: Settings,
    /// `settings` for the life of the process, when [`Settings::interned`] kept them.
    pub(crate) interned: Option<&'static Settings>,
    pub(crate) budget: Option<Budget>,
    pub(crate) deposit: bool,
    pub(crate) metrics: Lazy<RetryMetrics>,
}

impl Shared {
    /// Whether a request needs this state: to deposit into or withdraw from a budget, to
    /// record metrics, or to read the settings (when they were not interned). Without
    /// these, a request touches nothing shared (no reference count moves), which keeps the
    /// pass-through cheap and free of contention between threads.
    pub(crate) fn needed_per_request(&self) -> bool {
        self.budget.is_some() || self.metrics.recording() || self.interned.is_none()
    }
}

/// What a retry decision reads besides the budget. Durations are kept in nanoseconds
/// (saturating at about 584 years).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Settings {
    pub(crate) max_attempts: u32,
    backoff_base: u64,
    backoff_cap: u64,
    max_retry_after: u64,
}

/// How many distinct [`Settings`] a process keeps for good (see [`Settings::interned`]).
pub(crate) const INTERNED_MAX: usize = 64;

impl Settings {
    fn new(max_attempts: u32, backoff: Backoff, max_retry_after: Duration) -> Self {
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        Settings {
            max_attempts,
            backoff_base: nanos(backoff.base()),
            backoff_cap: nanos(backoff.cap()),
            max_retry_after: nanos(max_retry_after),
        }
    }

    /// One copy of this value for the life of the process, shared by every layer built
    /// with the same settings, so that a response future carries a pointer to them: a copy
    /// is 32 bytes written per request, and a reference count would move on every request
    /// (on two threads, the cost that mattered most). A program has few distinct retry
    /// configurations; at most [`INTERNED_MAX`] are kept (a couple of kilobytes), and past
    /// that this is `None` and the layer's requests read the settings through its shared
    /// state instead.
    fn interned(self) -> Option<&'static Settings> {
        static KEPT: Mutex<Vec<&'static Settings>> = Mutex::new(Vec::new());
        let mut kept = KEPT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(found) = kept.iter().find(|kept| ***kept == self) {
            return Some(found);
        }
        if kept.len() >= INTERNED_MAX {
            return None;
        }
        let leaked: &'static Settings = Box::leak(Box::new(self));
        kept.push(leaked);
        Some(leaked)
    }

    pub(crate) fn backoff(&self) -> Backoff {
        Backoff::new(
            Duration::from_nanos(self.backoff_base),
            Duration::from_nanos(self.backoff_cap),
        )
    }

    pub(crate) fn max_retry_after(&self) -> Duration {
        Duration::from_nanos(self.max_retry_after)
    }
}

/// A [`Layer`] that retries transient failures with backoff, within a budget.
///
/// Built once with [`RetryLayer::builder`]; every clone of the layer and every service it
/// makes share one budget and one set of metric series.
///
/// ```
/// use std::time::Duration;
/// use towerguard::budget::Budget;
/// use towerguard::retry::{Backoff, RetryLayer};
///
/// let retry = RetryLayer::builder()
///     .name("backend")
///     .max_attempts(3)
///     .backoff(Backoff::new(Duration::from_millis(20), Duration::from_secs(1)))
///     .budget(Budget::new(0.2, 10.0))
///     .build();
/// # let _ = retry;
/// ```
#[must_use]
pub struct RetryLayer<P = RetryErrors> {
    shared: Arc<Shared>,
    policy: P,
}

impl<P: Clone> Clone for RetryLayer<P> {
    fn clone(&self) -> Self {
        RetryLayer {
            shared: self.shared.clone(),
            policy: self.policy.clone(),
        }
    }
}

impl<P: fmt::Debug> fmt::Debug for RetryLayer<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryLayer")
            .field("shared", &self.shared)
            .field("policy", &self.policy)
            .finish()
    }
}

impl Default for RetryLayer {
    /// [`RetryLayer::builder`]'s defaults.
    fn default() -> Self {
        Self::builder().build()
    }
}

impl RetryLayer {
    /// Starts a builder: four attempts in all, backoff 25 ms doubling to 1 s with full
    /// jitter, `Retry-After` honoured up to 10 s, a budget of 20% of successful requests
    /// plus 10 per second, and the [`RetryErrors`] policy.
    pub fn builder() -> RetryBuilder {
        RetryBuilder {
            name: "default".to_owned(),
            max_attempts: 4,
            backoff: Backoff::default(),
            max_retry_after: Duration::from_secs(10),
            budget: Some(Budget::new(0.2, 10.0)),
            deposit: true,
            policy: RetryErrors,
        }
    }
}

impl<P> RetryLayer<P> {
    /// The budget, if any.
    pub fn budget(&self) -> Option<&Budget> {
        self.shared.budget.as_ref()
    }
}

/// Configures a [`RetryLayer`]; [`build`](Self::build) makes its shared state once.
#[must_use]
#[derive(Debug, Clone)]
pub struct RetryBuilder<P = RetryErrors> {
    name: String,
    max_attempts: u32,
    backoff: Backoff,
    max_retry_after: Duration,
    budget: Option<Budget>,
    deposit: bool,
    policy: P,
}

impl<P> RetryBuilder<P> {
    /// The instance name, the `name` label of every metric (default `"default"`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Attempts in all, the first included (at least 1).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The wait between attempts when the server names none.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// The longest `Retry-After` honoured; a longer one ends the retries.
    pub fn max_retry_after(mut self, cap: Duration) -> Self {
        self.max_retry_after = cap;
        self
    }

    /// The budget retries spend from (share one with a hedge layer).
    pub fn budget(mut self, budget: Budget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// No budget: only `max_attempts` bounds the retries. A total outage then multiplies
    /// the load by `max_attempts`.
    pub fn without_budget(mut self) -> Self {
        self.budget = None;
        self
    }

    /// Whether successful requests deposit into the budget (default yes). Turn it off on
    /// the inner of two layers sharing one budget, so a request deposits once.
    pub fn deposit(mut self, deposit: bool) -> Self {
        self.deposit = deposit;
        self
    }

    /// Which requests are replayed and which outcomes retried.
    pub fn policy<Q>(self, policy: Q) -> RetryBuilder<Q> {
        RetryBuilder {
            name: self.name,
            max_attempts: self.max_attempts,
            backoff: self.backoff,
            max_retry_after: self.max_retry_after,
            budget: self.budget,
            deposit: self.deposit,
            policy,
        }
    }

    /// Builds the layer and its shared state.
    ///
    /// The settings (attempts, backoff, `Retry-After` cap) are kept for the life of the
    /// process, once per distinct value and at most 64 values (a few kilobytes), so a
    /// request carries a pointer to them; layers past that bound work the same, each
    /// request holding a reference to the layer's state instead.
    pub fn build(self) -> RetryLayer<P> {
        let settings = Settings::new(self.max_attempts, self.backoff, self.max_retry_after);
        RetryLayer {
            shared: Arc::new(Shared {
                settings,
                interned: settings.interned(),
                budget: self.budget,
                deposit: self.deposit,
                metrics: Lazy::new(self.name, RetryMetrics::register),
            }),
            policy: self.policy,
        }
    }
}

impl<S, P: Clone> Layer<S> for RetryLayer<P> {
    type Service = Retry<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        self.shared.metrics.get();
        Retry::from_parts(inner, self.policy.clone(), self.shared.clone())
    }
}
