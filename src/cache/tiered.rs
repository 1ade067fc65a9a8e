//! The cache's second tier: what a flight reads before the upstream and writes after it.

use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;

use super::store::Lifetime;
use crate::tier::{wall_ms, Codec, Envelope, Read, RedisTier, TierMetrics};

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
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl<K, V> SecondTier<K, V>
where
    K: Hash + Eq + Clone,
    V: 'static,
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
        }
    }

    fn redis_key(&self, key: &K) -> String {
        self.tier.key(&(self.key)(key))
    }

    /// The value stored for `key` while it is still fresh; `None` on a miss, a stale or
    /// unreadable entry, or when Redis is unavailable.
    pub(crate) async fn read(&self, key: &K) -> Option<V> {
        // A life left by a flight that was dropped after its read must not outlive it.
        self.lives.remove(key);
        let Read::Found(bytes) = self.tier.get(&self.redis_key(key), &self.metrics).await else {
            self.metrics.miss.increment(1);
            return None;
        };
        let found = Envelope::unwrap(&bytes).and_then(|(envelope, payload)| {
            let now = wall_ms();
            let life = match envelope.fresh_until_ms {
                0 => Lifetime::forever(),
                until if now < until => Lifetime::fresh_for(Duration::from_millis(until - now))
                    .stale_while_revalidate(Duration::from_millis(
                        envelope.stale_while_revalidate_ms,
                    ))
                    .stale_if_error(Duration::from_millis(envelope.stale_if_error_ms)),
                // Stale there too: the upstream refreshes it.
                _ => return None,
            };
            Some((self.codec.decode(payload)?, life))
        });
        let Some((value, life)) = found else {
            self.metrics.miss.increment(1);
            return None;
        };
        self.metrics.hit.increment(1);
        self.lives.insert(key.clone(), life);
        Some(value)
    }

    /// Writes `value` for `key` with `life`; Redis expires it after its fresh and stale
    /// windows.
    pub(crate) async fn write(&self, key: &K, value: &V, life: Lifetime) {
        let Some(payload) = self.codec.encode(value) else {
            return;
        };
        let envelope = Envelope {
            fresh_until_ms: life
                .fresh()
                .map_or(0, |fresh| wall_ms().saturating_add(millis(fresh)).max(1)),
            stale_while_revalidate_ms: millis(life.stale_while_revalidate_window()),
            stale_if_error_ms: millis(life.stale_if_error_window()),
        };
        self.metrics.writes.increment(1);
        self.tier
            .set(
                &self.redis_key(key),
                envelope.wrap(&payload),
                life.usable_for(),
                &self.metrics,
            )
            .await;
    }

    /// Deletes `key` from the second tier.
    pub(crate) async fn remove(&self, key: &K) {
        self.lives.remove(key);
        self.tier.del(&self.redis_key(key), &self.metrics).await;
    }

    /// The remaining life of a value a flight just read from the second tier.
    pub(crate) fn take_life(&self, key: &K) -> Option<Lifetime> {
        self.lives.remove(key).map(|(_, life)| life)
    }
}
