//! A second tier in Redis (or Valkey) behind a cache's in-memory store, shared by every
//! instance of a service (feature `redis`), with cross-instance single flight and an
//! invalidation backplane.
//!
//! - **Second tier.** The in-memory store stays the first tier. A miss there joins or
//!   starts the local flight; the flight reads Redis first and calls the upstream only
//!   when that misses too, then writes both tiers. Entries in Redis expire by themselves
//!   after their fresh and stale windows, and carry the end of their fresh life, so an
//!   instance that reads one keeps it only as long as it is still fresh.
//! - **Cross-instance single flight.** On a Redis miss the flight takes a lease on the key
//!   (`SET NX PX`, 5 s by default). One instance at a time holds it, renews it every
//!   third of its length, and calls the upstream; the others wait for its result, woken
//!   by the backplane and reading Redis every 50 ms as a fallback, for up to the lease
//!   wait (30 s by default), after which they call the upstream themselves. A holder
//!   whose flight is dropped or fails releases the lease (one of the others takes it
//!   over); one that dies stops renewing it, so it blocks nobody past the lease's length.
//!   A holder whose result the tier will not hold (not to be stored, or above
//!   [`max_value_bytes`](RedisTierBuilder::max_value_bytes)) writes a mark in its place
//!   for two minutes: the waiters call their upstreams at once, together, and so do later
//!   misses on any instance, until a value is written over the mark.
//! - **Backplane.** Every write and every invalidation (one key, a tag, everything) is
//!   published on a Redis channel (`{prefix}bus`), and every other instance drops its
//!   first-tier copy when the message arrives. Tags (see
//!   [`CacheBuilder::tags`](crate::cache::CacheBuilder::tags)) name groups of entries that
//!   one call purges on every instance. [`RedisTier::backplane`] tells whether this
//!   instance is subscribed and how many messages it has applied.
//! - **Degraded mode.** Redis never fails a request: every operation has a short timeout
//!   (50 ms by default), a failed or slow one counts as a miss, and after a run of
//!   failures a breaker stops trying for a backoff, during which the instance runs on its
//!   first tier and the upstream. Connections are remade by themselves; when the backplane
//!   comes back after a loss, the instance empties its first tier, since it may have
//!   missed invalidations meanwhile. Invalidations Redis did not take while it was out of
//!   reach are done again (and published) at the first operation that succeeds after
//!   (past 10,000 of them, everything under the prefix is deleted instead).
//!
//! - **Invalidations hold.** Every write of a flight's value is conditional on nothing
//!   having invalidated its key since the flight read Redis (one Lua script checks and
//!   writes): a purge leaves a tombstone `{prefix}g:{name}` for ten minutes, a tag purge
//!   raises the tag epoch `{prefix}tgen` and records it in `{prefix}gt:{tag}`, a purge of
//!   everything (or a restarted Redis) gives the prefix a new epoch `{prefix}gen`. A write
//!   that finds any of them changed is refused, counted as `result="refused"`, and the
//!   flight's value is kept out of its own first tier as well; its waiters still get it.
//!   A flight that read Redis more than five minutes before its write writes nothing.
//!   Invalidation messages ask every instance to acknowledge them once applied, and a
//!   purge returns when all have. See
//!   [the cache's guarantee](crate::cache#invalidation-is-never-undone).
//!
//! Keys in Redis: `{prefix}v:{name}` holds a value (or the mark `towerguard:unstored`),
//! `{prefix}l:{name}` its lease, `{prefix}t:{tag}` the names carrying a tag, and the
//! generation keys above. Give each cache its own prefix. A Redis that evicts keys under
//! memory pressure may evict a tombstone before it expires, and with it the guarantee for
//! that key; it holds in full under `maxmemory-policy noeviction`.
//!
//! Values cross the wire through a [`Codec`]: bytes out, bytes in ([`Raw`], [`Utf8`], and
//! `Json` with the `serde` feature).
//!
//! ```no_run
//! use std::time::Duration;
//! use towerguard::cache::CacheLayer;
//! use towerguard::tier::{RedisTier, Utf8};
//!
//! # fn main() -> Result<(), towerguard::Error> {
//! let tier = RedisTier::builder("redis://127.0.0.1:6379/")
//!     .prefix("users:")
//!     .timeout(Duration::from_millis(50))
//!     .build()?;
//! let layer = CacheLayer::builder(|id: &u64| Some(*id))
//!     .name("users")
//!     .ttl(Duration::from_secs(60))
//!     .second_tier(tier, |id: &u64| id.to_string(), Utf8)
//!     .build();
//! # let _: CacheLayer<u64, u64, String> = layer;
//! # Ok(())
//! # }
//! ```

mod bus;
mod codec;
mod lease;

use self::bus::new_id;
pub use self::bus::Backplane;
pub(crate) use self::bus::{Listener, Message};
#[cfg(feature = "serde")]
pub use self::codec::Json;
pub use self::codec::{Codec, Raw, Utf8};
#[cfg(feature = "http")]
pub(crate) use self::lease::LeaseGuard;
pub(crate) use self::lease::{Lease, Seen};

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{Counter, Gauge, Histogram};
use redis::aio::MultiplexedConnection;
use tokio::time::Instant;

use crate::error::{chain, Error, ErrorKind};

/// A Redis connection used as a second tier; cheap to clone, shared by every cache built
/// with it. Made by [`RedisTier::builder`].
#[derive(Clone)]
pub struct RedisTier {
    shared: Arc<Shared>,
}

