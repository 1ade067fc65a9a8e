//! A randomized model of a fleet over one real `redis-server`: three single-flight caches
//! and three HTTP caches, a seeded mix of gets, purges, invalidations, tag purges, purges
//! of everything, POSTs, upstream version bumps, slow and failing upstreams, callers that
//! give up, and a Redis restart, checked against the guarantee of
//! [`towerguard::cache`]: no caller that starts after a purge (or a POST's write-through)
//! returns gets a version older than the one it published.
//!
//! `MODEL_OPS` (default 3,000) and `MODEL_SEED` (default 1) set the run; the long run:
//!
//! ```text
//! MODEL_OPS=100000 MODEL_SEED=7 CI=1 cargo test --release --all-features --test fleet_model -- --nocapture
//! ```
//!
//! Skipped without `redis-server` unless `CI` is set.

#![cfg(all(feature = "redis", feature = "http"))]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::sync::RwLock;
use tower::{service_fn, Layer, ServiceExt};
use towerguard::cache::{CacheHandle, CacheLayer};
use towerguard::http::HttpCacheLayer;
use towerguard::tier::{RedisTier, Utf8};

mod support;
use support::redis_server::RedisServer;

/// xorshift64*: enough for a reproducible mix.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const KEYS: [&str; 6] = ["a/1", "a/2", "a/3", "b/1", "b/2", "b/3"];

/// The truth the upstreams serve, the floors purges set, and what was seen.
#[derive(Default)]
struct World {
    versions: Mutex<HashMap<String, u64>>,
    floors: Mutex<HashMap<String, u64>>,
    violations: Mutex<Vec<String>>,
    counts: Mutex<HashMap<&'static str, u64>>,
    calls: AtomicUsize,
    /// Mixed into each upstream call's behaviour.
    seed: AtomicU64,
}

impl World {
    fn version(&self, key: &str) -> u64 {
        *self.versions.lock().unwrap().get(key).unwrap_or(&0)
    }

    fn bump(&self, key: &str) -> u64 {
        let mut versions = self.versions.lock().unwrap();
        let v = versions.entry(key.to_owned()).or_default();
        *v += 1;
        *v
    }

    fn floor(&self, key: &str) -> u64 {
        *self.floors.lock().unwrap().get(key).unwrap_or(&0)
    }

    fn raise(&self, key: &str, version: u64) {
        let mut floors = self.floors.lock().unwrap();
        let floor = floors.entry(key.to_owned()).or_default();
        *floor = (*floor).max(version);
    }

    /// Bumps every key whose name starts with `tag` (every key for ""), named with
    /// `prefix`; the versions to raise the floors to once the purge returns.
    fn bump_tag(&self, tag: &str, prefix: &str) -> Vec<(String, u64)> {
        KEYS.iter()
            .filter(|k| k.starts_with(tag))
            .map(|k| {
                let name = format!("{prefix}{k}");
                let version = self.bump(&name);
                (name, version)
            })
            .collect()
    }

    fn raise_all(&self, bumped: Vec<(String, u64)>) {
        for (key, version) in bumped {
            self.raise(&key, version);
        }
    }

    fn count(&self, what: &'static str) {
        *self.counts.lock().unwrap().entry(what).or_default() += 1;
    }

    /// A value `key@v` seen by a caller that started when the floor was `floor`.
    fn seen(&self, what: &str, key: &str, floor: u64, value: &str, instance: usize) {
        let version: u64 = value
            .rsplit_once('@')
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or_else(|| panic!("unreadable value {value:?}"));
        if version < floor {
            self.violations.lock().unwrap().push(format!(
                "{what} {key} on instance {instance}: got version {version} after a purge published {floor}"
            ));
        }
    }

    /// How an upstream call behaves: a delay in microseconds (0 to 3 ms), and whether it
    /// fails (one call in twenty).
    fn behaviour(&self) -> (u64, bool) {
        let mut rng = Rng::new(self.seed.fetch_add(1, Ordering::Relaxed));
        (rng.below(3000), rng.below(20) == 0)
    }
}

type Generic = tower::util::BoxCloneSyncService<String, String, towerguard::Error>;
type Http = tower::util::BoxCloneSyncService<
    Request<Full<Bytes>>,
    Response<towerguard::http::BufferedBody<Full<Bytes>>>,
    towerguard::Error,
>;

fn tier(server: &RedisServer, prefix: &str) -> RedisTier {
    RedisTier::builder(server.url())
        .prefix(prefix)
        .timeout(Duration::from_millis(500))
        .breaker(3, Duration::ZERO)
        .lease_wait(Duration::from_millis(200))
        .build()
        .unwrap()
}

