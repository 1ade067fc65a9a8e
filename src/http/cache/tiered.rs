//! The HTTP cache's second tier in Redis (feature `redis`): the variants of one URI under
//! its primary key, with their status, headers, body and what freshness needs; the lease
//! that makes a miss one origin request across instances; the backplane's messages.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tokio::time::Instant;

use super::core::Core;
use super::stored::{tags, Fetch, Fetched, Stored};
use crate::cache::flight::Gate;
use crate::error::Error;
use crate::http::cache_policy::{normalised, vary, vary_matches, AgeInputs, Reuse, Vary};
use crate::tier::{
    frame_record, wall_ms, Generation, Lease, Listener, Message, Read, RedisTier, Seen,
    TierMetrics, Write, MERGED_VERSION,
};

pub(super) struct HttpTier {
    pub(super) tier: RedisTier,
    pub(super) metrics: TierMetrics,
    id: OnceLock<u64>,
}

impl HttpTier {
    pub(super) fn new(tier: RedisTier, metrics: TierMetrics) -> Self {
        HttpTier {
            tier,
            metrics,
            id: OnceLock::new(),
        }
    }

    pub(super) fn register(&self, core: &Arc<Core>) {
        let _ = self.id.set(self.tier.join(core));
    }

    fn sender(&self) -> (u64, &TierMetrics) {
        (self.id.get().copied().unwrap_or(0), &self.metrics)
    }

    /// The variants stored in Redis for `primary` (an unreadable entry reads as none), or
    /// its mark as a URI whose responses are not stored: `Err` when Redis did not answer.
    /// With it, what a write must find unchanged ([`Generation`]).
    async fn read(
        &self,
        primary: &str,
        count_miss: bool,
    ) -> (Result<Seen<Vec<Stored>>, ()>, Option<Generation>) {
        self.tier.start_bus();
        let (read, generation) = self.tier.get(primary, &self.metrics).await;
        let found = match read {
            Read::Found(bytes) => decode(&bytes).unwrap_or_else(|| {
                self.tier.corrupt(primary, &self.metrics);
                Vec::new()
            }),
            Read::Missing => Vec::new(),
            Read::Unstored => return (Ok(Seen::Unstored), generation),
            Read::Unavailable => {
                if count_miss {
                    self.metrics.miss.increment(1);
                }
                return (Err(()), None);
            }
        };
        if found.is_empty() {
            if count_miss {
                self.metrics.miss.increment(1);
            }
            return (Ok(Seen::Nothing), generation);
        }
        self.metrics.hit.increment(1);
        (Ok(Seen::Value(found)), generation)
    }

    /// What a write for `primary` must find unchanged, read now; `None` when Redis did not
    /// answer.
    pub(super) async fn generation(&self, primary: &str) -> Option<Generation> {
        self.tier.start_bus();
        self.tier.generation(primary, &self.metrics).await
    }

    /// Writes `stored` as a variant of `primary`, merged in Redis with the variants other
    /// instances wrote (it replaces the one it matches; at most `max_variants` in all),
    /// unless `primary` was invalidated since `generation` was read; the other instances
    /// drop their copies.
    async fn write(
        &self,
        primary: &str,
        stored: &Stored,
        max_variants: usize,
        generation: &Generation,
    ) -> Write {
        let now = Instant::now();
        let window = stored.stale_while_revalidate.max(stored.stale_if_error);
        let usable = stored
            .freshness
            .saturating_add(window)
            .saturating_sub(stored.current_age(now));
        if usable.is_zero() {
            return Write::NotWritten;
        }
        let id = variant_id(stored);
        let record = frame_record(&id, &encode_variant(stored, now, wall_ms()));
        self.tier
            .set(
                primary,
                record,
                Some(usable),
                &tags(&stored.headers),
                generation,
                Some((&id, max_variants)),
                self.sender(),
            )
            .await
    }

    /// Deletes `primary` in Redis and tells the other instances.
    pub(super) async fn remove(&self, primary: &str) {
        self.tier.del(primary, self.sender()).await;
    }

