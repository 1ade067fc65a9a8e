//! The standard stack: the layers in the recommended order, with defaults a production
//! service can start from, and the configurations that contradict themselves refused.
//!
//! From the caller inwards:
//!
//! 1. **cache** — a hit costs nothing downstream, so it comes first and is never limited,
//!    timed out or retried. A miss's wait for its flight (and, through the flight, for
//!    another instance's lease) is bounded by the total timeout all the same.
//! 2. **total timeout** — bounds everything below it: the wait for a permit, every
//!    attempt, every backoff. Its [`Deadline`](crate::timeout::Deadline) is what retry and
//!    hedge check before starting another attempt.
//! 3. **concurrency limit** — taken once per request, not per attempt, so retries and
//!    hedges of an admitted request do not compete with new requests for permits (and a
//!    shed request is not retried here).
//! 4. **retry** — on transient failures, within the budget.
//! 5. **hedge** — within each attempt, a second try when the first is slow; shares the
//!    retry budget.
//! 6. **attempt timeout** — bounds each attempt, so one hung call does not eat the whole
//!    total timeout and retry gets its turn.
//!
//! The HTTP variant ([`StackBuilder::build_http`]) adds the RFC 9111 cache, reads
//! replayable request bodies ahead (so retry and hedge can resend them), and maps errors
//! to responses (503 with `Retry-After`, 504, 502), so the service is infallible and goes
//! straight into axum's `Router::layer`.
//!
//! # Defaults
//!
//! | setting | default | why |
//! |---|---|---|
//! | total timeout | 10 s | long enough for slow pages, short enough to free resources |
//! | attempt timeout | 3 s | leaves room for a retry inside the total |
//! | concurrency limit | adaptive (Vegas), 4 to 1,000, starting at 16 | finds the backend's capacity instead of a guess; starts low and grows, so a backend is not flooded before the limit has measured it |
//! | queue | 256 requests, 100 ms, CoDel with adaptive LIFO (5 ms target, 50 ms interval) | absorbs bursts; under sustained overload serves the newest waiters fast and sheds the rest instead of serving everyone late |
//! | retry | 3 attempts, 25 ms to 1 s full-jitter backoff | masks transient faults |
//! | budget | 20% of successful requests + 10 per second | a total outage adds at most the floor |
//! | hedge | off | opt in: it costs extra load by design |
//! | cache | off | opt in with a key (generic) or [`StackBuilder::http_cache`] |
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use towerguard::stack::StackBuilder;
//!
//! let stack = StackBuilder::new()
//!     .name("api")
//!     .total_timeout(Duration::from_secs(5))
//!     .attempt_timeout(Duration::from_secs(1))
//!     .static_limit(128)
//!     .hedge(Duration::from_millis(50))
//!     .build_http::<axum::body::Body>()
//!     .expect("a consistent configuration");
//! // axum: Router::new().route(...).layer(stack)
//! # let _ = stack;
//! ```

mod builder;
mod generic;
#[cfg(feature = "http")]
mod http;

pub use self::builder::{StackBuilder, StackError, StackService};
pub use self::generic::GenericStack;
#[cfg(feature = "http")]
pub use self::http::{HttpStack, HttpStackService, ResponseBody};
