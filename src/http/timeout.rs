//! Timeout contexts in `http::Request` extensions.

use http::Request;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::timeout::deadline::{far_future, LazyToken};
use crate::timeout::{Carrier, Deadline, TimeoutContext, TimeoutLayer};

/// Also carries the context in `http::Request` extensions: a [`Deadline`], a
/// [`CancellationToken`] and the [`TimeoutContext`], so handlers can extract them.
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpExtensions;

impl<B> Carrier<Request<B>> for HttpExtensions {
    fn existing(&self, req: &Request<B>) -> Option<TimeoutContext> {
        let extensions = req.extensions();
        if let Some(ctx) = extensions.get::<TimeoutContext>() {
            return Some(ctx.clone());
        }
        // A token (and maybe a deadline) left by something other than a timeout.
        let token = extensions.get::<CancellationToken>()?.clone();
        let deadline = extensions
            .get::<Deadline>()
            .copied()
            .unwrap_or_else(|| Deadline::at(far_future(Instant::now())));
        Some(TimeoutContext::new(deadline, LazyToken::adopt(token)))
    }

    fn insert(&self, req: &mut Request<B>, ctx: &TimeoutContext) {
        let extensions = req.extensions_mut();
        extensions.insert(ctx.deadline());
        extensions.insert(ctx.token());
        extensions.insert(ctx.clone());
    }
}

impl<C, T> TimeoutLayer<C, T> {
    /// For `http::Request`s: also put the [`Deadline`], the [`CancellationToken`] and the
    /// [`TimeoutContext`] in the request's extensions, and honour one an earlier hop left
    /// there.
    pub fn http_extensions(self) -> TimeoutLayer<HttpExtensions, T> {
        self.carrier(HttpExtensions)
    }
}
