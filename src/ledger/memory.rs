//! The embedded store: balances in process memory, for the demo and unit tests.
//!
//! Each account sits behind its own mutex, and every [`Ledger`] step is one critical section on
//! that one account, so accounts never wait for each other and a step is as atomic as a Lua
//! script is in Redis. The account map itself is behind an `RwLock` taken for writing only when
//! an account is created. The semantics are those of the Redis scripts in `lua/`, step for step;
//! `tests/conformance.rs` runs one suite against both.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use serde_json::json;

use super::jobs::*;
use super::*;
use crate::calendar::{Anchor, rfc3339};

/// Source of "now" in Unix seconds; tests move it by hand.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(crate::calendar::now)
}

/// The embedded ledger.
pub struct MemoryLedger {
    accounts: RwLock<HashMap<String, Arc<Mutex<Account>>>>,
    /// Deferred refunds (never needed by this store itself, which always answers; kept so the
    /// conformance suite holds it to the same contract).
    refunds: Mutex<VecDeque<PendingRefund>>,
    limits: Mutex<StoreLimits>,
    dropped_events: std::sync::atomic::AtomicU64,
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
    auto: Option<AutoTopup>,
    auto_count: u64,
    /// Set when auto top-up is switched on: the next charge ending below the threshold buys even
    /// without a crossing (the balance may already be below it).
    auto_armed: bool,
    /// Threshold → period in which it last fired.
    fired: HashMap<u8, i64>,
    charges: HashMap<String, ChargeRecord>,
    idempotency: HashMap<String, IdemRecord>,
    /// (expiry, charge id) in charge order, to forget old records.
    expiries: VecDeque<(i64, String)>,
    /// (expiry, idempotency key) in creation order.
    idem_expiries: VecDeque<(i64, String)>,
    topups: HashMap<String, TopupReceipt>,
    history: VecDeque<HistoryEntry>,
    /// History entries trimmed so far: the oldest kept has seq `htrim + 1`.
    htrim: u64,
    /// The last history entry exported (usage export).
    exported: u64,
    usage: BTreeMap<i64, PeriodUsage>,
    outbox: VecDeque<Event>,
    /// Events dropped because the outbox was full, not yet reported.
    outbox_dropped: u64,
    event_seq: u64,
    jobs: HashMap<String, JobRecord>,
    /// Ids of queued and running jobs, oldest first.
    queue: VecDeque<String>,
    /// Request-body bytes the queued and running jobs hold.
    queued_bytes: u64,
    billing: Billing,
    /// Settled auto top-up payments, by payment reference (kept, as top-up receipts).
    settled: HashMap<String, Settlement>,
}

struct JobRecord {
    job: Job,
    status: &'static str,
    lease: Option<(String, i64)>,
    not_before: i64,
    updated_at: i64,
    /// Upstream status, headers and body.
    result: Option<JobResult>,
    error: Option<String>,
    /// Finished records are forgotten after this time.
    expires_at: Option<i64>,
    /// The Idempotency-Key whose 202 names this job (forgotten when the job is withdrawn).
    idem_key: Option<String>,
}

/// A finished job's upstream answer: status, kept headers, body.
type JobResult = (u16, Vec<(String, String)>, Vec<u8>);

/// What an idempotency key stands for (the `:idem:<key>` hash in Redis).
struct IdemRecord {
    fingerprint: String,
    /// The charge that holds the key (`None` for a queued request's 202).
    charge_id: Option<String>,
    state: IdemState,
    expires_at: i64,
}

impl IdemRecord {
    /// Whether it replays the 202 of queued job `job_id`.
    fn replays_job(&self, job_id: &str) -> bool {
        let IdemState::Done(answer) = &self.state else { return false };
        let needle = format!("\"job_id\":\"{job_id}\"");
        self.charge_id.is_none() && answer.body.windows(needle.len()).any(|w| w == needle.as_bytes())
    }
}

enum IdemState {
    /// Charged and running until at most this time.
    Running(i64),
    Done(StoredResponse),
    /// The charge stands but its answer was not kept.
    Gone,
}

