//! Chaos: every layer in one chain over a backend that errors, panics, stalls and answers
//! slowly at random, driven by 100,000 requests on paused time whose callers give up at
//! random. Afterwards nothing is left: no permit, no queued waiter, no flight, no live
//! backend future, no task. No caller hung, no panic reached a caller as a task panic, and
//! every caller that stayed got a value or a typed error. Once for a generic `ServiceBuilder`
//! chain (cache, total timeout, limit with a queue, retry, hedge, attempt timeout; a few
//! keys never answer), once for the HTTP stack with the HTTP cache.

#![cfg(all(feature = "stack", feature = "http"))]

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::task::JoinSet;
use tower::{service_fn, Layer, ServiceBuilder, ServiceExt};
use towerguard::cache::CacheLayer;
use towerguard::hedge::HedgeLayer;
use towerguard::http::HttpCacheLayer;
use towerguard::limit::{ConcurrencyLimitLayer, LimitHandle};
use towerguard::retry::{Backoff, RetryLayer};
use towerguard::stack::StackBuilder;
use towerguard::timeout::TimeoutLayer;
use towerguard::ErrorKind;

const REQUESTS: u64 = 100_000;
/// Callers started per step of virtual time, and the step.
const WAVE: u64 = 50;
const STEP: Duration = Duration::from_millis(20);
const TOTAL: Duration = Duration::from_secs(2);
/// A caller that stays is answered within this (the total timeout bounds everything
/// below the cache; a coalesced waiter may join a flight late).
const NO_HANG: Duration = Duration::from_secs(10);

/// Keys whose backend calls never answer (the generic run; they bypass its cache).
const DEAD_KEYS: std::ops::Range<u64> = 2_400..2_410;

/// A deterministic generator: the same run every time.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Counts the backend's calls and its futures alive: made by each call, gone when the
/// future is dropped.
#[derive(Clone, Default)]
struct Live {
    alive: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
}

struct Alive(Arc<AtomicUsize>);

impl Live {
    /// A new call: its number, and the guard its future holds.
    fn enter(&self) -> (u64, Alive) {
        self.alive.fetch_add(1, Ordering::SeqCst);
        let n = self.calls.fetch_add(1, Ordering::SeqCst) as u64;
        (n, Alive(self.alive.clone()))
    }

    fn count(&self) -> usize {
        self.alive.load(Ordering::SeqCst)
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What one backend call does, drawn at random: panic 3%, error 7%, stall (never
/// answers) 3%, slow (up to 600 ms) 27%, at once otherwise.
enum Behaviour {
    Panic,
    Error,
    Stall,
    Slow(Duration),
    Fast,
}

fn behaviour(n: u64) -> Behaviour {
    match mix(n) % 100 {
        0..=2 => Behaviour::Panic,
        3..=9 => Behaviour::Error,
        10..=12 => Behaviour::Stall,
        13..=39 => Behaviour::Slow(Duration::from_millis(mix(n ^ 0xABCD) % 600)),
        _ => Behaviour::Fast,
    }
}

/// Keeps the backend's own panics (thousands, every one caught and answered as an error)
/// out of the output; any other panic is reported as usual.
fn quiet_backend_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = info
                .payload()
                .downcast_ref::<String>()
                .map_or("", String::as_str);
            if !message.starts_with("backend panic") {
                default(info);
            }
        }));
    });
}

/// Plays `behaviour(n)`; `Err` for the error case.
async fn act(n: u64) -> Result<(), std::io::Error> {
    match behaviour(n) {
        Behaviour::Panic => panic!("backend panic {n}"),
        Behaviour::Error => Err(std::io::Error::other("backend error")),
        Behaviour::Stall => std::future::pending().await,
        Behaviour::Slow(delay) => {
            tokio::time::sleep(delay).await;
            Ok(())
        }
        Behaviour::Fast => Ok(()),
    }
}

/// How a caller behaves: stays to the end, or gives up after a random time (15%), or
/// right after its first poll (5%).
fn give_up(t: u64) -> Option<Duration> {
    match mix(t ^ 0x5EED) % 100 {
        0..=4 => Some(Duration::ZERO),
        5..=19 => Some(Duration::from_millis(mix(t ^ 0xFACE) % 1_500)),
        _ => None,
    }
}

