//! What a purge costs a single-flight cache's readers: a store of `ENTRIES` values
//! (default 1,000,000; one tag in a hundred per entry), one thread reading in a loop and a
//! purge on another: `invalidate_tag` (the reader asks only for keys it keeps, so every
//! read is a hit) or `invalidate_all` (reads after it are misses, each a flight and an
//! insert). Prints, per run, how long the purge took and the slowest read while it ran
//! beside the slowest in the half second before it.
//!
//!   cargo bench --bench purge                 (three runs of each)
//!   ENTRIES=100000 cargo bench --bench purge
#![allow(missing_docs)]

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use tower::{service_fn, Layer, Service, ServiceExt};
use towerguard::cache::CacheLayer;

/// The slowest read in nanoseconds since the last time it was taken.
type Slowest = Arc<AtomicU64>;

fn main() {
    let entries: u64 = std::env::var("ENTRIES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .expect("a runtime");
    println!("{entries} entries, one tag in 100 per entry");
    for purge in [Purge::Tag, Purge::All] {
        for run in 1..=3 {
            let (took, before, during) = runtime.block_on(one(entries, purge));
            println!(
                "{purge:?} run {run}: purge {:.1} ms; slowest read before {:.3} ms, while \
                 purging {:.3} ms",
                took.as_secs_f64() * 1e3,
                before as f64 / 1e6,
                during as f64 / 1e6
            );
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Purge {
    /// `invalidate_tag` of one tag in a hundred.
    Tag,
    /// `invalidate_all`.
    All,
}

async fn one(entries: u64, purge: Purge) -> (Duration, u64, u64) {
    let layer = CacheLayer::builder(|k: &u64| Some(*k))
        .max_entries(entries * 2)
        .tags(|k: &u64, _v: &u64| vec![format!("t{}", k % 100)])
        .build();
    let handle = layer.handle();
    let svc = layer.layer(service_fn(|k: u64| async move { Ok::<_, Infallible>(k) }));
    for k in 0..entries {
        svc.clone().oneshot(k).await.unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let slowest: Slowest = Arc::default();
    let started = Arc::new(Barrier::new(2));
    let reader = {
        let (stop, slowest, started, svc) = (stop.clone(), slowest.clone(), started.clone(), svc);
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                started.wait();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut svc = svc.clone();
                    let t = Instant::now();
                    let k = i * 7919 % entries;
                    // A tag purge: only keys it keeps, so every read is a hit.
                    let k = if purge == Purge::Tag && k % 100 == 7 {
                        k ^ 1
                    } else {
                        k
                    };
                    svc.ready().await.unwrap().call(k).await.unwrap();
                    slowest.fetch_max(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    i += 1;
                }
            })
        })
    };
    started.wait();
    // Half a second of reads before the purge, for comparison.
    slowest.store(0, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(500));
    let before = slowest.swap(0, Ordering::Relaxed);
    let t = Instant::now();
    match purge {
        Purge::Tag => handle.invalidate_tag("t7"),
        Purge::All => handle.invalidate_all(),
    }
    let took = t.elapsed();
    // A read the purge held up ends after it: counted once the reader has stopped.
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    let during = slowest.load(Ordering::Relaxed);
    if purge == Purge::Tag {
        let tagged = (0..entries).filter(|k| k % 100 == 7).count() as u64;
        assert_eq!(handle.entry_count(), entries - tagged);
    }
    (took, before, during)
}
