//! The ledger: every balance an account has, and every change to it.
//!
//! [`Ledger`] is the seam between the gateway and its store. Each method is ONE atomic step in
//! the store — one critical section in [`memory`], one Lua script call in Redis — so no balance
//! is ever read in Rust, changed and written back. `charge` returns everything a metered response
//! needs (split, balances after, renewal date), so the happy path of a metered request costs one
//! store round trip; `refund` is a second one, only when the upstream failed.
//!
//! Renewal is lazy: every step first moves the account into the period that contains "now"
//! (resetting the monthly bucket to the allocation, applying a pending downgrade), so reads show
//! the new period even before the first charge in it.

pub mod jobs;
pub mod keys;
pub mod memory;
pub mod redis;

use std::future::Future;

use serde::Serialize;

pub use memory::MemoryLedger;
pub use redis::RedisLedger;

/// The store could not be reached or answered nonsense; the step may not have happened.
#[derive(Debug, thiserror::Error)]
#[error("store unavailable: {0}")]
pub struct LedgerError(pub String);

impl LedgerError {
    const NOT_SENT: &'static str = "not sent: the store is known to be down";

    /// A step that was not even sent (the store is known to be down): it cannot have happened.
    pub fn not_sent() -> Self {
        LedgerError(Self::NOT_SENT.to_owned())
    }

    /// Whether this is [`LedgerError::not_sent`]: unlike any other error, the step surely did
    /// not happen.
    pub fn was_not_sent(&self) -> bool {
        self.0 == Self::NOT_SENT
    }
}

/// Result of a ledger step.
pub type LedgerResult<T> = Result<T, LedgerError>;

/// A new account as the admin API creates it.
#[derive(Debug, Clone)]
pub struct NewAccount {
    /// Account id (validated by the caller).
    pub id: String,
    /// Plan name.
    pub plan: String,
    /// The plan's monthly credits, copied into the account.
    pub allocation: u64,
    /// Billing anchor, Unix seconds.
    pub anchor: i64,
    /// Contact e-mail.
    pub email: Option<String>,
}

/// An account's state as of now (after any due renewal).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AccountView {
    /// Account id.
    pub id: String,
    /// Current plan.
    pub plan: String,
    /// Credits granted at each renewal.
    pub allocation: u64,
    /// Plan that takes effect at the next renewal (a downgrade).
    pub pending_plan: Option<String>,
    /// Monthly bucket.
    pub monthly_remaining: u64,
    /// Top-up bucket.
    pub topup_remaining: u64,
    /// Credits charged this period (net of refunds).
    pub used_this_period: u64,
    /// Start of the current period, Unix seconds.
    pub period_start: i64,
    /// Next renewal, Unix seconds.
    pub renews_at: i64,
    /// Contact e-mail.
    pub email: Option<String>,
    /// Auto top-up setting, if one was ever made.
    pub auto_topup: Option<AutoTopup>,
    /// Auto top-ups bought in the current period.
    pub auto_topups_this_period: u64,
}

impl AccountView {
    /// Monthly plus top-up.
    pub fn remaining(&self) -> u64 {
        self.monthly_remaining + self.topup_remaining
    }
}

/// The idempotency part of a charge: a client key and what it was used for.
#[derive(Debug, Clone, Copy)]
pub struct Idempotency<'a> {
    /// The client's `Idempotency-Key`.
    pub key: &'a str,
    /// Hex SHA-256 over method, path, priced headers and body; a different one under the same
    /// key is a conflict.
    pub fingerprint: &'a str,
    /// How long the first request may run before a copy stops waiting for it: past this the
    /// key answers [`IdemHit::Reused`] (the first attempt's instance died with the charge standing).
    pub lease_secs: i64,
}

/// How long charge records, refund tombstones and idempotency records are kept (SPEC §4: 24 h).
/// Handed to the Lua scripts as an argument.
pub const RETENTION_SECS: i64 = 24 * 3600;

