//! Metrics every layer exports through the [`metrics`] facade, and their names.
//!
//! Each layer instance registers its instrument handles once, with a fixed `name` label
//! that the user chooses (default `"default"`): when the layer is built (cache, limit) or
//! when it first wraps a service (timeout, retry, hedge, whose builders can still be
//! renamed until then). The request path
//! only performs atomic updates on those handles: no allocation, no string formatting, no
//! registry look-up.
//!
//! Names follow `towerguard_<layer>_<what>`, in base units (`_seconds`), with `_total` on
//! counters. [`METRICS`] lists every metric the crate emits; the README's table is the
//! same list.
//!
//! Install any `metrics` recorder (for example `metrics-exporter-prometheus`) before you
//! build and apply the layers, and their metrics appear under these names.

#[cfg(any(feature = "cache", feature = "limit", feature = "hedge"))]
use metrics::Gauge;
#[cfg(any(feature = "cache", feature = "limit", feature = "timeout"))]
use metrics::Unit;
#[cfg(any(feature = "cache", feature = "limit", feature = "timeout"))]
use metrics::{Counter, Histogram};

/// The kind of a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricType {
    /// A monotonically increasing count.
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// A distribution of observations.
    Histogram,
}

/// One metric the crate emits.
#[derive(Debug, Clone, Copy)]
pub struct MetricInfo {
    /// The metric's full name.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: MetricType,
    /// Label names, besides `name` which every metric carries.
    pub labels: &'static [&'static str],
    /// What one unit of the value is.
    pub unit: &'static str,
    /// What the metric means.
    pub help: &'static str,
}

/// The cache's request counter, labelled by `result`.
pub const CACHE_REQUESTS: &str = "towerguard_cache_requests_total";
/// How long each upstream flight took, from start to result.
pub const CACHE_FLIGHT_DURATION: &str = "towerguard_cache_flight_duration_seconds";
/// Upstream flights that ended in an error, labelled by `kind`.
pub const CACHE_UPSTREAM_ERRORS: &str = "towerguard_cache_upstream_errors_total";
/// Background refreshes started by stale-while-revalidate.
pub const CACHE_REFRESHES: &str = "towerguard_cache_refreshes_total";
/// Stale entries served because their refresh failed (stale-if-error).
pub const CACHE_STALE_IF_ERROR: &str = "towerguard_cache_stale_if_error_total";
/// Entries in the store.
pub const CACHE_ENTRIES: &str = "towerguard_cache_entries";
/// Weighted size of the store (the weigher's unit; entries when there is no weigher).
pub const CACHE_WEIGHTED_SIZE: &str = "towerguard_cache_weighted_size";
/// Entries removed from the store, labelled by `cause`.
pub const CACHE_EVICTIONS: &str = "towerguard_cache_evictions_total";

/// Requests holding a permit of the concurrency limit.
pub const LIMIT_IN_FLIGHT: &str = "towerguard_limit_in_flight";
/// The current concurrency limit (moves when adaptive).
pub const LIMIT_LIMIT: &str = "towerguard_limit_limit";
/// Requests waiting in the limit's queue.
pub const LIMIT_QUEUE_DEPTH: &str = "towerguard_limit_queue_depth";
/// Requests admitted by the limit.
pub const LIMIT_ADMITTED: &str = "towerguard_limit_admitted_total";
/// Requests rejected by the limit, labelled by `reason`.
pub const LIMIT_REJECTED: &str = "towerguard_limit_rejected_total";
/// How long admitted requests waited in the queue.
pub const LIMIT_QUEUE_WAIT: &str = "towerguard_limit_queue_wait_seconds";
/// Requests whose timeout expired.
pub const TIMEOUT_TIMEOUTS: &str = "towerguard_timeout_timeouts_total";
/// Time from `call` to the response or the timeout, labelled by `outcome`.
pub const TIMEOUT_DURATION: &str = "towerguard_timeout_duration_seconds";