struct Shared {
    client: redis::Client,
    config: Config,
    connection: Mutex<Option<MultiplexedConnection>>,
    failures: AtomicU32,
    /// While the breaker is open: nanoseconds from `epoch` until it closes again.
    open_until: AtomicU64,
    /// Nanoseconds from `epoch` to the last failure logged as a warning, plus one (0:
    /// none yet).
    warned_at: AtomicU64,
    epoch: Instant,
    bus: bus::Bus,
    /// Deletions Redis did not take (it was down or slow), done again when the backplane
    /// comes back, so Redis does not serve what was invalidated meanwhile.
    pending: Mutex<Pending>,
    /// Set while `pending` holds something: the next successful operation replays it.
    has_pending: std::sync::atomic::AtomicBool,
    /// A value this tier did not write was found and logged.
    warned_corrupt: std::sync::atomic::AtomicBool,
}

/// Deletions to do again; past [`MAX_PENDING`] of them, everything under the prefix.
#[derive(Default)]
struct Pending {
    names: Vec<String>,
    tags: Vec<String>,
    all: bool,
}

const MAX_PENDING: usize = 10_000;

/// The least time between two warnings of failed operations that did not open the
/// breaker.
const WARN_EVERY: Duration = Duration::from_secs(10);

impl Drop for Shared {
    fn drop(&mut self) {
        self.bus.stop();
    }
}

impl fmt::Debug for RedisTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTier")
            .field("prefix", &self.shared.config.prefix)
            .field("timeout", &self.shared.config.timeout)
            .field("failures_to_open", &self.shared.config.failures_to_open)
            .field("backoff", &self.shared.config.backoff)
            .field("lease", &self.shared.config.lease)
            .field("max_value_bytes", &self.shared.config.max_value_bytes)
            .finish_non_exhaustive()
    }
}

/// The default bound on a value written to Redis: 2 MiB.
pub const DEFAULT_MAX_VALUE_BYTES: usize = 2 << 20;

/// Configures a [`RedisTier`].
#[derive(Debug, Clone)]
#[must_use]
pub struct RedisTierBuilder {
    url: String,
    config: Config,
}

/// What a builder sets and a tier keeps.
#[derive(Debug, Clone)]
struct Config {
    prefix: String,
    timeout: Duration,
    failures_to_open: u32,
    backoff: Duration,
    lease: Duration,
    lease_wait: Duration,
    lease_poll: Duration,
    max_value_bytes: usize,
}

/// One Redis request: a command, or several sent together.
pub(crate) enum Request {
    Cmd(redis::Cmd),
    Pipe(redis::Pipeline),
}

impl RedisTier {
    /// Starts a builder for the Redis at `url` (`redis://host:port/db`): keys prefixed
    /// `towerguard:`, a 50 ms timeout per operation, a breaker that opens for 1 s after 3
    /// failures in a row, and 5 s leases (renewed while their flight runs) that others
    /// wait on for up to 30 s.
    pub fn builder(url: impl Into<String>) -> RedisTierBuilder {
        RedisTierBuilder {
            url: url.into(),
            config: Config {
                prefix: "towerguard:".to_owned(),
                timeout: Duration::from_millis(50),
                failures_to_open: 3,
                backoff: Duration::from_secs(1),
                lease: Duration::from_secs(5),
                lease_wait: Duration::from_secs(30),
                lease_poll: Duration::from_millis(50),
                max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            },
        }
    }

    /// Connects to Redis and sends `PING`, all within `within`: a check to run at start.
    /// The tier never fails a request for Redis's sake (it runs on the first tier and
    /// logs when its breaker opens), so a wrong address or password would otherwise show
    /// only as a cache that is not shared. The error keeps Redis's own as its source (a
    /// refused connection, a refused password, ...).
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use towerguard::tier::RedisTier;
    ///
    /// # async fn f() -> Result<(), towerguard::Error> {
    /// let tier = RedisTier::builder("redis://:secret@127.0.0.1:6379/").build()?;
    /// if let Err(err) = tier.check(Duration::from_secs(2)).await {
    ///     eprintln!("Redis is not usable now; the cache runs unshared until it is: {:?}",
    ///         std::error::Error::source(&err));
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn check(&self, within: Duration) -> Result<(), Error> {
        let client = &self.shared.client;
        let ping = async {
            let mut connection = client.get_multiplexed_async_connection().await?;
            redis::cmd("PING")
                .query_async::<String>(&mut connection)
                .await
        };
        match tokio::time::timeout(within, ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(Error::with_source(ErrorKind::Inner, error)),
            Err(_) => Err(Error::new(ErrorKind::TimedOut)),
        }
    }

    /// True while the breaker keeps the instance off Redis.
    pub fn is_open(&self) -> bool {
        self.shared.breaker_open(Instant::now())
    }

    /// The backplane's state, as a receiver that wakes when it changes: whether this
    /// instance is subscribed, and how many messages it has applied. Starts the
    /// subscriber if no cache has yet (it needs a Tokio runtime).
    ///
    /// ```no_run
    /// # async fn f(tier: towerguard::tier::RedisTier) {
    /// // Wait until invalidations from other instances reach this one.
    /// let mut state = tier.backplane();
    /// let _ = state.wait_for(|b| b.subscribed).await;
    /// # }
    /// ```
    pub fn backplane(&self) -> tokio::sync::watch::Receiver<Backplane> {
        self.start_bus();
        self.shared.bus.state()
    }

    /// Starts the backplane's subscriber, once, when a runtime is there to run it, and
    /// connects for commands meanwhile, so the first request does not pay for connecting
    /// (which could take it past the timeout under a burst).
    pub(crate) fn start_bus(&self) {
        let shared = Arc::downgrade(&self.shared);
        if self.shared.bus.start(shared.clone(), self.channel()) {
            tokio::spawn(async move {
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                let bound = shared.config.timeout.max(Duration::from_secs(1));
                if let Ok(Err(error)) = tokio::time::timeout(bound, shared.connection()).await {
                    tracing::debug!(%error, "second tier: cannot connect yet");
                }
            });
        }
    }

