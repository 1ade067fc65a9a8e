//! Pass-through overhead of a retry layer whose first attempt always succeeds, beside
//! tower's `Retry` and tower-resilience's retry, in the same run.
#![allow(missing_docs)]

mod common;

use std::convert::Infallible;
use std::future::Ready;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use tower::Layer;

/// tower's retry with its `TpsBudget`, deposited on success and withdrawn per retry: the
/// same job as towerguard's budgeted retry.
#[derive(Clone)]
struct Budgeted {
    attempts: usize,
    budget: std::sync::Arc<tower::retry::budget::TpsBudget>,
}

impl tower::retry::Policy<u64, u64, Infallible> for Budgeted {
    type Future = Ready<()>;

    fn retry(
        &mut self,
        _req: &mut u64,
        result: &mut Result<u64, Infallible>,
    ) -> Option<Self::Future> {
        use tower::retry::budget::Budget;
        match result {
            Ok(_) => {
                self.budget.deposit();
                None
            }
            Err(_) if self.attempts > 0 && self.budget.withdraw() => {
                self.attempts -= 1;
                Some(std::future::ready(()))
            }
            Err(_) => None,
        }
    }

    fn clone_request(&mut self, req: &u64) -> Option<u64> {
        Some(*req)
    }
}

fn retry_in(c: &mut Criterion, prometheus: bool) {
    let rt = common::runtime();
    let mut group = c.benchmark_group(common::group_name("retry", prometheus));
    common::bench(&mut group, &rt, "bare", common::echo());
    common::bench(
        &mut group,
        &rt,
        "towerguard",
        towerguard::retry::RetryLayer::builder()
            .build()
            .layer(common::echo()),
    );
    common::bench(
        &mut group,
        &rt,
        "towerguard_without_budget",
        towerguard::retry::RetryLayer::builder()
            .without_budget()
            .build()
            .layer(common::echo()),
    );
    common::bench(
        &mut group,
        &rt,
        "tower_retry",
        tower::retry::RetryLayer::new(common::tower_policies::Attempts(2)).layer(common::echo()),
    );
    if prometheus {
        // tower records nothing: this is tower's retry with the retry's metric added.
        common::bench(
            &mut group,
            &rt,
            "tower_retry_same_metrics",
            tower::ServiceBuilder::new()
                .layer(tower::retry::RetryLayer::new(
                    common::tower_policies::Attempts(2),
                ))
                .layer(common::tower_metrics::CountAttemptsLayer)
                .service(common::echo()),
        );
    }
    common::bench(
        &mut group,
        &rt,
        "tower_retry_tps_budget",
        tower::retry::RetryLayer::new(Budgeted {
            attempts: 2,
            budget: std::sync::Arc::new(tower::retry::budget::TpsBudget::new(
                Duration::from_secs(10),
                10,
                0.2,
            )),
        })
        .layer(common::echo()),
    );
    common::bench(
        &mut group,
        &rt,
        "tower_resilience_retry",
        tower_resilience::retry::RetryLayer::<u64, u64, Infallible>::builder()
            .max_attempts(3)
            .exponential_backoff(Duration::from_millis(25))
            .build()
            .layer(common::echo()),
    );
    group.finish();
}

fn retry(c: &mut Criterion) {
    retry_in(c, false);
}

fn retry_prometheus(c: &mut Criterion) {
    common::install_prometheus();
    retry_in(c, true);
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = retry, retry_prometheus
}
criterion_main!(benches);
