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

use super::limiter::{Outcome, Permit, Rejection, Ticket, Turn};
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
        // The inner service's future, from the moment the request is admitted (at `call`
        // for nearly every request). Dropped before the permit: fields drop in order. Side
        // by side rather than an enum of states: an admitted request's future is then
        // written field by field where the caller keeps it (see `ConcurrencyLimit::call`).
        #[pin]
        future: Option<S::Future>,
        // Held while the request runs; it leaves with the response.
        permit: Option<Permit>,
        // Whether the request was admitted at `call`, and if not, why.
        admission: Admission<S, Req>,
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

/// Whether a request ran at `call`, and if not, why.
pub(crate) enum Admission<S, Req> {
    /// Admitted: the future and the permit are in place.
    Admitted,
    Rejected {
        retry_after: Duration,
    },
    // Boxed: a waiting request's state would make every future (most never wait) larger.
    Queued(Box<Waiting<S, Req>>),
    /// Rejected, shed or timed out in the queue, and said so.
    Done,
}

impl<S, Req> Admission<S, Req> {
    /// A request given a place in the queue (with the readied service moved out of
    /// `inner`, a fresh clone taking its place) or rejected.
    #[cold]
    #[inline(never)]
    fn of(
        queued: Result<Ticket, Rejection>,
        inner: &mut S,
        request: Req,
        retry_after: Duration,
    ) -> Self
    where
        S: Clone,
    {
        match queued {
            Ok(ticket) => {
                let fresh = inner.clone();
                let service = std::mem::replace(inner, fresh);
                let deadline = ticket
                    .max_wait()
                    .map(|wait| Box::pin(tokio::time::sleep(wait)));
                Admission::Queued(Box::new(Waiting {
                    ticket,
                    retry_after,
                    service: Some(service),
                    request: Some(request),
                    deadline,
                }))
            }
            Err(_) => Admission::Rejected { retry_after },
        }
    }
}

impl<S, Req, M> ResponseFuture<S, Req, M>
where
    S: Service<Req>,
{
    /// An admitted request: `inner` called now, with its permit.
    #[inline(always)]
    pub(crate) fn running(inner: &mut S, request: Req, permit: Permit) -> Self {
        ResponseFuture {
            future: Some(inner.call(request)),
            permit: Some(permit),
            admission: Admission::Admitted,
            _release: std::marker::PhantomData,
        }
    }

    /// A request queued (the readied service moved out of `inner`, a fresh clone taking
    /// its place) or rejected. Inlined, around the out-of-line [`Admission::of`]: the
    /// caller then writes both paths' futures in place. Made out of line as a whole, its
    /// future came back through memory and the admitted path's was copied too (the static
    /// limit's bench went from 9 to 19 ns).
    #[inline(always)]
    pub(crate) fn unadmitted(
        queued: Result<Ticket, Rejection>,
        inner: &mut S,
        request: Req,
        retry_after: Duration,
    ) -> Self
    where
        S: Clone,
    {
        ResponseFuture {
            future: None,
            permit: None,
            admission: Admission::of(queued, inner, request, retry_after),
            _release: std::marker::PhantomData,
        }
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
        let mut this = self.project();
        // An admitted request is the path nearly every request takes: kept small so it
        // inlines into the caller; the queue and the rejections run out of line.
        match this.future.as_mut().as_pin_mut() {
            Some(future) => Self::poll_running(future, this.permit, cx),
            None => Self::poll_admission(this.future, this.permit, this.admission, cx),
        }
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
        mut future: Pin<&mut Option<S::Future>>,
        permit: &mut Option<Permit>,
        admission: &mut Admission<S, Req>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<M::Output, Error>> {
        let overloaded = |retry_after| Error::with_retry_after(ErrorKind::Overloaded, retry_after);
        let turn = match admission {
            Admission::Rejected { retry_after } => Err(*retry_after),
            Admission::Queued(waiting) => {
                let Waiting {
                    ticket,
                    retry_after,
                    deadline,
                    ..
                } = &mut **waiting;
                match ticket.poll_turn(cx.waker()) {
                    Turn::Granted(permit) => Ok(permit),
                    Turn::Shed => Err(*retry_after),
                    Turn::Waiting => match deadline.as_mut().map(|d| d.as_mut().poll(cx)) {
                        Some(Poll::Ready(())) => ticket.time_out().map_err(|_| *retry_after),
                        _ => return Poll::Pending,
                    },
                }
            }
            Admission::Admitted | Admission::Done => {
                panic!("limit::ResponseFuture polled after completion")
            }
        };
        let granted = match turn {
            Ok(permit) => permit,
            Err(retry_after) => {
                // Gives the place in the queue up.
                *admission = Admission::Done;
                return Poll::Ready(Err(overloaded(retry_after)));
            }
        };
        let Admission::Queued(waiting) = std::mem::replace(admission, Admission::Admitted) else {
            unreachable!("only a queued request is granted a permit here");
        };
        let Waiting {
            service: Some(mut service),
            request: Some(request),
            ..
        } = *waiting
        else {
            unreachable!("a queued request leaves the queue once");
        };
        *permit = Some(granted);
        future.set(Some(service.call(request)));
        match future.as_pin_mut() {
            Some(future) => Self::poll_running(future, permit, cx),
            None => unreachable!("set just above"),
        }
    }
}

impl<S, Req, M> fmt::Debug for ResponseFuture<S, Req, M>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match (&self.admission, &self.permit) {
            (Admission::Rejected { .. }, _) => "rejected",
            (Admission::Queued(_), _) => "queued",
            (Admission::Admitted, Some(_)) => "running",
            (Admission::Admitted, None) | (Admission::Done, _) => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