struct ChargeRecord {
    /// Credits an auto top-up added in this charge's step (re-sent steps answer the same).
    auto_topup: Option<u64>,
    cost: u64,
    from_monthly: u64,
    from_topup: u64,
    period: i64,
    day: i64,
    operation: String,
    category: String,
    idempotency_key: Option<String>,
    refunded: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic inside a step cannot leave a half-applied change behind (every step checks before
    // it writes), so a poisoned lock is safe to take over.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl MemoryLedger {
    /// An empty ledger on the system clock.
    pub fn new() -> Self {
        Self::with_clock(system_clock())
    }

    /// An empty ledger on the given clock.
    pub fn with_clock(clock: Clock) -> Self {
        Self {
            accounts: RwLock::default(),
            refunds: Mutex::default(),
            limits: Mutex::default(),
            dropped_events: Default::default(),
            keys: RwLock::default(),
            clock,
        }
    }

    fn get(&self, id: &str) -> Option<Arc<Mutex<Account>>> {
        self.accounts.read().unwrap_or_else(PoisonError::into_inner).get(id).cloned()
    }

    fn with_account<T>(&self, id: &str, f: impl FnOnce(&mut Account, i64) -> T) -> Option<T> {
        let acct = self.get(id)?;
        let limits = *lock(&self.limits);
        let mut a = lock(&acct);
        let now = (self.clock)();
        let (entries, events) = (a.htrim + a.history.len() as u64, a.event_seq);
        a.renew(now);
        a.forget_expired(now);
        let out = f(&mut a, now);
        // Bounds kept in the same step that grew the history or the outbox (as lib.lua `save`).
        if a.htrim + a.history.len() as u64 > entries {
            let mut trim = (a.history.len() as u64).saturating_sub(limits.history_max_entries);
            if limits.history_exported_only {
                trim = trim.min(a.exported.saturating_sub(a.htrim));
            }
            a.history.drain(..trim as usize);
            a.htrim += trim;
        }
        if a.event_seq > events && a.outbox.len() as u64 > limits.outbox_max_events {
            let drop = a.outbox.len() - limits.outbox_max_events as usize;
            a.outbox.drain(..drop);
            a.outbox_dropped += drop as u64;
        }
        Some(out)
    }
}

impl Default for MemoryLedger {
    fn default() -> Self {
        Self::new()
    }
}

// === impl Account ===

impl Account {
    /// Moves into the period containing `now`; never backwards, never twice for one period.
    fn renew(&mut self, now: i64) {
        let k = self.anchor.period_at(now);
        if k <= self.period {
            return;
        }
        if let Some((plan, allocation)) = self.pending.take() {
            self.plan = plan;
            self.allocation = allocation;
        }
        let expired = self.monthly;
        self.period = k;
        self.monthly = self.allocation;
        self.used = 0;
        self.auto_count = 0;
        // A renewal that leaves the total below the auto top-up threshold arms it (see charge).
        if self.auto.as_ref().is_some_and(|a| a.enabled && self.monthly + self.topup < a.threshold) {
            self.auto_armed = true;
        }
        self.usage.retain(|p, _| *p > k - USAGE_PERIODS);
        let mut e = self.entry("renewal", now, self.allocation as i64 - expired as i64, 0);
        e.plan = Some(self.plan.clone());
        self.history.push_back(e);
        let data = json!({
            "plan": self.plan, "allocation": self.allocation, "expired_monthly": expired,
            "topup_remaining": self.topup, "period_start": rfc3339(self.anchor.period_start(k)),
            "renews_at": rfc3339(self.renews_at()),
        });
        self.event("credits.renewed", now, data);
    }

    fn forget_expired(&mut self, now: i64) {
        if !self.jobs.is_empty() {
            self.jobs.retain(|_, j| j.expires_at.is_none_or(|t| t > now));
        }
        while self.expiries.front().is_some_and(|(expiry, _)| *expiry <= now) {
            let (_, charge_id) = self.expiries.pop_front().expect("front exists");
            self.charges.remove(&charge_id);
        }
        while let Some((expiry, key)) = self.idem_expiries.front() {
            if *expiry > now {
                break;
            }
            // A key released and used again has a later record: only the expired one goes.
            if self.idempotency.get(key).is_some_and(|r| r.expires_at <= now) {
                self.idempotency.remove(key);
            }
            self.idem_expiries.pop_front();
        }
    }

    /// What a used idempotency key answers, or `None` for a fresh one.
    fn idem_hit(&self, idem: &Idempotency<'_>, now: i64) -> Option<IdemHit> {
        let r = self.idempotency.get(idem.key).filter(|r| r.expires_at > now)?;
        if r.fingerprint != idem.fingerprint {
            return Some(IdemHit::Conflict);
        }
        Some(match &r.state {
            IdemState::Done(response) => IdemHit::Replay {
                response: response.clone(),
                remaining: self.monthly + self.topup,
                allocation: self.allocation,
            },
            IdemState::Running(until) if *until > now => IdemHit::InProgress { retry_after_secs: (until - now) as u64 },
            _ => IdemHit::Reused,
        })
    }

    fn put_idem(&mut self, idem: &Idempotency<'_>, charge_id: Option<&str>, state: IdemState, now: i64) {
        let record = IdemRecord {
            fingerprint: idem.fingerprint.to_owned(),
            charge_id: charge_id.map(str::to_owned),
            state,
            expires_at: now + RETENTION_SECS,
        };
        self.idempotency.insert(idem.key.to_owned(), record);
        self.idem_expiries.push_back((now + RETENTION_SECS, idem.key.to_owned()));
    }

    fn entry(&self, kind: &str, at: i64, monthly_delta: i64, topup_delta: i64) -> HistoryEntry {
        HistoryEntry {
            seq: self.htrim + self.history.len() as u64 + 1,
            kind: kind.to_owned(),
            at,
            monthly_delta,
            topup_delta,
            monthly_after: self.monthly,
            topup_after: self.topup,
            operation: None,
            category: None,
            request_id: None,
            charge_id: None,
            payment_ref: None,
            package: None,
            plan: None,
        }
    }

    fn event(&mut self, kind: &str, at: i64, data: serde_json::Value) {
        self.event_seq += 1;
        self.outbox.push_back(Event {
            id: format!("evt_{}_{}", self.id, self.event_seq),
            kind: kind.to_owned(),
            account_id: self.id.clone(),
            created_at: at,
            data,
        });
    }

