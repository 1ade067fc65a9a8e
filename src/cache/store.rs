//! The result store: quick_cache for capacity and eviction, tokio time for freshness.
//!
//! quick_cache bounds the store (by entry count or by weight) and evicts (a CLOCK-Pro
//! style policy with a ghost list of recently evicted keys, so a key asked for again soon
//! after its eviction comes back as hot). It was measured against moka in
//! `benches/cache.rs`: a hit through its `get` costs about a tenth of moka's `sync` `get`,
//! and its hit ratio on a Zipf(0.9) stream over ten times the capacity is at least moka's.
//! Freshness, idle time and the stale windows are decided here against
//! `tokio::time::Instant`, so they follow paused time in tests; the clock is read only for
//! an entry that has a deadline or when idle expiry is on. An entry found unusable by a
//! look-up is removed then; one nobody asks for again stays until the capacity bound
//! evicts it.

use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::Error;
use crate::metrics::CacheMetrics;

/// What an entry costs the store beyond its key and value (their inline sizes and what
/// they hold on the heap): the entry's own allocation (freshness, idle time, the value's
/// `Result`) and the store's bookkeeping for it (its slot, its index entry, its share of
/// the ghost list). Measured with a counting allocator in
/// `tests/memory.rs`; [`CacheBuilder::max_bytes`](crate::cache::CacheBuilder::max_bytes)
/// adds it to every entry.
pub const ENTRY_OVERHEAD_BYTES: usize = 160;

/// A weigher: the size of one entry in the store's capacity unit.
pub(crate) type Weigher<K, V> = Arc<dyn Fn(&K, &V) -> u32 + Send + Sync>;

/// What the store keeps for a response: whether and for how long.
///
/// Returned by the [storability predicate](super::CacheBuilder::storable) for every
/// successful response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Storable {
    /// Do not store this response; it still reaches every caller that waited for it.
    No,
    /// Store it with the layer's default lifetime.
    Default,
    /// Store it with this lifetime instead of the default.
    For(Lifetime),
}

/// How long a stored entry is fresh, and how long past that it may still be served stale.
///
/// ```
/// use std::time::Duration;
/// use towerguard::cache::Lifetime;
///
/// let life = Lifetime::fresh_for(Duration::from_secs(30))
///     .stale_while_revalidate(Duration::from_secs(10))
///     .stale_if_error(Duration::from_secs(300));
/// assert_eq!(life.fresh(), Some(Duration::from_secs(30)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    fresh: Option<Duration>,
    stale_while_revalidate: Duration,
    stale_if_error: Duration,
}

impl Lifetime {
    /// Fresh for `ttl` after it was stored.
    pub fn fresh_for(ttl: Duration) -> Self {
        Lifetime {
            fresh: Some(ttl),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
        }
    }

    /// Fresh until it is evicted, invalidated or left idle too long.
    pub fn forever() -> Self {
        Lifetime {
            fresh: None,
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
        }
    }

    /// After it stops being fresh, serve it for up to `window` more while one background
    /// refresh runs.
    pub fn stale_while_revalidate(mut self, window: Duration) -> Self {
        self.stale_while_revalidate = window;
        self
    }

    /// After it stops being fresh, serve it for up to `window` more when the flight that
    /// should replace it fails.
    pub fn stale_if_error(mut self, window: Duration) -> Self {
        self.stale_if_error = window;
        self
    }

    /// The fresh life; `None` means no expiry.
    pub fn fresh(&self) -> Option<Duration> {
        self.fresh
    }

    /// The stale-while-revalidate window.
    pub fn stale_while_revalidate_window(&self) -> Duration {
        self.stale_while_revalidate
    }

    /// The stale-if-error window.
    pub fn stale_if_error_window(&self) -> Duration {
        self.stale_if_error
    }

    pub(crate) fn usable_for(&self) -> Option<Duration> {
        let fresh = self.fresh?;
        Some(fresh.saturating_add(self.stale_while_revalidate.max(self.stale_if_error)))
    }
}

/// A stored value (or a stored error, with negative caching) and its timeline.
pub(crate) struct Entry<V> {
    pub(crate) value: Result<V, Error>,
    /// End of the fresh life; `None` is never.
    fresh_until: Option<Instant>,
    swr_until: Option<Instant>,
    sie_until: Option<Instant>,
    /// Nanoseconds from the process-wide epoch ([`crate::clock`]) to the last read, for idle
    /// expiry.
    last_access: AtomicU64,
}

/// What a look-up found.
pub(crate) enum Lookup<V> {
    /// Fresh: serve it.
    Fresh(Arc<Entry<V>>),
    /// Past fresh, inside the stale-while-revalidate window: serve it and refresh.
    Stale(Arc<Entry<V>>),
    /// Not usable as it is. `fallback` is an entry still inside its stale-if-error window.
    Miss { fallback: Option<Arc<Entry<V>>> },
}