struct Fleet {
    tiers: Vec<RedisTier>,
    generic: Vec<(CacheHandle<String, String>, Generic)>,
    http: Vec<(HttpCacheLayer, Http)>,
}

async fn fleet(server: &RedisServer, world: &Arc<World>) -> Fleet {
    let mut fleet = Fleet {
        tiers: Vec::new(),
        generic: Vec::new(),
        http: Vec::new(),
    };
    for i in 0..3 {
        let tier = tier(server, "model:");
        let layer = CacheLayer::builder(|key: &String| Some(key.clone()))
            .name(format!("model-{i}"))
            .ttl(Duration::from_secs(60))
            .tags(|key: &String, _: &String| vec![key[..1].to_owned()])
            .second_tier(tier.clone(), |key: &String| key.clone(), Utf8)
            .build();
        let handle = layer.handle();
        let upstream_world = world.clone();
        let upstream = service_fn(move |key: String| {
            let world = upstream_world.clone();
            async move {
                world.calls.fetch_add(1, Ordering::Relaxed);
                let version = world.version(&key);
                let (delay, fails) = world.behaviour();
                tokio::time::sleep(Duration::from_micros(delay)).await;
                if fails {
                    return Err(std::io::Error::other("upstream failed"));
                }
                Ok(format!("{key}@{version}"))
            }
        });
        fleet.tiers.push(tier);
        fleet.generic.push((
            handle,
            tower::util::BoxCloneSyncService::new(layer.layer(upstream)),
        ));

        let tier = self::tier(server, "model-http:");
        let layer = HttpCacheLayer::builder()
            .name(format!("model-http-{i}"))
            .second_tier(tier.clone())
            .build();
        let origin_world = world.clone();
        let origin = service_fn(move |req: Request<Full<Bytes>>| {
            let world = origin_world.clone();
            async move {
                let path = req.uri().path().to_owned();
                if req.method() == Method::POST {
                    // The origin's write: a new version, published once the POST returns.
                    world.bump(&path);
                    let mut response = Response::new(Full::new(Bytes::new()));
                    *response.status_mut() = StatusCode::NO_CONTENT;
                    return Ok::<_, std::io::Error>(response);
                }
                world.calls.fetch_add(1, Ordering::Relaxed);
                let version = world.version(&path);
                let (delay, fails) = world.behaviour();
                tokio::time::sleep(Duration::from_micros(delay)).await;
                if fails {
                    return Err(std::io::Error::other("origin failed"));
                }
                Ok(Response::builder()
                    .header("cache-control", "max-age=60")
                    .header("cache-tag", &path[1..2])
                    .body(Full::new(Bytes::from(format!("{path}@{version}"))))
                    .unwrap())
            }
        });
        fleet.tiers.push(tier);
        fleet.http.push((
            layer.clone(),
            tower::util::BoxCloneSyncService::new(layer.layer(origin)),
        ));
    }
    for tier in &fleet.tiers {
        tier.backplane().wait_for(|b| b.subscribed).await.unwrap();
    }
    fleet
}

