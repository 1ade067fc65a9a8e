//! What may be retried, and which outcomes call for a retry.

use std::time::Duration;

use crate::error::{Error, ErrorKind};

/// What an outcome calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Return it as it is.
    Done,
    /// Try again; `after` is the wait the server asked for (HTTP `Retry-After`), if any.
    Retry {
        /// The wait the server asked for.
        after: Option<Duration>,
    },
}

/// Decides whether a request can be sent again, and whether an outcome should be.
pub trait Policy<Req, Res> {
    /// A copy of `req` for another attempt, or `None` if it must be sent only once.
    fn replay(&self, req: &Req) -> Option<Req>;

    /// Whether `outcome` should be retried.
    fn classify(&self, outcome: &Result<Res, Error>) -> Verdict;
}

/// The default policy: requests are replayed by `Clone`; errors of the inner service and
/// timeouts (of a per-attempt timeout inside) are retried; every response is final.
///
/// Overload and panics are not retried: retrying a shed request adds to the overload, and
/// a panic is a bug, not a transient fault.
#[derive(Debug, Clone, Copy, Default)]
pub struct RetryErrors;

/// True for error kinds worth another attempt: inner failures and timeouts.
pub fn is_transient(error: &Error) -> bool {
    matches!(error.kind(), ErrorKind::Inner | ErrorKind::TimedOut)
}

impl<Req: Clone, Res> Policy<Req, Res> for RetryErrors {
    fn replay(&self, req: &Req) -> Option<Req> {
        Some(req.clone())
    }

    fn classify(&self, outcome: &Result<Res, Error>) -> Verdict {
        match outcome {
            Err(error) if is_transient(error) => Verdict::Retry { after: None },
            _ => Verdict::Done,
        }
    }
}

/// A policy from two functions: `replay` and `classify`.
///
/// ```
/// use towerguard::retry::{FnPolicy, Verdict};
///
/// // Retry responses below zero, never errors.
/// let policy = FnPolicy::new(
///     |req: &u32| Some(*req),
///     |outcome: &Result<i64, towerguard::Error>| match outcome {
///         Ok(v) if *v < 0 => Verdict::Retry { after: None },
///         _ => Verdict::Done,
///     },
/// );
/// # let _ = policy;
/// ```
#[derive(Clone, Copy)]
pub struct FnPolicy<R, C> {
    replay: R,
    classify: C,
}

impl<R, C> FnPolicy<R, C> {
    /// Builds the policy.
    pub fn new(replay: R, classify: C) -> Self {
        FnPolicy { replay, classify }
    }
}

impl<R, C> std::fmt::Debug for FnPolicy<R, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FnPolicy").finish_non_exhaustive()
    }
}

impl<Req, Res, R, C> Policy<Req, Res> for FnPolicy<R, C>
where
    R: Fn(&Req) -> Option<Req>,
    C: Fn(&Result<Res, Error>) -> Verdict,
{
    fn replay(&self, req: &Req) -> Option<Req> {
        (self.replay)(req)
    }

    fn classify(&self, outcome: &Result<Res, Error>) -> Verdict {
        (self.classify)(outcome)
    }
}
