use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower_service::Service;

use super::future::ResponseFuture;
use super::layer::Shared;
use crate::error::{BoxError, Error};
use crate::retry::Policy;
use crate::timeout::{Carrier, TaskLocal};

/// Hedges requests to `S`. Made by [`HedgeLayer`](super::HedgeLayer).
///
/// `poll_ready` asks the inner service and the first attempt goes to that readied service;
/// each hedged attempt drives its own clone to readiness before calling it.
pub struct Hedge<S, P, C = TaskLocal> {
    inner: S,
    policy: P,
    carrier: C,
    shared: Arc<Shared>,
}

impl<S, P, C> Hedge<S, P, C> {
    pub(crate) fn from_parts(inner: S, policy: P, carrier: C, shared: Arc<Shared>) -> Self {
        Hedge {
            inner,
            policy,
            carrier,
            shared,
        }
    }

    inner_accessors!("hedge");
}

impl<S: Clone, P: Clone, C: Clone> Clone for Hedge<S, P, C> {
    fn clone(&self) -> Self {
        Hedge {
            inner: self.inner.clone(),
            policy: self.policy.clone(),
            carrier: self.carrier.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug, P: fmt::Debug, C> fmt::Debug for Hedge<S, P, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hedge")
            .field("inner", &self.inner)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl<S, P, C, Req> Service<Req> for Hedge<S, P, C>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    P: Policy<Req, S::Response> + Clone,
    C: Carrier<Req> + Clone,
{
    type Response = S::Response;
    type Error = Error;
    type Future = ResponseFuture<S, Req, P, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Error::inner)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let hedgeable = self.shared.max_attempts > 1;
        let template = if hedgeable {
            self.policy.replay(&req)
        } else {
            None
        };
        ResponseFuture::start(
            &mut self.inner,
            req,
            template,
            self.policy.clone(),
            self.carrier.clone(),
            self.shared.clone(),
        )
    }
}
