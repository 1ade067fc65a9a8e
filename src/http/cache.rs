//! The HTTP cache layer: RFC 9111 shared-cache semantics on top of single-flight.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{
    HeaderValue, AGE, AUTHORIZATION, CONTENT_LENGTH, HOST, IF_MODIFIED_SINCE, IF_NONE_MATCH,
    TRANSFER_ENCODING,
};
use http::{HeaderMap, HeaderName, Method, Request, Response, StatusCode};
use http_body::Body;
use tokio::time::Instant;
use tower::util::Oneshot;
use tower_layer::Layer;
use tower_service::Service;

use super::body::{read_ahead, BufferedBody};
use super::cache_control::CacheControl;
use super::cache_policy::{
    conditional_headers, has_validator, invalidates, invalidation_targets, normalised,
    not_modified, primary_key, vary, vary_matches, AgeInputs, CacheStatus, HttpCachePolicy,
    NotStored, Vary,
};
use super::timeout::HttpExtensions;
use crate::cache::flight::{FlightMap, Joined, Owner, Upstream, Waiter};
use crate::error::{BoxError, Error, ErrorKind};
use crate::metrics::CacheMetrics;
use crate::timeout::{Carrier, Deadline, TimeoutContext};
use tokio_util::sync::CancellationToken;

/// The `Cache-Status` header (RFC 9211).
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// A stored response: one variant of one URI.
struct Stored {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    vary: Vary,
    /// The nominated request fields of the request that fetched it.
    request_headers: HeaderMap,
    /// The user key function's part of the key, when one is set.
    extra: Option<String>,
    age: AgeInputs,
    stored_at: Instant,
    freshness: Duration,
    stale_while_revalidate: Duration,
    stale_if_error: Duration,
}

impl Stored {
    fn current_age(&self, now: Instant) -> Duration {
        self.age
            .current_age(now.saturating_duration_since(self.stored_at))
    }

    fn is_fresh(&self, now: Instant) -> bool {
        self.current_age(now) < self.freshness
    }

    fn in_window(&self, now: Instant, window: Duration) -> bool {
        self.current_age(now) < self.freshness.saturating_add(window)
    }

    fn ttl(&self, now: Instant) -> i64 {
        let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        secs(self.freshness).saturating_sub(secs(self.current_age(now)))
    }

    fn weight(&self) -> u32 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum();
        u32::try_from(self.body.len() + headers + 256).unwrap_or(u32::MAX)
    }
}

/// The variants stored for one URI.
struct Variants(Vec<Arc<Stored>>);

/// What a flight brings back.
struct Fetched {
    /// The origin's status (304 for a revalidation).
    status: StatusCode,
    response: Fetch,
    /// Headers of the request that fetched it, to judge whether another waiter may use it.
    request_headers: HeaderMap,
    /// The key function's part for that request.
    extra: Option<String>,
    /// The entry to store, when the response may be stored.
    store: Option<Arc<Stored>>,
    not_stored: Option<NotStored>,
    /// A stored variant the outcome says may no longer be shared (a 304 that ended the
    /// sharing): removed when the flight finishes.
    evict: Option<Arc<Stored>>,
    /// It was a 304 to a revalidation: the stored body with refreshed headers.
    revalidated: bool,
}

enum Fetch {
    Complete {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    },
    /// A response only the request that started the flight may have (too large, or not
    /// storable): a `Response<BufferedBody<RB>>`, taken once.
    Streaming(Mutex<Option<Box<dyn Any + Send>>>),
}

/// What a flight is keyed by: everything that decides whether its response may be
/// shared with a request. A request only joins a flight whose response it may use, so it
/// never waits for, nor inherits the outcome of, an unrelated request's origin call.
#[derive(Clone, PartialEq, Eq, Hash)]
struct FlightKey {
    /// The primary key (`scheme://authority/path?query`), under which it is stored.
    primary: String,
    /// The user key function's part.
    extra: Option<String>,
    /// The request's own credentials: a response to them is shared only when it says so.
    credentials: Option<HeaderValue>,
    /// The request's values of every field a stored variant of the URI varies on.
    nominated: Vec<Option<String>>,
}

/// A user function that adds to the key: `None` bypasses the cache.
type KeyExtra = Arc<dyn Fn(&http::Uri, &HeaderMap) -> Option<String> + Send + Sync>;