impl<V> Entry<V> {
    /// True while a failed flight may serve this entry instead of its error.
    pub(crate) fn usable_on_error(&self, now: Instant) -> bool {
        self.value.is_ok() && self.sie_until.is_some_and(|until| now < until)
    }
}

pub(crate) struct StoreConfig<K, V> {
    pub(crate) max_capacity: u64,
    pub(crate) weigher: Option<Weigher<K, V>>,
    /// What a stored error weighs under the weigher.
    pub(crate) error_weight: u32,
    pub(crate) default_life: Lifetime,
    pub(crate) idle: Option<Duration>,
    pub(crate) negative_ttl: Option<Duration>,
}

type Index<K, V> = quick_cache::sync::Cache<
    K,
    Arc<Entry<V>>,
    EntryWeight<K, V>,
    quick_cache::DefaultHashBuilder,
    Evictions,
>;

/// Weighs an entry for the store: the user's weigher for a value, the error weight for an
/// error, 1 per entry without a weigher. Never 0: quick_cache never evicts an entry that
/// weighs nothing.
struct EntryWeight<K, V> {
    weigher: Option<Weigher<K, V>>,
    error_weight: u32,
}

impl<K, V> Clone for EntryWeight<K, V> {
    fn clone(&self) -> Self {
        EntryWeight {
            weigher: self.weigher.clone(),
            error_weight: self.error_weight,
        }
    }
}

impl<K, V> quick_cache::Weighter<K, Arc<Entry<V>>> for EntryWeight<K, V> {
    fn weight(&self, key: &K, entry: &Arc<Entry<V>>) -> u64 {
        let weight = match (&self.weigher, &entry.value) {
            (None, _) => 1,
            (Some(weigher), Ok(value)) => weigher(key, value),
            (Some(_), Err(_)) => self.error_weight,
        };
        u64::from(weight.max(1))
    }
}

/// Counts what the capacity bound evicts (and an entry too heavy to be admitted at all).
#[derive(Clone)]
struct Evictions(CacheMetrics);

impl<K, V> quick_cache::Lifecycle<K, V> for Evictions {
    type RequestState = ();

    fn on_evict(&self, _state: &mut (), _key: K, _value: V) {
        self.0.evicted_size.increment(1);
    }
}

/// How many parts a weighted store is split into. Each part holds an equal share of the
/// weight bound, so an entry heavier than the bound divided by this is not stored.
pub(crate) const WEIGHTED_SHARDS: usize = 4;

pub(crate) struct Store<K, V> {
    index: Index<K, V>,
    /// A capacity of 0: nothing is stored.
    stores_nothing: bool,
    default_life: Lifetime,
    idle: Option<Duration>,
    negative_ttl: Option<Duration>,
    metrics: CacheMetrics,
}