    /// Puts `listener` (a cache) on the backplane and starts it; returns the cache's id.
    pub(crate) fn join<L: Listener + 'static>(&self, listener: &Arc<L>) -> u64 {
        let listener: std::sync::Weak<dyn Listener> =
            Arc::downgrade(&(listener.clone() as Arc<dyn Listener>));
        let id = self.shared.bus.register(listener);
        self.start_bus();
        id
    }

    pub(crate) fn value_key(&self, name: &str) -> String {
        format!("{}v:{name}", self.shared.config.prefix)
    }

    fn lease_key(&self, name: &str) -> String {
        format!("{}l:{name}", self.shared.config.prefix)
    }

    fn tag_key(&self, tag: &str) -> String {
        format!("{}t:{tag}", self.shared.config.prefix)
    }

    fn tombstone_key(&self, name: &str) -> String {
        format!("{}g:{name}", self.shared.config.prefix)
    }

    fn tag_tombstone_key(&self, tag: &str) -> String {
        format!("{}gt:{tag}", self.shared.config.prefix)
    }

    fn epoch_key(&self) -> String {
        format!("{}gen", self.shared.config.prefix)
    }

    fn tag_epoch_key(&self) -> String {
        format!("{}tgen", self.shared.config.prefix)
    }

    fn channel(&self) -> String {
        format!("{}bus", self.shared.config.prefix)
    }

    /// Reads the value stored under `name`, with the key's [`Generation`] read in the
    /// same step (`None` when Redis did not answer).
    pub(crate) async fn get(
        &self,
        name: &str,
        metrics: &TierMetrics,
    ) -> (Read, Option<Generation>) {
        self.read_generation(name, true, metrics).await
    }

    /// The key's [`Generation`] alone, without its value (`None` when Redis did not
    /// answer): what a write must find unchanged, for a flight that does not read the
    /// value first.
    #[cfg(feature = "http")]
    pub(crate) async fn generation(&self, name: &str, metrics: &TierMetrics) -> Option<Generation> {
        self.read_generation(name, false, metrics).await.1
    }

    async fn read_generation(
        &self,
        name: &str,
        with_value: bool,
        metrics: &TierMetrics,
    ) -> (Read, Option<Generation>) {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(READ_SCRIPT)
            .arg(4)
            .arg(self.value_key(name))
            .arg(self.tombstone_key(name))
            .arg(self.epoch_key())
            .arg(self.tag_epoch_key())
            .arg(format!("{:x}", new_id()))
            .arg(u8::from(with_value));
        type Answer = (Option<Vec<u8>>, Vec<u8>, Vec<u8>, u64);
        let Some((value, tombstone, epoch, tag_epoch)) = self
            .run::<Answer>(Request::Cmd(cmd), metrics, Op::Get)
            .await
        else {
            return (Read::Unavailable, None);
        };
        let generation = Generation {
            tombstone,
            epoch,
            tag_epoch,
            read_at: Instant::now(),
        };
        let read = match value {
            Some(bytes) if bytes == UNSTORED => {
                metrics.unstored.increment(1);
                Read::Unstored
            }
            Some(bytes) => Read::Found(bytes),
            None => Read::Missing,
        };
        (read, Some(generation))
    }

    /// Counts a value under `name` that this tier did not write (or that was truncated or
    /// altered): read as a miss, and logged the first time.
    pub(crate) fn corrupt(&self, name: &str, metrics: &TierMetrics) {
        metrics.corrupt.increment(1);
        if !self.shared.warned_corrupt.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                key = %self.value_key(name),
                "second tier: a value under the prefix is not one this tier wrote, read as \
                 a miss (logged once; counted as result=\"corrupt\")"
            );
        }
    }

    /// Writes `bytes` under `name`, expiring after `ttl` (never when `None`), adds `name`
    /// to each of `tags`, and tells the other instances (`from` is the writer's listener),
    /// all in one step and only if nothing invalidated `name` since `generation` was read
    /// (a purge of it, of one of `tags`, or of everything): otherwise the answer is
    /// [`Write::Refused`] and Redis is left as it is. Bytes above the tier's bound are not
    /// written: `name` is marked unstored instead, nobody is told, and the answer is
    /// [`Write::NotWritten`] (a lease's release then wakes its waiters, who read the mark).
    ///
    /// With `merge`, `bytes` is one record, framed as [`frame_record`] frames it, and the
    /// value is a list of such records after a version byte: the script puts this one
    /// first and keeps the others already stored whose id differs, up to `max` in all, so
    /// one instance's write never drops another's records (an HTTP URI's variants). The
    /// list then lives as long as the longer of its old remaining life and `ttl`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn set(
        &self,
        name: &str,
        bytes: Vec<u8>,
        ttl: Option<Duration>,
        tags: &[String],
        generation: &Generation,
        merge: Option<(&str, usize)>,
        (from, metrics): (u64, &TierMetrics),
    ) -> Write {
        if bytes.len() > self.shared.config.max_value_bytes {
            metrics.too_large.increment(1);
            tracing::debug!(
                bytes = bytes.len(),
                "second tier: value above max_value_bytes, not written"
            );
            let ttl = ttl.map_or(UNSTORED_TTL, |ttl| ttl.min(UNSTORED_TTL));
            self.mark_unstored(name, ttl, metrics).await;
            return Write::NotWritten;
        }
        if generation.read_at.elapsed() >= TOMBSTONE_TTL / 2 {
            // Older than a tombstone is sure to last: a purge since could not be told.
            metrics.refused.increment(1);
            tracing::debug!("second tier: flight older than the purge horizon, not written");
            return Write::Refused;
        }
        let ms = ttl.map_or(0, px);
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(WRITE_SCRIPT)
            .arg(4)
            .arg(self.value_key(name))
            .arg(self.tombstone_key(name))
            .arg(self.epoch_key())
            .arg(self.tag_epoch_key())
            .arg(bytes)
            .arg(ms)
            .arg(&generation.tombstone)
            .arg(&generation.epoch)
            .arg(generation.tag_epoch)
            .arg(name)
            .arg(&self.shared.config.prefix)
            .arg(self.channel())
            .arg(Message::Written(name).encode(from))
            .arg(merge.map_or("", |(id, _)| id))
            .arg(merge.map_or(0, |(_, max)| max.max(1)))
            .arg(&[MERGED][..]);
        for tag in tags {
            cmd.arg(tag);
        }
        match self.run::<i64>(Request::Cmd(cmd), metrics, Op::Set).await {
            Some(1) => {
                metrics.writes.increment(1);
                metrics.sent.increment(1);
                Write::Written
            }
            Some(_) => {
                metrics.refused.increment(1);
                tracing::debug!("second tier: invalidated since the flight began, not written");
                Write::Refused
            }
            None => Write::NotWritten,
        }
    }

    /// Marks `name` as a key whose result the tier does not hold (it may not be stored,
    /// or it is above the bound) for `ttl`, in place of any value: a flight that reads
    /// the mark calls its upstream at once instead of waiting for a lease. Nothing is
    /// published: the other instances keep what their first tiers hold, and the ones
    /// waiting on the key's lease read the mark when its release wakes them.
    pub(crate) async fn mark_unstored(&self, name: &str, ttl: Duration, metrics: &TierMetrics) {
        // Not taken (Redis failing): the waiters take the lease over one at a time, as
        // after any release without a value.
        let _ = self
            .run::<()>(Request::Cmd(self.mark_cmd(name, ttl)), metrics, Op::Set)
            .await;
    }

    /// The command [`mark_unstored`](Self::mark_unstored) sends (a lease's release sends
    /// it in the same round trip when its flight's result is not stored).
    pub(crate) fn mark_cmd(&self, name: &str, ttl: Duration) -> redis::Cmd {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.value_key(name))
            .arg(UNSTORED)
            .arg("PX")
            .arg(px(ttl));
        cmd
    }

    /// Deletes `name` and tells the other instances.
    pub(crate) async fn del(&self, name: &str, (from, metrics): (u64, &TierMetrics)) -> bool {
        // The tombstone first: a flight's write that lands between the two is refused by
        // it, one that landed before is deleted.
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(self.tombstone_key(name))
            .arg(format!("{:x}", new_id()))
            .arg("PX")
            .arg(px(TOMBSTONE_TTL))
            .ignore();
        pipe.cmd("DEL").arg(self.value_key(name)).ignore();
        let done = self
            .publish_acked(pipe, &Message::Invalidated(name), (from, metrics), Op::Del)
            .await;
        if !done {
            self.later(|p| &mut p.names, name);
        }
        done
    }

    /// Remembers a deletion Redis did not take.
    fn later(&self, list: impl FnOnce(&mut Pending) -> &mut Vec<String>, item: &str) {
        let mut pending = lock(&self.shared.pending);
        self.shared.has_pending.store(true, Ordering::Release);
        if pending.all {
            return;
        }
        if pending.names.len() + pending.tags.len() >= MAX_PENDING {
            *pending = Pending {
                all: true,
                ..Pending::default()
            };
            return;
        }
        list(&mut pending).push(item.to_owned());
    }

    /// Does again, in the background, the deletions Redis did not take.
    fn spawn_replay(&self, metrics: &TierMetrics) {
        let (tier, metrics) = (self.clone(), metrics.clone());
        let replay: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
            Box::pin(async move { tier.replay(&metrics).await });
        tokio::spawn(replay);
    }

    /// Does again the deletions Redis did not take; those it still does not take stay.
    async fn replay(&self, metrics: &TierMetrics) {
        let pending = std::mem::take(&mut *lock(&self.shared.pending));
        if pending.all {
            tracing::info!("second tier: deleting everything invalidated while Redis was away");
            self.del_all((0, metrics)).await;
            return;
        }
        for name in &pending.names {
            self.del(name, (0, metrics)).await;
        }
        for tag in &pending.tags {
            self.del_tag(tag, (0, metrics)).await;
        }
    }

    /// Deletes every value tagged `tag` and tells the other instances.
    pub(crate) async fn del_tag(&self, tag: &str, (from, metrics): (u64, &TierMetrics)) -> bool {
        let mut pipe = redis::pipe();
        pipe.cmd("EVAL")
            .arg(PURGE_TAG_SCRIPT)
            .arg(3)
            .arg(self.tag_key(tag))
            .arg(self.tag_epoch_key())
            .arg(self.tag_tombstone_key(tag))
            .arg(self.value_key(""))
            .arg(px(TOMBSTONE_TTL))
            .ignore();
        let done = self
            .publish_acked(pipe, &Message::Tag(tag), (from, metrics), Op::Purge)
            .await;
        if !done {
            self.later(|p| &mut p.tags, tag);
        }
        done
    }

    /// Deletes every value and tag under the prefix (in batches, each bounded by the
    /// timeout) and tells the other instances.
    pub(crate) async fn del_all(&self, (from, metrics): (u64, &TierMetrics)) -> bool {
        let done = self.del_all_once((from, metrics)).await;
        if !done {
            lock(&self.shared.pending).all = true;
            self.shared.has_pending.store(true, Ordering::Release);
        }
        done
    }

    async fn del_all_once(&self, (from, metrics): (u64, &TierMetrics)) -> bool {
        // A new epoch first: every flight that read the old one has its write refused.
        // Then the tag sets before the values, so a value written meanwhile either goes
        // with the values or keeps its tags.
        let mut epoch = redis::cmd("SET");
        epoch.arg(self.epoch_key()).arg(format!("{:x}", new_id()));
        if self
            .run::<()>(Request::Cmd(epoch), metrics, Op::Purge)
            .await
            .is_none()
        {
            return false;
        }
        for kind in ["t:", "v:"] {
            let pattern = format!("{}{kind}*", glob_escape(&self.shared.config.prefix));
            let mut cursor: u64 = 0;
            loop {
                let mut scan = redis::cmd("SCAN");
                scan.arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000);
                let Some((next, keys)) = self
                    .run::<(u64, Vec<String>)>(Request::Cmd(scan), metrics, Op::Purge)
                    .await
                else {
                    return false;
                };
                if !keys.is_empty() {
                    let mut unlink = redis::cmd("UNLINK");
                    unlink.arg(keys);
                    if self
                        .run::<()>(Request::Cmd(unlink), metrics, Op::Purge)
                        .await
                        .is_none()
                    {
                        return false;
                    }
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        self.publish_acked(redis::pipe(), &Message::All, (from, metrics), Op::Publish)
            .await
    }

    /// Sends `pipe` (whose commands' answers are ignored) with `message` published last,
    /// asking every subscribed instance to acknowledge it once applied, and waits for
    /// every acknowledgement (this instance's own subscriber's included), for at most the
    /// larger of the timeout and one second. True when Redis took it; an instance that
    /// does not acknowledge in time is logged, not waited for.
    async fn publish_acked(
        &self,
        mut pipe: redis::Pipeline,
        message: &Message<'_>,
        (from, metrics): (u64, &TierMetrics),
        op: Op,
    ) -> bool {
        self.start_bus();
        let nonce = new_id();
        let bus = &self.shared.bus;
        let acks = bus.expect_acks(nonce);
        pipe.cmd("PUBLISH")
            .arg(self.channel())
            .arg(message.encode_acked(from, Some(nonce)));
        let Some((receivers,)) = self.run::<(usize,)>(Request::Pipe(pipe), metrics, op).await
        else {
            bus.acked(nonce, &acks, 0, Duration::ZERO).await;
            return false;
        };
        metrics.sent.increment(1);
        let bound = self.shared.config.timeout.max(Duration::from_secs(1));
        if !bus.acked(nonce, &acks, receivers, bound).await {
            tracing::warn!(
                receivers,
                "second tier: not every instance acknowledged an invalidation in time"
            );
        }
        true
    }

    /// Runs `request` within the timeout; `None` when Redis is unavailable, slow or
    /// failing.
    pub(crate) async fn run<T: redis::FromRedisValue>(
        &self,
        request: Request,
        metrics: &TierMetrics,
        op: Op,
    ) -> Option<T> {
        let shared = &self.shared;
        let start = Instant::now();
        if shared.breaker_open(start) {
            metrics.skipped.increment(1);
            return None;
        }
        let work = async {
            let mut connection = shared.connection().await?;
            let result = match &request {
                Request::Cmd(cmd) => cmd.query_async::<T>(&mut connection).await,
                Request::Pipe(pipe) => pipe.query_async::<T>(&mut connection).await,
            };
            result.map_err(|e| Error::with_source(ErrorKind::Inner, e))
        };
        let result = match tokio::time::timeout(shared.config.timeout, work).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(Error::new(ErrorKind::TimedOut)),
        };
        metrics.duration(op).record(start.elapsed().as_secs_f64());
        match result {
            Ok(value) => {
                shared.failures.store(0, Ordering::Relaxed);
                metrics.breaker_open.set(0.0);
                if shared.has_pending.swap(false, Ordering::AcqRel) {
                    // Redis answers again: what it missed is deleted now.
                    self.spawn_replay(metrics);
                }
                Some(value)
            }
            Err(error) => {
                metrics.errors.increment(1);
                tracing::debug!(error = %chain(&error), "second tier: operation failed");
                shared.failed(Instant::now(), metrics, &error);
                None
            }
        }
    }
}

