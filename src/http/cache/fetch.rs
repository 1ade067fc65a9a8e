//! Going to the origin: a flight's request (revalidating what is stale), a request of its
//! own for one that cannot share, and the background refresh of stale-while-revalidate.

use std::any::Any;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use http::header::{IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, RANGE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::util::Oneshot;
use tower_service::Service;

use super::core::Core;
use super::respond::with_status;
use super::stored::{compact, Fetch, Fetched, FlightKey, Stored};
use crate::cache::flight::{Gate, Joined, Owner, Upstream};
use crate::error::{BoxError, Error};
use crate::http::body::{poll_read_ahead, BufferedBody};
use crate::http::cache_policy::{
    conditional_headers, has_validator, is_stale_on_error_status, vary, AgeInputs, CacheStatus,
    NotStored, Vary,
};
use crate::http::tee::{Head, Tee, TeeWriter};
use crate::http::timeout::HttpExtensions;
use crate::timeout::{Carrier, Deadline, TimeoutContext};

/// How a fetch treats the client's own conditional fields.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Conditionals {
    /// The cache makes its own conditional request (from `revalidate`, if any); the
    /// client's is answered from the result.
    Ours,
    /// Nothing usable is stored: the client's `If-None-Match` / `If-Modified-Since` go to
    /// the origin, which may answer them 304.
    Clients,
}

