//! Adaptive concurrency limits: algorithms that move the limit from what requests show.
//!
//! The limiter turns every completed request into a [`Sample`] (its latency, how many
//! requests were in flight when it started, and whether it was dropped: rejected
//! downstream or timed out), averages samples over the algorithm's
//! [window](Algorithm::window) without taking a lock, and once per window hands the
//! average to the [`Algorithm`] and applies the limit it returns. Two algorithms come with
//! the crate:
//!
//! - [`Aimd`]: additive increase, multiplicative decrease on drops (and, optionally, on
//!   latency above a threshold). Simple and robust when the backend signals overload by
//!   failing.
//! - [`Vegas`]: estimates the queue building up in the backend from how much latency has
//!   grown over the lowest latency seen, and keeps that queue small. Finds the backend's
//!   capacity from latency alone, before anything fails.
//!
//! Both grow only while at least half the current limit is in use: a lightly loaded
//! service says nothing about how much more it could take, so its limit stays put.

use std::fmt;
use std::time::Duration;

mod aimd;
mod vegas;

pub use self::aimd::Aimd;
pub use self::vegas::Vegas;

/// One completed request, as an [`Algorithm`] sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// From the moment it was admitted to the moment its response was ready (a window's
    /// mean).
    pub latency: Duration,
    /// The shortest latency in the window (the latency itself for one sample). Unlike the
    /// mean, it shows the backend's latency without queueing as long as some requests
    /// still meet no queue, which is what a latency-based algorithm needs as its baseline.
    pub min_latency: Duration,
    /// Requests in flight when it was admitted, itself included.
    pub in_flight: usize,
    /// It failed in a way that signals overload: timed out or rejected downstream.
    pub dropped: bool,
}

impl Sample {
    /// A sample.
    pub fn new(latency: Duration, in_flight: usize, dropped: bool) -> Self {
        Sample {
            latency,
            min_latency: latency,
            in_flight,
            dropped,
        }
    }

    /// The same sample with `min_latency` as the shortest latency of its window.
    pub fn with_min_latency(mut self, min_latency: Duration) -> Self {
        self.min_latency = min_latency;
        self
    }
}

/// An algorithm that moves a concurrency limit.
pub trait Algorithm: Send + fmt::Debug + 'static {
    /// The limit to start with.
    fn initial_limit(&self) -> usize;

    /// How many samples the limiter averages into one [`update`](Self::update): the
    /// latency is their mean, the in-flight count their maximum, and the window counts as
    /// dropped if any sample was. Default 1: every sample is an update.
    fn window(&self) -> usize {
        1
    }

    /// Takes one (averaged) sample and returns the new limit (the limiter clamps it to at
    /// least 1).
    fn update(&mut self, current: usize, sample: Sample) -> usize;
}

/// True when a sample may make the limit grow: at least half the limit was in use.
pub(crate) fn may_grow(current: usize, sample: &Sample) -> bool {
    sample.in_flight.saturating_mul(2) >= current
}
