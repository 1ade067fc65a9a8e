//! Table-driven conformance cases for the shared-cache rules of RFC 9111 (and RFC 5861,
//! RFC 9110 conditional requests, RFC 9211 Cache-Status). Each row names the section it
//! comes from.

// The tables are tuples on purpose: one row per line, read like the RFC's cases.
#![allow(clippy::type_complexity)]

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use towerguard::http::cache_control::{CacheControl, Seconds, DELTA_SECONDS_MAX};
use towerguard::http::cache_policy::{
    conditional_headers, has_validator, head_matches, invalidates, invalidation_targets,
    is_stale_on_error_status, not_modified, primary_key, quoted_etag, update_headers, vary,
    vary_matches, AgeInputs, CacheStatus, HttpCachePolicy, NotStored, Reuse, Vary,
};
use towerguard::http::range::{byte_range, several_ranges, RangeAnswer};

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    map
}

fn date(offset_secs: i64) -> String {
    let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let t = if offset_secs >= 0 {
        base + Duration::from_secs(offset_secs as u64)
    } else {
        base - Duration::from_secs((-offset_secs) as u64)
    };
    httpdate::fmt_http_date(t)
}

fn at(offset_secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + offset_secs)
}

// ---------------------------------------------------------------------------------------
// RFC 9111 section 3: storing responses in a shared cache.

struct Store {
    rule: &'static str,
    method: Method,
    request: Vec<(&'static str, &'static str)>,
    status: u16,
    response: Vec<(&'static str, &'static str)>,
    expect: Result<(), NotStored>,
}

fn store(
    rule: &'static str,
    method: Method,
    request: &[(&'static str, &'static str)],
    status: u16,
    response: &[(&'static str, &'static str)],
    expect: Result<(), NotStored>,
) -> Store {
    Store {
        rule,
        method,
        request: request.to_vec(),
        status,
        response: response.to_vec(),
        expect,
    }
}

#[test]
fn storing_responses_section_3() {
    let ok = Ok(());
    let cases = vec![
        store(
            "3: GET 200 with max-age",
            Method::GET,
            &[],
            200,
            &[("cache-control", "max-age=60")],
            ok,
        ),
        store(
            "3: POST is not stored",
            Method::POST,
            &[],
            200,
            &[("cache-control", "max-age=60")],
            Err(NotStored::Method),
        ),
        store(
            "3: PUT is not stored",
            Method::PUT,
            &[],
            200,
            &[("cache-control", "max-age=60")],
            Err(NotStored::Method),
        ),
        store(
            "3: DELETE is not stored",
            Method::DELETE,
            &[],
            200,
            &[("cache-control", "max-age=60")],
            Err(NotStored::Method),
        ),
        store(
            "3: HEAD responses are answered from GET, not stored",
            Method::HEAD,
            &[],
            200,
            &[("cache-control", "max-age=60")],
            Err(NotStored::Method),
        ),
        store(
            "3: 304 is not a final response to store",
            Method::GET,
            &[],
            304,
            &[("cache-control", "max-age=60")],
            Err(NotStored::Status),
        ),
        store(
            "3: 206 needs range support",
            Method::GET,
            &[],
            206,
            &[("cache-control", "max-age=60")],
            Err(NotStored::Status),
        ),
        store(
            "3: 100 is not final",
            Method::GET,
            &[],
            100,
            &[],
            Err(NotStored::Status),
        ),
        store(
            "5.2.2.5: response no-store",
            Method::GET,
            &[],
            200,
            &[("cache-control", "no-store, max-age=60")],
            Err(NotStored::NoStore),
        ),
        store(
            "5.2.1.5: request no-store",
            Method::GET,
            &[("cache-control", "no-store")],
            200,
            &[("cache-control", "max-age=60")],
            Err(NotStored::NoStore),
        ),
        store(
            "5.2.2.7: private",
            Method::GET,
            &[],
            200,
            &[("cache-control", "private, max-age=60")],
            Err(NotStored::Private),
        ),
        store(
            "5.2.2.7: qualified private",
            Method::GET,
            &[],
            200,
            &[("cache-control", "private=\"x-user\", max-age=60")],
            Err(NotStored::Private),
        ),
        store(
            "5.2.2.7: PRIVATE is case-insensitive",
            Method::GET,
            &[],
            200,
            &[("cache-control", "PRIVATE, max-age=60")],
            Err(NotStored::Private),
        ),
        store(
            "3.5: Authorization without permission",
            Method::GET,
            &[("authorization", "Bearer x")],
            200,
            &[("cache-control", "max-age=60")],
            Err(NotStored::Authorization),
        ),
        store(
            "3.5: Authorization with public",
            Method::GET,
            &[("authorization", "Bearer x")],
            200,
            &[("cache-control", "public, max-age=60")],
            ok,
        ),
        store(
            "3.5: Authorization with s-maxage",
            Method::GET,
            &[("authorization", "Bearer x")],
            200,
            &[("cache-control", "s-maxage=60")],
            ok,
        ),
        store(
            "3.5: Authorization with must-revalidate",
            Method::GET,
            &[("authorization", "Bearer x")],
            200,
            &[("cache-control", "must-revalidate, max-age=60")],
            ok,
        ),
        store(
            "3.5: Authorization, heuristic only",
            Method::GET,
            &[("authorization", "Bearer x")],
            200,
            &[("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT")],
            Err(NotStored::Authorization),
        ),
        store(
            "policy: Set-Cookie is never shared",
            Method::GET,
            &[],
            200,
            &[("cache-control", "max-age=60"), ("set-cookie", "id=1")],
            Err(NotStored::SetCookie),
        ),
        store(
            "policy: Set-Cookie with public",
            Method::GET,
            &[],
            200,
            &[
                ("cache-control", "public, max-age=60"),
                ("set-cookie", "id=1"),
            ],
            Err(NotStored::SetCookie),
        ),
        store(
            "4.1: Vary: * never matches",
            Method::GET,
            &[],
            200,
            &[("cache-control", "max-age=60"), ("vary", "*")],
            Err(NotStored::VaryStar),
        ),
        store(
            "4.1: Vary: accept, * never matches",
            Method::GET,
            &[],
            200,
            &[("cache-control", "max-age=60"), ("vary", "accept, *")],
            Err(NotStored::VaryStar),
        ),
        store(
            "4.1: Vary on a field is storable",
            Method::GET,
            &[],
            200,
            &[("cache-control", "max-age=60"), ("vary", "accept-encoding")],
            ok,
        ),
        store(
            "3: 200 without freshness is heuristically cacheable",
            Method::GET,
            &[],
            200,
            &[],
            ok,
        ),
        store(
            "3: 404 heuristically cacheable",
            Method::GET,
            &[],
            404,
            &[],
            ok,
        ),
        store(
            "3: 410 heuristically cacheable",
            Method::GET,
            &[],
            410,
            &[],
            ok,
        ),
        store(
            "3: 301 heuristically cacheable",
            Method::GET,
            &[],
            301,
            &[],
            ok,
        ),
        store(
            "3: 308 heuristically cacheable",
            Method::GET,
            &[],
            308,
            &[],
            ok,
        ),
        store(
            "3: 501 heuristically cacheable",
            Method::GET,
            &[],
            501,
            &[],
            ok,
        ),
        store(
            "3: 401 needs explicit freshness",
            Method::GET,
            &[],
            401,
            &[],
            Err(NotStored::NoFreshness),
        ),
        store(
            "3: 403 needs explicit freshness",
            Method::GET,
            &[],
            403,
            &[],
            Err(NotStored::NoFreshness),
        ),
        store(
            "3: 500 needs explicit freshness",
            Method::GET,
            &[],
            500,
            &[],
            Err(NotStored::NoFreshness),
        ),
        store(
            "3: 503 needs explicit freshness",
            Method::GET,
            &[],
            503,
            &[],
            Err(NotStored::NoFreshness),
        ),
        store(
            "3: 302 needs explicit freshness",
            Method::GET,
            &[],
            302,
            &[],
            Err(NotStored::NoFreshness),
        ),
        store(
            "3: 302 with max-age",
            Method::GET,
            &[],
            302,
            &[("cache-control", "max-age=10")],
            ok,
        ),
        store(
            "3: 500 with Expires",
            Method::GET,
            &[],
            500,
            &[("expires", "Mon, 01 Jan 2024 00:00:00 GMT")],
            ok,
        ),
        store(
            "3: 401 with public",
            Method::GET,
            &[],
            401,
            &[("cache-control", "public")],
            ok,
        ),
        store(
            "5.2.2.4: no-cache is storable, revalidated on use",
            Method::GET,
            &[],
            200,
            &[("cache-control", "no-cache")],
            ok,
        ),
        store(
            "5.2.1.4: request no-cache does not stop storing",
            Method::GET,
            &[("cache-control", "no-cache")],
            200,
            &[("cache-control", "max-age=60")],
            ok,
        ),
        store(
            "5.2.3: unknown directives are ignored",
            Method::GET,
            &[],
            200,
            &[("cache-control", "community=\"x\", max-age=60")],
            ok,
        ),
        store(
            "5.2.2.3: must-understand with a status the cache does not implement",
            Method::GET,
            &[],
            299,
            &[("cache-control", "must-understand, max-age=60")],
            Err(NotStored::Status),
        ),
        store(
            "5.2.2.3: MUST-UNDERSTAND, any case",
            Method::GET,
            &[],
            209,
            &[("cache-control", "Must-Understand, max-age=60")],
            Err(NotStored::Status),
        ),
        store(
            "5.2.2.3: must-understand with an understood status",
            Method::GET,
            &[],
            200,
            &[("cache-control", "must-understand, max-age=60")],
            ok,
        ),
        store(
            "5.2.2.3: must-understand with a redirection the cache implements",
            Method::GET,
            &[],
            307,
            &[("cache-control", "must-understand, max-age=60")],
            ok,
        ),
        store(
            "5.2.2.4: response no-cache may be stored (it is validated on every use)",
            Method::GET,
            &[],
            200,
            &[
                ("cache-control", "max-age=10000, no-cache"),
                ("etag", "\"v\""),
            ],
            ok,
        ),
    ];
    assert!(cases.len() >= 40);
    let policy = HttpCachePolicy::default();
    for case in &cases {
        let got = policy.storable(
            &case.method,
            &headers(&case.request),
            StatusCode::from_u16(case.status).unwrap(),
            &headers(&case.response),
        );
        assert_eq!(got, case.expect, "{}", case.rule);
    }
}