/// Drives `REQUESTS` callers, `WAVE` per `STEP` of virtual time; `call(t)` is caller `t`'s
/// request, `check` judges an answer and names its outcome. Returns the outcomes counted.
async fn drive<F, Fut, T>(call: F, check: fn(u64, T) -> String) -> BTreeMap<String, u64>
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    quiet_backend_panics();
    let outcomes = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let mut callers = JoinSet::new();
    for t in 0..REQUESTS {
        if t > 0 && t % WAVE == 0 {
            tokio::time::sleep(STEP).await;
            // Reap the callers that are done, so the set stays small.
            while callers.try_join_next().is_some_and(|joined| {
                joined.expect("no panic reaches a caller as a task panic");
                true
            }) {}
        }
        let fut = call(t);
        let outcomes = outcomes.clone();
        callers.spawn(async move {
            let outcome = match give_up(t) {
                Some(Duration::ZERO) => {
                    let mut fut = Box::pin(fut);
                    let polled =
                        std::future::poll_fn(|cx| std::task::Poll::Ready(fut.as_mut().poll(cx)))
                            .await;
                    match polled {
                        std::task::Poll::Ready(answer) => check(t, answer),
                        std::task::Poll::Pending => "gave up at once".to_owned(),
                    }
                }
                Some(after) => match tokio::time::timeout(after, fut).await {
                    Ok(answer) => check(t, answer),
                    Err(_) => "gave up later".to_owned(),
                },
                None => match tokio::time::timeout(NO_HANG, fut).await {
                    Ok(answer) => check(t, answer),
                    Err(_) => panic!("caller {t} hung"),
                },
            };
            *outcomes.lock().unwrap().entry(outcome).or_default() += 1;
        });
    }
    while let Some(joined) = callers.join_next().await {
        joined.expect("no panic reaches a caller as a task panic");
    }
    let outcomes = outcomes.lock().unwrap().clone();
    outcomes
}

/// Lets background work (refreshes, detached flights) finish on paused time, then checks
/// that no task is left.
async fn settle(flights: impl Fn() -> usize) {
    while flights() > 0 {
        tokio::time::sleep(STEP).await;
    }
    let tasks = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    assert_eq!(tasks, 0, "tasks left behind");
}

/// After a run: every caller is counted, nothing is left behind (permit, queued waiter,
/// flight, backend future, task), and every outcome in `expected` happened at least once.
async fn nothing_left(
    run: &str,
    outcomes: &BTreeMap<String, u64>,
    live: &Live,
    limit: &LimitHandle,
    flights: impl Fn() -> usize,
    expected: &[&str],
) {
    settle(&flights).await;
    println!(
        "{run} chaos: {outcomes:?}, {} backend calls",
        live.calls.load(Ordering::SeqCst)
    );
    assert_eq!(outcomes.values().sum::<u64>(), REQUESTS);
    assert_eq!(
        (limit.in_flight(), limit.queued()),
        (0, 0),
        "a permit or a place left"
    );
    assert_eq!(flights(), 0, "a flight left");
    assert_eq!(live.count(), 0, "a backend future left alive");
    for outcome in expected {
        assert!(
            outcomes.contains_key(*outcome),
            "the run never saw {outcome}: {outcomes:?}"
        );
    }
}

fn typed(kind: ErrorKind) -> String {
    match kind {
        ErrorKind::Overloaded
        | ErrorKind::TimedOut
        | ErrorKind::BudgetExhausted
        | ErrorKind::Panicked
        | ErrorKind::Inner => format!("error: {kind:?}"),
        other => panic!("unexpected error kind {other:?}"),
    }
}

#[derive(Clone, Debug)]
struct Req {
    key: u64,
}

