//! [`ServiceBuilderExt`]: towerguard's layers as methods of tower's `ServiceBuilder`.

use tower::ServiceBuilder;
use tower_layer::Stack;

/// One method per towerguard layer on tower's [`ServiceBuilder`], so a chain reads like
/// tower's own (`.concurrency_limit(..)`, `.timeout(..)`). Each method is
/// `.layer(the layer)`; the names carry a `towerguard_` prefix so they never shadow, nor
/// are shadowed by, tower's methods of the same purpose.
///
/// The layers go on from the caller inwards, in the order [the stack](crate::stack)
/// recommends:
///
/// ```
/// use std::time::Duration;
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
/// use towerguard::cache::CacheLayer;
/// use towerguard::limit::ConcurrencyLimitLayer;
/// use towerguard::retry::RetryLayer;
/// use towerguard::timeout::TimeoutLayer;
/// use towerguard::ServiceBuilderExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), towerguard::Error> {
/// let service = ServiceBuilder::new()
///     .towerguard_cache(CacheLayer::builder(|id: &u64| Some(*id)).build())
///     .towerguard_timeout(TimeoutLayer::new(Duration::from_secs(2)))
///     .towerguard_limit(ConcurrencyLimitLayer::new(64))
///     .towerguard_retry(RetryLayer::builder().build())
///     .towerguard_timeout(TimeoutLayer::new(Duration::from_millis(500)))
///     .service(service_fn(|id: u64| async move { Ok::<_, std::io::Error>(id * 2) }));
/// assert_eq!(service.oneshot(21).await?, 42);
/// # Ok(())
/// # }
/// ```
pub trait ServiceBuilderExt<L>: sealed::Sealed {
    /// Adds a single-flight cache ([`CacheLayer`](crate::cache::CacheLayer)).
    #[cfg(feature = "cache")]
    fn towerguard_cache<Req, K, V>(
        self,
        layer: crate::cache::CacheLayer<Req, K, V>,
    ) -> ServiceBuilder<Stack<crate::cache::CacheLayer<Req, K, V>, L>>;

    /// Adds a concurrency limit
    /// ([`ConcurrencyLimitLayer`](crate::limit::ConcurrencyLimitLayer)).
    #[cfg(feature = "limit")]
    fn towerguard_limit<M>(
        self,
        layer: crate::limit::ConcurrencyLimitLayer<M>,
    ) -> ServiceBuilder<Stack<crate::limit::ConcurrencyLimitLayer<M>, L>>;

    /// Adds a concurrency limit per key
    /// ([`KeyedConcurrencyLimitLayer`](crate::limit::KeyedConcurrencyLimitLayer)).
    #[cfg(feature = "limit")]
    fn towerguard_keyed_limit<Req, K>(
        self,
        layer: crate::limit::KeyedConcurrencyLimitLayer<Req, K>,
    ) -> ServiceBuilder<Stack<crate::limit::KeyedConcurrencyLimitLayer<Req, K>, L>>;

    /// Adds a timeout ([`TimeoutLayer`](crate::timeout::TimeoutLayer)).
    #[cfg(feature = "timeout")]
    fn towerguard_timeout<C, T>(
        self,
        layer: crate::timeout::TimeoutLayer<C, T>,
    ) -> ServiceBuilder<Stack<crate::timeout::TimeoutLayer<C, T>, L>>;

    /// Adds retry on fault ([`RetryLayer`](crate::retry::RetryLayer)).
    #[cfg(feature = "retry")]
    fn towerguard_retry<P>(
        self,
        layer: crate::retry::RetryLayer<P>,
    ) -> ServiceBuilder<Stack<crate::retry::RetryLayer<P>, L>>;

    /// Adds hedged requests ([`HedgeLayer`](crate::hedge::HedgeLayer)).
    #[cfg(feature = "hedge")]
    fn towerguard_hedge<P, C>(
        self,
        layer: crate::hedge::HedgeLayer<P, C>,
    ) -> ServiceBuilder<Stack<crate::hedge::HedgeLayer<P, C>, L>>;

    /// Adds the RFC 9111 HTTP cache ([`HttpCacheLayer`](crate::http::HttpCacheLayer)).
    #[cfg(all(feature = "http", feature = "cache"))]
    fn towerguard_http_cache(
        self,
        layer: crate::http::HttpCacheLayer,
    ) -> ServiceBuilder<Stack<crate::http::HttpCacheLayer, L>>;

    /// Maps the crate's errors to HTTP responses
    /// ([`ErrorResponseLayer`](crate::http::ErrorResponseLayer)): 503 with `Retry-After`,
    /// 504, 502, 500.
    #[cfg(feature = "http")]
    fn towerguard_error_responses(
        self,
        layer: crate::http::ErrorResponseLayer,
    ) -> ServiceBuilder<Stack<crate::http::ErrorResponseLayer, L>>;

    /// Reads replayable request bodies ahead, so retry and hedge can resend them
    /// ([`BufferBodyLayer`](crate::http::BufferBodyLayer)).
    #[cfg(all(feature = "http", feature = "retry"))]
    fn towerguard_buffer_body(
        self,
        layer: crate::http::BufferBodyLayer,
    ) -> ServiceBuilder<Stack<crate::http::BufferBodyLayer, L>>;
}

mod sealed {
    pub trait Sealed {}
    impl<L> Sealed for tower::ServiceBuilder<L> {}
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    #[cfg(feature = "cache")]
    fn towerguard_cache<Req, K, V>(
        self,
        layer: crate::cache::CacheLayer<Req, K, V>,
    ) -> ServiceBuilder<Stack<crate::cache::CacheLayer<Req, K, V>, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "limit")]
    fn towerguard_limit<M>(
        self,
        layer: crate::limit::ConcurrencyLimitLayer<M>,
    ) -> ServiceBuilder<Stack<crate::limit::ConcurrencyLimitLayer<M>, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "limit")]
    fn towerguard_keyed_limit<Req, K>(
        self,
        layer: crate::limit::KeyedConcurrencyLimitLayer<Req, K>,
    ) -> ServiceBuilder<Stack<crate::limit::KeyedConcurrencyLimitLayer<Req, K>, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "timeout")]
    fn towerguard_timeout<C, T>(
        self,
        layer: crate::timeout::TimeoutLayer<C, T>,
    ) -> ServiceBuilder<Stack<crate::timeout::TimeoutLayer<C, T>, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "retry")]
    fn towerguard_retry<P>(
        self,
        layer: crate::retry::RetryLayer<P>,
    ) -> ServiceBuilder<Stack<crate::retry::RetryLayer<P>, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "hedge")]
    fn towerguard_hedge<P, C>(
        self,
        layer: crate::hedge::HedgeLayer<P, C>,
    ) -> ServiceBuilder<Stack<crate::hedge::HedgeLayer<P, C>, L>> {
        self.layer(layer)
    }

    #[cfg(all(feature = "http", feature = "cache"))]
    fn towerguard_http_cache(
        self,
        layer: crate::http::HttpCacheLayer,
    ) -> ServiceBuilder<Stack<crate::http::HttpCacheLayer, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "http")]
    fn towerguard_error_responses(
        self,
        layer: crate::http::ErrorResponseLayer,
    ) -> ServiceBuilder<Stack<crate::http::ErrorResponseLayer, L>> {
        self.layer(layer)
    }

    #[cfg(all(feature = "http", feature = "retry"))]
    fn towerguard_buffer_body(
        self,
        layer: crate::http::BufferBodyLayer,
    ) -> ServiceBuilder<Stack<crate::http::BufferBodyLayer, L>> {
        self.layer(layer)
    }
}
