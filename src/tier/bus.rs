//! The backplane: one subscriber per [`RedisTier`](super::RedisTier) on its channel, which
//! hands every message to the caches built with the tier (except the one that sent it) and
//! wakes the flights waiting for another instance's lease.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::Shared;

/// What the backplane of one [`RedisTier`](super::RedisTier) is doing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Backplane {
    /// Subscribed to the channel now: messages from other instances arrive.
    pub subscribed: bool,
    /// Messages from other instances applied so far.
    pub applied: u64,
    /// Times the subscription came back after a loss (each time the caches emptied their
    /// first tier, since messages may have been missed).
    pub resyncs: u64,
}

/// One message on the backplane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Message<'a> {
    /// A value was written under this name: drop the first-tier copy.
    Written(&'a str),
    /// The name was invalidated.
    Invalidated(&'a str),
    /// Every value with this tag was invalidated.
    Tag(&'a str),
    /// Everything was invalidated.
    All,
    /// A lease on this name ended without a value written.
    Released(&'a str),
    /// An instance applied the invalidation that asked for acknowledgements with this
    /// nonce.
    Ack(u64),
}

impl<'a> Message<'a> {
    /// `{sender} {kind} {argument}`, the sender in hex.
    pub(crate) fn encode(&self, from: u64) -> String {
        self.encode_acked(from, None)
    }

    /// As [`encode`](Self::encode), asking every instance that applies it to acknowledge
    /// it with `ack` (`{sender} {kind}!{ack} {argument}`, both in hex).
    pub(crate) fn encode_acked(&self, from: u64, ack: Option<u64>) -> String {
        let nonce;
        let (kind, arg) = match self {
            Message::Written(name) => ("w", *name),
            Message::Invalidated(name) => ("i", *name),
            Message::Tag(tag) => ("t", *tag),
            Message::All => ("a", ""),
            Message::Released(name) => ("r", *name),
            Message::Ack(n) => {
                nonce = format!("{n:x}");
                ("k", nonce.as_str())
            }
        };
        match ack {
            Some(ack) => format!("{from:x} {kind}!{ack:x} {arg}"),
            None => format!("{from:x} {kind} {arg}"),
        }
    }

    /// The sender, the message, and the nonce to acknowledge it with, if it asks for one.
    pub(crate) fn decode(text: &'a str) -> Option<(u64, Message<'a>, Option<u64>)> {
        let mut parts = text.splitn(3, ' ');
        let from = u64::from_str_radix(parts.next()?, 16).ok()?;
        let kind = parts.next()?;
        let arg = parts.next()?;
        let (kind, ack) = match kind.split_once('!') {
            Some((kind, ack)) => (kind, Some(u64::from_str_radix(ack, 16).ok()?)),
            None => (kind, None),
        };
        let message = match kind {
            "w" => Message::Written(arg),
            "i" => Message::Invalidated(arg),
            "t" => Message::Tag(arg),
            "a" => Message::All,
            "r" => Message::Released(arg),
            "k" => Message::Ack(u64::from_str_radix(arg, 16).ok()?),
            _ => return None,
        };
        Some((from, message, ack))
    }

    /// The name a lease waiter may be waiting on.
    fn name(&self) -> Option<&'a str> {
        match self {
            Message::Written(name) | Message::Invalidated(name) | Message::Released(name) => {
                Some(name)
            }
            Message::Tag(_) | Message::All | Message::Ack(_) => None,
        }
    }
}

/// A cache that takes the backplane's messages.
pub(crate) trait Listener: Send + Sync {
    /// Applies a message from another instance to this cache's first tier.
    fn apply(&self, message: &Message<'_>);
    /// The subscription came back after a loss: drop whatever may have missed an
    /// invalidation.
    fn resync(&self);
}

pub(super) struct Bus {
    listeners: Mutex<Vec<(u64, Weak<dyn Listener>)>>,
    /// Flights waiting for another instance's lease, by name.
    waits: DashMap<String, Arc<Notify>>,
    /// Invalidations this process sent that wait for acknowledgements, by nonce.
    acks: DashMap<u64, Arc<Acks>>,
    started: AtomicBool,
    state: watch::Sender<Backplane>,
    stop: CancellationToken,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// An identifier for a cache on the backplane, unique across processes with high
/// probability: the process id, the time, and a counter.
pub(super) fn new_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    // splitmix64 over the three, so close inputs give far-apart ids.
    let mut z = nanos ^ (u64::from(std::process::id()) << 32) ^ n.wrapping_mul(0x9e37_79b9);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Bus {
    pub(super) fn new() -> Self {
        Bus {
            listeners: Mutex::new(Vec::new()),
            waits: DashMap::new(),
            acks: DashMap::new(),
            started: AtomicBool::new(false),
            state: watch::Sender::new(Backplane::default()),
            stop: CancellationToken::new(),
        }
    }

    pub(super) fn stop(&self) {
        self.stop.cancel();
    }

    pub(super) fn state(&self) -> watch::Receiver<Backplane> {
        self.state.subscribe()
    }

    /// Adds a cache; returns its id on the backplane.
    pub(super) fn register(&self, listener: Weak<dyn Listener>) -> u64 {
        let id = new_id();
        let mut listeners = lock(&self.listeners);
        listeners.retain(|(_, l)| l.strong_count() > 0);
        listeners.push((id, listener));
        id
    }

    /// The notification a flight waiting on `name` sleeps on.
    pub(super) fn wait_on(&self, name: &str) -> Arc<Notify> {
        self.waits
            .entry(name.to_owned())
            .or_insert_with(|| Arc::new(Notify::new()))
            .clone()
    }

    /// Forgets `name`'s notification once no flight holds it.
    pub(super) fn done_waiting(&self, name: &str, notify: Arc<Notify>) {
        drop(notify);
        self.waits.remove_if(name, |_, n| Arc::strong_count(n) == 1);
    }

    /// Starts the subscriber, once, if there is a runtime to run it on; true when it
    /// started now.
    pub(super) fn start(&self, shared: Weak<Shared>, channel: String) -> bool {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        if self.started.swap(true, Ordering::AcqRel) {
            return false;
        }
        let stop = self.stop.clone();
        runtime.spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = subscribe(shared, channel) => {}
            }
        });
        true
    }

    /// Starts counting the acknowledgements of an invalidation about to be sent with
    /// `nonce`; [`acked`](Self::acked) waits for them.
    pub(super) fn expect_acks(&self, nonce: u64) -> Arc<Acks> {
        let acks = Arc::new(Acks::default());
        self.acks.insert(nonce, acks.clone());
        acks
    }

    /// Waits until `expected` instances acknowledged `nonce`, or `bound` passed; true
    /// when they all did.
    pub(super) async fn acked(
        &self,
        nonce: u64,
        acks: &Acks,
        expected: usize,
        bound: std::time::Duration,
    ) -> bool {
        let all = async {
            loop {
                let notified = acks.notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if acks.count.load(Ordering::Acquire) >= expected {
                    return;
                }
                notified.await;
            }
        };
        let done = tokio::time::timeout(bound, all).await.is_ok();
        self.acks.remove(&nonce);
        done
    }

    /// Hands a message to the caches of `tier` that did not send it.
    fn dispatch(tier: &Arc<Shared>, payload: &[u8]) {
        let bus = &tier.bus;
        let Some((from, message, ack)) =
            std::str::from_utf8(payload).ok().and_then(Message::decode)
        else {
            tracing::debug!("second tier: unreadable backplane message ignored");
            return;
        };
        if let Message::Ack(nonce) = message {
            if let Some(acks) = bus.acks.get(&nonce) {
                acks.count.fetch_add(1, Ordering::AcqRel);
                acks.notify.notify_waiters();
            }
            return;
        }
        let listeners: Vec<_> = lock(&bus.listeners)
            .iter()
            .filter(|(id, _)| *id != from)
            .filter_map(|(_, l)| l.upgrade())
            .collect();
        if let Message::Tag(tag) = message {
            if listeners.is_empty() {
                acknowledge(tier, ack);
                return;
            }
            // The single-flight cache purges a tag by scanning its whole store (about a
            // quarter second for a million entries): off the runtime's workers, so no other
            // task waits for it. Later messages go on meanwhile; each only removes entries,
            // so their order does not matter.
            let tag = tag.to_owned();
            let tier = tier.clone();
            tokio::task::spawn_blocking(move || {
                for listener in &listeners {
                    listener.apply(&Message::Tag(&tag));
                }
                tier.bus.applied(&listeners);
                acknowledge(&tier, ack);
            });
            return;
        }
        for listener in &listeners {
            listener.apply(&message);
        }
        if let Some(notify) = message.name().and_then(|name| bus.waits.get(name)) {
            notify.notify_waiters();
        }
        bus.applied(&listeners);
        acknowledge(tier, ack);
    }

    /// Counts a message applied, if any cache took it.
    fn applied(&self, listeners: &[Arc<dyn Listener>]) {
        if !listeners.is_empty() {
            self.state.send_modify(|s| s.applied += 1);
        }
    }

    fn resync(&self) {
        let listeners: Vec<_> = lock(&self.listeners)
            .iter()
            .filter_map(|(_, l)| l.upgrade())
            .collect();
        for listener in &listeners {
            listener.resync();
        }
        self.state.send_modify(|s| s.resyncs += 1);
    }
}

/// The acknowledgements of one invalidation, counted as they arrive.
#[derive(Default)]
pub(super) struct Acks {
    count: std::sync::atomic::AtomicUsize,
    notify: Notify,
}

/// Tells the sender of an invalidation that this instance applied it, when it asked
/// (`ack`), in the background on the tier's command connection.
fn acknowledge(tier: &Arc<Shared>, ack: Option<u64>) {
    let Some(nonce) = ack else {
        return;
    };
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let tier = tier.clone();
    runtime.spawn(async move {
        let send = async {
            let mut connection = tier.connection().await?;
            redis::cmd("PUBLISH")
                .arg(format!("{}bus", tier.config.prefix))
                .arg(Message::Ack(nonce).encode(0))
                .query_async::<()>(&mut connection)
                .await
                .map_err(|e| crate::Error::with_source(crate::ErrorKind::Inner, e))
        };
        if let Ok(Err(error)) = tokio::time::timeout(tier.config.timeout, send).await {
            tracing::debug!(error = %crate::error::chain(&error), "second tier: acknowledgement not sent");
        }
    });
}

/// The next message of `stream`, `None` when the connection is gone.
fn next<S: futures_core::Stream + Unpin>(
    stream: &mut S,
) -> impl Future<Output = Option<S::Item>> + '_ {
    std::future::poll_fn(move |cx: &mut Context<'_>| -> Poll<Option<S::Item>> {
        Pin::new(&mut *stream).poll_next(cx)
    })
}