#[tokio::test(start_paused = true)]
async fn chaos_through_every_generic_layer_leaves_nothing_behind() {
    let live = Live::default();
    let backend = {
        let live = live.clone();
        service_fn(move |req: Req| {
            let (n, alive) = live.enter();
            async move {
                let _alive = alive;
                // A few keys outside the cache never answer, so that every attempt and
                // every hedge of theirs times out: the random stalls alone reach a
                // caller as a timeout only a handful of times a run, sometimes never.
                if DEAD_KEYS.contains(&req.key) {
                    std::future::pending::<()>().await;
                }
                act(n).await?;
                Ok::<_, std::io::Error>(req.key * 10)
            }
        })
    };
    // Keys 0..1999 cached for 1 s (stale for 1 s more), 2000.. bypass the cache.
    let cache = CacheLayer::builder(|req: &Req| (req.key < 2_000).then_some(req.key))
        .name("chaos")
        .max_entries(500)
        .ttl(Duration::from_secs(1))
        .stale_while_revalidate(Duration::from_secs(1))
        .stale_if_error(Duration::from_secs(1))
        .build();
    let cache_handle = cache.handle();
    let limit = ConcurrencyLimitLayer::builder()
        .name("chaos")
        .limit(64)
        .queue(128, Duration::from_millis(200))
        .build();
    let limit_handle = limit.handle();
    let svc = ServiceBuilder::new()
        .layer(cache)
        .layer(TimeoutLayer::new(TOTAL).name("chaos_total"))
        .layer(limit)
        .layer(
            RetryLayer::builder()
                .name("chaos")
                .max_attempts(3)
                .backoff(Backoff::new(
                    Duration::from_millis(10),
                    Duration::from_millis(100),
                ))
                .build(),
        )
        .layer(
            HedgeLayer::builder()
                .name("chaos")
                .initial_delay(Duration::from_millis(50), 20)
                .build(),
        )
        .layer(TimeoutLayer::new(Duration::from_millis(500)).name("chaos_attempt"))
        .service(backend);

    let outcomes = drive(
        |t| {
            let key = mix(t ^ 0x4B45) % 2_500;
            svc.clone().oneshot(Req { key })
        },
        |t, answer| match answer {
            Ok(value) => {
                let key = mix(t ^ 0x4B45) % 2_500;
                assert_eq!(value, key * 10, "caller {t} got another key's value");
                "ok".to_owned()
            }
            Err(error) => typed(error.kind()),
        },
    )
    .await;
    let flights = || cache_handle.flights_in_progress();
    let expected = ["ok", "error: Panicked", "error: TimedOut", "error: Inner"];
    nothing_left(
        "generic",
        &outcomes,
        &live,
        &limit_handle,
        flights,
        &expected,
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn chaos_through_the_http_stack_with_the_http_cache_leaves_nothing_behind() {
    let live = Live::default();
    let backend = {
        let live = live.clone();
        service_fn(
            move |req: Request<towerguard::http::BufferedBody<Full<Bytes>>>| {
                let (n, alive) = live.enter();
                async move {
                    let _alive = alive;
                    act(n).await?;
                    let path = req.uri().path().to_owned();
                    // Statuses and caching at random too: 5% 503 with Retry-After, 3% 500;
                    // half the paths may be stored for a second.
                    let (status, control) = match mix(n ^ 0x5747) % 100 {
                        0..=4 => (StatusCode::SERVICE_UNAVAILABLE, "no-store"),
                        5..=7 => (StatusCode::INTERNAL_SERVER_ERROR, "no-store"),
                        _ if path.ends_with('0') => (StatusCode::OK, "private, max-age=1"),
                        _ => (StatusCode::OK, "max-age=1, stale-while-revalidate=1"),
                    };
                    Ok::<_, std::io::Error>(
                        Response::builder()
                            .status(status)
                            .header("cache-control", control)
                            .header("retry-after", "0")
                            .body(Full::new(Bytes::from(path)))
                            .unwrap(),
                    )
                }
            },
        )
    };
    let cache = HttpCacheLayer::builder()
        .name("chaos")
        .capacity_bytes(1024 * 1024)
        .build();
    let stack = StackBuilder::new()
        .name("chaos_http")
        .total_timeout(TOTAL)
        .attempt_timeout(Duration::from_millis(500))
        .static_limit(64)
        .queue(128, Duration::from_millis(200))
        .retry_attempts(3)
        .hedge(Duration::from_millis(50))
        .http_cache(cache.clone())
        .build_http::<Full<Bytes>>()
        .unwrap();
    let limit_handle = stack.limit_handle().expect("the stack has a limit");
    let svc = stack.layer(backend);

    let outcomes = drive(
        |t| {
            let path = format!("/item/{}", mix(t ^ 0x4B45) % 2_000);
            let method = if mix(t ^ 0x9057).is_multiple_of(50) {
                Method::POST
            } else {
                Method::GET
            };
            let req = Request::builder()
                .method(method)
                .uri(format!("http://chaos.test{path}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            let svc = svc.clone();
            async move {
                let response = svc.oneshot(req).await;
                let response = match response {
                    Ok(response) => response,
                    Err(never) => match never {},
                };
                let status = response.status();
                let body = response.into_body().collect().await.map(|b| b.to_bytes());
                (path, status, body)
            }
        },
        |t, (path, status, body)| {
            let body = body.unwrap_or_else(|_| panic!("caller {t}: the body failed"));
            if status == StatusCode::OK {
                assert_eq!(body, path.as_bytes(), "caller {t} got another path's body");
            }
            format!("status {}", status.as_u16())
        },
    )
    .await;
    let flights = || cache.flights_in_progress();
    let expected = ["status 200", "status 500", "status 503", "status 504"];
    nothing_left("http", &outcomes, &live, &limit_handle, flights, &expected).await;
}
