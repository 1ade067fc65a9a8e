//! The HTTP cache over real TCP: an axum origin on loopback, reached through a hyper client
//! with the cache layer in front of it.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;

use axum::body::Body as AxumBody;
use axum::extract::{Request as AxumRequest, State};
use axum::response::Response as AxumResponse;
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tower::{Layer, Service, ServiceExt};
use towerguard::http::{HttpCache, HttpCacheBuilder, HttpCacheLayer, CACHE_STATUS};

/// The origin: counts requests per path, remembers conditional headers, and can hold
/// responses behind a gate.
struct Origin {
    hits: Mutex<HashMap<String, usize>>,
    /// Notified on every request the origin receives.
    arrived: tokio::sync::Notify,
    conditional: AtomicUsize,
    gate: watch::Sender<bool>,
    /// Every request the origin received: method, path and the headers asked about.
    seen: Mutex<Vec<(Method, String, HeaderMap)>>,
    /// The status `/soe*` answers with instead of 200, when set.
    failing: Mutex<Option<StatusCode>>,
}

impl Origin {
    fn hits(&self, path: &str) -> usize {
        *self.hits.lock().unwrap().get(path).unwrap_or(&0)
    }
}

async fn origin(State(origin): State<Arc<Origin>>, req: AxumRequest) -> AxumResponse {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let n = {
        let mut hits = origin.hits.lock().unwrap();
        let n = hits.entry(path.clone()).or_insert(0);
        *n += 1;
        *n
    };
    origin.arrived.notify_waiters();
    let headers = req.headers().clone();
    origin
        .seen
        .lock()
        .unwrap()
        .push((req.method().clone(), path.clone(), headers.clone()));
    let builder = AxumResponse::builder();
    let lang = headers
        .get("accept-language")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none")
        .to_owned();
    match path.as_str() {
        "/gated" => {
            let mut gate = origin.gate.subscribe();
            gate.wait_for(|open| *open).await.unwrap();
            builder
                .header("cache-control", "max-age=60")
                .body(AxumBody::from(format!("gated #{n}")))
        }
        "/gated-private" => {
            let mut gate = origin.gate.subscribe();
            gate.wait_for(|open| *open).await.unwrap();
            builder
                .header("cache-control", "private, max-age=60")
                .body(AxumBody::from(format!("private #{n}")))
        }
        "/gated-cookie" => {
            let mut gate = origin.gate.subscribe();
            gate.wait_for(|open| *open).await.unwrap();
            builder
                .header("cache-control", "max-age=60")
                .header("set-cookie", format!("session={n}"))
                .body(AxumBody::from(format!("cookie #{n}")))
        }
        "/tagged" => builder
            .header("cache-control", "max-age=60")
            .header("cache-tag", "news, sport")
            .header("surrogate-key", "front-page")
            .body(AxumBody::from(format!("tagged #{n}"))),
        "/private" => builder
            .header("cache-control", "private, max-age=60")
            .body(AxumBody::from(format!("private #{n}"))),
        "/cookie" => builder
            .header("cache-control", "max-age=60")
            .header("set-cookie", format!("session={n}"))
            .body(AxumBody::from(format!("cookie #{n}"))),
        "/auth" => builder
            .header("cache-control", "max-age=60")
            .body(AxumBody::from(format!(
                "for {:?} #{n}",
                headers.get("authorization")
            ))),
        "/auth-public" => builder
            .header("cache-control", "public, max-age=60")
            .body(AxumBody::from(format!("public #{n}"))),
        "/vary" => builder
            .header("cache-control", "max-age=60")
            .header("vary", "accept-language")
            .body(AxumBody::from(format!("lang {lang} #{n}"))),
        "/etag" => {
            if headers.get("if-none-match").and_then(|v| v.to_str().ok()) == Some("\"v1\"") {
                origin.conditional.fetch_add(1, Ordering::SeqCst);
                builder
                    .status(StatusCode::NOT_MODIFIED)
                    .header("etag", "\"v1\"")
                    .header("cache-control", "max-age=0")
                    .header("x-refreshed", n.to_string())
                    .body(AxumBody::empty())
            } else {
                builder
                    .header("etag", "\"v1\"")
                    .header("cache-control", "max-age=0")
                    .body(AxumBody::from(format!("etag body #{n}")))
            }
        }
        p if p.starts_with("/rv-") => {
            // A stored 200 (stale at once) whose revalidation answers a 304 carrying the
            // fields the path names.
            if query.as_deref() == Some("gated") {
                let mut gate = origin.gate.subscribe();
                gate.wait_for(|open| *open).await.unwrap();
            }
            if headers.get("if-none-match").and_then(|v| v.to_str().ok()) == Some("\"v1\"") {
                let builder = builder
                    .status(StatusCode::NOT_MODIFIED)
                    .header("etag", "\"v1\"");
                match p {
                    "/rv-cookie" => builder
                        .header("cache-control", "max-age=60")
                        .header("set-cookie", format!("session={n}")),
                    "/rv-private" => builder.header("cache-control", "private, max-age=60"),
                    _ => builder.header("cache-control", "no-store"),
                }
                .body(AxumBody::empty())
            } else {
                builder
                    .header("etag", "\"v1\"")
                    .header("cache-control", "max-age=0")
                    .body(AxumBody::from(format!("{p} #{n}")))
            }
        }
        "/no-cache" => {
            if headers.get("if-none-match").and_then(|v| v.to_str().ok()) == Some("\"nc\"") {
                origin.conditional.fetch_add(1, Ordering::SeqCst);
                builder
                    .status(StatusCode::NOT_MODIFIED)
                    .header("etag", "\"nc\"")
                    .header("cache-control", "Max-Age=10000, No-Cache")
                    .body(AxumBody::empty())
            } else {
                builder
                    .header("etag", "\"nc\"")
                    .header("cache-control", "Max-Age=10000, No-Cache")
                    .body(AxumBody::from(format!("no-cache #{n}")))
            }
        }
        "/swr" => builder
            .header("cache-control", "max-age=0, stale-while-revalidate=60")
            .body(AxumBody::from(format!("swr #{n}"))),
        "/sie" if n == 1 => builder
            .header("cache-control", "max-age=0, stale-if-error=60")
            .body(AxumBody::from(format!("sie #{n}"))),
        "/sie" => builder
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .body(AxumBody::from("down")),
        "/inm" => {
            // Answers a client's own If-None-Match.
            if headers.get("if-none-match").and_then(|v| v.to_str().ok()) == Some("\"i\"") {
                builder
                    .status(StatusCode::NOT_MODIFIED)
                    .header("etag", "\"i\"")
                    .body(AxumBody::empty())
            } else {
                builder
                    .header("etag", "\"i\"")
                    .header("cache-control", "max-age=60")
                    .body(AxumBody::from(format!("inm #{n}")))
            }
        }
        "/digits" => builder
            .header("cache-control", "max-age=60")
            .header("etag", "\"d\"")
            .body(AxumBody::from("0123456789")),
        "/head-stale" => if req.method() == Method::HEAD {
            builder
                .header("etag", "\"h\"")
                .header("cache-control", "max-age=60")
                .header("x-head", n.to_string())
        } else {
            builder
                .header("etag", "\"h\"")
                .header("cache-control", "max-age=0")
        }
        .body(AxumBody::from(format!("head-stale #{n}"))),
        "/head-changed" => builder
            .header("etag", format!("\"v{n}\""))
            .header("cache-control", "max-age=0")
            .body(AxumBody::from(format!("head-changed #{n}"))),
        p if p.starts_with("/t/") => {
            // `/t/TAGS/NAME`: tagged with TAGS (comma-separated, `-` for none).
            let tags = p.split('/').nth(2).unwrap_or("-");
            let builder = builder.header("cache-control", "max-age=60");
            let builder = if tags == "-" {
                builder
            } else {
                builder.header("cache-tag", tags)
            };
            builder.body(AxumBody::from(format!("{p} #{n}")))
        }
        p if p.starts_with("/soe") => {
            // A 200, stale at once, or the failure status the test set.
            let cc = match p {
                "/soe-must-revalidate" => "max-age=0, must-revalidate",
                "/soe-old" => "max-age=0",
                _ => "max-age=0",
            };
            let status = origin.failing.lock().unwrap().unwrap_or(StatusCode::OK);
            let builder = builder
                .status(status)
                .header("cache-control", cc)
                .header("etag", "\"soe\"");
            let builder = if p == "/soe-old" {
                builder.header("age", "600")
            } else {
                builder
            };
            builder.body(AxumBody::from(format!("{p} #{n}")))
        }
        "/large" => builder
            .header("cache-control", "max-age=60")
            .body(AxumBody::from(vec![b'x'; 100 * 1024])),
        _ => builder
            .header("cache-control", "max-age=60")
            .header("etag", "\"e\"")
            .body(AxumBody::from(format!("{path} #{n}"))),
    }
    .unwrap()
}

