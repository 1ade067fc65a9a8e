//! Sharing safety, one test per path that can serve a stored response: a hit, a coalesced
//! waiter, a 304 revalidation, stale-while-revalidate and stale-if-error (the Redis tier's
//! is in `tests/redis.rs`). Each test runs three kinds of personal response through its
//! path: one marked `private`, one to a request with `Authorization` that does not say it
//! may be shared, and one with `Set-Cookie`. Client A gets its own; client B, asking for
//! the same URL after (or with) A, never gets A's body, A's fields or A's cookie.

#![cfg(all(feature = "http", feature = "cache"))]

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::sync::watch;
use tower::{service_fn, Layer, ServiceExt};
use towerguard::http::{BufferedBody, HttpCacheLayer, CACHE_STATUS};

const KINDS: [&str; 3] = ["private", "auth", "cookie"];

/// What the origin knows: a gate for the coalesced path, a switch that makes it fail, and
/// how many requests reached it.
struct Origin {
    gate: watch::Sender<bool>,
    failing: AtomicBool,
    hits: AtomicUsize,
}

/// `/{path}/{kind}`. The client `seed` gets a shareable response (`public`, `ETag: "v1"`,
/// stale at once on the revalidation paths). Any other client gets a response personal to
/// it, by kind: `private`; an answer to its `Authorization` without `public`; or one that
/// sets its cookie. On `/revalidate/`, a request holding `"v1"` gets a 304 that is personal
/// in the same way.
async fn answer(origin: Arc<Origin>, req: Request<Full<Bytes>>) -> Response<Full<Bytes>> {
    origin.hits.fetch_add(1, Ordering::SeqCst);
    let mut parts = req.uri().path().trim_start_matches('/').split('/');
    let (path, kind) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if path == "coalesced" {
        origin
            .gate
            .subscribe()
            .wait_for(|open| *open)
            .await
            .unwrap();
    }
    if origin.failing.load(Ordering::SeqCst) {
        return Response::builder()
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .header("cache-control", "no-store")
            .body(Full::new(Bytes::from("down")))
            .unwrap();
    }
    let client = req.headers()["x-client"].to_str().unwrap().to_owned();
    let builder = Response::builder().header("etag", "\"v1\"");
    if client == "seed" {
        let control = match path {
            "revalidate" => "public, max-age=0",
            "swr" => "public, max-age=0, stale-while-revalidate=60",
            _ => "public, max-age=60",
        };
        return builder
            .header("cache-control", control)
            .body(Full::new(Bytes::from("shared")))
            .unwrap();
    }
    let conditional = req
        .headers()
        .get("if-none-match")
        .is_some_and(|v| v == "\"v1\"");
    let (status, base, body) = if path == "revalidate" && conditional {
        (StatusCode::NOT_MODIFIED, "max-age=60", String::new())
    } else if path == "stale-if-error" {
        (
            StatusCode::OK,
            "max-age=0, stale-if-error=60",
            format!("for {client}"),
        )
    } else {
        (StatusCode::OK, "max-age=60", format!("for {client}"))
    };
    let builder = builder.status(status);
    let builder = match kind {
        "private" => builder
            .header("cache-control", format!("private, {base}"))
            .header("x-user", &client),
        "auth" => builder
            .header("cache-control", base)
            .header("x-user", &client),
        _ => builder
            .header("cache-control", base)
            .header("set-cookie", format!("session={client}")),
    };
    builder.body(Full::new(Bytes::from(body))).unwrap()
}

type Cached = towerguard::http::HttpCache<
    tower::util::BoxCloneSyncService<Request<Full<Bytes>>, Response<Full<Bytes>>, std::io::Error>,
>;

struct Harness {
    origin: Arc<Origin>,
    layer: HttpCacheLayer,
    svc: Cached,
}

fn harness() -> Harness {
    let origin = Arc::new(Origin {
        gate: watch::channel(true).0,
        failing: AtomicBool::new(false),
        hits: AtomicUsize::new(0),
    });
    let state = origin.clone();
    let inner = tower::util::BoxCloneSyncService::new(service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, std::io::Error>(answer(state, req).await) }
    }));
    let layer = HttpCacheLayer::builder().build();
    Harness {
        origin,
        svc: layer.layer(inner),
        layer,
    }
}

/// What a client received.
#[derive(Debug)]
struct Got {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Got {
    /// Panics if anything personal to `other` reached this client.
    fn assert_nothing_of(&self, other: &str, what: &str) {
        assert_ne!(
            self.body,
            format!("for {other}"),
            "{what}: {other}'s body: {self:?}"
        );
        assert!(
            self.headers.get("x-user").is_none_or(|v| v != other),
            "{what}: {other}'s field: {self:?}"
        );
        assert!(
            self.headers
                .get_all("set-cookie")
                .iter()
                .all(|v| v != format!("session={other}").as_str()),
            "{what}: {other}'s cookie: {self:?}"
        );
    }

    /// Panics unless this is `client`'s own personal answer of `kind`, so a test cannot
    /// pass because the personal response never happened.
    fn assert_personal(&self, client: &str, kind: &str, what: &str) {
        let personal = match kind {
            "cookie" => self
                .headers
                .get("set-cookie")
                .is_some_and(|v| *v == *format!("session={client}")),
            _ => self.headers.get("x-user").is_some_and(|v| v == client),
        };
        assert!(
            personal,
            "{what}: {client} did not get its own answer: {self:?}"
        );
    }