struct Core {
    key_extra: Option<KeyExtra>,
    store: moka::sync::Cache<String, Arc<Variants>>,
    flights: FlightMap<FlightKey, Arc<Fetched>>,
    policy: HttpCachePolicy,
    max_body: usize,
    max_variants: usize,
    metrics: CacheMetrics,
}

impl Owner<FlightKey, Arc<Fetched>> for Core {
    fn flights(&self) -> &FlightMap<FlightKey, Arc<Fetched>> {
        &self.flights
    }

    fn finish(
        &self,
        key: &FlightKey,
        outcome: &Result<Arc<Fetched>, Error>,
        elapsed: Duration,
        detached: bool,
    ) {
        self.metrics.flight_duration.record(elapsed.as_secs_f64());
        match outcome {
            Ok(fetched) => {
                if detached {
                    return;
                }
                if let Some(stored) = &fetched.store {
                    self.insert(&key.primary, stored.clone());
                }
                if let Some(evicted) = &fetched.evict {
                    self.remove_variant(&key.primary, evicted);
                }
            }
            Err(error) if error.is(ErrorKind::Panicked) => {
                self.metrics.upstream_panicked.increment(1)
            }
            Err(_) => self.metrics.upstream_error.increment(1),
        }
    }
}

impl Core {
    /// The stored variant that may answer a request with `headers`, if any.
    fn lookup(
        &self,
        key: &str,
        headers: &HeaderMap,
        extra: &Option<String>,
    ) -> Option<Arc<Stored>> {
        let variants = self.store.get(key)?;
        variants
            .0
            .iter()
            .find(|v| v.extra == *extra && vary_matches(&v.vary, &v.request_headers, headers))
            .cloned()
    }

    /// The flight key of a request for `primary` with `headers`.
    fn flight_key(
        &self,
        primary: String,
        headers: &HeaderMap,
        extra: &Option<String>,
    ) -> FlightKey {
        let mut fields: Vec<HeaderName> = Vec::new();
        if let Some(variants) = self.store.get(&primary) {
            for variant in &variants.0 {
                if let Vary::Fields(names) = &variant.vary {
                    fields.extend(names.iter().cloned());
                }
            }
        }
        fields.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
        fields.dedup();
        FlightKey {
            primary,
            extra: extra.clone(),
            credentials: headers.get(AUTHORIZATION).cloned(),
            nominated: fields
                .iter()
                .map(|name| normalised(headers, name))
                .collect(),
        }
    }

    /// Stores `stored` as a variant of `key`, replacing the variant it matches.
    fn insert(&self, key: &str, stored: Arc<Stored>) {
        let mut list: Vec<Arc<Stored>> =
            self.store.get(key).map(|v| v.0.clone()).unwrap_or_default();
        // The new variant replaces the one it would match.
        list.retain(|v| {
            !(v.extra == stored.extra
                && v.vary == stored.vary
                && vary_matches(&v.vary, &v.request_headers, &stored.request_headers))
        });
        list.insert(0, stored);
        list.truncate(self.max_variants.max(1));
        self.store.insert(key.to_owned(), Arc::new(Variants(list)));
        self.sample();
    }

    /// Removes the variant `stored` of `key`, if it is still stored.
    fn remove_variant(&self, key: &str, stored: &Arc<Stored>) {
        let Some(variants) = self.store.get(key) else {
            return;
        };
        if !variants.0.iter().any(|v| Arc::ptr_eq(v, stored)) {
            return;
        }
        let list: Vec<Arc<Stored>> = variants
            .0
            .iter()
            .filter(|v| !Arc::ptr_eq(v, stored))
            .cloned()
            .collect();
        if list.is_empty() {
            self.store.invalidate(key);
        } else {
            self.store.insert(key.to_owned(), Arc::new(Variants(list)));
        }
        self.sample();
    }

    fn invalidate(&self, key: &str) {
        self.flights.detach_where(|flight| flight.primary == key);
        self.store.invalidate(key);
        self.sample();
    }

    fn sample(&self) {
        self.metrics.entries.set(self.store.entry_count() as f64);
        self.metrics
            .weighted_size
            .set(self.store.weighted_size() as f64);
    }
}

