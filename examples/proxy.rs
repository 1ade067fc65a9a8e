//! A caching reverse proxy: towerguard's RFC 9111 shared cache and resilience stack in front
//! of any HTTP server.
//!
//! ```text
//! cargo run --release --example proxy -- --listen localhost:8080 --upstream http://127.0.0.1:8000
//! cargo run --release --example proxy -- --help
//! ```
//!
//! It serves HTTP/1.1 and HTTP/2 over cleartext (h2c, prior knowledge) on one port and
//! forwards to an HTTP/1.1 upstream (optionally under a path prefix, `--upstream
//! http://host:port/base`; the upstream's `Location` and `Content-Location` under it are
//! mapped back to the client's paths). It answers from the cache what RFC 9111 allows a
//! shared cache to answer and reports each decision in `Cache-Status`; everything else is
//! streamed. The cache keys on the URL as the client named it, `Host` included (see
//! `Forward`).
//!
//! As a proxy (RFC 9110 section 7.6) it removes the hop-by-hop fields in both directions
//! (`Connection` and every field it lists, `Keep-Alive`, `Proxy-Connection`, `TE`,
//! `Trailer`, `Transfer-Encoding`, `Upgrade`, `Proxy-Authenticate`,
//! `Proxy-Authorization`), adds itself to `Via` both ways, and appends the client's
//! address to `X-Forwarded-For`. An HTTP/1.1 request to switch protocols (`Upgrade` listed
//! in `Connection`: a WebSocket handshake) goes to the upstream with those two fields, past
//! the cache and the resilience layers; when the upstream answers 101, the proxy copies
//! bytes both ways until either side closes (see `Tunnel`). A request body that comes without a length (chunked, or
//! HTTP/2 without `content-length`) is read whole before it is forwarded, up to
//! `--max-body-kb`, and sent with a `Content-Length`, as nginx does: origins that read
//! only `Content-Length` get it, and a slow upload holds no `--limit` slot while it
//! arrives (with `--timeout-ms`, one still arriving after it gets 408). Request headers
//! are bounded (`--max-header-kb`; larger ones get 431), upstream connections time out
//! (`--connect-timeout-ms`), client connections are capped (`--max-connections`, lowered
//! by default to what the limit on open files allows; past it, new ones wait to be
//! accepted) and closed when idle (`--idle-timeout-secs`: one that sends nothing,
//! trickles its head, has no request under way, HTTP/2 included, or takes nothing of a
//! response being sent to it), a WebSocket tunnel with no bytes either way too, and each
//! request is logged through `tracing` (method, path,
//! status, cache status, duration; `RUST_LOG` filters, `--no-access-log` turns it off).
//!
//! With `--redis URL` (built with `--features redis`) several proxies share one cache: a
//! response stored by one is a hit on the others, a cold URL goes to the origin once for
//! the whole fleet, and an invalidation (a successful POST, PUT, DELETE or PATCH) reaches
//! every proxy. `benches/proxy_fleet.sh` runs three of them.
//!
//! With `--purge-token TOKEN`, a `PURGE` request carrying `Authorization: Bearer TOKEN`
//! drops the URL it names from the cache (or, with a `Cache-Tag` or `Surrogate-Key`
//! header, the responses tagged so), on every proxy of a fleet:
//!
//! ```text
//! curl -X PURGE -H 'Authorization: Bearer TOKEN' http://localhost:8080/page
//! curl -X PURGE -H 'Authorization: Bearer TOKEN' -H 'Cache-Tag: product-42' http://localhost:8080/
//! ```
//!
//! On SIGTERM or Ctrl-C it stops accepting connections, lets the requests under way
//! finish (up to `--shutdown-grace-secs`), and exits 0; it prints `listening on ADDR` once
//! it accepts connections and `stopped` when it is done.

mod common;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http::header::{
    HeaderName, HeaderValue, AUTHORIZATION, CONNECTION, CONTENT_LENGTH, CONTENT_LOCATION, HOST,
    LOCATION, TRANSFER_ENCODING, UPGRADE, VIA, WWW_AUTHENTICATE,
};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body, Incoming};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::util::{BoxCloneSyncService, Either};
use tower::{Layer, Service, ServiceExt};
use towerguard::http::cache_policy::{primary_key, HttpCachePolicy};
use towerguard::http::{BufferedBody, HttpCacheLayer, PermitBody, CACHE_STATUS};
use towerguard::limit::adaptive::Aimd;
use towerguard::limit::{ConcurrencyLimitLayer, QueueDiscipline};
use towerguard::stack::StackBuilder;

