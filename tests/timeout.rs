//! Integration tests of the timeout layer, on paused time.

mod support;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Request;
use tokio::time::Instant;
use tokio_test::{assert_pending, task};
use tokio_util::sync::CancellationToken;
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};
use towerguard::limit::ConcurrencyLimitLayer;
use towerguard::timeout::{Deadline, TimeoutContext, TimeoutLayer};
use towerguard::ErrorKind;

use support::{Metrics, Upstream};

/// A service that records the context it ran in and then waits for its token.
fn recorder(
    seen: Arc<Mutex<Vec<TimeoutContext>>>,
) -> impl Service<
    (),
    Response = (),
    Error = Infallible,
    Future = impl std::future::Future<Output = Result<(), Infallible>> + Send,
> + Clone {
    service_fn(move |()| {
        let ctx = TimeoutContext::current().expect("called inside a timeout");
        seen.lock().unwrap().push(ctx.clone());
        async move {
            ctx.token().cancelled().await;
            Ok::<_, Infallible>(())
        }
    })
}

#[tokio::test(start_paused = true)]
async fn expiry_drops_the_inner_future_and_fails_with_timed_out() {
    let upstream = Upstream::new();
    upstream.close();
    let mut svc = TimeoutLayer::new(Duration::from_secs(1)).layer(upstream.clone());
    let started = Instant::now();
    let err = svc
        .ready()
        .await
        .unwrap()
        .call("k".to_owned())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TimedOut);
    assert_eq!(started.elapsed(), Duration::from_secs(1));
    assert_eq!(
        upstream
            .dropped_unfinished
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn a_response_in_time_passes_through() {
    let upstream = Upstream::new();
    let mut svc = TimeoutLayer::new(Duration::from_secs(1)).layer(upstream);
    assert_eq!(
        svc.ready()
            .await
            .unwrap()
            .call("k".to_owned())
            .await
            .unwrap(),
        "k#1"
    );
}

#[tokio::test(start_paused = true)]
async fn the_token_is_cancelled_on_expiry() {
    let seen = Arc::default();
    let svc = TimeoutLayer::new(Duration::from_secs(1)).layer(recorder(Arc::clone(&seen)));
    let err = svc.oneshot(()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TimedOut);
    assert!(seen.lock().unwrap()[0].token().is_cancelled());
}

#[tokio::test(start_paused = true)]
async fn the_token_is_cancelled_when_the_caller_drops_the_future() {
    let seen: Arc<Mutex<Vec<TimeoutContext>>> = Arc::default();
    let mut svc = TimeoutLayer::new(Duration::from_secs(10)).layer(recorder(seen.clone()));
    let mut fut = task::spawn(svc.ready().await.unwrap().call(()));
    assert_pending!(fut.poll());
    let token = seen.lock().unwrap()[0].token().clone();
    assert!(!token.is_cancelled());
    drop(fut);
    assert!(token.is_cancelled());
}

#[tokio::test(start_paused = true)]
async fn the_token_is_left_alone_after_a_response_in_time() {
    let token = Arc::new(Mutex::new(None::<CancellationToken>));
    let slot = token.clone();
    let svc = TimeoutLayer::new(Duration::from_secs(1)).layer(service_fn(move |()| {
        *slot.lock().unwrap() = TimeoutContext::current().map(|c| c.token().clone());
        async { Ok::<_, Infallible>(()) }
    }));
    svc.oneshot(()).await.unwrap();
    assert!(!token.lock().unwrap().as_ref().unwrap().is_cancelled());
}

#[tokio::test(start_paused = true)]
async fn nested_timeouts_keep_the_earliest_deadline_and_chain_tokens() {
    for (outer, inner) in [(1, 5), (5, 1)] {
        let seen: Arc<Mutex<Vec<TimeoutContext>>> = Arc::default();
        let svc = ServiceBuilder::new()
            .layer(TimeoutLayer::new(Duration::from_secs(outer)))
            .layer(TimeoutLayer::new(Duration::from_secs(inner)))
            .service(recorder(seen.clone()));
        let start = Instant::now();
        let err = svc.oneshot(()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TimedOut);
        let ctx = seen.lock().unwrap()[0].clone();
        assert_eq!(
            ctx.deadline(),
            Deadline::at(start + Duration::from_secs(1)),
            "{outer}/{inner}"
        );
        assert!(ctx.token().is_cancelled());
    }
}

#[tokio::test(start_paused = true)]
async fn cancelling_the_outer_scope_cancels_the_inner_token() {
    let seen: Arc<Mutex<Vec<TimeoutContext>>> = Arc::default();
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_secs(10)))
        .layer(TimeoutLayer::new(Duration::from_secs(10)))
        .service(recorder(seen.clone()));
    let mut fut = task::spawn(svc.oneshot(()));
    assert_pending!(fut.poll());
    let inner = seen.lock().unwrap()[0].token().clone();
    drop(fut);
    assert!(inner.is_cancelled());
}

