use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::adaptive::Algorithm;
use super::limiter::{Limiter, DEFAULT_MAX_BODY_HOLD};
use super::release::OnResponse;
use super::service::ConcurrencyLimit;
use super::QueueDiscipline;
use crate::metrics::LimitMetrics;

/// The `Retry-After` a rejection suggests unless configured otherwise.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// A [`Layer`] that bounds how many requests run at once, across every clone.
///
/// The limiter is created once, when the layer is built: every clone of the layer, every
/// service it makes and every clone of those share the one limit, however often `layer()`
/// is called (axum calls it per route and clones the service per request).
///
/// ```
/// use std::time::Duration;
/// use towerguard::limit::ConcurrencyLimitLayer;
/// use towerguard::limit::adaptive::Vegas;
///
/// // At most 64 at once; reject at once beyond that.
/// let strict = ConcurrencyLimitLayer::new(64);
///
/// // An adaptive limit between 4 and 512, with a queue of 100 waiting at most 50 ms.
/// let adaptive = ConcurrencyLimitLayer::builder()
///     .name("api")
///     .adaptive(Vegas::new(32, 4, 512))
///     .queue(100, Duration::from_millis(50))
///     .build();
/// # let _ = (strict, adaptive);
/// ```
#[must_use]
pub struct ConcurrencyLimitLayer<M = OnResponse> {
    limiter: Arc<Limiter>,
    retry_after: Duration,
    _release: PhantomData<fn() -> M>,
}

impl<M> Clone for ConcurrencyLimitLayer<M> {
    fn clone(&self) -> Self {
        ConcurrencyLimitLayer {
            limiter: self.limiter.clone(),
            retry_after: self.retry_after,
            _release: PhantomData,
        }
    }
}

impl<M> fmt::Debug for ConcurrencyLimitLayer<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyLimitLayer")
            .field("limiter", &self.limiter)
            .field("retry_after", &self.retry_after)
            .finish()
    }
}

impl ConcurrencyLimitLayer {
    /// A static limit of `max` requests at once (at least 1) that rejects beyond it.
    pub fn new(max: usize) -> Self {
        Self::builder().limit(max).build()
    }

    /// Starts a builder: limit 100, no queue, unless set otherwise.
    pub fn builder() -> ConcurrencyLimitBuilder {
        ConcurrencyLimitBuilder {
            name: "default".to_owned(),
            limit: 100,
            algorithm: None,
            max_queue: 0,
            max_wait: None,
            discipline: QueueDiscipline::Fifo,
            retry_after: DEFAULT_RETRY_AFTER,
            max_body_hold: DEFAULT_MAX_BODY_HOLD,
        }
    }
}

impl<M> ConcurrencyLimitLayer<M> {
    /// A handle to read the shared limiter's state.
    pub fn handle(&self) -> LimitHandle {
        LimitHandle {
            limiter: self.limiter.clone(),
        }
    }

    /// The same limiter, returning permits as `M2` says.
    #[cfg(feature = "http")]
    pub(crate) fn releasing<M2>(&self) -> ConcurrencyLimitLayer<M2> {
        ConcurrencyLimitLayer {
            limiter: self.limiter.clone(),
            retry_after: self.retry_after,
            _release: PhantomData,
        }
    }
}

impl<S, M> Layer<S> for ConcurrencyLimitLayer<M> {
    type Service = ConcurrencyLimit<S, M>;

    fn layer(&self, inner: S) -> Self::Service {
        ConcurrencyLimit::from_parts(inner, self.limiter.clone(), self.retry_after)
    }
}

/// Configures a [`ConcurrencyLimitLayer`].
#[must_use]
pub struct ConcurrencyLimitBuilder {
    name: String,
    limit: usize,
    algorithm: Option<Box<dyn Algorithm>>,
    max_queue: usize,
    max_wait: Option<Duration>,
    discipline: QueueDiscipline,
    retry_after: Duration,
    max_body_hold: Duration,
}

impl fmt::Debug for ConcurrencyLimitBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyLimitBuilder")
            .field("name", &self.name)
            .field("limit", &self.limit)
            .field("algorithm", &self.algorithm)
            .field("max_queue", &self.max_queue)
            .field("max_wait", &self.max_wait)
            .field("discipline", &self.discipline)
            .field("retry_after", &self.retry_after)
            .field("max_body_hold", &self.max_body_hold)
            .finish()
    }
}

impl ConcurrencyLimitBuilder {
    /// The instance name, the `name` label of every metric (default `"default"`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// A static limit of `max` requests at once (at least 1). Replaces an adaptive one.
    pub fn limit(mut self, max: usize) -> Self {
        self.limit = max.max(1);
        self.algorithm = None;
        self
    }

    /// An adaptive limit moved by `algorithm` within its own bounds.
    pub fn adaptive(mut self, algorithm: impl Algorithm) -> Self {
        self.algorithm = Some(Box::new(algorithm));
        self
    }

    /// When every permit is taken, wait in a FIFO queue of at most `max_len` requests for
    /// at most `max_wait`, then reject as overloaded. Without a queue (the default), a
    /// request that finds the limit reached is rejected at once.
    pub fn queue(mut self, max_len: usize, max_wait: Duration) -> Self {
        self.max_queue = max_len;
        self.max_wait = Some(max_wait);
        self
    }

    /// A queue of at most `max_len` requests that wait as long as it takes; bound the wait
    /// from outside with a total timeout.
    pub fn queue_without_timeout(mut self, max_len: usize) -> Self {
        self.max_queue = max_len;
        self.max_wait = None;
        self
    }

    /// How the queue orders and bounds its waiters: [`QueueDiscipline::Fifo`] (the
    /// default) or [`QueueDiscipline::codel`]. Only matters with a queue.
    pub fn queue_discipline(mut self, discipline: QueueDiscipline) -> Self {
        self.discipline = discipline;
        self
    }

    /// The wait a rejection suggests (HTTP: `Retry-After`), default one second.
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = after;
        self
    }

    /// With `until_body_end` (feature `http`), the longest a response body holds its
    /// permit (default 60 s). Past it the permit goes back and the body streams on, so a
    /// client that reads slowly, or stops reading, cannot keep a slot of the limit.
    pub fn max_body_hold(mut self, hold: Duration) -> Self {
        self.max_body_hold = hold;
        self
    }

    /// Builds the layer and its shared limiter.
    pub fn build(self) -> ConcurrencyLimitLayer {
        let metrics = LimitMetrics::register(&self.name);
        ConcurrencyLimitLayer {
            limiter: Arc::new(
                Limiter::new(
                    self.limit,
                    self.max_queue,
                    self.max_wait,
                    self.algorithm,
                    metrics,
                )
                .with_max_body_hold(self.max_body_hold)
                .with_discipline(self.discipline),
            ),
            retry_after: self.retry_after,
            _release: PhantomData,
        }
    }
}

/// Reads the state of a limit shared by a layer's services.
#[derive(Clone)]
pub struct LimitHandle {
    limiter: Arc<Limiter>,
}

impl fmt::Debug for LimitHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LimitHandle")
            .field("limiter", &self.limiter)
            .finish()
    }
}

impl LimitHandle {
    /// Requests holding a permit now.
    pub fn in_flight(&self) -> usize {
        self.limiter.in_flight()
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.limiter.limit()
    }

    /// Requests waiting in the queue now.
    pub fn queued(&self) -> usize {
        self.limiter.queued()
    }
}
