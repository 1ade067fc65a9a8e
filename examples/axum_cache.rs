//! An axum app guarded by towerguard: a concurrency limit and a timeout on the router, and
//! a handler that reads through the single-flight cache.
//!
//! ```text
//! cargo run --example axum_cache [-- --listen 127.0.0.1:3000]
//! curl http://127.0.0.1:3000/users/7       # miss: the slow lookup runs once
//! curl http://127.0.0.1:3000/users/7       # hit
//! curl http://127.0.0.1:3000/stats         # upstream lookups, entries
//! ```
//!
//! The cached service is an ordinary tower service (here a slow user lookup). However many
//! requests for one user arrive at once, the lookup runs once; a client that disconnects
//! does not cancel it for the others. The router answers 503 with `Retry-After` when more
//! than 64 requests are in flight and 128 wait, and 504 after 2 s, without
//! `HandleErrorLayer`: `ErrorResponseLayer` makes the stack infallible.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use tower::util::BoxCloneSyncService;
use tower::{service_fn, ServiceBuilder, ServiceExt};
use towerguard::cache::{CacheHandle, CacheLayer};
use towerguard::http::ErrorResponseLayer;
use towerguard::limit::ConcurrencyLimitLayer;
use towerguard::timeout::TimeoutLayer;
use towerguard::ErrorKind;

#[derive(Clone)]
struct AppState {
    users: BoxCloneSyncService<u64, Arc<str>, towerguard::Error>,
    cache: CacheHandle<u64, Arc<str>>,
    lookups: Arc<AtomicUsize>,
}

async fn user(State(state): State<AppState>, Path(id): Path<u64>) -> (StatusCode, String) {
    match state.users.oneshot(id).await {
        Ok(name) => (StatusCode::OK, format!("{name}\n")),
        Err(err) if err.is(ErrorKind::Panicked) => {
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n"))
        }
        Err(err) => (StatusCode::BAD_GATEWAY, format!("{err}\n")),
    }
}

async fn stats(State(state): State<AppState>) -> String {
    state.cache.run_pending_tasks();
    format!(
        "upstream lookups: {}\nentries: {}\n",
        state.lookups.load(Ordering::Relaxed),
        state.cache.entry_count()
    )
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    common::init_tracing();
    let mut listen = "127.0.0.1:3000".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--listen", Some(addr)) => listen = addr,
            _ => {
                eprintln!("usage: axum_cache [--listen ADDR]");
                std::process::exit(2);
            }
        }
    }

    // The slow backend: a user lookup that takes 200 ms.
    let lookups = Arc::new(AtomicUsize::new(0));
    let counter = lookups.clone();
    let backend = service_fn(move |id: u64| {
        counter.fetch_add(1, Ordering::Relaxed);
        async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            Ok::<_, std::io::Error>(Arc::<str>::from(format!("user {id}")))
        }
    });

    let cache = CacheLayer::builder(|id: &u64| Some(*id))
        .name("users")
        .max_entries(100_000)
        .ttl(Duration::from_secs(60))
        .stale_while_revalidate(Duration::from_secs(30))
        .build();
    let state = AppState {
        cache: cache.handle(),
        users: BoxCloneSyncService::new(ServiceBuilder::new().layer(cache).service(backend)),
        lookups,
    };
    let guard = ServiceBuilder::new()
        .layer(ErrorResponseLayer::new())
        .layer(TimeoutLayer::new(Duration::from_secs(2)).http_extensions())
        .layer(
            ConcurrencyLimitLayer::builder()
                .name("app")
                .limit(64)
                .queue(128, Duration::from_millis(100))
                .build(),
        );
    let app = Router::new()
        .route("/users/{id}", get(user))
        .route("/stats", get(stats))
        .layer(guard)
        .with_state(state);

    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await
}
