//! The standard stack: validation, the full HTTP stack in an axum app over TCP, the metric
//! table, and the auto traits axum and `tokio::spawn` need.

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::routing::get;
use axum::Router;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tower::{service_fn, Layer, ServiceExt};
use towerguard::cache::CacheLayer;
use towerguard::http::{HttpCacheLayer, CACHE_STATUS};
use towerguard::limit::ConcurrencyLimitLayer;
use towerguard::stack::{StackBuilder, StackError};

use support::ChannelBody;

#[test]
fn each_contradiction_is_refused_with_its_own_error() {
    let s = Duration::from_secs;
    let ms = Duration::from_millis;
    let cases: Vec<(StackBuilder, StackError, &[&str])> = vec![
        (
            StackBuilder::new()
                .total_timeout(s(1))
                .attempt_timeout(s(2)),
            StackError::AttemptTimeoutExceedsTotal {
                attempt: s(2),
                total: s(1),
            },
            &["attempt_timeout", "total_timeout"],
        ),
        (
            StackBuilder::new()
                .total_timeout(s(1))
                .attempt_timeout(ms(500))
                .hedge(s(1)),
            StackError::HedgeDelaysExceedTotal {
                delays: s(1),
                total: s(1),
            },
            &["hedge", "total_timeout"],
        ),
        (
            StackBuilder::new().without_budget(),
            StackError::RetryWithoutBudget,
            &["budget", "retry_attempts"],
        ),
        (
            StackBuilder::new()
                .retry_attempts(1)
                .hedge(ms(5))
                .without_budget(),
            StackError::RetryWithoutBudget,
            &["budget", "hedge"],
        ),
        (
            StackBuilder::new()
                .total_timeout(s(1))
                .attempt_timeout(ms(500))
                .queue(10, s(1)),
            StackError::QueueWaitExceedsTotal {
                wait: s(1),
                total: s(1),
            },
            &["queue", "total_timeout"],
        ),
        (
            StackBuilder::new().total_timeout(Duration::ZERO),
            StackError::ZeroTimeout,
            &["total_timeout", "without_total_timeout"],
        ),
    ];
    for (builder, expected, setters) in cases {
        let err = builder.build_http::<Body>().unwrap_err();
        assert_eq!(err, expected);
        let text = err.to_string();
        assert_eq!(text, text.to_lowercase(), "{text}");
        // The message names the setters that would mend it.
        for setter in setters {
            assert!(
                text.contains(&format!("`{setter}`")),
                "{text}: no `{setter}`"
            );
        }
        assert_eq!(builder.build::<u64, u64>().unwrap_err(), expected);
    }
    assert!(
        StackBuilder::new().build_http::<Body>().is_ok(),
        "the defaults are consistent"
    );
    assert!(StackBuilder::new()
        .retry_attempts(1)
        .without_budget()
        .build_http::<Body>()
        .is_ok());
    assert!(StackBuilder::new()
        .without_limit()
        .queue(10, s(60))
        .build_http::<Body>()
        .is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_total_timeout_alone_builds_and_the_default_attempt_timeout_fits_inside_it() {
    let stack = StackBuilder::new()
        .total_timeout(Duration::from_secs(2))
        .build()
        .expect("the default attempt timeout follows the total");
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let svc = stack.layer(service_fn(move |_: u64| {
        counted.fetch_add(1, Ordering::Relaxed);
        std::future::pending::<Result<u64, Infallible>>()
    }));
    let err = svc.oneshot(1).await.unwrap_err();
    assert_eq!(err.kind(), towerguard::ErrorKind::TimedOut);
    // Each attempt timed out before the total did, so the retry had its turn.
    assert!(calls.load(Ordering::Relaxed) >= 2, "{calls:?} calls");
}

/// The app: `/ok` cacheable, `/hold` held until opened (announcing arrivals), `/hang`
/// never answering.
struct App {
    inside: AtomicUsize,
    two_inside: Notify,
    gate: watch::Sender<bool>,
    hits: AtomicUsize,
}

async fn ok(State(app): State<Arc<App>>) -> ([(&'static str, &'static str); 1], String) {
    let n = app.hits.fetch_add(1, Ordering::SeqCst) + 1;
    ([("cache-control", "max-age=60")], format!("ok #{n}"))
}

async fn hold(State(app): State<Arc<App>>) -> &'static str {
    if app.inside.fetch_add(1, Ordering::SeqCst) + 1 == 2 {
        app.two_inside.notify_one();
    }
    let mut gate = app.gate.subscribe();
    gate.wait_for(|open| *open).await.unwrap();
    "held"
}

async fn hang() -> &'static str {
    std::future::pending::<()>().await;
    "never"
}

