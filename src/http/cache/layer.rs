//! The layer and its builder.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use tower_layer::Layer;

use super::core::Core;
use super::service::HttpCache;
use super::stored::{KeyExtra, Variants};
use crate::cache::flight::FlightMap;
use crate::http::cache_policy::HttpCachePolicy;
use crate::metrics::CacheMetrics;

/// A [`Layer`] that puts an RFC 9111 shared cache in front of an HTTP service.
///
/// - **Stored** only what a shared cache may store (section 3): GET responses with a final
///   status, no `no-store`, no `private`, no `Set-Cookie` (configurable), `Authorization`
///   only with `public`, `s-maxage` or `must-revalidate`, and explicit or heuristic
///   freshness. A body that may be stored is read ahead up to a bound and stored when it
///   ends within it; a larger one (declared so, or found so) is passed through whole and
///   not stored. A body that stalls while it is read ahead is not held back: its client
///   gets the head and then each part as it arrives (`Cache-Status: detail=streamed`),
///   while the cache goes on reading it in a task of its own (so a slow reader holds
///   back neither the store nor the requests waiting for the same response). A response
///   that could answer no later request (no freshness, no validator, no stale window,
///   such as a server-sent event stream) is never read ahead.
/// - **Served** while fresh (section 4.2, `s-maxage` first), with `Age`, as far as the
///   request's own directives allow (`max-age`, `min-fresh`, `max-stale`, `no-cache`,
///   section 5.2.1; a fresh `immutable` response survives a reload, RFC 8246), unless
///   [`HttpCachePolicy::ignore_client_directives`] (CDN mode) is set; HEAD from a stored
///   GET; a client's own conditional request answered with 304; a single byte range
///   answered 206 (or 416) from a stored 200, honouring `If-Range`; `Vary` matched per
///   section 4.1, with `Accept-Encoding` and `Accept-Language` normalised.
/// - **Revalidated** when stale, with `If-None-Match` / `If-Modified-Since`; a 304
///   refreshes the stored headers. A HEAD for a stale entry goes to the origin as a HEAD,
///   and its 200 refreshes the stored headers (section 4.3.5). `stale-while-revalidate`
///   serves stale while one background revalidation runs; `stale-if-error`, or the
///   opt-in [`HttpCachePolicy::stale_on_error`], serves stale when the origin cannot be
///   reached or answers 500, 502, 503 or 504; neither when `must-revalidate`,
///   `proxy-revalidate`, `no-cache` or `s-maxage` forbid.
/// - **Forwarded as sent** when nothing usable is stored: a client's own `If-None-Match`
///   / `If-Modified-Since` (so the origin can answer 304), a `Range`, a HEAD; requests
///   for several ranges always.
/// - **Coalesced**: one origin request per URI at a time. A waiter that cannot use that
///   response (another `Vary` variant, `private`, `Set-Cookie`, `no-store`, its own
///   `Authorization`) is forwarded to the origin on its own.
/// - **Invalidated** by unsafe methods that succeed: the target URI and same-origin
///   `Location` / `Content-Location`.
/// - Every response carries `Cache-Status` (RFC 9211); an origin request that fails
///   returns an [`Error`](crate::Error) carrying one too
///   ([`Error::cache_status`](crate::Error::cache_status)), which
///   [`ErrorResponseLayer`](crate::http::ErrorResponseLayer) puts on the 502 or 504.
///
/// ```
/// use towerguard::http::HttpCacheLayer;
///
/// let cache = HttpCacheLayer::builder()
///     .name("proxy")
///     .capacity_bytes(256 * 1024 * 1024)
///     .max_body_bytes(8 * 1024 * 1024)
///     .build();
/// # let _ = cache;
/// ```
#[derive(Clone)]
#[must_use]
pub struct HttpCacheLayer {
    core: Arc<Core>,
    /// How long a request may wait for a flight (its own or one it joined), set by the
    /// stack to its total timeout, which sits inside the cache.
    wait: Option<Duration>,
}

impl fmt::Debug for HttpCacheLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpCacheLayer")
            .field("policy", &self.core.policy)
            .field("max_body", &self.core.max_body)
            .finish_non_exhaustive()
    }
}

