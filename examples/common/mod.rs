//! Shared by the examples: logging to standard error, filtered by `RUST_LOG`, and the
//! Prometheus recorder. Each example uses what it needs.
#![allow(dead_code)]

/// Logs to standard error at `warn` unless `RUST_LOG` says otherwise;
/// `RUST_LOG=towerguard=debug` shows every layer's decisions.
pub(crate) fn init_tracing() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
}

/// Installs `metrics-exporter-prometheus`'s recorder and drains its histograms every 5 s.
///
/// The exporter keeps each histogram sample in a buffer until something drains it; the
/// recorder `install_recorder` makes leaves that to the caller, so without this task the
/// buffers grow with every request until the next scrape (about 20 bytes a request
/// through the proxy, with nobody scraping: without bound). Needs a Tokio runtime.
pub(crate) fn install_prometheus() -> Result<metrics_exporter_prometheus::PrometheusHandle, String>
{
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|err| format!("cannot install the metrics recorder: {err}"))?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}