/// A [`Layer`] that puts an RFC 9111 shared cache in front of an HTTP service.
///
/// - **Stored** only what a shared cache may store (section 3): GET responses with a final
///   status, no `no-store`, no `private`, no `Set-Cookie` (configurable), `Authorization`
///   only with `public`, `s-maxage` or `must-revalidate`, and explicit or heuristic
///   freshness. Bodies are read ahead up to a bound; a larger response is passed through
///   whole and not stored.
/// - **Served** while fresh (section 4.2, `s-maxage` first), with `Age`; HEAD from a
///   stored GET; a client's own conditional request answered with 304; `Vary` matched
///   per section 4.1.
/// - **Revalidated** when stale, with `If-None-Match` / `If-Modified-Since`; a 304
///   refreshes the stored headers. `stale-while-revalidate` serves stale while one
///   background revalidation runs; `stale-if-error` serves stale when the origin fails;
///   neither when `must-revalidate`, `proxy-revalidate`, `no-cache` or `s-maxage` forbid.
/// - **Coalesced**: one origin request per URI at a time. A waiter that cannot use that
///   response (another `Vary` variant, `private`, `Set-Cookie`, `no-store`, its own
///   `Authorization`) is forwarded to the origin on its own.
/// - **Invalidated** by unsafe methods that succeed: the target URI and same-origin
///   `Location` / `Content-Location`.
/// - Every response carries `Cache-Status` (RFC 9211).
///
/// ```
/// use towerguard::http::HttpCacheLayer;
///
/// let cache = HttpCacheLayer::builder()
///     .name("proxy")
///     .capacity_bytes(256 * 1024 * 1024)
///     .max_body_bytes(8 * 1024 * 1024)
///     .build();
/// # let _ = cache;
/// ```
#[derive(Clone)]
#[must_use]
pub struct HttpCacheLayer {
    core: Arc<Core>,
}

impl fmt::Debug for HttpCacheLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpCacheLayer")
            .field("policy", &self.core.policy)
            .field("max_body", &self.core.max_body)
            .finish_non_exhaustive()
    }
}

impl HttpCacheLayer {
    /// Starts a builder: 64 MiB of responses, bodies up to 1 MiB, the default policy.
    pub fn builder() -> HttpCacheBuilder {
        HttpCacheBuilder {
            key_extra: None,
            name: "http".to_owned(),
            policy: HttpCachePolicy::default(),
            capacity_bytes: 64 * 1024 * 1024,
            max_body: 1024 * 1024,
            max_variants: 8,
            max_flights: 10_000,
        }
    }

    /// Removes every stored variant of `uri` (as a primary key: `scheme://authority/path?query`).
    pub fn invalidate(&self, primary_key: &str) {
        self.core.invalidate(primary_key);
    }

    /// URIs with stored responses; exact after [`run_pending_tasks`](Self::run_pending_tasks).
    pub fn entry_count(&self) -> u64 {
        self.core.store.entry_count()
    }

    /// Bytes held (bodies and headers, estimated).
    pub fn weighted_size(&self) -> u64 {
        self.core.store.weighted_size()
    }

    /// Applies the store's pending work now.
    pub fn run_pending_tasks(&self) {
        self.core.store.run_pending_tasks();
        self.core.sample();
    }
}

/// Configures an [`HttpCacheLayer`].
#[must_use]
pub struct HttpCacheBuilder {
    key_extra: Option<KeyExtra>,
    name: String,
    policy: HttpCachePolicy,
    capacity_bytes: u64,
    max_body: usize,
    max_variants: usize,
    max_flights: usize,
}

impl fmt::Debug for HttpCacheBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpCacheBuilder")
            .field("name", &self.name)
            .field("policy", &self.policy)
            .field("capacity_bytes", &self.capacity_bytes)
            .field("max_body", &self.max_body)
            .field("max_variants", &self.max_variants)
            .field("max_flights", &self.max_flights)
            .field("key_extra", &self.key_extra.is_some())
            .finish()
    }
}

impl HttpCacheBuilder {
    /// Adds a part of your own to every key, from the request's URI and headers (a
    /// tenant, a device class); `None` bypasses the cache for that request. Requests
    /// whose parts differ never share a stored response or an origin response.
    pub fn key_extra<F>(mut self, f: F) -> Self
    where
        F: Fn(&http::Uri, &HeaderMap) -> Option<String> + Send + Sync + 'static,
    {
        self.key_extra = Some(Arc::new(f));
        self
    }

