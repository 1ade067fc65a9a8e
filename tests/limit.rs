//! Integration tests of the concurrency limit.

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio_test::{assert_pending, task};
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};
use towerguard::http::ErrorResponseLayer;
use towerguard::limit::{
    ConcurrencyLimit, ConcurrencyLimitLayer, KeyedConcurrencyLimitLayer, LimitHandle,
    QueueDiscipline, ResponseFuture,
};
use towerguard::timeout::TimeoutLayer;
use towerguard::ErrorKind;

use support::{ChannelBody, Outcome, Probe, Upstream};

/// Counts requests inside a handler, records the peak, and holds them until opened.
struct Gauge {
    current: AtomicUsize,
    peak: AtomicUsize,
    target: usize,
    reached: Notify,
    gate: watch::Sender<bool>,
}

impl Gauge {
    fn new(target: usize) -> Arc<Self> {
        Arc::new(Gauge {
            current: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            target,
            reached: Notify::new(),
            gate: watch::channel(false).0,
        })
    }
}

async fn work(State(gauge): State<Arc<Gauge>>) -> &'static str {
    let now = gauge.current.fetch_add(1, Ordering::SeqCst) + 1;
    gauge.peak.fetch_max(now, Ordering::SeqCst);
    if now == gauge.target {
        gauge.reached.notify_one();
    }
    let mut gate = gauge.gate.subscribe();
    gate.wait_for(|open| *open).await.unwrap();
    gauge.current.fetch_sub(1, Ordering::SeqCst);
    "done"
}

