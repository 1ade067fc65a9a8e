use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::error::{BoxError, Error, ErrorKind};

/// The response for `error`: status by kind, `Retry-After` (whole seconds, rounded up)
/// when the service is overloaded or out of budget, the `Cache-Status` a cache noted on the
/// error, and an empty body.
pub fn error_response<B: Default>(error: &Error, default_retry_after: Duration) -> Response<B> {
    let status = match error.kind() {
        ErrorKind::Overloaded | ErrorKind::BudgetExhausted | ErrorKind::Cancelled => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        ErrorKind::TimedOut => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::Panicked => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
        _ => StatusCode::BAD_GATEWAY,
    };
    let mut response = Response::new(B::default());
    *response.status_mut() = status;
    if let Some(value) = error
        .cache_status()
        .and_then(|v| HeaderValue::from_str(v).ok())
    {
        response
            .headers_mut()
            .insert(HeaderName::from_static("cache-status"), value);
    }
    if matches!(
        error.kind(),
        ErrorKind::Overloaded | ErrorKind::BudgetExhausted
    ) {
        let after = error.retry_after().unwrap_or(default_retry_after);
        let seconds = after
            .as_secs()
            .saturating_add(u64::from(after.subsec_nanos() > 0));
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

/// A [`Layer`] that maps the crate's errors to HTTP responses; see [the module](super).
#[derive(Debug, Clone)]
#[must_use]
pub struct ErrorResponseLayer {
    default_retry_after: Duration,
}

impl Default for ErrorResponseLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl ErrorResponseLayer {
    /// Maps errors to responses; `Retry-After` defaults to one second when the error does
    /// not suggest a wait.
    pub fn new() -> Self {
        ErrorResponseLayer {
            default_retry_after: Duration::from_secs(1),
        }
    }

    /// The `Retry-After` for errors that carry no wait of their own.
    pub fn default_retry_after(mut self, after: Duration) -> Self {
        self.default_retry_after = after;
        self
    }
}

impl<S> Layer<S> for ErrorResponseLayer {
    type Service = ErrorResponse<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ErrorResponse {
            inner,
            default_retry_after: self.default_retry_after,
            ready_error: None,
        }
    }
}

/// Maps the errors of `S` to HTTP responses. Made by [`ErrorResponseLayer`].
pub struct ErrorResponse<S> {
    inner: S,
    default_retry_after: Duration,
    /// An error `poll_ready` met: answered on the next call without calling `inner`.
    ready_error: Option<Error>,
}

impl<S> ErrorResponse<S> {
    /// `inner` with its errors mapped to responses (as `ErrorResponseLayer::new().layer(inner)`).
    pub fn new(inner: S) -> Self {
        ErrorResponseLayer::new().layer(inner)
    }

    /// The layer: [`ErrorResponseLayer::new`].
    pub fn layer() -> ErrorResponseLayer {
        ErrorResponseLayer::new()
    }
}

impl<S: Clone> Clone for ErrorResponse<S> {
    fn clone(&self) -> Self {
        ErrorResponse {
            inner: self.inner.clone(),
            default_retry_after: self.default_retry_after,
            ready_error: None,
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for ErrorResponse<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ErrorResponse")
            .field("inner", &self.inner)
            .field("default_retry_after", &self.default_retry_after)
            .finish()
    }
}

impl<S, Req, B> Service<Req> for ErrorResponse<S>
where
    S: Service<Req, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: Default,
{
    type Response = Response<B>;
    type Error = Infallible;
    type Future = ErrorResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.ready_error.is_some() {
            return Poll::Ready(Ok(()));
        }
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(error)) => {
                self.ready_error = Some(Error::inner(error));
                Poll::Ready(Ok(()))
            }
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let state = match self.ready_error.take() {
            Some(error) => State::Failed { error: Some(error) },
            None => State::Calling {
                future: self.inner.call(req),
            },
        };
        ErrorResponseFuture {
            state,
            default_retry_after: self.default_retry_after,
        }
    }
}

pin_project! {
    /// Response future of [`ErrorResponse`].
    #[must_use = "futures do nothing unless polled"]
    pub struct ErrorResponseFuture<F> {
        #[pin]
        state: State<F>,
        default_retry_after: Duration,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Calling { #[pin] future: F },
        Failed { error: Option<Error> },
    }
}

impl<F> fmt::Debug for ErrorResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ErrorResponseFuture")
            .finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ErrorResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: Default,
{
    type Output = Result<Response<B>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let error = match this.state.project() {
            StateProj::Calling { future } => match std::task::ready!(future.poll(cx)) {
                Ok(response) => return Poll::Ready(Ok(response)),
                Err(error) => Error::inner(error),
            },
            StateProj::Failed { error } => error
                .take()
                .expect("ErrorResponseFuture polled after completion"),
        };
        Poll::Ready(Ok(error_response(&error, *this.default_retry_after)))
    }
}