    /// The instance name, the `name` label of every metric (default `"http"`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The storage rules' choices ([`HttpCachePolicy`]).
    pub fn policy(mut self, policy: HttpCachePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Bytes of stored responses at most (bodies and headers).
    pub fn capacity_bytes(mut self, bytes: u64) -> Self {
        self.capacity_bytes = bytes;
        self
    }

    /// The largest body stored; larger responses pass through whole, unstored.
    pub fn max_body_bytes(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// Variants kept per URI (`Vary`), most recent first.
    pub fn max_variants(mut self, variants: usize) -> Self {
        self.max_variants = variants.max(1);
        self
    }

    /// Origin requests under way at once for distinct URIs; past it, misses go to the
    /// origin uncoalesced.
    pub fn max_flights(mut self, flights: usize) -> Self {
        self.max_flights = flights;
        self
    }

    /// Builds the layer and its shared store.
    pub fn build(self) -> HttpCacheLayer {
        let metrics = CacheMetrics::register(&self.name);
        let listener = metrics.clone();
        let store = moka::sync::Cache::builder()
            .max_capacity(self.capacity_bytes)
            .weigher(|_key: &String, variants: &Arc<Variants>| {
                variants
                    .0
                    .iter()
                    .map(|v| v.weight())
                    .fold(0u32, u32::saturating_add)
            })
            .eviction_listener(move |_key, _value, cause| listener.record_removal(cause, false))
            .build();
        HttpCacheLayer {
            core: Arc::new(Core {
                key_extra: self.key_extra,
                store,
                flights: FlightMap::new(self.max_flights),
                policy: self.policy,
                max_body: self.max_body,
                max_variants: self.max_variants,
                metrics,
            }),
        }
    }
}

impl<S> Layer<S> for HttpCacheLayer {
    type Service = HttpCache<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HttpCache {
            inner,
            core: self.core.clone(),
        }
    }
}

/// An RFC 9111 shared cache in front of `S`. Made by [`HttpCacheLayer`].
///
/// Hits never touch `S`; every origin request drives its own clone of `S` to readiness.
#[derive(Clone)]
pub struct HttpCache<S> {
    inner: S,
    core: Arc<Core>,
}

impl<S: fmt::Debug> fmt::Debug for HttpCache<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpCache")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// Response future of [`HttpCache`].
pub type HttpCacheFuture<RB> =
    Pin<Box<dyn Future<Output = Result<Response<BufferedBody<RB>>, Error>> + Send>>;

impl<S, B, RB> Service<Request<B>> for HttpCache<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Send + 'static,
    RB: Body<Data = Bytes> + Unpin + Send + 'static,
    RB::Error: Into<BoxError>,
{
    type Response = Response<BufferedBody<RB>>;
    type Error = Error;
    type Future = HttpCacheFuture<RB>;

    /// Always ready: hits do not touch the inner service, and origin requests drive
    /// their own clone to readiness.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        Box::pin(handle(self.core.clone(), self.inner.clone(), req))
    }
}

fn with_status<T>(mut response: Response<T>, status: &CacheStatus) -> Response<T> {
    let ours = status.to_string();
    let value = match response
        .headers()
        .get(&CACHE_STATUS)
        .and_then(|v| v.to_str().ok())
    {
        // Caches closer to the origin come first (RFC 9211 section 2).
        Some(earlier) => format!("{earlier}, {ours}"),
        None => ours,
    };
    if let Ok(value) = HeaderValue::from_str(&value) {
        response.headers_mut().insert(CACHE_STATUS, value);
    }
    response
}

/// A response built from a stored (or just fetched, complete) response.
fn respond<RB>(
    status: StatusCode,
    headers: &HeaderMap,
    body: &Bytes,
    request: (&Method, &HeaderMap),
    age: Option<Duration>,
    cache_status: &CacheStatus,
) -> Response<BufferedBody<RB>> {
    let (method, request_headers) = request;
    let conditional = status == StatusCode::OK && not_modified(request_headers, headers);
    let mut response = Response::new(if *method == Method::HEAD || conditional {
        BufferedBody::empty()
    } else {
        BufferedBody::complete(body.clone())
    });
    *response.headers_mut() = headers.clone();
    if conditional {
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        response.headers_mut().remove(CONTENT_LENGTH);
        response.headers_mut().remove(TRANSFER_ENCODING);
    } else {
        *response.status_mut() = status;
    }
    if let Some(age) = age {
        response
            .headers_mut()
            .insert(AGE, HeaderValue::from(age.as_secs()));
    }
    with_status(response, cache_status)
}

