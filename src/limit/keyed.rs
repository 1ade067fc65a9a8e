//! A concurrency limit per key (per tenant, per client, per route), over a bounded key set.

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::future::ResponseFuture;
use super::layer::DEFAULT_RETRY_AFTER;
use super::limiter::{Acquired, Limiter, Rejection};
use super::release::OnResponse;
use super::service::admit;
use crate::error::{BoxError, Error};
use crate::metrics::LimitMetrics;

/// Maps a request to its partition key.
type KeyFn<Req, K> = Arc<dyn Fn(&Req) -> K + Send + Sync>;

/// The partitions of one keyed limit, shared by every clone.
struct Partitions<K> {
    map: DashMap<K, Arc<Limiter>>,
    len: AtomicUsize,
    max_keys: usize,
    /// Shared by every key that arrives while `max_keys` partitions exist.
    overflow: Arc<Limiter>,
    /// Requests each key has admitted or queued in the overflow partition. A key with work
    /// there stays there: a fresh partition beside it would let it reach twice its limit.
    /// Bounded by the overflow partition's limit plus its queue.
    in_overflow: DashMap<K, usize>,
    per_key: usize,
    max_queue: usize,
    max_wait: Option<Duration>,
    metrics: LimitMetrics,
    this: Weak<Partitions<K>>,
}

