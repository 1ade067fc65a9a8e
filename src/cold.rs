//! A box for the state few values reach, kept off the drop path of the ones that do not.

use std::pin::Pin;

/// A pinned box whose drop runs out of line.
///
/// A future that may hold a boxed timer in a rare state (a retry's wait) otherwise gets
/// drop glue too large to inline, and every request pays a call to check a state it never
/// reached. With this, that check is a compare inlined into the caller.
pub(crate) struct ColdBox<T>(Option<Pin<Box<T>>>);

impl<T> ColdBox<T> {
    pub(crate) fn new(value: T) -> Self {
        ColdBox(Some(Box::pin(value)))
    }

    pub(crate) fn as_mut(&mut self) -> Pin<&mut T> {
        self.0
            .as_mut()
            .expect("a ColdBox holds its value until it is dropped")
            .as_mut()
    }
}

impl<T> Drop for ColdBox<T> {
    #[inline]
    fn drop(&mut self) {
        if let Some(boxed) = self.0.take() {
            drop_out_of_line(boxed);
        }
    }
}

#[cold]
#[inline(never)]
fn drop_out_of_line<T>(value: T) {
    drop(value);
}
