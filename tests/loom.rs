//! loom models of the two places where callers race on shared state: the limiter (acquire,
//! release, queue hand-off, leaving the queue) and the flight (join, leave, finish, wake,
//! driver hand-over). Built only with `RUSTFLAGS="--cfg towerguard_loom"`, which swaps the
//! locks and atomics of `src/sync.rs` for loom's:
//!
//! ```text
//! RUSTFLAGS="--cfg towerguard_loom" cargo test --release --test loom
//! ```
#![cfg(towerguard_loom)]

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use loom::future::block_on;
use loom::thread;
use tower::{service_fn, Layer, Service, ServiceExt};
use towerguard::limit::ConcurrencyLimitLayer;
use towerguard::ErrorKind;

/// An inner service that records how many requests are inside it at once.
fn counting(
    inside: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
) -> impl Service<
    u32,
    Response = u32,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<u32, std::convert::Infallible>>,
> + Clone {
    service_fn(move |n: u32| {
        let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
        peak.fetch_max(now, Ordering::SeqCst);
        inside.fetch_sub(1, Ordering::SeqCst);
        std::future::ready(Ok(n))
    })
}

/// Calls `svc` once to completion on this loom thread.
fn call<S>(mut svc: S, n: u32) -> Result<u32, towerguard::Error>
where
    S: Service<u32, Response = u32, Error = towerguard::Error>,
{
    block_on(async move { svc.ready().await?.call(n).await })
}

#[test]
fn limiter_acquire_and_release_never_over_admit_nor_leak() {
    loom::model(|| {
        let (inside, peak) = (Arc::default(), Arc::new(AtomicUsize::new(0)));
        let layer = ConcurrencyLimitLayer::new(1);
        let handle = layer.handle();
        let svc = layer.layer(counting(inside, peak.clone()));
        let other = svc.clone();
        let t = thread::spawn(move || call(other, 1));
        let here = call(svc, 2);
        let there = t.join().unwrap();
        for result in [here, there] {
            if let Err(error) = result {
                assert_eq!(error.kind(), ErrorKind::Overloaded);
            }
        }
        assert!(peak.load(Ordering::SeqCst) <= 1);
        assert_eq!(handle.in_flight(), 0);
    });
}

#[test]
fn limiter_hands_a_released_permit_to_the_queued_request() {
    loom::model(|| {
        let (inside, peak) = (Arc::default(), Arc::new(AtomicUsize::new(0)));
        let layer = ConcurrencyLimitLayer::builder()
            .limit(1)
            .queue_without_timeout(1)
            .build();
        let handle = layer.handle();
        let svc = layer.layer(counting(inside, peak.clone()));
        let other = svc.clone();
        let t = thread::spawn(move || call(other, 1));
        // With one permit and one queue place, both are served.
        assert_eq!(call(svc, 2).unwrap(), 2);
        assert_eq!(t.join().unwrap().unwrap(), 1);
        assert!(peak.load(Ordering::SeqCst) <= 1);
        assert_eq!((handle.in_flight(), handle.queued()), (0, 0));
    });
}

#[test]
fn limiter_a_request_leaving_the_queue_gives_its_place_or_permit_back() {
    loom::model(|| {
        let (inside, peak) = (Arc::default(), Arc::new(AtomicUsize::new(0)));
        let layer = ConcurrencyLimitLayer::builder()
            .limit(1)
            .queue_without_timeout(2)
            .build();
        let handle = layer.handle();
        let svc = layer.layer(counting(inside, peak));
        let mut leaving = svc.clone();
        let t = thread::spawn(move || {
            // Polled once (admitted or queued), then dropped.
            let mut future = pin!(leaving.call(1));
            let _ = future
                .as_mut()
                .poll(&mut Context::from_waker(Waker::noop()));
        });
        assert_eq!(call(svc, 2).unwrap(), 2);
        t.join().unwrap();
        assert_eq!((handle.in_flight(), handle.queued()), (0, 0));
    });
}

#[test]
fn flight_waiters_all_get_the_one_outcome_whoever_leaves() {
    use towerguard::cache::CacheLayer;
    loom::model(|| {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        // The upstream answers on its second poll, waking its flight in between.
        let upstream = service_fn(move |n: u32| {
            counter.fetch_add(1, Ordering::SeqCst);
            let mut polled = false;
            std::future::poll_fn(move |cx| {
                if polled {
                    Poll::Ready(Ok::<_, std::convert::Infallible>(n * 10))
                } else {
                    polled = true;
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
            })
        });
        let cache = CacheLayer::builder(|n: &u32| Some(*n)).build();
        let handle = cache.handle();
        let svc = cache.layer(upstream);
        let (a, mut b) = (svc.clone(), svc.clone());
        let waiting = thread::spawn(move || call(a, 7));
        let leaving = thread::spawn(move || {
            // Joins (or starts) the flight, drives it once, and leaves.
            let mut future = pin!(b.call(7));
            let _ = future
                .as_mut()
                .poll(&mut Context::from_waker(Waker::noop()));
        });
        let here = call(svc, 7);
        leaving.join().unwrap();
        assert_eq!(waiting.join().unwrap().unwrap(), 70);
        assert_eq!(here.unwrap(), 70);
        assert_eq!(handle.flights_in_progress(), 0);
        assert!(
            calls.load(Ordering::SeqCst) <= 2,
            "a new flight only after one ended"
        );
    });
}