impl HttpCacheLayer {
    /// Starts a builder: 64 MiB of responses, bodies up to 1 MiB, the default policy.
    pub fn builder() -> HttpCacheBuilder {
        HttpCacheBuilder {
            key_extra: None,
            name: "http".to_owned(),
            policy: HttpCachePolicy::default(),
            capacity_bytes: 64 * 1024 * 1024,
            max_body: 1024 * 1024,
            max_variants: 8,
            max_flights: 10_000,
            keep_tag_headers: false,
            uncacheable_ttl: Duration::from_secs(120),
            #[cfg(feature = "redis")]
            second: None,
        }
    }

    /// Removes every stored variant of `uri` (as a primary key:
    /// `scheme://authority/path?query`). With a second tier, it is also deleted from Redis
    /// and the other instances drop theirs, in the background ([`purge`](Self::purge)
    /// waits for it).
    pub fn invalidate(&self, primary_key: &str) {
        self.core.invalidate_here(primary_key);
        #[cfg(feature = "redis")]
        if let (Some(tier), Ok(runtime)) = (
            self.core.second.clone(),
            tokio::runtime::Handle::try_current(),
        ) {
            let (key, core) = (primary_key.to_owned(), self.core.clone());
            // Once more here after Redis: a miss in between may have read the old copy.
            runtime.spawn(async move {
                tier.remove(&key).await;
                core.invalidate_here(&key);
            });
        }
    }

    /// Like [`invalidate`](Self::invalidate), and returns once Redis has deleted it and
    /// the other instances are told (or the tier's timeout passed). No response fetched
    /// before it is stored after it, on any instance, and no request that starts here
    /// afterwards gets one (the same rules as the single-flight cache's:
    /// [invalidation is never undone](crate::cache#invalidation-is-never-undone)).
    /// Feature `redis`.
    #[cfg(feature = "redis")]
    pub async fn purge(&self, primary_key: &str) {
        self.core.invalidate(primary_key).await;
    }

    /// Removes every stored response tagged `tag` by its `Cache-Tag` (comma-separated)
    /// or `Surrogate-Key` (space-separated) header (an index by tag finds them: the cost
    /// grows with the URIs tagged so, not with the store). With a second
    /// tier, every such response is also deleted from Redis and the other instances drop
    /// theirs, in the background ([`purge_tag`](Self::purge_tag) waits for it).
    pub fn invalidate_tag(&self, tag: &str) {
        self.core.invalidate_tag_here(tag);
        #[cfg(feature = "redis")]
        if let (Some(tier), Ok(runtime)) = (
            self.core.second.clone(),
            tokio::runtime::Handle::try_current(),
        ) {
            let (tag, core) = (tag.to_owned(), self.core.clone());
            runtime.spawn(async move {
                tier.remove_tag(&tag).await;
                core.invalidate_tag_here(&tag);
            });
        }
    }

    /// Like [`invalidate_tag`](Self::invalidate_tag), and returns once Redis has deleted
    /// the tagged responses and the other instances are told. Feature `redis`.
    #[cfg(feature = "redis")]
    pub async fn purge_tag(&self, tag: &str) {
        // Redis first: a miss here meanwhile would read its old copy.
        if let Some(tier) = &self.core.second {
            tier.remove_tag(tag).await;
        }
        self.core.invalidate_tag_here(tag);
    }

    /// Removes every stored response and detaches every flight. With a second tier,
    /// every response under its prefix is also deleted from Redis and the other instances
    /// drop theirs, in the background ([`purge_all`](Self::purge_all) waits for it).
    pub fn invalidate_all(&self) {
        self.core.invalidate_all_here();
        #[cfg(feature = "redis")]
        if let (Some(tier), Ok(runtime)) = (
            self.core.second.clone(),
            tokio::runtime::Handle::try_current(),
        ) {
            let core = self.core.clone();
            runtime.spawn(async move {
                tier.remove_all().await;
                core.invalidate_all_here();
            });
        }
    }

