//! The builder, its defaults and its validation.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower::util::{BoxCloneSyncService, Either};
use tower_layer::Layer;

use super::GenericStack;
use crate::budget::Budget;
use crate::cache::CacheLayer;
use crate::error::Error;
use crate::hedge::HedgeLayer;
#[cfg(feature = "http")]
use crate::http::HttpCacheLayer;
use crate::limit::adaptive::Vegas;
use crate::limit::{ConcurrencyLimitLayer, QueueDiscipline};
use crate::retry::{RetryErrors, RetryLayer};
use crate::timeout::{TaskLocal, TimeoutLayer};

/// A configuration the builder refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StackError {
    /// The attempt timeout is longer than the total timeout: it could never fire.
    AttemptTimeoutExceedsTotal {
        /// The attempt timeout.
        attempt: Duration,
        /// The total timeout.
        total: Duration,
    },
    /// The hedge delays add up beyond the total timeout: the last hedge could never start.
    HedgeDelaysExceedTotal {
        /// The delay times the hedged attempts.
        delays: Duration,
        /// The total timeout.
        total: Duration,
    },
    /// Retries or hedges without a budget: a total outage would multiply the load.
    RetryWithoutBudget,
    /// The limit's queue wait is not shorter than the total timeout: queued requests would
    /// time out instead of being shed.
    QueueWaitExceedsTotal {
        /// The queue's maximum wait.
        wait: Duration,
        /// The total timeout.
        total: Duration,
    },
    /// A zero duration where a timeout was asked for.
    ZeroTimeout,
}

impl fmt::Display for StackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StackError::AttemptTimeoutExceedsTotal { attempt, total } => write!(
                f,
                "attempt timeout {attempt:?} is longer than the total timeout {total:?}: \
                 lower `attempt_timeout` or raise `total_timeout`"
            ),
            StackError::HedgeDelaysExceedTotal { delays, total } => write!(
                f,
                "hedge delays add up to {delays:?}, not less than the total timeout {total:?}: \
                 lower the delay given to `hedge` or raise `total_timeout`"
            ),
            StackError::RetryWithoutBudget => f.write_str(
                "retries or hedges need a budget, or a total outage multiplies the load: \
                 set one with `budget` (instead of `without_budget`), or set \
                 `retry_attempts` to 1 and do not call `hedge`",
            ),
            StackError::QueueWaitExceedsTotal { wait, total } => write!(
                f,
                "queue wait {wait:?} is not shorter than the total timeout {total:?}: \
                 lower the wait given to `queue` or raise `total_timeout`"
            ),
            StackError::ZeroTimeout => f.write_str(
                "a timeout of zero would fail every request: give `total_timeout` and \
                 `attempt_timeout` a positive duration, or use `without_total_timeout` / \
                 `without_attempt_timeout`",
            ),
        }
    }
}

impl std::error::Error for StackError {}

/// The per-attempt timeout: the default follows the total timeout.
#[derive(Debug, Clone, Copy)]
enum AttemptTimeout {
    Default,
    Set(Duration),
    Off,
}

/// The attempt timeout when none is set: 3 s, or the total timeout shared out between the
/// attempts when that is shorter.
const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone)]
enum Limit {
    Off,
    Static(usize),
    Adaptive {
        initial: usize,
        min: usize,
        max: usize,
    },
}

/// Builds the standard stack; see [the module](super) for the order and the defaults.
#[derive(Debug, Clone)]
#[must_use]
pub struct StackBuilder {
    name: String,
    pub(super) total_timeout: Option<Duration>,
    attempt_timeout: AttemptTimeout,
    limit: Limit,
    queue: Option<(usize, Duration)>,
    discipline: QueueDiscipline,
    retry_attempts: u32,
    budget: Option<Budget>,
    hedge: Option<Option<Duration>>,
    #[cfg(feature = "http")]
    pub(super) http_cache: Option<HttpCacheLayer>,
    #[cfg(feature = "http")]
    pub(super) max_body: usize,
}

impl Default for StackBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// The stack's service for generic requests.
pub type StackService<Req, Res> = BoxCloneSyncService<Req, Res, Error>;

impl StackBuilder {
    /// The defaults of [the module](super).
    pub fn new() -> Self {
        StackBuilder {
            name: "default".to_owned(),
            total_timeout: Some(Duration::from_secs(10)),
            attempt_timeout: AttemptTimeout::Default,
            limit: Limit::Adaptive {
                initial: 16,
                min: 4,
                max: 1_000,
            },
            queue: Some((256, Duration::from_millis(100))),
            discipline: QueueDiscipline::codel(),
            retry_attempts: 3,
            budget: Some(Budget::new(0.2, 10.0)),
            hedge: None,
            #[cfg(feature = "http")]
            http_cache: None,
            #[cfg(feature = "http")]
            max_body: 64 * 1024,
        }
    }

