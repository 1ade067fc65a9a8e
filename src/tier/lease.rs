//! Cross-instance single flight: one instance per key calls the upstream at a time, the
//! others wait for what it writes.

use std::future::Future;
use std::time::Duration;

use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::bus::new_id;
use super::{Message, Op, RedisTier, Request, TierMetrics};

/// What a flight does after a second-tier miss.
pub(crate) enum Lease<T> {
    /// This instance holds the key's lease: call the upstream, write, then release.
    Held(Box<LeaseGuard>),
    /// Another instance's result, read from Redis.
    Found(T),
    /// No lease: Redis unavailable, leases off, or the wait ran out. Call the upstream.
    Alone,
    /// The key is marked as one whose result the tier does not hold: call the upstream
    /// now, without waiting for anybody's lease.
    Unstored,
}

/// What a read of the key found while taking or waiting for its lease.
pub(crate) enum Seen<T> {
    /// A usable value.
    Value(T),
    /// Nothing usable.
    Nothing,
    /// The key is marked unstored.
    Unstored,
}

/// A held lease. Released by [`release`](Self::release), or in the background when
/// dropped (the flight was dropped or failed), so nobody waits for it past that.
pub(crate) struct LeaseGuard {
    tier: RedisTier,
    name: String,
    token: String,
    from: u64,
    metrics: TierMetrics,
    done: bool,
    /// The task that renews the lease while the flight runs.
    renewal: Option<AbortHandle>,
}

/// Deletes the lease if it is still ours, and publishes `ARGV[3]` on `ARGV[2]` when given.
const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
if ARGV[3] ~= '' then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return 0
";

/// Sets the lease's expiry to `ARGV[2]` ms if it is still ours (`ARGV[1]`); 1 if it was.
const RENEW_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

impl RedisTier {
    /// Takes the lease on `name`, or waits for the instance holding it to write a value
    /// (`read` reads it), up to the lease wait. Taking the lease after waiting is a
    /// takeover (the holder released it without a value, or died and its lease lapsed).
    /// A held lease is renewed every third of its length until it is released.
    pub(crate) async fn lease<T, F, Fut>(
        &self,
        name: &str,
        (from, metrics): (u64, &TierMetrics),
        mut read: F,
    ) -> Lease<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Seen<T>>,
    {
        let shared = &self.shared;
        if shared.config.lease.is_zero() {
            return Lease::Alone;
        }
        self.start_bus();
        let token = format!("{:x}", new_id());
        let deadline = later(Instant::now(), shared.config.lease_wait);
        let notify = shared.bus.wait_on(name);
        let mut waited = false;
        let outcome = loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.try_acquire(name, &token, metrics).await {
                None => break Lease::Alone,
                Some(true) => {
                    let renewal = tokio::spawn(renew(
                        self.clone(),
                        self.lease_key(name),
                        token.clone(),
                        metrics.clone(),
                    ));
                    let guard = Box::new(LeaseGuard {
                        tier: self.clone(),
                        name: name.to_owned(),
                        token,
                        from,
                        metrics: metrics.clone(),
                        done: false,
                        renewal: Some(renewal.abort_handle()),
                    });
                    // A holder may have written and released between the caller's read
                    // and this lease: its value answers, or its mark sends us on.
                    match read().await {
                        Seen::Value(value) => {
                            guard.release(false).await;
                            break Lease::Found(value);
                        }
                        Seen::Unstored => {
                            guard.release(true).await;
                            break Lease::Unstored;
                        }
                        Seen::Nothing => {}
                    }
                    if waited {
                        metrics.lease_takeover.increment(1);
                    } else {
                        metrics.lease_acquired.increment(1);
                    }
                    break Lease::Held(guard);
                }
                Some(false) => {}
            }
            if !waited {
                waited = true;
                metrics.lease_waited.increment(1);
            }
            match read().await {
                Seen::Value(value) => break Lease::Found(value),
                // The holder's result is not in Redis and will not be: waiting longer
                // would only put this instance's upstream call after the holder's.
                Seen::Unstored => break Lease::Unstored,
                Seen::Nothing => {}
            }
            let now = Instant::now();
            // The flight's own deadline (the latest of its waiters') ends the wait too.
            let deadline = match crate::timeout::Deadline::current() {
                Some(flight) => deadline.min(flight.instant()),
                None => deadline,
            };
            if now >= deadline {
                metrics.lease_timeout.increment(1);
                tracing::debug!("second tier: lease wait ran out, calling the upstream");
                break Lease::Alone;
            }
            let pause = shared.config.lease_poll.min(deadline - now);
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep(pause) => {}
            }
        };
        shared.bus.done_waiting(name, notify);
        outcome
    }

    /// `Some(true)` when the lease on `name` is now ours, `Some(false)` when another
    /// instance holds it, `None` when Redis is unavailable.
    async fn try_acquire(&self, name: &str, token: &str, metrics: &TierMetrics) -> Option<bool> {
        let ms = self.lease_ms();
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.lease_key(name))
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(ms);
        self.run::<Option<String>>(Request::Cmd(cmd), metrics, Op::Lease)
            .await
            .map(|set| set.is_some())
    }

    /// The lease's length in whole milliseconds, at least one.
    fn lease_ms(&self) -> u64 {
        super::px(self.shared.config.lease)
    }
}

