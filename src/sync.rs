//! The locks and atomics that the flight and the limiter coordinate through: std's, or
//! loom's when the crate is built with `RUSTFLAGS="--cfg towerguard_loom"`, so `tests/loom.rs` can
//! explore their interleavings. Reference counts stay std's `Arc` (receivers such as
//! `self: &Arc<Self>` need it); what is modelled is every lock and atomic they guard.

#[cfg(towerguard_loom)]
pub(crate) use loom::sync::atomic::AtomicUsize;
#[cfg(all(towerguard_loom, feature = "limit"))]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64};
#[cfg(towerguard_loom)]
pub(crate) use loom::sync::{Mutex, MutexGuard};
#[cfg(not(towerguard_loom))]
pub(crate) use std::sync::atomic::AtomicUsize;
pub(crate) use std::sync::atomic::Ordering;
#[cfg(all(not(towerguard_loom), feature = "limit"))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64};
#[cfg(not(towerguard_loom))]
pub(crate) use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, taking the data of a poisoned lock as it is: nothing panics while holding
/// these locks, and a poisoned lock must not hang anyone.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Reads `atomic` as a `SeqCst` load does on the hardware: the latest value in its
/// modification order. The limiter's release and its queue form a Dekker pair (each side
/// writes one counter, then reads the other) that is correct under `SeqCst`; loom models
/// `SeqCst` as acquire/release, so under loom the read is a read-modify-write, which it
/// does model as reading the latest value.
#[cfg(feature = "limit")]
#[inline]
pub(crate) fn load_latest(atomic: &AtomicUsize) -> usize {
    #[cfg(towerguard_loom)]
    {
        atomic.fetch_add(0, Ordering::SeqCst)
    }
    #[cfg(not(towerguard_loom))]
    {
        atomic.load(Ordering::SeqCst)
    }
}
