//! The cache's second tier in Redis, with three instances (separate first tiers) sharing
//! one `redis-server` that each test starts on a free loopback port and stops. Without
//! `redis-server` on the machine these tests are skipped, unless `CI` is set: then they fail.

#![cfg(feature = "redis")]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tower::{service_fn, Layer, Service, ServiceExt};
use towerguard::cache::CacheLayer;
use towerguard::tier::{RedisTier, Utf8};

/// A `redis-server` of the test's own, stopped when dropped.
struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: std::path::PathBuf,
}

impl RedisServer {
    /// Starts one on a free port, or `None` when `redis-server` is missing and `CI` is
    /// not set.
    fn start() -> Option<Self> {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("towerguard-redis-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = RedisServer {
            child: None,
            port,
            dir,
        };
        match server.spawn() {
            Ok(()) => Some(server),
            Err(error) if std::env::var_os("CI").is_none() => {
                eprintln!("skipped: cannot start redis-server ({error})");
                None
            }
            Err(error) => panic!("CI is set and redis-server cannot start: {error}"),
        }
    }

    /// Starts the server (again) on its port and returns once it accepts connections.
    fn spawn(&mut self) -> std::io::Result<()> {
        let mut child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        for line in lines.by_ref() {
            if line?.contains("Ready to accept connections") {
                // Keep reading its log so it never blocks on a full pipe.
                std::thread::spawn(move || lines.for_each(drop));
                self.child = Some(child);
                return Ok(());
            }
        }
        let _ = child.kill();
        Err(std::io::Error::other(
            "redis-server exited before it was ready",
        ))
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An upstream that counts its calls and answers `value of KEY #N`.
fn counting_upstream(
    calls: Arc<AtomicUsize>,
) -> impl Service<String, Response = String, Error = std::io::Error, Future = impl Send>
       + Clone
       + Send
       + 'static {
    service_fn(move |key: String| {
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        async move { Ok::<_, std::io::Error>(format!("value of {key} #{n}")) }
    })
}

fn tier(server: &RedisServer, prefix: &str) -> RedisTier {
    RedisTier::builder(server.url())
        .prefix(prefix)
        .timeout(Duration::from_millis(500))
        // Never stop trying, so a restarted Redis is used at once.
        .breaker(3, Duration::ZERO)
        .build()
        .unwrap()
}

fn instance(tier: RedisTier, name: &str) -> CacheLayer<String, String, String> {
    CacheLayer::builder(|key: &String| Some(key.clone()))
        .name(name)
        .ttl(Duration::from_secs(60))
        .second_tier(tier, |key: &String| key.clone(), Utf8)
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_stored_by_one_instance_is_a_second_tier_hit_on_the_others() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let calls = Arc::new(AtomicUsize::new(0));
    let tier = tier(&server, "share:");
    let instances: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|name| instance(tier.clone(), name).layer(counting_upstream(calls.clone())))
        .collect();
    let first = instances[0].clone().oneshot("k".to_owned()).await.unwrap();
    assert_eq!(first, "value of k #1");
    for other in &instances[1..] {
        let value = other.clone().oneshot("k".to_owned()).await.unwrap();
        assert_eq!(value, first, "read from the second tier");
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "one upstream call for three instances"
    );

    // Another key: each instance's first tier is its own, the second is shared.
    let b = instances[1].clone().oneshot("j".to_owned()).await.unwrap();
    let c = instances[2].clone().oneshot("j".to_owned()).await.unwrap();
    assert_eq!((b.as_str(), c.as_str()), ("value of j #2", "value of j #2"));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_removes_the_value_from_both_tiers() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let calls = Arc::new(AtomicUsize::new(0));
    let tier = tier(&server, "purge:");
    let a = instance(tier.clone(), "a");
    let handle = a.handle();
    let a = a.layer(counting_upstream(calls.clone()));
    let b = instance(tier, "b").layer(counting_upstream(calls.clone()));
    assert_eq!(
        a.clone().oneshot("k".into()).await.unwrap(),
        "value of k #1"
    );
    handle.purge(&"k".to_owned()).await;
    // b has never seen it: with the second tier purged, it goes to the upstream.
    assert_eq!(
        b.clone().oneshot("k".into()).await.unwrap(),
        "value of k #2"
    );
    assert_eq!(
        a.clone().oneshot("k".into()).await.unwrap(),
        "value of k #2"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_every_request_is_answered_and_the_tier_returns_with_redis() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let calls = Arc::new(AtomicUsize::new(0));
    let tier = tier(&server, "down:");
    let instances: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|name| instance(tier.clone(), name).layer(counting_upstream(calls.clone())))
        .collect();
    assert_eq!(
        instances[0].clone().oneshot("before".into()).await.unwrap(),
        "value of before #1"
    );

