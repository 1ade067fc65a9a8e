//! The HTTP cache layer: RFC 9111 shared-cache semantics on top of single-flight.
//!
//! - `layer`: [`HttpCacheLayer`] and its builder;
//! - `service`: [`HttpCache`], a request's way through the cache;
//! - `fetch`: requests to the origin (flights, revalidation, background refresh);
//! - `core` and `stored`: the shared state, the stored variants and flight outcomes;
//! - `tag_index`: which stored URIs carry which tag;
//! - `respond`: responses assembled from the store, with `Cache-Status`.

mod core;
mod fetch;
mod layer;
mod respond;
mod service;
mod stored;
mod tag_index;
#[cfg(feature = "redis")]
mod tiered;

pub use self::layer::{HttpCacheBuilder, HttpCacheLayer};
pub use self::respond::CACHE_STATUS;
pub use self::service::{HttpCache, HttpCacheFuture};
