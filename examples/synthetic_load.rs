//! Synthetic load: towerguard beside what you would use instead, on your machine.
//!
//! ```text
//! cargo run --release --example synthetic_load [-- --quick] [--scenario NAME] [--json FILE]
//! ```
//!
//! Scenarios (default: all):
//!
//! - `stampede`: 10,000 concurrent requests for one cold key against an upstream that
//!   takes 50 ms; then the same with the first requester disconnecting 10 ms into its
//!   call. Upstream calls, successes, wall time: no cache, towerguard's cache, moka's
//!   `get_with`, tower-resilience's coalesce and cache layers.
//! - `tail`: a backend answering in 2 ms, except 2% of calls that take 100 ms, driven by
//!   32 concurrent clients. p50, p99, p99.9 and extra upstream load: no hedging,
//!   towerguard's hedge (percentile delay, no tuning), tower's `Hedge` (behind a
//!   `Buffer`, as it is not `Clone`), tower-resilience's hedge with a fixed 5 ms delay.
//! - `faults`: a backend failing 10% of calls at random, then failing every call. Success
//!   rate and upstream calls per request (amplification): no retry, towerguard's retry
//!   (defaults: 4 attempts within a budget), tower's `Retry` with a 3-attempt policy,
//!   tower-resilience's retry (3 attempts).
//!
//! `--json FILE` writes one object with a key per scenario and, inside, one object per
//! system with its figures.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Ready;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tower::buffer::Buffer;
use tower::util::BoxCloneService;
use tower::{service_fn, Layer, Service, ServiceExt};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Svc = BoxCloneService<u64, Arc<str>, BoxError>;

/// An upstream error that can be cloned, as some peers require.
#[derive(Debug, Clone)]
struct UpstreamError;

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("upstream error")
    }
}

impl std::error::Error for UpstreamError {}

fn boxed<S>(svc: S) -> Svc
where
    S: Service<u64, Response = Arc<str>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    BoxCloneService::new(svc.map_err(Into::into))
}