    fn cache_status(&self) -> &str {
        self.headers
            .get(CACHE_STATUS)
            .map_or("", |v| v.to_str().unwrap())
    }
}

fn request(path: &str, kind: &str, client: &str) -> Request<Full<Bytes>> {
    let mut builder =
        Request::get(format!("http://sharing.test/{path}/{kind}")).header("x-client", client);
    if kind == "auth" && client != "seed" {
        builder = builder.header("authorization", format!("Bearer {client}"));
    }
    builder.body(Full::new(Bytes::new())).unwrap()
}

async fn collect(response: Response<BufferedBody<Full<Bytes>>>) -> Got {
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Got {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8(body.to_vec()).unwrap(),
    }
}

impl Harness {
    async fn get(&self, path: &str, kind: &str, client: &str) -> Got {
        let response = self.svc.clone().oneshot(request(path, kind, client)).await;
        collect(response.unwrap()).await
    }

    /// Lets every flight (background revalidations included) finish.
    async fn settle(&self) {
        while self.layer.flights_in_progress() > 0 {
            tokio::task::yield_now().await;
        }
    }
}

#[tokio::test]
async fn sharing_safety_a_hit_never_serves_one_clients_personal_response_to_another() {
    for kind in KINDS {
        let h = harness();
        let a = h.get("hit", kind, "a").await;
        a.assert_personal("a", kind, kind);
        let b = h.get("hit", kind, "b").await;
        b.assert_nothing_of("a", kind);
        b.assert_personal("b", kind, kind);
        assert_eq!(
            h.origin.hits.load(Ordering::SeqCst),
            2,
            "{kind}: B went to the origin"
        );
    }
}

#[tokio::test]
async fn sharing_safety_a_coalesced_waiter_never_gets_the_leaders_personal_response() {
    for kind in KINDS {
        let h = harness();
        h.origin.gate.send_replace(false);
        // A leads the flight and is held at the origin; B arrives while it is under way.
        let mut a = Box::pin(h.svc.clone().oneshot(request("coalesced", kind, "a")));
        let mut b = Box::pin(h.svc.clone().oneshot(request("coalesced", kind, "b")));
        for fut in [&mut a, &mut b] {
            std::future::poll_fn(|cx| {
                assert!(fut.as_mut().poll(cx).is_pending());
                Poll::Ready(())
            })
            .await;
        }
        h.origin.gate.send_replace(true);
        let (a, b) = tokio::join!(a, b);
        let (a, b) = (collect(a.unwrap()).await, collect(b.unwrap()).await);
        a.assert_personal("a", kind, kind);
        b.assert_nothing_of("a", kind);
        b.assert_personal("b", kind, kind);
    }
}

#[tokio::test]
async fn sharing_safety_a_304_revalidation_never_passes_one_clients_fields_to_another() {
    for kind in KINDS {
        let h = harness();
        assert_eq!(h.get("revalidate", kind, "seed").await.body, "shared");
        // Stale at once: A's request revalidates it, and the 304 is personal to A.
        let a = h.get("revalidate", kind, "a").await;
        assert_eq!(
            (a.status, a.body.as_str()),
            (StatusCode::OK, "shared"),
            "{kind}"
        );
        a.assert_personal("a", kind, kind);
        let b = h.get("revalidate", kind, "b").await;
        b.assert_nothing_of("a", kind);
        // A 304 that is private or answers credentials ends the sharing: B goes to the
        // origin. One that only sets a cookie refreshes the stored response without it.
        let hits = if kind == "cookie" { 2 } else { 3 };
        assert_eq!(h.origin.hits.load(Ordering::SeqCst), hits, "{kind}: {b:?}");
    }
}

#[tokio::test]
async fn sharing_safety_stale_while_revalidate_never_stores_a_personal_refresh() {
    for kind in KINDS {
        let h = harness();
        assert_eq!(h.get("swr", kind, "seed").await.body, "shared");
        // Served stale at once; the background refresh goes out with A's request and
        // comes back personal to A.
        let a = h.get("swr", kind, "a").await;
        assert_eq!(a.body, "shared", "{kind}: {}", a.cache_status());
        assert!(
            a.cache_status().contains("fwd=stale"),
            "{kind}: {}",
            a.cache_status()
        );
        h.settle().await;
        assert_eq!(
            h.origin.hits.load(Ordering::SeqCst),
            2,
            "{kind}: one refresh"
        );
        let b = h.get("swr", kind, "b").await;
        b.assert_nothing_of("a", kind);
    }
}

#[tokio::test]
async fn sharing_safety_stale_if_error_never_serves_a_personal_response_to_another() {
    for kind in KINDS {
        let h = harness();
        let a = h.get("stale-if-error", kind, "a").await;
        a.assert_personal("a", kind, kind);
        // The origin fails: B gets the failure, not A's response kept for errors.
        h.origin.failing.store(true, Ordering::SeqCst);
        let b = h.get("stale-if-error", kind, "b").await;
        b.assert_nothing_of("a", kind);
        assert_eq!(
            (b.status, b.body.as_str()),
            (StatusCode::INTERNAL_SERVER_ERROR, "down")
        );
    }
}
