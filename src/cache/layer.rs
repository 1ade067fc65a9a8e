use std::fmt;
use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::flight::{Core, FlightMap, StorableFn, TagsFn};
use super::service::Cache;
use super::store::{Lifetime, Storable, Store, StoreConfig, Weigher, ENTRY_OVERHEAD_BYTES};
use crate::metrics::CacheMetrics;

/// Maps a request to its cache key; `None` bypasses the cache.
pub(crate) type KeyFn<Req, K> = Arc<dyn Fn(&Req) -> Option<K> + Send + Sync>;

/// Default bound on stored entries.
pub const DEFAULT_MAX_ENTRIES: u64 = 10_000;
/// Default bound on flights under way at once.
pub const DEFAULT_MAX_FLIGHTS: usize = 10_000;

/// A [`Layer`] that puts a single-flight cache in front of a service.
///
/// Built with [`CacheLayer::builder`]. All state (the store, the in-flight map, the metric
/// handles) is created once by [`CacheBuilder::build`]: every clone of the layer and every
/// service it makes share it, however many times `layer()` is called.
#[must_use]
pub struct CacheLayer<Req, K, V> {
    pub(crate) core: Arc<Core<K, V>>,
    pub(crate) key_fn: KeyFn<Req, K>,
}

impl<Req, K, V> Clone for CacheLayer<Req, K, V> {
    fn clone(&self) -> Self {
        CacheLayer {
            core: self.core.clone(),
            key_fn: self.key_fn.clone(),
        }
    }
}

impl<Req, K, V> fmt::Debug for CacheLayer<Req, K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheLayer").finish_non_exhaustive()
    }
}

impl<Req, K, V> CacheLayer<Req, K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Starts a builder with the key function: requests it maps to `None` bypass the cache.
    pub fn builder<F>(key: F) -> CacheBuilder<Req, K, V>
    where
        F: Fn(&Req) -> Option<K> + Send + Sync + 'static,
    {
        CacheBuilder {
            key_fn: Arc::new(key),
            name: "default".to_owned(),
            max_capacity: DEFAULT_MAX_ENTRIES,
            weigher: None,
            error_weight: 1,
            ttl: None,
            idle: None,
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            negative_ttl: None,
            storable: Arc::new(|_: &V| Storable::Default),
            max_flights: DEFAULT_MAX_FLIGHTS,
            tags: None,
            #[cfg(feature = "redis")]
            second: None,
            _req: PhantomData,
        }
    }

    /// A handle to the shared store, usable outside the service.
    pub fn handle(&self) -> CacheHandle<K, V> {
        CacheHandle {
            core: self.core.clone(),
        }
    }
}

impl<S, Req, K, V> Layer<S> for CacheLayer<Req, K, V> {
    type Service = Cache<S, Req, K, V>;

    fn layer(&self, inner: S) -> Self::Service {
        Cache::from_parts(inner, self.core.clone(), self.key_fn.clone())
    }
}

/// Configures a [`CacheLayer`].
///
/// ```
/// use std::time::Duration;
/// use towerguard::cache::{CacheLayer, Storable};
///
/// let layer = CacheLayer::builder(|user_id: &u64| Some(*user_id))
///     .name("profiles")
///     .max_entries(50_000)
///     .ttl(Duration::from_secs(60))
///     .stale_while_revalidate(Duration::from_secs(30))
///     .stale_if_error(Duration::from_secs(600))
///     .storable(|profile: &String| {
///         if profile.is_empty() { Storable::No } else { Storable::Default }
///     })
///     .build();
/// # let _ = layer;
/// ```
#[must_use]
pub struct CacheBuilder<Req, K, V> {
    key_fn: KeyFn<Req, K>,
    name: String,
    max_capacity: u64,
    weigher: Option<Weigher<K, V>>,
    error_weight: u32,
    ttl: Option<Duration>,
    idle: Option<Duration>,
    stale_while_revalidate: Duration,
    stale_if_error: Duration,
    negative_ttl: Option<Duration>,
    storable: StorableFn<V>,
    max_flights: usize,
    tags: Option<TagsFn<K, V>>,
    #[cfg(feature = "redis")]
    second: Option<super::tiered::TierConfig<K, V>>,
    _req: PhantomData<fn(&Req)>,
}

