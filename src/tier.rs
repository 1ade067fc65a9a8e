//! A second tier in Redis (or Valkey) behind a cache's in-memory store, shared by every
//! instance of a service (feature `redis`).
//!
//! The in-memory store stays the first tier. A miss there joins or starts the local
//! flight; the flight reads the second tier first and calls the upstream only when that
//! misses too, then writes both tiers. Entries in Redis expire by themselves after their
//! fresh and stale windows, and carry the end of their fresh life, so an instance that
//! reads one keeps it only as long as it is still fresh.
//!
//! Redis never fails a request: every operation has a short timeout (50 ms by default), a
//! failed or slow one counts as a miss, and after a run of failures a breaker stops
//! trying for a backoff, during which the instance runs on its first tier and the
//! upstream. The connection is made lazily and remade after a failure, so a Redis that
//! comes back is used again without restarting anything.
//!
//! Values cross the wire through a [`Codec`]: bytes out, bytes in.
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

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{Counter, Gauge, Histogram};
use redis::aio::MultiplexedConnection;
use tokio::time::Instant;

use crate::error::{Error, ErrorKind};

/// Turns values into bytes for the second tier and back.
pub trait Codec<V>: Send + Sync + 'static {
    /// The bytes to store for `value`; `None` keeps it out of the second tier.
    fn encode(&self, value: &V) -> Option<Vec<u8>>;
    /// The value `bytes` stand for; `None` when they cannot be read (counted as a miss).
    fn decode(&self, bytes: &[u8]) -> Option<V>;
}

/// The identity codec for byte values (`Vec<u8>` and `bytes::Bytes`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Raw;

impl Codec<Vec<u8>> for Raw {
    fn encode(&self, value: &Vec<u8>) -> Option<Vec<u8>> {
        Some(value.clone())
    }
    fn decode(&self, bytes: &[u8]) -> Option<Vec<u8>> {
        Some(bytes.to_vec())
    }
}

#[cfg(feature = "http")]
impl Codec<bytes::Bytes> for Raw {
    fn encode(&self, value: &bytes::Bytes) -> Option<Vec<u8>> {
        Some(value.to_vec())
    }
    fn decode(&self, bytes: &[u8]) -> Option<bytes::Bytes> {
        Some(bytes::Bytes::copy_from_slice(bytes))
    }
}

/// UTF-8 text values (`String`); bytes that are not UTF-8 read as a miss.
#[derive(Debug, Clone, Copy, Default)]
pub struct Utf8;

impl Codec<String> for Utf8 {
    fn encode(&self, value: &String) -> Option<Vec<u8>> {
        Some(value.as_bytes().to_vec())
    }
    fn decode(&self, bytes: &[u8]) -> Option<String> {
        String::from_utf8(bytes.to_vec()).ok()
    }
}

/// A Redis connection used as a second tier; cheap to clone, shared by every cache built
/// with it. Made by [`RedisTier::builder`].
#[derive(Clone)]
pub struct RedisTier {
    shared: Arc<Shared>,
}

struct Shared {
    client: redis::Client,
    prefix: String,
    timeout: Duration,
    failures_to_open: u32,
    backoff: Duration,
    connection: Mutex<Option<MultiplexedConnection>>,
    failures: AtomicU32,
    /// While the breaker is open: nanoseconds from `epoch` until it closes again.
    open_until: AtomicU64,
    epoch: Instant,
}

impl fmt::Debug for RedisTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTier")
            .field("prefix", &self.shared.prefix)
            .field("timeout", &self.shared.timeout)
            .field("failures_to_open", &self.shared.failures_to_open)
            .field("backoff", &self.shared.backoff)
            .finish_non_exhaustive()
    }
}

/// Configures a [`RedisTier`].
#[derive(Debug, Clone)]
#[must_use]
pub struct RedisTierBuilder {
    url: String,
    prefix: String,
    timeout: Duration,
    failures_to_open: u32,
    backoff: Duration,
}

impl RedisTier {
    /// Starts a builder for the Redis at `url` (`redis://host:port/db`): keys prefixed
    /// `towerguard:`, a 50 ms timeout per operation, and a breaker that opens for 1 s after
    /// 3 failures in a row.
    pub fn builder(url: impl Into<String>) -> RedisTierBuilder {
        RedisTierBuilder {
            url: url.into(),
            prefix: "towerguard:".to_owned(),
            timeout: Duration::from_millis(50),
            failures_to_open: 3,
            backoff: Duration::from_secs(1),
        }
    }

    /// True while the breaker keeps the instance off Redis.
    pub fn is_open(&self) -> bool {
        self.shared.breaker_open(Instant::now())
    }

    pub(crate) fn key(&self, key: &str) -> String {
        format!("{}{key}", self.shared.prefix)
    }

    /// Reads `key` (already prefixed).
    pub(crate) async fn get(&self, key: &str, metrics: &TierMetrics) -> Read {
        let mut cmd = redis::cmd("GET");
        cmd.arg(key);
        match self.run::<Option<Vec<u8>>>(cmd, metrics, Op::Get).await {
            Some(Some(bytes)) => Read::Found(bytes),
            Some(None) => Read::Missing,
            None => Read::Unavailable,
        }
    }

