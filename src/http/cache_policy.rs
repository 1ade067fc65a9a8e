//! RFC 9111 rules for a shared cache, as functions of messages: what may be stored, for how
//! long it is fresh, how old it is, which requests it may answer, when it may be served
//! stale, what an unsafe request invalidates, and the `Cache-Status` (RFC 9211) to report.
//!
//! These are the decisions the HTTP cache layer makes; they are kept free of I/O and of
//! clocks (times are arguments) so each rule is tested on its own.

use std::fmt;
use std::time::{Duration, SystemTime};

use http::header::{
    HeaderName, ACCEPT_ENCODING, ACCEPT_LANGUAGE, AGE, AUTHORIZATION, CONTENT_LOCATION, DATE, ETAG,
    EXPIRES, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED, LOCATION, SET_COOKIE, VARY,
};
use http::{HeaderMap, Method, StatusCode, Uri};

use super::cache_control::{CacheControl, Seconds, DELTA_SECONDS_MAX};

/// Why a response was not stored (the `detail` of its `Cache-Status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NotStored {
    /// The request method is not GET (HEAD is answered from a stored GET).
    Method,
    /// The status is not final, or is one the cache does not store (206, 304).
    Status,
    /// `no-store` in the request or the response.
    NoStore,
    /// `private`: a shared cache must not store it.
    Private,
    /// The request carried `Authorization` and the response did not say it may be shared.
    Authorization,
    /// The response sets a cookie.
    SetCookie,
    /// `Vary: *`: no later request can match it.
    VaryStar,
    /// No explicit freshness and not heuristically cacheable.
    NoFreshness,
    /// The body is larger than the cache's limit.
    TooLarge,
    /// The body did not match its `Content-Length` (shorter or longer): an incomplete or
    /// mis-framed response is not stored (RFC 9112 section 6.3, RFC 9111 section 3.3).
    Incomplete,
}

impl NotStored {
    /// A short token for headers and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            NotStored::Method => "method",
            NotStored::Status => "status",
            NotStored::NoStore => "no-store",
            NotStored::Private => "private",
            NotStored::Authorization => "authorization",
            NotStored::SetCookie => "set-cookie",
            NotStored::VaryStar => "vary-star",
            NotStored::NoFreshness => "no-freshness",
            NotStored::TooLarge => "too-large",
            NotStored::Incomplete => "incomplete",
        }
    }
}

/// The rules a shared cache applies, with the few choices RFC 9111 leaves to the cache.
#[derive(Debug, Clone)]
pub struct HttpCachePolicy {
    store_set_cookie: bool,
    client_directives: bool,
    heuristic_fraction: f64,
    max_heuristic: Duration,
    default_ttl: Option<Duration>,
    stale_on_error: Duration,
    targeted: bool,
}

/// `CDN-Cache-Control` (RFC 9213): `Cache-Control` for CDNs alone.
pub const CDN_CACHE_CONTROL: HeaderName = HeaderName::from_static("cdn-cache-control");
/// `Surrogate-Control` (the Edge Architecture specification): `Cache-Control` for
/// surrogates (reverse proxies) alone, removed before the response goes on.
pub const SURROGATE_CONTROL: HeaderName = HeaderName::from_static("surrogate-control");
/// `Surrogate-Capability`: what a surrogate tells the origin it can do.
pub const SURROGATE_CAPABILITY: HeaderName = HeaderName::from_static("surrogate-capability");

impl Default for HttpCachePolicy {
    fn default() -> Self {
        HttpCachePolicy {
            store_set_cookie: false,
            client_directives: true,
            heuristic_fraction: 0.1,
            max_heuristic: Duration::from_secs(24 * 3600),
            default_ttl: None,
            stale_on_error: Duration::ZERO,
            targeted: false,
        }
    }
}

/// True for the status codes RFC 9110 section 15.1 defines as heuristically cacheable.
pub fn is_heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 206 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// True for the final status codes whose caching requirements this cache implements: the
/// heuristically cacheable ones and the redirections (RFC 9111 section 5.2.2.3).
pub fn is_understood(status: StatusCode) -> bool {
    is_heuristically_cacheable(status) || matches!(status.as_u16(), 302 | 303 | 307)
}