/// Reads a value (`KEYS[1]`; only when `ARGV[2]` is 1) with its key's generation: its
/// tombstone (`KEYS[2]`), the prefix's epoch (`KEYS[3]`, set to `ARGV[1]` when Redis has
/// none, as after a restart) and its tag epoch (`KEYS[4]`).
const READ_SCRIPT: &str = r"
local epoch = redis.call('GET', KEYS[3])
if not epoch then
  redis.call('SET', KEYS[3], ARGV[1])
  epoch = ARGV[1]
end
local value = false
if ARGV[2] == '1' then
  value = redis.call('GET', KEYS[1])
end
local tombstone = redis.call('GET', KEYS[2]) or ''
local tags = redis.call('GET', KEYS[4]) or '0'
return {value, tombstone, epoch, tonumber(tags)}
";

/// Writes a value only if its generation is still the one its flight read: the same
/// tombstone (`ARGV[3]`), the same epoch (`ARGV[4]`), and no tag of the value (`ARGV[13]`
/// on) purged at a tag epoch above the one read (`ARGV[5]`). With a record id (`ARGV[10]`)
/// the value (`ARGV[1]`) is one framed record merged into the list stored there: first,
/// then the stored records with other ids, at most `ARGV[11]` in all, after the version
/// byte `ARGV[12]` (anything else stored there is replaced). Then adds the name
/// (`ARGV[6]`) to each tag's set, which lives as long as its longest-lived member, and
/// publishes `ARGV[9]` on `ARGV[8]`. `ARGV[2]` is the value's expiry in ms (0: none).
/// 1 when written, 0 when refused.
const WRITE_SCRIPT: &str = r"
if (redis.call('GET', KEYS[2]) or '') ~= ARGV[3] then return 0 end
if (redis.call('GET', KEYS[3]) or '') ~= ARGV[4] then return 0 end
local seen = tonumber(ARGV[5])
local prefix = ARGV[7]
if tonumber(redis.call('GET', KEYS[4]) or '0') > seen then
  for i = 13, #ARGV do
    local purged = redis.call('GET', prefix .. 'gt:' .. ARGV[i])
    if purged and tonumber(purged) > seen then return 0 end
  end
