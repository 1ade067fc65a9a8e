//! What the cache keeps and what a flight brings back.

use std::any::Any;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tokio::time::Instant;

use crate::http::cache_policy::{AgeInputs, HttpCachePolicy, NotStored, Vary};

/// A stored response: one variant of one URI.
pub(super) struct Stored {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) body: Bytes,
    pub(super) vary: Vary,
    /// The nominated request fields of the request that fetched it.
    pub(super) request_headers: HeaderMap,
    /// The user key function's part of the key, when one is set.
    pub(super) extra: Option<String>,
    pub(super) age: AgeInputs,
    pub(super) stored_at: Instant,
    pub(super) freshness: Duration,
    pub(super) stale_while_revalidate: Duration,
    pub(super) stale_if_error: Duration,
}

impl Stored {
    pub(super) fn current_age(&self, now: Instant) -> Duration {
        self.age
            .current_age(now.saturating_duration_since(self.stored_at))
    }

    pub(super) fn in_window(&self, now: Instant, window: Duration) -> bool {
        self.current_age(now) < self.freshness.saturating_add(window)
    }

    pub(super) fn ttl(&self, now: Instant) -> i64 {
        let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        secs(self.freshness).saturating_sub(secs(self.current_age(now)))
    }

    /// This response with `headers` from a 304 or a matching HEAD's 200 (already merged
    /// and judged shareable by [`HttpCachePolicy::refresh`]): the same body and variant,
    /// a new freshness and age.
    pub(super) fn refreshed(
        &self,
        policy: &HttpCachePolicy,
        headers: HeaderMap,
        request_time: SystemTime,
        response_time: SystemTime,
    ) -> Stored {
        let (swr, sie) = policy.stale_windows(&headers);
        Stored {
            status: self.status,
            freshness: policy.freshness(self.status, &headers),
            stale_while_revalidate: swr,
            stale_if_error: sie,
            age: AgeInputs::from_headers(&headers, request_time, response_time),
            stored_at: Instant::now(),
            vary: self.vary.clone(),
            request_headers: self.request_headers.clone(),
            extra: self.extra.clone(),
            body: self.body.clone(),
            headers: compact(&headers),
        }
    }

    /// What this variant costs in memory, in bytes: its body, its fields and the
    /// request fields it was chosen by (each with the map's own per-field cost), and the
    /// fixed cost of an entry (the variant, its list, the store's bookkeeping).
    pub(super) fn weight(&self) -> u32 {
        let fields = |headers: &HeaderMap| -> usize {
            headers
                .iter()
                .map(|(n, v)| n.as_str().len() + v.len() + PER_FIELD)
                .sum()
        };
        let extra = self.extra.as_ref().map_or(0, String::len);
        let total = self.body.len()
            + fields(&self.headers)
            + fields(&self.request_headers)
            + extra
            + PER_VARIANT;
        u32::try_from(total).unwrap_or(u32::MAX)
    }
}

/// The memory one header field costs beyond its name and value: the map's entry and
/// index, and the value's allocation. Measured with `benches/memory_flood.sh`.
const PER_FIELD: usize = 128;

/// The memory one stored variant costs beyond its fields and body: the variant itself,
/// its place in the URI's list, and the store's per-entry bookkeeping. Measured with
/// `benches/memory_flood.sh`.
const PER_VARIANT: usize = 1024;

/// `headers` with every name and value copied into allocations of their own.
pub(super) fn compact(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let name =
            HeaderName::from_bytes(name.as_str().as_bytes()).unwrap_or_else(|_| name.clone());
        let mut copy = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
        copy.set_sensitive(value.is_sensitive());
        out.append(name, copy);
    }
    out
}

/// The variants stored for one URI, and their tags (read once, when the list is made).
pub(super) struct Variants(pub(super) Vec<Arc<Stored>>, Vec<String>);

impl Variants {
    pub(super) fn new(list: Vec<Arc<Stored>>) -> Self {
        let tags = list_tags(&list);
        Variants(list, tags)
    }

    /// Every tag of every variant, once each, in order.
    pub(super) fn tags(&self) -> &[String] {
        &self.1
    }
}

/// What a flight brings back.
pub(super) struct Fetched {
    /// The origin's status (304 for a revalidation).
    pub(super) status: StatusCode,
    pub(super) response: Fetch,
    /// Headers of the request that fetched it, to judge whether another waiter may use it.
    pub(super) request_headers: HeaderMap,
    /// The key function's part for that request.
    pub(super) extra: Option<String>,
    /// The entry to store, when the response may be stored.
    pub(super) store: Option<Arc<Stored>>,
    pub(super) not_stored: Option<NotStored>,
    /// A stored variant the outcome says may no longer be shared (a 304 that ended the
    /// sharing): removed when the flight finishes.
    pub(super) evict: Option<Arc<Stored>>,
    /// It was a 304 to a revalidation: the stored body with refreshed headers.
    pub(super) revalidated: bool,
    /// It came from the second tier: answered as a hit.
    pub(super) from_tier: bool,
}

pub(super) enum Fetch {
    Complete {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    },
    /// A response only the request that started the flight may have (too large, or not
    /// storable): a `Response<BufferedBody<RB>>`, taken once.
    Streaming(Mutex<Option<Box<dyn Any + Send>>>),
    /// Not sent: the second tier marks the URI as one whose responses are not stored, so
    /// every request that waited for the flight goes to the origin on its own, at once.
    /// Holds the request that started the flight (a `Request<B>`) for it to take back.
    #[cfg(feature = "redis")]
    Unsent(Mutex<Option<Box<dyn Any + Send>>>),
}

/// What a flight is keyed by: everything that decides whether its response may be
/// shared with a request. A request only joins a flight whose response it may use, so it
/// never waits for, nor inherits the outcome of, an unrelated request's origin call.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(super) struct FlightKey {
    /// The primary key (`scheme://authority/path?query`), under which it is stored.
    pub(super) primary: String,
    /// The user key function's part.
    pub(super) extra: Option<String>,
    /// The request's own credentials: a response to them is shared only when it says so.
    pub(super) credentials: Option<HeaderValue>,
    /// The request's values of every field a stored variant of the URI varies on.
    pub(super) nominated: Vec<Option<String>>,
}

/// A user function that adds to the key: `None` bypasses the cache.
pub(super) type KeyExtra = Arc<dyn Fn(&http::Uri, &HeaderMap) -> Option<String> + Send + Sync>;

/// The fields whose values tag a response: `Cache-Tag` (comma-separated) and
/// `Surrogate-Key` (space-separated).
pub(super) const TAG_FIELDS: [&str; 2] = ["cache-tag", "surrogate-key"];

/// The tags `headers` give a response.
pub(super) fn tags(headers: &HeaderMap) -> Vec<String> {
    let mut out: Vec<String> = TAG_FIELDS
        .iter()
        .flat_map(|name| headers.get_all(*name))
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split([',', ' ', '\t']))
        .filter(|tag| !tag.is_empty())
        .map(str::to_owned)
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Every tag of the responses in `list`, once each.
pub(super) fn list_tags(list: &[Arc<Stored>]) -> Vec<String> {
    let mut all: Vec<String> = list.iter().flat_map(|s| tags(&s.headers)).collect();
    all.sort_unstable();
    all.dedup();
    all
}