impl<K, V> Store<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    pub(crate) fn new(config: StoreConfig<K, V>, metrics: CacheMetrics) -> Self {
        let parallelism = std::thread::available_parallelism().map_or(1, |n| n.get());
        let weighted = config.weigher.is_some();
        let capacity = config.max_capacity.max(1);
        let mut options = quick_cache::OptionsBuilder::new();
        options.weight_capacity(capacity);
        if weighted {
            // Entry sizes are unknown: assume about a kilobyte each, and enough entries
            // that quick_cache keeps every one of the shards.
            let estimated = (capacity / 1024).clamp(32 * WEIGHTED_SHARDS as u64, 1 << 20);
            options
                .estimated_items_capacity(estimated as usize)
                .shards(WEIGHTED_SHARDS);
        } else {
            options
                .estimated_items_capacity(capacity.min(1 << 24) as usize)
                .shards(parallelism * 4);
        }
        let options = options.build().expect("a positive weight capacity");
        let weight = EntryWeight {
            weigher: config.weigher,
            error_weight: config.error_weight,
        };
        Store {
            index: Index::with_options(
                options,
                weight,
                quick_cache::DefaultHashBuilder::default(),
                Evictions(metrics.clone()),
            ),
            stores_nothing: config.max_capacity == 0,
            default_life: config.default_life,
            idle: config.idle,
            negative_ttl: config.negative_ttl,
            metrics,
        }
    }

    /// Looks `key` up, and removes what it finds unusable. The clock is read only if the
    /// entry has a deadline or idle expiry is on.
    pub(crate) fn lookup(&self, key: &K) -> Lookup<V> {
        let Some(entry) = self.index.get(key) else {
            return Lookup::Miss { fallback: None };
        };
        if entry.fresh_until.is_none() && self.idle.is_none() {
            return Lookup::Fresh(entry);
        }
        let now = Instant::now();
        let idle_expired = self.idle.is_some_and(|idle| {
            let last = entry.last_access.load(Ordering::Relaxed);
            crate::clock::since_epoch(now).saturating_sub(last) >= idle.as_nanos() as u64
        });
        if !idle_expired {
            match entry.fresh_until {
                None => {
                    self.touch(&entry, now);
                    return Lookup::Fresh(entry);
                }
                Some(until) if now < until => {
                    self.touch(&entry, now);
                    return Lookup::Fresh(entry);
                }
                Some(_) if entry.swr_until.is_some_and(|until| now < until) => {
                    self.touch(&entry, now);
                    return Lookup::Stale(entry);
                }
                Some(_) => {}
            }
        }
        if !idle_expired && entry.usable_on_error(now) {
            // Not servable as it is, but kept: a failing flight may still fall back on it.
            return Lookup::Miss {
                fallback: Some(entry),
            };
        }
        self.remove_expired(key, &entry);
        Lookup::Miss { fallback: None }
    }

    fn touch(&self, entry: &Entry<V>, now: Instant) {
        if self.idle.is_some() {
            entry
                .last_access
                .store(crate::clock::since_epoch(now), Ordering::Relaxed);
        }
    }

    /// Removes `entry` if it is still the one stored under `key`.
    fn remove_expired(&self, key: &K, entry: &Arc<Entry<V>>) {
        if self
            .index
            .remove_if(key, |current| Arc::ptr_eq(current, entry))
            .is_some()
        {
            self.metrics.evicted_expired.increment(1);
        }
        self.sample();
    }

    /// The entry a successful flight stores, if its storability says so.
    pub(crate) fn entry_for_value(
        &self,
        value: V,
        storable: Storable,
        now: Instant,
    ) -> Option<Entry<V>> {
        let life = match storable {
            Storable::No => return None,
            Storable::Default => self.default_life,
            Storable::For(life) => life,
        };
        if life.usable_for() == Some(Duration::ZERO) {
            return None;
        }
        Some(self.entry(Ok(value), life, now))
    }

    /// The entry a failed flight stores when negative caching is on.
    pub(crate) fn entry_for_error(&self, error: Error, now: Instant) -> Option<Entry<V>> {
        let ttl = self.negative_ttl.filter(|ttl| !ttl.is_zero())?;
        Some(self.entry(Err(error), Lifetime::fresh_for(ttl), now))
    }

    fn entry(&self, value: Result<V, Error>, life: Lifetime, now: Instant) -> Entry<V> {
        let at = |d: Duration| now.checked_add(d);
        let fresh_until = life.fresh.and_then(at);
        let (swr_until, sie_until) = match life.fresh {
            Some(fresh) => (
                at(fresh.saturating_add(life.stale_while_revalidate)),
                at(fresh.saturating_add(life.stale_if_error)),
            ),
            None => (None, None),
        };
        Entry {
            value,
            fresh_until,
            swr_until,
            sie_until,
            last_access: AtomicU64::new(crate::clock::since_epoch(now)),
        }
    }

    pub(crate) fn insert(&self, key: K, entry: Entry<V>) {
        if self.stores_nothing {
            return;
        }
        self.index.insert(key, Arc::new(entry));
        self.sample();
    }

    pub(crate) fn invalidate(&self, key: &K) {
        if self.index.remove(key).is_some() {
            self.metrics.evicted_invalidated.increment(1);
        }
        self.sample();
    }

    #[cfg(feature = "redis")]
    pub(crate) fn contains_key(&self, key: &K) -> bool {
        self.index.contains_key(key)
    }

    /// Removes every stored value `matches` selects: a scan of the whole store that holds
    /// a part of it locked only to copy one entry out (and `matches` runs unlocked), so
    /// look-ups go on meanwhile.
    pub(crate) fn invalidate_where(&self, matches: impl Fn(&K, &V) -> bool) {
        let mut removed = 0;
        for (key, entry) in self.index.iter() {
            if entry.value.as_ref().is_ok_and(|value| matches(&key, value))
                && self
                    .index
                    .remove_if(&key, |current| Arc::ptr_eq(current, &entry))
                    .is_some()
            {
                removed += 1;
            }
        }
        self.metrics.evicted_invalidated.increment(removed);
        self.sample();
    }

    /// Removes every entry, one at a time: each is dropped outside the store's locks, and
    /// look-ups and inserts go on meanwhile.
    pub(crate) fn invalidate_all(&self) {
        let removed = self.index.drain().count();
        self.metrics.evicted_invalidated.increment(removed as u64);
        self.sample();
    }

    /// The lifetime of entries stored with [`Storable::Default`].
    #[cfg(feature = "redis")]
    pub(crate) fn default_life(&self) -> Lifetime {
        self.default_life
    }

    pub(crate) fn run_pending_tasks(&self) {
        self.sample();
    }

    pub(crate) fn entry_count(&self) -> u64 {
        self.index.len() as u64
    }

    pub(crate) fn weighted_size(&self) -> u64 {
        self.index.weight()
    }

    /// Updates the size gauges.
    fn sample(&self) {
        self.metrics
            .set_size(self.entry_count(), self.weighted_size());
    }
}
