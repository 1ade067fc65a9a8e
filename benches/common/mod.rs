//! Shared by the pass-through benches: runtimes, a driver that sends requests through a
//! service from one task or from two at once, and the Prometheus recorder.
//!
//! `name/1_task` runs on a current-thread runtime (the cost of the layer alone);
//! `name/2_tasks` on two worker threads (the cost under contention). Each bench runs its
//! groups twice: without a metrics recorder, then with the Prometheus recorder installed
//! (groups named `<group>_prometheus`).
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::fmt::Debug;
use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::BenchmarkGroup;
use tokio::runtime::Runtime;
use tokio::task::JoinSet;
use tower::{service_fn, Service, ServiceExt};

/// Installs the Prometheus recorder for the rest of the process (once), with a thread
/// draining its histogram buffers every 5 s, as the README tells users to (and as the
/// examples do): without a drain the buffers grow with every sample, and the run would
/// measure the page faults of that growth as well as the layers.
pub fn install_prometheus() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .expect("install the Prometheus recorder");
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_secs(5));
            handle.run_upkeep();
        });
    });
}

/// The group name for this recorder mode.
pub fn group_name(base: &str, prometheus: bool) -> String {
    if prometheus {
        format!("{base}_prometheus")
    } else {
        base.to_string()
    }
}

/// One task, one thread: what the layer alone costs.
pub fn current_thread() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The innermost service: always ready, answers at once.
pub fn echo() -> impl Service<u64, Response = u64, Error = Infallible, Future = impl Send>
       + Clone
       + Send
       + Sync
       + 'static {
    service_fn(|n: u64| std::future::ready(Ok::<_, Infallible>(n)))
}

/// `ready` + `call` + `.await`, `iters` times in all, split over `tasks` tasks each with its
/// own service from `make` (a clone, for services that are `Clone`).
pub async fn drive<S>(make: impl Fn() -> S, iters: u64, tasks: u64) -> Duration
where
    S: Service<u64> + Send + 'static,
    S::Error: Debug + Send,
    S::Response: Send,
    S::Future: Send,
{
    let start = std::time::Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..tasks {
        let mut svc = make();
        set.spawn(async move {
            for i in 0..iters.div_ceil(tasks) {
                let ready = svc.ready().await.unwrap();
                black_box(ready.call(black_box(i)).await.unwrap());
            }
        });
    }
    while set.join_next().await.is_some() {}
    start.elapsed()
}

/// Registers `name/1_task` and `name/2_tasks` for clones of `svc`.
pub fn bench<S>(group: &mut BenchmarkGroup<'_, WallTime>, rt: &Runtime, name: &str, svc: S)
where
    S: Service<u64> + Clone + Send + 'static,
    S::Error: Debug + Send,
    S::Response: Send,
    S::Future: Send,
{
    bench_with(group, rt, name, move || svc.clone());
}

/// Registers `name/1_task` and `name/2_tasks`, each task with a service from `make`.
pub fn bench_with<S>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    name: &str,
    make: impl Fn() -> S + Clone,
) where
    S: Service<u64> + Send + 'static,
    S::Error: Debug + Send,
    S::Response: Send,
    S::Future: Send,
{
    let single = current_thread();
    for tasks in [1u64, 2] {
        let id = format!("{name}/{tasks}_task{}", if tasks > 1 { "s" } else { "" });
        let rt = if tasks == 1 { &single } else { rt };
        group.bench_function(id, |b| {
            b.to_async(rt)
                .iter_custom(|iters| drive(make.clone(), iters, tasks))
        });
    }
}

pub mod tower_metrics;
pub mod tower_policies;
