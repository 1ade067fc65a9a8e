//! The second tier's costs, against a `redis-server` of its own (started on a free port):
//!
//! - a first-tier hit with no second tier and (feature `redis`) with one configured;
//! - (feature `redis`) a second-tier hit (first tier empty) beside a bare `GET` of the
//!   same bytes with redis-rs, a miss in both tiers (the read, the lease, the upstream,
//!   the write, the release), and the backplane's delay: from `purge` on one instance to
//!   the message applied on another.
//!
//! ```text
//! bash benches/second_tier.sh          # both builds, feature off and on, interleaved
//! cargo bench --features redis --bench second_tier
//! ```

use std::time::Instant;

use tower::{service_fn, Layer, ServiceExt};
use towerguard::cache::CacheLayer;

const ROUNDS: usize = 7;
const HITS: u32 = 200_000;

/// The median of `rounds` measurements of ns per hit on `svc` for key 1.
async fn hit_cost<S>(svc: &S) -> f64
where
    S: tower::Service<u64, Response = String, Error = towerguard::Error> + Clone,
{
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let start = Instant::now();
        for _ in 0..HITS {
            let mut svc = svc.clone();
            let value = svc.ready().await.unwrap().call(1).await.unwrap();
            std::hint::black_box(value);
        }
        rounds.push(start.elapsed().as_nanos() as f64 / f64::from(HITS));
    }
    rounds.sort_by(f64::total_cmp);
    rounds[ROUNDS / 2]
}

fn upstream(
) -> impl tower::Service<u64, Response = String, Error = std::io::Error, Future = impl Send>
       + Clone
       + Send
       + 'static {
    service_fn(|id: u64| async move { Ok::<_, std::io::Error>(format!("value {id}").repeat(16)) })
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let feature = if cfg!(feature = "redis") { "on" } else { "off" };
    let plain = CacheLayer::builder(|id: &u64| Some(*id))
        .build()
        .layer(upstream());
    plain.clone().oneshot(1).await.unwrap();
    let ns = hit_cost(&plain).await;
    println!("first-tier hit, no second tier (feature {feature}): {ns:.0} ns (median of {ROUNDS} rounds of {HITS})");
    #[cfg(feature = "redis")]
    with_redis::run().await;
}

#[cfg(feature = "redis")]
mod with_redis {
    use super::*;
    use std::process::{Command, Stdio};
    use std::time::Duration;

    use hdrhistogram::Histogram;
    use towerguard::tier::{RedisTier, Utf8};

    fn percentiles(h: &Histogram<u64>) -> String {
        format!(
            "p50 {:.1} µs, p99 {:.1} µs",
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0
        )
    }

    struct Server(std::process::Child, std::path::PathBuf);

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
            let _ = std::fs::remove_dir_all(&self.1);
        }
    }

    fn start() -> (Server, String) {
        use std::io::{BufRead, BufReader};
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("towerguard-bench-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::piped())
            .spawn()
            .expect("redis-server (Debian: apt-get install redis-server)");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        for line in lines.by_ref() {
            if line.unwrap().contains("Ready to accept connections") {
                break;
            }
        }
        std::thread::spawn(move || lines.for_each(drop));
        (Server(child, dir), format!("redis://127.0.0.1:{port}/"))
    }

    fn tier(url: &str) -> RedisTier {
        RedisTier::builder(url)
            .prefix("bench:")
            .timeout(Duration::from_secs(1))
            .build()
            .unwrap()
    }

    pub(super) async fn run() {
        let (_server, url) = start();
        let writer_tier = tier(&url);
        let writer_layer = CacheLayer::builder(|id: &u64| Some(*id))
            .second_tier(writer_tier.clone(), |id: &u64| id.to_string(), Utf8)
            .build();
        let writer_handle = writer_layer.handle();
        let writer = writer_layer.layer(upstream());
        writer.clone().oneshot(1).await.unwrap();
        let ns = hit_cost(&writer).await;
        println!("first-tier hit, second tier configured: {ns:.0} ns (median of {ROUNDS} rounds of {HITS})");

        // Second-tier hits: an instance that keeps nothing in memory reads Redis each time.
        let reader_tier = tier(&url);
        let reader = CacheLayer::builder(|id: &u64| Some(*id))
            .max_entries(0)
            .second_tier(reader_tier.clone(), |id: &u64| id.to_string(), Utf8)
            .build()
            .layer(upstream());
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        let mut tiered = Histogram::<u64>::new(3).unwrap();
        let mut bare = Histogram::<u64>::new(3).unwrap();
        for _ in 0..2_000 {
            // warm-up of both paths
            reader.clone().oneshot(1).await.unwrap();
            let _: Option<Vec<u8>> = redis::cmd("GET")
                .arg("bench:v:1")
                .query_async(&mut connection)
                .await
                .unwrap();
        }
        for _ in 0..20_000 {
            let start = Instant::now();
            reader.clone().oneshot(1).await.unwrap();
            tiered.record(start.elapsed().as_nanos() as u64).unwrap();
            let start = Instant::now();
            let bytes: Option<Vec<u8>> = redis::cmd("GET")
                .arg("bench:v:1")
                .query_async(&mut connection)
                .await
                .unwrap();
            bare.record(start.elapsed().as_nanos() as u64).unwrap();
            assert!(bytes.is_some());
        }
        println!(
            "second-tier hit (20,000, alternating): {}",
            percentiles(&tiered)
        );
        println!(
            "bare redis-rs GET of the same entry:    {}",
            percentiles(&bare)
        );

        // Misses in both tiers: a read, the lease, the upstream, a write, the release.
        let mut miss = Histogram::<u64>::new(3).unwrap();
        for key in 1_000_000..1_020_000u64 {
            let start = Instant::now();
            reader.clone().oneshot(key).await.unwrap();
            if key >= 1_002_000 {
                miss.record(start.elapsed().as_nanos() as u64).unwrap();
            }
        }
        println!(
            "miss in both tiers, read to write (18,000 after 2,000 warm-up): {}",
            percentiles(&miss)
        );

        // Backplane delay: purge on the writer, applied on the reader.
        let mut state = reader_tier.backplane();
        state.wait_for(|b| b.subscribed).await.unwrap();
        let mut delay = Histogram::<u64>::new(3).unwrap();
        for _ in 0..2_000 {
            let applied = state.borrow_and_update().applied;
            let start = Instant::now();
            writer_handle.purge(&1).await;
            state.wait_for(|b| b.applied > applied).await.unwrap();
            delay.record(start.elapsed().as_nanos() as u64).unwrap();
        }
        println!(
            "backplane: purge on one instance to the message applied on another (2,000): {}",
            percentiles(&delay)
        );
    }
}
