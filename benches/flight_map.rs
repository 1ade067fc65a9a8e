//! Which map should hold the cache's flights under way?
//!
//! Replays the in-flight map's access pattern (look up or insert a flight for a key, then
//! remove it if it is still the same flight) on the candidates: `DashMap`, a sharded
//! `Mutex<HashMap>`, one `Mutex<HashMap>`, and moka's sync cache. Run on one thread and on
//! two threads at once, over spread keys and over one hot key.
#![allow(missing_docs)]

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

type Flight = Arc<u64>;

trait FlightMap: Send + Sync {
    fn enter(&self, key: u64) -> Flight;
    fn leave(&self, key: u64, flight: &Flight);
}

#[derive(Default)]
struct Dash(dashmap::DashMap<u64, Flight>);

impl FlightMap for Dash {
    fn enter(&self, key: u64) -> Flight {
        self.0.entry(key).or_insert_with(|| Arc::new(key)).clone()
    }
    fn leave(&self, key: u64, flight: &Flight) {
        self.0.remove_if(&key, |_, f| Arc::ptr_eq(f, flight));
    }
}

struct Sharded {
    hasher: RandomState,
    shards: Vec<Mutex<HashMap<u64, Flight>>>,
}

impl Default for Sharded {
    fn default() -> Self {
        Sharded {
            hasher: RandomState::new(),
            shards: (0..16).map(|_| Mutex::default()).collect(),
        }
    }
}

impl Sharded {
    fn shard(&self, key: u64) -> &Mutex<HashMap<u64, Flight>> {
        &self.shards[self.hasher.hash_one(key) as usize % self.shards.len()]
    }
}

impl FlightMap for Sharded {
    fn enter(&self, key: u64) -> Flight {
        let mut shard = self.shard(key).lock().unwrap();
        shard.entry(key).or_insert_with(|| Arc::new(key)).clone()
    }
    fn leave(&self, key: u64, flight: &Flight) {
        let mut shard = self.shard(key).lock().unwrap();
        if shard.get(&key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            shard.remove(&key);
        }
    }
}

#[derive(Default)]
struct OneMutex(Mutex<HashMap<u64, Flight>>);

impl FlightMap for OneMutex {
    fn enter(&self, key: u64) -> Flight {
        let mut map = self.0.lock().unwrap();
        map.entry(key).or_insert_with(|| Arc::new(key)).clone()
    }
    fn leave(&self, key: u64, flight: &Flight) {
        let mut map = self.0.lock().unwrap();
        if map.get(&key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            map.remove(&key);
        }
    }
}

struct Moka(moka::sync::Cache<u64, Flight>);

impl Default for Moka {
    fn default() -> Self {
        Moka(moka::sync::Cache::new(100_000))
    }
}

impl FlightMap for Moka {
    fn enter(&self, key: u64) -> Flight {
        self.0.get_with(key, || Arc::new(key))
    }
    fn leave(&self, key: u64, flight: &Flight) {
        self.0.entry(key).and_compute_with(|current| match current {
            Some(current) if Arc::ptr_eq(current.value(), flight) => moka::ops::compute::Op::Remove,
            _ => moka::ops::compute::Op::Nop,
        });
    }
}

/// Runs `iters` enter/leave pairs split over `threads` threads; `hot` uses one key.
fn run(map: &Arc<dyn FlightMap>, threads: u64, iters: u64, hot: bool) -> Duration {
    let per_thread = iters.div_ceil(threads);
    let start = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..threads {
            let map = map.clone();
            scope.spawn(move || {
                for i in 0..per_thread {
                    let key = if hot {
                        7
                    } else {
                        (i * 7919 + t * 104_729) % 4096
                    };
                    let flight = map.enter(black_box(key));
                    // A second caller joins before the flight ends.
                    let joined = map.enter(key);
                    map.leave(key, &joined);
                    map.leave(key, &flight);
                }
            });
        }
    });
    start.elapsed()
}

fn flight_map(c: &mut Criterion) {
    type Make = fn() -> Arc<dyn FlightMap>;
    let candidates: Vec<(&str, Make)> = vec![
        ("dashmap", || Arc::new(Dash::default())),
        ("sharded_mutex", || Arc::new(Sharded::default())),
        ("one_mutex", || Arc::new(OneMutex::default())),
        ("moka", || Arc::new(Moka::default())),
    ];
    let mut group = c.benchmark_group("flight_map");
    for (threads, hot) in [(1, false), (2, false), (2, true)] {
        let case = format!("{threads}t_{}", if hot { "hot" } else { "spread" });
        for (name, make) in &candidates {
            let map = make();
            group.bench_with_input(BenchmarkId::new(*name, &case), &(), |b, _| {
                b.iter_custom(|iters| run(&map, threads, iters, hot))
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = flight_map
}
criterion_main!(benches);