/// A caching reverse proxy built from towerguard's layers.
#[derive(Parser, Debug)]
#[command(name = "proxy", version)]
struct Args {
    /// Address to listen on (a host name such as `localhost:8080` is resolved).
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "HOST:PORT")]
    listen: String,

    /// The server to forward to: `http://HOST:PORT`, optionally with a path prefix
    /// (`http://HOST:PORT/base` sends `/x` to `/base/x`).
    #[arg(long, default_value = "http://127.0.0.1:8000", value_name = "URL", value_parser = parse_upstream)]
    upstream: Upstream,

    /// Turn the HTTP cache off (the resilience layers stay).
    #[arg(long)]
    no_cache: bool,

    /// Memory for stored responses, in MiB.
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    cache_capacity_mb: u64,

    /// Largest response body stored (larger ones are streamed, not stored), and largest
    /// request body read ahead, for retries and to send a body that came without a
    /// length (chunked) with a `Content-Length` (larger ones go on chunked), in KiB.
    #[arg(long, default_value_t = 1024, value_name = "KIB")]
    max_body_kb: usize,

    /// Serve a stale response up to this many seconds past its freshness when the
    /// upstream is unreachable or answers 500/502/503/504 (never when the response
    /// forbids it). 0 turns it off.
    #[arg(long, default_value_t = 0, value_name = "SECS")]
    stale_on_error_secs: u64,

    /// Ignore clients' own Cache-Control (a reload's `max-age=0`, `no-cache`), so clients
    /// cannot force upstream load.
    #[arg(long)]
    cdn_mode: bool,

    /// Ignore the upstream's `CDN-Cache-Control` (RFC 9213) and `Surrogate-Control`: by
    /// default the proxy reads them instead of `Cache-Control`, removes
    /// `Surrogate-Control` from responses, and sends `Surrogate-Capability` upstream.
    #[arg(long)]
    ignore_targeted_fields: bool,

    /// Pass the upstream's `Cache-Tag` and `Surrogate-Key` on to clients (by default they
    /// are kept for invalidation and removed from responses).
    #[arg(long)]
    keep_tag_headers: bool,

    /// Accept `PURGE` requests carrying `Authorization: Bearer TOKEN`: `PURGE /path`
    /// removes that URL's stored responses; with a `Cache-Tag` (comma-separated) or
    /// `Surrogate-Key` (space-separated) header, the responses tagged so instead. With
    /// `--redis`, on every proxy of the fleet. Without this option `PURGE` is forwarded
    /// like any other method.
    #[arg(long, value_name = "TOKEN")]
    purge_token: Option<String>,

    /// Bound on each request, end to end, in milliseconds (none when not given).
    #[arg(long, value_name = "MS")]
    timeout_ms: Option<u64>,

    /// Bound on each attempt at the upstream, in milliseconds (none when not given).
    #[arg(long, value_name = "MS")]
    attempt_timeout_ms: Option<u64>,

    /// Cap on requests at the upstream at once: a number, or `adaptive` (AIMD between 4
    /// and 1000); no cap when not given. A request holds its slot until the upstream's
    /// response body has been sent on (at most 60 s), each retry and hedge attempt one of
    /// its own; up to 256 more wait (CoDel, at most 100 ms), the rest get 503.
    #[arg(long, value_name = "N|adaptive", value_parser = parse_limit)]
    limit: Option<Limit>,

    /// Retries of idempotent requests after a failure or a retryable status (0: none),
    /// within a budget of 20% of requests (plus 10 per second).
    #[arg(long, default_value_t = 0, value_name = "N")]
    retry: u32,

    /// Hedge idempotent requests after the upstream's 95th percentile latency.
    #[arg(long)]
    hedge: bool,

    /// Time to connect to the upstream, in milliseconds.
    #[arg(long, default_value_t = 2_000, value_name = "MS")]
    connect_timeout_ms: u64,

    /// Largest header section accepted, in KiB: a larger request gets 431, a larger
    /// response from the upstream becomes 502.
    #[arg(long, default_value_t = 64, value_name = "KIB")]
    max_header_kb: usize,

    /// How long requests under way may take to finish after SIGTERM or Ctrl-C.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    shutdown_grace_secs: u64,

    /// How long a client connection may sit idle, between requests or before its request
    /// head has arrived whole (HTTP/1.1), or take nothing of a response being sent to it
    /// (a client that stopped reading), before it is closed, in seconds. A WebSocket
    /// tunnel with no bytes either way for this long is closed too.
    #[arg(long, default_value_t = 60, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    idle_timeout_secs: u64,

    /// Client connections open at once; past it, new ones wait in the listen backlog until
    /// one closes. It bounds what clients can make the proxy hold (each connection may
    /// have a request body of up to `--max-body-kb` read ahead). By default 10,000, or
    /// fewer when the limit on open files (`ulimit -n`) would not allow that many: two
    /// descriptors per connection (the client's and its upstream connection), 64 kept for
    /// the rest.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: Option<u32>,

    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "HOST:PORT")]
    metrics: Option<SocketAddr>,

    /// Do not log a line per request.
    #[arg(long)]
    no_access_log: bool,

    /// Share the cache with every proxy given the same Redis (or Valkey): a second tier,
    /// one origin request per URL for the whole fleet, and invalidations (a POST, say)
    /// reaching every proxy. Needs the `redis` feature (`--features redis`). The URL is
    /// `redis://[:PASSWORD@]HOST:PORT[/DB]` (TLS, `rediss://`, is not built in). It is
    /// tried at start: a refused password stops the proxy; a Redis not reachable yet only
    /// gets a warning.
    #[arg(long, value_name = "URL")]
    redis: Option<String>,

    /// Prefix of the proxy's keys and channel in Redis; proxies that share a cache use
    /// the same one.
    #[arg(long, default_value = "towerguard:proxy:", value_name = "PREFIX")]
    redis_prefix: String,

    /// Bound on each Redis operation, in milliseconds; a slower one counts as a miss.
    #[arg(long, default_value_t = 50, value_name = "MS")]
    redis_timeout_ms: u64,

    /// Length of the lease one proxy holds on a URL while it fetches it for the fleet,
    /// in milliseconds (renewed while the fetch runs; 0 turns fleet-wide coalescing off).
    #[arg(long, default_value_t = 5_000, value_name = "MS")]
    redis_lease_ms: u64,

    /// How long the other proxies wait for that fetch before fetching themselves, in
    /// milliseconds.
    #[arg(long, default_value_t = 30_000, value_name = "MS")]
    redis_lease_wait_ms: u64,
}

#[derive(Debug, Clone)]
struct Upstream {
    authority: Authority,
    /// The path prefix, without a trailing `/` (empty for none).
    prefix: String,
}

fn parse_upstream(value: &str) -> Result<Upstream, String> {
    let uri: Uri = value
        .parse()
        .map_err(|e| format!("not a URL ({e}); expected http://HOST:PORT[/PREFIX]"))?;
    match uri.scheme() {
        Some(scheme) if *scheme == Scheme::HTTP => {}
        Some(scheme) => {
            return Err(format!(
                "the {scheme} scheme is not supported; this proxy speaks http:// to its upstream"
            ))
        }
        None => return Err("expected http://HOST:PORT[/PREFIX]".to_owned()),
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or("expected http://HOST:PORT[/PREFIX]")?;
    if uri.query().is_some() {
        return Err("a query in the upstream URL is not supported".to_owned());
    }
    let prefix = uri.path().trim_end_matches('/').to_owned();
    Ok(Upstream { authority, prefix })
}

impl Upstream {
    /// The URL a request for `uri` is fetched from: the upstream's scheme and authority,
    /// the prefix, then the request's path and query (an absolute-form target's own
    /// authority is ignored).
    fn target(&self, uri: &Uri) -> Option<Uri> {
        let path_and_query = uri.path_and_query().map_or("/", PathAndQuery::as_str);
        Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.authority.clone())
            .path_and_query(format!("{}{path_and_query}", self.prefix))
            .build()
            .ok()
    }

    /// Rewrites `Location` and `Content-Location` from the upstream's URL space into the
    /// client's, as nginx's `proxy_redirect default` does: `http://UPSTREAM/PREFIX/x` and
    /// `/PREFIX/x` become `/x`. Other values (another host, a path outside the prefix, a
    /// relative reference) are left as they are. Done under the cache, so what it stores
    /// and the invalidations an unsafe request's `Location` makes are in the client's
    /// URL space too, as its keys are.
    fn relocate(&self, headers: &mut HeaderMap) {
        for name in [LOCATION, CONTENT_LOCATION] {
            let Some(value) = headers.get(&name).and_then(|v| v.to_str().ok()) else {
                continue;
            };
            if let Some(local) = self.local_path(value).and_then(|p| p.parse().ok()) {
                headers.insert(name, local);
            }
        }
    }

    /// The client's path for a URL of the upstream's, if `url` is one.
    fn local_path<'a>(&self, url: &'a str) -> Option<&'a str> {
        let upstream_path = match url.get(..7) {
            Some(scheme) if scheme.eq_ignore_ascii_case("http://") => {
                let rest = &url[7..];
                let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
                if !rest[..end].eq_ignore_ascii_case(self.authority.as_str()) {
                    return None;
                }
                &rest[end..]
            }
            _ if url.starts_with('/') && !url.starts_with("//") => {
                if self.prefix.is_empty() {
                    // Already the client's path.
                    return None;
                }
                url
            }
            _ => return None,
        };
        let rest = upstream_path.strip_prefix(self.prefix.as_str())?;
        match rest.as_bytes().first() {
            None => Some("/"),
            Some(b'/') => Some(rest),
            // `/basement` is not under the prefix `/base`; `/base?x` is left as it is.
            Some(_) => None,
        }
    }

    /// The upstream's authority as a `Host` field value.
    fn host(&self) -> Option<HeaderValue> {
        HeaderValue::from_str(self.authority.as_str()).ok()
    }
}

