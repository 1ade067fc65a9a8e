//! Flights: one shared upstream future per key, owned by the callers waiting for it.
//!
//! A flight holds the upstream future and the list of its waiters. There is no spawned
//! task: one waiter at a time, the *driver*, polls the upstream future, with a waker that
//! wakes only the driver; the others sleep until the outcome. When the driver leaves, the
//! driving passes to another waiter. The flight makes progress as long as anyone waits and
//! does not depend on the caller that started it. Waiters count references: when the last
//! one leaves before the result, the flight's token is cancelled, the upstream future is
//! dropped and the flight leaves the in-flight map in that same call, so a later caller
//! starts a new flight instead of joining a dead one.
//!
//! The upstream runs in the flight's own context, never in a caller's: while it is polled,
//! [`TimeoutContext::current`] is the flight's, with a cancellation token of its own
//! (cancelled only when the last waiter leaves) and the latest deadline of its waiters (no
//! deadline if one of them had none). One caller's timeout or disconnect never cancels
//! what the others wait for.
//!
//! A panic while polling the upstream future (or in the storability predicate) is caught
//! and becomes an error of kind panicked for every waiter; nobody is left waiting.
//!
//! # Invariants
//!
//! - `waiters` counts the live [`Waiter`]s; each owns one slot in `wakers`.
//! - `outcome` is set at most once, and once set never changes; `upstream` is then `None`.
//! - `abandoned` is set only when `waiters` reaches zero before the outcome; an abandoned
//!   flight takes no new waiter, its upstream is dropped and it is out of the map.
//! - `polling` is true only while one waiter has the upstream future out of `upstream`;
//!   nobody else polls it meanwhile.
//! - `driver` is a live waiter's slot or `None`; when it is `None` and no outcome is set,
//!   some registered waiter has been woken (or will poll), so no wake-up is lost.
//!
//! # Lock order
//!
//! The in-flight map's shard lock (DashMap) may be held while taking a flight's `state`
//! lock (join, detach), never the other way round: a flight leaves the map only after its
//! own lock is released (`finish`, `leave`). Wakers are woken after every lock is released.
//! The owner's `finish` runs under the flight's lock and takes only the store's locks.
use std::future::Future;
use std::hash::Hash;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use tokio::time::Instant;

use super::store::{Storable, Store};
use super::table::Table;
use crate::error::{Error, ErrorKind};
use crate::metrics::CacheMetrics;
use crate::sync::{lock, AtomicUsize, Mutex, MutexGuard, Ordering};
use crate::timeout::deadline::{far_future, Deadline, LazyToken, TimeoutContext};

/// The upstream call of one flight.
pub(crate) type Upstream<V> = Pin<Box<dyn Future<Output = Result<V, Error>> + Send>>;

/// Whether a flight's outcome may still be stored: closed by an invalidation of its key
/// (a detach) or by the second tier refusing its write, before the outcome is stored. The
/// flight's upstream holds it too, so the second tier's write can see it and close it.
#[derive(Default)]
pub(crate) struct Gate {
    closed: std::sync::atomic::AtomicBool,
    /// What the upstream keeps alive until the outcome is stored (see [`hold`](Self::hold)).
    held: std::sync::Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

impl Gate {
    /// Keeps `guard` alive until the flight's outcome has been stored (or not), then
    /// drops it: a registration that an invalidation must find until then.
    #[cfg(feature = "redis")]
    pub(crate) fn hold(&self, guard: Box<dyn std::any::Any + Send>) {
        *self.held.lock().unwrap_or_else(|p| p.into_inner()) = Some(guard);
    }

    /// Drops what [`hold`](Self::hold) kept.
    fn release(&self) {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(held);
    }

    /// Keeps the outcome out of every store.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// Whether the outcome must not be stored.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// The tags a stored value carries.
pub(crate) type TagsFn<K, V> = Arc<dyn Fn(&K, &V) -> Vec<String> + Send + Sync>;

/// Decides whether a successful response is stored, and for how long.
pub(crate) type StorableFn<V> = Arc<dyn Fn(&V) -> Storable + Send + Sync>;

/// What a flight reports to: the map it lives in, and whoever stores its outcome.
pub(crate) trait Owner<K, V>: Send + Sync + 'static {
    /// The in-flight map the flight is registered in.
    fn flights(&self) -> &FlightMap<K, V>;