    server.stop();
    // Every instance answers every request: from its first tier, or from the upstream.
    assert_eq!(
        instances[0].clone().oneshot("before".into()).await.unwrap(),
        "value of before #1",
        "first tier"
    );
    for (i, svc) in instances.iter().enumerate() {
        for key in ["x", "y"] {
            let value = svc.clone().oneshot(key.to_owned()).await;
            assert!(value.is_ok(), "instance {i}, key {key}: {value:?}");
        }
    }
    let during = calls.load(Ordering::SeqCst);
    assert_eq!(
        during,
        1 + 6,
        "each instance called the upstream for x and y"
    );

    server.spawn().unwrap();
    // Redis is back (empty): the tier connects again by itself.
    let stored = instances[1].clone().oneshot("after".into()).await.unwrap();
    let read = instances[2].clone().oneshot("after".into()).await.unwrap();
    assert_eq!(read, stored, "a second-tier hit once Redis is back");
    assert_eq!(calls.load(Ordering::SeqCst), during + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_failures_the_breaker_keeps_requests_off_redis() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let tier = RedisTier::builder(server.url())
        .prefix("breaker:")
        .breaker(2, Duration::from_secs(3600))
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = instance(tier.clone(), "breaker").layer(counting_upstream(calls.clone()));
    assert!(!tier.is_open());
    server.stop();
    // A miss reads (fails), calls the upstream, writes (fails): two failures open it.
    svc.clone().oneshot("k".into()).await.unwrap();
    assert!(tier.is_open(), "open after two failures in a row");
    server.spawn().unwrap();
    // Open: the instance stays on its first tier and the upstream.
    let before = calls.load(Ordering::SeqCst);
    svc.clone().oneshot("j".into()).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), before + 1);
    assert!(tier.is_open());
}

#[test]
fn the_readme_lists_the_second_tier_metrics() {
    let readme = include_str!("../README.md");
    let mut listed: Vec<&str> = readme
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split('`').next())
        .filter(|name| name.starts_with("towerguard_second_tier_"))
        .collect();
    listed.sort_unstable();
    let mut metrics: Vec<&str> = towerguard::metrics::TIER_METRICS
        .iter()
        .map(|m| m.name)
        .collect();
    metrics.sort_unstable();
    assert_eq!(listed, metrics);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_second_tier_reports_hits_misses_and_writes() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let tier = tier(&server, "metrics:");
    let (a, b) = metrics::with_local_recorder(&recorder, || {
        (instance(tier.clone(), "m-a"), instance(tier.clone(), "m-b"))
    });
    let calls = Arc::new(AtomicUsize::new(0));
    a.layer(counting_upstream(calls.clone()))
        .oneshot("k".into())
        .await
        .unwrap();
    b.layer(counting_upstream(calls.clone()))
        .oneshot("k".into())
        .await
        .unwrap();
    // One snapshot: taking one resets the counters.
    let snapshot = snapshotter.snapshot().into_vec();
    let counter = |name: &str, result: &str| {
        snapshot
            .iter()
            .find(|(key, _, _, _)| {
                let key = key.key();
                key.name() == "towerguard_second_tier_requests_total"
                    && key.labels().any(|l| l.key() == "name" && l.value() == name)
                    && key
                        .labels()
                        .any(|l| l.key() == "result" && l.value() == result)
            })
            .map(|(_, _, _, value)| match value {
                metrics_util::debugging::DebugValue::Counter(n) => *n,
                other => panic!("{other:?}"),
            })
            .unwrap_or(0)
    };
    assert_eq!(counter("m-a", "miss"), 1);
    assert_eq!(counter("m-a", "write"), 1);
    assert_eq!(counter("m-b", "hit"), 1);
    assert_eq!(counter("m-b", "write"), 0);
}
