//! A retry budget: a token bucket shared by retry and hedge.
//!
//! Every request that succeeds deposits `ratio` of a token; every retry or hedge withdraws
//! one whole token. On top of that, a floor of `min_per_second` tokens per second is always
//! available, so a service with little traffic can still retry. The balance is capped, so
//! a long calm spell cannot be saved up and spent in one burst when the backend goes down.
//!
//! Under a total outage nothing succeeds and nothing is deposited: extra load is bounded by
//! the floor alone. With a failure rate `f` and ratio `r`, about `r × (1 − f)` extra
//! attempts per request are allowed, which masks transient failures as long as that stays
//! above `f`. This is the scheme of Finagle's retry budget and of gRPC's retry throttling.
//!
//! Deposits and withdrawals are atomic operations; only refilling the floor takes a short
//! lock, and only on a withdrawal.
//!
//! ```
//! use std::time::Duration;
//! use towerguard::budget::Budget;
//!
//! // Retries and hedges may add 20% to the successful load, plus 10 per second.
//! let budget = Budget::new(0.2, 10.0);
//! budget.deposit();
//! assert!(budget.withdraw()); // the floor pays for the first ones
//! ```

use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

/// One token, in the fixed-point unit balances are kept in.
const UNIT: i64 = 1_000_000;

/// Configures a [`Budget`]; [`build`](Self::build) makes the bucket once.
#[must_use]
#[derive(Debug, Clone)]
pub struct BudgetBuilder {
    ratio: f64,
    min_per_second: f64,
    max_balance: Option<f64>,
}

impl BudgetBuilder {
    /// Tokens deposited per successful request (clamped to `0..=1000`).
    pub fn ratio(mut self, ratio: f64) -> Self {
        self.ratio = ratio;
        self
    }

    /// Tokens per second always available, whatever the successes (negative means none).
    pub fn min_per_second(mut self, min_per_second: f64) -> Self {
        self.min_per_second = min_per_second;
        self
    }

    /// A cap on the deposited balance, in tokens.
    pub fn max_balance(mut self, max_balance: f64) -> Self {
        self.max_balance = Some(max_balance);
        self
    }

    /// Builds the bucket.
    pub fn build(self) -> Budget {
        let finite_or_zero = |x: f64| if x.is_finite() { x } else { 0.0 };
        let ratio = finite_or_zero(self.ratio).clamp(0.0, 1000.0);
        let min_per_second = finite_or_zero(self.min_per_second).max(0.0);
        let max_balance = match self.max_balance {
            Some(max) => finite_or_zero(max).max(0.0),
            None => (100.0f64).max(min_per_second * 10.0),
        };
        let floor = (min_per_second > 0.0).then(|| {
            Mutex::new(Floor {
                per_second: min_per_second,
                tokens: min_per_second,
                refilled: Instant::now(),
            })
        });
        Budget {
            inner: Arc::new(Inner {
                ratio: (ratio * UNIT as f64) as i64,
                max_balance: (max_balance * UNIT as f64) as i64,
                balance: AtomicI64::new(0),
                floor,
                withdrawn: AtomicU64::new(0),
                refused: AtomicU64::new(0),
            }),
        }
    }
}

/// A token bucket shared by every clone (it is an `Arc` inside).
#[derive(Clone)]
pub struct Budget {
    inner: Arc<Inner>,
}

struct Inner {
    /// Per successful request, in units.
    ratio: i64,
    /// Cap on the deposited balance, in units.
    max_balance: i64,
    balance: AtomicI64,
    floor: Option<Mutex<Floor>>,
    /// Tokens taken, for observation.
    withdrawn: AtomicU64,
    refused: AtomicU64,
}

/// The floor's own small bucket, refilled by elapsed time.
struct Floor {
    per_second: f64,
    tokens: f64,
    refilled: Instant,
}

impl Budget {
    /// `ratio` of a token per successful request and a floor of `min_per_second` tokens
    /// per second: `Budget::builder().ratio(ratio).min_per_second(min_per_second).build()`.
    pub fn new(ratio: f64, min_per_second: f64) -> Self {
        Self::builder()
            .ratio(ratio)
            .min_per_second(min_per_second)
            .build()
    }