/// The `Age` of a response, read strictly (RFC 9111 section 5.1): one field line whose
/// value is one non-negative integer. Anything else (`abc`, `-7200`, `7200.0`, a list, two
/// lines, a parameter) is read as the largest age, so the response counts as stale;
/// `None` when there is no `Age`. Values past 2^31 are capped there (section 1.2.2).
pub fn age(headers: &HeaderMap) -> Option<u64> {
    let mut lines = headers.get_all(AGE).iter();
    let first = lines.next()?;
    if lines.next().is_some() {
        return Some(DELTA_SECONDS_MAX);
    }
    let value = first.as_bytes().trim_ascii();
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return Some(DELTA_SECONDS_MAX);
    }
    let parsed = value.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    });
    Some(parsed.map_or(DELTA_SECONDS_MAX, |n| n.min(DELTA_SECONDS_MAX)))
}

fn http_date(headers: &HeaderMap, name: HeaderName) -> Option<SystemTime> {
    let value = headers.get(name)?.to_str().ok()?;
    httpdate::parse_http_date(value.trim()).ok()
}

impl HttpCachePolicy {
    /// Store responses that set cookies (off by default: a shared cache would hand one
    /// user's cookie to everyone).
    pub fn store_set_cookie(mut self, store: bool) -> Self {
        self.store_set_cookie = store;
        self
    }

    /// Ignore the request's own `Cache-Control` (`max-age`, `min-fresh`, `max-stale`,
    /// `no-cache`, `no-store`): CDN mode, which keeps clients from forcing origin load at
    /// will (a reload, a cache-busting client). Off by default: the request directives
    /// are honoured as RFC 9111 section 5.2.1 says.
    pub fn ignore_client_directives(mut self, ignore: bool) -> Self {
        self.client_directives = !ignore;
        self
    }

    /// Targeted cache-control fields, for a cache run as a CDN node or a reverse proxy
    /// (off by default):
    ///
    /// | field | effect |
    /// |---|---|
    /// | `CDN-Cache-Control` (RFC 9213) | when present, this cache reads its directives *instead of* `Cache-Control` (which still goes on to clients); the field itself is passed on, for CDNs further down |
    /// | `Surrogate-Control` (Edge Architecture 1.0) | when present (and no `CDN-Cache-Control`), read instead of `Cache-Control`: `max-age=N` (and `N+M`: `M` more seconds of stale-if-error), `no-store`, `no-store-remote` (this cache is remote: not stored), `content` (read, not acted on: no ESI here); removed before the response goes on |
    /// | `Surrogate-Capability` | sent to the origin on every request: `towerguard="Surrogate/1.0"` |
    ///
    /// A stored response keeps both fields, so every later decision reads them too.
    ///
    /// ```
    /// use std::time::Duration;
    /// use http::{HeaderMap, HeaderValue, StatusCode};
    /// use towerguard::http::cache_policy::HttpCachePolicy;
    ///
    /// let policy = HttpCachePolicy::default().targeted_fields(true);
    /// let mut response = HeaderMap::new();
    /// response.insert("cache-control", HeaderValue::from_static("max-age=0"));
    /// response.insert("cdn-cache-control", HeaderValue::from_static("max-age=600"));
    /// assert_eq!(policy.freshness(StatusCode::OK, &response), Duration::from_secs(600));
    /// ```
    pub fn targeted_fields(mut self, on: bool) -> Self {
        self.targeted = on;
        self
    }

    /// True when `CDN-Cache-Control` and `Surrogate-Control` are read (see
    /// [`targeted_fields`](Self::targeted_fields)).
    pub fn honours_targeted_fields(&self) -> bool {
        self.targeted
    }

    /// The response's cache directives for this cache: from its targeted field when
    /// [`targeted_fields`](Self::targeted_fields) is on and it has one, else from
    /// `Cache-Control`.
    pub fn response_directives(&self, response: &HeaderMap) -> CacheControl {
        if self.targeted {
            if response.contains_key(&CDN_CACHE_CONTROL) {
                return CacheControl::parse(
                    response
                        .get_all(&CDN_CACHE_CONTROL)
                        .iter()
                        .map(|v| v.as_bytes()),
                );
            }
            if response.contains_key(&SURROGATE_CONTROL) {
                return surrogate_control(response);
            }
        }
        CacheControl::from_headers(response)
    }