/// Sends `req` to the origin and reads its response ahead, deciding whether it may be
/// stored. `revalidate` is the stale entry whose validators the request carries. The
/// request asks for the whole representation (a `Range` is answered from it).
///
/// With `tee`, a body the cache reads ahead that stalls before it ends is published there
/// (its head, the frames so far, then each frame as it comes), for the client that asked
/// for it to have at once; it is still stored when it ends within the bound.
pub(super) async fn fetch<S, B, RB>(
    core: Arc<Core>,
    inner: S,
    mut req: Request<B>,
    revalidate: Option<Arc<Stored>>,
    extra: Option<String>,
    conditionals: Conditionals,
    tee: Option<Arc<Tee<RB>>>,
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
    let headers = req.headers_mut();
    headers.remove(RANGE);
    headers.remove(IF_RANGE);
    if conditionals == Conditionals::Ours {
        headers.remove(IF_NONE_MATCH);
        headers.remove(IF_MODIFIED_SINCE);
    }
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
                    let stored = stale.refreshed(policy, headers, request_time, response_time);
                    (Some(Arc::new(stored)), None, None)
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
                from_tier: false,
            }));
        }
    }

    let status = response.status();
    let decision = policy.storable(&Method::GET, &request_headers, status, response.headers());
    let (parts, body) = response.into_parts();
    // A response that is not stored: passed on in `slot`, or `None` when its client already
    // has it through the tee.
    let unstored = |slot: Option<Box<dyn Any + Send>>, reason| {
        Arc::new(Fetched {
            status,
            response: Fetch::Streaming(Mutex::new(slot)),
            request_headers: request_headers.clone(),
            extra: extra.clone(),
            store: None,
            not_stored: Some(reason),
            evict: None,
            revalidated: false,
            from_tier: false,
        })
    };
    let streaming = |body: BufferedBody<RB>, parts: http::response::Parts, reason| {
        unstored(Some(Box::new(Response::from_parts(parts, body))), reason)
    };
    let handed_over = |reason| unstored(None, reason);
    let freshness = policy.freshness(status, &parts.headers);
    let (swr, sie) = policy.stale_windows(&parts.headers);
    // Worth storing when it can answer a later request; an error that is stale at once
    // never takes the place of the response stale-on-error would serve.
    let useful = if is_stale_on_error_status(status) {
        !freshness.is_zero()
    } else {
        !freshness.is_zero() || has_validator(&parts.headers) || !swr.is_zero() || !sie.is_zero()
    };
    // Decided from the headers alone, before any of the body is read: a response that may
    // not be stored, one that could answer no later request (so one that never ends, an
    // event stream, reaches its client at once) and one declared longer than the bound
    // go on as they arrive.
    let unread = match decision {
        Err(reason) => Some(reason),
        Ok(()) if !useful => Some(NotStored::NoFreshness),
        Ok(()) if body.size_hint().lower() > core.max_body as u64 => Some(NotStored::TooLarge),
        Ok(()) => None,
    };
    if let Some(reason) = unread {
        let body = BufferedBody::streaming(Default::default(), Some(body));
        return Ok(streaming(body, parts, reason));
    }
    // An error response that stale-on-error may answer instead is read whole first.
    let tee = tee
        .filter(|_| !is_stale_on_error_status(status))
        .map(TeeWriter);
    let mut body = body;
    let (mut frames, mut data) = (VecDeque::new(), BytesMut::new());
    let mut is_published = false;
    let read = std::future::poll_fn(|cx| {
        let polled = poll_read_ahead(
            Pin::new(&mut body),
            &mut frames,
            &mut data,
            core.max_body,
            cx,
        );
        if let Some(TeeWriter(tee)) = &tee {
            if is_published {
                tee.push(&mut frames);
            } else if polled.is_pending() {
                let head = Head {
                    status,
                    headers: parts.headers.clone(),
                };
                tee.publish(head, &mut frames);
                is_published = true;
            }
        }
        polled
    })
    .await;
    let published = tee.as_ref().filter(|_| is_published);
    let complete = match (read, published) {
        (Ok(complete), _) => complete,
        (Err(error), Some(TeeWriter(tee))) => {
            tee.fail(error.clone());
            return Err(error);
        }
        (Err(error), None) => return Err(error),
    };
    if !complete {
        let Some(TeeWriter(tee)) = published else {
            let body = BufferedBody::streaming(frames, Some(body));
            return Ok(streaming(body, parts, NotStored::TooLarge));
        };
        // Its client has the frames so far and reads the rest itself.
        tee.rest(body);
        return Ok(handed_over(NotStored::TooLarge));
    }
    if let Some(TeeWriter(tee)) = published {
        tee.complete();
    }
    if !matches_declared_length(&parts.headers, data.len()) {
        // Shorter or longer than declared: passed on as read, for the client's HTTP stack
        // to see as the origin framed it, and never stored.
        tracing::debug!(
            read = data.len(),
            "http cache: body does not match its Content-Length, not stored"
        );
        if published.is_some() {
            return Ok(handed_over(NotStored::Incomplete));
        }
        let body = BufferedBody::streaming(frames, Some(body));
        return Ok(streaming(body, parts, NotStored::Incomplete));
    }
    let bytes = data.freeze();
    let response_vary = vary(&parts.headers);
    let store = {
        let mut nominated = HeaderMap::new();
        if let Vary::Fields(fields) = &response_vary {
            for name in fields {
                for value in request_headers.get_all(name) {
                    nominated.append(name.clone(), value.clone());
                }
            }
        }
        // Stored in allocations of its own: the parsed response's header values and body
        // are slices of the connection's read buffers, which would stay alive (and
        // uncounted) as long as the entry does.
        Arc::new(Stored {
            status,
            headers: compact(&parts.headers),
            body: Bytes::copy_from_slice(&bytes),
            vary: response_vary,
            request_headers: compact(&nominated),
            extra: extra.clone(),
            age: AgeInputs::from_headers(&parts.headers, request_time, response_time),
            stored_at: Instant::now(),
            freshness,
            stale_while_revalidate: swr,
            stale_if_error: sie,
        })
    };
    Ok(Arc::new(Fetched {
        status,
        response: Fetch::Complete {
            status,
            headers: parts.headers,
            body: bytes,
        },
        request_headers,
        extra,
        not_stored: None,
        store: Some(store),
        evict: None,
        revalidated: false,
        from_tier: false,
    }))
}