/// How many billing periods of usage are kept: the current one and 12 before it. Written into the
/// Lua prelude when the scripts are built.
pub const USAGE_PERIODS: i64 = 13;

/// The first completed answer to an idempotency key, replayed byte for byte to every repeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// HTTP status.
    pub status: u16,
    /// End-to-end headers, in order.
    pub headers: Vec<(String, String)>,
    /// The whole body.
    pub body: bytes::Bytes,
}

impl StoredResponse {
    /// The headers as the stores keep them: a JSON array of `[name, value]` pairs.
    pub fn headers_json(&self) -> String {
        serde_json::to_string(&self.headers).expect("strings serialise")
    }

    /// Reads [`Self::headers_json`] back.
    pub fn parse_headers(json: &str) -> Result<Vec<(String, String)>, LedgerError> {
        serde_json::from_str(json).map_err(|e| LedgerError(format!("stored response headers unreadable: {e}")))
    }
}

/// What an idempotency key that was used before answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdemHit {
    /// The first request completed: its answer, to replay (nothing charged now).
    Replay {
        /// The stored answer.
        response: StoredResponse,
        /// Monthly plus top-up now.
        remaining: u64,
        /// The account's allocation (for the low flag).
        allocation: u64,
    },
    /// The first request is still running; ask again in about `retry_after_secs`.
    InProgress {
        /// Seconds until its lease ends, at least 1.
        retry_after_secs: u64,
    },
    /// The first request's charge stands but its answer was not kept (too large, the client
    /// left, or its instance died): 409 `idempotency_key_reused`.
    Reused,
    /// The key was used for a different request: 409 `idempotency_conflict`.
    Conflict,
}

/// One metered request's charge.
#[derive(Debug, Clone, Copy)]
pub struct ChargeRequest<'a> {
    /// Paying account.
    pub account: &'a str,
    /// Unique id of this charge; a re-sent step with the same id is not applied again.
    pub charge_id: &'a str,
    /// Credits to take, all or nothing.
    pub cost: u64,
    /// Operation name (usage and history).
    pub operation: &'a str,
    /// Category name (usage and history).
    pub category: &'a str,
    /// Request id, for the history.
    pub request_id: &'a str,
    /// Optional client idempotency key.
    pub idempotency: Option<Idempotency<'a>>,
    /// Remaining-credit thresholds, percent of the allocation, that raise an event when crossed
    /// (largest first when several are crossed at once, whatever their order here).
    pub thresholds: &'a [u8],
    /// Most auto top-ups per billing period.
    pub auto_topup_max_per_period: u64,
    /// The top-up packages of the running config: an auto top-up buys its package as defined
    /// here at purchase time.
    pub packages: &'a Packages,
}

/// The top-up packages of one config generation, in the two forms the stores read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Packages {
    list: Vec<(String, u64, f64)>,
    /// `"\n<name>=<credits>:<price as JSON>"` per package, for the Lua scripts (see `lua/charge.lua`).
    spec: String,
}

impl Packages {
    /// From `(name, credits, price_eur)` triples.
    pub fn new(list: Vec<(String, u64, f64)>) -> Self {
        let spec = list.iter().map(|(n, c, p)| format!("\n{n}={c}:{}", price_json(*p))).collect();
        Packages { list, spec }
    }

    /// Credits and price of a package.
    pub fn get(&self, name: &str) -> Option<(u64, f64)> {
        self.list.iter().find(|(n, _, _)| n == name).map(|(_, c, p)| (*c, *p))
    }

    /// The form `lua/charge.lua` reads.
    pub fn spec(&self) -> &str {
        &self.spec
    }
}

/// A price as the stores write it into JSON events (serde's float text, e.g. `10.0`).
pub fn price_json(price_eur: f64) -> String {
    serde_json::to_string(&price_eur).expect("finite price")
}

