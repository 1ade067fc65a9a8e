//! The deadline and cancellation token a timeout hands down to the work it bounds.

use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// About thirty years: far enough to mean never, near enough not to overflow.
const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);

/// The instant deadlines count from (see [`crate::clock`]).
#[inline]
fn epoch() -> Instant {
    crate::clock::epoch()
}

/// Nanoseconds, saturating below the scope flag's bit.
#[inline]
fn nanos(duration: Duration) -> u64 {
    crate::clock::nanos(duration).min(MAX_NANOS)
}

const MAX_NANOS: u64 = SCOPE_PARENT - 1;

/// When the innermost enclosing timeout expires: the earliest of the nested deadlines.
///
/// Layers and inner code read it to avoid starting work that cannot finish in time.
// Nanoseconds since `epoch()`: one word, cheap to hand down the scope.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline(u64);

impl Deadline {
    /// A deadline at `instant`.
    #[inline]
    pub fn at(instant: Instant) -> Self {
        Deadline(crate::clock::since_epoch(instant).min(MAX_NANOS))
    }

    /// A deadline `timeout` from now (at most about thirty years from now).
    pub fn after(timeout: Duration) -> Self {
        Deadline::now().later(timeout)
    }

    /// Now, as a deadline.
    #[inline]
    pub(crate) fn now() -> Self {
        Deadline::at(Instant::now())
    }

    /// `duration` after this one (at most about thirty years after).
    #[inline]
    pub(crate) fn later(self, duration: Duration) -> Self {
        let duration = nanos(duration).min(nanos(FAR));
        Deadline(self.0.saturating_add(duration).min(MAX_NANOS))
    }

    /// The time from `earlier` to this one, zero if `earlier` is later.
    #[inline]
    pub(crate) fn since(self, earlier: Deadline) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    /// The deadline's instant.
    pub fn instant(&self) -> Instant {
        let epoch = epoch();
        epoch
            .checked_add(Duration::from_nanos(self.0))
            .unwrap_or_else(|| far_future(epoch))
    }

    /// Time left, zero once passed.
    pub fn remaining(&self) -> Duration {
        self.since(Deadline::now())
    }

    /// True once the deadline has passed.
    pub fn is_expired(&self) -> bool {
        Deadline::now() >= *self
    }

    /// True if work taking `duration`, started now, would finish by the deadline.
    pub fn allows(&self, duration: Duration) -> bool {
        Instant::now()
            .checked_add(duration)
            .is_some_and(|end| Deadline::at(end) <= *self)
    }

    /// The deadline of the timeout whose work is running on this task, if any.
    #[inline]
    pub fn current() -> Option<Deadline> {
        frame_deadline(FRAME.get())
    }
}

impl fmt::Debug for Deadline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Deadline").field(&self.instant()).finish()
    }
}

pub(crate) fn far_future(now: Instant) -> Instant {
    now.checked_add(FAR).unwrap_or(now)
}

/// The scope's token is in [`TOKEN`] (it was made or adopted).
const SCOPE_TOKEN: u64 = 1 << 63;
/// The token the scope's token will be a child of is in [`TOKEN`] (the scope is nested and
/// nobody asked for its token yet).
const SCOPE_PARENT: u64 = 1 << 62;
/// Either: something of the scope's is in [`TOKEN`]. Without either, `TOKEN` is empty.
const SCOPE_SLOT: u64 = SCOPE_TOKEN | SCOPE_PARENT;

thread_local! {
    /// The scope of the timeout whose work this thread is running right now: its deadline
    /// and the flags above, 0 outside any scope. One word of plain data, so entering and
    /// leaving a scope is two writes with no destructor to register.
    static FRAME: Cell<u64> = const { Cell::new(0) };
    /// The current scope's token or, until somebody asks for it, its parent. A root scope
    /// without a token (most requests: nobody listens) never touches it.
    static TOKEN: Cell<Option<Arc<LazyToken>>> = const { Cell::new(None) };
}

#[inline]
fn frame(deadline: Deadline, slot: u64) -> u64 {
    deadline.0.max(1) | slot
}