    /// Starts a builder: 20% of a token per successful request, a floor of 10 tokens per
    /// second, the deposited balance capped at 100 tokens or 10 seconds of the floor,
    /// whichever is more.
    pub fn builder() -> BudgetBuilder {
        BudgetBuilder {
            ratio: 0.2,
            min_per_second: 10.0,
            max_balance: None,
        }
    }

    /// Records a successful request: deposits `ratio` of a token.
    pub fn deposit(&self) {
        let inner = &*self.inner;
        if inner.ratio == 0 {
            return;
        }
        let _ = inner
            .balance
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |balance| {
                (balance < inner.max_balance)
                    .then(|| (balance + inner.ratio).min(inner.max_balance))
            });
    }

    /// Takes one token for a retry or hedge; false when the budget is spent.
    pub fn withdraw(&self) -> bool {
        let inner = &*self.inner;
        let taken = inner
            .balance
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |balance| {
                (balance >= UNIT).then_some(balance - UNIT)
            })
            .is_ok()
            || self.withdraw_floor();
        if taken {
            inner.withdrawn.fetch_add(1, Ordering::Relaxed);
        } else {
            inner.refused.fetch_add(1, Ordering::Relaxed);
        }
        taken
    }

    fn withdraw_floor(&self) -> bool {
        let Some(floor) = &self.inner.floor else {
            return false;
        };
        let mut floor = floor.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(floor.refilled).as_secs_f64();
        floor.tokens = (floor.tokens + elapsed * floor.per_second).min(floor.per_second.max(1.0));
        floor.refilled = now;
        if floor.tokens >= 1.0 {
            floor.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// The deposited balance, in tokens (the floor not included).
    pub fn balance(&self) -> f64 {
        self.inner.balance.load(Ordering::Acquire) as f64 / UNIT as f64
    }

    /// Tokens taken so far.
    pub fn withdrawn(&self) -> u64 {
        self.inner.withdrawn.load(Ordering::Relaxed)
    }

    /// Withdrawals refused so far.
    pub fn refused(&self) -> u64 {
        self.inner.refused.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Budget")
            .field("ratio", &(self.inner.ratio as f64 / UNIT as f64))
            .field("balance", &self.balance())
            .field("withdrawn", &self.withdrawn())
            .field("refused", &self.refused())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn deposits_buy_whole_tokens() {
        let budget = Budget::new(0.25, 0.0);
        assert!(!budget.withdraw());
        for _ in 0..4 {
            budget.deposit();
        }
        assert!(budget.withdraw());
        assert!(!budget.withdraw());
    }

    #[test]
    fn the_balance_is_capped() {
        let budget = Budget::builder()
            .ratio(1.0)
            .min_per_second(0.0)
            .max_balance(5.0)
            .build();
        for _ in 0..100 {
            budget.deposit();
        }
        let taken = (0..100).filter(|_| budget.withdraw()).count();
        assert_eq!(taken, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn the_floor_refills_with_time() {
        let budget = Budget::new(0.0, 2.0);
        assert!(budget.withdraw());
        assert!(budget.withdraw());
        assert!(!budget.withdraw());
        tokio::time::advance(std::time::Duration::from_millis(500)).await;
        assert!(budget.withdraw());
        assert!(!budget.withdraw());
    }

    proptest! {
        #[test]
        fn withdrawals_never_exceed_ratio_times_deposits(
            ratio in 0.0f64..2.0,
            deposits in 0u32..5_000,
        ) {
            let budget = Budget::builder().ratio(ratio).min_per_second(0.0).max_balance(1e9).build();
            for _ in 0..deposits {
                budget.deposit();
            }
            let taken = (0..20_000).filter(|_| budget.withdraw()).count() as f64;
            let allowed = (ratio * deposits as f64).floor();
            // Fixed point rounds each deposit down by at most one unit.
            prop_assert!(taken <= allowed + 1e-9, "taken {taken} allowed {allowed}");
            prop_assert!(taken >= allowed - 1.0, "taken {taken} allowed {allowed}");
        }
    }
}