#[test]
fn set_cookie_storing_can_be_turned_on() {
    let policy = HttpCachePolicy::default().store_set_cookie(true);
    let got = policy.storable(
        &Method::GET,
        &HeaderMap::new(),
        StatusCode::OK,
        &headers(&[("set-cookie", "a=1"), ("cache-control", "max-age=5")]),
    );
    assert_eq!(got, Ok(()));
}

// ---------------------------------------------------------------------------------------
// RFC 9111 section 4.2.1: freshness lifetime.

#[test]
fn freshness_lifetime_section_4_2_1() {
    let lm_10_days_before = date(-10 * 86_400);
    let cases: Vec<(&str, u16, Vec<(&str, String)>, u64)> = vec![
        (
            "s-maxage wins over max-age",
            200,
            vec![("cache-control", "max-age=10, s-maxage=20".into())],
            20,
        ),
        (
            "max-age",
            200,
            vec![("cache-control", "max-age=10".into())],
            10,
        ),
        (
            "max-age wins over Expires",
            200,
            vec![
                ("cache-control", "max-age=10".into()),
                ("expires", date(1_000)),
                ("date", date(0)),
            ],
            10,
        ),
        (
            "Expires minus Date",
            200,
            vec![("expires", date(300)), ("date", date(0))],
            300,
        ),
        (
            "Expires before Date is stale",
            200,
            vec![("expires", date(-5)), ("date", date(0))],
            0,
        ),
        (
            "invalid Expires is stale",
            200,
            vec![("expires", "0".into()), ("date", date(0))],
            0,
        ),
        (
            "invalid max-age is stale",
            200,
            vec![("cache-control", "max-age=abc".into())],
            0,
        ),
        (
            "max-age without value is stale",
            200,
            vec![("cache-control", "max-age".into())],
            0,
        ),
        (
            "negative max-age is stale",
            200,
            vec![("cache-control", "max-age=-1".into())],
            0,
        ),
        (
            "first max-age wins",
            200,
            vec![("cache-control", "max-age=7, max-age=100".into())],
            7,
        ),
        (
            "huge max-age is 2^31",
            200,
            vec![("cache-control", "max-age=99999999999999999999999".into())],
            DELTA_SECONDS_MAX,
        ),
        (
            "quoted max-age",
            200,
            vec![("cache-control", "max-age=\"30\"".into())],
            30,
        ),
        (
            "heuristic: 10% of age since Last-Modified",
            200,
            vec![
                ("date", date(0)),
                ("last-modified", lm_10_days_before.clone()),
            ],
            86_400,
        ),
        (
            "heuristic capped at 24 h",
            200,
            vec![("date", date(0)), ("last-modified", date(-100 * 86_400))],
            86_400,
        ),
        (
            "heuristic small",
            200,
            vec![("date", date(0)), ("last-modified", date(-1_000))],
            100,
        ),
        (
            "no heuristic for 500",
            500,
            vec![
                ("date", date(0)),
                ("last-modified", lm_10_days_before.clone()),
            ],
            0,
        ),
        (
            "heuristic for 404",
            404,
            vec![("date", date(0)), ("last-modified", date(-1_000))],
            100,
        ),
        ("no validators, no default: zero", 200, vec![], 0),
        (
            "Last-Modified in the future: zero",
            200,
            vec![("date", date(0)), ("last-modified", date(50))],
            0,
        ),
        (
            "s-maxage=0",
            200,
            vec![("cache-control", "s-maxage=0, max-age=60".into())],
            0,
        ),
        (
            "5.2.2.4: no-cache: every use needs validation, whatever max-age says",
            200,
            vec![("cache-control", "max-age=10000, no-cache".into())],
            0,
        ),
        (
            "5.2.2.4: directive names are case-insensitive",
            200,
            vec![("cache-control", "Max-Age=10000, No-Cache".into())],
            0,
        ),
        (
            "5.2.2.4: qualified no-cache is read as unqualified (conservative)",
            200,
            vec![(
                "cache-control",
                "max-age=10000, no-cache=\"set-cookie\"".into(),
            )],
            0,
        ),
        (
            "5.2.2.4: no-cache in its own field line",
            200,
            vec![
                ("cache-control", "s-maxage=600".into()),
                ("cache-control", "no-cache".into()),
            ],
            0,
        ),
    ];
    let policy = HttpCachePolicy::default();
    for (rule, status, pairs, expect) in &cases {
        let map = headers(
            &pairs
                .iter()
                .map(|(n, v)| (*n, v.as_str()))
                .collect::<Vec<_>>(),
        );
        let got = policy.freshness(StatusCode::from_u16(*status).unwrap(), &map);
        assert_eq!(got, Duration::from_secs(*expect), "{rule}");
    }
}

