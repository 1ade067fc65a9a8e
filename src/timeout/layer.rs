use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::deadline::{PerRequest, SameForAll, TaskLocal};
use super::service::Timeout;
use crate::metrics::{Lazy, TimeoutMetrics};

/// A [`Layer`] that bounds the time from `call` to the response, cancels the work on
/// expiry and tells it so.
///
/// ```
/// use std::time::Duration;
/// use towerguard::timeout::TimeoutLayer;
///
/// let total = TimeoutLayer::new(Duration::from_secs(2)).name("total");
/// // Per request: searches get longer.
/// let per_request = TimeoutLayer::new(Duration::from_millis(500))
///     .per_request(|q: &String| q.starts_with("search").then(|| Duration::from_secs(5)));
/// # let _ = (total, per_request);
/// ```
#[derive(Clone)]
#[must_use]
pub struct TimeoutLayer<C = TaskLocal, T = SameForAll> {
    timeout: Duration,
    carrier: C,
    per_request: T,
    metrics: Arc<Lazy<TimeoutMetrics>>,
}

impl<C: fmt::Debug, T: fmt::Debug> fmt::Debug for TimeoutLayer<C, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimeoutLayer")
            .field("timeout", &self.timeout)
            .field("carrier", &self.carrier)
            .field("per_request", &self.per_request)
            .finish_non_exhaustive()
    }
}

impl TimeoutLayer {
    /// Every request gets `timeout`, measured from `call`.
    pub fn new(timeout: Duration) -> Self {
        TimeoutLayer {
            timeout,
            carrier: TaskLocal,
            per_request: SameForAll,
            metrics: Arc::new(Lazy::new("default", TimeoutMetrics::register)),
        }
    }
}

impl<C, T> TimeoutLayer<C, T> {
    /// The instance name, the `name` label of every metric (default `"default"`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.metrics = Arc::new(Lazy::new(name, TimeoutMetrics::register));
        self
    }

    /// The timeout for requests the per-request function leaves to the default.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Where the context is found and put: [`TaskLocal`] (any request) or, with the `http`
    /// feature, `towerguard::http::HttpExtensions` (also `http::Request` extensions).
    pub fn carrier<C2>(self, carrier: C2) -> TimeoutLayer<C2, T> {
        TimeoutLayer {
            timeout: self.timeout,
            carrier,
            per_request: self.per_request,
            metrics: self.metrics,
        }
    }

    /// Picks each request's timeout with `f`; `None` means the layer's timeout.
    pub fn per_request<F>(self, f: F) -> TimeoutLayer<C, PerRequest<F>> {
        TimeoutLayer {
            timeout: self.timeout,
            carrier: self.carrier,
            per_request: PerRequest(f),
            metrics: self.metrics,
        }
    }
}

impl<S, C: Clone, T: Clone> Layer<S> for TimeoutLayer<C, T> {
    type Service = Timeout<S, C, T>;

    fn layer(&self, inner: S) -> Self::Service {
        // Registered now, under the name set by now.
        self.metrics.get();
        Timeout::from_parts(
            inner,
            self.timeout,
            self.carrier.clone(),
            self.per_request.clone(),
            self.metrics.clone(),
        )
    }
}