    fn receipt(&self, charge_id: &str, c: &ChargeRecord, auto_topup: Option<u64>) -> Receipt {
        Receipt {
            charge_id: charge_id.to_owned(),
            cost: c.cost,
            from_monthly: c.from_monthly,
            from_topup: c.from_topup,
            monthly_remaining: self.monthly,
            topup_remaining: self.topup,
            allocation: self.allocation,
            renews_at: self.renews_at(),
            auto_topup,
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
            auto_topup: self.auto.clone(),
            auto_topups_this_period: self.auto_count,
        }
    }

    fn add_usage(&mut self, period: i64, day: i64, category: &str, operation: &str, credits: u64, sub: bool) {
        let u = self.usage.entry(period).or_default();
        let apply = |v: &mut u64| *v = if sub { v.saturating_sub(credits) } else { *v + credits };
        apply(&mut u.total);
        apply(u.by_category.entry(category.to_owned()).or_default());
        apply(u.by_operation.entry(operation.to_owned()).or_default());
        apply(u.by_day.entry(day).or_default());
    }

    fn charge(&mut self, req: &ChargeRequest<'_>, now: i64, record_secs: i64) -> ChargeOutcome {
        // A re-sent step (same charge id) returns what the first one did; a refunded (or
        // tombstoned) charge id stays refunded.
        if let Some(c) = self.charges.get(req.charge_id) {
            if c.refunded {
                return ChargeOutcome::Refunded;
            }
            return ChargeOutcome::Charged(self.receipt(req.charge_id, c, c.auto_topup));
        }
        if let Some(hit) = req.idempotency.and_then(|idem| self.idem_hit(&idem, now)) {
            return ChargeOutcome::Idempotent(hit);
        }
        let before = self.monthly + self.topup;
        if before < req.cost {
            return ChargeOutcome::Refused { remaining: before, renews_at: self.renews_at() };
        }
        let from_monthly = req.cost.min(self.monthly);
        let from_topup = req.cost - from_monthly;
        self.monthly -= from_monthly;
        self.topup -= from_topup;
        self.used += req.cost;
        let idempotency_key = req.idempotency.map(|i| {
            self.put_idem(&i, Some(req.charge_id), IdemState::Running(now + i.lease_secs), now);
            i.key.to_owned()
        });
        let day = now.div_euclid(86_400);
        self.add_usage(self.period, day, req.category, req.operation, req.cost, false);
        let mut e = self.entry("charge", now, -(from_monthly as i64), -(from_topup as i64));
        e.operation = Some(req.operation.to_owned());
        e.category = Some(req.category.to_owned());
        e.request_id = Some(req.request_id.to_owned());
        e.charge_id = Some(req.charge_id.to_owned());
        self.history.push_back(e);
        let mut record = ChargeRecord {
            auto_topup: None,
            cost: req.cost,
            from_monthly,
            from_topup,
            period: self.period,
            day,
            operation: req.operation.to_owned(),
            category: req.category.to_owned(),
            idempotency_key,
            refunded: false,
        };
        let auto_topup = self.auto_topup(before, req, now);
        record.auto_topup = auto_topup;
        self.thresholds(req.thresholds, now);
        let receipt = self.receipt(req.charge_id, &record, auto_topup);
        self.charges.insert(req.charge_id.to_owned(), record);
        self.expiries.push_back((now + record_secs, req.charge_id.to_owned()));
        ChargeOutcome::Charged(receipt)
    }

    /// Buys the auto top-up package when this charge crossed the threshold (at most once per
    /// crossing: only the charge that goes from at-or-above to below buys), or — once — when the
    /// setting was switched on while already below it (armed).
    fn auto_topup(&mut self, before: u64, req: &ChargeRequest<'_>, now: i64) -> Option<u64> {
        let auto = self.auto.as_ref().filter(|a| a.enabled)?;
        let after = self.monthly + self.topup;
        let crossed = after < auto.threshold && (before >= auto.threshold || self.auto_armed);
        if after >= auto.threshold {
            self.auto_armed = false;
        }
        if !crossed || self.auto_count >= req.auto_topup_max_per_period {
            return None;
        }
        self.auto_armed = false;
        // The customer agreed to this package at this price: one that changed or disappeared
        // from the running config since is not bought; the setting goes off instead.
        let current = req.packages.get(&auto.package);
        if current.is_none_or(|(c, p)| c != auto.credits || price_json(p) != price_json(auto.price_eur)) {
            let reason = if current.is_none() { "package_removed" } else { "package_changed" };
            let package = auto.package.clone();
            self.auto.as_mut().expect("checked").enabled = false;
            self.event("auto_topup.disabled", now, json!({"package": package, "reason": reason}));
            return None;
        }
        let (credits, package, price) = (auto.credits, auto.package.clone(), auto.price_eur);
        let payment_ref = format!("auto:{}", req.charge_id);
        self.topup += credits;
        self.auto_count += 1;
        let mut e = self.entry("auto_topup", now, 0, credits as i64);
        e.payment_ref = Some(payment_ref.clone());
        e.package = Some(package.clone());
        self.history.push_back(e);
        let data = json!({
            "package": package, "credits": credits, "price_eur": price, "payment_ref": payment_ref,
            "topup_remaining": self.topup, "purchases_this_period": self.auto_count,
        });
        self.event("auto_topup.purchased", now, data);
        Some(credits)
    }

