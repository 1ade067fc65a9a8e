//! The standard stack around a hyper-util client, calling a flaky upstream.
//!
//! ```text
//! cargo run --example hyper_client
//! ```
//!
//! It starts a small upstream on loopback that fails one call in five with 503 and answers
//! one in ten slowly, then sends 200 requests through the client stack (total and
//! per-attempt timeouts, a limit, retry with a budget, adaptive hedging) and prints what
//! came back, how many calls the upstream saw, and what the layers did by cause (from
//! their metrics): retries by reason, retries the budget refused, hedges, timeouts, limit
//! rejections.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{Layer, ServiceExt};
use towerguard::http::BufferedBody;
use towerguard::stack::StackBuilder;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    common::init_tracing();
    // The layers' counters, read back at the end to report outcomes by cause.
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("no other metrics recorder is installed");
    // The flaky upstream.
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let upstream = Router::new().route(
        "/item",
        get(move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                if n % 5 == 3 {
                    return (StatusCode::SERVICE_UNAVAILABLE, "busy");
                }
                if n % 10 == 7 {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                (StatusCode::OK, "item")
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, upstream).await });

    // The client: hyper-util, behind the standard stack.
    let client = Client::builder(TokioExecutor::new()).build_http::<BufferedBody<Full<Bytes>>>();
    let stack = StackBuilder::new()
        .name("client")
        .total_timeout(Duration::from_secs(2))
        .attempt_timeout(Duration::from_millis(500))
        .static_limit(32)
        .queue(256, Duration::from_millis(500))
        .retry_attempts(3)
        .hedge_adaptive()
        .build_http::<Full<Bytes>>()
        .unwrap_or_else(|err| {
            eprintln!("invalid stack: {err}");
            std::process::exit(1);
        });
    let service = stack.layer(client);

    let started = Instant::now();
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let service = service.clone();
        let uri = format!("http://{addr}/item");
        tasks.spawn(async move {
            let request = Request::get(uri)
                .body(Full::new(Bytes::new()))
                .expect("valid request");
            let response = service
                .oneshot(request)
                .await
                .expect("the stack is infallible");
            let status = response.status().as_u16();
            let _ = response.into_body().collect().await;
            status
        });
    }
    while let Some(status) = tasks.join_next().await {
        if let Ok(status) = status {
            *statuses.entry(status).or_default() += 1;
        }
    }
    println!(
        "200 requests in {:.0} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    for (status, count) in &statuses {
        println!("  {status}: {count}");
    }
    println!(
        "upstream calls: {} (the upstream fails 20% and is slow 10% of the time; retries and\n hedges are bounded by the budget: 20% of successes plus 10 per second)",
        calls.load(Ordering::SeqCst)
    );
    println!("what the layers did, by cause:");
    let mut causes: Vec<(String, u64)> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(key, _, _, value)| match value {
            metrics_util::debugging::DebugValue::Counter(n) if n > 0 => {
                let key = key.key();
                let labels: Vec<String> = key
                    .labels()
                    .filter(|label| label.key() != "name")
                    .map(|label| format!("{}={}", label.key(), label.value()))
                    .collect();
                let name = key.name().trim_start_matches("towerguard_");
                Some((format!("{name} {}", labels.join(" ")), n))
            }
            _ => None,
        })
        .collect();
    causes.sort();
    for (cause, count) in causes {
        println!("  {:<50} {count:>5}", cause.trim_end());
    }
    Ok(())
}
