//! Concurrency limits: static or adaptive, reject at once or wait in a bounded queue.
//!
//! [`ConcurrencyLimitLayer`] bounds how many requests run at once in the service it wraps.
//!
//! - **One limit across clones.** The limiter is created when the layer is built, so every
//!   clone of the layer and of its services shares it. A limit of 10 is 10 across axum's
//!   per-request clones and across every route the layer is applied to.
//! - **Taken in `call`, never in `poll_ready`.** A connection that keeps a ready service
//!   idle holds nothing. The permit is returned when the response future ends (success,
//!   error, panic) or is dropped; with `ConcurrencyLimitLayer::until_body_end` (with the `http` feature), when the
//!   HTTP response body ends.
//! - **When full**: reject at once (the default) or wait in a queue bounded in length and
//!   in wait; then fail with [`ErrorKind::Overloaded`], carrying a `Retry-After` hint.
//! - **Queue discipline** ([`QueueDiscipline`]): first come, first served (the layer's
//!   default), or CoDel with adaptive LIFO (the stack's default). A FIFO queue under
//!   sustained overload serves every request late; under CoDel, once the queue has not
//!   been empty for an interval (50 ms) it *stands*: requests joining it may wait only
//!   the target (5 ms), waiters older than the target are shed, and a free permit goes to
//!   the newest waiter. Under overload the requests that are served are served fast and
//!   the rest are refused at once; without a standing queue, order and waits are FIFO's.
//!   Sheds are counted under `reason="queue_standing"`.
//! - **Hedges never queue**: under a hedge (`towerguard::hedge`), an attempt the hedge
//!   sends takes a free permit or is refused at once (`reason="hedge"`), whatever the
//!   queue: a hedge is worth sending only with capacity to spare.
//! - **Adaptive**: an [`adaptive::Algorithm`] ([`adaptive::Aimd`], [`adaptive::Vegas`])
//!   moves the limit within its bounds from the latency and drops of finished requests.
//! - **Per key**: [`KeyedConcurrencyLimitLayer`] gives each key (tenant, client) a limit
//!   of its own over a bounded set of partitions.
//! - **No spurious overload**: admission is an atomic compare-and-swap, not a semaphore
//!   poll, so tokio's cooperative budget cannot make a ready service look full.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use towerguard::limit::ConcurrencyLimitLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), towerguard::Error> {
//! let limit = ConcurrencyLimitLayer::builder()
//!     .name("search")
//!     .limit(32)
//!     .queue(64, Duration::from_millis(100))
//!     .build();
//! let handle = limit.handle();
//! let service = ServiceBuilder::new()
//!     .layer(limit)
//!     .service(service_fn(|q: String| async move { Ok::<_, std::io::Error>(q.len()) }));
//! assert_eq!(service.oneshot("towerguard".to_owned()).await?, 10);
//! assert_eq!(handle.in_flight(), 0);
//! # Ok(())
//! # }
//! ```
//!
//! # Differences from tower's `ConcurrencyLimit`
//!
//! tower's layer creates a semaphore per `layer()` call and takes the permit in
//! `poll_ready`, waiting without bound when full. This one shares its limit across every
//! `layer()` call, takes the permit in `call`, can reject or queue with bounds, and fails
//! with the crate's [`Error`](crate::Error) (see [`crate::http`] for 503 responses).
//!
//! [`ErrorKind::Overloaded`]: crate::ErrorKind::Overloaded

pub mod adaptive;
mod future;
mod keyed;
mod layer;
mod limiter;
mod release;
mod service;

pub use self::future::ResponseFuture;
pub use self::keyed::{
    KeyedConcurrencyLimit, KeyedConcurrencyLimitBuilder, KeyedConcurrencyLimitLayer,
    KeyedResponseFuture,
};
pub use self::layer::{
    ConcurrencyLimitBuilder, ConcurrencyLimitLayer, LimitHandle, DEFAULT_RETRY_AFTER,
};
pub use self::limiter::Permit;

use std::time::Duration;

/// How the limit's queue orders its waiters and bounds their wait.
///
/// ```
/// use std::time::Duration;
/// use towerguard::limit::{ConcurrencyLimitLayer, QueueDiscipline};
///
/// let limit = ConcurrencyLimitLayer::builder()
///     .limit(16)
///     .queue(256, Duration::from_millis(100))
///     .queue_discipline(QueueDiscipline::codel())
///     .build();
/// # drop(limit);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueDiscipline {
    /// First come, first served; every waiter may wait the queue's maximum wait.
    Fifo,
    /// CoDel-style waits with adaptive LIFO (Facebook, "Fail at Scale", 2015). While the
    /// queue has been empty within the last `interval`, it behaves as [`Fifo`](Self::Fifo).
    /// Once it has not, it stands: a request joining it waits at most `target`, waiters
    /// older than `target` are shed when a permit comes free, and the permit goes to the
    /// newest waiter.
    Codel {
        /// The longest wait in a standing queue.
        target: Duration,
        /// How long the queue must stay non-empty before it counts as standing.
        interval: Duration,
    },
}

impl QueueDiscipline {
    /// CoDel with a target of 5 ms and an interval of 50 ms.
    pub const fn codel() -> Self {
        QueueDiscipline::Codel {
            target: Duration::from_millis(5),
            interval: Duration::from_millis(50),
        }
    }
}
pub use self::release::{OnResponse, Release};
pub use self::service::ConcurrencyLimit;
