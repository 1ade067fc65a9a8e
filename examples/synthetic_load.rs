//! Synthetic load: towerguard beside what you would use instead, on your machine.
//!
//! ```text
//! cargo run --release --example synthetic_load [-- --quick] [--scenario NAME] [--json FILE] [--plots DIR] [--report FILE]
//! ```
//!
//! Each scenario starts a synthetic upstream on loopback (an HTTP/2 server whose latency
//! distribution, failure rate and capacity the scenario sets) and drives it through a real
//! hyper client, bare and behind towerguard or the peers (tower's built-in layers,
//! tower-resilience, moka). Latencies go into HdrHistograms.
//!
//! - `stampede`: 10,000 concurrent requests for one cold key (upstream 50 ms), then the
//!   same with the first requester disconnecting 10 ms in. Upstream calls, successes, wall
//!   time.
//! - `tail`: 2 ms upstream, 2% of calls 100 ms, 32 concurrent clients. p50, p99, p99.9 and
//!   extra upstream load, each the median of 3 rounds (1 with `--quick`).
//! - `faults`: 10% transient failures, then a total outage. Success rate and upstream calls
//!   per request.
//! - `overload`: open-loop arrivals at twice the upstream's measured capacity, 250 ms client
//!   deadlines. Goodput (successes within the deadline per second, over capacity) and p99 of
//!   the successes.
//! - `hits`: cache-hit throughput of an HTTP server behind the full stack against the same
//!   server's bare handler (a handler that waits 1 ms on its backend), 32 clients.
//!
//! Every run writes its results to `target/synthetic_load/` and prints where: `results.json`
//! (one object with a key per scenario and, inside, one object per system), an SVG
//! latency-distribution plot per scenario that records latencies, and `report.html`, one
//! self-contained page with every table and plot, the machine, the date and the command.
//! `--json FILE`, `--plots DIR` and `--report FILE` put them elsewhere.
//! `bash benches/report_screenshot.sh` opens the report in headless Chromium and saves a
//! screenshot.

mod common;
#[path = "../benches/common/tower_policies.rs"]
mod tower_policies;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tower_policies::{Attempts, ClonePolicy};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tower::buffer::Buffer;
use tower::util::BoxCloneService;
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Svc = BoxCloneService<u64, Bytes, BoxError>;

/// An upstream failure; cloneable, as some peers require.
#[derive(Debug, Clone)]
struct UpstreamError(String);

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UpstreamError {}

/// A deterministic hash of a call number, for repeatable random-looking patterns.
fn hash(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

// ---------------------------------------------------------------------------------------
// The synthetic upstream: an HTTP/2 server on loopback.

type Script = Arc<dyn Fn(u64) -> (Duration, bool) + Send + Sync>;

struct Upstream {
    addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    started: Arc<Notify>,
}

impl Upstream {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

/// Serves `service` over HTTP/1 and HTTP/2 (prior knowledge) on a loopback port.
async fn serve<S>(service: S) -> SocketAddr
where
    S: Service<Request<Incoming>, Response = Response<Full<Bytes>>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let addr = listener.local_addr().expect("bound");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            // Small frames go out at once: with Nagle's algorithm on, a frame can wait for
            // the peer's delayed acknowledgement (40 ms on Linux).
            let _ = stream.set_nodelay(true);
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let mut builder = auto::Builder::new(TokioExecutor::new());
                // A hedge that loses is a cancelled stream; h2's defaults treat a steady flow
                // of those as abuse and close the connection.
                builder
                    .http2()
                    .max_concurrent_streams(100_000)
                    .max_pending_accept_reset_streams(1 << 20)
                    .max_local_error_reset_streams(1 << 20);
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// An upstream whose n-th call takes and fails as `script` says, with at most `capacity`
/// calls in service at once (the rest wait their turn inside the server).
async fn upstream(script: Script, capacity: Option<usize>) -> Upstream {
    let calls = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(Notify::new());
    let slots = capacity.map(|c| Arc::new(Semaphore::new(c)));
    let (c, s) = (calls.clone(), started.clone());
    let handler = service_fn(move |req: Request<Incoming>| {
        let n = c.fetch_add(1, Ordering::SeqCst) as u64;
        s.notify_one();
        let (latency, fails) = script(n);
        let slots = slots.clone();
        let body = Bytes::from(format!("value of {}", req.uri().path()));
        async move {
            let _slot = match &slots {
                Some(slots) => Some(slots.acquire().await.expect("never closed")),
                None => None,
            };
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            let status = if fails {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            };
            Ok::<_, Infallible>(
                Response::builder()
                    .status(status)
                    .header("cache-control", "max-age=60")
                    .body(Full::new(body))
                    .expect("a valid response"),
            )
        }
    });
    let addr = serve(handler).await;
    Upstream {
        addr,
        calls,
        started,
    }
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

fn client() -> HttpClient {
    // As the server: no Nagle delay, and room for the streams hedges cancel.
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .http2_max_concurrent_reset_streams(1 << 16)
        .http2_max_local_error_reset_streams(1 << 20)
        .build(connector)
}

/// Calls the upstream for key `k` as `GET /item/k`: the innermost service every system
/// wraps. A non-200 answer is an error.
#[derive(Clone)]
struct HttpCall {
    client: HttpClient,
    addr: SocketAddr,
}

impl Service<u64> for HttpCall {
    type Response = Bytes;
    type Error = UpstreamError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Bytes, UpstreamError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, key: u64) -> Self::Future {
        let uri = format!("http://{}/item/{key}", self.addr);
        let client = self.client.clone();
        Box::pin(async move {
            let uri = uri.parse().map_err(|e| UpstreamError(format!("{e}")))?;
            let response = client
                .get(uri)
                .await
                .map_err(|e| UpstreamError(e.to_string()))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| UpstreamError(e.to_string()))?
                .to_bytes();
            if status == StatusCode::OK {
                Ok(body)
            } else {
                Err(UpstreamError(format!("status {status}")))
            }
        })
    }
}

fn boxed<S>(svc: S) -> Svc
where
    S: Service<u64, Response = Bytes> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    BoxCloneService::new(svc.map_err(Into::into))
}