impl<Req, K, V> fmt::Debug for CacheBuilder<Req, K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheBuilder")
            .field("name", &self.name)
            .field("max_capacity", &self.max_capacity)
            .field("weighted", &self.weigher.is_some())
            .field("ttl", &self.ttl)
            .field("idle", &self.idle)
            .field("stale_while_revalidate", &self.stale_while_revalidate)
            .field("stale_if_error", &self.stale_if_error)
            .field("negative_ttl", &self.negative_ttl)
            .field("max_flights", &self.max_flights)
            .finish_non_exhaustive()
    }
}

impl<Req, K, V> CacheBuilder<Req, K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// The instance name, the `name` label of every metric (default `"default"`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Bounds the store to `max` entries (default [`DEFAULT_MAX_ENTRIES`]); beyond it the
    /// least useful entries are evicted. `0` stores nothing (flights still coalesce).
    pub fn max_entries(mut self, max: u64) -> Self {
        self.max_capacity = max;
        self.weigher = None;
        self
    }

    /// Bounds the store by weight instead of count: the entries' weights, as `weigher`
    /// gives them, add up to at most `max`. The unit is yours and nothing is added to it:
    /// a stored error weighs 1, and so does an entry `weigher` gives 0. The store is split
    /// into four parts of `max / 4` each, and an entry may fill at most 97% of a part: a
    /// heavier one is not stored (it still reaches every caller, and counts as evicted for
    /// size). To bound memory, use [`max_bytes`](Self::max_bytes).
    pub fn max_weight<W>(mut self, max: u64, weigher: W) -> Self
    where
        W: Fn(&K, &V) -> u32 + Send + Sync + 'static,
    {
        self.max_capacity = max;
        self.weigher = Some(Arc::new(weigher));
        self.error_weight = 1;
        self
    }

    /// Bounds the memory the store holds to `max` bytes. `heap_bytes` gives what a key and
    /// its value hold on the heap (a `String`'s or a `Vec`'s buffer: their `capacity()`);
    /// the store adds their inline sizes and its own cost per entry
    /// ([`ENTRY_OVERHEAD_BYTES`]), so the bound is what the entries take, measured with a
    /// counting allocator in the crate's tests.
    /// As with [`max_weight`](Self::max_weight), an entry heavier than 97% of a quarter of
    /// `max` is not stored.
    ///
    /// ```
    /// use towerguard::cache::CacheLayer;
    ///
    /// // At most 64 MiB of pages, keyed by path.
    /// let cache = CacheLayer::builder(|path: &String| Some(path.clone()))
    ///     .max_bytes(64 * 1024 * 1024, |path: &String, page: &String| {
    ///         path.capacity() + page.capacity()
    ///     })
    ///     .build();
    /// # let _: towerguard::cache::CacheLayer<String, String, String> = cache;
    /// ```
    pub fn max_bytes<H>(mut self, max: u64, heap_bytes: H) -> Self
    where
        H: Fn(&K, &V) -> usize + Send + Sync + 'static,
    {
        let fixed = ENTRY_OVERHEAD_BYTES + std::mem::size_of::<K>() + std::mem::size_of::<V>();
        self.max_capacity = max;
        self.weigher = Some(Arc::new(move |key: &K, value: &V| {
            u32::try_from(heap_bytes(key, value).saturating_add(fixed)).unwrap_or(u32::MAX)
        }));
        self.error_weight = u32::try_from(fixed).unwrap_or(u32::MAX);
        self
    }

    /// How long a stored response stays fresh by default (default: until evicted).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Expires an entry nobody has read for `idle`, whatever its TTL.
    pub fn time_to_idle(mut self, idle: Duration) -> Self {
        self.idle = Some(idle);
        self
    }

    /// Default stale-while-revalidate window: past its TTL, an entry is still served for
    /// `window` while one background refresh replaces it. Needs a TTL to mean anything.
    pub fn stale_while_revalidate(mut self, window: Duration) -> Self {
        self.stale_while_revalidate = window;
        self
    }

    /// Default stale-if-error window: past its TTL, an entry is served for `window` more
    /// when the flight that should replace it fails.
    pub fn stale_if_error(mut self, window: Duration) -> Self {
        self.stale_if_error = window;
        self
    }

    /// Negative caching: store errors for `ttl`, answering the same error meanwhile.
    /// Off by default: errors reach every waiter and are not stored.
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.negative_ttl = Some(ttl);
        self
    }

    /// Decides, per successful response, whether it is stored and with what lifetime
    /// (default: every response, with the default lifetime). A response that is not stored
    /// still reaches every caller of its flight.
    pub fn storable<P>(mut self, predicate: P) -> Self
    where
        P: Fn(&V) -> Storable + Send + Sync + 'static,
    {
        self.storable = Arc::new(predicate);
        self
    }

    /// Bounds the flights under way at once (default [`DEFAULT_MAX_FLIGHTS`]). A miss that
    /// finds the bound reached goes upstream on its own, uncoalesced, and counts as bypass.
    pub fn max_flights(mut self, max: usize) -> Self {
        self.max_flights = max;
        self
    }

    /// The tags a stored value carries: [`CacheHandle::invalidate_tag`] removes every
    /// entry with a tag, on every instance when there is a second tier.
    ///
    /// ```
    /// use towerguard::cache::CacheLayer;
    ///
    /// let layer = CacheLayer::builder(|path: &String| Some(path.clone()))
    ///     .tags(|path: &String, _page: &String| {
    ///         path.split('/').nth(1).map(|section| vec![section.to_owned()]).unwrap_or_default()
    ///     })
    ///     .build();
    /// # let _: CacheLayer<String, String, String> = layer;
    /// ```
    pub fn tags<F>(mut self, tags: F) -> Self
    where
        F: Fn(&K, &V) -> Vec<String> + Send + Sync + 'static,
    {
        self.tags = Some(Arc::new(tags));
        self
    }

    /// A second tier in Redis shared by every instance (feature `redis`): a miss in memory
    /// reads it before the upstream, and what the upstream returns (and may be stored) is
    /// written to both, with the same lifetime. On a miss in Redis too, one instance at a
    /// time calls the upstream for a key (a lease), and writes and invalidations reach the
    /// other instances through the backplane. `key` names a key in Redis (the tier adds
    /// its prefix); `codec` turns values into bytes and back. See [`crate::tier`].
    #[cfg(feature = "redis")]
    pub fn second_tier<F, C>(mut self, tier: crate::tier::RedisTier, key: F, codec: C) -> Self
    where
        F: Fn(&K) -> String + Send + Sync + 'static,
        C: crate::tier::Codec<V>,
    {
        self.second = Some((tier, Arc::new(key), Arc::new(codec)));
        self
    }

    /// Builds the layer and its shared state.
    pub fn build(self) -> CacheLayer<Req, K, V> {
        let metrics = CacheMetrics::register(&self.name);
        let default_life = match self.ttl {
            Some(ttl) => Lifetime::fresh_for(ttl),
            None => Lifetime::forever(),
        }
        .stale_while_revalidate(self.stale_while_revalidate)
        .stale_if_error(self.stale_if_error);
        let store = Store::new(
            StoreConfig {
                max_capacity: self.max_capacity,
                weigher: self.weigher,
                error_weight: self.error_weight,
                default_life,
                idle: self.idle,
                negative_ttl: self.negative_ttl,
            },
            metrics.clone(),
        );
        let core = Arc::new(Core {
            store,
            flights: FlightMap::new(self.max_flights),
            storable: self.storable,
            tags: self.tags,
            #[cfg(feature = "redis")]
            second: self.second.map(|(tier, key, codec)| {
                let metrics = crate::tier::TierMetrics::register(&self.name);
                Arc::new(super::tiered::SecondTier::new(tier, key, codec, metrics))
            }),
            metrics,
        });
        #[cfg(feature = "redis")]
        if let Some(tier) = &core.second {
            tier.register(&core);
        }
        CacheLayer {
            core,
            key_fn: self.key_fn,
        }
    }
}

