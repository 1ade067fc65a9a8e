//! The hedge layer's response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use super::layer::Shared;
use crate::error::{BoxError, Error};
use crate::retry::{Policy, Verdict};
use crate::timeout::deadline::{carry, Scoped};
use crate::timeout::{Carrier, Deadline, TimeoutContext};

pin_project! {
    /// One attempt, in its own cancellation scope: dropping it unfinished cancels its token.
    struct Attempt<F> {
        #[pin]
        future: Scoped<F>,
        started: Deadline,
    }
}

impl<F: Future> Attempt<F> {
    fn new(ctx: TimeoutContext, future: F, started: Deadline) -> Self {
        Attempt {
            future: Scoped::new(ctx, future),
            started,
        }
    }
}

/// When the next hedge goes out.
enum Timer {
    /// No more hedges.
    Off,
    /// The delay runs from this instant; the timer is made the first time the attempts
    /// are pending, so an answer ready at once never touches it.
    From(Deadline),
    Set(Pin<Box<Sleep>>),
}

impl<F, T, E> Future for Attempt<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = (Result<T, Error>, Deadline);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.future.poll(cx)).map_err(Error::inner);
        Poll::Ready((result, *this.started))
    }
}

type Hedged<S, Req> = Pin<Box<Attempt<HedgeCall<S, Req>>>>;

pin_project! {
    /// A hedge: its own clone of the service driven to readiness, then called marked as a
    /// hedge ([`crate::hedged`]), so a concurrency limit under it does not queue it.
    #[project = HedgeCallProj]
    enum HedgeCall<S, Req>
    where
        S: Service<Req>,
    {
        NotReady { service: S, request: Option<Req> },
        Called { #[pin] future: S::Future },
    }
}

impl<S: Service<Req>, Req> HedgeCall<S, Req> {
    fn new(service: S, request: Req) -> Self {
        HedgeCall::NotReady {
            service,
            request: Some(request),
        }
    }
}

impl<S: Service<Req>, Req> Future for HedgeCall<S, Req> {
    type Output = Result<S::Response, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project() {
                HedgeCallProj::NotReady { service, request } => {
                    std::task::ready!(service.poll_ready(cx))?;
                    let Some(request) = request.take() else {
                        unreachable!("the request is taken only by the call that ends this state");
                    };
                    let future = crate::hedged::sending_hedge(|| service.call(request));
                    self.set(HedgeCall::Called { future });
                }
                HedgeCallProj::Called { future } => return future.poll(cx),
            }
        }
    }
}

pin_project! {
    /// Response future of [`Hedge`](super::Hedge).
    ///
    /// # Cancel safety
    ///
    /// Dropping it drops every attempt under way and cancels their tokens.
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<S, Req, P, C>
    where
        S: Service<Req>,
    {
        #[pin]
        first: Option<Attempt<S::Future>>,
        hedges: Vec<Hedged<S, Req>>,
        timer: Timer,
        service: S,
        policy: P,
        carrier: C,
        template: Option<Req>,
        sent: u32,
        shared: Arc<Shared>,
    }
}

impl<S, Req, P, C> ResponseFuture<S, Req, P, C>
where
    S: Service<Req> + Clone,
    C: Carrier<Req>,
{
    pub(crate) fn start(
        inner: &mut S,
        mut req: Req,
        template: Option<Req>,
        policy: P,
        carrier: C,
        shared: Arc<Shared>,
    ) -> Self {
        let started = Deadline::now();
        let existing = carrier.existing(&req);
        let mut ctx = TimeoutContext::attempt_under(existing.as_ref(), started);
        carry(&carrier, &mut req, &mut ctx);
        let future = ctx.enter(|| inner.call(req));
        shared.metrics.get().attempts.increment(1);
        let timer = match template {
            Some(_) => Timer::From(started),
            None => Timer::Off,
        };
        ResponseFuture {
            first: Some(Attempt::new(ctx, future, started)),
            hedges: Vec::new(),
            timer,
            service: inner.clone(),
            policy,
            carrier,
            template,
            sent: 1,
            shared,
        }
    }
}

