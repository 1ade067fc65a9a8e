//! Integration tests of hedged requests, on paused time.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_test::{assert_pending, task};
use tokio_util::sync::CancellationToken;
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};
use towerguard::budget::Budget;
use towerguard::hedge::{HedgeBuilder, HedgeLayer};
use towerguard::limit::{ConcurrencyLimitLayer, LimitHandle};
use towerguard::timeout::{TimeoutContext, TimeoutLayer};

use support::{Metrics, Probe};

/// Drops a counter when the attempt it belongs to is dropped unfinished.
struct Dropped(Arc<AtomicUsize>, bool);

impl Drop for Dropped {
    fn drop(&mut self) {
        if self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// A backend whose n-th call (from 0) takes `latency(n)` and then answers `Ok(n)`, or an
/// error when `fail(n)`; it records the calls, unfinished drops and attempt tokens.
#[derive(Clone)]
struct Backend {
    calls: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
    tokens: Arc<Mutex<Vec<CancellationToken>>>,
    latency: Arc<dyn Fn(usize) -> Duration + Send + Sync>,
    fail: Arc<dyn Fn(usize) -> bool + Send + Sync>,
}

impl Backend {
    fn new(latency: impl Fn(usize) -> Duration + Send + Sync + 'static) -> Self {
        Backend {
            calls: Arc::default(),
            dropped: Arc::default(),
            tokens: Arc::default(),
            latency: Arc::new(latency),
            fail: Arc::new(|_| false),
        }
    }

    fn failing(mut self, fail: impl Fn(usize) -> bool + Send + Sync + 'static) -> Self {
        self.fail = Arc::new(fail);
        self
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn service(
        &self,
    ) -> impl Service<
        u32,
        Response = usize,
        Error = std::io::Error,
        Future = impl std::future::Future<Output = Result<usize, std::io::Error>> + Send,
    > + Clone
           + Send
           + 'static {
        let this = self.clone();
        service_fn(move |_: u32| {
            let n = this.calls.fetch_add(1, Ordering::SeqCst);
            if let Some(ctx) = TimeoutContext::current() {
                this.tokens.lock().unwrap().push(ctx.token());
            }
            let latency = (this.latency)(n);
            let fail = (this.fail)(n);
            let dropped = this.dropped.clone();
            async move {
                let mut guard = Dropped(dropped, true);
                tokio::time::sleep(latency).await;
                guard.1 = false;
                if fail {
                    Err(std::io::Error::other("failed"))
                } else {
                    Ok(n)
                }
            }
        })
    }
}

fn fixed(delay_ms: u64) -> HedgeBuilder {
    HedgeLayer::builder()
        .fixed_delay(Duration::from_millis(delay_ms))
        .without_budget()
}

#[tokio::test(start_paused = true)]
async fn a_hedge_fires_after_the_delay_and_not_before_and_the_loser_is_dropped() {
    let backend = Backend::new(|n| Duration::from_millis(if n == 0 { 1_000 } else { 10 }));
    let mut svc = fixed(50).build().layer(backend.service());
    let start = Instant::now();
    let mut fut = task::spawn(svc.ready().await.unwrap().call(0));
    assert_pending!(fut.poll());
    tokio::time::advance(Duration::from_millis(49)).await;
    assert_pending!(fut.poll());
    assert_eq!(backend.calls(), 1, "no hedge before the delay");
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_pending!(fut.poll());
    assert_eq!(backend.calls(), 2, "the hedge goes out at the delay");
    let answer = fut.await.unwrap();
    assert_eq!(answer, 1, "the hedge won");
    assert_eq!(start.elapsed(), Duration::from_millis(60));
    assert_eq!(
        backend.dropped.load(Ordering::SeqCst),
        1,
        "the slow first attempt was dropped"
    );
    let tokens = backend.tokens.lock().unwrap();
    assert!(tokens[0].is_cancelled(), "the loser's token is cancelled");
    assert!(!tokens[1].is_cancelled(), "the winner's is not");
}

#[tokio::test(start_paused = true)]
async fn a_fast_first_attempt_sends_no_hedge() {
    let backend = Backend::new(|_| Duration::from_millis(10));
    let svc = fixed(50).build().layer(backend.service());
    assert_eq!(svc.oneshot(0).await.unwrap(), 0);
    tokio::time::advance(Duration::from_millis(100)).await;
    assert_eq!(backend.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_early_error_does_not_win_while_another_attempt_is_outstanding() {
    // The first attempt fails at 100 ms; the hedge, sent at 50 ms, succeeds at 150 ms.
    let backend = Backend::new(|_| Duration::from_millis(100)).failing(|n| n == 0);
    let svc = fixed(50).build().layer(backend.service());
    let start = Instant::now();
    assert_eq!(svc.oneshot(0).await.unwrap(), 1);
    assert_eq!(start.elapsed(), Duration::from_millis(150));
}

#[tokio::test(start_paused = true)]
async fn when_every_attempt_fails_the_last_error_comes_back() {
    let backend = Backend::new(|_| Duration::from_millis(100)).failing(|_| true);
    let svc = fixed(50).build().layer(backend.service());
    let err = svc.oneshot(0).await.unwrap_err();
    assert_eq!(err.kind(), towerguard::ErrorKind::Inner);
    assert_eq!(backend.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn the_percentile_delay_follows_a_shifted_latency_distribution() {
    let phase = Arc::new(AtomicUsize::new(10));
    let p = phase.clone();
    let backend = Backend::new(move |_| Duration::from_millis(p.load(Ordering::SeqCst) as u64));
    let layer = HedgeLayer::builder()
        .percentile(0.9)
        .window(100)
        .initial_delay(Duration::from_millis(500), 20)
        .without_budget()
        .build();
    let svc = layer.layer(backend.service());
    assert_eq!(
        layer.current_delay(),
        Duration::from_millis(500),
        "initial delay"
    );
    for _ in 0..300 {
        svc.clone().oneshot(0).await.unwrap();
    }
    let delay = layer.current_delay();
    assert!(
        delay >= Duration::from_millis(10) && delay < Duration::from_micros(10_700),
        "{delay:?}"
    );
    phase.store(40, Ordering::SeqCst);
    for _ in 0..300 {
        svc.clone().oneshot(0).await.unwrap();
    }
    let delay = layer.current_delay();
    assert!(
        delay >= Duration::from_millis(40) && delay < Duration::from_micros(42_700),
        "{delay:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn with_every_call_slow_hedges_stay_within_the_budget_fraction() {
    const REQUESTS: usize = 10_000;
    let backend = Backend::new(|_| Duration::from_millis(100));
    let layer = HedgeLayer::builder()
        .fixed_delay(Duration::from_millis(10))
        .budget(
            Budget::builder()
                .ratio(0.05)
                .min_per_second(0.0)
                .max_balance(100.0)
                .build(),
        )
        .build();
    let svc = layer.layer(backend.service());
    for batch in 0..REQUESTS / 500 {
        let mut set = JoinSet::new();
        for _ in 0..500 {
            set.spawn(svc.clone().oneshot(batch as u32));
        }
        while let Some(result) = set.join_next().await {
            result.unwrap().unwrap();
        }
    }
    let hedges = backend.calls() - REQUESTS;
    assert!(
        hedges <= REQUESTS / 20,
        "{hedges} hedges for {REQUESTS} requests"
    );
    assert!(hedges >= REQUESTS / 25, "the budget is spent: {hedges}");
}

#[tokio::test(start_paused = true)]
async fn no_hedge_starts_when_the_deadline_cannot_be_met() {
    let backend = Backend::new(|_| Duration::from_millis(100));
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_millis(30)))
        .layer(fixed(20).build())
        .service(backend.service());
    let err = svc.oneshot(0).await.unwrap_err();
    assert_eq!(err.kind(), towerguard::ErrorKind::TimedOut);
    assert_eq!(
        backend.calls(),
        1,
        "10 ms left cannot fit an attempt expected to take 20 ms"
    );
}

#[tokio::test(start_paused = true)]
async fn every_attempt_drives_its_own_service_to_ready() {
    let backend = Backend::new(|n| Duration::from_millis(if n == 0 { 1_000 } else { 10 }));
    let probe = Probe::new(backend.service());
    let (polls, calls) = (probe.polls.clone(), probe.calls.clone());
    let mut svc = fixed(50).max_attempts(3).build().layer(probe);
    let answer = svc.ready().await.unwrap().call(0).await.unwrap();
    assert_eq!(answer, 1);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(
        polls.load(Ordering::SeqCst),
        2,
        "the readied service, then one clone driven to ready"
    );
}

#[tokio::test(start_paused = true)]
async fn requests_the_policy_cannot_replay_are_not_hedged() {
    let backend = Backend::new(|_| Duration::from_millis(100));
    let policy = towerguard::retry::FnPolicy::new(
        |_: &u32| None,
        |_: &Result<usize, towerguard::Error>| towerguard::retry::Verdict::Done,
    );
    let svc = fixed(10).policy(policy).build().layer(backend.service());
    svc.oneshot(0).await.unwrap();
    assert_eq!(backend.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_response_future_drops_every_attempt() {
    let backend = Backend::new(|_| Duration::from_secs(10));
    let mut svc = fixed(10).build().layer(backend.service());
    let mut fut = task::spawn(svc.ready().await.unwrap().call(0));
    assert_pending!(fut.poll());
    tokio::time::advance(Duration::from_millis(10)).await;
    assert_pending!(fut.poll());
    assert_eq!(backend.calls(), 2);
    drop(fut);
    assert_eq!(backend.dropped.load(Ordering::SeqCst), 2);
    assert!(backend
        .tokens
        .lock()
        .unwrap()
        .iter()
        .all(CancellationToken::is_cancelled));
}

#[test]
fn hedge_metrics_are_emitted() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let backend = Backend::new(|n| Duration::from_millis(if n == 0 { 1_000 } else { 10 }));
    // Handles register when the layer wraps its service.
    let svc = metrics::with_local_recorder(&recorder, || {
        HedgeLayer::builder()
            .name("m")
            .fixed_delay(Duration::from_millis(50))
            .budget(
                Budget::builder()
                    .ratio(0.0)
                    .min_per_second(1.0)
                    .max_balance(0.0)
                    .build(),
            )
            .build()
            .layer(backend.service())
    });
    let runtime = support::paused_runtime();
    runtime.block_on(async {
        svc.clone().oneshot(0).await.unwrap(); // slow: hedged, the hedge wins
        svc.clone().oneshot(0).await.unwrap(); // fast
        let mut fut = task::spawn(svc.clone().oneshot(0));
        assert_pending!(fut.poll());
        drop(fut);
    });
    let m = Metrics::from(&snapshotter);
    let name = [("name", "m")];
    assert_eq!(m.counter("towerguard_hedge_attempts_total", &name), 4);
    assert_eq!(m.counter("towerguard_hedge_hedges_total", &name), 1);
    assert_eq!(m.counter("towerguard_hedge_wins_total", &name), 1);
    assert_eq!(
        m.counter("towerguard_hedge_budget_exhausted_total", &name),
        0
    );
    assert_eq!(m.gauge("towerguard_hedge_delay_seconds", &name), 0.05);
    m.assert_listed_emitted(&["towerguard_hedge_"]);
}

/// A slow first attempt holding a limit of `max` under a hedge of 50 ms; the limit's
/// handle, and the rejections it counted.
fn hedge_over_a_limit(
    max: usize,
    backend: &Backend,
) -> (
    impl Service<u32, Response = usize, Error = towerguard::Error> + Clone,
    LimitHandle,
    metrics_util::debugging::Snapshotter,
) {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // Handles register when the layers are built.
    let (svc, handle) = metrics::with_local_recorder(&recorder, || {
        let limit = ConcurrencyLimitLayer::builder()
            .name("under-hedge")
            .limit(max)
            .queue(8, Duration::from_secs(5))
            .build();
        let handle = limit.handle();
        let svc = fixed(50).build().layer(limit.layer(backend.service()));
        (svc, handle)
    });
    (svc, handle, snapshotter)
}

#[test]
fn a_hedge_finding_the_limit_full_is_refused_at_once_and_never_queues() {
    let backend = Backend::new(|n| Duration::from_millis(if n == 0 { 1_000 } else { 10 }));
    let (svc, handle, snapshotter) = hedge_over_a_limit(1, &backend);
    support::paused_runtime().block_on(async {
        let mut first = task::spawn(svc.clone().oneshot(0));
        assert_pending!(first.poll());
        tokio::time::advance(Duration::from_millis(50)).await;
        assert_pending!(first.poll());
        assert_eq!(handle.queued(), 0, "the hedge did not join the queue");
        assert_eq!(handle.in_flight(), 1);
        // An ordinary request still waits for the permit.
        let mut second = task::spawn(svc.clone().oneshot(1));
        assert_pending!(second.poll());
        assert_eq!(handle.queued(), 1, "an ordinary request waits in the queue");
        assert_eq!(first.await.unwrap(), 0, "the first attempt answered");
        assert_eq!(
            second.await.unwrap(),
            1,
            "the waiting request got the permit"
        );
    });
    assert_eq!(backend.calls(), 2, "no hedge reached the backend");
    let m = Metrics::from(&snapshotter);
    let rejected = |reason| {
        m.counter(
            "towerguard_limit_rejected_total",
            &[("name", "under-hedge"), ("reason", reason)],
        )
    };
    assert_eq!(rejected("hedge"), 2, "both requests' hedges were refused");
    assert_eq!(rejected("full") + rejected("queue_timeout"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_hedge_takes_a_free_permit() {
    let backend = Backend::new(|n| Duration::from_millis(if n == 0 { 1_000 } else { 10 }));
    let (svc, handle, _) = hedge_over_a_limit(2, &backend);
    let start = Instant::now();
    assert_eq!(svc.oneshot(0).await.unwrap(), 1, "the hedge won");
    assert_eq!(start.elapsed(), Duration::from_millis(60));
    assert_eq!(backend.calls(), 2);
    assert_eq!(handle.in_flight(), 0, "the loser's permit came back");
}

#[test]
fn public_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    type Inner = support::Upstream;
    send_sync::<HedgeLayer>();
    send_sync::<towerguard::hedge::Hedge<Inner, towerguard::retry::RetryErrors>>();
    send::<
        towerguard::hedge::ResponseFuture<
            Inner,
            String,
            towerguard::retry::RetryErrors,
            towerguard::timeout::TaskLocal,
        >,
    >();
}

/// An HTTP backend: the first call answers 200 after 50 ms, a hedged one answers 503 at
/// once; every call records the token it finds in its request's extensions.
#[allow(clippy::type_complexity)]
fn http_backend(
    tokens: Arc<Mutex<Vec<CancellationToken>>>,
    first: Option<Duration>,
    hedged: http::StatusCode,
) -> impl Service<
    http::Request<towerguard::http::BufferedBody<http_body_util::Empty<bytes::Bytes>>>,
    Response = http::Response<String>,
    Error = std::io::Error,
    Future = impl std::future::Future<Output = Result<http::Response<String>, std::io::Error>> + Send,
> + Clone
       + Send
       + 'static {
    let calls = Arc::new(AtomicUsize::new(0));
    service_fn(move |req: http::Request<_>| {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        let token = req.extensions().get::<CancellationToken>().cloned();
        tokens.lock().unwrap().extend(token);
        async move {
            let status = if n == 0 {
                match first {
                    Some(latency) => tokio::time::sleep(latency).await,
                    None => std::future::pending().await,
                }
                http::StatusCode::OK
            } else {
                hedged
            };
            let mut response = http::Response::new(format!("#{n}"));
            *response.status_mut() = status;
            Ok(response)
        }
    })
}

fn http_get() -> http::Request<towerguard::http::BufferedBody<http_body_util::Empty<bytes::Bytes>>>
{
    http::Request::get("http://backend.test/")
        .body(towerguard::http::BufferedBody::empty())
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_fast_retryable_response_from_a_hedge_does_not_beat_a_pending_success() {
    let tokens = Arc::default();
    let svc = fixed(10)
        .policy(towerguard::http::HttpPolicy)
        .build()
        .layer(http_backend(
            tokens,
            Some(Duration::from_millis(50)),
            http::StatusCode::SERVICE_UNAVAILABLE,
        ));
    let response = svc.oneshot(http_get()).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    assert_eq!(response.body(), "#0", "the first attempt's success");
}

#[tokio::test(start_paused = true)]
async fn a_losing_attempt_sees_the_token_in_its_request_extensions_cancelled() {
    let tokens: Arc<Mutex<Vec<CancellationToken>>> = Arc::default();
    let svc = fixed(10)
        .policy(towerguard::http::HttpPolicy)
        .carrier(towerguard::http::HttpExtensions)
        .build()
        .layer(http_backend(tokens.clone(), None, http::StatusCode::OK));
    let response = svc.oneshot(http_get()).await.unwrap();
    assert_eq!(response.body(), "#1", "the hedge won");
    let tokens = tokens.lock().unwrap();
    assert_eq!(
        tokens.len(),
        2,
        "each attempt found a token in its extensions"
    );
    assert!(tokens[0].is_cancelled(), "the loser's token");
    assert!(!tokens[1].is_cancelled(), "the winner's token");
}