/// Attempts the retry layer sent (first attempts included).
pub const RETRY_ATTEMPTS: &str = "towerguard_retry_attempts_total";
/// Retries sent, labelled by `reason`.
pub const RETRY_RETRIES: &str = "towerguard_retry_retries_total";
/// Retries wanted but refused by the budget.
pub const RETRY_BUDGET_EXHAUSTED: &str = "towerguard_retry_budget_exhausted_total";
/// Requests returned with a retryable outcome, labelled by `reason`.
pub const RETRY_GAVE_UP: &str = "towerguard_retry_gave_up_total";
/// Attempts the hedge layer sent (first attempts included).
pub const HEDGE_ATTEMPTS: &str = "towerguard_hedge_attempts_total";
/// Hedged attempts sent.
pub const HEDGE_HEDGES: &str = "towerguard_hedge_hedges_total";
/// Requests won by a hedged attempt.
pub const HEDGE_WINS: &str = "towerguard_hedge_wins_total";
/// Hedges wanted but refused by the budget.
pub const HEDGE_BUDGET_EXHAUSTED: &str = "towerguard_hedge_budget_exhausted_total";
/// The current hedge delay.
pub const HEDGE_DELAY: &str = "towerguard_hedge_delay_seconds";

/// Second-tier (Redis) operations of a cache, labelled by `result`.
#[cfg(feature = "redis")]
pub const TIER_REQUESTS: &str = "towerguard_second_tier_requests_total";
/// How long each second-tier operation took, labelled by `op`.
#[cfg(feature = "redis")]
pub const TIER_DURATION: &str = "towerguard_second_tier_duration_seconds";
/// 1 while the second tier's breaker keeps the instance off Redis, else 0.
#[cfg(feature = "redis")]
pub const TIER_BREAKER_OPEN: &str = "towerguard_second_tier_breaker_open";
/// Backplane messages, labelled by `direction` (`sent`, `received`).
#[cfg(feature = "redis")]
pub const TIER_BACKPLANE: &str = "towerguard_second_tier_backplane_messages_total";
/// Times the first tier was emptied because the backplane reconnected (messages may
/// have been missed meanwhile).
#[cfg(feature = "redis")]
pub const TIER_RESYNCS: &str = "towerguard_second_tier_resyncs_total";
/// Cross-instance leases, labelled by `result` (`acquired`, `waited`, `takeover`,
/// `timeout`, `renewed`, `lost`).
#[cfg(feature = "redis")]
pub const TIER_LEASES: &str = "towerguard_second_tier_leases_total";

/// The metrics a cache with a second tier adds (feature `redis`).
#[cfg(feature = "redis")]
pub const TIER_METRICS: &[MetricInfo] = &[
    MetricInfo {
        name: TIER_REQUESTS,
        kind: MetricType::Counter,
        labels: &["result"],
        unit: "operations",
        help: "second-tier operations by result: hit, miss, write, error, skipped, too_large, unstored, refused, corrupt",
    },
    MetricInfo {
        name: TIER_DURATION,
        kind: MetricType::Histogram,
        labels: &["op"],
        unit: "seconds",
        help: "time of each second-tier operation: get, set, del, lease, publish, purge",
    },
    MetricInfo {
        name: TIER_BREAKER_OPEN,
        kind: MetricType::Gauge,
        labels: &[],
        unit: "state",
        help: "1 while the breaker keeps the instance off Redis, else 0",
    },
    MetricInfo {
        name: TIER_BACKPLANE,
        kind: MetricType::Counter,
        labels: &["direction"],
        unit: "messages",
        help: "backplane messages by direction: sent, received",
    },
    MetricInfo {
        name: TIER_RESYNCS,
        kind: MetricType::Counter,
        labels: &[],
        unit: "resyncs",
        help: "first tier emptied after the backplane reconnected",
    },
    MetricInfo {
        name: TIER_LEASES,
        kind: MetricType::Counter,
        labels: &["result"],
        unit: "leases",
        help: "cross-instance flights: acquired, waited, takeover, timeout, renewed, lost",
    },
];