async fn get_uri(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, String>,
    uri: String,
) -> (StatusCode, HeaderMap, String) {
    let response = client.get(uri.parse().unwrap()).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_full_http_stack_in_axum_answers_200_503_504_and_cache_hits_over_tcp() {
    let app_state = Arc::new(App {
        inside: AtomicUsize::new(0),
        two_inside: Notify::new(),
        gate: watch::channel(false).0,
        hits: AtomicUsize::new(0),
    });
    let stack = StackBuilder::new()
        .name("axum_test")
        .total_timeout(Duration::from_secs(2))
        .attempt_timeout(Duration::from_secs(1))
        .static_limit(2)
        .without_queue()
        .http_cache(HttpCacheLayer::builder().name("axum_test").build())
        .build_http::<Body>()
        .unwrap();
    let app = Router::new()
        .route("/ok", get(ok))
        .route("/hold", get(hold))
        .route("/hang", get(hang))
        .layer(stack)
        .with_state(app_state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = Client::builder(TokioExecutor::new()).build_http::<String>();

    // 200, then a cache hit.
    let (status, _, body) = get_uri(&client, format!("http://{addr}/ok")).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok #1"));
    let (status, headers, body) = get_uri(&client, format!("http://{addr}/ok")).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok #1"));
    assert!(headers[&CACHE_STATUS].to_str().unwrap().contains("hit"));

    // 503 with Retry-After once the limit is full. Distinct URIs, so the cache does not
    // coalesce them.
    let mut held = JoinSet::new();
    for i in 0..2 {
        let client = client.clone();
        held.spawn(async move { get_uri(&client, format!("http://{addr}/hold?i={i}")).await });
    }
    app_state.two_inside.notified().await;
    let (status, headers, _) = get_uri(&client, format!("http://{addr}/hold?i=9")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.contains_key("retry-after"));
    app_state.gate.send_replace(true);
    while let Some(result) = held.join_next().await {
        assert_eq!(result.unwrap().0, StatusCode::OK);
    }

    // 504 when nothing answers in time.
    let (status, _, _) = get_uri(&client, format!("http://{addr}/hang")).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
}

#[tokio::test(start_paused = true)]
async fn the_generic_stack_composes_cache_retry_and_timeouts() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let flaky = service_fn(move |x: u32| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                Err(std::io::Error::other("reset"))
            } else {
                Ok::<_, std::io::Error>(x * 2)
            }
        }
    });
    let cache = CacheLayer::builder(|x: &u32| Some(*x)).build();
    let stack = StackBuilder::new().build_with_cache(cache).unwrap();
    let svc = stack.layer(flaky);
    assert_eq!(svc.clone().oneshot(21).await.unwrap(), 42, "retried");
    assert_eq!(svc.clone().oneshot(21).await.unwrap(), 42, "cached");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// Every `towerguard_*` metric name in the README's table.
fn readme_metrics() -> Vec<String> {
    let readme = include_str!("../README.md");
    let mut names: Vec<String> = readme
        .lines()
        .filter_map(|line| line.strip_prefix("| `towerguard_"))
        .filter_map(|rest| rest.split('`').next())
        .map(|name| format!("towerguard_{name}"))
        // The second tier's table (feature `redis`) is checked in tests/redis.rs.
        .filter(|name| !name.starts_with("towerguard_second_tier_"))
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn the_readme_metric_table_matches_what_the_full_stack_emits() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let stack = metrics::with_local_recorder(&recorder, || {
        StackBuilder::new()
            .name("table")
            .hedge_adaptive()
            .http_cache(HttpCacheLayer::builder().name("table").build())
            .build_http::<Body>()
            .unwrap()
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let inner = service_fn(
            |_req: Request<towerguard::http::BufferedBody<Body>>| async {
                Ok::<_, Infallible>(
                    http::Response::builder()
                        .header("cache-control", "max-age=60")
                        .body(Body::from("x"))
                        .unwrap(),
                )
            },
        );
        let svc = metrics::with_local_recorder(&recorder, || stack.layer(inner));
        for _ in 0..3 {
            let req = Request::get("http://example.test/a")
                .body(Body::empty())
                .unwrap();
            let response = svc.clone().oneshot(req).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
        }
    });
    let mut emitted: Vec<String> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, _)| key.key().name().to_owned())
        .filter(|name| name.starts_with("towerguard_"))
        .collect();
    emitted.sort();
    emitted.dedup();
    let mut listed: Vec<String> = towerguard::metrics::METRICS
        .iter()
        .map(|m| m.name.to_owned())
        .collect();
    listed.sort();
    assert_eq!(
        readme_metrics(),
        listed,
        "README table and metrics::METRICS"
    );
    assert_eq!(
        emitted, listed,
        "what the full stack emits and metrics::METRICS"
    );
}

