//! The standard stack: the layers in the recommended order, with defaults a production
//! service can start from, and the configurations that contradict themselves refused.
//!
//! From the caller inwards:
//!
//! 1. **cache** — a hit costs nothing downstream, so it comes first and is never limited,
//!    timed out or retried.
//! 2. **total timeout** — bounds everything below it: the wait for a permit, every
//!    attempt, every backoff. Its [`Deadline`](crate::timeout::Deadline) is what retry and
//!    hedge check before starting another attempt.
//! 3. **concurrency limit** — taken once per request, not per attempt, so retries and
//!    hedges of an admitted request do not compete with new requests for permits (and a
//!    shed request is not retried here).
//! 4. **retry** — on transient failures, within the budget.
//! 5. **hedge** — within each attempt, a second try when the first is slow; shares the
//!    retry budget.
//! 6. **attempt timeout** — bounds each attempt, so one hung call does not eat the whole
//!    total timeout and retry gets its turn.
//!
//! The HTTP variant ([`StackBuilder::build_http`]) adds the RFC 9111 cache, reads
//! replayable request bodies ahead (so retry and hedge can resend them), and maps errors
//! to responses (503 with `Retry-After`, 504, 502), so the service is infallible and goes
//! straight into axum's `Router::layer`.
//!
//! # Defaults
//!
//! | setting | default | why |
//! |---|---|---|
//! | total timeout | 10 s | long enough for slow pages, short enough to free resources |
//! | attempt timeout | 3 s | leaves room for a retry inside the total |
//! | concurrency limit | adaptive (Vegas), 4 to 1,000, starting at 64 | finds the backend's capacity instead of a guess |
//! | queue | 256 requests, 100 ms | absorbs bursts; sheds before clients time out |
//! | retry | 3 attempts, 25 ms to 1 s full-jitter backoff | masks transient faults |
//! | budget | 20% of successful requests + 10 per second | a total outage adds at most the floor |
//! | hedge | off | opt in: it costs extra load by design |
//! | cache | off | opt in with a key (generic) or [`StackBuilder::http_cache`] |
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use towerguard::stack::StackBuilder;
//!
//! let stack = StackBuilder::new()
//!     .name("api")
//!     .total_timeout(Duration::from_secs(5))
//!     .attempt_timeout(Duration::from_secs(1))
//!     .static_limit(128)
//!     .hedge(Duration::from_millis(50))
//!     .build_http::<axum::body::Body>()
//!     .expect("a consistent configuration");
//! // axum: Router::new().route(...).layer(stack)
//! # let _ = stack;
//! ```

use std::convert::Infallible;
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower::util::BoxCloneSyncService;
use tower::ServiceExt;
use tower_layer::Layer;
use tower_service::Service;

use crate::budget::Budget;
use crate::cache::CacheLayer;
use crate::error::{BoxError, Error};
use crate::hedge::HedgeLayer;
use crate::http::{BufferBodyLayer, BufferedBody, ErrorResponseLayer, HttpCacheLayer, HttpPolicy};
use crate::limit::adaptive::Vegas;
use crate::limit::ConcurrencyLimitLayer;
use crate::retry::{Policy, RetryErrors, RetryLayer};
use crate::timeout::{Carrier, HttpExtensions, TaskLocal, TimeoutLayer};

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
                "attempt timeout {attempt:?} is longer than the total timeout {total:?}"
            ),
            StackError::HedgeDelaysExceedTotal { delays, total } => write!(
                f,
                "hedge delays add up to {delays:?}, not less than the total timeout {total:?}"
            ),
            StackError::RetryWithoutBudget => f.write_str(
                "retries or hedges need a budget, or a total outage multiplies the load",
            ),
            StackError::QueueWaitExceedsTotal { wait, total } => write!(
                f,
                "queue wait {wait:?} is not shorter than the total timeout {total:?}"
            ),
            StackError::ZeroTimeout => f.write_str("a timeout of zero would fail every request"),
        }
    }
}

impl std::error::Error for StackError {}

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

/// Builds the standard stack; see [the module](self) for the order and the defaults.
#[derive(Debug, Clone)]
pub struct StackBuilder {
    name: String,
    total_timeout: Option<Duration>,
    attempt_timeout: Option<Duration>,
    limit: Limit,
    queue: Option<(usize, Duration)>,
    retry_attempts: u32,
    budget: Option<Budget>,
    hedge: Option<Option<Duration>>,
    http_cache: Option<HttpCacheLayer>,
    max_body: usize,
}

