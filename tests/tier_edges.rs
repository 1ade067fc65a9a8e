//! The second tier at its edges: a lease held elsewhere against the caller's deadline,
//! lifetimes of `Duration::MAX`, foreign bytes under a tier key, and variants written by
//! several instances. Over a `redis-server` of the test's own (skipped without one unless
//! `CI` is set).

#![cfg(all(feature = "redis", feature = "http", feature = "stack"))]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::{service_fn, Layer, ServiceExt};
use towerguard::cache::{CacheLayer, Lifetime, Storable};
use towerguard::http::{BufferedBody, HttpCacheLayer};
use towerguard::stack::StackBuilder;
use towerguard::tier::{RedisTier, Utf8};

mod support;
use support::redis_server::RedisServer;

fn request(path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://origin.test{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// Behind the stack with a 1 s total timeout, a request whose URI's lease another
/// instance holds (its origin hanging) ends at that timeout with a 504, not at the lease
/// wait (here 20 s, after which it would call its own origin and get a 200).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_total_timeout_ends_a_wait_for_another_instances_lease() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let tier = || {
        RedisTier::builder(server.url())
            .prefix("edge-lease:")
            .timeout(Duration::from_millis(500))
            .lease_wait(Duration::from_secs(20))
            .build()
            .unwrap()
    };
    let (hanging_tier, waiting_tier) = (tier(), tier());
    for tier in [&hanging_tier, &waiting_tier] {
        // Connected before the race starts.
        tier.backplane().wait_for(|b| b.subscribed).await.unwrap();
    }
    // Instance A: its origin never answers, and it holds the URI's lease meanwhile.
    let started = Arc::new(tokio::sync::Notify::new());
    let hanging = {
        let started = started.clone();
        HttpCacheLayer::builder()
            .second_tier(hanging_tier)
            .build()
            .layer(service_fn(move |_: Request<Full<Bytes>>| {
                started.notify_one();
                std::future::pending::<Result<Response<Full<Bytes>>, Infallible>>()
            }))
    };
    let holder = tokio::spawn(hanging.oneshot(request("/slow")));
    started.notified().await;
    // Instance B, behind the stack: the cache outside the total timeout.
    let answered = Arc::new(AtomicUsize::new(0));
    let stack = {
        let answered = answered.clone();
        StackBuilder::new()
            .total_timeout(Duration::from_secs(1))
            .attempt_timeout(Duration::from_secs(1))
            .http_cache(HttpCacheLayer::builder().second_tier(waiting_tier).build())
            .build_http::<Full<Bytes>>()
            .unwrap()
            .layer(service_fn(move |_: Request<BufferedBody<Full<Bytes>>>| {
                answered.fetch_add(1, Ordering::SeqCst);
                async {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("cache-control", "max-age=60")
                            .body(Full::new(Bytes::from("b")))
                            .unwrap(),
                    )
                }
            }))
    };
    let start = std::time::Instant::now();
    let response = stack.oneshot(request("/slow")).await.unwrap();
    println!("ended after {:?}", start.elapsed());
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        answered.load(Ordering::SeqCst),
        0,
        "B never called its origin"
    );
    holder.abort();
}

/// A single-flight cache over a tier whose every duration setting is `Duration::MAX`,
/// with a TTL, stale windows and a per-value lifetime of `Duration::MAX`: values are
/// stored in both tiers and answered, and no panic is caught on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifetimes_and_tier_settings_of_duration_max_store_and_answer() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let tier = || {
        RedisTier::builder(server.url())
            .prefix("edge-max:")
            .timeout(Duration::MAX)
            .breaker(3, Duration::MAX)
            .lease(Duration::MAX)
            .lease_wait(Duration::MAX)
            .lease_poll(Duration::MAX)
            .build()
            .unwrap()
    };
    let calls = Arc::new(AtomicUsize::new(0));
    let instance = |tier: RedisTier| {
        let calls = calls.clone();
        CacheLayer::builder(|key: &String| Some(key.clone()))
            .ttl(Duration::MAX)
            .stale_while_revalidate(Duration::MAX)
            .stale_if_error(Duration::MAX)
            .storable(|value: &String| match value.starts_with("per-value") {
                true => Storable::For(
                    Lifetime::fresh_for(Duration::MAX)
                        .stale_while_revalidate(Duration::MAX)
                        .stale_if_error(Duration::MAX),
                ),
                false => Storable::Default,
            })
            .second_tier(tier, |key: &String| key.clone(), Utf8)
            .build()
            .layer(service_fn(move |key: String| {
                calls.fetch_add(1, Ordering::SeqCst);
                async move { Ok::<_, std::io::Error>(key) }
            }))
    };
    let (a, b) = (instance(tier()), instance(tier()));
    for key in ["default", "per-value"] {
        // Any caught panic would be an error here, or leave the value unstored.
        assert_eq!(a.clone().oneshot(key.to_owned()).await.unwrap(), key);
        assert_eq!(a.clone().oneshot(key.to_owned()).await.unwrap(), key);
        // Stored in Redis too: the other instance reads it there.
        assert_eq!(b.clone().oneshot(key.to_owned()).await.unwrap(), key);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2, "one upstream call per key");
}

