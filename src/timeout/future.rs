//! The timeout's response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use super::deadline::{Deadline, Scoped};
use crate::error::{BoxError, Error, ErrorKind};
use crate::metrics::{Lazy, TimeoutMetrics};
use pin_project_lite::pin_project;
use tokio::time::Sleep;

pin_project! {
    /// Response future of [`Timeout`](super::Timeout).
    ///
    /// # Cancel safety
    ///
    /// Dropping it before it completes drops the inner future and cancels the request's
    /// cancellation token, so work the inner service spawned can stop too.
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
        expires: Deadline,
        started: Deadline,
        // Only while a recorder takes the durations.
        timing: Option<Arc<Lazy<TimeoutMetrics>>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Running {
            // Cancels the token if dropped before it completes.
            #[pin]
            future: Scoped<F>,
            // Made the first time the inner future is pending: a future that is ready at
            // once never touches the timer.
            sleep: Option<Pin<Box<Sleep>>>,
        },
        Done,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(
        future: Scoped<F>,
        expires: Deadline,
        started: Deadline,
        timing: Option<Arc<Lazy<TimeoutMetrics>>>,
    ) -> Self {
        ResponseFuture {
            state: State::Running {
                future,
                sleep: None,
            },
            expires,
            started,
            timing,
        }
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut state = this.state;
        let StateProj::Running { mut future, sleep } = state.as_mut().project() else {
            panic!("timeout::ResponseFuture polled after completion");
        };
        assert!(
            !future.finished(),
            "timeout::ResponseFuture polled after completion"
        );
        if let Poll::Ready(result) = future.as_mut().poll(cx) {
            // Completed in time: the token stays as it is.
            let result = result.map_err(Error::inner);
            if let Some(metrics) = this.timing.as_ref() {
                let elapsed = Deadline::now().since(*this.started).as_secs_f64();
                match &result {
                    Ok(_) => metrics.get().ok.record(elapsed),
                    Err(_) => metrics.get().error.record(elapsed),
                }
            }
            // The finished future stays until the response future is dropped: rewriting
            // the state here costs more than the request.
            return Poll::Ready(result);
        }
        let expires = *this.expires;
        let sleep =
            sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(expires.instant())));
        if sleep.as_mut().poll(cx).is_ready() {
            tracing::debug!("timeout: timed out, cancelling the work");
            if let Some(metrics) = this.timing.as_ref() {
                metrics.get().timeouts.increment(1);
                metrics
                    .get()
                    .timed_out
                    .record(Deadline::now().since(*this.started).as_secs_f64());
            }
            // Dropping the scope cancels the token, then drops the inner future.
            state.set(State::Done);
            return Poll::Ready(Err(Error::new(ErrorKind::TimedOut)));
        }
        Poll::Pending
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Running { future, .. } if future.finished() => "done",
            State::Running { .. } => "running",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("expires", &self.expires)
            .finish()
    }
}
