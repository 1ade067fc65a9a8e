//! The shared limiter: permits counted in one atomic, a bounded queue (FIFO, or CoDel-style
//! with adaptive LIFO), and an optional adaptive algorithm.
//!
//! # Invariants
//!
//! - `in_flight` counts the live [`Permit`]s, plus permits granted to queued slots whose
//!   ticket has not yet taken them; it exceeds `limit` only after `limit` was lowered.
//! - `queued` is the length of `queue`; both change only under the queue's lock.
//! - A slot is granted at most once, and only after it left `queue`; a granted slot's
//!   permit is taken by its ticket or, if the ticket is gone, released by the ticket's drop.
//! - No permit is lost: a release either hands its permit to the first queued slot (the
//!   count stays) or decrements `in_flight` and then drains the queue if it is not empty;
//!   a request that queues counts itself in `queued` before it drains. Each side writes
//!   its counter before it reads the other's, so one of them sees the other and grants.
//!
//! # Lock order
//!
//! The queue's lock, then a slot's waker lock (in `grant`). The adaptive algorithm's lock
//! is taken alone. Wakers are woken while the queue's lock may be held; they only schedule.
//!
//! The fast path is one compare-and-swap on the in-flight count; the queue's lock is taken
//! only when the limit is reached or somebody is already waiting. A released permit is
//! handed straight to a waiter, so a queued request cannot be overtaken by a newly arrived
//! one while it waits: the first in line, or, while a CoDel queue stands, the newest, after
//! the waiters older than the target were shed.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::task::Waker;
use std::time::Duration;

use tokio::time::Instant;

use super::adaptive::{Algorithm, Sample};
use super::QueueDiscipline;
use crate::metrics::LimitMetrics;
use crate::sync::{load_latest, lock, AtomicBool, AtomicU64, AtomicUsize, Mutex, Ordering};

/// Why the limit turned a request away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejection {
    /// Every permit is taken and there is no queue.
    Full,
    /// The queue is at its length bound.
    QueueFull,
    /// The request waited the queue's maximum wait.
    QueueTimeout,
}

/// The waiters, and when there were none.
struct Queue {
    waiting: VecDeque<Arc<Slot>>,
    /// The last time the queue was seen empty while it did not stand: a queue not empty
    /// since longer than the CoDel interval stands.
    last_empty: Instant,
    /// The queue stands (CoDel). It stops standing only once it has stayed empty for an
    /// interval: shedding empties it often, which is no sign the overload is over.
    standing: bool,
    /// When the queue last became empty.
    emptied: Instant,
}

impl Queue {
    /// Notes that the queue is empty now.
    fn empty_at(&mut self, now: Instant) {
        self.emptied = now;
        if !self.standing {
            self.last_empty = now;
        }
    }
}

pub(crate) struct Limiter {
    in_flight: AtomicUsize,
    limit: AtomicUsize,
    queued: AtomicUsize,
    max_queue: usize,
    max_wait: Option<Duration>,
    queue: Mutex<Queue>,
    discipline: QueueDiscipline,
    next_id: AtomicU64,
    algorithm: Option<Adaptive>,
    pub(crate) metrics: LimitMetrics,
    /// Called after a permit or a queue place is given back (keyed partitions use it to
    /// drop partitions that became idle).
    on_release: Option<ReleaseHook>,
    /// How long a response body may hold its permit when permits go back at the body's
    /// end (`until_body_end`).
    pub(crate) max_body_hold: Duration,
}

/// The default of [`Limiter::max_body_hold`].
pub(crate) const DEFAULT_MAX_BODY_HOLD: Duration = Duration::from_secs(60);

/// Called with the limiter after each release.
pub(crate) type ReleaseHook = Box<dyn Fn(&Limiter) + Send + Sync>;

/// An adaptive algorithm and the lock-free window that feeds it.
struct Adaptive {
    algorithm: Mutex<Box<dyn Algorithm>>,
    window: u64,
    count: AtomicU64,
    latency_nanos: AtomicU64,
    min_latency_nanos: AtomicU64,
    max_in_flight: AtomicUsize,
    dropped: AtomicBool,
}