    /// Like [`invalidate_all`](Self::invalidate_all), and returns once Redis has deleted
    /// every response under the prefix and the other instances are told. Feature `redis`.
    #[cfg(feature = "redis")]
    pub async fn purge_all(&self) {
        // Redis first: a miss here meanwhile would read its old copy.
        if let Some(tier) = &self.core.second {
            tier.remove_all().await;
        }
        self.core.invalidate_all_here();
    }

    /// This layer with every wait for a flight (an origin request this request started or
    /// joined, and through it a second tier's lease held by another instance) bounded by
    /// `wait`: past it the request ends with an error of kind timed out (504 through
    /// [`ErrorResponseLayer`](crate::http::ErrorResponseLayer)), and the flight, shared,
    /// goes on for whoever still waits. The stack sets it to its total timeout, which
    /// sits inside the cache.
    #[cfg(feature = "stack")]
    pub(crate) fn wait_bound(mut self, wait: Option<Duration>) -> Self {
        self.wait = wait;
        self
    }

    /// URIs with stored responses; exact after [`run_pending_tasks`](Self::run_pending_tasks).
    pub fn entry_count(&self) -> u64 {
        self.core.store.entry_count()
    }

    /// Bytes held (bodies and headers, estimated).
    pub fn weighted_size(&self) -> u64 {
        self.core.store.weighted_size()
    }

    /// Applies the store's pending work now.
    pub fn run_pending_tasks(&self) {
        self.core.sample();
    }

    /// Flights under way: origin requests (and background revalidations) in progress.
    pub fn flights_in_progress(&self) -> usize {
        self.core.flights.len()
    }
}

/// What one remembered uncacheable URI costs besides its key's bytes: the key's `String`,
/// moka's entry and its bookkeeping (measured: 200,000 URIs of 38 bytes took 421 bytes of
/// resident memory each).
const UNCACHEABLE_ENTRY_BYTES: u32 = 384;

/// Configures an [`HttpCacheLayer`].
#[must_use]
pub struct HttpCacheBuilder {
    key_extra: Option<KeyExtra>,
    name: String,
    policy: HttpCachePolicy,
    capacity_bytes: u64,
    max_body: usize,
    max_variants: usize,
    max_flights: usize,
    keep_tag_headers: bool,
    uncacheable_ttl: Duration,
    #[cfg(feature = "redis")]
    second: Option<crate::tier::RedisTier>,
}

impl fmt::Debug for HttpCacheBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpCacheBuilder")
            .field("name", &self.name)
            .field("policy", &self.policy)
            .field("capacity_bytes", &self.capacity_bytes)
            .field("max_body", &self.max_body)
            .field("max_variants", &self.max_variants)
            .field("max_flights", &self.max_flights)
            .field("keep_tag_headers", &self.keep_tag_headers)
            .field("uncacheable_ttl", &self.uncacheable_ttl)
            .field("key_extra", &self.key_extra.is_some())
            .finish()
    }
}

impl HttpCacheBuilder {
    /// Adds a part of your own to every key, from the request's URI and headers (a
    /// tenant, a device class); `None` bypasses the cache for that request. Requests
    /// whose parts differ never share a stored response or an origin response.
    pub fn key_extra<F>(mut self, f: F) -> Self
    where
        F: Fn(&http::Uri, &HeaderMap) -> Option<String> + Send + Sync + 'static,
    {
        self.key_extra = Some(Arc::new(f));
        self
    }