    /// True when the request's own `Cache-Control` is honoured (the default).
    pub fn honours_client_directives(&self) -> bool {
        self.client_directives
    }

    /// Serve a stale response, up to `max` past its freshness, when the origin cannot be
    /// reached or answers 500, 502, 503 or 504 (RFC 9111 section 4.2.4 allows a
    /// disconnected cache to), unless the response forbids serving it stale
    /// (`must-revalidate`, `proxy-revalidate`, `no-cache`, `s-maxage`). Off (zero) by
    /// default; a response's own `stale-if-error` applies either way.
    pub fn stale_on_error(mut self, max: Duration) -> Self {
        self.stale_on_error = max;
        self
    }

    /// Heuristic freshness: `fraction` of the time since `Last-Modified`, at most `max`.
    pub fn heuristic(mut self, fraction: f64, max: Duration) -> Self {
        self.heuristic_fraction = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.1
        };
        self.max_heuristic = max;
        self
    }

    /// Freshness for responses the rules allow to cache but that give none (no explicit
    /// freshness, no `Last-Modified` to reason from), bounded like the heuristic.
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = Some(ttl);
        self
    }

    /// Whether a shared cache may store `status`/`response` for a request with
    /// `method`/`request` (RFC 9111 section 3, and 3.5 for `Authorization`).
    pub fn storable(
        &self,
        method: &Method,
        request: &HeaderMap,
        status: StatusCode,
        response: &HeaderMap,
    ) -> Result<(), NotStored> {
        if *method != Method::GET {
            return Err(NotStored::Method);
        }
        if status.is_informational()
            || status == StatusCode::PARTIAL_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return Err(NotStored::Status);
        }
        let req_cc = CacheControl::from_headers(request);
        let res_cc = self.response_directives(response);
        if self.request_no_store(&req_cc) || res_cc.no_store {
            return Err(NotStored::NoStore);
        }
        if res_cc.private {
            return Err(NotStored::Private);
        }
        // must-understand with a status whose caching rules this cache does not implement
        // (section 5.2.2.3).
        if res_cc.must_understand && !is_understood(status) {
            return Err(NotStored::Status);
        }
        if request.contains_key(AUTHORIZATION)
            && !(res_cc.public || res_cc.s_maxage.is_some() || res_cc.must_revalidate)
        {
            return Err(NotStored::Authorization);
        }
        if !self.store_set_cookie && response.contains_key(SET_COOKIE) {
            return Err(NotStored::SetCookie);
        }
        if matches!(vary(response), Vary::Star) {
            return Err(NotStored::VaryStar);
        }
        let explicit = res_cc.max_age.is_some()
            || res_cc.s_maxage.is_some()
            || response.contains_key(EXPIRES)
            || res_cc.public;
        if !explicit && !is_heuristically_cacheable(status) {
            return Err(NotStored::NoFreshness);
        }
        Ok(())
    }

    /// The freshness lifetime of a stored response (RFC 9111 section 4.2.1, shared cache):
    /// `s-maxage`, then `max-age`, then `Expires` minus `Date`, then the heuristic.
    ///
    /// A response with `no-cache` (any case, qualified or not: conservatively the whole
    /// response) has none: it may be stored, but every use needs a successful validation
    /// first (section 5.2.2.4), and without a validator it is not worth storing.
    pub fn freshness(&self, status: StatusCode, response: &HeaderMap) -> Duration {
        let cc = self.response_directives(response);
        if cc.no_cache {
            return Duration::ZERO;
        }
        if let Some(s) = cc.s_maxage {
            return s.duration();
        }
        if let Some(s) = cc.max_age {
            return s.duration();
        }
        if response.contains_key(EXPIRES) {
            // An invalid Expires (or a second one) means already expired.
            let Some(expires) = http_date(response, EXPIRES) else {
                return Duration::ZERO;
            };
            let date = http_date(response, DATE).unwrap_or_else(SystemTime::now);
            return expires.duration_since(date).unwrap_or(Duration::ZERO);
        }
        if !is_heuristically_cacheable(status) && !cc.public {
            return Duration::ZERO;
        }
        let heuristic = match (
            http_date(response, LAST_MODIFIED),
            http_date(response, DATE),
        ) {
            (Some(modified), Some(date)) => date
                .duration_since(modified)
                .ok()
                .map(|since| since.mul_f64(self.heuristic_fraction)),
            _ => None,
        };
        heuristic
            .or(self.default_ttl)
            .unwrap_or(Duration::ZERO)
            .min(self.max_heuristic)
    }

    /// How long past its freshness a response may be served while it is revalidated in
    /// the background (its `stale-while-revalidate`), and when its refresh fails (the
    /// longer of its `stale-if-error` and the configured
    /// [`stale_on_error`](Self::stale_on_error)); both zero when RFC 9111 forbids serving
    /// it stale (sections 4.2.4, 5.2.2.2, 5.2.2.4, 5.2.2.8, 5.2.2.10; RFC 5861).
    pub fn stale_windows(&self, response: &HeaderMap) -> (Duration, Duration) {
        let cc = self.response_directives(response);
        if cc.forbids_stale() {
            return (Duration::ZERO, Duration::ZERO);
        }
        let window = |s: Option<Seconds>| s.map_or(Duration::ZERO, Seconds::duration);
        (
            window(cc.stale_while_revalidate),
            window(cc.stale_if_error).max(self.stale_on_error),
        )
    }

    /// How a stored response `response`, `age` old with a freshness lifetime of
    /// `freshness`, may answer a request with headers `request`: the request's directives
    /// (RFC 9111 section 5.2.1) against the stored response's freshness (section 4.2),
    /// with `immutable` (RFC 8246) and CDN mode ([`ignore_client_directives`](Self::ignore_client_directives)).
    ///
    /// - `max-age=N`: usable only when no older than N (a reload sends `max-age=0`),
    ///   except a fresh `immutable` response, which a reload does not revalidate;
    /// - `min-fresh=N`: usable only when fresh for at least N more;
    /// - `no-cache`: validated with the origin first (a forced reload; `immutable` too);
    /// - `max-stale[=N]`: a stale response may be used (up to N past its freshness)
    ///   unless the response forbids serving it stale;
    /// - an invalid value counts as zero.
    pub fn reuse(
        &self,
        request: &HeaderMap,
        response: &HeaderMap,
        freshness: Duration,
        age: Duration,
    ) -> Reuse {
        let fresh = age < freshness;
        if !self.client_directives || !request.contains_key(http::header::CACHE_CONTROL) {
            return if fresh { Reuse::Fresh } else { Reuse::Stale };
        }
        let req = CacheControl::from_headers(request);
        let res = self.response_directives(response);
        if req.no_cache {
            return Reuse::Validate;
        }
        if fresh {
            let too_old = req.max_age.is_some_and(|max| age > max.duration());
            if too_old && !res.immutable {
                return Reuse::Validate;
            }
            let left = freshness - age;
            if req.min_fresh.is_some_and(|min| left < min.duration()) {
                return Reuse::Validate;
            }
            return Reuse::Fresh;
        }
        if let Some(max_stale) = req.max_stale {
            let stale_for = age - freshness;
            let accepted = match max_stale {
                None => true,
                Some(limit) => stale_for <= limit.duration(),
            };
            let within_max_age = req.max_age.is_none_or(|max| age <= max.duration());
            if accepted && within_max_age && !res.forbids_stale() {
                return Reuse::StaleAccepted;
            }
        }
        Reuse::Stale
    }

    /// True when the request's `no-store` keeps its response out of the store (section
    /// 5.2.1.5), which CDN mode ignores.
    fn request_no_store(&self, request: &CacheControl) -> bool {
        self.client_directives && request.no_store
    }
}