#[tokio::test(start_paused = true)]
async fn a_total_timeout_outside_a_full_limit_expires_while_queued() {
    let upstream = Upstream::new();
    upstream.close();
    let limit = ConcurrencyLimitLayer::builder()
        .limit(1)
        .queue_without_timeout(10)
        .build();
    let handle = limit.handle();
    let mut svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_secs(2)))
        .layer(limit)
        .service(upstream.clone());
    let mut held = task::spawn(svc.ready().await.unwrap().call("a".to_owned()));
    assert_pending!(held.poll());
    assert_eq!(handle.in_flight(), 1);

    let queued = svc.ready().await.unwrap().call("b".to_owned());
    let started = Instant::now();
    let err = queued.await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TimedOut);
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    assert_eq!(handle.queued(), 0, "left the queue");
    assert_eq!(
        upstream.calls(),
        1,
        "the queued request never reached the upstream"
    );
}

#[tokio::test(start_paused = true)]
async fn http_extensions_carry_the_deadline_and_token() {
    let seen = Arc::new(Mutex::new(None));
    let slot = seen.clone();
    let svc = TimeoutLayer::new(Duration::from_secs(3))
        .http_extensions()
        .layer(service_fn(move |req: Request<()>| {
            let deadline = req.extensions().get::<Deadline>().copied();
            let token = req.extensions().get::<CancellationToken>().cloned();
            *slot.lock().unwrap() = Some((deadline, token));
            async { Ok::<_, Infallible>(()) }
        }));
    let start = Instant::now();
    svc.oneshot(Request::new(())).await.unwrap();
    let (deadline, token) = seen.lock().unwrap().take().unwrap();
    assert_eq!(deadline, Some(Deadline::at(start + Duration::from_secs(3))));
    assert!(token.is_some());
}

#[tokio::test(start_paused = true)]
async fn a_per_request_timeout_overrides_the_default() {
    let upstream = Upstream::new();
    upstream.close();
    let mut svc = TimeoutLayer::new(Duration::from_secs(10))
        .per_request(|key: &String| (key == "short").then(|| Duration::from_secs(1)))
        .layer(upstream);
    let start = Instant::now();
    let err = svc
        .ready()
        .await
        .unwrap()
        .call("short".to_owned())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TimedOut);
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    let start = Instant::now();
    svc.ready()
        .await
        .unwrap()
        .call("long".to_owned())
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(10));
}

#[test]
fn limit_and_timeout_metrics_are_emitted() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let upstream = Upstream::new();
    // Handles register when the layers are built and wrap their services.
    let svc = metrics::with_local_recorder(&recorder, || {
        ServiceBuilder::new()
            .layer(TimeoutLayer::new(Duration::from_secs(1)).name("m"))
            .layer(
                ConcurrencyLimitLayer::builder()
                    .name("m")
                    .limit(1)
                    .queue(1, Duration::from_secs(5))
                    .build(),
            )
            .service(upstream.clone())
    });
    let runtime = support::paused_runtime();
    runtime.block_on(async {
        let mut svc = svc;
        svc.ready()
            .await
            .unwrap()
            .call("ok".to_owned())
            .await
            .unwrap();
        upstream.close();
        let mut held = task::spawn(svc.ready().await.unwrap().call("held".to_owned()));
        assert_pending!(held.poll());
        let mut queued = task::spawn(svc.ready().await.unwrap().call("queued".to_owned()));
        assert_pending!(queued.poll());
        let rejected = svc.ready().await.unwrap().call("rejected".to_owned()).await;
        assert_eq!(rejected.unwrap_err().kind(), ErrorKind::Overloaded);
        upstream.open();
        held.await.unwrap();
        queued.await.unwrap();
        upstream.close();
        let timed_out = svc.ready().await.unwrap().call("slow".to_owned()).await;
        assert_eq!(timed_out.unwrap_err().kind(), ErrorKind::TimedOut);
    });

    let m = Metrics::from(&snapshotter);
    let name = [("name", "m")];
    assert_eq!(m.counter("towerguard_limit_admitted_total", &name), 4);
    let rejected = |reason| {
        m.counter(
            "towerguard_limit_rejected_total",
            &[("name", "m"), ("reason", reason)],
        )
    };
    assert_eq!(rejected("queue_full"), 1);
    assert_eq!(rejected("full"), 0);
    assert_eq!(rejected("queue_timeout"), 0);
    assert_eq!(m.gauge("towerguard_limit_in_flight", &name), 0.0);
    assert_eq!(m.gauge("towerguard_limit_queue_depth", &name), 0.0);
    assert_eq!(m.gauge("towerguard_limit_limit", &name), 1.0);
    assert_eq!(
        m.histogram_len("towerguard_limit_queue_wait_seconds", &name),
        1
    );
    assert_eq!(m.counter("towerguard_timeout_timeouts_total", &name), 1);
    let duration = |outcome| {
        m.histogram_len(
            "towerguard_timeout_duration_seconds",
            &[("name", "m"), ("outcome", outcome)],
        )
    };
    assert_eq!(duration("ok"), 3);
    assert_eq!(duration("error"), 1, "the rejection");
    assert_eq!(duration("timed_out"), 1);

    m.assert_listed_emitted(&["towerguard_limit_", "towerguard_timeout_"]);
}

#[test]
fn public_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<TimeoutLayer>();
    send_sync::<
        towerguard::timeout::Timeout<
            Upstream,
            towerguard::timeout::TaskLocal,
            towerguard::timeout::SameForAll,
        >,
    >();
    send_sync::<TimeoutContext>();
    send::<towerguard::timeout::ResponseFuture<<Upstream as Service<String>>::Future>>();
}
