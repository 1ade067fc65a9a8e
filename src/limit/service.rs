use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tower_service::Service;

use super::future::ResponseFuture;
use super::limiter::{Acquired, Limiter, Rejection};
use super::release::{OnResponse, Release};
use crate::error::{BoxError, Error};

/// Bounds how many requests to `S` run at once. Made by
/// [`ConcurrencyLimitLayer`](super::ConcurrencyLimitLayer).
///
/// `poll_ready` only asks the inner service; the permit is taken in `call`, so an idle
/// connection that keeps a ready service holds no permit. When the request must queue, the
/// readied inner service is moved into the response future (a fresh clone takes its place)
/// and called once a permit is granted.
///
/// `M` says when the permit is returned: [`OnResponse`](super::OnResponse) (the default)
/// when the response future ends, `OnBodyEnd` (`towerguard::http`) when an HTTP response's
/// body ends.
pub struct ConcurrencyLimit<S, M = OnResponse> {
    inner: S,
    limiter: Arc<Limiter>,
    retry_after: Duration,
    _release: PhantomData<fn() -> M>,
}

impl<S, M> ConcurrencyLimit<S, M> {
    pub(crate) fn from_parts(inner: S, limiter: Arc<Limiter>, retry_after: Duration) -> Self {
        ConcurrencyLimit {
            inner,
            limiter,
            retry_after,
            _release: PhantomData,
        }
    }

    inner_accessors!("limit");
}

impl<S> ConcurrencyLimit<S> {
    /// `inner` behind a static limit of `max` of its own (as
    /// `ConcurrencyLimitLayer::new(max).layer(inner)`). To share one limit between
    /// services, build a [`ConcurrencyLimitLayer`](super::ConcurrencyLimitLayer) once and
    /// layer each with it.
    pub fn new(inner: S, max: usize) -> Self {
        tower_layer::Layer::layer(&super::ConcurrencyLimitLayer::new(max), inner)
    }

    /// A layer with a static limit of `max`: [`ConcurrencyLimitLayer::new`](super::ConcurrencyLimitLayer::new).
    pub fn layer(max: usize) -> super::ConcurrencyLimitLayer {
        super::ConcurrencyLimitLayer::new(max)
    }
}

impl<S: Clone, M> Clone for ConcurrencyLimit<S, M> {
    fn clone(&self) -> Self {
        Self::from_parts(self.inner.clone(), self.limiter.clone(), self.retry_after)
    }
}

impl<S: fmt::Debug, M> fmt::Debug for ConcurrencyLimit<S, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyLimit")
            .field("inner", &self.inner)
            .field("limiter", &self.limiter)
            .finish()
    }
}

impl<S, Req, M> Service<Req> for ConcurrencyLimit<S, M>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    M: Release<S::Response>,
{
    type Response = M::Output;
    type Error = Error;
    type Future = ResponseFuture<S, Req, M>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Error::inner)
    }

    #[inline(always)]
    fn call(&mut self, req: Req) -> Self::Future {
        // The admitted path takes the permit alone and builds the future in place. A permit
        // taken out of the limiter's `Result`, or a future built once from either path, was
        // assembled on the stack and copied into the caller's future, and the copy's wide
        // loads read narrow stores still on their way to memory: a store-forwarding stall
        // that cost half of the request.
        match self.limiter.try_admit() {
            Some(permit) => ResponseFuture::running(&mut self.inner, req, permit),
            None => {
                let queued = self.limiter.acquire_slow();
                ResponseFuture::unadmitted(queued, &mut self.inner, req, self.retry_after)
            }
        }
    }
}

/// Turns what the limiter gave into the response future: call now with the permit, queue
/// with the readied service moved out (a fresh clone takes its place), or reject.
#[inline]
pub(crate) fn admit<S, Req, M>(
    acquired: Result<Acquired, Rejection>,
    inner: &mut S,
    req: Req,
    retry_after: Duration,
) -> ResponseFuture<S, Req, M>
where
    S: Service<Req> + Clone,
{
    match acquired {
        Ok(Acquired::Permit(permit)) => ResponseFuture::running(inner, req, permit),
        Ok(Acquired::Queued(ticket)) => {
            ResponseFuture::unadmitted(Ok(ticket), inner, req, retry_after)
        }
        Err(rejection) => ResponseFuture::unadmitted(Err(rejection), inner, req, retry_after),
    }
}