/// `Surrogate-Control`'s directives as this cache reads them (see
/// [`HttpCachePolicy::targeted_fields`]): a directive targeted at a device (`;name`) is
/// read as if it were for every surrogate.
fn surrogate_control(response: &HeaderMap) -> CacheControl {
    let mut cc = CacheControl::default();
    for line in response.get_all(&SURROGATE_CONTROL) {
        let line = String::from_utf8_lossy(line.as_bytes());
        for directive in line.split(',') {
            let directive = directive.split(';').next().unwrap_or("").trim();
            let (name, value) = match directive.split_once('=') {
                Some((name, value)) => (name.trim(), Some(value.trim().trim_matches('"'))),
                None => (directive, None),
            };
            match name.to_ascii_lowercase().as_str() {
                "no-store" | "no-store-remote" => cc.no_store = true,
                "max-age" => {
                    let value = value.unwrap_or("");
                    let (fresh, stale) = match value.split_once('+') {
                        Some((fresh, stale)) => (fresh, Some(stale)),
                        None => (value, None),
                    };
                    cc.max_age = Some(Seconds::parse(fresh));
                    if let Some(stale) = stale {
                        cc.stale_if_error = Some(Seconds::parse(stale));
                    }
                }
                _ => {}
            }
        }
    }
    cc
}

