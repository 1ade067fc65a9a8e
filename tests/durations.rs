//! Every duration setting accepts any `Duration`, zero and `Duration::MAX` included, and
//! `Retry-After` values up to `u64::MAX` seconds: nothing panics when built or called, and
//! no panic is caught on the way (a value with any lifetime is stored). The second tier's
//! settings at `Duration::MAX` are in `tests/tier_edges.rs`, over a real Redis.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use proptest::prelude::*;
use tower::{service_fn, Layer, ServiceExt};
use towerguard::budget::Budget;
use towerguard::cache::{CacheLayer, Lifetime, Storable};
use towerguard::hedge::HedgeLayer;
use towerguard::http::cache_policy::HttpCachePolicy;
use towerguard::http::{BufferedBody, ErrorResponseLayer, HttpCacheLayer, HttpPolicy};
use towerguard::limit::{ConcurrencyLimitLayer, KeyedConcurrencyLimitLayer};
use towerguard::retry::{Backoff, RetryLayer};
use towerguard::stack::StackBuilder;
use towerguard::timeout::TimeoutLayer;
use towerguard::{Error, ErrorKind};

fn any_duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::MAX),
        Just(Duration::from_nanos(1)),
        (0u64..=u64::MAX, 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
        (0u64..10_000).prop_map(Duration::from_millis),
    ]
}

fn paused() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

/// An answer, or an error of ours: never a panic.
fn settled<T>(result: Result<T, Error>) {
    if let Err(error) = result {
        assert!(!error.is(ErrorKind::Panicked), "{error}");
    }
}

fn echo() -> impl tower::Service<
    u32,
    Response = u32,
    Error = Infallible,
    Future = impl std::future::Future<Output = Result<u32, Infallible>> + Send,