#[inline]
fn frame_deadline(frame: u64) -> Option<Deadline> {
    (frame != 0).then_some(Deadline(frame & !SCOPE_SLOT))
}

#[inline]
fn in_slot(frame: u64) -> bool {
    frame & SCOPE_SLOT != 0
}

/// Puts `token` in the token slot and returns what was there (`Err` with `token` back
/// while the thread is shutting down).
fn swap_token(
    token: Option<Arc<LazyToken>>,
) -> Result<Option<Arc<LazyToken>>, Option<Arc<LazyToken>>> {
    let mut token = Some(token);
    TOKEN
        .try_with(|slot| slot.replace(token.take().expect("swapped once")))
        .map_err(|_| token.take().expect("not swapped"))
}

/// The token of the scope `frame` describes (the one running on this thread), made now if
/// nobody asked for it before; `None` while the thread is shutting down.
fn current_token(frame: u64) -> Option<Arc<LazyToken>> {
    let token = TOKEN
        .try_with(|slot| {
            let token = match (slot.take(), frame & SCOPE_SLOT) {
                (Some(token), SCOPE_TOKEN) => token,
                (Some(parent), _) => LazyToken::child_of(&parent),
                (None, _) => LazyToken::root(),
            };
            slot.set(Some(token.clone()));
            token
        })
        .ok()?;
    FRAME.set(frame & !SCOPE_SLOT | SCOPE_TOKEN);
    Some(token)
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

    #[inline]
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
#[derive(Debug, Clone)]
pub struct TimeoutContext {
    /// Made when somebody asks for it. Every context handed out of the crate has one:
    /// [`TimeoutContext::current`] and carriers make it first.
    token: Option<Arc<LazyToken>>,
    /// Until the token is made: the outer scope's, its parent to be.
    parent: Option<Arc<LazyToken>>,
    // Last: the two words before it are written together, and a copy of the context
    // then reads each part as it was written.
    deadline: Deadline,
}

impl TimeoutContext {
    #[cfg(any(feature = "cache", feature = "http"))]
    pub(crate) fn new(deadline: Deadline, token: Arc<LazyToken>) -> Self {
        TimeoutContext {
            deadline,
            token: Some(token),
            parent: None,
        }
    }

    /// A scope with `deadline` whose token is a child of `parent`'s or, without a parent,
    /// made when somebody asks for it.
    pub(crate) fn under(deadline: Deadline, parent: Option<&TimeoutContext>) -> Self {
        Self::with_parent(deadline, parent.and_then(|parent| parent.token.clone()))
    }

    #[inline]
    fn with_parent(deadline: Deadline, parent: Option<Arc<LazyToken>>) -> Self {
        TimeoutContext {
            deadline,
            token: None,
            parent,
        }
    }

    /// A scope with `deadline`, nested in the scope running on this thread if there is
    /// one: the earlier of the two deadlines, a child of its token.
    #[inline]
    pub(crate) fn nested(deadline: Deadline) -> Self {
        let outer = FRAME.get();
        match frame_deadline(outer) {
            Some(outer_deadline) => {
                let parent = current_token(outer);
                Self::with_parent(outer_deadline.min(deadline), parent)
            }
            None => Self::with_parent(deadline, None),
        }
    }

    /// The effective deadline (the earliest of the nested timeouts').
    pub fn deadline(&self) -> Deadline {
        self.deadline
    }

    /// The cancellation token of this scope.
    pub fn token(&self) -> CancellationToken {
        match &self.token {
            Some(token) => token.get(),
            // Not reached: every context handed out has its token (see the field).
            None => CancellationToken::new(),
        }
    }

    /// Makes the token now, before the context is shared.
    pub(crate) fn share(&mut self) {
        if self.token.is_none() {
            self.token = Some(match self.parent.take() {
                Some(parent) => LazyToken::child_of(&parent),
                None => LazyToken::root(),
            });
        }
    }

    /// Cancels this scope's token, if anybody made it (if nobody did, nobody listens).
    pub(crate) fn cancel(&self) {
        if let Some(token) = &self.token {
            token.cancel();
        }
    }

    /// A scope for one attempt: under `existing` (a context the request carried), else
    /// under the scope running on this thread (a child token, the same deadline), else a
    /// root scope with no deadline to speak of, counted from `now`.
    #[cfg(feature = "hedge")]
    pub(crate) fn attempt_under(existing: Option<&TimeoutContext>, now: Deadline) -> Self {
        match existing {
            Some(outer) => TimeoutContext::under(outer.deadline, Some(outer)),
            // Under a running scope, its deadline is the earlier one.
            None => Self::nested(now.later(FAR)),
        }
    }

    /// The context of the timeout whose work is running on this task, if any.
    ///
    /// Available while the inner service's `call` runs and while its response future is
    /// polled; a task spawned from there does not inherit it (pass the token along).
    pub fn current() -> Option<TimeoutContext> {
        let frame = FRAME.get();
        let deadline = frame_deadline(frame)?;
        let token = current_token(frame).unwrap_or_else(LazyToken::root);
        Some(TimeoutContext {
            deadline,
            token: Some(token),
            parent: None,
        })
    }

    /// Runs `f` with `self` as the current scope, then takes the scope back (also when `f`
    /// panics): a token made meanwhile stays with `self`.
    #[inline]
    pub(crate) fn enter<R>(&mut self, f: impl FnOnce() -> R) -> R {
        if self.token.is_none() && self.parent.is_none() {
            let ours = frame(self.deadline, 0);
            let outer = FRAME.replace(ours);
            if !in_slot(outer) {
                // Neither scope has anything in the token slot (most requests): two
                // writes, and a token somebody made meanwhile is taken back after.
                let _restore = RestorePlain { ctx: self, outer };
                return f();
            }
            FRAME.set(outer);
        }
        self.enter_slotted(f)
    }

    fn enter_slotted<R>(&mut self, f: impl FnOnce() -> R) -> R {
        /// Puts the outer scope back, and our token (if any) back in our context.
        struct Restore<'a> {
            ctx: &'a mut TimeoutContext,
            outer: u64,
            /// The outer scope's token, while ours is in the slot.
            outer_token: Option<Arc<LazyToken>>,
        }
        impl Drop for Restore<'_> {
            #[inline]
            fn drop(&mut self) {
                let ours = FRAME.replace(self.outer);
                // The slot holds something when either scope has (see `enter`).
                if !in_slot(ours) && !in_slot(self.outer) {
                    return;
                }
                if let Ok(Some(held)) = swap_token(self.outer_token.take()) {
                    if ours & SCOPE_TOKEN != 0 {
                        self.ctx.token = Some(held);
                    } else {
                        self.ctx.parent = Some(held);
                    }
                }
            }
        }
        let (held, kind) = match (self.token.take(), self.parent.take()) {
            (Some(token), parent) => {
                self.parent = parent;
                (Some(token), SCOPE_TOKEN)
            }
            (None, Some(parent)) => (Some(parent), SCOPE_PARENT),
            (None, None) => (None, 0),
        };
        let ours = frame(self.deadline, kind);
        let outer = FRAME.replace(ours);
        let mut outer_token = None;
        if in_slot(ours) || in_slot(outer) {
            match swap_token(held) {
                Ok(previous) => outer_token = previous,
                Err(held) => {
                    // The thread is shutting down: the scope runs without its token.
                    FRAME.set(ours & !SCOPE_SLOT);
                    match kind {
                        SCOPE_TOKEN => self.token = held,
                        _ => self.parent = held,
                    }
                }
            }
        }
        let _restore = Restore {
            ctx: self,
            outer,
            outer_token,
        };
        f()
    }

    #[cfg(feature = "cache")]
    pub(crate) fn sync_scope<R>(mut self, f: impl FnOnce() -> R) -> R {
        self.enter(f)
    }
}

