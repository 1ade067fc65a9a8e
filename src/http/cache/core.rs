//! The state one HTTP cache layer shares with its services: the store of variants, the
//! flights under way, the policy and the metrics.

use std::sync::Arc;
use std::time::Duration;

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName};

use super::stored::{Fetched, FlightKey, KeyExtra, Stored, Variants};
use super::tag_index::{carries, TagIndex};
use crate::cache::flight::{FlightMap, Gate, Owner};
use crate::error::{Error, ErrorKind};
use crate::http::cache_policy::{normalised, vary_matches, HttpCachePolicy, Vary};
use crate::metrics::CacheMetrics;

pub(super) struct Core {
    pub(super) key_extra: Option<KeyExtra>,
    pub(super) store: moka::sync::Cache<String, Arc<Variants>>,
    /// The stored URIs by tag; the store's eviction listener takes lists out of it.
    pub(super) tags: Arc<TagIndex>,
    pub(super) flights: FlightMap<FlightKey, Arc<Fetched>>,
    /// Origin requests made outside any flight whose responses may be stored.
    pub(super) solos: Solos,
    pub(super) policy: HttpCachePolicy,
    pub(super) max_body: usize,
    pub(super) max_variants: usize,
    /// Whether `Cache-Tag` and `Surrogate-Key` go on to the client.
    pub(super) keep_tag_headers: bool,
    pub(super) metrics: CacheMetrics,
    /// URIs whose last origin response could not be stored, for a while: their misses go
    /// to the origin each, not one at a time behind a flight whose outcome they could
    /// not share. `None` when the builder turned it off.
    pub(super) uncacheable: Option<moka::sync::Cache<String, ()>>,
    /// The second tier, when one is configured.
    #[cfg(feature = "redis")]
    pub(super) second: Option<Arc<super::tiered::HttpTier>>,
}

impl Owner<FlightKey, Arc<Fetched>> for Core {
    fn flights(&self) -> &FlightMap<FlightKey, Arc<Fetched>> {
        &self.flights
    }

    fn finish(
        &self,
        key: &FlightKey,
        outcome: &Result<Arc<Fetched>, Error>,
        elapsed: Duration,
        detached: bool,
    ) {
        self.metrics.flight_duration.record(elapsed.as_secs_f64());
        match outcome {
            Ok(fetched) => {
                if detached {
                    return;
                }
                if let Some(stored) = &fetched.store {
                    self.insert(&key.primary, stored.clone());
                }
                self.note_uncacheable(&key.primary, fetched);
                if let Some(evicted) = &fetched.evict {
                    self.remove_variant(&key.primary, evicted);
                }
            }
            Err(error) if error.is(ErrorKind::Panicked) => {
                self.metrics.upstream_panicked.increment(1)
            }
            Err(_) => self.metrics.upstream_error.increment(1),
        }
    }
}

impl Core {
    /// The stored variant that may answer a request with `headers`, if any.
    pub(super) fn lookup(
        &self,
        key: &str,
        headers: &HeaderMap,
        extra: &Option<String>,
    ) -> Option<Arc<Stored>> {
        let variants = self.store.get(key)?;
        variants
            .0
            .iter()
            .find(|v| v.extra == *extra && vary_matches(&v.vary, &v.request_headers, headers))
            .cloned()
    }

    /// The flight key of a request for `primary` with `headers`.
    pub(super) fn flight_key(
        &self,
        primary: String,
        headers: &HeaderMap,
        extra: &Option<String>,
    ) -> FlightKey {
        let mut fields: Vec<HeaderName> = Vec::new();
        if let Some(variants) = self.store.get(&primary) {
            for variant in &variants.0 {
                if let Vary::Fields(names) = &variant.vary {
                    fields.extend(names.iter().cloned());
                }
            }
        }
        fields.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
        fields.dedup();
        FlightKey {
            primary,
            extra: extra.clone(),
            credentials: headers.get(AUTHORIZATION).cloned(),
            nominated: fields
                .iter()
                .map(|name| normalised(headers, name))
                .collect(),
        }
    }