/// How a stored response may answer a request: [`HttpCachePolicy::reuse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// Fresh enough for the request: served from the cache.
    Fresh,
    /// Stale, and the request accepts it stale (`max-stale`): served from the cache.
    StaleAccepted,
    /// Stale: revalidated (or served within `stale-while-revalidate`).
    Stale,
    /// The request asks for validation (`no-cache`, `max-age`, `min-fresh`): validated with
    /// the origin before use, never served stale while revalidating.
    Validate,
}

/// True for the origin statuses after which a stale response may be served instead
/// (RFC 5861 section 4): 500, 502, 503 and 504.
pub fn is_stale_on_error_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 500 | 502 | 503 | 504)
}

/// Inputs of the age calculation (RFC 9111 section 4.2.3).
#[derive(Debug, Clone, Copy)]
pub struct AgeInputs {
    /// The `Age` header of the response as received, in seconds.
    pub age_header: Option<u64>,
    /// The `Date` header of the response.
    pub date: Option<SystemTime>,
    /// When the request that fetched it was sent.
    pub request_time: SystemTime,
    /// When its response was received.
    pub response_time: SystemTime,
}

impl AgeInputs {
    /// Reads `Age` and `Date` from the stored response's headers.
    pub fn from_headers(
        headers: &HeaderMap,
        request_time: SystemTime,
        response_time: SystemTime,
    ) -> Self {
        let age_header = age(headers);
        AgeInputs {
            age_header,
            date: http_date(headers, DATE),
            request_time,
            response_time,
        }
    }

    /// The age when it was stored: `corrected_initial_age`.
    pub fn initial_age(&self) -> Duration {
        let apparent = self
            .date
            .and_then(|date| self.response_time.duration_since(date).ok())
            .unwrap_or(Duration::ZERO);
        let delay = self
            .response_time
            .duration_since(self.request_time)
            .unwrap_or(Duration::ZERO);
        let corrected = Duration::from_secs(self.age_header.unwrap_or(0)).saturating_add(delay);
        apparent.max(corrected)
    }

    /// The current age after `resident` in the cache: `corrected_initial_age +
    /// resident_time`.
    pub fn current_age(&self, resident: Duration) -> Duration {
        self.initial_age().saturating_add(resident)
    }
}

/// The `Vary` of a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vary {
    /// No `Vary`: any request for the URI matches.
    None,
    /// `Vary: *`: no request matches.
    Star,
    /// The request fields that must match, lowercase, in order.
    Fields(Vec<HeaderName>),
}

/// The `Vary` of `response`: every field line, comma-separated lists, names compared
/// case-insensitively. A line that is not text or names something that is not a field
/// name counts as `*`: nobody can tell which requests the response fits, so it fits none
/// (skipping it would share a response that varies on, say, `Authorization`).
pub fn vary(response: &HeaderMap) -> Vary {
    let mut fields = Vec::new();
    for line in response.get_all(VARY) {
        let Ok(line) = line.to_str() else {
            return Vary::Star;
        };
        for name in line.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*" {
                return Vary::Star;
            }
            let Ok(name) = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) else {
                return Vary::Star;
            };
            if !fields.contains(&name) {
                fields.push(name);
            }
        }
    }
    if fields.is_empty() {
        Vary::None
    } else {
        Vary::Fields(fields)
    }
}

