//! The cache's second tier: what a flight reads before the upstream and writes after it,
//! the lease that makes it one flight across instances, and the backplane's messages.

use std::hash::Hash;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dashmap::DashMap;

use super::flight::Gate;
use super::flight::{Core, Upstream};
use super::store::{Lifetime, Storable};
use crate::tier::{
    wall_ms, Codec, Envelope, Generation, Lease, Listener, Message, Read, RedisTier, Seen,
    TierMetrics, Write, UNSTORED_TTL,
};

/// How a key is named in Redis.
pub(crate) type TierKeyFn<K> = Arc<dyn Fn(&K) -> String + Send + Sync>;

/// What a builder keeps until it builds: the tier, how keys are named, the codec.
pub(crate) type TierConfig<K, V> = (RedisTier, TierKeyFn<K>, Arc<dyn Codec<V>>);

/// A second tier as a cache configures it.
pub(crate) struct SecondTier<K, V> {
    pub(crate) tier: RedisTier,
    pub(crate) key: TierKeyFn<K>,
    pub(crate) codec: Arc<dyn Codec<V>>,
    pub(crate) metrics: TierMetrics,
    /// The remaining lives of values flights read from the second tier, taken when the
    /// flight stores them, so the first tier keeps them no longer than they are fresh.
    lives: DashMap<K, Lifetime>,
    /// The keys of first-tier entries by their Redis name, so a backplane message can
    /// find them. Pruned of keys the store no longer holds when it outgrows it.
    names: DashMap<String, K>,
    /// The keys of flights under way through the tier by their Redis name (with how many
    /// flights each), so a backplane message detaches a flight for a key the first tier
    /// does not hold.
    flying: DashMap<String, (K, usize)>,
    /// This cache's id on the backplane.
    id: OnceLock<u64>,
}

