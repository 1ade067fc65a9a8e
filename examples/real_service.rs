//! The stack inside a real service: an axum app with three routes whose handler works
//! about 1 ms (a little CPU, then a 1 ms wait) and answers `Cache-Control: no-store`,
//! driven by `wrk` (a closed loop: the server is bound by its own CPU), the server's CPU
//! time read from `/proc/self/stat`. Each round starts a fresh server (a new runtime and a
//! new stack) for each variant:
//!
//! - `bare`: the app alone;
//! - `stack`: `StackBuilder::new().build_http()` (untuned), with an HTTP cache (every
//!   request a miss);
//! - `stack-nocache`: the same without the HTTP cache;
//! - `tower`: tower's equivalent (a timeout and one global concurrency limit);
//!
//! and prints per run: requests per CPU second, 200s and other statuses, p99, and the
//! adaptive limit at the end.
//!
//! ```text
//! cargo run --release --example real_service -- --rounds 5 --secs 6 [--variants bare,stack]
//! TRACE_LIMIT=1 cargo run --release --example real_service -- --variants stack
//! ```
//!
//! With `TRACE_LIMIT` set, the stack's limit, in flight and queued are printed every
//! 250 ms. Needs `wrk` (Debian: `apt-get install wrk`).

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Response};
use axum::routing::get;
use axum::Router;
use clap::Parser;
use tower::ServiceBuilder;
use towerguard::http::HttpCacheLayer;
use towerguard::stack::StackBuilder;

#[derive(Parser, Debug)]
struct Args {
    /// Rounds; each starts a fresh server for every variant.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds of load per run.
    #[arg(long, default_value_t = 6)]
    secs: u64,
    /// wrk connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Which variants, comma-separated.
    #[arg(long, default_value = "bare,stack,stack-nocache,tower")]
    variants: String,
}

/// About 1 ms of work: a little CPU, then a wait, as a handler that calls a database does.
async fn work() -> Response<Body> {
    let mut x: u64 = 0x9e37_79b9;
    for i in 0..20_000u64 {
        x = x.rotate_left(7) ^ i.wrapping_mul(0x2545_f491);
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
    Response::builder()
        .header(header::CACHE_CONTROL, "no-store")
        .body(Body::from(format!("ok {}", x & 0xff)))
        .unwrap()
}

fn app() -> Router {
    Router::new()
        .route("/a", get(work))
        .route("/b", get(work))
        .route("/c", get(work))
}

/// User and system CPU time of this process, in seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum())
        .unwrap_or(0.0);
    ticks / 100.0
}

/// Statuses other than 2xx, with their `Cache-Status`, seen by the server.
static STATUSES: std::sync::Mutex<std::collections::BTreeMap<(u16, String), u64>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

struct Run {
    per_cpu_second: f64,
    ok: u64,
    other: u64,
    p99_ms: f64,
    limit: Option<usize>,
}

fn serve(
    variant: &str,
    runtime: &tokio::runtime::Runtime,
) -> (SocketAddr, Option<towerguard::limit::LimitHandle>) {
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let mut handle = None;
    let router = match variant {
        "bare" => app(),
        "stack" | "stack-nocache" => {
            let mut builder = StackBuilder::new();
            if variant == "stack" {
                builder = builder.http_cache(HttpCacheLayer::builder().build());
            }
            let stack = builder.build_http::<Body>().unwrap();
            handle = stack.limit_handle();
            app().layer(stack)
        }
        "tower" => app().layer(
            ServiceBuilder::new()
                .layer(axum::error_handling::HandleErrorLayer::new(
                    |_: tower::BoxError| async { axum::http::StatusCode::SERVICE_UNAVAILABLE },
                ))
                .layer(tower::timeout::TimeoutLayer::new(Duration::from_secs(10)))
                .layer(tower::limit::GlobalConcurrencyLimitLayer::new(1024)),
        ),
        other => panic!("unknown variant {other}"),
    };
    let router = router.layer(axum::middleware::map_response(
        |response: Response<Body>| async move {
            if !response.status().is_success() {
                let mut seen = STATUSES.lock().unwrap();
                let status = response.status().as_u16();
                let detail = response
                    .headers()
                    .get("cache-status")
                    .map(|v| v.to_str().unwrap_or("").to_owned())
                    .unwrap_or_default();
                *seen.entry((status, detail)).or_default() += 1;
            }
            response
        },
    ));
    runtime.spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (addr, handle)
}

fn run(variant: &str, args: &Args) -> Run {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (addr, handle) = serve(variant, &runtime);
    let url = format!("http://{addr}/a");
    let cpu = cpu_seconds();
    if let (Some(h), true) = (handle.clone(), std::env::var_os("TRACE_LIMIT").is_some()) {
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                eprint!("{}/{}/{} ", h.limit(), h.in_flight(), h.queued());
            }
        });
    }
    let output = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{}", args.connections),
            &format!("-d{}s", args.secs),
        ])
        .args(["--latency", &url])
        .output()
        .expect("wrk (Debian: apt-get install wrk)");
    let cpu = cpu_seconds() - cpu;
    let text = String::from_utf8_lossy(&output.stdout);
    // The words of the first line of wrk's report that `is` picks.
    let words = |is: &dyn Fn(&str) -> bool| -> Vec<String> {
        text.lines()
            .find(|l| is(l))
            .map(|l| l.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default()
    };
    let count = |word: Option<&String>| word.and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
    let total = count(words(&|l| l.contains("requests in")).first());
    let other = count(words(&|l| l.contains("Non-2xx")).last());
    let p99_ms = words(&|l| l.trim_start().starts_with("99%"))
        .get(1)
        .map_or(f64::NAN, |v| parse_ms(v));
    let limit = handle.map(|h| h.limit());
    runtime.shutdown_timeout(Duration::from_secs(1));
    Run {
        per_cpu_second: total as f64 / cpu.max(0.01),
        ok: total - other,
        other,
        p99_ms,
        limit,
    }
}

/// wrk's `1.23ms`, `456.00us`, `1.20s` in milliseconds.
fn parse_ms(text: &str) -> f64 {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => number / 1000.0,
        "ms" => number,
        "s" => number * 1000.0,
        _ => f64::NAN,
    }
}

fn main() {
    let args = Args::parse();
    let variants: Vec<String> = args.variants.split(',').map(str::to_owned).collect();
    let mut table: Vec<(String, Vec<f64>)> =
        variants.iter().map(|v| (v.clone(), Vec::new())).collect();
    for round in 1..=args.rounds {
        for (variant, rates) in table.iter_mut() {
            let run = run(variant, &args);
            println!(
                "round {round} {variant:>14}: {:>8.0} requests per CPU second, {:>7} x 200, {:>6} other, p99 {:>6.2} ms, limit {:?}",
                run.per_cpu_second, run.ok, run.other, run.p99_ms, run.limit
            );
            rates.push(run.per_cpu_second);
            let mut seen = STATUSES.lock().unwrap();
            for ((status, detail), n) in seen.iter() {
                println!("    {n} x {status} {detail}");
            }
            seen.clear();
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let bare = table
        .iter()
        .find(|(v, _)| v == "bare")
        .map(|(_, r)| median(r));
    for (variant, rates) in &table {
        let m = median(rates);
        match bare {
            Some(bare) => println!(
                "{variant:>14}: median {m:.0} requests per CPU second, {:.2} of bare",
                m / bare
            ),
            None => println!("{variant:>14}: median {m:.0} requests per CPU second"),
        }
    }
}