/// A deterministic hash of a call number, for repeatable random-looking patterns.
fn hash(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The synthetic upstream: counts calls, signals when one starts, and answers after the
/// latency (or with the failure) its script gives for the call number.
#[derive(Clone)]
struct Upstream {
    calls: Arc<AtomicUsize>,
    started: Arc<Notify>,
    latency: Arc<dyn Fn(u64) -> Duration + Send + Sync>,
    fails: Arc<dyn Fn(u64) -> bool + Send + Sync>,
}

impl Upstream {
    fn new(
        latency: impl Fn(u64) -> Duration + Send + Sync + 'static,
        fails: impl Fn(u64) -> bool + Send + Sync + 'static,
    ) -> Self {
        Upstream {
            calls: Arc::default(),
            started: Arc::default(),
            latency: Arc::new(latency),
            fails: Arc::new(fails),
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn service(
        &self,
    ) -> impl Service<
        u64,
        Response = Arc<str>,
        Error = UpstreamError,
        Future = impl std::future::Future<Output = Result<Arc<str>, UpstreamError>> + Send + 'static,
    > + Clone
           + Send
           + Sync
           + 'static {
        let this = self.clone();
        service_fn(move |key: u64| {
            let n = this.calls.fetch_add(1, Ordering::SeqCst) as u64;
            this.started.notify_one();
            let latency = (this.latency)(n);
            let fails = (this.fails)(n);
            async move {
                if !latency.is_zero() {
                    tokio::time::sleep(latency).await;
                }
                if fails {
                    Err(UpstreamError)
                } else {
                    Ok(Arc::from(format!("value-{key}")))
                }
            }
        })
    }
}

/// Figures of one system in one scenario, in print order.
type Figures = Vec<(&'static str, f64)>;

struct Report {
    scenarios: BTreeMap<&'static str, Vec<(&'static str, Figures)>>,
}

impl Report {
    fn print(&self, scenario: &str) {
        let Some(rows) = self.scenarios.get(scenario) else {
            return;
        };
        let Some((_, first)) = rows.first() else {
            return;
        };
        let mut header = format!("{:<28}", "system");
        for (name, _) in first {
            let _ = write!(header, " {name:>16}");
        }
        println!("{header}");
        for (system, figures) in rows {
            let mut line = format!("{system:<28}");
            for (_, value) in figures {
                if value.fract() == 0.0 && value.abs() < 1e12 {
                    let _ = write!(line, " {:>16}", *value as i64);
                } else {
                    let _ = write!(line, " {value:>16.3}");
                }
            }
            println!("{line}");
        }
        println!();
    }

    fn json(&self) -> String {
        let mut out = String::from("{\n");
        let scenarios: Vec<_> = self.scenarios.iter().collect();
        for (i, (scenario, rows)) in scenarios.iter().enumerate() {
            let _ = writeln!(out, "  \"{scenario}\": {{");
            for (j, (system, figures)) in rows.iter().enumerate() {
                let fields: Vec<String> = figures
                    .iter()
                    .map(|(name, value)| format!("\"{name}\": {}", json_number(*value)))
                    .collect();
                let comma = if j + 1 == rows.len() { "" } else { "," };
                let _ = writeln!(out, "    \"{system}\": {{{}}}{comma}", fields.join(", "));
            }
            let comma = if i + 1 == scenarios.len() { "" } else { "," };
            let _ = writeln!(out, "  }}{comma}");
        }
        out.push_str("}\n");
        out
    }
}

fn json_number(value: f64) -> String {
    if value.is_finite() {
        format!("{value}")
    } else {
        "null".to_owned()
    }
}

fn median_by<T: Clone>(mut runs: Vec<T>, key: impl Fn(&T) -> Duration) -> T {
    runs.sort_by_key(|r| key(r));
    runs[runs.len() / 2].clone()
}

// ---------------------------------------------------------------------------------------
// stampede

const STAMPEDE_CALLERS: usize = 10_000;
const STAMPEDE_LATENCY: Duration = Duration::from_millis(50);
const DISCONNECT_AFTER: Duration = Duration::from_millis(10);

const CACHES: &[&str] = &[
    "no_cache",
    "towerguard",
    "moka_get_with",
    "tower_resilience_coalesce",
    "tower_resilience_cache",
];

fn cache_system(system: &str, upstream: &Upstream) -> Svc {
    match system {
        "no_cache" => boxed(upstream.service()),
        "towerguard" => boxed(
            towerguard::cache::CacheLayer::builder(|k: &u64| Some(*k))
                .name("synthetic_load")
                .build()
                .layer(upstream.service()),
        ),
        "moka_get_with" => {
            let cache: moka::future::Cache<u64, Arc<str>> = moka::future::Cache::new(10_000);
            let inner = upstream.service();
            boxed(service_fn(move |key: u64| {
                let (cache, inner) = (cache.clone(), inner.clone());
                async move {
                    let init = async move { inner.oneshot(key).await.unwrap() };
                    Ok::<_, Infallible>(cache.get_with(key, init).await)
                }
            }))
        }
        "tower_resilience_coalesce" => boxed(
            tower_resilience::coalesce::CoalesceLayer::new(|k: &u64| *k).layer(upstream.service()),
        ),
        "tower_resilience_cache" => boxed(
            tower_resilience::cache::CacheLayer::builder()
                .max_size(10_000)
                .key_extractor(|k: &u64| *k)
                .build()
                .expect("valid cache configuration")
                .layer(upstream.service()),
        ),
        other => unreachable!("unknown system {other}"),
    }
}

#[derive(Debug, Default, Clone)]
struct Stampede {
    upstream_calls: usize,
    ok: usize,
    errors: usize,
    wall: Duration,
}

/// `callers` concurrent requests for one cold key. With `disconnect`, the first requester
/// starts the upstream call and goes away `DISCONNECT_AFTER` later; the others are counted.
async fn stampede_once(system: &str, disconnect: bool) -> Stampede {
    let upstream = Upstream::new(|_| STAMPEDE_LATENCY, |_| false);
    let svc = cache_system(system, &upstream);
    let started = Instant::now();
    let first = tokio::spawn(svc.clone().oneshot(1));
    upstream.started.notified().await;
    let mut others = JoinSet::new();
    for _ in 1..STAMPEDE_CALLERS {
        others.spawn(svc.clone().oneshot(1));
    }
    let mut outcome = Stampede::default();
    if disconnect {
        tokio::time::sleep(DISCONNECT_AFTER).await;
        first.abort();
    } else {
        match first.await {
            Ok(Ok(_)) => outcome.ok += 1,
            _ => outcome.errors += 1,
        }
    }
    while let Some(result) = others.join_next().await {
        match result {
            Ok(Ok(_)) => outcome.ok += 1,
            _ => outcome.errors += 1,
        }
    }
    outcome.wall = started.elapsed();
    outcome.upstream_calls = upstream.calls();
    outcome
}

async fn stampede(report: &mut Report, rounds: usize) {
    println!(
        "stampede: {STAMPEDE_CALLERS} concurrent requests for one cold key, upstream {} ms, median of {rounds} round(s)",
        STAMPEDE_LATENCY.as_millis()
    );
    let mut rows = Vec::new();
    for system in CACHES {
        let mut stay = Vec::new();
        let mut leave = Vec::new();
        for _ in 0..rounds {
            stay.push(stampede_once(system, false).await);
            leave.push(stampede_once(system, true).await);
        }
        let stay = median_by(stay, |o| o.wall);
        let leave = median_by(leave, |o| o.wall);
        rows.push((
            *system,
            vec![
                ("upstream_calls", stay.upstream_calls as f64),
                ("ok", stay.ok as f64),
                ("errors", stay.errors as f64),
                ("wall_ms", stay.wall.as_secs_f64() * 1e3),
                ("disc_upstream_calls", leave.upstream_calls as f64),
                ("disc_ok", leave.ok as f64),
                ("disc_errors", leave.errors as f64),
                ("disc_wall_ms", leave.wall.as_secs_f64() * 1e3),
            ],
        ));
    }
    report.scenarios.insert("stampede", rows);
    report.print("stampede");
}

// ---------------------------------------------------------------------------------------
// tail

const TAIL_CLIENTS: usize = 32;

/// tower's hedge policy, written by hand as tower requires.
#[derive(Clone)]
struct ClonePolicy;

impl tower::hedge::Policy<u64> for ClonePolicy {
    fn clone_request(&self, req: &u64) -> Option<u64> {
        Some(*req)
    }

    fn can_retry(&self, _req: &u64) -> bool {
        true
    }
}

const HEDGES: &[&str] = &[
    "no_hedge",
    "towerguard",
    "tower_hedge",
    "tower_resilience_hedge_5ms",
];

fn hedge_system(system: &str, upstream: &Upstream) -> Svc {
    match system {
        "no_hedge" => boxed(upstream.service()),
        "towerguard" => boxed(
            towerguard::hedge::HedgeLayer::new()
                .name("synthetic_load")
                .layer(upstream.service()),
        ),
        "tower_hedge" => {
            let hedge = tower::hedge::Hedge::new(
                upstream.service(),
                ClonePolicy,
                100,
                0.95,
                Duration::from_secs(1),
            );
            boxed(Buffer::new(hedge, 1_024))
        }
        "tower_resilience_hedge_5ms" => boxed(
            tower_resilience::hedge::HedgeLayer::builder()
                .delay(Duration::from_millis(5))
                .max_hedged_attempts(2)
                .build()
                .layer(upstream.service()),
        ),
        other => unreachable!("unknown system {other}"),
    }
}

async fn tail(report: &mut Report, requests: usize) {
    println!(
        "tail: backend 2 ms, 2% of calls 100 ms; {TAIL_CLIENTS} concurrent clients, {requests} requests"
    );
    let mut rows = Vec::new();
    for system in HEDGES {
        let upstream = Upstream::new(
            |n| Duration::from_millis(if hash(n) % 50 == 0 { 100 } else { 2 }),
            |_| false,
        );
        let svc = hedge_system(system, &upstream);
        let started = Instant::now();
        let mut clients = JoinSet::new();
        for c in 0..TAIL_CLIENTS {
            let svc = svc.clone();
            let per_client = requests / TAIL_CLIENTS;
            clients.spawn(async move {
                let mut histogram = Histogram::<u64>::new(3).expect("valid precision");
                for i in 0..per_client {
                    let start = Instant::now();
                    svc.clone()
                        .oneshot((c * per_client + i) as u64)
                        .await
                        .expect("no failures");
                    let _ = histogram.record(start.elapsed().as_micros() as u64);
                }
                histogram
            });
        }
        let mut histogram = Histogram::<u64>::new(3).expect("valid precision");
        while let Some(h) = clients.join_next().await {
            histogram
                .add(h.expect("client task"))
                .expect("same precision");
        }
        let wall = started.elapsed();
        let done = histogram.len() as f64;
        rows.push((
            *system,
            vec![
                ("p50_us", histogram.value_at_quantile(0.5) as f64),
                ("p99_us", histogram.value_at_quantile(0.99) as f64),
                ("p999_us", histogram.value_at_quantile(0.999) as f64),
                ("extra_load", upstream.calls() as f64 / done - 1.0),
                ("rps", done / wall.as_secs_f64()),
            ],
        ));
    }
    report.scenarios.insert("tail", rows);
    report.print("tail");
}

// ---------------------------------------------------------------------------------------
// faults

/// tower's retry policy, written by hand as tower requires: up to two retries on error.
#[derive(Clone)]
struct Attempts(usize);

impl tower::retry::Policy<u64, Arc<str>, UpstreamError> for Attempts {
    type Future = Ready<()>;

    fn retry(
        &mut self,
        _req: &mut u64,
        result: &mut Result<Arc<str>, UpstreamError>,
    ) -> Option<Self::Future> {
        match result {
            Err(_) if self.0 > 0 => {
                self.0 -= 1;
                Some(std::future::ready(()))
            }
            _ => None,
        }
    }

    fn clone_request(&mut self, req: &u64) -> Option<u64> {
        Some(*req)
    }
}

const RETRIES: &[&str] = &[
    "no_retry",
    "towerguard",
    "tower_retry",
    "tower_resilience_retry",
];

fn retry_system(system: &str, upstream: &Upstream) -> Svc {
    match system {
        "no_retry" => boxed(upstream.service()),
        "towerguard" => boxed(
            towerguard::retry::RetryLayer::new()
                .name("synthetic_load")
                .layer(upstream.service()),
        ),
        "tower_retry" => {
            boxed(tower::retry::RetryLayer::new(Attempts(2)).layer(upstream.service()))
        }
        "tower_resilience_retry" => boxed(
            tower_resilience::retry::RetryLayer::<u64, Arc<str>, UpstreamError>::builder()
                .max_attempts(3)
                .exponential_backoff(Duration::from_millis(25))
                .build()
                .layer(upstream.service()),
        ),
        other => unreachable!("unknown system {other}"),
    }
}

/// `requests` requests from 32 clients; returns (successes, upstream calls).
async fn drive(svc: &Svc, requests: usize) -> usize {
    let mut clients = JoinSet::new();
    for c in 0..32 {
        let svc = svc.clone();
        let per_client = requests / 32;
        clients.spawn(async move {
            let mut ok = 0;
            for i in 0..per_client {
                if svc
                    .clone()
                    .oneshot((c * per_client + i) as u64)
                    .await
                    .is_ok()
                {
                    ok += 1;
                }
            }
            ok
        });
    }
    let mut ok = 0;
    while let Some(n) = clients.join_next().await {
        ok += n.expect("client task");
    }
    ok
}

async fn faults(report: &mut Report, requests: usize) {
    println!(
        "faults: 10% transient failures, then a total outage; {requests} requests each, 32 clients"
    );
    let requests = requests / 32 * 32;
    let mut rows = Vec::new();
    for system in RETRIES {
        let transient = Upstream::new(|_| Duration::ZERO, |n| hash(n) % 10 == 0);
        let ok = drive(&retry_system(system, &transient), requests).await;
        let outage = Upstream::new(|_| Duration::ZERO, |_| true);
        drive(&retry_system(system, &outage), requests).await;
        rows.push((
            *system,
            vec![
                ("success_rate", ok as f64 / requests as f64),
                ("amplification", transient.calls() as f64 / requests as f64),
                (
                    "outage_amplification",
                    outage.calls() as f64 / requests as f64,
                ),
            ],
        ));
    }
    report.scenarios.insert("faults", rows);
    report.print("faults");
}

// ---------------------------------------------------------------------------------------

const SCENARIOS: &[&str] = &["stampede", "tail", "faults"];

struct Args {
    quick: bool,
    scenario: Option<String>,
    json: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let usage = "usage: synthetic_load [--quick] [--scenario stampede|tail|faults] [--json FILE]";
    let mut args = Args {
        quick: false,
        scenario: None,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => args.quick = true,
            "--scenario" => args.scenario = Some(it.next().ok_or(usage)?),
            "--json" => args.json = Some(it.next().ok_or(usage)?),
            "--help" | "-h" => return Err(usage.to_owned()),
            other => return Err(format!("unknown argument {other}\n{usage}")),
        }
    }
    if let Some(name) = &args.scenario {
        if !SCENARIOS.contains(&name.as_str()) {
            return Err(format!(
                "unknown scenario {name}; known: {}",
                SCENARIOS.join(", ")
            ));
        }
    }
    Ok(args)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    let wanted = |name: &str| args.scenario.as_deref().is_none_or(|s| s == name);
    let mut report = Report {
        scenarios: BTreeMap::new(),
    };
    let started = Instant::now();
    if wanted("stampede") {
        stampede(&mut report, if args.quick { 1 } else { 5 }).await;
    }
    if wanted("tail") {
        tail(&mut report, if args.quick { 6_400 } else { 32_000 }).await;
    }
    if wanted("faults") {
        faults(&mut report, if args.quick { 3_200 } else { 10_016 }).await;
    }
    println!("finished in {:.1} s", started.elapsed().as_secs_f64());
    if let Some(path) = args.json {
        if let Err(err) = std::fs::write(&path, report.json()) {
            eprintln!("cannot write {path}: {err}");
            std::process::exit(1);
        }
        println!("wrote {path}");
    }
}
