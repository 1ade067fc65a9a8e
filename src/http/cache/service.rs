//! The service: a request's way through the cache.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::HOST;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use tokio::time::Instant;
use tower_service::Service;

use super::core::Core;
use super::fetch::{fetch, forward, forwarded, revalidate_in_background};
use super::respond::{respond, serve, with_status};
use super::stored::{Fetch, Fetched, FlightKey};
use crate::cache::flight::{Joined, Owner, Upstream, Waiter};
use crate::error::{BoxError, Error};
use crate::http::body::BufferedBody;
use crate::http::cache_control::CacheControl;
use crate::http::cache_policy::{
    has_validator, invalidates, invalidation_targets, primary_key, vary_matches, CacheStatus,
    NotStored,
};

/// An RFC 9111 shared cache in front of `S`. Made by [`HttpCacheLayer`](super::HttpCacheLayer).
///
/// Hits never touch `S`; every origin request drives its own clone of `S` to readiness.
#[derive(Clone)]
pub struct HttpCache<S> {
    pub(super) inner: S,
    pub(super) core: Arc<Core>,
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
        return Ok(only_if_cached_miss());
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

    let answering = Answering {
        core: &core,
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
            forward(inner, req, forwarded(reason, Some(detail))).await
        }
    }
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
        for key in invalidation_targets(&uri, host.as_deref(), response.headers()) {
            core.invalidate(&key);
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