    /// Records a flight's outcome. Called once, under the flight's lock, so an
    /// invalidation either sees what was stored or marks the flight `detached` first.
    /// A panic in here is contained: the waiters still get the outcome.
    fn finish(&self, key: &K, outcome: &Result<V, Error>, elapsed: Duration, detached: bool);
}

/// State shared by every clone of one cache layer and its services.
pub(crate) struct Core<K, V> {
    pub(crate) store: Store<K, V>,
    pub(crate) flights: FlightMap<K, V>,
    pub(crate) storable: StorableFn<V>,
    pub(crate) metrics: CacheMetrics,
    /// The tags of a stored value, for `invalidate_tag`.
    pub(crate) tags: Option<TagsFn<K, V>>,
    /// The second tier, when one is configured.
    #[cfg(feature = "redis")]
    pub(crate) second: Option<Arc<super::tiered::SecondTier<K, V>>>,
}

impl<K, V> Core<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Removes from this instance's store every value whose tags include `tag`. Every
    /// flight under way is detached first: the tags of what it will bring are not known
    /// yet, so none of it is stored (its waiters still get it) and later callers start new
    /// flights.
    pub(crate) fn invalidate_tag_here(&self, tag: &str) {
        if let Some(tags) = &self.tags {
            self.flights.detach_all();
            self.store
                .invalidate_where(|key, value| tags(key, value).iter().any(|t| t == tag));
        }
    }
}

impl<K, V> Owner<K, V> for Core<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn flights(&self) -> &FlightMap<K, V> {
        &self.flights
    }

    fn finish(&self, key: &K, outcome: &Result<V, Error>, elapsed: Duration, detached: bool) {
        self.metrics.flight_duration.record(elapsed.as_secs_f64());
        let now = Instant::now();
        let entry = match outcome {
            Ok(value) => {
                // A value read from the second tier lives as long as it is fresh there.
                #[cfg(feature = "redis")]
                let from_tier = self.second.as_ref().and_then(|tier| tier.take_life(key));
                #[cfg(not(feature = "redis"))]
                let from_tier: Option<super::store::Lifetime> = None;
                let storable = match from_tier {
                    Some(life) => Storable::For(life),
                    None => (self.storable)(value),
                };
                self.store.entry_for_value(value.clone(), storable, now)
            }
            Err(error) => {
                if error.is(ErrorKind::Panicked) {
                    self.metrics.upstream_panicked.increment(1);
                } else {
                    self.metrics.upstream_error.increment(1);
                }
                self.store.entry_for_error(error.clone(), now)
            }
        };
        if let (false, Some(entry)) = (detached, entry) {
            self.store.insert(key.clone(), entry);
            #[cfg(feature = "redis")]
            if let Some(tier) = &self.second {
                tier.stored(
                    key,
                    |k| self.store.contains_key(k),
                    self.store.entry_count(),
                );
            }
        }
    }
}

/// The in-flight map, bounded by `max`.
pub(crate) struct FlightMap<K, V> {
    map: Table<K, Arc<Flight<K, V>>>,
    len: AtomicUsize,
    max: usize,
}

/// What [`FlightMap::join_or_start`] did. `F` is the upstream maker, handed back when no
/// flight took it.
pub(crate) enum Joined<K, V, F, R>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Started a new flight; the caller is its first waiter.
    Started(Waiter<K, V>),
    /// Joined a flight already under way (or just finished).
    Coalesced(Waiter<K, V>),
    /// A flight finished and stored its result between the caller's look-up and its
    /// arrival here: the stored result answers.
    Stored(R),
    /// A flight is under way and joining was not wanted.
    Busy(F),
    /// The map is full: the caller should go upstream on its own.
    Full(F),
}