    /// Raises `credits.low` / `credits.exhausted` for thresholds reached, once per period each.
    fn thresholds(&mut self, thresholds: &[u8], now: i64) {
        let remaining = self.monthly + self.topup;
        // Largest first, each once, as the Redis store writes them into its library (a config's
        // list usually is already: then it is not copied).
        let sorted;
        let thresholds = if thresholds.windows(2).all(|w| w[0] > w[1]) {
            thresholds
        } else {
            let mut copy = thresholds.to_vec();
            copy.sort_unstable_by(|a, b| b.cmp(a));
            copy.dedup();
            sorted = copy;
            &sorted[..]
        };
        for &t in thresholds {
            let reached = if t == 0 { remaining == 0 } else { remaining * 100 <= self.allocation * t as u64 };
            if !reached || self.fired.get(&t) == Some(&self.period) {
                continue;
            }
            self.fired.insert(t, self.period);
            let kind = if t == 0 { "credits.exhausted" } else { "credits.low" };
            let data = json!({
                "threshold": t, "remaining": remaining, "allocation": self.allocation,
                "renews_at": rfc3339(self.renews_at()),
            });
            self.event(kind, now, data);
        }
    }

    fn refund(&mut self, charge_id: &str, now: i64) -> RefundOutcome {
        let period = self.period;
        let Some(c) = self.charges.get_mut(charge_id) else {
            // A tombstone: the charge may still be on its way (its reply was lost); when it
            // arrives it must find itself refunded rather than debit for a request not served.
            let tombstone = ChargeRecord {
                auto_topup: None,
                cost: 0,
                from_monthly: 0,
                from_topup: 0,
                period,
                day: now.div_euclid(86_400),
                operation: String::new(),
                category: String::new(),
                idempotency_key: None,
                refunded: true,
            };
            self.charges.insert(charge_id.to_owned(), tombstone);
            self.expiries.push_back((now + RETENTION_SECS, charge_id.to_owned()));
            return RefundOutcome::UnknownCharge;
        };
        if c.refunded {
            return RefundOutcome::AlreadyRefunded;
        }
        c.refunded = true;
        let same_period = c.period == period;
        let to_monthly = if same_period { c.from_monthly } else { 0 };
        let to_topup = c.from_topup;
        let (cost, charge_period, day) = (c.cost, c.period, c.day);
        let (operation, category) = (c.operation.clone(), c.category.clone());
        // A refunded request was not served: a retry under the same idempotency key pays anew.
        if let Some(key) = c.idempotency_key.take()
            && self.idempotency.get(&key).is_some_and(|r| r.charge_id.as_deref() == Some(charge_id))
        {
            self.idempotency.remove(&key);
        }
        if same_period {
            self.used = self.used.saturating_sub(cost);
        }
        self.monthly += to_monthly;
        self.topup += to_topup;
        // Only what came back leaves the usage: expired monthly credits stay counted as used.
        self.add_usage(charge_period, day, &category, &operation, to_monthly + to_topup, true);
        let mut e = self.entry("refund", now, to_monthly as i64, to_topup as i64);
        e.operation = Some(operation);
        e.category = Some(category);
        e.charge_id = Some(charge_id.to_owned());
        self.history.push_back(e);
        RefundOutcome::Refunded { to_monthly, to_topup, monthly_remaining: self.monthly, topup_remaining: self.topup }
    }

    fn topup(&mut self, req: &TopupRequest<'_>, now: i64) -> TopupOutcome {
        if let Some(r) = self.topups.get(req.payment_ref) {
            return TopupOutcome::Duplicate(r.clone());
        }
        self.topup += req.credits;
        let receipt = TopupReceipt {
            payment_ref: req.payment_ref.to_owned(),
            credits: req.credits,
            package: req.package.map(str::to_owned),
            topup_remaining: self.topup,
            created_at: now,
        };
        self.topups.insert(req.payment_ref.to_owned(), receipt.clone());
        let mut e = self.entry("topup", now, 0, req.credits as i64);
        e.payment_ref = Some(req.payment_ref.to_owned());
        e.package = req.package.map(str::to_owned);
        self.history.push_back(e);
        let data = json!({
            "payment_ref": req.payment_ref, "credits": req.credits, "package": req.package,
            "topup_remaining": self.topup,
        });
        self.event("topup.completed", now, data);
        TopupOutcome::Created(receipt)
    }

    /// lua/settle_auto_topup.lua
    fn settle_auto_topup(
        &mut self,
        payment_ref: &str,
        credits: u64,
        payment: AutoTopupPayment<'_>,
        now: i64,
    ) -> Settlement {
        if let Some(s) = self.settled.get(payment_ref) {
            return s.clone();
        }
        let settlement = match payment {
            AutoTopupPayment::Paid(id) => Settlement::Paid { payment_id: id.to_owned() },
            AutoTopupPayment::Failed(reason) => {
                let taken = credits.min(self.topup);
                self.topup -= taken;
                let mut e = self.entry("auto_topup_reversed", now, 0, -(taken as i64));
                e.payment_ref = Some(payment_ref.to_owned());
                self.history.push_back(e);
                let data = json!({
                    "payment_ref": payment_ref, "credits": credits, "taken_back": taken,
                    "topup_remaining": self.topup, "reason": reason,
                });
                self.event("auto_topup.payment_failed", now, data);
                if let Some(auto) = &mut self.auto {
                    auto.enabled = false;
                }
                self.auto_armed = false;
                self.billing.card_failed = true;
                Settlement::Reversed { taken_back: taken, topup_remaining: self.topup }
            }
        };
        self.settled.insert(payment_ref.to_owned(), settlement.clone());
        settlement
    }

