//! The crate's one error type.
//!
//! Every towerguard layer fails with [`Error`]. It carries an [`ErrorKind`] that says what
//! happened (the service was overloaded, a timeout expired, the inner service panicked, ...)
//! and keeps the underlying error as its [`source`](std::error::Error::source).
//!
//! Stacking layers does not nest error types: when an inner service already fails with a
//! towerguard [`Error`] (because it is another towerguard layer), the outer layer passes it
//! through unchanged instead of wrapping it as [`ErrorKind::Inner`].
//!
//! [`Error`] is cheap to clone (one reference count), so a single upstream failure can be
//! handed to every caller that waited on it.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// A boxed error, as used by tower.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// What went wrong, without the details.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The service is at capacity and refused or shed the request.
    Overloaded,
    /// A timeout expired before the response was ready.
    TimedOut,
    /// The work was cancelled before it finished: for inner code that stops when its
    /// [`CancellationToken`](tokio_util::sync::CancellationToken) fires and says so with
    /// `Error::new(ErrorKind::Cancelled)`. The layers never make one up: dropping a
    /// response future is how a caller cancels, and it gets no error at all.
    Cancelled,
    /// A retry or hedge was wanted but the shared budget had no tokens left.
    BudgetExhausted,
    /// The inner service (or a future it returned) panicked.
    Panicked,
    /// The inner service returned an error; it is kept as the source.
    Inner,
    /// The client's request could not be read (its body failed or ended early); the
    /// inner service was not called. HTTP answers it with 400.
    BadRequest,
}

impl ErrorKind {
    /// A short lowercase description, also used as a metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::TimedOut => "timed out",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::BudgetExhausted => "budget exhausted",
            ErrorKind::Panicked => "panicked",
            ErrorKind::Inner => "inner service error",
            ErrorKind::BadRequest => "bad request",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error every towerguard layer returns.
///
/// ```
/// use towerguard::{Error, ErrorKind};
///
/// let err = Error::inner(std::io::Error::other("connection reset"));
/// assert_eq!(err.kind(), ErrorKind::Inner);
/// assert_eq!(err.to_string(), "inner service error");
/// assert!(std::error::Error::source(&err).is_some());
///
/// // A towerguard error converted again keeps its kind: layers do not nest.
/// let boxed: towerguard::BoxError = Box::new(Error::new(ErrorKind::TimedOut));
/// assert_eq!(Error::from_boxed(boxed).kind(), ErrorKind::TimedOut);
/// ```
#[derive(Clone)]
pub struct Error {
    inner: Arc<Inner>,
}

struct Inner {
    kind: ErrorKind,
    message: Option<String>,
    source: Option<Arc<dyn StdError + Send + Sync + 'static>>,
    retry_after: Option<Duration>,
    cache_status: Option<String>,
}

impl Error {
    /// An error of `kind` with no source.
    pub fn new(kind: ErrorKind) -> Self {
        Error {
            inner: Arc::new(Inner {
                kind,
                message: None,
                source: None,
                retry_after: None,
                cache_status: None,
            }),
        }
    }

    /// An error of kind [`ErrorKind::Inner`] that keeps `source`.
    ///
    /// If `source` is itself a towerguard [`Error`], it is returned unchanged.
    pub fn inner<E>(source: E) -> Self
    where
        E: Into<BoxError>,
    {
        Self::from_boxed(source.into())
    }

    /// Converts a boxed error: a towerguard [`Error`] passes through unchanged, anything
    /// else becomes the source of an [`ErrorKind::Inner`] error.
    pub fn from_boxed(source: BoxError) -> Self {
        match source.downcast::<Error>() {
            Ok(err) => *err,
            Err(other) => Error {
                inner: Arc::new(Inner {
                    kind: ErrorKind::Inner,
                    message: None,
                    source: Some(Arc::from(other)),
                    retry_after: None,
                    cache_status: None,
                }),
            },
        }
    }

    /// An error of `kind` that keeps `source` (a towerguard [`Error`] source is kept as
    /// the source too, not passed through: the kind says what this layer saw).
    pub fn with_source<E>(kind: ErrorKind, source: E) -> Self
    where
        E: Into<BoxError>,
    {
        Error {
            inner: Arc::new(Inner {
                kind,
                message: None,
                source: Some(Arc::from(source.into())),
                retry_after: None,
                cache_status: None,
            }),
        }
    }

    /// An error of kind [`ErrorKind::Panicked`] built from a panic payload, keeping the
    /// panic message when it is a string.
    pub fn panicked(payload: &(dyn std::any::Any + Send)) -> Self {
        let message = if let Some(s) = payload.downcast_ref::<&'static str>() {
            Some((*s).to_owned())
        } else {
            payload.downcast_ref::<String>().cloned()
        };
        Error {
            inner: Arc::new(Inner {
                kind: ErrorKind::Panicked,
                message,
                source: None,
                retry_after: None,
                cache_status: None,
            }),
        }
    }

    /// An error of `kind` that suggests retrying after `after` (sent as `Retry-After` when
    /// the error becomes an HTTP response).
    pub fn with_retry_after(kind: ErrorKind, after: Duration) -> Self {
        Error {
            inner: Arc::new(Inner {
                kind,
                message: None,
                source: None,
                retry_after: Some(after),
                cache_status: None,
            }),
        }
    }