type Cached = HttpCache<Client<HttpConnector, Full<Bytes>>>;

struct Harness {
    addr: SocketAddr,
    origin: Arc<Origin>,
    cache: Cached,
    layer: HttpCacheLayer,
}

async fn harness(layer: HttpCacheLayer) -> Harness {
    let origin = Arc::new(Origin {
        hits: Mutex::default(),
        arrived: tokio::sync::Notify::new(),
        conditional: AtomicUsize::new(0),
        gate: watch::channel(true).0,
        seen: Mutex::default(),
        failing: Mutex::default(),
    });
    let app = Router::new()
        .fallback(origin_route)
        .with_state(origin.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    Harness {
        addr,
        origin,
        cache: layer.layer(client),
        layer,
    }
}

async fn origin_route(state: State<Arc<Origin>>, req: AxumRequest) -> AxumResponse {
    origin(state, req).await
}

impl Harness {
    fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Request<Full<Bytes>> {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(Full::new(Bytes::new())).unwrap()
    }

    async fn send(&self, req: Request<Full<Bytes>>) -> (StatusCode, HeaderMap, Bytes) {
        let response = self.cache.clone().oneshot(req).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (parts.status, parts.headers, body)
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, Bytes) {
        self.send(self.request(Method::GET, path, headers)).await
    }
}

fn cache_status(headers: &HeaderMap) -> String {
    headers
        .get(&CACHE_STATUS)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// The tests' cache: bodies up to 1 KiB stored (`/large` is above it).
fn builder() -> HttpCacheBuilder {
    HttpCacheLayer::builder().max_body_bytes(1024)
}

fn layer() -> HttpCacheLayer {
    builder().build()
}

/// Starts `n` concurrent GETs of `path`, each polled once (so it has joined the flight)
/// before the gate opens; returns their statuses, bodies and headers.
async fn concurrent(h: &Harness, path: &str, n: usize) -> Vec<(StatusCode, String, HeaderMap)> {
    h.origin.gate.send_replace(false);
    let joined = Arc::new(Semaphore::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..n {
        let mut svc = h.cache.clone();
        let req = h.request(Method::GET, path, &[]);
        let joined = joined.clone();
        tasks.spawn(async move {
            let mut fut: Pin<Box<dyn Future<Output = _> + Send>> =
                Box::pin(svc.ready().await.unwrap().call(req));
            let first = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await;
            joined.add_permits(1);
            let response = match first {
                Poll::Ready(result) => result,
                Poll::Pending => fut.await,
            }
            .unwrap();
            let (parts, body) = response.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            (
                parts.status,
                String::from_utf8(body.to_vec()).unwrap(),
                parts.headers,
            )
        });
    }
    joined.acquire_many(n as u32).await.unwrap().forget();
    h.origin.gate.send_replace(true);
    let mut out = Vec::new();
    while let Some(r) = tasks.join_next().await {
        out.push(r.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_gets_become_one_origin_request() {
    let h = harness(layer()).await;
    let results = concurrent(&h, "/gated", 200).await;
    assert_eq!(h.origin.hits("/gated"), 1);
    assert!(results
        .iter()
        .all(|(s, b, _)| *s == StatusCode::OK && b == "gated #1"));
    let collapsed = results
        .iter()
        .filter(|(_, _, headers)| cache_status(headers).contains("collapsed"))
        .count();
    assert!(collapsed >= 199 - 1, "{collapsed} collapsed");
    // And the next one is a hit.
    let (_, headers, body) = h.get("/gated", &[]).await;
    assert_eq!(body, "gated #1");
    assert!(
        cache_status(&headers).contains("hit"),
        "{}",
        cache_status(&headers)
    );
    assert!(headers.contains_key("age"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_and_set_cookie_responses_never_reach_a_second_client() {
    let h = harness(layer()).await;
    for path in ["/private", "/cookie"] {
        let (_, _, first) = h.get(path, &[]).await;
        let (_, headers, second) = h.get(path, &[]).await;
        assert_ne!(first, second, "{path}: each client gets its own response");
        assert_eq!(h.origin.hits(path), 2);
        assert!(
            cache_status(&headers).contains("fwd="),
            "{}",
            cache_status(&headers)
        );
    }
    for path in ["/gated-private", "/gated-cookie"] {
        let results = concurrent(&h, path, 10).await;
        let mut bodies: Vec<_> = results.iter().map(|(_, b, _)| b.clone()).collect();
        bodies.sort();
        bodies.dedup();
        assert_eq!(
            bodies.len(),
            10,
            "{path}: no coalesced waiter got the leader's response"
        );
        assert_eq!(h.origin.hits(path), 10);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_to_authorized_requests_are_shared_only_when_marked_so() {
    let h = harness(layer()).await;
    let (_, _, alice) = h.get("/auth", &[("authorization", "Bearer alice")]).await;
    let (_, _, anonymous) = h.get("/auth", &[]).await;
    assert_ne!(alice, anonymous);
    assert!(String::from_utf8_lossy(&alice).contains("alice"));
    assert!(!String::from_utf8_lossy(&anonymous).contains("alice"));
    assert_eq!(h.origin.hits("/auth"), 2);

    let (_, _, first) = h
        .get("/auth-public", &[("authorization", "Bearer alice")])
        .await;
    let (_, headers, second) = h.get("/auth-public", &[]).await;
    assert_eq!(first, second, "public: shareable");
    assert!(cache_status(&headers).contains("hit"));
    assert_eq!(h.origin.hits("/auth-public"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_keeps_one_variant_per_nominated_header_value() {
    let h = harness(layer()).await;
    let (_, _, en) = h.get("/vary", &[("accept-language", "en")]).await;
    let (_, _, de) = h.get("/vary", &[("accept-language", "de")]).await;
    assert_eq!(en, "lang en #1");
    assert_eq!(de, "lang de #2");
    let (_, headers, en_again) = h.get("/vary", &[("accept-language", "en")]).await;
    assert_eq!(en_again, "lang en #1");
    assert!(cache_status(&headers).contains("hit"));
    let (_, _, de_again) = h.get("/vary", &[("accept-language", "de")]).await;
    assert_eq!(de_again, "lang de #2");
    let (_, _, none) = h.get("/vary", &[]).await;
    assert_eq!(none, "lang none #3");
    assert_eq!(h.origin.hits("/vary"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_entry_is_revalidated_and_a_304_refreshes_it() {
    let h = harness(layer()).await;
    let (_, _, body) = h.get("/etag", &[]).await;
    assert_eq!(body, "etag body #1");
    let (status, headers, body) = h.get("/etag", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "etag body #1", "the stored body, revalidated");
    assert_eq!(h.origin.conditional.load(Ordering::SeqCst), 1);
    assert_eq!(
        headers["x-refreshed"], "2",
        "headers refreshed from the 304"
    );
    let cs = cache_status(&headers);
    assert!(
        cs.contains("fwd=stale") && cs.contains("fwd-status=304"),
        "{cs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_own_conditional_request_gets_a_304_from_a_fresh_entry() {
    let h = harness(layer()).await;
    h.get("/doc", &[]).await;
    let (status, headers, body) = h.get("/doc", &[("if-none-match", "\"e\"")]).await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);
    assert!(body.is_empty());
    assert!(cache_status(&headers).contains("hit"));
    assert_eq!(h.origin.hits("/doc"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_is_answered_from_a_stored_get() {
    let h = harness(layer()).await;
    let (_, _, body) = h.get("/page", &[]).await;
    let (status, headers, head_body) = h.send(h.request(Method::HEAD, "/page", &[])).await;
    assert_eq!(status, StatusCode::OK);
    assert!(head_body.is_empty());
    assert_eq!(headers["content-length"], body.len().to_string().as_str());
    assert!(cache_status(&headers).contains("hit"));
    assert_eq!(h.origin.hits("/page"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successful_post_invalidates_the_stored_get() {
    let h = harness(layer()).await;
    let (_, _, before) = h.get("/item", &[]).await;
    assert_eq!(before, "/item #1");
    assert_eq!(h.get("/item", &[]).await.2, "/item #1");
    let (status, headers, _) = h.send(h.request(Method::POST, "/item", &[])).await;
    assert_eq!(status, StatusCode::OK);
    assert!(cache_status(&headers).contains("fwd=method"));
    let (_, _, after) = h.get("/item", &[]).await;
    assert_eq!(
        after, "/item #3",
        "the POST was #2; the GET went back to the origin"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_fields_stay_in_the_store_and_do_not_reach_the_client() {
    let h = harness(layer()).await;
    for expected in ["fwd=uri-miss", "hit"] {
        let (status, headers, body) = h.get("/tagged", &[]).await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"tagged #1"[..]));
        assert!(cache_status(&headers).contains(expected), "{headers:?}");
        assert!(headers.get("cache-tag").is_none(), "{headers:?}");
        assert!(headers.get("surrogate-key").is_none(), "{headers:?}");
    }
    // The store kept them: invalidating by either tag empties it.
    h.layer.invalidate_tag("front-page");
    assert_eq!(h.get("/tagged", &[]).await.2, "tagged #2");
    h.layer.invalidate_tag("sport");
    assert_eq!(h.get("/tagged", &[]).await.2, "tagged #3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidating_a_tag_drops_exactly_the_uris_tagged_so() {
    let h = harness(layer()).await;
    let paths = ["/t/red/1", "/t/red,blue/2", "/t/blue/3", "/t/-/4"];
    for path in paths {
        for expected in ["fwd=uri-miss", "hit"] {
            let (_, headers, _) = h.get(path, &[]).await;
            assert!(
                cache_status(&headers).contains(expected),
                "{path}: {headers:?}"
            );
        }
    }
    // Each path fetched once more; the origin's count for it after.
    let h = &h;
    let fetch_all = |expected: [usize; 4]| async move {
        for (path, origin_requests) in paths.into_iter().zip(expected) {
            h.get(path, &[]).await;
            assert_eq!(h.origin.hits(path), origin_requests, "{path}");
        }
    };
    h.layer.invalidate_tag("red");
    fetch_all([2, 2, 1, 1]).await;
    // Stored again, the tagged URIs go again; a tag nothing carries removes nothing.
    h.layer.invalidate_tag("red");
    h.layer.invalidate_tag("green");
    h.layer.invalidate_tag("blue");
    fetch_all([3, 3, 2, 1]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_fields_reach_the_client_when_kept() {
    let h = harness(builder().keep_tag_headers(true).build()).await;
    for _ in 0..2 {
        let (_, headers, _) = h.get("/tagged", &[]).await;
        assert_eq!(headers["cache-tag"], "news, sport");
        assert_eq!(headers["surrogate-key"], "front-page");
    }
    assert_eq!(h.origin.hits("/tagged"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_passes_through_intact_and_is_not_stored() {
    let h = harness(layer()).await;
    let (status, headers, body) = h.get("/large", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.len(), 100 * 1024);
    assert!(body.iter().all(|b| *b == b'x'));
    assert!(
        cache_status(&headers).contains("detail=too-large"),
        "{}",
        cache_status(&headers)
    );
    h.get("/large", &[]).await;
    assert_eq!(h.origin.hits("/large"), 2);
    h.layer.run_pending_tasks();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_serves_stale_and_revalidates_once_in_the_background() {
    let h = harness(layer()).await;
    assert_eq!(h.get("/swr", &[]).await.2, "swr #1");
    let arrived = h.origin.arrived.notified();
    let (_, headers, body) = h.get("/swr", &[]).await;
    assert_eq!(body, "swr #1", "served stale at once");
    assert!(
        cache_status(&headers).contains("hit; fwd=stale"),
        "{}",
        cache_status(&headers)
    );
    arrived.await;
    assert_eq!(h.origin.hits("/swr"), 2, "one background revalidation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_serves_the_stale_response_when_the_origin_fails() {
    let h = harness(layer()).await;
    assert_eq!(h.get("/sie", &[]).await.2, "sie #1");
    let (status, headers, body) = h.get("/sie", &[]).await;
    assert_eq!((status, body), (StatusCode::OK, Bytes::from("sie #1")));
    assert!(
        cache_status(&headers).contains("fwd=stale"),
        "{}",
        cache_status(&headers)
    );
    assert_eq!(h.origin.hits("/sie"), 2, "the origin was tried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_key_part_separates_what_is_shared() {
    let tenant = HttpCacheLayer::builder()
        .key_extra(|_uri, headers| {
            headers
                .get("x-tenant")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
        .build();
    let h = harness(tenant).await;
    assert_eq!(h.get("/doc", &[("x-tenant", "a")]).await.2, "/doc #1");
    assert_eq!(h.get("/doc", &[("x-tenant", "b")]).await.2, "/doc #2");
    assert_eq!(h.get("/doc", &[("x-tenant", "a")]).await.2, "/doc #1");
    let (_, headers, _) = h.get("/doc", &[]).await;
    assert!(
        cache_status(&headers).contains("fwd=bypass"),
        "no tenant: bypass"
    );
    assert_eq!(h.origin.hits("/doc"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_if_cached_is_answered_from_the_cache_or_with_504() {
    let h = harness(layer()).await;
    let (status, headers, _) = h.get("/page", &[("cache-control", "only-if-cached")]).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert!(cache_status(&headers).contains("only-if-cached"));
    assert_eq!(h.origin.hits("/page"), 0, "the origin is not asked");
    h.get("/page", &[]).await;
    let (status, _, body) = h.get("/page", &[("cache-control", "only-if-cached")]).await;
    assert_eq!((status, body), (StatusCode::OK, Bytes::from("/page #1")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_if_cached_with_several_ranges_never_reaches_the_origin() {
    let h = harness(layer()).await;
    let only = ("cache-control", "only-if-cached");
    let ranges = ("range", "bytes=0-1, 3-4");
    let (status, _, _) = h.get("/multi", &[only, ranges]).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(h.origin.hits("/multi"), 0, "the origin is not asked");
    // Stored: answered from the store, as the whole representation.
    h.get("/multi", &[]).await;
    let (status, _, body) = h.get("/multi", &[only, ranges]).await;
    assert_eq!((status, body), (StatusCode::OK, Bytes::from("/multi #1")));
    assert_eq!(h.origin.hits("/multi"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_cookie_on_a_304_goes_to_its_own_client_only() {
    let h = harness(layer()).await;
    assert_eq!(h.get("/rv-cookie", &[]).await.2, "/rv-cookie #1");
    // Stale at once: revalidated, and the 304 sets this client's session.
    let (status, headers, body) = h.get("/rv-cookie", &[]).await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, Bytes::from("/rv-cookie #1"))
    );
    assert_eq!(
        headers["set-cookie"], "session=2",
        "the revalidating client's own"
    );
    // The refreshed entry is fresh for 60 s: the next client is a hit, without the cookie.
    let (_, headers, body) = h.get("/rv-cookie", &[]).await;
    assert_eq!(body, "/rv-cookie #1");
    assert!(
        cache_status(&headers).contains("hit"),
        "{}",
        cache_status(&headers)
    );
    assert!(
        !headers.contains_key("set-cookie"),
        "another client's cookie was served: {:?}",
        headers.get("set-cookie")
    );
    assert_eq!(h.origin.hits("/rv-cookie"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_waiters_never_get_the_cookie_of_a_304() {
    let h = harness(layer()).await;
    assert_eq!(h.get("/rv-cookie?gated", &[]).await.2, "/rv-cookie #1");
    let results = concurrent(&h, "/rv-cookie?gated", 10).await;
    let mut cookies: Vec<String> = results
        .iter()
        .flat_map(|(_, _, headers)| headers.get_all("set-cookie"))
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    let received = cookies.len();
    cookies.sort();
    cookies.dedup();
    assert_eq!(
        cookies.len(),
        received,
        "a session cookie reached two clients"
    );
    assert!(results
        .iter()
        .all(|(s, b, _)| *s == StatusCode::OK && b == "/rv-cookie #1"));
    let (_, headers, _) = h.get("/rv-cookie?gated", &[]).await;
    assert!(!headers.contains_key("set-cookie"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_304_that_says_private_or_no_store_ends_the_sharing() {
    let h = harness(layer()).await;
    for path in ["/rv-private", "/rv-no-store"] {
        assert_eq!(h.get(path, &[]).await.2, format!("{path} #1"));
        let (status, _, body) = h.get(path, &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            format!("{path} #1"),
            "the revalidating client's answer"
        );
        // The entry is no longer shared: the next client goes to the origin, unconditionally.
        let (_, headers, body) = h.get(path, &[]).await;
        assert!(
            !cache_status(&headers).contains("hit"),
            "{path}: {}",
            cache_status(&headers)
        );
        assert_eq!(
            body,
            format!("{path} #3"),
            "{path}: a full response of its own"
        );
        assert_eq!(h.origin.hits(path), 3);
    }
}

/// An origin that hangs, then fails, for requests from tenant `a`, with credentials, or
/// for `Accept-Language: en`; every other request gets a response naming who asked.
fn failing_origin(
    open: watch::Receiver<bool>,
    arrived: Arc<Semaphore>,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = towerguard::BoxError,
    Future = impl Send,
> + Clone
       + Send
       + Sync
       + 'static {
    tower::service_fn(move |req: Request<Full<Bytes>>| {
        let mut open = open.clone();
        let arrived = arrived.clone();
        async move {
            arrived.add_permits(1);
            let header = |name: &str| {
                req.headers()
                    .get(name)
                    .map(|v| v.to_str().unwrap().to_owned())
            };
            let (tenant, auth, lang) = (
                header("x-tenant"),
                header("authorization"),
                header("accept-language"),
            );
            if tenant.as_deref() == Some("a") || auth.is_some() || lang.as_deref() == Some("en") {
                open.wait_for(|open| *open).await.unwrap();
                return Err("backend is down".into());
            }
            Ok(Response::builder()
                .header("cache-control", "max-age=0")
                .header("etag", "\"x\"")
                .header("vary", "accept-language")
                .body(Full::new(Bytes::from(format!("for {tenant:?} {lang:?}"))))
                .unwrap())
        }
    })
}

#[tokio::test(start_paused = true)]
async fn a_request_never_waits_for_nor_inherits_an_unrelated_flight() {
    let tenant = |_: &http::Uri, headers: &HeaderMap| {
        Some(
            headers
                .get("x-tenant")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default(),
        )
    };
    // (the request whose origin call hangs and then fails, an unrelated one for the same URI)
    type Headers<'a> = &'a [(&'a str, &'a str)];
    let cases: [(&str, Headers, Headers); 3] = [
        ("tenant", &[("x-tenant", "a")], &[("x-tenant", "b")]),
        ("credentials", &[("authorization", "Bearer a")], &[]),
        (
            "vary",
            &[("accept-language", "en")],
            &[("accept-language", "de")],
        ),
    ];
    for (case, failing, other) in cases {
        let (open, gate) = watch::channel(false);
        let arrived = Arc::new(Semaphore::new(0));
        let layer = HttpCacheLayer::builder().key_extra(tenant).build();
        let svc = layer.layer(failing_origin(gate, arrived.clone()));
        let request = |headers: &[(&str, &str)]| {
            let mut builder = Request::get("http://origin.test/doc");
            for (name, value) in headers {
                builder = builder.header(*name, *value);
            }
            builder.body(Full::new(Bytes::new())).unwrap()
        };
        if case == "vary" {
            // A stored variant makes the URI's `Vary` known (stale at once: max-age=0).
            svc.clone().oneshot(request(other)).await.unwrap();
            arrived.acquire().await.unwrap().forget();
        }
        let leader = tokio::spawn(svc.clone().oneshot(request(failing)));
        // The leader's origin call is under way.
        arrived.acquire().await.unwrap().forget();
        // Had it joined the hanging flight, this would wait for the gate, which opens only
        // afterwards: paused time would run the hour out.
        let response = tokio::time::timeout(
            std::time::Duration::from_secs(3600),
            svc.clone().oneshot(request(other)),
        )
        .await
        .unwrap_or_else(|_| panic!("{case}: waited for an unrelated flight"))
        .unwrap_or_else(|e| panic!("{case}: inherited an unrelated flight's error: {e}"));
        assert_eq!(response.status(), StatusCode::OK, "{case}");
        open.send_replace(true);
        let leader = leader.await.unwrap();
        assert!(
            leader.is_err(),
            "{case}: the failing request sees its own error"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_no_cache_response_is_revalidated_on_every_use() {
    let h = harness(layer()).await;
    assert_eq!(h.get("/no-cache", &[]).await.2, "no-cache #1");
    for round in 1..=3 {
        let (status, headers, body) = h.get("/no-cache", &[]).await;
        assert_eq!((status, body), (StatusCode::OK, Bytes::from("no-cache #1")));
        let cs = cache_status(&headers);
        assert!(
            cs.contains("fwd=stale") && cs.contains("fwd-status=304"),
            "use {round}: {cs}"
        );
        assert_eq!(h.origin.conditional.load(Ordering::SeqCst), round);
    }
}

#[test]
fn the_service_and_its_future_are_send() {
    fn send<T: Send>() {}
    fn send_sync<T: Send + Sync>() {}
    send_sync::<HttpCacheLayer>();
    send_sync::<Cached>();
    send::<towerguard::http::HttpCacheFuture<hyper::body::Incoming>>();
    let _ = Response::new(());
}

#[tokio::test(start_paused = true)]
async fn a_callers_timeout_never_cancels_the_origin_request_others_wait_for() {
    use std::time::Duration;
    use tokio_util::sync::CancellationToken;
    use towerguard::timeout::TimeoutLayer;
    let (open, gate) = watch::channel(false);
    let arrived = Arc::new(Semaphore::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let cancelled_seen = Arc::new(AtomicUsize::new(0));
    let origin = {
        let (arrived, calls, cancelled_seen) =
            (arrived.clone(), calls.clone(), cancelled_seen.clone());
        tower::service_fn(move |req: Request<Full<Bytes>>| {
            let (mut gate, arrived, cancelled_seen) =
                (gate.clone(), arrived.clone(), cancelled_seen.clone());
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                // The token the request carries, as the timeout docs invite inner code to use.
                let token = req
                    .extensions()
                    .get::<CancellationToken>()
                    .cloned()
                    .expect("the flight's token in the request extensions");
                arrived.add_permits(1);
                tokio::select! {
                    _ = token.cancelled() => {
                        cancelled_seen.fetch_add(1, Ordering::SeqCst);
                        Err::<Response<Full<Bytes>>, towerguard::BoxError>("cancelled by caller".into())
                    }
                    _ = gate.wait_for(|open| *open) => Ok(Response::builder()
                        .header("cache-control", "max-age=60")
                        .body(Full::new(Bytes::from("shared")))
                        .unwrap()),
                }
            }
        })
    };
    let cache = HttpCacheLayer::builder().build().layer(origin);
    let short = TimeoutLayer::new(Duration::from_millis(10))
        .http_extensions()
        .layer(cache.clone());
    let long = TimeoutLayer::new(Duration::from_secs(1))
        .http_extensions()
        .layer(cache.clone());
    let get = || {
        Request::get("http://origin.test/doc")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let first = tokio::spawn(short.oneshot(get()));
    arrived.acquire().await.unwrap().forget();
    let mut others = JoinSet::new();
    for _ in 0..5 {
        let mut svc = long.clone();
        let future = svc.ready().await.unwrap().call(get());
        others.spawn(future);
    }
    let err = first.await.unwrap().unwrap_err();
    assert!(err.is(towerguard::ErrorKind::TimedOut), "{err}");
    assert_eq!(
        cancelled_seen.load(Ordering::SeqCst),
        0,
        "the flight was cancelled"
    );
    open.send_replace(true);
    while let Some(result) = others.join_next().await {
        let response = result.unwrap().unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "shared");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one origin request");
}

#[test]
fn the_size_gauges_count_the_first_store_at_once() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let layer = metrics::with_local_recorder(&recorder, || {
        HttpCacheLayer::builder().name("gauges").build()
    });
    let origin = tower::service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, std::convert::Infallible>(
            Response::builder()
                .header("cache-control", "max-age=60")
                .body(Full::new(Bytes::from("stored")))
                .unwrap(),
        )
    });
    let svc = layer.layer(origin);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let req = Request::get("http://origin.test/doc")
            .body(Full::new(Bytes::new()))
            .unwrap();
        svc.oneshot(req).await.unwrap();
    });
    // One snapshot: taking one swaps every gauge to zero.
    let snapshot = snapshotter.snapshot().into_vec();
    let gauge = |name: &str| {
        snapshot
            .iter()
            .find_map(|(key, _, _, value)| match value {
                DebugValue::Gauge(v) if key.key().name() == name => Some(v.into_inner()),
                _ => None,
            })
            .unwrap()
    };
    assert_eq!(gauge("towerguard_cache_entries"), 1.0);
    assert!(gauge("towerguard_cache_weighted_size") > 0.0);
}

// ---------------------------------------------------------------------------------------
// RFC 9111 rules over TCP: client conditionals, ranges, HEAD, stale on error, error
// answers.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_if_none_match_goes_to_the_origin_on_a_miss_and_its_304_comes_back() {
    let h = harness(layer()).await;
    let (status, headers, body) = h.get("/inm", &[("if-none-match", "\"i\"")]).await;
    assert_eq!(status, StatusCode::NOT_MODIFIED, "the origin's answer");
    assert!(body.is_empty());
    let cs = cache_status(&headers);
    assert!(
        cs.contains("fwd=uri-miss") && cs.contains("fwd-status=304") && !cs.contains("stored"),
        "{cs}"
    );
    let seen = h.origin.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].2["if-none-match"], "\"i\"", "forwarded as sent");

    // The 304 was this client's alone: the next plain GET goes to the origin, and its 200
    // is stored...
    let (status, _, body) = h.get("/inm", &[]).await;
    assert_eq!((status, body), (StatusCode::OK, Bytes::from("inm #2")));
    // ...so a conditional request is now answered 304 by the cache.
    let (status, headers, _) = h.get("/inm", &[("if-none-match", "\"i\"")]).await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);
    assert!(cache_status(&headers).contains("hit"));
    assert_eq!(h.origin.hits("/inm"), 2);

    // A conditional request that does not match, on a miss, gets the origin's 200, which
    // is stored.
    let h = harness(layer()).await;
    let (status, headers, body) = h.get("/inm", &[("if-none-match", "\"old\"")]).await;
    assert_eq!((status, body), (StatusCode::OK, Bytes::from("inm #1")));
    assert!(cache_status(&headers).contains("stored"));
    assert_eq!(h.get("/inm", &[]).await.2, "inm #1");
    assert_eq!(h.origin.hits("/inm"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_is_answered_206_from_a_stored_200_and_416_when_unsatisfiable() {
    let h = harness(layer()).await;
    // Nothing stored: forwarded as it is, and not stored.
    let (status, headers, _) = h.get("/digits", &[("range", "bytes=2-4")]).await;
    assert_eq!(status, StatusCode::OK, "this origin ignores ranges");
    assert!(cache_status(&headers).contains("detail=range"));
    assert_eq!(h.origin.seen.lock().unwrap()[0].2["range"], "bytes=2-4");

    assert_eq!(h.get("/digits", &[]).await.2, "0123456789");
    // (request fields, status, body, Content-Range)
    type Case<'a> = (
        Vec<(&'a str, &'a str)>,
        StatusCode,
        &'a str,
        Option<&'a str>,
    );
    let cases: Vec<Case> = vec![
        (
            vec![("range", "bytes=2-4")],
            StatusCode::PARTIAL_CONTENT,
            "234",
            Some("bytes 2-4/10"),
        ),
        (
            vec![("range", "bytes=7-")],
            StatusCode::PARTIAL_CONTENT,
            "789",
            Some("bytes 7-9/10"),
        ),
        (
            vec![("range", "bytes=-2")],
            StatusCode::PARTIAL_CONTENT,
            "89",
            Some("bytes 8-9/10"),
        ),
        (
            vec![("range", "bytes=20-")],
            StatusCode::RANGE_NOT_SATISFIABLE,
            "",
            Some("bytes */10"),
        ),
        (
            vec![("range", "bytes=0-0"), ("if-range", "\"d\"")],
            StatusCode::PARTIAL_CONTENT,
            "0",
            Some("bytes 0-0/10"),
        ),
        (
            vec![("range", "bytes=0-0"), ("if-range", "\"changed\"")],
            StatusCode::OK,
            "0123456789",
            None,
        ),
    ];
    for (request, status, body, content_range) in cases {
        let (got, headers, got_body) = h.get("/digits", &request).await;
        assert_eq!((got, got_body), (status, Bytes::from(body)), "{request:?}");
        assert_eq!(
            headers.get("content-range").map(|v| v.to_str().unwrap()),
            content_range,
            "{request:?}"
        );
        assert_eq!(headers["content-length"], body.len().to_string().as_str());
        assert!(cache_status(&headers).contains("hit"), "{request:?}");
    }
    assert_eq!(
        h.origin.hits("/digits"),
        2,
        "every range came from the store"
    );

    // Several ranges are the origin's to answer.
    let (_, headers, _) = h.get("/digits", &[("range", "bytes=0-1, 4-5")]).await;
    assert!(cache_status(&headers).contains("detail=multi-range"));
    assert_eq!(h.origin.hits("/digits"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_for_a_stale_entry_goes_to_the_origin_as_head_and_refreshes_the_stored_headers() {
    let h = harness(layer()).await;
    assert_eq!(h.get("/head-stale", &[]).await.2, "head-stale #1");
    let (status, headers, body) = h.send(h.request(Method::HEAD, "/head-stale", &[])).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.is_empty());
    assert_eq!(headers["x-head"], "2");
    let cs = cache_status(&headers);
    assert!(
        cs.contains("fwd=stale") && cs.contains("stored") && cs.contains("head-refreshed"),
        "{cs}"
    );
    assert_eq!(
        h.origin.seen.lock().unwrap()[1].0,
        Method::HEAD,
        "sent as HEAD"
    );

    // The stored GET now has the HEAD's fields (fresh for 60 s) and its own body.
    let (status, headers, body) = h.get("/head-stale", &[]).await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, Bytes::from("head-stale #1"))
    );
    assert_eq!(headers["x-head"], "2");
    assert_eq!(
        headers["content-length"], "13",
        "the stored body's length is kept"
    );
    assert!(cache_status(&headers).contains("hit"));
    assert_eq!(h.origin.hits("/head-stale"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_that_shows_another_representation_removes_the_stored_one() {
    let h = harness(layer()).await;
    assert_eq!(h.get("/head-changed", &[]).await.2, "head-changed #1");
    let (_, headers, _) = h.send(h.request(Method::HEAD, "/head-changed", &[])).await;
    assert_eq!(headers["etag"], "\"v2\"");
    assert!(!cache_status(&headers).contains("stored"));
    // Nothing stored to revalidate: the next GET asks for the whole response.
    assert_eq!(h.get("/head-changed", &[]).await.2, "head-changed #3");
    let seen = h.origin.seen.lock().unwrap().clone();
    assert!(!seen[2].2.contains_key("if-none-match"), "{:?}", seen[2].2);
}

/// The origin, or (once `down` is set) an address where nothing listens.
#[derive(Clone)]
struct MaybeDown {
    client: Client<HttpConnector, Full<Bytes>>,
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl Service<Request<Full<Bytes>>> for MaybeDown {
    type Response = Response<hyper::body::Incoming>;
    type Error = hyper_util::client::legacy::Error;
    type Future = hyper_util::client::legacy::ResponseFuture;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Full<Bytes>>) -> Self::Future {
        if self.down.load(Ordering::SeqCst) {
            let path = req.uri().path().to_owned();
            // Port 1 on loopback: connection refused.
            *req.uri_mut() = format!("http://127.0.0.1:1{path}").parse().unwrap();
        }
        self.client.request(req)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_on_error_serves_within_its_bound_and_refuses_under_must_revalidate() {
    let policy = towerguard::http::cache_policy::HttpCachePolicy::default()
        .stale_on_error(std::time::Duration::from_secs(60));
    let h = harness(builder().policy(policy).build()).await;
    for path in ["/soe", "/soe-must-revalidate", "/soe-old"] {
        assert_eq!(h.get(path, &[]).await.2, format!("{path} #1"));
    }
    // The origin answers an error status.
    for code in [500, 502, 503, 504, 404] {
        *h.origin.failing.lock().unwrap() = Some(StatusCode::from_u16(code).unwrap());
        let (status, headers, body) = h.get("/soe", &[]).await;
        if code == 404 {
            assert_eq!(
                status,
                StatusCode::NOT_FOUND,
                "a 404 is an answer, not a failure"
            );
            continue;
        }
        assert_eq!(
            (status, body),
            (StatusCode::OK, Bytes::from("/soe #1")),
            "{code}"
        );
        assert!(cache_status(&headers).contains("hit; fwd=stale"), "{code}");
        let (status, headers, _) = h.get("/soe-must-revalidate", &[]).await;
        assert_eq!(status.as_u16(), code, "must-revalidate: never stale");
        assert!(cache_status(&headers).contains(&format!("fwd-status={code}")));
        let (status, _, _) = h.get("/soe-old", &[]).await;
        assert_eq!(status.as_u16(), code, "600 s old: past the 60 s bound");
    }

    // The origin cannot be reached at all.
    let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut cache = h.layer.layer(MaybeDown {
        client: Client::builder(TokioExecutor::new()).build_http(),
        down: down.clone(),
    });
    *h.origin.failing.lock().unwrap() = None;
    let request = |path: &str| h.request(Method::GET, path, &[]);
    assert_eq!(
        h.get("/soe", &[]).await.0,
        StatusCode::OK,
        "refreshed while up"
    );
    down.store(true, Ordering::SeqCst);
    let response = cache
        .ready()
        .await
        .unwrap()
        .call(request("/soe"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(cache_status(response.headers()).contains("hit; fwd=stale"));
    let error = cache
        .ready()
        .await
        .unwrap()
        .call(request("/soe-must-revalidate"))
        .await
        .unwrap_err();
    assert_eq!(
        error.cache_status(),
        Some("towerguard; fwd=stale; detail=origin-unreachable")
    );
    // As an HTTP answer: 502 with the same Cache-Status.
    let mut answered = towerguard::http::ErrorResponse::new(cache.clone());
    let response = answered
        .ready()
        .await
        .unwrap()
        .call(request("/soe-must-revalidate"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        cache_status(response.headers()),
        "towerguard; fwd=stale; detail=origin-unreachable"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_stale_on_error_an_unreachable_origin_is_an_error() {
    let h = harness(layer()).await;
    assert_eq!(h.get("/soe", &[]).await.0, StatusCode::OK);
    let mut cache = h.layer.layer(MaybeDown {
        client: Client::builder(TokioExecutor::new()).build_http(),
        down: Arc::new(std::sync::atomic::AtomicBool::new(true)),
    });
    let error = cache
        .ready()
        .await
        .unwrap()
        .call(h.request(Method::GET, "/soe", &[]))
        .await
        .unwrap_err();
    assert!(error
        .cache_status()
        .is_some_and(|cs| cs.contains("detail=origin-unreachable")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stacks_timeout_answer_carries_cache_status() {
    let h = harness(layer()).await;
    let stack = towerguard::stack::StackBuilder::new()
        .without_limit()
        .without_attempt_timeout()
        .retry_attempts(1)
        .total_timeout(std::time::Duration::from_millis(200))
        .http_cache(layer())
        .build_http::<Full<Bytes>>()
        .unwrap();
    let service = stack.layer(Client::builder(TokioExecutor::new()).build_http());
    h.origin.gate.send_replace(false);
    let response = service
        .oneshot(h.request(Method::GET, "/gated", &[]))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        cache_status(response.headers()),
        "towerguard; fwd=uri-miss; detail=timed-out"
    );
    h.origin.gate.send_replace(true);
}

/// Where a test puts the barrier its origin's requests wait at, when they should.
type Together = Arc<Mutex<Option<Arc<tokio::sync::Barrier>>>>;

/// What a test holds of a [`barrier_origin`]: the barrier's slot and the requests it got.
struct Gathering {
    together: Together,
    calls: Arc<AtomicUsize>,
}

/// An origin whose responses carry `cache_control` (none when empty) and a status of
/// `status`; while `together` holds a barrier, a request is answered only once as many
/// requests as the barrier counts are under way at once. Counts the requests it got.
fn barrier_origin(
    status: StatusCode,
    cache_control: &'static str,
) -> (
    impl Service<
            Request<Full<Bytes>>,
            Response = Response<Full<Bytes>>,
            Error = towerguard::BoxError,
            Future = impl Send,
        > + Clone
        + Send
        + Sync
        + 'static,
    Gathering,
) {
    let together: Together = Arc::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let origin = {
        let (together, calls) = (together.clone(), calls.clone());
        tower::service_fn(move |_: Request<Full<Bytes>>| {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            let barrier = together.lock().unwrap().clone();
            async move {
                if let Some(barrier) = barrier {
                    barrier.wait().await;
                }
                let builder = Response::builder().status(status);
                let builder = if cache_control.is_empty() {
                    builder
                } else {
                    builder.header("cache-control", cache_control)
                };
                Ok(builder
                    .body(Full::new(Bytes::from(format!("#{n}"))))
                    .unwrap())
            }
        })
    };
    (origin, Gathering { together, calls })
}

/// Sends `n` GETs of one URI through `svc` at once, while the origin answers only when all
/// `n` are under way together: true when every one got its response (within an hour of
/// paused time, which runs out at once when they wait for each other).
async fn all_at_once<S>(
    svc: &S,
    together: &Mutex<Option<Arc<tokio::sync::Barrier>>>,
    n: usize,
) -> bool
where
    S: Service<Request<Full<Bytes>>, Error = towerguard::Error> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    *together.lock().unwrap() = Some(Arc::new(tokio::sync::Barrier::new(n)));
    let mut requests = JoinSet::new();
    for _ in 0..n {
        let request = Request::get("http://origin.test/dynamic")
            .body(Full::new(Bytes::new()))
            .unwrap();
        requests.spawn(svc.clone().oneshot(request));
    }
    let answered = tokio::time::timeout(std::time::Duration::from_secs(3600), async {
        while let Some(result) = requests.join_next().await {
            result.unwrap().unwrap_or_else(|e| panic!("{e}"));
        }
    })
    .await
    .is_ok();
    *together.lock().unwrap() = None;
    answered
}

#[tokio::test(start_paused = true)]
async fn misses_of_a_uri_whose_response_cannot_be_stored_go_to_the_origin_at_once() {
    for (cache_control, why) in [
        ("", "no-freshness"),
        ("no-store", "no-store"),
        ("private, max-age=60", "private"),
    ] {
        let (origin, Gathering { together, calls }) = barrier_origin(StatusCode::OK, cache_control);
        let svc = HttpCacheLayer::builder().build().layer(origin);
        let get = || {
            Request::get("http://origin.test/dynamic")
                .body(Full::new(Bytes::new()))
                .unwrap()
        };
        let first = svc.clone().oneshot(get()).await.unwrap();
        assert!(
            cache_status(first.headers()).contains(why),
            "{why}: {}",
            cache_status(first.headers())
        );
        // Had they waited behind one origin request, that one would wait for the other two.
        assert!(
            all_at_once(&svc, &together, 3).await,
            "{why}: misses waited for each other"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 4, "{why}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_server_error_or_a_zero_uncacheable_ttl_keeps_misses_behind_one_origin_request() {
    use std::time::Duration;
    let cases = [
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "",
            Duration::from_secs(120),
        ),
        (StatusCode::OK, "", Duration::ZERO),
    ];
    for (status, cache_control, ttl) in cases {
        let (origin, Gathering { together, calls }) = barrier_origin(status, cache_control);
        let svc = HttpCacheLayer::builder()
            .uncacheable_ttl(ttl)
            .build()
            .layer(origin);
        let request = Request::get("http://origin.test/dynamic")
            .body(Full::new(Bytes::new()))
            .unwrap();
        svc.clone().oneshot(request).await.unwrap();
        assert!(
            !all_at_once(&svc, &together, 3).await,
            "{status} with {ttl:?}: misses went to the origin at once"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2, "{status} with {ttl:?}");
    }
}

/// A body shorter or longer than its `Content-Length` is passed on as read and never
/// stored (RFC 9112 section 6.3, RFC 9111 section 3.3): the next request goes to the
/// origin again. Without the header, the body's end frames it and it is stored.
#[tokio::test]
async fn a_body_that_does_not_match_its_content_length_is_not_stored() {
    for (declared, body, stored) in [
        (Some("10"), "12345", false),
        (Some("5"), "123456789012", false),
        (Some("x"), "12345", false),
        (Some("5"), "12345", true),
        (None, "12345", true),
    ] {
        let calls = Arc::new(AtomicUsize::new(0));
        let origin = {
            let calls = calls.clone();
            tower::service_fn(move |_: Request<Full<Bytes>>| {
                calls.fetch_add(1, Ordering::SeqCst);
                let mut response = Response::builder().header("cache-control", "max-age=60");
                if let Some(declared) = declared {
                    response = response.header("content-length", declared);
                }
                let response = response.body(Full::new(Bytes::from(body))).unwrap();
                async move { Ok::<_, std::convert::Infallible>(response) }
            })
        };
        let svc = layer().layer(origin);
        for _ in 0..2 {
            let request = Request::get("http://origin.test/framed")
                .body(Full::new(Bytes::new()))
                .unwrap();
            let response = svc.clone().oneshot(request).await.unwrap();
            let status = cache_status(response.headers());
            let read = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(read, body, "passed on as read ({declared:?})");
            if !stored {
                assert!(status.contains("incomplete"), "{declared:?}: {status}");
            }
        }
        let expected = if stored { 1 } else { 2 };
        assert_eq!(
            calls.load(Ordering::SeqCst),
            expected,
            "{declared:?} {body}"
        );
    }
}
