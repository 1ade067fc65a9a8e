//! Response bodies of every size around the HTTP cache's bound, with and without
//! `Content-Length` (chunked), GET and HEAD, through the HTTP cache layer and through the
//! HTTP stack, each served by `axum::serve` over TCP: every byte arrives, nothing panics.

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

#[test]
fn the_sizes_straddle_the_bound() {
    assert!(SIZES.contains(&(BOUND - 1)) && SIZES.contains(&BOUND) && SIZES.contains(&(BOUND + 1)));
    let _ = Request::new(());
    let _: Response<()> = Response::new(());
}
