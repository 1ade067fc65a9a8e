//! `Cache-Control` parsing (RFC 9111 section 5.2) that never panics.
//!
//! - Directive names are case-insensitive; unknown directives are ignored.
//! - Every `Cache-Control` field line counts, in order, as one comma-separated list.
//! - A directive that appears more than once keeps its first occurrence.
//! - Values may be tokens or quoted strings. A delta-seconds value that is not a number
//!   is kept as invalid, and an invalid `max-age` or `s-maxage` makes the response stale
//!   (section 4.2.1 allows either the first value or staleness; invalid means stale). A
//!   value too large to represent counts as 2^31 seconds (section 1.2.2).

use std::time::Duration;

use http::header::CACHE_CONTROL;
use http::HeaderMap;

/// The largest delta-seconds value a cache must represent (RFC 9111 section 1.2.2).
pub const DELTA_SECONDS_MAX: u64 = 2_147_483_648;

/// A delta-seconds directive value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seconds {
    /// A valid value, capped at [`DELTA_SECONDS_MAX`].
    Valid(u64),
    /// Present but not a non-negative integer (or with no value where one is required).
    Invalid,
}

impl Seconds {
    /// The value as a duration; an invalid value is zero, which makes a lifetime stale.
    pub fn duration(self) -> Duration {
        match self {
            Seconds::Valid(s) => Duration::from_secs(s),
            Seconds::Invalid => Duration::ZERO,
        }
    }
}

/// The parsed directives of the `Cache-Control` fields of one message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheControl {
    /// `max-age`.
    pub max_age: Option<Seconds>,
    /// `s-maxage` (responses).
    pub s_maxage: Option<Seconds>,
    /// `max-stale` (requests); `Some(None)` is a `max-stale` without a value (any staleness).
    pub max_stale: Option<Option<Seconds>>,
    /// `min-fresh` (requests).
    pub min_fresh: Option<Seconds>,
    /// `stale-while-revalidate` (RFC 5861).
    pub stale_while_revalidate: Option<Seconds>,
    /// `stale-if-error` (RFC 5861).
    pub stale_if_error: Option<Seconds>,
    /// `no-cache`, qualified or not (a shared cache treats both alike).
    pub no_cache: bool,
    /// `no-store`.
    pub no_store: bool,
    /// `private`, qualified or not (a shared cache stores neither).
    pub private: bool,
    /// `public`.
    pub public: bool,
    /// `must-revalidate`.
    pub must_revalidate: bool,
    /// `proxy-revalidate`.
    pub proxy_revalidate: bool,
    /// `must-understand`.
    pub must_understand: bool,
    /// `no-transform`.
    pub no_transform: bool,
    /// `only-if-cached` (requests).
    pub only_if_cached: bool,
    /// `immutable` (RFC 8246).
    pub immutable: bool,
}

impl Seconds {
    /// Delta-seconds as RFC 9111 section 1.2.2 reads them: digits only, capped at 2^31;
    /// anything else is invalid.
    pub(crate) fn parse(value: &str) -> Seconds {
        parse_seconds(Some(value))
    }
}

fn parse_seconds(value: Option<&str>) -> Seconds {
    let Some(value) = value else {
        return Seconds::Invalid;
    };
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Seconds::Invalid;
    }
    // All digits: only overflow can fail, and overflow means the maximum.
    Seconds::Valid(
        value
            .parse::<u64>()
            .map_or(DELTA_SECONDS_MAX, |s| s.min(DELTA_SECONDS_MAX)),
    )
}