impl<K, V> FlightMap<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub(crate) fn new(max: usize) -> Self {
        FlightMap {
            map: Table::new(),
            len: AtomicUsize::new(0),
            max,
        }
    }

    /// Joins the flight for `key` (when `join` is true), or starts one with the upstream
    /// future `start` makes, handing it the flight's [`Gate`]. Before starting, `recheck`
    /// looks for a result a flight stored since the caller's own look-up.
    pub(crate) fn join_or_start<F, R>(
        &self,
        owner: &Arc<dyn Owner<K, V>>,
        key: K,
        join: bool,
        recheck: impl FnOnce(&K) -> Option<R>,
        start: F,
    ) -> Joined<K, V, F, R>
    where
        F: FnOnce(Arc<Gate>) -> Upstream<V>,
    {
        self.map.upsert(key, |key, current| {
            if let Some(current) = current {
                if !join {
                    return (None, Joined::Busy(start));
                }
                if let Some(waiter) = Flight::join(current) {
                    return (None, Joined::Coalesced(waiter));
                }
                // Abandoned by its last waiter, which is about to remove it: replace it.
            }
            let vacant = current.is_none();
            if vacant {
                // A flight stores its result before it leaves the map, so with the key's
                // slot locked and empty, anything it stored is visible now.
                if let Some(stored) = recheck(key) {
                    return (None, Joined::Stored(stored));
                }
                if self.len.load(Ordering::Relaxed) >= self.max {
                    return (None, Joined::Full(start));
                }
            }
            let gate = Arc::new(Gate::default());
            let flight = Flight::new(owner, key.clone(), start(gate.clone()), gate);
            let waiter = Flight::first_waiter(&flight);
            if vacant {
                self.len.fetch_add(1, Ordering::Relaxed);
            }
            (Some(flight), Joined::Started(waiter))
        })
    }

    /// Removes `flight` if it is still the one registered under its key.
    pub(crate) fn remove(&self, flight: &Arc<Flight<K, V>>) {
        if self
            .map
            .remove_if(&flight.key, |current| Arc::ptr_eq(current, flight))
        {
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Detaches the flight for `key`: its waiters still get its result, but it is not
    /// stored and later callers start a new flight.
    pub(crate) fn detach(&self, key: &K) {
        if let Some(flight) = self.map.remove(key) {
            self.len.fetch_sub(1, Ordering::Relaxed);
            flight.detach();
        }
    }

    /// Detaches every flight whose key satisfies `matches`.
    pub(crate) fn detach_where(&self, matches: impl Fn(&K) -> bool) {
        self.map.retain(|key, flight| {
            if !matches(key) {
                return true;
            }
            flight.detach();
            self.len.fetch_sub(1, Ordering::Relaxed);
            false
        });
    }

    /// Detaches every flight.
    pub(crate) fn detach_all(&self) {
        self.detach_where(|_| true);
    }

    /// Flights under way.
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }
}

/// One upstream call shared by its waiters.
pub(crate) struct Flight<K, V> {
    key: K,
    owner: Arc<dyn Owner<K, V>>,
    state: Mutex<State<V>>,
    /// Wakes the driver; handed to the upstream future when it is polled.
    waker: Waker,
    /// Closed when the outcome must not be stored; closed under `state`'s lock by a
    /// detach, so [`finish`](Self::finish) sees it or the invalidation sees the store.
    gate: Arc<Gate>,
    /// The flight's own cancellation token: cancelled when the last waiter leaves.
    token: Arc<LazyToken>,
    started: Instant,
}

struct State<V> {
    upstream: Option<Upstream<V>>,
    /// A waiter is polling the upstream future right now (it is out of `upstream`).
    polling: bool,
    outcome: Option<Result<V, Error>>,
    /// The last waiter left before the outcome: nobody may join any more.
    abandoned: bool,
    waiters: usize,
    wakers: Slots,
    /// The waiter that polls the upstream future.
    driver: Option<usize>,
    /// Some waiter came with a timeout context: the upstream runs in the flight's own.
    scoped: bool,
    /// The latest of the waiters' deadlines (far in the future if one had none).
    deadline: Option<Deadline>,
}

impl<V> State<V> {
    /// Counts a joining waiter's deadline in: the flight's is the latest of theirs.
    fn admit(&mut self, context: Option<TimeoutContext>) {
        let deadline = match context {
            Some(context) => {
                self.scoped = true;
                context.deadline()
            }
            None => Deadline::at(far_future(Instant::now())),
        };
        self.deadline = Some(self.deadline.map_or(deadline, |d| d.max(deadline)));
    }