/// A handle to a cache's shared store and flights, usable outside the service.
///
/// Cheap to clone. Invalidating a key also detaches its flight under way: the callers
/// already waiting still get its result, but it is not stored, and the next caller starts
/// a new flight.
pub struct CacheHandle<K, V> {
    core: Arc<Core<K, V>>,
}

impl<K, V> Clone for CacheHandle<K, V> {
    fn clone(&self) -> Self {
        CacheHandle {
            core: self.core.clone(),
        }
    }
}

impl<K, V> fmt::Debug for CacheHandle<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheHandle").finish_non_exhaustive()
    }
}

impl<K, V> CacheHandle<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Removes `key`'s entry and detaches its flight. With a second tier, the key is also
    /// deleted from Redis and the other instances drop their copies, in the background
    /// ([`purge`](Self::purge) waits for it).
    pub fn invalidate(&self, key: &K) {
        self.core.flights.detach(key);
        self.core.store.invalidate(key);
        #[cfg(feature = "redis")]
        if let Some(tier) = self.tier() {
            let (key, core) = (key.clone(), self.core.clone());
            // Once more here after Redis: a miss in between may have read the old copy.
            spawn(async move {
                tier.remove(&key).await;
                core.flights.detach(&key);
                core.store.invalidate(&key);
            });
        }
    }

    /// Removes every entry whose [tags](CacheBuilder::tags) include `tag`. With a second
    /// tier, every value with the tag is also deleted from Redis and the other instances
    /// drop theirs, in the background ([`purge_tag`](Self::purge_tag) waits for it).
    ///
    /// It scans the store on the calling thread, asking each entry for its tags. Look-ups
    /// and inserts go on meanwhile (the scan holds a part of the store only to copy one
    /// entry out), but its time grows with the number of entries: from async code, with a
    /// large store, call it through `tokio::task::spawn_blocking`. The other instances'
    /// scans, on a tag purge from this one, run on their runtimes' blocking threads.
    pub fn invalidate_tag(&self, tag: &str) {
        self.core.invalidate_tag_here(tag);
        #[cfg(feature = "redis")]
        if let Some(tier) = self.tier() {
            let (tag, core) = (tag.to_owned(), self.core.clone());
            spawn(async move {
                tier.remove_tag(&tag).await;
                // On a blocking thread: it scans the store.
                let _ = tokio::task::spawn_blocking(move || core.invalidate_tag_here(&tag)).await;
            });
        }
    }

    /// Removes every entry and detaches every flight. With a second tier, every value
    /// under its prefix is also deleted from Redis and the other instances drop theirs,
    /// in the background ([`purge_all`](Self::purge_all) waits for it).
    pub fn invalidate_all(&self) {
        self.core.flights.detach_all();
        self.core.store.invalidate_all();
        #[cfg(feature = "redis")]
        if let Some(tier) = self.tier() {
            let core = self.core.clone();
            spawn(async move {
                tier.remove_all().await;
                core.flights.detach_all();
                core.store.invalidate_all();
            });
        }
    }

    /// Like [`invalidate`](Self::invalidate), and returns once Redis has deleted the key
    /// and the message to the other instances is sent (or the tier's timeout passed).
    /// Feature `redis`.
    #[cfg(feature = "redis")]
    pub async fn purge(&self, key: &K) {
        // Redis first: a miss here meanwhile would read its old copy. Then this instance,
        // where a flight under way is detached; on the others the message does the same.
        if let Some(tier) = self.tier() {
            tier.remove(key).await;
        }
        self.core.flights.detach(key);
        self.core.store.invalidate(key);
    }

    /// Like [`invalidate_tag`](Self::invalidate_tag), and returns once Redis has deleted
    /// the tagged values and the message is sent. Feature `redis`.
    #[cfg(feature = "redis")]
    pub async fn purge_tag(&self, tag: &str) {
        if let Some(tier) = self.tier() {
            tier.remove_tag(tag).await;
        }
        self.core.invalidate_tag_here(tag);
    }

    /// Like [`invalidate_all`](Self::invalidate_all), and returns once Redis has deleted
    /// every value under the prefix and the message is sent. Feature `redis`.
    #[cfg(feature = "redis")]
    pub async fn purge_all(&self) {
        if let Some(tier) = self.tier() {
            tier.remove_all().await;
        }
        self.core.flights.detach_all();
        self.core.store.invalidate_all();
    }

    #[cfg(feature = "redis")]
    fn tier(&self) -> Option<Arc<super::tiered::SecondTier<K, V>>> {
        self.core.second.clone()
    }

    /// Entries in the store. Writes apply at once, so the figure is exact.
    pub fn entry_count(&self) -> u64 {
        self.core.store.entry_count()
    }

    /// Weighted size of the store (entries, when there is no weigher).
    pub fn weighted_size(&self) -> u64 {
        self.core.store.weighted_size()
    }

    /// Sets the store's gauges from its current counts. The store applies writes,
    /// evictions and invalidations at once; this only refreshes the metrics.
    pub fn run_pending_tasks(&self) {
        self.core.store.run_pending_tasks();
    }

    /// Flights under way: keys with an upstream call in progress.
    pub fn flights_in_progress(&self) -> usize {
        self.core.flights.len()
    }
}

/// Runs `work` on the current runtime, if there is one.
#[cfg(feature = "redis")]
fn spawn(work: impl std::future::Future<Output = ()> + Send + 'static) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(work);
    }
}