#[test]
fn the_stack_service_and_future_are_send_sync_and_static() {
    fn assert_service<T: Send + Sync + Clone + 'static>(_: &T) {}
    fn assert_future<F: std::future::Future + Send + 'static>(_: &F) {}
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let stack = StackBuilder::new().build_http::<Body>().unwrap();
    let inner = service_fn(
        |_req: Request<towerguard::http::BufferedBody<Body>>| async {
            Ok::<_, Infallible>(http::Response::new(Body::empty()))
        },
    );
    let mut svc = stack.layer(inner);
    assert_service(&svc);
    let future = tower::Service::call(&mut svc, Request::new(Body::empty()));
    assert_future(&future);
}

/// A request body that announces its first poll and never ends.
struct EndlessUpload(Arc<Notify>);

impl http_body::Body for EndlessUpload {
    type Data = bytes::Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.0.notify_one();
        std::task::Poll::Pending
    }
}

#[tokio::test(start_paused = true)]
async fn a_never_ending_upload_holds_no_permit() {
    let stack = StackBuilder::new()
        .static_limit(1)
        .without_queue()
        .build_http::<http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, Infallible>>()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let svc = stack.layer(service_fn(move |_req: Request<_>| {
        counter.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(http::Response::new(Body::from("ok"))) }
    }));
    let reading = Arc::new(Notify::new());
    let upload = Request::put("http://example.test/upload")
        .body(EndlessUpload(reading.clone()).boxed_unsync())
        .unwrap();
    let uploading = tokio::spawn(svc.clone().oneshot(upload));
    reading.notified().await;
    let next = Request::get("http://example.test/next")
        .body(http_body_util::Empty::new().boxed_unsync())
        .unwrap();
    let response = svc.clone().oneshot(next).await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "admitted while the upload reads"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    uploading.abort();
}

/// A request body that sends a chunk and then fails, as a client that goes away does.
struct BrokenUpload(bool);

impl http_body::Body for BrokenUpload {
    type Data = bytes::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if self.0 {
            return std::task::Poll::Ready(Some(Err(std::io::Error::other("connection reset"))));
        }
        self.0 = true;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(bytes::Bytes::from("part")))))
    }
}

#[tokio::test(start_paused = true)]
async fn a_request_body_that_fails_is_the_clients_fault_400_and_the_backend_is_not_called() {
    let stack = StackBuilder::new()
        .build_http::<http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, std::io::Error>>()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let svc = stack.layer(service_fn(move |_req: Request<_>| {
        counter.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(http::Response::new(Body::from("ok"))) }
    }));
    let req = Request::put("http://example.test/upload")
        .body(BrokenUpload(false).boxed_unsync())
        .unwrap();
    let response = svc.oneshot(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "the backend was not called"
    );
}

