//! Integration tests of retry with backoff and a budget, on paused time.

mod support;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};
use towerguard::budget::Budget;
use towerguard::http::{BufferBodyLayer, BufferedBody, HttpPolicy};
use towerguard::retry::{Backoff, FnPolicy, RetryBuilder, RetryLayer, Verdict};
use towerguard::timeout::TimeoutLayer;
use towerguard::ErrorKind;

use support::{Metrics, Outcome, Probe, Upstream};

#[tokio::test(start_paused = true)]
async fn transient_errors_are_retried_until_success() {
    let upstream = Upstream::scripted(|n, key| match n {
        1 | 2 => Outcome::Err("reset"),
        _ => Outcome::Ok(format!("{key}#{n}")),
    });
    let svc = RetryLayer::builder().build().layer(upstream.clone());
    assert_eq!(svc.oneshot("k".to_owned()).await.unwrap(), "k#3");
    assert_eq!(upstream.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn max_attempts_bounds_the_retries_and_the_last_error_comes_back() {
    let upstream = Upstream::scripted(|_, _| Outcome::Err("down"));
    let svc = RetryLayer::builder()
        .max_attempts(4)
        .build()
        .layer(upstream.clone());
    let err = svc.oneshot("k".to_owned()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Inner);
    assert_eq!(upstream.calls(), 4);
}

#[tokio::test(start_paused = true)]
async fn waits_between_attempts_stay_within_the_backoff_ceiling() {
    let upstream = Upstream::scripted(|_, _| Outcome::Err("down"));
    let times = Arc::new(Mutex::new(Vec::new()));
    let seen = times.clone();
    let inner = service_fn(move |key: String| {
        seen.lock().unwrap().push(Instant::now());
        upstream.clone().oneshot(key)
    });
    let backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(300));
    let svc = RetryLayer::builder()
        .max_attempts(5)
        .backoff(backoff)
        .without_budget()
        .build()
        .layer(inner);
    svc.oneshot("k".to_owned()).await.unwrap_err();
    let times = times.lock().unwrap();
    assert_eq!(times.len(), 5);
    for (retry, pair) in times.windows(2).enumerate() {
        let wait = pair[1] - pair[0];
        assert!(
            wait <= backoff.ceiling(retry as u32),
            "retry {retry}: {wait:?}"
        );
    }
}

/// An HTTP upstream answering from a script of statuses and headers; counts calls and
/// records the bodies it received.
#[derive(Clone)]
struct HttpUpstream {
    script: Arc<Mutex<VecDeque<Response<String>>>>,
    calls: Arc<AtomicUsize>,
    bodies: Arc<Mutex<Vec<Bytes>>>,
}

impl HttpUpstream {
    fn new(responses: Vec<Response<String>>) -> Self {
        HttpUpstream {
            script: Arc::new(Mutex::new(responses.into())),
            calls: Arc::default(),
            bodies: Arc::default(),
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl<B> Service<Request<B>> for HttpUpstream
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Debug,
{
    type Response = Response<String>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Response<String>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let this = self.clone();
        Box::pin(async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            this.bodies.lock().unwrap().push(body);
            let next = this.script.lock().unwrap().pop_front();
            Ok(next.unwrap_or_else(|| Response::new("ok".to_owned())))
        })
    }
}

fn status(code: u16, retry_after: Option<&str>) -> Response<String> {
    let mut builder = Response::builder().status(code);
    if let Some(value) = retry_after {
        builder = builder.header("retry-after", value);
    }
    builder.body(String::new()).unwrap()
}

fn http_retry(
    upstream: &HttpUpstream,
) -> impl Service<Request<Chunks>, Response = Response<String>, Error = towerguard::Error> + Clone {
    ServiceBuilder::new()
        .layer(BufferBodyLayer::new(64))
        .layer(
            RetryLayer::builder()
                .policy(HttpPolicy)
                .max_retry_after(Duration::from_secs(60))
                .build(),
        )
        .service(upstream.clone())
}

/// A request body in chunks.
#[derive(Debug, Default)]
struct Chunks(VecDeque<Bytes>);

impl Chunks {
    fn of(chunks: &[&'static [u8]]) -> Self {
        Chunks(chunks.iter().map(|c| Bytes::from_static(c)).collect())
    }
}

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|c| Ok(Frame::data(c))))
    }
}