/// Whether a body of `read` bytes is what `headers` declare: true without a
/// `Content-Length` (the body's end frames it), false for one that differs or cannot be
/// read (several values that disagree, or not a number).
fn matches_declared_length(headers: &HeaderMap, read: usize) -> bool {
    let mut declared = None;
    for value in headers.get_all(http::header::CONTENT_LENGTH) {
        let Some(length) = value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
        else {
            return false;
        };
        if declared.is_some_and(|d| d != length) {
            return false;
        }
        declared = Some(length);
    }
    declared.is_none_or(|length| length == read as u64)
}

/// What a flight sends its request to the origin with: [`fetch`] with the cache's own
/// conditional fields, from `revalidate`'s validators.
pub(super) fn flight_origin<S, B, RB>(
    core: Arc<Core>,
    inner: S,
    revalidate: Option<Arc<Stored>>,
    extra: Option<String>,
    tee: Option<Arc<Tee<RB>>>,
) -> impl FnOnce(Request<B>) -> Upstream<Arc<Fetched>> + Send + 'static
where
    S: Service<Request<B>, Response = Response<RB>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Send + 'static,
    RB: Body<Data = Bytes> + Unpin + Send + 'static,
    RB::Error: Into<BoxError>,
{
    move |req| -> Upstream<Arc<Fetched>> {
        Box::pin(fetch(
            core,
            inner,
            req,
            revalidate,
            extra,
            Conditionals::Ours,
            tee,
        ))
    }
}

/// A flight's origin request (`origin` sending `req`) for `primary`, through the second
/// tier when there is one: with nothing stored here (`read_first`), Redis is read first and
/// the key's lease taken (or another instance's response awaited); what the origin sends
/// that may be stored is written to Redis. A URI marked there as one whose responses are
/// not stored ends the flight unsent, so its waiters go to the origin together.
#[cfg(feature = "redis")]
pub(super) fn through_tiers<B: Send + 'static>(
    core: &Arc<Core>,
    (primary, request, extra): (String, HeaderMap, Option<String>),
    read_first: bool,
    (req, gate): (Request<B>, Arc<Gate>),
    origin: impl FnOnce(Request<B>) -> Upstream<Arc<Fetched>> + Send + 'static,
) -> Upstream<Arc<Fetched>> {
    let Some(tier) = core.second.clone() else {
        return origin(req);
    };
    let core = core.clone();
    Box::pin(async move {
        let lease = if read_first {
            match core.before_origin(&tier, &primary, &request, &extra).await {
                super::tiered::Before::Found(fetched) => return Ok(fetched),
                super::tiered::Before::Marked => {
                    return Ok(super::tiered::unsent(req, request, extra))
                }
                super::tiered::Before::Origin(origin) => origin,
            }
        } else {
            // Something stale is stored here: no read of the variants, only of what
            // the write must find unchanged.
            super::tiered::Origin::unread(tier.generation(&primary).await)
        };
        let outcome = origin(req).await;
        core.after_origin(&tier, &primary, &outcome, lease, &gate)
            .await;
        outcome
    })
}

/// Without a second tier, the origin request as it is.
#[cfg(not(feature = "redis"))]
pub(super) fn through_tiers<B>(
    _core: &Arc<Core>,
    _request: (String, HeaderMap, Option<String>),
    _read_first: bool,
    (req, _gate): (Request<B>, Arc<Gate>),
    origin: impl FnOnce(Request<B>) -> Upstream<Arc<Fetched>>,
) -> Upstream<Arc<Fetched>> {
    origin(req)
}

pub(super) async fn forward<S, B, RB>(
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

pub(super) fn forwarded(
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

/// Starts one background revalidation of `key` (stale-while-revalidate), unless one is
/// under way or there is no runtime.
pub(super) fn revalidate_in_background<S, B, RB>(
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
    let tiered = (key.clone(), req.headers().clone(), extra.clone());
    let key = core.flight_key(key, req.headers(), &extra);
    let validators = has_validator(&stale.headers).then_some(stale);
    let (fetch_core, fetch_inner) = (core.clone(), inner.clone());
    let start = move |gate| -> Upstream<Arc<Fetched>> {
        let origin = flight_origin(fetch_core.clone(), fetch_inner, validators, extra, None);
        through_tiers(&fetch_core, tiered, false, (req, gate), origin)
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