// ---------------------------------------------------------------------------------------
// Results.

type Figures = Vec<(&'static str, f64)>;

#[derive(Default)]
struct Report {
    scenarios: BTreeMap<&'static str, Vec<(&'static str, Figures)>>,
    /// Latency histograms per scenario and system, for the plots.
    latencies: BTreeMap<&'static str, Vec<(&'static str, Histogram<u64>)>>,
}

impl Report {
    fn add(&mut self, scenario: &'static str, system: &'static str, figures: Figures) {
        self.scenarios
            .entry(scenario)
            .or_default()
            .push((system, figures));
    }

    /// The scenario's table with the README's names and units, as rows of cells (the
    /// first row is the header).
    fn table(&self, scenario: &str) -> Vec<Vec<String>> {
        let Some(rows) = self.scenarios.get(scenario) else {
            return Vec::new();
        };
        let Some((_, first)) = rows.first() else {
            return Vec::new();
        };
        let mut table = vec![std::iter::once("system".to_owned())
            .chain(first.iter().map(|(name, _)| column(name).0))
            .collect::<Vec<_>>()];
        for (system, figures) in rows {
            table.push(
                std::iter::once(system_name(system).to_owned())
                    .chain(figures.iter().map(|(name, value)| (column(name).1)(*value)))
                    .collect(),
            );
        }
        table
    }

