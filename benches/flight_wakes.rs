//! What one flight costs its waiters while its upstream makes progress: 10,000 waiters on
//! one key whose upstream future is woken from outside 1,000 times before it answers (a
//! ticker task sends it 1,000 messages; on paused time, its sleep between two messages ends
//! only once every woken task has run).
//!
//! Prints the waiters' polls (each poll after the first is a wake-up) for one run, then
//! times whole runs with criterion.
#![allow(missing_docs)]

use std::future::Future;
use std::hint::black_box;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use tower::{Layer, Service, ServiceExt};
use towerguard::cache::CacheLayer;

const WAITERS: usize = 10_000;
const WAKES: u32 = 1_000;

/// Counts the polls of the future it wraps.
struct Counted<F> {
    inner: Pin<Box<F>>,
    polls: Arc<AtomicU64>,
}

impl<F: Future> Future for Counted<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.polls.fetch_add(1, Ordering::Relaxed);
        self.inner.as_mut().poll(cx)
    }
}

/// One run: every waiter joins, then the ticker drives the upstream to its answer.
/// Returns the waiters' polls.
async fn run() -> u64 {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
    let rx = Arc::new(std::sync::Mutex::new(Some(rx)));
    let layer = CacheLayer::builder(|k: &u64| Some(*k)).build();
    let handle = layer.handle();
    let svc = layer.layer(tower::service_fn(move |_k: u64| {
        let rx = rx.lock().unwrap().take();
        async move {
            let mut rx = rx.expect("one upstream call");
            for _ in 0..WAKES {
                rx.recv().await.unwrap();
            }
            Ok::<u64, std::convert::Infallible>(7)
        }
    }));
    let polls = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..WAITERS {
        let mut svc = svc.clone();
        let future = svc.ready().await.unwrap().call(1);
        tasks.spawn(Counted {
            inner: Box::pin(future),
            polls: polls.clone(),
        });
    }
    // Every waiter polls once and sleeps; then each message wakes the upstream.
    let tick = Duration::from_millis(1);
    tokio::time::sleep(tick).await;
    for i in 0..WAKES {
        tx.send(i).unwrap();
        tokio::time::sleep(tick).await;
    }
    while let Some(result) = tasks.join_next().await {
        assert_eq!(result.unwrap().unwrap(), 7);
    }
    handle.invalidate_all();
    polls.load(Ordering::Relaxed)
}

fn flight_wakes(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let polls = runtime.block_on(run());
    println!(
        "flight_wakes: {WAITERS} waiters, upstream waking {WAKES} times: {polls} waiter polls \
         ({} wake-ups beyond each waiter's first poll)",
        polls - WAITERS as u64
    );
    let mut group = c.benchmark_group("flight_wakes");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.bench_function("10000_waiters_1000_wakes", |b| {
        b.iter(|| black_box(runtime.block_on(run())))
    });
    group.finish();
}

criterion_group!(benches, flight_wakes);
criterion_main!(benches);
