//! Test services shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{watch, Notify};

#[cfg(feature = "redis")]
pub mod redis_server;
use tower::Service;

/// What one upstream call does once its gate is open.
#[derive(Clone, Debug)]
pub enum Outcome {
    Ok(String),
    Err(&'static str),
    Panic(&'static str),
}

#[derive(Debug)]
pub struct TestError(pub &'static str);

impl std::fmt::Display for TestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for TestError {}

type Script = dyn Fn(usize, &str) -> Outcome + Send + Sync;

/// An upstream service that counts calls, holds responses behind a gate, observes when its
/// futures are dropped unfinished, and answers as a script says.
#[derive(Clone)]
pub struct Upstream {
    pub calls: Arc<AtomicUsize>,
    pub started: Arc<AtomicUsize>,
    pub finished: Arc<AtomicUsize>,
    pub dropped_unfinished: Arc<AtomicUsize>,
    /// Notified whenever a response future is dropped unfinished.
    pub dropped_signal: Arc<Notify>,
    /// Notified whenever an upstream call produces its outcome.
    pub answered: Arc<Notify>,
    gate: watch::Receiver<bool>,
    gate_tx: Arc<watch::Sender<bool>>,
    script: Arc<Script>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").finish_non_exhaustive()
    }
}

impl Upstream {
    /// Answers `"<key>#<call number>"` at once.
    pub fn new() -> Self {
        Self::scripted(|n, key| Outcome::Ok(format!("{key}#{n}")))
    }

    pub fn scripted(script: impl Fn(usize, &str) -> Outcome + Send + Sync + 'static) -> Self {
        let (tx, rx) = watch::channel(true);
        Upstream {
            calls: Arc::default(),
            started: Arc::default(),
            finished: Arc::default(),
            dropped_unfinished: Arc::default(),
            dropped_signal: Arc::default(),
            answered: Arc::default(),
            gate: rx,
            gate_tx: Arc::new(tx),
            script: Arc::new(script),
        }
    }

    /// Holds every response until [`open`](Self::open).
    pub fn close(&self) {
        self.gate_tx.send_replace(false);
    }

    pub fn open(&self) {
        self.gate_tx.send_replace(true);
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

struct DropGuard {
    armed: bool,
    dropped: Arc<AtomicUsize>,
    signal: Arc<Notify>,
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        if self.armed {
            self.dropped.fetch_add(1, Ordering::SeqCst);
            self.signal.notify_waiters();
        }
    }
}

impl Service<String> for Upstream {
    type Response = String;
    type Error = TestError;
    type Future = Pin<Box<dyn Future<Output = Result<String, TestError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, key: String) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let mut gate = self.gate.clone();
        let this = self.clone();
        Box::pin(async move {
            this.started.fetch_add(1, Ordering::SeqCst);
            let mut guard = DropGuard {
                armed: true,
                dropped: this.dropped_unfinished.clone(),
                signal: this.dropped_signal.clone(),
            };
            gate.wait_for(|open| *open).await.expect("gate sender kept");
            guard.armed = false;
            this.finished.fetch_add(1, Ordering::SeqCst);
            let outcome = (this.script)(n, &key);
            this.answered.notify_waiters();
            match outcome {
                Outcome::Ok(value) => Ok(value),
                Outcome::Err(e) => Err(TestError(e)),
                Outcome::Panic(message) => panic!("{message}"),
            }
        })
    }
}

/// Wraps a service and enforces tower's readiness contract: `call` panics unless
/// `poll_ready` returned ready since the last `call`, and a clone starts not ready.
pub struct Probe<S> {
    inner: S,
    ready: bool,
    pub polls: Arc<AtomicUsize>,
    pub calls: Arc<AtomicUsize>,
}

impl<S> Probe<S> {
    pub fn new(inner: S) -> Self {
        Probe {
            inner,
            ready: false,
            polls: Arc::default(),
            calls: Arc::default(),
        }
    }
}

impl<S: Clone> Clone for Probe<S> {
    fn clone(&self) -> Self {
        Probe {
            inner: self.inner.clone(),
            ready: false,
            polls: self.polls.clone(),
            calls: self.calls.clone(),
        }
    }
}

impl<S, Req> Service<Req> for Probe<S>
where
    S: Service<Req>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        let poll = self.inner.poll_ready(cx);
        if let Poll::Ready(Ok(())) = poll {
            self.ready = true;
        }
        poll
    }

    fn call(&mut self, req: Req) -> Self::Future {
        assert!(self.ready, "called without poll_ready returning ready");
        self.ready = false;
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.call(req)
    }
}

/// A current-thread runtime on paused time, for tests that must build their layers
/// inside `metrics::with_local_recorder` first.
pub fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime")
}

/// A value read from a debugging recorder.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Counter(u64),
    Gauge(f64),
    /// The number of recorded samples.
    Histogram(usize),
}

/// One metric: name, sorted labels, value.
pub type Sample = (String, Vec<(String, String)>, Value);

/// A collected snapshot of a debugging recorder.
pub struct Metrics {
    pub values: Vec<Sample>,
}

impl Metrics {
    pub fn from(snapshotter: &metrics_util::debugging::Snapshotter) -> Self {
        use metrics_util::debugging::DebugValue;
        let values = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _, _, value)| {
                let key = key.key();
                let mut labels: Vec<_> = key
                    .labels()
                    .map(|l| (l.key().to_owned(), l.value().to_owned()))
                    .collect();
                labels.sort();
                let value = match value {
                    DebugValue::Counter(v) => Value::Counter(v),
                    DebugValue::Gauge(v) => Value::Gauge(v.into_inner()),
                    DebugValue::Histogram(v) => Value::Histogram(v.len()),
                };
                (key.name().to_owned(), labels, value)
            })
            .collect();
        Metrics { values }
    }

    pub fn find(&self, name: &str, labels: &[(&str, &str)]) -> Option<Value> {
        self.values
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| v.clone())
    }

    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        match self.find(name, labels) {
            Some(Value::Counter(v)) => v,
            other => panic!("no counter {name} {labels:?}: {other:?}"),
        }
    }

    pub fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        match self.find(name, labels) {
            Some(Value::Gauge(v)) => v,
            other => panic!("no gauge {name} {labels:?}: {other:?}"),
        }
    }

    pub fn histogram_len(&self, name: &str, labels: &[(&str, &str)]) -> usize {
        match self.find(name, labels) {
            Some(Value::Histogram(v)) => v,
            other => panic!("no histogram {name} {labels:?}: {other:?}"),
        }
    }

    /// Asserts that every metric the crate lists under one of `prefixes` was emitted.
    pub fn assert_listed_emitted(&self, prefixes: &[&str]) {
        let names = self.names();
        for info in towerguard::metrics::METRICS {
            if prefixes.iter().any(|p| info.name.starts_with(p)) {
                assert!(
                    names.contains(&info.name.to_owned()),
                    "{} not emitted",
                    info.name
                );
            }
        }
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<_> = self.values.iter().map(|(n, _, _)| n.clone()).collect();
        names.sort();
        names.dedup();
        names
    }
}

/// A body fed by the test chunk by chunk through a channel: it ends when the sender is
/// dropped.
pub struct ChannelBody(pub tokio::sync::mpsc::Receiver<bytes::Bytes>);

impl http_body::Body for ChannelBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|data| Ok(http_body::Frame::data(data))))
    }
}