    /// How long the caller should wait before trying again, when the layer knows.
    pub fn retry_after(&self) -> Option<Duration> {
        self.inner.retry_after
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// This error and each of its sources, joined with `: `, for a log line or a message
    /// to an operator: the error itself says only its kind, and the cause is in its
    /// source. A source whose text its parent already shows is left out.
    ///
    /// ```
    /// use towerguard::Error;
    ///
    /// let err = Error::inner(std::io::Error::other("connection reset"));
    /// assert_eq!(err.chain(), "inner service error: connection reset");
    /// ```
    pub fn chain(&self) -> String {
        chain(self)
    }

    /// True if the error is of `kind`.
    pub fn is(&self, kind: ErrorKind) -> bool {
        self.inner.kind == kind
    }

    /// The panic message, for errors of kind [`ErrorKind::Panicked`] whose payload was a
    /// string.
    pub fn panic_message(&self) -> Option<&str> {
        self.inner.message.as_deref()
    }

    /// The same error, noting how a cache in front of the failure handled the request:
    /// a `Cache-Status` value (RFC 9211) that
    /// [`ErrorResponseLayer`](crate::http::ErrorResponseLayer) puts on the error's
    /// response, so an error answer says what the cache did too.
    pub fn with_cache_status(self, value: impl Into<String>) -> Self {
        let inner = &self.inner;
        Error {
            inner: Arc::new(Inner {
                kind: inner.kind,
                message: inner.message.clone(),
                source: inner.source.clone(),
                retry_after: inner.retry_after,
                cache_status: Some(value.into()),
            }),
        }
    }

    /// The `Cache-Status` value a cache noted with
    /// [`with_cache_status`](Self::with_cache_status), if any.
    pub fn cache_status(&self) -> Option<&str> {
        self.inner.cache_status.as_deref()
    }

    /// The kept source error, if any, downcast to `E`.
    pub fn source_as<E: StdError + 'static>(&self) -> Option<&E> {
        self.inner.source.as_deref()?.downcast_ref::<E>()
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.inner.kind);
        if let Some(message) = &self.inner.message {
            d.field("message", message);
        }
        if let Some(source) = &self.inner.source {
            d.field("source", source);
        }
        if let Some(after) = &self.inner.retry_after {
            d.field("retry_after", after);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.inner.kind, &self.inner.message) {
            (ErrorKind::Panicked, Some(message)) => {
                write!(f, "inner service panicked: {message}")
            }
            (ErrorKind::Panicked, None) => f.write_str("inner service panicked"),
            (kind, _) => f.write_str(kind.as_str()),
        }
    }
}

/// `error` and each of its sources, joined with `: `, leaving out a source whose text
/// the one before it already contains (some errors print their source themselves).
pub(crate) fn chain(error: &(dyn StdError + 'static)) -> String {
    let mut out = error.to_string();
    let mut last = out.clone();
    let mut source = error.source();
    while let Some(next) = source {
        let text = next.to_string();
        if !last.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        last = text;
        source = next.source();
    }
    out
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.inner
            .source
            .as_deref()
            .map(|s| s as &(dyn StdError + 'static))
    }
}

impl From<ErrorKind> for Error {
    fn from(kind: ErrorKind) -> Self {
        Error::new(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_lowercase_without_trailing_dot() {
        for kind in [
            ErrorKind::Overloaded,
            ErrorKind::TimedOut,
            ErrorKind::Cancelled,
            ErrorKind::BudgetExhausted,
            ErrorKind::Panicked,
            ErrorKind::Inner,
            ErrorKind::BadRequest,
        ] {
            let text = Error::new(kind).to_string();
            assert_eq!(text, text.to_lowercase(), "{text}");
            assert!(!text.ends_with('.'), "{text}");
        }
    }

    #[test]
    fn inner_towerguard_error_passes_through_unchanged() {
        let original = Error::new(ErrorKind::Overloaded);
        let again = Error::inner(original.clone());
        assert_eq!(again.kind(), ErrorKind::Overloaded);
        assert!(Arc::ptr_eq(&original.inner, &again.inner));
    }

    #[test]
    fn the_chain_leaves_out_a_source_its_parent_already_prints() {
        #[derive(Debug)]
        struct Wrapping(std::io::Error);
        impl fmt::Display for Wrapping {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "cannot connect: {}", self.0)
            }
        }
        impl StdError for Wrapping {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&self.0)
            }
        }
        let err = Error::inner(Wrapping(std::io::Error::other("refused")));
        assert_eq!(err.chain(), "inner service error: cannot connect: refused");
        assert_eq!(Error::new(ErrorKind::TimedOut).chain(), "timed out");
    }

    #[test]
    fn foreign_error_is_kept_as_source() {
        let err = Error::inner(std::io::Error::other("boom"));
        assert_eq!(err.kind(), ErrorKind::Inner);
        assert_eq!(
            err.source_as::<std::io::Error>().unwrap().to_string(),
            "boom"
        );
    }

    #[test]
    fn panic_payload_message_is_kept() {
        let payload: Box<dyn std::any::Any + Send> = Box::new("bad state");
        let err = Error::panicked(&*payload);
        assert!(err.is(ErrorKind::Panicked));
        assert_eq!(err.panic_message(), Some("bad state"));
        assert_eq!(err.to_string(), "inner service panicked: bad state");
    }
}