/// A field's values normalised for comparison: lines joined with commas, whitespace
/// around list elements removed. `Accept-Encoding` and `Accept-Language`, whose elements
/// are case-insensitive tokens and whose order does not change what a server picks for a
/// given set of weights, are also lowercased, stripped of inner whitespace and sorted, so
/// `en-US, fr;q=0.5` and `fr; q=0.5,en-us` select the same variant.
pub(crate) fn normalised(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut parts = Vec::new();
    for value in headers.get_all(name) {
        let value = String::from_utf8_lossy(value.as_bytes());
        parts.extend(
            value
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(str::to_owned),
        );
    }
    if parts.is_empty() {
        return None;
    }
    if *name == ACCEPT_ENCODING || *name == ACCEPT_LANGUAGE {
        for part in &mut parts {
            part.retain(|c| !c.is_ascii_whitespace());
            part.make_ascii_lowercase();
        }
        parts.sort_unstable();
        parts.dedup();
    }
    Some(parts.join(","))
}

/// True when a request with `request` headers may be answered by a response stored for a
/// request with `stored` headers (RFC 9111 section 4.1): every field the `Vary` nominates
/// is absent from both or equal once normalised; `Vary: *` never matches.
pub fn vary_matches(vary: &Vary, stored: &HeaderMap, request: &HeaderMap) -> bool {
    match vary {
        Vary::None => true,
        Vary::Star => false,
        Vary::Fields(fields) => fields
            .iter()
            .all(|name| normalised(stored, name) == normalised(request, name)),
    }
}

/// The primary cache key of a request: scheme, authority, path and query, for the methods
/// whose responses can be reused (GET, and HEAD answered from a stored GET). `None` for
/// others. A URI without scheme or authority (an origin-form request a server received)
/// keys on path and query with the `Host` given.
pub fn primary_key(method: &Method, uri: &Uri, host: Option<&str>) -> Option<String> {
    if *method != Method::GET && *method != Method::HEAD {
        return None;
    }
    let scheme = uri.scheme_str().unwrap_or("http");
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_ascii_lowercase())
        .or_else(|| host.map(str::to_ascii_lowercase))
        .unwrap_or_default();
    let path_and_query = uri.path_and_query().map_or("/", |pq| pq.as_str());
    Some(format!("{scheme}://{authority}{path_and_query}"))
}

