//! Response bodies of every size around the HTTP cache's bound, with and without
//! `Content-Length` (chunked), GET and HEAD, through the HTTP cache layer and through the
//! HTTP stack, each served by `axum::serve` over TCP: every byte arrives, nothing panics.
//! And clients that stop reading a large body: they hold no permit of the stack's limit,
//! and under `until_body_end` they hold theirs only until they leave (or `max_body_hold`).

mod support;

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::Path;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::ServiceBuilder;
use towerguard::http::{ErrorResponseLayer, HttpCacheLayer, CACHE_STATUS};
use towerguard::stack::StackBuilder;

use support::ChannelBody;

const BOUND: usize = 64 * 1024;

/// The byte at `i` of every body: a pattern, so a lost or repeated chunk shows.
fn byte(i: usize) -> u8 {
    (i % 251) as u8
}

fn pattern(len: usize) -> Bytes {
    (0..len).map(byte).collect()
}

/// A body of `left` bytes in 16 KiB chunks that declares no length (sent chunked).
struct Unsized {
    sent: usize,
    left: usize,
}

impl http_body::Body for Unsized {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(16 * 1024);
        let chunk: Bytes = (self.sent..self.sent + n).map(byte).collect();
        self.sent += n;
        self.left -= n;
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }
}

async fn declared(Path(n): Path<usize>) -> Response<Body> {
    Response::builder()
        .header("cache-control", "max-age=60")
        .body(Body::from(pattern(n)))
        .unwrap()
}

async fn chunked(Path(n): Path<usize>) -> Response<Body> {
    Response::builder()
        .header("cache-control", "max-age=60")
        .body(Body::new(Unsized { sent: 0, left: n }))
        .unwrap()
}

fn routes() -> Router {
    Router::new()
        .route("/declared/{n}", get(declared))
        .route("/chunked/{n}", get(chunked))
}

async fn serve(app: Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

async fn check(addr: std::net::SocketAddr, sizes: &[usize]) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    for kind in ["declared", "chunked"] {
        for &n in sizes {
            // Twice: a miss, then a hit (for sizes the cache keeps).
            for round in 0..2 {
                let uri = format!("http://{addr}/{kind}/{n}");
                let response = client.get(uri.parse().unwrap()).await.unwrap();
                assert_eq!(response.status(), StatusCode::OK, "{kind} {n}");
                let cache_status = response.headers()[&CACHE_STATUS]
                    .to_str()
                    .unwrap()
                    .to_owned();
                let body = response.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(body.len(), n, "{kind} {n} round {round}: {cache_status}");
                assert!(
                    body.iter().enumerate().all(|(i, b)| *b == byte(i)),
                    "{kind} {n} round {round}: bytes differ"
                );
                if round == 1 && n <= BOUND {
                    assert!(cache_status.contains("hit"), "{kind} {n}: {cache_status}");
                }
            }
            // HEAD answered from the stored GET carries the GET's length.
            let head = Request::builder()
                .method(Method::HEAD)
                .uri(format!("http://{addr}/{kind}/{n}"))
                .body(Empty::new())
                .unwrap();
            let response = client.request(head).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK, "HEAD {kind} {n}");
            if n <= BOUND {
                assert_eq!(
                    response.headers()["content-length"],
                    n.to_string().as_str(),
                    "HEAD {kind} {n}"
                );
            }
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert!(body.is_empty());
        }
    }
}

