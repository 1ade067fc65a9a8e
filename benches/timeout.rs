//! Pass-through overhead of a timeout that never fires, beside tower's `Timeout` and
//! tower-resilience's time limiter, in the same run.
#![allow(missing_docs)]

mod common;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use tower::Layer;

fn timeout_in(c: &mut Criterion, prometheus: bool) {
    let rt = common::runtime();
    let mut group = c.benchmark_group(common::group_name("timeout", prometheus));
    let limit = Duration::from_secs(1);
    common::bench(&mut group, &rt, "bare", common::echo());
    common::bench(
        &mut group,
        &rt,
        "towerguard",
        towerguard::timeout::TimeoutLayer::new(limit).layer(common::echo()),
    );
    common::bench(
        &mut group,
        &rt,
        "tower_timeout",
        tower::timeout::TimeoutLayer::new(limit).layer(common::echo()),
    );
    if prometheus {
        // tower records nothing: this is tower's timeout with the timeout's metrics added.
        common::bench(
            &mut group,
            &rt,
            "tower_timeout_same_metrics",
            common::tower_metrics::timeout_metrics(
                tower::timeout::TimeoutLayer::new(limit).layer(common::echo()),
            ),
        );
    }
    common::bench(
        &mut group,
        &rt,
        "tower_resilience_time_limiter",
        tower_resilience::timelimiter::TimeLimiterLayer::builder()
            .timeout_duration(limit)
            .build()
            .layer(common::echo()),
    );
    group.finish();
}

fn timeout(c: &mut Criterion) {
    timeout_in(c, false);
}

fn timeout_prometheus(c: &mut Criterion) {
    common::install_prometheus();
    timeout_in(c, true);
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = timeout, timeout_prometheus
}
criterion_main!(benches);
