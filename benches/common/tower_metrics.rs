//! tower's layers with the metrics towerguard's layers record per request, added by hand
//! around them as a user of tower would add them: for the `_prometheus` groups, where
//! tower's own layers record nothing. Each wrapper registers its handles once and
//! records what the towerguard layer it stands beside records on the path measured.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use metrics::{Counter, Gauge, Histogram};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

pin_project! {
    /// The inner future, then `done` with its output (also when dropped unfinished,
    /// with `None`).
    pub struct Observed<F, D>
    where
        D: Done<F>,
        F: Future,
    {
        #[pin]
        inner: F,
        done: Option<D>,
    }

    impl<F, D> PinnedDrop for Observed<F, D>
    where
        D: Done<F>,
        F: Future,
    {
        fn drop(this: Pin<&mut Self>) {
            if let Some(done) = this.project().done.take() {
                done.done(None);
            }
        }
    }
}

/// What to record when the inner future ends.
pub trait Done<F: Future> {
    fn done(self, output: Option<&F::Output>);
}

impl<F: Future, D: Done<F>> Future for Observed<F, D> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let output = std::task::ready!(this.inner.poll(cx));
        if let Some(done) = this.done.take() {
            done.done(Some(&output));
        }
        Poll::Ready(output)
    }
}

/// The limit's per-request metrics: `admitted_total` and the `in_flight` gauge.
#[derive(Clone)]
pub struct LimitMetrics<S> {
    inner: S,
    admitted: Counter,
    in_flight: Gauge,
}

pub fn limit_metrics<S>(inner: S) -> LimitMetrics<S> {
    LimitMetrics {
        inner,
        admitted: metrics::counter!("tower_limit_admitted_total"),
        in_flight: metrics::gauge!("tower_limit_in_flight"),
    }
}

/// Takes the request out of the in-flight gauge.
pub struct Leave(Gauge);

impl<F: Future> Done<F> for Leave {
    fn done(self, _: Option<&F::Output>) {
        self.0.decrement(1.0);
    }
}

impl<S: Service<R>, R> Service<R> for LimitMetrics<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = Observed<S::Future, Leave>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        self.admitted.increment(1);
        self.in_flight.increment(1.0);
        Observed {
            inner: self.inner.call(req),
            done: Some(Leave(self.in_flight.clone())),
        }
    }
}

/// The timeout's per-request metrics: the duration histogram by outcome, and the
/// timeouts counter.
#[derive(Clone)]
pub struct TimeoutMetrics<S> {
    inner: S,
    handles: Arc<TimeoutHandles>,
}

pub struct TimeoutHandles {
    timeouts: Counter,
    ok: Histogram,
    error: Histogram,
    timed_out: Histogram,
}

pub fn timeout_metrics<S>(inner: S) -> TimeoutMetrics<S> {
    let duration = |outcome: &'static str| metrics::histogram!("tower_timeout_duration_seconds", "outcome" => outcome);
    TimeoutMetrics {
        inner,
        handles: Arc::new(TimeoutHandles {
            timeouts: metrics::counter!("tower_timeout_timeouts_total"),
            ok: duration("ok"),
            error: duration("error"),
            timed_out: duration("timed_out"),
        }),
    }
}

/// Records the duration from `call` to the outcome.
pub struct Timed {
    handles: Arc<TimeoutHandles>,
    started: tokio::time::Instant,
}

impl<F, T> Done<F> for Timed
where
    F: Future<Output = Result<T, tower::BoxError>>,
{
    fn done(self, output: Option<&F::Output>) {
        let elapsed = self.started.elapsed().as_secs_f64();
        match output {
            Some(Ok(_)) => self.handles.ok.record(elapsed),
            Some(Err(e)) if e.is::<tower::timeout::error::Elapsed>() => {
                self.handles.timeouts.increment(1);
                self.handles.timed_out.record(elapsed);
            }
            Some(Err(_)) => self.handles.error.record(elapsed),
            None => {}
        }
    }
}

impl<S, R, T> Service<R> for TimeoutMetrics<S>
where
    S: Service<R, Response = T, Error = tower::BoxError>,
{
    type Response = T;
    type Error = tower::BoxError;
    type Future = Observed<S::Future, Timed>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        Observed {
            inner: self.inner.call(req),
            done: Some(Timed {
                handles: self.handles.clone(),
                started: tokio::time::Instant::now(),
            }),
        }
    }
}

/// The retry's per-request metric: `attempts_total`, counted below the retry so that
/// every attempt is counted.
#[derive(Clone)]
pub struct AttemptsCounted<S> {
    inner: S,
    attempts: Counter,
}

pub struct CountAttemptsLayer;

impl<S> Layer<S> for CountAttemptsLayer {
    type Service = AttemptsCounted<S>;

    fn layer(&self, inner: S) -> AttemptsCounted<S> {
        AttemptsCounted {
            inner,
            attempts: metrics::counter!("tower_retry_attempts_total"),
        }
    }
}

impl<S: Service<R>, R> Service<R> for AttemptsCounted<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> S::Future {
        self.attempts.increment(1);
        self.inner.call(req)
    }
}
