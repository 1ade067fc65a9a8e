//! The concurrency limit for HTTP: a permit held until the response body ends.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::limit::{ConcurrencyLimitLayer, Permit, Release};

impl<M> ConcurrencyLimitLayer<M> {
    /// For HTTP services: hold each permit until the response body has been streamed to
    /// its end (or dropped), not just until the response head is ready. Shares this
    /// layer's limiter.
    pub fn until_body_end(&self) -> ConcurrencyLimitLayer<OnBodyEnd> {
        self.releasing()
    }
}

/// Returns the permit when an HTTP response's body ends, errors or is dropped, so a
/// streaming response counts against the limit for as long as it streams.
#[derive(Debug, Clone, Copy, Default)]
pub struct OnBodyEnd;

impl<B: Body> Release<http::Response<B>> for OnBodyEnd {
    type Output = http::Response<PermitBody<B>>;

    fn attach(response: http::Response<B>, permit: Permit) -> Self::Output {
        response.map(|body| PermitBody {
            permit: (!body.is_end_stream()).then_some(permit),
            body,
        })
    }
}

pin_project! {
    /// A response body that holds a concurrency permit until it ends.
    pub struct PermitBody<B> {
        #[pin]
        body: B,
        permit: Option<Permit>,
    }
}

impl<B> PermitBody<B> {
    /// True while the body still holds its permit.
    pub fn holds_permit(&self) -> bool {
        self.permit.is_some()
    }
}

impl<B: fmt::Debug> fmt::Debug for PermitBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PermitBody")
            .field("body", &self.body)
            .field("holds_permit", &self.permit.is_some())
            .finish()
    }
}

impl<B: Body> Body for PermitBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let polled = this.body.as_mut().poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => true,
            Poll::Ready(Some(Ok(_))) => this.body.is_end_stream(),
            Poll::Pending => false,
        };
        if ended {
            this.permit.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