/// Puts back an outer scope that had nothing in the token slot; takes back the token of
/// ours if somebody made it meanwhile.
struct RestorePlain<'a> {
    ctx: &'a mut TimeoutContext,
    outer: u64,
}

impl Drop for RestorePlain<'_> {
    #[inline]
    fn drop(&mut self) {
        let ours = FRAME.replace(self.outer);
        if in_slot(ours) {
            self.take_token();
        }
    }
}

impl RestorePlain<'_> {
    #[cold]
    fn take_token(&mut self) {
        // Only our own token can be there: a scope nested in ours put its parent back.
        if let Ok(token) = swap_token(None) {
            self.ctx.token = token;
        }
    }
}

/// Whether a scoped future is still running: a whole word, so that moving the future
/// never reads a word that was written in parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
enum Phase {
    Running,
    Finished,
}

pin_project! {
    /// A future polled inside a timeout context, which cancels the context's token when
    /// dropped unfinished.
    pub(crate) struct Scoped<F> {
        #[pin]
        future: F,
        ctx: TimeoutContext,
        phase: Phase,
    }

    impl<F> PinnedDrop for Scoped<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if *this.phase == Phase::Running {
                this.ctx.cancel();
            }
        }
    }
}

impl<F> Scoped<F> {
    /// `future` in `ctx`; dropping it unfinished cancels the token.
    #[inline]
    pub(crate) fn new(ctx: TimeoutContext, future: F) -> Self {
        Scoped {
            future,
            ctx,
            phase: Phase::Running,
        }
    }

