//! The cache's hit path and a 1,000-caller stampede, beside raw moka, quick_cache and
//! tower-resilience's cache and coalesce layers, in the same run.
//!
//! - `hit/*`: one request for a key that is already stored, through `ready()`, `call()`
//!   and `.await`: the layers, and the raw stores' `get` wrapped in a `service_fn` in
//!   front of the same bare service. Also prints each store's hit ratio on a Zipf(0.9)
//!   stream, and `clock/*` times a clock read.
//! - `stampede/*`: 1,000 tasks ask for one cold key at once; the upstream yields once
//!   before it answers. One iteration is the whole stampede, on a fresh cache. The number
//!   of upstream calls each contender made is printed once.
#![allow(missing_docs)]

mod common;

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

/// A store's `get` in front of the bare service, as a service: what a hand-written cache
/// costs per hit.
fn store_service<G>(
    get: G,
) -> impl Service<u64, Response = u64, Error = Infallible, Future = impl Send> + Clone + Send
where
    G: Fn(&u64) -> Option<u64> + Clone + Send + 'static,
{
    service_fn(move |key: u64| std::future::ready(Ok::<_, Infallible>(get(&key).unwrap_or(key))))
}

/// One stored key (16 keys cycled), through `ready()` + `call()` + `.await`, beside the
/// bare service, the raw stores used by hand, and tower-resilience's cache.
fn hit_in(c: &mut Criterion, prometheus: bool) {
    let rt = common::runtime();
    let mut group = c.benchmark_group(common::group_name("hit", prometheus));
    let key = |k: &u64| Some(*k % 16);
    common::bench(&mut group, &rt, "bare", common::echo());

    let tg = towerguard::cache::CacheLayer::builder(key)
        .build()
        .layer(common::echo());
    rt.block_on(async {
        for k in 0..16 {
            tg.clone().oneshot(k).await.unwrap();
        }
    });
    common::bench(&mut group, &rt, "towerguard", tg);
    // With a lifetime, a hit reads the clock.
    let tg_ttl = towerguard::cache::CacheLayer::builder(key)
        .ttl(Duration::from_secs(3600))
        .build()
        .layer(common::echo());
    rt.block_on(async {
        for k in 0..16 {
            tg_ttl.clone().oneshot(k).await.unwrap();
        }
    });
    common::bench(&mut group, &rt, "towerguard_ttl", tg_ttl);

    let moka_sync: moka::sync::Cache<u64, u64> = moka::sync::Cache::new(10_000);
    let quick: Arc<quick_cache::sync::Cache<u64, u64>> =
        Arc::new(quick_cache::sync::Cache::new(10_000));
    for k in 0..16 {
        moka_sync.insert(k, k);
        quick.insert(k, k);
    }
    common::bench(
        &mut group,
        &rt,
        "moka_sync_get",
        store_service(move |k: &u64| moka_sync.get(&(k % 16))),
    );
    common::bench(
        &mut group,
        &rt,
        "quick_cache_get",
        store_service(move |k: &u64| quick.get(&(k % 16))),
    );

    let tr = tower_resilience::cache::CacheLayer::builder()
        .max_size(10_000)
        .key_extractor(|k: &u64| *k % 16)
        .build()
        .unwrap()
        .layer(common::echo());
    rt.block_on(async {
        for k in 0..16 {
            tr.clone().oneshot(k).await.unwrap();
        }
    });
    common::bench(&mut group, &rt, "tower_resilience_cache", tr);
    group.finish();
}

/// What a hit with a lifetime pays for its clock read: tokio's clock (which, with tokio's
/// `test-util` feature, as in every bench build, also consults the runtime's pausable
/// clock) and the system's monotonic clock (what tokio's clock reads in a build without
/// `test-util`).
fn clock(c: &mut Criterion) {
    let rt = common::current_thread();
    let mut group = c.benchmark_group("clock");
    let _guard = rt.enter();
    group.bench_function("tokio_instant_now", |b| b.iter(tokio::time::Instant::now));
    group.bench_function("std_instant_now", |b| b.iter(std::time::Instant::now));
    group.finish();
}