    fn change_plan(&mut self, change: PlanChange<'_>, now: i64) -> PlanOutcome {
        if change.plan == self.plan {
            self.pending = None;
            return PlanOutcome::Unchanged;
        }
        if change.allocation < self.allocation {
            self.pending = Some((change.plan.to_owned(), change.allocation));
            let mut e = self.entry("plan_change", now, 0, 0);
            e.plan = Some(change.plan.to_owned());
            self.history.push_back(e);
            return PlanOutcome::DowngradeScheduled;
        }
        let grow = change.allocation - self.allocation;
        self.plan = change.plan.to_owned();
        self.allocation = change.allocation;
        self.pending = None;
        self.monthly += grow;
        let mut e = self.entry("plan_change", now, grow as i64, 0);
        e.plan = Some(change.plan.to_owned());
        self.history.push_back(e);
        PlanOutcome::Upgraded
    }

    fn usage(&self, earlier: usize) -> Usage {
        let period = |k: i64| {
            let mut u = self.usage.get(&k).cloned().unwrap_or_default();
            u.period_start = self.anchor.period_start(k);
            u.period_end = self.anchor.period_start(k + 1);
            u
        };
        Usage { current: period(self.period), earlier: (1..=earlier as i64).map(|i| period(self.period - i)).collect() }
    }
}

// === impl Ledger for MemoryLedger ===

impl Ledger for MemoryLedger {
    fn set_limits(&self, limits: StoreLimits) {
        *lock(&self.limits) = limits;
    }

    fn take_dropped_events(&self) -> u64 {
        self.dropped_events.swap(0, std::sync::atomic::Ordering::Relaxed)
    }

    async fn create_account(&self, new: NewAccount) -> LedgerResult<bool> {
        let now = (self.clock)();
        let anchor = Anchor::from_unix(new.anchor);
        let mut accounts = self.accounts.write().unwrap_or_else(PoisonError::into_inner);
        if accounts.contains_key(&new.id) {
            return Ok(false);
        }
        let mut account = Account {
            id: new.id.clone(),
            plan: new.plan,
            allocation: new.allocation,
            pending: None,
            anchor,
            period: anchor.period_at(now),
            monthly: new.allocation,
            topup: 0,
            used: 0,
            email: new.email,
            auto: None,
            auto_count: 0,
            auto_armed: false,
            fired: HashMap::new(),
            charges: HashMap::new(),
            idempotency: HashMap::new(),
            expiries: VecDeque::new(),
            idem_expiries: VecDeque::new(),
            topups: HashMap::new(),
            history: VecDeque::new(),
            htrim: 0,
            exported: 0,
            usage: BTreeMap::new(),
            outbox: VecDeque::new(),
            outbox_dropped: 0,
            event_seq: 0,
            jobs: HashMap::new(),
            queue: VecDeque::new(),
            queued_bytes: 0,
            billing: Billing::default(),
            settled: HashMap::new(),
        };
        let mut e = account.entry("created", now, new.allocation as i64, 0);
        e.plan = Some(account.plan.clone());
        account.history.push_back(e);
        accounts.insert(new.id, Arc::new(Mutex::new(account)));
        Ok(true)
    }

    async fn account(&self, id: &str) -> LedgerResult<Option<AccountView>> {
        Ok(self.with_account(id, |a, _| a.view()))
    }

    async fn charge(&self, req: ChargeRequest<'_>) -> LedgerResult<ChargeOutcome> {
        let record_secs = lock(&self.limits).charge_record_secs;
        Ok(self
            .with_account(req.account, |a, now| a.charge(&req, now, record_secs))
            .unwrap_or(ChargeOutcome::NoAccount))
    }

    async fn refund(&self, account: &str, charge_id: &str) -> LedgerResult<RefundOutcome> {
        Ok(self.with_account(account, |a, now| a.refund(charge_id, now)).unwrap_or(RefundOutcome::UnknownCharge))
    }

    async fn complete_idempotent(
        &self,
        account: &str,
        key: &str,
        charge_id: &str,
        response: Option<&StoredResponse>,
    ) -> LedgerResult<bool> {
        Ok(self
            .with_account(account, |a, now| {
                let Some(r) = a.idempotency.get_mut(key).filter(|r| r.expires_at > now) else { return false };
                if r.charge_id.as_deref() != Some(charge_id) || !matches!(r.state, IdemState::Running(_)) {
                    return false;
                }
                r.state = response.map_or(IdemState::Gone, |res| IdemState::Done(res.clone()));
                true
            })
            .unwrap_or(false))
    }

    async fn count_free_automatic(
        &self,
        account: &str,
        operation: &str,
        max_per_period: Option<u64>,
        idempotency: Option<Idempotency<'_>>,
    ) -> LedgerResult<FreeOutcome> {
        Ok(self
            .with_account(account, |a, now| {
                if let Some(hit) = idempotency.and_then(|idem| a.idem_hit(&idem, now)) {
                    return FreeOutcome::Idempotent(hit);
                }
                let period = a.period;
                let counts = &mut a.usage.entry(period).or_default().free_automatic;
                let count = counts.get(operation).copied().unwrap_or(0);
                if max_per_period.is_some_and(|max| count >= max) {
                    return FreeOutcome::OverCap;
                }
                counts.insert(operation.to_owned(), count + 1);
                FreeOutcome::Free { count: count + 1 }
            })
            .unwrap_or(FreeOutcome::NoAccount))
    }

