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
async fn a_token_first_asked_for_while_polling_three_scopes_deep_is_cancelled_on_expiry() {
    // Nobody asks for a token in `call`: each scope's token is made only when the inner
    // future, polled for the second time, asks for it.
    let seen: Arc<Mutex<Vec<CancellationToken>>> = Arc::default();
    let record = seen.clone();
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_secs(10)))
        .layer(TimeoutLayer::new(Duration::from_secs(20)))
        .layer(TimeoutLayer::new(Duration::from_secs(30)))
        .service(service_fn(move |()| {
            let record = record.clone();
            async move {
                tokio::task::yield_now().await;
                let deadline = Deadline::current().expect("polled inside the scopes");
                let token = TimeoutContext::current().expect("inside").token();
                record.lock().unwrap().push(token.clone());
                // Asked again in the same scope: the same token.
                let again = TimeoutContext::current().expect("inside").token();
                record.lock().unwrap().push(again);
                token.cancelled().await;
                Ok::<_, Infallible>(deadline)
            }
        }));
    let start = Instant::now();
    let mut fut = task::spawn(svc.oneshot(()));
    assert_pending!(fut.poll());
    assert_pending!(fut.poll());
    let tokens = seen.lock().unwrap().clone();
    assert_eq!(tokens.len(), 2);
    assert!(!tokens[0].is_cancelled());
    // The outermost scope expires first: its cancellation reaches the innermost token.
    tokio::time::advance(Duration::from_secs(10)).await;
    let err = fut.await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TimedOut);
    assert!(tokens[0].is_cancelled() && tokens[1].is_cancelled());
    assert!(start.elapsed() >= Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn an_inner_scope_that_finished_keeps_a_child_token_of_the_outer_scope() {
    // The inner scope answers at once (its own token is never cancelled by it); the outer
    // scope then expires: a token taken inside the inner scope is cancelled through the
    // chain, as work spawned from there would need.
    let seen: Arc<Mutex<Option<CancellationToken>>> = Arc::default();
    let record = seen.clone();
    let inner = TimeoutLayer::new(Duration::from_secs(30)).layer(service_fn(move |()| {
        let record = record.clone();
        async move {
            let token = TimeoutContext::current().expect("inside").token();
            *record.lock().unwrap() = Some(token);
            Ok::<_, Infallible>(())
        }
    }));
    let svc = TimeoutLayer::new(Duration::from_secs(10)).layer(service_fn(move |()| {
        let inner = inner.clone();
        async move {
            tokio::task::yield_now().await;
            inner.oneshot(()).await.expect("in time");
            std::future::pending::<()>().await;
            Ok::<_, Infallible>(())
        }
    }));
    let mut fut = task::spawn(svc.oneshot(()));
    assert_pending!(fut.poll());
    assert_pending!(fut.poll());
    let token = seen.lock().unwrap().clone().expect("the inner scope ran");
    assert!(!token.is_cancelled(), "the inner scope finished in time");
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(fut.await.unwrap_err().kind(), ErrorKind::TimedOut);
    assert!(token.is_cancelled());
}

#[tokio::test(start_paused = true)]
async fn a_token_made_in_call_is_the_one_the_future_sees_when_polled() {
    let seen: Arc<Mutex<Vec<CancellationToken>>> = Arc::default();
    let record = seen.clone();
    let svc = TimeoutLayer::new(Duration::from_secs(5)).layer(service_fn(move |()| {
        let in_call = TimeoutContext::current().expect("inside").token();
        let record = record.clone();
        async move {
            let in_poll = TimeoutContext::current().expect("inside").token();
            record.lock().unwrap().extend([in_call.clone(), in_poll]);
            in_call.cancelled().await;
            Ok::<_, Infallible>(())
        }
    }));
    let mut fut = task::spawn(svc.oneshot(()));
    assert_pending!(fut.poll());
    drop(fut);
    let tokens = seen.lock().unwrap().clone();
    assert!(tokens[0].is_cancelled());
    assert!(
        tokens[1].is_cancelled(),
        "the same token in call and in poll"
    );
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