fn http_get(path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://origin.test{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// One worker's share of the run.
async fn worker(fleet: Arc<Fleet>, world: Arc<World>, gate: Arc<RwLock<()>>, seed: u64, ops: u64) {
    let mut rng = Rng::new(seed);
    for _ in 0..ops {
        let i = rng.below(3) as usize;
        let key = KEYS[rng.below(KEYS.len() as u64) as usize];
        let path = format!("/{key}");
        let gives_up = rng.below(20) == 0;
        let roll = rng.below(100);
        // Invalidations wait while Redis restarts (a purge Redis never took guarantees
        // nothing); gets go on through it.
        match roll {
            0..=34 => {
                world.count("get");
                let floor = world.floor(key);
                let call = fleet.generic[i].1.clone().oneshot(key.to_owned());
                let result = if gives_up {
                    match tokio::time::timeout(Duration::from_micros(rng.below(1500)), call).await {
                        Ok(result) => result,
                        Err(_) => {
                            world.count("gave up");
                            continue;
                        }
                    }
                } else {
                    call.await
                };
                match result {
                    Ok(value) => world.seen("get", key, floor, &value, i),
                    Err(_) => world.count("get failed"),
                }
            }
            35..=69 => {
                world.count("http get");
                let floor = world.floor(&path);
                match fleet.http[i].1.clone().oneshot(http_get(&path)).await {
                    Ok(response) if response.status() == StatusCode::OK => {
                        let body = response.into_body().collect().await.unwrap().to_bytes();
                        let body = std::str::from_utf8(&body).unwrap();
                        world.seen("http get", &path, floor, body, i);
                    }
                    _ => world.count("http get failed"),
                }
            }
            70..=77 => {
                world.count("purge");
                let _open = gate.read().await;
                let version = world.bump(key);
                fleet.generic[i].0.purge(&key.to_owned()).await;
                world.raise(key, version);
            }
            78..=81 => {
                world.count("invalidate");
                world.bump(key);
                fleet.generic[i].0.invalidate(&key.to_owned());
            }
            82..=84 => {
                world.count("purge_tag");
                let _open = gate.read().await;
                let tag = &key[..1];
                let bumped = world.bump_tag(tag, "");
                fleet.generic[i].0.purge_tag(tag).await;
                world.raise_all(bumped);
            }
            85 => {
                world.count("purge_all");
                let _open = gate.read().await;
                let bumped = world.bump_tag("", "");
                fleet.generic[i].0.purge_all().await;
                world.raise_all(bumped);
            }
            86..=91 => {
                world.count("post");
                let _open = gate.read().await;
                let request = Request::post(format!("http://origin.test{path}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let response = fleet.http[i].1.clone().oneshot(request).await.unwrap();
                assert_eq!(response.status(), StatusCode::NO_CONTENT);
                // The POST bumped the version before answering.
                world.raise(&path, world.version(&path));
            }
            92..=94 => {
                world.count("http purge_tag");
                let _open = gate.read().await;
                let tag = &key[..1];
                let bumped = world.bump_tag(tag, "/");
                fleet.http[i].0.purge_tag(tag).await;
                world.raise_all(bumped);
            }
            _ => {
                // The upstream changes with nobody told: no guarantee, only more versions.
                world.count("bump");
                world.bump(if rng.below(2) == 0 { key } else { &path });
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_caller_after_a_purge_gets_an_older_version_anywhere_in_the_fleet() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let ops: u64 = std::env::var("MODEL_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000);
    let seed: u64 = std::env::var("MODEL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    // Warnings (an invalidation some instance did not acknowledge in time) show with a
    // failure.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("towerguard::tier=warn")
        .with_test_writer()
        .try_init();
    let world = Arc::new(World::default());
    world.seed.store(seed << 32, Ordering::Relaxed);
    let fleet = Arc::new(fleet(&server, &world).await);
    let gate = Arc::new(RwLock::new(()));
    let workers = 8;
    let started = std::time::Instant::now();
    let half: Vec<_> = (0..workers)
        .map(|w| {
            let (fleet, world, gate) = (fleet.clone(), world.clone(), gate.clone());
            tokio::spawn(worker(
                fleet,
                world,
                gate,
                seed * 1000 + w,
                ops / workers / 2,
            ))
        })
        .collect();
    for task in half {
        task.await.unwrap();
    }
    // Redis restarts, empty, while gets go on; invalidations resume once every instance
    // is subscribed again.
    let gets: Vec<_> = (0..workers)
        .map(|w| {
            let (fleet, world, gate) = (fleet.clone(), world.clone(), gate.clone());
            tokio::spawn(worker(
                fleet,
                world,
                gate,
                seed * 1000 + 100 + w,
                ops / workers / 2,
            ))
        })
        .collect();
    {
        let _closed = gate.write().await;
        let before: Vec<u64> = fleet
            .tiers
            .iter()
            .map(|t| t.backplane().borrow().resyncs)
            .collect();
        server.stop();
        server.spawn().unwrap();
        for (tier, resyncs) in fleet.tiers.iter().zip(before) {
            let mut state = tier.backplane();
            state
                .wait_for(|b| b.subscribed && b.resyncs > resyncs)
                .await
                .unwrap();
        }
        world.count("redis restart");
    }
    for task in gets {
        task.await.unwrap();
    }
    let counts = world.counts.lock().unwrap().clone();
    let violations = world.violations.lock().unwrap().clone();
    let mut counts: Vec<_> = counts.into_iter().collect();
    counts.sort();
    println!(
        "seed {seed}, {ops} operations in {:?}: {counts:?}, upstream calls {}, violations {}",
        started.elapsed(),
        world.calls.load(Ordering::Relaxed),
        violations.len()
    );
    assert!(
        violations.is_empty(),
        "{} callers got a version a purge had replaced, first: {:?}",
        violations.len(),
        &violations[..violations.len().min(5)]
    );
}