/// The remaining life of a value read from Redis, `None` once its fresh life is over.
fn life_of(envelope: &Envelope) -> Option<Lifetime> {
    let now = wall_ms();
    match envelope.fresh_until_ms {
        0 => Some(Lifetime::forever()),
        until if now < until => Some(
            Lifetime::fresh_for(Duration::from_millis(until - now))
                .stale_while_revalidate(Duration::from_millis(envelope.stale_while_revalidate_ms))
                .stale_if_error(Duration::from_millis(envelope.stale_if_error_ms)),
        ),
        _ => None,
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl<K, V> SecondTier<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub(crate) fn new(
        tier: RedisTier,
        key: TierKeyFn<K>,
        codec: Arc<dyn Codec<V>>,
        metrics: TierMetrics,
    ) -> Self {
        SecondTier {
            tier,
            key,
            codec,
            metrics,
            lives: DashMap::new(),
            names: DashMap::new(),
            flying: DashMap::new(),
            id: OnceLock::new(),
        }
    }

    /// Puts `core` on the tier's backplane.
    pub(crate) fn register(&self, core: &Arc<Core<K, V>>) {
        let _ = self.id.set(self.tier.join(core));
    }

    fn sender(&self) -> (u64, &TierMetrics) {
        (self.id.get().copied().unwrap_or(0), &self.metrics)
    }

    pub(crate) fn name(&self, key: &K) -> String {
        (self.key)(key)
    }

    /// The value stored under `name` while it is still fresh; nothing on a miss, a stale
    /// or unreadable entry, or when Redis is unavailable. A miss is counted unless this
    /// is a lease's read (which follows a counted one).
    pub(crate) async fn read(&self, key: &K, name: &str, count_miss: bool) -> Seen<V> {
        self.read_or_unavailable(key, name, count_miss)
            .await
            .map_or(Seen::Nothing, |(seen, _)| seen)
    }

    /// As [`read`](Self::read), with `Err` when Redis did not answer, and what a write
    /// must find unchanged.
    pub(crate) async fn read_or_unavailable(
        &self,
        key: &K,
        name: &str,
        count_miss: bool,
    ) -> Result<(Seen<V>, Generation), ()> {
        self.tier.start_bus();
        // A life left by a flight that was dropped after its read must not outlive it.
        self.lives.remove(key);
        let (read, generation) = self.tier.get(name, &self.metrics).await;
        let Some(generation) = generation else {
            if count_miss {
                self.metrics.miss.increment(1);
            }
            return Err(());
        };
        let bytes = match read {
            Read::Found(bytes) => bytes,
            Read::Unstored => return Ok((Seen::Unstored, generation)),
            Read::Missing | Read::Unavailable => {
                if count_miss {
                    self.metrics.miss.increment(1);
                }
                return Ok((Seen::Nothing, generation));
            }
        };
        let found = match Envelope::unwrap(&bytes) {
            // Another program's bytes, or a truncated or altered envelope.
            None => {
                self.tier.corrupt(name, &self.metrics);
                None
            }
            Some((envelope, payload)) => match life_of(&envelope) {
                // Stale there too: the upstream refreshes it.
                None => None,
                Some(life) => match self.codec.decode(payload) {
                    Some(value) => Some((value, life)),
                    None => {
                        self.tier.corrupt(name, &self.metrics);
                        None
                    }
                },
            },
        };
        let Some((value, life)) = found else {
            if count_miss {
                self.metrics.miss.increment(1);
            }
            return Ok((Seen::Nothing, generation));
        };
        self.metrics.hit.increment(1);
        self.lives.insert(key.clone(), life);
        Ok((Seen::Value(value), generation))
    }

    /// Marks `name` as a key whose result the tier does not hold.
    pub(crate) async fn mark_unstored(&self, name: &str) {
        self.tier
            .mark_unstored(name, UNSTORED_TTL, &self.metrics)
            .await;
    }

    /// Takes `name`'s lease or waits for the instance that holds it.
    pub(crate) async fn lease(self: &Arc<Self>, key: &K, name: &str) -> Lease<V> {
        let reader = |tier: Arc<Self>, key: K, name: String| async move {
            tier.read(&key, &name, false).await
        };
        self.tier
            .lease(name, self.sender(), || {
                reader(self.clone(), key.clone(), name.to_owned())
            })
            .await
    }

    /// Writes `value` under `name` with `life` and `tags`, unless `name` was invalidated
    /// since `generation` was read; Redis expires it after its fresh and stale windows.
    /// The other instances drop their copies.
    pub(crate) async fn write(
        &self,
        name: &str,
        value: &V,
        (life, tags): (Lifetime, &[String]),
        generation: &Generation,
    ) -> Write {
        let Some(payload) = self.codec.encode(value) else {
            return Write::NotWritten;
        };
        let envelope = Envelope {
            fresh_until_ms: life
                .fresh()
                .map_or(0, |fresh| wall_ms().saturating_add(millis(fresh)).max(1)),
            stale_while_revalidate_ms: millis(life.stale_while_revalidate_window()),
            stale_if_error_ms: millis(life.stale_if_error_window()),
        };
        self.tier
            .set(
                name,
                envelope.wrap(&payload),
                life.usable_for(),
                tags,
                generation,
                None,
                self.sender(),
            )
            .await
    }

    /// Counts a flight for `key` under way through the tier, until the guard drops.
    fn flying(self: &Arc<Self>, key: &K, name: &str) -> Flying<K, V> {
        self.flying
            .entry(name.to_owned())
            .or_insert_with(|| (key.clone(), 0))
            .1 += 1;
        Flying {
            tier: self.clone(),
            name: name.to_owned(),
        }
    }

    /// The key of a flight under way named `name`, if any.
    fn flying_key(&self, name: &str) -> Option<K> {
        self.flying.get(name).map(|entry| entry.0.clone())
    }

    /// Deletes `key` from the second tier and tells the other instances.
    pub(crate) async fn remove(&self, key: &K) {
        self.lives.remove(key);
        // The key stays in `names` until the first tier drops it: a message from another
        // instance's purge of it, arriving meanwhile, must still find it here.
        self.tier.del(&self.name(key), self.sender()).await;
    }

    /// Deletes every value tagged `tag` and tells the other instances.
    pub(crate) async fn remove_tag(&self, tag: &str) {
        self.tier.del_tag(tag, self.sender()).await;
    }

    /// Deletes every value under the tier's prefix and tells the other instances.
    pub(crate) async fn remove_all(&self) {
        // `names` is kept, as in `remove`: the caller empties the first tier after.
        self.tier.del_all(self.sender()).await;
    }

    /// The remaining life of a value a flight just read from the second tier.
    pub(crate) fn take_life(&self, key: &K) -> Option<Lifetime> {
        self.lives.remove(key).map(|(_, life)| life)
    }

    /// Remembers that the first tier holds `key`; prunes what it no longer holds once the
    /// index outgrows the store.
    pub(crate) fn stored(&self, key: &K, holds: impl Fn(&K) -> bool, entries: u64) {
        self.names.insert(self.name(key), key.clone());
        let limit = usize::try_from(entries.saturating_mul(2)).unwrap_or(usize::MAX);
        if self.names.len() > limit.saturating_add(1024) {
            self.names.retain(|_, key| holds(key));
        }
    }

    /// The first-tier key a backplane message names, forgotten.
    pub(crate) fn forget(&self, name: &str) -> Option<K> {
        self.names.remove(name).map(|(_, key)| key)
    }

    pub(crate) fn forget_all(&self) {
        self.names.clear();
    }
}

/// One flight under way through the tier, counted in [`SecondTier::flying`].
/// Kept until the flight's outcome is stored (see [`Gate::hold`]), so a message that
/// arrives between the upstream's end and the store still finds the flight.
struct Flying<K: Hash + Eq, V> {
    tier: Arc<SecondTier<K, V>>,
    name: String,
}

impl<K: Hash + Eq, V> Drop for Flying<K, V> {
    fn drop(&mut self) {
        if let dashmap::mapref::entry::Entry::Occupied(mut entry) =
            self.tier.flying.entry(std::mem::take(&mut self.name))
        {
            entry.get_mut().1 -= 1;
            if entry.get().1 == 0 {
                entry.remove();
            }
        }
    }
}

impl<K, V> Core<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// The upstream of a flight for `key`: through the second tier when there is one. It
    /// reads Redis first; on a miss it takes the key's lease (or waits for the instance
    /// holding it), calls `upstream`, and writes what may be stored to Redis.
    pub(crate) fn through_tiers(
        self: &Arc<Self>,
        key: K,
        gate: Arc<Gate>,
        upstream: Upstream<V>,
    ) -> Upstream<V> {
        let Some(tier) = self.second.clone() else {
            return upstream;
        };
        let core = self.clone();
        Box::pin(async move {
            let name = tier.name(&key);
            // Registered before Redis is read, and kept until the outcome is stored: an
            // invalidation message from here on detaches this flight, whether or not the
            // first tier holds the key.
            let flying = tier.flying(&key, &name);
            let outcome = core.through_tier(&tier, key, &name, &gate, upstream).await;
            gate.hold(Box::new(flying));
            outcome
        })
    }

    async fn through_tier(
        &self,
        tier: &Arc<SecondTier<K, V>>,
        key: K,
        name: &str,
        gate: &Gate,
        upstream: Upstream<V>,
    ) -> Result<V, crate::error::Error> {
        let (generation, lease) = match tier.read_or_unavailable(&key, name, true).await {
            Ok((Seen::Value(value), _)) => return Ok(value),
            Ok((Seen::Nothing, generation)) => (Some(generation), true),
            // Marked: another instance's result for it was not stored, so nobody's
            // lease would bring one; go straight to the upstream.
            Ok((Seen::Unstored, generation)) => (Some(generation), false),
            // Redis did not answer: the flight goes on without it, so a request waits
            // out at most one timeout.
            Err(()) => (None, false),
        };
        let guard = match lease {
            true => match tier.lease(&key, name).await {
                Lease::Found(value) => return Ok(value),
                Lease::Held(guard) => Some(guard),
                Lease::Alone | Lease::Unstored => None,
            },
            false => None,
        };
        // On an error the guard is dropped: the lease is released for the others, and
        // one of them calls its upstream next (one at a time, sparing a failing one).
        let value = upstream.await?;
        let life = match (self.storable)(&value) {
            Storable::No => None,
            Storable::Default => Some(self.store.default_life()),
            Storable::For(life) => Some(life),
        };
        match (generation, life, guard) {
            // Invalidated here since the flight began: nothing to write.
            (Some(_), Some(_), guard) if gate.is_closed() => {
                if let Some(guard) = guard {
                    guard.release(false).await;
                }
            }
            (Some(generation), Some(life), guard) => {
                let tags = self
                    .tags
                    .as_ref()
                    .map(|f| f(&key, &value))
                    .unwrap_or_default();
                let written = tier.write(name, &value, (life, &tags), &generation).await;
                if written == Write::Refused {
                    // Invalidated on some instance since the flight read Redis: kept
                    // out of this instance's store too.
                    gate.close();
                }
                if let Some(guard) = guard {
                    guard.release(written == Write::Written).await;
                }
            }
            // Not to be stored: mark it, so the instances waiting on the lease (woken
            // by its release, sent in the same round trip) and the next misses
            // anywhere call their upstreams at once instead of one after another.
            (Some(_), None, Some(guard)) => guard.release_marked(UNSTORED_TTL).await,
            (Some(_), None, None) => tier.mark_unstored(name).await,
            (None, _, Some(guard)) => guard.release(false).await,
            (None, _, None) => {}
        }
        Ok(value)
    }
}