fn serve<RB>(
    stored: &Stored,
    request: (&Method, &HeaderMap),
    now: Instant,
    stale: bool,
) -> Response<BufferedBody<RB>> {
    let status = CacheStatus::Hit {
        stale,
        ttl: stored.ttl(now),
    };
    respond(
        stored.status,
        &stored.headers,
        &stored.body,
        request,
        Some(stored.current_age(now)),
        &status,
    )
}

/// Sends `req` to the origin and reads its response ahead, deciding whether it may be
/// stored. `revalidate` is the stale entry whose validators the request carries.
async fn fetch<S, B, RB>(
    core: Arc<Core>,
    inner: S,
    mut req: Request<B>,
    revalidate: Option<Arc<Stored>>,
    extra: Option<String>,
) -> Result<Arc<Fetched>, Error>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
    RB: Body<Data = Bytes> + Unpin + Send + 'static,
    RB::Error: Into<BoxError>,
{
    let request_headers = req.headers().clone();
    // The origin request answers to the flight, not to the caller that made it: the
    // caller's timeout context leaves the request, the flight's (if any) takes its place.
    let extensions = req.extensions_mut();
    extensions.remove::<TimeoutContext>();
    extensions.remove::<Deadline>();
    extensions.remove::<CancellationToken>();
    if let Some(context) = TimeoutContext::current() {
        HttpExtensions.insert(&mut req, &context);
    }
    // The cache makes its own conditional request; the client's is answered from the result.
    req.headers_mut().remove(IF_NONE_MATCH);
    req.headers_mut().remove(IF_MODIFIED_SINCE);
    if let Some(stale) = &revalidate {
        req.headers_mut()
            .extend(conditional_headers(&stale.headers));
    }
    *req.method_mut() = Method::GET;
    let request_time = SystemTime::now();
    let response = Oneshot::new(inner, req).await.map_err(Error::inner)?;
    let response_time = SystemTime::now();
    let policy = &core.policy;

    if response.status() == StatusCode::NOT_MODIFIED {
        if let Some(stale) = revalidate {
            // The updated response passes the storage rules again: a 304 may end the
            // sharing (`private`, `no-store`) and its `Set-Cookie` is this client's alone.
            let refreshed = policy.refresh(
                &request_headers,
                stale.status,
                &stale.headers,
                response.headers(),
            );
            let (store, not_stored, evict) = match refreshed.shared {
                Ok(headers) => {
                    let (swr, sie) = policy.stale_windows(&headers);
                    let stored = Arc::new(Stored {
                        status: stale.status,
                        freshness: policy.freshness(stale.status, &headers),
                        stale_while_revalidate: swr,
                        stale_if_error: sie,
                        age: AgeInputs::from_headers(&headers, request_time, response_time),
                        stored_at: Instant::now(),
                        vary: stale.vary.clone(),
                        request_headers: stale.request_headers.clone(),
                        extra: stale.extra.clone(),
                        body: stale.body.clone(),
                        headers,
                    });
                    (Some(stored), None, None)
                }
                Err(reason) => (None, Some(reason), Some(stale.clone())),
            };
            return Ok(Arc::new(Fetched {
                status: StatusCode::NOT_MODIFIED,
                response: Fetch::Complete {
                    status: stale.status,
                    headers: refreshed.client,
                    body: stale.body.clone(),
                },
                request_headers,
                extra,
                store,
                not_stored,
                evict,
                revalidated: true,
            }));
        }
    }

    let status = response.status();
    let decision = policy.storable(&Method::GET, &request_headers, status, response.headers());
    let (parts, body) = response.into_parts();
    let streaming = |body: BufferedBody<RB>, parts: http::response::Parts, reason| {
        let response: Box<dyn Any + Send> = Box::new(Response::from_parts(parts, body));
        Arc::new(Fetched {
            status,
            response: Fetch::Streaming(Mutex::new(Some(response))),
            request_headers: request_headers.clone(),
            extra: extra.clone(),
            store: None,
            not_stored: Some(reason),
            evict: None,
            revalidated: false,
        })
    };
    if let Err(reason) = decision {
        return Ok(streaming(
            BufferedBody::streaming(Default::default(), Some(body)),
            parts,
            reason,
        ));
    }
    let body = read_ahead(body, core.max_body).await?;
    if !body.is_replayable() {
        return Ok(streaming(body, parts, NotStored::TooLarge));
    }
    let bytes = body.into_bytes().unwrap_or_default();
    let freshness = policy.freshness(status, &parts.headers);
    let (swr, sie) = policy.stale_windows(&parts.headers);
    let response_vary = vary(&parts.headers);
    let useful =
        !freshness.is_zero() || has_validator(&parts.headers) || !swr.is_zero() || !sie.is_zero();
    let store = useful.then(|| {
        let mut nominated = HeaderMap::new();
        if let Vary::Fields(fields) = &response_vary {
            for name in fields {
                for value in request_headers.get_all(name) {
                    nominated.append(name.clone(), value.clone());
                }
            }
        }
        Arc::new(Stored {
            status,
            headers: parts.headers.clone(),
            body: bytes.clone(),
            vary: response_vary,
            request_headers: nominated,
            extra: extra.clone(),
            age: AgeInputs::from_headers(&parts.headers, request_time, response_time),
            stored_at: Instant::now(),
            freshness,
            stale_while_revalidate: swr,
            stale_if_error: sie,
        })
    });
    Ok(Arc::new(Fetched {
        status,
        response: Fetch::Complete {
            status,
            headers: parts.headers,
            body: bytes,
        },
        request_headers,
        extra,
        not_stored: store.is_none().then_some(NotStored::NoFreshness),
        store,
        evict: None,
        revalidated: false,
    }))
}