    /// Wakes one waiter to take over the driving, if anyone waits.
    fn hand_over(&mut self) -> Option<Waker> {
        self.driver = None;
        self.wakers.take_one()
    }
}

/// Waker slots, one per waiter, reused through a free list.
#[derive(Default)]
struct Slots {
    slots: Vec<Option<Waker>>,
    free: Vec<usize>,
    registered: usize,
}

impl Slots {
    fn insert(&mut self) -> usize {
        match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        }
    }

    fn remove(&mut self, slot: usize) {
        if self.slots[slot].take().is_some() {
            self.registered -= 1;
        }
        self.free.push(slot);
    }

    fn register(&mut self, slot: usize, waker: &Waker) {
        match &mut self.slots[slot] {
            Some(current) if current.will_wake(waker) => {}
            Some(current) => current.clone_from(waker),
            empty @ None => {
                *empty = Some(waker.clone());
                self.registered += 1;
            }
        }
    }

    fn take(&mut self, slot: usize) -> Option<Waker> {
        let waker = self.slots.get_mut(slot)?.take();
        if waker.is_some() {
            self.registered -= 1;
        }
        waker
    }

    fn take_one(&mut self) -> Option<Waker> {
        if self.registered == 0 {
            return None;
        }
        let waker = self.slots.iter_mut().find_map(Option::take);
        if waker.is_some() {
            self.registered -= 1;
        }
        waker
    }

    fn take_all(&mut self) -> Vec<Waker> {
        if self.registered == 0 {
            return Vec::new();
        }
        self.registered = 0;
        self.slots.iter_mut().filter_map(Option::take).collect()
    }
}

struct FlightWaker<K, V> {
    flight: Weak<Flight<K, V>>,
}

impl<K, V> Wake for FlightWaker<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Some(flight) = self.flight.upgrade() {
            let waker = {
                let mut state = flight.lock();
                match state.driver {
                    Some(driver) => state.wakers.take(driver),
                    None => state.wakers.take_one(),
                }
            };
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }
}