fn hit(c: &mut Criterion) {
    hit_in(c, false);
    clock(c);
    zipf_hit_ratio();
}

fn hit_prometheus(c: &mut Criterion) {
    common::install_prometheus();
    hit_in(c, true);
}

/// Eviction quality: the hit ratio of each store on a Zipf(0.9) key stream over ten times
/// its capacity (1,000 entries, 10,000 keys, 1,000,000 requests, a miss stores the key).
/// Printed once; the same seeded stream for every store.
fn zipf_hit_ratio() {
    const CAPACITY: u64 = 1_000;
    const KEYS: usize = 10_000;
    const REQUESTS: usize = 1_000_000;
    let stream = zipf_stream(KEYS, 0.9, REQUESTS);

    let ratio = |hits: usize| 100.0 * hits as f64 / REQUESTS as f64;
    let per_request =
        |start: std::time::Instant| start.elapsed().as_nanos() as f64 / REQUESTS as f64;
    let start = std::time::Instant::now();
    let moka_sync: moka::sync::Cache<u64, u64> = moka::sync::Cache::new(CAPACITY);
    let moka_hits = stream
        .iter()
        .filter(|&&k| {
            let hit = moka_sync.get(&k).is_some();
            if !hit {
                moka_sync.insert(k, k);
            }
            hit
        })
        .count();
    let moka_ns = per_request(start);
    let start = std::time::Instant::now();
    let quick = quick_cache::sync::Cache::<u64, u64>::new(CAPACITY as usize);
    let quick_hits = stream
        .iter()
        .filter(|&&k| {
            let hit = quick.get(&k).is_some();
            if !hit {
                quick.insert(k, k);
            }
            hit
        })
        .count();
    let quick_ns = per_request(start);
    // Through the layer: a hit is a request the inner service did not see.
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = {
        let calls = calls.clone();
        service_fn(move |k: u64| {
            calls.fetch_add(1, Ordering::Relaxed);
            std::future::ready(Ok::<_, Infallible>(k))
        })
    };
    let tg = towerguard::cache::CacheLayer::builder(|k: &u64| Some(*k))
        .max_entries(CAPACITY)
        .build()
        .layer(counted);
    let rt = common::current_thread();
    let start = std::time::Instant::now();
    rt.block_on(async {
        for &k in &stream {
            tg.clone().oneshot(k).await.unwrap();
        }
    });
    let tg_ns = per_request(start);
    let tg_hits = REQUESTS - calls.load(Ordering::Relaxed);
    println!(
        "hit ratio, Zipf 0.9, {KEYS} keys, capacity {CAPACITY}, {REQUESTS} requests: \
         towerguard {:.1}%, moka sync {:.1}%, quick_cache {:.1}%; \
         ns per request (a miss inserts): towerguard {tg_ns:.0} (through the layer), \
         moka sync {moka_ns:.0}, quick_cache {quick_ns:.0} (by hand)",
        ratio(tg_hits),
        ratio(moka_hits),
        ratio(quick_hits)
    );
}

/// `n` keys drawn from a Zipf(`s`) distribution over `keys` keys (a fixed seed).
fn zipf_stream(keys: usize, s: f64, n: usize) -> Vec<u64> {
    let mut cumulative = Vec::with_capacity(keys);
    let mut total = 0.0;
    for rank in 1..=keys {
        total += 1.0 / (rank as f64).powf(s);
        cumulative.push(total);
    }
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|_| {
            // xorshift64*
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let x = state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11;
            let u = x as f64 / (1u64 << 53) as f64 * total;
            cumulative.partition_point(|&c| c < u) as u64
        })
        .collect()
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
    targets = hit, hit_prometheus, stampede_group
}
criterion_main!(benches);