/// What a charge took and what is left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// Charge id (the original one on an idempotent replay).
    pub charge_id: String,
    /// Credits charged by the original request.
    pub cost: u64,
    /// Part taken from the monthly bucket.
    pub from_monthly: u64,
    /// Part taken from the top-up bucket.
    pub from_topup: u64,
    /// Monthly bucket after the step.
    pub monthly_remaining: u64,
    /// Top-up bucket after the step.
    pub topup_remaining: u64,
    /// The account's allocation (for the low-credit flag).
    pub allocation: u64,
    /// Next renewal, Unix seconds.
    pub renews_at: i64,
    /// Credits an auto top-up added in this very step.
    pub auto_topup: Option<u64>,
}

impl Receipt {
    /// Monthly plus top-up after the step.
    pub fn remaining(&self) -> u64 {
        self.monthly_remaining + self.topup_remaining
    }
}

/// How a charge ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeOutcome {
    /// Debited now (or by an earlier copy of this very step: the same receipt).
    Charged(Receipt),
    /// This charge id was refunded (or refunded before it arrived, leaving a tombstone): nothing
    /// debited; a new attempt needs a new charge id.
    Refunded,
    /// The idempotency key was used before; nothing debited.
    Idempotent(IdemHit),
    /// Not enough credits; nothing debited.
    Refused {
        /// Monthly plus top-up now.
        remaining: u64,
        /// Next renewal, Unix seconds.
        renews_at: i64,
    },
    /// No such account.
    NoAccount,
}

/// Bounds a store keeps by itself, from the running config (`[history]`, `[export]`,
/// `[notifications]`); set at start and on every reload ([`Ledger::set_limits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLimits {
    /// History entries kept per account (`history.max_entries`); older ones are trimmed in the
    /// same atomic step that appends.
    pub history_max_entries: u64,
    /// With usage export on, only entries already exported may be trimmed.
    pub history_exported_only: bool,
    /// Undelivered events kept per account (`notifications.max_outbox_per_account`); beyond it
    /// the oldest are dropped (and counted, see [`Ledger::pending_events`]).
    pub outbox_max_events: u64,
    /// Queued jobs not run within this many seconds expire (`jobs.max_queue_age_hours`).
    pub job_max_age_secs: i64,
    /// How long an expired job's record stays readable (`jobs.result_retention_hours`).
    pub job_retention_secs: i64,
    /// How long a charge record is kept for refunds and re-sent steps (`charges.record_ttl_secs`).
    pub charge_record_secs: i64,
}

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            history_max_entries: 10_000,
            history_exported_only: false,
            outbox_max_events: 1_000,
            job_max_age_secs: 768 * 3600,
            job_retention_secs: 168 * 3600,
            charge_record_secs: RETENTION_SECS,
        }
    }
}

impl StoreLimits {
    /// History entries the Redis store removes from an account's list together (lua/lib.lua
    /// `save`): readers never see more than `history_max_entries`, the list holds up to this many
    /// more, so the trim is one command per batch instead of one per charge. A sixteenth of the
    /// cap, at most 64 (16 KiB of a busy account's history), at least 1.
    pub fn history_trim_batch(&self) -> u64 {
        (self.history_max_entries / 16).clamp(1, 64)
    }
}

/// A refund that was decided but could not be written, kept in the store until some instance
/// writes it ([`Ledger::defer_refund`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PendingRefund {
    /// Account of the charge.
    pub account: String,
    /// The charge to refund.
    pub charge_id: String,
    /// Its usage category (metrics).
    pub category: String,
    /// Where the store keeps it (a Redis list shard); not part of the record.
    #[serde(skip)]
    pub slot: u32,
}

