//! Fuzzing on the stable toolchain: arbitrary bytes into every header parser of the HTTP
//! cache, and arbitrary request and response header sets through the HTTP cache itself,
//! checking invariants.
//!
//!     cargo bench --bench fuzz -- --cases 10000000            (the long run)
//!     cargo bench --bench fuzz -- --seed 7 --case 123456      (replays one case)
//!
//! Each case comes from `(seed, case number)` alone, so a failure prints the command that
//! replays it. Inputs are random bytes mixed with a dictionary of the fields' own tokens
//! (directives, dates, numbers at and past every integer bound, quoting, list separators),
//! so most cases reach past the first byte of a parser.
//!
//! Invariants, beyond "no panic" (every parser and policy function is called with every
//! case):
//! - `byte_range` answers a range inside the body, never past it;
//! - ages and freshness never overflow or wrap (checked arithmetic in the oracle);
//! - through the cache, a second client gets the first client's stored response only if
//!   that response was not `private`, carried no `Set-Cookie`, answered an
//!   `Authorization` only with `public`, `s-maxage` or `must-revalidate`, had no
//!   `Vary: *`, and the second request's values of every field its `Vary` names are the
//!   first request's. The oracle reads the raw fields itself, not through the cache's
//!   parsers.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use tower::{service_fn, Layer, ServiceExt};
use towerguard::http::cache_control::CacheControl;
use towerguard::http::cache_policy::{self, AgeInputs, HttpCachePolicy};
use towerguard::http::{range, retry_after, HttpCacheLayer, CACHE_STATUS};