impl Default for StackBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// The stack's service for generic requests.
pub type StackService<Req, Res> = BoxCloneSyncService<Req, Res, Error>;

/// The stack's service for HTTP: infallible, errors mapped to responses.
pub type HttpStackService<B, RB> =
    BoxCloneSyncService<Request<B>, Response<BufferedBody<RB>>, Infallible>;

impl StackBuilder {
    /// The defaults of [the module](self).
    pub fn new() -> Self {
        StackBuilder {
            name: "default".to_owned(),
            total_timeout: Some(Duration::from_secs(10)),
            attempt_timeout: Some(Duration::from_secs(3)),
            limit: Limit::Adaptive {
                initial: 64,
                min: 4,
                max: 1_000,
            },
            queue: Some((256, Duration::from_millis(100))),
            retry_attempts: 3,
            budget: Some(Budget::new(0.2, 10.0)),
            hedge: None,
            http_cache: None,
            max_body: 64 * 1024,
        }
    }

    /// The instance name, the `name` label of every layer's metrics.
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

    /// The timeout of each attempt.
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = Some(timeout);
        self
    }

    /// No per-attempt timeout.
    pub fn without_attempt_timeout(mut self) -> Self {
        self.attempt_timeout = None;
        self
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

    /// Hedge after the 95th percentile of recent latencies.
    pub fn hedge_adaptive(mut self) -> Self {
        self.hedge = Some(None);
        self
    }

    /// The RFC 9111 cache, for [`build_http`](Self::build_http).
    pub fn http_cache(mut self, cache: HttpCacheLayer) -> Self {
        self.http_cache = Some(cache);
        self
    }

    /// The largest request body read ahead for replay (HTTP).
    pub fn max_replay_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), StackError> {
        if self.total_timeout.is_some_and(|t| t.is_zero())
            || self.attempt_timeout.is_some_and(|t| t.is_zero())
        {
            return Err(StackError::ZeroTimeout);
        }
        if (self.retry_attempts > 1 || self.hedge.is_some()) && self.budget.is_none() {
            return Err(StackError::RetryWithoutBudget);
        }
        let Some(total) = self.total_timeout else {
            return Ok(());
        };
        if let Some(attempt) = self.attempt_timeout {
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
        Some(builder.build())
    }

    /// Assembles attempt timeout, hedge, retry, limit and total timeout around `inner`.
    fn assemble<Req, Res, P, C>(
        &self,
        inner: StackService<Req, Res>,
        policy: P,
        carrier: C,
    ) -> StackService<Req, Res>
    where
        Req: Send + 'static,
        Res: Send + 'static,
        P: Policy<Req, Res> + Clone + Send + Sync + 'static,
        C: Carrier<Req> + Clone + Send + Sync + 'static,
    {
        let mut svc = inner;
        if let Some(attempt) = self.attempt_timeout {
            let layer = TimeoutLayer::new(attempt)
                .name(format!("{}_attempt", self.name))
                .carrier(carrier.clone());
            svc = boxed(layer.layer(svc));
        }
        if let Some(delay) = self.hedge {
            let mut layer = HedgeLayer::new().name(self.name.clone());
            if let Some(delay) = delay {
                layer = layer.fixed_delay(delay);
            }
            if let Some(budget) = &self.budget {
                // The retry layer outside deposits for the request.
                layer = layer
                    .budget(budget.clone())
                    .deposit(self.retry_attempts <= 1);
            }
            svc = boxed(layer.policy(policy.clone()).layer(svc));
        }
        if self.retry_attempts > 1 {
            let mut layer = RetryLayer::new()
                .name(&self.name)
                .max_attempts(self.retry_attempts);
            layer = match &self.budget {
                Some(budget) => layer.budget(budget.clone()),
                None => layer.without_budget(),
            };
            svc = boxed(layer.policy(policy).layer(svc));
        }
        svc
    }

    fn outer<Req, Res, C>(&self, svc: StackService<Req, Res>, carrier: C) -> StackService<Req, Res>
    where
        Req: Send + 'static,
        Res: Send + 'static,
        C: Carrier<Req> + Clone + Send + Sync + 'static,
    {
        let mut svc = svc;
        if let Some(limit) = self.limit_layer() {
            svc = boxed(limit.layer(svc));
        }
        if let Some(total) = self.total_timeout {
            let layer = TimeoutLayer::new(total)
                .name(format!("{}_total", self.name))
                .carrier(carrier);
            svc = boxed(layer.layer(svc));
        }
        svc
    }

    /// Builds the stack for any `Clone` request, with an optional single-flight cache.
    pub fn build<Req, K, Res>(
        &self,
        cache: Option<CacheLayer<Req, K, Res>>,
    ) -> Result<GenericStack<Req, K, Res>, StackError>
    where
        Req: Clone + Send + 'static,
        K: Send + Sync + 'static,
        Res: Send + 'static,
    {
        self.validate()?;
        Ok(GenericStack {
            builder: self.clone(),
            cache,
        })
    }

    /// Builds the HTTP stack for request bodies of type `B`: infallible, for axum's
    /// `Router::layer` (`B` = `axum::body::Body`) or a hyper server (`B` =
    /// `hyper::body::Incoming`), or around a hyper-util client.
    pub fn build_http<B>(&self) -> Result<HttpStack<B>, StackError> {
        self.validate()?;
        Ok(HttpStack {
            builder: self.clone(),
            _body: std::marker::PhantomData,
        })
    }
}