/// Every metric the crate emits.
pub const METRICS: &[MetricInfo] = &[
    MetricInfo {
        name: CACHE_REQUESTS,
        kind: MetricType::Counter,
        labels: &["result"],
        unit: "requests",
        help: "requests by result: hit, stale, miss, coalesced, bypass",
    },
    MetricInfo {
        name: CACHE_FLIGHT_DURATION,
        kind: MetricType::Histogram,
        labels: &[],
        unit: "seconds",
        help: "time from the start of an upstream flight to its result",
    },
    MetricInfo {
        name: CACHE_UPSTREAM_ERRORS,
        kind: MetricType::Counter,
        labels: &["kind"],
        unit: "flights",
        help: "flights that ended in an error: error, panicked",
    },
    MetricInfo {
        name: CACHE_REFRESHES,
        kind: MetricType::Counter,
        labels: &[],
        unit: "flights",
        help: "background refreshes started by stale-while-revalidate",
    },
    MetricInfo {
        name: CACHE_STALE_IF_ERROR,
        kind: MetricType::Counter,
        labels: &[],
        unit: "responses",
        help: "stale entries served because the flight that should replace them failed",
    },
    MetricInfo {
        name: CACHE_ENTRIES,
        kind: MetricType::Gauge,
        labels: &[],
        unit: "entries",
        help: "entries in the store, sampled after each store write",
    },
    MetricInfo {
        name: CACHE_WEIGHTED_SIZE,
        kind: MetricType::Gauge,
        labels: &[],
        unit: "weigher units",
        help: "weighted size of the store, sampled after each store write",
    },
    MetricInfo {
        name: CACHE_EVICTIONS,
        kind: MetricType::Counter,
        labels: &["cause"],
        unit: "entries",
        help: "entries removed by cause: size, expired, invalidated",
    },
    MetricInfo {
        name: LIMIT_IN_FLIGHT,
        kind: MetricType::Gauge,
        labels: &[],
        unit: "requests",
        help: "requests holding a permit",
    },
    MetricInfo {
        name: LIMIT_LIMIT,
        kind: MetricType::Gauge,
        labels: &[],
        unit: "requests",
        help: "the current concurrency limit",
    },
    MetricInfo {
        name: LIMIT_QUEUE_DEPTH,
        kind: MetricType::Gauge,
        labels: &[],
        unit: "requests",
        help: "requests waiting for a permit",
    },
    MetricInfo {
        name: LIMIT_ADMITTED,
        kind: MetricType::Counter,
        labels: &[],
        unit: "requests",
        help: "requests given a permit",
    },
    MetricInfo {
        name: LIMIT_REJECTED,
        kind: MetricType::Counter,
        labels: &["reason"],
        unit: "requests",
        help: "requests rejected: full, queue_full, queue_timeout, queue_standing, hedge",
    },
    MetricInfo {
        name: LIMIT_QUEUE_WAIT,
        kind: MetricType::Histogram,
        labels: &[],
        unit: "seconds",
        help: "time queued requests waited for a permit",
    },
    MetricInfo {
        name: TIMEOUT_TIMEOUTS,
        kind: MetricType::Counter,
        labels: &[],
        unit: "requests",
        help: "requests whose timeout expired",
    },
    MetricInfo {
        name: TIMEOUT_DURATION,
        kind: MetricType::Histogram,
        labels: &["outcome"],
        unit: "seconds",
        help: "time from call to response or expiry: ok, error, timed_out",
    },
    MetricInfo {
        name: RETRY_ATTEMPTS,
        kind: MetricType::Counter,
        labels: &[],
        unit: "attempts",
        help: "attempts sent, first attempts included",
    },
    MetricInfo {
        name: RETRY_RETRIES,
        kind: MetricType::Counter,
        labels: &["reason"],
        unit: "attempts",
        help: "retries sent, by what called for them: error, response",
    },
    MetricInfo {
        name: RETRY_BUDGET_EXHAUSTED,
        kind: MetricType::Counter,
        labels: &[],
        unit: "requests",
        help: "retries wanted but refused by the budget",
    },
    MetricInfo {
        name: RETRY_GAVE_UP,
        kind: MetricType::Counter,
        labels: &["reason"],
        unit: "requests",
        help: "retryable outcomes returned: max_attempts, deadline, not_replayable, retry_after",
    },
    MetricInfo {
        name: HEDGE_ATTEMPTS,
        kind: MetricType::Counter,
        labels: &[],
        unit: "attempts",
        help: "attempts sent, first attempts included",
    },
    MetricInfo {
        name: HEDGE_HEDGES,
        kind: MetricType::Counter,
        labels: &[],
        unit: "attempts",
        help: "hedged attempts sent",
    },
    MetricInfo {
        name: HEDGE_WINS,
        kind: MetricType::Counter,
        labels: &[],
        unit: "requests",
        help: "requests answered by a hedged attempt",
    },
    MetricInfo {
        name: HEDGE_BUDGET_EXHAUSTED,
        kind: MetricType::Counter,
        labels: &[],
        unit: "requests",
        help: "hedges wanted but refused by the budget",
    },
    MetricInfo {
        name: HEDGE_DELAY,
        kind: MetricType::Gauge,
        labels: &[],
        unit: "seconds",
        help: "the current hedge delay",
    },
];

