//! `Store`: the ledger chosen by `[store] kind`, dispatched without boxing.

use crate::config::{StoreConfig, StoreKind};
use crate::ledger::jobs::*;
use crate::ledger::*;

/// The configured ledger.
pub enum Store {
    /// `kind = "memory"`
    Memory(MemoryLedger),
    /// `kind = "redis"`, `"redis-cluster"` or `"redis-sentinel"`
    Redis(RedisLedger),
}

impl Store {
    /// Opens the store a config names.
    pub async fn open(config: &StoreConfig) -> LedgerResult<Self> {
        let ledger = match config.kind {
            StoreKind::Memory => return Ok(Store::Memory(MemoryLedger::new())),
            StoreKind::Redis => {
                RedisLedger::connect_standalone(config.url.as_deref().expect("validated: url set")).await?
            }
            StoreKind::RedisCluster => {
                RedisLedger::connect_cluster(config.nodes.as_deref().expect("validated: nodes set")).await?
            }
            StoreKind::RedisSentinel => {
                let sentinels = config.sentinels.as_deref().expect("validated: sentinels set");
                let name = config.master_name.as_deref().expect("validated: master_name set");
                RedisLedger::connect_sentinel(sentinels, name).await?
            }
        };
        ledger.set_max_wait(std::time::Duration::from_millis(config.max_wait_ms));
        ledger.set_replication_wait(config.wait_replicas, std::time::Duration::from_millis(config.wait_timeout_ms));
        ledger.check_server_settings().await;
        Ok(Store::Redis(ledger))
    }

    /// Prepares the calling worker thread (see [`RedisLedger::attach_worker`]).
    pub async fn attach_worker(&self) {
        if let Store::Redis(l) = self {
            l.attach_worker().await;
        }
    }

    /// Whether the store is known to be down, and how many times it was marked so (the memory
    /// store never is).
    pub fn health(&self) -> (bool, u64) {
        match self {
            Store::Memory(_) => (false, 0),
            Store::Redis(l) => l.health(),
        }
    }

    /// Short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Store::Memory(_) => "memory",
            Store::Redis(_) => "redis",
        }
    }
}

macro_rules! dispatch {
    ($self:ident, $l:ident => $call:expr) => {
        match $self {
            Store::Memory($l) => $call.await,
            Store::Redis($l) => $call.await,
        }
    };
}