impl Adaptive {
    fn new(algorithm: Box<dyn Algorithm>) -> Self {
        Adaptive {
            window: algorithm.window().max(1) as u64,
            algorithm: Mutex::new(algorithm),
            count: AtomicU64::new(0),
            latency_nanos: AtomicU64::new(0),
            min_latency_nanos: AtomicU64::new(u64::MAX),
            max_in_flight: AtomicUsize::new(0),
            dropped: AtomicBool::new(false),
        }
    }

    /// Adds `sample` to the window; the sample that fills it gets the window's average.
    fn add(&self, sample: Sample) -> Option<Sample> {
        if self.window == 1 {
            return Some(sample);
        }
        let nanos = u64::try_from(sample.latency.as_nanos()).unwrap_or(u64::MAX);
        self.latency_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.min_latency_nanos.fetch_min(nanos, Ordering::Relaxed);
        self.max_in_flight
            .fetch_max(sample.in_flight, Ordering::Relaxed);
        if sample.dropped {
            self.dropped.store(true, Ordering::Relaxed);
        }
        if self.count.fetch_add(1, Ordering::AcqRel) + 1 != self.window {
            return None;
        }
        // This sample closed the window: take it and start the next. Samples that land
        // while this runs count towards the next window.
        let count = self.count.swap(0, Ordering::AcqRel).max(1);
        let nanos = self.latency_nanos.swap(0, Ordering::Relaxed);
        let min = self.min_latency_nanos.swap(u64::MAX, Ordering::Relaxed);
        let mean = Duration::from_nanos(nanos / count);
        Some(
            Sample::new(
                mean,
                self.max_in_flight.swap(0, Ordering::Relaxed),
                self.dropped.swap(false, Ordering::Relaxed),
            )
            .with_min_latency(if min == u64::MAX {
                mean
            } else {
                Duration::from_nanos(min)
            }),
        )
    }
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter")
            .field("in_flight", &self.in_flight.load(Ordering::Relaxed))
            .field("limit", &self.limit.load(Ordering::Relaxed))
            .field("queued", &self.queued.load(Ordering::Relaxed))
            .field("max_queue", &self.max_queue)
            .field("max_wait", &self.max_wait)
            .finish_non_exhaustive()
    }
}

