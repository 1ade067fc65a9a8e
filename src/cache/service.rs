use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::util::Oneshot;
use tower_service::Service;

use super::flight::{Core, Gate, Joined, Owner, Upstream};
use super::future::ResponseFuture;
use super::layer::KeyFn;
use super::store::Lookup;
use crate::error::{BoxError, Error};

/// A single-flight cache in front of the service `S`. Made by [`CacheLayer`].
///
/// [`CacheLayer`]: super::CacheLayer
pub struct Cache<S, Req, K, V> {
    inner: S,
    core: Arc<Core<K, V>>,
    key_fn: KeyFn<Req, K>,
}

impl<S, Req, K, V> Cache<S, Req, K, V> {
    pub(crate) fn from_parts(inner: S, core: Arc<Core<K, V>>, key_fn: KeyFn<Req, K>) -> Self {
        Cache {
            inner,
            core,
            key_fn,
        }
    }

    inner_accessors!("cache");
}

impl<S: Clone, Req, K, V> Clone for Cache<S, Req, K, V> {
    fn clone(&self) -> Self {
        Cache {
            inner: self.inner.clone(),
            core: self.core.clone(),
            key_fn: self.key_fn.clone(),
        }
    }
}

impl<S: fmt::Debug, Req, K, V> fmt::Debug for Cache<S, Req, K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// The upstream call of a flight: drive a clone of the service to ready, then call it.
fn upstream<S, Req>(service: S, req: Req) -> Upstream<S::Response>
where
    S: Service<Req> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    Req: Send + 'static,
{
    let call = Oneshot::new(service, req);
    Box::pin(async move { call.await.map_err(Error::inner) })
}

impl<S, Req, K, V> Service<Req> for Cache<S, Req, K, V>
where
    S: Service<Req, Response = V> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    Req: Send + 'static,
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    type Response = V;
    type Error = Error;
    type Future = ResponseFuture<S, Req, K, V>;

    /// Always ready: hits never touch the inner service, and misses drive their own clone
    /// of it to readiness inside the flight. Nothing is reserved here.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let core = &self.core;
        let metrics = &core.metrics;
        let Some(key) = (self.key_fn)(&req) else {
            metrics.bypass.increment(1);
            tracing::debug!(result = "bypass", "cache: no key");
            return ResponseFuture::bypass(Oneshot::new(self.inner.clone(), req));
        };
        match core.store.lookup(&key) {
            Lookup::Fresh(entry) => {
                metrics.hit.increment(1);
                tracing::debug!(result = "hit", "cache: hit");
                ResponseFuture::ready(entry.value.clone())
            }
            Lookup::Stale(entry) => {
                metrics.stale.increment(1);
                tracing::debug!(result = "stale", "cache: stale, refreshing");
                self.refresh(key, req);
                ResponseFuture::ready(entry.value.clone())
            }
            Lookup::Miss { fallback } => {
                let inner = self.inner.clone();
                let start = self.start(&key, inner, req);
                let owner: Arc<dyn Owner<K, V>> = core.clone();
                let recheck = |key: &K| match core.store.lookup(key) {
                    Lookup::Fresh(entry) => Some(entry),
                    _ => None,
                };
                match core
                    .flights
                    .join_or_start(&owner, key, true, recheck, start)
                {
                    Joined::Started(waiter) => {
                        metrics.miss.increment(1);
                        tracing::debug!(result = "miss", "cache: miss, flight started");
                        ResponseFuture::waiting(waiter, fallback, core.clone())
                    }
                    Joined::Coalesced(waiter) => {
                        metrics.coalesced.increment(1);
                        tracing::debug!(result = "coalesced", "cache: joined a flight");
                        ResponseFuture::waiting(waiter, fallback, core.clone())
                    }
                    Joined::Stored(entry) => {
                        metrics.hit.increment(1);
                        ResponseFuture::ready(entry.value.clone())
                    }
                    Joined::Full(start) | Joined::Busy(start) => {
                        metrics.bypass.increment(1);
                        // Outside any flight: its own gate, which nothing closes; the second
                        // tier still refuses its write after an invalidation.
                        ResponseFuture::upstream(start(Arc::default()))
                    }
                }
            }
        }
    }
}

impl<S, Req, K, V> Cache<S, Req, K, V>
where
    S: Service<Req, Response = V> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    Req: Send + 'static,
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// What starts a flight for `key`: the upstream call, through the second tier when
    /// there is one.
    fn start(
        &self,
        key: &K,
        inner: S,
        req: Req,
    ) -> impl FnOnce(Arc<Gate>) -> Upstream<V> + use<S, Req, K, V> {
        #[cfg(feature = "redis")]
        {
            let tiered = self
                .core
                .second
                .is_some()
                .then(|| (self.core.clone(), key.clone()));
            move |gate| match tiered {
                Some((core, key)) => core.through_tiers(key, gate, upstream(inner, req)),
                None => upstream(inner, req),
            }
        }
        #[cfg(not(feature = "redis"))]
        {
            let _ = key;
            move |_gate| upstream(inner, req)
        }
    }

    /// Starts a background refresh of `key` with `req`, unless a flight for it is under way
    /// or there is no runtime to run it on.
    fn refresh(&self, key: K, req: Req) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let start = self.start(&key, self.inner.clone(), req);
        let owner: Arc<dyn Owner<K, V>> = self.core.clone();
        let joined = self
            .core
            .flights
            .join_or_start(&owner, key, false, |_| None::<()>, start);
        if let Joined::Started(waiter) = joined {
            self.core.metrics.refreshes.increment(1);
            runtime.spawn(async move {
                // The outcome is stored by the flight; a failed refresh leaves the stale
                // entry in place until its windows close.
                let _ = waiter.await;
            });
        }
    }
}
