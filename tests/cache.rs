//! Integration tests of the single-flight cache layer.

mod support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_test::{assert_pending, task};
use tower::{Layer, Service, ServiceExt};
use towerguard::cache::{Cache, CacheHandle, CacheLayer, Lifetime, ResponseFuture, Storable};
use towerguard::{Error, ErrorKind};

use support::{Metrics, Outcome, Probe, Upstream};

type Svc = Cache<Upstream, String, String, String>;

fn key(k: &str) -> String {
    k.to_owned()
}

/// A cache keyed by the request itself; requests starting with `nocache` bypass it.
fn builder() -> towerguard::cache::CacheBuilder<String, String, String> {
    CacheLayer::builder(|req: &String| (!req.starts_with("nocache")).then(|| req.clone()))
}

fn cache(upstream: &Upstream) -> (Svc, CacheHandle<String, String>) {
    with(builder(), upstream)
}

fn with(
    builder: towerguard::cache::CacheBuilder<String, String, String>,
    upstream: &Upstream,
) -> (Svc, CacheHandle<String, String>) {
    let layer = builder.build();
    let handle = layer.handle();
    (layer.layer(upstream.clone()), handle)
}

async fn get(svc: &mut Svc, k: &str) -> Result<String, Error> {
    svc.ready().await?.call(key(k)).await
}

