//! Synthetic load: towerguard beside what you would use instead, on your machine.
//!
//! ```text
//! cargo run --release --example synthetic_load [-- --quick] [--scenario NAME] [--json FILE]
//! ```
//!
//! Scenarios:
//!
//! - `stampede`: 10,000 concurrent requests for one cold key against an upstream that
//!   takes 50 ms; then the same with the first requester disconnecting 10 ms into its
//!   call. Reports upstream calls, responses that succeeded, and wall time, for no cache,
//!   towerguard's cache, moka's `get_with`, and tower-resilience's coalesce and cache
//!   layers.
//!
//! `--json FILE` writes one object with a key per scenario and, inside, one object per
//! system.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tower::util::BoxCloneService;
use tower::{service_fn, Layer, ServiceExt};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Svc = BoxCloneService<u64, Arc<str>, BoxError>;

const UPSTREAM_LATENCY: Duration = Duration::from_millis(50);
const DISCONNECT_AFTER: Duration = Duration::from_millis(10);

/// An upstream error that can be cloned, as the coalescing peer requires.
#[derive(Debug, Clone)]
struct UpstreamError;

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("upstream error")
    }
}

impl std::error::Error for UpstreamError {}

/// The synthetic upstream: counts calls, signals when one starts, answers after a delay.
#[derive(Clone, Default)]
struct Upstream {
    calls: Arc<AtomicUsize>,
    started: Arc<Notify>,
}

impl Upstream {
    fn service(
        &self,
    ) -> impl tower::Service<
        u64,
        Response = Arc<str>,
        Error = UpstreamError,
        Future = impl Send + 'static,
    > + Clone
           + Send
           + 'static {
        let this = self.clone();
        service_fn(move |key: u64| {
            this.calls.fetch_add(1, Ordering::SeqCst);
            this.started.notify_one();
            async move {
                tokio::time::sleep(UPSTREAM_LATENCY).await;
                Ok::<_, UpstreamError>(Arc::from(format!("value-{key}")))
            }
        })
    }
}

fn boxed<S>(svc: S) -> Svc
where
    S: tower::Service<u64, Response = Arc<str>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    BoxCloneService::new(svc.map_err(Into::into))
}

/// The systems compared, each built fresh (cold) over its own upstream.
const SYSTEMS: &[&str] = &[
    "no_cache",
    "towerguard",
    "moka_get_with",
    "tower_resilience_coalesce",
    "tower_resilience_cache",
];

fn build(system: &str, upstream: &Upstream) -> Svc {
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
                let cache = cache.clone();
                let inner = inner.clone();
                async move {
                    let value = cache
                        .get_with(key, async move { inner.oneshot(key).await.unwrap() })
                        .await;
                    Ok::<_, Infallible>(value)
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
struct Outcome {
    upstream_calls: usize,
    ok: usize,
    errors: usize,
    wall: Duration,
}

/// `callers` concurrent requests for one cold key. With `disconnect`, the first requester
/// starts the upstream call and goes away `DISCONNECT_AFTER` later; the others are counted.
async fn stampede(system: &str, callers: usize, disconnect: bool) -> Outcome {
    let upstream = Upstream::default();
    let svc = build(system, &upstream);
    let started = Instant::now();
    let first = tokio::spawn(svc.clone().oneshot(1));
    upstream.started.notified().await;
    let mut others = JoinSet::new();
    for _ in 1..callers {
        others.spawn(svc.clone().oneshot(1));
    }
    let mut outcome = Outcome::default();
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
    outcome.upstream_calls = upstream.calls.load(Ordering::SeqCst);
    outcome
}

struct Args {
    quick: bool,
    scenario: Option<String>,
    json: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        quick: false,
        scenario: None,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => args.quick = true,
            "--scenario" => args.scenario = Some(it.next().ok_or("--scenario needs a name")?),
            "--json" => args.json = Some(it.next().ok_or("--json needs a file")?),
            "--help" | "-h" => {
                return Err(
                    "usage: synthetic_load [--quick] [--scenario stampede] [--json FILE]".into(),
                )
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if let Some(name) = &args.scenario {
        if name != "stampede" {
            return Err(format!("unknown scenario {name}; known: stampede"));
        }
    }
    Ok(args)
}

fn json_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
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
    let callers = 10_000;
    let rounds = if args.quick { 1 } else { 5 };
    println!(
        "stampede: {callers} concurrent requests for one cold key, upstream {} ms, median of {rounds} round(s)",
        UPSTREAM_LATENCY.as_millis()
    );
    println!(
        "{:<28} {:>10} {:>8} {:>8} {:>9}   {:>10} {:>8} {:>8} {:>9}",
        "system", "upstream", "ok", "errors", "wall ms", "upstream", "ok", "errors", "wall ms"
    );
    println!(
        "{:<28} {:^38}   {:^38}",
        "", "all stay", "first requester disconnects"
    );
    let mut results: BTreeMap<&str, (Outcome, Outcome)> = BTreeMap::new();
    for system in SYSTEMS {
        let mut stay = Vec::new();
        let mut leave = Vec::new();
        for _ in 0..rounds {
            stay.push(stampede(system, callers, false).await);
            leave.push(stampede(system, callers, true).await);
        }
        let median = |mut v: Vec<Outcome>| {
            v.sort_by_key(|o| o.wall);
            v[v.len() / 2].clone()
        };
        let (stay, leave) = (median(stay), median(leave));
        println!(
            "{:<28} {:>10} {:>8} {:>8} {:>9.1}   {:>10} {:>8} {:>8} {:>9.1}",
            system,
            stay.upstream_calls,
            stay.ok,
            stay.errors,
            stay.wall.as_secs_f64() * 1e3,
            leave.upstream_calls,
            leave.ok,
            leave.errors,
            leave.wall.as_secs_f64() * 1e3,
        );
        results.insert(system, (stay, leave));
    }

    if let Some(path) = args.json {
        let mut out = String::from("{\n  \"stampede\": {\n");
        let last = results.len() - 1;
        for (i, (system, (stay, leave))) in results.iter().enumerate() {
            let _ = writeln!(
                out,
                "    \"{}\": {{\"upstream_calls\": {}, \"ok\": {}, \"errors\": {}, \"wall_ms\": {:.3}, \
                 \"first_disconnects\": {{\"upstream_calls\": {}, \"ok\": {}, \"errors\": {}, \"wall_ms\": {:.3}}}}}{}",
                json_escape(system),
                stay.upstream_calls,
                stay.ok,
                stay.errors,
                stay.wall.as_secs_f64() * 1e3,
                leave.upstream_calls,
                leave.ok,
                leave.errors,
                leave.wall.as_secs_f64() * 1e3,
                if i == last { "" } else { "," }
            );
        }
        out.push_str("  }\n}\n");
        if let Err(err) = std::fs::write(&path, out) {
            eprintln!("cannot write {path}: {err}");
            std::process::exit(1);
        }
        println!("wrote {path}");
    }
}