#[test]
fn a_default_ttl_applies_only_where_the_rules_allow_caching() {
    let policy = HttpCachePolicy::default().default_ttl(Duration::from_secs(30));
    assert_eq!(
        policy.freshness(StatusCode::OK, &HeaderMap::new()),
        Duration::from_secs(30)
    );
    assert_eq!(
        policy.freshness(StatusCode::INTERNAL_SERVER_ERROR, &HeaderMap::new()),
        Duration::ZERO
    );
    let explicit = headers(&[("cache-control", "max-age=5")]);
    assert_eq!(
        policy.freshness(StatusCode::OK, &explicit),
        Duration::from_secs(5)
    );
}

// ---------------------------------------------------------------------------------------
// RFC 9111 section 4.2.3: age.

#[test]
fn age_calculation_section_4_2_3() {
    // (rule, Age header, Date offset, request time, response time, resident, expected)
    let cases: Vec<(&str, Option<u64>, Option<u64>, u64, u64, u64, u64)> = vec![
        (
            "fresh from origin, no delay",
            None,
            Some(100),
            100,
            100,
            0,
            0,
        ),
        ("resident time adds", None, Some(100), 100, 100, 30, 30),
        ("Age header counts", Some(20), Some(100), 100, 100, 0, 20),
        (
            "response delay corrects Age",
            Some(20),
            Some(100),
            95,
            100,
            0,
            25,
        ),
        (
            "apparent age from a Date in the past",
            None,
            Some(40),
            100,
            100,
            0,
            60,
        ),
        (
            "apparent age wins when larger",
            Some(10),
            Some(40),
            100,
            100,
            0,
            60,
        ),
        (
            "corrected age wins when larger",
            Some(90),
            Some(40),
            100,
            100,
            0,
            90,
        ),
        (
            "Date in the future is no apparent age",
            None,
            Some(130),
            100,
            100,
            5,
            5,
        ),
        ("no Date", Some(3), None, 100, 102, 1, 6),
    ];
    for (rule, age, date_at, requested, received, resident, expect) in cases {
        let inputs = AgeInputs {
            age_header: age,
            date: date_at.map(at),
            request_time: at(requested),
            response_time: at(received),
        };
        assert_eq!(
            inputs.current_age(Duration::from_secs(resident)),
            Duration::from_secs(expect),
            "{rule}"
        );
    }
    let parsed =
        AgeInputs::from_headers(&headers(&[("age", "12"), ("date", &date(0))]), at(0), at(0));
    assert_eq!(parsed.age_header, Some(12));
    let bad = AgeInputs::from_headers(&headers(&[("age", "x")]), at(0), at(0));
    assert_eq!(
        bad.age_header,
        Some(DELTA_SECONDS_MAX),
        "5.1: an invalid Age reads as the largest age (stale), not as none"
    );
}

// ---------------------------------------------------------------------------------------
// RFC 9111 section 4.2.4 and RFC 5861: serving stale.

#[test]
fn strict_age_parsing_section_5_1() {
    // (rule, Age field lines, the age read)
    let max = Some(DELTA_SECONDS_MAX);
    let cases: Vec<(&str, Vec<&str>, Option<u64>)> = vec![
        ("5.1: no Age", vec![], None),
        ("5.1: one non-negative integer", vec!["7200"], Some(7200)),
        ("5.1: zero", vec!["0"], Some(0)),
        (
            "5.1: optional whitespace around it",
            vec!["  60 "],
            Some(60),
        ),
        ("5.1: not a number: stale", vec!["abc"], max),
        ("5.1: negative: stale", vec!["-7200"], max),
        ("5.1: a fraction: stale", vec!["7200.0"], max),
        ("5.1: a list: stale", vec!["old, 0"], max),
        ("5.1: two field lines: stale", vec!["10", "20"], max),
        ("5.1: a parameter: stale", vec!["60;q=1"], max),
        ("5.1: a plus sign: stale", vec!["+60"], max),
        ("5.1: empty: stale", vec![""], max),
        ("1.2.2: past 2^31 is capped", vec!["99999999999"], max),
        (
            "1.2.2: past u64 is capped",
            vec!["999999999999999999999999"],
            max,
        ),
    ];
    for (rule, lines, expect) in &cases {
        let map = headers(&lines.iter().map(|v| ("age", *v)).collect::<Vec<_>>());
        assert_eq!(towerguard::http::cache_policy::age(&map), *expect, "{rule}");
    }
    // And a response with an invalid Age is stale at once, whatever its max-age.
    let map = headers(&[("age", "abc"), ("cache-control", "max-age=3600")]);
    let inputs = AgeInputs::from_headers(&map, at(0), at(0));
    let freshness = HttpCachePolicy::default().freshness(StatusCode::OK, &map);
    assert!(inputs.current_age(Duration::ZERO) >= freshness);
}

#[test]
fn stale_windows_section_4_2_4_and_rfc_5861() {
    let cases: Vec<(&str, &str, (u64, u64))> = vec![
        (
            "both windows",
            "max-age=60, stale-while-revalidate=30, stale-if-error=600",
            (30, 600),
        ),
        ("swr only", "max-age=60, stale-while-revalidate=30", (30, 0)),
        ("sie only", "max-age=60, stale-if-error=10", (0, 10)),
        ("none", "max-age=60", (0, 0)),
        (
            "must-revalidate forbids",
            "max-age=60, must-revalidate, stale-while-revalidate=30, stale-if-error=10",
            (0, 0),
        ),
        (
            "proxy-revalidate forbids",
            "max-age=60, proxy-revalidate, stale-while-revalidate=30",
            (0, 0),
        ),
        ("no-cache forbids", "no-cache, stale-if-error=10", (0, 0)),
        (
            "s-maxage forbids (implies proxy-revalidate)",
            "s-maxage=60, stale-while-revalidate=30",
            (0, 0),
        ),
        (
            "invalid swr is none",
            "max-age=60, stale-while-revalidate=x",
            (0, 0),
        ),
        (
            "first swr wins",
            "max-age=60, stale-while-revalidate=5, stale-while-revalidate=50",
            (5, 0),
        ),
    ];
    let policy = HttpCachePolicy::default();
    for (rule, cc, (swr, sie)) in cases {
        let got = policy.stale_windows(&headers(&[("cache-control", cc)]));
        assert_eq!(
            got,
            (Duration::from_secs(swr), Duration::from_secs(sie)),
            "{rule}"
        );
    }
}