/// Splits a field value into directives at commas outside quoted strings. A quoted string
/// starts only where a value does (right after `=`), and one left open at the end of the
/// line did not hold its commas after all: a stray `"` cannot swallow the directives
/// that follow it.
fn directives(line: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut in_quotes = false;
    let mut escaped = false;
    let mut parts = Vec::new();
    for c in line.chars() {
        if in_quotes {
            current.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_quotes = false;
            }
            continue;
        }
        match c {
            '"' if current.trim_end().ends_with('=') => {
                in_quotes = true;
                current.push(c);
            }
            ',' => parts.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    if in_quotes {
        parts.extend(current.split(',').map(str::to_owned));
    } else {
        parts.push(current);
    }
    for part in parts {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let (name, value) = match part.split_once('=') {
            Some((name, value)) => (name.trim(), Some(unquote(value.trim()))),
            None => (part, None),
        };
        if name.is_empty() {
            continue;
        }
        out.push((name.to_ascii_lowercase(), value));
    }
    out
}

fn unquote(value: &str) -> String {
    match value
        .strip_prefix('"')
        .and_then(|rest| rest.strip_suffix('"'))
    {
        Some(inner) => {
            let mut out = String::with_capacity(inner.len());
            let mut escaped = false;
            for c in inner.chars() {
                if escaped {
                    out.push(c);
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else {
                    out.push(c);
                }
            }
            out
        }
        None => value.to_owned(),
    }
}

impl CacheControl {
    /// Parses field values, in order, as one list. A byte that is not text (obs-text)
    /// spoils only the directive it is in: the rest of its line still counts, so a stray
    /// byte cannot hide a `private` or `no-store` beside it.
    pub fn parse<'a>(lines: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let mut cc = CacheControl::default();
        let mut seen: Vec<String> = Vec::new();
        for line in lines {
            let line = String::from_utf8_lossy(line);
            for (name, value) in directives(&line) {
                if seen.contains(&name) {
                    continue;
                }
                seen.push(name.clone());
                let value = value.as_deref();
                match name.as_str() {
                    "max-age" => cc.max_age = Some(parse_seconds(value)),
                    "s-maxage" => cc.s_maxage = Some(parse_seconds(value)),
                    "max-stale" => cc.max_stale = Some(value.map(|v| parse_seconds(Some(v)))),
                    "min-fresh" => cc.min_fresh = Some(parse_seconds(value)),
                    "stale-while-revalidate" => {
                        cc.stale_while_revalidate = Some(parse_seconds(value))
                    }
                    "stale-if-error" => cc.stale_if_error = Some(parse_seconds(value)),
                    "no-cache" => cc.no_cache = true,
                    "no-store" => cc.no_store = true,
                    "private" => cc.private = true,
                    "public" => cc.public = true,
                    "must-revalidate" => cc.must_revalidate = true,
                    "proxy-revalidate" => cc.proxy_revalidate = true,
                    "must-understand" => cc.must_understand = true,
                    "no-transform" => cc.no_transform = true,
                    "only-if-cached" => cc.only_if_cached = true,
                    "immutable" => cc.immutable = true,
                    _ => {}
                }
            }
        }
        cc
    }

    /// The directives of every `Cache-Control` field in `headers`.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        Self::parse(headers.get_all(CACHE_CONTROL).iter().map(|v| v.as_bytes()))
    }

    /// True when a shared cache may not serve the response stale (RFC 9111 sections
    /// 4.2.4, 5.2.2.2, 5.2.2.4, 5.2.2.8 and 5.2.2.10; RFC 5861 section 4).
    pub fn forbids_stale(&self) -> bool {
        self.must_revalidate || self.proxy_revalidate || self.no_cache || self.s_maxage.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cc(lines: &[&str]) -> CacheControl {
        CacheControl::parse(lines.iter().map(|l| l.as_bytes()))
    }

    #[test]
    fn quoted_values_and_commas_inside_quotes() {
        let parsed = cc(&[r#"private="set-cookie, x-a", max-age="60""#]);
        assert!(parsed.private);
        assert_eq!(parsed.max_age, Some(Seconds::Valid(60)));
    }

    #[test]
    fn lines_combine_and_the_first_duplicate_wins() {
        let parsed = cc(&["max-age=10", "max-age=99, public"]);
        assert_eq!(parsed.max_age, Some(Seconds::Valid(10)));
        assert!(parsed.public);
    }

    proptest! {
        #[test]
        fn parsing_never_panics_on_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = CacheControl::parse([bytes.as_slice()]);
        }

        #[test]
        fn parsing_never_panics_on_directive_soup(s in r#"[a-zA-Z\-=",\\ 0-9]{0,80}"#) {
            let parsed = CacheControl::parse([s.as_bytes()]);
            if let Some(Seconds::Valid(v)) = parsed.max_age {
                prop_assert!(v <= DELTA_SECONDS_MAX);
            }
        }
    }
}
