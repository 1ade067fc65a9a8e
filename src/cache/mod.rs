//! Single-flight cache: one shared upstream call per key, results kept in a bounded store.
//!
//! [`CacheLayer`] puts a cache in front of any [`tower::Service`] whose responses are
//! `Clone`. A key function maps each request to a key, or to `None` to bypass the cache.
//!
//! - **Hits** are answered from the store without touching the inner service, not even its
//!   readiness.
//! - **Misses** join the flight for their key, or start one: however many callers ask for
//!   a key at once, the inner service is called once. The flight belongs to all of its
//!   callers together. The caller that started it may go away (client disconnect, outer
//!   timeout) and the others still get the result of that same call, which is neither
//!   cancelled nor restarted. When the *last* caller goes away, the upstream call is dropped
//!   and the flight removed in the same step, so the next caller starts afresh instead of
//!   joining dead work.
//! - **Results**: a successful response is stored when the storability predicate allows,
//!   with the default lifetime or one the predicate gives per entry, and every waiter gets a
//!   clone. An error reaches every waiter and is not stored, unless negative caching is on.
//! - **Panics** in the upstream future reach every waiter as an [`Error`] of kind
//!   [`Panicked`](crate::ErrorKind::Panicked); no waiter hangs and the key is free again.
//! - **Stale-while-revalidate**: an entry past its TTL but inside its window is served at
//!   once, and one background refresh replaces it. **Stale-if-error**: when the flight that
//!   should replace an expired entry fails, its callers get the entry while it is inside
//!   that window.
//! - **Bounded**: the store by entry count or weight, the flights under way by
//!   [`CacheBuilder::max_flights`] (past it, misses go upstream uncoalesced).
//!
//! Time is read from `tokio::time`, so tests can run on paused time.
//!
//! # Invalidation is never undone
//!
//! A value fetched before an invalidation ([`CacheHandle::invalidate`], `invalidate_tag`,
//! `invalidate_all`, their `purge` forms, a backplane message from another instance) is
//! never stored after it, in memory or in the second tier, on any instance:
//!
//! - A flight under way for an invalidated key is *detached*: its waiters still get its
//!   result, but it is not stored and later callers start a new flight. A tag purge or a
//!   purge of everything detaches every flight under way (what a flight will bring, and
//!   so its tags, is not known before it ends). The store happens under the flight's lock
//!   and the detach takes that lock, so one of them sees the other.
//! - With a second tier ([`crate::tier`]), every write to Redis is conditional on the key's
//!   generation being the one its flight read before calling the upstream: a purge leaves
//!   a tombstone, a tag purge raises a tag epoch, a purge of everything a new epoch, and a
//!   write that finds any of them changed is refused (counted as `result="refused"`) and
//!   kept out of the first tier too. A purge deletes in Redis *before* it empties this
//!   instance's first tier, so a miss meanwhile cannot refill it from Redis's old copy.
//!
//! What this guarantees: once [`purge`](CacheHandle::purge) (or `purge_tag`,
//! `purge_all`) returns, no caller that starts afterwards, on any instance, gets a value
//! fetched before it, and no instance ever stores one. A purge asks every instance
//! subscribed to the backplane to acknowledge its message once applied, and returns when
//! all have (0.8 to 1.3 ms for three instances on one machine, `tests/redis.rs`), or after
//! the larger of the tier's timeout and one second, with a warning naming how many
//! instances there were to hear from. [`invalidate`](CacheHandle::invalidate) and its
//! kin do the Redis part in the background, then empty this instance's first tier once
//! more, so the same holds once that background step ends; callers that joined a flight
//! before the invalidation may still get its value.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use towerguard::cache::CacheLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), towerguard::Error> {
//! let cache = CacheLayer::builder(|id: &u32| Some(*id))
//!     .name("users")
//!     .ttl(Duration::from_secs(60))
//!     .build();
//! let handle = cache.handle();
//!
//! let service = ServiceBuilder::new()
//!     .layer(cache)
//!     .service(service_fn(|id: u32| async move {
//!         Ok::<_, std::io::Error>(format!("user {id}"))
//!     }));
//!
//! assert_eq!(service.clone().oneshot(7).await?, "user 7"); // miss: goes upstream
//! assert_eq!(service.clone().oneshot(7).await?, "user 7"); // hit
//! handle.invalidate(&7);
//! # Ok(())
//! # }
//! ```
//!
//! # Metrics
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `towerguard_cache_requests_total` | counter | `name`, `result` | requests by result: `hit`, `stale`, `miss`, `coalesced`, `bypass` |
//! | `towerguard_cache_flight_duration_seconds` | histogram | `name` | upstream flight duration |
//! | `towerguard_cache_upstream_errors_total` | counter | `name`, `kind` | failed flights: `error`, `panicked` |
//! | `towerguard_cache_refreshes_total` | counter | `name` | background refreshes started |
//! | `towerguard_cache_stale_if_error_total` | counter | `name` | stale entries served after a failed flight |
//! | `towerguard_cache_entries` | gauge | `name` | entries in the store |
//! | `towerguard_cache_weighted_size` | gauge | `name` | weighted size of the store |
//! | `towerguard_cache_evictions_total` | counter | `name`, `cause` | removals: `size`, `expired`, `invalidated` |
//!
//! # Differences from the peers
//!
//! moka's `get_with` restarts the initialisation when the caller running it is dropped;
//! here the flight outlives any single caller. A coalescing layer that hands the other
//! callers an error when the first one leaves would fail requests that could have
//! succeeded; here they get the upstream result.
//!
//! [`Error`]: crate::Error

pub(crate) mod flight;
mod future;
mod layer;
mod service;
mod store;
mod table;
#[cfg(feature = "redis")]
mod tiered;

pub use self::future::ResponseFuture;
pub use self::layer::{
    CacheBuilder, CacheHandle, CacheLayer, DEFAULT_MAX_ENTRIES, DEFAULT_MAX_FLIGHTS,
};
pub use self::service::Cache;
pub use self::store::{Lifetime, Storable, ENTRY_OVERHEAD_BYTES};