impl Ledger for Store {
    fn set_limits(&self, limits: StoreLimits) {
        match self {
            Store::Memory(l) => l.set_limits(limits),
            Store::Redis(l) => l.set_limits(limits),
        }
    }
    fn take_dropped_events(&self) -> u64 {
        match self {
            Store::Memory(l) => l.take_dropped_events(),
            Store::Redis(l) => l.take_dropped_events(),
        }
    }
    async fn create_account(&self, account: NewAccount) -> LedgerResult<bool> {
        dispatch!(self, l => l.create_account(account))
    }
    async fn account(&self, id: &str) -> LedgerResult<Option<AccountView>> {
        dispatch!(self, l => l.account(id))
    }
    async fn charge(&self, req: ChargeRequest<'_>) -> LedgerResult<ChargeOutcome> {
        dispatch!(self, l => l.charge(req))
    }
    async fn refund(&self, account: &str, charge_id: &str) -> LedgerResult<RefundOutcome> {
        dispatch!(self, l => l.refund(account, charge_id))
    }
    async fn complete_idempotent(
        &self,
        account: &str,
        key: &str,
        charge_id: &str,
        response: Option<&StoredResponse>,
    ) -> LedgerResult<bool> {
        dispatch!(self, l => l.complete_idempotent(account, key, charge_id, response))
    }
    async fn count_free_automatic(
        &self,
        account: &str,
        operation: &str,
        max_per_period: Option<u64>,
        idempotency: Option<crate::ledger::Idempotency<'_>>,
    ) -> LedgerResult<FreeOutcome> {
        dispatch!(self, l => l.count_free_automatic(account, operation, max_per_period, idempotency))
    }
    async fn defer_refund(&self, refund: &PendingRefund) -> LedgerResult<()> {
        dispatch!(self, l => l.defer_refund(refund))
    }
    async fn pending_refunds(&self, max: usize) -> LedgerResult<Vec<PendingRefund>> {
        dispatch!(self, l => l.pending_refunds(max))
    }
    async fn forget_refund(&self, refund: &PendingRefund) -> LedgerResult<()> {
        dispatch!(self, l => l.forget_refund(refund))
    }
    async fn export_accounts(&self) -> LedgerResult<Vec<String>> {
        dispatch!(self, l => l.export_accounts())
    }
    async fn unexported(&self, account: &str, max: usize) -> LedgerResult<Vec<HistoryEntry>> {
        dispatch!(self, l => l.unexported(account, max))
    }
    async fn ack_export(&self, account: &str, seq: u64) -> LedgerResult<u64> {
        dispatch!(self, l => l.ack_export(account, seq))
    }
    async fn topup(&self, req: TopupRequest<'_>) -> LedgerResult<TopupOutcome> {
        dispatch!(self, l => l.topup(req))
    }
    async fn create_key(&self, key: KeyRecord) -> LedgerResult<bool> {
        dispatch!(self, l => l.create_key(key))
    }
    async fn find_key(&self, hash: &str) -> LedgerResult<Option<KeyRecord>> {
        dispatch!(self, l => l.find_key(hash))
    }
    async fn ping(&self) -> LedgerResult<()> {
        dispatch!(self, l => l.ping())
    }
    async fn update_account(
        &self,
        id: &str,
        plan: Option<PlanChange<'_>>,
        email: Option<&str>,
    ) -> LedgerResult<Option<PlanOutcome>> {
        dispatch!(self, l => l.update_account(id, plan, email))
    }
    async fn set_auto_topup(&self, id: &str, setting: &AutoTopup) -> LedgerResult<bool> {
        dispatch!(self, l => l.set_auto_topup(id, setting))
    }
    async fn billing(&self, id: &str) -> LedgerResult<Option<Billing>> {
        dispatch!(self, l => l.billing(id))
    }
    async fn set_billing_customer(&self, id: &str, customer: &str) -> LedgerResult<Option<String>> {
        dispatch!(self, l => l.set_billing_customer(id, customer))
    }
    async fn set_billing_card(&self, id: &str, card: &str) -> LedgerResult<bool> {
        dispatch!(self, l => l.set_billing_card(id, card))
    }
    async fn settle_auto_topup(
        &self,
        id: &str,
        payment_ref: &str,
        credits: u64,
        payment: AutoTopupPayment<'_>,
    ) -> LedgerResult<Settlement> {
        dispatch!(self, l => l.settle_auto_topup(id, payment_ref, credits, payment))
    }
    async fn auto_topup_settlement(&self, id: &str, payment_ref: &str) -> LedgerResult<Option<Settlement>> {
        dispatch!(self, l => l.auto_topup_settlement(id, payment_ref))
    }
    async fn list_keys(&self, account: &str) -> LedgerResult<Vec<KeyRecord>> {
        dispatch!(self, l => l.list_keys(account))
    }
    async fn revoke_key(&self, key_id: &str) -> LedgerResult<Option<KeyRecord>> {
        dispatch!(self, l => l.revoke_key(key_id))
    }
    async fn history(
        &self,
        account: &str,
        before: Option<u64>,
        limit: usize,
    ) -> LedgerResult<Option<Vec<HistoryEntry>>> {
        dispatch!(self, l => l.history(account, before, limit))
    }
    async fn usage(&self, account: &str, earlier: usize) -> LedgerResult<Option<Usage>> {
        dispatch!(self, l => l.usage(account, earlier))
    }
    async fn event_accounts(&self) -> LedgerResult<Vec<String>> {
        dispatch!(self, l => l.event_accounts())
    }
    async fn pending_events(&self, account: &str, max: usize) -> LedgerResult<Vec<Event>> {
        dispatch!(self, l => l.pending_events(account, max))
    }
    async fn ack_events(&self, account: &str, ids: &[String]) -> LedgerResult<()> {
        dispatch!(self, l => l.ack_events(account, ids))
    }
}

impl JobStore for Store {
    async fn enqueue_job(&self, job: NewJob<'_>) -> LedgerResult<EnqueueOutcome> {
        dispatch!(self, l => l.enqueue_job(job))
    }
    async fn claim_job(&self, account: &str, runner: &str, lease_secs: i64) -> LedgerResult<Option<Job>> {
        dispatch!(self, l => l.claim_job(account, runner, lease_secs))
    }
    async fn finish_job(&self, account: &str, job_id: &str, runner: &str, finish: JobFinish) -> LedgerResult<bool> {
        dispatch!(self, l => l.finish_job(account, job_id, runner, finish))
    }
    async fn withdraw_job(&self, account: &str, job_id: &str) -> LedgerResult<bool> {
        dispatch!(self, l => l.withdraw_job(account, job_id))
    }
    async fn job(&self, account: &str, job_id: &str) -> LedgerResult<Option<JobView>> {
        dispatch!(self, l => l.job(account, job_id))
    }
    async fn queue_depth(&self, account: &str) -> LedgerResult<u64> {
        dispatch!(self, l => l.queue_depth(account))
    }
    async fn job_accounts(&self) -> LedgerResult<Vec<String>> {
        dispatch!(self, l => l.job_accounts())
    }
}
