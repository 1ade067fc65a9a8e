//! The HTTP cache's capacity bounds the memory it holds: a flood of distinct responses,
//! each read into slices of a large shared buffer (as a server's parser hands them out),
//! leaves the live heap within 1.25 times the configured capacity. Counted by a global
//! allocator, so this file holds one test.

#![cfg(all(feature = "http", feature = "cache"))]
// A global allocator is unsafe to implement; the library itself forbids unsafe code.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{service_fn, Layer, ServiceExt};
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

const CAPACITY: u64 = 2 * 1024 * 1024;

#[tokio::test(flavor = "current_thread")]
async fn a_flood_of_distinct_responses_holds_no_more_than_the_capacity() {
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