    /// Deletes every response under the prefix in Redis and tells the other instances.
    pub(super) async fn remove_all(&self) {
        self.tier.del_all(self.sender()).await;
    }

    /// Deletes every response tagged `tag` in Redis and tells the other instances.
    pub(super) async fn remove_tag(&self, tag: &str) {
        self.tier.del_tag(tag, self.sender()).await;
    }
}

/// What a flight for `primary` finds in the second tier before it goes to the origin.
pub(super) enum Before {
    /// A fresh variant for the request: the flight's outcome.
    Found(Arc<Fetched>),
    /// Go to the origin, then tell Redis.
    Origin(Origin),
    /// The URI is marked as one whose responses are not stored: the flight's waiters go
    /// to the origin on their own.
    Marked,
}

/// A flight going to the origin, as far as the second tier is concerned.
pub(super) struct Origin {
    /// The lease, when this instance holds it.
    guard: Option<Box<crate::tier::LeaseGuard>>,
    /// What Redis held of the URI's invalidations when the flight read it, `None` when
    /// Redis did not answer: what the origin sends that may be stored is written only
    /// with it, and only if it is unchanged.
    generation: Option<Generation>,
    /// Whether Redis held no variants for the URI: a response that cannot be stored may
    /// then mark it (no other request's variant is lost to the mark).
    may_mark: bool,
}

impl Origin {
    /// The variants were not read, only what a write must find unchanged.
    pub(super) fn unread(generation: Option<Generation>) -> Self {
        Origin {
            guard: None,
            generation,
            may_mark: false,
        }
    }

    /// The URI was found marked (so Redis held no variants of it): a response that may be
    /// stored is written, one that may not renews the mark.
    pub(super) fn marked(generation: Option<Generation>) -> Self {
        Origin {
            guard: None,
            generation,
            may_mark: true,
        }
    }
}

impl Core {
    /// The second tier's part of a flight for `primary` that has nothing stored locally:
    /// a fresh variant from Redis, or another instance's result after waiting for its
    /// lease, or the lease to go to the origin. A URI marked as one whose responses are
    /// not stored goes to the origin at once.
    pub(super) async fn before_origin(
        self: &Arc<Self>,
        tier: &Arc<HttpTier>,
        primary: &str,
        request: &HeaderMap,
        extra: &Option<String>,
    ) -> Before {
        let pick = |list: Vec<Stored>| -> Option<Arc<Fetched>> {
            let now = Instant::now();
            let chosen = list.into_iter().find(|s| {
                s.extra == *extra
                    && vary_matches(&s.vary, &s.request_headers, request)
                    && self
                        .policy
                        .storable(&http::Method::GET, request, s.status, &s.headers)
                        .is_ok()
                    && self
                        .policy
                        .reuse(request, &s.headers, s.freshness, s.current_age(now))
                        == Reuse::Fresh
            })?;
            Some(found(Arc::new(chosen), request, extra))
        };
        let (read, generation) = tier.read(primary, true).await;
        let may_mark = match read {
            Ok(Seen::Value(list)) => match pick(list) {
                Some(fetched) => return Before::Found(fetched),
                None => false,
            },
            Ok(Seen::Nothing) => true,
            Ok(Seen::Unstored) => {
                // Later misses go to the origin at once too.
                self.remember_uncacheable(primary);
                return Before::Marked;
            }
            Err(()) => return Before::Origin(Origin::unread(None)),
        };
        let origin = |guard, may_mark| {
            Before::Origin(Origin {
                guard,
                generation,
                may_mark,
            })
        };
        let read = || async {
            match tier.read(primary, false).await.0 {
                Ok(Seen::Value(list)) => pick(list).map_or(Seen::Nothing, Seen::Value),
                Ok(Seen::Unstored) => Seen::Unstored,
                Ok(Seen::Nothing) | Err(()) => Seen::Nothing,
            }
        };
        match tier.tier.lease(primary, tier.sender(), read).await {
            Lease::Found(fetched) => Before::Found(fetched),
            Lease::Held(guard) => origin(Some(guard), may_mark),
            Lease::Alone => origin(None, may_mark),
            Lease::Unstored => {
                self.remember_uncacheable(primary);
                Before::Marked
            }
        }
    }

