//! The timeout's response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use super::deadline::{CancelOnDrop, LazyToken, TimeoutContext};
use crate::error::{BoxError, Error, ErrorKind};
use crate::metrics::{Lazy, TimeoutMetrics};
use pin_project_lite::pin_project;
use tokio::task::futures::TaskLocalFuture;
use tokio::time::{Instant, Sleep};

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
        started: Instant,
        metrics: Arc<Lazy<TimeoutMetrics>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Running {
            #[pin]
            future: TaskLocalFuture<TimeoutContext, F>,
            #[pin]
            sleep: Sleep,
            // Cancels the token if the future is dropped before it completes.
            guard: CancelOnDrop,
        },
        Done,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(
        future: TaskLocalFuture<TimeoutContext, F>,
        expires: Instant,
        token: Arc<LazyToken>,
        started: Instant,
        metrics: Arc<Lazy<TimeoutMetrics>>,
    ) -> Self {
        ResponseFuture {
            state: State::Running {
                future,
                sleep: tokio::time::sleep_until(expires),
                guard: CancelOnDrop(Some(token)),
            },
            started,
            metrics,
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
        let StateProj::Running {
            future,
            sleep,
            guard,
        } = state.as_mut().project()
        else {
            panic!("timeout::ResponseFuture polled after completion");
        };
        let elapsed = || this.started.elapsed().as_secs_f64();
        if let Poll::Ready(result) = future.poll(cx) {
            // Completed in time: the token stays as it is.
            guard.0 = None;
            let result = result.map_err(Error::inner);
            match &result {
                Ok(_) => this.metrics.get().ok.record(elapsed()),
                Err(_) => this.metrics.get().error.record(elapsed()),
            }
            state.set(State::Done);
            return Poll::Ready(result);
        }
        if sleep.poll(cx).is_ready() {
            this.metrics.get().timeouts.increment(1);
            tracing::debug!("timeout: timed out, cancelling the work");
            this.metrics.get().timed_out.record(elapsed());
            // Cancel the token, then drop the inner future.
            if let Some(token) = guard.0.take() {
                token.cancel();
            }
            state.set(State::Done);
            return Poll::Ready(Err(Error::new(ErrorKind::TimedOut)));
        }
        Poll::Pending
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Running { .. } => "running",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("started", &self.started)
            .finish()
    }
}