    /// The instance name, the `name` label of every metric (default `"http"`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The storage rules' choices ([`HttpCachePolicy`]).
    pub fn policy(mut self, policy: HttpCachePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Bytes of stored responses at most (bodies and headers).
    pub fn capacity_bytes(mut self, bytes: u64) -> Self {
        self.capacity_bytes = bytes;
        self
    }

    /// The largest body stored; larger responses pass through whole, unstored. This is
    /// also the most the cache reads ahead of one response's client.
    pub fn max_body_bytes(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// Variants kept per URI (`Vary`), most recent first.
    pub fn max_variants(mut self, variants: usize) -> Self {
        self.max_variants = variants.max(1);
        self
    }

    /// Origin requests under way at once for distinct URIs; past it, misses go to the
    /// origin uncoalesced.
    pub fn max_flights(mut self, flights: usize) -> Self {
        self.max_flights = flights;
        self
    }

    /// Sends the origin's `Cache-Tag` and `Surrogate-Key` fields on to the client. By
    /// default they are removed from every response the layer returns, as CDNs do: they
    /// name the origin's invalidation groups, which are not the client's business. They
    /// are kept in the store either way, so [`invalidate_tag`](HttpCacheLayer::invalidate_tag)
    /// finds them. Keep them when another cache in front of this one invalidates by tag.
    pub fn keep_tag_headers(mut self, keep: bool) -> Self {
        self.keep_tag_headers = keep;
        self
    }

    /// How long a URI whose origin response could not be stored (no freshness,
    /// `no-store`, `private`, `Set-Cookie`, too large, ...) keeps its misses apart: each
    /// goes to the origin at once, where it would otherwise wait for another request's
    /// origin response that it could not share and then go to the origin anyway (default
    /// 120 s; zero turns it off). A response that may be stored ends it at once; server
    /// errors and 304s do not start it. The URIs remembered take at most 1/64 of
    /// [`capacity_bytes`](Self::capacity_bytes), counted in it. With a second tier, such a
    /// URI (when Redis holds no other variant of it) is also marked in Redis for as long,
    /// so the other instances send its misses to the origin at once too, instead of
    /// waiting for this one's lease.
    pub fn uncacheable_ttl(mut self, ttl: Duration) -> Self {
        self.uncacheable_ttl = ttl;
        self
    }

    /// A second tier in Redis shared by every instance (feature `redis`): a URI missing
    /// here is read from Redis before the origin; on a miss there too, one instance at a
    /// time goes to the origin for it (a lease) and the others wait for its response;
    /// what may be stored is written to both, with every variant's status, headers, body
    /// and age. Writes, invalidations (unsafe methods included) and
    /// [`invalidate_tag`](HttpCacheLayer::invalidate_tag) reach every instance through
    /// the backplane. See [`crate::tier`].
    ///
    /// ```no_run
    /// use towerguard::http::HttpCacheLayer;
    /// use towerguard::tier::RedisTier;
    ///
    /// # fn main() -> Result<(), towerguard::Error> {
    /// let tier = RedisTier::builder("redis://127.0.0.1:6379/").prefix("pages:").build()?;
    /// let cache = HttpCacheLayer::builder().second_tier(tier).build();
    /// # let _ = cache;
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "redis")]
    pub fn second_tier(mut self, tier: crate::tier::RedisTier) -> Self {
        self.second = Some(tier);
        self
    }

    /// Builds the layer and its shared store.
    pub fn build(self) -> HttpCacheLayer {
        let metrics = CacheMetrics::register(&self.name);
        let listener = metrics.clone();
        let tags = Arc::new(super::tag_index::TagIndex::default());
        let index = tags.clone();
        let marks_bytes = if self.uncacheable_ttl.is_zero() {
            0
        } else {
            self.capacity_bytes / 64
        };
        let uncacheable = (marks_bytes > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(marks_bytes)
                .time_to_live(self.uncacheable_ttl)
                .weigher(|key: &String, _: &()| {
                    u32::try_from(key.len())
                        .unwrap_or(u32::MAX)
                        .saturating_add(UNCACHEABLE_ENTRY_BYTES)
                })
                .build()
        });
        let store = moka::sync::Cache::builder()
            .max_capacity(self.capacity_bytes - marks_bytes)
            .weigher(|key: &String, variants: &Arc<Variants>| {
                variants.0.iter().map(|v| v.weight()).fold(
                    u32::try_from(key.len())
                        .unwrap_or(u32::MAX)
                        .saturating_add(super::tag_index::weight(key, variants)),
                    u32::saturating_add,
                )
            })
            .eviction_listener(move |key, value, cause| {
                listener.record_removal(cause);
                index.remove(&key, &value);
            })
            .build();
        let core = Arc::new(Core {
            key_extra: self.key_extra,
            store,
            tags,
            flights: FlightMap::new(self.max_flights),
            solos: Default::default(),
            policy: self.policy,
            max_body: self.max_body,
            max_variants: self.max_variants,
            keep_tag_headers: self.keep_tag_headers,
            uncacheable,
            #[cfg(feature = "redis")]
            second: self.second.map(|tier| {
                let metrics = crate::tier::TierMetrics::register(&self.name);
                Arc::new(super::tiered::HttpTier::new(tier, metrics))
            }),
            metrics,
        });
        #[cfg(feature = "redis")]
        if let Some(tier) = &core.second {
            tier.register(&core);
        }
        HttpCacheLayer { core, wait: None }
    }
}