/// A queued request's place in line.
struct Slot {
    id: u64,
    enqueued: Instant,
    granted: AtomicBool,
    /// Taken out of the queue without a permit (CoDel).
    shed: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Slot {
    fn grant(&self) {
        self.granted.store(true, Ordering::Release);
        self.wake();
    }

    fn shed(&self) {
        self.shed.store(true, Ordering::Release);
        self.wake();
    }

    fn wake(&self) {
        let waker = lock(&self.waker).take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn settled(&self) -> bool {
        self.granted.load(Ordering::Acquire) || self.shed.load(Ordering::Acquire)
    }
}

impl Limiter {
    pub(crate) fn new(
        limit: usize,
        max_queue: usize,
        max_wait: Option<Duration>,
        algorithm: Option<Box<dyn Algorithm>>,
        metrics: LimitMetrics,
    ) -> Self {
        let limit = algorithm
            .as_ref()
            .map_or(limit, |a| a.initial_limit())
            .max(1);
        let algorithm = algorithm.map(Adaptive::new);
        metrics.limit.set(limit as f64);
        Limiter {
            in_flight: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit),
            queued: AtomicUsize::new(0),
            max_queue,
            max_wait,
            queue: Mutex::new({
                let now = Instant::now();
                Queue {
                    waiting: VecDeque::new(),
                    last_empty: now,
                    standing: false,
                    emptied: now,
                }
            }),
            discipline: QueueDiscipline::Fifo,
            next_id: AtomicU64::new(0),
            algorithm,
            metrics,
            on_release: None,
            max_body_hold: DEFAULT_MAX_BODY_HOLD,
        }
    }

    /// Sets how long a response body may hold its permit.
    pub(crate) fn with_discipline(mut self, discipline: QueueDiscipline) -> Self {
        self.discipline = discipline;
        self
    }

    pub(crate) fn with_max_body_hold(mut self, hold: Duration) -> Self {
        self.max_body_hold = hold;
        self
    }

    /// Sets the hook called after every release.
    pub(crate) fn with_on_release(mut self, hook: ReleaseHook) -> Self {
        self.on_release = Some(hook);
        self
    }

    /// No recorder and no release hook: a static limit's permit goes back with the
    /// in-flight count alone, inlined where it is dropped.
    #[inline]
    fn plain(&self) -> bool {
        !self.metrics.recording() && self.on_release.is_none()
    }

    /// Nothing in flight and nobody waiting.
    pub(crate) fn is_idle(&self) -> bool {
        self.in_flight() == 0 && self.queued() == 0
    }

    #[inline]
    fn released(&self) {
        if let Some(hook) = &self.on_release {
            hook(self);
        }
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit.load(Ordering::SeqCst)
    }

    pub(crate) fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    #[inline]
    fn try_increment(&self) -> Option<usize> {
        let limit = self.limit.load(Ordering::SeqCst);
        let mut current = load_latest(&self.in_flight);
        loop {
            if current >= limit {
                return None;
            }
            match self.in_flight.compare_exchange_weak(
                current,
                current + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return Some(current + 1),
                Err(actual) => current = actual,
            }
        }
    }

    #[inline]
    fn admitted(self: &Arc<Self>, in_flight: usize) -> Permit {
        self.metrics.admit();
        Permit::new(self.clone(), in_flight)
    }

    /// Takes a permit, or a place in the queue, or says why not.
    #[inline]
    pub(crate) fn acquire(self: &Arc<Self>) -> Result<Acquired, Rejection> {
        match self.try_admit() {
            Some(permit) => Ok(Acquired::Permit(permit)),
            None => self.acquire_slow().map(Acquired::Queued),
        }
    }

    /// A permit if one is free and nobody waits: the path nearly every request takes.
    #[inline]
    pub(crate) fn try_admit(self: &Arc<Self>) -> Option<Permit> {
        if self.queued.load(Ordering::SeqCst) == 0 {
            if let Some(in_flight) = self.try_increment() {
                return Some(self.admitted(in_flight));
            }
        }
        None
    }

    /// When [`try_admit`](Self::try_admit) found no permit: the limit is reached or
    /// somebody waits, so queue or reject.
    #[cold]
    #[inline(never)]
    pub(crate) fn acquire_slow(self: &Arc<Self>) -> Result<Ticket, Rejection> {
        if self.max_queue == 0 {
            self.metrics.rejected_full.increment(1);
            tracing::debug!(reason = "full", "limit: shed");
            return Err(Rejection::Full);
        }
        if crate::hedged::sending_hedge_now() {
            // A hedge takes a free permit or none (see `crate::hedged`).
            self.metrics.rejected_hedge.increment(1);
            tracing::debug!(reason = "hedge", "limit: a hedge found no free permit");
            return Err(Rejection::Full);
        }
        let mut queue = lock(&self.queue);
        if queue.waiting.len() >= self.max_queue {
            drop(queue);
            self.metrics.rejected_queue_full.increment(1);
            tracing::debug!(reason = "queue_full", "limit: shed");
            return Err(Rejection::QueueFull);
        }
        let now = Instant::now();
        if queue.waiting.is_empty() {
            if let QueueDiscipline::Codel { interval, .. } = self.discipline {
                if queue.standing && now.saturating_duration_since(queue.emptied) >= interval {
                    queue.standing = false;
                }
            }
            queue.empty_at(now);
        }
        // A request that joins a standing queue may wait the target at most.
        let max_wait = match self.discipline {
            QueueDiscipline::Codel { target, .. } if self.standing(&mut queue, now) => {
                Some(self.max_wait.map_or(target, |wait| wait.min(target)))
            }
            _ => self.max_wait,
        };
        let slot = Arc::new(Slot {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            enqueued: now,
            granted: AtomicBool::new(false),
            shed: AtomicBool::new(false),
            waker: Mutex::new(None),
        });
        queue.waiting.push_back(slot.clone());
        self.queued.fetch_add(1, Ordering::SeqCst);
        self.metrics.queue_depth.increment(1.0);
        // A permit may have come free after the fast path looked: hand out what is free.
        self.drain(&mut queue);
        Ok(Ticket {
            limiter: self.clone(),
            slot,
            enqueued: now,
            max_wait,
            done: false,
        })
    }

    /// True if the queue stands: it has not been empty for the CoDel interval (and has
    /// not stayed empty for an interval since).
    fn standing(&self, queue: &mut Queue, now: Instant) -> bool {
        let QueueDiscipline::Codel { interval, .. } = self.discipline else {
            return false;
        };
        if !queue.standing
            && !queue.waiting.is_empty()
            && now.saturating_duration_since(queue.last_empty) >= interval
        {
            queue.standing = true;
        }
        queue.standing
    }

    /// The waiter a free permit goes to: the first in line; while a CoDel queue stands,
    /// the newest, after shedding the waiters older than the target.
    fn next_waiter(&self, queue: &mut Queue) -> Option<Arc<Slot>> {
        let slot = match self.discipline {
            QueueDiscipline::Fifo => queue.waiting.pop_front(),
            QueueDiscipline::Codel { target, .. } => {
                let now = Instant::now();
                if self.standing(queue, now) {
                    while let Some(oldest) = queue.waiting.front() {
                        if now.saturating_duration_since(oldest.enqueued) <= target {
                            break;
                        }
                        if let Some(oldest) = queue.waiting.pop_front() {
                            self.dequeued();
                            self.metrics.rejected_standing.increment(1);
                            tracing::debug!(reason = "queue_standing", "limit: shed");
                            oldest.shed();
                        }
                    }
                    queue.waiting.pop_back()
                } else {
                    queue.waiting.pop_front()
                }
            }
        };
        if queue.waiting.is_empty() && self.discipline != QueueDiscipline::Fifo {
            queue.empty_at(Instant::now());
        }
        slot
    }

    /// Grants permits to waiters while there are permits free.
    fn drain(&self, queue: &mut Queue) {
        while !queue.waiting.is_empty() && self.try_increment().is_some() {
            match self.next_waiter(queue) {
                Some(slot) => {
                    self.dequeued();
                    slot.grant();
                }
                // Every waiter was shed: the permit goes back.
                None => {
                    self.in_flight.fetch_sub(1, Ordering::SeqCst);
                }
            }
        }
    }

    fn dequeued(&self) {
        self.queued.fetch_sub(1, Ordering::SeqCst);
        self.metrics.queue_depth.decrement(1.0);
    }

    /// Returns a permit: to the first waiter if the limit allows, else to the pool.
    #[inline]
    fn release(&self) {
        self.metrics.release();
        self.release_count();
    }

    /// [`release`](Self::release) without the in-flight gauge.
    #[inline]
    fn release_count(&self) {
        if self.queued.load(Ordering::SeqCst) > 0 && self.hand_over() {
            return;
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        // A request may have queued between the check above and the decrement: it reads
        // the in-flight count after counting itself in, and this reads the queue after
        // the decrement, so one of the two sees the other (`SeqCst`).
        if load_latest(&self.queued) > 0 {
            self.drain_now();
        }
    }

    /// Passes a returned permit to a waiter if the limit allows; false if it did not.
    #[cold]
    #[inline(never)]
    fn hand_over(&self) -> bool {
        let mut queue = lock(&self.queue);
        if self.in_flight.load(Ordering::SeqCst) <= self.limit.load(Ordering::SeqCst) {
            if let Some(slot) = self.next_waiter(&mut queue) {
                // The permit passes to the waiter: the in-flight count stays.
                self.dequeued();
                slot.grant();
                return true;
            }
        }
        false
    }

    #[cold]
    #[inline(never)]
    fn drain_now(&self) {
        let mut queue = lock(&self.queue);
        self.drain(&mut queue);
    }

    fn sample(&self, sample: Sample) {
        let Some(adaptive) = &self.algorithm else {
            return;
        };
        let Some(sample) = adaptive.add(sample) else {
            return;
        };
        let current = self.limit.load(Ordering::SeqCst);
        let next = lock(&adaptive.algorithm).update(current, sample).max(1);
        if next != current {
            self.limit.store(next, Ordering::SeqCst);
            self.metrics.limit.set(next as f64);
            if next > current && self.queued.load(Ordering::SeqCst) > 0 {
                let mut queue = lock(&self.queue);
                self.drain(&mut queue);
            }
        }
    }
}

/// What [`Limiter::acquire`] gave.
pub(crate) enum Acquired {
    Permit(Permit),
    Queued(Ticket),
}

/// How a request ended, for the adaptive algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Not a sample: ended before a response (dropped by the caller) or failed in a way
    /// that says nothing about load.
    Ignore = 0,
    Success = 1,
    Dropped = 2,
}

/// One admitted request's share of the limit. Dropping it returns the permit.
///
/// Its fields are whole words: a static limit's permit is built and moved on every
/// request, and words built and read whole move fastest.
pub struct Permit {
    limiter: Arc<Limiter>,
    /// Adaptive limits only: nanoseconds from the process-wide epoch to the admission, plus
    /// one; 0 when the request is not timed (static limits spare the clock read).
    started: u64,
    /// The in-flight count at admission, shifted left by two, or'ed with the [`Outcome`].
    sample: usize,
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("in_flight", &(self.sample >> 2))
            .finish_non_exhaustive()
    }
}

