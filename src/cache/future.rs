//! The cache's response future.

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::util::Oneshot;
use tower_service::Service;

use super::flight::{Core, Upstream, Waiter};
use super::store::Entry;
use crate::error::{BoxError, Error};

pin_project! {
    /// Response future of [`Cache`](super::Cache).
    ///
    /// # Cancel safety
    ///
    /// Dropping it leaves the flight it waits on. The flight goes on for the callers that
    /// remain; when this was the last one, the upstream call is dropped at once.
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<S, Req, K, V>
    where
        S: Service<Req>,
        K: Hash,
        K: Eq,
        K: Clone,
        K: Send,
        K: Sync,
        K: 'static,
        V: Clone,
        V: Send,
        V: Sync,
        V: 'static,
    {
        #[pin]
        state: State<S, Req, K, V>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, Req, K, V>
    where
        S: Service<Req>,
        K: Hash,
        K: Eq,
        K: Clone,
        K: Send,
        K: Sync,
        K: 'static,
        V: Clone,
        V: Send,
        V: Sync,
        V: 'static,
    {
        Ready { result: Option<Result<V, Error>> },
        Waiting { waiter: Waiter<K, V>, fallback: Option<Arc<Entry<V>>>, core: Arc<Core<K, V>> },
        Bypass { #[pin] call: Oneshot<S, Req> },
        Upstream { call: Upstream<V> },
    }
}

impl<S, Req, K, V> ResponseFuture<S, Req, K, V>
where
    S: Service<Req>,
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub(crate) fn ready(result: Result<V, Error>) -> Self {
        ResponseFuture {
            state: State::Ready {
                result: Some(result),
            },
        }
    }

    pub(crate) fn waiting(
        waiter: Waiter<K, V>,
        fallback: Option<Arc<Entry<V>>>,
        core: Arc<Core<K, V>>,
    ) -> Self {
        ResponseFuture {
            state: State::Waiting {
                waiter,
                fallback,
                core,
            },
        }
    }

    pub(crate) fn bypass(call: Oneshot<S, Req>) -> Self {
        ResponseFuture {
            state: State::Bypass { call },
        }
    }

    pub(crate) fn upstream(call: Upstream<V>) -> Self {
        ResponseFuture {
            state: State::Upstream { call },
        }
    }
}

impl<S, Req, K, V> Future for ResponseFuture<S, Req, K, V>
where
    S: Service<Req, Response = V>,
    S::Error: Into<BoxError>,
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    type Output = Result<V, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Ready { result } => match result.take() {
                Some(result) => Poll::Ready(result),
                None => panic!("cache::ResponseFuture polled after completion"),
            },
            StateProj::Waiting {
                waiter,
                fallback,
                core,
            } => {
                let result = ready!(Pin::new(&mut *waiter).poll(cx));
                if result.is_err() {
                    if let Some(stale) = fallback.take() {
                        if stale.usable_on_error(Instant::now()) {
                            core.metrics.stale_if_error.increment(1);
                            return Poll::Ready(stale.value.clone());
                        }
                    }
                }
                Poll::Ready(result)
            }
            StateProj::Bypass { call } => call.poll(cx).map_err(Error::inner),
            StateProj::Upstream { call } => call.as_mut().poll(cx),
        }
    }
}

impl<S, Req, K, V> fmt::Debug for ResponseFuture<S, Req, K, V>
where
    S: Service<Req>,
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Ready { .. } => "ready",
            State::Waiting { .. } => "waiting",
            State::Bypass { .. } => "bypass",
            State::Upstream { .. } => "upstream",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