impl<K> Partitions<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    /// Takes a permit (or a queue place) in `key`'s partition, creating it if needed, or
    /// in the overflow partition. Runs under the key's map lock, so an idle partition
    /// cannot be removed in between (lock order: the partition map, then `in_overflow`).
    /// A request in the overflow partition comes back with the guard that counts it.
    fn acquire(&self, key: K) -> (Result<Acquired, Rejection>, Option<Companion>) {
        match self.map.entry(key) {
            Entry::Occupied(occupied) => (occupied.get().acquire(), None),
            Entry::Vacant(vacant) => {
                let full = self.len.load(Ordering::Relaxed) >= self.max_keys;
                if full || self.in_overflow.contains_key(vacant.key()) {
                    let acquired = self.overflow.acquire();
                    let guard = acquired.is_ok().then(|| self.enter_overflow(vacant.key()));
                    return (acquired, guard);
                }
                let limiter = Arc::new(self.partition(vacant.key().clone()));
                let acquired = limiter.acquire();
                vacant.insert(limiter);
                self.len.fetch_add(1, Ordering::Relaxed);
                (acquired, None)
            }
        }
    }

    /// Counts one more request of `key` in the overflow partition, until the guard drops.
    fn enter_overflow(&self, key: &K) -> Companion {
        *self.in_overflow.entry(key.clone()).or_insert(0) += 1;
        Box::new(OverflowGuard {
            partitions: self.this.clone(),
            key: Some(key.clone()),
        })
    }

    fn partition(&self, key: K) -> Limiter {
        let partitions = self.this.clone();
        Limiter::new(
            self.per_key,
            self.max_queue,
            self.max_wait,
            None,
            self.metrics.clone(),
        )
        .with_on_release(Box::new(move |limiter| {
            if let Some(partitions) = partitions.upgrade() {
                partitions.remove_if_idle(&key, limiter);
            }
        }))
    }

    fn remove_if_idle(&self, key: &K, limiter: &Limiter) {
        let removed = self.map.remove_if(key, |_, current| {
            std::ptr::eq(Arc::as_ptr(current), limiter) && current.is_idle()
        });
        if removed.is_some() {
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// One request's place in the overflow partition, counted against its key.
struct OverflowGuard<K>
where
    K: Hash + Eq,
{
    partitions: Weak<Partitions<K>>,
    key: Option<K>,
}

impl<K: Hash + Eq> Drop for OverflowGuard<K> {
    fn drop(&mut self) {
        let (Some(partitions), Some(key)) = (self.partitions.upgrade(), self.key.take()) else {
            return;
        };
        partitions.in_overflow.remove_if_mut(&key, |_, count| {
            *count -= 1;
            *count == 0
        });
    }
}

/// A [`Layer`] that gives each key its own concurrency limit.
///
/// Each key (a tenant, a client address, ...) gets a static limit of its own; at most
/// `max_keys` partitions exist at once, and requests for further keys share one overflow
/// partition with the same limit. A partition with nothing in flight and nobody queued is
/// dropped, so the key set follows the traffic.
///
/// ```
/// use std::time::Duration;
/// use towerguard::limit::KeyedConcurrencyLimitLayer;
///
/// // Four requests at once per tenant, for up to 10,000 tenants at a time.
/// let per_tenant = KeyedConcurrencyLimitLayer::builder(|req: &(u32, String)| req.0)
///     .per_key(4)
///     .max_keys(10_000)
///     .queue(8, Duration::from_millis(100))
///     .build();
/// # let _ = per_tenant;
/// ```
#[must_use]
pub struct KeyedConcurrencyLimitLayer<Req, K> {
    partitions: Arc<Partitions<K>>,
    key_fn: KeyFn<Req, K>,
    retry_after: Duration,
}

impl<Req, K> Clone for KeyedConcurrencyLimitLayer<Req, K> {
    fn clone(&self) -> Self {
        KeyedConcurrencyLimitLayer {
            partitions: self.partitions.clone(),
            key_fn: self.key_fn.clone(),
            retry_after: self.retry_after,
        }
    }
}

impl<Req, K> fmt::Debug for KeyedConcurrencyLimitLayer<Req, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedConcurrencyLimitLayer")
            .field("per_key", &self.partitions.per_key)
            .field("max_keys", &self.partitions.max_keys)
            .field("partitions", &self.partitions.len.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<Req, K> KeyedConcurrencyLimitLayer<Req, K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    /// At most `per_key` requests at once for each key that `key` gives, over at most
    /// `max_keys` partitions; rejects at once beyond the limit.
    pub fn new<F>(key: F, per_key: usize, max_keys: usize) -> Self
    where
        F: Fn(&Req) -> K + Send + Sync + 'static,
    {
        Self::builder(key)
            .per_key(per_key)
            .max_keys(max_keys)
            .build()
    }

    /// Starts a builder: 10 per key, 10,000 keys, no queue, unless set otherwise.
    pub fn builder<F>(key: F) -> KeyedConcurrencyLimitBuilder<Req, K>
    where
        F: Fn(&Req) -> K + Send + Sync + 'static,
    {
        KeyedConcurrencyLimitBuilder {
            key_fn: Arc::new(key),
            name: "default".to_owned(),
            per_key: 10,
            max_keys: 10_000,
            max_queue: 0,
            max_wait: None,
            retry_after: DEFAULT_RETRY_AFTER,
        }
    }

    /// Partitions that exist now (keys with requests in flight or queued).
    pub fn partitions(&self) -> usize {
        self.partitions.len.load(Ordering::Relaxed)
    }
}

/// Configures a [`KeyedConcurrencyLimitLayer`].
#[must_use]
pub struct KeyedConcurrencyLimitBuilder<Req, K> {
    key_fn: KeyFn<Req, K>,
    name: String,
    per_key: usize,
    max_keys: usize,
    max_queue: usize,
    max_wait: Option<Duration>,
    retry_after: Duration,
}

impl<Req, K> fmt::Debug for KeyedConcurrencyLimitBuilder<Req, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedConcurrencyLimitBuilder")
            .field("name", &self.name)
            .field("per_key", &self.per_key)
            .field("max_keys", &self.max_keys)
            .field("max_queue", &self.max_queue)
            .field("max_wait", &self.max_wait)
            .finish_non_exhaustive()
    }
}