#[test]
fn request_directives_section_5_2_1_and_immutable_rfc_8246() {
    use Reuse::{Fresh, Stale, StaleAccepted, Validate};
    // (rule, request Cache-Control, response Cache-Control, freshness, age, honoured, CDN mode)
    let cases: Vec<(&str, &str, &str, u64, u64, Reuse, Reuse)> = vec![
        (
            "4.2 fresh, no directives",
            "",
            "max-age=60",
            60,
            10,
            Fresh,
            Fresh,
        ),
        (
            "4.2 stale, no directives",
            "",
            "max-age=60",
            60,
            61,
            Stale,
            Stale,
        ),
        (
            "5.2.1.1 max-age=0 (a reload) validates",
            "max-age=0",
            "max-age=60",
            60,
            10,
            Validate,
            Fresh,
        ),
        (
            "5.2.1.1 max-age older than the entry: fresh",
            "max-age=30",
            "max-age=60",
            60,
            10,
            Fresh,
            Fresh,
        ),
        (
            "5.2.1.1 max-age younger than the entry validates",
            "max-age=5",
            "max-age=60",
            60,
            10,
            Validate,
            Fresh,
        ),
        (
            "5.2.1.1 max-age=age is still acceptable",
            "max-age=10",
            "max-age=60",
            60,
            10,
            Fresh,
            Fresh,
        ),
        (
            "5.2.1.1 invalid max-age counts as zero",
            "max-age=soon",
            "max-age=60",
            60,
            10,
            Validate,
            Fresh,
        ),
        (
            "5.2.1.3 min-fresh met",
            "min-fresh=20",
            "max-age=60",
            60,
            10,
            Fresh,
            Fresh,
        ),
        (
            "5.2.1.3 min-fresh not met validates",
            "min-fresh=55",
            "max-age=60",
            60,
            10,
            Validate,
            Fresh,
        ),
        (
            "5.2.1.4 no-cache validates a fresh entry",
            "no-cache",
            "max-age=60",
            60,
            10,
            Validate,
            Fresh,
        ),
        (
            "5.2.1.4 No-Cache in any case",
            "No-Cache",
            "max-age=60",
            60,
            10,
            Validate,
            Fresh,
        ),
        (
            "5.2.1.2 max-stale without a value takes any staleness",
            "max-stale",
            "max-age=60",
            60,
            6000,
            StaleAccepted,
            Stale,
        ),
        (
            "5.2.1.2 max-stale within its bound",
            "max-stale=30",
            "max-age=60",
            60,
            80,
            StaleAccepted,
            Stale,
        ),
        (
            "5.2.1.2 max-stale past its bound",
            "max-stale=30",
            "max-age=60",
            60,
            100,
            Stale,
            Stale,
        ),
        (
            "5.2.1.2 max-stale invalid accepts none",
            "max-stale=x",
            "max-age=60",
            60,
            61,
            Stale,
            Stale,
        ),
        (
            "5.2.1.2 + 5.2.2.2 must-revalidate refuses max-stale",
            "max-stale",
            "max-age=60, must-revalidate",
            60,
            61,
            Stale,
            Stale,
        ),
        (
            "5.2.1.2 + 5.2.2.8 proxy-revalidate refuses max-stale",
            "max-stale",
            "max-age=60, proxy-revalidate",
            60,
            61,
            Stale,
            Stale,
        ),
        (
            "5.2.1.2 + 5.2.2.10 s-maxage refuses max-stale",
            "max-stale",
            "s-maxage=60",
            60,
            61,
            Stale,
            Stale,
        ),
        (
            "5.2.1.2 max-stale on a fresh entry: fresh",
            "max-stale=5",
            "max-age=60",
            60,
            10,
            Fresh,
            Fresh,
        ),
        (
            "5.2.1.1 + 5.2.1.2 max-age bounds max-stale too",
            "max-stale, max-age=62",
            "max-age=60",
            60,
            70,
            Stale,
            Stale,
        ),
        (
            "RFC 8246 immutable: a reload does not validate a fresh entry",
            "max-age=0",
            "max-age=60, immutable",
            60,
            10,
            Fresh,
            Fresh,
        ),
        (
            "RFC 8246 immutable: a stale entry is validated",
            "max-age=0",
            "max-age=60, immutable",
            60,
            61,
            Stale,
            Stale,
        ),
        (
            "RFC 8246 immutable: a forced reload (no-cache) validates",
            "no-cache",
            "max-age=60, immutable",
            60,
            10,
            Validate,
            Fresh,
        ),
        (
            "5.2.1.5 no-store does not stop a hit",
            "no-store",
            "max-age=60",
            60,
            10,
            Fresh,
            Fresh,
        ),
    ];
    let honouring = HttpCachePolicy::default();
    let cdn = HttpCachePolicy::default().ignore_client_directives(true);
    assert!(honouring.honours_client_directives());
    assert!(!cdn.honours_client_directives());
    for (rule, req, res, freshness, age, expect, expect_cdn) in cases {
        let request = headers(&[("cache-control", req)]);
        let response = headers(&[("cache-control", res)]);
        let (freshness, age) = (Duration::from_secs(freshness), Duration::from_secs(age));
        assert_eq!(
            honouring.reuse(&request, &response, freshness, age),
            expect,
            "{rule}"
        );
        assert_eq!(
            cdn.reuse(&request, &response, freshness, age),
            expect_cdn,
            "CDN mode: {rule}"
        );
    }
}

#[test]
fn request_no_store_section_5_2_1_5() {
    let request = headers(&[("cache-control", "no-store")]);
    let response = headers(&[("cache-control", "max-age=60")]);
    assert_eq!(
        HttpCachePolicy::default().storable(&Method::GET, &request, StatusCode::OK, &response),
        Err(NotStored::NoStore),
        "5.2.1.5: a request's no-store keeps its response out of the store"
    );
    assert_eq!(
        HttpCachePolicy::default()
            .ignore_client_directives(true)
            .storable(&Method::GET, &request, StatusCode::OK, &response),
        Ok(()),
        "CDN mode ignores the client's no-store"
    );
}