    fn print(&self, scenario: &str) {
        let table = self.table(scenario);
        let Some(header) = table.first() else {
            return;
        };
        let widths: Vec<usize> = (0..header.len())
            .map(|i| {
                table
                    .iter()
                    .map(|row| row[i].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for row in &table {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i == 0 {
                    let _ = write!(line, "{cell:<width$}", width = widths[0]);
                } else {
                    let _ = write!(line, "  {cell:>width$}", width = widths[i]);
                }
            }
            println!("{}", line.trim_end());
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
                    .map(|(name, value)| {
                        let value = if value.is_finite() {
                            format!("{value}")
                        } else {
                            "null".into()
                        };
                        format!("\"{name}\": {value}")
                    })
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

    fn plots(&self, dir: &Path) -> Result<Vec<String>, String> {
        use plotters::prelude::*;
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut written = Vec::new();
        for (scenario, systems) in &self.latencies {
            let path = dir.join(format!("{scenario}.svg"));
            let quantiles: Vec<f64> = (0..=300).map(|i| i as f64 / 300.0 * 3.0).collect();
            // x: nines (0 = p0, 1 = p90, 2 = p99, 3 = p99.9); y: latency in ms, log scale.
            let point = |h: &Histogram<u64>, nines: f64| {
                let q = 1.0 - 10f64.powf(-nines);
                (
                    nines,
                    (h.value_at_quantile(q.min(0.999_9)) as f64 / 1e3).max(0.01),
                )
            };
            let max = systems
                .iter()
                .map(|(_, h)| h.max() as f64 / 1e3)
                .fold(1.0, f64::max);
            let min = systems
                .iter()
                .map(|(_, h)| h.min() as f64 / 1e3)
                .fold(f64::INFINITY, f64::min)
                .clamp(0.01, 1.0);
            let root = SVGBackend::new(&path, (800, 480)).into_drawing_area();
            let draw = || -> Result<(), Box<dyn std::error::Error>> {
                root.fill(&WHITE)?;
                let mut chart = ChartBuilder::on(&root)
                    .caption(
                        format!("{scenario}: latency by percentile"),
                        ("sans-serif", 22),
                    )
                    .margin(12)
                    .x_label_area_size(40)
                    .y_label_area_size(60)
                    .build_cartesian_2d(0f64..3f64, (min * 0.5..max * 1.5).log_scale())?;
                chart
                    .configure_mesh()
                    .x_desc("percentile (1 = p90, 2 = p99, 3 = p99.9)")
                    .y_desc("latency, ms")
                    .draw()?;
                let colors = [RED, BLUE, GREEN, MAGENTA, CYAN, BLACK];
                for (i, (system, histogram)) in systems.iter().enumerate() {
                    let color = colors[i % colors.len()];
                    chart
                        .draw_series(LineSeries::new(
                            quantiles.iter().map(|n| point(histogram, *n)),
                            color.stroke_width(2),
                        ))?
                        .label(system_name(system))
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
                }
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::UpperLeft)
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .draw()?;
                root.present()?;
                Ok(())
            };
            draw().map_err(|e| format!("{}: {e}", path.display()))?;
            written.push(path.display().to_string());
        }
        Ok(written)
    }
}

impl Report {
    /// One self-contained HTML page: every table and plot of the run (the SVGs inline),
    /// with the machine, the date and the command.
    fn html(&self, descriptions: &[(&str, &str)], plots: &Path, context: &RunContext) -> String {
        let escape = |text: &str| {
            text.replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
        };
        let mut out = String::from(
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
             <title>towerguard synthetic load</title>\n<style>\n\
             body { font-family: sans-serif; margin: 2em auto; max-width: 1000px; color: #222; }\n\
             table { border-collapse: collapse; margin: 1em 0; }\n\
             th, td { border: 1px solid #bbb; padding: 4px 10px; }\n\
             td { text-align: right; white-space: nowrap; } td:first-child { text-align: left; }\n\
             th { background: #eee; }\n\
             dt { font-weight: bold; } dd { margin: 0 0 0.5em 1em; font-family: monospace; }\n\
             </style>\n</head>\n<body>\n<h1>towerguard synthetic load</h1>\n<dl>\n",
        );
        for (term, value) in [
            ("date", context.date.as_str()),
            ("machine", context.machine.as_str()),
            ("command", context.command.as_str()),
            ("duration", context.duration.as_str()),
        ] {
            let _ = writeln!(out, "<dt>{term}</dt><dd>{}</dd>", escape(value));
        }
        out.push_str("</dl>\n");
        for (scenario, description) in descriptions {
            let table = self.table(scenario);
            if table.is_empty() {
                continue;
            }
            let _ = writeln!(
                out,
                "<h2>{scenario}</h2>\n<p>{}</p>\n<table>",
                escape(description)
            );
            for (i, row) in table.iter().enumerate() {
                let cell = if i == 0 { "th" } else { "td" };
                out.push_str("<tr>");
                for value in row {
                    let _ = write!(out, "<{cell}>{}</{cell}>", escape(value));
                }
                out.push_str("</tr>\n");
            }
            out.push_str("</table>\n");
            let svg = plots.join(format!("{scenario}.svg"));
            if let Ok(svg) = std::fs::read_to_string(&svg) {
                // Inline, so the page stands alone.
                let start = svg.find("<svg").unwrap_or(0);
                let _ = writeln!(out, "<figure>{}</figure>", &svg[start..]);
            }
        }
        out.push_str("</body>\n</html>\n");
        out
    }
}

/// What the report says about the run.
struct RunContext {
    date: String,
    machine: String,
    command: String,
    duration: String,
}

impl RunContext {
    fn new(duration: Duration) -> Self {
        let seconds = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let (year, month, day) = civil_date(seconds / 86_400);
        let time = seconds % 86_400;
        let date = format!(
            "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
            time / 3600,
            time / 60 % 60,
            time % 60
        );
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu = cpuinfo
            .lines()
            .find_map(|line| line.strip_prefix("model name"))
            .map(|rest| rest.trim_start_matches([' ', '\t', ':']).trim().to_owned())
            .unwrap_or_else(|| std::env::consts::ARCH.to_owned());
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let meminfo = read("/proc/meminfo");
        let memory = meminfo
            .lines()
            .find_map(|line| line.strip_prefix("MemTotal:"))
            .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| format!(", {:.0} GB", kb as f64 / 1024.0 / 1024.0))
            .unwrap_or_default();
        let machine = format!("{cpu}, {cores} cores{memory}, {}", std::env::consts::OS);
        let args: Vec<String> = std::env::args().skip(1).collect();
        let command = format!(
            "cargo run --release --example synthetic_load{}{}",
            if args.is_empty() { "" } else { " -- " },
            args.join(" ")
        );
        RunContext {
            date,
            machine,
            command,
            duration: format!("{:.1} s", duration.as_secs_f64()),
        }
    }
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// days-to-civil algorithm).
fn civil_date(days: u64) -> (i64, u64, u64) {
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A system's name as the README's tables give it.
fn system_name(system: &str) -> &str {
    match system {
        "no_cache" => "no cache",
        "towerguard" => "towerguard",
        "moka_get_with" => "moka get_with",
        "tower_resilience_coalesce" => "tower-resilience coalesce",
        "tower_resilience_cache" => "tower-resilience cache",
        "no_hedge" => "no hedging",
        "tower_hedge" => "tower Hedge (p95, behind a Buffer)",
        "tower_resilience_hedge_5ms" => "tower-resilience hedge, hand-tuned 5 ms",
        "no_retry" => "no retry",
        "tower_retry" => "tower Retry (3 attempts)",
        "tower_resilience_retry" => "tower-resilience retry (3 attempts)",
        "no_limit" => "no limit",
        "towerguard_untuned" => "towerguard, the standard stack untuned",
        "towerguard_static_16" => "towerguard static limit 16 (hand-tuned)",
        "tower_limit_16_loadshed" => "tower ConcurrencyLimit(16) + LoadShed",
        "tower_resilience_bulkhead_16" => "tower-resilience bulkhead 16",
        "bare_handler" => "bare handler",
        "towerguard_full_stack" => "behind the towerguard stack",
        other => other,
    }
}

type Format = fn(f64) -> String;

/// A figure's column heading as the README gives it, and how its value is shown (times
/// in ms, ratios in percent).
fn column(name: &str) -> (String, Format) {
    fn ms_from_us(v: f64) -> String {
        format!("{:.2} ms", v / 1e3)
    }
    fn ms(v: f64) -> String {
        format!("{v:.1} ms")
    }
    fn percent(v: f64) -> String {
        format!("{:.1}%", v * 100.0)
    }
    fn count(v: f64) -> String {
        let n = v.round() as u64;
        let digits = n.to_string();
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        out
    }
    fn ratio(v: f64) -> String {
        format!("{v:.3}")
    }
    let (prefix, base) = match name.strip_prefix("disc_") {
        Some(base) => ("first disconnects: ", base),
        None => ("", name),
    };
    let (label, format): (&str, Format) = match base {
        "p50_us" => ("p50", ms_from_us),
        "p99_us" => ("p99", ms_from_us),
        "p999_us" => ("p99.9", ms_from_us),
        "wall_ms" => ("wall", ms),
        "upstream_calls" => ("upstream calls", count),
        "ok" => ("ok", count),
        "errors" => ("errors", count),
        "extra_load" => ("extra upstream load", percent),
        "rps" => ("requests/s", count),
        "success_rate" => ("success", percent),
        "amplification" => ("calls per request", ratio),
        "outage_amplification" => ("calls per request, total outage", ratio),
        "capacity_rps" => ("capacity, requests/s", count),
        "offered_rps" => ("offered, requests/s", count),
        "goodput_ratio" => ("goodput / capacity", percent),
        _ => (base, ratio),
    };
    (format!("{prefix}{label}"), format)
}

fn histogram() -> Histogram<u64> {
    Histogram::new(3).expect("valid precision")
}

fn percentiles(h: &Histogram<u64>) -> [(&'static str, f64); 3] {
    [
        ("p50_us", h.value_at_quantile(0.5) as f64),
        ("p99_us", h.value_at_quantile(0.99) as f64),
        ("p999_us", h.value_at_quantile(0.999) as f64),
    ]
}

/// `requests` requests from `clients` closed-loop clients; returns the latency histogram
/// of the successes, the number of successes and the wall time.
async fn closed_loop(
    svc: &Svc,
    clients: usize,
    requests: usize,
    keys: impl Fn(usize) -> u64 + Clone + Send + 'static,
) -> (Histogram<u64>, usize, Duration) {
    let started = Instant::now();
    let per_client = requests / clients;
    let mut tasks = JoinSet::new();
    for c in 0..clients {
        let svc = svc.clone();
        let keys = keys.clone();
        tasks.spawn(async move {
            let mut h = histogram();
            let mut ok = 0;
            for i in 0..per_client {
                let start = Instant::now();
                if svc.clone().oneshot(keys(c * per_client + i)).await.is_ok() {
                    ok += 1;
                    let _ = h.record(start.elapsed().as_micros() as u64);
                }
            }
            (h, ok)
        });
    }
    let mut h = histogram();
    let mut ok = 0;
    while let Some(result) = tasks.join_next().await {
        let (client_h, client_ok) = result.expect("client task");
        h.add(client_h).expect("same precision");
        ok += client_ok;
    }
    (h, ok, started.elapsed())
}

// ---------------------------------------------------------------------------------------
// stampede

const STAMPEDE_CALLERS: usize = 10_000;

const CACHES: &[&str] = &[
    "no_cache",
    "towerguard",
    "moka_get_with",
    "tower_resilience_coalesce",
    "tower_resilience_cache",
];

fn cache_system(system: &str, call: HttpCall) -> Svc {
    match system {
        "no_cache" => boxed(call),
        "towerguard" => boxed(
            towerguard::cache::CacheLayer::builder(|k: &u64| Some(*k))
                .name("synthetic_load")
                .build()
                .layer(call),
        ),
        "moka_get_with" => {
            let cache: moka::future::Cache<u64, Result<Bytes, UpstreamError>> =
                moka::future::Cache::new(10_000);
            boxed(service_fn(move |key: u64| {
                let (cache, call) = (cache.clone(), call.clone());
                async move { cache.get_with(key, call.oneshot(key)).await }
            }))
        }
        "tower_resilience_coalesce" => {
            boxed(tower_resilience::coalesce::CoalesceLayer::new(|k: &u64| *k).layer(call))
        }
        "tower_resilience_cache" => boxed(
            tower_resilience::cache::CacheLayer::builder()
                .max_size(10_000)
                .key_extractor(|k: &u64| *k)
                .build()
                .expect("valid cache configuration")
                .layer(call),
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

async fn stampede_once(system: &str, disconnect: bool) -> Stampede {
    let up = upstream(Arc::new(|_| (Duration::from_millis(50), false)), None).await;
    let svc = cache_system(
        system,
        HttpCall {
            client: client(),
            addr: up.addr,
        },
    );
    let started = Instant::now();
    let first = tokio::spawn(svc.clone().oneshot(1));
    up.started.notified().await;
    let mut others = JoinSet::new();
    for _ in 1..STAMPEDE_CALLERS {
        others.spawn(svc.clone().oneshot(1));
    }
    let mut outcome = Stampede::default();
    if disconnect {
        tokio::time::sleep(Duration::from_millis(10)).await;
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
    outcome.upstream_calls = up.calls();
    outcome
}

async fn stampede(report: &mut Report, rounds: usize, bar: &ProgressBar) {
    for system in CACHES {
        bar.set_message(format!("stampede / {system}"));
        let mut stay = Vec::new();
        let mut leave = Vec::new();
        for _ in 0..rounds {
            stay.push(stampede_once(system, false).await);
            leave.push(stampede_once(system, true).await);
        }
        stay.sort_by_key(|o| o.wall);
        leave.sort_by_key(|o| o.wall);
        let (stay, leave) = (&stay[stay.len() / 2], &leave[leave.len() / 2]);
        report.add(
            "stampede",
            system,
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
        );
        bar.inc(1);
    }
}

// ---------------------------------------------------------------------------------------
// tail

const HEDGES: &[&str] = &[
    "no_hedge",
    "towerguard",
    "tower_hedge",
    "tower_resilience_hedge_5ms",
];

fn hedge_system(system: &str, call: HttpCall) -> Svc {
    match system {
        "no_hedge" => boxed(call),
        "towerguard" => boxed(
            towerguard::hedge::HedgeLayer::builder()
                .name("synthetic_load")
                .build()
                .layer(call),
        ),
        "tower_hedge" => {
            let hedge =
                tower::hedge::Hedge::new(call, ClonePolicy, 100, 0.95, Duration::from_secs(1));
            boxed(Buffer::new(hedge, 1_024))
        }
        "tower_resilience_hedge_5ms" => boxed(
            tower_resilience::hedge::HedgeLayer::builder()
                .delay(Duration::from_millis(5))
                .max_hedged_attempts(2)
                .build()
                .layer(call),
        ),
        other => unreachable!("unknown system {other}"),
    }
}

/// One round of the tail scenario for `system`: figures and the latency histogram.
async fn tail_once(system: &str, requests: usize) -> (Figures, Histogram<u64>) {
    let script: Script = Arc::new(|n| {
        let slow = hash(n).is_multiple_of(50);
        (Duration::from_millis(if slow { 100 } else { 2 }), false)
    });
    let up = upstream(script, None).await;
    let svc = hedge_system(
        system,
        HttpCall {
            client: client(),
            addr: up.addr,
        },
    );
    let (h, ok, wall) = closed_loop(&svc, 32, requests, |i| i as u64).await;
    let mut figures: Figures = percentiles(&h).to_vec();
    figures.push(("extra_load", up.calls() as f64 / ok.max(1) as f64 - 1.0));
    figures.push(("rps", ok as f64 / wall.as_secs_f64()));
    (figures, h)
}

async fn tail(report: &mut Report, requests: usize, rounds: usize, bar: &ProgressBar) {
    for system in HEDGES {
        bar.set_message(format!("tail / {system}"));
        let mut runs = Vec::new();
        for _ in 0..rounds {
            runs.push(tail_once(system, requests).await);
        }
        // Each figure is the median over the rounds (this machine is shared: one round can
        // catch a stall); the plot shows the round with the median p99.9.
        let figures: Figures = runs[0]
            .0
            .iter()
            .enumerate()
            .map(|(i, (name, _))| {
                let mut values: Vec<f64> = runs.iter().map(|(f, _)| f[i].1).collect();
                values.sort_by(f64::total_cmp);
                (*name, values[values.len() / 2])
            })
            .collect();
        runs.sort_by_key(|(_, h)| h.value_at_quantile(0.999));
        let (_, h) = runs.swap_remove(runs.len() / 2);
        report.add("tail", system, figures);
        report
            .latencies
            .entry("tail")
            .or_default()
            .push((system, h));
        bar.inc(1);
    }
}

// ---------------------------------------------------------------------------------------
// faults

const RETRIES: &[&str] = &[
    "no_retry",
    "towerguard",
    "tower_retry",
    "tower_resilience_retry",
];

fn retry_system(system: &str, call: HttpCall) -> Svc {
    match system {
        "no_retry" => boxed(call),
        "towerguard" => boxed(
            towerguard::retry::RetryLayer::builder()
                .name("synthetic_load")
                .build()
                .layer(call),
        ),
        "tower_retry" => boxed(tower::retry::RetryLayer::new(Attempts(2)).layer(call)),
        "tower_resilience_retry" => boxed(
            tower_resilience::retry::RetryLayer::<u64, Bytes, UpstreamError>::builder()
                .max_attempts(3)
                .exponential_backoff(Duration::from_millis(25))
                .build()
                .layer(call),
        ),
        other => unreachable!("unknown system {other}"),
    }
}

async fn faults(report: &mut Report, requests: usize, bar: &ProgressBar) {
    let requests = requests / 32 * 32;
    for system in RETRIES {
        bar.set_message(format!("faults / {system}"));
        let transient = upstream(
            Arc::new(|n| (Duration::ZERO, hash(n).is_multiple_of(10))),
            None,
        )
        .await;
        let svc = retry_system(
            system,
            HttpCall {
                client: client(),
                addr: transient.addr,
            },
        );
        let (_, ok, _) = closed_loop(&svc, 32, requests, |i| i as u64).await;
        let outage = upstream(Arc::new(|_| (Duration::ZERO, true)), None).await;
        let svc = retry_system(
            system,
            HttpCall {
                client: client(),
                addr: outage.addr,
            },
        );
        closed_loop(&svc, 32, requests, |i| i as u64).await;
        report.add(
            "faults",
            system,
            vec![
                ("success_rate", ok as f64 / requests as f64),
                ("amplification", transient.calls() as f64 / requests as f64),
                (
                    "outage_amplification",
                    outage.calls() as f64 / requests as f64,
                ),
            ],
        );
        bar.inc(1);
    }
}

// ---------------------------------------------------------------------------------------
// overload

const SLOTS: usize = 16;
const SERVICE_TIME: Duration = Duration::from_millis(20);
const DEADLINE: Duration = Duration::from_millis(250);

const LIMITS: &[&str] = &[
    "no_limit",
    "towerguard_untuned",
    "towerguard_static_16",
    "tower_limit_16_loadshed",
    "tower_resilience_bulkhead_16",
];

fn limit_system(system: &str, call: HttpCall) -> Svc {
    match system {
        "no_limit" => boxed(call),
        // The standard stack as it comes: adaptive limit, CoDel queue with adaptive LIFO,
        // timeouts and retry; no number tuned to this upstream.
        "towerguard_untuned" => boxed(
            towerguard::stack::StackBuilder::new()
                .name("synthetic_load")
                .build()
                .expect("the default stack is valid")
                .layer(call),
        ),
        "towerguard_static_16" => {
            boxed(towerguard::limit::ConcurrencyLimitLayer::new(SLOTS).layer(call))
        }
        "tower_limit_16_loadshed" => boxed(
            ServiceBuilder::new()
                .load_shed()
                .concurrency_limit(SLOTS)
                .service(call),
        ),
        "tower_resilience_bulkhead_16" => boxed(
            tower_resilience::bulkhead::BulkheadLayer::builder()
                .max_concurrent_calls(SLOTS)
                .reject_when_full()
                .build()
                .expect("valid bulkhead")
                .layer(call),
        ),
        other => unreachable!("unknown system {other}"),
    }
}

/// The upstream's throughput when it is never idle (twice its slots in flight, so a freed
/// slot is taken at once), in requests per second.
async fn capacity(up: &Upstream, seconds: f64) -> f64 {
    let svc = boxed(HttpCall {
        client: client(),
        addr: up.addr,
    });
    let requests = ((seconds / SERVICE_TIME.as_secs_f64()) as usize).max(1) * SLOTS * 2;
    let (_, ok, wall) = closed_loop(&svc, SLOTS * 2, requests, |i| i as u64).await;
    ok as f64 / wall.as_secs_f64()
}

async fn overload(report: &mut Report, seconds: f64, bar: &ProgressBar) {
    for system in LIMITS {
        bar.set_message(format!("overload / {system}"));
        let up = upstream(Arc::new(|_| (SERVICE_TIME, false)), Some(SLOTS)).await;
        let capacity = capacity(&up, 1.0).await;
        let svc = limit_system(
            system,
            HttpCall {
                client: client(),
                addr: up.addr,
            },
        );
        // Open loop: arrivals on a fixed schedule at twice the capacity, whatever happens
        // to earlier requests (no coordinated omission).
        let rate = 2.0 * capacity;
        let total = (rate * seconds) as usize;
        let interval = Duration::from_secs_f64(1.0 / rate);
        let started = tokio::time::Instant::now();
        let mut tasks = JoinSet::new();
        for i in 0..total {
            let at = started + interval * i as u32;
            let svc = svc.clone();
            tasks.spawn(async move {
                tokio::time::sleep_until(at).await;
                let sent = Instant::now();
                match tokio::time::timeout(DEADLINE, svc.oneshot(i as u64)).await {
                    Ok(Ok(_)) => Some(sent.elapsed()),
                    _ => None,
                }
            });
        }
        let mut h = histogram();
        let mut good = 0usize;
        while let Some(result) = tasks.join_next().await {
            if let Ok(Some(latency)) = result {
                good += 1;
                let _ = h.record(latency.as_micros() as u64);
            }
        }
        let goodput = good as f64 / seconds;
        report.add(
            "overload",
            system,
            vec![
                ("capacity_rps", capacity.round()),
                ("offered_rps", rate.round()),
                ("goodput_ratio", goodput / capacity),
                ("p99_us", h.value_at_quantile(0.99) as f64),
            ],
        );
        report
            .latencies
            .entry("overload")
            .or_default()
            .push((system, h));
        bar.inc(1);
    }
}

// ---------------------------------------------------------------------------------------
// hits

/// The handler: waits 1 ms on its backend, answers a cacheable page.
fn handler() -> impl Service<
    Request<towerguard::http::BufferedBody<Incoming>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + Sync
       + 'static {
    service_fn(
        |_req: Request<towerguard::http::BufferedBody<Incoming>>| async {
            tokio::time::sleep(Duration::from_millis(1)).await;
            Ok::<_, Infallible>(
                Response::builder()
                    .header("cache-control", "max-age=60")
                    .body(Full::new(Bytes::from_static(b"a page")))
                    .expect("a valid response"),
            )
        },
    )
}

async fn hits(report: &mut Report, requests: usize, bar: &ProgressBar) {
    for system in ["bare_handler", "towerguard_full_stack"] {
        bar.set_message(format!("hits / {system}"));
        let addr = match system {
            "bare_handler" => {
                serve(handler().map_request(|req: Request<Incoming>| {
                    req.map(|body| {
                        towerguard::http::BufferedBody::streaming(Default::default(), Some(body))
                    })
                }))
                .await
            }
            _ => {
                let stack = towerguard::stack::StackBuilder::new()
                    .name("hits")
                    .http_cache(
                        towerguard::http::HttpCacheLayer::builder()
                            .name("hits")
                            .build(),
                    )
                    .build_http::<Incoming>()
                    .expect("a consistent stack");
                let svc = stack.layer(handler()).map_response(
                    |response: Response<towerguard::http::BufferedBody<Full<Bytes>>>| {
                        response.map(|body| {
                            // The cached body is complete; a streamed one is not expected here.
                            Full::new(body.into_bytes().unwrap_or_default())
                        })
                    },
                );
                serve(svc).await
            }
        };
        let svc = boxed(HttpCall {
            client: client(),
            addr,
        });
        let (h, ok, wall) = closed_loop(&svc, 32, requests, |i| (i % 16) as u64).await;
        let mut figures: Figures = vec![("rps", ok as f64 / wall.as_secs_f64())];
        figures.extend(percentiles(&h));
        report.add("hits", system, figures);
        report
            .latencies
            .entry("hits")
            .or_default()
            .push((system, h));
        bar.inc(1);
    }
}

// ---------------------------------------------------------------------------------------

const SCENARIOS: &[&str] = &["stampede", "tail", "faults", "overload", "hits"];

/// Where the results go unless `--json`, `--plots` or `--report` say otherwise.
const DEFAULT_OUT: &str = "target/synthetic_load";

struct Args {
    quick: bool,
    scenario: Option<String>,
    json: Option<String>,
    plots: Option<String>,
    report: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let usage = "usage: synthetic_load [--quick] [--scenario stampede|tail|faults|overload|hits] \
                 [--json FILE] [--plots DIR] [--report FILE]\n\
                 (default: target/synthetic_load/results.json, target/synthetic_load/*.svg, \
                 target/synthetic_load/report.html)";
    let mut args = Args {
        quick: false,
        scenario: None,
        json: None,
        plots: None,
        report: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => args.quick = true,
            "--scenario" => args.scenario = Some(it.next().ok_or(usage)?),
            "--json" => args.json = Some(it.next().ok_or(usage)?),
            "--plots" => args.plots = Some(it.next().ok_or(usage)?),
            "--report" => args.report = Some(it.next().ok_or(usage)?),
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
    common::init_tracing();
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    let wanted = |name: &str| args.scenario.as_deref().is_none_or(|s| s == name);
    let steps = [
        ("stampede", CACHES.len()),
        ("tail", HEDGES.len()),
        ("faults", RETRIES.len()),
        ("overload", LIMITS.len()),
        ("hits", 2),
    ]
    .iter()
    .filter(|(name, _)| wanted(name))
    .map(|(_, n)| *n as u64)
    .sum();
    let bar = ProgressBar::new(steps);
    bar.set_style(
        // At most 80 columns: the message takes what the terminal has left, cut to fit.
        ProgressStyle::with_template("{elapsed_precise} [{bar:20}] {pos:>2}/{len:2} {wide_msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let mut report = Report::default();
    let started = Instant::now();
    let quick = args.quick;
    if wanted("stampede") {
        stampede(&mut report, if quick { 1 } else { 5 }, &bar).await;
    }
    if wanted("tail") {
        tail(
            &mut report,
            if quick { 6_400 } else { 32_000 },
            if quick { 1 } else { 3 },
            &bar,
        )
        .await;
    }
    if wanted("faults") {
        faults(&mut report, if quick { 3_200 } else { 10_016 }, &bar).await;
    }
    if wanted("overload") {
        overload(&mut report, if quick { 3.0 } else { 10.0 }, &bar).await;
    }
    if wanted("hits") {
        hits(&mut report, if quick { 16_000 } else { 64_000 }, &bar).await;
    }
    bar.finish_and_clear();

    let descriptions = [
        ("stampede", "stampede: 10,000 concurrent requests for one cold key, upstream 50 ms (first disconnects: the first requester leaves 10 ms in)"),
        ("tail", "tail: upstream 2 ms, 2% of calls 100 ms, 32 clients (medians of the rounds)"),
        ("faults", "faults: 10% transient failures, then a total outage, 32 clients"),
        ("overload", "overload: open loop at 2x measured capacity (16 slots x 20 ms), 250 ms client deadline"),
        ("hits", "hits: HTTP server, handler waits 1 ms on its backend; 32 clients over 16 URIs"),
    ];
    for (scenario, description) in descriptions {
        if report.scenarios.contains_key(scenario) {
            println!("{description}");
            report.print(scenario);
        }
    }
    let elapsed = started.elapsed();
    println!("finished in {:.1} s", elapsed.as_secs_f64());
    let json = args
        .json
        .clone()
        .unwrap_or_else(|| format!("{DEFAULT_OUT}/results.json"));
    let plots = args.plots.clone().unwrap_or_else(|| DEFAULT_OUT.to_owned());
    let html = args
        .report
        .clone()
        .unwrap_or_else(|| format!("{DEFAULT_OUT}/report.html"));
    let fail = |what: &str, err: &dyn std::fmt::Display| {
        eprintln!("cannot write {what}: {err}");
        std::process::exit(1);
    };
    for file in [&json, &html] {
        if let Some(dir) = Path::new(file)
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            if let Err(err) = std::fs::create_dir_all(dir) {
                fail(&dir.display().to_string(), &err);
            }
        }
    }
    if let Err(err) = std::fs::write(&json, report.json()) {
        fail(&json, &err);
    }
    println!("wrote {json}");
    match report.plots(Path::new(&plots)) {
        Ok(files) => files.iter().for_each(|f| println!("wrote {f}")),
        Err(err) => fail("plots", &err),
    }
    let page = report.html(&descriptions, Path::new(&plots), &RunContext::new(elapsed));
    if let Err(err) = std::fs::write(&html, page) {
        fail(&html, &err);
    }
    let shown = std::fs::canonicalize(&html).map_or(html.clone(), |p| p.display().to_string());
    println!("report: {shown}");
}
