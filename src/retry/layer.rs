use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::backoff::{Backoff, Jitter};
use super::policy::RetryErrors;
use super::service::Retry;
use crate::budget::Budget;
use crate::metrics::{Lazy, RetryMetrics};

/// Settings shared by every clone of one retry layer.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) max_attempts: u32,
    pub(crate) backoff: Backoff,
    pub(crate) max_retry_after: Duration,
    pub(crate) budget: Option<Budget>,
    pub(crate) deposit: bool,
    pub(crate) jitter: Jitter,
    pub(crate) metrics: Lazy<RetryMetrics>,
}

/// A [`Layer`] that retries transient failures with backoff, within a budget.
///
/// ```
/// use std::time::Duration;
/// use towerguard::budget::Budget;
/// use towerguard::retry::{Backoff, RetryLayer};
///
/// let retry = RetryLayer::new()
///     .name("backend")
///     .max_attempts(3)
///     .backoff(Backoff::new(Duration::from_millis(20), Duration::from_secs(1)))
///     .budget(Budget::new(0.2, 10.0));
/// # let _ = retry;
/// ```
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
    fn default() -> Self {
        Self::new()
    }
}

impl RetryLayer {
    /// Four attempts in all, backoff 25 ms doubling to 1 s with full jitter, `Retry-After`
    /// honoured up to 10 s, a budget of 20% of successful requests plus 10 per second, and
    /// the [`RetryErrors`] policy.
    pub fn new() -> Self {
        RetryLayer {
            shared: Arc::new(Shared {
                max_attempts: 4,
                backoff: Backoff::default(),
                max_retry_after: Duration::from_secs(10),
                budget: Some(Budget::new(0.2, 10.0)),
                deposit: true,
                jitter: Jitter::new(),
                metrics: Lazy::new("default", RetryMetrics::register),
            }),
            policy: RetryErrors,
        }
    }
}

impl<P> RetryLayer<P> {
    fn with(self, f: impl FnOnce(&mut Shared)) -> Self {
        let mut shared = Arc::try_unwrap(self.shared).unwrap_or_else(|shared| Shared {
            max_attempts: shared.max_attempts,
            backoff: shared.backoff,
            max_retry_after: shared.max_retry_after,
            budget: shared.budget.clone(),
            deposit: shared.deposit,
            jitter: Jitter::new(),
            metrics: Lazy::new(shared.metrics.name(), RetryMetrics::register),
        });
        f(&mut shared);
        RetryLayer {
            shared: Arc::new(shared),
            policy: self.policy,
        }
    }

    /// The instance name, the `name` label of every metric (default `"default"`).
    pub fn name(self, name: &str) -> Self {
        self.with(|s| s.metrics = Lazy::new(name, RetryMetrics::register))
    }

    /// Attempts in all, the first included (at least 1).
    pub fn max_attempts(self, attempts: u32) -> Self {
        self.with(|s| s.max_attempts = attempts.max(1))
    }

    /// The wait between attempts when the server names none.
    pub fn backoff(self, backoff: Backoff) -> Self {
        self.with(|s| s.backoff = backoff)
    }

    /// The longest `Retry-After` honoured; a longer one ends the retries.
    pub fn max_retry_after(self, cap: Duration) -> Self {
        self.with(|s| s.max_retry_after = cap)
    }

    /// The budget retries spend from (share one with a hedge layer).
    pub fn budget(self, budget: Budget) -> Self {
        self.with(|s| s.budget = Some(budget))
    }

    /// No budget: only `max_attempts` bounds the retries. A total outage then multiplies
    /// the load by `max_attempts`.
    pub fn without_budget(self) -> Self {
        self.with(|s| s.budget = None)
    }

    /// Whether successful requests deposit into the budget (default yes). Turn it off on
    /// the inner of two layers sharing one budget, so a request deposits once.
    pub fn deposit(self, deposit: bool) -> Self {
        self.with(|s| s.deposit = deposit)
    }

    /// Which requests are replayed and which outcomes retried.
    pub fn policy<Q>(self, policy: Q) -> RetryLayer<Q> {
        RetryLayer {
            shared: self.shared,
            policy,
        }
    }

    /// The budget, if any.
    pub fn get_budget(&self) -> Option<&Budget> {
        self.shared.budget.as_ref()
    }
}

impl<S, P: Clone> Layer<S> for RetryLayer<P> {
    type Service = Retry<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        self.shared.metrics.get();
        Retry::from_parts(inner, self.policy.clone(), self.shared.clone())
    }
}