    async fn defer_refund(&self, refund: &PendingRefund) -> LedgerResult<()> {
        lock(&self.refunds).push_back(refund.clone());
        Ok(())
    }

    async fn pending_refunds(&self, max: usize) -> LedgerResult<Vec<PendingRefund>> {
        Ok(lock(&self.refunds).iter().take(max).cloned().collect())
    }

    async fn forget_refund(&self, refund: &PendingRefund) -> LedgerResult<()> {
        lock(&self.refunds).retain(|r| r != refund);
        Ok(())
    }

    async fn export_accounts(&self) -> LedgerResult<Vec<String>> {
        let accounts = self.accounts.read().unwrap_or_else(PoisonError::into_inner);
        let mut ids: Vec<String> = accounts
            .iter()
            .filter(|(_, a)| {
                let a = lock(a);
                a.exported < a.htrim + a.history.len() as u64
            })
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        Ok(ids)
    }

    async fn unexported(&self, account: &str, max: usize) -> LedgerResult<Vec<HistoryEntry>> {
        Ok(self
            .with_account(account, |a, _| {
                let from = a.exported.saturating_sub(a.htrim) as usize;
                a.history.range(from.min(a.history.len())..).take(max).cloned().collect()
            })
            .unwrap_or_default())
    }

    async fn ack_export(&self, account: &str, seq: u64) -> LedgerResult<u64> {
        Ok(self
            .with_account(account, |a, _| {
                let last = a.htrim + a.history.len() as u64;
                a.exported = a.exported.max(seq.min(last));
                last - a.exported
            })
            .unwrap_or(0))
    }

    async fn topup(&self, req: TopupRequest<'_>) -> LedgerResult<TopupOutcome> {
        Ok(self.with_account(req.account, |a, now| a.topup(&req, now)).unwrap_or(TopupOutcome::NoAccount))
    }

    async fn create_key(&self, key: KeyRecord) -> LedgerResult<bool> {
        if self.get(&key.account).is_none() {
            return Ok(false);
        }
        self.keys.write().unwrap_or_else(PoisonError::into_inner).insert(key.hash.clone(), key);
        Ok(true)
    }

    async fn find_key(&self, hash: &str) -> LedgerResult<Option<KeyRecord>> {
        Ok(self.keys.read().unwrap_or_else(PoisonError::into_inner).get(hash).cloned())
    }

    async fn ping(&self) -> LedgerResult<()> {
        Ok(())
    }

    async fn update_account(
        &self,
        id: &str,
        plan: Option<PlanChange<'_>>,
        email: Option<&str>,
    ) -> LedgerResult<Option<PlanOutcome>> {
        Ok(self.with_account(id, |a, now| {
            if let Some(email) = email {
                a.email = Some(email.to_owned());
            }
            plan.map_or(PlanOutcome::Unchanged, |p| a.change_plan(p, now))
        }))
    }

    async fn set_auto_topup(&self, id: &str, setting: &AutoTopup) -> LedgerResult<bool> {
        Ok(self
            .with_account(id, |a, _| {
                // Only switching it on arms it (the balance may already be below the threshold);
                // saving an enabled setting again must not buy again.
                let was_on = a.auto.as_ref().is_some_and(|s| s.enabled);
                if setting.enabled && !was_on {
                    a.auto_armed = true;
                } else if !setting.enabled {
                    a.auto_armed = false;
                }
                a.auto = Some(setting.clone());
            })
            .is_some())
    }

    async fn billing(&self, id: &str) -> LedgerResult<Option<Billing>> {
        Ok(self.with_account(id, |a, _| a.billing.clone()))
    }

    async fn set_billing_customer(&self, id: &str, customer: &str) -> LedgerResult<Option<String>> {
        Ok(self.with_account(id, |a, _| a.billing.customer.get_or_insert_with(|| customer.to_owned()).clone()))
    }

    async fn set_billing_card(&self, id: &str, card: &str) -> LedgerResult<bool> {
        Ok(self
            .with_account(id, |a, _| {
                a.billing.card = Some(card.to_owned());
                a.billing.card_failed = false;
            })
            .is_some())
    }

    async fn settle_auto_topup(
        &self,
        id: &str,
        payment_ref: &str,
        credits: u64,
        payment: AutoTopupPayment<'_>,
    ) -> LedgerResult<Settlement> {
        Ok(self
            .with_account(id, |a, now| a.settle_auto_topup(payment_ref, credits, payment, now))
            .unwrap_or(Settlement::NoAccount))
    }

    async fn auto_topup_settlement(&self, id: &str, payment_ref: &str) -> LedgerResult<Option<Settlement>> {
        Ok(self.with_account(id, |a, _| a.settled.get(payment_ref).cloned()).flatten())
    }

    async fn list_keys(&self, account: &str) -> LedgerResult<Vec<KeyRecord>> {
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        let mut list: Vec<KeyRecord> = keys.values().filter(|k| k.account == account).cloned().collect();
        list.sort_by(|a, b| (a.created_at, &a.key_id).cmp(&(b.created_at, &b.key_id)));
        Ok(list)
    }