/// What a proxy does: the upstream's slot is busy until its body has been sent, so the
/// limit goes under the stack, around the client, and holds each permit until the body
/// ends, through the HTTP cache that streams a body too large to store.
#[tokio::test(start_paused = true)]
async fn a_limit_under_the_stack_holds_its_permit_until_a_streamed_body_ends() {
    let limit = ConcurrencyLimitLayer::builder()
        .name("stack_body_end")
        .limit(1)
        .build();
    let stack = StackBuilder::new()
        .name("stack_body_end")
        .without_limit()
        .http_cache(
            HttpCacheLayer::builder()
                .name("stack_body_end")
                .max_body_bytes(1024)
                .build(),
        )
        .build_http::<Body>()
        .unwrap();
    // Each upstream call hands the test the sending end of its body.
    let (senders, mut bodies) = tokio::sync::mpsc::unbounded_channel();
    let upstream = service_fn(move |req: Request<towerguard::http::BufferedBody<Body>>| {
        let (send, receive) = tokio::sync::mpsc::channel(4);
        senders.send(send).unwrap();
        let cache_control = match req.uri().path() {
            "/small" => "max-age=60",
            _ => "no-store",
        };
        async move {
            Ok::<_, Infallible>(
                http::Response::builder()
                    .header("cache-control", cache_control)
                    .body(ChannelBody(receive))
                    .unwrap(),
            )
        }
    });
    let svc = stack.layer(limit.until_body_end().layer(upstream));
    let get = |path: &str| {
        Request::get(format!("http://example.test{path}"))
            .body(Body::empty())
            .unwrap()
    };
    let handle = limit.handle();

    // A large download: its head is back, its body still streams.
    let download = svc.clone().oneshot(get("/large")).await.unwrap();
    assert_eq!(download.status(), StatusCode::OK);
    let sender = bodies.recv().await.unwrap();
    sender
        .send(bytes::Bytes::from(vec![b'x'; 4096]))
        .await
        .unwrap();
    assert_eq!(handle.in_flight(), 1, "the body holds the upstream's slot");
    let refused = svc.clone().oneshot(get("/other")).await.unwrap();
    assert_eq!(
        refused.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "a second upstream request while the first body streams"
    );

    // The client reads to the end: the slot comes back.
    drop(sender);
    let body = download.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), 4096, "the streamed body arrives whole");
    assert_eq!(
        handle.in_flight(),
        0,
        "the slot comes back at the body's end"
    );

    // A small body the cache stores goes back when the cache has read it, before the
    // client reads anything. (The response may come before its body ends: the cache
    // passes on a body that stalls as it arrives, and reads it in a task of its own.)
    let storing = tokio::spawn(svc.clone().oneshot(get("/small")));
    let sender = bodies.recv().await.unwrap();
    sender
        .send(bytes::Bytes::from_static(b"small"))
        .await
        .unwrap();
    drop(sender);
    let stored = storing.await.unwrap().unwrap();
    assert_eq!(stored.status(), StatusCode::OK);
    for _ in 0..100 {
        if handle.in_flight() == 0 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(
        handle.in_flight(),
        0,
        "the cache read the body: the slot is back"
    );
    let body = stored.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"small");
    let hit = svc.clone().oneshot(get("/small")).await.unwrap();
    assert!(
        hit.headers()[CACHE_STATUS]
            .to_str()
            .unwrap()
            .contains("hit"),
        "the small body was stored"
    );
}

/// A body made of the frames given: data, then trailers, as a gRPC response ends.
struct Frames(std::collections::VecDeque<http_body::Frame<bytes::Bytes>>);

impl http_body::Body for Frames {
    type Data = bytes::Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Infallible>>> {
        std::task::Poll::Ready(self.0.pop_front().map(Ok))
    }
}

fn with_trailers(data: &'static [u8]) -> Frames {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    trailers.insert("grpc-message", "done".parse().unwrap());
    Frames(
        [
            http_body::Frame::data(bytes::Bytes::from_static(data)),
            http_body::Frame::trailers(trailers),
        ]
        .into(),
    )
}

#[tokio::test]
async fn trailers_of_a_grpc_style_call_come_through_the_http_stack_over_http2() {
    // gRPC: a POST over HTTP/2 whose status is in the response's trailers, and whose
    // request may end with trailers too. The stack (cache, timeouts, limit held until
    // the body ends, retry, hedge) must pass both on.
    let seen_request_trailers = Arc::new(std::sync::Mutex::new(None));
    let seen = seen_request_trailers.clone();
    let grpc = service_fn(move |req: Request<Body>| {
        let seen = seen.clone();
        async move {
            let collected = req.into_body().collect().await.unwrap();
            *seen.lock().unwrap() = collected.trailers().cloned();
            Ok::<_, Infallible>(
                http::Response::builder()
                    .header("content-type", "application/grpc")
                    .body(Body::new(with_trailers(b"reply")))
                    .unwrap(),
            )
        }
    });
    let stack = StackBuilder::new()
        .name("grpc_test")
        .total_timeout(Duration::from_secs(5))
        .static_limit(4)
        .http_cache(HttpCacheLayer::builder().name("grpc_test").build())
        .build_http::<Body>()
        .unwrap();
    let app = Router::new()
        .route_service("/pkg.Service/Call", grpc)
        .layer(stack);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Frames>();
    // POST goes as it is; PUT, idempotent, is read ahead to be replayed by the retry.
    for method in [http::Method::POST, http::Method::PUT] {
        let request = Request::builder()
            .method(method)
            .uri(format!("http://{addr}/pkg.Service/Call"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(with_trailers(b"ask"))
            .unwrap();
        let response = client.request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.version(), http::Version::HTTP_2);
        let collected = response.into_body().collect().await.unwrap();
        let trailers = collected
            .trailers()
            .cloned()
            .expect("the response's trailers");
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers["grpc-message"], "done");
        assert_eq!(&collected.to_bytes()[..], b"reply");
        let request_trailers = seen_request_trailers.lock().unwrap().take();
        assert_eq!(
            request_trailers.expect("the request's trailers")["grpc-status"],
            "0"
        );
    }
}