    /// After a flight's origin request: writes what it stores (with the other variants
    /// held for `primary`) to Redis, or marks the URI when its response cannot be stored
    /// (as [`note_uncacheable`](Core::note_uncacheable) remembers it here), and releases
    /// the lease.
    pub(super) async fn after_origin(
        &self,
        tier: &HttpTier,
        primary: &str,
        outcome: &Result<Arc<Fetched>, Error>,
        origin: Origin,
        gate: &Gate,
    ) {
        let mut written = false;
        let mut mark = None;
        if let (Some(generation), Ok(fetched)) = (&origin.generation, outcome) {
            if let Some(stored) = fetched.store.as_ref().filter(|_| !gate.is_closed()) {
                match tier
                    .write(primary, stored, self.max_variants, generation)
                    .await
                {
                    Write::Written => written = true,
                    // Invalidated since the flight began: kept out of this store too.
                    Write::Refused => gate.close(),
                    Write::NotWritten => {}
                }
            } else if let Some(ttl) = self.uncacheable_ttl() {
                if origin.may_mark && self.cannot_store(fetched) && !self.holds(primary) {
                    mark = Some(ttl);
                }
            }
        }
        // Without a value written (whose message woke them), the release wakes the
        // instances waiting on the lease: a mark, sent first in the same round trip,
        // sends them to the origin at once.
        match (origin.guard, mark) {
            (Some(guard), Some(ttl)) => guard.release_marked(ttl).await,
            (Some(guard), None) => guard.release(written).await,
            (None, Some(ttl)) => tier.tier.mark_unstored(primary, ttl, &tier.metrics).await,
            (None, None) => {}
        }
    }
}

/// A flight's outcome that sends each of its waiters to the origin on its own; the
/// request `req` that started it waits in it to be taken back.
pub(super) fn unsent<B: Send + 'static>(
    req: http::Request<B>,
    request: HeaderMap,
    extra: Option<String>,
) -> Arc<Fetched> {
    Arc::new(Fetched {
        // Nothing was sent: no status of the origin's; the outcome is neither stored nor
        // noted as uncacheable (`not_stored` is `None`), only answered from.
        status: http::StatusCode::OK,
        response: Fetch::Unsent(std::sync::Mutex::new(Some(Box::new(req)))),
        request_headers: request,
        extra,
        store: None,
        not_stored: None,
        evict: None,
        revalidated: false,
        from_tier: false,
    })
}

/// A variant read from Redis as a flight's outcome.
fn found(stored: Arc<Stored>, request: &HeaderMap, extra: &Option<String>) -> Arc<Fetched> {
    Arc::new(Fetched {
        status: stored.status,
        response: Fetch::Complete {
            status: stored.status,
            headers: stored.headers.clone(),
            body: stored.body.clone(),
        },
        request_headers: request.clone(),
        extra: extra.clone(),
        store: Some(stored),
        not_stored: None,
        evict: None,
        revalidated: false,
        from_tier: true,
    })
}

impl Listener for Core {
    fn apply(&self, message: &Message<'_>) {
        let Some(tier) = &self.second else {
            return;
        };
        tier.metrics.received.increment(1);
        match message {
            // Another instance stored a newer response: the next request reads it.
            Message::Written(primary) => {
                self.store.invalidate(*primary);
                self.sample();
            }
            Message::Invalidated(primary) => self.invalidate_here(primary),
            Message::Tag(tag) => self.invalidate_tag_here(tag),
            Message::All => self.invalidate_all_here(),
            Message::Released(_) | Message::Ack(_) => {}
        }
    }

    fn resync(&self) {
        if let Some(tier) = &self.second {
            tier.metrics.resyncs.increment(1);
        }
        // Everything here may have missed an invalidation: flights and solos included.
        self.invalidate_all_here();
    }
}

// The wire format: a version byte (2), then one record per variant, most recent first,
// each framed by `frame_record` (its id, then its bytes, each after a u32 length) so the
// write script can merge one instance's variant into what the others wrote. A variant's
// bytes: its status (u16), the wall-clock time it was written and its age then (ms, u64),
// its freshness and stale windows (ms, u64 each), the key function's part, its headers,
// the nominated request headers, and its body. Lengths are u32, integers big-endian.