/// How counting a free automatic refresh ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FreeOutcome {
    /// Free: the period's count for the operation is now `count`.
    Free {
        /// Free automatic refreshes of the operation this period, this one included.
        count: u64,
    },
    /// The period's free allowance is used up: this one is charged like any request.
    OverCap,
    /// The idempotency key was used before: nothing counted; what the key answers.
    Idempotent(IdemHit),
    /// No such account.
    NoAccount,
}

/// How a refund ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundOutcome {
    /// Credits returned.
    Refunded {
        /// Returned to the monthly bucket (0 when the period renewed since the charge).
        to_monthly: u64,
        /// Returned to the top-up bucket.
        to_topup: u64,
        /// Monthly bucket after the step.
        monthly_remaining: u64,
        /// Top-up bucket after the step.
        topup_remaining: u64,
    },
    /// Refunded before; nothing changed.
    AlreadyRefunded,
    /// No such charge (never made, or expired from the store). A tombstone now stands for the
    /// charge id, so a charge that arrives late under it is refused ([`ChargeOutcome::Refunded`]).
    UnknownCharge,
}

/// A top-up purchase or grant.
#[derive(Debug, Clone, Copy)]
pub struct TopupRequest<'a> {
    /// Account credited.
    pub account: &'a str,
    /// Credits added to the top-up bucket.
    pub credits: u64,
    /// Payment reference; the same one credits once.
    pub payment_ref: &'a str,
    /// Package name, when bought as a package.
    pub package: Option<&'a str>,
}

/// A recorded top-up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopupReceipt {
    /// Payment reference.
    pub payment_ref: String,
    /// Credits added.
    pub credits: u64,
    /// Package name, if any.
    pub package: Option<String>,
    /// Top-up bucket right after this top-up.
    pub topup_remaining: u64,
    /// When it was credited, Unix seconds.
    pub created_at: i64,
}

/// How a top-up ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopupOutcome {
    /// Credited now.
    Created(TopupReceipt),
    /// That payment reference was credited before: the original receipt, nothing added.
    Duplicate(TopupReceipt),
    /// No such account.
    NoAccount,
}

/// An account's auto top-up setting.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AutoTopup {
    /// Whether it buys at all.
    pub enabled: bool,
    /// Buy when a charge takes the total remaining below this.
    pub threshold: u64,
    /// Package bought.
    pub package: String,
    /// Credits of that package (copied when the setting is made).
    pub credits: u64,
    /// Price of that package in euros (for the purchase event and invoicing).
    pub price_eur: f64,
}

/// How an account pays (`[billing.stripe]`): kept on the account, never a balance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Billing {
    /// The payment provider's customer id (created on the first purchase).
    pub customer: Option<String>,
    /// The card of the last successful purchase, charged off-session for auto top-ups.
    pub card: Option<String>,
    /// The last auto top-up payment failed: auto top-up was switched off and stays off until a
    /// purchase succeeds with a card that can be charged.
    pub card_failed: bool,
}

/// What the payment provider said about an auto top-up's payment.
#[derive(Debug, Clone, Copy)]
pub enum AutoTopupPayment<'a> {
    /// Paid; the provider's payment id.
    Paid(&'a str),
    /// Declined or impossible (no card); why, in words.
    Failed(&'a str),
}

/// How an auto top-up's payment was settled (the first report wins; later ones get it back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// Paid: the credits stay.
    Paid {
        /// The provider's payment id.
        payment_id: String,
    },
    /// Not paid: the credits were taken back from the top-up bucket as far as unspent, auto
    /// top-up was switched off, and `auto_topup.payment_failed` was queued.
    Reversed {
        /// Credits taken back (at most the auto top-up's credits).
        taken_back: u64,
        /// Top-up bucket after the step.
        topup_remaining: u64,
    },
    /// No such account.
    NoAccount,
}

/// A plan change.
#[derive(Debug, Clone, Copy)]
pub struct PlanChange<'a> {
    /// New plan.
    pub plan: &'a str,
    /// Its monthly credits.
    pub allocation: u64,
}

