//! The full stack's pass-through overhead, and a cache hit through the full stack, beside
//! the same order of layers assembled from tower's built-ins and from tower-resilience, in
//! the same run.
//!
//! Order: (cache), total timeout, concurrency limit, retry, hedge, attempt timeout, over an
//! always-ready service that answers at once. tower's `Hedge` is not `Clone`, so its stack
//! puts it behind a `Buffer`, as a tower user has to.
#![allow(missing_docs)]

mod common;

use std::convert::Infallible;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use tower::{Layer, ServiceBuilder};
use towerguard::cache::CacheLayer;
use towerguard::stack::StackBuilder;

fn stack_in(c: &mut Criterion, prometheus: bool) {
    let rt = common::runtime();
    let _guard = rt.enter();
    let mut group = c.benchmark_group(common::group_name("stack", prometheus));
    common::bench(&mut group, &rt, "bare", common::echo());

    let builder = StackBuilder::new()
        .static_limit(1_000)
        .without_queue()
        .hedge(Duration::from_millis(5));
    let towerguard = builder.build().unwrap().layer(common::echo());
    common::bench(&mut group, &rt, "towerguard", towerguard);

    let tower_stack = ServiceBuilder::new()
        .timeout(Duration::from_secs(10))
        .concurrency_limit(1_000)
        .layer(tower::retry::RetryLayer::new(
            common::tower_policies::Attempts(2),
        ))
        .buffer(1_024)
        .layer_fn(|s| {
            tower::hedge::Hedge::new(
                s,
                common::tower_policies::ClonePolicy,
                10,
                0.95,
                Duration::from_secs(1),
            )
        })
        .timeout(Duration::from_secs(3))
        .service(common::echo());
    common::bench(&mut group, &rt, "tower", tower_stack);

    let resilience = ServiceBuilder::new()
        .layer(
            tower_resilience::timelimiter::TimeLimiterLayer::builder()
                .timeout_duration(Duration::from_secs(10))
                .build(),
        )
        .layer(
            tower_resilience::bulkhead::BulkheadLayer::builder()
                .max_concurrent_calls(1_000)
                .build()
                .unwrap(),
        )
        .layer(
            tower_resilience::retry::RetryLayer::<u64, u64, _>::builder()
                .max_attempts(3)
                .exponential_backoff(Duration::from_millis(25))
                .build(),
        )
        .layer(
            tower_resilience::hedge::HedgeLayer::builder()
                .delay(Duration::from_millis(5))
                .max_hedged_attempts(2)
                .build(),
        )
        // The hedge needs a cloneable error; the time limiter's is not.
        .map_err(|e: tower_resilience::timelimiter::TimeLimiterError<Infallible>| e.to_string())
        .layer(
            tower_resilience::timelimiter::TimeLimiterLayer::builder()
                .timeout_duration(Duration::from_secs(3))
                .build(),
        )
        .service(common::echo());
    common::bench(&mut group, &rt, "tower_resilience", resilience);
    group.finish();

    // A cache hit through the full stack.
    let mut group = c.benchmark_group(common::group_name("stack_cache_hit", prometheus));
    let cache = CacheLayer::builder(|k: &u64| Some(*k % 16)).build();
    let cached = builder
        .build_with_cache(cache)
        .unwrap()
        .layer(common::echo());
    common::bench(&mut group, &rt, "towerguard", cached);
    let resilience_cached = ServiceBuilder::new()
        .layer(
            tower_resilience::cache::CacheLayer::builder()
                .max_size(10_000)
                .key_extractor(|k: &u64| *k % 16)
                .build()
                .unwrap(),
        )
        .layer(
            tower_resilience::timelimiter::TimeLimiterLayer::builder()
                .timeout_duration(Duration::from_secs(10))
                .build(),
        )
        .service(common::echo());
    common::bench(&mut group, &rt, "tower_resilience", resilience_cached);
    group.finish();
}

fn stack(c: &mut Criterion) {
    stack_in(c, false);
}

fn stack_prometheus(c: &mut Criterion) {
    common::install_prometheus();
    stack_in(c, true);
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = stack, stack_prometheus
}
criterion_main!(benches);