async fn serve(app: Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// 100 concurrent clients over real TCP; returns the statuses.
async fn hammer(addr: std::net::SocketAddr, paths: &[&str], gauge: &Gauge) -> Vec<StatusCode> {
    let client = Client::builder(TokioExecutor::new()).build_http::<String>();
    let mut clients = JoinSet::new();
    for i in 0..100 {
        let uri = format!("http://{addr}{}", paths[i % paths.len()]);
        let client = client.clone();
        clients.spawn(async move {
            let response = client.get(uri.parse().unwrap()).await.unwrap();
            response.status()
        });
    }
    // Every permit is in use inside the handler before anyone may finish.
    gauge.reached.notified().await;
    gauge.gate.send_replace(true);
    let mut statuses = Vec::new();
    while let Some(status) = clients.join_next().await {
        statuses.push(status.unwrap());
    }
    statuses
}

fn queued_limit(limit: usize) -> ConcurrencyLimitLayer {
    ConcurrencyLimitLayer::builder()
        .limit(limit)
        .queue_without_timeout(1_000)
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_router_layer_holds_the_limit_across_per_request_clones_over_tcp() {
    const LIMIT: usize = 5;
    let gauge = Gauge::new(LIMIT);
    let limit = queued_limit(LIMIT);
    let app = Router::new()
        .route("/work", get(work))
        .layer(
            ServiceBuilder::new()
                .layer(ErrorResponseLayer::new())
                .layer(limit),
        )
        .with_state(gauge.clone());
    let addr = serve(app).await;

    let statuses = hammer(addr, &["/work"], &gauge).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert_eq!(
        gauge.peak.load(Ordering::SeqCst),
        LIMIT,
        "never above, and reaches, the limit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_layer_on_two_axum_routes_is_one_limit_over_tcp() {
    const LIMIT: usize = 4;
    let gauge = Gauge::new(LIMIT);
    let guard = ServiceBuilder::new()
        .layer(ErrorResponseLayer::new())
        .layer(queued_limit(LIMIT));
    let app = Router::new()
        .route("/a", get(work).layer(guard.clone()))
        .route("/b", get(work).layer(guard))
        .with_state(gauge.clone());
    let addr = serve(app).await;

    let statuses = hammer(addr, &["/a", "/b"], &gauge).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert_eq!(gauge.peak.load(Ordering::SeqCst), LIMIT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_hold_no_permits_over_tcp() {
    let limit = ConcurrencyLimitLayer::new(1);
    let handle = limit.handle();
    let app = Router::new().route("/", get(|| async { "ok" })).layer(
        ServiceBuilder::new()
            .layer(ErrorResponseLayer::new())
            .layer(limit),
    );
    let addr = serve(app).await;

    // Ten connections, each used once and then left open and idle.
    let mut senders = Vec::new();
    for _ in 0..10 {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let response = sender
            .send_request(Request::get("/").body(String::new()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.into_body().collect().await.unwrap();
        senders.push(sender);
    }
    assert_eq!(handle.in_flight(), 0);
    // With a limit of 1, the next request on any of them is admitted.
    let response = senders[3]
        .send_request(Request::get("/").body(String::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn poll_ready_reserves_nothing() {
    let limit = ConcurrencyLimitLayer::new(1);
    let handle = limit.handle();
    let svc = limit.layer(Probe::new(Upstream::new()));
    let mut idle: Vec<_> = (0..10).map(|_| svc.clone()).collect();
    for clone in &mut idle {
        clone.ready().await.unwrap();
    }
    assert_eq!(handle.in_flight(), 0);
    let mut svc = svc;
    let answer = svc.ready().await.unwrap().call("k".to_owned()).await;
    assert_eq!(answer.unwrap(), "k#1");
}

type Limited = ConcurrencyLimit<Upstream>;

fn limited(layer: &ConcurrencyLimitLayer, upstream: &Upstream) -> (Limited, LimitHandle) {
    (layer.layer(upstream.clone()), layer.handle())
}

/// Test future of the limit over the test upstream.
type Pending =
    tokio_test::task::Spawn<ResponseFuture<Upstream, String, towerguard::limit::OnResponse>>;

/// The layer over a held upstream, its one permit taken by a pending request.
async fn held_limit(
    layer: ConcurrencyLimitLayer,
    upstream: &Upstream,
) -> (Limited, LimitHandle, Pending) {
    upstream.close();
    let (mut svc, handle) = limited(&layer, upstream);
    let mut held = task::spawn(start(&mut svc, "a").await);
    assert_pending!(held.poll());
    (svc, handle, held)
}

async fn start(
    svc: &mut Limited,
    key: &str,
) -> ResponseFuture<Upstream, String, towerguard::limit::OnResponse> {
    svc.ready().await.unwrap().call(key.to_owned())
}

#[tokio::test(start_paused = true)]
async fn permits_come_back_after_success_error_panic_timeout_and_drop() {
    let upstream = Upstream::scripted(|n, key| match key {
        "err" => Outcome::Err("failed"),
        "panic" => Outcome::Panic("boom"),
        _ => Outcome::Ok(format!("{key}#{n}")),
    });
    let layer = ConcurrencyLimitLayer::new(1);
    let (mut svc, handle) = limited(&layer, &upstream);

    assert!(start(&mut svc, "ok").await.await.is_ok());
    assert_eq!(handle.in_flight(), 0, "after success");

    assert_eq!(
        start(&mut svc, "err").await.await.unwrap_err().kind(),
        ErrorKind::Inner
    );
    assert_eq!(handle.in_flight(), 0, "after error");

    let err = start(&mut svc, "panic").await.await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Panicked);
    assert_eq!(handle.in_flight(), 0, "after panic");

    upstream.close();
    let mut timed = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_secs(1)))
        .service(svc.clone());
    let call = timed.ready().await.unwrap().call("slow".to_owned());
    let err = call.await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TimedOut);
    assert_eq!(handle.in_flight(), 0, "after timeout");

    let mut pending = task::spawn(start(&mut svc, "slow").await);
    assert_pending!(pending.poll());
    assert_eq!(handle.in_flight(), 1);
    drop(pending);
    assert_eq!(handle.in_flight(), 0, "after drop");

    upstream.open();
    assert!(start(&mut svc, "again").await.await.is_ok());
}

#[tokio::test]
async fn reject_mode_rejects_at_once_with_overloaded() {
    let upstream = Upstream::new();
    let layer = ConcurrencyLimitLayer::builder()
        .limit(1)
        .retry_after(Duration::from_secs(3))
        .build();
    let (mut svc, _, _held) = held_limit(layer, &upstream).await;
    let err = start(&mut svc, "b").await.await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Overloaded);
    assert_eq!(err.retry_after(), Some(Duration::from_secs(3)));
}

#[tokio::test]
async fn the_queue_length_bound_rejects_with_overloaded() {
    let upstream = Upstream::new();
    let layer = ConcurrencyLimitLayer::builder()
        .limit(1)
        .queue(2, Duration::from_secs(60))
        .build();
    let (mut svc, handle, held) = held_limit(layer, &upstream).await;
    let mut queued: Vec<_> = Vec::new();
    for key in ["b", "c"] {
        let mut fut = task::spawn(start(&mut svc, key).await);
        assert_pending!(fut.poll());
        queued.push(fut);
    }
    assert_eq!(handle.queued(), 2);
    let err = start(&mut svc, "d").await.await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Overloaded);

    // The queue drains in order once the permit comes back.
    upstream.open();
    assert!(held.await.is_ok());
    for fut in queued {
        assert!(fut.await.is_ok());
    }
    assert_eq!((handle.in_flight(), handle.queued()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn the_queue_wait_bound_rejects_with_overloaded() {
    let upstream = Upstream::new();
    let layer = ConcurrencyLimitLayer::builder()
        .limit(1)
        .queue(10, Duration::from_millis(100))
        .build();
    let (mut svc, handle, _held) = held_limit(layer, &upstream).await;
    let waiting = start(&mut svc, "b").await;
    let started = tokio::time::Instant::now();
    let err = waiting.await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Overloaded);
    assert_eq!(started.elapsed(), Duration::from_millis(100));
    assert_eq!(handle.queued(), 0);
    assert_eq!(handle.in_flight(), 1);
}

#[tokio::test]
async fn http_rejection_is_503_with_retry_after() {
    let gate = Arc::new(Notify::new());
    let inner_gate = gate.clone();
    let inner = service_fn(move |_req: Request<String>| {
        let gate = inner_gate.clone();
        async move {
            gate.notified().await;
            Ok::<_, Infallible>(Response::new(String::from("ok")))
        }
    });
    let mut svc = ServiceBuilder::new()
        .layer(ErrorResponseLayer::new())
        .layer(ConcurrencyLimitLayer::new(1))
        .service(inner);
    let mut held = task::spawn(svc.ready().await.unwrap().call(Request::new(String::new())));
    assert_pending!(held.poll());
    let response = svc
        .ready()
        .await
        .unwrap()
        .call(Request::new(String::new()))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "1");
}

#[tokio::test]
async fn with_the_body_option_the_permit_is_held_until_a_streaming_body_ends() {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let rx = Arc::new(std::sync::Mutex::new(Some(rx)));
    let inner = service_fn(move |_req: Request<()>| {
        let rx = rx.lock().unwrap().take().expect("one call");
        async move { Ok::<_, Infallible>(Response::new(ChannelBody(rx))) }
    });
    let layer = ConcurrencyLimitLayer::new(1);
    let handle = layer.handle();
    let mut svc = layer.until_body_end().layer(inner);

    let response = svc
        .ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .unwrap();
    let mut body = response.into_body();
    assert!(body.holds_permit());
    assert_eq!(handle.in_flight(), 1, "the head is out, the body is not");
    tx.send(Bytes::from_static(b"chunk")).await.unwrap();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "chunk");
    assert_eq!(handle.in_flight(), 1, "still streaming");
    drop(tx);
    assert!(body.frame().await.is_none());
    assert_eq!(handle.in_flight(), 0, "released at the end of the body");
}

#[tokio::test(start_paused = true)]
async fn with_the_body_option_a_body_nobody_reads_gives_its_permit_back_after_max_body_hold() {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let rx = Arc::new(std::sync::Mutex::new(Some(rx)));
    let inner = service_fn(move |_req: Request<()>| {
        let rx = rx.lock().unwrap().take();
        async move {
            let body = rx.map_or_else(|| ChannelBody(tokio::sync::mpsc::channel(1).1), ChannelBody);
            Ok::<_, Infallible>(Response::new(body))
        }
    });
    let layer = ConcurrencyLimitLayer::builder()
        .limit(1)
        .max_body_hold(Duration::from_secs(5))
        .build();
    let handle = layer.handle();
    let svc = layer.until_body_end().layer(inner);

    // A client that takes the head and never reads the body.
    let stalled = svc.clone().oneshot(Request::new(())).await.unwrap();
    assert!(stalled.body().holds_permit());
    let refused = svc.clone().oneshot(Request::new(())).await;
    assert!(
        refused.is_err_and(|e| e.is(ErrorKind::Overloaded)),
        "the slot is held"
    );

    tokio::time::sleep(Duration::from_millis(4_999)).await;
    assert_eq!(handle.in_flight(), 1, "held until max_body_hold");
    tokio::time::sleep(Duration::from_millis(2)).await;
    assert_eq!(handle.in_flight(), 0, "given back at max_body_hold");
    assert!(!stalled.body().holds_permit());
    let admitted = svc.clone().oneshot(Request::new(())).await.unwrap();
    assert!(admitted.body().holds_permit());
    drop(admitted);
    assert_eq!(
        handle.in_flight(),
        0,
        "a dropped body gives its permit back at once"
    );
    // The stalled body streams on without its permit.
    tx.send(Bytes::from_static(b"late")).await.unwrap();
    drop(tx);
    let body = stalled.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "late");
}

#[tokio::test]
async fn without_the_body_option_the_permit_goes_back_with_the_response() {
    let (_tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let rx = Arc::new(std::sync::Mutex::new(Some(rx)));
    let inner = service_fn(move |_req: Request<()>| {
        let rx = rx.lock().unwrap().take().expect("one call");
        async move { Ok::<_, Infallible>(Response::new(ChannelBody(rx))) }
    });
    let layer = ConcurrencyLimitLayer::new(1);
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    let _response = svc
        .ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .unwrap();
    assert_eq!(handle.in_flight(), 0);
}

#[tokio::test]
async fn many_ready_calls_in_one_task_never_report_overloaded() {
    let layer = ConcurrencyLimitLayer::new(1);
    let mut svc = layer.layer(service_fn(|n: u32| async move { Ok::<_, Infallible>(n) }));
    for n in 0..10_000 {
        let answer = svc.ready().await.unwrap().call(n).await;
        assert_eq!(answer.unwrap(), n, "call {n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adaptive_limit_is_shared_and_stays_within_its_bounds() {
    let layer = ConcurrencyLimitLayer::builder()
        .adaptive(towerguard::limit::adaptive::Aimd::new(2, 1, 8))
        .queue_without_timeout(10_000)
        .build();
    let handle = layer.handle();
    let peak = Arc::new(AtomicUsize::new(0));
    let current = Arc::new(AtomicUsize::new(0));
    let (p, c) = (peak.clone(), current.clone());
    let svc = layer.layer(service_fn(move |_: u32| {
        let (p, c) = (p.clone(), c.clone());
        async move {
            let now = c.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(now, Ordering::SeqCst);
            tokio::task::yield_now().await;
            c.fetch_sub(1, Ordering::SeqCst);
            Ok::<_, Infallible>(())
        }
    }));
    let mut tasks = JoinSet::new();
    for i in 0..2_000 {
        tasks.spawn(svc.clone().oneshot(i));
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().unwrap();
    }
    assert!(peak.load(Ordering::SeqCst) <= 8);
    assert!(
        handle.limit() > 2,
        "grew under full use: {}",
        handle.limit()
    );
    assert_eq!(handle.in_flight(), 0);
}

fn tenant(req: &str) -> String {
    req.split('/').next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn a_keyed_limit_holds_per_key_and_keys_do_not_block_each_other() {
    let upstream = Upstream::new();
    upstream.close();
    let layer = KeyedConcurrencyLimitLayer::builder(|r: &String| tenant(r))
        .per_key(2)
        .max_keys(100)
        .build();
    let mut svc = layer.layer(upstream.clone());
    let mut held = Vec::new();
    for req in ["a/1", "a/2", "b/1", "b/2"] {
        let mut fut = task::spawn(svc.ready().await.unwrap().call(req.to_owned()));
        assert_pending!(fut.poll());
        held.push(fut);
    }
    assert_eq!(layer.partitions(), 2);
    for req in ["a/3", "b/3"] {
        let err = svc
            .ready()
            .await
            .unwrap()
            .call(req.to_owned())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Overloaded, "{req}");
    }
    let mut other = task::spawn(svc.ready().await.unwrap().call("c/1".to_owned()));
    assert_pending!(other.poll());
    assert_eq!(layer.partitions(), 3);

    upstream.open();
    for fut in held {
        assert!(fut.await.is_ok());
    }
    assert!(other.await.is_ok());
    assert_eq!(layer.partitions(), 0, "idle partitions are dropped");
}

#[tokio::test]
async fn keys_beyond_the_bound_share_one_overflow_partition() {
    let upstream = Upstream::new();
    upstream.close();
    let layer = KeyedConcurrencyLimitLayer::builder(|r: &String| tenant(r))
        .per_key(1)
        .max_keys(1)
        .build();
    let mut svc = layer.layer(upstream.clone());
    let mut first = task::spawn(svc.ready().await.unwrap().call("a/1".to_owned()));
    assert_pending!(first.poll());
    let mut overflow = task::spawn(svc.ready().await.unwrap().call("b/1".to_owned()));
    assert_pending!(overflow.poll());
    assert_eq!(layer.partitions(), 1, "the key set is bounded");
    let err = svc
        .ready()
        .await
        .unwrap()
        .call("c/1".to_owned())
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::Overloaded,
        "c shares b's overflow partition"
    );
    upstream.open();
    assert!(first.await.is_ok());
    assert!(overflow.await.is_ok());
}

#[tokio::test]
async fn a_key_leaving_the_overflow_partition_keeps_its_per_key_limit() {
    // Requests are "key/n"; each key's requests wait for that key's gate.
    let gates: Arc<Mutex<HashMap<String, watch::Sender<bool>>>> = Arc::default();
    let gate = |key: &str| {
        gates
            .lock()
            .unwrap()
            .entry(key.to_owned())
            .or_insert_with(|| watch::channel(false).0)
            .subscribe()
    };
    let open = |key: &str| {
        gates.lock().unwrap()[key].send_replace(true);
    };
    let (a, b) = (gate("a"), gate("b"));
    let upstream = service_fn(move |req: String| {
        let mut gate = if req.starts_with('a') {
            a.clone()
        } else {
            b.clone()
        };
        async move {
            gate.wait_for(|open| *open).await.unwrap();
            Ok::<_, Infallible>(req)
        }
    });
    let layer = KeyedConcurrencyLimitLayer::builder(|r: &String| tenant(r))
        .per_key(2)
        .max_keys(1)
        .build();
    let mut svc = layer.layer(upstream);
    let mut a1 = task::spawn(svc.ready().await.unwrap().call("a/1".to_owned()));
    assert_pending!(a1.poll());
    // The key set is full: b's two requests run in the overflow partition.
    let mut b_held = Vec::new();
    for req in ["b/1", "b/2"] {
        let mut fut = task::spawn(svc.ready().await.unwrap().call(req.to_owned()));
        assert_pending!(fut.poll());
        b_held.push(fut);
    }
    open("a");
    assert_eq!(a1.await.unwrap(), "a/1");
    assert_eq!(
        layer.partitions(),
        0,
        "a's partition is gone: there is room again"
    );
    // b still has two requests in the overflow partition: a third is one too many.
    let mut b3 = task::spawn(svc.ready().await.unwrap().call("b/3".to_owned()));
    match b3.poll() {
        Poll::Ready(Err(err)) => assert_eq!(err.kind(), ErrorKind::Overloaded),
        Poll::Ready(Ok(_)) => unreachable!("b's gate is closed"),
        Poll::Pending => panic!("admitted: b would have had three requests running"),
    }
    assert_eq!(layer.partitions(), 0);
    open("b");
    for fut in b_held {
        assert!(fut.await.is_ok());
    }
    // With nothing left in the overflow partition, b gets a partition of its own.
    assert_eq!(
        svc.ready()
            .await
            .unwrap()
            .call("b/4".to_owned())
            .await
            .unwrap(),
        "b/4"
    );
}

#[test]
fn public_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<ConcurrencyLimitLayer>();
    send_sync::<Limited>();
    send_sync::<LimitHandle>();
    send::<ResponseFuture<Upstream, String, towerguard::limit::OnResponse>>();
    send::<towerguard::http::PermitBody<Body>>();
    send_sync::<KeyedConcurrencyLimitLayer<String, String>>();
    send_sync::<towerguard::limit::KeyedConcurrencyLimit<Upstream, String, String>>();
}

/// A limit of one over a backend that answers each request only when the test opens its
/// gate once, and notes the order in which requests reached it.
struct Gated {
    svc: towerguard::limit::ConcurrencyLimit<
        tower::util::BoxCloneService<String, String, Infallible>,
    >,
    handle: LimitHandle,
    gate: Arc<tokio::sync::Semaphore>,
    reached: Arc<Mutex<Vec<String>>>,
}

type GatedFuture = tokio_test::task::Spawn<
    ResponseFuture<
        tower::util::BoxCloneService<String, String, Infallible>,
        String,
        towerguard::limit::OnResponse,
    >,
>;

impl Gated {
    fn new(discipline: QueueDiscipline) -> Self {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let reached = Arc::new(Mutex::new(Vec::new()));
        let (inner_gate, inner_reached) = (gate.clone(), reached.clone());
        let backend = service_fn(move |key: String| {
            inner_reached.lock().unwrap().push(key.clone());
            let gate = inner_gate.clone();
            async move {
                gate.acquire().await.unwrap().forget();
                Ok::<_, Infallible>(key)
            }
        });
        let layer = ConcurrencyLimitLayer::builder()
            .limit(1)
            .queue(10, Duration::from_secs(1))
            .queue_discipline(discipline)
            .build();
        Gated {
            svc: layer.layer(tower::util::BoxCloneService::new(backend)),
            handle: layer.handle(),
            gate,
            reached,
        }
    }

    async fn send(&mut self, key: &str) -> GatedFuture {
        let mut future = task::spawn(self.svc.ready().await.unwrap().call(key.to_owned()));
        assert_pending!(future.poll());
        future
    }

    /// Lets the running request finish.
    fn finish(&self, running: &mut GatedFuture) -> String {
        self.gate.add_permits(1);
        match running.poll() {
            Poll::Ready(Ok(key)) => key,
            other => panic!("the running request should finish, got {other:?}"),
        }
    }

    fn reached(&self) -> Vec<String> {
        self.reached.lock().unwrap().clone()
    }
}

const CODEL: QueueDiscipline = QueueDiscipline::Codel {
    target: Duration::from_millis(50),
    interval: Duration::from_millis(100),
};

#[tokio::test(start_paused = true)]
async fn codel_queue_is_fifo_while_it_does_not_stand() {
    let mut gated = Gated::new(CODEL);
    let mut a = gated.send("a").await;
    let mut b = gated.send("b").await;
    let mut c = gated.send("c").await;
    let mut d = gated.send("d").await;
    // The queue has been non-empty for less than the interval: first come, first served.
    tokio::time::advance(Duration::from_millis(60)).await;
    assert_eq!(gated.finish(&mut a), "a");
    assert_pending!(b.poll());
    assert_pending!(c.poll());
    assert_pending!(d.poll());
    assert_eq!(gated.reached(), ["a", "b"]);
    assert_eq!(gated.finish(&mut b), "b");
    assert_pending!(c.poll());
    assert_eq!(gated.reached(), ["a", "b", "c"]);
    assert_eq!(gated.handle.queued(), 1);
}

#[tokio::test(start_paused = true)]
async fn codel_queue_serves_the_newest_first_and_sheds_the_oldest_while_it_stands() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let mut gated = Gated::new(CODEL);
    let mut a = gated.send("a").await;
    let mut b = gated.send("b").await;
    // Not empty for longer than the interval: the queue stands, and b has waited past the
    // target.
    tokio::time::advance(Duration::from_millis(150)).await;
    let mut c = gated.send("c").await;
    let mut d = gated.send("d").await;
    assert_eq!(gated.handle.queued(), 3);
    assert_eq!(gated.finish(&mut a), "a");
    // The permit goes to the newest waiter; the one older than the target is shed.
    let shed = match b.poll() {
        Poll::Ready(Err(e)) => e,
        other => panic!("b should be shed, got {other:?}"),
    };
    assert_eq!(shed.kind(), ErrorKind::Overloaded);
    assert_pending!(d.poll());
    assert_pending!(c.poll());
    assert_eq!(gated.reached(), ["a", "d"]);
    assert_eq!(gated.finish(&mut d), "d");
    assert_pending!(c.poll());
    assert_eq!(gated.reached(), ["a", "d", "c"]);
    assert_eq!(gated.finish(&mut c), "c");
    assert_eq!(gated.handle.queued(), 0);
    assert_eq!(gated.handle.in_flight(), 0);
    let metrics = support::Metrics::from(&snapshotter);
    let standing = [("name", "default"), ("reason", "queue_standing")];
    assert_eq!(
        metrics.counter("towerguard_limit_rejected_total", &standing),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn codel_a_request_joining_a_standing_queue_waits_the_target_at_most() {
    let mut gated = Gated::new(CODEL);
    let _a = gated.send("a").await;
    let mut b = gated.send("b").await;
    tokio::time::advance(Duration::from_millis(150)).await;
    let mut c = gated.send("c").await;
    // c joined a standing queue: it may wait 50 ms, not the queue's second.
    tokio::time::advance(Duration::from_millis(49)).await;
    assert_pending!(c.poll());
    tokio::time::advance(Duration::from_millis(2)).await;
    match c.poll() {
        Poll::Ready(Err(e)) => assert_eq!(e.kind(), ErrorKind::Overloaded),
        other => panic!("c should give up after the target, got {other:?}"),
    }
    // b joined while the queue did not stand: its bound is still the queue's.
    assert_pending!(b.poll());
    assert_eq!(gated.handle.queued(), 1);
}

#[tokio::test(start_paused = true)]
async fn fifo_queue_keeps_arrival_order_however_long_it_stands() {
    let mut gated = Gated::new(QueueDiscipline::Fifo);
    let mut a = gated.send("a").await;
    let mut b = gated.send("b").await;
    tokio::time::advance(Duration::from_millis(500)).await;
    let mut c = gated.send("c").await;
    assert_eq!(gated.finish(&mut a), "a");
    assert_pending!(b.poll());
    assert_pending!(c.poll());
    assert_eq!(gated.reached(), ["a", "b"]);
    assert_eq!(gated.finish(&mut b), "b");
    assert_pending!(c.poll());
    assert_eq!(gated.reached(), ["a", "b", "c"]);
}

/// Sends `n` requests one after another through `svc`; all must come back as `status`.
async fn send_statuses<S>(svc: &mut S, n: usize, status: StatusCode)
where
    S: Service<Request<String>, Response = Response<String>>,
    S::Error: std::fmt::Debug,
{
    for _ in 0..n {
        let req = Request::new(String::new());
        let response = svc.ready().await.unwrap().call(req).await.unwrap();
        assert_eq!(response.status(), status);
    }
}

/// A backend that answers every request with `status`.
fn answering(
    status: StatusCode,
) -> impl Service<Request<String>, Response = Response<String>, Error = Infallible, Future = impl Send>
       + Clone {
    service_fn(move |_req: Request<String>| async move {
        let mut response = Response::new(String::new());
        *response.status_mut() = status;
        Ok::<_, Infallible>(response)
    })
}

#[tokio::test(start_paused = true)]
async fn responses_of_503_and_429_bring_an_adaptive_limit_down() {
    for status in [
        StatusCode::SERVICE_UNAVAILABLE,
        StatusCode::TOO_MANY_REQUESTS,
    ] {
        let layer = ConcurrencyLimitLayer::builder()
            .adaptive(towerguard::limit::adaptive::Aimd::new(64, 4, 1_000))
            .build();
        let handle = layer.handle();
        let mut svc = layer.http_responses().layer(answering(status));
        send_statuses(&mut svc, 50, status).await;
        assert!(
            handle.limit() < 64,
            "{status}: the limit stayed at {}",
            handle.limit()
        );
    }
    // Answers of 200 are not drops, and 500 says nothing about load.
    for status in [StatusCode::OK, StatusCode::INTERNAL_SERVER_ERROR] {
        let layer = ConcurrencyLimitLayer::builder()
            .adaptive(towerguard::limit::adaptive::Aimd::new(64, 4, 1_000))
            .build();
        let handle = layer.handle();
        let mut svc = layer.http_responses().layer(answering(status));
        send_statuses(&mut svc, 50, status).await;
        assert_eq!(handle.limit(), 64, "{status}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_http_stack_counts_503_from_the_backend_as_drops() {
    let stack = towerguard::stack::StackBuilder::new()
        .adaptive_limit(64, 4, 1_000)
        .retry_attempts(1)
        .build_http::<Body>()
        .unwrap();
    let handle = stack.limit_handle().unwrap();
    let backend = service_fn(
        |_req: Request<towerguard::http::BufferedBody<Body>>| async {
            let mut response = Response::new(Body::empty());
            *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            Ok::<_, Infallible>(response)
        },
    );
    let svc = stack.layer(backend);
    for _ in 0..100 {
        let response = svc
            .clone()
            .oneshot(Request::new(Body::empty()))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    assert!(
        handle.limit() < 64,
        "the limit stayed at {}",
        handle.limit()
    );
}