/// `after` past `now`, or the far future when that is past what an `Instant` can hold.
fn later(now: Instant, after: Duration) -> Instant {
    now.checked_add(after)
        .unwrap_or_else(|| crate::timeout::deadline::far_future(now))
}

/// Keeps the lease at `key` ours while the flight holding it runs: every third of the
/// lease's length its expiry is set back to the whole length. Ends when the guard
/// aborts it, or when the lease is found no longer ours (it lapsed while Redis was out of
/// reach and another instance took it). A failed renewal is tried again at the next one.
async fn renew(tier: RedisTier, key: String, token: String, metrics: TierMetrics) {
    let ms = tier.lease_ms();
    let every = (tier.shared.config.lease / 3).max(std::time::Duration::from_millis(1));
    loop {
        tokio::time::sleep_until(later(Instant::now(), every)).await;
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(RENEW_SCRIPT).arg(1).arg(&key).arg(&token).arg(ms);
        match tier
            .run::<i64>(Request::Cmd(cmd), &metrics, Op::Lease)
            .await
        {
            Some(1) => metrics.lease_renewed.increment(1),
            Some(_) => {
                metrics.lease_lost.increment(1);
                tracing::debug!("second tier: lease lost while the flight ran");
                return;
            }
            None => {}
        }
    }
}

impl LeaseGuard {
    /// Gives the lease up; when no value was `written` (whose write already woke the
    /// waiters), tells them to try again: they read the key again, and go to their
    /// upstreams at once if it is marked unstored.
    pub(crate) async fn release(self: Box<Self>, written: bool) {
        self.release_then(written, None).await;
    }

    /// Marks the key unstored for `ttl` ([`RedisTier::mark_unstored`]) and gives the
    /// lease up, in one round trip: the mark goes first, so the waiters the release wakes
    /// read it.
    pub(crate) async fn release_marked(self: Box<Self>, ttl: Duration) {
        self.release_then(false, Some(ttl)).await;
    }

    async fn release_then(mut self: Box<Self>, written: bool, mark: Option<Duration>) {
        self.done = true;
        self.stop_renewing();
        let mark = mark.map(|ttl| self.tier.mark_cmd(&self.name, ttl));
        release(
            &self.tier,
            &self.name,
            &self.token,
            (self.from, &self.metrics),
            (written, mark),
        )
        .await;
    }

    fn stop_renewing(&mut self) {
        if let Some(renewal) = self.renewal.take() {
            renewal.abort();
        }
    }
}

/// Releases the lease on `name` if `token` still holds it; publishes the release unless
/// a value was `written`; sends `mark` first in the same round trip when given.
async fn release(
    tier: &RedisTier,
    name: &str,
    token: &str,
    (from, metrics): (u64, &TierMetrics),
    (written, mark): (bool, Option<redis::Cmd>),
) {
    let message = if written {
        String::new()
    } else {
        Message::Released(name).encode(from)
    };
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(RELEASE_SCRIPT)
        .arg(1)
        .arg(tier.lease_key(name))
        .arg(token)
        .arg(tier.channel())
        .arg(&message);
    let request = match mark {
        None => Request::Cmd(cmd),
        Some(mark) => {
            let mut pipe = redis::pipe();
            pipe.add_command(mark).ignore().add_command(cmd).ignore();
            Request::Pipe(pipe)
        }
    };
    let done = tier.run::<()>(request, metrics, Op::Lease).await;
    if done.is_some() && !written {
        metrics.sent.increment(1);
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.stop_renewing();
        if self.done {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Nobody to release it: it lapses after the lease's length.
            return;
        };
        let (tier, name, token) = (
            self.tier.clone(),
            std::mem::take(&mut self.name),
            std::mem::take(&mut self.token),
        );
        let (from, metrics) = (self.from, self.metrics.clone());
        runtime.spawn(async move {
            release(&tier, &name, &token, (from, &metrics), (false, None)).await
        });
    }
}