#[test]
fn stale_on_error_section_4_2_4() {
    // (rule, Cache-Control, stale-if-error window with stale_on_error(300s))
    let cases: Vec<(&str, &str, u64)> = vec![
        (
            "4.2.4 a disconnected cache may serve stale",
            "max-age=60",
            300,
        ),
        (
            "RFC 5861 a longer stale-if-error wins",
            "max-age=60, stale-if-error=900",
            900,
        ),
        (
            "the configured bound wins over a shorter one",
            "max-age=60, stale-if-error=10",
            300,
        ),
        (
            "5.2.2.2 never under must-revalidate",
            "max-age=60, must-revalidate",
            0,
        ),
        (
            "5.2.2.8 never under proxy-revalidate",
            "max-age=60, proxy-revalidate",
            0,
        ),
        ("5.2.2.4 never under no-cache", "max-age=60, no-cache", 0),
        ("5.2.2.10 never under s-maxage", "s-maxage=60", 0),
    ];
    let policy = HttpCachePolicy::default().stale_on_error(Duration::from_secs(300));
    for (rule, cc, sie) in cases {
        let (_, got) = policy.stale_windows(&headers(&[("cache-control", cc)]));
        assert_eq!(got, Duration::from_secs(sie), "{rule}");
    }
    // RFC 5861 section 4: the statuses that count as an error.
    for status in 100..600u16 {
        let status = StatusCode::from_u16(status).unwrap();
        assert_eq!(
            is_stale_on_error_status(status),
            matches!(status.as_u16(), 500 | 502 | 503 | 504),
            "{status}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// RFC 9111 section 4.1: Vary.

#[test]
fn vary_matching_section_4_1() {
    let cases: Vec<(
        &str,
        Vec<(&str, &str)>,
        Vec<(&str, &str)>,
        Vec<(&str, &str)>,
        bool,
    )> = vec![
        (
            "no Vary matches anything",
            vec![],
            vec![("accept", "a")],
            vec![("accept", "b")],
            true,
        ),
        (
            "equal values match",
            vec![("vary", "accept-language")],
            vec![("accept-language", "en")],
            vec![("accept-language", "en")],
            true,
        ),
        (
            "different values do not",
            vec![("vary", "accept-language")],
            vec![("accept-language", "en")],
            vec![("accept-language", "de")],
            false,
        ),
        (
            "absent in both matches",
            vec![("vary", "accept-language")],
            vec![],
            vec![],
            true,
        ),
        (
            "absent in one does not",
            vec![("vary", "accept-language")],
            vec![("accept-language", "en")],
            vec![],
            false,
        ),
        (
            "field names are case-insensitive",
            vec![("vary", "Accept-Language")],
            vec![("accept-language", "en")],
            vec![("accept-language", "en")],
            true,
        ),
        (
            "whitespace around list items is normalised",
            vec![("vary", "accept-encoding")],
            vec![("accept-encoding", "gzip,br")],
            vec![("accept-encoding", "gzip, br")],
            true,
        ),
        (
            "split lines equal one list",
            vec![("vary", "accept-encoding")],
            vec![("accept-encoding", "gzip, br")],
            vec![("accept-encoding", "gzip"), ("accept-encoding", "br")],
            true,
        ),
        (
            "order of values matters for other fields",
            vec![("vary", "accept")],
            vec![("accept", "text/html, application/json")],
            vec![("accept", "application/json, text/html")],
            false,
        ),
        (
            "4.1 normalised: Accept-Encoding order does not matter",
            vec![("vary", "accept-encoding")],
            vec![("accept-encoding", "gzip, br")],
            vec![("accept-encoding", "br, gzip")],
            true,
        ),
        (
            "4.1 normalised: Accept-Encoding case and inner whitespace",
            vec![("vary", "accept-encoding")],
            vec![("accept-encoding", "GZIP;q=1.0, br")],
            vec![("accept-encoding", "br,gzip; q=1.0")],
            true,
        ),
        (
            "4.1 normalised: Accept-Language order, case, whitespace",
            vec![("vary", "accept-language")],
            vec![("accept-language", "en-US, fr;q=0.5")],
            vec![("accept-language", "fr; q=0.5,en-us")],
            true,
        ),
        (
            "4.1 normalised: other Accept-Language values still differ",
            vec![("vary", "accept-language")],
            vec![("accept-language", "en-US, fr;q=0.5")],
            vec![("accept-language", "en-US, fr;q=0.9")],
            false,
        ),
        (
            "several fields all match",
            vec![("vary", "accept, accept-language")],
            vec![("accept", "a"), ("accept-language", "en")],
            vec![("accept", "a"), ("accept-language", "en")],
            true,
        ),
        (
            "several fields, one differs",
            vec![("vary", "accept, accept-language")],
            vec![("accept", "a"), ("accept-language", "en")],
            vec![("accept", "b"), ("accept-language", "en")],
            false,
        ),
        (
            "Vary across lines",
            vec![("vary", "accept"), ("vary", "accept-language")],
            vec![("accept", "a"), ("accept-language", "en")],
            vec![("accept", "a"), ("accept-language", "fr")],
            false,
        ),
        (
            "Vary: * never matches",
            vec![("vary", "*")],
            vec![],
            vec![],
            false,
        ),
        (
            "unrelated fields do not matter",
            vec![("vary", "accept")],
            vec![("accept", "a"), ("x-other", "1")],
            vec![("accept", "a"), ("x-other", "2")],
            true,
        ),
    ];
    for (rule, response, stored, request) in cases.iter().map(|c| (c.0, &c.1, &c.2, &c.3)) {
        let expect = cases.iter().find(|c| c.0 == rule).unwrap().4;
        let v = vary(&headers(response));
        assert_eq!(
            vary_matches(&v, &headers(stored), &headers(request)),
            expect,
            "{rule}"
        );
    }
    assert_eq!(vary(&HeaderMap::new()), Vary::None);
    assert_eq!(
        vary(&headers(&[("vary", "Accept, accept")])),
        Vary::Fields(vec![http::header::ACCEPT])
    );
}

// ---------------------------------------------------------------------------------------
// Keys: method class, scheme, authority, path and query.

#[test]
fn primary_keys() {
    let uri = |s: &str| s.parse::<Uri>().unwrap();
    let cases: Vec<(&str, Method, Uri, Option<&str>, Option<&str>)> = vec![
        (
            "GET absolute",
            Method::GET,
            uri("http://example.com/a?b=1"),
            None,
            Some("http://example.com/a?b=1"),
        ),
        (
            "HEAD shares GET's key",
            Method::HEAD,
            uri("http://example.com/a?b=1"),
            None,
            Some("http://example.com/a?b=1"),
        ),
        (
            "query is part of the key",
            Method::GET,
            uri("http://example.com/a?b=2"),
            None,
            Some("http://example.com/a?b=2"),
        ),
        (
            "authority is case-insensitive",
            Method::GET,
            uri("http://EXAMPLE.com/a"),
            None,
            Some("http://example.com/a"),
        ),
        (
            "origin-form uses Host",
            Method::GET,
            uri("/a?x"),
            Some("Example.org"),
            Some("http://example.org/a?x"),
        ),
        (
            "https scheme kept",
            Method::GET,
            uri("https://example.com/"),
            None,
            Some("https://example.com/"),
        ),
        (
            "POST has no key",
            Method::POST,
            uri("http://example.com/a"),
            None,
            None,
        ),
        (
            "OPTIONS has no key",
            Method::OPTIONS,
            uri("http://example.com/a"),
            None,
            None,
        ),
    ];
    for (rule, method, uri, host, expect) in cases {
        assert_eq!(
            primary_key(&method, &uri, host).as_deref(),
            expect,
            "{rule}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// RFC 9111 section 4.3 and RFC 9110 section 13: validation.

#[test]
fn conditional_requests_answered_from_the_cache() {
    let stored = headers(&[("etag", "\"v1\""), ("last-modified", &date(-100))]);
    let cases: Vec<(&str, Vec<(&str, String)>, bool)> = vec![
        (
            "If-None-Match equal",
            vec![("if-none-match", "\"v1\"".into())],
            true,
        ),
        (
            "If-None-Match weak equal",
            vec![("if-none-match", "W/\"v1\"".into())],
            true,
        ),
        (
            "If-None-Match in a list",
            vec![("if-none-match", "\"v0\", \"v1\"".into())],
            true,
        ),
        ("If-None-Match *", vec![("if-none-match", "*".into())], true),
        (
            "If-None-Match different",
            vec![("if-none-match", "\"v2\"".into())],
            false,
        ),
        (
            "If-None-Match wins over If-Modified-Since",
            vec![
                ("if-none-match", "\"v2\"".into()),
                ("if-modified-since", date(0)),
            ],
            false,
        ),
        (
            "If-Modified-Since after Last-Modified",
            vec![("if-modified-since", date(0))],
            true,
        ),
        (
            "If-Modified-Since equal to Last-Modified",
            vec![("if-modified-since", date(-100))],
            true,
        ),
        (
            "If-Modified-Since before Last-Modified",
            vec![("if-modified-since", date(-200))],
            false,
        ),
        (
            "invalid If-Modified-Since",
            vec![("if-modified-since", "yesterday".into())],
            false,
        ),
        ("unconditional", vec![], false),
    ];
    for (rule, pairs, expect) in cases {
        let req = headers(
            &pairs
                .iter()
                .map(|(n, v)| (*n, v.as_str()))
                .collect::<Vec<_>>(),
        );
        assert_eq!(not_modified(&req, &stored), expect, "{rule}");
    }
    let no_etag = headers(&[("last-modified", &date(-100))]);
    assert!(
        !not_modified(&headers(&[("if-none-match", "\"v1\"")]), &no_etag),
        "no ETag to match"
    );
    // RFC 9110 section 13.1.2: `*` is false whenever a current representation exists,
    // with or without an entity tag.
    let bare = headers(&[("cache-control", "max-age=60")]);
    assert!(
        not_modified(&headers(&[("if-none-match", "*")]), &bare),
        "If-None-Match * against a stored response without validators"
    );
    assert!(
        not_modified(&headers(&[("if-none-match", "\"v0\", *")]), &no_etag),
        "a * in a list"
    );
}

#[test]
fn revalidation_uses_the_stored_validators_and_a_304_updates_headers() {
    let stored = headers(&[("etag", "\"v1\""), ("last-modified", &date(-100))]);
    assert!(has_validator(&stored));
    assert!(!has_validator(&headers(&[("cache-control", "max-age=1")])));
    let conditional = conditional_headers(&stored);
    assert_eq!(conditional["if-none-match"], "\"v1\"");
    assert_eq!(conditional["if-modified-since"], date(-100).as_str());

    let mut stored = headers(&[
        ("cache-control", "max-age=10"),
        ("content-length", "5"),
        ("x-kept", "1"),
        ("etag", "\"v1\""),
    ]);
    let not_modified = headers(&[
        ("cache-control", "max-age=60"),
        ("content-length", "0"),
        ("etag", "\"v1\""),
    ]);
    update_headers(&mut stored, &not_modified);
    assert_eq!(stored["cache-control"], "max-age=60", "refreshed");
    assert_eq!(
        stored["content-length"], "5",
        "kept: it describes the stored body"
    );
    assert_eq!(stored["x-kept"], "1", "untouched");

    // (rule, field) kept from the stored response whatever the 304 says.
    let kept = [
        ("3.2: the stored content's length", "content-length"),
        ("3.2: the stored content's coding", "content-encoding"),
        ("3.2: the stored content's range", "content-range"),
        ("3.2: the stored content's digest", "content-md5"),
        ("3.2: the stored content's entity tag", "etag"),
        (
            "3.1: hop-by-hop fields are never stored",
            "transfer-encoding",
        ),
        ("3.1: hop-by-hop fields are never stored", "connection"),
    ];
    for (rule, field) in kept {
        let mut stored = headers(&[(field, "stored"), ("cache-control", "max-age=10")]);
        update_headers(
            &mut stored,
            &headers(&[(field, "from-304"), ("cache-control", "max-age=60")]),
        );
        assert_eq!(stored[field], "stored", "{rule}");
        assert_eq!(
            stored["cache-control"], "max-age=60",
            "{rule}: the rest is refreshed"
        );
    }
}

// ---------------------------------------------------------------------------------------
// RFC 9111 section 4.4: invalidation.

#[test]
fn unsafe_methods_invalidate_on_success_and_redirection() {
    let cases = [
        (Method::POST, 200, true),
        (Method::POST, 201, true),
        (Method::POST, 303, true),
        (Method::PUT, 204, true),
        (Method::DELETE, 200, true),
        (Method::PATCH, 200, true),
        (Method::POST, 400, false),
        (Method::POST, 500, false),
        (Method::GET, 200, false),
        (Method::HEAD, 200, false),
        (Method::OPTIONS, 200, false),
    ];
    for (method, status, expect) in cases {
        assert_eq!(
            invalidates(&method, StatusCode::from_u16(status).unwrap()),
            expect,
            "{method} {status}"
        );
    }
}

#[test]
fn invalidation_covers_same_origin_location_and_content_location() {
    let uri: Uri = "http://example.com/items?page=1".parse().unwrap();
    let response = headers(&[
        ("location", "/items/42"),
        ("content-location", "http://other.example/items/42"),
    ]);
    let keys = invalidation_targets(&uri, None, &response);
    assert_eq!(
        keys,
        vec![
            "http://example.com/items?page=1".to_owned(),
            "http://example.com/items/42".to_owned()
        ]
    );
    let absolute = headers(&[("content-location", "http://example.com/items/7")]);
    let keys = invalidation_targets(&uri, None, &absolute);
    assert_eq!(keys[1], "http://example.com/items/7");
    let origin_form: Uri = "/x".parse().unwrap();
    assert_eq!(
        invalidation_targets(&origin_form, Some("h.example"), &HeaderMap::new()),
        vec!["http://h.example/x".to_owned()]
    );
}

// ---------------------------------------------------------------------------------------
// RFC 9111 section 5.2: Cache-Control parsing.

#[test]
fn cache_control_parsing_section_5_2() {
    let parse = |s: &str| CacheControl::parse([s.as_bytes()]);
    assert_eq!(parse("max-age=5").max_age, Some(Seconds::Valid(5)));
    assert_eq!(
        parse("MAX-AGE=5").max_age,
        Some(Seconds::Valid(5)),
        "names are case-insensitive"
    );
    assert_eq!(
        parse(" max-age = 5 ").max_age,
        Some(Seconds::Valid(5)),
        "whitespace tolerated"
    );
    assert_eq!(parse("max-age=5s").max_age, Some(Seconds::Invalid));
    assert_eq!(parse("max-age=").max_age, Some(Seconds::Invalid));
    assert!(parse("no-store").no_store);
    assert!(
        parse("no-cache=\"set-cookie\"").no_cache,
        "qualified no-cache counts as no-cache"
    );
    assert!(parse("public, must-revalidate").must_revalidate);
    assert!(parse("proxy-revalidate").proxy_revalidate);
    assert!(parse("immutable").immutable);
    assert!(parse("only-if-cached").only_if_cached);
    assert_eq!(parse("max-stale").max_stale, Some(None));
    assert_eq!(
        parse("max-stale=10").max_stale,
        Some(Some(Seconds::Valid(10)))
    );
    assert_eq!(parse("min-fresh=3").min_fresh, Some(Seconds::Valid(3)));
    assert_eq!(
        parse(",,, ,max-age=1,,").max_age,
        Some(Seconds::Valid(1)),
        "empty elements skipped"
    );
    assert_eq!(
        parse("foo=\"a,b\", max-age=2").max_age,
        Some(Seconds::Valid(2)),
        "commas in quotes"
    );
    assert_eq!(
        parse("=5, max-age=3").max_age,
        Some(Seconds::Valid(3)),
        "nameless element skipped"
    );
    assert_eq!(
        CacheControl::parse([&b"max-age=\xff"[..], &b"max-age=4"[..]]).max_age,
        Some(Seconds::Invalid),
        "a byte that is not text spoils its own directive (the first max-age counts)"
    );
    assert!(
        CacheControl::parse([&b"x=\xff, private"[..]]).private,
        "and only its own: the rest of the line still counts"
    );
    assert_eq!(parse(""), CacheControl::default());
}

// ---------------------------------------------------------------------------------------
// RFC 9211: Cache-Status.

#[test]
fn cache_status_values_rfc_9211() {
    let cases = vec![
        (
            CacheStatus::Failed {
                reason: "uri-miss",
                detail: "origin-unreachable",
            },
            "towerguard; fwd=uri-miss; detail=origin-unreachable",
        ),
        (
            CacheStatus::Hit {
                stale: false,
                ttl: 42,
            },
            "towerguard; hit; ttl=42",
        ),
        (
            CacheStatus::Hit {
                stale: true,
                ttl: -3,
            },
            "towerguard; hit; fwd=stale; ttl=-3",
        ),
        (
            CacheStatus::Forward {
                reason: "uri-miss",
                status: 200,
                stored: true,
                collapsed: false,
                detail: None,
            },
            "towerguard; fwd=uri-miss; fwd-status=200; stored",
        ),
        (
            CacheStatus::Forward {
                reason: "miss",
                status: 200,
                stored: true,
                collapsed: true,
                detail: None,
            },
            "towerguard; fwd=miss; fwd-status=200; stored; collapsed",
        ),
        (
            CacheStatus::Forward {
                reason: "uri-miss",
                status: 200,
                stored: false,
                collapsed: false,
                detail: Some("private"),
            },
            "towerguard; fwd=uri-miss; fwd-status=200; detail=private",
        ),
        (
            CacheStatus::Forward {
                reason: "method",
                status: 201,
                stored: false,
                collapsed: false,
                detail: None,
            },
            "towerguard; fwd=method; fwd-status=201",
        ),
        (
            CacheStatus::Forward {
                reason: "vary-miss",
                status: 200,
                stored: true,
                collapsed: false,
                detail: None,
            },
            "towerguard; fwd=vary-miss; fwd-status=200; stored",
        ),
        (
            CacheStatus::Forward {
                reason: "stale",
                status: 304,
                stored: true,
                collapsed: false,
                detail: None,
            },
            "towerguard; fwd=stale; fwd-status=304; stored",
        ),
    ];
    for (status, expect) in cases {
        assert_eq!(status.to_string(), expect);
        assert!(HeaderValue::from_str(expect).is_ok());
    }
    for reason in [
        NotStored::Method,
        NotStored::Private,
        NotStored::TooLarge,
        NotStored::SetCookie,
    ] {
        assert!(!reason.as_str().is_empty());
    }
}

mod parsing_never_panics {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn vary_and_matching_accept_any_field_bytes(
            vary_bytes in proptest::collection::vec(any::<u8>(), 0..128),
            value_bytes in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut response = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_bytes(&vary_bytes) {
                response.append(http::header::VARY, v);
            }
            let mut request = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_bytes(&value_bytes) {
                request.append(http::header::ACCEPT, v.clone());
                request.append(http::header::ACCEPT_LANGUAGE, v);
            }
            let v = vary(&response);
            let _ = vary_matches(&v, &request, &HeaderMap::new());
            prop_assert!(vary_matches(&v, &request, &request) || v == Vary::Star);
        }

        #[test]
        fn cache_control_from_headers_accepts_any_field_bytes(
            lines in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..4),
        ) {
            let mut map = HeaderMap::new();
            for line in &lines {
                if let Ok(v) = HeaderValue::from_bytes(line) {
                    map.append(http::header::CACHE_CONTROL, v);
                }
            }
            let cc = CacheControl::from_headers(&map);
            let policy = HttpCachePolicy::default();
            let _ = policy.freshness(StatusCode::OK, &map);
            let _ = policy.stale_windows(&map);
            let _ = policy.storable(&Method::GET, &map, StatusCode::OK, &map);
            let _ = cc.forbids_stale();
        }
    }
}

// ---------------------------------------------------------------------------------------
// RFC 9110 section 14: byte ranges from a stored complete response.

#[test]
fn byte_ranges_rfc_9110_section_14() {
    let stored = headers(&[("etag", "\"s\""), ("last-modified", &date(-3600))]);
    let whole = RangeAnswer::Whole;
    let part = |start, end| RangeAnswer::Partial { start, end };
    // (rule, request fields, body length, answer, Content-Range)
    let cases: Vec<(&str, Vec<(&str, String)>, u64, RangeAnswer, Option<&str>)> = vec![
        (
            "14.1.2 a-b",
            vec![("range", "bytes=0-4".into())],
            10,
            part(0, 4),
            Some("bytes 0-4/10"),
        ),
        (
            "14.1.2 a- to the end",
            vec![("range", "bytes=6-".into())],
            10,
            part(6, 9),
            Some("bytes 6-9/10"),
        ),
        (
            "14.1.2 -n the last n",
            vec![("range", "bytes=-3".into())],
            10,
            part(7, 9),
            Some("bytes 7-9/10"),
        ),
        (
            "14.1.2 -n longer than the body is all of it",
            vec![("range", "bytes=-50".into())],
            10,
            part(0, 9),
            Some("bytes 0-9/10"),
        ),
        (
            "14.1.2 b past the end is cut to the end",
            vec![("range", "bytes=5-500".into())],
            10,
            part(5, 9),
            Some("bytes 5-9/10"),
        ),
        (
            "14.1.2 unit case-insensitive, whitespace",
            vec![("range", "Bytes = 1-1".into())],
            10,
            part(1, 1),
            Some("bytes 1-1/10"),
        ),
        (
            "15.5.17 a start past the end is unsatisfiable",
            vec![("range", "bytes=10-".into())],
            10,
            RangeAnswer::Unsatisfiable,
            Some("bytes */10"),
        ),
        (
            "15.5.17 -0 is unsatisfiable",
            vec![("range", "bytes=-0".into())],
            10,
            RangeAnswer::Unsatisfiable,
            Some("bytes */10"),
        ),
        (
            "15.5.17 any range of an empty body is unsatisfiable",
            vec![("range", "bytes=0-".into())],
            0,
            RangeAnswer::Unsatisfiable,
            Some("bytes */0"),
        ),
        (
            "14.1.1 last before first is invalid: ignored",
            vec![("range", "bytes=5-1".into())],
            10,
            whole,
            None,
        ),
        (
            "14.2 another unit is ignored",
            vec![("range", "items=0-1".into())],
            10,
            whole,
            None,
        ),
        (
            "14.2 garbage is ignored",
            vec![("range", "bytes=a-b".into())],
            10,
            whole,
            None,
        ),
        (
            "14.2 two Range lines are invalid: ignored",
            vec![("range", "bytes=0-1".into()), ("range", "bytes=2-3".into())],
            10,
            whole,
            None,
        ),
        ("14.2 no Range: whole", vec![], 10, whole, None),
        (
            "14.1.2 several ranges go to the origin",
            vec![("range", "bytes=0-1, 4-5".into())],
            10,
            RangeAnswer::Forward,
            None,
        ),
        (
            "13.1.5 If-Range with the stored strong tag",
            vec![("range", "bytes=0-1".into()), ("if-range", "\"s\"".into())],
            10,
            part(0, 1),
            Some("bytes 0-1/10"),
        ),
        (
            "13.1.5 If-Range with another tag: whole",
            vec![("range", "bytes=0-1".into()), ("if-range", "\"t\"".into())],
            10,
            whole,
            None,
        ),
        (
            "13.1.5 If-Range with a weak tag never matches",
            vec![
                ("range", "bytes=0-1".into()),
                ("if-range", "W/\"s\"".into()),
            ],
            10,
            whole,
            None,
        ),
        (
            "13.1.5 If-Range with the Last-Modified date",
            vec![("range", "bytes=0-1".into()), ("if-range", date(-3600))],
            10,
            part(0, 1),
            Some("bytes 0-1/10"),
        ),
        (
            "13.1.5 If-Range with another date: whole",
            vec![("range", "bytes=0-1".into()), ("if-range", date(-60))],
            10,
            whole,
            None,
        ),
    ];
    for (rule, request, length, expect, content_range) in cases {
        let pairs: Vec<(&str, &str)> = request.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let request = headers(&pairs);
        let got = byte_range(&request, &stored, length);
        assert_eq!(got, expect, "{rule}");
        assert_eq!(
            got.content_range(length).as_deref(),
            content_range,
            "{rule}"
        );
        assert_eq!(
            several_ranges(&request),
            expect == RangeAnswer::Forward,
            "{rule}"
        );
    }
}

#[test]
fn entity_tags_are_generated_quoted_rfc_9110_section_8_8_3() {
    let cases = [
        ("abc", "\"abc\""),
        ("\"abc\"", "\"abc\""),
        ("W/abc", "W/\"abc\""),
        ("W/\"abc\"", "W/\"abc\""),
        (" \"a b\" ", "\"a b\""),
    ];
    for (tag, quoted) in cases {
        assert_eq!(quoted_etag(tag), quoted, "{tag}");
        // The validator the cache sends is the quoted form.
        let sent = conditional_headers(&headers(&[("etag", tag)]));
        assert_eq!(sent.get("if-none-match").unwrap(), quoted, "{tag}");
    }
    // A client that echoes the quoted form of an unquoted stored tag gets its 304.
    assert!(not_modified(
        &headers(&[("if-none-match", "\"abc\"")]),
        &headers(&[("etag", "abc")])
    ));
}

#[test]
fn a_head_response_updates_only_the_same_representation_section_4_3_5() {
    let lm = date(-3600);
    let other = date(-60);
    // (rule, stored, HEAD response, matches)
    let cases: Vec<(&str, Vec<(&str, &str)>, Vec<(&str, &str)>, bool)> = vec![
        (
            "same strong tag",
            vec![("etag", "\"a\"")],
            vec![("etag", "\"a\"")],
            true,
        ),
        (
            "another tag",
            vec![("etag", "\"a\"")],
            vec![("etag", "\"b\"")],
            false,
        ),
        (
            "weak tags do not match strongly",
            vec![("etag", "W/\"a\"")],
            vec![("etag", "W/\"a\"")],
            false,
        ),
        (
            "a tag on one side only",
            vec![("etag", "\"a\"")],
            vec![],
            false,
        ),
        (
            "same Last-Modified",
            vec![("last-modified", &lm)],
            vec![("last-modified", &lm)],
            true,
        ),
        (
            "another Last-Modified",
            vec![("last-modified", &lm)],
            vec![("last-modified", &other)],
            false,
        ),
        (
            "no validators, same length",
            vec![("content-length", "10")],
            vec![("content-length", "10")],
            true,
        ),
        (
            "no validators, another length",
            vec![("content-length", "10")],
            vec![("content-length", "11")],
            false,
        ),
    ];
    for (rule, stored, head, expect) in cases {
        assert_eq!(
            head_matches(&headers(&stored), &headers(&head)),
            expect,
            "{rule}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Targeted cache-control fields: RFC 9213 (CDN-Cache-Control) and the Edge Architecture
// specification 1.0 (Surrogate-Control), with `HttpCachePolicy::targeted_fields` on.

#[test]
fn targeted_fields_rfc_9213_and_edge_architecture() {
    let on = HttpCachePolicy::default().targeted_fields(true);
    let off = HttpCachePolicy::default();
    let get = headers(&[]);
    // (rule, response, stored with the switch on, freshness on, stale-if-error on,
    //  freshness off)
    let rows: &[(&str, &[(&str, &str)], bool, u64, u64, u64)] = &[
        (
            "RFC 9213 2.2 (cache behavior): CDN-Cache-Control is read instead of Cache-Control",
            &[("cache-control", "max-age=0"), ("cdn-cache-control", "max-age=600")],
            true, 600, 0, 0,
        ),
        (
            "RFC 9213 2.2 (cache behavior): Cache-Control's no-store does not apply when CDN-Cache-Control is present",
            &[("cache-control", "no-store"), ("cdn-cache-control", "max-age=60")],
            true, 60, 0, 0,
        ),
        (
            "RFC 9213 2.2 (cache behavior): CDN-Cache-Control's no-store keeps it out",
            &[("cache-control", "max-age=600"), ("cdn-cache-control", "no-store")],
            false, 0, 0, 600,
        ),
        (
            "RFC 9213 2.2 (cache behavior): CDN-Cache-Control private keeps it out of this cache",
            &[("cache-control", "public, max-age=60"), ("cdn-cache-control", "private")],
            false, 0, 0, 60,
        ),
        (
            "RFC 9213 2.2 (cache behavior): CDN-Cache-Control comes before Surrogate-Control",
            &[("cdn-cache-control", "max-age=30"), ("surrogate-control", "max-age=900")],
            true, 30, 0, 0,
        ),
        (
            "Edge Architecture (Surrogate-Control): Surrogate-Control max-age is read instead of Cache-Control",
            &[("cache-control", "max-age=0"), ("surrogate-control", "max-age=600")],
            true, 600, 0, 0,
        ),
        (
            "Edge Architecture (Surrogate-Control): max-age=N+M gives M seconds of stale-if-error",
            &[("surrogate-control", "max-age=60+300")],
            true, 60, 300, 0,
        ),
        (
            "Edge Architecture (Surrogate-Control): no-store",
            &[("cache-control", "max-age=60"), ("surrogate-control", "no-store")],
            false, 0, 0, 60,
        ),
        (
            "Edge Architecture (Surrogate-Control): no-store-remote (this cache is remote)",
            &[("cache-control", "max-age=60"), ("surrogate-control", "no-store-remote")],
            false, 0, 0, 60,
        ),
        (
            "Edge Architecture (Surrogate-Control): content is read, not acted on",
            &[("surrogate-control", "content=\"ESI/1.0\", max-age=120")],
            true, 120, 0, 0,
        ),
        (
            "Edge Architecture (Surrogate-Control): a directive targeted at a device applies here too",
            &[("surrogate-control", "max-age=90;edge")],
            true, 90, 0, 0,
        ),
        (
            "without a targeted field, Cache-Control as before",
            &[("cache-control", "max-age=45")],
            true, 45, 0, 45,
        ),
    ];
    for (rule, response, stored, fresh, stale_if_error, fresh_off) in rows {
        let response = headers(response);
        let decided = on.storable(&Method::GET, &get, StatusCode::OK, &response);
        assert_eq!(decided.is_ok(), *stored, "{rule}: stored {decided:?}");
        if *stored {
            assert_eq!(
                on.freshness(StatusCode::OK, &response),
                Duration::from_secs(*fresh),
                "{rule}: freshness"
            );
            assert_eq!(
                on.stale_windows(&response).1,
                Duration::from_secs(*stale_if_error),
                "{rule}: stale-if-error"
            );
        }
        // Switched off, the targeted fields change nothing.
        let plain = off.storable(&Method::GET, &get, StatusCode::OK, &response);
        if plain.is_ok() {
            assert_eq!(
                off.freshness(StatusCode::OK, &response),
                Duration::from_secs(*fresh_off),
                "{rule}: freshness with the switch off"
            );
        }
    }
}
