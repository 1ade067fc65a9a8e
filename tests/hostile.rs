//! Hostile input to the HTTP cache, each with its defined outcome: a `Vary` explosion keeps
//! at most `max_variants` per URI, and very long keys and header values count in full
//! against the capacity.

#![cfg(all(feature = "http", feature = "cache"))]

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{service_fn, Layer, Service, ServiceExt};
use towerguard::http::{HttpCacheLayer, CACHE_STATUS};

/// An origin whose responses vary on `x-variant`, echo it, and carry a header as long as
/// the request's `x-pad` asks.
fn origin() -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone {
    service_fn(|req: Request<Full<Bytes>>| async move {
        let variant = req
            .headers()
            .get("x-variant")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let pad: usize = req
            .headers()
            .get("x-pad")
            .map_or(0, |v| v.to_str().unwrap().parse().unwrap());
        let mut response = Response::new(Full::new(Bytes::from(variant)));
        let headers = response.headers_mut();
        headers.insert("cache-control", HeaderValue::from_static("max-age=600"));
        headers.insert("vary", HeaderValue::from_static("x-variant"));
        if pad > 0 {
            headers.insert("x-pad", HeaderValue::from_str(&"p".repeat(pad)).unwrap());
        }
        Ok::<_, std::io::Error>(response)
    })
}

async fn get<S>(svc: &S, path: &str, variant: &str, pad: usize) -> (String, String)
where
    S: Service<
            Request<Full<Bytes>>,
            Response = Response<towerguard::http::BufferedBody<Full<Bytes>>>,
        > + Clone,
    S::Error: std::fmt::Debug,
{
    let req = Request::get(format!("http://hostile.test{path}"))
        .header("x-variant", variant)
        .header("x-pad", pad.to_string())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = svc.clone().oneshot(req).await.unwrap();
    let status = response.headers()[CACHE_STATUS]
        .to_str()
        .unwrap()
        .to_owned();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (String::from_utf8(body.to_vec()).unwrap(), status)
}

#[tokio::test]
async fn a_vary_explosion_keeps_at_most_max_variants_per_uri() {
    let layer = HttpCacheLayer::builder().max_variants(8).build();
    let svc = layer.clone().layer(origin());
    get(&svc, "/page", "v0000", 0).await;
    layer.run_pending_tasks();
    let one = layer.weighted_size();
    for n in 1..1_000 {
        let (body, _) = get(&svc, "/page", &format!("v{n:04}"), 0).await;
        assert_eq!(body, format!("v{n:04}"));
    }
    layer.run_pending_tasks();
    assert_eq!(layer.entry_count(), 1, "one URI");
    // Eight variants of the same size as the first, and the URI's key once more each.
    assert!(
        layer.weighted_size() <= 8 * one,
        "{} bytes held for at most 8 variants of {one}",
        layer.weighted_size()
    );
    // The most recent eight answer; an older one goes to the origin again.
    let (_, status) = get(&svc, "/page", "v0999", 0).await;
    assert!(status.contains("hit"), "{status}");
    let (_, status) = get(&svc, "/page", "v0992", 0).await;
    assert!(status.contains("hit"), "{status}");
    let (_, status) = get(&svc, "/page", "v0500", 0).await;
    assert!(status.contains("fwd=vary-miss"), "{status}");
}

#[tokio::test]
async fn very_long_keys_and_header_values_count_in_full_against_the_capacity() {
    const CAPACITY: u64 = 1024 * 1024;
    let layer = HttpCacheLayer::builder().capacity_bytes(CAPACITY).build();
    let svc = layer.clone().layer(origin());
    // 16 KiB paths: the key alone weighs that much, so about 60 fit.
    let long_path = |n: usize| format!("/{n:06}-{}", "k".repeat(16 * 1024));
    for n in 0..1_000 {
        get(&svc, &long_path(n), "a", 0).await;
    }
    assert_bounded(
        &layer,
        CAPACITY,
        16 * 1024,
        "entries of 16 KiB keys in 1 MiB",
    );
    // 32 KiB response fields: likewise.
    layer.invalidate_all();
    for n in 0..1_000 {
        get(&svc, &format!("/padded/{n}"), "a", 32 * 1024).await;
    }
    assert_bounded(
        &layer,
        CAPACITY,
        32 * 1024,
        "entries with 32 KiB fields in 1 MiB",
    );
}

/// The store weighs at most `capacity`, and holds no more entries of `size` than fit.
fn assert_bounded(layer: &HttpCacheLayer, capacity: u64, size: u64, what: &str) {
    layer.run_pending_tasks();
    assert!(
        layer.weighted_size() <= capacity,
        "{}",
        layer.weighted_size()
    );
    assert!(
        layer.entry_count() <= capacity / size,
        "{} {what}",
        layer.entry_count()
    );
}
