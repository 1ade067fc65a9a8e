//! A response body passed to its client while the cache still reads it.
//!
//! The cache reads a response it may store up to its bound before it keeps it. When the
//! origin's body stalls before then (a slow origin, a stream that sends now and then),
//! the client that asked for it should not wait for the whole of it: the reader of the
//! origin's body publishes the head and each frame to a [`Tee`], and the client's
//! [`TeeBody`] hands them on as they come, then the rest of the origin's body when it
//! outgrows the bound. The work that reads the origin's body (a flight, with its other
//! waiters and its store) runs in a task of its own, so a client that reads slowly never
//! holds it back; the client's body ends once that work has finished.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll, Waker};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body::{Body, Frame};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::error::{BoxError, Error, ErrorKind};

/// The status and headers of a response whose body follows as it arrives.
pub(crate) struct Head {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
}

/// What the reader of the origin's body and the client's body share.
pub(crate) struct Tee<B> {
    state: Mutex<State<B>>,
}

struct State<B> {
    /// Published and not yet taken by the client's side.
    head: Option<Head>,
    frames: VecDeque<Frame<Bytes>>,
    end: End<B>,
    /// The client's side, waiting for the head or a frame.
    waker: Option<Waker>,
}

enum End<B> {
    /// More frames may come.
    Open,
    /// Every frame was published.
    Complete,
    /// The body outgrew the bound: the rest of it is the client's to read.
    Rest(B),
    Failed(Error),
    /// The end was handed to the client's side.
    Taken,
}

impl<B> Tee<B> {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Tee {
            state: Mutex::new(State {
                head: None,
                frames: VecDeque::new(),
                end: End::Open,
                waker: None,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State<B>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the state and wakes the client's side.
    fn update(&self, change: impl FnOnce(&mut State<B>)) {
        let waker = {
            let mut state = self.lock();
            change(&mut state);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Publishes the head and the frames read so far (taken out of `frames`).
    pub(crate) fn publish(&self, head: Head, frames: &mut VecDeque<Frame<Bytes>>) {
        self.update(|state| {
            state.head = Some(head);
            state.frames.append(frames);
        });
    }

    /// Passes on the frames read since (taken out of `frames`).
    pub(crate) fn push(&self, frames: &mut VecDeque<Frame<Bytes>>) {
        if !frames.is_empty() {
            self.update(|state| state.frames.append(frames));
        }
    }

    /// The body ended: every frame was pushed.
    pub(crate) fn complete(&self) {
        self.end(End::Complete);
    }

    /// The body outgrew the bound: `rest` is what is left of it, for the client to read.
    pub(crate) fn rest(&self, rest: B) {
        self.end(End::Rest(rest));
    }

    /// The body failed, or its reader went away before it ended.
    pub(crate) fn fail(&self, error: Error) {
        self.end(End::Failed(error));
    }

    fn end(&self, end: End<B>) {
        self.update(|state| {
            if matches!(state.end, End::Open) {
                state.end = end;
            }
        });
    }

    /// The head, once it is published (taken once); until then the task of `cx` is woken
    /// when it is.
    pub(crate) fn poll_head(&self, cx: &Context<'_>) -> Option<Head> {
        let mut state = self.lock();
        let head = state.head.take();
        if head.is_none() {
            state.waker = Some(cx.waker().clone());
        }
        head
    }
}

/// The writer's end of a [`Tee`]: when it is dropped before the body ended (the flight
/// was cancelled, or it panicked), the client's body ends with an error rather than
/// waiting for frames that will not come.
pub(crate) struct TeeWriter<B>(pub(crate) Arc<Tee<B>>);

impl<B> Drop for TeeWriter<B> {
    fn drop(&mut self) {
        self.0.fail(Error::with_source(
            ErrorKind::Cancelled,
            "the origin's body was abandoned before it ended",
        ));
    }
}

/// The client's body: the frames published to its [`Tee`], then (when the body outgrew
/// the bound) the rest of the origin's body; it ends when `driver`, the work reading the
/// origin's body, has finished. Dropping it aborts that work, as a client leaving a flight
/// would (the flight goes on for its other waiters).
pub(crate) struct TeeBody<B> {
    tee: Arc<Tee<B>>,
    rest: Option<B>,
    driver: Option<JoinHandle<()>>,
    /// The length the response declared (`Content-Length`), and the bytes handed on.
    declared: Option<u64>,
    delivered: u64,
}

impl<B> TeeBody<B> {
    /// Runs `driver` (the work reading the origin's body into `tee`) in a task of its
    /// own, in the current span (the request's: what the origin's body logs while it is
    /// read stays with the request), and reads what it publishes. `declared` is the
    /// response's `Content-Length`, if it has one.
    pub(crate) fn new(
        tee: Arc<Tee<B>>,
        driver: impl Future<Output = ()> + Send + 'static,
        declared: Option<u64>,
    ) -> Self {
        TeeBody {
            tee,
            rest: None,
            driver: Some(tokio::spawn(driver.in_current_span())),
            declared,
            delivered: 0,
        }
    }

    fn delivered(&mut self, frame: &Frame<Bytes>) {
        if let Some(data) = frame.data_ref() {
            self.delivered = self.delivered.saturating_add(data.len() as u64);
        }
    }

    /// Ready once the driver has finished (whatever its outcome).
    fn poll_driver(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(driver) = &mut self.driver {
            let _ = ready!(Pin::new(driver).poll(cx));
            self.driver = None;
        }
        Poll::Ready(())
    }
}

impl<B> Drop for TeeBody<B> {
    fn drop(&mut self) {
        let Some(driver) = &self.driver else {
            return;
        };
        // Left before the end: the origin request is cancelled unless others wait for it.
        // Not so once the client has every byte the response declared (a server drops
        // such a body without asking for its end) or the origin's body has been read
        // whole: what is left is storing it, in both tiers, which nobody asked to undo.
        let whole = self.declared.is_some_and(|len| self.delivered >= len);
        if !whole && matches!(self.tee.lock().end, End::Open) {
            driver.abort();
        }
    }
}

impl<B> Body for TeeBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if let Some(rest) = &mut this.rest {
                match ready!(Pin::new(rest).poll_frame(cx)) {
                    Some(frame) => {
                        if let Ok(frame) = &frame {
                            this.delivered(frame);
                        }
                        return Poll::Ready(Some(frame.map_err(Into::into)));
                    }
                    None => this.rest = None,
                }
                ready!(this.poll_driver(cx));
                return Poll::Ready(None);
            }
            let mut state = this.tee.lock();
            if let Some(frame) = state.frames.pop_front() {
                drop(state);
                this.delivered(&frame);
                return Poll::Ready(Some(Ok(frame)));
            }
            match std::mem::replace(&mut state.end, End::Taken) {
                End::Open => {
                    state.end = End::Open;
                    state.waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                End::Rest(rest) => this.rest = Some(rest),
                End::Failed(error) => return Poll::Ready(Some(Err(Box::new(error)))),
                End::Complete | End::Taken => {
                    drop(state);
                    ready!(this.poll_driver(cx));
                    return Poll::Ready(None);
                }
            }
        }
    }
}

impl<B> std::fmt::Debug for TeeBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TeeBody")
            .field("rest", &self.rest.is_some())
            .finish_non_exhaustive()
    }
}
