//! Timeouts that cancel the work and tell it so.
//!
//! [`TimeoutLayer`] bounds the time from `call` to the response. On expiry the inner
//! future is dropped and the caller gets an [`Error`](crate::Error) of kind
//! [`TimedOut`](crate::ErrorKind::TimedOut).
//!
//! - **Timed from `call`**: the whole response future is covered, so a timeout placed
//!   outside a [`ConcurrencyLimitLayer`](crate::limit::ConcurrencyLimitLayer) also bounds
//!   the time a request waits in its queue.
//! - **Tells the work**: every request runs inside a [`TimeoutContext`] holding its
//!   [`Deadline`] and a [`CancellationToken`](tokio_util::sync::CancellationToken). Inner
//!   code reads it with [`TimeoutContext::current`] or [`Deadline::current`]; with
//!   `TimeoutLayer::http_extensions` (`http` feature) it is also in the `http::Request` extensions. The
//!   token is cancelled on expiry and when the caller drops the response future early.
//! - **Nests**: an inner timeout's token is a child of the outer one's, and the deadline
//!   it reports is the earliest of the two.
//! - **Per request**: [`TimeoutLayer::per_request`] picks a timeout from the request.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use towerguard::timeout::{TimeoutContext, TimeoutLayer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let service = ServiceBuilder::new()
//!     .layer(TimeoutLayer::new(Duration::from_millis(50)))
//!     .service(service_fn(|_: ()| async {
//!         let ctx = TimeoutContext::current().expect("inside a timeout");
//!         // Stops as soon as the timeout expires or the caller leaves.
//!         ctx.token().cancelled().await;
//!         Ok::<_, std::io::Error>(())
//!     }));
//! let err = service.oneshot(()).await.unwrap_err();
//! assert_eq!(err.kind(), towerguard::ErrorKind::TimedOut);
//! # }
//! ```
//!
//! # Cancel safety
//!
//! Dropping the response future drops the inner future and cancels the token.

pub(crate) mod deadline;
mod future;
mod layer;
mod service;

pub use self::deadline::{
    Carrier, Deadline, PerRequest, RequestTimeout, SameForAll, TaskLocal, TimeoutContext,
};
pub use self::future::ResponseFuture;
pub use self::layer::TimeoutLayer;
pub use self::service::Timeout;