impl<K, V> Listener for Core<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn apply(&self, message: &Message<'_>) {
        let Some(tier) = &self.second else {
            return;
        };
        tier.metrics.received.increment(1);
        match message {
            Message::Written(name) => {
                // Another instance has a newer value: the next read takes it from Redis.
                if let Some(key) = tier.forget(name) {
                    self.store.invalidate(&key);
                }
            }
            Message::Invalidated(name) => {
                // A flight under way for the key is detached even when the first tier
                // does not hold it: its result was fetched before the invalidation.
                if let Some(key) = tier.flying_key(name) {
                    self.flights.detach(&key);
                }
                if let Some(key) = tier.forget(name) {
                    self.flights.detach(&key);
                    self.store.invalidate(&key);
                }
            }
            Message::Tag(tag) => self.invalidate_tag_here(tag),
            Message::All => {
                tier.forget_all();
                self.flights.detach_all();
                self.store.invalidate_all();
            }
            Message::Released(_) | Message::Ack(_) => {}
        }
    }

    fn resync(&self) {
        if let Some(tier) = &self.second {
            tier.metrics.resyncs.increment(1);
            tier.forget_all();
        }
        // Flights under way may have missed an invalidation too.
        self.flights.detach_all();
        self.store.invalidate_all();
    }
}
