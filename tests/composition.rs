//! Composition as users compose: the standard HTTP stack on an axum `Router` of several
//! routes, served by `axum::serve` over TCP (one connection per request) and driven with
//! `Router::oneshot`. However often axum calls `layer()`, there is one limit and one set
//! of metric series.
//!
//! This binary installs a global `DebuggingRecorder`, so the series registered on any
//! thread, at any time, are seen; its tests use distinct instance names and run one at a
//! time (a snapshot resets every gauge).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::routing::get;
use axum::Router;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tower::ServiceExt;
use towerguard::stack::StackBuilder;

/// Held by each test: a snapshot swaps every gauge to zero, other tests' too.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn snapshotter() -> &'static Snapshotter {
    static SNAPSHOTTER: OnceLock<Snapshotter> = OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("the only recorder of this binary");
        snapshotter
    })
}

/// Handlers that count who is inside, remember the peak, and wait for a gate.
struct Probe {
    inside: AtomicUsize,
    peak: AtomicUsize,
    /// Requests that reached a handler or got their answer.
    settled: AtomicUsize,
    changed: Notify,
    gate: watch::Sender<bool>,
}

impl Probe {
    fn new() -> Arc<Self> {
        Arc::new(Probe {
            inside: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            settled: AtomicUsize::new(0),
            changed: Notify::new(),
            gate: watch::channel(false).0,
        })
    }

    fn settle(&self) {
        self.settled.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// Waits until each of `n` requests is inside a handler or answered.
    async fn until_settled(&self, n: usize) {
        loop {
            let changed = self.changed.notified();
            if self.settled.load(Ordering::SeqCst) >= n {
                return;
            }
            changed.await;
        }
    }
}

async fn held(State(probe): State<Arc<Probe>>) -> &'static str {
    let now = probe.inside.fetch_add(1, Ordering::SeqCst) + 1;
    probe.peak.fetch_max(now, Ordering::SeqCst);
    probe.settle();
    probe.gate.subscribe().wait_for(|open| *open).await.unwrap();
    probe.inside.fetch_sub(1, Ordering::SeqCst);
    "done"
}

fn app(name: &str, limit: usize, probe: Arc<Probe>) -> Router {
    let stack = StackBuilder::new()
        .name(name)
        .total_timeout(Duration::from_secs(60))
        .attempt_timeout(Duration::from_secs(30))
        .static_limit(limit)
        .without_queue()
        .build_http::<Body>()
        .unwrap();
    Router::new()
        .route("/a", get(held))
        .route("/b", get(held))
        .route("/c", get(held))
        .layer(stack)
        .with_state(probe)
}

/// The value of every series of `name` whose `name` label is `instance`.
fn series(name: &str, instance: &str) -> Vec<DebugValue> {
    snapshotter()
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, _, _, _)| {
            key.key().name() == name
                && key
                    .key()
                    .labels()
                    .any(|l| l.key() == "name" && l.value() == instance)
        })
        .map(|(_, _, _, value)| value)
        .collect()
}

/// The in-flight gauge's change since the last read (a snapshot of the debugging recorder
/// swaps gauges to zero).
fn in_flight(instance: &str) -> f64 {
    match series("towerguard_limit_in_flight", instance).as_slice() {
        [DebugValue::Gauge(v)] => v.into_inner(),
        other => panic!("one in-flight series expected: {other:?}"),
    }
}

/// Every series of this instance carries only its fixed labels: none per route or
/// connection, and one value per (metric, labels).
fn assert_one_series_per_metric(instance: &str) {
    let mut keys: Vec<String> = snapshotter()
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, _)| key.key().clone())
        .filter(|key| {
            key.labels()
                .any(|l| l.key() == "name" && l.value() == instance)
        })
        .map(|key| {
            let mut labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            labels.sort();
            format!("{}{labels:?}", key.name())
        })
        .collect();
    assert!(!keys.is_empty(), "{instance}: nothing registered");
    let n = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), n, "{instance}: a series registered twice");
    for key in &keys {
        assert!(
            !key.contains("route") && !key.contains("connection"),
            "{key}"
        );
    }
}

const LIMIT: usize = 4;
const REQUESTS: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_limit_holds_across_routes_and_connections_of_axum_serve() {
    let _serial = SERIAL.lock().await;
    snapshotter();
    let probe = Probe::new();
    let app = app("composition_tcp", LIMIT, probe.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    // No idle connection is reused: every request opens its own.
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http::<String>();

    let mut requests = JoinSet::new();
    for i in 0..REQUESTS {
        let (client, probe) = (client.clone(), probe.clone());
        let path = ["a", "b", "c"][i % 3];
        requests.spawn(async move {
            let uri = format!("http://{addr}/{path}?i={i}").parse().unwrap();
            let response = client.get(uri).await.unwrap();
            let status = response.status();
            if status != StatusCode::OK {
                probe.settle();
            }
            response.into_body().collect().await.unwrap();
            status
        });
    }
    probe.until_settled(REQUESTS).await;
    assert_eq!(probe.inside.load(Ordering::SeqCst), LIMIT);
    assert_eq!(in_flight("composition_tcp"), LIMIT as f64);
    probe.gate.send_replace(true);
    let mut ok = 0;
    while let Some(status) = requests.join_next().await {
        let status = status.unwrap();
        assert!(
            status == StatusCode::OK || status == StatusCode::SERVICE_UNAVAILABLE,
            "{status}"
        );
        ok += usize::from(status == StatusCode::OK);
    }
    assert_eq!(
        ok, LIMIT,
        "the others were refused while the limit was full"
    );
    assert!(probe.peak.load(Ordering::SeqCst) <= LIMIT);
    assert_eq!(
        in_flight("composition_tcp"),
        -(LIMIT as f64),
        "back to zero"
    );
    assert_one_series_per_metric("composition_tcp");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_limit_holds_across_routes_through_router_oneshot() {
    let _serial = SERIAL.lock().await;
    snapshotter();
    let probe = Probe::new();
    let app = app("composition_oneshot", LIMIT, probe.clone());
    let mut requests = JoinSet::new();
    for i in 0..REQUESTS {
        let (app, probe) = (app.clone(), probe.clone());
        let path = ["a", "b", "c"][i % 3];
        requests.spawn(async move {
            let req = Request::get(format!("/{path}"))
                .body(Body::empty())
                .unwrap();
            let response = app.oneshot(req).await.unwrap();
            if response.status() != StatusCode::OK {
                probe.settle();
            }
            response.status()
        });
    }
    probe.until_settled(REQUESTS).await;
    assert_eq!(probe.inside.load(Ordering::SeqCst), LIMIT);
    assert_eq!(in_flight("composition_oneshot"), LIMIT as f64);
    probe.gate.send_replace(true);
    let mut ok = 0;
    while let Some(status) = requests.join_next().await {
        ok += usize::from(status.unwrap() == StatusCode::OK);
    }
    assert_eq!(ok, LIMIT);
    assert!(probe.peak.load(Ordering::SeqCst) <= LIMIT);
    assert_one_series_per_metric("composition_oneshot");
}
