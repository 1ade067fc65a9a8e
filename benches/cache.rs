//! The cache's hit path and a 1,000-caller stampede, beside raw moka and tower-resilience's
//! cache and coalesce layers, in the same run.
//!
//! - `hit/*`: one request for a key that is already stored, through `ready()` + `call()`
//!   + `.await` for the layers, through `get` for moka.
//! - `stampede/*`: 1,000 tasks ask for one cold key at once; the upstream yields once
//!   before it answers. One iteration is the whole stampede, on a fresh cache. The number
//!   of upstream calls each contender made is printed once.
#![allow(missing_docs)]

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use tokio::task::JoinSet;
use tower::{service_fn, Layer, Service, ServiceExt};

const CALLERS: usize = 1_000;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The upstream's error type: cloneable, as the coalesce layer requires.
#[derive(Clone, Debug)]
struct UpstreamError;

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("upstream error")
    }
}

impl std::error::Error for UpstreamError {}

/// An upstream that counts its calls and yields once before answering.
fn upstream(
    calls: Arc<AtomicUsize>,
) -> impl Service<u64, Response = Arc<str>, Error = UpstreamError, Future = impl Send>
       + Clone
       + Send
       + 'static {
    service_fn(move |key: u64| {
        calls.fetch_add(1, Ordering::Relaxed);
        async move {
            tokio::task::yield_now().await;
            Ok::<_, UpstreamError>(Arc::from(format!("value-{key}")))
        }
    })
}

fn hit(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("hit");

    let towerguard = towerguard::cache::CacheLayer::builder(|k: &u64| Some(*k)).build();
    let tg = towerguard.layer(upstream(Arc::default()));
    rt.block_on(async { tg.clone().oneshot(1).await.unwrap() });
    group.bench_function("towerguard", |b| {
        b.to_async(&rt).iter(|| {
            let mut svc = tg.clone();
            async move { svc.ready().await.unwrap().call(black_box(1)).await.unwrap() }
        })
    });

    let moka_future: moka::future::Cache<u64, Arc<str>> = moka::future::Cache::new(10_000);
    rt.block_on(moka_future.insert(1, Arc::from("value-1")));
    group.bench_function("moka_future_get", |b| {
        b.to_async(&rt)
            .iter(|| async { moka_future.get(&black_box(1)).await.unwrap() })
    });

    let moka_sync: moka::sync::Cache<u64, Arc<str>> = moka::sync::Cache::new(10_000);
    moka_sync.insert(1, Arc::from("value-1"));
    group.bench_function("moka_sync_get", |b| {
        b.iter(|| moka_sync.get(&black_box(1)).unwrap())
    });

    let resilience = tower_resilience::cache::CacheLayer::builder()
        .max_size(10_000)
        .key_extractor(|k: &u64| *k)
        .build()
        .unwrap();
    let tr = resilience.layer(upstream(Arc::default()));
    rt.block_on(async { tr.clone().oneshot(1).await.unwrap() });
    group.bench_function("tower_resilience_cache", |b| {
        b.to_async(&rt).iter(|| {
            let mut svc = tr.clone();
            async move { svc.ready().await.unwrap().call(black_box(1)).await.unwrap() }
        })
    });
    group.finish();
}