end
local ms = tonumber(ARGV[2])
local value = ARGV[1]
if ARGV[10] ~= '' then
  local out = {ARGV[12], ARGV[1]}
  local kept = 1
  local max = tonumber(ARGV[11])
  local old = redis.call('GET', KEYS[1])
  if old and string.sub(old, 1, 1) == ARGV[12] then
    local pos = 2
    while pos <= #old and kept < max do
      local idlen, at = struct.unpack('>I4', old, pos)
      local id = string.sub(old, at, at + idlen - 1)
      local len, body = struct.unpack('>I4', old, at + idlen)
      local stop = body + len - 1
      if stop > #old then break end
      if id ~= ARGV[10] then
        out[#out + 1] = string.sub(old, pos, stop)
        kept = kept + 1
      end
      pos = stop + 1
    end
    local left = redis.call('PTTL', KEYS[1])
    if ms > 0 and left > ms then ms = left end
    if left == -1 then ms = 0 end
  end
  value = table.concat(out)
end
if ms > 0 then
  redis.call('SET', KEYS[1], value, 'PX', ms)
else
  redis.call('SET', KEYS[1], value)
end
for i = 13, #ARGV do
  local tag = prefix .. 't:' .. ARGV[i]
  local existed = redis.call('EXISTS', tag)
  redis.call('SADD', tag, ARGV[6])
  if ms == 0 then
    redis.call('PERSIST', tag)
  else
    local ttl = redis.call('PTTL', tag)
    if existed == 0 or (ttl >= 0 and ttl < ms) then
      redis.call('PEXPIRE', tag, ms)
    end
  end
end
redis.call('PUBLISH', ARGV[8], ARGV[9])
return 1
";

/// The version byte of a list of records merged by [`WRITE_SCRIPT`].
#[cfg(feature = "http")]
pub(crate) const MERGED_VERSION: &[u8] = &[MERGED];

/// The byte [`MERGED_VERSION`] holds.
const MERGED: u8 = 2;

/// One record of a merged list: its id and its bytes, each after its length (u32,
/// big-endian), as [`WRITE_SCRIPT`] reads them.
#[cfg(feature = "http")]
pub(crate) fn frame_record(id: &str, record: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + id.len() + record.len());
    out.extend_from_slice(&(id.len() as u32).to_be_bytes());
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(&(record.len() as u32).to_be_bytes());
    out.extend_from_slice(record);
    out
}

