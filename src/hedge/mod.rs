//! Hedged requests: when the first attempt is slow, send another; the first success wins.
//!
//! [`HedgeLayer`] starts a second attempt (up to a maximum) when the first has not
//! answered after a delay. The first success wins and the other attempts are dropped, their
//! cancellation tokens cancelled; an error does not win while another attempt is still
//! running.
//!
//! - **Delay**: a percentile of the latencies of recent successful attempts, over a
//!   sliding window, at microsecond resolution and without a lock per request. By default
//!   the percentile moves until about 4% of requests are hedged
//!   ([`hedge_rate`](HedgeBuilder::hedge_rate)); or a fixed percentile; a configured
//!   initial delay until enough samples exist; or a fixed delay.
//! - **Budget**: every hedge spends a token from a [`Budget`](crate::budget::Budget) that
//!   successful requests fill, so a uniformly slow backend never gets double the load.
//! - **Deadline**: no hedge when the enclosing [`Deadline`](crate::timeout::Deadline)
//!   leaves less than the median latency.
//! - **Eligibility**: only requests the policy can replay are hedged (the default policy
//!   replays by `Clone`; the HTTP policy replays idempotent requests with buffered bodies).
//! - **Readiness**: the first attempt uses the service `poll_ready` readied; each hedge
//!   drives a clone to readiness before calling it.
//! - **Spare capacity only**: a concurrency limit (`towerguard::limit`) under the hedge
//!   gives a hedge a free permit or refuses it at once (`reason="hedge"`): a hedge never
//!   waits in its queue, and the first attempt carries on. The layers in between must
//!   call their inner service from their own `call` (towerguard's do; a `Buffer` does
//!   not).
//!
//! Each attempt runs in a [`TimeoutContext`](crate::timeout::TimeoutContext) of its own, a
//! child of the enclosing one, so a losing attempt's token is cancelled when it is dropped.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, Layer, ServiceExt};
//! use towerguard::hedge::HedgeLayer;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), towerguard::Error> {
//! let slow_once = service_fn(|attempt: u32| async move {
//!     tokio::time::sleep(Duration::from_millis(if attempt == 0 { 500 } else { 1 })).await;
//!     Ok::<_, std::io::Error>(attempt)
//! });
//! let hedged = HedgeLayer::builder()
//!     .fixed_delay(Duration::from_millis(20))
//!     .build().layer(slow_once);
//! # let _ = hedged;
//! # Ok(())
//! # }
//! ```

mod future;
mod latency;
mod layer;
mod service;

pub use self::future::ResponseFuture;
pub use self::layer::{HedgeBuilder, HedgeLayer};
pub use self::service::Hedge;