#[derive(Debug, Clone, Copy)]
enum Limit {
    Static(usize),
    Adaptive,
}

fn parse_limit(value: &str) -> Result<Limit, String> {
    if value == "adaptive" {
        return Ok(Limit::Adaptive);
    }
    match value.parse::<usize>() {
        Ok(0) => Err("a limit of 0 would refuse every request".to_owned()),
        Ok(n) => Ok(Limit::Static(n)),
        Err(_) => Err("expected a number or `adaptive`".to_owned()),
    }
}

/// Hop-by-hop fields (RFC 9110 section 7.6.1), never forwarded.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The options `Connection` lists (names of fields, or `close`, `upgrade`, ...).
fn connection_options(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// Removes the hop-by-hop fields: the fixed ones and every field `Connection` lists.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = connection_options(headers)
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Adds this proxy to `Via` (RFC 9110 section 7.6.3) for a message of `version`.
fn add_via(headers: &mut HeaderMap, version: Version) {
    let protocol = match version {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "1.1",
    };
    if let Ok(value) = HeaderValue::from_str(&format!("{protocol} towerguard")) {
        headers.append(VIA, value);
    }
}

/// What the proxy changes in a message between the client and the upstream (RFC 9110
/// section 7.6): toward the upstream the target ([`Upstream::target`]), `Host` and the
/// version (HTTP/1.1); both ways, hop-by-hop fields removed and `Via` added; back from it,
/// `Location` and `Content-Location` mapped to the client's paths.
#[derive(Clone)]
struct Rewrite {
    upstream: Arc<Upstream>,
    /// The upstream's authority as the `Host` every forwarded request carries.
    host: Option<HeaderValue>,
}

impl Rewrite {
    fn request<B>(&self, req: &mut Request<B>) {
        if let Some(target) = self.upstream.target(req.uri()) {
            *req.uri_mut() = target;
        }
        let version = req.version();
        let headers = req.headers_mut();
        strip_hop_by_hop(headers);
        add_via(headers, version);
        if let Some(host) = &self.host {
            headers.insert(HOST, host.clone());
        }
        // The upstream connection is HTTP/1.1 whatever the client spoke.
        *req.version_mut() = Version::HTTP_11;
    }

    /// The headers of a response that came in `version`.
    fn response(&self, headers: &mut HeaderMap, version: Version) {
        strip_hop_by_hop(headers);
        add_via(headers, version);
        self.upstream.relocate(headers);
    }
}

/// Sends requests to the upstream, rewritten ([`Rewrite`]), and refuses a response whose
/// header section is larger than `max_header_bytes` (the client's read buffer alone lets
/// a head of several times its size through when it arrives in one read).
///
/// It rewrites them here, under the cache, so the cache keys on the URL as the client
/// named it, `Host` included, as Varnish does: an origin that tells sites apart by a
/// forwarded host (`X-Forwarded-Host`, set by a load balancer in front) cannot have one
/// site's responses served to another's clients. Behind one load balancer every proxy
/// of a fleet sees the same `Host` and shares the entries.
struct Forward<B> {
    client: Client<HttpConnector, B>,
    rewrite: Rewrite,
    max_header_bytes: usize,
}

impl<B> Clone for Forward<B> {
    fn clone(&self) -> Self {
        Forward {
            client: self.client.clone(),
            rewrite: self.rewrite.clone(),
            max_header_bytes: self.max_header_bytes,
        }
    }
}

/// The upstream answered with a header section over `--max-header-kb`.
#[derive(Debug)]
struct ResponseHeadTooLarge {
    bytes: usize,
    max: usize,
}

impl std::fmt::Display for ResponseHeadTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the upstream's response header section has {} bytes, over the {} of --max-header-kb",
            self.bytes, self.max
        )
    }
}

impl std::error::Error for ResponseHeadTooLarge {}

/// The size of a header section as sent: each field's name, value, `: ` and CRLF.
fn header_section_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum()
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<B> Service<Request<B>> for Forward<B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<Incoming>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<Incoming>, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::<Request<B>>::poll_ready(&mut self.client, cx).map_err(BoxError::from)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        self.rewrite.request(&mut req);
        let call = self.client.request(req);
        let max = self.max_header_bytes;
        let rewrite = self.rewrite.clone();
        Box::pin(async move {
            let mut response = call.await?;
            let bytes = header_section_bytes(response.headers());
            if bytes > max {
                return Err(ResponseHeadTooLarge { bytes, max }.into());
            }
            let version = response.version();
            rewrite.response(response.headers_mut(), version);
            // Answered in HTTP/1.1 (or the client's HTTP/2), whatever the upstream spoke.
            *response.version_mut() = Version::HTTP_11;
            Ok(response)
        })
    }
}

/// True when `req` asks to switch protocols (a WebSocket handshake, say): an HTTP/1.1
/// request with `Upgrade` that `Connection` lists.
fn wants_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(UPGRADE)
        && connection_options(req.headers()).any(|option| option.eq_ignore_ascii_case("upgrade"))
}

