//! An invalidation is never undone: a value fetched before a purge, an invalidation, a tag
//! purge or an unsafe method's write-through is never stored after it, in memory or in
//! Redis, on any instance (contract 14). Each test holds an upstream call open across the
//! invalidation, bumps the upstream's version, then lets the call finish: its callers get
//! the old value, everybody after gets the new one. Over a `redis-server` of the test's own
//! (skipped without one unless `CI` is set).

#![cfg(feature = "redis")]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tower::{service_fn, Layer, ServiceExt};
use towerguard::cache::{CacheHandle, CacheLayer};
use towerguard::tier::{RedisTier, Utf8};

mod support;
use support::redis_server::RedisServer;

/// An upstream whose answers carry its version at the time of the call, and whose calls
/// can be held open until the test releases them.
struct Held {
    version: AtomicUsize,
    calls: AtomicUsize,
    hold: AtomicBool,
    started: Notify,
    release: Semaphore,
}

impl Held {
    fn new() -> Arc<Self> {
        Arc::new(Held {
            version: AtomicUsize::new(1),
            calls: AtomicUsize::new(0),
            hold: AtomicBool::new(false),
            started: Notify::new(),
            release: Semaphore::new(0),
        })
    }

    /// The answer for `key`, read now; held open until released when holding is on.
    async fn answer(self: Arc<Self>, key: String) -> String {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let version = self.version.load(Ordering::SeqCst);
        if self.hold.load(Ordering::SeqCst) {
            self.started.notify_one();
            self.release.acquire().await.unwrap().forget();
        }
        format!("{key} v{version}")
    }

    /// From now on calls answer at once with `version`.
    fn publish(&self, version: usize) {
        self.hold.store(false, Ordering::SeqCst);
        self.version.store(version, Ordering::SeqCst);
    }
}

type BoxService = tower::util::BoxCloneSyncService<String, String, towerguard::Error>;

fn tier(server: &RedisServer, prefix: &str) -> RedisTier {
    RedisTier::builder(server.url())
        .prefix(prefix)
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap()
}

/// Three instances of a tagged cache (a key's tag is its first `/` segment), each with its
/// own tier, sharing `held` as their upstream; returned once every one is subscribed.
async fn fleet(
    server: &RedisServer,
    prefix: &str,
    held: &Arc<Held>,
) -> Vec<(RedisTier, CacheHandle<String, String>, BoxService)> {
    let mut out = Vec::new();
    for i in 0..3 {
        let tier = tier(server, prefix);
        let layer = CacheLayer::builder(|key: &String| Some(key.clone()))
            .name(format!("inv-{i}"))
            .ttl(Duration::from_secs(60))
            .tags(|key: &String, _: &String| vec![key.split('/').next().unwrap().to_owned()])
            .second_tier(tier.clone(), |key: &String| key.clone(), Utf8)
            .build();
        let handle = layer.handle();
        let held = held.clone();
        let upstream = service_fn(move |key: String| {
            let held = held.clone();
            async move { Ok::<_, std::io::Error>(held.answer(key).await) }
        });
        let svc = tower::util::BoxCloneSyncService::new(layer.layer(upstream));
        tier.backplane().wait_for(|b| b.subscribed).await.unwrap();
        out.push((tier, handle, svc));
    }
    out
}

async fn get(svc: &BoxService, key: &str) -> String {
    svc.clone().oneshot(key.to_owned()).await.unwrap()
}