/// Instrument handles of one cache layer instance.
#[cfg(feature = "cache")]
#[derive(Debug, Clone)]
pub(crate) struct CacheMetrics {
    pub(crate) hit: Counter,
    pub(crate) stale: Counter,
    pub(crate) miss: Counter,
    pub(crate) coalesced: Counter,
    pub(crate) bypass: Counter,
    pub(crate) flight_duration: Histogram,
    pub(crate) upstream_error: Counter,
    pub(crate) upstream_panicked: Counter,
    pub(crate) refreshes: Counter,
    pub(crate) stale_if_error: Counter,
    pub(crate) entries: Gauge,
    pub(crate) weighted_size: Gauge,
    pub(crate) evicted_size: Counter,
    pub(crate) evicted_expired: Counter,
    pub(crate) evicted_invalidated: Counter,
}

#[cfg(feature = "cache")]
impl CacheMetrics {
    pub(crate) fn register(name: &str) -> Self {
        describe();
        let name = name.to_owned();
        let requests = |result: &'static str| metrics::counter!(CACHE_REQUESTS, "name" => name.clone(), "result" => result);
        let evictions = |cause: &'static str| metrics::counter!(CACHE_EVICTIONS, "name" => name.clone(), "cause" => cause);
        let errors = |kind: &'static str| metrics::counter!(CACHE_UPSTREAM_ERRORS, "name" => name.clone(), "kind" => kind);
        CacheMetrics {
            hit: requests("hit"),
            stale: requests("stale"),
            miss: requests("miss"),
            coalesced: requests("coalesced"),
            bypass: requests("bypass"),
            flight_duration: metrics::histogram!(CACHE_FLIGHT_DURATION, "name" => name.clone()),
            upstream_error: errors("error"),
            upstream_panicked: errors("panicked"),
            refreshes: metrics::counter!(CACHE_REFRESHES, "name" => name.clone()),
            stale_if_error: metrics::counter!(CACHE_STALE_IF_ERROR, "name" => name.clone()),
            entries: metrics::gauge!(CACHE_ENTRIES, "name" => name.clone()),
            weighted_size: metrics::gauge!(CACHE_WEIGHTED_SIZE, "name" => name.clone()),
            evicted_size: evictions("size"),
            evicted_expired: evictions("expired"),
            evicted_invalidated: evictions("invalidated"),
        }
    }
}

#[cfg(feature = "limit")]
/// Instrument handles of one concurrency limit instance.
#[derive(Debug, Clone)]
pub(crate) struct LimitMetrics {
    pub(crate) in_flight: Gauge,
    pub(crate) limit: Gauge,
    pub(crate) queue_depth: Gauge,
    pub(crate) admitted: Counter,
    pub(crate) rejected_full: Counter,
    pub(crate) rejected_queue_full: Counter,
    pub(crate) rejected_queue_timeout: Counter,
    pub(crate) rejected_standing: Counter,
    /// Hedges that found no free permit: they never queue.
    pub(crate) rejected_hedge: Counter,
    pub(crate) queue_wait: Histogram,
    /// Whether a recorder was installed at registration: without one the per-request
    /// updates are skipped (the handles would record nothing).
    recording: bool,
}

#[cfg(feature = "limit")]
impl LimitMetrics {
    /// Counts a request in: admitted, and in flight.
    #[inline]
    pub(crate) fn admit(&self) {
        if self.recording {
            self.admitted.increment(1);
            self.in_flight.increment(1.0);
        }
    }

    /// Whether a recorder was installed at registration.
    pub(crate) fn recording(&self) -> bool {
        self.recording
    }

    /// Counts a request out of flight.
    #[inline]
    pub(crate) fn release(&self) {
        if self.recording {
            self.in_flight.decrement(1.0);
        }
    }

    pub(crate) fn register(name: &str) -> Self {
        describe();
        let name = name.to_owned();
        let rejected = |reason: &'static str| metrics::counter!(LIMIT_REJECTED, "name" => name.clone(), "reason" => reason);
        LimitMetrics {
            in_flight: metrics::gauge!(LIMIT_IN_FLIGHT, "name" => name.clone()),
            limit: metrics::gauge!(LIMIT_LIMIT, "name" => name.clone()),
            queue_depth: metrics::gauge!(LIMIT_QUEUE_DEPTH, "name" => name.clone()),
            admitted: metrics::counter!(LIMIT_ADMITTED, "name" => name.clone()),
            rejected_full: rejected("full"),
            rejected_queue_full: rejected("queue_full"),
            rejected_queue_timeout: rejected("queue_timeout"),
            rejected_standing: rejected("queue_standing"),
            rejected_hedge: rejected("hedge"),
            queue_wait: metrics::histogram!(LIMIT_QUEUE_WAIT, "name" => name.clone()),
            recording: recorder_installed(),
        }
    }
}