impl<Req, K> KeyedConcurrencyLimitBuilder<Req, K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    /// The instance name, the `name` label of every metric (default `"default"`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The limit of each key (at least 1).
    pub fn per_key(mut self, max: usize) -> Self {
        self.per_key = max.max(1);
        self
    }

    /// How many keys get a partition of their own at once; further keys share one
    /// overflow partition.
    pub fn max_keys(mut self, max: usize) -> Self {
        self.max_keys = max;
        self
    }

    /// Each partition queues up to `max_len` requests for at most `max_wait`.
    pub fn queue(mut self, max_len: usize, max_wait: Duration) -> Self {
        self.max_queue = max_len;
        self.max_wait = Some(max_wait);
        self
    }

    /// The wait a rejection suggests (HTTP: `Retry-After`), default one second.
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = after;
        self
    }

    /// Builds the layer and its shared partitions.
    pub fn build(self) -> KeyedConcurrencyLimitLayer<Req, K> {
        let metrics = LimitMetrics::register(&self.name);
        let (per_key, max_queue, max_wait) = (self.per_key, self.max_queue, self.max_wait);
        let overflow = Limiter::new(per_key, max_queue, max_wait, None, metrics.clone());
        let partitions = Arc::new_cyclic(|this| Partitions {
            map: DashMap::new(),
            len: AtomicUsize::new(0),
            max_keys: self.max_keys,
            overflow: Arc::new(overflow),
            in_overflow: DashMap::new(),
            per_key,
            max_queue,
            max_wait,
            metrics,
            this: this.clone(),
        });
        KeyedConcurrencyLimitLayer {
            partitions,
            key_fn: self.key_fn,
            retry_after: self.retry_after,
        }
    }
}

impl<S, Req, K> Layer<S> for KeyedConcurrencyLimitLayer<Req, K> {
    type Service = KeyedConcurrencyLimit<S, Req, K>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyedConcurrencyLimit {
            inner,
            partitions: self.partitions.clone(),
            key_fn: self.key_fn.clone(),
            retry_after: self.retry_after,
            _req: PhantomData,
        }
    }
}

/// A concurrency limit per key in front of `S`. Made by [`KeyedConcurrencyLimitLayer`].
pub struct KeyedConcurrencyLimit<S, Req, K> {
    inner: S,
    partitions: Arc<Partitions<K>>,
    key_fn: KeyFn<Req, K>,
    retry_after: Duration,
    _req: PhantomData<fn(&Req)>,
}

impl<S: Clone, Req, K> Clone for KeyedConcurrencyLimit<S, Req, K> {
    fn clone(&self) -> Self {
        KeyedConcurrencyLimit {
            inner: self.inner.clone(),
            partitions: self.partitions.clone(),
            key_fn: self.key_fn.clone(),
            retry_after: self.retry_after,
            _req: PhantomData,
        }
    }
}

impl<S: fmt::Debug, Req, K> fmt::Debug for KeyedConcurrencyLimit<S, Req, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedConcurrencyLimit")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, Req, K> Service<Req> for KeyedConcurrencyLimit<S, Req, K>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    type Response = S::Response;
    type Error = Error;
    type Future = KeyedResponseFuture<S, Req>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Error::inner)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let key = (self.key_fn)(&req);
        let (acquired, guard) = self.partitions.acquire(key);
        KeyedResponseFuture {
            inner: admit(acquired, &mut self.inner, req, self.retry_after),
            guard,
        }
    }
}

/// Something a request holds while it holds its place: in the overflow partition, the
/// count of its key's work there.
type Companion = Box<dyn Send + Sync>;

pin_project! {
    /// Response future of [`KeyedConcurrencyLimit`].
    ///
    /// # Cancel safety
    ///
    /// Dropping it returns its permit, or gives up its place in the queue.
    #[must_use = "futures do nothing unless polled"]
    pub struct KeyedResponseFuture<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        inner: ResponseFuture<S, Req, OnResponse>,
        // Dropped when the request ends.
        guard: Option<Companion>,
    }
}

impl<S, Req> Future for KeyedResponseFuture<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let output = std::task::ready!(this.inner.poll(cx));
        *this.guard = None;
        Poll::Ready(output)
    }
}

impl<S, Req> fmt::Debug for KeyedResponseFuture<S, Req>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}
