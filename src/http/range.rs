//! Byte ranges served from a stored complete response (RFC 9110 section 14), as
//! functions of messages.
//!
//! A cache that holds a complete `200` can answer a single byte range itself: `bytes=a-b`,
//! `bytes=a-` and `bytes=-n` become a `206 Partial Content` with `Content-Range`; a range
//! that starts past the end is answered `416 Range Not Satisfiable` with
//! `Content-Range: bytes */length`. Requests for several ranges are sent to the origin,
//! which can assemble `multipart/byteranges` bodies; an `If-Range` that does not match the
//! stored representation asks for the whole response.
//!
//! ```
//! use http::HeaderMap;
//! use towerguard::http::range::{byte_range, RangeAnswer};
//!
//! let mut request = HeaderMap::new();
//! request.insert("range", "bytes=-4".parse().unwrap());
//! let answer = byte_range(&request, &HeaderMap::new(), 10);
//! assert_eq!(answer, RangeAnswer::Partial { start: 6, end: 9 });
//! assert_eq!(answer.content_range(10).unwrap(), "bytes 6-9/10");
//! ```

use http::header::{ETAG, IF_RANGE, LAST_MODIFIED, RANGE};
use http::HeaderMap;

/// What a request's `Range` asks of a stored complete response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAnswer {
    /// No range applies (none asked, an invalid one, a unit other than `bytes`, or an
    /// `If-Range` that does not match): the whole response, `200`.
    Whole,
    /// One satisfiable range, `start..=end` (inclusive, within the body): `206`.
    Partial {
        /// The first byte.
        start: u64,
        /// The last byte, inclusive.
        end: u64,
    },
    /// A single range that no byte of the body satisfies: `416`.
    Unsatisfiable,
    /// Several ranges: for the origin to answer.
    Forward,
}

impl RangeAnswer {
    /// The `Content-Range` value for a body of `length` bytes: `bytes a-b/length` for a
    /// partial answer, `bytes */length` for an unsatisfiable one.
    pub fn content_range(&self, length: u64) -> Option<String> {
        match self {
            RangeAnswer::Partial { start, end } => Some(format!("bytes {start}-{end}/{length}")),
            RangeAnswer::Unsatisfiable => Some(format!("bytes */{length}")),
            RangeAnswer::Whole | RangeAnswer::Forward => None,
        }
    }
}

/// True when the request carries a `Range` field at all.
pub fn has_range(request: &HeaderMap) -> bool {
    request.contains_key(RANGE)
}

/// True when the request's `Range` asks for more than one range (a valid `bytes` set of
/// two or more): such requests are left to the origin.
pub fn several_ranges(request: &HeaderMap) -> bool {
    byte_range(request, &HeaderMap::new(), u64::MAX) == RangeAnswer::Forward
}

/// How to answer a GET with headers `request` from a stored complete response with headers
/// `stored` and a body of `length` bytes (RFC 9110 sections 14.1.2, 14.2 and 13.1.5).
pub fn byte_range(request: &HeaderMap, stored: &HeaderMap, length: u64) -> RangeAnswer {
    let mut lines = request.get_all(RANGE).iter();
    let Some(line) = lines.next() else {
        return RangeAnswer::Whole;
    };
    if lines.next().is_some() {
        // Two Range lines: an invalid field, ignored (section 14.2).
        return RangeAnswer::Whole;
    }
    let Ok(value) = line.to_str() else {
        return RangeAnswer::Whole;
    };
    let Some((unit, set)) = value.trim().split_once('=') else {
        return RangeAnswer::Whole;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return RangeAnswer::Whole;
    }
    let specs: Vec<&str> = set
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    match specs.as_slice() {
        [] => RangeAnswer::Whole,
        [one] => match parse_spec(one) {
            Some(spec) if if_range_matches(request, stored) => resolve(spec, length),
            _ => RangeAnswer::Whole,
        },
        several => {
            if several.iter().all(|s| parse_spec(s).is_some()) {
                RangeAnswer::Forward
            } else {
                RangeAnswer::Whole
            }
        }
    }
}

/// One range-spec: `first-last`, `first-` or `-suffix`.
#[derive(Debug, Clone, Copy)]
enum Spec {
    FromTo(u64, Option<u64>),
    Suffix(u64),
}

fn digits(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // All digits: only overflow can fail, and a position that large is past any body.
    Some(s.parse().unwrap_or(u64::MAX))
}

fn parse_spec(spec: &str) -> Option<Spec> {
    let (first, last) = spec.split_once('-')?;
    if first.trim().is_empty() {
        return digits(last).map(Spec::Suffix);
    }
    let first = digits(first)?;
    if last.trim().is_empty() {
        return Some(Spec::FromTo(first, None));
    }
    let last = digits(last)?;
    // last < first makes the whole field invalid (section 14.1.1).
    (last >= first).then_some(Spec::FromTo(first, Some(last)))
}

fn resolve(spec: Spec, length: u64) -> RangeAnswer {
    match spec {
        Spec::FromTo(first, last) => {
            if first >= length {
                return RangeAnswer::Unsatisfiable;
            }
            let end = last.map_or(length - 1, |l| l.min(length - 1));
            RangeAnswer::Partial { start: first, end }
        }
        Spec::Suffix(0) => RangeAnswer::Unsatisfiable,
        Spec::Suffix(_) if length == 0 => RangeAnswer::Unsatisfiable,
        Spec::Suffix(n) => RangeAnswer::Partial {
            start: length.saturating_sub(n),
            end: length - 1,
        },
    }
}

/// `If-Range` (RFC 9110 section 13.1.5): absent, or an entity tag that strongly matches
/// the stored one, or a date equal to the stored `Last-Modified`.
fn if_range_matches(request: &HeaderMap, stored: &HeaderMap) -> bool {
    let Some(value) = request.get(IF_RANGE) else {
        return true;
    };
    let Ok(value) = value.to_str() else {
        return false;
    };
    let value = value.trim();
    if value.starts_with('"') || value.starts_with("W/") {
        // A weak tag never matches (strong comparison).
        if value.starts_with("W/") {
            return false;
        }
        return stored
            .get(ETAG)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|etag| etag.trim() == value);
    }
    let Ok(since) = httpdate::parse_http_date(value) else {
        return false;
    };
    stored
        .get(LAST_MODIFIED)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v.trim()).ok())
        .is_some_and(|modified| modified == since)
}