/// What makes a variant the same one as another for the merge: the key function's part,
/// the `Vary` field names and the nominated request values (as the first tier's
/// `with_variant` decides it).
fn variant_id(stored: &Stored) -> String {
    let mut id = String::new();
    if let Some(extra) = &stored.extra {
        id.push_str(&extra.len().to_string());
        id.push(':');
        id.push_str(extra);
    }
    id.push('|');
    if let Vary::Fields(names) = &stored.vary {
        for name in names {
            id.push_str(name.as_str());
            id.push('=');
            id.push_str(&normalised(&stored.request_headers, name).unwrap_or_default());
            id.push('\n');
        }
    }
    id
}

/// One variant's bytes, as written at `written` (wall-clock ms).
fn encode_variant(s: &Stored, now: Instant, written: u64) -> Vec<u8> {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let mut out = Vec::with_capacity(s.weight() as usize + 64);
    out.extend_from_slice(&s.status.as_u16().to_be_bytes());
    for n in [
        written,
        ms(s.current_age(now)),
        ms(s.freshness),
        ms(s.stale_while_revalidate),
        ms(s.stale_if_error),
    ] {
        out.extend_from_slice(&n.to_be_bytes());
    }
    match &s.extra {
        Some(extra) => {
            out.push(1);
            put_bytes(&mut out, extra.as_bytes());
        }
        None => out.push(0),
    }
    put_headers(&mut out, &s.headers);
    put_headers(&mut out, &s.request_headers);
    put_bytes(&mut out, &s.body);
    out
}