/// Carries an upgrade (a WebSocket, say) to the upstream and, when it switches protocols,
/// copies bytes both ways until either side closes, as nginx does with `proxy_pass` and
/// `Upgrade` passed on. A tunnel bypasses the cache and the resilience layers: it is not
/// stored, retried, hedged or timed, and it holds no `--limit` slot. It keeps its client
/// connection's `--max-connections` slot until it closes; a shutdown closes it.
#[derive(Clone)]
struct Tunnel {
    client: Client<HttpConnector, ClientBody>,
    rewrite: Rewrite,
    /// A tunnel with no byte either way for this long is closed (`--idle-timeout-secs`).
    idle: Duration,
}

/// Puts back the two fields that carry an upgrade, which [`Rewrite`] removes as hop-by-hop.
fn keep_upgrade(headers: &mut HeaderMap, protocol: Option<HeaderValue>) {
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(protocol) = protocol {
        headers.insert(UPGRADE, protocol);
    }
}

impl Tunnel {
    /// Opens the tunnel for `req`; its copying runs in a task whose handle goes to the
    /// connection's `activity`, so the connection's slot is held until it ends.
    async fn open(
        self,
        mut req: Request<Incoming>,
        activity: Arc<Activity>,
    ) -> Response<BufferedBody<UpstreamBody>> {
        let from_client = hyper::upgrade::on(&mut req);
        let protocol = req.headers().get(UPGRADE).cloned();
        self.rewrite.request(&mut req);
        keep_upgrade(req.headers_mut(), protocol);
        let req = req.map(|body| BufferedBody::streaming(VecDeque::new(), Some(body)));
        let mut response = match self.client.request(req).await {
            Ok(response) => response,
            Err(err) => {
                tracing::warn!(error = %err, "upgrade: the upstream cannot be reached");
                return text(StatusCode::BAD_GATEWAY, "the upstream cannot be reached\n");
            }
        };
        let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        // The upstream's own answer (it refused the upgrade): passed on as any other.
        let mut head = Response::new(BufferedBody::empty());
        *head.status_mut() = response.status();
        *head.headers_mut() = response.headers().clone();
        let headers = head.headers_mut();
        let protocol = headers.get(UPGRADE).cloned();
        self.rewrite.response(headers, response.version());
        if switched {
            // `Connection: upgrade` and `Upgrade` are this hop's to pass on now.
            keep_upgrade(headers, protocol);
        }
        if !switched {
            let body = response.into_body();
            let body =
                BufferedBody::streaming(VecDeque::new(), Some(PermitBody::without_permit(body)));
            return head.map(|_| body);
        }
        let from_upstream = hyper::upgrade::on(&mut response);
        let idle = self.idle;
        let copying = tokio::spawn(async move {
            let (client, upstream) = match tokio::join!(from_client, from_upstream) {
                (Ok(client), Ok(upstream)) => (client, upstream),
                (Err(err), _) | (_, Err(err)) => {
                    tracing::debug!(error = %err, "upgrade: a side went away before switching");
                    return;
                }
            };
            // Bytes either way keep it open; a peer gone without a word (a half-open
            // connection) or a quiet one closes it after the idle timeout, as nginx's
            // `proxy_read_timeout` does.
            let seen = Activity::new();
            let mut client = Watched::both_ways(TokioIo::new(client), seen.clone());
            let mut upstream = Watched::both_ways(TokioIo::new(upstream), seen.clone());
            tokio::select! {
                copied = tokio::io::copy_bidirectional(&mut client, &mut upstream) => match copied {
                    Ok((up, down)) => tracing::debug!(up, down, "upgrade: tunnel closed"),
                    Err(err) => tracing::debug!(error = %err, "upgrade: tunnel ended with an error"),
                },
                _ = seen.quiet(idle) => tracing::debug!("upgrade: tunnel closed, idle"),
            }
        });
        *activity.tunnel.lock().unwrap_or_else(|p| p.into_inner()) = Some(copying);
        head
    }
}

/// The upstream's response body, holding the `--limit` slot until it ends.
type UpstreamBody = PermitBody<Incoming>;

/// A client's request body as the proxy passes it on: read ahead when it came without a
/// length ([`with_length`]), as it arrives otherwise.
type ClientBody = BufferedBody<Incoming>;

type Proxy =
    BoxCloneSyncService<Request<ClientBody>, Response<BufferedBody<UpstreamBody>>, Infallible>;

/// True when a request's body has no length the upstream could be told: chunked over
/// HTTP/1.1, or HTTP/2 without `content-length`.
fn has_unknown_length(req: &Request<Incoming>) -> bool {
    !req.headers().contains_key(CONTENT_LENGTH)
        && !req.body().is_end_stream()
        && req.body().size_hint().exact().is_none()
}

/// Reads a request body that came without a length ahead, up to `max` bytes, as nginx's
/// request buffering does: one that ends within the bound goes on with a
/// `Content-Length`, so an origin that reads only `Content-Length` (Python's
/// `http.server`, for one) gets it, and the upstream's `--limit` slot is not held while a
/// slow client uploads. A longer one goes on chunked: what was read, then the rest. A
/// body the client breaks off gets 400, and one still arriving after `--timeout-ms`
/// (the bound on the whole request, when given) 408.
async fn with_length(
    req: Request<Incoming>,
    read_ahead: ReadAhead,
) -> Result<Request<ClientBody>, Response<BufferedBody<UpstreamBody>>> {
    match read_ahead.within {
        Some(within) => match tokio::time::timeout(within, read_body(req, read_ahead.max)).await {
            Ok(read) => read,
            Err(_) => Err(text(
                http::StatusCode::REQUEST_TIMEOUT,
                "the request body took longer than --timeout-ms\n",
            )),
        },
        None => read_body(req, read_ahead.max).await,
    }
}

/// How much of a body without a length is read ahead, and for how long at most.
#[derive(Debug, Clone, Copy)]
struct ReadAhead {
    max: usize,
    within: Option<Duration>,
}

/// [`with_length`]'s reading, without its time bound.
async fn read_body(
    req: Request<Incoming>,
    max: usize,
) -> Result<Request<ClientBody>, Response<BufferedBody<UpstreamBody>>> {
    let (mut parts, body) = req.into_parts();
    let body = match BufferedBody::read_ahead(body, max).await {
        Ok(body) => body,
        Err(err) => {
            tracing::debug!(error = %err, "the client's request body failed");
            return Err(text(
                http::StatusCode::BAD_REQUEST,
                "the request body ended early\n",
            ));
        }
    };
    if body.is_replayable() {
        if let Some(length) = body.size_hint().exact() {
            parts.headers.remove(TRANSFER_ENCODING);
            parts
                .headers
                .insert(CONTENT_LENGTH, HeaderValue::from(length));
        }
    }
    Ok(Request::from_parts(parts, body))
}

