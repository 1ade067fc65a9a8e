//! The retry layer's response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::util::Oneshot;
use tower_service::Service;

use super::layer::Shared;
use super::policy::{Policy, Verdict};
use crate::error::{BoxError, Error};
use crate::timeout::Deadline;

pin_project! {
    /// Response future of [`Retry`](super::Retry).
    ///
    /// # Cancel safety
    ///
    /// Dropping it drops the attempt under way or the wait before the next one.
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<S, Req, P>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S, Req>,
        service: S,
        policy: P,
        // A copy kept for the next attempt; `None` when the request cannot be replayed.
        replay: Option<Req>,
        retries: u32,
        shared: Arc<Shared>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, Req>
    where
        S: Service<Req>,
    {
        First { #[pin] future: S::Future },
        // Boxed: a wait is rare, and the future every request carries stays small.
        Waiting { sleep: Pin<Box<Sleep>> },
        Retrying { #[pin] call: Oneshot<S, Req> },
    }
}

impl<S, Req, P> ResponseFuture<S, Req, P>
where
    S: Service<Req>,
{
    pub(crate) fn new(
        future: S::Future,
        service: S,
        policy: P,
        replay: Option<Req>,
        shared: Arc<Shared>,
    ) -> Self {
        ResponseFuture {
            state: State::First { future },
            service,
            policy,
            replay,
            retries: 0,
            shared,
        }
    }
}

impl<S, Req, P> Future for ResponseFuture<S, Req, P>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    P: Policy<Req, S::Response>,
{
    type Output = Result<S::Response, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let outcome = match this.state.as_mut().project() {
                StateProj::First { future } => ready!(future.poll(cx)).map_err(Error::inner),
                StateProj::Retrying { call } => ready!(call.poll(cx)).map_err(Error::inner),
                StateProj::Waiting { sleep } => {
                    ready!(sleep.as_mut().poll(cx));
                    // A fresh copy, or the kept one itself when the policy makes no more.
                    let copy = this.replay.as_ref().and_then(|r| this.policy.replay(r));
                    let Some(request) = copy.or_else(|| this.replay.take()) else {
                        unreachable!("only a replayable request waits for a retry");
                    };
                    this.shared.metrics.get().attempts.increment(1);
                    let call = Oneshot::new(this.service.clone(), request);
                    this.state.set(State::Retrying { call });
                    continue;
                }
            };
            let shared = &**this.shared;
            let after = match this.policy.classify(&outcome) {
                Verdict::Done => {
                    if outcome.is_ok() && shared.deposit {
                        if let Some(budget) = &shared.budget {
                            budget.deposit();
                        }
                    }
                    return Poll::Ready(outcome);
                }
                Verdict::Retry { after } => after,
            };
            match next_wait(shared, *this.retries, after, this.replay.is_some()) {
                Some(wait) => {
                    let reason = if outcome.is_err() {
                        &shared.metrics.get().retried_error
                    } else {
                        &shared.metrics.get().retried_response
                    };
                    reason.increment(1);
                    tracing::debug!(retry = *this.retries + 1, ?wait, "retry: retrying");
                    *this.retries += 1;
                    this.state.set(State::Waiting {
                        sleep: Box::pin(tokio::time::sleep(wait)),
                    });
                }
                None => return Poll::Ready(outcome),
            }
        }
    }
}

/// The wait before the next retry, or `None` (counted by reason) when there is none.
fn next_wait(
    shared: &Shared,
    retries: u32,
    after: Option<Duration>,
    replayable: bool,
) -> Option<Duration> {
    let metrics = shared.metrics.get();
    if !replayable {
        metrics.gave_up_not_replayable.increment(1);
        return None;
    }
    if retries + 1 >= shared.max_attempts {
        metrics.gave_up_max_attempts.increment(1);
        tracing::debug!("retry: attempts exhausted");
        return None;
    }
    let wait = match after {
        Some(after) if after > shared.max_retry_after => {
            metrics.gave_up_retry_after.increment(1);
            return None;
        }
        Some(after) => after,
        None => shared.backoff.delay(retries, shared.jitter.unit()),
    };
    // Never start an attempt that cannot finish before the deadline.
    if let Some(deadline) = Deadline::current() {
        let ends = Instant::now().checked_add(wait);
        if ends.is_none_or(|ends| ends >= deadline.instant()) {
            metrics.gave_up_deadline.increment(1);
            tracing::debug!("retry: no time left before the deadline");
            return None;
        }
    }
    if let Some(budget) = &shared.budget {
        if !budget.withdraw() {
            metrics.budget_exhausted.increment(1);
            tracing::debug!("retry: budget exhausted, giving up");
            return None;
        }
    }
    Some(wait)
}

impl<S, Req, P> fmt::Debug for ResponseFuture<S, Req, P>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}
