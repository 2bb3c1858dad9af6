//! The embedded store: balances in process memory, for the demo and unit tests.
//!
//! Each account sits behind its own mutex, and every [`Ledger`] step is one critical section on
//! that one account, so accounts never wait for each other and a step is as atomic as a Lua
//! script is in Redis. The account map itself is behind an `RwLock` taken for writing only when
//! an account is created.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use super::*;
use crate::calendar::Anchor;

/// How long charge records (for refunds and re-sent steps) and idempotency keys are kept.
const RETENTION_SECS: i64 = 24 * 3600;

/// Source of "now" in Unix seconds; tests move it by hand.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
    })
}

/// The embedded ledger.
pub struct MemoryLedger {
    accounts: RwLock<HashMap<String, Arc<Mutex<Account>>>>,
    keys: RwLock<HashMap<String, KeyRecord>>,
    clock: Clock,
}

struct Account {
    id: String,
    plan: String,
    allocation: u64,
    pending: Option<(String, u64)>,
    anchor: Anchor,
    period: i64,
    monthly: u64,
    topup: u64,
    used: u64,
    email: Option<String>,
    charges: HashMap<String, ChargeRecord>,
    idempotency: HashMap<String, (String, String)>,
    /// (expiry, charge id, idempotency key) in charge order, to forget old records.
    expiries: VecDeque<(i64, String, Option<String>)>,
    topups: HashMap<String, TopupReceipt>,
}

struct ChargeRecord {
    cost: u64,
    from_monthly: u64,
    from_topup: u64,
    period: i64,
    idempotency_key: Option<String>,
    refunded: bool,
}

impl MemoryLedger {
    /// An empty ledger on the system clock.
    pub fn new() -> Self {
        Self::with_clock(system_clock())
    }

    /// An empty ledger on the given clock.
    pub fn with_clock(clock: Clock) -> Self {
        Self { accounts: RwLock::default(), keys: RwLock::default(), clock }
    }

    fn with_account<T>(&self, id: &str, f: impl FnOnce(&mut Account, i64) -> T) -> Option<T> {
        let acct = self.accounts.read().expect("lock").get(id).cloned()?;
        let mut a = acct.lock().expect("lock");
        let now = (self.clock)();
        a.renew(now);
        a.forget_expired(now);
        Some(f(&mut a, now))
    }
}

impl Default for MemoryLedger {
    fn default() -> Self {
        Self::new()
    }
}

impl Account {
    /// Moves into the period containing `now`; never backwards, never twice for one period.
    fn renew(&mut self, now: i64) {
        let k = self.anchor.period_at(now);
        if k > self.period {
            if let Some((plan, allocation)) = self.pending.take() {
                self.plan = plan;
                self.allocation = allocation;
            }
            self.period = k;
            self.monthly = self.allocation;
            self.used = 0;
        }
    }

    fn forget_expired(&mut self, now: i64) {
        while let Some((expiry, _, _)) = self.expiries.front() {
            if *expiry > now {
                break;
            }
            let (_, charge_id, idem) = self.expiries.pop_front().expect("front exists");
            self.charges.remove(&charge_id);
            if let Some(key) = idem
                && self.idempotency.get(&key).is_some_and(|(_, id)| *id == charge_id)
            {
                self.idempotency.remove(&key);
            }
        }
    }

    fn receipt(&self, charge_id: &str, c: &ChargeRecord) -> Receipt {
        Receipt {
            charge_id: charge_id.to_owned(),
            cost: c.cost,
            from_monthly: c.from_monthly,
            from_topup: c.from_topup,
            monthly_remaining: self.monthly,
            topup_remaining: self.topup,
            allocation: self.allocation,
            renews_at: self.renews_at(),
        }
    }

    fn renews_at(&self) -> i64 {
        self.anchor.period_start(self.period + 1)
    }

    fn view(&self) -> AccountView {
        AccountView {
            id: self.id.clone(),
            plan: self.plan.clone(),
            allocation: self.allocation,
            pending_plan: self.pending.as_ref().map(|(p, _)| p.clone()),
            monthly_remaining: self.monthly,
            topup_remaining: self.topup,
            used_this_period: self.used,
            period_start: self.anchor.period_start(self.period),
            renews_at: self.renews_at(),
            email: self.email.clone(),
        }
    }

