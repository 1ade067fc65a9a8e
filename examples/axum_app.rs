//! An axum app behind towerguard's standard stack, with Prometheus metrics at `/metrics`.
//!
//! ```text
//! cargo run --example axum_app [-- --listen 127.0.0.1:3000]
//! curl http://127.0.0.1:3000/hello        # cached for 30 s (Cache-Status says so)
//! curl http://127.0.0.1:3000/slow         # 504 after the 2 s total timeout
//! curl http://127.0.0.1:3000/metrics      # towerguard_* metrics in Prometheus text
//! ```
//!
//! `RUST_LOG=towerguard=debug cargo run --example axum_app` logs each layer's decisions
//! (cache hit or miss, permit granted or queued, retry, timeout) on standard error.
//!
//! The stack (HTTP cache, total timeout, adaptive limit with a queue, retry, attempt
//! timeout) goes straight into `Router::layer`: it is infallible, errors become 503 with
//! `Retry-After` or 504.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use towerguard::http::HttpCacheLayer;
use towerguard::stack::StackBuilder;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    common::init_tracing();
    let mut listen = "127.0.0.1:3000".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--listen", Some(addr)) => listen = addr,
            _ => {
                eprintln!("usage: axum_app [--listen ADDR]");
                std::process::exit(2);
            }
        }
    }

    // The recorder first: layers register their metrics when they are built.
    let prometheus = match common::install_prometheus() {
        Ok(handle) => handle,
        Err(err) => {
            eprintln!("{err}");
            std::process::exit(1);
        }
    };

    let stack = StackBuilder::new()
        .name("app")
        .total_timeout(Duration::from_secs(2))
        .attempt_timeout(Duration::from_secs(1))
        .adaptive_limit(32, 4, 256)
        .queue(128, Duration::from_millis(100))
        .http_cache(HttpCacheLayer::builder().name("app").build())
        .build_http::<Body>()
        .unwrap_or_else(|err| {
            eprintln!("invalid stack: {err}");
            std::process::exit(1);
        });

    let app = Router::new()
        .route(
            "/hello",
            get(|| async {
                (
                    [("cache-control", "max-age=30")],
                    "hello from behind towerguard\n",
                )
            }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(10)).await;
                "too late\n"
            }),
        )
        .layer(stack)
        .route(
            "/metrics",
            get(move || std::future::ready(prometheus.render())),
        );

    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await
}
