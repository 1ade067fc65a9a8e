//! Shared by the examples: logging to standard error, filtered by `RUST_LOG`.

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