#[cfg(feature = "timeout")]
/// Instrument handles of one timeout instance.
#[derive(Debug, Clone)]
pub(crate) struct TimeoutMetrics {
    pub(crate) timeouts: Counter,
    pub(crate) ok: Histogram,
    pub(crate) error: Histogram,
    pub(crate) timed_out: Histogram,
}

#[cfg(feature = "timeout")]
impl TimeoutMetrics {
    pub(crate) fn register(name: &str) -> Self {
        describe();
        let name = name.to_owned();
        let duration = |outcome: &'static str| metrics::histogram!(TIMEOUT_DURATION, "name" => name.clone(), "outcome" => outcome);
        TimeoutMetrics {
            timeouts: metrics::counter!(TIMEOUT_TIMEOUTS, "name" => name.clone()),
            ok: duration("ok"),
            error: duration("error"),
            timed_out: duration("timed_out"),
        }
    }
}

#[cfg(feature = "retry")]
/// Instrument handles of one retry instance.
#[derive(Debug, Clone)]
pub(crate) struct RetryMetrics {
    pub(crate) attempts: Counter,
    pub(crate) retried_error: Counter,
    pub(crate) retried_response: Counter,
    pub(crate) budget_exhausted: Counter,
    pub(crate) gave_up_max_attempts: Counter,
    pub(crate) gave_up_deadline: Counter,
    pub(crate) gave_up_not_replayable: Counter,
    pub(crate) gave_up_retry_after: Counter,
}

#[cfg(feature = "retry")]
impl RetryMetrics {
    pub(crate) fn register(name: &str) -> Self {
        describe();
        let name = name.to_owned();
        let retries = |reason: &'static str| metrics::counter!(RETRY_RETRIES, "name" => name.clone(), "reason" => reason);
        let gave_up = |reason: &'static str| metrics::counter!(RETRY_GAVE_UP, "name" => name.clone(), "reason" => reason);
        RetryMetrics {
            attempts: metrics::counter!(RETRY_ATTEMPTS, "name" => name.clone()),
            retried_error: retries("error"),
            retried_response: retries("response"),
            budget_exhausted: metrics::counter!(RETRY_BUDGET_EXHAUSTED, "name" => name.clone()),
            gave_up_max_attempts: gave_up("max_attempts"),
            gave_up_deadline: gave_up("deadline"),
            gave_up_not_replayable: gave_up("not_replayable"),
            gave_up_retry_after: gave_up("retry_after"),
        }
    }
}

/// Handles that record nothing, for retries whose layer has no recorder.
#[cfg(feature = "retry")]
pub(crate) static NOOP_RETRY: RetryMetrics = RetryMetrics {
    attempts: Counter::noop(),
    retried_error: Counter::noop(),
    retried_response: Counter::noop(),
    budget_exhausted: Counter::noop(),
    gave_up_max_attempts: Counter::noop(),
    gave_up_deadline: Counter::noop(),
    gave_up_not_replayable: Counter::noop(),
    gave_up_retry_after: Counter::noop(),
};

#[cfg(feature = "hedge")]
/// Instrument handles of one hedge instance.
#[derive(Debug, Clone)]
pub(crate) struct HedgeMetrics {
    pub(crate) attempts: Counter,
    pub(crate) hedges: Counter,
    pub(crate) wins: Counter,
    pub(crate) budget_exhausted: Counter,
    pub(crate) delay: Gauge,
}

#[cfg(feature = "hedge")]
impl HedgeMetrics {
    pub(crate) fn register(name: &str) -> Self {
        describe();
        let name = name.to_owned();
        HedgeMetrics {
            attempts: metrics::counter!(HEDGE_ATTEMPTS, "name" => name.clone()),
            hedges: metrics::counter!(HEDGE_HEDGES, "name" => name.clone()),
            wins: metrics::counter!(HEDGE_WINS, "name" => name.clone()),
            budget_exhausted: metrics::counter!(HEDGE_BUDGET_EXHAUSTED, "name" => name.clone()),
            delay: metrics::gauge!(HEDGE_DELAY, "name" => name.clone()),
        }
    }
}

