//! The cache's second tier in Redis, with three instances (separate first tiers, each with
//! its own connections) sharing one `redis-server` that each test starts on a free
//! loopback port and stops: the second tier, the cross-instance lease, the backplane, and
//! Redis failing. Without `redis-server` on the machine these tests are skipped, unless
//! `CI` is set: then they fail.

#![cfg(feature = "redis")]

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tower::{service_fn, Layer, Service, ServiceExt};

mod support;
use support::redis_server::RedisServer;
use towerguard::cache::CacheLayer;
use towerguard::tier::{RedisTier, Utf8};

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
    // Each miss's read fails (and the flight then leaves Redis alone): two misses, two
    // failures in a row, open it.
    svc.clone().oneshot("k".into()).await.unwrap();
    assert!(!tier.is_open(), "one failure");
    svc.clone().oneshot("k2".into()).await.unwrap();
    assert!(tier.is_open(), "open after two failures in a row");
    server.spawn().unwrap();
    // Open: the instance stays on its first tier and the upstream.
    let before = calls.load(Ordering::SeqCst);
    svc.clone().oneshot("j".into()).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), before + 1);
    assert!(tier.is_open());
}

/// Sends one command to `server` over a plain socket and returns its first reply line.
fn command(server: &RedisServer, line: &str) -> String {
    use std::io::{Read, Write};
    let mut socket = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    socket.write_all(format!("{line}\r\n").as_bytes()).unwrap();
    let mut reply = [0u8; 256];
    let n = socket.read(&mut reply).unwrap();
    String::from_utf8_lossy(&reply[..n]).trim_end().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_at_start_tells_a_refused_password_and_a_stopped_server_from_one_that_answers() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let within = Duration::from_secs(5);
    let open = RedisTier::builder(server.url()).build().unwrap();
    open.check(within)
        .await
        .expect("a Redis without a password answers");

    assert_eq!(command(&server, "CONFIG SET requirepass s3cret"), "+OK");
    let without = RedisTier::builder(server.url()).build().unwrap();
    let err = without.check(within).await.unwrap_err();
    assert_eq!(err.kind(), towerguard::ErrorKind::Inner);
    assert!(err.chain().contains("NOAUTH"), "{}", err.chain());
    let port = server.port;
    let wrong = RedisTier::builder(format!("redis://:wrong@127.0.0.1:{port}/"))
        .build()
        .unwrap();
    let err = wrong.check(within).await.unwrap_err();
    assert!(
        err.chain().to_lowercase().contains("authentication"),
        "{}",
        err.chain()
    );
    let right = RedisTier::builder(format!("redis://:s3cret@127.0.0.1:{port}/"))
        .build()
        .unwrap();
    right.check(within).await.expect("the right password");

    server.stop();
    let err = right.check(within).await.unwrap_err();
    assert!(err.chain().contains("refused"), "{}", err.chain());
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

/// Three instances, each with its own tier (connections and backplane subscriber), all
/// subscribed before the test goes on.
async fn fleet(
    server: &RedisServer,
    prefix: &str,
    upstream: impl Fn(usize) -> BoxUpstream,
) -> Vec<(
    RedisTier,
    towerguard::cache::CacheHandle<String, String>,
    BoxService,
)> {
    fleet_of(|| tier(server, prefix), upstream).await
}

/// [`fleet`] with tiers of `make_tier`'s making.
async fn fleet_of(
    make_tier: impl Fn() -> RedisTier,
    upstream: impl Fn(usize) -> BoxUpstream,
) -> Vec<(
    RedisTier,
    towerguard::cache::CacheHandle<String, String>,
    BoxService,
)> {
    let mut out = Vec::new();
    for i in 0..3 {
        let tier = make_tier();
        let layer = CacheLayer::builder(|key: &String| Some(key.clone()))
            .name(format!("fleet-{i}"))
            .ttl(Duration::from_secs(60))
            .tags(|key: &String, _: &String| {
                key.split('/')
                    .next()
                    .map(|t| vec![t.to_owned()])
                    .unwrap_or_default()
            })
            .second_tier(tier.clone(), |key: &String| key.clone(), Utf8)
            .build();
        let handle = layer.handle();
        let svc = tower::util::BoxCloneSyncService::new(layer.layer(upstream(i)));
        let mut state = tier.backplane();
        state.wait_for(|b| b.subscribed).await.unwrap();
        out.push((tier, handle, svc));
    }
    out
}

type BoxService = tower::util::BoxCloneSyncService<String, String, towerguard::Error>;
type BoxUpstream = tower::util::BoxCloneSyncService<String, String, std::io::Error>;

fn boxed_counting(calls: Arc<AtomicUsize>) -> BoxUpstream {
    tower::util::BoxCloneSyncService::new(counting_upstream(calls))
}

/// Waits until `tier`'s backplane has applied `n` messages from other instances.
async fn applied(tier: &RedisTier, n: u64) {
    let mut state = tier.backplane();
    state.wait_for(|b| b.applied >= n).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_callers_of_a_cold_key_over_three_instances_make_one_upstream_call() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let calls = Arc::new(AtomicUsize::new(0));
    let upstream_calls = calls.clone();
    // A backend that takes its time, as a cold key's backend does.
    let fleet = fleet(&server, "cold:", move |i| {
        let calls = upstream_calls.clone();
        tower::util::BoxCloneSyncService::new(service_fn(move |key: String| {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok::<_, std::io::Error>(format!("{key} from instance {i} #{n}"))
            }
        }))
    })
    .await;
    let callers: Vec<_> = (0..1000)
        .map(|n| {
            let svc = fleet[n % 3].2.clone();
            tokio::spawn(svc.oneshot("cold".to_owned()))
        })
        .collect();
    let mut answers = std::collections::HashSet::new();
    for caller in callers {
        answers.insert(caller.await.unwrap().unwrap());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one upstream call in all");
    assert_eq!(
        answers.len(),
        1,
        "every caller got that one answer: {answers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_and_invalidate_tag_on_one_instance_reach_every_instance() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let calls = Arc::new(AtomicUsize::new(0));
    let upstream_calls = calls.clone();
    let fleet = fleet(&server, "bus:", move |_| {
        boxed_counting(upstream_calls.clone())
    })
    .await;
    let get = |i: usize, key: &str| {
        let svc = fleet[i].2.clone();
        let key = key.to_owned();
        async move { svc.oneshot(key).await.unwrap() }
    };

    // One write on instance 0, read by the others from the second tier.
    assert_eq!(get(0, "news/1").await, "value of news/1 #1");
    assert_eq!(get(1, "news/1").await, "value of news/1 #1");
    assert_eq!(get(2, "news/1").await, "value of news/1 #1");
    // The write's message has reached 1 and 2; then each holds the value in memory.
    applied(&fleet[1].0, 1).await;
    applied(&fleet[2].0, 1).await;
    assert_eq!(get(1, "news/1").await, "value of news/1 #1");
    assert_eq!(get(2, "news/1").await, "value of news/1 #1");

    // invalidate on 0: once its message has arrived, nobody serves #1.
    let start = std::time::Instant::now();
    fleet[0].1.purge(&"news/1".to_owned()).await;
    applied(&fleet[1].0, 2).await;
    applied(&fleet[2].0, 2).await;
    let delay = start.elapsed();
    for i in [1, 2, 0] {
        assert_eq!(get(i, "news/1").await, "value of news/1 #2", "instance {i}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    println!("invalidate: every instance had the message {delay:?} after the call");

    // invalidate_tag on 2: every value tagged `sport` goes, on every instance and in Redis.
    for key in ["sport/1", "sport/2"] {
        get(0, key).await;
        get(1, key).await;
    }
    let weather = get(0, "weather/1").await;
    // Messages applied so far: on 0, the write of news/1 #2 by 1; on 1, 0's write and
    // invalidation of news/1 and its three writes since.
    applied(&fleet[0].0, 1).await;
    applied(&fleet[1].0, 5).await;
    assert_eq!(
        get(1, "sport/1").await,
        "value of sport/1 #3",
        "held before"
    );
    let start = std::time::Instant::now();
    fleet[2].1.purge_tag("sport").await;
    applied(&fleet[0].0, 2).await;
    applied(&fleet[1].0, 6).await;
    let delay = start.elapsed();
    println!("invalidate_tag: every instance had the message {delay:?} after the call");
    assert_eq!(get(1, "sport/1").await, "value of sport/1 #6");
    assert_eq!(get(0, "sport/1").await, "value of sport/1 #6");
    assert_eq!(get(0, "sport/2").await, "value of sport/2 #7");
    assert_eq!(get(2, "sport/2").await, "value of sport/2 #7");
    // Untagged values stay, in memory and in Redis.
    assert_eq!(get(0, "weather/1").await, weather);
    assert_eq!(get(2, "weather/1").await, weather);
    assert_eq!(calls.load(Ordering::SeqCst), 7);
}

/// A tag purge from another instance scans this instance's store (the tag function runs
/// for every entry) off the runtime's workers: on a current-thread runtime, whose one
/// thread would otherwise run the whole scan, other tasks go on meanwhile.
#[tokio::test]
async fn a_tag_purge_from_another_instance_leaves_the_runtime_free() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let calls = Arc::new(AtomicUsize::new(0));
    let by_path = |key: &String| {
        key.split('/')
            .next()
            .map(|t| vec![t.to_owned()])
            .unwrap_or_default()
    };
    // While armed, the listener's tag function asks a task of this runtime for an answer
    // and waits for it (10 s at most, then it notes that the runtime was held up).
    let armed = Arc::new(AtomicBool::new(false));
    let held_up = Arc::new(AtomicBool::new(false));
    let (ask, mut asked) = tokio::sync::mpsc::unbounded_channel::<std::sync::mpsc::Sender<()>>();
    tokio::spawn(async move {
        while let Some(answer) = asked.recv().await {
            let _ = answer.send(());
        }
    });
    let tags = {
        let (armed, held_up) = (armed.clone(), held_up.clone());
        move |key: &String, _: &String| {
            if armed.load(Ordering::SeqCst) {
                let (answer, answered) = std::sync::mpsc::channel();
                ask.send(answer).unwrap();
                if answered.recv_timeout(Duration::from_secs(10)).is_err() {
                    held_up.store(true, Ordering::SeqCst);
                }
            }
            by_path(key)
        }
    };
    let (purger_tier, listener_tier) = (tier(&server, "free:"), tier(&server, "free:"));
    let purger = CacheLayer::builder(|key: &String| Some(key.clone()))
        .name("free-purger")
        .ttl(Duration::from_secs(60))
        .tags(move |key: &String, _: &String| by_path(key))
        .second_tier(purger_tier.clone(), |key: &String| key.clone(), Utf8)
        .build();
    let listener = CacheLayer::builder(|key: &String| Some(key.clone()))
        .name("free-listener")
        .ttl(Duration::from_secs(60))
        .tags(tags)
        .second_tier(listener_tier.clone(), |key: &String| key.clone(), Utf8)
        .build();
    let svc = listener.layer(counting_upstream(calls.clone()));
    for tier in [&purger_tier, &listener_tier] {
        tier.backplane().wait_for(|b| b.subscribed).await.unwrap();
    }
    assert_eq!(
        svc.clone().oneshot("sport/1".to_owned()).await.unwrap(),
        "value of sport/1 #1"
    );

    armed.store(true, Ordering::SeqCst);
    purger.handle().purge_tag("sport").await;
    applied(&listener_tier, 1).await;
    armed.store(false, Ordering::SeqCst);
    assert!(
        !held_up.load(Ordering::SeqCst),
        "the scan held up the runtime's thread"
    );
    assert_eq!(
        svc.oneshot("sport/1".to_owned()).await.unwrap(),
        "value of sport/1 #2",
        "purged here and in Redis"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_all_on_one_instance_empties_redis_and_every_instance() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let calls = Arc::new(AtomicUsize::new(0));
    let upstream_calls = calls.clone();
    let fleet = fleet(&server, "all:", move |_| {
        boxed_counting(upstream_calls.clone())
    })
    .await;
    for key in ["a/1", "b/2"] {
        fleet[0].2.clone().oneshot(key.to_owned()).await.unwrap();
        fleet[1].2.clone().oneshot(key.to_owned()).await.unwrap();
    }
    // Instance 1 holds both (after 0's two writes reached it); Redis too.
    applied(&fleet[1].0, 2).await;
    for key in ["a/1", "b/2"] {
        fleet[1].2.clone().oneshot(key.to_owned()).await.unwrap();
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    fleet[2].1.purge_all().await;
    let mut keys = redis::cmd("KEYS");
    keys.arg("all:v:*");
    let left: Vec<String> = redis_cmd(&server, &keys).await;
    assert!(left.is_empty(), "{left:?}");
    applied(&fleet[1].0, 3).await;
    assert_eq!(
        fleet[1].2.clone().oneshot("a/1".to_owned()).await.unwrap(),
        "value of a/1 #3"
    );
}

/// Sends one command to the test's Redis.
async fn redis_cmd<T: redis::FromRedisValue>(server: &RedisServer, cmd: &redis::Cmd) -> T {
    let client = redis::Client::open(server.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    cmd.query_async(&mut connection).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_holder_whose_flight_is_dropped_lets_another_instance_take_over() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let started_tx = Arc::new(std::sync::Mutex::new(Some(started_tx)));
    let calls = Arc::new(AtomicUsize::new(0));
    let upstream_calls = calls.clone();
    let fleet = fleet(&server, "drop:", move |i| {
        let (calls, started) = (upstream_calls.clone(), started_tx.clone());
        tower::util::BoxCloneSyncService::new(service_fn(move |key: String| {
            calls.fetch_add(1, Ordering::SeqCst);
            let started = started.lock().unwrap().take();
            async move {
                if i == 0 {
                    // Instance 0 holds the lease and never answers.
                    if let Some(started) = started {
                        let _ = started.send(());
                    }
                    std::future::pending::<()>().await;
                }
                Ok::<_, std::io::Error>(format!("{key} from instance {i}"))
            }
        }))
    })
    .await;
    let holder = tokio::spawn(fleet[0].2.clone().oneshot("k".to_owned()));
    // Its upstream runs only once it holds the lease.
    started_rx.await.unwrap();
    let waiter = tokio::spawn(fleet[1].2.clone().oneshot("k".to_owned()));
    // The holder's only caller goes away: its flight is dropped and the lease released.
    holder.abort();
    assert!(holder.await.unwrap_err().is_cancelled());
    assert_eq!(waiter.await.unwrap().unwrap(), "k from instance 1");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // Instance 1 wrote it: instance 2 reads it from Redis.
    assert_eq!(
        fleet[2].2.clone().oneshot("k".to_owned()).await.unwrap(),
        "k from instance 1"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A fleet whose leases last 300 ms and whose waiters wait `wait`, and a request for `k`
/// on instance 0, returned once its upstream call has started (so instance 0 holds the
/// lease); that call answers after `holder_takes` (never, when `None`).
async fn leased_fleet(
    server: &RedisServer,
    prefix: &str,
    wait: Duration,
    holder_takes: Option<Duration>,
    calls: Arc<AtomicUsize>,
) -> (
    Vec<(
        RedisTier,
        towerguard::cache::CacheHandle<String, String>,
        BoxService,
    )>,
    tokio::task::JoinHandle<Result<String, towerguard::Error>>,
) {
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let started_tx = Arc::new(std::sync::Mutex::new(Some(started_tx)));
    let make_tier = || {
        RedisTier::builder(server.url())
            .prefix(prefix)
            .timeout(Duration::from_millis(500))
            .lease(Duration::from_millis(300))
            .lease_wait(wait)
            .build()
            .unwrap()
    };
    let fleet = fleet_of(make_tier, move |i| {
        let (calls, started) = (calls.clone(), started_tx.clone());
        tower::util::BoxCloneSyncService::new(service_fn(move |key: String| {
            calls.fetch_add(1, Ordering::SeqCst);
            let started = started.lock().unwrap().take();
            async move {
                if i == 0 {
                    if let Some(started) = started {
                        let _ = started.send(());
                    }
                    // The slow upstream under test, not a wait for an event.
                    match holder_takes {
                        Some(takes) => tokio::time::sleep(takes).await,
                        None => std::future::pending().await,
                    }
                }
                Ok::<_, std::io::Error>(format!("{key} from instance {i}"))
            }
        }))
    })
    .await;
    let holder = tokio::spawn(fleet[0].2.clone().oneshot("k".to_owned()));
    started_rx.await.unwrap();
    (fleet, holder)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flight_slower_than_its_lease_keeps_it_and_the_fleet_calls_the_upstream_once() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let calls = Arc::new(AtomicUsize::new(0));
    let (fleet, holder) = leased_fleet(
        &server,
        "slow:",
        Duration::from_secs(30),
        Some(Duration::from_millis(1200)),
        calls.clone(),
    )
    .await;
    // Both wait on instance 0's lease, which it renews for four times its length.
    let waiters = [1, 2].map(|i| tokio::spawn(fleet[i].2.clone().oneshot("k".to_owned())));
    assert_eq!(holder.await.unwrap().unwrap(), "k from instance 0");
    for waiter in waiters {
        assert_eq!(waiter.await.unwrap().unwrap(), "k from instance 0");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Released once written: nothing is left to lapse.
    let lease: Option<String> = redis_cmd(&server, redis::cmd("GET").arg("slow:l:k")).await;
    assert_eq!(lease, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_calls_the_upstream_itself_once_the_lease_wait_runs_out() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let calls = Arc::new(AtomicUsize::new(0));
    let (fleet, holder) = leased_fleet(
        &server,
        "waitout:",
        Duration::from_millis(400),
        None,
        calls.clone(),
    )
    .await;
    let waited_from = std::time::Instant::now();
    let value = fleet[1].2.clone().oneshot("k".to_owned()).await.unwrap();
    assert_eq!(value, "k from instance 1");
    assert!(waited_from.elapsed() >= Duration::from_millis(400));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    holder.abort();
}

/// The upstream calls of a burst over three instances, in the order they start: the
/// first (the lease holder's) says so and waits to be let go; the second says so and
/// answers only once the third has started. So the burst ends only if the other two
/// instances call their upstreams at the same time, not one after the other.
#[derive(Default)]
struct Overlap {
    calls: AtomicUsize,
    started: tokio::sync::Notify,
    go: tokio::sync::Notify,
    second: tokio::sync::Notify,
    third: tokio::sync::Notify,
}

impl Overlap {
    async fn call(&self) -> usize {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        match n {
            1 => {
                self.started.notify_one();
                self.go.notified().await;
            }
            2 => {
                self.second.notify_one();
                self.third.notified().await;
            }
            3 => self.third.notify_one(),
            _ => {}
        }
        n
    }

    /// Runs `burst` (the two waiters' requests) to its end; a deadlock guard fails the
    /// test if it does not end (the waiters' lease wait is an hour, the burst takes
    /// milliseconds).
    async fn ends<T>(&self, burst: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(20), burst)
            .await
            .expect("the upstream calls ran one after the other, not together")
    }

    /// The answers of `waiters` (the burst's requests), sorted, once every one has ended
    /// (under the deadlock guard of [`ends`](Self::ends)).
    async fn answers<F>(&self, waiters: impl IntoIterator<Item = F>) -> Vec<String>
    where
        F: std::future::Future<Output = String>,
    {
        let mut answers = self
            .ends(async {
                let mut answers = Vec::new();
                for waiter in waiters {
                    answers.push(waiter.await);
                }
                answers
            })
            .await;
        answers.sort();
        answers
    }
}

/// A tier whose waiters would wait an hour for a lease.
fn patient_tier(server: &RedisServer, prefix: &str) -> RedisTier {
    RedisTier::builder(server.url())
        .prefix(prefix)
        .timeout(Duration::from_millis(500))
        .lease_wait(Duration::from_secs(3600))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_not_to_be_stored_sends_the_instances_waiting_on_its_lease_to_their_upstreams_together(
) {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let overlap = Arc::new(Overlap::default());
    let mut fleet = Vec::new();
    for i in 0..3 {
        let tier = patient_tier(&server, "unstored:");
        let layer = CacheLayer::builder(|key: &String| Some(key.clone()))
            .name(format!("unstored-{i}"))
            .storable(|_: &String| towerguard::cache::Storable::No)
            .second_tier(tier.clone(), |key: &String| key.clone(), Utf8)
            .build();
        let overlap = overlap.clone();
        let svc = layer.layer(service_fn(move |key: String| {
            let overlap = overlap.clone();
            async move { Ok::<_, std::io::Error>(format!("{key} #{}", overlap.call().await)) }
        }));
        tier.backplane().wait_for(|b| b.subscribed).await.unwrap();
        fleet.push(svc);
    }
    let holder = tokio::spawn(fleet[0].clone().oneshot("k".to_owned()));
    overlap.started.notified().await;
    let waiters = [1, 2].map(|i| tokio::spawn(fleet[i].clone().oneshot("k".to_owned())));
    overlap.go.notify_one();
    assert_eq!(holder.await.unwrap().unwrap(), "k #1");
    let answers = overlap
        .answers(waiters.map(|waiter| async { waiter.await.unwrap().unwrap() }))
        .await;
    assert_eq!(answers, ["k #2", "k #3"]);
    // The key is marked in Redis (no value): the next miss anywhere calls its upstream
    // without waiting for a lease.
    let mark: Vec<u8> = redis_cmd(&server, redis::cmd("GET").arg("unstored:v:k")).await;
    assert_eq!(mark, b"towerguard:unstored");
    assert_eq!(
        fleet[1].clone().oneshot("k".to_owned()).await.unwrap(),
        "k #4"
    );
    let lease: Option<String> = redis_cmd(&server, redis::cmd("GET").arg("unstored:l:k")).await;
    assert_eq!(lease, None, "nobody took the lease for it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_above_max_value_bytes_stays_in_the_first_tier_and_marks_its_key_in_redis() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    // "value of k #1" is 13 bytes, 49 with the envelope; "short" (41) fits.
    let make = || {
        RedisTier::builder(server.url())
            .prefix("large:")
            .timeout(Duration::from_millis(500))
            .max_value_bytes(44)
            .build()
            .unwrap()
    };
    let calls = Arc::new(AtomicUsize::new(0));
    let a = instance(make(), "large-a").layer(counting_upstream(calls.clone()));
    let b = instance(make(), "large-b").layer(counting_upstream(calls.clone()));
    assert_eq!(
        a.clone().oneshot("k".into()).await.unwrap(),
        "value of k #1"
    );
    let mark: Vec<u8> = redis_cmd(&server, redis::cmd("GET").arg("large:v:k")).await;
    assert_eq!(mark, b"towerguard:unstored", "the value is not in Redis");
    // A keeps it in its first tier; B calls its own upstream.
    assert_eq!(
        a.clone().oneshot("k".into()).await.unwrap(),
        "value of k #1"
    );
    assert_eq!(
        b.clone().oneshot("k".into()).await.unwrap(),
        "value of k #2"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // Below the bound, values go to Redis as before.
    let short = instance(make(), "large-c").layer(service_fn(|_: String| async {
        Ok::<_, std::io::Error>("short".to_owned())
    }));
    short.oneshot("s".into()).await.unwrap();
    let value: Vec<u8> = redis_cmd(&server, redis::cmd("GET").arg("large:v:s")).await;
    assert!(value.ends_with(b"short"), "{value:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_whose_holder_died_is_taken_over_once_it_lapses_never_before() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    // A holder that died: its lease stays for 300 ms and nothing releases it.
    let mut set = redis::cmd("SET");
    set.arg("dead:l:k").arg("gone").arg("PX").arg(300);
    let set_at = std::time::Instant::now();
    let () = redis_cmd(&server, &set).await;
    let called_at = Arc::new(std::sync::Mutex::new(None));
    let seen = called_at.clone();
    let fleet = fleet(&server, "dead:", move |_| {
        let seen = seen.clone();
        tower::util::BoxCloneSyncService::new(service_fn(move |key: String| {
            *seen.lock().unwrap() = Some(std::time::Instant::now());
            async move { Ok::<_, std::io::Error>(format!("{key} fetched")) }
        }))
    })
    .await;
    let value = fleet[1].2.clone().oneshot("k".to_owned()).await.unwrap();
    assert_eq!(value, "k fetched");
    let called = called_at.lock().unwrap().expect("the upstream was called");
    assert!(
        called.duration_since(set_at) >= Duration::from_millis(300),
        "the upstream was called while the dead holder's lease stood"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_or_hung_mid_run_fails_no_request_and_on_restart_the_fleet_is_whole_again() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let calls = Arc::new(AtomicUsize::new(0));
    let upstream_calls = calls.clone();
    let fleet = fleet(&server, "chaos:", move |_| {
        boxed_counting(upstream_calls.clone())
    })
    .await;
    let get = |i: usize, key: String| fleet[i].2.clone().oneshot(key);
    get(0, "held".into()).await.unwrap();
    get(1, "held".into()).await.unwrap();

    // Hung: Redis accepts nothing and answers nothing. Every operation waits out its
    // timeout (500 ms here), then the request goes on without it.
    let pid = server.child.as_ref().unwrap().id().to_string();
    let signal = |sig: &str| {
        let status = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(status.success());
    };
    signal("-STOP");
    let mut slowest = Duration::ZERO;
    for i in 0..3 {
        let start = std::time::Instant::now();
        // A hang detector, not a speed check: a request Redis could hold would never end.
        let value = tokio::time::timeout(Duration::from_secs(30), get(i, format!("hung-{i}")))
            .await
            .expect("a request waited on a hung Redis");
        assert!(value.is_ok(), "{value:?}");
        slowest = slowest.max(start.elapsed());
    }
    // First-tier hits do not touch Redis at all.
    assert!(get(0, "held".into()).await.is_ok());
    signal("-CONT");
    println!("Redis hung: slowest request {slowest:?} (timeout 500 ms per operation)");

    // Stopped: connections refused.
    server.stop();
    for i in 0..3 {
        for key in ["down-a", "down-b"] {
            let value = get(i, key.into()).await;
            assert!(value.is_ok(), "instance {i}, {key}: {value:?}");
        }
    }
    let mut states: Vec<_> = fleet.iter().map(|f| f.0.backplane()).collect();
    for state in &mut states {
        state.wait_for(|b| !b.subscribed).await.unwrap();
    }

    // Restarted: the backplane subscribes again by itself (and the first tiers are
    // emptied, since messages were missed), and the tiers share again.
    server.spawn().unwrap();
    for state in &mut states {
        state
            .wait_for(|b| b.subscribed && b.resyncs >= 1)
            .await
            .unwrap();
    }
    let before = calls.load(Ordering::SeqCst);
    let stored = get(1, "after".into()).await.unwrap();
    assert_eq!(get(2, "after".into()).await.unwrap(), stored);
    assert_eq!(get(0, "after".into()).await.unwrap(), stored);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        before + 1,
        "second-tier hits again"
    );
    let applied = fleet[0].0.backplane().borrow().applied;
    fleet[1].1.purge(&"after".to_owned()).await;
    applied_more(&fleet[0].0, applied).await;
    assert_ne!(
        get(0, "after".into()).await.unwrap(),
        stored,
        "backplane again"
    );
}

/// Waits until `tier`'s backplane has applied a message past `n`.
async fn applied_more(tier: &RedisTier, n: u64) {
    applied(tier, n + 1).await;
}

mod http_tier {
    use super::*;
    use bytes::Bytes;
    use http::{Method, Request, Response, StatusCode};
    use http_body_util::{BodyExt, Full};
    use std::collections::HashMap;
    use std::sync::Mutex;
    use towerguard::http::{HttpCacheLayer, CACHE_STATUS};

    type Origin = Arc<Mutex<HashMap<String, usize>>>;
    type HttpService = tower::util::BoxCloneSyncService<
        Request<Full<Bytes>>,
        Response<towerguard::http::BufferedBody<Full<Bytes>>>,
        towerguard::Error,
    >;
    type Fleet = [(RedisTier, HttpCacheLayer, HttpService)];

    /// An origin that counts GETs per path: `max-age=60`, tagged by the path's first
    /// segment, `private` under `/private/`, with a `Set-Cookie` under `/cookie/`; a POST
    /// answers 204.
    fn origin(
        counts: Origin,
    ) -> impl tower::Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = std::io::Error,
        Future = impl Send,
    > + Clone
           + Send
           + Sync
           + 'static {
        service_fn(move |req: Request<Full<Bytes>>| {
            let path = req.uri().path().to_owned();
            let n = match *req.method() {
                Method::GET => {
                    let mut counts = counts.lock().unwrap();
                    let n = counts.entry(path.clone()).or_default();
                    *n += 1;
                    *n
                }
                _ => 0,
            };
            async move {
                if n == 0 {
                    let mut response = Response::new(Full::new(Bytes::new()));
                    *response.status_mut() = StatusCode::NO_CONTENT;
                    return Ok(response);
                }
                // A backend that takes its time, as a cold page's does.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let tag = path.split('/').nth(1).unwrap_or("").to_owned();
                let control = if path.starts_with("/private/") {
                    "private, max-age=60"
                } else {
                    "max-age=60"
                };
                let mut response = Response::builder()
                    .header("cache-control", control)
                    .header("cache-tag", tag);
                if path.starts_with("/cookie/") {
                    response = response.header("set-cookie", format!("session={n}"));
                }
                Ok::<_, std::io::Error>(
                    response
                        .body(Full::new(Bytes::from(format!("{path} #{n}"))))
                        .unwrap(),
                )
            }
        })
    }

    async fn instances(
        server: &RedisServer,
        counts: &Origin,
    ) -> Vec<(RedisTier, HttpCacheLayer, HttpService)> {
        let mut out = Vec::new();
        for i in 0..3 {
            let tier = tier(server, "http:");
            let layer = HttpCacheLayer::builder()
                .name(format!("http-{i}"))
                .second_tier(tier.clone())
                .build();
            let svc = tower::util::BoxCloneSyncService::new(layer.layer(origin(counts.clone())));
            tier.backplane().wait_for(|b| b.subscribed).await.unwrap();
            out.push((tier, layer, svc));
        }
        out
    }

    async fn send(
        svc: &HttpService,
        method: Method,
        path: &str,
        authorization: bool,
    ) -> (String, String) {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://origin.test{path}"));
        if authorization {
            req = req.header("authorization", "Bearer alice");
        }
        let response = svc
            .clone()
            .oneshot(req.body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap();
        let status = response
            .headers()
            .get(CACHE_STATUS)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (String::from_utf8(body.to_vec()).unwrap(), status)
    }

    /// GETs `path` on `i` until it answers `want`, waking on each backplane message: an
    /// instance serves the old response only until the message reaches it.
    async fn until_served(fleet: &Fleet, i: usize, path: &str, want: &str) {
        let mut state = fleet[i].0.backplane();
        loop {
            state.borrow_and_update();
            if send(&fleet[i].2, Method::GET, path, false).await.0 == want {
                return;
            }
            state.changed().await.unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_http_caches_share_one_origin_request_and_every_invalidation() {
        let Some(server) = RedisServer::start() else {
            return;
        };
        let counts: Origin = Arc::default();
        let fleet = instances(&server, &counts).await;
        let gets = |path: &str| counts.lock().unwrap().get(path).copied().unwrap_or(0);

        // A cold burst over the three: one origin request.
        let burst: Vec<_> = (0..300)
            .map(|n| {
                let svc = fleet[n % 3].2.clone();
                tokio::spawn(async move { send(&svc, Method::GET, "/news/1", false).await })
            })
            .collect();
        let mut bodies = std::collections::HashSet::new();
        for caller in burst {
            bodies.insert(caller.await.unwrap().0);
        }
        assert_eq!(gets("/news/1"), 1, "one origin request for the fleet");
        assert_eq!(bodies.into_iter().collect::<Vec<_>>(), ["/news/1 #1"]);
        // Stored by one, a second-tier hit on the others.
        let (body, status) = send(&fleet[2].2, Method::GET, "/news/1", false).await;
        assert_eq!(body, "/news/1 #1");
        assert!(status.contains("hit"), "{status}");

        // A POST through one instance invalidates the URL on all three.
        send(&fleet[1].2, Method::POST, "/news/1", false).await;
        for i in [1, 0, 2] {
            until_served(&fleet, i, "/news/1", "/news/1 #2").await;
        }
        assert_eq!(gets("/news/1"), 2);

        // A tag (Cache-Tag) purged on one instance, on all of them.
        send(&fleet[0].2, Method::GET, "/news/2", false).await;
        send(&fleet[1].2, Method::GET, "/news/2", false).await;
        send(&fleet[0].2, Method::GET, "/weather/1", false).await;
        fleet[2].1.purge_tag("news").await;
        for i in [0, 1, 2] {
            until_served(&fleet, i, "/news/2", "/news/2 #2").await;
            until_served(&fleet, i, "/news/1", "/news/1 #3").await;
        }
        assert_eq!((gets("/news/1"), gets("/news/2")), (3, 2));
        // Not tagged `news`: still the first response, everywhere.
        for instance in &fleet {
            let (body, _) = send(&instance.2, Method::GET, "/weather/1", false).await;
            assert_eq!(body, "/weather/1 #1");
        }
        assert_eq!(gets("/weather/1"), 1);
    }

    /// An instance of a fleet (prefix `httpunstored:`) whose origin answers through the
    /// `overlap` gate, with responses that cannot be stored (no freshness): `#N` for the
    /// gate's Nth call.
    async fn gated_instance(server: &RedisServer, i: usize, overlap: Arc<Overlap>) -> HttpService {
        let tier = patient_tier(server, "httpunstored:");
        let origin = service_fn(move |_: Request<Full<Bytes>>| {
            let overlap = overlap.clone();
            async move {
                let n = overlap.call().await;
                let body = Bytes::from(format!("#{n}"));
                Ok::<_, std::io::Error>(Response::new(Full::new(body)))
            }
        });
        let layer = HttpCacheLayer::builder()
            .name(format!("httpunstored-{i}"))
            .second_tier(tier.clone())
            .build();
        let svc: HttpService = tower::util::BoxCloneSyncService::new(layer.layer(origin));
        tier.backplane().wait_for(|b| b.subscribed).await.unwrap();
        svc
    }

    /// The HTTP form of the single-flight cache's test above: a response that cannot be
    /// stored (no freshness) sends the instances waiting on the lease to the origin
    /// together, and marks the URI so the next misses do not wait.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_response_that_cannot_be_stored_sends_the_instances_waiting_on_its_lease_to_the_origin_together(
    ) {
        let Some(server) = RedisServer::start() else {
            return;
        };
        let overlap = Arc::new(Overlap::default());
        let instance = |i: usize, overlap: Arc<Overlap>| gated_instance(&server, i, overlap);
        let mut fleet = Vec::new();
        for i in 0..3 {
            fleet.push(instance(i, overlap.clone()).await);
        }
        let holder = {
            let svc = fleet[0].clone();
            tokio::spawn(async move { send(&svc, Method::GET, "/feed", false).await.0 })
        };
        overlap.started.notified().await;
        let waiters = [1, 2].map(|i| {
            let svc = fleet[i].clone();
            tokio::spawn(async move { send(&svc, Method::GET, "/feed", false).await.0 })
        });
        overlap.go.notify_one();
        assert_eq!(holder.await.unwrap(), "#1");
        let bodies = overlap
            .answers(
                waiters
                    .into_iter()
                    .map(|waiter| async { waiter.await.unwrap() }),
            )
            .await;
        assert_eq!(bodies, ["#2", "#3"]);
        let keys: Vec<String> =
            redis_cmd(&server, redis::cmd("KEYS").arg("httpunstored:v:*")).await;
        assert_eq!(keys.len(), 1, "{keys:?}");
        let mark: Vec<u8> = redis_cmd(&server, redis::cmd("GET").arg(&keys[0])).await;
        assert_eq!(mark, b"towerguard:unstored");

        // A fourth instance learns it from the mark: a miss that arrives while its first
        // request is at the origin does not join that request's flight (whose response it
        // could not use), it goes to the origin too. Its calls are the burst's second and
        // third: the first answers only once the other has started.
        let late = Arc::new(Overlap::default());
        late.calls.store(1, Ordering::SeqCst);
        let fourth = instance(3, late.clone()).await;
        let first = {
            let svc = fourth.clone();
            tokio::spawn(async move { send(&svc, Method::GET, "/feed", false).await.0 })
        };
        late.second.notified().await;
        let next = {
            let svc = fourth.clone();
            tokio::spawn(async move { send(&svc, Method::GET, "/feed", false).await.0 })
        };
        let bodies = late
            .ends(async { [first.await.unwrap(), next.await.unwrap()] })
            .await;
        assert_eq!(bodies, ["#2", "#3"]);
    }

    /// Requests on one instance that wait for its flight, itself waiting on another
    /// instance's lease, go to the origin together when that instance's response cannot be
    /// stored: the flight reads the mark and ends without going to the origin, instead of
    /// going first and leaving its waiters to go after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_waiting_on_a_flight_whose_uri_gets_marked_go_to_the_origin_together() {
        let Some(server) = RedisServer::start() else {
            return;
        };
        let overlap = Arc::new(Overlap::default());
        let holder_instance = gated_instance(&server, 10, overlap.clone()).await;
        let waiting_instance = gated_instance(&server, 11, overlap.clone()).await;
        let holder = {
            let svc = holder_instance.clone();
            tokio::spawn(async move { send(&svc, Method::GET, "/feed", false).await.0 })
        };
        overlap.started.notified().await;
        // Both requests are in the waiting instance's flight before the holder answers:
        // the first poll of each reaches the flight (the first starts it, it then waits
        // on Redis; the second joins it).
        let mut waiters = Vec::new();
        for _ in 0..2 {
            let svc = waiting_instance.clone();
            let mut request =
                Box::pin(async move { send(&svc, Method::GET, "/feed", false).await.0 });
            std::future::poll_fn(|cx| {
                assert!(std::future::Future::poll(request.as_mut(), cx).is_pending());
                std::task::Poll::Ready(())
            })
            .await;
            waiters.push(tokio::spawn(request));
        }
        overlap.go.notify_one();
        assert_eq!(holder.await.unwrap(), "#1");
        let bodies = overlap
            .answers(
                waiters
                    .into_iter()
                    .map(|waiter| async { waiter.await.unwrap() }),
            )
            .await;
        assert_eq!(bodies, ["#2", "#3"]);
    }

    /// Sharing safety on the Redis path: a `private` response, one to a request with
    /// `Authorization` (without `public`) and one with `Set-Cookie`, served by one
    /// instance, never reach a client of another one through Redis, and never are in it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sharing_safety_the_redis_tier_never_carries_a_personal_response() {
        let Some(server) = RedisServer::start() else {
            return;
        };
        let counts: Origin = Arc::default();
        let fleet = instances(&server, &counts).await;
        let gets = |path: &str| counts.lock().unwrap().get(path).copied().unwrap_or(0);

        for (path, credentials) in [
            ("/private/me", false),
            ("/account", true),
            ("/cookie/me", false),
        ] {
            let (body, _) = send(&fleet[0].2, Method::GET, path, credentials).await;
            assert_eq!(body, format!("{path} #1"));
            let (body, status) = send(&fleet[1].2, Method::GET, path, false).await;
            assert_eq!(body, format!("{path} #2"), "{path}: {status}");
            assert_eq!(gets(path), 2, "{path}: B's request went to the origin");
        }
        // A request with credentials is not handed a stored shared response it may not use
        // either.
        send(&fleet[0].2, Method::GET, "/news/shared", false).await;
        let (body, _) = send(&fleet[1].2, Method::GET, "/news/shared", true).await;
        assert_eq!(body, "/news/shared #2");
        // Redis holds the shareable responses (the anonymous /account #2 among them) and
        // nothing personal: the personal URIs only carry the mark of URIs whose responses
        // are not stored.
        let keys: Vec<String> = redis_cmd(&server, redis::cmd("KEYS").arg("http:v:*")).await;
        let mut responses = Vec::new();
        for key in &keys {
            let value: Vec<u8> = redis_cmd(&server, redis::cmd("GET").arg(key)).await;
            if value == b"towerguard:unstored" {
                continue;
            }
            assert!(
                !key.contains("/private/") && !key.contains("/cookie/"),
                "{key}: a personal response"
            );
            let value = String::from_utf8_lossy(&value);
            assert!(
                !value.contains("/account #1"),
                "{key}: the credentialed response"
            );
            responses.push(key);
        }
        assert_eq!(responses.len(), 2, "{keys:?}");
    }
}

/// A TCP forwarder to the test's Redis that can be cut (every connection through it
/// closed, new ones refused) and restored: a network partition between one instance and
/// Redis while the others still reach it.
struct Partition {
    port: u16,
    cut: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Partition {
    async fn new(redis_port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(tokio::sync::watch::Sender::new(false));
        let state = cut.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let mut cut = state.subscribe();
                if *cut.borrow_and_update() {
                    continue; // refused: dropped at once
                }
                tokio::spawn(async move {
                    let Ok(mut redis) =
                        tokio::net::TcpStream::connect(("127.0.0.1", redis_port)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut redis) => {}
                        _ = cut.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Partition { port, cut }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn set(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_redis_missed_is_done_again_once_the_instance_reaches_it() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let calls = Arc::new(AtomicUsize::new(0));
    let partition = Partition::new(server.port).await;
    let build = |url: String, name: &str| {
        let tier = RedisTier::builder(url)
            .prefix("partition:")
            .timeout(Duration::from_millis(500))
            .breaker(3, Duration::ZERO)
            .build()
            .unwrap();
        let layer = instance(tier.clone(), name);
        let handle = layer.handle();
        (tier, handle, layer.layer(counting_upstream(calls.clone())))
    };
    // Instance 0 reaches Redis through the partition; 1 directly.
    let (tier0, handle0, svc0) = build(partition.url(), "p0");
    let (tier1, _, svc1) = build(server.url(), "p1");
    for tier in [&tier0, &tier1] {
        tier.backplane().wait_for(|b| b.subscribed).await.unwrap();
    }
    assert_eq!(
        svc0.clone().oneshot("k".into()).await.unwrap(),
        "value of k #1"
    );
    assert_eq!(
        svc1.clone().oneshot("k".into()).await.unwrap(),
        "value of k #1"
    );

    // Cut off, instance 0 invalidates k: Redis does not hear of it.
    partition.set(true);
    tier0.backplane().wait_for(|b| !b.subscribed).await.unwrap();
    handle0.purge(&"k".to_owned()).await;
    let mut get = redis::cmd("EXISTS");
    get.arg("partition:v:k");
    let still: u32 = redis_cmd(&server, &get).await;
    assert_eq!(still, 1, "Redis still has the old value");

    // Back: instance 0's next operation deletes it, and instance 1 hears of it.
    let before = tier1.backplane().borrow().applied;
    partition.set(false);
    tier0.backplane().wait_for(|b| b.subscribed).await.unwrap();
    svc0.clone().oneshot("other".into()).await.unwrap();
    // Two messages: the write of `other`, and the invalidation of k done again.
    applied(&tier1, before + 2).await;
    let gone: u32 = redis_cmd(&server, &get).await;
    assert_eq!(gone, 0, "deleted once Redis was reachable again");
    let value = svc1.clone().oneshot("k".into()).await.unwrap();
    assert_ne!(value, "value of k #1", "instance 1 dropped its copy");
}