impl Permit {
    #[inline]
    fn new(limiter: Arc<Limiter>, in_flight: usize) -> Self {
        let started = match limiter.algorithm {
            None => 0,
            Some(_) => crate::clock::since_epoch(Instant::now()).saturating_add(1),
        };
        Permit {
            limiter,
            started,
            sample: in_flight << 2 | Outcome::Ignore as usize,
        }
    }

    fn outcome(&self) -> Outcome {
        match self.sample & 3 {
            1 => Outcome::Success,
            2 => Outcome::Dropped,
            _ => Outcome::Ignore,
        }
    }

    /// How long a response body may hold this permit (`until_body_end`).
    #[cfg(feature = "http")]
    pub(crate) fn max_body_hold(&self) -> Duration {
        self.limiter.max_body_hold
    }

    /// Records how the request ended; the sample is taken when the permit is returned.
    #[inline]
    pub(crate) fn record(&mut self, outcome: Outcome) {
        self.sample = self.sample & !3 | outcome as usize;
    }

    /// Counts the request as a drop: the backend answered that it is overloaded.
    #[cfg(feature = "http")]
    pub(crate) fn record_overloaded(&mut self) {
        self.record(Outcome::Dropped);
    }

    /// Returns a permit that a recorder or a release hook hears of, or an adaptive
    /// limit's, whose sample feeds the algorithm.
    #[cold]
    #[inline(never)]
    fn release_tracked(&mut self) {
        let limiter = &self.limiter;
        if self.started == 0 {
            limiter.release();
            limiter.released();
            return;
        }
        let sample = match self.outcome() {
            Outcome::Ignore => None,
            outcome => {
                let now = crate::clock::since_epoch(Instant::now());
                Some(Sample::new(
                    Duration::from_nanos(now.saturating_sub(self.started - 1)),
                    self.sample >> 2,
                    outcome == Outcome::Dropped,
                ))
            }
        };
        limiter.release();
        if let Some(sample) = sample {
            limiter.sample(sample);
        }
        limiter.released();
    }
}

