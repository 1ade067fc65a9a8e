//! A caching reverse proxy: towerguard's RFC 9111 shared cache in front of any HTTP server.
//!
//! ```text
//! cargo run --release --example proxy -- --listen 127.0.0.1:8080 --upstream http://127.0.0.1:8000
//!     [--no-cache] [--cache-capacity-mb N] [--max-body-kb N]
//!     [--timeout-ms N] [--attempt-timeout-ms N] [--limit N|adaptive] [--retry N] [--hedge]
//!     [--metrics ADDR]
//! ```
//!
//! Without the resilience flags it is a plain caching proxy. `--timeout-ms` and
//! `--attempt-timeout-ms` bound each request and each attempt, `--limit` caps concurrency
//! (or finds the cap itself with `adaptive`), `--retry N` allows N attempts of idempotent
//! requests within a budget, `--hedge` hedges them after the 95th percentile latency, and
//! `--metrics ADDR` serves Prometheus text at `http://ADDR/metrics`.
//!
//! It forwards method, path, query, headers (minus hop-by-hop ones) and body to the
//! upstream, streams responses that are not stored, answers from the cache what RFC 9111
//! allows a shared cache to answer, and reports each decision in `Cache-Status`. It prints
//! `listening on ADDR` once it accepts connections.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{HeaderName, CONNECTION, HOST};
use http::uri::{Authority, Scheme};
use http::{HeaderMap, Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service};
use towerguard::http::{BufferedBody, HttpCacheLayer};
use towerguard::stack::StackBuilder;

/// Hop-by-hop fields (RFC 9110 section 7.6.1), never forwarded.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    // The body is re-framed hop by hop.
    headers.remove(http::header::TRANSFER_ENCODING);
}

/// Sends requests to the upstream: rewrites the target, strips hop-by-hop fields.
struct Forward<B> {
    client: Client<HttpConnector, B>,
    scheme: Scheme,
    authority: Authority,
}

impl<B> Clone for Forward<B> {
    fn clone(&self) -> Self {
        Forward {
            client: self.client.clone(),
            scheme: self.scheme.clone(),
            authority: self.authority.clone(),
        }
    }
}

impl<B> Service<Request<B>> for Forward<B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<Incoming>;
    type Error = hyper_util::client::legacy::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response<Incoming>, Self::Error>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::<Request<B>>::poll_ready(&mut self.client, cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let path_and_query = req
            .uri()
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_owned();
        let uri = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build();
        if let Ok(uri) = uri {
            *req.uri_mut() = uri;
        }
        strip_hop_by_hop(req.headers_mut());
        if let Ok(host) = self.authority.as_str().parse() {
            req.headers_mut().insert(HOST, host);
        }
        let call = self.client.request(req);
        Box::pin(async move {
            let mut response = call.await?;
            strip_hop_by_hop(response.headers_mut());
            // Answer in the version of the client's connection, not the upstream's.
            *response.version_mut() = http::Version::HTTP_11;
            Ok(response)
        })
    }
}

type Proxy = BoxCloneSyncService<Request<Incoming>, Response<BufferedBody<Incoming>>, Infallible>;

struct Args {
    listen: SocketAddr,
    upstream: Uri,
    cache: bool,
    capacity_mb: u64,
    max_body_kb: usize,
    timeout_ms: Option<u64>,
    attempt_timeout_ms: Option<u64>,
    limit: Option<String>,
    retry: u32,
    hedge: bool,
    metrics: Option<SocketAddr>,
}