/// What a request goes on to: the proxy at once, or after its body is read ahead.
enum Call {
    Now(<Proxy as Service<Request<ClientBody>>>::Future),
    Upgrade(Box<Request<Incoming>>),
    AfterBody {
        proxy: Proxy,
        // Boxed: the path is rare, and the future every request carries stays small.
        req: Box<Request<Incoming>>,
        read_ahead: ReadAhead,
    },
}

/// Answers `PURGE` requests from the cache: built when `--purge-token` is given.
#[derive(Clone)]
struct Purger {
    cache: HttpCacheLayer,
    /// What `Authorization: Bearer TOKEN` must carry.
    token: Arc<[u8]>,
}

impl Purger {
    fn is_purge(req: &Request<Incoming>) -> bool {
        req.method().as_str() == "PURGE"
    }

    /// Whether the request carries the token (the scheme's case does not matter; the
    /// token is compared without stopping at the first difference).
    fn authorised(&self, req: &Request<Incoming>) -> bool {
        let Some(given) = req.headers().get(AUTHORIZATION).map(HeaderValue::as_bytes) else {
            return false;
        };
        let Some((scheme, token)) = given.split_at_checked(7) else {
            return false;
        };
        scheme.eq_ignore_ascii_case(b"bearer ")
            && token.len() == self.token.len()
            && token
                .iter()
                .zip(self.token.iter())
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0
    }

    /// The tags a `Cache-Tag` or `Surrogate-Key` field names, if the request has one.
    fn tags(req: &Request<Incoming>) -> Vec<String> {
        let mut tags = Vec::new();
        for (name, separator) in [("cache-tag", ','), ("surrogate-key", ' ')] {
            for value in req.headers().get_all(name) {
                let Ok(value) = value.to_str() else { continue };
                tags.extend(
                    value
                        .split(separator)
                        .map(str::trim)
                        .filter(|t| !t.is_empty())
                        .map(str::to_owned),
                );
            }
        }
        tags
    }

    async fn purge(self, req: Request<Incoming>) -> Response<BufferedBody<UpstreamBody>> {
        if !self.authorised(&req) {
            tracing::warn!(target: "purge", path = req.uri().path(), "purge refused: wrong or missing token");
            let mut response = text(
                http::StatusCode::UNAUTHORIZED,
                "purge: wrong or missing token\n",
            );
            response
                .headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
        let tags = Purger::tags(&req);
        if !tags.is_empty() {
            for tag in &tags {
                self.purge_tag(tag).await;
            }
            tracing::info!(target: "purge", tags = tags.join(", "), "purged by tag");
            return text(
                http::StatusCode::OK,
                &format!("purged tags: {}\n", tags.join(", ")),
            );
        }
        let host = req.headers().get(HOST).and_then(|h| h.to_str().ok());
        match primary_key(&http::Method::GET, req.uri(), host) {
            Some(key) => {
                self.purge_key(&key).await;
                tracing::info!(target: "purge", key, "purged");
                text(http::StatusCode::OK, &format!("purged: {key}\n"))
            }
            None => text(http::StatusCode::BAD_REQUEST, "purge: no URL to purge\n"),
        }
    }

    /// Drops one URL: fleet-wide, waiting for Redis, with the `redis` feature.
    async fn purge_key(&self, key: &str) {
        #[cfg(feature = "redis")]
        self.cache.purge(key).await;
        #[cfg(not(feature = "redis"))]
        self.cache.invalidate(key);
    }

    /// Drops one tag's responses, as [`purge_key`](Self::purge_key) does a URL.
    async fn purge_tag(&self, tag: &str) {
        #[cfg(feature = "redis")]
        self.cache.purge_tag(tag).await;
        #[cfg(not(feature = "redis"))]
        self.cache.invalidate_tag(tag);
    }
}

/// A short plain-text answer made by the proxy itself.
fn text(status: http::StatusCode, body: &str) -> Response<BufferedBody<UpstreamBody>> {
    let mut response = Response::new(BufferedBody::complete(Bytes::copy_from_slice(
        body.as_bytes(),
    )));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// What a connection's idle watchdog reads: the requests under way on it, the response
/// bodies waiting for their client to take what they handed on, and when anything last
/// happened.
struct Activity {
    under_way: AtomicUsize,
    /// Response bodies that handed hyper a frame and have not been asked for the next one
    /// since: hyper asks again once the client has taken enough of what it was sent.
    unread: AtomicUsize,
    /// When a request started or ended, a response body handed on a frame, or bytes went
    /// out (or the connection opened).
    last: Mutex<Instant>,
    /// The tunnel an upgrade opened, which outlives the HTTP connection.
    tunnel: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// A request under way on a connection, until it is dropped (with its response's body).
struct Busy(Arc<Activity>);

/// Why the watchdog closes a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quiet {
    /// No request under way.
    Idle,
    /// A response is ready to go on but the client takes none of it (it stopped
    /// reading), as nginx's `send_timeout` finds.
    Stalled,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Activity {
            under_way: AtomicUsize::new(0),
            unread: AtomicUsize::new(0),
            last: Mutex::new(Instant::now()),
            tunnel: Mutex::new(None),
        })
    }

    fn start(self: &Arc<Self>) -> Busy {
        self.touch();
        self.under_way.fetch_add(1, Ordering::SeqCst);
        Busy(self.clone())
    }