/// Calls without awaiting: the caller has joined (or started) the key's flight on return.
async fn start(svc: &mut Svc, k: &str) -> ResponseFuture<Upstream, String, String, String> {
    svc.ready().await.unwrap().call(key(k))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_concurrent_callers_of_one_key_make_one_upstream_call() {
    const CALLERS: usize = 10_000;
    let upstream = Upstream::new();
    upstream.close();
    let (svc, handle) = cache(&upstream);
    let barrier = Arc::new(tokio::sync::Barrier::new(CALLERS));
    let joined = Arc::new(tokio::sync::Semaphore::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..CALLERS {
        let mut svc = svc.clone();
        let barrier = barrier.clone();
        let joined = joined.clone();
        tasks.spawn(async move {
            barrier.wait().await;
            let fut = svc.ready().await.unwrap().call(key("hot"));
            joined.add_permits(1);
            fut.await
        });
    }
    // Every caller has joined before the upstream may answer.
    let all = joined.acquire_many(CALLERS as u32).await.unwrap();
    all.forget();
    assert_eq!(handle.flights_in_progress(), 1);
    upstream.open();
    let mut values = 0;
    while let Some(result) = tasks.join_next().await {
        assert_eq!(result.unwrap().unwrap(), "hot#1");
        values += 1;
    }
    assert_eq!(values, CALLERS);
    assert_eq!(upstream.calls(), 1);
    assert_eq!(handle.flights_in_progress(), 0);
}

#[tokio::test]
async fn first_caller_dropped_mid_flight_others_still_get_the_same_upstream_result() {
    let upstream = Upstream::new();
    upstream.close();
    let (mut svc, _handle) = cache(&upstream);

    let mut first = task::spawn(start(&mut svc, "k").await);
    assert_pending!(first.poll());
    assert_eq!(
        upstream.started.load(Ordering::SeqCst),
        1,
        "first caller drives the call"
    );
    let mut others = Vec::new();
    for _ in 0..5 {
        others.push(start(&mut svc, "k").await);
    }
    drop(first);

    upstream.open();
    for other in others {
        assert_eq!(other.await.unwrap(), "k#1");
    }
    assert_eq!(upstream.calls(), 1);
    assert_eq!(upstream.dropped_unfinished.load(Ordering::SeqCst), 0);
    assert_eq!(upstream.finished.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn every_caller_dropped_drops_the_upstream_future_and_the_next_call_starts_afresh() {
    let upstream = Upstream::new();
    upstream.close();
    let (mut svc, handle) = cache(&upstream);

    let mut callers = Vec::new();
    for _ in 0..3 {
        callers.push(task::spawn(start(&mut svc, "k").await));
    }
    for caller in &mut callers {
        assert_pending!(caller.poll());
    }
    assert_eq!(upstream.started.load(Ordering::SeqCst), 1);
    assert_eq!(handle.flights_in_progress(), 1);

    drop(callers);
    assert_eq!(upstream.dropped_unfinished.load(Ordering::SeqCst), 1);
    assert_eq!(handle.flights_in_progress(), 0);

    upstream.open();
    assert_eq!(get(&mut svc, "k").await.unwrap(), "k#2");
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test]
async fn upstream_panic_reaches_every_waiter_as_panicked_and_the_key_recovers() {
    let upstream = Upstream::scripted(|n, key| match n {
        1 => Outcome::Panic("upstream blew up"),
        _ => Outcome::Ok(format!("{key}#{n}")),
    });
    upstream.close();
    let (mut svc, handle) = cache(&upstream);

    let mut waiters = JoinSet::new();
    for _ in 0..4 {
        waiters.spawn(start(&mut svc, "k").await);
    }
    upstream.open();
    let mut panicked = 0;
    while let Some(result) = waiters.join_next().await {
        let err = result
            .expect("the waiter's own task does not panic")
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Panicked);
        assert_eq!(err.panic_message(), Some("upstream blew up"));
        panicked += 1;
    }
    assert_eq!(panicked, 4);
    assert_eq!(handle.flights_in_progress(), 0);
    assert_eq!(get(&mut svc, "k").await.unwrap(), "k#2");
}

#[tokio::test]
async fn upstream_error_reaches_every_waiter_and_is_not_cached() {
    let upstream = Upstream::scripted(|n, key| match n {
        1 => Outcome::Err("backend down"),
        _ => Outcome::Ok(format!("{key}#{n}")),
    });
    upstream.close();
    let (mut svc, _handle) = cache(&upstream);

    let mut waiters = Vec::new();
    for _ in 0..3 {
        waiters.push(start(&mut svc, "k").await);
    }
    upstream.open();
    for waiter in waiters {
        let err = waiter.await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Inner);
        assert_eq!(
            err.source_as::<support::TestError>().unwrap().0,
            "backend down"
        );
    }
    assert_eq!(upstream.calls(), 1);
    assert_eq!(get(&mut svc, "k").await.unwrap(), "k#2");
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn negative_cache_serves_the_error_until_its_ttl_passes() {
    let upstream = Upstream::scripted(|n, key| match n {
        1 => Outcome::Err("backend down"),
        _ => Outcome::Ok(format!("{key}#{n}")),
    });
    let (mut svc, _handle) = with(builder().negative_ttl(Duration::from_secs(5)), &upstream);

    assert!(get(&mut svc, "k").await.is_err());
    tokio::time::advance(Duration::from_secs(4)).await;
    let err = get(&mut svc, "k").await.unwrap_err();
    assert_eq!(
        err.source_as::<support::TestError>().unwrap().0,
        "backend down"
    );
    assert_eq!(upstream.calls(), 1, "served from the negative cache");

    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(get(&mut svc, "k").await.unwrap(), "k#2");
}

#[tokio::test(start_paused = true)]
async fn ttl_expires_an_entry_on_paused_time() {
    let upstream = Upstream::new();
    let (mut svc, _handle) = with(builder().ttl(Duration::from_secs(10)), &upstream);

    assert_eq!(get(&mut svc, "k").await.unwrap(), "k#1");
    tokio::time::advance(Duration::from_millis(9_999)).await;
    assert_eq!(get(&mut svc, "k").await.unwrap(), "k#1");
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(get(&mut svc, "k").await.unwrap(), "k#2");
}

#[tokio::test(start_paused = true)]
async fn idle_time_expires_an_unread_entry_while_reads_keep_it() {
    let upstream = Upstream::new();
    let (mut svc, _handle) = with(builder().time_to_idle(Duration::from_secs(5)), &upstream);

    assert_eq!(get(&mut svc, "k").await.unwrap(), "k#1");
    for _ in 0..4 {
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(
            get(&mut svc, "k").await.unwrap(),
            "k#1",
            "read within the idle time"
        );
    }
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(get(&mut svc, "k").await.unwrap(), "k#2", "idle for 5 s");
}

#[tokio::test(start_paused = true)]
async fn per_entry_ttl_from_the_storability_predicate_overrides_the_default() {
    let upstream = Upstream::new();
    let builder = builder()
        .ttl(Duration::from_secs(60))
        .storable(|value: &String| {
            if value.starts_with("short") {
                Storable::For(Lifetime::fresh_for(Duration::from_secs(2)))
            } else if value.starts_with("never") {
                Storable::No
            } else {
                Storable::Default
            }
        });
    let (mut svc, _handle) = with(builder, &upstream);

    get(&mut svc, "short").await.unwrap();
    get(&mut svc, "long").await.unwrap();
    get(&mut svc, "never").await.unwrap();
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(
        get(&mut svc, "short").await.unwrap(),
        "short#4",
        "per-entry TTL passed"
    );
    assert_eq!(
        get(&mut svc, "long").await.unwrap(),
        "long#2",
        "default TTL still fresh"
    );
    assert_eq!(
        get(&mut svc, "never").await.unwrap(),
        "never#5",
        "never stored"
    );
}

#[tokio::test(start_paused = true)]
async fn stale_while_revalidate_serves_stale_at_once_and_refreshes_once() {
    let upstream = Upstream::new();
    let builder = builder()
        .ttl(Duration::from_secs(10))
        .stale_while_revalidate(Duration::from_secs(5));
    let (mut svc, handle) = with(builder, &upstream);

    assert_eq!(get(&mut svc, "k").await.unwrap(), "k#1");
    tokio::time::advance(Duration::from_secs(11)).await;
    upstream.close();
    for _ in 0..50 {
        assert_eq!(
            get(&mut svc, "k").await.unwrap(),
            "k#1",
            "stale served at once"
        );
    }
    assert_eq!(
        handle.flights_in_progress(),
        1,
        "one background refresh under way"
    );

    let answered = upstream.answered.notified();
    upstream.open();
    answered.await;
    // The refresh stores its result in the same poll that produced it.
    assert_eq!(get(&mut svc, "k").await.unwrap(), "k#2");
    assert_eq!(upstream.calls(), 2, "one upstream call for 50 stale hits");

    tokio::time::advance(Duration::from_secs(16)).await;
    assert_eq!(
        get(&mut svc, "k").await.unwrap(),
        "k#3",
        "past the window: a plain miss"
    );
}

#[tokio::test(start_paused = true)]
async fn stale_if_error_serves_the_stale_entry_inside_its_window_only() {
    let upstream = Upstream::scripted(|n, key| match n {
        1 => Outcome::Ok(format!("{key}#{n}")),
        _ => Outcome::Err("backend down"),
    });
    let builder = builder()
        .ttl(Duration::from_secs(10))
        .stale_if_error(Duration::from_secs(30));
    let (mut svc, _handle) = with(builder, &upstream);

    assert_eq!(get(&mut svc, "k").await.unwrap(), "k#1");
    tokio::time::advance(Duration::from_secs(11)).await;
    assert_eq!(
        get(&mut svc, "k").await.unwrap(),
        "k#1",
        "failed flight, stale served"
    );
    assert_eq!(
        upstream.calls(),
        2,
        "the expired entry was not served without trying"
    );

    tokio::time::advance(Duration::from_secs(29)).await;
    let err = get(&mut svc, "k").await.unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::Inner,
        "past the window the error comes through"
    );
    assert_eq!(upstream.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_failed_refresh_keeps_serving_the_stale_entry() {
    let upstream = Upstream::scripted(|n, key| match n {
        1 => Outcome::Ok(format!("{key}#{n}")),
        _ => Outcome::Err("backend down"),
    });
    let builder = builder()
        .ttl(Duration::from_secs(10))
        .stale_while_revalidate(Duration::from_secs(20));
    let (mut svc, handle) = with(builder, &upstream);

    get(&mut svc, "k").await.unwrap();
    tokio::time::advance(Duration::from_secs(11)).await;
    let answered = upstream.answered.notified();
    assert_eq!(get(&mut svc, "k").await.unwrap(), "k#1");
    answered.await;
    assert_eq!(handle.flights_in_progress(), 0);
    assert_eq!(
        get(&mut svc, "k").await.unwrap(),
        "k#1",
        "still inside the window"
    );
}

#[tokio::test]
async fn hits_never_touch_the_inner_service_or_its_readiness() {
    let upstream = Upstream::new();
    let probe = Probe::new(upstream.clone());
    let polls = probe.polls.clone();
    let calls = probe.calls.clone();
    let layer = builder().build();
    let mut svc = layer.layer(probe);

    for _ in 0..3 {
        let miss = svc.ready().await.unwrap().call(key("k"));
        assert_eq!(miss.await.unwrap(), "k#1");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        polls.load(Ordering::SeqCst),
        1,
        "only the miss drove readiness"
    );

    // Bypassed requests also drive their own clone to ready before calling it.
    let bypass = svc.ready().await.unwrap().call(key("nocache-1"));
    assert_eq!(bypass.await.unwrap(), "nocache-1#2");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(polls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn readiness_contract_holds_for_flights_started_from_clones() {
    let upstream = Upstream::new();
    upstream.close();
    let layer = builder().build();
    // The probe panics on a call without poll_ready; clones start not ready.
    let svc = layer.layer(Probe::new(upstream.clone()));
    let mut waiters = JoinSet::new();
    for i in 0..20 {
        let mut svc = svc.clone();
        waiters.spawn(async move { svc.ready().await?.call(format!("k{}", i % 4)).await });
    }
    upstream.open();
    while let Some(result) = waiters.join_next().await {
        assert!(result.unwrap().is_ok());
    }
    assert!(upstream.calls() <= 20);
}

#[tokio::test]
async fn requests_without_a_key_bypass_the_cache() {
    let upstream = Upstream::new();
    let (mut svc, handle) = cache(&upstream);
    assert_eq!(get(&mut svc, "nocache").await.unwrap(), "nocache#1");
    assert_eq!(get(&mut svc, "nocache").await.unwrap(), "nocache#2");
    handle.run_pending_tasks();
    assert_eq!(handle.entry_count(), 0);
}

#[tokio::test]
async fn clones_of_the_layer_and_service_share_one_store() {
    let upstream = Upstream::new();
    let layer = builder().build();
    let mut a = layer.layer(upstream.clone());
    let mut b = layer.clone().layer(upstream.clone());
    assert_eq!(
        a.ready().await.unwrap().call(key("k")).await.unwrap(),
        "k#1"
    );
    assert_eq!(
        b.ready().await.unwrap().call(key("k")).await.unwrap(),
        "k#1"
    );
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test]
async fn invalidate_removes_one_key_and_invalidate_all_removes_every_key() {
    let upstream = Upstream::new();
    let (mut svc, handle) = cache(&upstream);
    get(&mut svc, "a").await.unwrap();
    get(&mut svc, "b").await.unwrap();

    handle.invalidate(&key("a"));
    assert_eq!(get(&mut svc, "a").await.unwrap(), "a#3");
    assert_eq!(get(&mut svc, "b").await.unwrap(), "b#2");

    handle.invalidate_all();
    assert_eq!(get(&mut svc, "a").await.unwrap(), "a#4");
    assert_eq!(get(&mut svc, "b").await.unwrap(), "b#5");
}

#[tokio::test]
async fn a_flight_under_way_when_its_key_is_invalidated_is_not_stored() {
    let upstream = Upstream::new();
    upstream.close();
    let (mut svc, handle) = cache(&upstream);
    let old = start(&mut svc, "k").await;
    handle.invalidate(&key("k"));
    let new = start(&mut svc, "k").await;
    assert_eq!(upstream.calls(), 0, "nothing polled yet");
    upstream.open();
    assert_eq!(
        old.await.unwrap(),
        "k#1",
        "its waiters still get its result"
    );
    assert_eq!(
        new.await.unwrap(),
        "k#2",
        "a new flight after the invalidation"
    );
    assert_eq!(get(&mut svc, "k").await.unwrap(), "k#2");
}

#[tokio::test]
async fn max_entries_bounds_the_store() {
    let upstream = Upstream::new();
    let (mut svc, handle) = with(builder().max_entries(10), &upstream);
    for i in 0..100 {
        get(&mut svc, &format!("k{i}")).await.unwrap();
    }
    handle.run_pending_tasks();
    assert!(
        handle.entry_count() <= 10,
        "{} entries",
        handle.entry_count()
    );
}

#[tokio::test]
async fn max_weight_bounds_the_store_by_the_weigher() {
    let upstream = Upstream::new();
    let builder = builder().max_weight(100, |_k: &String, v: &String| v.len() as u32);
    let (mut svc, handle) = with(builder, &upstream);
    for i in 0..100 {
        get(&mut svc, &format!("key-{i:04}")).await.unwrap();
    }
    handle.run_pending_tasks();
    assert!(
        handle.weighted_size() <= 100,
        "weighted size {}",
        handle.weighted_size()
    );
    assert!(handle.entry_count() >= 1);
}

#[tokio::test]
async fn an_entry_heavier_than_a_quarter_of_max_weight_is_not_stored() {
    let upstream = Upstream::new();
    // A quarter of 100 is 25, and an entry may fill 97% of it: 24.
    let weigh = |k: &String, _v: &String| if k.starts_with("big") { 25 } else { 24 };
    let (mut svc, handle) = with(builder().max_weight(100, weigh), &upstream);
    assert_eq!(get(&mut svc, "big").await.unwrap(), "big#1");
    assert_eq!(get(&mut svc, "big").await.unwrap(), "big#2");
    assert_eq!(get(&mut svc, "small").await.unwrap(), "small#3");
    assert_eq!(get(&mut svc, "small").await.unwrap(), "small#3");
    assert_eq!(handle.entry_count(), 1);
    assert_eq!(handle.weighted_size(), 24);
}

#[tokio::test]
async fn an_entry_the_weigher_gives_zero_still_counts_toward_the_bound() {
    let upstream = Upstream::new();
    let (mut svc, handle) = with(
        builder().max_weight(8, |_: &String, _: &String| 0),
        &upstream,
    );
    for i in 0..100 {
        get(&mut svc, &format!("key-{i:04}")).await.unwrap();
    }
    assert!(
        handle.entry_count() <= 8,
        "{} entries",
        handle.entry_count()
    );
}

#[tokio::test]
async fn max_entries_of_zero_stores_nothing_but_still_answers() {
    let upstream = Upstream::new();
    let (mut svc, handle) = with(builder().max_entries(0), &upstream);
    assert_eq!(get(&mut svc, "a").await.unwrap(), "a#1");
    assert_eq!(get(&mut svc, "a").await.unwrap(), "a#2");
    assert_eq!(handle.entry_count(), 0);
}

#[tokio::test]
async fn past_max_flights_a_miss_goes_upstream_uncoalesced() {
    let upstream = Upstream::new();
    upstream.close();
    let (mut svc, handle) = with(builder().max_flights(1), &upstream);
    let a = start(&mut svc, "a").await;
    let b1 = start(&mut svc, "b").await;
    let b2 = start(&mut svc, "b").await;
    assert_eq!(handle.flights_in_progress(), 1);
    upstream.open();
    assert_eq!(a.await.unwrap(), "a#1");
    let (b1, b2) = (b1.await.unwrap(), b2.await.unwrap());
    assert_ne!(b1, b2, "two separate upstream calls");
    assert_eq!(upstream.calls(), 3);
}

#[test]
fn every_listed_cache_metric_is_emitted_with_the_expected_values() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let upstream = Upstream::scripted(|n, key| match key {
        "panics" => Outcome::Panic("boom"),
        "fails" => Outcome::Err("down"),
        // Their first calls are the 5th and 6th; every later one fails.
        "swr" | "sie" if n > 6 => Outcome::Err("down"),
        _ => Outcome::Ok(format!("{key}#{n}")),
    });
    let layer = metrics::with_local_recorder(&recorder, || {
        builder()
            .name("m")
            .max_entries(3)
            .ttl(Duration::from_secs(10))
            .stale_while_revalidate(Duration::from_secs(10))
            .stale_if_error(Duration::from_secs(30))
            .storable(|v: &String| {
                if v.starts_with("sie") {
                    Storable::For(
                        Lifetime::fresh_for(Duration::from_secs(1))
                            .stale_if_error(Duration::from_secs(60)),
                    )
                } else {
                    Storable::Default
                }
            })
            .build()
    });
    let handle = layer.handle();
    let mut svc = layer.layer(upstream.clone());

    let runtime = support::paused_runtime();
    runtime.block_on(async {
        // miss, then coalesced, then hit
        upstream.close();
        let a = start(&mut svc, "a").await;
        let b = start(&mut svc, "a").await;
        upstream.open();
        a.await.unwrap();
        b.await.unwrap();
        get(&mut svc, "a").await.unwrap();
        // bypass
        get(&mut svc, "nocache").await.unwrap();
        // upstream errors of both kinds
        get(&mut svc, "fails").await.unwrap_err();
        get(&mut svc, "panics").await.unwrap_err();
        // stale-if-error: "sie" is fresh for 1 s, then its refresh fails
        get(&mut svc, "sie").await.unwrap();
        // stale-while-revalidate with a refresh
        get(&mut svc, "swr").await.unwrap();
        tokio::time::advance(Duration::from_secs(11)).await;
        let answered = upstream.answered.notified();
        assert_eq!(get(&mut svc, "swr").await.unwrap(), "swr#6");
        answered.await;
        // "sie" is past fresh: its flight fails and the stale entry is served.
        assert_eq!(get(&mut svc, "sie").await.unwrap(), "sie#5");
        // "a" is past every window: removed as expired, then a plain miss.
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(get(&mut svc, "a").await.unwrap(), "a#9");
        // invalidation
        handle.invalidate(&key("swr"));
        // size evictions
        for i in 0..20 {
            get(&mut svc, &format!("fill{i}")).await.unwrap();
        }
        handle.run_pending_tasks();
    });

    let m = Metrics::from(&snapshotter);
    let req = |result| {
        m.counter(
            "towerguard_cache_requests_total",
            &[("name", "m"), ("result", result)],
        )
    };
    assert_eq!(req("coalesced"), 1);
    assert_eq!(req("hit"), 1);
    assert_eq!(req("bypass"), 1);
    assert_eq!(req("stale"), 1);
    // a, fails, panics, sie, swr, sie again, a again, fill0..19
    assert_eq!(req("miss"), 27);
    let flights = m.histogram_len("towerguard_cache_flight_duration_seconds", &[("name", "m")]);
    assert_eq!(
        flights, 28,
        "one duration per flight: 27 misses and 1 refresh"
    );
    let errors = |kind| {
        m.counter(
            "towerguard_cache_upstream_errors_total",
            &[("name", "m"), ("kind", kind)],
        )
    };
    assert_eq!(
        errors("error"),
        3,
        "fails, the swr refresh and the sie flight"
    );
    assert_eq!(errors("panicked"), 1);
    assert_eq!(
        m.counter("towerguard_cache_refreshes_total", &[("name", "m")]),
        1
    );
    assert_eq!(
        m.counter("towerguard_cache_stale_if_error_total", &[("name", "m")]),
        1
    );
    let evictions = |cause| {
        m.counter(
            "towerguard_cache_evictions_total",
            &[("name", "m"), ("cause", cause)],
        )
    };
    assert!(evictions("size") >= 1);
    assert_eq!(evictions("expired"), 1);
    assert_eq!(evictions("invalidated"), 1);
    assert_eq!(
        m.gauge("towerguard_cache_entries", &[("name", "m")]),
        handle.entry_count() as f64
    );
    assert_eq!(
        m.gauge("towerguard_cache_weighted_size", &[("name", "m")]),
        handle.weighted_size() as f64
    );

    let listed: Vec<_> = towerguard::metrics::METRICS
        .iter()
        .filter(|info| info.name.starts_with("towerguard_cache_"))
        .map(|info| info.name.to_owned())
        .collect();
    let emitted = m.names();
    for name in &listed {
        assert!(emitted.contains(name), "{name} listed but not emitted");
    }
    for name in emitted
        .iter()
        .filter(|n| n.starts_with("towerguard_cache_"))
    {
        assert!(listed.contains(name), "{name} emitted but not listed");
    }
}

#[test]
fn public_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Svc>();
    send_sync::<CacheLayer<String, String, String>>();
    send_sync::<CacheHandle<String, String>>();
    send_sync::<Error>();
    send::<ResponseFuture<Upstream, String, String, String>>();
}

/// Records, when dropped, whether the token it watches was cancelled.
struct Observe(
    tokio_util::sync::CancellationToken,
    Arc<std::sync::atomic::AtomicBool>,
);

impl Drop for Observe {
    fn drop(&mut self) {
        self.1.store(self.0.is_cancelled(), Ordering::SeqCst);
    }
}

/// An upstream that listens to its timeout context's token, as the timeout docs invite:
/// it answers when the gate opens, or gives up when its token is cancelled.
#[allow(clippy::type_complexity)]
fn listening_upstream(
    gate: tokio::sync::watch::Receiver<bool>,
    arrived: Arc<tokio::sync::Semaphore>,
    calls: Arc<std::sync::atomic::AtomicUsize>,
    cancelled: Arc<std::sync::atomic::AtomicBool>,
) -> tower::util::ServiceFn<
    impl Fn(
            String,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<String, towerguard::BoxError>> + Send>,
        > + Clone,
> {
    tower::service_fn(move |k: String| {
        let (mut gate, arrived, cancelled) = (gate.clone(), arrived.clone(), cancelled.clone());
        calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            let token = towerguard::timeout::TimeoutContext::current()
                .expect("the flight's context")
                .token();
            let _observe = Observe(token.clone(), cancelled);
            arrived.add_permits(1);
            tokio::select! {
                _ = token.cancelled() => Err("cancelled by caller".into()),
                _ = gate.wait_for(|open| *open) => Ok(format!("{k}!")),
            }
        }) as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>
    })
}

#[tokio::test(start_paused = true)]
async fn a_callers_timeout_or_drop_never_cancels_the_flight_others_wait_for() {
    use towerguard::timeout::TimeoutLayer;
    for how in ["timeout", "drop"] {
        let (open, gate) = tokio::sync::watch::channel(false);
        let arrived = Arc::new(tokio::sync::Semaphore::new(0));
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let cancelled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let upstream = listening_upstream(gate, arrived.clone(), calls.clone(), cancelled.clone());
        let cache = CacheLayer::builder(|k: &String| Some(k.clone())).build();
        let svc = cache.layer(upstream);
        let short = TimeoutLayer::new(Duration::from_millis(10)).layer(svc.clone());
        let long = TimeoutLayer::new(Duration::from_secs(1)).layer(svc.clone());

        // The first caller starts the flight and drives it.
        let first = match how {
            "timeout" => tokio::spawn(short.clone().oneshot("k".to_owned())),
            _ => tokio::spawn(long.clone().oneshot("k".to_owned())),
        };
        arrived.acquire().await.unwrap().forget();
        // Five more join it (each joined once `call` returns).
        let mut others = JoinSet::new();
        for _ in 0..5 {
            let mut svc = long.clone();
            let future = svc.ready().await.unwrap().call("k".to_owned());
            others.spawn(future);
        }
        match how {
            "timeout" => {
                let err = first.await.unwrap().unwrap_err();
                assert!(err.is(ErrorKind::TimedOut), "{how}: {err}");
            }
            _ => {
                first.abort();
                assert!(first.await.unwrap_err().is_cancelled());
            }
        }
        assert!(
            !cancelled.load(Ordering::SeqCst),
            "{how}: the flight was cancelled"
        );
        open.send_replace(true);
        while let Some(result) = others.join_next().await {
            assert_eq!(result.unwrap().unwrap(), "k!", "{how}");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "{how}: one upstream call");
    }
}

#[tokio::test(start_paused = true)]
async fn the_flight_token_is_cancelled_when_the_last_caller_leaves() {
    use towerguard::timeout::TimeoutLayer;
    let (_open, gate) = tokio::sync::watch::channel(false);
    let arrived = Arc::new(tokio::sync::Semaphore::new(0));
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let cancelled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let upstream = listening_upstream(gate, arrived.clone(), calls, cancelled.clone());
    let cache = CacheLayer::builder(|k: &String| Some(k.clone())).build();
    let handle = cache.handle();
    let svc = TimeoutLayer::new(Duration::from_secs(1)).layer(cache.layer(upstream));
    let callers: Vec<_> = (0..3)
        .map(|_| tokio::spawn(svc.clone().oneshot("k".to_owned())))
        .collect();
    arrived.acquire().await.unwrap().forget();
    for caller in &callers {
        caller.abort();
    }
    for caller in callers {
        let _ = caller.await;
    }
    assert!(
        cancelled.load(Ordering::SeqCst),
        "the upstream saw its token cancelled"
    );
    assert_eq!(handle.flights_in_progress(), 0);
}

/// Tagged by the first letter of the key: `a1` carries `a`.
fn tagged() -> towerguard::cache::CacheBuilder<String, String, String> {
    builder().tags(|key: &String, _value: &String| vec![key[..1].to_owned()])
}

#[tokio::test]
async fn invalidating_a_tag_removes_exactly_the_entries_that_carry_it() {
    let upstream = Upstream::new();
    let (mut svc, handle) = with(tagged(), &upstream);
    let mut first = Vec::new();
    for k in ["a1", "a2", "b1", "b2", "c1"] {
        first.push(get(&mut svc, k).await.unwrap());
    }
    handle.invalidate_tag("a");
    assert_eq!(handle.entry_count(), 3);
    // The others are hits: the same values, no upstream call.
    for (k, value) in ["b1", "b2", "c1"].into_iter().zip(&first[2..]) {
        assert_eq!(&get(&mut svc, k).await.unwrap(), value);
    }
    assert_eq!(upstream.calls(), 5);
    // The tagged ones go upstream again.
    assert_eq!(get(&mut svc, "a1").await.unwrap(), "a1#6");
    assert_eq!(get(&mut svc, "a2").await.unwrap(), "a2#7");
}

#[tokio::test]
async fn a_flight_under_way_when_a_tag_is_invalidated_is_not_stored() {
    let upstream = Upstream::new();
    upstream.close();
    let (mut svc, handle) = with(tagged(), &upstream);
    let old = start(&mut svc, "a1").await;
    // The flight's value will carry `a`; what it brings was fetched before the purge.
    handle.invalidate_tag("a");
    let new = start(&mut svc, "a1").await;
    upstream.open();
    assert_eq!(
        old.await.unwrap(),
        "a1#1",
        "its waiters still get its result"
    );
    assert_eq!(new.await.unwrap(), "a1#2", "a new flight after the purge");
    assert_eq!(get(&mut svc, "a1").await.unwrap(), "a1#2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn look_ups_go_on_while_a_tag_purge_scans_the_store() {
    // While the purge asks an entry for its tags, another thread looks that very key up
    // (same part of the store): the look-up must answer before the purge goes on. A purge
    // that held the store locked through its scan would keep it waiting; the wait is
    // bounded so that such a purge fails this test instead of hanging it.
    let upstream = Upstream::new();
    let service: Arc<std::sync::OnceLock<Svc>> = Arc::default();
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let runtime = tokio::runtime::Handle::current();
    let (svc, handle) = {
        let (service, answered) = (service.clone(), answered.clone());
        let stuck = Arc::new(std::sync::atomic::AtomicBool::new(false));
        with(
            builder().tags(move |key: &String, _value: &String| {
                if stuck.load(Ordering::SeqCst) {
                    return vec!["all".to_owned()];
                }
                let svc = service.get().expect("set before the purge").clone();
                let (tx, rx) = std::sync::mpsc::channel();
                let (key, runtime) = (key.clone(), runtime.clone());
                std::thread::spawn(move || {
                    let _ = tx.send(runtime.block_on(svc.oneshot(key)));
                });
                match rx.recv_timeout(Duration::from_secs(10)) {
                    Ok(Ok(_)) => {
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => stuck.store(true, Ordering::SeqCst),
                }
                vec!["all".to_owned()]
            }),
            &upstream,
        )
    };
    assert!(service.set(svc.clone()).is_ok(), "set once");
    let keys: Vec<String> = (0..64).map(|i| format!("k{i}")).collect();
    for k in &keys {
        svc.clone().oneshot(k.clone()).await.unwrap();
    }
    tokio::task::spawn_blocking(move || handle.invalidate_tag("all"))
        .await
        .unwrap();
    assert_eq!(answered.load(Ordering::SeqCst), keys.len());
    // Every look-up was a hit: the upstream saw only the first fill.
    assert_eq!(upstream.calls(), keys.len());
}