    /// The instance name, the `name` label of the layers' metrics: the limit, retry and
    /// hedge report `name`, the total timeout `{name}_total` and the attempt timeout
    /// `{name}_attempt` (default `"default"`; an HTTP cache set with
    /// [`http_cache`](Self::http_cache) keeps its own name).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The total timeout, from `call` to the response.
    pub fn total_timeout(mut self, timeout: Duration) -> Self {
        self.total_timeout = Some(timeout);
        self
    }

    /// No total timeout.
    pub fn without_total_timeout(mut self) -> Self {
        self.total_timeout = None;
        self
    }

    /// The timeout of each attempt. Unless set, 3 s, or the total timeout divided by the
    /// retry attempts when that is shorter, so a default never contradicts the total.
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = AttemptTimeout::Set(timeout);
        self
    }

    /// No per-attempt timeout.
    pub fn without_attempt_timeout(mut self) -> Self {
        self.attempt_timeout = AttemptTimeout::Off;
        self
    }

    /// The attempt timeout in force: the one set, or the default for the total timeout
    /// and the retry attempts set.
    fn effective_attempt_timeout(&self) -> Option<Duration> {
        match self.attempt_timeout {
            AttemptTimeout::Set(timeout) => Some(timeout),
            AttemptTimeout::Off => None,
            AttemptTimeout::Default => Some(match self.total_timeout {
                Some(total) => DEFAULT_ATTEMPT_TIMEOUT.min(total / self.retry_attempts),
                None => DEFAULT_ATTEMPT_TIMEOUT,
            }),
        }
    }

    /// A static concurrency limit.
    pub fn static_limit(mut self, max: usize) -> Self {
        self.limit = Limit::Static(max);
        self
    }

    /// An adaptive concurrency limit (Vegas) between `min` and `max`.
    pub fn adaptive_limit(mut self, initial: usize, min: usize, max: usize) -> Self {
        self.limit = Limit::Adaptive { initial, min, max };
        self
    }

    /// No concurrency limit.
    pub fn without_limit(mut self) -> Self {
        self.limit = Limit::Off;
        self
    }

    /// The limit's queue: at most `len` requests waiting at most `wait`.
    pub fn queue(mut self, len: usize, wait: Duration) -> Self {
        self.queue = Some((len, wait));
        self
    }

    /// How the limit's queue orders and bounds its waiters: CoDel with adaptive LIFO
    /// ([`QueueDiscipline::codel`]) unless set.
    pub fn queue_discipline(mut self, discipline: QueueDiscipline) -> Self {
        self.discipline = discipline;
        self
    }

    /// No queue: reject at once when the limit is reached.
    pub fn without_queue(mut self) -> Self {
        self.queue = None;
        self
    }

    /// Attempts in all for retries (1 turns retry off).
    pub fn retry_attempts(mut self, attempts: u32) -> Self {
        self.retry_attempts = attempts.max(1);
        self
    }

    /// The budget retries and hedges share.
    pub fn budget(mut self, budget: Budget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// No budget (refused while retry or hedge is on).
    pub fn without_budget(mut self) -> Self {
        self.budget = None;
        self
    }

    /// Hedge after a fixed delay.
    pub fn hedge(mut self, delay: Duration) -> Self {
        self.hedge = Some(Some(delay));
        self
    }

    /// Hedge after a percentile of recent latencies that hedges about 4% of requests
    /// ([`HedgeBuilder::hedge_rate`](crate::hedge::HedgeBuilder::hedge_rate)).
    pub fn hedge_adaptive(mut self) -> Self {
        self.hedge = Some(None);
        self
    }

    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), StackError> {
        let attempt_timeout = self.effective_attempt_timeout();
        if self.total_timeout.is_some_and(|t| t.is_zero())
            || attempt_timeout.is_some_and(|t| t.is_zero())
        {
            return Err(StackError::ZeroTimeout);
        }
        if (self.retry_attempts > 1 || self.hedge.is_some()) && self.budget.is_none() {
            return Err(StackError::RetryWithoutBudget);
        }
        let Some(total) = self.total_timeout else {
            return Ok(());
        };
        if let Some(attempt) = attempt_timeout {
            if attempt > total {
                return Err(StackError::AttemptTimeoutExceedsTotal { attempt, total });
            }
        }
        if let Some(Some(delay)) = self.hedge {
            if delay >= total {
                return Err(StackError::HedgeDelaysExceedTotal {
                    delays: delay,
                    total,
                });
            }
        }
        if let (Some((_, wait)), false) = (self.queue, matches!(self.limit, Limit::Off)) {
            if wait >= total {
                return Err(StackError::QueueWaitExceedsTotal { wait, total });
            }
        }
        Ok(())
    }

    fn limit_layer(&self) -> Option<ConcurrencyLimitLayer> {
        let builder = ConcurrencyLimitLayer::builder().name(self.name.clone());
        let builder = match self.limit {
            Limit::Off => return None,
            Limit::Static(max) => builder.limit(max),
            Limit::Adaptive { initial, min, max } => {
                builder.adaptive(Vegas::new(initial, min, max))
            }
        };
        let builder = match self.queue {
            Some((len, wait)) => builder.queue(len, wait),
            None => builder,
        };
        Some(builder.queue_discipline(self.discipline).build())
    }

    /// Builds every layer below the cache once, with its shared state: the limiter and
    /// its algorithm, the hedge's latency window, the budget, the metric handles.
    pub(super) fn layers<P: Clone, C: Clone>(&self, policy: P, carrier: C) -> Layers<P, C> {
        let attempt = self.effective_attempt_timeout().map(|attempt| {
            TimeoutLayer::new(attempt)
                .name(format!("{}_attempt", self.name))
                .carrier(carrier.clone())
        });
        let hedge = self.hedge.map(|delay| {
            let mut layer = HedgeLayer::builder().name(self.name.clone());
            if let Some(delay) = delay {
                layer = layer.fixed_delay(delay);
            }
            if let Some(budget) = &self.budget {
                // The retry layer outside deposits for the request.
                layer = layer
                    .budget(budget.clone())
                    .deposit(self.retry_attempts <= 1);
            }
            layer
                .policy(policy.clone())
                .carrier(carrier.clone())
                .build()
        });
        let retry = (self.retry_attempts > 1).then(|| {
            let layer = RetryLayer::builder()
                .name(self.name.clone())
                .max_attempts(self.retry_attempts);
            let layer = match &self.budget {
                Some(budget) => layer.budget(budget.clone()),
                None => layer.without_budget(),
            };
            layer.policy(policy).build()
        });
        let total = self.total_timeout.map(|total| {
            TimeoutLayer::new(total)
                .name(format!("{}_total", self.name))
                .carrier(carrier)
        });
        Layers {
            total,
            limit: self.limit_layer(),
            retry,
            hedge,
            attempt,
        }
    }

    /// Builds the stack for any `Clone` request, without a cache. The request and
    /// response types come from the service it wraps:
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::time::Duration;
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use towerguard::stack::StackBuilder;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let stack = StackBuilder::new()
    ///     .total_timeout(Duration::from_secs(2))
    ///     .build()
    ///     .expect("a consistent configuration");
    /// let svc = stack.layer(service_fn(|n: u64| async move { Ok::<_, Infallible>(n * 2) }));
    /// assert_eq!(svc.oneshot(21).await.unwrap(), 42);
    /// # }
    /// ```
    pub fn build<Req, Res>(&self) -> Result<GenericStack<Req, (), Res>, StackError>
    where
        Req: Clone + Send + 'static,
        Res: Send + 'static,
    {
        self.validate()?;
        Ok(GenericStack {
            cache: None,
            layers: Arc::new(self.layers(RetryErrors, TaskLocal)),
        })
    }

    /// Builds the stack for any `Clone` request, with a single-flight cache in front.
    pub fn build_with_cache<Req, K, Res>(
        &self,
        cache: CacheLayer<Req, K, Res>,
    ) -> Result<GenericStack<Req, K, Res>, StackError>
    where
        Req: Clone + Send + 'static,
        K: Send + Sync + 'static,
        Res: Send + 'static,
    {
        self.validate()?;
        Ok(GenericStack {
            cache: Some(cache),
            layers: Arc::new(self.layers(RetryErrors, TaskLocal)),
        })
    }
}

/// The layers below the cache, built once by the builder and shared by every service the
/// stack makes: its `layer()` only wraps.
#[derive(Debug)]
pub(super) struct Layers<P, C> {
    pub(super) total: Option<TimeoutLayer<C>>,
    pub(super) limit: Option<ConcurrencyLimitLayer>,
    pub(super) retry: Option<RetryLayer<P>>,
    pub(super) hedge: Option<HedgeLayer<P, C>>,
    pub(super) attempt: Option<TimeoutLayer<C>>,
}

/// `layer` around `inner` when it is configured, `inner` itself when not: static, no box.
pub(super) fn optional<L: Layer<S>, S>(layer: &Option<L>, inner: S) -> Either<L::Service, S> {
    match layer {
        Some(layer) => Either::Left(layer.layer(inner)),
        None => Either::Right(inner),
    }
}
