//! When a permit goes back: as the response future ends (here), or as an HTTP body ends
//! (`crate::http::OnBodyEnd`).

use super::limiter::Permit;

/// Decides what a response carries once admitted, and so when its permit is returned.
pub trait Release<R> {
    /// The response type the limit service returns.
    type Output;

    /// Combines the inner service's response with its permit.
    fn attach(response: R, permit: Permit) -> Self::Output;
}

/// Returns the permit when the response future ends (the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct OnResponse;

impl<R> Release<R> for OnResponse {
    type Output = R;

    #[inline]
    fn attach(response: R, permit: Permit) -> R {
        drop(permit);
        response
    }
}