/// Purges a tag: a new tag epoch (`KEYS[2]`) kept as the tag's tombstone (`KEYS[3]`, for
/// `ARGV[2]` ms), so the writes of flights that read an older epoch are refused for values
/// with the tag; then every value named in the tag's set (`KEYS[1]`; `ARGV[1]` is the
/// values' key prefix), then the set.
const PURGE_TAG_SCRIPT: &str = r"
local epoch = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[3], epoch, 'PX', ARGV[2])
local names = redis.call('SMEMBERS', KEYS[1])
for _, name in ipairs(names) do
  redis.call('UNLINK', ARGV[1] .. name)
end
redis.call('UNLINK', KEYS[1])
return #names
";

/// `text` with the glob characters of `SCAN MATCH` escaped.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    fn ticks(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn breaker_open(&self, now: Instant) -> bool {
        self.ticks(now) < self.open_until.load(Ordering::Relaxed)
    }

    fn failed(&self, now: Instant, metrics: &TierMetrics, error: &Error) {
        // The connection may be broken: the next operation makes a new one.
        *lock(&self.connection) = None;
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= self.config.failures_to_open && !self.config.backoff.is_zero() {
            let until = self
                .ticks(now)
                .saturating_add(u64::try_from(self.config.backoff.as_nanos()).unwrap_or(u64::MAX));
            self.open_until.store(until, Ordering::Relaxed);
            self.failures.store(0, Ordering::Relaxed);
            metrics.breaker_open.set(1.0);
            self.warned_at.store(self.ticks(now) + 1, Ordering::Relaxed);
            tracing::warn!(
                backoff_ms = self.config.backoff.as_millis() as u64,
                error = %chain(error),
                "second tier: Redis failing, running on the first tier"
            );
        } else if self.may_warn(now) {
            // Failures that never come three in a row (Redis refusing writes when full,
            // a read-only replica) never open the breaker; one line in a while names them.
            tracing::warn!(
                error = %chain(error),
                "second tier: a Redis operation failed (one warning every 10 s at most)"
            );
        }
    }

    /// True at most once every [`WARN_EVERY`]: claims the warning for this call.
    fn may_warn(&self, now: Instant) -> bool {
        let now = self.ticks(now) + 1;
        let every = u64::try_from(WARN_EVERY.as_nanos()).unwrap_or(u64::MAX);
        let last = self.warned_at.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= every)
            && self
                .warned_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    async fn connection(&self) -> Result<MultiplexedConnection, Error> {
        if let Some(connection) = lock(&self.connection).clone() {
            return Ok(connection);
        }
        let connection = self
            .client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| Error::with_source(ErrorKind::Inner, e))?;
        *lock(&self.connection) = Some(connection.clone());
        Ok(connection)
    }
}