#[cfg(feature = "cache")]
impl CacheMetrics {
    /// Sets the entry and size gauges from `store` (the HTTP cache's), after moka has
    /// applied the writes it still holds (its counts otherwise lag a write behind).
    #[cfg(feature = "http")]
    pub(crate) fn sample<K, V>(&self, store: &moka::sync::Cache<K, V>)
    where
        K: std::hash::Hash + Eq + Send + Sync + 'static,
        V: Clone + Send + Sync + 'static,
    {
        store.run_pending_tasks();
        self.set_size(store.entry_count(), store.weighted_size());
    }

    /// Sets the entry and size gauges.
    pub(crate) fn set_size(&self, entries: u64, weighted_size: u64) {
        self.entries.set(entries as f64);
        self.weighted_size.set(weighted_size as f64);
    }

    /// Counts a removal from a moka store: the cache's own removals (an invalidation, a
    /// stored response the origin replaced) count as invalidated.
    #[cfg(feature = "http")]
    pub(crate) fn record_removal(&self, cause: moka::notification::RemovalCause) {
        use moka::notification::RemovalCause;
        match cause {
            RemovalCause::Size => self.evicted_size.increment(1),
            RemovalCause::Expired => self.evicted_expired.increment(1),
            RemovalCause::Explicit => self.evicted_invalidated.increment(1),
            RemovalCause::Replaced => {}
        }
    }
}

#[cfg(feature = "timeout")]
/// Instrument handles registered on first use, under the instance name set by then, so a
/// layer renamed after construction never leaves a series under the default name.
pub(crate) struct Lazy<M> {
    name: String,
    register: fn(&str) -> M,
    cell: std::sync::OnceLock<(M, bool)>,
}

#[cfg(feature = "timeout")]
impl<M> Lazy<M> {
    pub(crate) fn new(name: impl Into<String>, register: fn(&str) -> M) -> Self {
        Lazy {
            name: name.into(),
            register,
            cell: std::sync::OnceLock::new(),
        }
    }

    /// The handles, registered the first time.
    pub(crate) fn get(&self) -> &M {
        &self.registered().0
    }

    /// True if a recorder was installed when the handles were registered: only then is a
    /// duration worth a clock read.
    pub(crate) fn recording(&self) -> bool {
        self.registered().1
    }

    fn registered(&self) -> &(M, bool) {
        self.cell
            .get_or_init(|| ((self.register)(&self.name), recorder_installed()))
    }
}

/// True unless the recorder in force is `metrics`' no-op one (the only recorder without
/// state: every real recorder keeps a registry). Read once per layer instance, when its
/// handles are registered.
#[cfg(any(feature = "timeout", feature = "limit"))]
pub(crate) fn recorder_installed() -> bool {
    metrics::with_recorder(|recorder| std::mem::size_of_val(recorder) != 0)
}

#[cfg(feature = "timeout")]
impl<M> std::fmt::Debug for Lazy<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").field("name", &self.name).finish()
    }
}

/// Registers the second tier's descriptions and units with the installed recorder.
#[cfg(feature = "redis")]
pub(crate) fn describe_tier() {
    describe_all(TIER_METRICS);
}

/// Registers descriptions and units with the installed recorder.
#[cfg(any(feature = "cache", feature = "limit", feature = "timeout"))]
fn describe() {
    describe_all(METRICS);
}

#[cfg(any(feature = "cache", feature = "limit", feature = "timeout"))]
fn describe_all(list: &[MetricInfo]) {
    for info in list {
        let unit = match info.unit {
            "seconds" => Some(Unit::Seconds),
            _ => None,
        };
        match (info.kind, unit) {
            (MetricType::Counter, Some(unit)) => {
                metrics::describe_counter!(info.name, unit, info.help)
            }
            (MetricType::Counter, None) => metrics::describe_counter!(info.name, info.help),
            (MetricType::Gauge, Some(unit)) => metrics::describe_gauge!(info.name, unit, info.help),
            (MetricType::Gauge, None) => metrics::describe_gauge!(info.name, info.help),
            (MetricType::Histogram, Some(unit)) => {
                metrics::describe_histogram!(info.name, unit, info.help)
            }
            (MetricType::Histogram, None) => metrics::describe_histogram!(info.name, info.help),
        }
    }
}