    async fn revoke_key(&self, key_id: &str) -> LedgerResult<Option<KeyRecord>> {
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        let hash = keys.values().find(|k| k.key_id == key_id).map(|k| k.hash.clone());
        Ok(hash.and_then(|h| keys.remove(&h)))
    }

    async fn history(
        &self,
        account: &str,
        before: Option<u64>,
        limit: usize,
    ) -> LedgerResult<Option<Vec<HistoryEntry>>> {
        Ok(self.with_account(account, |a, _| {
            // Entry seq s sits at index s - 1 - htrim (the oldest ones were trimmed).
            let kept = a.history.len();
            let end = before.map_or(kept, |b| (b.saturating_sub(1).saturating_sub(a.htrim) as usize).min(kept));
            a.history.range(..end).rev().take(limit).cloned().collect()
        }))
    }

    async fn usage(&self, account: &str, earlier: usize) -> LedgerResult<Option<Usage>> {
        Ok(self.with_account(account, |a, _| a.usage(earlier)))
    }

    async fn event_accounts(&self) -> LedgerResult<Vec<String>> {
        let accounts: Vec<_> = self.accounts.read().unwrap_or_else(PoisonError::into_inner).values().cloned().collect();
        Ok(accounts.iter().map(|a| lock(a)).filter(|a| !a.outbox.is_empty()).map(|a| a.id.clone()).collect())
    }