impl RedisTierBuilder {
    /// Prefix of every key this tier writes and of its backplane channel (default
    /// `towerguard:`); give each cache its own.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config.prefix = prefix.into();
        self
    }

    /// Bound on each Redis operation, connecting included (default 50 ms). A slower
    /// answer counts as a miss.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.config.timeout = timeout;
        self
    }

    /// After `failures` failed operations in a row, stop using Redis for `backoff`
    /// (default 3 and 1 s). A zero backoff never stops trying.
    pub fn breaker(mut self, failures: u32, backoff: Duration) -> Self {
        self.config.failures_to_open = failures.max(1);
        self.config.backoff = backoff;
        self
    }

    /// The length of a key's lease, held by the one instance calling the upstream for it
    /// (default 5 s). The holder renews it every third of its length while the flight
    /// runs, so a slow upstream keeps it; a holder that dies or loses Redis blocks the
    /// others for at most this long, after which one of them takes the lease over.
    /// `Duration::ZERO` turns cross-instance single flight off.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.config.lease = lease;
        self
    }

    /// How long an instance waits for another's flight (whose lease stands) before it
    /// calls the upstream itself (default 30 s). Set it above the upstream's slowest
    /// answer you want made once across the fleet; a caller's own timeout still ends
    /// its wait sooner.
    ///
    /// ```
    /// use std::time::Duration;
    /// use towerguard::tier::RedisTier;
    ///
    /// # fn main() -> Result<(), towerguard::Error> {
    /// // Reports take up to a minute: one instance makes each, the others wait for it.
    /// let tier = RedisTier::builder("redis://127.0.0.1:6379/")
    ///     .prefix("reports:")
    ///     .lease(Duration::from_secs(5))
    ///     .lease_wait(Duration::from_secs(90))
    ///     .build()?;
    /// # let _ = tier;
    /// # Ok(())
    /// # }
    /// ```
    pub fn lease_wait(mut self, wait: Duration) -> Self {
        self.config.lease_wait = wait;
        self
    }

    /// How often an instance waiting for another's lease reads Redis when no backplane
    /// message has woken it (default 50 ms).
    pub fn lease_poll(mut self, every: Duration) -> Self {
        self.config.lease_poll = every.max(Duration::from_millis(1));
        self
    }

    /// The largest value written to Redis, in bytes as they go on the wire (the codec's
    /// output plus a 36-byte header; default [`DEFAULT_MAX_VALUE_BYTES`], 2 MiB). A larger
    /// value is kept in the first tier only (if it fits there), and its key is marked in
    /// Redis for two minutes as one the tier does not hold, so the other instances call
    /// their upstream for it at once instead of waiting for this one's lease. Every write
    /// must finish within [`timeout`](Self::timeout): at 1 Gbit/s, 2 MiB takes about 17 ms
    /// on the wire; raise both together.
    ///
    /// ```
    /// use std::time::Duration;
    /// use towerguard::tier::RedisTier;
    ///
    /// # fn main() -> Result<(), towerguard::Error> {
    /// // Rendered pages up to 8 MiB, over a 10 Gbit/s link.
    /// let tier = RedisTier::builder("redis://127.0.0.1:6379/")
    ///     .prefix("pages:")
    ///     .max_value_bytes(8 << 20)
    ///     .timeout(Duration::from_millis(100))
    ///     .build()?;
    /// # let _ = tier;
    /// # Ok(())
    /// # }
    /// ```
    pub fn max_value_bytes(mut self, bytes: usize) -> Self {
        self.config.max_value_bytes = bytes;
        self
    }

    /// Checks the URL; no connection is made until the first operation.
    pub fn build(self) -> Result<RedisTier, Error> {
        let client = redis::Client::open(self.url.as_str())
            .map_err(|e| Error::with_source(ErrorKind::Inner, e))?;
        Ok(RedisTier {
            shared: Arc::new(Shared {
                client,
                config: self.config,
                connection: Mutex::new(None),
                failures: AtomicU32::new(0),
                open_until: AtomicU64::new(0),
                warned_at: AtomicU64::new(0),
                epoch: Instant::now(),
                bus: bus::Bus::new(),
                pending: Mutex::new(Pending::default()),
                has_pending: std::sync::atomic::AtomicBool::new(false),
                warned_corrupt: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }
}

/// What a flight read of its key's invalidations, with its value: a write is refused
/// when any of them changed since (see [`RedisTier::set`]).
#[derive(Clone, Debug)]
pub(crate) struct Generation {
    /// The key's tombstone (empty: none), left by its last purge.
    tombstone: Vec<u8>,
    /// The prefix's epoch, new after a purge of everything or a Redis restart.
    epoch: Vec<u8>,
    /// The prefix's tag epoch, raised by every tag purge.
    tag_epoch: u64,
    /// When it was read.
    read_at: Instant,
}

/// What a write did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Write {
    /// The value is in Redis, and the other instances are told.
    Written,
    /// The key was invalidated since its flight read it: the value is not written, and
    /// must not be stored anywhere.
    Refused,
    /// Not written: above the bound, or Redis did not answer.
    NotWritten,
}

/// How long a purge's tombstone stays in Redis. A flight whose read is older than half of
/// it writes nothing to Redis, so no flight outlives a tombstone it should have seen.
pub(crate) const TOMBSTONE_TTL: Duration = Duration::from_secs(600);

/// The longest expiry written to Redis (100 years, in ms): a longer one is clamped, since
/// Redis refuses an expiry past what its clock can add.
const MAX_PX: u64 = 100 * 365 * 24 * 3600 * 1000;

/// `ttl` as a `PX` argument: whole milliseconds, at least 1, at most [`MAX_PX`].
pub(crate) fn px(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_PX)
}

/// What a read found.
pub(crate) enum Read {
    Found(Vec<u8>),
    Missing,
    /// The key's last result is not held by the tier (see [`RedisTier::mark_unstored`]).
    Unstored,
    Unavailable,
}

/// What a key holds in place of a value whose result the tier does not hold. Shorter
/// than any value's envelope, so an instance that does not know it reads it as
/// unreadable, a miss.
const UNSTORED: &[u8] = b"towerguard:unstored";

/// How long a key stays marked unstored, unless a value is written over the mark.
pub(crate) const UNSTORED_TTL: Duration = Duration::from_secs(120);

#[derive(Clone, Copy)]
pub(crate) enum Op {
    Get,
    Set,
    Del,
    Lease,
    Publish,
    Purge,
}

/// The envelope around a stored value: a magic and format version, when its fresh life
/// ends (wall clock, so every instance reads it alike; 0 for never) and its stale windows,
/// a checksum of all that and the payload, then the codec's bytes. Anything else under a
/// tier key (another program's value, a truncated or altered one) does not unwrap.
pub(crate) struct Envelope {
    pub(crate) fresh_until_ms: u64,
    pub(crate) stale_while_revalidate_ms: u64,
    pub(crate) stale_if_error_ms: u64,
}

/// `tg` and the format version.
const MAGIC: [u8; 4] = *b"tg\x00\x02";
const HEADER: usize = 4 + 3 * 8 + 8;

impl Envelope {
    pub(crate) fn wrap(&self, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + payload.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.fresh_until_ms.to_be_bytes());
        out.extend_from_slice(&self.stale_while_revalidate_ms.to_be_bytes());
        out.extend_from_slice(&self.stale_if_error_ms.to_be_bytes());
        let sum = checksum(&out[4..], payload);
        out.extend_from_slice(&sum.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    pub(crate) fn unwrap(bytes: &[u8]) -> Option<(Envelope, &[u8])> {
        if bytes.len() < HEADER || bytes[..4] != MAGIC {
            return None;
        }
        let field = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_be_bytes(b)
        };
        let payload = &bytes[HEADER..];
        if field(28) != checksum(&bytes[4..28], payload) {
            return None;
        }
        Some((
            Envelope {
                fresh_until_ms: field(4),
                stale_while_revalidate_ms: field(12),
                stale_if_error_ms: field(20),
            },
            payload,
        ))
    }
}

/// A 64-bit checksum of `head` then `payload`, eight bytes a step (a multiply and a
/// rotation each, then a final mix): it tells a value this tier wrote from anything
/// truncated, altered or written by something else, at several GB/s. Not a MAC: it does
/// not stand against someone who can write to Redis on purpose.
fn checksum(head: &[u8], payload: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h: u64 = 0x243f_6a88_85a3_08d3 ^ (payload.len() as u64).wrapping_mul(K);
    for part in [head, payload] {
        let mut chunks = part.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            h = (h ^ u64::from_le_bytes(word))
                .wrapping_mul(K)
                .rotate_left(29);
        }
        let rest = chunks.remainder();
        let mut word = [0u8; 8];
        word[..rest.len()].copy_from_slice(rest);
        h = (h ^ u64::from_le_bytes(word) ^ rest.len() as u64)
            .wrapping_mul(K)
            .rotate_left(29);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The second tier's instruments, registered once per cache.
#[derive(Clone)]
pub(crate) struct TierMetrics {
    pub(crate) hit: Counter,
    pub(crate) miss: Counter,
    pub(crate) errors: Counter,
    pub(crate) skipped: Counter,
    pub(crate) writes: Counter,
    pub(crate) too_large: Counter,
    pub(crate) unstored: Counter,
    pub(crate) refused: Counter,
    pub(crate) corrupt: Counter,
    pub(crate) sent: Counter,
    pub(crate) received: Counter,
    pub(crate) resyncs: Counter,
    pub(crate) lease_acquired: Counter,
    pub(crate) lease_waited: Counter,
    pub(crate) lease_takeover: Counter,
    pub(crate) lease_timeout: Counter,
    pub(crate) lease_renewed: Counter,
    pub(crate) lease_lost: Counter,
    durations: [Histogram; 6],
    pub(crate) breaker_open: Gauge,
}

impl TierMetrics {
    pub(crate) fn register(name: &str) -> Self {
        crate::metrics::describe_tier();
        use crate::metrics::{
            TIER_BACKPLANE, TIER_BREAKER_OPEN, TIER_DURATION, TIER_LEASES, TIER_REQUESTS,
            TIER_RESYNCS,
        };
        let name = name.to_owned();
        let requests = |result: &'static str| metrics::counter!(TIER_REQUESTS, "name" => name.clone(), "result" => result);
        let duration = |op: &'static str| metrics::histogram!(TIER_DURATION, "name" => name.clone(), "op" => op);
        let backplane = |direction: &'static str| metrics::counter!(TIER_BACKPLANE, "name" => name.clone(), "direction" => direction);
        let leases = |result: &'static str| metrics::counter!(TIER_LEASES, "name" => name.clone(), "result" => result);
        TierMetrics {
            hit: requests("hit"),
            miss: requests("miss"),
            errors: requests("error"),
            skipped: requests("skipped"),
            writes: requests("write"),
            too_large: requests("too_large"),
            unstored: requests("unstored"),
            refused: requests("refused"),
            corrupt: requests("corrupt"),
            sent: backplane("sent"),
            received: backplane("received"),
            resyncs: metrics::counter!(TIER_RESYNCS, "name" => name.clone()),
            lease_acquired: leases("acquired"),
            lease_waited: leases("waited"),
            lease_takeover: leases("takeover"),
            lease_timeout: leases("timeout"),
            lease_renewed: leases("renewed"),
            lease_lost: leases("lost"),
            durations: [
                duration("get"),
                duration("set"),
                duration("del"),
                duration("lease"),
                duration("publish"),
                duration("purge"),
            ],
            breaker_open: metrics::gauge!(TIER_BREAKER_OPEN, "name" => name),
        }
    }

    fn duration(&self, op: Op) -> &Histogram {
        &self.durations[op as usize]
    }
}
