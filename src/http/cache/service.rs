//! The service: a request's way through the cache.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{HOST, IF_MODIFIED_SINCE, IF_NONE_MATCH};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use tokio::time::Instant;
use tower::util::Oneshot;
use tower_service::Service;

use super::core::Core;
use super::fetch::{
    fetch, flight_origin, forward, forwarded, revalidate_in_background, through_tiers, Conditionals,
};
use super::respond::{respond, serve, with_status};
use super::stored::{Fetch, Fetched, FlightKey, Stored, TAG_FIELDS};
use crate::cache::flight::{Joined, Owner, Upstream, Waiter};
use crate::error::{BoxError, Error, ErrorKind};
use crate::http::body::BufferedBody;
use crate::http::cache_control::CacheControl;
use crate::http::cache_policy::{
    has_validator, head_matches, invalidates, invalidation_targets, is_stale_on_error_status,
    primary_key, vary_matches, CacheStatus, NotStored, Reuse, SURROGATE_CAPABILITY,
    SURROGATE_CONTROL,
};
use crate::http::range::{has_range, several_ranges};
use crate::http::tee::{Head, Tee, TeeBody};
use crate::timeout::{Deadline, TimeoutContext};

/// An RFC 9111 shared cache in front of `S`. Made by [`HttpCacheLayer`](super::HttpCacheLayer).
///
/// Hits never touch `S`; every origin request drives its own clone of `S` to readiness.
#[derive(Clone)]
pub struct HttpCache<S> {
    pub(super) inner: S,
    pub(super) core: Arc<Core>,
    /// The bound on a wait for a flight (see `HttpCacheLayer::wait_bound`).
    pub(super) wait: Option<std::time::Duration>,
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

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let core = self.core.clone();
        let inner = self.inner.clone();
        let wait = self.wait;
        let targeted = core.policy.honours_targeted_fields();
        if targeted {
            req.headers_mut().insert(
                SURROGATE_CAPABILITY,
                http::HeaderValue::from_static("towerguard=\"Surrogate/1.0\""),
            );
        }
        Box::pin(async move {
            let keep_tags = core.keep_tag_headers;
            let mut response = handle(core, inner, req, wait).await?;
            if !keep_tags {
                for name in TAG_FIELDS {
                    response.headers_mut().remove(name);
                }
            }
            if targeted {
                // For surrogates alone; kept in the store for later decisions.
                response.headers_mut().remove(SURROGATE_CONTROL);
            }
            Ok(response)
        })
    }
}