/// Entity tags of an `If-None-Match` list (`*` as the single tag `*`).
fn tags(value: &str) -> Vec<&str> {
    value
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

/// An entity tag in its quoted form (RFC 9110 section 8.8.3): `abc` becomes `"abc"` and
/// `W/abc` becomes `W/"abc"`; a tag already quoted is kept.
pub fn quoted_etag(tag: &str) -> String {
    let tag = tag.trim();
    let (weak, opaque) = match tag.strip_prefix("W/") {
        Some(rest) => ("W/", rest),
        None => ("", tag),
    };
    if opaque.len() >= 2 && opaque.starts_with('"') && opaque.ends_with('"') {
        format!("{weak}{opaque}")
    } else {
        format!("{weak}\"{}\"", opaque.trim_matches('"'))
    }
}

fn weak_eq(a: &str, b: &str) -> bool {
    let opaque = |t: &str| quoted_etag(t).trim_start_matches("W/").to_owned();
    opaque(a) == opaque(b)
}

/// Strong comparison (RFC 9110 section 8.8.3.2): both tags strong and equal.
fn strong_eq(a: &str, b: &str) -> bool {
    let (a, b) = (quoted_etag(a), quoted_etag(b));
    !a.starts_with("W/") && a == b
}

/// True when a HEAD response describes the same representation as the stored one, so it
/// may update the stored headers (RFC 9111 section 4.3.5): the entity tags match (strong
/// comparison) when either has one, otherwise the `Last-Modified` dates when either has
/// one, otherwise the `Content-Length`s.
pub fn head_matches(stored: &HeaderMap, head: &HeaderMap) -> bool {
    let text = |h: &HeaderMap, n: &HeaderName| {
        h.get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .map(str::to_owned)
    };
    let (a, b) = (text(stored, &ETAG), text(head, &ETAG));
    if a.is_some() || b.is_some() {
        return matches!((a, b), (Some(a), Some(b)) if strong_eq(&a, &b));
    }
    let (a, b) = (
        http_date(stored, LAST_MODIFIED),
        http_date(head, LAST_MODIFIED),
    );
    if stored.contains_key(LAST_MODIFIED) || head.contains_key(LAST_MODIFIED) {
        return a.is_some() && a == b;
    }
    let length = http::header::CONTENT_LENGTH;
    text(stored, &length) == text(head, &length)
}

/// True when a client's conditional request is satisfied by a stored response, so it can
/// be answered with 304 (RFC 9110 sections 13.1.2 and 13.1.3, RFC 9111 section 4.3.2):
/// `If-None-Match` (weak comparison) when present, otherwise `If-Modified-Since` against
/// `Last-Modified`.
pub fn not_modified(request: &HeaderMap, stored: &HeaderMap) -> bool {
    if let Some(inm) = request.get(IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        let tags = tags(inm);
        // `*` matches any current representation, entity tag or not (section 13.1.2).
        if tags.contains(&"*") {
            return true;
        }
        let Some(etag) = stored.get(ETAG).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        return tags.iter().any(|tag| weak_eq(tag, etag.trim()));
    }
    match (
        http_date(request, IF_MODIFIED_SINCE),
        http_date(stored, LAST_MODIFIED),
    ) {
        (Some(since), Some(modified)) => modified <= since,
        _ => false,
    }
}

/// True when a stored response carries a validator to revalidate it with.
pub fn has_validator(stored: &HeaderMap) -> bool {
    stored.contains_key(ETAG) || stored.contains_key(LAST_MODIFIED)
}

/// The conditional headers to revalidate a stored response (RFC 9111 section 4.3.1).
pub fn conditional_headers(stored: &HeaderMap) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(etag) = stored.get(ETAG).and_then(|v| v.to_str().ok()) {
        // Sent quoted even when the origin's tag was not.
        if let Ok(value) = http::HeaderValue::from_str(&quoted_etag(etag)) {
            headers.insert(IF_NONE_MATCH, value);
        }
    }
    if let Some(modified) = stored.get(LAST_MODIFIED) {
        headers.insert(IF_MODIFIED_SINCE, modified.clone());
    }
    headers
}

/// Fields a 304 (or a HEAD's 200) must not replace in the stored response (RFC 9111
/// section 3.2): those that describe the stored content (its length, coding, range,
/// digest and entity tag), and the hop-by-hop fields a cache never stores (section 3.1).
const KEEP_ON_UPDATE: [HeaderName; 10] = [
    http::header::CONTENT_LENGTH,
    http::header::CONTENT_ENCODING,
    http::header::CONTENT_RANGE,
    HeaderName::from_static("content-md5"),
    ETAG,
    http::header::TRANSFER_ENCODING,
    http::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    http::header::TE,
    http::header::UPGRADE,
];

/// Updates a stored response's headers from a 304 (RFC 9111 sections 3.2 and 4.3.4).
pub fn update_headers(stored: &mut HeaderMap, not_modified: &HeaderMap) {
    let mut names: Vec<&HeaderName> = not_modified.keys().collect();
    names.dedup();
    for name in names {
        if KEEP_ON_UPDATE.contains(name) {
            continue;
        }
        stored.remove(name);
        for value in not_modified.get_all(name) {
            stored.append(name.clone(), value.clone());
        }
    }
}

/// A stored response brought up to date by a 304 (RFC 9111 sections 3.2 and 4.3.4).
#[derive(Debug, Clone)]
pub struct Refreshed {
    /// The headers the client whose request got the 304 receives: the stored fields
    /// updated with every field of the 304, its `Set-Cookie` included.
    pub client: HeaderMap,
    /// The headers that may be stored and served to others, or why the updated response
    /// may not be shared any more. The updated response passes the same storage rules
    /// as a new one (section 3): a 304 that says `private` or `no-store`, or one to a
    /// request with `Authorization` that does not allow sharing, ends the sharing; a
    /// `Set-Cookie` on the 304 goes to its own client only (unless cookies are stored).
    pub shared: Result<HeaderMap, NotStored>,
}

