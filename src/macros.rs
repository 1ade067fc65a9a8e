//! Items every layer's service repeats, written once.

/// `get_ref`, `get_mut` and `into_inner` for a service whose wrapped service is its
/// `inner` field of type `S`; `$what` names the layer in `into_inner`'s doc.
#[allow(unused_macros)]
macro_rules! inner_accessors {
    ($what:literal) => {
        /// The wrapped service.
        pub fn get_ref(&self) -> &S {
            &self.inner
        }

        /// The wrapped service, mutably.
        pub fn get_mut(&mut self) -> &mut S {
            &mut self.inner
        }

        #[doc = concat!("Consumes the ", $what, " and returns the wrapped service.")]
        pub fn into_inner(self) -> S {
            self.inner
        }
    };
}