/// What a plan change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanOutcome {
    /// Higher allocation: in force now, the monthly bucket grew by the difference.
    Upgraded,
    /// Lower allocation: takes effect at the next renewal (`pending_plan`).
    DowngradeScheduled,
    /// Same plan (a pending downgrade, if any, is cancelled).
    Unchanged,
}

/// One balance change in an account's history.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct HistoryEntry {
    /// Position in the account's history, from 1.
    pub seq: u64,
    /// `created`, `charge`, `refund`, `topup`, `auto_topup`, `auto_topup_reversed`, `renewal` or
    /// `plan_change`.
    pub kind: String,
    /// When, Unix seconds.
    pub at: i64,
    /// Change of the monthly bucket (negative for a charge, or for unused credits expiring at renewal).
    pub monthly_delta: i64,
    /// Change of the top-up bucket.
    pub topup_delta: i64,
    /// Monthly bucket after the change.
    pub monthly_after: u64,
    /// Top-up bucket after the change.
    pub topup_after: u64,
    /// Operation, for charges and refunds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    /// Category, for charges and refunds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// Request id, for charges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Charge id, for charges and refunds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charge_id: Option<String>,
    /// Payment reference, for top-ups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_ref: Option<String>,
    /// Package, for top-ups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package: Option<String>,
    /// Plan after the change, for created / renewal / plan_change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
}

/// Credits used in one period.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PeriodUsage {
    /// Period start, Unix seconds.
    pub period_start: i64,
    /// Period end (next renewal), Unix seconds.
    pub period_end: i64,
    /// Net credits charged (refunds subtract).
    pub total: u64,
    /// By category.
    pub by_category: std::collections::BTreeMap<String, u64>,
    /// By operation.
    pub by_operation: std::collections::BTreeMap<String, u64>,
    /// By UTC day (days since 1970-01-01), only days with use.
    pub by_day: std::collections::BTreeMap<i64, u64>,
    /// Free automatic refreshes, by operation (requests, not credits).
    pub free_automatic: std::collections::BTreeMap<String, u64>,
}

/// The current period's usage and the totals of earlier periods (newest first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    /// The period in progress.
    pub current: PeriodUsage,
    /// Earlier periods, newest first; periods with no record count 0.
    pub earlier: Vec<PeriodUsage>,
}

/// An outbox event (SPEC §7), written in the same atomic step as the change it reports.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Event {
    /// Unique id; receivers dedupe by it.
    pub id: String,
    /// `credits.low`, `credits.exhausted`, `credits.renewed`, `topup.completed`, `auto_topup.purchased`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Account.
    pub account_id: String,
    /// When, Unix seconds.
    pub created_at: i64,
    /// Type-specific fields.
    pub data: serde_json::Value,
}

/// Role of an API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A customer's user or app.
    User,
    /// The customer's own automation (may trigger free automatic refreshes).
    System,
}

impl Role {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::System => "system",
        }
    }
}

/// A stored API key (never the plaintext).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// Public id used to revoke it.
    pub key_id: String,
    /// Owning account.
    pub account: String,
    /// Role.
    pub role: Role,
    /// Hex SHA-256 of the plaintext key.
    pub hash: String,
    /// First characters of the key, for lists.
    pub prefix: String,
    /// Creation time, Unix seconds.
    pub created_at: i64,
}

