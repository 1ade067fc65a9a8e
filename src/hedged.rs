//! Whether the `call` running on this thread sends a hedged attempt.
//!
//! The hedge layer sets it around the inner `call` of each hedge it sends, and a
//! concurrency limit under the hedge reads it when it has no free permit: a hedge only
//! helps with capacity to spare, so it takes a free permit or none and never waits in the
//! queue (where, under adaptive LIFO, it would even go ahead of the requests waiting
//! before it). One flag of plain data per thread, read only on the limit's slow path.
//! Layers that call their inner service from a later poll or another task (a `Buffer`)
//! do not pass it on, and the hedge waits in the queue there as any request does.

use std::cell::Cell;

thread_local! {
    static HEDGED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` (the inner `call` of a hedge) marked as sending a hedged attempt, then puts
/// the previous mark back, also when `f` panics.
#[cfg(feature = "hedge")]
pub(crate) fn sending_hedge<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            HEDGED.set(self.0);
        }
    }
    let _restore = Restore(HEDGED.replace(true));
    f()
}

/// True while a hedge's inner `call` runs on this thread.
#[cfg(feature = "limit")]
pub(crate) fn sending_hedge_now() -> bool {
    HEDGED.get()
}