/// True when a waiter whose request has `headers` may be handed `fetched`, fetched for
/// another request.
///
/// Only what may be stored is ever shared: the response the flight would store, never the
/// one its own requester got (which may carry that requester's `Set-Cookie`).
fn usable_by(core: &Core, fetched: &Fetched, headers: &HeaderMap, extra: &Option<String>) -> bool {
    if fetched.extra != *extra {
        return false;
    }
    let Some(stored) = &fetched.store else {
        return false;
    };
    if core
        .policy
        .storable(&Method::GET, headers, stored.status, &stored.headers)
        .is_err()
    {
        return false;
    }
    // storable() above also decided `Authorization`: a request with credentials gets a
    // shared response only if the response says it may be shared.
    vary_matches(&stored.vary, &fetched.request_headers, headers)
}

async fn forward<S, B, RB>(
    inner: S,
    req: Request<B>,
    status: impl FnOnce(StatusCode) -> CacheStatus,
) -> Result<Response<BufferedBody<RB>>, Error>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
{
    let response = Oneshot::new(inner, req).await.map_err(Error::inner)?;
    let cache_status = status(response.status());
    let response = response.map(|body| BufferedBody::streaming(Default::default(), Some(body)));
    Ok(with_status(response, &cache_status))
}

fn forwarded(
    reason: &'static str,
    detail: Option<&'static str>,
) -> impl FnOnce(StatusCode) -> CacheStatus {
    move |status| CacheStatus::Forward {
        reason,
        status: status.as_u16(),
        stored: false,
        collapsed: false,
        detail,
    }
}