impl<S> Layer<S> for HttpCacheLayer {
    type Service = HttpCache<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HttpCache {
            inner,
            core: self.core.clone(),
            wait: self.wait,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use bytes::Bytes;
    use http::{HeaderValue, StatusCode};
    use tokio::time::Instant;

    use super::super::stored::Stored;
    use super::super::tag_index::carries;
    use super::*;
    use crate::http::cache_policy::{vary, AgeInputs};

    fn response(tags: &str, body: usize) -> Arc<Stored> {
        let mut headers = HeaderMap::new();
        headers.insert("cache-control", HeaderValue::from_static("max-age=60"));
        if !tags.is_empty() {
            headers.insert("cache-tag", HeaderValue::from_str(tags).unwrap());
        }
        Arc::new(Stored {
            status: StatusCode::OK,
            vary: vary(&headers),
            headers,
            body: Bytes::from(vec![0; body]),
            request_headers: HeaderMap::new(),
            extra: None,
            age: AgeInputs {
                age_header: None,
                date: None,
                request_time: SystemTime::now(),
                response_time: SystemTime::now(),
            },
            stored_at: Instant::now(),
            freshness: Duration::from_secs(60),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
        })
    }

    fn listed(core: &Core, tag: &str) -> Vec<String> {
        let mut keys = core.tags.keys(tag);
        keys.sort();
        keys
    }

    fn stored_with(core: &Core, tag: &str) -> Vec<String> {
        let mut keys: Vec<String> = core
            .store
            .iter()
            .filter(|(_, variants)| carries(variants, tag))
            .map(|(key, _)| String::clone(&key))
            .collect();
        keys.sort();
        keys
    }

    #[test]
    fn the_tag_index_lists_what_the_store_holds_through_eviction_replacement_and_purges() {
        let layer = HttpCacheLayer::builder().capacity_bytes(64 * 1024).build();
        let core = &layer.core;
        // 1,000 URIs of 1 KiB each, tagged `all` and `even` or `odd`: the store keeps a
        // fraction, the index must not keep the rest.
        for i in 0..1_000 {
            let tags = if i % 2 == 0 { "all, even" } else { "all, odd" };
            core.insert(&format!("http://h/{i}"), response(tags, 1024));
        }
        core.store.run_pending_tasks();
        let held = core.store.entry_count() as usize;
        assert!((1..1_000).contains(&held), "{held} stored");
        assert_eq!(core.tags.len(), 2 * held, "two entries per stored URI");
        for tag in ["all", "even", "odd"] {
            assert_eq!(listed(core, tag), stored_with(core, tag), "{tag}");
        }

        // A URI stored again without tags leaves the index.
        let untagged = stored_with(core, "odd").remove(0);
        core.insert(&untagged, response("", 10));
        core.store.run_pending_tasks();
        assert!(!listed(core, "all").contains(&untagged));
        assert!(core.store.contains_key(&untagged));

        // Purging a tag removes exactly the URIs tagged so, and their entries.
        let odd = stored_with(core, "odd");
        core.invalidate_tag_here("even");
        core.store.run_pending_tasks();
        assert!(stored_with(core, "even").is_empty());
        assert!(listed(core, "even").is_empty());
        assert_eq!(stored_with(core, "odd"), odd, "the other tag's URIs stay");
        assert_eq!(listed(core, "all"), odd);
        assert!(core.store.contains_key(&untagged), "an untagged URI stays");

        core.invalidate_all_here();
        core.store.run_pending_tasks();
        assert_eq!(core.tags.len(), 0);
    }
}
