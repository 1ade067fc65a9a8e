//! The deadline and cancellation token a timeout hands down to the work it bounds.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

thread_local! {
    /// The context of the timeout whose work this thread is running right now. A scope
    /// moves its context in for the length of a `call` or a `poll` and takes it back out,
    /// so nothing is cloned or counted per request.
    static CURRENT: Cell<Option<TimeoutContext>> = const { Cell::new(None) };
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
        TimeoutContext::peek(|ctx| ctx.map(|ctx| ctx.deadline))
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

/// What a timeout hands to the work it bounds: the deadline and a cancellation token.
///
/// The token is cancelled when the timeout expires and when the caller drops the response
/// future before it completes; it is a child of the enclosing timeout's token, so
/// cancelling an outer scope cancels the inner ones too. It is created on first use:
/// clones of a context share one token.
#[derive(Debug)]
pub struct TimeoutContext {
    deadline: Deadline,
    /// The enclosing scope's token, the parent of ours.
    parent: Option<Arc<LazyToken>>,
    token: OnceLock<Arc<LazyToken>>,
}

impl Clone for TimeoutContext {
    fn clone(&self) -> Self {
        TimeoutContext {
            deadline: self.deadline,
            parent: None,
            token: OnceLock::from(self.lazy_token().clone()),
        }
    }
}

impl TimeoutContext {
    #[cfg(any(feature = "cache", feature = "http"))]
    pub(crate) fn new(deadline: Deadline, token: Arc<LazyToken>) -> Self {
        TimeoutContext {
            deadline,
            parent: None,
            token: OnceLock::from(token),
        }
    }

    /// A scope with `deadline` whose token, made when somebody asks for it, is a child of
    /// `parent`'s.
    pub(crate) fn under(deadline: Deadline, parent: Option<&TimeoutContext>) -> Self {
        TimeoutContext {
            deadline,
            parent: parent.map(|parent| parent.lazy_token().clone()),
            token: OnceLock::new(),
        }
    }

    /// The effective deadline (the earliest of the nested timeouts').
    pub fn deadline(&self) -> Deadline {
        self.deadline
    }

    /// The cancellation token of this scope.
    pub fn token(&self) -> CancellationToken {
        self.lazy_token().get()
    }

    pub(crate) fn lazy_token(&self) -> &Arc<LazyToken> {
        self.token.get_or_init(|| match &self.parent {
            Some(parent) => LazyToken::child_of(parent),
            None => LazyToken::root(),
        })
    }

    /// Cancels this scope's token, if anybody made it (if nobody did, nobody listens).
    pub(crate) fn cancel(&self) {
        if let Some(token) = self.token.get() {
            token.cancel();
        }
    }

    /// A scope for one attempt under `parent` (or a root scope): a child token, the same
    /// deadline.
    #[cfg(feature = "hedge")]
    pub(crate) fn attempt_under(parent: Option<&TimeoutContext>) -> TimeoutContext {
        match parent {
            Some(outer) => TimeoutContext::under(outer.deadline, Some(outer)),
            None => TimeoutContext::under(Deadline::at(far_future(Instant::now())), None),
        }
    }

    /// The context of the timeout whose work is running on this task, if any.
    ///
    /// Available while the inner service's `call` runs and while its response future is
    /// polled; a task spawned from there does not inherit it (pass the token along).
    pub fn current() -> Option<TimeoutContext> {
        Self::peek(|ctx| ctx.cloned())
    }

    /// Runs `f` on the current context, without cloning it.
    pub(crate) fn peek<R>(f: impl FnOnce(Option<&TimeoutContext>) -> R) -> R {
        let mut f = Some(f);
        let seen = CURRENT.try_with(|cell| {
            let ctx = cell.take();
            let result = (f.take().expect("called once"))(ctx.as_ref());
            cell.set(ctx);
            result
        });
        match seen {
            Ok(result) => result,
            Err(_) => (f.take().expect("called once"))(None),
        }
    }

    /// Runs `f` with the context in `slot` as the current one, then puts it back in `slot`
    /// (also when `f` panics).
    pub(crate) fn enter<R>(slot: &mut Option<TimeoutContext>, f: impl FnOnce() -> R) -> R {
        struct Restore<'a> {
            slot: &'a mut Option<TimeoutContext>,
            outer: Option<TimeoutContext>,
        }
        impl Drop for Restore<'_> {
            fn drop(&mut self) {
                let outer = self.outer.take();
                if let Ok(ours) = CURRENT.try_with(|cell| cell.replace(outer)) {
                    *self.slot = ours;
                }
            }
        }
        if slot.is_none() {
            return f();
        }
        match CURRENT.try_with(|cell| cell.replace(slot.take())) {
            Ok(outer) => {
                let _restore = Restore { slot, outer };
                f()
            }
            // The thread is shutting down: no scope to set.
            Err(_) => f(),
        }
    }

    /// Makes a context from the current one (`None` outside any scope) and `req` with
    /// `make`, then runs `f(req)` inside it; returns the context with `f`'s result. One
    /// trip to the thread-local on the way in, one on the way out.
    pub(crate) fn nest<Q, R>(
        mut req: Q,
        make: impl FnOnce(Option<&TimeoutContext>, &mut Q) -> TimeoutContext,
        f: impl FnOnce(Q) -> R,
    ) -> (TimeoutContext, R) {
        /// Puts the outer context back, also when `f` panics; hands ours back.
        struct Restore(Option<Option<TimeoutContext>>);
        impl Restore {
            fn ours(&mut self) -> Option<TimeoutContext> {
                let outer = self.0.take()?;
                CURRENT.try_with(|cell| cell.replace(outer)).ok().flatten()
            }
        }
        impl Drop for Restore {
            fn drop(&mut self) {
                self.ours();
            }
        }
        let mut make = Some(make);
        let entered = CURRENT.try_with(|cell| {
            let outer = cell.take();
            let ours = (make.take().expect("called once"))(outer.as_ref(), &mut req);
            cell.set(Some(ours));
            outer
        });
        let Ok(outer) = entered else {
            // The thread is shutting down: no scope to set.
            let ours = (make.take().expect("called once"))(None, &mut req);
            return (ours, f(req));
        };
        let mut restore = Restore(Some(outer));
        let result = f(req);
        let ours = restore.ours().expect("the scope gives its context back");
        (ours, result)
    }

    #[cfg(feature = "cache")]
    pub(crate) fn sync_scope<R>(self, f: impl FnOnce() -> R) -> R {
        Self::enter(&mut Some(self), f)
    }
}

pin_project! {
    /// A future polled inside a timeout context, which cancels the context's token when
    /// dropped unfinished.
    pub(crate) struct Scoped<F> {
        #[pin]
        future: F,
        ctx: Option<TimeoutContext>,
        armed: bool,
    }

    impl<F> PinnedDrop for Scoped<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if *this.armed {
                if let Some(ctx) = this.ctx.as_ref() {
                    ctx.cancel();
                }
            }
        }
    }
}

impl<F> Scoped<F> {
    /// `future` in `ctx`; dropping it unfinished cancels the token.
    pub(crate) fn new(ctx: TimeoutContext, future: F) -> Self {
        Scoped {
            future,
            ctx: Some(ctx),
            armed: true,
        }
    }
}

impl<F: Future> Future for Scoped<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let future = this.future;
        let polled = TimeoutContext::enter(this.ctx, || future.poll(cx));
        if polled.is_ready() {
            // Finished: nothing left to cancel.
            *this.armed = false;
        }
        polled
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