fn parse_args() -> Result<Args, String> {
    let usage = "usage: proxy --listen ADDR --upstream http://HOST:PORT [--no-cache] [--cache-capacity-mb N] [--max-body-kb N] [--timeout-ms N] [--attempt-timeout-ms N] [--limit N|adaptive] [--retry N] [--hedge] [--metrics ADDR]";
    let mut listen = None;
    let mut upstream = None;
    let mut args = Args {
        listen: "127.0.0.1:8080".parse().expect("valid address"),
        upstream: Uri::from_static("http://127.0.0.1:8000"),
        cache: true,
        capacity_mb: 64,
        max_body_kb: 1024,
        timeout_ms: None,
        attempt_timeout_ms: None,
        limit: None,
        retry: 1,
        hedge: false,
        metrics: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| format!("{arg} needs a value\n{usage}"))
        };
        match arg.as_str() {
            "--listen" => listen = Some(value()?),
            "--upstream" => upstream = Some(value()?),
            "--no-cache" => args.cache = false,
            "--cache-capacity-mb" => {
                args.capacity_mb = value()?
                    .parse()
                    .map_err(|e| format!("--cache-capacity-mb: {e}"))?
            }
            "--max-body-kb" => {
                args.max_body_kb = value()?
                    .parse()
                    .map_err(|e| format!("--max-body-kb: {e}"))?
            }
            "--timeout-ms" => {
                args.timeout_ms = Some(value()?.parse().map_err(|e| format!("--timeout-ms: {e}"))?)
            }
            "--attempt-timeout-ms" => {
                args.attempt_timeout_ms = Some(
                    value()?
                        .parse()
                        .map_err(|e| format!("--attempt-timeout-ms: {e}"))?,
                )
            }
            "--limit" => args.limit = Some(value()?),
            "--retry" => args.retry = value()?.parse().map_err(|e| format!("--retry: {e}"))?,
            "--hedge" => args.hedge = true,
            "--metrics" => {
                let addr = value()?;
                args.metrics = Some(addr.parse().map_err(|e| format!("--metrics {addr}: {e}"))?)
            }
            "--help" | "-h" => return Err(usage.to_owned()),
            other => return Err(format!("unknown argument {other}\n{usage}")),
        }
    }
    if let Some(listen) = listen {
        args.listen = listen
            .parse()
            .map_err(|e| format!("--listen {listen}: {e}"))?;
    }
    if let Some(upstream) = upstream {
        args.upstream = upstream
            .parse()
            .map_err(|e| format!("--upstream {upstream}: {e}"))?;
    }
    if args.upstream.scheme() != Some(&Scheme::HTTP) || args.upstream.authority().is_none() {
        return Err(format!("--upstream must be http://HOST:PORT\n{usage}"));
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    let metrics = args.metrics.map(|addr| {
        let handle = PrometheusBuilder::new()
            .install_recorder()
            .unwrap_or_else(|err| {
                eprintln!("cannot install the metrics recorder: {err}");
                std::process::exit(1);
            });
        (addr, handle)
    });
    let forward = Forward {
        client: Client::builder(TokioExecutor::new()).build_http(),
        scheme: Scheme::HTTP,
        authority: args.upstream.authority().cloned().expect("checked above"),
    };
    let mut builder = StackBuilder::new()
        .name("proxy")
        .without_total_timeout()
        .without_attempt_timeout()
        .without_limit()
        .retry_attempts(args.retry)
        .max_replay_body(args.max_body_kb * 1024);
    if let Some(ms) = args.timeout_ms {
        builder = builder.total_timeout(Duration::from_millis(ms));
    }
    if let Some(ms) = args.attempt_timeout_ms {
        builder = builder.attempt_timeout(Duration::from_millis(ms));
    }
    match args.limit.as_deref() {
        None => {}
        Some("adaptive") => builder = builder.adaptive_limit(32, 4, 1_000),
        Some(n) => match n.parse() {
            Ok(n) => builder = builder.static_limit(n),
            Err(_) => {
                eprintln!("--limit takes a number or `adaptive`");
                std::process::exit(2);
            }
        },
    }
    if args.hedge {
        builder = builder.hedge_adaptive();
    }
    if args.cache {
        builder = builder.http_cache(
            HttpCacheLayer::builder()
                .name("proxy")
                .capacity_bytes(args.capacity_mb * 1024 * 1024)
                .max_body_bytes(args.max_body_kb * 1024)
                .build(),
        );
    }
    let stack = builder.build_http::<Incoming>().unwrap_or_else(|err| {
        eprintln!("invalid configuration: {err}");
        std::process::exit(2);
    });
    let proxy: Proxy = stack.layer(forward);
    if let Some((addr, handle)) = metrics {
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || std::future::ready(handle.render())),
        );
        let listener = tokio::net::TcpListener::bind(addr).await?;
        println!("metrics on http://{}/metrics", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
    }
    let proxy = Arc::new(proxy);

    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let service = TowerToHyperService::new((*proxy).clone());
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            if let Err(err) = connection.await {
                eprintln!("connection error: {err}");
            }
        });
    }
}
