use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tower_service::Service;

use super::deadline::{
    carry, Carrier, Deadline, RequestTimeout, SameForAll, Scoped, TaskLocal, TimeoutContext,
};
use super::future::ResponseFuture;
use super::layer::TimeoutLayer;
use crate::error::{BoxError, Error};
use crate::metrics::{Lazy, TimeoutMetrics};

/// Bounds the time from `call` to the response of `S`. Made by
/// [`TimeoutLayer`](super::TimeoutLayer).
#[derive(Clone)]
pub struct Timeout<S, C, T> {
    inner: S,
    timeout: Duration,
    carrier: C,
    per_request: T,
    metrics: Arc<Lazy<TimeoutMetrics>>,
}

impl<S> Timeout<S, TaskLocal, SameForAll> {
    /// `inner` with every request bounded by `timeout` (as
    /// `TimeoutLayer::new(timeout).layer(inner)`).
    pub fn new(inner: S, timeout: Duration) -> Self {
        tower_layer::Layer::layer(&TimeoutLayer::new(timeout), inner)
    }

    /// A layer bounding every request by `timeout`: [`TimeoutLayer::new`].
    pub fn layer(timeout: Duration) -> TimeoutLayer {
        TimeoutLayer::new(timeout)
    }
}

impl<S, C, T> Timeout<S, C, T> {
    pub(crate) fn from_parts(
        inner: S,
        timeout: Duration,
        carrier: C,
        per_request: T,
        metrics: Arc<Lazy<TimeoutMetrics>>,
    ) -> Self {
        Timeout {
            inner,
            timeout,
            carrier,
            per_request,
            metrics,
        }
    }

    inner_accessors!("timeout");
}

impl<S: fmt::Debug, C: fmt::Debug, T> fmt::Debug for Timeout<S, C, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Timeout")
            .field("inner", &self.inner)
            .field("timeout", &self.timeout)
            .field("carrier", &self.carrier)
            .finish_non_exhaustive()
    }
}

impl<S, C, T, Req> Service<Req> for Timeout<S, C, T>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Carrier<Req>,
    T: RequestTimeout<Req>,
{
    type Response = S::Response;
    type Error = Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Error::inner)
    }

    #[inline(always)]
    fn call(&mut self, req: Req) -> Self::Future {
        let now = Deadline::now();
        let timeout = self.per_request.timeout_for(&req).unwrap_or(self.timeout);
        let ours = now.later(timeout);
        let mut req = req;
        // A scope running on this thread comes first; else one the request carried.
        let carried = match Deadline::current() {
            Some(_) => None,
            None => self.carrier.existing(&req),
        };
        let mut ctx = match carried {
            Some(outer) => TimeoutContext::under(outer.deadline().min(ours), Some(&outer)),
            None => TimeoutContext::nested(ours),
        };
        carry(&self.carrier, &mut req, &mut ctx);
        let inner = &mut self.inner;
        let future = ctx.enter(|| inner.call(req));
        let timing = self.metrics.recording().then(|| self.metrics.clone());
        ResponseFuture::new(Scoped::new(ctx, future), ours, now, timing)
    }
}
