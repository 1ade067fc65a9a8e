//! The standard stack for HTTP services.

use std::convert::Infallible;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower::util::{BoxCloneSyncService, Either};
use tower::ServiceExt;
use tower_layer::Layer;
use tower_service::Service;

use super::builder::{optional, Layers};
use super::{StackBuilder, StackError};
use crate::error::{BoxError, Error};
use crate::http::{
    BufferBodyLayer, BufferedBody, ErrorResponseLayer, HttpCacheLayer, HttpExtensions, HttpPolicy,
};
use crate::limit::{ConcurrencyLimitLayer, LimitHandle};

/// The stack's service for HTTP: infallible, errors mapped to responses.
pub type HttpStackService<B, RB> =
    BoxCloneSyncService<Request<B>, Response<BufferedBody<RB>>, Infallible>;

impl StackBuilder {
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

    /// Builds the HTTP stack for request bodies of type `B`: infallible, for axum's
    /// `Router::layer` (`B` = `axum::body::Body`) or a hyper server (`B` =
    /// `hyper::body::Incoming`), or around a hyper-util client.
    pub fn build_http<B>(&self) -> Result<HttpStack<B>, StackError> {
        self.validate()?;
        Ok(HttpStack {
            layers: Arc::new(self.layers(HttpPolicy, HttpExtensions)),
            // The total timeout sits inside the cache: it bounds the cache's waits too.
            http_cache: self
                .http_cache
                .clone()
                .map(|cache| cache.wait_bound(self.total_timeout)),
            buffer: BufferBodyLayer::new(self.max_body),
            errors: ErrorResponseLayer::new(),
            _body: PhantomData,
        })
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
/// [`StackBuilder::build_http`](super::StackBuilder::build_http).
///
/// Every layer and its shared state were built by the builder; [`Layer::layer`] only
/// wraps. axum calls `layer()` once per route and again per connection: every service
/// shares one limit, one latency window, one budget, one cache and one set of metric
/// series.
#[must_use]
pub struct HttpStack<B> {
    pub(super) layers: Arc<Layers<HttpPolicy, HttpExtensions>>,
    pub(super) http_cache: Option<HttpCacheLayer>,
    pub(super) buffer: BufferBodyLayer,
    pub(super) errors: ErrorResponseLayer,
    pub(super) _body: PhantomData<fn(B)>,
}

impl<B> Clone for HttpStack<B> {
    fn clone(&self) -> Self {
        HttpStack {
            layers: self.layers.clone(),
            http_cache: self.http_cache.clone(),
            buffer: self.buffer,
            errors: self.errors.clone(),
            _body: PhantomData,
        }
    }
}

impl<B> fmt::Debug for HttpStack<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpStack")
            .field("layers", &self.layers)
            .field("http_cache", &self.http_cache)
            .finish_non_exhaustive()
    }
}

impl<B> HttpStack<B> {
    /// The state of the stack's concurrency limit (in flight, limit, queued), when it has
    /// one: one limit for every service the stack makes.
    pub fn limit_handle(&self) -> Option<LimitHandle> {
        self.layers
            .limit
            .as_ref()
            .map(ConcurrencyLimitLayer::handle)
    }
}

impl<S, B> Layer<S> for HttpStack<B>
where
    S: Service<http::Request<BufferedBody<B>>> + Clone + Send + Sync + 'static,
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
        let layers = &*self.layers;
        // From the inside out; one box, at the outside.
        let svc = inner
            .map_response(ResponseBody::into_response)
            .map_err(Error::inner);
        let svc = optional(&layers.attempt, svc);
        let svc = optional(&layers.hedge, svc);
        let svc = optional(&layers.retry, svc);
        // A 503 or a 429 from below brings an adaptive limit down.
        let limit = layers
            .limit
            .as_ref()
            .map(ConcurrencyLimitLayer::http_responses);
        let svc = optional(&limit, svc);
        // Bodies are read ahead outside the limit (bounded by the total timeout), so a
        // slow upload holds no permit.
        let svc = self.buffer.layer(svc);
        let svc = optional(&layers.total, svc);
        let svc = match &self.http_cache {
            Some(cache) => Either::Left(cache.layer(svc)),
            None => Either::Right(svc.map_response(|response: Response<_>| {
                response.map(|body| BufferedBody::streaming(Default::default(), Some(body)))
            })),
        };
        BoxCloneSyncService::new(self.errors.layer(svc))
    }
}