    async fn pending_events(&self, account: &str, max: usize) -> LedgerResult<Vec<Event>> {
        let found = self.with_account(account, |a, _| {
            (std::mem::take(&mut a.outbox_dropped), a.outbox.iter().take(max).cloned().collect())
        });
        let Some((dropped, events)) = found else { return Ok(Vec::new()) };
        if dropped > 0 {
            tracing::warn!(account, dropped, "outbox full: the oldest undelivered events were dropped");
            self.dropped_events.fetch_add(dropped, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(events)
    }

    async fn ack_events(&self, account: &str, ids: &[String]) -> LedgerResult<()> {
        self.with_account(account, |a, _| a.outbox.retain(|e| !ids.contains(&e.id)));
        Ok(())
    }
}

// === impl JobStore for MemoryLedger ===

impl JobStore for MemoryLedger {
    async fn enqueue_job(&self, new: NewJob<'_>) -> LedgerResult<EnqueueOutcome> {
        let outcome = self.with_account(new.account, |a, now| {
            if let Some(hit) = new.idempotency.and_then(|idem| a.idem_hit(&idem, now)) {
                return EnqueueOutcome::Idempotent(hit);
            }
            // A re-sent enqueue of the same job changes nothing (like every other step).
            if a.jobs.contains_key(new.id) {
                return EnqueueOutcome::Queued { depth: a.queue.len() as u64 };
            }
            if a.queue.len() as u64 >= new.max_queued {
                return EnqueueOutcome::Full;
            }
            if a.queued_bytes + new.stored_bytes() > new.max_queued_bytes {
                return EnqueueOutcome::FullBytes;
            }
            a.queued_bytes += new.stored_bytes();
            let job = Job {
                id: new.id.to_owned(),
                account: new.account.to_owned(),
                operation: new.operation.to_owned(),
                category: new.category.to_owned(),
                cost: new.cost,
                upstream: new.upstream.to_owned(),
                method: new.method.to_owned(),
                path: new.path.to_owned(),
                headers: new.headers.to_vec(),
                body: new.body.to_vec(),
                request_id: new.request_id.to_owned(),
                attempts: 0,
                created_at: now,
            };
            let record = JobRecord {
                job,
                status: "queued",
                lease: None,
                not_before: now,
                updated_at: now,
                result: None,
                error: None,
                expires_at: None,
                idem_key: new.idempotency.map(|i| i.key.to_owned()),
            };
            a.jobs.insert(new.id.to_owned(), record);
            a.queue.push_back(new.id.to_owned());
            let depth = a.queue.len() as u64;
            if let Some(idem) = new.idempotency {
                a.put_idem(&idem, None, IdemState::Done(queued_response(new.id, depth)), now);
            }
            EnqueueOutcome::Queued { depth }
        });
        Ok(outcome.unwrap_or(EnqueueOutcome::NoAccount))
    }

    async fn claim_job(&self, account: &str, runner: &str, lease_secs: i64) -> LedgerResult<Option<Job>> {
        let limits = *lock(&self.limits);
        Ok(self
            .with_account(account, |a, now| {
                let Account { queue, jobs, queued_bytes, .. } = a;
                // Like the Redis script: only the oldest CLAIM_SCAN ids are looked at, and a job
                // not running that waited `job_max_age_secs` expires on the way.
                let mut expired = Vec::new();
                let mut chosen = None;
                for id in queue.iter().take(CLAIM_SCAN) {
                    let j = jobs.get_mut(id).expect("queued ids have records");
                    let leased = j.lease.as_ref().is_some_and(|(_, until)| *until > now);
                    if !leased && now - j.job.created_at >= limits.job_max_age_secs {
                        *queued_bytes = queued_bytes.saturating_sub(j.job.stored_bytes());
                        j.job.body = Vec::new();
                        j.lease = None;
                        j.status = "expired";
                        j.updated_at = now;
                        j.error = Some(format!("not run within {} h of queueing", limits.job_max_age_secs / 3600));
                        j.expires_at = Some(now + limits.job_retention_secs);
                        expired.push(id.clone());
                        continue;
                    }
                    if leased || j.not_before > now {
                        continue;
                    }
                    j.lease = Some((runner.to_owned(), now + lease_secs));
                    j.status = "running";
                    j.updated_at = now;
                    chosen = Some(j.job.clone());
                    break;
                }
                queue.retain(|id| !expired.contains(id));
                if queue.is_empty() {
                    *queued_bytes = 0;
                }
                chosen
            })
            .flatten())
    }

    async fn finish_job(&self, account: &str, job_id: &str, runner: &str, finish: JobFinish) -> LedgerResult<bool> {
        Ok(self
            .with_account(account, |a, now| {
                let Some(j) = a.jobs.get_mut(job_id) else { return false };
                if j.lease.as_ref().is_none_or(|(r, _)| r != runner) {
                    return false;
                }
                j.lease = None;
                j.updated_at = now;
                let finished = match finish {
                    JobFinish::Done { status, headers, body, retention_secs } => {
                        j.status = "done";
                        j.error = None;
                        j.result = Some((status, headers, body));
                        j.expires_at = Some(now + retention_secs);
                        true
                    }
                    JobFinish::Failed { reason, retention_secs } => {
                        j.status = "failed";
                        j.job.attempts += 1;
                        j.error = Some(reason);
                        j.expires_at = Some(now + retention_secs);
                        true
                    }
                    JobFinish::Retry { reason, delay_secs } => {
                        j.status = "queued";
                        j.job.attempts += 1;
                        j.error = Some(reason);
                        j.not_before = now + delay_secs;
                        false
                    }
                    JobFinish::Release => {
                        j.status = "queued";
                        false
                    }
                };
                if finished {
                    a.queued_bytes = a.queued_bytes.saturating_sub(j.job.stored_bytes());
                    j.job.body = Vec::new();
                    a.queue.retain(|id| id != job_id);
                }
                true
            })
            .unwrap_or(false))
    }

    async fn withdraw_job(&self, account: &str, job_id: &str) -> LedgerResult<bool> {
        let retention = lock(&self.limits).job_retention_secs;
        Ok(self
            .with_account(account, |a, now| {
                let error =
                    Some("withdrawn: its request was answered 503 before the queueing was confirmed".to_owned());
                match a.jobs.get_mut(job_id) {
                    Some(j) if j.status == "withdrawn" => true,
                    Some(j) if j.status != "queued" || j.lease.as_ref().is_some_and(|l| l.1 > now) => false,
                    Some(j) => {
                        a.queued_bytes = a.queued_bytes.saturating_sub(j.job.stored_bytes());
                        j.job.body = Vec::new();
                        (j.status, j.lease, j.updated_at, j.error) = ("withdrawn", None, now, error);
                        j.expires_at = Some(now + retention);
                        let idem_key = j.idem_key.take();
                        a.queue.retain(|id| id != job_id);
                        // Nobody was told of the job: its key forgets the 202, so a retry queues
                        // afresh (unless the key has moved on to another request since).
                        if let Some(key) = idem_key
                            && a.idempotency.get(&key).is_some_and(|r| r.replays_job(job_id))
                        {
                            a.idempotency.remove(&key);
                        }
                        true
                    }
                    None => {
                        let job = Job {
                            id: job_id.to_owned(),
                            account: account.to_owned(),
                            operation: String::new(),
                            category: String::new(),
                            cost: 0,
                            upstream: String::new(),
                            method: String::new(),
                            path: String::new(),
                            headers: Vec::new(),
                            body: Vec::new(),
                            request_id: String::new(),
                            attempts: 0,
                            created_at: now,
                        };
                        let record = JobRecord {
                            job,
                            status: "withdrawn",
                            lease: None,
                            not_before: now,
                            updated_at: now,
                            result: None,
                            error,
                            expires_at: Some(now + retention),
                            idem_key: None,
                        };
                        a.jobs.insert(job_id.to_owned(), record);
                        true
                    }
                }
            })
            .unwrap_or(true))
    }

    async fn job(&self, account: &str, job_id: &str) -> LedgerResult<Option<JobView>> {
        Ok(self
            .with_account(account, |a, _| {
                a.jobs.get(job_id).map(|j| JobView {
                    id: j.job.id.clone(),
                    status: j.status.to_owned(),
                    operation: j.job.operation.clone(),
                    cost: j.job.cost,
                    attempts: j.job.attempts,
                    created_at: j.job.created_at,
                    updated_at: j.updated_at,
                    result_status: j.result.as_ref().map(|r| r.0),
                    result_headers: j.result.as_ref().map(|r| r.1.clone()).unwrap_or_default(),
                    result_body: j.result.as_ref().map(|r| r.2.clone()),
                    error: j.error.clone(),
                })
            })
            .flatten())
    }

    async fn queue_depth(&self, account: &str) -> LedgerResult<u64> {
        Ok(self.with_account(account, |a, _| a.queue.len() as u64).unwrap_or(0))
    }

    async fn job_accounts(&self) -> LedgerResult<Vec<String>> {
        let accounts: Vec<_> = self.accounts.read().unwrap_or_else(PoisonError::into_inner).values().cloned().collect();
        Ok(accounts.iter().map(|a| lock(a)).filter(|a| !a.queue.is_empty()).map(|a| a.id.clone()).collect())
    }
}