    fn charge(&mut self, req: &ChargeRequest<'_>, now: i64) -> ChargeOutcome {
        // A re-sent step (same charge id) returns what the first one did.
        if let Some(c) = self.charges.get(req.charge_id) {
            return ChargeOutcome::Charged(self.receipt(req.charge_id, c));
        }
        if let Some(idem) = req.idempotency
            && let Some((fingerprint, charge_id)) = self.idempotency.get(idem.key)
        {
            if fingerprint != idem.fingerprint {
                return ChargeOutcome::Conflict;
            }
            if let Some(c) = self.charges.get(charge_id) {
                return ChargeOutcome::Replayed(self.receipt(charge_id, c));
            }
        }
        let remaining = self.monthly + self.topup;
        if remaining < req.cost {
            return ChargeOutcome::Refused { remaining, renews_at: self.renews_at() };
        }
        let from_monthly = req.cost.min(self.monthly);
        let from_topup = req.cost - from_monthly;
        self.monthly -= from_monthly;
        self.topup -= from_topup;
        self.used += req.cost;
        let idempotency_key = req.idempotency.map(|i| {
            self.idempotency.insert(i.key.to_owned(), (i.fingerprint.to_owned(), req.charge_id.to_owned()));
            i.key.to_owned()
        });
        let record = ChargeRecord {
            cost: req.cost,
            from_monthly,
            from_topup,
            period: self.period,
            idempotency_key: idempotency_key.clone(),
            refunded: false,
        };
        let receipt = self.receipt(req.charge_id, &record);
        self.charges.insert(req.charge_id.to_owned(), record);
        self.expiries.push_back((now + RETENTION_SECS, req.charge_id.to_owned(), idempotency_key));
        ChargeOutcome::Charged(receipt)
    }

    fn refund(&mut self, charge_id: &str) -> RefundOutcome {
        let period = self.period;
        let Some(c) = self.charges.get_mut(charge_id) else { return RefundOutcome::UnknownCharge };
        if c.refunded {
            return RefundOutcome::AlreadyRefunded;
        }
        c.refunded = true;
        let to_monthly = if c.period == period { c.from_monthly } else { 0 };
        let to_topup = c.from_topup;
        if c.period == period {
            self.used -= c.cost;
        }
        self.monthly += to_monthly;
        self.topup += to_topup;
        // A refunded request was not served: a retry under the same idempotency key pays anew.
        if let Some(key) = c.idempotency_key.take()
            && self.idempotency.get(&key).is_some_and(|(_, id)| id == charge_id)
        {
            self.idempotency.remove(&key);
        }
        RefundOutcome::Refunded { to_monthly, to_topup, monthly_remaining: self.monthly, topup_remaining: self.topup }
    }
}

impl Ledger for MemoryLedger {
    async fn create_account(&self, new: NewAccount) -> LedgerResult<bool> {
        let now = (self.clock)();
        let anchor = Anchor::from_unix(new.anchor);
        let period = anchor.period_at(now);
        let mut accounts = self.accounts.write().expect("lock");
        if accounts.contains_key(&new.id) {
            return Ok(false);
        }
        let account = Account {
            id: new.id.clone(),
            plan: new.plan,
            allocation: new.allocation,
            pending: None,
            anchor,
            period,
            monthly: new.allocation,
            topup: 0,
            used: 0,
            email: new.email,
            charges: HashMap::new(),
            idempotency: HashMap::new(),
            expiries: VecDeque::new(),
            topups: HashMap::new(),
        };
        accounts.insert(new.id, Arc::new(Mutex::new(account)));
        Ok(true)
    }

    async fn account(&self, id: &str) -> LedgerResult<Option<AccountView>> {
        Ok(self.with_account(id, |a, _| a.view()))
    }

    async fn charge(&self, req: ChargeRequest<'_>) -> LedgerResult<ChargeOutcome> {
        Ok(self.with_account(req.account, |a, now| a.charge(&req, now)).unwrap_or(ChargeOutcome::NoAccount))
    }

    async fn refund(&self, account: &str, charge_id: &str) -> LedgerResult<RefundOutcome> {
        Ok(self.with_account(account, |a, _| a.refund(charge_id)).unwrap_or(RefundOutcome::UnknownCharge))
    }

    async fn topup(&self, req: TopupRequest<'_>) -> LedgerResult<TopupOutcome> {
        let outcome = self.with_account(req.account, |a, now| {
            if let Some(r) = a.topups.get(req.payment_ref) {
                return TopupOutcome::Duplicate(r.clone());
            }
            a.topup += req.credits;
            let receipt = TopupReceipt {
                payment_ref: req.payment_ref.to_owned(),
                credits: req.credits,
                package: req.package.map(str::to_owned),
                topup_remaining: a.topup,
                created_at: now,
            };
            a.topups.insert(req.payment_ref.to_owned(), receipt.clone());
            TopupOutcome::Created(receipt)
        });
        Ok(outcome.unwrap_or(TopupOutcome::NoAccount))
    }

    async fn create_key(&self, key: KeyRecord) -> LedgerResult<bool> {
        if !self.accounts.read().expect("lock").contains_key(&key.account) {
            return Ok(false);
        }
        self.keys.write().expect("lock").insert(key.hash.clone(), key);
        Ok(true)
    }

    async fn find_key(&self, hash: &str) -> LedgerResult<Option<KeyRecord>> {
        Ok(self.keys.read().expect("lock").get(hash).cloned())
    }

    async fn ping(&self) -> LedgerResult<()> {
        Ok(())
    }
}