/// True when a waiter whose request has `headers` may be handed `fetched`, fetched for
/// another request.
///
/// Only what may be stored is ever shared: the response the flight would store, never the
/// one its own requester got (which may carry that requester's `Set-Cookie`).
pub(super) fn usable_by(
    core: &Core,
    fetched: &Fetched,
    headers: &HeaderMap,
    extra: &Option<String>,
) -> bool {
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

pub(super) async fn handle<S, B, RB>(
    core: Arc<Core>,
    inner: S,
    req: Request<B>,
    wait: Option<std::time::Duration>,
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
    let metrics = &core.metrics;

    if method != Method::GET && method != Method::HEAD {
        return write_through(&core, inner, req).await;
    }
    // only-if-cached (RFC 9111 section 5.2.1.7) comes before every decision to forward:
    // such a request never reaches the origin.
    let only_if_cached = req.headers().contains_key(http::header::CACHE_CONTROL)
        && CacheControl::from_headers(req.headers()).only_if_cached;
    // Borrowed: a hit allocates only its key.
    let borrowed_host = req.headers().get(HOST).and_then(|h| h.to_str().ok());
    let Some(key) = primary_key(&method, req.uri(), borrowed_host) else {
        metrics.bypass.increment(1);
        if only_if_cached {
            return Ok(only_if_cached_miss());
        }
        return forward(inner, req, forwarded("bypass", None)).await;
    };
    let extra = match &core.key_extra {
        Some(f) => match f(req.uri(), req.headers()) {
            Some(extra) => Some(extra),
            None => {
                metrics.bypass.increment(1);
                if only_if_cached {
                    return Ok(only_if_cached_miss());
                }
                return forward(inner, req, forwarded("bypass", None)).await;
            }
        },
        None => None,
    };

    let ranged = method == Method::GET && has_range(req.headers());
    // With only-if-cached, several ranges are answered from what is stored (as the whole
    // representation) or with 504, below.
    if ranged && !only_if_cached && several_ranges(req.headers()) {
        // The origin assembles several ranges (multipart/byteranges).
        metrics.bypass.increment(1);
        return forward(inner, req, forwarded("request", Some("multi-range"))).await;
    }
    let now = Instant::now();
    let stored = core.lookup(&key, req.headers(), &extra);
    let reuse = stored.as_ref().map(|s| {
        core.policy
            .reuse(req.headers(), &s.headers, s.freshness, s.current_age(now))
    });
    if let (Some(stored), Some(reuse)) = (&stored, reuse) {
        match reuse {
            Reuse::Fresh => {
                metrics.hit.increment(1);
                tracing::debug!(result = "hit", "http cache: hit");
                return Ok(serve(stored, (&method, req.headers()), now, false));
            }
            Reuse::StaleAccepted => {
                metrics.stale.increment(1);
                tracing::debug!(result = "stale", "http cache: stale, accepted by max-stale");
                return Ok(serve(stored, (&method, req.headers()), now, true));
            }
            Reuse::Stale if stored.in_window(now, stored.stale_while_revalidate) => {
                metrics.stale.increment(1);
                tracing::debug!(result = "stale", "http cache: stale, revalidating");
                let response = serve(stored, (&method, req.headers()), now, true);
                revalidate_in_background(&core, &inner, key, req, stored.clone(), extra);
                return Ok(response);
            }
            Reuse::Stale | Reuse::Validate => {}
        }
    }
    // only-if-cached (RFC 9111 section 5.2.1.7): nothing usable is stored, so 504.
    if only_if_cached {
        metrics.bypass.increment(1);
        return Ok(only_if_cached_miss());
    }
    let reason = match (&stored, reuse) {
        (Some(_), Some(Reuse::Validate)) => "request",
        (Some(_), _) => "stale",
        (None, _) if core.store.contains_key(&key) => "vary-miss",
        (None, _) => "uri-miss",
    };
    let Some(stored) = stored else {
        if method == Method::HEAD || ranged {
            // Nothing to answer a HEAD or a range from: to the origin as it is, not stored.
            metrics.bypass.increment(1);
            let detail = if ranged { "range" } else { "head" };
            return forward(inner, req, forwarded(reason, Some(detail))).await;
        }
        if has_conditional(req.headers()) || core.is_uncacheable(&key) {
            // Nothing usable stored: the client's own validators go to the origin; or the
            // URI's last response could not be stored, so a flight's outcome would not be
            // shared either: to the origin at once, not behind another request.
            metrics.miss.increment(1);
            return miss_alone(&core, inner, req, (key, extra), reason, false).await;
        }
        return coalesced(&core, (inner, wait), req, (key, extra), None, reason).await;
    };
    if method == Method::HEAD {
        metrics.miss.increment(1);
        return head_through(&core, inner, req, &key, stored, reason).await;
    }
    coalesced(
        &core,
        (inner, wait),
        req,
        (key, extra),
        Some(stored),
        reason,
    )
    .await
}

/// A GET that goes to the origin through a flight: one origin request per flight key, the
/// stale entry `stored` (if any) revalidated with its validators.
async fn coalesced<S, B, RB>(
    core: &Arc<Core>,
    (inner, wait): (S, Option<std::time::Duration>),
    req: Request<B>,
    (key, extra): (String, Option<String>),
    stored: Option<Arc<Stored>>,
    reason: &'static str,
) -> Result<Response<BufferedBody<RB>>, Error>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Send + 'static,
    RB: Body<Data = Bytes> + Unpin + Send + 'static,
    RB::Error: Into<BoxError>,
{
    let metrics = &core.metrics;
    let deadline = wait.map(Deadline::after);
    // Past the hit path the request is handed to a flight: keep what answering needs.
    let request = (req.method().clone(), req.headers().clone());
    let revalidate = stored.clone().filter(|s| has_validator(&s.headers));
    let tiered = (key.clone(), request.1.clone(), extra.clone());
    let read_first = stored.is_none();
    #[cfg(feature = "redis")]
    let primary = key.clone();
    let flight_key = core.flight_key(key, &request.1, &extra);
    // Made only by the request that starts the flight: its waiters never read it.
    let mut started_tee: Option<Arc<Tee<RB>>> = None;
    let mut request_slot = Some(req);
    let owner: Arc<dyn Owner<FlightKey, Arc<Fetched>>> = core.clone();
    let joined = {
        let recheck = |key: &FlightKey| {
            core.lookup(&key.primary, &request.1, &extra).filter(|s| {
                let now = Instant::now();
                core.policy
                    .reuse(&request.1, &s.headers, s.freshness, s.current_age(now))
                    == Reuse::Fresh
            })
        };
        let slot = &mut request_slot;
        let tee_slot = &mut started_tee;
        let start_inner = inner.clone();
        let start_core = core.clone();
        let start_extra = extra.clone();
        let start = move |gate| -> Upstream<Arc<Fetched>> {
            match slot.take() {
                Some(req) => {
                    *tee_slot = tee_for(&req);
                    let origin = flight_origin(
                        start_core.clone(),
                        start_inner,
                        revalidate,
                        start_extra,
                        tee_slot.clone(),
                    );
                    through_tiers(&start_core, tiered, read_first, (req, gate), origin)
                }
                None => unreachable!("a flight starts once"),
            }
        };
        let join = || {
            core.flights
                .join_or_start(&owner, flight_key, true, recheck, start)
        };
        // A bounded wait joins with its deadline, so the flight's (the latest of its
        // waiters') bounds what the flight itself waits for, another instance's lease
        // included.
        match deadline {
            Some(deadline) => TimeoutContext::nested(deadline).sync_scope(join),
            None => join(),
        }
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

    let request_ref = (&request.0, &request.1);
    let waited = async {
        match started_tee.filter(|_| originator) {
            Some(tee) => match head_or_outcome(waiter, &tee).await {
                First::Outcome(outcome) => Ok(outcome),
                // The flight goes on in a task of its own, its waiter there.
                First::Head(head, waiter) => Err(as_it_arrives(head, tee, waiter, reason)),
            },
            None => Ok(waiter.await),
        }
    };
    let waited = match deadline {
        Some(deadline) => match tokio::time::timeout_at(deadline.instant(), waited).await {
            Ok(waited) => waited,
            // This request leaves; the flight goes on for its other waiters.
            Err(_) => Ok(Err(Error::new(ErrorKind::TimedOut))),
        },
        None => waited.await,
    };
    let outcome = match waited {
        Ok(outcome) => outcome,
        Err(response) => return Ok(response),
    };
    let fetched = match outcome {
        Ok(fetched) => fetched,
        Err(error) => {
            // Serve stale on error: an expired entry inside its window answers instead.
            if let Some(response) = stored
                .as_deref()
                .and_then(|s| serve_on_error(core, s, request_ref))
            {
                return Ok(response);
            }
            return Err(failed(error, reason));
        }
    };
    if is_stale_on_error_status(fetched.status) {
        if let Some(response) = stored
            .as_deref()
            .and_then(|s| serve_on_error(core, s, request_ref))
        {
            return Ok(response);
        }
    }

    #[cfg(feature = "redis")]
    if let Fetch::Unsent(started) = &fetched.response {
        // The URI's responses are not stored: each request goes to the origin on its own,
        // all at once. The one that started the flight takes back the request it gave it,
        // and tells the second tier what the origin answered, as the flight would have.
        let req = request_slot.take().or_else(|| {
            let taken = started.lock().unwrap_or_else(|p| p.into_inner()).take();
            taken.and_then(|r| r.downcast::<Request<B>>().ok().map(|r| *r))
        });
        let Some(req) = req else {
            unreachable!("the request that started an unsent flight is taken back once");
        };
        return miss_alone(core, inner, req, (primary, extra), reason, originator).await;
    }
    let answering = Answering {
        core,
        fetched: &fetched,
        request: (&request.0, &request.1),
        extra: &extra,
        originator,
        reason,
    };
    match answering.answer() {
        Answer::Response(response) => Ok(response),
        Answer::Alone(detail) => {
            // Fetched for someone else and not for us: to the origin on our own.
            let Some(req) = request_slot.take() else {
                unreachable!("a waiter that did not start the flight keeps its request");
            };
            forward(inner, req, forwarded(reason, Some(detail)))
                .await
                .map_err(|error| failed(error, reason))
        }
    }
}

/// The stale `stored` as the answer to `request` when its origin request failed, if it is
/// inside its stale-if-error window (the response's own, or the configured
/// stale-on-error).
fn serve_on_error<RB>(
    core: &Core,
    stored: &Stored,
    request: (&Method, &HeaderMap),
) -> Option<Response<BufferedBody<RB>>> {
    let now = Instant::now();
    if !stored.in_window(now, stored.stale_if_error) {
        return None;
    }
    core.metrics.stale_if_error.increment(1);
    tracing::warn!(
        result = "stale-if-error",
        "http cache: origin failed, serving stale"
    );
    Some(serve(stored, request, now, true))
}

/// The error of an origin request, logged, with the `Cache-Status` its error answer
/// carries.
fn failed(error: Error, reason: &'static str) -> Error {
    let detail = match error.kind() {
        ErrorKind::TimedOut => "timed-out",
        ErrorKind::Overloaded => "overloaded",
        ErrorKind::BudgetExhausted => "budget-exhausted",
        ErrorKind::Cancelled => "cancelled",
        ErrorKind::Panicked => "origin-panicked",
        ErrorKind::BadRequest => "bad-request",
        _ => "origin-unreachable",
    };
    tracing::warn!(
        error = %crate::error::chain(&error),
        reason,
        detail,
        "http cache: origin request failed"
    );
    let status = CacheStatus::Failed { reason, detail };
    error.with_cache_status(status.to_string())
}

/// True when the request carries its own validators.
fn has_conditional(headers: &HeaderMap) -> bool {
    headers.contains_key(IF_NONE_MATCH) || headers.contains_key(IF_MODIFIED_SINCE)
}

/// A GET with nothing usable stored, sent to the origin alone, with the client's
/// validators if it has any (their answer may be a 304 for this client only): a response
/// that may be stored is stored, one that may not keeps the URI's misses apart. With
/// `tell_tier`, the second tier hears of it as of a flight's response: a response it may
/// store is written, one it may not renews the URI's mark.
async fn miss_alone<S, B, RB>(
    core: &Arc<Core>,
    inner: S,
    req: Request<B>,
    (key, extra): (String, Option<String>),
    reason: &'static str,
    tell_tier: bool,
) -> Result<Response<BufferedBody<RB>>, Error>
where
    S: Service<Request<B>, Response = Response<RB>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Send + 'static,
    RB: Body<Data = Bytes> + Unpin + Send + 'static,
    RB::Error: Into<BoxError>,
{
    let request = (req.method().clone(), req.headers().clone());
    let tee = tee_for(&req);
    let work = {
        let (core, extra, tee) = (core.clone(), extra.clone(), tee.clone());
        async move {
            // Registered before anything is read: an invalidation from here on keeps what
            // it fetches out of both tiers.
            let solo = core.solos.enter(&key);
            #[cfg(feature = "redis")]
            let generation = match core.second.as_ref().filter(|_| tell_tier) {
                Some(tier) => tier.generation(&key).await,
                None => None,
            };
            let fetched = fetch(
                core.clone(),
                inner,
                req,
                None,
                extra,
                Conditionals::Clients,
                tee,
            )
            .await
            .map_err(|error| failed(error, reason))?;
            #[cfg(feature = "redis")]
            if let Some(tier) = core.second.as_ref().filter(|_| tell_tier) {
                let outcome = Ok(fetched.clone());
                let origin = super::tiered::Origin::marked(generation);
                core.after_origin(tier, &key, &outcome, origin, solo.gate())
                    .await;
            }
            #[cfg(not(feature = "redis"))]
            let _ = tell_tier;
            if let Some(stored) = &fetched.store {
                solo.store_unless_invalidated(|| core.insert(&key, stored.clone()));
            }
            core.note_uncacheable(&key, &fetched);
            drop(solo);
            Ok::<_, Error>(fetched)
        }
    };
    let fetched = match tee {
        Some(tee) => match head_or_outcome(Box::pin(work), &tee).await {
            First::Outcome(outcome) => outcome?,
            First::Head(head, work) => return Ok(as_it_arrives(head, tee, work, reason)),
        },
        None => work.await?,
    };
    let answering = Answering {
        core,
        fetched: &fetched,
        request: (&request.0, &request.1),
        extra: &extra,
        originator: true,
        reason,
    };
    match answering.answer() {
        Answer::Response(response) => Ok(response),
        Answer::Alone(_) => unreachable!("the originator is always answered"),
    }
}

/// A [`Tee`] for the origin request made for `req`, when its client may have the origin's
/// response as it arrives: a GET for the whole representation, without validators of its
/// own (those are answered from the complete response), inside a runtime.
fn tee_for<B, RB>(req: &Request<B>) -> Option<Arc<Tee<RB>>> {
    let whole =
        req.method() == Method::GET && !has_range(req.headers()) && !has_conditional(req.headers());
    (whole && tokio::runtime::Handle::try_current().is_ok()).then(Tee::new)
}

/// What came first for the client that started an origin request: its outcome, or the
/// head of a response whose body stalled while the cache read it (with the work, unless
/// it has finished meanwhile).
enum First<F> {
    Outcome(Result<Arc<Fetched>, Error>),
    Head(Head, Option<F>),
}

/// Waits for `work`'s outcome or for the head `tee` publishes. A published head comes
/// first even when the work has finished too: its body's frames, and the rest of a body
/// past the bound, are in `tee` then, not in the outcome.
async fn head_or_outcome<F, RB>(work: F, tee: &Tee<RB>) -> First<F>
where
    F: Future<Output = Result<Arc<Fetched>, Error>> + Unpin,
{
    let mut work = Some(work);
    std::future::poll_fn(|cx| {
        let Some(running) = work.as_mut() else {
            unreachable!("not polled after it is ready");
        };
        let polled = Pin::new(running).poll(cx);
        if let Some(head) = tee.poll_head(cx) {
            let unfinished = if polled.is_ready() { None } else { work.take() };
            return Poll::Ready(First::Head(head, unfinished));
        }
        polled.map(First::Outcome)
    })
    .await
}

/// The response whose head `tee` published, its body passed on as it arrives while
/// `work` (reading it, and storing it if it may), unless it has finished, runs in a task
/// of its own.
fn as_it_arrives<RB, F>(
    head: Head,
    tee: Arc<Tee<RB>>,
    work: Option<F>,
    reason: &'static str,
) -> Response<BufferedBody<RB>>
where
    F: Future + Send + 'static,
{
    let driver = async move {
        if let Some(work) = work {
            let _ = work.await;
        }
    };
    let status = head.status;
    let declared = head
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let mut response = Response::new(BufferedBody::tee(TeeBody::new(tee, driver, declared)));
    *response.status_mut() = status;
    *response.headers_mut() = head.headers;
    let cache_status = CacheStatus::Forward {
        reason,
        status: status.as_u16(),
        stored: false,
        collapsed: false,
        detail: Some("streamed"),
    };
    with_status(response, &cache_status)
}

/// A HEAD for a stored response that is stale or that the request wants validated: sent
/// to the origin as a HEAD; a 200 that describes the stored representation refreshes its
/// headers, one that does not removes it (RFC 9111 section 4.3.5).
async fn head_through<S, B, RB>(
    core: &Core,
    inner: S,
    req: Request<B>,
    key: &str,
    stored: Arc<Stored>,
    reason: &'static str,
) -> Result<Response<BufferedBody<RB>>, Error>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
{
    let request_headers = req.headers().clone();
    let request_time = SystemTime::now();
    let response = match Oneshot::new(inner, req).await.map_err(Error::inner) {
        Ok(response) => {
            response.map(|body| BufferedBody::streaming(Default::default(), Some(body)))
        }
        Err(error) => {
            return match serve_on_error(core, &stored, (&Method::HEAD, &request_headers)) {
                Some(response) => Ok(response),
                None => Err(failed(error, reason)),
            }
        }
    };
    let status = response.status();
    if is_stale_on_error_status(status) {
        if let Some(response) = serve_on_error(core, &stored, (&Method::HEAD, &request_headers)) {
            return Ok(response);
        }
    }
    if status != StatusCode::OK {
        return Ok(response);
    }
    let mut stored_again = false;
    if head_matches(&stored.headers, response.headers()) {
        let refreshed = core.policy.refresh(
            &request_headers,
            stored.status,
            &stored.headers,
            response.headers(),
        );
        match refreshed.shared {
            Ok(headers) => {
                let updated =
                    stored.refreshed(&core.policy, headers, request_time, SystemTime::now());
                core.insert(key, Arc::new(updated));
                stored_again = true;
            }
            Err(_) => core.remove_variant(key, &stored),
        }
    } else {
        // The origin has another representation now: the stored one is out of date.
        core.remove_variant(key, &stored);
    }
    let cache_status = CacheStatus::Forward {
        reason,
        status: status.as_u16(),
        stored: stored_again,
        collapsed: false,
        detail: Some(if stored_again {
            "head-refreshed"
        } else {
            "head"
        }),
    };
    Ok(with_status(response, &cache_status))
}

/// Sends an unsafe request through; its success invalidates what it touches (RFC 9111
/// section 4.4).
async fn write_through<S, B, RB>(
    core: &Core,
    inner: S,
    req: Request<B>,
) -> Result<Response<BufferedBody<RB>>, Error>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
{
    core.metrics.bypass.increment(1);
    let method = req.method().clone();
    let uri = req.uri().clone();
    let host = req
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned);
    let response = forward(inner, req, forwarded("method", None)).await?;
    if invalidates(&method, response.status()) {
        // Done (in Redis and on the backplane too) before the client hears back, so
        // its next request, wherever it lands, does not get the old response.
        for key in invalidation_targets(&uri, host.as_deref(), response.headers()) {
            core.invalidate(&key).await;
        }
    }
    Ok(response)
}

/// The answer to `only-if-cached` when nothing usable is stored: 504 (RFC 9111 section
/// 5.2.1.7).
fn only_if_cached_miss<RB>() -> Response<BufferedBody<RB>> {
    let mut response = Response::new(BufferedBody::empty());
    *response.status_mut() = StatusCode::GATEWAY_TIMEOUT;
    with_status(
        response,
        &CacheStatus::Forward {
            reason: "miss",
            status: 504,
            stored: false,
            collapsed: false,
            detail: Some("only-if-cached"),
        },
    )
}

/// A flight's outcome, to be answered to one of its waiters.
struct Answering<'a> {
    core: &'a Core,
    fetched: &'a Fetched,
    request: (&'a Method, &'a HeaderMap),
    extra: &'a Option<String>,
    originator: bool,
    reason: &'static str,
}