/// A small, fast generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn new(seed: u64, case: u64) -> Self {
        Rng(seed ^ case.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const DIRECTIVES: &[&str] = &[
    "max-age=0",
    "max-age=60",
    "max-age=-1",
    "max-age=18446744073709551616",
    "max-age=99999999999999999999999",
    "max-age=\"60\"",
    "max-age",
    "max-age=",
    "MAX-AGE=5",
    "s-maxage=30",
    "s-maxage=0",
    "no-cache",
    "no-cache=\"set-cookie\"",
    "No-Cache",
    "no-store",
    "private",
    "private=\"x-user\"",
    "Private",
    "public",
    "must-revalidate",
    "proxy-revalidate",
    "must-understand",
    "immutable",
    "stale-while-revalidate=30",
    "stale-while-revalidate=",
    "stale-if-error=30",
    "stale-if-error=99999999999999999999",
    "only-if-cached",
    "max-stale",
    "max-stale=10",
    "min-fresh=5",
    "min-fresh=-5",
    "no-transform",
    "x-ext=\"a,b\"",
    "\"",
    ",",
    ";",
    "=",
    "",
    " ",
    "\t",
];

const NUMBERS: &[&str] = &[
    "0",
    "1",
    "60",
    "-1",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999999",
    "1.5",
    " 5",
    "5 ",
    "0x10",
    "",
    "abc",
];

const DATES: &[&str] = &[
    "Sun, 06 Nov 1994 08:49:37 GMT",
    "Sunday, 06-Nov-94 08:49:37 GMT",
    "Sun Nov  6 08:49:37 1994",
    "Thu, 01 Jan 1970 00:00:00 GMT",
    "Fri, 31 Dec 9999 23:59:59 GMT",
    "Mon, 01 Jan 2024 00:00:00 GMT",
    "0",
    "-1",
    "",
    "not a date",
    "Sun, 32 Nov 1994 08:49:37 GMT",
    "Sun, 06 Nov 1994 25:00:00 GMT",
];

const ETAGS: &[&str] = &[
    "\"v1\"",
    "W/\"v1\"",
    "\"v2\"",
    "*",
    "\"v1\", \"v2\"",
    "W/\"v1\", W/\"v2\"",
    "v1",
    "\"",
    "\"\"",
    "W/",
    ", ,",
    "\"a,b\"",
];

const RANGES: &[&str] = &[
    "bytes=0-5",
    "bytes=-5",
    "bytes=5-",
    "bytes=0-0",
    "bytes=-0",
    "bytes=5-1",
    "bytes=0-1,2-3",
    "bytes=18446744073709551615-",
    "bytes=0-18446744073709551616",
    "bytes=-18446744073709551615",
    "bytes=",
    "bytes=-",
    "items=0-5",
    "bytes = 0-5",
    "bytes=0-5,",
    "bytes=,0-5",
];

const LANGUAGES: &[&str] = &["en", "de", "fr", "en, fr", "*"];
const VARY: &[&str] = &[
    "accept-language",
    "Accept-Language",
    "x-a",
    "accept-language, x-a",
    "*",
    "x-a, *",
    "",
    ", ,",
    "bad name",
];

/// One of the dictionary's tokens, some random bytes, or a mix of both.
fn fragment(rng: &mut Rng, dictionary: &[&str]) -> Vec<u8> {
    match rng.below(10) {
        0 => (0..rng.below(24)).map(|_| rng.next() as u8).collect(),
        1 => {
            let mut bytes = rng.pick(dictionary).as_bytes().to_vec();
            if !bytes.is_empty() {
                let at = rng.below(bytes.len());
                bytes[at] = rng.next() as u8;
            }
            bytes
        }
        _ => rng.pick(dictionary).as_bytes().to_vec(),
    }
}

/// A field value of 1 to 4 fragments joined by commas (or not).
fn value(rng: &mut Rng, dictionary: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..1 + rng.below(4) {
        if i > 0 {
            out.extend_from_slice(if rng.chance(80) { b", " } else { b" " });
        }
        out.extend(fragment(rng, dictionary));
    }
    out
}

/// Adds `name: value` if the bytes are a valid field value.
fn add(headers: &mut HeaderMap, name: &'static str, bytes: &[u8]) {
    if let Ok(value) = HeaderValue::from_bytes(bytes) {
        headers.append(HeaderName::from_static(name), value);
    }
}

/// How a field's value is drawn from its dictionary.
#[derive(Clone, Copy)]
enum Shape {
    /// One whole token (the oracle compares these as they are).
    Token,
    /// One token, some random bytes, or a token with a byte changed.
    Fragment,
    /// A comma-separated list of fragments.
    List,
}

/// Each field of `fields` (name, dictionary, chance in percent, shape), drawn at random.
fn optional_fields(
    rng: &mut Rng,
    headers: &mut HeaderMap,
    fields: &[(&'static str, &[&str], u64, Shape)],
) {
    for &(name, dictionary, percent, shape) in fields {
        if rng.chance(percent) {
            let v = match shape {
                Shape::Token => rng.pick(dictionary).as_bytes().to_vec(),
                Shape::Fragment => fragment(rng, dictionary),
                Shape::List => value(rng, dictionary),
            };
            add(headers, name, &v);
        }
    }
}

/// The raw field lines `CacheControl::parse` and friends see.
fn response_headers(rng: &mut Rng) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for _ in 0..rng.below(3) {
        let v = value(rng, DIRECTIVES);
        add(&mut headers, "cache-control", &v);
    }
    const LOCATIONS: &[&str] = &[
        "/other",
        "http://fuzz.test/x",
        "//evil.test/",
        "http://[::1",
    ];
    optional_fields(
        rng,
        &mut headers,
        &[
            ("expires", DATES, 30, Shape::Fragment),
            ("date", DATES, 40, Shape::Fragment),
            ("last-modified", DATES, 30, Shape::Fragment),
            ("age", NUMBERS, 30, Shape::Fragment),
            ("etag", ETAGS, 50, Shape::List),
            ("vary", VARY, 40, Shape::List),
            ("retry-after", NUMBERS, 10, Shape::Fragment),
            ("pragma", DIRECTIVES, 5, Shape::Fragment),
            ("location", LOCATIONS, 5, Shape::Fragment),
        ],
    );
    if rng.chance(15) {
        headers.insert("set-cookie", HeaderValue::from_static("session=first"));
    }
    headers
}

fn request_headers(rng: &mut Rng) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if rng.chance(25) {
        headers.insert("authorization", HeaderValue::from_static("Bearer first"));
    }
    if rng.chance(20) {
        let v = value(rng, DIRECTIVES);
        add(&mut headers, "cache-control", &v);
    }
    optional_fields(
        rng,
        &mut headers,
        &[
            ("accept-language", LANGUAGES, 50, Shape::Token),
            ("x-a", LANGUAGES, 30, Shape::Token),
            ("if-none-match", ETAGS, 15, Shape::Fragment),
            ("if-modified-since", DATES, 10, Shape::Fragment),
            ("range", RANGES, 15, Shape::Fragment),
            ("if-range", ETAGS, 5, Shape::Fragment),
        ],
    );
    headers
}

const STATUSES: &[u16] = &[200, 203, 204, 206, 301, 304, 404, 410, 500, 503, 599];

/// Every parser and policy function over one case's fields; panics on a broken invariant.
fn parsers(rng: &mut Rng) {
    let raw: Vec<Vec<u8>> = (0..1 + rng.below(3))
        .map(|_| value(rng, DIRECTIVES))
        .collect();
    let cc = CacheControl::parse(raw.iter().map(Vec::as_slice));
    let _ = cc.forbids_stale();
    let response = response_headers(rng);
    let request = request_headers(rng);
    let status = StatusCode::from_u16(STATUSES[rng.below(STATUSES.len())]).unwrap();
    let policy = HttpCachePolicy::default()
        .stale_on_error(Duration::from_secs(rng.next() % 1_000_000))
        .ignore_client_directives(rng.chance(20));

    let _ = CacheControl::from_headers(&response);
    let _ = cache_policy::age(&response);
    let _ = retry_after(&response);
    let _ = policy.storable(&Method::GET, &request, status, &response);
    let freshness = policy.freshness(status, &response);
    let _ = policy.stale_windows(&response);
    let now = SystemTime::now();
    let sent = now - Duration::from_secs(rng.next() % 100);
    let inputs = AgeInputs::from_headers(&response, sent, now);
    let age = inputs.current_age(Duration::from_secs(rng.next() % (1 << 40)));
    let _ = policy.reuse(&request, &response, freshness, age);
    let vary = cache_policy::vary(&response);
    let _ = cache_policy::vary_matches(&vary, &request, &request_headers(rng));
    let _ = cache_policy::not_modified(&request, &response);
    let _ = cache_policy::head_matches(&response, &response_headers(rng));
    let _ = cache_policy::has_validator(&response);
    let conditional = cache_policy::conditional_headers(&response);
    let _ = cache_policy::not_modified(&conditional, &response);
    let mut updated = response.clone();
    cache_policy::update_headers(&mut updated, &response_headers(rng));
    let _ = policy.refresh(&request, status, &response, &response_headers(rng));

    let lengths = [0, 1, 5, 6, 10, rng.next() % 1_000_000, u64::MAX];
    let length = lengths[rng.below(lengths.len())];
    let _ = range::has_range(&request);
    let _ = range::several_ranges(&request);
    let answer = range::byte_range(&request, &response, length);
    if let range::RangeAnswer::Partial { start, end } = answer {
        assert!(
            start <= end && end < length,
            "{answer:?} of {length} bytes for {request:?}"
        );
    }
    let _ = answer.content_range(length);

    let target = fragment(
        rng,
        &[
            "/a",
            "/a?b=c",
            "http://fuzz.test/x",
            "*",
            "http://[::1]:8080/",
            "//x",
        ],
    );
    if let Ok(uri) = Uri::try_from(target.as_slice()) {
        let host = rng.chance(50).then_some("fuzz.test");
        let _ = cache_policy::primary_key(&Method::GET, &uri, host);
        let _ = cache_policy::invalidation_targets(&uri, host, &response);
    }
}

/// The oracle's own reading of a response's `Cache-Control` lines: the lowercase names of
/// the directives.
fn directive_names(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all("cache-control")
        .iter()
        .flat_map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .split(',')
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .map(|d| {
            d.split('=')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .collect()
}

/// Whether the first client's response may reach another client, read from the raw
/// fields: the invariant of the cache case.
fn shareable(first: &HeaderMap, response: &HeaderMap, second: &HeaderMap) -> Result<(), String> {
    let names = directive_names(response);
    let has = |d: &str| names.iter().any(|n| n == d);
    if has("private") {
        return Err("a private response".into());
    }
    if response.contains_key("set-cookie") {
        return Err("a response with Set-Cookie".into());
    }
    if first.contains_key("authorization")
        && !(has("public") || has("s-maxage") || has("must-revalidate"))
    {
        return Err(
            "a response to Authorization without public, s-maxage or must-revalidate".into(),
        );
    }
    for line in response.get_all("vary") {
        for name in String::from_utf8_lossy(line.as_bytes())
            .split(',')
            .map(str::trim)
        {
            if name == "*" {
                return Err("a response with Vary: *".into());
            }
            let name = name.to_ascii_lowercase();
            if name == "accept-language" || name == "x-a" {
                let a: Vec<_> = first.get_all(name.as_str()).iter().collect();
                let b: Vec<_> = second.get_all(name.as_str()).iter().collect();
                if a != b {
                    return Err(format!("a response varying on {name} ({a:?} vs {b:?})"));
                }
            }
        }
    }
    Ok(())
}

/// Two clients through a fresh cache: the first's response has the case's fields; the
/// second must get it only if `shareable` says so.
async fn through_the_cache(rng: &mut Rng) {
    let response_fields = response_headers(rng);
    let status = StatusCode::from_u16(STATUSES[rng.below(STATUSES.len())]).unwrap();
    let first = request_headers(rng);
    let mut second = request_headers(rng);
    second.remove("authorization");
    let calls = Arc::new(AtomicU64::new(0));
    let (fields, counter) = (response_fields.clone(), calls.clone());
    let origin = service_fn(move |_req: Request<Full<Bytes>>| {
        let n = counter.fetch_add(1, Ordering::Relaxed);
        let mut response = Response::new(Full::new(Bytes::from(format!("response {n}"))));
        *response.status_mut() = status;
        if n == 0 {
            *response.headers_mut() = fields.clone();
        } else {
            response
                .headers_mut()
                .insert("cache-control", HeaderValue::from_static("no-store"));
        }
        async move { Ok::<_, std::io::Error>(response) }
    });
    let svc = HttpCacheLayer::builder()
        .max_flights(16)
        .build()
        .layer(origin);
    let ask = |headers: &HeaderMap| {
        let mut req = Request::get("http://fuzz.test/page")
            .body(Full::new(Bytes::new()))
            .unwrap();
        *req.headers_mut() = headers.clone();
        svc.clone().oneshot(req)
    };
    let a = ask(&first).await.expect("the cache answers");
    let a_body = a.into_body().collect().await.map(|b| b.to_bytes());
    let b = ask(&second).await.expect("the cache answers");
    let cache_status = b.headers().get(CACHE_STATUS).cloned();
    let b_body = b.into_body().collect().await.map(|b| b.to_bytes());
    if let (Ok(a_body), Ok(b_body)) = (a_body, b_body) {
        if a_body == b_body && a_body.starts_with(b"response 0") && !a_body.is_empty() {
            if let Err(why) = shareable(&first, &response_fields, &second) {
                panic!(
                    "the second client got the first client's response: {why}\n\
                     status {status}, response {response_fields:?}\n\
                     first request {first:?}\nsecond request {second:?}\ncache status {cache_status:?}"
                );
            }
        }
    }
}

struct Args {
    cases: u64,
    seed: u64,
    case: Option<u64>,
    threads: u64,
}

fn args() -> Args {
    let mut args = Args {
        cases: 100_000,
        seed: 1,
        case: None,
        threads: std::thread::available_parallelism().map_or(1, |n| n.get() as u64),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut number = |name: &str| -> u64 {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} takes a number"))
        };
        match arg.as_str() {
            "--cases" => args.cases = number("--cases"),
            "--seed" => args.seed = number("--seed"),
            "--case" => args.case = Some(number("--case")),
            "--threads" => args.threads = number("--threads").max(1),
            // What `cargo bench` passes to every bench target.
            "--bench" => {}
            other => panic!("unknown argument {other}: --cases N, --seed S, --case N, --threads T"),
        }
    }
    args
}

/// Runs case `case` of `seed`; `Err` with the panic's message if it broke.
fn run_case(runtime: &tokio::runtime::Runtime, seed: u64, case: u64) -> Result<(), String> {
    catch_unwind(AssertUnwindSafe(|| {
        let mut rng = Rng::new(seed, case);
        parsers(&mut rng);
        // The cache case costs more than the parsers': one case in four.
        if case.is_multiple_of(4) {
            runtime.block_on(through_the_cache(&mut rng));
        }
    }))
    .map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default()
    })
}

