//! Replaying HTTP requests: idempotency, bodies buffered up to a bound, and the retry
//! classification of responses.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::RETRY_AFTER;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::{Body, Frame};

use super::body::{poll_read_ahead, BufferedBody};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::error::{BoxError, Error, ErrorKind};
use crate::retry::{is_transient, Policy, Verdict};

/// The header that lets a client mark a non-idempotent request as safe to repeat.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// True for methods that are idempotent (RFC 9110 section 9.2.2), or for any request
/// carrying an `Idempotency-Key` header.
pub fn is_replayable_request(method: &Method, headers: &HeaderMap) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    ) || headers.contains_key(IDEMPOTENCY_KEY)
}

/// The wait a `Retry-After` header asks for: delay-seconds or an HTTP-date (RFC 9110
/// section 10.2.3). A date in the past means no wait; an unreadable value means none.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    // A wall-clock date can only be compared with the wall clock.
    Some(
        date.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// The HTTP retry and hedge policy.
///
/// - **Replay**: idempotent methods (or an `Idempotency-Key`) with a complete body.
/// - **Retry**: errors of the inner service (connection failures) and timeouts, and the
///   responses 408, 429, 500, 502, 503 and 504 (not 501: not implemented will not change),
///   honouring their `Retry-After`.
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpPolicy;

/// True for the statuses worth another attempt.
pub fn is_retryable_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 429 | 500 | 502 | 503 | 504)
}

impl<B, RB> Policy<Request<BufferedBody<B>>, Response<RB>> for HttpPolicy {
    fn replay(&self, req: &Request<BufferedBody<B>>) -> Option<Request<BufferedBody<B>>> {
        if !is_replayable_request(req.method(), req.headers()) {
            return None;
        }
        let body = req.body().try_clone()?;
        let mut copy = Request::new(body);
        *copy.method_mut() = req.method().clone();
        *copy.uri_mut() = req.uri().clone();
        *copy.version_mut() = req.version();
        *copy.headers_mut() = req.headers().clone();
        *copy.extensions_mut() = req.extensions().clone();
        Some(copy)
    }

    fn classify(&self, outcome: &Result<Response<RB>, Error>) -> Verdict {
        match outcome {
            Ok(response) if is_retryable_status(response.status()) => Verdict::Retry {
                after: retry_after(response.headers()),
            },
            Ok(_) => Verdict::Done,
            Err(error) if is_transient(error) => Verdict::Retry { after: None },
            Err(_) => Verdict::Done,
        }
    }
}

/// A [`Layer`] that reads request bodies ahead, up to `max_bytes`, so that retry and hedge
/// can replay them. Only requests that may be replayed at all (idempotent, or with an
/// `Idempotency-Key`) are read ahead; a body over the bound is passed on whole, and its
/// request is sent once.
#[derive(Debug, Clone, Copy)]
#[must_use]
pub struct BufferBodyLayer {
    max_bytes: usize,
}

impl BufferBodyLayer {
    /// Reads ahead up to `max_bytes` per request.
    pub fn new(max_bytes: usize) -> Self {
        BufferBodyLayer { max_bytes }
    }
}

impl<S> Layer<S> for BufferBodyLayer {
    type Service = BufferBody<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BufferBody {
            inner,
            max_bytes: self.max_bytes,
        }
    }
}

/// Reads request bodies ahead for `S`. Made by [`BufferBodyLayer`].
#[derive(Debug, Clone)]
pub struct BufferBody<S> {
    inner: S,
    max_bytes: usize,
}

impl<S> BufferBody<S> {
    /// `inner` with request bodies read ahead up to `max_bytes` (as
    /// `BufferBodyLayer::new(max_bytes).layer(inner)`).
    pub fn new(inner: S, max_bytes: usize) -> Self {
        BufferBodyLayer::new(max_bytes).layer(inner)
    }

    /// The layer: [`BufferBodyLayer::new`].
    pub fn layer(max_bytes: usize) -> BufferBodyLayer {
        BufferBodyLayer::new(max_bytes)
    }
}

impl<S, B> Service<Request<B>> for BufferBody<S>
where
    S: Service<Request<BufferedBody<B>>> + Clone,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = Error;
    type Future = BufferBodyFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Error::inner)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (parts, body) = req.into_parts();
        let worth_reading = is_replayable_request(&parts.method, &parts.headers)
            && body
                .size_hint()
                .upper()
                .is_none_or(|upper| upper <= self.max_bytes as u64)
            && body.size_hint().lower() <= self.max_bytes as u64;
        if !worth_reading {
            let body = BufferedBody::streaming(VecDeque::new(), Some(body));
            let future = self.inner.call(Request::from_parts(parts, body));
            return BufferBodyFuture {
                state: BufferState::Calling { future },
            };
        }
        // Keep the readied service for after the body is read; a clone takes its place.
        let fresh = self.inner.clone();
        let service = std::mem::replace(&mut self.inner, fresh);
        BufferBodyFuture {
            state: BufferState::Reading {
                service: Some(service),
                parts: Some(parts),
                body: Some(body),
                frames: VecDeque::new(),
                data: BytesMut::new(),
                max_bytes: self.max_bytes,
            },
        }
    }
}

pin_project! {
    /// Response future of [`BufferBody`].
    #[must_use = "futures do nothing unless polled"]
    pub struct BufferBodyFuture<S, B>
    where
        S: Service<Request<BufferedBody<B>>>,
    {
        #[pin]
        state: BufferState<S, B>,
    }
}

pin_project! {
    #[project = BufferProj]
    enum BufferState<S, B>
    where
        S: Service<Request<BufferedBody<B>>>,
    {
        Reading {
            service: Option<S>,
            parts: Option<http::request::Parts>,
            body: Option<B>,
            frames: VecDeque<Frame<Bytes>>,
            data: BytesMut,
            max_bytes: usize,
        },
        Calling { #[pin] future: S::Future },
    }
}

impl<S, B> fmt::Debug for BufferBodyFuture<S, B>
where
    S: Service<Request<BufferedBody<B>>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferBodyFuture").finish_non_exhaustive()
    }
}

impl<S, B> Future for BufferBodyFuture<S, B>
where
    S: Service<Request<BufferedBody<B>>>,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Output = Result<S::Response, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                BufferProj::Calling { future } => {
                    return future.poll(cx).map_err(Error::inner);
                }
                BufferProj::Reading {
                    service,
                    parts,
                    body,
                    frames,
                    data,
                    max_bytes,
                } => {
                    let Some(reading) = body.as_mut() else {
                        unreachable!("the body is read until the request is called");
                    };
                    let complete = match ready!(poll_read_ahead(
                        Pin::new(&mut *reading),
                        frames,
                        data,
                        *max_bytes,
                        cx
                    )) {
                        Ok(complete) => complete,
                        // The client's body failed: its fault, not the upstream's.
                        Err(error) => {
                            return Poll::Ready(Err(Error::with_source(
                                ErrorKind::BadRequest,
                                error,
                            )))
                        }
                    };
                    let replay = if complete {
                        BufferedBody::complete(std::mem::take(data).freeze())
                    } else {
                        BufferedBody::streaming(std::mem::take(frames), body.take())
                    };
                    let (Some(mut service), Some(parts)) = (service.take(), parts.take()) else {
                        unreachable!("the request is called once");
                    };
                    let future = service.call(Request::from_parts(parts, replay));
                    state.set(BufferState::Calling { future });
                }
            }
        }
    }
}
