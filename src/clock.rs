//! Instants as nanoseconds since one process-wide epoch: a word, cheap to store, compare and
//! subtract.
//!
//! Subtracting two instants is a call into std that checks and normalises seconds and
//! nanoseconds; on the hot paths (a timeout's deadline, an adaptive limit's sample, a
//! cache entry's idle time) it cost as much as the rest of the layer. An instant's `Hash`
//! writes its clock reading (seconds, then nanoseconds, on the platforms std supports),
//! and hashing is inlined here: the reading in nanoseconds comes out in a few
//! instructions. It is used only after a check, the first time the epoch is read, that
//! readings differ exactly as the instants do; anywhere else the subtraction is used.

use std::hash::{Hash, Hasher};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::time::Instant;

/// The epoch, and whether readings are exact here.
struct Clock {
    epoch: Instant,
    /// The epoch's reading, when readings of later instants differ from it exactly as the
    /// instants do.
    reading: Option<u64>,
}

#[inline]
fn clock() -> &'static Clock {
    static CLOCK: OnceLock<Clock> = OnceLock::new();
    CLOCK.get_or_init(|| {
        // A year (or less, on a young clock) before the first use, so every instant a
        // running program meets is after it.
        let now = Instant::now();
        let epoch = [86_400 * 365, 86_400, 3_600, 1]
            .into_iter()
            .find_map(|secs| now.checked_sub(Duration::from_secs(secs)))
            .unwrap_or(now);
        Clock {
            epoch,
            reading: exact_reading(epoch),
        }
    })
}

/// The instant nanosecond counts start from.
#[cfg(feature = "timeout")]
#[inline]
pub(crate) fn epoch() -> Instant {
    clock().epoch
}

/// Nanoseconds from the epoch to `instant` (0 before it), saturating.
#[inline]
pub(crate) fn since_epoch(instant: Instant) -> u64 {
    let clock = clock();
    match (clock.reading, reading(instant)) {
        (Some(epoch), Some(reading)) => {
            let since = reading.wrapping_sub(epoch);
            // Before the epoch: a reading below it wraps to the upper half.
            if since > u64::MAX / 2 {
                0
            } else {
                since
            }
        }
        _ => nanos(instant.saturating_duration_since(clock.epoch)),
    }
}

/// `duration` in nanoseconds, saturating (in u64 arithmetic, not through u128).
#[inline]
pub(crate) fn nanos(duration: Duration) -> u64 {
    duration
        .as_secs()
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::from(duration.subsec_nanos()))
}

/// What an instant's `Hash` writes, read as seconds then nanoseconds.
#[derive(Default)]
struct Reading {
    nanos: u64,
    /// 1 after the seconds, 2 after the nanoseconds; anything else means another shape.
    step: u8,
}

impl Hasher for Reading {
    fn finish(&self) -> u64 {
        self.nanos
    }

    fn write(&mut self, _: &[u8]) {
        self.step = u8::MAX;
    }

    #[inline]
    fn write_u64(&mut self, secs: u64) {
        self.nanos = secs.wrapping_mul(1_000_000_000);
        self.step = if self.step == 0 { 1 } else { u8::MAX };
    }

    #[inline]
    fn write_i64(&mut self, secs: i64) {
        self.write_u64(secs as u64);
    }

    #[inline]
    fn write_u32(&mut self, nanos: u32) {
        self.nanos = self.nanos.wrapping_add(u64::from(nanos));
        self.step = if self.step == 1 { 2 } else { u8::MAX };
    }
}

/// `instant`'s clock reading in nanoseconds, if its hash has the shape read above.
#[inline]
fn reading(instant: Instant) -> Option<u64> {
    let mut reading = Reading::default();
    instant.hash(&mut reading);
    (reading.step == 2).then_some(reading.nanos)
}

/// The epoch's reading, if readings of instants after it differ from it exactly as the
/// instants do (checked over a nanosecond, a second and a quarter, and four hundred days).
fn exact_reading(epoch: Instant) -> Option<u64> {
    let base = reading(epoch)?;
    let steps = [
        Duration::from_nanos(1),
        Duration::from_millis(1_250),
        Duration::new(86_400 * 400 + 3, 999_999_999),
    ];
    steps
        .into_iter()
        .all(|step| {
            epoch
                .checked_add(step)
                .and_then(reading)
                .is_some_and(|later| later.wrapping_sub(base) == nanos(step))
        })
        .then_some(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_since_the_epoch_match_the_subtraction_of_instants() {
        let now = Instant::now();
        for offset in [
            Duration::ZERO,
            Duration::from_nanos(1),
            Duration::from_nanos(999_999_999),
            Duration::from_secs(1),
            Duration::new(7_200, 123_456_789),
        ] {
            let at = now + offset;
            assert_eq!(
                since_epoch(at),
                nanos(at.saturating_duration_since(clock().epoch)),
                "{offset:?} after now"
            );
        }
    }

    #[test]
    fn an_instant_before_the_epoch_counts_as_the_epoch() {
        let epoch = clock().epoch;
        if let Some(before) = epoch.checked_sub(Duration::from_nanos(1)) {
            assert_eq!(since_epoch(before), 0);
        }
        assert_eq!(since_epoch(epoch), 0);
    }

    #[test]
    fn readings_are_exact_on_this_platform() {
        // Linux (CI) reads instants from their hash; elsewhere the subtraction stands in.
        if cfg!(target_os = "linux") {
            assert!(clock().reading.is_some());
        }
    }
}