/// Hits from two tasks at once over 1,000 stored keys; time per hit.
fn hit_two_tasks(c: &mut Criterion) {
    const KEYS: u64 = 1_000;
    let rt = runtime();
    let mut group = c.benchmark_group("hit_2_tasks_1000_keys");

    async fn drive<S>(svc: S, iters: u64) -> Duration
    where
        S: Service<u64, Response = Arc<str>> + Clone + Send + 'static,
        S::Error: std::fmt::Debug,
        S::Future: Send,
    {
        let start = std::time::Instant::now();
        let mut set = JoinSet::new();
        for t in 0..2u64 {
            let mut svc = svc.clone();
            set.spawn(async move {
                for i in 0..iters.div_ceil(2) {
                    let key = (i * 7 + t * 500) % KEYS;
                    black_box(svc.ready().await.unwrap().call(key).await.unwrap());
                }
            });
        }
        while set.join_next().await.is_some() {}
        start.elapsed()
    }

    let tg = towerguard::cache::CacheLayer::builder(|k: &u64| Some(*k))
        .build()
        .layer(upstream(Arc::default()));
    let tr = tower_resilience::cache::CacheLayer::builder()
        .max_size(10_000)
        .key_extractor(|k: &u64| *k)
        .build()
        .unwrap()
        .layer(upstream(Arc::default()));
    let moka_sync: moka::sync::Cache<u64, Arc<str>> = moka::sync::Cache::new(10_000);
    rt.block_on(async {
        for key in 0..KEYS {
            tg.clone().oneshot(key).await.unwrap();
            tr.clone().oneshot(key).await.unwrap();
            moka_sync.insert(key, Arc::from(format!("value-{key}")));
        }
    });
    group.bench_function("towerguard", |b| {
        b.to_async(&rt)
            .iter_custom(|iters| drive(tg.clone(), iters))
    });
    group.bench_function("tower_resilience_cache", |b| {
        b.to_async(&rt)
            .iter_custom(|iters| drive(tr.clone(), iters))
    });
    group.bench_function("moka_sync_get", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let cache = moka_sync.clone();
            async move {
                let start = std::time::Instant::now();
                let mut set = JoinSet::new();
                for t in 0..2u64 {
                    let cache = cache.clone();
                    set.spawn(async move {
                        for i in 0..iters.div_ceil(2) {
                            black_box(cache.get(&((i * 7 + t * 500) % KEYS)).unwrap());
                        }
                    });
                }
                while set.join_next().await.is_some() {}
                start.elapsed()
            }
        })
    });
    group.finish();
}

/// 1,000 tasks call `svc` for key 1 at once; waits for every answer.
async fn stampede<S>(svc: S)
where
    S: Service<u64, Response = Arc<str>> + Clone + Send + 'static,
    S::Error: std::fmt::Debug + Send,
    S::Future: Send,
{
    let mut set = JoinSet::new();
    for _ in 0..CALLERS {
        let svc = svc.clone();
        set.spawn(async move { svc.oneshot(1).await.unwrap() });
    }
    while let Some(r) = set.join_next().await {
        black_box(r.unwrap());
    }
}

/// moka's `get_with` in front of the upstream, as a service.
fn moka_get_with(
    calls: Arc<AtomicUsize>,
) -> impl Service<u64, Response = Arc<str>, Error = Infallible, Future = impl Send>
       + Clone
       + Send
       + 'static {
    let cache: moka::future::Cache<u64, Arc<str>> = moka::future::Cache::new(10_000);
    let inner = upstream(calls);
    service_fn(move |key: u64| {
        let (cache, inner) = (cache.clone(), inner.clone());
        async move {
            let init = async move { inner.oneshot(key).await.unwrap() };
            Ok::<_, Infallible>(cache.get_with(key, init).await)
        }
    })
}

fn stampede_group(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("stampede_1000");
    group.sample_size(20);
    let mut upstream_calls = Vec::new();

    // Each contender is built fresh (cold) for every stampede over a shared call counter.
    macro_rules! contender {
        ($name:literal, $build:expr) => {{
            let calls = Arc::new(AtomicUsize::new(0));
            let iterations = Arc::new(AtomicUsize::new(0));
            group.bench_function($name, |b| {
                b.to_async(&rt).iter(|| {
                    iterations.fetch_add(1, Ordering::Relaxed);
                    stampede($build(calls.clone()))
                })
            });
            upstream_calls.push(($name, calls, iterations));
        }};
    }
    contender!("towerguard", |calls| {
        towerguard::cache::CacheLayer::builder(|k: &u64| Some(*k))
            .build()
            .layer(upstream(calls))
    });
    contender!("moka_get_with", moka_get_with);
    contender!("tower_resilience_coalesce", |calls| {
        tower_resilience::coalesce::CoalesceLayer::new(|k: &u64| *k).layer(upstream(calls))
    });
    contender!("tower_resilience_cache", |calls| {
        tower_resilience::cache::CacheLayer::builder()
            .max_size(10_000)
            .key_extractor(|k: &u64| *k)
            .build()
            .unwrap()
            .layer(upstream(calls))
    });
    group.finish();

    for (name, calls, iterations) in upstream_calls {
        let (calls, iterations) = (
            calls.load(Ordering::Relaxed),
            iterations.load(Ordering::Relaxed),
        );
        println!(
            "stampede_1000/{name}: {:.1} upstream calls per stampede ({calls} over {iterations})",
            calls as f64 / iterations.max(1) as f64
        );
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = hit, hit_two_tasks, stampede_group
}
criterion_main!(benches);
