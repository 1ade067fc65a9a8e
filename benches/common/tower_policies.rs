//! The policies tower's hedge and retry need written by hand, for the peers measured
//! beside towerguard: in the benches and in the main job (`examples/synthetic_load.rs`
//! includes this file), so both configure tower the same way.

/// tower's hedge policy: every request may be sent again.
#[derive(Clone)]
pub(crate) struct ClonePolicy;

impl tower::hedge::Policy<u64> for ClonePolicy {
    fn clone_request(&self, req: &u64) -> Option<u64> {
        Some(*req)
    }

    fn can_retry(&self, _req: &u64) -> bool {
        true
    }
}

/// tower's retry policy: up to this many retries on error.
#[derive(Clone)]
pub(crate) struct Attempts(pub(crate) usize);

impl<Res, E> tower::retry::Policy<u64, Res, E> for Attempts {
    type Future = std::future::Ready<()>;

    fn retry(&mut self, _req: &mut u64, result: &mut Result<Res, E>) -> Option<Self::Future> {
        match result {
            Err(_) if self.0 > 0 => {
                self.0 -= 1;
                Some(std::future::ready(()))
            }
            _ => None,
        }
    }

    fn clone_request(&mut self, req: &u64) -> Option<u64> {
        Some(*req)
    }
}