impl Drop for Permit {
    #[inline]
    fn drop(&mut self) {
        if self.started == 0 && self.limiter.plain() {
            self.limiter.release_count();
        } else {
            self.release_tracked();
        }
    }
}

/// A place in the queue. Dropping it gives the place up (or the permit, if one was
/// granted meanwhile).
pub(crate) struct Ticket {
    limiter: Arc<Limiter>,
    slot: Arc<Slot>,
    enqueued: Instant,
    /// How long this request may wait (shorter when it joined a standing queue).
    max_wait: Option<Duration>,
    done: bool,
}

/// What a queued request's poll found.
pub(crate) enum Turn {
    Granted(Permit),
    /// Shed from a standing queue.
    Shed,
    Waiting,
}

impl Ticket {
    /// How long this request may wait in the queue.
    pub(crate) fn max_wait(&self) -> Option<Duration> {
        self.max_wait
    }

    /// The permit once granted, the news that the request was shed, or `Waiting` with
    /// `waker` registered.
    pub(crate) fn poll_turn(&mut self, waker: &Waker) -> Turn {
        if !self.slot.settled() {
            let mut slot_waker = lock(&self.slot.waker);
            match &mut *slot_waker {
                Some(current) if current.will_wake(waker) => {}
                other => *other = Some(waker.clone()),
            }
            drop(slot_waker);
            if !self.slot.settled() {
                return Turn::Waiting;
            }
        }
        if self.slot.granted.load(Ordering::Acquire) {
            Turn::Granted(self.take_permit())
        } else {
            self.done = true;
            self.limiter.released();
            Turn::Shed
        }
    }