const SIZES: &[usize] = &[0, 1, BOUND - 1, BOUND, BOUND + 1, 3_000_000];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_around_the_bound_pass_the_http_cache_layer_intact() {
    let cache = HttpCacheLayer::builder().max_body_bytes(BOUND).build();
    let app = routes().layer(
        ServiceBuilder::new()
            .layer(ErrorResponseLayer::new())
            .layer(cache),
    );
    check(serve(app).await, SIZES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_around_the_bound_pass_the_http_stack_intact() {
    let stack = StackBuilder::new()
        .http_cache(HttpCacheLayer::builder().max_body_bytes(BOUND).build())
        .build_http::<Body>()
        .unwrap();
    let app = routes().layer(stack);
    check(serve(app).await, SIZES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_megabyte_body_passes_the_http_stack_intact() {
    let stack = StackBuilder::new()
        .http_cache(HttpCacheLayer::builder().max_body_bytes(BOUND).build())
        .build_http::<Body>()
        .unwrap();
    let addr = serve(routes().layer(stack)).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    for kind in ["declared", "chunked"] {
        let uri = format!("http://{addr}/{kind}/100000000");
        let response = client.get(uri.parse().unwrap()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let mut seen = 0usize;
        while let Some(frame) = body.frame().await {
            let data = frame.unwrap().into_data().unwrap();
            assert!(data.iter().enumerate().all(|(i, b)| *b == byte(seen + i)));
            seen += data.len();
        }
        assert_eq!(seen, 100_000_000, "{kind}");
    }
}

/// Sends a GET for `path` on a raw connection and reads only the response head: a client
/// that then stops reading, with the rest of the body stuck behind a full socket.
async fn stalled_client(addr: std::net::SocketAddr, path: &str) -> (tokio::net::TcpStream, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    (stream, String::from_utf8(head).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_a_large_body_holds_no_permit_of_the_stack() {
    const STORED: usize = 16 * 1024 * 1024;
    let stack = StackBuilder::new()
        .static_limit(1)
        .without_queue()
        .http_cache(
            HttpCacheLayer::builder()
                .max_body_bytes(32 * 1024 * 1024)
                .capacity_bytes(128 * 1024 * 1024)
                .build(),
        )
        .build_http::<Body>()
        .unwrap();
    let addr = serve(routes().layer(stack)).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let get = |path: String| {
        let client = client.clone();
        async move {
            let response = client
                .get(format!("http://{addr}{path}").parse().unwrap())
                .await
                .unwrap();
            let status = response.status();
            let cache_status = response.headers()[&CACHE_STATUS]
                .to_str()
                .unwrap()
                .to_owned();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, cache_status, body.len())
        }
    };
    // Stored (16 MiB), then two clients that stop reading: one on a hit of it, one on a
    // 48 MiB miss streamed past the store.
    assert_eq!(get(format!("/declared/{STORED}")).await.2, STORED);
    let (_hit, head) = stalled_client(addr, &format!("/declared/{STORED}")).await;
    assert!(head.contains("hit"), "{head}");
    let (_miss, head) = stalled_client(addr, "/chunked/50331648").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // The limit of 1 is free for the next request: neither holds a permit.
    let (status, cache_status, len) = get("/declared/10".to_owned()).await;
    assert_eq!((status, len), (StatusCode::OK, 10), "{cache_status}");
}

/// The same client under `until_body_end` holds its permit while its body is stuck, and
/// gives it back when it goes away (the bound on how long it may hold it,
/// `max_body_hold`, is tested on paused time in `tests/limit.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_until_body_end_a_client_that_stops_reading_holds_its_permit_until_it_leaves() {
    let limit = towerguard::limit::ConcurrencyLimitLayer::new(1);
    let handle = limit.handle();
    let app = routes().layer(
        ServiceBuilder::new()
            .layer(ErrorResponseLayer::new())
            .layer(limit.until_body_end()),
    );
    let addr = serve(app).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let get = || client.get(format!("http://{addr}/declared/10").parse().unwrap());
    // Produced 16 KiB at a time: the body is under way while the socket is full.
    let (stalled, head) = stalled_client(addr, "/chunked/50331648").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let response = get().await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "the stuck body holds the slot"
    );
    drop(stalled);
    while handle.in_flight() > 0 {
        tokio::task::yield_now().await;
    }
    assert_eq!(get().await.unwrap().status(), StatusCode::OK);
}

#[test]
fn the_sizes_straddle_the_bound() {
    assert!(SIZES.contains(&(BOUND - 1)) && SIZES.contains(&BOUND) && SIZES.contains(&(BOUND + 1)));
    let _ = Request::new(());
    let _: Response<()> = Response::new(());
}

type Feeds = tokio::sync::mpsc::UnboundedReceiver<tokio::sync::mpsc::Sender<Bytes>>;

/// An upstream that answers every request with `headers` and a body the test feeds: each
/// request hands the test, through the returned receiver, the sender of its body.
fn fed_upstream(
    headers: &'static [(&'static str, &'static str)],
) -> (
    impl tower::Service<
            Request<Body>,
            Response = Response<Body>,
            Error = Infallible,
            Future = impl Send,
        > + Clone
        + Send
        + Sync
        + 'static,
    Feeds,
) {
    let (feeds, fed) = tokio::sync::mpsc::unbounded_channel();
    let upstream = tower::service_fn(move |_req: Request<Body>| {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        feeds.send(tx).unwrap();
        let mut response = Response::builder();
        for (name, value) in headers {
            response = response.header(*name, *value);
        }
        std::future::ready(Ok(response.body(Body::new(ChannelBody(rx))).unwrap()))
    });
    (upstream, fed)
}

/// An app whose `/events` answers with `headers` and a body the test feeds.
fn event_app(headers: &'static [(&'static str, &'static str)]) -> (Router, Feeds) {
    let (upstream, feeds) = fed_upstream(headers);
    let app = Router::new().route_service("/events", upstream);
    (app, feeds)
}

/// Sends `events` one at a time and checks that each reaches the client before the next
/// is sent (the body does not end until its sender is dropped); returns the response's
/// `Cache-Status`.
async fn events_arrive_one_by_one(
    addr: std::net::SocketAddr,
    feeds: &mut Feeds,
    events: &[Bytes],
) -> String {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let run = async move {
        let response = client
            .get(format!("http://{addr}/events").parse().unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let cache_status = response.headers()[&CACHE_STATUS]
            .to_str()
            .unwrap()
            .to_owned();
        let tx = feeds.recv().await.unwrap();
        let mut body = response.into_body();
        for event in events {
            tx.send(event.clone()).await.unwrap();
            let mut got = Vec::new();
            while got.len() < event.len() {
                let frame = body.frame().await.unwrap().unwrap();
                got.extend_from_slice(&frame.into_data().unwrap());
            }
            assert_eq!(got, event[..]);
        }
        drop(tx);
        assert!(
            body.frame().await.is_none(),
            "the stream ends with its sender"
        );
        cache_status
    };
    // Only a guard against a hang: each step above waits on the one before.
    tokio::time::timeout(std::time::Duration::from_secs(60), run)
        .await
        .expect("the events reach the client as they are sent")
}

fn ticks(n: usize) -> Vec<Bytes> {
    (0..n)
        .map(|i| Bytes::from(format!("data: {i}\n\n")))
        .collect()
}

fn http_stack() -> towerguard::stack::HttpStack<Body> {
    StackBuilder::new()
        .http_cache(HttpCacheLayer::builder().max_body_bytes(BOUND).build())
        .build_http::<Body>()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_without_cache_fields_passes_the_http_stack_as_it_is_sent() {
    let (app, mut feeds) = event_app(&[("content-type", "text/event-stream")]);
    let addr = serve(app.layer(http_stack())).await;
    events_arrive_one_by_one(addr, &mut feeds, &ticks(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_marked_no_cache_passes_the_http_stack_as_it_is_sent() {
    let (app, mut feeds) = event_app(&[
        ("content-type", "text/event-stream"),
        ("cache-control", "no-cache"),
    ]);
    let addr = serve(app.layer(http_stack())).await;
    events_arrive_one_by_one(addr, &mut feeds, &ticks(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storable_body_that_stalls_reaches_its_client_as_it_arrives_and_is_stored() {
    let (app, mut feeds) = event_app(&[("cache-control", "max-age=60")]);
    let addr = serve(app.layer(http_stack())).await;
    let events = ticks(3);
    let cache_status = events_arrive_one_by_one(addr, &mut feeds, &events).await;
    assert!(cache_status.contains("detail=streamed"), "{cache_status}");
    // Stored once it ended within the bound: the next request is a hit, whole.
    let response = get_events(addr).await;
    let cache_status = status_of(&response);
    assert!(cache_status.contains("hit"), "{cache_status}");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, events.concat());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storable_body_that_outgrows_the_bound_as_it_streams_arrives_whole_and_is_not_stored() {
    let (app, mut feeds) = event_app(&[("cache-control", "max-age=60")]);
    let addr = serve(app.layer(http_stack())).await;
    // Three chunks, each 40% of the bound, each after the one before has arrived.
    let events: Vec<Bytes> = (0..3)
        .map(|i| {
            (0..BOUND * 2 / 5)
                .map(|j| byte(i * BOUND + j))
                .collect::<Bytes>()
        })
        .collect();
    events_arrive_one_by_one(addr, &mut feeds, &events).await;
    // Not stored: the next request goes to the origin again.
    let cache_status = status_of(&get_events(addr).await);
    assert!(!cache_status.contains("hit"), "{cache_status}");
    feeds.try_recv().expect("the origin was asked again");
}

/// A GET for `/events` on a client of its own.
async fn get_events(addr: std::net::SocketAddr) -> Response<hyper::body::Incoming> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    client
        .get(format!("http://{addr}/events").parse().unwrap())
        .await
        .unwrap()
}

/// The HTTP cache alone over a fed upstream with a storable response, a first GET for
/// `/a` answered with its head once the body stalls, and the sender of that body.
async fn streamed_to_a_first_client() -> (
    impl tower::Service<
            Request<Body>,
            Response = Response<towerguard::http::BufferedBody<Body>>,
            Error = towerguard::Error,
            Future = impl Send,
        > + Clone,
    Feeds,
    Response<towerguard::http::BufferedBody<Body>>,
    tokio::sync::mpsc::Sender<Bytes>,
) {
    use tower::{Layer, ServiceExt};
    let (upstream, mut feeds) = fed_upstream(&[("cache-control", "max-age=60")]);
    let svc = HttpCacheLayer::builder()
        .max_body_bytes(BOUND)
        .build()
        .layer(upstream);
    let first = svc.clone().oneshot(get_a()).await.unwrap();
    let tx = feeds.recv().await.unwrap();
    (svc, feeds, first, tx)
}

fn get_a() -> Request<Body> {
    Request::get("http://example.test/a")
        .body(Body::empty())
        .unwrap()
}

fn status_of<T>(response: &Response<T>) -> String {
    response.headers()[&CACHE_STATUS]
        .to_str()
        .unwrap()
        .to_owned()
}

/// Runs `test` on paused time with a guard: a step that waits for something that never
/// comes fails the test at once instead of hanging it.
async fn no_hang(test: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(std::time::Duration::from_secs(3600), test)
        .await
        .expect("every step is reached");
}

#[tokio::test(start_paused = true)]
async fn a_client_that_reads_nothing_holds_back_no_one_waiting_for_the_same_response() {
    use tower::ServiceExt;
    no_hang(async {
        // The first client has the head as soon as the body stalls.
        let (svc, mut feeds, first, tx) = streamed_to_a_first_client().await;
        assert!(
            status_of(&first).contains("detail=streamed"),
            "{}",
            status_of(&first)
        );
        // A second client joins the same origin request.
        let mut second = tokio_test::task::spawn(svc.clone().oneshot(get_a()));
        assert!(second.poll().is_pending());
        // The origin sends the whole body; the first client reads none of it.
        tx.send(Bytes::from_static(b"hello ")).await.unwrap();
        tx.send(Bytes::from_static(b"world")).await.unwrap();
        drop(tx);
        let second = second.await.unwrap();
        assert!(
            status_of(&second).contains("collapsed"),
            "{}",
            status_of(&second)
        );
        let body = second.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"hello world");
        assert!(feeds.try_recv().is_err(), "one origin request");
        // The first client reads it all afterwards.
        let body = first.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"hello world");
        let hit = svc.clone().oneshot(get_a()).await.unwrap();
        assert!(status_of(&hit).contains("hit"), "{}", status_of(&hit));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn the_first_client_leaving_a_streamed_response_alone_ends_its_origin_request() {
    use tower::ServiceExt;
    no_hang(async {
        let (svc, mut feeds, first, tx) = streamed_to_a_first_client().await;
        tx.send(Bytes::from_static(b"part")).await.unwrap();
        let mut body = first.into_body();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(&frame.into_data().unwrap()[..], b"part");
        // The client leaves; nobody else waits: the origin's body is dropped.
        drop(body);
        tx.closed().await;
        // Nothing was stored: the next request goes to the origin.
        let next = svc.clone().oneshot(get_a()).await.unwrap();
        assert!(
            status_of(&next).contains("fwd=uri-miss"),
            "{}",
            status_of(&next)
        );
        assert!(feeds.try_recv().is_ok(), "the origin is asked again");
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_waiter_gets_the_whole_response_after_the_first_client_leaves_it_mid_stream() {
    use tower::ServiceExt;
    no_hang(async {
        let (svc, mut feeds, first, tx) = streamed_to_a_first_client().await;
        let mut second = tokio_test::task::spawn(svc.clone().oneshot(get_a()));
        assert!(second.poll().is_pending());
        tx.send(Bytes::from_static(b"one ")).await.unwrap();
        drop(first);
        tx.send(Bytes::from_static(b"two")).await.unwrap();
        drop(tx);
        let second = second.await.unwrap();
        let body = second.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"one two");
        assert!(feeds.try_recv().is_err(), "one origin request");
    })
    .await;
}

#[test]
fn buffered_bodies_are_send_and_sync_when_their_bodies_are() {
    fn send<T: Send>() {}
    fn send_sync<T: Send + Sync>() {}
    send_sync::<towerguard::http::BufferedBody<hyper::body::Incoming>>();
    send_sync::<towerguard::http::BufferedBody<http_body_util::Full<Bytes>>>();
    send::<towerguard::http::BufferedBody<Body>>();
}

/// A body that logs each frame it yields, as an app's streaming handler might.
struct Logged(ChannelBody);

impl http_body::Body for Logged {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let polled = Pin::new(&mut self.0).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            tracing::info!("origin frame");
        }
        polled
    }
}

/// Keeps the name of the span each event was recorded in.
#[derive(Clone, Default)]
struct SpansOfEvents(std::sync::Arc<std::sync::Mutex<Vec<Option<&'static str>>>>);

impl<S> tracing_subscriber::Layer<S> for SpansOfEvents
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_event(&self, event: &tracing::Event<'_>, ctx: tracing_subscriber::layer::Context<'_, S>) {
        let span = ctx.event_span(event).map(|span| span.name());
        self.0.lock().unwrap().push(span);
    }
}

#[tokio::test(start_paused = true)]
async fn what_a_streamed_body_logs_stays_in_the_span_of_the_request_that_started_it() {
    use tower::{Layer, ServiceExt};
    use tracing::Instrument;
    use tracing_subscriber::layer::SubscriberExt;
    let spans = SpansOfEvents::default();
    let _subscriber =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(spans.clone()));
    no_hang(async {
        let (feeds, mut fed) = tokio::sync::mpsc::unbounded_channel();
        let upstream = tower::service_fn(move |_req: Request<Body>| {
            let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
            feeds.send(tx).unwrap();
            let response = Response::builder()
                .header("cache-control", "max-age=60")
                .body(Body::new(Logged(ChannelBody(rx))))
                .unwrap();
            std::future::ready(Ok::<_, Infallible>(response))
        });
        let svc = HttpCacheLayer::builder()
            .max_body_bytes(BOUND)
            .build()
            .layer(upstream);
        let first = svc
            .oneshot(get_a())
            .instrument(tracing::info_span!("request"))
            .await
            .unwrap();
        assert!(status_of(&first).contains("detail=streamed"));
        let tx = fed.recv().await.unwrap();
        tx.send(Bytes::from_static(b"one")).await.unwrap();
        drop(tx);
        // Read outside the request's span, as a server writes a response body out.
        let body = first.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"one");
    })
    .await;
    let spans = spans.0.lock().unwrap().clone();
    assert!(!spans.is_empty(), "the origin's body logged");
    assert!(
        spans.iter().all(|span| *span == Some("request")),
        "events and their spans: {spans:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_that_takes_the_declared_length_and_leaves_does_not_undo_the_store() {
    use tower::{Layer, ServiceExt};
    // A server drops a body once it has sent the bytes its Content-Length declared,
    // without asking for its end: that is no client leaving early.
    no_hang(async {
        let (upstream, mut feeds) =
            fed_upstream(&[("cache-control", "max-age=60"), ("content-length", "10")]);
        let svc = HttpCacheLayer::builder()
            .max_body_bytes(BOUND)
            .build()
            .layer(upstream);
        let first = svc.clone().oneshot(get_a()).await.unwrap();
        assert!(status_of(&first).contains("detail=streamed"));
        let tx = feeds.recv().await.unwrap();
        let mut body = first.into_body();
        let mut got = Vec::new();
        for part in [&b"hello"[..], &b"world"[..]] {
            tx.send(Bytes::from_static(part)).await.unwrap();
            let frame = body.frame().await.unwrap().unwrap();
            got.extend_from_slice(frame.data_ref().unwrap());
        }
        assert_eq!(&got[..], b"helloworld");
        // Every declared byte arrived; the origin's body has not ended yet.
        drop(body);
        drop(tx);
        // The store finishes in its own task; give it turns, a bounded number.
        let mut hit = None;
        for _ in 0..100 {
            tokio::task::yield_now().await;
            let next = svc.clone().oneshot(get_a()).await.unwrap();
            if status_of(&next).contains("hit") {
                hit = Some(next);
                break;
            }
        }
        let hit = hit.expect("the response was stored");
        let body = hit.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"helloworld");
    })
    .await;
}