fn request(method: Method, body: Chunks) -> Request<Chunks> {
    Request::builder()
        .method(method)
        .uri("/r")
        .body(body)
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn retry_after_in_seconds_is_honoured() {
    let upstream = HttpUpstream::new(vec![status(503, Some("2"))]);
    let start = Instant::now();
    let response = http_retry(&upstream)
        .oneshot(request(Method::GET, Chunks::default()))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn retry_after_as_an_http_date_is_honoured() {
    let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
    let upstream = HttpUpstream::new(vec![status(429, Some(&date))]);
    let start = Instant::now();
    let response = http_retry(&upstream)
        .oneshot(request(Method::GET, Chunks::default()))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let waited = start.elapsed();
    // The date has one-second resolution.
    assert!(
        waited > Duration::from_secs(28) && waited <= Duration::from_secs(30),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_beyond_the_cap_ends_the_retries() {
    let upstream = HttpUpstream::new(vec![status(503, Some("120"))]);
    let start = Instant::now();
    let response = http_retry(&upstream)
        .oneshot(request(Method::GET, Chunks::default()))
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "the last response comes back"
    );
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(upstream.calls(), 1);
}

/// Through `layer` (two attempts, a `Retry-After` cap of `cap` seconds, no budget): a 503
/// asking for `cap` seconds is retried after them, one asking for more is not, and two
/// 503s in a row are two attempts, the last response coming back.
async fn keeps_its_retry_after_cap_and_two_attempts(layer: RetryLayer<HttpPolicy>, cap: u64) {
    let through = |upstream: &HttpUpstream| {
        ServiceBuilder::new()
            .layer(BufferBodyLayer::new(64))
            .layer(layer.clone())
            .service(upstream.clone())
    };
    let get = || request(Method::GET, Chunks::default());

    let at_cap = HttpUpstream::new(vec![status(503, Some(&cap.to_string()))]);
    let start = Instant::now();
    let response = through(&at_cap).oneshot(get()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(start.elapsed(), Duration::from_secs(cap));
    assert_eq!(at_cap.calls(), 2);

    let beyond_cap = HttpUpstream::new(vec![status(503, Some(&(cap + 1).to_string()))]);
    let start = Instant::now();
    let response = through(&beyond_cap).oneshot(get()).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(beyond_cap.calls(), 1);

    let twice = HttpUpstream::new(vec![status(503, Some("1")), status(503, Some("1"))]);
    let start = Instant::now();
    let response = through(&twice).oneshot(get()).await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "the last response"
    );
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    assert_eq!(twice.calls(), 2);
}

fn two_attempts_capped_at(cap: u64) -> RetryLayer<HttpPolicy> {
    RetryLayer::builder()
        .policy(HttpPolicy)
        .max_attempts(2)
        .max_retry_after(Duration::from_secs(cap))
        .without_budget()
        .build()
}

/// Without a budget and without a recorder, each request carries a pointer to the layer's
/// settings (kept for the process) instead of its shared state: the `Retry-After` cap and
/// the attempt bound hold all the same.
#[tokio::test(start_paused = true)]
async fn a_layer_without_a_budget_or_a_recorder_keeps_its_retry_after_cap_and_attempt_bound() {
    keeps_its_retry_after_cap_and_two_attempts(two_attempts_capped_at(60), 60).await;
}

/// A process keeps at most 64 distinct retry settings for good; a layer built past that
/// reads its settings through its shared state, and keeps its `Retry-After` cap and
/// attempt bound all the same.
#[tokio::test(start_paused = true)]
async fn layers_past_the_bound_on_kept_settings_keep_their_own() {
    // The test above's settings first: kept whichever test runs first, so that test
    // always goes through the kept copy.
    let _kept = two_attempts_capped_at(60);
    let layers: Vec<_> = (1_000..1_100).map(two_attempts_capped_at).collect();
    keeps_its_retry_after_cap_and_two_attempts(layers[99].clone(), 1_099).await;
}

#[tokio::test(start_paused = true)]
async fn retryable_statuses_are_retried_and_others_are_not() {
    for (code, retried) in [
        (408, true),
        (429, true),
        (500, true),
        (502, true),
        (503, true),
        (504, true),
        (501, false),
        (404, false),
        (400, false),
    ] {
        let upstream = HttpUpstream::new(vec![status(code, None)]);
        let response = http_retry(&upstream)
            .oneshot(request(Method::GET, Chunks::default()))
            .await
            .unwrap();
        let expected = if retried {
            (StatusCode::OK, 2)
        } else {
            (StatusCode::from_u16(code).unwrap(), 1)
        };
        assert_eq!(
            (response.status(), upstream.calls()),
            expected,
            "status {code}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn non_idempotent_requests_are_not_retried_unless_they_opt_in() {
    let upstream = HttpUpstream::new(vec![status(503, None)]);
    let response = http_retry(&upstream)
        .oneshot(request(Method::POST, Chunks::of(&[b"x"])))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(upstream.calls(), 1);

    let upstream = HttpUpstream::new(vec![status(503, None)]);
    let mut keyed = request(Method::POST, Chunks::of(&[b"x"]));
    keyed
        .headers_mut()
        .insert("idempotency-key", "abc".parse().unwrap());
    let response = http_retry(&upstream).oneshot(keyed).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_small_body_is_replayed_whole_on_every_attempt() {
    let upstream = HttpUpstream::new(vec![status(503, None), status(503, None)]);
    let body = Chunks::of(&[b"hello ", b"world"]);
    let response = http_retry(&upstream)
        .oneshot(request(Method::PUT, body))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let bodies = upstream.bodies.lock().unwrap();
    assert_eq!(bodies.len(), 3);
    assert!(bodies.iter().all(|b| b == "hello world"), "{bodies:?}");
}

#[tokio::test(start_paused = true)]
async fn a_body_over_the_buffer_bound_is_sent_once_and_intact() {
    let upstream = HttpUpstream::new(vec![status(503, None)]);
    let chunks: Vec<&'static [u8]> = vec![&[b'a'; 40], &[b'b'; 40], &[b'c'; 40]];
    let response = http_retry(&upstream)
        .oneshot(request(Method::PUT, Chunks::of(&chunks)))
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "not retried"
    );
    assert_eq!(upstream.calls(), 1);
    let bodies = upstream.bodies.lock().unwrap();
    let expected: Vec<u8> = chunks.concat();
    assert_eq!(bodies[0], expected);
}

#[test]
fn replay_bodies_report_whether_they_can_be_replayed() {
    let body: BufferedBody<Chunks> = BufferedBody::complete(Bytes::from_static(b"abc"));
    assert!(body.is_replayable());
    assert!(body.try_clone().is_some());
}

#[tokio::test(start_paused = true)]
async fn under_a_total_outage_the_budget_bounds_upstream_calls_per_request() {
    const REQUESTS: usize = 10_000;
    let upstream = Upstream::scripted(|_, _| Outcome::Err("down"));
    let budget = Budget::new(0.2, 10.0);
    let svc = RetryLayer::builder()
        .budget(budget.clone())
        .build()
        .layer(upstream.clone());
    let start = Instant::now();
    let mut set = JoinSet::new();
    for i in 0..REQUESTS {
        set.spawn(svc.clone().oneshot(format!("k{i}")));
    }
    while let Some(result) = set.join_next().await {
        assert!(result.unwrap().is_err());
    }
    let seconds = start.elapsed().as_secs_f64();
    let per_request = upstream.calls() as f64 / REQUESTS as f64;
    // Nothing succeeds, so nothing is deposited: only the floor (10 per second) pays.
    let floor = (10.0 * (seconds + 1.0)) / REQUESTS as f64;
    assert!(
        per_request <= 1.0 + 0.2 + floor,
        "{per_request} calls per request over {seconds} s"
    );
    assert!(per_request <= 1.01, "{per_request}");

    // Without a budget the same outage triples the load.
    let upstream = Upstream::scripted(|_, _| Outcome::Err("down"));
    let svc = RetryLayer::builder()
        .max_attempts(3)
        .without_budget()
        .build()
        .layer(upstream.clone());
    let mut set = JoinSet::new();
    for i in 0..1_000 {
        set.spawn(svc.clone().oneshot(format!("k{i}")));
    }
    while set.join_next().await.is_some() {}
    assert_eq!(upstream.calls(), 3_000);
}

/// A deterministic hash of a call number, for a repeatable 10% failure pattern.
fn fails(n: usize) -> bool {
    let mut z = (n as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)).is_multiple_of(10)
}

#[tokio::test(start_paused = true)]
async fn a_ten_percent_transient_failure_rate_is_masked() {
    const REQUESTS: usize = 10_000;
    let upstream = Upstream::scripted(|n, key| {
        if fails(n) {
            Outcome::Err("transient")
        } else {
            Outcome::Ok(format!("{key}#{n}"))
        }
    });
    let svc = RetryLayer::builder().build().layer(upstream.clone());
    let mut ok = 0;
    for i in 0..REQUESTS {
        if svc.clone().oneshot(format!("k{i}")).await.is_ok() {
            ok += 1;
        }
    }
    let failed_calls = (1..=upstream.calls()).filter(|n| fails(*n)).count();
    assert!(
        failed_calls > 900,
        "the pattern fails about 10%: {failed_calls}"
    );
    assert!(ok as f64 / REQUESTS as f64 >= 0.999, "{ok} of {REQUESTS}");
}

#[tokio::test(start_paused = true)]
async fn no_retry_starts_when_the_deadline_cannot_be_met() {
    let upstream = Upstream::scripted(|_, _| Outcome::Err("down"));
    let policy = FnPolicy::new(
        |req: &String| Some(req.clone()),
        |outcome: &Result<String, towerguard::Error>| match outcome {
            Err(_) => Verdict::Retry {
                after: Some(Duration::from_secs(5)),
            },
            Ok(_) => Verdict::Done,
        },
    );
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_secs(1)))
        .layer(RetryLayer::builder().policy(policy).build())
        .service(upstream.clone());
    let start = Instant::now();
    let err = svc.oneshot("k".to_owned()).await.unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::Inner,
        "the last error, not a timeout"
    );
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "no wait that would outlive the deadline"
    );
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn every_attempt_drives_its_service_to_ready_first() {
    let upstream = Upstream::scripted(|n, key| match n {
        1 | 2 => Outcome::Err("reset"),
        _ => Outcome::Ok(format!("{key}#{n}")),
    });
    let probe = Probe::new(upstream.clone());
    let polls = probe.polls.clone();
    let mut svc = RetryLayer::builder().build().layer(probe);
    let answer = svc
        .ready()
        .await
        .unwrap()
        .call("k".to_owned())
        .await
        .unwrap();
    assert_eq!(answer, "k#3");
    assert_eq!(
        polls.load(Ordering::SeqCst),
        3,
        "one poll_ready per attempt"
    );
}

/// Runs `keys` through a layer from `builder` over an upstream where "flaky" fails its first
/// call and "down" every call, all under a fresh recorder, and returns what it recorded.
fn retry_metrics_of(builder: RetryBuilder, keys: &[&str]) -> Metrics {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let upstream = Upstream::scripted(|n, key| match (key, n) {
        ("flaky", 1) => Outcome::Err("reset"),
        ("down", _) => Outcome::Err("down"),
        _ => Outcome::Ok(format!("{key}#{n}")),
    });
    // Handles register when the layer wraps its service.
    let svc = metrics::with_local_recorder(&recorder, || builder.build().layer(upstream));
    let runtime = support::paused_runtime();
    runtime.block_on(async {
        for key in keys {
            let answer = svc.clone().oneshot((*key).to_owned()).await;
            assert_eq!(answer.is_ok(), *key == "flaky", "{key}: {answer:?}");
        }
    });
    Metrics::from(&snapshotter)
}

#[test]
fn retry_metrics_are_emitted() {
    // Only the floor pays: two tokens, for the first two retries.
    let builder = RetryLayer::builder().name("m").max_attempts(2).budget(
        Budget::builder()
            .ratio(0.0)
            .min_per_second(2.0)
            .max_balance(0.0)
            .build(),
    );
    let m = retry_metrics_of(builder, &["flaky", "down", "down"]);
    let name = [("name", "m")];
    assert_eq!(m.counter("towerguard_retry_attempts_total", &name), 5);
    assert_eq!(
        m.counter(
            "towerguard_retry_retries_total",
            &[("name", "m"), ("reason", "error")]
        ),
        2
    );
    assert_eq!(
        m.counter(
            "towerguard_retry_retries_total",
            &[("name", "m"), ("reason", "response")]
        ),
        0
    );
    assert_eq!(
        m.counter("towerguard_retry_budget_exhausted_total", &name),
        1
    );
    assert_eq!(
        m.counter(
            "towerguard_retry_gave_up_total",
            &[("name", "m"), ("reason", "max_attempts")]
        ),
        1
    );
    m.assert_listed_emitted(&["towerguard_retry_"]);
}

#[test]
fn retry_metrics_are_counted_without_a_budget_too() {
    // The budget test above counts with a budget; these counters must not depend on one.
    let builder = RetryLayer::builder()
        .name("nb")
        .max_attempts(3)
        .without_budget();
    let m = retry_metrics_of(builder, &["flaky", "down"]);
    assert_eq!(
        m.counter("towerguard_retry_attempts_total", &[("name", "nb")]),
        5
    );
    assert_eq!(
        m.counter(
            "towerguard_retry_retries_total",
            &[("name", "nb"), ("reason", "error")]
        ),
        3
    );
    assert_eq!(
        m.counter(
            "towerguard_retry_gave_up_total",
            &[("name", "nb"), ("reason", "max_attempts")]
        ),
        1
    );
}

#[test]
fn public_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<RetryLayer>();
    send_sync::<towerguard::retry::Retry<Upstream, towerguard::retry::RetryErrors>>();
    send::<towerguard::retry::ResponseFuture<Upstream, String, towerguard::retry::RetryErrors>>();
    send_sync::<Budget>();
}
