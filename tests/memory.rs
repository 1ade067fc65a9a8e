//! The caches' capacities bound the memory they hold: a flood of distinct responses into
//! the HTTP cache, each read into slices of a large shared buffer (as a server's parser
//! hands them out), and a flood of distinct keys into the generic cache bounded with
//! `max_bytes`, each leave the live heap within 1.25 times the configured capacity.
//! Counted by a global allocator, so the tests take turns.

#![cfg(all(feature = "http", feature = "cache"))]
// A global allocator is unsafe to implement; the library itself forbids unsafe code.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{service_fn, Layer, ServiceExt};
use towerguard::cache::CacheLayer;
use towerguard::http::HttpCacheLayer;

/// The system allocator, counting the bytes live.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded as it came.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded as it came.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: forwarded as it came.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// One test at a time: the count is the whole process's.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const CAPACITY: u64 = 2 * 1024 * 1024;

#[tokio::test(flavor = "current_thread")]
async fn a_flood_of_distinct_responses_holds_no_more_than_the_capacity() {
    let _turn = TURN.lock().await;
    let layer = HttpCacheLayer::builder().capacity_bytes(CAPACITY).build();
    // Every response's fields and body are slices of one 64 KiB read buffer of its own.
    let origin = service_fn(|req: Request<Full<Bytes>>| async move {
        let mut buffer = vec![b'x'; 64 * 1024];
        let path = req.uri().path().as_bytes();
        buffer[..path.len()].copy_from_slice(path);
        let buffer = Bytes::from(buffer);
        let mut response = Response::new(Full::new(buffer.slice(0..512)));
        let headers = response.headers_mut();
        headers.insert("cache-control", HeaderValue::from_static("max-age=600"));
        for name in ["etag", "x-request-id", "x-served-by", "content-type"] {
            let value = HeaderValue::from_maybe_shared(buffer.slice(0..40)).unwrap();
            headers.insert(name, value);
        }
        Ok::<_, std::io::Error>(response)
    });
    let svc = layer.clone().layer(origin);
    let get = |n: usize| {
        let svc = svc.clone();
        async move {
            let req = Request::get(format!("http://flood.test/item/{n}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            let response = svc.oneshot(req).await.unwrap();
            response.into_body().collect().await.unwrap();
        }
    };
    get(0).await;
    layer.run_pending_tasks();
    let baseline = LIVE.load(Ordering::Relaxed);
    for n in 1..=20_000 {
        get(n).await;
    }
    layer.run_pending_tasks();
    let held = LIVE.load(Ordering::Relaxed) - baseline;
    let ratio = held as f64 / CAPACITY as f64;
    println!(
        "{} entries, weighted {} bytes, live heap {held} bytes above the baseline: {ratio:.2} x the capacity",
        layer.entry_count(),
        layer.weighted_size()
    );
    assert!(layer.entry_count() < 20_000, "the capacity evicted");
    assert!(
        ratio <= 1.25,
        "the cache holds {ratio:.2} times its capacity ({held} bytes for {CAPACITY})"
    );
}

/// The generic cache's value in the flood: what a key's upstream answers.
fn page(key: &str) -> String {
    let mut page = String::with_capacity(200);
    page.push_str(key);
    while page.len() < 200 {
        page.push('x');
    }
    page
}

async fn flood_generic(max_bytes: u64, keys: usize) -> (isize, u64, u64) {
    let layer = CacheLayer::builder(|key: &String| Some(key.clone()))
        .max_bytes(max_bytes, |key: &String, value: &String| {
            key.capacity() + value.capacity()
        })
        .build();
    let handle = layer.handle();
    let svc = layer.layer(service_fn(|key: String| async move {
        Ok::<_, std::io::Error>(page(&key))
    }));
    svc.clone().oneshot("warm".to_owned()).await.unwrap();
    handle.run_pending_tasks();
    let baseline = LIVE.load(Ordering::Relaxed);
    for n in 0..keys {
        svc.clone().oneshot(format!("item/{n}")).await.unwrap();
    }
    handle.run_pending_tasks();
    let held = LIVE.load(Ordering::Relaxed) - baseline;
    (held, handle.entry_count(), handle.weighted_size())
}

#[tokio::test(flavor = "current_thread")]
async fn a_flood_of_distinct_keys_holds_no_more_than_max_bytes_in_the_generic_cache() {
    let _turn = TURN.lock().await;
    // Room for every key: what an entry really costs, against what max_bytes counts.
    let (held, entries, weighted) = flood_generic(1 << 40, 5_000).await;
    println!(
        "{entries} entries: {} bytes each on the heap, {} counted",
        held / entries as isize,
        weighted / entries
    );
    assert_eq!(entries, 5_001);
    // A flood of about five times the capacity.
    let (held, entries, weighted) = flood_generic(CAPACITY, 20_000).await;
    let ratio = held as f64 / CAPACITY as f64;
    println!(
        "{entries} entries, weighted {weighted} bytes, live heap {held} bytes above the baseline: {ratio:.2} x the capacity"
    );
    assert!(entries < 20_000, "the capacity evicted");
    assert!(
        ratio <= 1.25,
        "the cache holds {ratio:.2} times its capacity ({held} bytes for {CAPACITY})"
    );
}
