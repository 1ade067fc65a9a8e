//! Retry on fault, with backoff, jitter, a budget and `Retry-After`.
//!
//! [`RetryLayer`] sends a request again when its [`Policy`] says the outcome is worth
//! another attempt:
//!
//! - **Replayable only**: the policy makes the copy for the next attempt, or declines
//!   (then the request is sent once). The default [`RetryErrors`] replays by `Clone`; the
//!   HTTP policy replays idempotent requests with buffered bodies.
//! - **Backoff**: exponential with full jitter, capped ([`Backoff`]); a server's
//!   `Retry-After` is honoured up to a cap, and a longer one ends the retries.
//! - **Budget**: retries spend from a [`Budget`](crate::budget::Budget) that successful
//!   requests fill; under a total outage the extra load is bounded by the budget's floor.
//! - **Deadline**: no retry whose wait would end after the enclosing timeout's
//!   [`Deadline`](crate::timeout::Deadline).
//! - **Readiness**: the first attempt uses the service `poll_ready` readied; each retry
//!   drives a clone to readiness before calling it.
//!
//! A retryable outcome that is not retried (attempts, budget, deadline) is returned as it
//! is: the last error, or the last retryable response.
//!
//! # Example
//!
//! ```
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::Arc;
//! use tower::{service_fn, Layer, ServiceExt};
//! use towerguard::retry::RetryLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), towerguard::Error> {
//! let calls = Arc::new(AtomicUsize::new(0));
//! let counter = calls.clone();
//! let flaky = service_fn(move |x: u32| {
//!     let n = counter.fetch_add(1, Ordering::SeqCst);
//!     async move {
//!         if n == 0 { Err(std::io::Error::other("reset")) } else { Ok(x) }
//!     }
//! });
//! let service = RetryLayer::builder().build().layer(flaky);
//! assert_eq!(service.oneshot(7).await?, 7);
//! assert_eq!(calls.load(Ordering::SeqCst), 2);
//! # Ok(())
//! # }
//! ```

mod backoff;
mod future;
mod layer;
mod policy;
mod service;

pub use self::backoff::Backoff;
pub use self::future::ResponseFuture;
pub use self::layer::{RetryBuilder, RetryLayer};
pub use self::policy::{is_transient, FnPolicy, Policy, RetryErrors, Verdict};
pub use self::service::Retry;
