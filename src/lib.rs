//! Tower layers that keep an async service fast and standing under load.
//!
//! | layer | what it is for |
//! |---|---|
//! | [`cache`] | single-flight cache: one shared upstream call per key, results kept in a bounded store |
//! | [`limit`] | concurrency limit shared by every clone: static or adaptive, reject or bounded queue |
//! | [`timeout`] | timeouts measured from `call` that cancel the work and tell it so |
//! | [`hedge`] | a second attempt when the first is slow; first success wins, within a budget |
//! | [`retry`] | retry on fault with backoff, full jitter, `Retry-After` and a shared [`budget`] |
//! | [`stack`] | all of the above in the recommended order, validated, with production defaults |
//! | [`http`] | HTTP semantics: an RFC 9111 shared cache, retry policy and body buffering, errors mapped to 503 / 504 responses |
//!
//! Each layer is also a method of tower's `ServiceBuilder` through [`ServiceBuilderExt`].
//!
//! # The recommended order
//!
//! From the caller inwards: **cache** (a hit costs nothing below), **total timeout**
//! (bounds queue waits, attempts and backoffs; its deadline tells retry and hedge when to
//! stop), **concurrency limit** (one permit per request, not per attempt), **retry**,
//! **hedge**, **attempt timeout**. [`stack::StackBuilder`] assembles exactly this, checks
//! the configuration, and for HTTP maps errors to responses.
//!
//! Every layer fails with the crate's one [`Error`] type, whose [`ErrorKind`] says what
//! happened; stacked towerguard layers pass each other's errors through unchanged. Every
//! layer exports metrics through the [`metrics`](https://docs.rs/metrics) facade, listed in
//! [`metrics::METRICS`].
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, Layer, ServiceExt};
//! use towerguard::cache::CacheLayer;
//! use towerguard::stack::StackBuilder;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Cache, total timeout, adaptive limit, retry and attempt timeout, in that order.
//! let cache = CacheLayer::builder(|path: &String| Some(path.clone()))
//!     .ttl(Duration::from_secs(30))
//!     .build();
//! let stack = StackBuilder::new()
//!     .total_timeout(Duration::from_secs(2))
//!     .attempt_timeout(Duration::from_millis(500))
//!     .build_with_cache(cache)?;
//! let service = stack.layer(service_fn(|path: String| async move {
//!     Ok::<_, std::io::Error>(path.len())
//! }));
//! assert_eq!(service.oneshot("/index.html".to_owned()).await?, 11);
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[macro_use]
mod macros;

#[cfg(feature = "retry")]
pub mod budget;
#[cfg(any(
    feature = "cache",
    feature = "limit",
    feature = "timeout",
    feature = "http"
))]
mod builder_ext;
#[cfg(feature = "cache")]
pub mod cache;
#[cfg(any(feature = "cache", feature = "limit", feature = "timeout"))]
mod clock;
#[cfg(feature = "retry")]
mod cold;
mod error;
#[cfg(feature = "hedge")]
pub mod hedge;
#[cfg(any(feature = "hedge", feature = "limit"))]
mod hedged;
#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "limit")]
pub mod limit;
pub mod metrics;
#[cfg(feature = "retry")]
pub mod retry;
#[cfg(feature = "stack")]
pub mod stack;
#[cfg(any(feature = "cache", feature = "limit"))]
mod sync;
#[cfg(feature = "redis")]
pub mod tier;
#[cfg(feature = "timeout")]
pub mod timeout;

#[cfg(any(
    feature = "cache",
    feature = "limit",
    feature = "timeout",
    feature = "http"
))]
pub use builder_ext::ServiceBuilderExt;
pub use error::{BoxError, Error, ErrorKind};

/// The README's code blocks, compiled (and run where they have a `main`) by `cargo test`.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
mod readme {}