impl<S, Req, P, C> Future for ResponseFuture<S, Req, P, C>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    P: Policy<Req, S::Response>,
    C: Carrier<Req>,
{
    type Output = Result<S::Response, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            // The first success wins. An error, or a response the policy would retry,
            // wins only when nothing else is running.
            if let Some(first) = this.first.as_mut().as_pin_mut() {
                if let Poll::Ready((outcome, started)) = first.poll(cx) {
                    this.first.set(None);
                    let last = this.hedges.is_empty();
                    if let Some(outcome) =
                        settle(this.policy, this.shared, outcome, started, false, last)
                    {
                        this.hedges.clear();
                        return Poll::Ready(outcome);
                    }
                }
            }
            let mut i = 0;
            while i < this.hedges.len() {
                let Poll::Ready((outcome, started)) = this.hedges[i].as_mut().poll(cx) else {
                    i += 1;
                    continue;
                };
                this.hedges.swap_remove(i);
                let last = this.first.is_none() && this.hedges.is_empty();
                if let Some(outcome) =
                    settle(this.policy, this.shared, outcome, started, true, last)
                {
                    this.hedges.clear();
                    this.first.set(None);
                    return Poll::Ready(outcome);
                }
            }
            if let Timer::From(since) = *this.timer {
                let delay = this.shared.delay();
                let at = since.later(delay).instant();
                *this.timer = Timer::Set(Box::pin(tokio::time::sleep_until(at)));
            }
            let Timer::Set(timer) = this.timer else {
                return Poll::Pending;
            };
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // Time to hedge, if the budget, the deadline and the request allow.
            let shared = &**this.shared;
            let request = may_hedge(shared).then(|| {
                let last = *this.sent + 1 >= shared.max_attempts;
                let copy = this.template.as_ref().and_then(|r| this.policy.replay(r));
                if last {
                    copy.or_else(|| this.template.take())
                } else {
                    copy
                }
            });
            let Some(mut request) = request.flatten() else {
                *this.timer = Timer::Off;
                continue;
            };
            *this.sent += 1;
            shared.hedged();
            shared.metrics.get().attempts.increment(1);
            shared.metrics.get().hedges.increment(1);
            tracing::debug!(attempt = *this.sent, "hedge: sent another attempt");
            // Its own scope, in the task-local and (with a carrier) in the request.
            let now = Deadline::now();
            let mut ctx = TimeoutContext::attempt_under(None, now);
            carry(this.carrier, &mut request, &mut ctx);
            let call = HedgeCall::new(this.service.clone(), request);
            this.hedges.push(Box::pin(Attempt::new(ctx, call, now)));
            *this.timer = if *this.sent < shared.max_attempts {
                Timer::From(now)
            } else {
                Timer::Off
            };
        }
    }
}

/// What to do with a finished attempt's outcome: `Some` to answer with it now (a success
/// the policy accepts, or the last attempt running), `None` to wait for the others.
/// Only accepted successes feed the latency window and the budget.
fn settle<Req, Res, P: Policy<Req, Res>>(
    policy: &P,
    shared: &Shared,
    outcome: Result<Res, Error>,
    started: Deadline,
    hedged: bool,
    last: bool,
) -> Option<Result<Res, Error>> {
    let accepted = outcome.is_ok() && policy.classify(&outcome) == Verdict::Done;
    if accepted {
        won(shared, started, hedged);
        return Some(outcome);
    }
    last.then_some(outcome)
}

/// Budget and deadline checks before a hedge.
fn may_hedge(shared: &Shared) -> bool {
    if let Some(deadline) = Deadline::current() {
        if !deadline.allows(shared.expected()) {
            return false;
        }
    }
    if let Some(budget) = &shared.budget {
        if !budget.withdraw() {
            shared.metrics.get().budget_exhausted.increment(1);
            tracing::debug!("hedge: budget exhausted");
            return false;
        }
    }
    true
}

fn won(shared: &Shared, started: Deadline, hedged: bool) {
    shared.record(Deadline::now().since(started));
    if hedged {
        shared.metrics.get().wins.increment(1);
        tracing::debug!("hedge: a hedged attempt won");
    }
    if shared.deposit {
        if let Some(budget) = &shared.budget {
            budget.deposit();
        }
    }
}

impl<S, Req, P, C> fmt::Debug for ResponseFuture<S, Req, P, C>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("sent", &self.sent)
            .field("hedges_running", &self.hedges.len())
            .finish_non_exhaustive()
    }
}
