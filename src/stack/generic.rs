//! The standard stack for any `Clone` request.

use std::fmt;
use std::hash::Hash;
use std::sync::Arc;

use tower::util::BoxCloneSyncService;
use tower::ServiceExt;
use tower_layer::Layer;
use tower_service::Service;

use super::builder::{optional, Layers};
use super::StackService;
use crate::cache::CacheLayer;
use crate::error::{BoxError, Error};
use crate::limit::{ConcurrencyLimitLayer, LimitHandle};
use crate::retry::RetryErrors;
use crate::timeout::TaskLocal;

/// The standard stack for generic requests. Made by [`StackBuilder::build`](super::StackBuilder::build)
/// (without a cache, `K` is `()`) or [`StackBuilder::build_with_cache`](super::StackBuilder::build_with_cache).
///
/// Every layer and its shared state were built by the builder; [`Layer::layer`] only
/// wraps, so every service it makes (one per clone, per route, per connection) shares one
/// limit, one latency window, one budget and one set of metric series.
#[must_use]
pub struct GenericStack<Req, K, Res> {
    pub(super) cache: Option<CacheLayer<Req, K, Res>>,
    pub(super) layers: Arc<Layers<RetryErrors, TaskLocal>>,
}

impl<Req, K, Res> Clone for GenericStack<Req, K, Res> {
    fn clone(&self) -> Self {
        GenericStack {
            cache: self.cache.clone(),
            layers: self.layers.clone(),
        }
    }
}

impl<Req, K, Res> fmt::Debug for GenericStack<Req, K, Res> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GenericStack")
            .field("layers", &self.layers)
            .field("cache", &self.cache.is_some())
            .finish()
    }
}

impl<Req, K, Res> GenericStack<Req, K, Res> {
    /// The state of the stack's concurrency limit (in flight, limit, queued), when it has
    /// one: one limit for every service the stack makes.
    pub fn limit_handle(&self) -> Option<LimitHandle> {
        self.layers
            .limit
            .as_ref()
            .map(ConcurrencyLimitLayer::handle)
    }
}

impl<S, Req, K, Res> Layer<S> for GenericStack<Req, K, Res>
where
    S: Service<Req, Response = Res> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    Req: Clone + Send + Sync + 'static,
    K: Hash + Eq + Clone + Send + Sync + 'static,
    Res: Clone + Send + Sync + 'static,
{
    type Service = StackService<Req, Res>;

    fn layer(&self, inner: S) -> Self::Service {
        let layers = &*self.layers;
        // From the inside out; one box, at the outside.
        let svc = inner.map_err(Error::inner);
        let svc = optional(&layers.attempt, svc);
        let svc = optional(&layers.hedge, svc);
        let svc = optional(&layers.retry, svc);
        let svc = optional(&layers.limit, svc);
        let svc = optional(&layers.total, svc);
        BoxCloneSyncService::new(optional(&self.cache, svc))
    }
}