impl HttpCachePolicy {
    /// Updates the stored response `stored` (status `status`) from a 304 that answered a
    /// request with headers `request` (RFC 9111 sections 3.1, 3.2, 4.3.4).
    pub fn refresh(
        &self,
        request: &HeaderMap,
        status: StatusCode,
        stored: &HeaderMap,
        not_modified: &HeaderMap,
    ) -> Refreshed {
        let mut client = stored.clone();
        update_headers(&mut client, not_modified);
        let mut shared = client.clone();
        if !self.store_set_cookie {
            shared.remove(SET_COOKIE);
        }
        let shared = self
            .storable(&Method::GET, request, status, &shared)
            .map(|()| shared);
        Refreshed { client, shared }
    }
}

/// True for the methods whose successful responses invalidate stored responses (RFC 9111
/// section 4.4): any method that is not safe.
pub fn invalidates(method: &Method, status: StatusCode) -> bool {
    let unsafe_method = !matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    );
    unsafe_method && (status.is_success() || status.is_redirection())
}

/// The primary keys an unsafe request invalidates: its target, and the URIs in the
/// response's `Location` and `Content-Location` when they share its origin.
pub fn invalidation_targets(uri: &Uri, host: Option<&str>, response: &HeaderMap) -> Vec<String> {
    let mut keys = Vec::new();
    let Some(target) = primary_key(&Method::GET, uri, host) else {
        return keys;
    };
    let origin_of = |key: &str| -> Option<String> {
        let rest = key.split_once("://")?;
        let authority = rest.1.split('/').next()?;
        Some(format!("{}://{}", rest.0, authority))
    };
    let origin = origin_of(&target);
    keys.push(target);
    for name in [LOCATION, CONTENT_LOCATION] {
        let Some(value) = response.get(name).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        let Ok(location) = value.trim().parse::<Uri>() else {
            continue;
        };
        let key = if location.scheme().is_some() {
            primary_key(&Method::GET, &location, None)
        } else if value.starts_with('/') {
            // Relative to the request's origin.
            origin.as_ref().map(|o| {
                format!(
                    "{o}{}",
                    location.path_and_query().map_or("/", |pq| pq.as_str())
                )
            })
        } else {
            None
        };
        if let Some(key) = key {
            if origin_of(&key) == origin && !keys.contains(&key) {
                keys.push(key);
            }
        }
    }
    keys
}

/// How a response was produced, for the `Cache-Status` header (RFC 9211).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheStatus {
    /// Answered from the cache; `stale` when past its freshness.
    Hit {
        /// Served stale (while revalidating or on error).
        stale: bool,
        /// Remaining freshness in seconds (negative when stale).
        ttl: i64,
    },
    /// Forwarded to the origin.
    Forward {
        /// Why: `uri-miss`, `vary-miss`, `miss`, `stale`, `request`, `method`, `bypass`.
        reason: &'static str,
        /// The origin's status.
        status: u16,
        /// Whether the response was stored.
        stored: bool,
        /// Whether it shared an origin request with others (coalesced).
        collapsed: bool,
        /// Why it was not stored, or why it was forwarded alone.
        detail: Option<&'static str>,
    },
    /// Forwarded, and no response came back (the origin was unreachable, the request
    /// timed out): the error answer says so.
    Failed {
        /// Why it was forwarded, as for [`Forward`](CacheStatus::Forward).
        reason: &'static str,
        /// What went wrong, as a token (`origin-unreachable`, `timed-out`, ...).
        detail: &'static str,
    },
}

impl fmt::Display for CacheStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("towerguard")?;
        match self {
            CacheStatus::Hit { stale, ttl } => {
                f.write_str("; hit")?;
                if *stale {
                    f.write_str("; fwd=stale")?;
                }
                write!(f, "; ttl={ttl}")
            }
            CacheStatus::Forward {
                reason,
                status,
                stored,
                collapsed,
                detail,
            } => {
                write!(f, "; fwd={reason}; fwd-status={status}")?;
                if *stored {
                    f.write_str("; stored")?;
                }
                if *collapsed {
                    f.write_str("; collapsed")?;
                }
                if let Some(detail) = detail {
                    write!(f, "; detail={detail}")?;
                }
                Ok(())
            }
            CacheStatus::Failed { reason, detail } => {
                write!(f, "; fwd={reason}; detail={detail}")
            }
        }
    }
}