    fn touch(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    /// How long the connection has been quiet, and in which way; `None` while it is
    /// waiting for the upstream (bounded by `--timeout-ms`) or sending.
    fn quiet_for(&self) -> Option<(Quiet, Duration)> {
        let last = *self.last.lock().unwrap_or_else(|p| p.into_inner());
        if self.under_way.load(Ordering::SeqCst) == 0 {
            Some((Quiet::Idle, last.elapsed()))
        } else if self.unread.load(Ordering::SeqCst) > 0 {
            Some((Quiet::Stalled, last.elapsed()))
        } else {
            None
        }
    }

    /// Resolves once the connection has been idle, or its client has taken nothing of a
    /// response ready for it, for `limit`.
    async fn quiet(&self, limit: Duration) -> Quiet {
        loop {
            let wait = match self.quiet_for() {
                Some((quiet, since)) if since >= limit => return quiet,
                Some((_, since)) => limit - since,
                None => limit,
            };
            tokio::time::sleep(wait).await;
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        // The time first: the watchdog never sees no request under way with an old time.
        self.0.touch();
        self.0.under_way.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its request counted as under way on its connection until
/// it ends or is dropped (a download still being sent is not idle), and tells the
/// watchdog while the frame it handed on waits for the client.
struct Tracked<B> {
    body: B,
    busy: Busy,
    /// Counted in [`Activity::unread`].
    unread: bool,
}

impl<B> Tracked<B> {
    fn new(body: B, busy: Busy) -> Self {
        Tracked {
            body,
            busy,
            unread: false,
        }
    }

    fn taken(&mut self) {
        if std::mem::take(&mut self.unread) {
            self.busy.0.unread.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        // Asked again: the client took what came before.
        self.taken();
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = polled {
            // The client's time to take it starts now, however long the upstream took.
            self.busy.0.touch();
            self.unread = true;
            self.busy.0.unread.fetch_add(1, Ordering::SeqCst);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl<B> Drop for Tracked<B> {
    fn drop(&mut self) {
        self.taken();
    }
}

/// A socket that tells a watchdog each time bytes go out (a client connection: a client
/// that reads slowly still takes some, as nginx's `send_timeout` counts it), or either way
/// (a tunnel).
struct Watched<T> {
    io: T,
    activity: Arc<Activity>,
    reads: bool,
}

impl<T> Watched<T> {
    fn writes(io: T, activity: Arc<Activity>) -> Self {
        Watched {
            io,
            activity,
            reads: false,
        }
    }

    fn both_ways(io: T, activity: Arc<Activity>) -> Self {
        Watched {
            io,
            activity,
            reads: true,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        if self.reads && buf.filled().len() > before {
            self.activity.touch();
        }
        read
    }
}

impl<T: AsyncWrite + Unpin> Watched<T> {
    fn wrote(&self, written: Poll<std::io::Result<usize>>) -> Poll<std::io::Result<usize>> {
        if let Poll::Ready(Ok(n)) = written {
            if n > 0 {
                self.activity.touch();
            }
        }
        written
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        self.wrote(written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.wrote(written)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Per connection: `X-Forwarded-For`, a body without a length read ahead, then the proxy,
/// then the access log line.
#[derive(Clone)]
struct ConnectionService {
    proxy: Proxy,
    purger: Option<Purger>,
    tunnel: Tunnel,
    /// How a request body without a length is read ahead (`--max-body-kb`,
    /// `--timeout-ms`).
    read_ahead: ReadAhead,
    peer: SocketAddr,
    /// The peer's address as a field value, made once per connection.
    peer_value: HeaderValue,
    access_log: bool,
    activity: Arc<Activity>,
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

impl ConnectionService {
    fn new(
        proxy: Proxy,
        purger: Option<Purger>,
        tunnel: Tunnel,
        read_ahead: ReadAhead,
        peer: SocketAddr,
        access_log: bool,
    ) -> Self {
        let peer_value = HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        ConnectionService {
            activity: Activity::new(),
            proxy,
            purger,
            tunnel,
            read_ahead,
            peer,
            peer_value,
            access_log,
        }
    }
}

impl Service<Request<Incoming>> for ConnectionService {
    type Response = Response<Tracked<BufferedBody<UpstreamBody>>>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.proxy.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        let busy = self.activity.start();
        if Purger::is_purge(&req) {
            if let Some(purger) = self.purger.clone() {
                return Box::pin(async move {
                    let response = purger.purge(req).await;
                    Ok(response.map(|body| Tracked::new(body, busy)))
                });
            }
        }
        let headers = req.headers_mut();
        let forwarded = match headers.get(&X_FORWARDED_FOR).map(HeaderValue::as_bytes) {
            Some(earlier) => {
                let mut value = earlier.to_vec();
                value.extend_from_slice(b", ");
                value.extend_from_slice(self.peer_value.as_bytes());
                HeaderValue::from_bytes(&value).ok()
            }
            None => Some(self.peer_value.clone()),
        };
        if let Some(value) = forwarded {
            headers.insert(X_FORWARDED_FOR, value);
        }
        // What the log line needs, taken only when it is written.
        let logged = self.access_log.then(|| {
            (
                req.method().clone(),
                req.uri().path().to_owned(),
                req.version(),
            )
        });
        let call = if wants_upgrade(&req) {
            Call::Upgrade(Box::new(req))
        } else if has_unknown_length(&req) {
            // The readied proxy goes into the future; this connection keeps a clone.
            let clone = self.proxy.clone();
            let proxy = std::mem::replace(&mut self.proxy, clone);
            Call::AfterBody {
                proxy,
                req: Box::new(req),
                read_ahead: self.read_ahead,
            }
        } else {
            let req = req.map(|body| BufferedBody::streaming(VecDeque::new(), Some(body)));
            Call::Now(self.proxy.call(req))
        };
        let peer = self.peer;
        let tunnel = self.tunnel.clone();
        let activity = self.activity.clone();
        Box::pin(async move {
            let start = Instant::now();
            let response = match call {
                Call::Now(call) => call.await?,
                Call::Upgrade(req) => tunnel.open(*req, activity).await,
                Call::AfterBody {
                    mut proxy,
                    req,
                    read_ahead,
                } => match with_length(*req, read_ahead).await {
                    Ok(req) => proxy.call(req).await?,
                    Err(refused) => refused,
                },
            };
            if let Some((method, path, version)) = logged {
                let cache_status = response
                    .headers()
                    .get(&CACHE_STATUS)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                tracing::info!(
                    target: "access",
                    client = %peer.ip(),
                    %method,
                    path,
                    version = ?version,
                    status = response.status().as_u16(),
                    cache_status,
                    ms = format_args!("{:.3}", start.elapsed().as_secs_f64() * 1000.0),
                );
            }
            Ok(response.map(|body| Tracked::new(body, busy)))
        })
    }
}

/// The proxy, and the purger when `--purge-token` asks for one.
fn build_proxy(args: &Args) -> Result<(Proxy, Option<Purger>, Tunnel), String> {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_millis(args.connect_timeout_ms)));
    connector.set_nodelay(true);
    let max_header_bytes = args.max_header_kb.max(1) * 1024;
    let forward = Forward {
        client: Client::builder(TokioExecutor::new())
            .http1_max_buf_size(max_header_bytes.max(8192))
            .build(connector.clone()),
        rewrite: Rewrite {
            upstream: Arc::new(args.upstream.clone()),
            host: args.upstream.host(),
        },
        max_header_bytes,
    };
    let tunnel = Tunnel {
        // A client of its own: an upgraded connection leaves the pool anyway.
        client: Client::builder(TokioExecutor::new())
            .http1_max_buf_size(max_header_bytes.max(8192))
            .build(connector.clone()),
        rewrite: forward.rewrite.clone(),
        idle: Duration::from_secs(args.idle_timeout_secs),
    };
    let mut builder = StackBuilder::new()
        .name("proxy")
        .without_total_timeout()
        .without_attempt_timeout()
        .without_limit()
        .retry_attempts(args.retry.saturating_add(1))
        .max_replay_body(args.max_body_kb * 1024);
    if let Some(ms) = args.timeout_ms {
        builder = builder.total_timeout(Duration::from_millis(ms));
    }
    if let Some(ms) = args.attempt_timeout_ms {
        builder = builder.attempt_timeout(Duration::from_millis(ms));
    }
    if args.hedge {
        builder = builder.hedge_adaptive();
    }
    let mut purger = None;
    if !args.no_cache {
        let policy = HttpCachePolicy::default()
            .ignore_client_directives(args.cdn_mode)
            .targeted_fields(!args.ignore_targeted_fields)
            .stale_on_error(Duration::from_secs(args.stale_on_error_secs));
        let cache = HttpCacheLayer::builder()
            .name("proxy")
            .policy(policy)
            .capacity_bytes(args.cache_capacity_mb * 1024 * 1024)
            .max_body_bytes(args.max_body_kb * 1024)
            .keep_tag_headers(args.keep_tag_headers);
        let cache = with_redis(cache, args)?.build();
        purger = args.purge_token.as_ref().map(|token| Purger {
            cache: cache.clone(),
            token: Arc::from(token.as_bytes()),
        });
        builder = builder.http_cache(cache);
    } else if args.purge_token.is_some() {
        return Err("--purge-token has nothing to purge with --no-cache".to_owned());
    }
    let stack = builder
        .build_http::<ClientBody>()
        .map_err(|err| format!("invalid configuration: {err}"))?;
    // The limit goes under the stack, around the client: the upstream is busy until its
    // body has been sent, so the slot is held until then (the stack's own limit would
    // end with the response's head).
    let upstream = match upstream_limit(args) {
        Some(limit) => Either::Left(limit.until_body_end().layer(forward)),
        None => Either::Right(
            forward
                .map_response(|response| response.map(PermitBody::without_permit))
                .map_err(towerguard::Error::inner),
        ),
    };
    Ok((stack.layer(upstream), purger, tunnel))
}

/// The `--limit` on requests at the upstream, if any.
fn upstream_limit(args: &Args) -> Option<ConcurrencyLimitLayer> {
    let builder = ConcurrencyLimitLayer::builder()
        .name("proxy")
        .queue(256, Duration::from_millis(100))
        .queue_discipline(QueueDiscipline::codel());
    let builder = match args.limit? {
        Limit::Static(n) => builder.limit(n),
        Limit::Adaptive => builder.adaptive(Aimd::new(32, 4, 1_000)),
    };
    Some(builder.build())
}

/// The cache with its second tier in Redis, when `--redis` asks for one.
#[cfg(feature = "redis")]
fn with_redis(
    cache: towerguard::http::HttpCacheBuilder,
    args: &Args,
) -> Result<towerguard::http::HttpCacheBuilder, String> {
    let Some(url) = &args.redis else {
        return Ok(cache);
    };
    let tier = towerguard::tier::RedisTier::builder(url.as_str())
        .prefix(args.redis_prefix.as_str())
        .timeout(Duration::from_millis(args.redis_timeout_ms))
        .lease(Duration::from_millis(args.redis_lease_ms))
        .lease_wait(Duration::from_millis(args.redis_lease_wait_ms))
        .build()
        .map_err(|err| format!("--redis {}: {}", redacted(url), err.chain()))?;
    Ok(cache.second_tier(tier))
}

/// Tries `--redis` once at start. A refused password stops the proxy, as any wrong
/// option does; a Redis that cannot be reached now only gets a warning: the proxy runs on
/// its own cache until Redis answers, as it does when Redis goes away later.
#[cfg(feature = "redis")]
async fn check_redis(args: &Args) -> Result<(), String> {
    let Some(url) = &args.redis else {
        return Ok(());
    };
    let shown = redacted(url);
    let tier = towerguard::tier::RedisTier::builder(url.as_str())
        .build()
        .map_err(|err| format!("--redis {shown}: {}", err.chain()))?;
    let Err(err) = tier.check(Duration::from_secs(2)).await else {
        eprintln!("second tier: Redis at {shown} answers");
        return Ok(());
    };
    let refused = std::error::Error::source(&err)
        .and_then(|source| source.downcast_ref::<redis::RedisError>())
        .is_some_and(|err| {
            err.kind() == redis::ErrorKind::AuthenticationFailed
                || matches!(err.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM"))
        });
    if refused {
        return Err(format!("--redis {shown}: {}", err.chain()));
    }
    eprintln!(
        "warning: --redis {shown} cannot be used now ({}); running on this proxy's own cache until it answers",
        err.chain()
    );
    Ok(())
}

/// `url` with its password, if it has one, replaced by `***`, for messages and logs.
#[cfg(feature = "redis")]
fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            let hidden = if userinfo.contains(':') { ":***" } else { "" };
            format!("{scheme}://{user}{hidden}@{host}{}", &rest[authority_end..])
        }
        None => url.to_owned(),
    }
}

#[cfg(not(feature = "redis"))]
async fn check_redis(_args: &Args) -> Result<(), String> {
    Ok(())
}

#[cfg(not(feature = "redis"))]
fn with_redis(
    cache: towerguard::http::HttpCacheBuilder,
    args: &Args,
) -> Result<towerguard::http::HttpCacheBuilder, String> {
    match &args.redis {
        None => Ok(cache),
        Some(_) => Err("--redis needs the redis feature: cargo run --release --features redis --example proxy -- ...".to_owned()),
    }
}

/// Resolves when SIGTERM or Ctrl-C arrives.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

async fn serve_metrics(addr: SocketAddr) -> Result<(), String> {
    let handle = common::install_prometheus()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || std::future::ready(handle.render())),
    );
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|err| format!("cannot serve metrics on {addr}: {err}"))?;
    let local = listener.local_addr().map_err(|err| err.to_string())?;
    println!("metrics on http://{local}/metrics");
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(())
}

async fn run(args: Args) -> Result<(), String> {
    if let Some(addr) = args.metrics {
        serve_metrics(addr).await?;
    }
    check_redis(&args).await?;
    let (proxy, purger, tunnel) = build_proxy(&args)?;
    let listener = TcpListener::bind(&args.listen)
        .await
        .map_err(|err| match err.kind() {
            std::io::ErrorKind::AddrInUse => format!(
                "cannot listen on {}: the address is already in use (is another server running on that port?)",
                args.listen
            ),
            _ => format!("cannot listen on {}: {err}", args.listen),
        })?;
    println!(
        "listening on {}",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    let max_connections = connection_cap(args.max_connections, open_files_limit());

    let mut server = auto::Builder::new(TokioExecutor::new());
    let header_bytes = args.max_header_kb.max(1) * 1024;
    // hyper's HTTP/1 read buffer bounds the request head; it cannot be set below 8 KiB.
    server
        .http1()
        .max_buf_size(header_bytes.max(8192))
        // An idle connection (or one trickling its head) gives its slot back.
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(args.idle_timeout_secs));
    server
        .http2()
        .max_header_list_size(u32::try_from(header_bytes).unwrap_or(u32::MAX));

    let stopping = CancellationToken::new();
    let connections = TaskTracker::new();
    let signal = shutdown_signal();
    tokio::pin!(signal);
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections as usize));
    loop {
        // A slot first: at the cap, connections wait in the backlog, not in memory.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = &mut signal => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of descriptors and the like: keep serving the connections we
                    // have, and try again shortly rather than at once (which would spin).
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut signal => break,
        };
        // Answers go out at once, as nginx's tcp_nodelay does.
        let _ = stream.set_nodelay(true);
        let connection_service = ConnectionService::new(
            proxy.clone(),
            purger.clone(),
            tunnel.clone(),
            ReadAhead {
                max: args.max_body_kb * 1024,
                within: args.timeout_ms.map(Duration::from_millis),
            },
            peer,
            !args.no_access_log,
        );
        let activity = connection_service.activity.clone();
        let service = TowerToHyperService::new(connection_service);
        let server = server.clone();
        let stopping = stopping.clone();
        let idle = Duration::from_secs(args.idle_timeout_secs);
        connections.spawn(async move {
            let _slot = slot;
            // hyper times an HTTP/1.1 request head from the connection's first byte on, and
            // the watchdog below every idle connection; one that sends nothing is timed here.
            let mut first = [0u8; 1];
            if !matches!(
                tokio::time::timeout(idle, stream.peek(&mut first)).await,
                Ok(Ok(1))
            ) {
                return;
            }
            let connection = server.serve_connection_with_upgrades(
                TokioIo::new(Watched::writes(stream, activity.clone())),
                service,
            );
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = stopping.cancelled() => {
                    // Finish the requests under way, accept no more on this connection.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
                quiet = activity.quiet(idle) => match quiet {
                    // Idle (HTTP/2 too, which hyper does not time): closed as on shutdown,
                    // and dropped if the client does not take part in a graceful close.
                    Quiet::Idle => {
                        connection.as_mut().graceful_shutdown();
                        tokio::time::timeout(idle, connection).await.unwrap_or(Ok(()))
                    }
                    // A client that stopped reading would hold the connection's slot, and
                    // the upstream's, for ever: the response cannot finish, so neither
                    // can a graceful close.
                    Quiet::Stalled => {
                        tracing::debug!(%peer, "closing a connection whose client took no data for the idle timeout");
                        Ok(())
                    }
                },
            };
            if let Err(err) = result {
                tracing::debug!(error = %err, "connection ended with an error");
            }
            // An upgraded connection lives on as a tunnel, and keeps its slot; a shutdown
            // closes it.
            let tunnel = activity
                .tunnel
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(mut tunnel) = tunnel {
                tokio::select! {
                    _ = &mut tunnel => {}
                    () = stopping.cancelled() => tunnel.abort(),
                }
            }
        });
    }
    drop(listener);
    let under_way = connections.len();
    eprintln!(
        "shutting down: {under_way} connection(s) open, waiting up to {} s for their requests",
        args.shutdown_grace_secs
    );
    stopping.cancel();
    connections.close();
    let grace = Duration::from_secs(args.shutdown_grace_secs);
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_err()
    {
        return Err(format!(
            "{} connection(s) still busy after {} s; stopping anyway",
            connections.len(),
            args.shutdown_grace_secs
        ));
    }
    println!("stopped");
    Ok(())
}

/// Descriptors kept for everything but client connections and their upstream ones: the
/// listener, the metrics endpoint, Redis, the runtime, standard streams.
const RESERVED_FILES: u64 = 64;

/// The default of `--max-connections`.
const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;

/// This process's limit on open files (the soft one, which `ulimit -n` shows); `None`
/// when unlimited or unknown (not Linux).
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The connection cap: the one given, or the default lowered to what `open_files`
/// allows, so that the cap is reached before accepts and upstream connects fail for
/// want of descriptors. A cap given above that gets a warning, as nginx gives for
/// `worker_connections`.
fn connection_cap(given: Option<u32>, open_files: Option<u64>) -> u32 {
    let allowed = open_files.map(|files| (files.saturating_sub(RESERVED_FILES) / 2).max(1));
    match (given, allowed) {
        (Some(given), Some(allowed)) if u64::from(given) > allowed => {
            eprintln!(
                "warning: --max-connections {given} may need {} open files, and this process \
                 may open {} (ulimit -n): past about {allowed} connections, accepts and \
                 upstream connections will fail",
                u64::from(given) * 2 + RESERVED_FILES,
                open_files.unwrap_or_default(),
            );
            given
        }
        (Some(given), _) => given,
        (None, Some(allowed)) if allowed < u64::from(DEFAULT_MAX_CONNECTIONS) => {
            let cap = u32::try_from(allowed).unwrap_or(DEFAULT_MAX_CONNECTIONS);
            eprintln!(
                "at most {cap} client connections: the limit on open files is {} (ulimit -n; \
                 raise it for more, or set --max-connections)",
                open_files.unwrap_or_default(),
            );
            cap
        }
        (None, _) => DEFAULT_MAX_CONNECTIONS,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(true)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("proxy: {message}");
            ExitCode::FAILURE
        }
    }
}