/// Whatever else sits under a tier key (another program's value, a truncated or altered
/// envelope) is a miss, counted as an error, never a value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_bytes_under_a_tier_key_are_a_miss() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let tier = RedisTier::builder(server.url())
        .prefix("edge-foreign:")
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = {
        let calls = calls.clone();
        CacheLayer::builder(|key: &String| Some(key.clone()))
            .ttl(Duration::from_secs(60))
            .second_tier(tier, |key: &String| key.clone(), Utf8)
            .build()
            .layer(service_fn(move |key: String| {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                async move { Ok::<_, std::io::Error>(format!("{key} #{n}")) }
            }))
    };
    let client = redis::Client::open(server.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    // A real envelope, to alter.
    assert_eq!(
        svc.clone().oneshot("real".to_owned()).await.unwrap(),
        "real #1"
    );
    let real: Vec<u8> = redis::cmd("GET")
        .arg("edge-foreign:v:real")
        .query_async(&mut connection)
        .await
        .unwrap();
    let mut flipped = real.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    let foreign: [(&str, Vec<u8>); 4] = [
        (
            "other",
            b"{\"json\": \"from another program, long enough\"}".to_vec(),
        ),
        ("zeros", vec![0; 64]),
        ("cut", real[..real.len() - 1].to_vec()),
        ("flipped", flipped),
    ];
    for (n, (key, bytes)) in foreign.iter().enumerate() {
        let _: () = redis::cmd("SET")
            .arg(format!("edge-foreign:v:{key}"))
            .arg(bytes.as_slice())
            .query_async(&mut connection)
            .await
            .unwrap();
        let answer = svc.clone().oneshot(key.to_string()).await.unwrap();
        assert_eq!(answer, format!("{key} #{}", n + 2), "{key} is a miss");
    }
}

/// Instance A stores the `fr` variant of a URI, instance B the `en` one: both stay in
/// Redis, and a third instance asking for either reads it there. Past `max_variants`,
/// the oldest written goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn variants_written_by_different_instances_all_survive_in_redis() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let calls = Arc::new(AtomicUsize::new(0));
    let instance = |i: usize| {
        let calls = calls.clone();
        let tier = RedisTier::builder(server.url())
            .prefix("edge-vary:")
            .timeout(Duration::from_millis(500))
            .build()
            .unwrap();
        HttpCacheLayer::builder()
            .name(format!("vary-{i}"))
            .max_variants(2)
            .second_tier(tier)
            .build()
            .layer(service_fn(move |req: Request<Full<Bytes>>| {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                let lang = req.headers()["accept-language"]
                    .to_str()
                    .unwrap()
                    .to_owned();
                async move {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("cache-control", "max-age=60")
                            .header("vary", "accept-language")
                            .body(Full::new(Bytes::from(format!("{lang} #{n}"))))
                            .unwrap(),
                    )
                }
            }))
    };
    let (a, b, c, d) = (instance(0), instance(1), instance(2), instance(3));
    let get = get_language;
    assert_eq!(get(&a, "fr").await, "fr #1");
    assert_eq!(get(&b, "en").await, "en #2");
    // C has neither in memory: both from Redis, no origin request.
    assert_eq!(get(&c, "fr").await, "fr #1");
    assert_eq!(get(&c, "en").await, "en #2");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // A third language on D: two variants at most, the oldest (fr) goes.
    assert_eq!(get(&d, "de").await, "de #3");
    let fresh = instance(4);
    assert_eq!(get(&fresh, "de").await, "de #3");
    assert_eq!(get(&fresh, "en").await, "en #2");
    assert_eq!(get(&fresh, "fr").await, "fr #4");
}

/// The body of a GET for `/page` in `lang`.
async fn get_language<S>(svc: &S, lang: &str) -> String
where
    S: tower::Service<
            Request<Full<Bytes>>,
            Response = Response<BufferedBody<Full<Bytes>>>,
            Error = towerguard::Error,
        > + Clone,
{
    use http_body_util::BodyExt;
    let request = Request::get("http://origin.test/page")
        .header("accept-language", lang)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = svc.clone().oneshot(request).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}