    /// True once the future has finished.
    #[inline]
    pub(crate) fn finished(&self) -> bool {
        self.phase == Phase::Finished
    }
}

impl<F: Future> Future for Scoped<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let future = this.future;
        let polled = this.ctx.enter(|| future.poll(cx));
        if polled.is_ready() {
            *this.phase = Phase::Finished;
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

    /// False if [`insert`](Carrier::insert) leaves nothing in the request: the context's
    /// token is then made only when somebody asks for it, instead of before `insert`.
    fn carries(&self) -> bool {
        true
    }
}

/// Leaves `ctx` in `req` through `carrier`, with its token made first if it is shared.
pub(crate) fn carry<Req, C: Carrier<Req>>(carrier: &C, req: &mut Req, ctx: &mut TimeoutContext) {
    if carrier.carries() {
        ctx.share();
        carrier.insert(req, ctx);
    }
}

/// Carries the context only in the task-local scope (any request type; the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct TaskLocal;

impl<Req> Carrier<Req> for TaskLocal {
    fn existing(&self, _req: &Req) -> Option<TimeoutContext> {
        None
    }

    fn insert(&self, _req: &mut Req, _ctx: &TimeoutContext) {}

    fn carries(&self) -> bool {
        false
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_gives_back_its_instant_and_orders_like_it() {
        let now = Instant::now();
        let later = now + Duration::from_millis(1500);
        assert_eq!(Deadline::at(now).instant(), now);
        assert_eq!(Deadline::at(later).instant(), later);
        assert!(Deadline::at(now) < Deadline::at(later));
        assert_eq!(
            Deadline::at(now).later(Duration::from_millis(1500)),
            Deadline::at(later)
        );
        assert_eq!(
            Deadline::at(later).since(Deadline::at(now)),
            Duration::from_millis(1500)
        );
        assert_eq!(Deadline::at(now).since(Deadline::at(later)), Duration::ZERO);
    }

    #[test]
    fn an_endless_timeout_ends_about_thirty_years_out_and_never_wraps() {
        let now = Deadline::now();
        let endless = now.later(Duration::MAX);
        assert_eq!(endless.since(now), FAR);
        assert_eq!(endless.later(Duration::MAX).since(now), 2 * FAR);
        assert!(!endless.is_expired());
        assert!(Deadline::after(Duration::MAX) > now);
    }

    #[test]
    fn the_scope_word_keeps_the_deadline_apart_from_the_token_flag() {
        let deadline = Deadline::now().later(Duration::from_secs(3));
        for slot in [0, SCOPE_TOKEN, SCOPE_PARENT] {
            let word = frame(deadline, slot);
            assert_eq!(frame_deadline(word), Some(deadline));
            assert_eq!(in_slot(word), slot != 0);
        }
        assert_eq!(frame_deadline(0), None);
        assert_eq!(frame_deadline(frame(Deadline(0), 0)), Some(Deadline(1)));
    }
}
