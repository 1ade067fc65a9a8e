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

use super::backoff::Jitter;
use super::layer::{Settings, Shared};
use super::policy::{Policy, Verdict};
use crate::cold::ColdBox;
use crate::error::{BoxError, Error};
use crate::metrics::{RetryMetrics, NOOP_RETRY};
use crate::timeout::Deadline;

pin_project! {
    /// Response future of [`Retry`](super::Retry).
    ///
    /// # Cancel safety
    ///
    /// Dropping it drops the attempt under way or the wait before the next one.
    #[must_use = "futures do nothing unless polled"]
    #[project = FutureProj]
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
        // `None` when they were not interned: `shared` holds them then.
        settings: Option<&'static Settings>,
        // `None` when the layer has no budget and no recorder.
        shared: Option<Arc<Shared>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, Req>
    where
        S: Service<Req>,
    {
        First { #[pin] future: S::Future },
        // Boxed: a wait is rare, and the future every request carries stays small. The
        // retry count lives in the states after the first attempt, so the first
        // attempt's future is a field smaller.
        Waiting { sleep: ColdBox<Sleep>, retries: u32 },
        Retrying { #[pin] call: Oneshot<S, Req>, retries: u32 },
    }
}

impl<S: Service<Req>, Req> State<S, Req> {
    /// Retries sent so far.
    fn retries(&self) -> u32 {
        match self {
            State::First { .. } => 0,
            State::Waiting { retries, .. } | State::Retrying { retries, .. } => *retries,
        }
    }
}

impl<S, Req, P> ResponseFuture<S, Req, P>
where
    S: Service<Req>,
{
    #[inline(always)]
    pub(crate) fn new(
        future: S::Future,
        service: S,
        policy: P,
        replay: Option<Req>,
        settings: Option<&'static Settings>,
        shared: Option<Arc<Shared>>,
    ) -> Self {
        ResponseFuture {
            state: State::First { future },
            service,
            policy,
            replay,
            settings,
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

    #[inline(always)]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // The first attempt's success is the path nearly every request takes: kept small
        // so it inlines into the caller, and it passes nothing but the future itself to
        // the waits and retries, which run out of line.
        let this = self.as_mut().project();
        if let StateProj::First { future } = this.state.project() {
            let outcome = ready!(future.poll(cx)).map_err(Error::inner);
            match this.policy.classify(&outcome) {
                Verdict::Done => return Poll::Ready(finish(this.shared.as_deref(), outcome)),
                Verdict::Retry { after } => {
                    if let Some(done) = self.as_mut().project().schedule(outcome, after) {
                        return Poll::Ready(done);
                    }
                }
            }
        }
        self.poll_retries(cx)
    }
}

/// Settles a finished request: a success deposits into the budget when the layer says so.
#[inline]
fn finish<T>(shared: Option<&Shared>, outcome: Result<T, Error>) -> Result<T, Error> {
    if let Some(shared) = shared.filter(|s| s.deposit && outcome.is_ok()) {
        if let Some(budget) = &shared.budget {
            budget.deposit();
        }
    }
    outcome
}

impl<S, Req, P> ResponseFuture<S, Req, P>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    P: Policy<Req, S::Response>,
{
    /// Drives the waits and the attempts after the first.
    #[inline(never)]
    fn poll_retries(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<S::Response, Error>> {
        let mut this = self.project();
        loop {
            let outcome = match this.state.as_mut().project() {
                StateProj::First { future } => ready!(future.poll(cx)).map_err(Error::inner),
                StateProj::Retrying { call, .. } => ready!(call.poll(cx)).map_err(Error::inner),
                StateProj::Waiting { sleep, retries } => {
                    let retries = *retries;
                    ready!(sleep.as_mut().poll(cx));
                    // A fresh copy, or the kept one itself when the policy makes no more.
                    let copy = this.replay.as_ref().and_then(|r| this.policy.replay(r));
                    let Some(request) = copy.or_else(|| this.replay.take()) else {
                        unreachable!("only a replayable request waits for a retry");
                    };
                    metrics(this.shared.as_deref()).attempts.increment(1);
                    let call = Oneshot::new(this.service.clone(), request);
                    this.state.set(State::Retrying { call, retries });
                    continue;
                }
            };
            let settled = match this.policy.classify(&outcome) {
                Verdict::Done => Some(finish(this.shared.as_deref(), outcome)),
                Verdict::Retry { after } => this.schedule(outcome, after),
            };
            if let Some(done) = settled {
                return Poll::Ready(done);
            }
        }
    }
}

impl<S, Req, P> FutureProj<'_, S, Req, P>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    P: Policy<Req, S::Response>,
{
    /// Sets the wait before the next attempt, or gives the outcome back when there is none.
    #[cold]
    #[inline(never)]
    fn schedule(
        &mut self,
        outcome: Result<S::Response, Error>,
        after: Option<Duration>,
    ) -> Option<Result<S::Response, Error>> {
        let shared = self.shared.as_deref();
        let settings = self
            .settings
            .map(|settings| settings as &Settings)
            .or(shared.map(|shared| &shared.settings))
            .expect("a request without interned settings carries the shared state");
        let replayable = self.replay.is_some();
        let retries = self.state.retries();
        let Some(wait) = next_wait(settings, shared, retries, after, replayable) else {
            return Some(outcome);
        };
        let reason = if outcome.is_err() {
            &metrics(shared).retried_error
        } else {
            &metrics(shared).retried_response
        };
        reason.increment(1);
        tracing::debug!(retry = retries + 1, ?wait, "retry: retrying");
        self.state.set(State::Waiting {
            sleep: ColdBox::new(tokio::time::sleep(wait)),
            retries: retries + 1,
        });
        None
    }
}

/// The layer's metric handles; handles that record nothing when the request carries no
/// shared state (the layer has no recorder then).
fn metrics(shared: Option<&Shared>) -> &RetryMetrics {
    shared.map_or(&NOOP_RETRY, |shared| shared.metrics.get())
}

/// The wait before the next retry, or `None` (counted by reason) when there is none.
fn next_wait(
    settings: &Settings,
    shared: Option<&Shared>,
    retries: u32,
    after: Option<Duration>,
    replayable: bool,
) -> Option<Duration> {
    let metrics = metrics(shared);
    if !replayable {
        metrics.gave_up_not_replayable.increment(1);
        return None;
    }
    if retries + 1 >= settings.max_attempts {
        metrics.gave_up_max_attempts.increment(1);
        tracing::debug!("retry: attempts exhausted");
        return None;
    }
    let wait = match after {
        Some(after) if after > settings.max_retry_after() => {
            metrics.gave_up_retry_after.increment(1);
            return None;
        }
        Some(after) => after,
        None => settings.backoff().delay(retries, Jitter::global().unit()),
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
    if let Some(budget) = shared.and_then(|shared| shared.budget.as_ref()) {
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
            .field("retries", &self.state.retries())
            .finish_non_exhaustive()
    }
}
