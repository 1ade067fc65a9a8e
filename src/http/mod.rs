//! HTTP semantics for the generic layers.
//!
//! - [`ErrorResponseLayer`]: errors become responses (below).
//! - [`HttpPolicy`] for [`RetryLayer`](crate::retry::RetryLayer) and
//!   [`HedgeLayer`](crate::hedge::HedgeLayer): idempotent requests (or those with an
//!   `Idempotency-Key`) are replayed; connection errors, timeouts and 408, 429, 500, 502,
//!   503, 504 are retried, honouring `Retry-After` (seconds or an HTTP-date).
//! - [`BufferBodyLayer`]: reads request bodies ahead up to a bound so they can be replayed;
//!   a larger body is sent once, intact.
//! - [`cache_control`] and [`cache_policy`]: RFC 9111 rules for a shared cache (what may
//!   be stored, freshness, age, `Vary`, conditional requests, invalidation, stale rules)
//!   and RFC 9211 `Cache-Status`, as functions of messages; [`range`] for byte ranges
//!   served from a stored response.
//!
//! [`ErrorResponseLayer`] turns the crate's errors into HTTP responses, so a stack of
//! towerguard layers has `Error = Infallible` and goes straight into axum's
//! `Router::layer` or a hyper server, without `HandleErrorLayer`:
//!
//! | error kind | status |
//! |---|---|
//! | overloaded | 503 Service Unavailable, with `Retry-After` |
//! | budget exhausted | 503 Service Unavailable, with `Retry-After` |
//! | cancelled | 503 Service Unavailable |
//! | timed out | 504 Gateway Timeout |
//! | panicked | 500 Internal Server Error |
//! | inner service error | 502 Bad Gateway |
//!
//! ```
//! use std::time::Duration;
//! use tower::ServiceBuilder;
//! use towerguard::http::ErrorResponseLayer;
//! use towerguard::limit::ConcurrencyLimitLayer;
//! use towerguard::timeout::TimeoutLayer;
//!
//! let guard = ServiceBuilder::new()
//!     .layer(ErrorResponseLayer::new())
//!     .layer(TimeoutLayer::new(Duration::from_secs(2)).http_extensions())
//!     .layer(ConcurrencyLimitLayer::new(64));
//! // axum: Router::new().route(...).layer(guard)
//! # let _ = guard;
//! ```

mod body;
#[cfg(feature = "cache")]
mod cache;
pub mod cache_control;
pub mod cache_policy;
mod error;
#[cfg(feature = "limit")]
mod limit;
pub mod range;
#[cfg(feature = "retry")]
mod retry;
// Fed only by the HTTP cache.
#[cfg_attr(not(feature = "cache"), allow(dead_code))]
mod tee;
#[cfg(feature = "timeout")]
mod timeout;

pub use self::body::BufferedBody;
#[cfg(feature = "cache")]
pub use self::cache::{HttpCache, HttpCacheBuilder, HttpCacheFuture, HttpCacheLayer, CACHE_STATUS};
pub use self::error::{error_response, ErrorResponse, ErrorResponseFuture, ErrorResponseLayer};
#[cfg(feature = "limit")]
pub use self::limit::{OnBodyEnd, OnHttpResponse, PermitBody};
#[cfg(feature = "retry")]
pub use self::retry::{
    is_replayable_request, is_retryable_status, retry_after, BufferBody, BufferBodyFuture,
    BufferBodyLayer, HttpPolicy, IDEMPOTENCY_KEY,
};
#[cfg(feature = "timeout")]
pub use self::timeout::HttpExtensions;