fn boxed<S, Req>(svc: S) -> StackService<Req, S::Response>
where
    S: Service<Req> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    Req: 'static,
{
    BoxCloneSyncService::new(svc.map_err(Error::inner))
}

/// The standard stack for generic requests. Made by [`StackBuilder::build`].
pub struct GenericStack<Req, K, Res> {
    builder: StackBuilder,
    cache: Option<CacheLayer<Req, K, Res>>,
}

impl<Req, K, Res> Clone for GenericStack<Req, K, Res> {
    fn clone(&self) -> Self {
        GenericStack {
            builder: self.builder.clone(),
            cache: self.cache.clone(),
        }
    }
}

impl<Req, K, Res> fmt::Debug for GenericStack<Req, K, Res> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GenericStack")
            .field("builder", &self.builder)
            .field("cache", &self.cache.is_some())
            .finish()
    }
}

impl<S, Req, K, Res> Layer<S> for GenericStack<Req, K, Res>
where
    S: Service<Req, Response = Res> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    Req: Clone + Send + Sync + 'static,
    K: std::hash::Hash + Eq + Clone + Send + Sync + 'static,
    Res: Clone + Send + Sync + 'static,
{
    type Service = StackService<Req, Res>;

    fn layer(&self, inner: S) -> Self::Service {
        let b = &self.builder;
        let svc = b.assemble(boxed(inner), RetryErrors, TaskLocal);
        let svc = b.outer(svc, TaskLocal);
        match &self.cache {
            Some(cache) => boxed(cache.layer(svc)),
            None => svc,
        }
    }
}

/// Names the body type of an `http::Response`, so the stack can name its own.
pub trait ResponseBody {
    /// The body type.
    type Body;

    /// The response itself.
    fn into_response(self) -> Response<Self::Body>;
}

impl<T> ResponseBody for Response<T> {
    type Body = T;

    fn into_response(self) -> Response<T> {
        self
    }
}

/// The standard HTTP stack for request bodies of type `B`. Made by
/// [`StackBuilder::build_http`].
pub struct HttpStack<B> {
    builder: StackBuilder,
    _body: std::marker::PhantomData<fn(B)>,
}

impl<B> Clone for HttpStack<B> {
    fn clone(&self) -> Self {
        HttpStack {
            builder: self.builder.clone(),
            _body: std::marker::PhantomData,
        }
    }
}

impl<B> fmt::Debug for HttpStack<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpStack")
            .field("builder", &self.builder)
            .finish()
    }
}

impl<S, B> Layer<S> for HttpStack<B>
where
    S: Service<Request<BufferedBody<B>>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    S::Response: ResponseBody,
    <S::Response as ResponseBody>::Body: Body<Data = Bytes> + Unpin + Send + 'static,
    <<S::Response as ResponseBody>::Body as Body>::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Service = HttpStackService<B, <S::Response as ResponseBody>::Body>;

    fn layer(&self, inner: S) -> Self::Service {
        let b = &self.builder;
        let inner = boxed(inner.map_response(ResponseBody::into_response));
        let svc = b.assemble(inner, HttpPolicy, HttpExtensions);
        let svc = boxed(BufferBodyLayer::new(b.max_body).layer(svc));
        let svc = b.outer(svc, HttpExtensions);
        let svc = match &b.http_cache {
            Some(cache) => boxed(cache.layer(svc)),
            None => boxed(svc.map_response(|response: Response<_>| {
                response.map(|body| BufferedBody::streaming(Default::default(), Some(body)))
            })),
        };
        BoxCloneSyncService::new(ErrorResponseLayer::new().layer(svc))
    }
}