    /// Whether the last origin response for `key` could not be stored (and that was
    /// recently enough to remember).
    pub(super) fn is_uncacheable(&self, key: &str) -> bool {
        self.uncacheable
            .as_ref()
            .is_some_and(|marks| marks.contains_key(key))
    }

    /// Remembers that `fetched`, the origin's answer for `key`, could not be stored,
    /// unless it is a server error (a burst of misses then still waits for one origin
    /// request, which spares a failing origin) or a 304 (which answers validators and says
    /// nothing of what a whole response would be).
    pub(super) fn note_uncacheable(&self, key: &str, fetched: &Fetched) {
        if self.cannot_store(fetched) {
            self.remember_uncacheable(key);
        }
    }

    /// Remembers `key` as a URI whose responses cannot be stored (another instance found
    /// so, and marked it in the second tier).
    pub(super) fn remember_uncacheable(&self, key: &str) {
        if let Some(marks) = &self.uncacheable {
            marks.insert(key.to_owned(), ());
        }
    }

    /// Whether `fetched` is a response that could not be stored and says so of its URI:
    /// neither a server error nor a 304 (see [`note_uncacheable`](Self::note_uncacheable)).
    pub(super) fn cannot_store(&self, fetched: &Fetched) -> bool {
        fetched.store.is_none()
            && fetched.not_stored.is_some()
            && !fetched.status.is_server_error()
            && fetched.status != http::StatusCode::NOT_MODIFIED
    }

    /// How long a URI is remembered as one whose responses cannot be stored; `None` when
    /// the builder turned that off.
    #[cfg(feature = "redis")]
    pub(super) fn uncacheable_ttl(&self) -> Option<std::time::Duration> {
        self.uncacheable
            .as_ref()
            .and_then(|marks| marks.policy().time_to_live())
    }

    /// Whether the store holds any variant of `key`.
    #[cfg(feature = "redis")]
    pub(super) fn holds(&self, key: &str) -> bool {
        self.store.contains_key(key)
    }

    /// Forgets that `key` could not be stored.
    fn forget_uncacheable(&self, key: &str) {
        if let Some(marks) = &self.uncacheable {
            marks.invalidate(key);
        }
    }

    /// Stores `stored` as a variant of `key`, replacing the variant it matches.
    pub(super) fn insert(&self, key: &str, stored: Arc<Stored>) {
        self.forget_uncacheable(key);
        let list = self.with_variant(key, stored);
        self.put(key, list);
        self.sample();
    }

    /// Stores `list` as the variants of `key`, indexed by tag first (see [`TagIndex`]).
    fn put(&self, key: &str, list: Vec<Arc<Stored>>) {
        let variants = Arc::new(Variants::new(list));
        self.tags.add(key, &variants);
        self.store.insert(key.to_owned(), variants);
    }

    /// The variants of `key` once `stored` is one of them, most recent first: it replaces
    /// the variant it would match.
    pub(super) fn with_variant(&self, key: &str, stored: Arc<Stored>) -> Vec<Arc<Stored>> {
        let mut list: Vec<Arc<Stored>> =
            self.store.get(key).map(|v| v.0.clone()).unwrap_or_default();
        list.retain(|v| {
            !(v.extra == stored.extra
                && v.vary == stored.vary
                && vary_matches(&v.vary, &v.request_headers, &stored.request_headers))
        });
        list.insert(0, stored);
        list.truncate(self.max_variants.max(1));
        list
    }

    /// Removes the variant `stored` of `key`, if it is still stored.
    pub(super) fn remove_variant(&self, key: &str, stored: &Arc<Stored>) {
        let Some(variants) = self.store.get(key) else {
            return;
        };
        if !variants.0.iter().any(|v| Arc::ptr_eq(v, stored)) {
            return;
        }
        let list: Vec<Arc<Stored>> = variants
            .0
            .iter()
            .filter(|v| !Arc::ptr_eq(v, stored))
            .cloned()
            .collect();
        if list.is_empty() {
            self.store.invalidate(key);
        } else {
            self.put(key, list);
        }
        self.sample();
    }