/// Starts a request for `key` on `svc` whose upstream call is held open; returns once the
/// call has started.
async fn held_request(
    held: &Arc<Held>,
    svc: &BoxService,
    key: &str,
) -> tokio::task::JoinHandle<String> {
    held.hold.store(true, Ordering::SeqCst);
    let started = held.started.notified();
    let svc = svc.clone();
    let key = key.to_owned();
    let request = tokio::spawn(async move { get(&svc, &key).await });
    started.await;
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_during_a_flight_leaves_the_next_caller_on_every_instance_with_the_new_value() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let held = Held::new();
    let fleet = fleet(&server, "inv-one:", &held).await;
    let first = held_request(&held, &fleet[0].2, "page/1").await;
    fleet[0].1.purge(&"page/1".to_owned()).await;
    held.publish(2);
    held.release.add_permits(1);
    // Joined before the purge: it may have the old value.
    assert_eq!(first.await.unwrap(), "page/1 v1");
    for (i, instance) in fleet.iter().enumerate() {
        assert_eq!(
            get(&instance.2, "page/1").await,
            "page/1 v2",
            "instance {i}"
        );
    }
    assert_eq!(held.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_on_one_instance_while_another_fetches_is_not_undone_by_that_fetch() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let held = Held::new();
    let fleet = fleet(&server, "inv-two:", &held).await;
    let fetching = held_request(&held, &fleet[1].2, "page/1").await;
    fleet[0].1.purge(&"page/1".to_owned()).await;
    held.publish(2);
    held.release.add_permits(1);
    assert_eq!(fetching.await.unwrap(), "page/1 v1");
    // Instance 1's write was refused in Redis, and kept out of its own first tier.
    for i in [1, 2, 0] {
        assert_eq!(
            get(&fleet[i].2, "page/1").await,
            "page/1 v2",
            "instance {i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_message_detaches_a_flight_for_a_key_the_first_tier_does_not_hold() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let held = Held::new();
    let fleet = fleet(&server, "inv-msg:", &held).await;
    let fetching = held_request(&held, &fleet[1].2, "page/1").await;
    let before = fleet[1].0.backplane().borrow().applied;
    fleet[0].1.purge(&"page/1".to_owned()).await;
    fleet[1]
        .0
        .backplane()
        .wait_for(|b| b.applied > before)
        .await
        .unwrap();
    held.publish(2);
    // A caller on instance 1 after the message does not join the flight from before it:
    // its own flight waits for that flight's lease, then calls the upstream.
    let svc = fleet[1].2.clone();
    let later = tokio::spawn(async move { get(&svc, "page/1").await });
    held.release.add_permits(1);
    assert_eq!(fetching.await.unwrap(), "page/1 v1");
    assert_eq!(later.await.unwrap(), "page/1 v2");
    assert_eq!(get(&fleet[1].2, "page/1").await, "page/1 v2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_purge_during_a_flight_keeps_its_value_out_of_both_tiers() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let held = Held::new();
    let fleet = fleet(&server, "inv-tag:", &held).await;
    // A flight on 2 for a key nobody has stored yet: no tag set in Redis names it.
    let fetching = held_request(&held, &fleet[2].2, "news/1").await;
    fleet[0].1.purge_tag("news").await;
    held.publish(2);
    held.release.add_permits(1);
    assert_eq!(fetching.await.unwrap(), "news/1 v1");
    for i in [2, 1, 0] {
        assert_eq!(
            get(&fleet[i].2, "news/1").await,
            "news/1 v2",
            "instance {i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_all_during_a_flight_keeps_its_value_out_of_both_tiers() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let held = Held::new();
    let fleet = fleet(&server, "inv-all:", &held).await;
    let fetching = held_request(&held, &fleet[1].2, "news/1").await;
    fleet[0].1.purge_all().await;
    held.publish(2);
    held.release.add_permits(1);
    assert_eq!(fetching.await.unwrap(), "news/1 v1");
    for i in [1, 2, 0] {
        assert_eq!(
            get(&fleet[i].2, "news/1").await,
            "news/1 v2",
            "instance {i}"
        );
    }
}

/// `purge_all` deletes in batches; writes landing meanwhile either go with it or keep
/// their tags, so a later `purge_tag` finds every value in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_all_racing_tagged_writes_leaves_nothing_a_later_purge_tag_misses() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let held = Held::new();
    held.hold.store(false, Ordering::SeqCst);
    let fleet = fleet(&server, "inv-race:", &held).await;
    for round in 0..20 {
        let writers: Vec<_> = (0..50)
            .map(|n| {
                let svc = fleet[n % 2].2.clone();
                tokio::spawn(async move { get(&svc, &format!("t/{round}-{n}")).await })
            })
            .collect();
        fleet[2].1.purge_all().await;
        for writer in writers {
            writer.await.unwrap();
        }
    }
    fleet[2].1.purge_tag("t").await;
    let client = redis::Client::open(server.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let left: Vec<String> = redis::cmd("KEYS")
        .arg("inv-race:v:*")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert!(left.is_empty(), "values a tag purge missed: {left:?}");
}

/// A purge deletes in Redis before it empties this instance's first tier: a miss here
/// while the purge is under way never refills the first tier from Redis's old copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_during_a_purge_does_not_refill_the_first_tier_from_the_old_copy() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let held = Held::new();
    held.hold.store(false, Ordering::SeqCst);
    let fleet = fleet(&server, "inv-refill:", &held).await;
    for round in 0..500 {
        let key = format!("page/{round}");
        // Stored by instance 1, so instance 0's first tier is empty and reads Redis.
        assert_eq!(
            get(&fleet[1].2, &key).await,
            format!("{key} v{}", round + 1)
        );
        held.version.store(round + 2, Ordering::SeqCst);
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (svc, key, stop) = (fleet[0].2.clone(), key.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    get(&svc, &key).await;
                    tokio::task::yield_now().await;
                }
            })
        };
        fleet[0].1.purge(&key).await;
        stop.store(true, Ordering::SeqCst);
        reader.await.unwrap();
        assert_eq!(
            get(&fleet[0].2, &key).await,
            format!("{key} v{}", round + 2),
            "round {round}"
        );
    }
}

#[cfg(feature = "http")]
mod http_cache {
    use super::*;
    use bytes::Bytes;
    use http::{Method, Request, Response, StatusCode};
    use http_body_util::{BodyExt, Full};
    use towerguard::http::HttpCacheLayer;

    type HttpService = tower::util::BoxCloneSyncService<
        Request<Full<Bytes>>,
        Response<towerguard::http::BufferedBody<Full<Bytes>>>,
        towerguard::Error,
    >;

    /// Three HTTP caches over one Redis in front of `held`: a GET answers `max-age=60`
    /// with the path and the version at the time of the call; a POST answers 204.
    async fn fleet(server: &RedisServer, held: &Arc<Held>) -> Vec<(RedisTier, HttpService)> {
        let mut out = Vec::new();
        for i in 0..3 {
            let tier = tier(server, "inv-http:");
            let layer = HttpCacheLayer::builder()
                .name(format!("inv-http-{i}"))
                .second_tier(tier.clone())
                .build();
            let held = held.clone();
            let origin = service_fn(move |req: Request<Full<Bytes>>| {
                let held = held.clone();
                async move {
                    if req.method() == Method::POST {
                        let mut response = Response::new(Full::new(Bytes::new()));
                        *response.status_mut() = StatusCode::NO_CONTENT;
                        return Ok::<_, std::io::Error>(response);
                    }
                    let body = held.answer(req.uri().path().to_owned()).await;
                    Ok(Response::builder()
                        .header("cache-control", "max-age=60")
                        .body(Full::new(Bytes::from(body)))
                        .unwrap())
                }
            });
            let svc = tower::util::BoxCloneSyncService::new(layer.layer(origin));
            tier.backplane().wait_for(|b| b.subscribed).await.unwrap();
            out.push((tier, svc));
        }
        out
    }

    async fn send(svc: &HttpService, method: Method, path: &str, etag: Option<&str>) -> String {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://origin.test{path}"));
        if let Some(etag) = etag {
            req = req.header("if-none-match", etag);
        }
        let response = svc
            .clone()
            .oneshot(req.body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    async fn held_get(
        held: &Arc<Held>,
        svc: &HttpService,
        path: &str,
        etag: Option<&'static str>,
    ) -> tokio::task::JoinHandle<String> {
        held.hold.store(true, Ordering::SeqCst);
        let started = held.started.notified();
        let (svc, path) = (svc.clone(), path.to_owned());
        let request = tokio::spawn(async move { send(&svc, Method::GET, &path, etag).await });
        started.await;
        request
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_post_through_one_cache_during_another_caches_get_flight_is_not_undone() {
        let Some(server) = RedisServer::start() else {
            return;
        };
        let held = Held::new();
        let fleet = fleet(&server, &held).await;
        let fetching = held_get(&held, &fleet[1].1, "/page", None).await;
        send(&fleet[0].1, Method::POST, "/page", None).await;
        held.publish(2);
        held.release.add_permits(1);
        assert_eq!(fetching.await.unwrap(), "/page v1");
        for i in [1, 2, 0] {
            assert_eq!(
                send(&fleet[i].1, Method::GET, "/page", None).await,
                "/page v2"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_post_during_a_conditional_miss_is_not_undone_by_its_response() {
        let Some(server) = RedisServer::start() else {
            return;
        };
        let held = Held::new();
        let fleet = fleet(&server, &held).await;
        // The client's own validator with nothing stored: to the origin outside a flight.
        let fetching = held_get(&held, &fleet[0].1, "/page", Some("\"old\"")).await;
        send(&fleet[0].1, Method::POST, "/page", None).await;
        held.publish(2);
        held.release.add_permits(1);
        assert_eq!(fetching.await.unwrap(), "/page v1");
        for i in [0, 1, 2] {
            assert_eq!(
                send(&fleet[i].1, Method::GET, "/page", None).await,
                "/page v2"
            );
        }
    }
}