impl<K, V> Flight<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn new(
        owner: &Arc<dyn Owner<K, V>>,
        key: K,
        upstream: Upstream<V>,
        gate: Arc<Gate>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|weak| Flight {
            key,
            owner: owner.clone(),
            state: Mutex::new(State {
                upstream: Some(upstream),
                polling: false,
                outcome: None,
                abandoned: false,
                waiters: 0,
                wakers: Slots::default(),
                driver: None,
                scoped: false,
                deadline: None,
            }),
            waker: Waker::from(Arc::new(FlightWaker {
                flight: weak.clone(),
            })),
            gate,
            token: LazyToken::root(),
            started: Instant::now(),
        })
    }

    /// Keeps the outcome out of the stores: under the flight's lock, so a `finish` under
    /// way has stored already (and the invalidation that follows removes it) or sees it.
    fn detach(&self) {
        let _state = self.lock();
        self.gate.close();
    }

    fn lock(&self) -> MutexGuard<'_, State<V>> {
        // Nothing panics while holding the lock, but a poisoned lock must not hang anyone.
        lock(&self.state)
    }

    /// Adds a waiter, unless the flight was abandoned.
    fn join(this: &Arc<Self>) -> Option<Waiter<K, V>> {
        let mut state = this.lock();
        if state.abandoned {
            return None;
        }
        Some(Self::add_waiter(this, &mut state))
    }

    /// The first waiter of a flight nobody else has seen yet.
    fn first_waiter(this: &Arc<Self>) -> Waiter<K, V> {
        let mut state = this.lock();
        Self::add_waiter(this, &mut state)
    }

    fn add_waiter(this: &Arc<Self>, state: &mut State<V>) -> Waiter<K, V> {
        state.admit(TimeoutContext::current());
        state.waiters += 1;
        let slot = state.wakers.insert();
        Waiter {
            flight: this.clone(),
            slot,
        }
    }

    /// Drives the upstream future on behalf of one waiter, if it is the driver (or there
    /// is none); any other waiter only waits for the outcome.
    fn poll_for(self: &Arc<Self>, slot: usize, cx: &mut Context<'_>) -> Poll<Result<V, Error>> {
        let (mut upstream, context) = {
            let mut state = self.lock();
            if let Some(outcome) = &state.outcome {
                return Poll::Ready(outcome.clone());
            }
            state.wakers.register(slot, cx.waker());
            if state.polling || state.driver.is_some_and(|driver| driver != slot) {
                // Another waiter drives; the outcome (or a hand-over) wakes us.
                return Poll::Pending;
            }
            match state.upstream.take() {
                Some(upstream) => {
                    state.driver = Some(slot);
                    state.polling = true;
                    let context = state.scoped.then(|| {
                        let deadline = state
                            .deadline
                            .unwrap_or_else(|| Deadline::at(far_future(Instant::now())));
                        TimeoutContext::new(deadline, self.token.clone())
                    });
                    (upstream, context)
                }
                None => return Poll::Pending,
            }
        };

        let mut flight_cx = Context::from_waker(&self.waker);
        let mut poll = || catch_unwind(AssertUnwindSafe(|| upstream.as_mut().poll(&mut flight_cx)));
        // In the flight's own context, never the polling caller's.
        let polled = match context {
            Some(context) => context.sync_scope(poll),
            None => poll(),
        };
        match polled {
            Ok(Poll::Pending) => {
                let mut state = self.lock();
                state.upstream = Some(upstream);
                state.polling = false;
                Poll::Pending
            }
            Ok(Poll::Ready(result)) => {
                drop(upstream);
                Poll::Ready(self.finish(result))
            }
            Err(payload) => {
                let error = Error::panicked(&*payload);
                // Dropping a future that panicked may panic again; keep that contained.
                let _ = catch_unwind(AssertUnwindSafe(move || drop(upstream)));
                Poll::Ready(self.finish(Err(error)))
            }
        }
    }

    /// Records the outcome, has the owner store it, leaves the map and wakes every waiter.
    fn finish(self: &Arc<Self>, result: Result<V, Error>) -> Result<V, Error> {
        let elapsed = self.started.elapsed();
        let wakers = {
            let mut state = self.lock();
            state.polling = false;
            state.outcome = Some(result.clone());
            let detached = self.gate.is_closed();
            // Under the flight's lock, so an invalidation either sees what was stored or
            // marks the flight before it is stored. A panic in the owner (a user predicate)
            // must not keep the waiters from their outcome.
            let owner = &self.owner;
            let _ = catch_unwind(AssertUnwindSafe(|| {
                owner.finish(&self.key, &result, elapsed, detached)
            }));
            state.wakers.take_all()
        };
        self.owner.flights().remove(self);
        // Stored (or not): what the upstream kept registered until now may go.
        self.gate.release();
        wakers.into_iter().for_each(Waker::wake);
        result
    }

    /// A waiter leaves. The last one before the outcome drops the upstream future and
    /// removes the flight from the map.
    fn leave(self: &Arc<Self>, slot: usize) {
        let (upstream, waker) = {
            let mut state = self.lock();
            state.waiters -= 1;
            state.wakers.remove(slot);
            if state.waiters == 0 && state.outcome.is_none() {
                state.abandoned = true;
                state.driver = None;
                (state.upstream.take(), None)
            } else if state.driver == Some(slot) && state.outcome.is_none() {
                // The driver leaves: another waiter takes over.
                (None, state.hand_over())
            } else {
                (None, None)
            }
        };
        if let Some(upstream) = upstream {
            // Nobody waits any more: tell the work, then drop it.
            self.token.cancel();
            self.owner.flights().remove(self);
            let _ = catch_unwind(AssertUnwindSafe(move || drop(upstream)));
        }
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// One caller's membership in a flight. Dropping it leaves the flight.
pub(crate) struct Waiter<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    flight: Arc<Flight<K, V>>,
    slot: usize,
}

impl<K, V> Future for Waiter<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    type Output = Result<V, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.flight.poll_for(self.slot, cx)
    }
}

impl<K, V> Drop for Waiter<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn drop(&mut self) {
        self.flight.leave(self.slot);
    }
}

impl<K, V> std::fmt::Debug for Waiter<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiter").field("slot", &self.slot).finish()
    }
}
