//! Pass-through overhead of a hedge layer whose first attempt always answers at once,
//! beside tower's `Hedge` and tower-resilience's hedge, in the same run.
#![allow(missing_docs)]

mod common;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use tower::Layer;

fn hedge_in(c: &mut Criterion, prometheus: bool) {
    let rt = common::runtime();
    let _guard = rt.enter();
    let mut group = c.benchmark_group(common::group_name("hedge", prometheus));
    common::bench(&mut group, &rt, "bare", common::echo());
    common::bench(
        &mut group,
        &rt,
        "towerguard_percentile",
        towerguard::hedge::HedgeLayer::builder()
            .build()
            .layer(common::echo()),
    );
    common::bench(
        &mut group,
        &rt,
        "towerguard_fixed",
        towerguard::hedge::HedgeLayer::builder()
            .fixed_delay(Duration::from_millis(5))
            .build()
            .layer(common::echo()),
    );
    // tower's Hedge is not `Clone`: each task gets its own (and its own histogram).
    common::bench_with(&mut group, &rt, "tower_hedge", || {
        tower::hedge::Hedge::new(
            common::echo(),
            common::tower_policies::ClonePolicy,
            10,
            0.95,
            Duration::from_secs(1),
        )
    });
    common::bench(
        &mut group,
        &rt,
        "tower_resilience_hedge",
        tower_resilience::hedge::HedgeLayer::builder()
            .delay(Duration::from_millis(5))
            .max_hedged_attempts(2)
            .build()
            .layer(common::echo()),
    );
    group.finish();
}

fn hedge(c: &mut Criterion) {
    hedge_in(c, false);
}

fn hedge_prometheus(c: &mut Criterion) {
    common::install_prometheus();
    hedge_in(c, true);
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = hedge, hedge_prometheus
}
criterion_main!(benches);