    fn take_permit(&mut self) -> Permit {
        self.done = true;
        let limiter = &self.limiter;
        limiter
            .metrics
            .queue_wait
            .record(self.enqueued.elapsed().as_secs_f64());
        limiter.metrics.admit();
        Permit::new(limiter.clone(), limiter.in_flight())
    }

    /// Gives up the place after the maximum wait; a permit granted at the last moment is
    /// returned instead of the rejection.
    pub(crate) fn time_out(&mut self) -> Result<Permit, Rejection> {
        if let Some(permit) = self.leave() {
            return Ok(permit);
        }
        self.limiter.metrics.rejected_queue_timeout.increment(1);
        tracing::debug!(reason = "queue_timeout", "limit: shed");
        Err(Rejection::QueueTimeout)
    }

    /// Leaves the queue; returns the permit if one was granted before leaving.
    fn leave(&mut self) -> Option<Permit> {
        if self.done {
            return None;
        }
        let mut queue = lock(&self.limiter.queue);
        if self.slot.granted.load(Ordering::Acquire) {
            drop(queue);
            return Some(self.take_permit());
        }
        if let Some(index) = queue.waiting.iter().position(|s| s.id == self.slot.id) {
            queue.waiting.remove(index);
            self.limiter.dequeued();
            if queue.waiting.is_empty() {
                queue.empty_at(Instant::now());
            }
        }
        drop(queue);
        self.done = true;
        self.limiter.released();
        None
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // A permit granted to a request that is gone goes back (or to the next in line).
        drop(self.leave());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Windowed(usize);

    impl Algorithm for Windowed {
        fn initial_limit(&self) -> usize {
            10
        }
        fn window(&self) -> usize {
            self.0
        }
        fn update(&mut self, current: usize, _sample: Sample) -> usize {
            current
        }
    }

    #[test]
    fn the_window_averages_latency_takes_the_fastest_the_peak_in_flight_and_any_drop() {
        let adaptive = Adaptive::new(Box::new(Windowed(4)));
        let ms = Duration::from_millis;
        assert_eq!(adaptive.add(Sample::new(ms(1), 3, false)), None);
        assert_eq!(adaptive.add(Sample::new(ms(3), 7, true)), None);
        assert_eq!(adaptive.add(Sample::new(ms(5), 2, false)), None);
        let closed = adaptive.add(Sample::new(ms(7), 1, false));
        assert_eq!(
            closed,
            Some(Sample::new(ms(4), 7, true).with_min_latency(ms(1)))
        );
        // The next window starts empty.
        for _ in 0..3 {
            assert_eq!(adaptive.add(Sample::new(ms(2), 1, false)), None);
        }
        let closed = adaptive.add(Sample::new(ms(2), 1, false));
        assert_eq!(closed, Some(Sample::new(ms(2), 1, false)));
    }

    #[test]
    fn a_window_of_one_passes_every_sample_through() {
        let adaptive = Adaptive::new(Box::new(Windowed(1)));
        let sample = Sample::new(Duration::from_millis(9), 4, false);
        assert_eq!(adaptive.add(sample), Some(sample));
    }
}
