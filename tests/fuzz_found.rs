//! What `benches/fuzz.rs` found, one regression test each, through the HTTP cache as a
//! user has it: a response the origin marks as not shareable, in a field the parsers
//! used to misread, must not reach a second client.

#![cfg(all(feature = "http", feature = "cache"))]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{service_fn, Layer, ServiceExt};
use towerguard::http::cache_control::CacheControl;
use towerguard::http::cache_policy::{vary, Vary};
use towerguard::http::HttpCacheLayer;

/// Two GETs for one URL through a fresh cache whose origin answers the first with `fields`
/// (name, raw bytes) and a body naming the call; the bodies the two clients got.
async fn two_clients(
    fields: &[(&'static str, &'static [u8])],
    second: &[(&'static str, &'static str)],
) -> (String, String) {
    let calls = Arc::new(AtomicUsize::new(0));
    let fields: Vec<_> = fields.to_vec();
    let counter = calls.clone();
    let origin = service_fn(move |_req: Request<Full<Bytes>>| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        let mut response = Response::new(Full::new(Bytes::from(format!("response {n}"))));
        for (name, value) in &fields {
            response
                .headers_mut()
                .append(*name, HeaderValue::from_bytes(value).unwrap());
        }
        async move { Ok::<_, std::io::Error>(response) }
    });
    let svc = HttpCacheLayer::builder().build().layer(origin);
    let mut bodies = Vec::new();
    for headers in [&[][..], second] {
        let mut req = Request::get("http://found.test/page");
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let response = svc
            .clone()
            .oneshot(req.body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        bodies.push(String::from_utf8(body.to_vec()).unwrap());
    }
    (bodies.remove(0), bodies.remove(0))
}

#[tokio::test]
async fn a_vary_line_with_a_byte_that_is_not_text_fits_no_other_request() {
    // The whole line used to be skipped, `*` and all: the response was shared with
    // every request.
    let line: &[u8] = b"x-a, Accept-Language, \xc8-a, *";
    let (first, second) = two_clients(
        &[("cache-control", b"max-age=60"), ("vary", line)],
        &[("accept-language", "fr")],
    )
    .await;
    assert_eq!(
        (first.as_str(), second.as_str()),
        ("response 0", "response 1")
    );
    let mut headers = http::HeaderMap::new();
    headers.insert("vary", HeaderValue::from_bytes(line).unwrap());
    assert_eq!(vary(&headers), Vary::Star);
    headers.insert(
        "vary",
        HeaderValue::from_static("accept-language, bad name"),
    );
    assert_eq!(
        vary(&headers),
        Vary::Star,
        "a name that is not a field name"
    );
}

#[tokio::test]
async fn a_cache_control_line_with_a_byte_that_is_not_text_still_says_private() {
    // The whole line used to be skipped, `private` with it.
    let line: &[u8] = b"o\x9dly-if-cached, max-age=5, private";
    let (first, second) = two_clients(&[("cache-control", line)], &[]).await;
    assert_eq!(
        (first.as_str(), second.as_str()),
        ("response 0", "response 1")
    );
    let cc = CacheControl::parse([line]);
    assert!(cc.private && cc.max_age.is_some());
}

#[tokio::test]
async fn a_stray_quote_in_cache_control_hides_none_of_the_directives_after_it() {
    // `no-"tore` opened a quoted string that swallowed `, b, private=`.
    let line: &[u8] = br#"no-"tore, b, private="x-user", max-age=60"#;
    let (first, second) = two_clients(&[("cache-control", line)], &[]).await;
    assert_eq!(
        (first.as_str(), second.as_str()),
        ("response 0", "response 1")
    );
    let cc = CacheControl::parse([line]);
    assert!(cc.private, "{cc:?}");
    // A quoted string left open at the end of the line holds no commas either.
    let cc = CacheControl::parse([&br#"max-age=60, no-cache="set-cookie, private"#[..]]);
    assert!(cc.private && cc.no_cache, "{cc:?}");
}