fn main() {
    let args = args();
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    if let Some(case) = args.case {
        match run_case(&runtime(), args.seed, case) {
            Ok(()) => println!("case {case} of seed {} passes", args.seed),
            Err(why) => {
                println!("case {case} of seed {} fails: {why}", args.seed);
                std::process::exit(1);
            }
        }
        return;
    }
    // Panics are expected only from broken invariants; report them once, below.
    std::panic::set_hook(Box::new(|_| {}));
    let started = Instant::now();
    let failed = Arc::new(AtomicU64::new(u64::MAX));
    let threads: Vec<_> = (0..args.threads)
        .map(|thread| {
            let (failed, runtime) = (failed.clone(), runtime());
            let (seed, cases, stride) = (args.seed, args.cases, args.threads);
            std::thread::spawn(move || {
                let mut case = thread;
                while case < cases && failed.load(Ordering::Relaxed) == u64::MAX {
                    if let Err(why) = run_case(&runtime, seed, case) {
                        if failed.fetch_min(case, Ordering::Relaxed) > case {
                            eprintln!("case {case} fails: {why}");
                        }
                    }
                    case += stride;
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let elapsed = started.elapsed();
    let failed = failed.load(Ordering::Relaxed);
    if failed != u64::MAX {
        eprintln!(
            "replay: cargo bench --bench fuzz -- --seed {} --case {failed}",
            args.seed
        );
        std::process::exit(1);
    }
    println!(
        "fuzz: {} cases of seed {} ({} through the cache), no failure, {:.1} s ({:.0} cases/s, {} threads)",
        args.cases,
        args.seed,
        args.cases.div_ceil(4),
        elapsed.as_secs_f64(),
        args.cases as f64 / elapsed.as_secs_f64(),
        args.threads
    );
}