/// What a waiter does with a flight's outcome.
enum Answer<RB> {
    Response(Response<BufferedBody<RB>>),
    /// The outcome is not this waiter's to use: it goes to the origin alone (the detail
    /// says why).
    Alone(&'static str),
}

impl Answering<'_> {
    /// The requester that started the flight gets what the origin sent it; a coalesced
    /// waiter only ever gets what may be stored and shared.
    fn answer<RB: Send + 'static>(&self) -> Answer<RB> {
        let fetched = self.fetched;
        if let (true, Some(stored)) = (fetched.from_tier, &fetched.store) {
            // Read from the second tier: a hit, for whoever may use it.
            if self.originator || usable_by(self.core, fetched, self.request.1, self.extra) {
                return Answer::Response(serve(stored, self.request, Instant::now(), false));
            }
            return Answer::Alone("not-shareable");
        }
        let complete = match &fetched.response {
            Fetch::Complete {
                status,
                headers,
                body,
            } if self.originator => Some((*status, headers, body)),
            _ if self.originator => None,
            _ => match &fetched.store {
                Some(shared) if usable_by(self.core, fetched, self.request.1, self.extra) => {
                    Some((shared.status, &shared.headers, &shared.body))
                }
                _ => {
                    let detail = fetched
                        .not_stored
                        .map_or("not-shareable", NotStored::as_str);
                    return Answer::Alone(detail);
                }
            },
        };
        if let Some((status, headers, body)) = complete {
            let cache_status = CacheStatus::Forward {
                reason: self.reason,
                status: if fetched.revalidated {
                    304
                } else {
                    status.as_u16()
                },
                stored: fetched.store.is_some(),
                collapsed: !self.originator,
                detail: fetched.not_stored.map(NotStored::as_str),
            };
            let age = fetched
                .store
                .as_ref()
                .map(|s| s.current_age(Instant::now()));
            return Answer::Response(respond(
                status,
                headers,
                body,
                self.request,
                age,
                &cache_status,
            ));
        }
        Answer::Response(self.streamed())
    }

    /// The originator's response that was too large or not storable, streamed on.
    fn streamed<RB: Send + 'static>(&self) -> Response<BufferedBody<RB>> {
        let Fetch::Streaming(response) = &self.fetched.response else {
            unreachable!("a complete response is answered from its bytes");
        };
        let taken = response
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .and_then(|r| r.downcast::<Response<BufferedBody<RB>>>().ok());
        let Some(response) = taken else {
            unreachable!("only the originator takes the streamed response, once");
        };
        let cache_status = CacheStatus::Forward {
            reason: self.reason,
            status: response.status().as_u16(),
            stored: false,
            collapsed: false,
            detail: self.fetched.not_stored.map(NotStored::as_str),
        };
        with_status(*response, &cache_status)
    }
}
