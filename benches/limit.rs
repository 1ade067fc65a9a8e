//! Pass-through overhead of a concurrency limit that never fills, beside tower's
//! `ConcurrencyLimit` and tower-resilience's bulkhead, in the same run.
#![allow(missing_docs)]

mod common;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use tower::Layer;

fn limit_in(c: &mut Criterion, prometheus: bool) {
    let rt = common::runtime();
    let mut group = c.benchmark_group(common::group_name("limit", prometheus));
    common::bench(&mut group, &rt, "bare", common::echo());
    common::bench(
        &mut group,
        &rt,
        "towerguard_static",
        towerguard::limit::ConcurrencyLimitLayer::new(1_000).layer(common::echo()),
    );
    common::bench(
        &mut group,
        &rt,
        "towerguard_vegas",
        towerguard::limit::ConcurrencyLimitLayer::builder()
            .adaptive(towerguard::limit::adaptive::Vegas::new(1_000, 1, 10_000))
            .build()
            .layer(common::echo()),
    );
    common::bench(
        &mut group,
        &rt,
        "tower_concurrency_limit",
        tower::limit::ConcurrencyLimitLayer::new(1_000).layer(common::echo()),
    );
    if prometheus {
        // tower records nothing: this is tower's limit with the limit's metrics added.
        common::bench(
            &mut group,
            &rt,
            "tower_concurrency_limit_same_metrics",
            common::tower_metrics::limit_metrics(
                tower::limit::ConcurrencyLimitLayer::new(1_000).layer(common::echo()),
            ),
        );
    }
    common::bench(
        &mut group,
        &rt,
        "tower_resilience_bulkhead",
        tower_resilience::bulkhead::BulkheadLayer::builder()
            .max_concurrent_calls(1_000)
            .build()
            .unwrap()
            .layer(common::echo()),
    );
    group.finish();
}

fn limit(c: &mut Criterion) {
    limit_in(c, false);
}

fn limit_prometheus(c: &mut Criterion) {
    common::install_prometheus();
    limit_in(c, true);
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = limit, limit_prometheus
}
criterion_main!(benches);