/// A whole list as the write script leaves it (for tests).
#[cfg(test)]
fn encode(list: &[Arc<Stored>], now: Instant) -> Vec<u8> {
    let written = wall_ms();
    let mut out = MERGED_VERSION.to_vec();
    for s in list {
        out.extend(frame_record(
            &variant_id(s),
            &encode_variant(s, now, written),
        ));
    }
    out
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn put_headers(out: &mut Vec<u8>, headers: &HeaderMap) {
    out.extend_from_slice(&(headers.len() as u32).to_be_bytes());
    for (name, value) in headers {
        put_bytes(out, name.as_str().as_bytes());
        put_bytes(out, value.as_bytes());
    }
}

/// Reads a list the write script left; `None` for anything else (counted as a miss).
fn decode(bytes: &[u8]) -> Option<Vec<Stored>> {
    let mut r = Reader(bytes);
    if r.take(1)? != MERGED_VERSION {
        return None;
    }
    let now_wall = wall_ms();
    let mut list = Vec::new();
    while !r.0.is_empty() {
        let _id = r.bytes()?;
        let mut v = Reader(r.bytes()?);
        list.push(v.variant(now_wall)?);
        if !v.0.is_empty() {
            return None;
        }
    }
    Some(list)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = u32::from_be_bytes(self.array()?) as usize;
        self.take(len)
    }

    /// One variant's bytes, its age carried on from `now_wall` (wall-clock ms).
    fn variant(&mut self, now_wall: u64) -> Option<Stored> {
        let status = StatusCode::from_u16(u16::from_be_bytes(self.array()?)).ok()?;
        let mut n = [0u64; 5];
        for slot in &mut n {
            *slot = u64::from_be_bytes(self.array()?);
        }
        let [written, age_then, freshness, swr, sie] = n;
        let extra = match self.take(1)?[0] {
            0 => None,
            _ => Some(String::from_utf8(self.bytes()?.to_vec()).ok()?),
        };
        let headers = self.headers()?;
        let request_headers = self.headers()?;
        let body = Bytes::copy_from_slice(self.bytes()?);
        // Its age now: its age when written, plus the time since (by the wall clock,
        // which every instance shares).
        let age = Duration::from_millis(age_then.saturating_add(now_wall.saturating_sub(written)));
        let response_time = SystemTime::now();
        let request_time = response_time.checked_sub(age).unwrap_or(response_time);
        Some(Stored {
            status,
            vary: vary(&headers),
            headers,
            body,
            request_headers,
            extra,
            age: AgeInputs {
                age_header: None,
                date: None,
                request_time,
                response_time,
            },
            stored_at: Instant::now(),
            freshness: Duration::from_millis(freshness),
            stale_while_revalidate: Duration::from_millis(swr),
            stale_if_error: Duration::from_millis(sie),
        })
    }

    fn headers(&mut self) -> Option<HeaderMap> {
        let count = u32::from_be_bytes(self.array()?) as usize;
        let mut headers = HeaderMap::with_capacity(count.min(1024));
        for _ in 0..count {
            let name = HeaderName::from_bytes(self.bytes()?).ok()?;
            let value = HeaderValue::from_bytes(self.bytes()?).ok()?;
            headers.append(name, value);
        }
        Some(headers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(body: &'static str, extra: Option<&str>) -> Stored {
        let mut headers = HeaderMap::new();
        headers.insert("cache-control", HeaderValue::from_static("max-age=60"));
        headers.insert("vary", HeaderValue::from_static("accept-language"));
        headers.append("cache-tag", HeaderValue::from_static("a, b"));
        headers.append("set-cookie", HeaderValue::from_static("x=1"));
        headers.append("set-cookie", HeaderValue::from_static("y=2"));
        let mut request_headers = HeaderMap::new();
        request_headers.insert("accept-language", HeaderValue::from_static("fr"));
        Stored {
            status: StatusCode::OK,
            vary: vary(&headers),
            headers,
            body: Bytes::from_static(body.as_bytes()),
            request_headers,
            extra: extra.map(str::to_owned),
            age: AgeInputs {
                age_header: Some(10),
                date: None,
                request_time: SystemTime::now(),
                response_time: SystemTime::now(),
            },
            stored_at: Instant::now(),
            freshness: Duration::from_secs(60),
            stale_while_revalidate: Duration::from_secs(5),
            stale_if_error: Duration::from_secs(7),
        }
    }

    #[test]
    fn variants_read_back_as_written() {
        let list = vec![
            Arc::new(stored("bonjour", Some("tenant"))),
            Arc::new(stored("", None)),
        ];
        let bytes = encode(&list, Instant::now());
        let back = decode(&bytes).expect("readable");
        assert_eq!(back.len(), 2);
        for (a, b) in list.iter().zip(&back) {
            assert_eq!(a.status, b.status);
            assert_eq!(a.headers, b.headers);
            assert_eq!(a.request_headers, b.request_headers);
            assert_eq!(a.body, b.body);
            assert_eq!(a.extra, b.extra);
            assert_eq!(a.vary, b.vary);
            assert_eq!(a.freshness, b.freshness);
            assert_eq!(a.stale_while_revalidate, b.stale_while_revalidate);
            assert_eq!(a.stale_if_error, b.stale_if_error);
            // The age goes on from where it was (10 s from the Age header).
            let age = b.current_age(Instant::now());
            assert!(age >= Duration::from_secs(10), "{age:?}");
        }
    }

    #[test]
    fn anything_else_reads_as_nothing() {
        let bytes = encode(&[Arc::new(stored("x", None))], Instant::now());
        for cut in 0..bytes.len() {
            // Cut at the record's start, it is a list of none: a miss all the same.
            let read = decode(&bytes[..cut]);
            assert!(read.is_none_or(|list| list.is_empty()), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(&longer).is_none());
        let mut other = bytes;
        other[0] = 9;
        assert!(decode(&other).is_none());
    }

    #[test]
    fn tags_come_from_cache_tag_and_surrogate_key() {
        let mut headers = HeaderMap::new();
        headers.append("cache-tag", HeaderValue::from_static("news, sport"));
        headers.append("cache-tag", HeaderValue::from_static("news"));
        headers.append("surrogate-key", HeaderValue::from_static("front  page"));
        assert_eq!(tags(&headers), ["front", "news", "page", "sport"]);
        assert!(tags(&HeaderMap::new()).is_empty());
    }
}