async fn handle<S, B, RB>(
    core: Arc<Core>,
    inner: S,
    req: Request<B>,
) -> Result<Response<BufferedBody<RB>>, Error>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Send + 'static,
    RB: Body<Data = Bytes> + Unpin + Send + 'static,
    RB::Error: Into<BoxError>,
{
    let method = req.method().clone();
    let host = |req: &Request<B>| {
        req.headers()
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
    };
    let metrics = &core.metrics;

    if method != Method::GET && method != Method::HEAD {
        // Unsafe methods are written through; success invalidates what they touch.
        metrics.bypass.increment(1);
        let (uri, host) = (req.uri().clone(), host(&req));
        let response = forward(inner, req, forwarded("method", None)).await?;
        if invalidates(&method, response.status()) {
            for key in invalidation_targets(&uri, host.as_deref(), response.headers()) {
                core.invalidate(&key);
            }
        }
        return Ok(response);
    }
    // Borrowed: a hit allocates only its key.
    let borrowed_host = req.headers().get(HOST).and_then(|h| h.to_str().ok());
    let Some(key) = primary_key(&method, req.uri(), borrowed_host) else {
        metrics.bypass.increment(1);
        return forward(inner, req, forwarded("bypass", None)).await;
    };
    let extra = match &core.key_extra {
        Some(f) => match f(req.uri(), req.headers()) {
            Some(extra) => Some(extra),
            None => {
                metrics.bypass.increment(1);
                return forward(inner, req, forwarded("bypass", None)).await;
            }
        },
        None => None,
    };

    let now = Instant::now();
    let forced = core.policy.request_forces_origin(req.headers());
    let stored = core.lookup(&key, req.headers(), &extra);
    if let (Some(stored), false) = (&stored, forced) {
        if stored.is_fresh(now) {
            metrics.hit.increment(1);
            tracing::debug!(result = "hit", "http cache: hit");
            return Ok(serve(stored, (&method, req.headers()), now, false));
        }
        if stored.in_window(now, stored.stale_while_revalidate) {
            metrics.stale.increment(1);
            tracing::debug!(result = "stale", "http cache: stale, revalidating");
            let response = serve(stored, (&method, req.headers()), now, true);
            revalidate_in_background(&core, &inner, key, req, stored.clone(), extra);
            return Ok(response);
        }
    }
    // only-if-cached (RFC 9111 section 5.2.1.7): nothing usable is stored, so 504.
    if CacheControl::from_headers(req.headers()).only_if_cached {
        metrics.bypass.increment(1);
        let mut response = Response::new(BufferedBody::empty());
        *response.status_mut() = StatusCode::GATEWAY_TIMEOUT;
        return Ok(with_status(
            response,
            &CacheStatus::Forward {
                reason: "miss",
                status: 504,
                stored: false,
                collapsed: false,
                detail: Some("only-if-cached"),
            },
        ));
    }
    // Past the hit path the request is handed to a flight: keep what answering needs.
    let request = (method.clone(), req.headers().clone());
    if method == Method::HEAD && stored.is_none() {
        // Nothing to answer a HEAD from; it is not stored either.
        metrics.bypass.increment(1);
        return forward(inner, req, forwarded("uri-miss", Some("head"))).await;
    }

    let revalidate = stored.clone().filter(|s| has_validator(&s.headers));
    let flight_key = core.flight_key(key.clone(), &request.1, &extra);
    let mut request_slot = Some(req);
    let owner: Arc<dyn Owner<FlightKey, Arc<Fetched>>> = core.clone();
    let joined = {
        let recheck = |key: &FlightKey| {
            core.lookup(&key.primary, &request.1, &extra)
                .filter(|s| !forced && s.is_fresh(Instant::now()))
        };
        let slot = &mut request_slot;
        let start_inner = inner.clone();
        let start_core = core.clone();
        let start_extra = extra.clone();
        let start = move || -> Upstream<Arc<Fetched>> {
            match slot.take() {
                Some(req) => Box::pin(fetch(start_core, start_inner, req, revalidate, start_extra)),
                None => unreachable!("a flight starts once"),
            }
        };
        core.flights
            .join_or_start(&owner, flight_key, true, recheck, start)
    };
    let (waiter, originator): (Waiter<FlightKey, Arc<Fetched>>, bool) = match joined {
        Joined::Started(waiter) => {
            metrics.miss.increment(1);
            tracing::debug!(result = "miss", "http cache: miss, flight started");
            (waiter, true)
        }
        Joined::Coalesced(waiter) => {
            metrics.coalesced.increment(1);
            tracing::debug!(result = "coalesced", "http cache: joined a flight");
            (waiter, false)
        }
        Joined::Stored(stored) => {
            metrics.hit.increment(1);
            return Ok(serve(
                &stored,
                (&request.0, &request.1),
                Instant::now(),
                false,
            ));
        }
        Joined::Full(_) | Joined::Busy(_) => {
            metrics.bypass.increment(1);
            let Some(req) = request_slot.take() else {
                unreachable!("no flight took the request");
            };
            return forward(inner, req, forwarded("miss", Some("flights-full"))).await;
        }
    };

    let reason = match &stored {
        Some(_) => "stale",
        None => {
            if core.store.contains_key(&key) {
                "vary-miss"
            } else {
                "uri-miss"
            }
        }
    };
    let fetched = match waiter.await {
        Ok(fetched) => fetched,
        Err(error) => {
            // stale-if-error: an expired entry inside its window answers instead.
            if let Some(stale) = stored.filter(|s| s.in_window(Instant::now(), s.stale_if_error)) {
                metrics.stale_if_error.increment(1);
                return Ok(serve(
                    &stale,
                    (&request.0, &request.1),
                    Instant::now(),
                    true,
                ));
            }
            return Err(error);
        }
    };
    if let Some(stale) = &stored {
        if fetched.status.is_server_error() && stale.in_window(Instant::now(), stale.stale_if_error)
        {
            metrics.stale_if_error.increment(1);
            return Ok(serve(stale, (&request.0, &request.1), Instant::now(), true));
        }
    }

    // The requester that started the flight gets what the origin sent it; a coalesced
    // waiter only ever gets what may be stored and shared.
    let complete = match &fetched.response {
        Fetch::Complete {
            status,
            headers,
            body,
        } if originator => Some((*status, headers, body)),
        _ if originator => None,
        _ => match &fetched.store {
            Some(shared) if usable_by(&core, &fetched, &request.1, &extra) => {
                Some((shared.status, &shared.headers, &shared.body))
            }
            _ => {
                // Fetched for someone else and not for us: to the origin on our own.
                let Some(req) = request_slot.take() else {
                    unreachable!("a waiter that did not start the flight keeps its request");
                };
                let detail = fetched
                    .not_stored
                    .map(NotStored::as_str)
                    .or(Some("not-shareable"));
                return forward(inner, req, forwarded(reason, detail)).await;
            }
        },
    };
    if let Some((status, headers, body)) = complete {
        let cache_status = CacheStatus::Forward {
            reason,
            status: if fetched.revalidated {
                304
            } else {
                status.as_u16()
            },
            stored: fetched.store.is_some(),
            collapsed: !originator,
            detail: fetched.not_stored.map(NotStored::as_str),
        };
        let age = fetched
            .store
            .as_ref()
            .map(|s| s.current_age(Instant::now()));
        return Ok(respond(
            status,
            headers,
            body,
            (&request.0, &request.1),
            age,
            &cache_status,
        ));
    }
    let Fetch::Streaming(response) = &fetched.response else {
        unreachable!("a complete response was answered above");
    };
    let taken = response
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .and_then(|r| r.downcast::<Response<BufferedBody<RB>>>().ok());
    match taken {
        Some(response) => {
            let status = response.status().as_u16();
            let cache_status = CacheStatus::Forward {
                reason,
                status,
                stored: false,
                collapsed: false,
                detail: fetched.not_stored.map(NotStored::as_str),
            };
            Ok(with_status(*response, &cache_status))
        }
        None => unreachable!("only the originator takes the streamed response, once"),
    }
}

/// Starts one background revalidation of `key` (stale-while-revalidate), unless one is
/// under way or there is no runtime.
fn revalidate_in_background<S, B, RB>(
    core: &Arc<Core>,
    inner: &S,
    key: String,
    req: Request<B>,
    stale: Arc<Stored>,
    extra: Option<String>,
) where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Send + 'static,
    RB: Body<Data = Bytes> + Unpin + Send + 'static,
    RB::Error: Into<BoxError>,
{
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let owner: Arc<dyn Owner<FlightKey, Arc<Fetched>>> = core.clone();
    let key = core.flight_key(key, req.headers(), &extra);
    let validators = has_validator(&stale.headers).then_some(stale);
    let (fetch_core, fetch_inner) = (core.clone(), inner.clone());
    let start = move || -> Upstream<Arc<Fetched>> {
        Box::pin(fetch(fetch_core, fetch_inner, req, validators, extra))
    };
    if let Joined::Started(waiter) =
        core.flights
            .join_or_start(&owner, key, false, |_| None::<()>, start)
    {
        core.metrics.refreshes.increment(1);
        runtime.spawn(async move {
            let _ = waiter.await;
        });
    }
}