    /// Writes `key` (already prefixed), expiring after `ttl` (never when `None`).
    pub(crate) async fn set(
        &self,
        key: &str,
        bytes: Vec<u8>,
        ttl: Option<Duration>,
        metrics: &TierMetrics,
    ) {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(bytes);
        if let Some(ttl) = ttl {
            cmd.arg("PX")
                .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1));
        }
        let _ = self.run::<()>(cmd, metrics, Op::Set).await;
    }

    /// Deletes `key` (already prefixed).
    pub(crate) async fn del(&self, key: &str, metrics: &TierMetrics) {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(key);
        let _ = self.run::<()>(cmd, metrics, Op::Del).await;
    }

    /// Runs `cmd` within the timeout; `None` when Redis is unavailable, slow or failing.
    async fn run<T: redis::FromRedisValue>(
        &self,
        cmd: redis::Cmd,
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
            cmd.query_async::<T>(&mut connection)
                .await
                .map_err(|e| Error::with_source(ErrorKind::Inner, e))
        };
        let result = match tokio::time::timeout(shared.timeout, work).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(Error::new(ErrorKind::TimedOut)),
        };
        metrics.duration(op).record(start.elapsed().as_secs_f64());
        match result {
            Ok(value) => {
                shared.failures.store(0, Ordering::Relaxed);
                metrics.breaker_open.set(0.0);
                Some(value)
            }
            Err(error) => {
                metrics.errors.increment(1);
                tracing::debug!(error = %error, "second tier: operation failed");
                shared.failed(Instant::now(), metrics);
                None
            }
        }
    }
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

    fn failed(&self, now: Instant, metrics: &TierMetrics) {
        // The connection may be broken: the next operation makes a new one.
        *lock(&self.connection) = None;
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= self.failures_to_open && !self.backoff.is_zero() {
            let until = self
                .ticks(now)
                .saturating_add(u64::try_from(self.backoff.as_nanos()).unwrap_or(u64::MAX));
            self.open_until.store(until, Ordering::Relaxed);
            self.failures.store(0, Ordering::Relaxed);
            metrics.breaker_open.set(1.0);
            tracing::warn!(
                backoff_ms = self.backoff.as_millis() as u64,
                "second tier: Redis failing, running on the first tier"
            );
        }
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
    /// Prefix of every key this tier writes (default `towerguard:`); give each cache its
    /// own.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Bound on each Redis operation, connecting included (default 50 ms). A slower
    /// answer counts as a miss.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// After `failures` failed operations in a row, stop using Redis for `backoff`
    /// (default 3 and 1 s). A zero backoff never stops trying.
    pub fn breaker(mut self, failures: u32, backoff: Duration) -> Self {
        self.failures_to_open = failures.max(1);
        self.backoff = backoff;
        self
    }

    /// Checks the URL; no connection is made until the first operation.
    pub fn build(self) -> Result<RedisTier, Error> {
        let client = redis::Client::open(self.url.as_str())
            .map_err(|e| Error::with_source(ErrorKind::Inner, e))?;
        Ok(RedisTier {
            shared: Arc::new(Shared {
                client,
                prefix: self.prefix,
                timeout: self.timeout,
                failures_to_open: self.failures_to_open,
                backoff: self.backoff,
                connection: Mutex::new(None),
                failures: AtomicU32::new(0),
                open_until: AtomicU64::new(0),
                epoch: Instant::now(),
            }),
        })
    }
}

/// What a read found.
pub(crate) enum Read {
    Found(Vec<u8>),
    Missing,
    Unavailable,
}

#[derive(Clone, Copy)]
enum Op {
    Get,
    Set,
    Del,
}

/// The envelope around a stored value: when its fresh life ends (wall clock, so every
/// instance reads it alike; 0 for never) and its stale windows, then the codec's bytes.
pub(crate) struct Envelope {
    pub(crate) fresh_until_ms: u64,
    pub(crate) stale_while_revalidate_ms: u64,
    pub(crate) stale_if_error_ms: u64,
}

const HEADER: usize = 24;

impl Envelope {
    pub(crate) fn wrap(&self, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + payload.len());
        out.extend_from_slice(&self.fresh_until_ms.to_be_bytes());
        out.extend_from_slice(&self.stale_while_revalidate_ms.to_be_bytes());
        out.extend_from_slice(&self.stale_if_error_ms.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    pub(crate) fn unwrap(bytes: &[u8]) -> Option<(Envelope, &[u8])> {
        if bytes.len() < HEADER {
            return None;
        }
        let field = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            u64::from_be_bytes(b)
        };
        Some((
            Envelope {
                fresh_until_ms: field(0),
                stale_while_revalidate_ms: field(1),
                stale_if_error_ms: field(2),
            },
            &bytes[HEADER..],
        ))
    }
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
    get: Histogram,
    set: Histogram,
    del: Histogram,
    pub(crate) breaker_open: Gauge,
}

impl TierMetrics {
    pub(crate) fn register(name: &str) -> Self {
        crate::metrics::describe_tier();
        use crate::metrics::{TIER_BREAKER_OPEN, TIER_DURATION, TIER_REQUESTS};
        let name = name.to_owned();
        let requests = |result: &'static str| metrics::counter!(TIER_REQUESTS, "name" => name.clone(), "result" => result);
        let duration = |op: &'static str| metrics::histogram!(TIER_DURATION, "name" => name.clone(), "op" => op);
        TierMetrics {
            hit: requests("hit"),
            miss: requests("miss"),
            errors: requests("error"),
            skipped: requests("skipped"),
            writes: requests("write"),
            get: duration("get"),
            set: duration("set"),
            del: duration("del"),
            breaker_open: metrics::gauge!(TIER_BREAKER_OPEN, "name" => name),
        }
    }

    fn duration(&self, op: Op) -> &Histogram {
        match op {
            Op::Get => &self.get,
            Op::Set => &self.set,
            Op::Del => &self.del,
        }
    }
}