/// Subscribes, hands out messages, and subscribes again after a loss (waiting 50 ms,
/// doubling to 1 s, between attempts), until the tier is dropped.
async fn subscribe(shared: Weak<Shared>, channel: String) {
    let mut delay = Duration::from_millis(50);
    let mut lost = false;
    // The first failed attempt of a run is a warning (a wrong address or password shows
    // there); the attempts after it are debug lines.
    let mut warned = false;
    loop {
        let Some(client) = shared
            .upgrade()
            .map(|s| (s.client.clone(), s.config.timeout))
        else {
            return;
        };
        let (client, timeout) = client;
        // Connecting has a longer bound than one operation: nothing waits on it.
        let connect = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let bound = timeout.max(Duration::from_secs(1));
        match tokio::time::timeout(bound, connect).await {
            Ok(Ok(pubsub)) => {
                delay = Duration::from_millis(50);
                warned = false;
                let Some(tier) = shared.upgrade() else {
                    return;
                };
                if lost {
                    tracing::info!("second tier: backplane back, first tier emptied");
                    tier.bus.resync();
                }
                tier.bus.state.send_modify(|s| s.subscribed = true);
                drop(tier);
                let mut stream = pubsub.into_on_message();
                while let Some(message) = next(&mut stream).await {
                    let Some(tier) = shared.upgrade() else {
                        return;
                    };
                    Bus::dispatch(&tier, message.get_payload_bytes());
                }
                let Some(tier) = shared.upgrade() else {
                    return;
                };
                tracing::warn!("second tier: backplane lost, subscribing again");
                tier.bus.state.send_modify(|s| s.subscribed = false);
                lost = true;
            }
            failed => {
                let error = match failed {
                    Ok(Err(error)) => error.to_string(),
                    _ => format!("timed out after {} ms", bound.as_millis()),
                };
                if std::mem::replace(&mut warned, true) {
                    tracing::debug!(%error, "second tier: cannot subscribe to the backplane");
                } else {
                    tracing::warn!(%error, "second tier: cannot subscribe to the backplane, trying again");
                }
                lost = true;
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_back_as_written() {
        for message in [
            Message::Written("a b:c"),
            Message::Invalidated("x"),
            Message::Tag("t 1"),
            Message::All,
            Message::Released(""),
            Message::Ack(0x1234),
        ] {
            let text = message.encode(0xabc);
            assert_eq!(Message::decode(&text), Some((0xabc, message, None)));
            let text = message.encode_acked(0xabc, Some(0x5d));
            assert_eq!(Message::decode(&text), Some((0xabc, message, Some(0x5d))));
        }
        assert_eq!(Message::decode("zz w a"), None);
        assert_eq!(Message::decode("1 q a"), None);
        assert_eq!(Message::decode("1"), None);
    }

    #[test]
    fn ids_differ() {
        let ids: std::collections::HashSet<u64> = (0..1000).map(|_| new_id()).collect();
        assert_eq!(ids.len(), 1000);
    }
}
