//! Randomised stress of the single-flight cache and the limiter on a multi-threaded
//! runtime: callers leave at random points, and nothing may hang, leak or over-admit.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::task::JoinSet;
use tower::{service_fn, Layer, Service, ServiceExt};
use towerguard::cache::CacheLayer;
use towerguard::limit::ConcurrencyLimitLayer;

/// A small deterministic generator per task.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Polls `fut` at most `polls` times, yielding between polls; `None` if it was not done.
async fn poll_at_most<F: Future>(mut fut: Pin<Box<F>>, polls: u64) -> Option<F::Output> {
    for _ in 0..polls {
        let once = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await;
        if let Poll::Ready(output) = once {
            return Some(output);
        }
        tokio::task::yield_now().await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_leaving_at_random_never_strand_the_others() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let upstream = service_fn(move |key: u64| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            // Take a few scheduler turns, sometimes panic, sometimes fail.
            for _ in 0..(mix(n as u64) % 8) {
                tokio::task::yield_now().await;
            }
            match mix(n as u64 + 7) % 20 {
                0 => panic!("upstream panic {n}"),
                1 => Err(std::io::Error::other("upstream error")),
                _ => Ok(key * 10),
            }
        }
    });
    let layer = CacheLayer::builder(|k: &u64| Some(*k))
        .ttl(Duration::from_millis(1))
        .build();
    let handle = layer.handle();
    let svc = layer.layer(upstream);
    let completed = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for t in 0..4_000u64 {
        let mut svc = svc.clone();
        let completed = completed.clone();
        tasks.spawn(async move {
            let key = mix(t) % 12;
            let fut = Box::pin(svc.ready().await.unwrap().call(key));
            // A third of the callers leave after a few polls.
            let polls = if mix(t + 1).is_multiple_of(3) {
                mix(t + 2) % 4
            } else {
                u64::MAX
            };
            if let Some(result) = poll_at_most(fut, polls).await {
                match result {
                    Ok(value) => assert_eq!(value, key * 10),
                    Err(err) => assert!(matches!(
                        err.kind(),
                        towerguard::ErrorKind::Panicked | towerguard::ErrorKind::Inner
                    )),
                }
                completed.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.expect("no caller task panics");
    }
    assert!(completed.load(Ordering::SeqCst) >= 2_600);
    assert_eq!(handle.flights_in_progress(), 0, "no flight is left behind");
    assert!(calls.load(Ordering::SeqCst) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_limit_under_random_departures_never_over_admits_or_leaks() {
    const LIMIT: usize = 3;
    let current = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (c, p) = (current.clone(), peak.clone());
    let upstream = service_fn(move |n: u64| {
        let (c, p) = (c.clone(), p.clone());
        async move {
            let now = c.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(now, Ordering::SeqCst);
            // Decrements even if this future is dropped mid-way.
            struct Leave(Arc<AtomicUsize>);
            impl Drop for Leave {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Ordering::SeqCst);
                }
            }
            let _leave = Leave(c);
            for _ in 0..(mix(n) % 6) {
                tokio::task::yield_now().await;
            }
            Ok::<_, std::convert::Infallible>(n)
        }
    });
    let layer = ConcurrencyLimitLayer::builder()
        .limit(LIMIT)
        .queue(50, Duration::from_secs(30))
        .build();
    let handle = layer.handle();
    let svc = layer.layer(upstream);
    let mut tasks = JoinSet::new();
    for t in 0..3_000u64 {
        let svc = svc.clone();
        tasks.spawn(async move {
            let fut = Box::pin(svc.oneshot(t));
            let polls = if mix(t).is_multiple_of(4) {
                mix(t + 3) % 5
            } else {
                u64::MAX
            };
            if let Some(Err(err)) = poll_at_most(fut, polls).await {
                assert_eq!(err.kind(), towerguard::ErrorKind::Overloaded);
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.expect("no caller task panics");
    }
    assert!(
        peak.load(Ordering::SeqCst) <= LIMIT,
        "peak {}",
        peak.load(Ordering::SeqCst)
    );
    assert_eq!(peak.load(Ordering::SeqCst), LIMIT, "the limit was reached");
    assert_eq!(
        (handle.in_flight(), handle.queued()),
        (0, 0),
        "every permit and place returned"
    );
    assert_eq!(current.load(Ordering::SeqCst), 0);
}
