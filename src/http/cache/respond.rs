//! Responses assembled from what is stored or fetched, with their `Cache-Status`.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, AGE, CONTENT_LENGTH, CONTENT_RANGE, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, Method, Response, StatusCode};
use tokio::time::Instant;

use super::stored::Stored;
use crate::http::body::BufferedBody;
use crate::http::cache_policy::{not_modified, CacheStatus};
use crate::http::range::{byte_range, RangeAnswer};

/// The `Cache-Status` header (RFC 9211).
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

pub(super) fn with_status<T>(mut response: Response<T>, status: &CacheStatus) -> Response<T> {
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
pub(super) fn respond<RB>(
    status: StatusCode,
    headers: &HeaderMap,
    body: &Bytes,
    request: (&Method, &HeaderMap),
    age: Option<Duration>,
    cache_status: &CacheStatus,
) -> Response<BufferedBody<RB>> {
    let (method, request_headers) = request;
    let conditional = status == StatusCode::OK && not_modified(request_headers, headers);
    // A byte range of a complete 200 (RFC 9110 section 14), for GET only.
    let range = if status == StatusCode::OK && *method == Method::GET && !conditional {
        byte_range(request_headers, headers, body.len() as u64)
    } else {
        RangeAnswer::Whole
    };
    let mut response = Response::new(match range {
        _ if *method == Method::HEAD || conditional => BufferedBody::empty(),
        RangeAnswer::Partial { start, end } => {
            // Within the body: byte_range bounds both by its length.
            BufferedBody::complete(body.slice(start as usize..=end as usize))
        }
        RangeAnswer::Unsatisfiable => BufferedBody::empty(),
        RangeAnswer::Whole | RangeAnswer::Forward => BufferedBody::complete(body.clone()),
    });
    *response.headers_mut() = headers.clone();
    if conditional {
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        response.headers_mut().remove(CONTENT_LENGTH);
        response.headers_mut().remove(TRANSFER_ENCODING);
    } else if let Some(content_range) = range.content_range(body.len() as u64) {
        let (status, length) = match range {
            RangeAnswer::Partial { start, end } => (StatusCode::PARTIAL_CONTENT, end - start + 1),
            _ => (StatusCode::RANGE_NOT_SATISFIABLE, 0),
        };
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.remove(TRANSFER_ENCODING);
        headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
        if let Ok(value) = HeaderValue::from_str(&content_range) {
            headers.insert(CONTENT_RANGE, value);
        }
    } else {
        *response.status_mut() = status;
        // The complete body goes with its length, so the fields a HEAD gets are the ones
        // the GET has (RFC 9110 section 9.3.2), however the origin framed it.
        // (A 204 carries no Content-Length at all, RFC 9110 section 8.6.)
        let headers = response.headers_mut();
        headers.remove(TRANSFER_ENCODING);
        if status == StatusCode::NO_CONTENT {
            headers.remove(CONTENT_LENGTH);
        } else {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
    }
    if let Some(age) = age {
        response
            .headers_mut()
            .insert(AGE, HeaderValue::from(age.as_secs()));
    }
    with_status(response, cache_status)
}

pub(super) fn serve<RB>(
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