/// Every store the gateway can run on implements this; each method is one atomic step.
pub trait Ledger: Send + Sync + 'static {
    /// Applies the running config's bounds to every later step.
    fn set_limits(&self, limits: StoreLimits);

    /// Undelivered events dropped because an outbox was full, since the last call (each drop is
    /// logged with its account when the notifier next reads that outbox).
    fn take_dropped_events(&self) -> u64;

    /// Creates an account; `Ok(false)` when the id exists already.
    fn create_account(&self, account: NewAccount) -> impl Future<Output = LedgerResult<bool>> + Send;

    /// The account as of now, renewing it first if a period boundary has passed.
    fn account(&self, id: &str) -> impl Future<Output = LedgerResult<Option<AccountView>>> + Send;

    /// Debits `cost` all-or-nothing: monthly bucket first, then top-ups.
    fn charge(&self, req: ChargeRequest<'_>) -> impl Future<Output = LedgerResult<ChargeOutcome>> + Send;

    /// Returns a charge to the buckets it came from (monthly part only within the same period),
    /// and releases its idempotency key.
    fn refund(&self, account: &str, charge_id: &str) -> impl Future<Output = LedgerResult<RefundOutcome>> + Send;

    /// Records how the request charged under `charge_id` with idempotency key `key` ended: its
    /// answer to replay, or `None` when it is not kept (too large, abandoned). `false` when the
    /// key is no longer this charge's (refunded, expired).
    fn complete_idempotent(
        &self,
        account: &str,
        key: &str,
        charge_id: &str,
        response: Option<&StoredResponse>,
    ) -> impl Future<Output = LedgerResult<bool>> + Send;

    /// Counts a free automatic refresh of `operation` in the current period's usage, unless
    /// `max_per_period` of them were free already (then nothing is counted), or unless the
    /// request's `idempotency` key was used before: then what the key answers, nothing counted
    /// (a retried refresh is no new refresh).
    fn count_free_automatic(
        &self,
        account: &str,
        operation: &str,
        max_per_period: Option<u64>,
        idempotency: Option<Idempotency<'_>>,
    ) -> impl Future<Output = LedgerResult<FreeOutcome>> + Send;

    /// Keeps a refund that could not be written now, so that any instance writes it later, also
    /// after this one restarted. Writable while the account's own data is not (a cluster shard).
    fn defer_refund(&self, refund: &PendingRefund) -> impl Future<Output = LedgerResult<()>> + Send;

    /// Up to `max` deferred refunds, oldest first per list.
    fn pending_refunds(&self, max: usize) -> impl Future<Output = LedgerResult<Vec<PendingRefund>>> + Send;

    /// Forgets a deferred refund once it was written.
    fn forget_refund(&self, refund: &PendingRefund) -> impl Future<Output = LedgerResult<()>> + Send;

    /// Accounts that may have history entries not yet exported (usage export).
    fn export_accounts(&self) -> impl Future<Output = LedgerResult<Vec<String>>> + Send;

    /// Up to `max` history entries of `account` not yet exported, oldest first.
    fn unexported(&self, account: &str, max: usize) -> impl Future<Output = LedgerResult<Vec<HistoryEntry>>> + Send;

    /// Records that every entry up to `seq` was exported (the mark only moves forward); returns
    /// how many entries are left to export.
    fn ack_export(&self, account: &str, seq: u64) -> impl Future<Output = LedgerResult<u64>> + Send;

    /// Adds top-up credits, once per payment reference.
    fn topup(&self, req: TopupRequest<'_>) -> impl Future<Output = LedgerResult<TopupOutcome>> + Send;

    /// Stores a new API key; `Ok(false)` when the account does not exist.
    fn create_key(&self, key: KeyRecord) -> impl Future<Output = LedgerResult<bool>> + Send;

    /// Finds a live key by the hash of its plaintext.
    fn find_key(&self, hash: &str) -> impl Future<Output = LedgerResult<Option<KeyRecord>>> + Send;

    /// A real round trip through the store (readiness).
    fn ping(&self) -> impl Future<Output = LedgerResult<()>> + Send;

    /// Changes the plan (upgrade now, downgrade at renewal) and/or the e-mail; `None`: no account.
    fn update_account(
        &self,
        id: &str,
        plan: Option<PlanChange<'_>>,
        email: Option<&str>,
    ) -> impl Future<Output = LedgerResult<Option<PlanOutcome>>> + Send;

    /// Sets the auto top-up setting; `false`: no account.
    fn set_auto_topup(&self, id: &str, setting: &AutoTopup) -> impl Future<Output = LedgerResult<bool>> + Send;

    /// The account's payment details; `None`: no account.
    fn billing(&self, id: &str) -> impl Future<Output = LedgerResult<Option<Billing>>> + Send;

    /// Keeps the payment provider's customer id unless one is kept already; returns the one kept
    /// (so two instances creating a customer at once agree on one). `None`: no account.
    fn set_billing_customer(
        &self,
        id: &str,
        customer: &str,
    ) -> impl Future<Output = LedgerResult<Option<String>>> + Send;

    /// Keeps the card of a successful purchase for auto top-ups and clears `card_failed`;
    /// `false`: no account.
    fn set_billing_card(&self, id: &str, card: &str) -> impl Future<Output = LedgerResult<bool>> + Send;

    /// Settles the payment of the auto top-up `payment_ref` that credited `credits`: paid, or
    /// failed — then the credits are taken back as far as unspent, auto top-up is switched off,
    /// `card_failed` is set, a history entry and an `auto_topup.payment_failed` event are written.
    /// Once per payment reference: a repeat, whatever it reports, returns the first settlement.
    fn settle_auto_topup(
        &self,
        id: &str,
        payment_ref: &str,
        credits: u64,
        payment: AutoTopupPayment<'_>,
    ) -> impl Future<Output = LedgerResult<Settlement>> + Send;

    /// How the auto top-up `payment_ref` was settled, if it was (`None` also for no account).
    fn auto_topup_settlement(
        &self,
        id: &str,
        payment_ref: &str,
    ) -> impl Future<Output = LedgerResult<Option<Settlement>>> + Send;

    /// The live keys of an account, oldest first.
    fn list_keys(&self, account: &str) -> impl Future<Output = LedgerResult<Vec<KeyRecord>>> + Send;

    /// Revokes a key by its public id; the record it had, or `None` when unknown.
    fn revoke_key(&self, key_id: &str) -> impl Future<Output = LedgerResult<Option<KeyRecord>>> + Send;

    /// History entries, newest first, with `seq < before` (all when `None`), at most `limit`.
    /// `None`: no account.
    fn history(
        &self,
        account: &str,
        before: Option<u64>,
        limit: usize,
    ) -> impl Future<Output = LedgerResult<Option<Vec<HistoryEntry>>>> + Send;

    /// Usage of the current period and of `earlier` periods before it; `None`: no account.
    fn usage(&self, account: &str, earlier: usize) -> impl Future<Output = LedgerResult<Option<Usage>>> + Send;

    /// Accounts that may have undelivered events.
    fn event_accounts(&self) -> impl Future<Output = LedgerResult<Vec<String>>> + Send;

    /// The oldest undelivered events of an account (at most `max`), in order.
    fn pending_events(&self, account: &str, max: usize) -> impl Future<Output = LedgerResult<Vec<Event>>> + Send;

    /// Removes delivered (or expired) events from the account's outbox.
    fn ack_events(&self, account: &str, ids: &[String]) -> impl Future<Output = LedgerResult<()>> + Send;
}

/// Largest amount one step may move (a top-up, a threshold, a price): a billion credits. Keeps
/// every balance far below 2^53, where the Lua scripts' doubles stop being exact integers.
pub const MAX_CREDITS: u64 = 1_000_000_000;

/// The low-credit flag of SPEC §4: remaining below 10 % of the allocation.
pub fn is_low(remaining: u64, allocation: u64) -> bool {
    remaining.saturating_mul(10) < allocation
}

#[cfg(test)]
mod tests {
    #[test]
    fn low_is_strictly_below_ten_percent() {
        assert!(!super::is_low(200, 2000));
        assert!(super::is_low(199, 2000));
        assert!(super::is_low(0, 50));
        assert!(!super::is_low(5, 50));
    }
}
