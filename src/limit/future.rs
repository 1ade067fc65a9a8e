//! The concurrency limit's response future.

use std::fmt;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use super::limiter::{Outcome, Permit, Ticket, Turn};
use super::release::Release;
use crate::error::{BoxError, Error, ErrorKind};

pin_project! {
    /// Response future of [`ConcurrencyLimit`](super::ConcurrencyLimit).
    ///
    /// # Cancel safety
    ///
    /// Dropping it returns its permit, or gives up its place in the queue.
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<S, Req, M>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S, Req>,
        _release: std::marker::PhantomData<fn() -> M>,
    }
}

/// A request waiting in the queue: its place, the readied service and the request for
/// when its turn comes, and the end of its wait.
pub(crate) struct Waiting<S, Req> {
    ticket: Ticket,
    retry_after: Duration,
    service: Option<S>,
    request: Option<Req>,
    deadline: Option<Pin<Box<Sleep>>>,
}

pin_project! {
    #[project = StateProj]
    enum State<S, Req>
    where
        S: Service<Req>,
    {
        Rejected { retry_after: Duration },
        // Boxed: a waiting request's state would make every future (most never wait)
        // larger.
        Queued { waiting: Box<Waiting<S, Req>> },
        Running {
            #[pin]
            future: S::Future,
            permit: Option<Permit>,
        },
        Done,
    }
}

impl<S, Req, M> ResponseFuture<S, Req, M>
where
    S: Service<Req>,
{
    fn new(state: State<S, Req>) -> Self {
        ResponseFuture {
            state,
            _release: std::marker::PhantomData,
        }
    }

    pub(crate) fn running(future: S::Future, permit: Permit) -> Self {
        let permit = Some(permit);
        Self::new(State::Running { future, permit })
    }

    pub(crate) fn queued(ticket: Ticket, service: S, request: Req, retry_after: Duration) -> Self {
        let deadline = ticket
            .max_wait()
            .map(|wait| Box::pin(tokio::time::sleep(wait)));
        let state = State::Queued {
            waiting: Box::new(Waiting {
                ticket,
                retry_after,
                service: Some(service),
                request: Some(request),
                deadline,
            }),
        };
        Self::new(state)
    }

    pub(crate) fn rejected(retry_after: Duration) -> Self {
        Self::new(State::Rejected { retry_after })
    }
}

/// What a finished request tells the adaptive algorithm.
fn outcome_of<T>(result: &Result<T, Error>) -> Outcome {
    match result {
        Ok(_) => Outcome::Success,
        Err(e) if e.is(ErrorKind::TimedOut) || e.is(ErrorKind::Overloaded) => Outcome::Dropped,
        Err(_) => Outcome::Ignore,
    }
}

impl<S, Req, M> Future for ResponseFuture<S, Req, M>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    M: Release<S::Response>,
{
    type Output = Result<M::Output, Error>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        // An admitted request is the path nearly every request takes: kept small so it
        // inlines into the caller; the queue and the rejections run out of line.
        if let StateProj::Running { future, permit } = state.as_mut().project() {
            return Self::poll_running(future, permit, cx);
        }
        Self::poll_admission(state, cx)
    }
}

impl<S, Req, M> ResponseFuture<S, Req, M>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    M: Release<S::Response>,
{
    /// Polls an admitted request; its permit goes with the response (or back, if it failed).
    #[inline]
    fn poll_running(
        future: Pin<&mut S::Future>,
        permit: &mut Option<Permit>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<M::Output, Error>> {
        // The permit leaves as the request ends: none left means polled again.
        if permit.is_none() {
            panic!("limit::ResponseFuture polled after completion");
        }
        let polled = catch_unwind(AssertUnwindSafe(|| future.poll(cx)));
        let result = match polled {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(result)) => result.map_err(Error::inner),
            Err(payload) => Err(Error::panicked(&*payload)),
        };
        let Some(mut permit) = permit.take() else {
            unreachable!("checked above");
        };
        permit.record(outcome_of(&result));
        // The release mode decides when the permit goes.
        Poll::Ready(result.map(|response| M::attach(response, permit)))
    }

    /// Polls a request not admitted at `call`: rejected, or waiting in the queue until it is
    /// granted a permit (then run), shed or timed out.
    #[inline(never)]
    fn poll_admission(
        mut state: Pin<&mut State<S, Req>>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<M::Output, Error>> {
        let overloaded = |retry_after| Error::with_retry_after(ErrorKind::Overloaded, retry_after);
        let output = loop {
            match state.as_mut().project() {
                StateProj::Rejected { retry_after } => {
                    let retry_after = *retry_after;
                    state.set(State::Done);
                    break Err(overloaded(retry_after));
                }
                StateProj::Queued { waiting } => {
                    let Waiting {
                        ticket,
                        retry_after,
                        service,
                        request,
                        deadline,
                    } = &mut **waiting;
                    let permit = match ticket.poll_turn(cx.waker()) {
                        Turn::Granted(permit) => permit,
                        Turn::Shed => {
                            let retry_after = *retry_after;
                            state.set(State::Done);
                            break Err(overloaded(retry_after));
                        }
                        Turn::Waiting => match deadline.as_mut().map(|d| d.as_mut().poll(cx)) {
                            Some(Poll::Ready(())) => match ticket.time_out() {
                                Ok(permit) => permit,
                                Err(_) => {
                                    let retry_after = *retry_after;
                                    state.set(State::Done);
                                    break Err(overloaded(retry_after));
                                }
                            },
                            _ => return Poll::Pending,
                        },
                    };
                    let (Some(mut service), Some(request)) = (service.take(), request.take())
                    else {
                        unreachable!("a queued request leaves the queue once");
                    };
                    let future = service.call(request);
                    state.set(State::Running {
                        future,
                        permit: Some(permit),
                    });
                }
                StateProj::Running { future, permit } => {
                    return Self::poll_running(future, permit, cx);
                }
                StateProj::Done => panic!("limit::ResponseFuture polled after completion"),
            }
        };
        Poll::Ready(output)
    }
}

impl<S, Req, M> fmt::Debug for ResponseFuture<S, Req, M>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Rejected { .. } => "rejected",
            State::Queued { .. } => "queued",
            State::Running { .. } => "running",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
