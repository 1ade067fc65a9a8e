//! The deadline and cancellation token a timeout hands down to the work it bounds.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

tokio::task_local! {
    static CURRENT: TimeoutContext;
}

/// When the innermost enclosing timeout expires: the earliest of the nested deadlines.
///
/// Layers and inner code read it to avoid starting work that cannot finish in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline(Instant);

impl Deadline {
    /// A deadline at `instant`.
    pub fn at(instant: Instant) -> Self {
        Deadline(instant)
    }

    /// A deadline `timeout` from now (saturating far in the future).
    pub fn after(timeout: Duration) -> Self {
        let now = Instant::now();
        Deadline(now.checked_add(timeout).unwrap_or_else(|| far_future(now)))
    }

    /// The deadline's instant.
    pub fn instant(&self) -> Instant {
        self.0
    }

    /// Time left, zero once passed.
    pub fn remaining(&self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    /// True once the deadline has passed.
    pub fn is_expired(&self) -> bool {
        Instant::now() >= self.0
    }

    /// True if work taking `duration`, started now, would finish by the deadline.
    pub fn allows(&self, duration: Duration) -> bool {
        Instant::now()
            .checked_add(duration)
            .is_some_and(|end| end <= self.0)
    }

    /// The deadline of the timeout whose work is running on this task, if any.
    pub fn current() -> Option<Deadline> {
        CURRENT.try_with(|ctx| ctx.deadline).ok()
    }
}

pub(crate) fn far_future(now: Instant) -> Instant {
    // About thirty years: far enough to mean never, near enough not to overflow.
    now.checked_add(Duration::from_secs(86_400 * 365 * 30))
        .unwrap_or(now)
}

/// A cancellation token made only when somebody asks for it.
///
/// Most requests finish in time without anyone listening for cancellation; they pay for
/// no token. Cancelling before the token exists is remembered, and the token is then born
/// cancelled.
#[derive(Debug)]
pub(crate) struct LazyToken {
    parent: Option<Arc<LazyToken>>,
    state: Mutex<TokenState>,
}

#[derive(Debug, Default)]
struct TokenState {
    token: Option<CancellationToken>,
    cancelled: bool,
}

impl LazyToken {
    pub(crate) fn root() -> Arc<Self> {
        Arc::new(LazyToken {
            parent: None,
            state: Mutex::default(),
        })
    }

    pub(crate) fn child_of(parent: &Arc<LazyToken>) -> Arc<Self> {
        Arc::new(LazyToken {
            parent: Some(parent.clone()),
            state: Mutex::default(),
        })
    }

    /// A token made by an earlier hop, adopted as this scope's parent.
    #[cfg(feature = "http")]
    pub(crate) fn adopt(token: CancellationToken) -> Arc<Self> {
        Arc::new(LazyToken {
            parent: None,
            state: Mutex::new(TokenState {
                token: Some(token),
                cancelled: false,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TokenState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn get(&self) -> CancellationToken {
        let mut state = self.lock();
        if let Some(token) = &state.token {
            return token.clone();
        }
        let token = match &self.parent {
            Some(parent) => parent.get().child_token(),
            None => CancellationToken::new(),
        };
        if state.cancelled {
            token.cancel();
        }
        state.token = Some(token.clone());
        token
    }

    pub(crate) fn cancel(&self) {
        let mut state = self.lock();
        state.cancelled = true;
        if let Some(token) = &state.token {
            token.cancel();
        }
    }
}

/// Cancels its token when dropped, unless disarmed by taking the token out.
#[derive(Debug)]
pub(crate) struct CancelOnDrop(pub(crate) Option<Arc<LazyToken>>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(token) = self.0.take() {
            token.cancel();
        }
    }
}

/// What a timeout hands to the work it bounds: the deadline and a cancellation token.
///
/// The token is cancelled when the timeout expires and when the caller drops the response
/// future before it completes; it is a child of the enclosing timeout's token, so
/// cancelling an outer scope cancels the inner ones too. It is created on first use.
#[derive(Debug, Clone)]
pub struct TimeoutContext {
    deadline: Deadline,
    token: Arc<LazyToken>,
}

impl TimeoutContext {
    pub(crate) fn new(deadline: Deadline, token: Arc<LazyToken>) -> Self {
        TimeoutContext { deadline, token }
    }

    /// The effective deadline (the earliest of the nested timeouts').
    pub fn deadline(&self) -> Deadline {
        self.deadline
    }

    /// The cancellation token of this scope.
    pub fn token(&self) -> CancellationToken {
        self.token.get()
    }

    pub(crate) fn lazy_token(&self) -> &Arc<LazyToken> {
        &self.token
    }

    /// A scope for one attempt under `parent` (or a root scope): a child token, the same
    /// deadline.
    #[cfg(feature = "hedge")]
    pub(crate) fn attempt_under(parent: Option<TimeoutContext>) -> TimeoutContext {
        match parent {
            Some(outer) => TimeoutContext::new(outer.deadline, LazyToken::child_of(&outer.token)),
            None => {
                TimeoutContext::new(Deadline::at(far_future(Instant::now())), LazyToken::root())
            }
        }
    }

    /// The context of the timeout whose work is running on this task, if any.
    ///
    /// Available while the inner service's `call` runs and while its response future is
    /// polled; a task spawned from there does not inherit it (pass the token along).
    pub fn current() -> Option<TimeoutContext> {
        CURRENT.try_with(Clone::clone).ok()
    }

    pub(crate) fn sync_scope<R>(self, f: impl FnOnce() -> R) -> R {
        CURRENT.sync_scope(self, f)
    }

    pub(crate) fn scope<F: std::future::Future>(
        self,
        future: F,
    ) -> tokio::task::futures::TaskLocalFuture<TimeoutContext, F> {
        CURRENT.scope(self, future)
    }
}

/// Where a timeout finds an enclosing context and puts its own, besides the task-local
/// scope it always sets.
pub trait Carrier<Req> {
    /// The context an earlier hop left in the request, if any.
    fn existing(&self, req: &Req) -> Option<TimeoutContext>;

    /// Leaves `ctx` in the request for the inner service.
    fn insert(&self, req: &mut Req, ctx: &TimeoutContext);
}

/// Carries the context only in the task-local scope (any request type; the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct TaskLocal;

impl<Req> Carrier<Req> for TaskLocal {
    fn existing(&self, _req: &Req) -> Option<TimeoutContext> {
        None
    }

    fn insert(&self, _req: &mut Req, _ctx: &TimeoutContext) {}
}

/// A timeout chosen per request; `None` falls back to the layer's.
pub trait RequestTimeout<Req> {
    /// The timeout for `req`.
    fn timeout_for(&self, req: &Req) -> Option<Duration>;
}

/// Every request gets the layer's timeout (the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct SameForAll;

impl<Req> RequestTimeout<Req> for SameForAll {
    fn timeout_for(&self, _req: &Req) -> Option<Duration> {
        None
    }
}

/// A function of the request picks its timeout.
#[derive(Clone, Copy)]
pub struct PerRequest<F>(pub(crate) F);

impl<F> std::fmt::Debug for PerRequest<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PerRequest").finish_non_exhaustive()
    }
}

impl<Req, F> RequestTimeout<Req> for PerRequest<F>
where
    F: Fn(&Req) -> Option<Duration>,
{
    fn timeout_for(&self, req: &Req) -> Option<Duration> {
        (self.0)(req)
    }
}
