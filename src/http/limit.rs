//! The concurrency limit for HTTP: a permit held until the response body ends.

use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::sync::oneshot;

use crate::limit::{ConcurrencyLimitLayer, Permit, Release};

impl<M> ConcurrencyLimitLayer<M> {
    /// For `http::Response`s: the permit goes back with the response, and a 503 or a 429
    /// from the inner service counts as a drop for an adaptive limit (as a timeout does),
    /// so a backend that sheds load brings the limit down instead of letting it grow.
    /// Shares this layer's limiter.
    pub fn http_responses(&self) -> ConcurrencyLimitLayer<OnHttpResponse> {
        self.releasing()
    }

    /// For HTTP services: hold each permit until the response body has been streamed to
    /// its end (or dropped), not just until the response head is ready, and at most the
    /// builder's [`max_body_hold`](crate::limit::ConcurrencyLimitBuilder::max_body_hold)
    /// (60 s unless set): a client that reads slowly, or not at all, gives its slot back
    /// then, and its body streams on. A 503 or a 429 counts as a drop, as with
    /// [`http_responses`](Self::http_responses). Shares this layer's limiter.
    pub fn until_body_end(&self) -> ConcurrencyLimitLayer<OnBodyEnd> {
        self.releasing()
    }
}

/// Returns the permit when an HTTP response's body ends, errors or is dropped, so a
/// streaming response counts against the limit for as long as it streams, up to the
/// limit's `max_body_hold`.
#[derive(Debug, Clone, Copy, Default)]
pub struct OnBodyEnd;

impl<B: Body> Release<http::Response<B>> for OnBodyEnd {
    type Output = http::Response<PermitBody<B>>;

    fn attach(response: http::Response<B>, mut permit: Permit) -> Self::Output {
        classify(&response, &mut permit);
        response.map(|body| PermitBody {
            held: (!body.is_end_stream()).then(|| Held::new(permit)),
            body,
        })
    }
}

/// A body's permit, shared with a timer that takes it back after `max_body_hold`: the
/// body may never be polled again (a client that stopped reading), so only a task of its
/// own can return it on time.
/// Returns the permit with the response, like [`OnResponse`](crate::limit::OnResponse),
/// and tells an adaptive algorithm that a response of 503 (Service Unavailable) or 429 (Too
/// Many Requests) is a drop, as a timeout is: the backend said it is overloaded. Made by
/// [`ConcurrencyLimitLayer::http_responses`]; the HTTP stack uses it.
#[derive(Debug, Clone, Copy, Default)]
pub struct OnHttpResponse;

impl<B> Release<http::Response<B>> for OnHttpResponse {
    type Output = http::Response<B>;

    fn attach(response: http::Response<B>, mut permit: Permit) -> Self::Output {
        classify(&response, &mut permit);
        drop(permit);
        response
    }
}

/// A 503 or a 429 counts as a drop for the adaptive algorithm.
fn classify<B>(response: &http::Response<B>, permit: &mut Permit) {
    let status = response.status();
    if status == http::StatusCode::SERVICE_UNAVAILABLE
        || status == http::StatusCode::TOO_MANY_REQUESTS
    {
        permit.record_overloaded();
    }
}

struct Held {
    permit: Arc<Mutex<Option<Permit>>>,
    /// Dropped when the body ends: the timer stops early.
    _stop: Option<oneshot::Sender<()>>,
}

impl Held {
    fn new(permit: Permit) -> Self {
        let hold = permit.max_body_hold();
        let permit = Arc::new(Mutex::new(Some(permit)));
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to time it: held until the body ends.
            return Held {
                permit,
                _stop: None,
            };
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let timed = permit.clone();
        runtime.spawn(async move {
            if tokio::time::timeout(hold, stopped).await.is_err() {
                take(&timed);
            }
        });
        Held {
            permit,
            _stop: Some(stop),
        }
    }

    fn holds(&self) -> bool {
        lock(&self.permit).is_some()
    }
}

fn lock(permit: &Mutex<Option<Permit>>) -> std::sync::MutexGuard<'_, Option<Permit>> {
    permit
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Takes the permit out and returns it to the limiter, outside the lock.
fn take(permit: &Mutex<Option<Permit>>) {
    let taken = lock(permit).take();
    drop(taken);
}

pin_project! {
    /// A response body that holds a concurrency permit until it ends (or the limit's
    /// `max_body_hold` passes).
    pub struct PermitBody<B> {
        #[pin]
        body: B,
        held: Option<Held>,
    }

    impl<B> PinnedDrop for PermitBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(held) = this.project().held.take() {
                take(&held.permit);
            }
        }
    }
}

/// An empty body holding no permit (what an error response built around the limit has).
impl<B: Default> Default for PermitBody<B> {
    fn default() -> Self {
        PermitBody {
            body: B::default(),
            held: None,
        }
    }
}

impl<B> PermitBody<B> {
    /// `body` holding no permit: the same type as a limited service's bodies, for a
    /// service whose limit is optional.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use towerguard::http::PermitBody;
    ///
    /// let body = PermitBody::without_permit(Full::new(Bytes::from_static(b"hello")));
    /// assert!(!body.holds_permit());
    /// ```
    pub fn without_permit(body: B) -> Self {
        PermitBody { body, held: None }
    }

    /// True while the body still holds its permit.
    pub fn holds_permit(&self) -> bool {
        self.held.as_ref().is_some_and(Held::holds)
    }
}

impl<B: fmt::Debug> fmt::Debug for PermitBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PermitBody")
            .field("body", &self.body)
            .field("holds_permit", &self.holds_permit())
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
            if let Some(held) = this.held.take() {
                take(&held.permit);
            }
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