> + Clone
       + Send
       + Sync
       + 'static {
    service_fn(|n: u32| async move { Ok::<_, Infallible>(n) })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_generic_layer_takes_any_duration(a in any_duration(), b in any_duration()) {
        paused().block_on(async {
            let cache = CacheLayer::builder(|n: &u32| Some(*n))
                .ttl(a)
                .time_to_idle(b)
                .stale_while_revalidate(a)
                .stale_if_error(b)
                .negative_ttl(a)
                .build();
            let svc = cache.layer(echo());
            settled(svc.clone().oneshot(1).await);
            settled(svc.oneshot(1).await);

            let limit = ConcurrencyLimitLayer::builder()
                .limit(1)
                .queue(4, a)
                .retry_after(b)
                .build();
            settled(limit.layer(echo()).oneshot(1).await);

            let keyed = KeyedConcurrencyLimitLayer::builder(|n: &u32| *n)
                .per_key(1)
                .queue(4, b)
                .retry_after(a)
                .build();
            settled(keyed.layer(echo()).oneshot(1).await);

            settled(TimeoutLayer::new(a).layer(echo()).oneshot(1).await);
            let per_request = TimeoutLayer::new(a).per_request(move |_: &u32| Some(b));
            settled(per_request.layer(echo()).oneshot(1).await);

            let hedge = HedgeLayer::builder().initial_delay(a, 1).budget(Budget::new(0.5, 1.0)).build();
            settled(hedge.layer(echo()).oneshot(1).await);
            let fixed = HedgeLayer::builder().fixed_delay(b).without_budget().build();
            settled(fixed.layer(echo()).oneshot(1).await);

            let retry = RetryLayer::builder()
                .backoff(Backoff::new(a, b))
                .max_retry_after(a).build();
            let failing = service_fn(|_: u32| async { Err::<u32, _>(std::io::Error::other("down")) });
            settled(TimeoutLayer::new(b).layer(retry.layer(failing)).oneshot(1).await);
        });
    }

    /// A value with any lifetime, as the layer's default or per value, is stored: a panic
    /// caught while storing it would leave it unstored, and the second call would go
    /// upstream again.
    #[test]
    fn cache_lifetimes_of_any_length_store_the_value(
        a in any_duration(),
        b in any_duration(),
        c in any_duration(),
    ) {
        paused().block_on(async {
            for per_value in [false, true] {
                let calls = Arc::new(AtomicUsize::new(0));
                let upstream = {
                    let calls = calls.clone();
                    service_fn(move |n: u32| {
                        calls.fetch_add(1, Ordering::SeqCst);
                        async move { Ok::<_, Infallible>(n) }
                    })
                };
                let builder = CacheLayer::builder(|n: &u32| Some(*n));
                let builder = match per_value {
                    false => builder.ttl(a).stale_while_revalidate(b).stale_if_error(c),
                    true => builder.storable(move |_: &u32| {
                        Storable::For(
                            Lifetime::fresh_for(a)
                                .stale_while_revalidate(b)
                                .stale_if_error(c),
                        )
                    }),
                };
                let svc = builder.build().layer(upstream);
                settled(svc.clone().oneshot(1).await);
                settled(svc.oneshot(1).await);
                if !a.is_zero() {
                    assert_eq!(
                        calls.load(Ordering::SeqCst),
                        1,
                        "stored (ttl {a:?}, windows {b:?} {c:?}, per value: {per_value})"
                    );
                }
            }
        });
    }

    #[test]
    fn the_stack_and_the_http_layers_take_any_duration(
        a in any_duration(),
        b in any_duration(),
        c in any_duration(),
    ) {
        let _ = Backoff::new(a, b).delay(u32::MAX, 0.999);
        let builder = StackBuilder::new()
            .total_timeout(a)
            .attempt_timeout(b)
            .queue(8, c)
            .hedge(c);
        // Contradictions are refused with an error; anything else builds and answers.
        if let Ok(stack) = builder.build_http::<Full<Bytes>>() {
            paused().block_on(async {
                let svc = stack.layer(service_fn(|_req: Request<BufferedBody<Full<Bytes>>>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("ok"))))
                }));
                let response = svc
                    .oneshot(Request::get("http://example.test/").body(Full::new(Bytes::new())).unwrap())
                    .await
                    .unwrap();
                let _ = response.into_body().collect().await;
            });
        }
        let http_cache = HttpCacheLayer::builder()
            .policy(HttpCachePolicy::default().heuristic(0.1, a).default_ttl(b))
            .build();
        paused().block_on(async {
            let svc = http_cache.layer(service_fn(|_req: Request<Full<Bytes>>| async {
                Ok::<_, Infallible>(
                    Response::builder()
                        .header("last-modified", "Thu, 01 Jan 1970 00:00:00 GMT")
                        .header("age", u64::MAX.to_string())
                        .body(Full::new(Bytes::from("x")))
                        .unwrap(),
                )
            }));
            for _ in 0..2 {
                let req = Request::get("http://example.test/doc").body(Full::new(Bytes::new())).unwrap();
                settled(svc.clone().oneshot(req).await);
            }
        });
        let overloaded = Error::with_retry_after(ErrorKind::Overloaded, a);
        let response: Response<Full<Bytes>> = towerguard::http::error_response(&overloaded, b);
        prop_assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let _ = ErrorResponseLayer::new().default_retry_after(c);
    }

    #[test]
    fn retry_after_up_to_u64_max_under_a_deadline_never_panics(
        seconds in prop_oneof![Just(u64::MAX), Just(u64::MAX - 1), 0u64..=u64::MAX],
        deadline in any_duration(),
    ) {
        paused().block_on(async move {
            let backend = service_fn(move |_req: Request<BufferedBody<Full<Bytes>>>| async move {
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(StatusCode::SERVICE_UNAVAILABLE)
                        .header("retry-after", seconds.to_string())
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                )
            });
            let retry = RetryLayer::builder()
                .max_retry_after(Duration::MAX)
                .without_budget()
                .policy(HttpPolicy).build();
            let svc = TimeoutLayer::new(deadline).layer(retry.layer(backend));
            let req = Request::get("http://example.test/")
                .body(BufferedBody::complete(Bytes::new()))
                .unwrap();
            settled(svc.oneshot(req).await);
        });
    }
}