    /// Removes `key` here and, with a second tier, from Redis and the other instances,
    /// returning once Redis has it done (or its timeout passed).
    pub(super) async fn invalidate(&self, key: &str) {
        // Redis first: a miss here meanwhile would read its old copy.
        #[cfg(feature = "redis")]
        if let Some(tier) = &self.second {
            tier.remove(key).await;
        }
        self.invalidate_here(key);
    }

    /// Removes `key` from this instance: its variants, its flights, and what the origin
    /// requests made outside a flight for it would store.
    pub(super) fn invalidate_here(&self, key: &str) {
        self.flights.detach_where(|flight| flight.primary == key);
        self.solos.close_where(|solo| solo == key);
        self.drop_stored(key);
    }

    /// Removes `key`'s variants (and its uncacheable mark) from this instance's store.
    fn drop_stored(&self, key: &str) {
        self.store.invalidate(key);
        self.forget_uncacheable(key);
        self.sample();
    }

    /// Removes everything from this instance: every variant and every flight.
    pub(super) fn invalidate_all_here(&self) {
        self.flights.detach_all();
        self.solos.close_where(|_| true);
        self.store.invalidate_all();
        if let Some(marks) = &self.uncacheable {
            marks.invalidate_all();
        }
        self.sample();
    }

    /// Removes from this instance every URI with a variant tagged `tag` (`Cache-Tag`,
    /// `Surrogate-Key`): only the URIs the tag index lists, not a scan of the store.
    pub(super) fn invalidate_tag_here(&self, tag: &str) {
        // What a flight under way will bring is not known yet, nor its tags: none of it
        // is stored (its waiters still get it), and later requests start new flights.
        self.flights.detach_all();
        self.solos.close_where(|_| true);
        for key in self.tags.keys(tag) {
            // The index may still list a list replaced a moment ago by one without the tag.
            if self.store.get(&key).is_some_and(|v| carries(&v, tag)) {
                // Its flights and solos were detached above.
                self.drop_stored(&key);
            }
        }
    }

    pub(super) fn sample(&self) {
        self.metrics.sample(&self.store);
    }
}

/// Origin requests made outside any flight (a client's own conditional request with
/// nothing stored) whose responses may be stored: an invalidation of their URI closes
/// their gates, as it detaches flights, so what they fetched before it is not stored
/// after it. Bounded by the requests under way.
#[derive(Default)]
pub(super) struct Solos {
    open: std::sync::Mutex<std::collections::HashMap<u64, (String, Arc<Gate>)>>,
    next: std::sync::atomic::AtomicU64,
}

impl Solos {
    /// Registers a request for `key`; it leaves when the returned guard drops.
    pub(super) fn enter<'a>(&'a self, key: &str) -> Solo<'a> {
        let gate = Arc::new(Gate::default());
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.lock().insert(id, (key.to_owned(), gate.clone()));
        Solo {
            solos: self,
            gate,
            id,
        }
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, (String, Arc<Gate>)>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes the gates of the requests whose URI `matches`.
    fn close_where(&self, matches: impl Fn(&str) -> bool) {
        for (key, gate) in self.lock().values() {
            if matches(key) {
                gate.close();
            }
        }
    }
}

/// One origin request outside a flight, registered in [`Solos`].
pub(super) struct Solo<'a> {
    solos: &'a Solos,
    gate: Arc<Gate>,
    id: u64,
}

impl Solo<'_> {
    /// Runs `store` unless the URI was invalidated since the request was registered,
    /// under the same lock an invalidation closes gates under: either the invalidation
    /// comes after and removes what was stored, or the store sees its gate closed.
    pub(super) fn store_unless_invalidated(&self, store: impl FnOnce()) -> bool {
        let _open = self.solos.lock();
        if self.gate.is_closed() {
            return false;
        }
        store();
        true
    }

    /// The request's gate, closed by an invalidation of its URI.
    #[cfg(feature = "redis")]
    pub(super) fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }
}

impl Drop for Solo<'_> {
    fn drop(&mut self) {
        self.solos.lock().remove(&self.id);
    }
}
