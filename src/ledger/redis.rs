//! The production store: balances in Redis, standalone or Redis Cluster, every step one Lua script.
//!
//! Each [`Ledger`] step on an account is one script in `lua/` (with the shared `lua/lib.lua`),
//! run as a Redis function (`FCALL`, Redis 7) on the keys of one account, which all share the hash tag
//! `{acct:<id>}` (see [`keys`]), so the same scripts run on standalone Redis and on Redis Cluster.
//! A charge is exactly one FCALL round trip whose reply carries the whole [`Receipt`] (plus one
//! `SADD` when it wrote an event, see below). Every script does all its reads and checks before
//! its first write: Redis does not roll back a script that fails half-way, so a failing check
//! must leave nothing behind. API keys and the outbox and job indexes live outside the accounts'
//! slots and are handled with plain commands; their methods document the order of their writes.
//!
//! # Whose clock
//!
//! Renewals follow Redis `TIME`, read inside the scripts, not the gateway's clock. Several gateway
//! instances share one balance and their clocks may differ by seconds; if each passed its own
//! "now", one instance could renew an account a few seconds before another still charges it in
//! the old period, and the outcome would depend on which instance a request happened to reach.
//! With `TIME` every step on an account is judged by one clock, that of the Redis primary holding
//! the account's slot. That clock can still step back (NTP correction, failover to a replica whose
//! clock is behind), so each account stores the highest "now" its scripts have used (`now` in the
//! account hash) and scripts use `max(TIME, stored)`. Renewal itself keys on the stored period
//! index, which only moves forward: a period is never renewed twice and never backwards. The
//! high-water mark is written whenever a script writes the account anyway; a read that changes
//! nothing writes nothing (a balance read would otherwise cost an AOF append).
//!
//! # Connections
//!
//! Standalone Redis goes through one [`ConnectionManager`]: a multiplexed connection (every
//! concurrent request pipelined on one socket, no checkout) that reconnects in the background
//! when Redis goes away and comes back, so the gateway recovers without a restart. A pool
//! (deadpool-redis) would buy nothing here: every step is a single FCALL with no connection
//! state (no MULTI/WATCH, no blocking command), Redis executes commands one at a time per shard
//! anyway, and a pool adds a checkout per request and caps concurrency at its size. Redis Cluster
//! goes through the redis-rs async cluster client, itself multiplexed per node, which follows
//! MOVED/ASK redirects and retries on I/O errors. Redis behind Sentinel goes through one
//! multiplexed connection to the master the sentinels name, asked for again when the master cannot
//! be reached or answers `READONLY` ([`SentinelConn`]).
//!
//! # Re-sent steps and the function library
//!
//! A step can reach Redis twice: the cluster client retries after an I/O error, and the gateway
//! may retry after a timeout (a [`LedgerError`] means the step may or may not have happened).
//! Every step therefore takes effect at most once: a charge by its charge id (a copy answers with
//! the original receipt), a refund by the charge's `refunded` flag (a copy answers
//! `AlreadyRefunded`), a top-up by its payment reference, an account by its id, a queued job by
//! its job id (a copy answers `Queued` and queues nothing). A copy of a claim may lease a second
//! job that its runner never hears of; that lease runs out and the job is claimed again. A copy of
//! a finish finds the lease gone and answers `false`, though the first copy did finish the job.
//!
//! All scripts form one function library, `creditgate_<hash of its text>` (the prelude runs once,
//! when the library is loaded, instead of on every call as an EVALSHA script's would), loaded with
//! `FUNCTION LOAD REPLACE` (on every primary of a cluster) when connecting and then called with
//! `FCALL`. A call that finds its function missing (`FUNCTION FLUSH`, a server restarted without
//! persistence, a new primary) loads the library and retries once, so a lost library costs one
//! extra round trip and nothing else. A function that was not found did not run, so the retry
//! cannot apply a step twice.
//!
//! # Replicas and resharding (Redis Cluster)
//!
//! Every key of an account carries its hash tag, so a step never spans slots. A function also
//! touches keys it does not declare (history, usage, charge records, outbox), which is only safe
//! while its slot sits whole on one node: on a cluster each function therefore starts with `settled_slot`
//! (lib.lua), which makes Redis refuse it in a slot being migrated, before any read or write, and
//! [`RedisLedger::run`] sends it again until the move is done or `store.max_wait_ms` is up.
//! Replication is asynchronous: a failover loses what the old primary had not sent on. With
//! `store.wait_replicas` a step that moves credits is followed by `WAIT` ([`RedisLedger::call`])
//! and answered only once that many replicas have it.
//!
//! # History, usage and events
//!
//! Every balance change appends a JSON [`HistoryEntry`] to the account's `:history` list, every
//! charge adds to the `:usage:<period>` hash of its period (a refund subtracts from the charge's
//! own period), and every event ([`Event`], SPEC §7) is appended to the account's `:outbox`
//! list, each in the same script as the change it reports: they live under the account's hash
//! tag, so they commit together with the balances. Renewal (in `lua/lib.lua`) queues its history
//! entry and `credits.renewed` event while loading the account, and `save` writes them with the
//! account, so "all reads and checks before the first write" still holds.
//!
//! The event dispatcher must find the accounts with events without scanning, but a script may
//! only touch its account's slot. So every script's reply starts with the number of events it
//! appended, and when that is above 0 [`RedisLedger`] adds the account to its shard of the
//! outbox index ([`keys::outbox_index`]): one extra round trip, only when an event was written
//! (renewals, top-ups, auto top-ups, low-credit thresholds; a plain charge stays one FCALL).
//! Two windows remain, both closed:
//!
//! - the process dies (or Redis fails) between the script and the `SADD`: the event is durable
//!   but unindexed until the account's next event. [`RedisLedger::sweep_outboxes`], which the
//!   dispatcher runs at start-up, scans every primary for outboxes and re-indexes them. A failed
//!   `SADD` is logged, not returned, since the step itself did happen.
//! - an acknowledgement empties an outbox while a step appends to it: `ack_events` removes the
//!   account from the index (`SREM`) only after its script saw the outbox empty, and then reads
//!   the outbox length again and re-adds the account if an event arrived meanwhile. An event
//!   appended before that re-read is seen by it; one appended after is followed by its own
//!   `SADD`, which then comes after the `SREM`. So an account with events is never left out.
//!
//! A stale index entry (an account with an empty outbox, e.g. after a crash between an
//! acknowledgement and its `SREM`) is harmless: [`Ledger::pending_events`] answers nothing for
//! it and removes it the same way.
//!
//! # The job queue
//!
//! [`JobStore`] keeps, per account, a list of the ids of its queued and running jobs (oldest
//! first) and a hash per job with everything needed to run it and what came of it (the body and
//! the result body as raw bytes, headers as JSON; [`keys`] has the fields). Each step is one
//! script on the account's slot: queue (the cap checked in the script), claim (walk the head of
//! the list for the first job due and not leased, and lease it), finish (only by the lease's
//! holder; a finished job leaves the list, loses its request body and expires after the result
//! retention), read. Job times come from the account's clock, like every step.
//!
//! The runner finds the accounts with queued jobs through a second index, `cg:jobs:index:<n>`
//! ([`keys::job_index`]), kept exactly like the outbox index: an account is added (`SADD`) after
//! each job it queues, and removed (`SREM`, then a re-read of the list's length and a re-add if
//! a job arrived meanwhile) when a finish leaves its list empty or a claim finds it empty. The
//! same two windows close the same way: [`RedisLedger::sweep_job_queues`] re-indexes every
//! non-empty list after a crash, and a stale entry only costs one empty claim.
//!
//! # Numbers
//!
//! Lua in Redis computes with doubles, exact for integers below 2^53; amounts above
//! [`MAX_AMOUNT`] are refused before they reach a script.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use arc_swap::ArcSwap;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, FromRedisValue, Pipeline, RedisFuture, ToRedisArgs, Value};
use serde::{Deserialize, Serialize};

use super::jobs::{EnqueueOutcome, Job, JobFinish, JobStore, JobView, NewJob};
use super::{
    AccountView, AutoTopup, AutoTopupPayment, Billing, ChargeOutcome, ChargeRequest, Event, FreeOutcome, HistoryEntry,
    IdemHit, KeyRecord, Ledger, LedgerError, LedgerResult, NewAccount, PendingRefund, PeriodUsage, PlanChange,
    PlanOutcome, RETENTION_SECS, Receipt, RefundOutcome, Role, Settlement, StoreLimits, StoredResponse, TopupOutcome,
    TopupReceipt, TopupRequest, Usage, keys,
};
use crate::calendar::Anchor;

/// Largest credit amount a script computes exactly (2^53, where doubles stop being exact).
pub const MAX_AMOUNT: u64 = 1 << 53;

/// Time to open a connection to a Redis node.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Time to wait for one reply; past it the step counts as failed (it may still have happened).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest lease, delay or retention handed to a script (100 years): keeps `now + secs` exact in
/// Lua and every `EXPIRE` valid, so a script never fails after its first write.
const MAX_SECS: i64 = 100 * 366 * 86_400;

/// The Lua prelude every script starts with: calendar (a port of [`crate::calendar`]), clock,
/// account load / renew / save, with the constants it shares with the Rust ledger and the
/// store's limits filled in. Public so tests can run its calendar functions on a real Redis.
pub fn lua_prelude(limits: &StoreLimits) -> String {
    prelude(limits, &ChargePolicy::default())
}

/// [`lua_prelude`] with the charge policy of the running config written in as well.
fn prelude(limits: &StoreLimits, policy: &ChargePolicy) -> String {
    let mut text = include_str!("../../lua/lib.lua").to_owned();
    // Thresholds largest first, each once (lua/charge.lua stops at the first one not reached).
    let mut thresholds = policy.thresholds.clone();
    thresholds.sort_unstable_by(|a, b| b.cmp(a));
    thresholds.dedup();
    let list = |f: &dyn Fn(u8) -> String| thresholds.iter().map(|&t| f(t)).collect::<Vec<_>>().join(", ");
    for (slot, value) in [
        ("{{THRESHOLDS}}", format!("{{ {} }}", list(&|t| t.to_string()))),
        ("{{THRESHOLD_FIELDS}}", format!("{{ {} }}", list(&|t| format!("'fired:{t}'")))),
        ("{{AUTO_TOPUP_MAX}}", policy.auto_topup_max.min(MAX_AMOUNT).to_string()),
        ("{{PACKAGES}}", lua_string(&policy.packages)),
        ("{{IDEM_RETENTION}}", secs(RETENTION_SECS).to_string()),
        ("{{USAGE_PERIODS}}", super::USAGE_PERIODS.to_string()),
        ("{{HISTORY_MAX}}", limits.history_max_entries.min(MAX_AMOUNT).to_string()),
        ("{{HISTORY_EXPORTED_ONLY}}", limits.history_exported_only.to_string()),
        ("{{HISTORY_TRIM_BATCH}}", limits.history_trim_batch().to_string()),
        ("{{OUTBOX_MAX}}", limits.outbox_max_events.min(MAX_AMOUNT).to_string()),
        ("{{JOB_MAX_AGE}}", secs(limits.job_max_age_secs).to_string()),
        ("{{JOB_RETENTION}}", secs(limits.job_retention_secs).to_string()),
        ("{{CHARGE_TTL}}", secs(limits.charge_record_secs).to_string()),
    ] {
        assert!(text.contains(slot), "lua/lib.lua lost its {slot} slot");
        text = text.replace(slot, &value);
    }
    text
}

/// Scripts built for other charge policies kept by [`RedisLedger::scripts_for`].
const BUILT_KEPT: usize = 8;

/// Value `place` (from 0) of an account's `state` field: integers as cmsgpack writes them
/// (lua/lib.lua), one after the other. `None` for anything else.
fn state_value(state: &[u8], place: usize) -> Option<u64> {
    let mut rest = state;
    for i in 0..=place {
        let (&tag, after) = rest.split_first()?;
        let (value, width): (i128, usize) = match tag {
            0x00..=0x7f => (i128::from(tag), 0),
            0xe0..=0xff => (i128::from(tag as i8), 0),
            0xcc => (i128::from(*after.first()?), 1),
            0xcd => (i128::from(u16::from_be_bytes(after.get(..2)?.try_into().ok()?)), 2),
            0xce => (i128::from(u32::from_be_bytes(after.get(..4)?.try_into().ok()?)), 4),
            0xcf => (i128::from(u64::from_be_bytes(after.get(..8)?.try_into().ok()?)), 8),
            0xd0 => (i128::from(*after.first()? as i8), 1),
            0xd1 => (i128::from(i16::from_be_bytes(after.get(..2)?.try_into().ok()?)), 2),
            0xd2 => (i128::from(i32::from_be_bytes(after.get(..4)?.try_into().ok()?)), 4),
            0xd3 => (i128::from(i64::from_be_bytes(after.get(..8)?.try_into().ok()?)), 8),
            _ => return None,
        };
        if i == place {
            return u64::try_from(value).ok();
        }
        rest = &after[width..];
    }
    None
}

/// A Lua string literal holding `text` exactly: every byte as a decimal escape.
fn lua_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 4 + 2);
    out.push('"');
    for b in text.bytes() {
        out.push_str(&format!("\\{b}"));
    }
    out.push('"');
    out
}

/// What the charge function takes from the running config as constants of the library (lua/lib.lua
/// THRESHOLDS, AUTO_TOPUP_MAX, PACKAGES) rather than as arguments, which Redis would take in on
/// every charge: a charge whose request carries another policy (a reloaded config) builds the
/// library again first ([`RedisLedger::scripts_for`]).
#[derive(Clone, Default, PartialEq, Debug)]
pub struct ChargePolicy {
    thresholds: Vec<u8>,
    auto_topup_max: u64,
    packages: String,
}

impl ChargePolicy {
    fn of(req: &ChargeRequest<'_>) -> Self {
        ChargePolicy {
            thresholds: req.thresholds.to_vec(),
            auto_topup_max: req.auto_topup_max_per_period,
            packages: req.packages.spec().to_owned(),
        }
    }

    fn matches(&self, req: &ChargeRequest<'_>) -> bool {
        self.thresholds == req.thresholds
            && self.auto_topup_max == req.auto_topup_max_per_period
            && self.packages == req.packages.spec()
    }
}

/// The ledger scripts, each the prelude followed by one `lua/` file.
struct Scripts {
    /// The limits and the charge policy written into the library.
    limits: StoreLimits,
    policy: ChargePolicy,
    create_account: Function,
    account: Function,
    charge: Function,
    refund: Function,
    topup: Function,
    update_account: Function,
    set_auto_topup: Function,
    history: Function,
    usage: Function,
    pending_events: Function,
    ack_events: Function,
    job_enqueue: Function,
    job_claim: Function,
    job_finish: Function,
    job_read: Function,
    idem_complete: Function,
    free_automatic: Function,
    export_read: Function,
    export_ack: Function,
    billing: Function,
    settle_auto_topup: Function,
    job_withdraw: Function,
}

impl Scripts {
    /// Every script, with `limits` written into the prelude, as one function library named
    /// after a hash of its text: new limits (or a new version) make a new library, which the
    /// first call of any of its functions loads, and instances on different configs each call
    /// their own. On a Redis Cluster each function starts with `settled_slot` (lib.lua); a
    /// standalone Redis never moves slots, so its functions skip that extra command.
    fn build(limits: &StoreLimits, cluster: bool, policy: ChargePolicy) -> Self {
        let bodies: [(&'static str, &str); 22] = [
            ("create_account", include_str!("../../lua/create_account.lua")),
            ("account", include_str!("../../lua/account.lua")),
            ("charge", include_str!("../../lua/charge.lua")),
            ("refund", include_str!("../../lua/refund.lua")),
            ("topup", include_str!("../../lua/topup.lua")),
            ("update_account", include_str!("../../lua/update_account.lua")),
            ("set_auto_topup", include_str!("../../lua/set_auto_topup.lua")),
            ("history", include_str!("../../lua/history.lua")),
            ("usage", include_str!("../../lua/usage.lua")),
            ("pending_events", include_str!("../../lua/pending_events.lua")),
            ("ack_events", include_str!("../../lua/ack_events.lua")),
            ("job_enqueue", include_str!("../../lua/job_enqueue.lua")),
            ("job_claim", include_str!("../../lua/job_claim.lua")),
            ("job_finish", include_str!("../../lua/job_finish.lua")),
            ("job_read", include_str!("../../lua/job_read.lua")),
            ("idem_complete", include_str!("../../lua/idem_complete.lua")),
            ("free_automatic", include_str!("../../lua/free_automatic.lua")),
            ("export_read", include_str!("../../lua/export_read.lua")),
            ("export_ack", include_str!("../../lua/export_ack.lua")),
            ("billing", include_str!("../../lua/billing.lua")),
            ("settle_auto_topup", include_str!("../../lua/settle_auto_topup.lua")),
            ("job_withdraw", include_str!("../../lua/job_withdraw.lua")),
        ];
        let mut code = prelude(limits, &policy);
        for (name, body) in &bodies {
            // `#KEYS`, `KEYS[1]`, `ARGV[n]` read the function's own arguments, as in a script.
            // KEYS[1] is the account hash (or the readiness probe key); `settled_slot` (lib.lua) refuses to run while
            // its slot is being resharded, before the body reads or writes anything.
            let guard = if cluster { "settled_slot(KEYS[1])\n" } else { "" };
            code.push_str(&format!(
                "\nredis.register_function('cg_{{{{LIB}}}}_{name}', function(KEYS, ARGV)\n{guard}{body}\nend)\n"
            ));
        }
        let digest = <sha2::Sha256 as sha2::Digest>::digest(code.as_bytes());
        let id = hex::encode(&digest[..6]);
        let code = code.replace("{{LIB}}", &id);
        let library_name = format!("creditgate_{id}");
        let library: Arc<str> = format!("#!lua name={library_name}\n{code}").into();
        let function = |name: &str| Function {
            name: format!("cg_{id}_{name}"),
            library: library.clone(),
            replicated: REPLICATED_STEPS.contains(&name),
        };
        Scripts {
            limits: *limits,
            policy,
            create_account: function("create_account"),
            account: function("account"),
            charge: function("charge"),
            refund: function("refund"),
            topup: function("topup"),
            update_account: function("update_account"),
            set_auto_topup: function("set_auto_topup"),
            history: function("history"),
            usage: function("usage"),
            pending_events: function("pending_events"),
            ack_events: function("ack_events"),
            job_enqueue: function("job_enqueue"),
            job_claim: function("job_claim"),
            job_finish: function("job_finish"),
            job_read: function("job_read"),
            idem_complete: function("idem_complete"),
            free_automatic: function("free_automatic"),
            export_read: function("export_read"),
            export_ack: function("export_ack"),
            billing: function("billing"),
            settle_auto_topup: function("settle_auto_topup"),
            job_withdraw: function("job_withdraw"),
        }
    }
}

/// The steps that move credits: with `store.wait_replicas` set, each is answered only once that
/// many replicas have it ([`RedisLedger::call`]). Reads, events, jobs and idempotency answers are
/// not waited for: losing one on a failover costs no credits, and they keep working while a
/// replica is down.
const REPLICATED_STEPS: [&str; 6] =
    ["create_account", "charge", "refund", "topup", "update_account", "settle_auto_topup"];

/// One ledger script: a function of the library.
struct Function {
    name: String,
    /// The text of the library it belongs to.
    library: Arc<str>,
    /// Whether it is one of [`REPLICATED_STEPS`].
    replicated: bool,
}

impl Function {
    /// `FUNCTION LOAD REPLACE` of its library (on a cluster, routed to every primary).
    fn load_cmd(&self) -> Cmd {
        redis::cmd("FUNCTION").arg("LOAD").arg("REPLACE").arg(&*self.library).to_owned()
    }

    /// Starts a call with its first key.
    fn key<T: ToRedisArgs>(&self, key: T) -> Invocation<'_> {
        // Room for a charge without growing: its arguments and their bytes, history entry included.
        let mut cmd = Cmd::with_capacity(16, 384);
        cmd.arg("FCALL").arg(&self.name);
        let mut inv = Invocation { function: self, keys: Cmd::with_capacity(3, 128), cmd, keys_written: false };
        inv.key(key);
        inv
    }
}

/// A call of a [`Function`] being built: its keys, then its arguments, written straight into the
/// `FCALL <function> <number of keys> <keys> <args>` command (so a body is copied once).
struct Invocation<'a> {
    function: &'a Function,
    /// The keys until the first argument: their number goes before them. A [`Cmd`] holds them
    /// back to back in one buffer (no allocation per key).
    keys: Cmd,
    cmd: Cmd,
    /// Whether the key count and the keys are in `cmd` (the first argument puts them there).
    keys_written: bool,
}

impl Invocation<'_> {
    /// Adds a key; every key comes before the first argument.
    fn key<T: ToRedisArgs>(&mut self, key: T) -> &mut Self {
        assert!(!self.keys_written, "{}: a key after an argument", self.function.name);
        self.keys.arg(key);
        self
    }

    fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        self.write_keys();
        self.cmd.arg(arg);
        self
    }

    fn write_keys(&mut self) {
        if !self.keys_written {
            self.cmd.arg(self.keys.args_iter().len());
            for key in self.keys.args_iter() {
                // Only `Cmd::cursor_arg` makes anything else, and keys never go through it.
                let redis::Arg::Simple(key) = key else { unreachable!("a key is a plain argument") };
                self.cmd.arg(key);
            }
            self.keys_written = true;
        }
    }

    /// The finished command.
    fn into_cmd(mut self) -> Cmd {
        self.write_keys();
        self.cmd
    }
}

/// A command argument written by its closure straight into the command's buffer: no `String` or
/// `Vec` of its own on the way (the charge's names and history entry).
struct Written<F>(F);

/// A [`Written`] argument (the function names the closure's argument type for inference).
fn written<F: Fn(&mut dyn std::io::Write) -> std::io::Result<()>>(write: F) -> Written<F> {
    Written(write)
}

impl<F: Fn(&mut dyn std::io::Write) -> std::io::Result<()>> ToRedisArgs for Written<F> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        (self.0)(&mut out.writer_for_next_arg()).expect("a command's buffer takes every write");
    }
}

/// The Redis ledger; cheap to clone (clones share the connection).
#[derive(Clone)]
pub struct RedisLedger {
    conn: Connection,
    /// Opens further connections: one per worker thread ([`RedisLedger::attach_worker`]).
    opener: Arc<Opener>,
    /// Tells this ledger's worker connections apart from another's on the same thread (tests
    /// run several gateways in one process).
    id: usize,
    health: Arc<Health>,
    /// `store.wait_replicas` and `store.wait_timeout_ms`.
    replication: Arc<ReplicationWait>,
    /// The scripts for the current [`StoreLimits`] and [`ChargePolicy`] (swapped by
    /// [`Ledger::set_limits`] and [`RedisLedger::scripts_for`], one at a time under `built`).
    scripts: Arc<ArcSwap<Scripts>>,
    /// The last scripts built for another charge policy ([`RedisLedger::scripts_for`]).
    built: Arc<std::sync::Mutex<Vec<Arc<Scripts>>>>,
    limits: Arc<ArcSwap<StoreLimits>>,
    /// Events dropped from full outboxes, as the notifier found them.
    dropped_events: Arc<std::sync::atomic::AtomicU64>,
    /// With export on: accounts whose history grew here and that the export index may not hold
    /// yet; [`Ledger::export_accounts`] adds them (one `SADD` per account per pass, not per step).
    export_dirty: Arc<std::sync::Mutex<BTreeSet<String>>>,
}

/// A standalone or a cluster connection, both multiplexed and cheap to clone.
#[derive(Clone)]
enum Connection {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(Arc<SentinelConn>),
}

/// `config` for a first connection: one attempt, no backoff. A Redis that is down then costs the
/// start (of the gateway, of a worker) one refused connection instead of the reconnection
/// schedule; the lazy manager that takes over keeps trying with the full one.
fn one_try(config: &ConnectionManagerConfig) -> ConnectionManagerConfig {
    config.clone().set_number_of_retries(0)
}

/// What a connection is opened from.
enum Opener {
    Standalone(redis::Client, ConnectionManagerConfig),
    Cluster(ClusterClient),
    /// One connection for every thread: it follows the master the sentinels name.
    Sentinel(Arc<SentinelConn>),
}

/// Redis behind Sentinel (`store.kind = "redis-sentinel"`): a [`ConnectionManager`] to the master
/// the sentinels name, asked for again whenever a command cannot reach it or is refused with
/// `READONLY` (a failover made it a replica), and replaced when the master moved. A command that
/// got `READONLY` did not run; one whose connection broke may have — every step is safe to send
/// twice (module docs), so either is sent once more to the new master.
struct SentinelConn {
    sentinel: tokio::sync::Mutex<redis::sentinel::SentinelClient>,
    config: ConnectionManagerConfig,
    master: arc_swap::ArcSwapOption<(String, ConnectionManager)>,
}

impl SentinelConn {
    fn new(sentinels: &[String], master_name: &str, config: ConnectionManagerConfig) -> LedgerResult<Self> {
        let client = redis::sentinel::SentinelClient::build(
            sentinels.to_vec(),
            master_name.to_owned(),
            None,
            redis::sentinel::SentinelServerType::Master,
        )
        .map_err(store_error)?;
        Ok(SentinelConn { sentinel: tokio::sync::Mutex::new(client), config, master: Default::default() })
    }

    fn current(&self) -> Option<ConnectionManager> {
        self.master.load().as_ref().map(|m| m.1.clone())
    }

    /// Asks the sentinels where the master is and connects there if that is new. One question at
    /// a time; a caller that waited finds the answer the one before it got.
    async fn follow(&self) -> redis::RedisResult<()> {
        let known = self.master.load().as_ref().map(|m| m.0.clone());
        let mut sentinel = self.sentinel.lock().await;
        if self.master.load().as_ref().map(|m| &m.0) != known.as_ref() {
            return Ok(()); // moved while this one waited
        }
        let client = sentinel.async_get_client().await?;
        let addr = client.get_connection_info().addr().to_string();
        if known.as_deref() == Some(addr.as_str()) {
            return Ok(());
        }
        let conn = ConnectionManager::new_with_config(client, one_try(&self.config)).await?;
        tracing::info!(master = %addr, "store: following the master the sentinels name");
        self.master.store(Some(Arc::new((addr, conn))));
        Ok(())
    }

    /// Whether `e` says the master is not where this connection points (any more).
    fn lost_master(e: &redis::RedisError) -> bool {
        e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_io_error()
            || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
    }

    /// Runs `request` on the master's connection; when it finds the master gone, asks the
    /// sentinels and runs it once more on the one they name.
    async fn on_master<T, F, Fut>(&self, request: F) -> redis::RedisResult<T>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if let Some(conn) = self.current() {
            match request(conn).await {
                Err(e) if Self::lost_master(&e) => {}
                other => return other,
            }
        }
        self.follow().await?;
        request(self.current().ok_or_else(no_master)?).await
    }

    async fn command(&self, cmd: &Cmd) -> redis::RedisResult<Value> {
        self.on_master(|mut conn| async move { conn.req_packed_command(cmd).await }).await
    }

    async fn commands(&self, pipeline: &Pipeline, offset: usize, count: usize) -> redis::RedisResult<Vec<Value>> {
        self.on_master(|mut conn| async move { conn.req_packed_commands(pipeline, offset, count).await }).await
    }
}

fn no_master() -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Io, "no Redis master known: the sentinels could not be asked"))
}

impl Opener {
    /// A new connection, driven by the runtime this runs on, and whether it reached Redis now. A
    /// standalone one that cannot connect now is handed to a lazy manager, which keeps trying in
    /// the background (free routes do not need the store; metered ones answer 503 until then).
    async fn open(&self) -> LedgerResult<(Connection, bool)> {
        match self {
            Opener::Standalone(client, config) => {
                match ConnectionManager::new_with_config(client.clone(), one_try(config)).await {
                    Ok(conn) => Ok((Connection::Standalone(conn), true)),
                    Err(e) => {
                        tracing::warn!(error = %e, "Redis unreachable; continuing, will reconnect");
                        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                            .map_err(store_error)?;
                        Ok((Connection::Standalone(conn), false))
                    }
                }
            }
            Opener::Cluster(client) => {
                let conn = client.get_async_connection().await.map_err(store_error)?;
                Ok((Connection::Cluster(conn), true))
            }
            Opener::Sentinel(s) => {
                if s.current().is_none()
                    && let Err(e) = s.follow().await
                {
                    tracing::warn!(error = %e, "Redis master unknown (sentinels); continuing, will ask again");
                }
                Ok((Connection::Sentinel(s.clone()), s.current().is_some()))
            }
        }
    }
}

/// Whether the store is reachable, as the steps find it: a circuit breaker. A step that cannot
/// reach Redis, or gets no answer within `store.max_wait_ms`, marks it down; from then on steps
/// fail at once instead of each waiting out the outage (requests would pile up with their
/// bodies), and one probe task PINGs Redis every [`PROBE_EVERY`] until it answers, which marks
/// it up again.
struct Health {
    down: AtomicBool,
    probing: AtomicBool,
    /// Times the store was marked down.
    downs: AtomicU64,
    max_wait_ms: AtomicU64,
}

/// How many replicas must acknowledge a step that moves credits before it is answered, and for
/// how long to wait for them (`store.wait_replicas`, `store.wait_timeout_ms`; see
/// [`RedisLedger::call`]).
#[derive(Default)]
struct ReplicationWait {
    replicas: std::sync::atomic::AtomicU32,
    timeout_ms: AtomicU64,
}

/// What Redis answers a command inside a function that touches a key of a slot being migrated
/// (here: `settled_slot`'s, lib.lua).
const SLOT_MOVING: &str = "non local key";

/// How long [`RedisLedger::run`] waits before sending again a step refused during resharding.
const RESHARD_RETRY: Duration = Duration::from_millis(25);

/// How often a store marked down is probed.
const PROBE_EVERY: Duration = Duration::from_millis(250);

/// `store.max_wait_ms` until the config sets it.
const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(3);

impl Health {
    fn new() -> Self {
        Health {
            down: AtomicBool::new(false),
            probing: AtomicBool::new(false),
            downs: AtomicU64::new(0),
            max_wait_ms: AtomicU64::new(DEFAULT_MAX_WAIT.as_millis() as u64),
        }
    }

    fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    fn max_wait(&self) -> Duration {
        Duration::from_millis(self.max_wait_ms.load(Ordering::Relaxed))
    }

    /// Marks the store down and starts the probe (one at a time).
    fn mark_down(&self, ledger: &RedisLedger, cause: &dyn std::fmt::Display) {
        if !self.down.swap(true, Ordering::Relaxed) {
            self.downs.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%cause, "store unreachable: metered steps fail at once until it answers again");
        }
        if self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let ledger = ledger.clone();
        tokio::spawn(async move {
            let ping = redis::cmd("PING");
            loop {
                tokio::time::sleep(PROBE_EVERY).await;
                let wait = ledger.health.max_wait();
                if let Ok(Ok(())) = tokio::time::timeout(wait, ledger.send_on_connection::<()>(&ping)).await {
                    break;
                }
            }
            ledger.health.probing.store(false, Ordering::Release);
            ledger.health.down.store(false, Ordering::Relaxed);
            tracing::info!("store reachable again");
        });
    }
}

/// Ledgers numbered, for [`WORKER_CONNECTIONS`].
static LEDGER_IDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

thread_local! {
    /// On a worker thread: its own connection, per ledger id.
    static WORKER_CONNECTIONS: std::cell::RefCell<Vec<(usize, Connection)>> = const { std::cell::RefCell::new(Vec::new()) };
}

// === impl RedisLedger ===

impl RedisLedger {
    /// billing.lua: `op` is "read", "customer" or "card".
    async fn billing_step(&self, id: &str, op: &str, value: &str) -> LedgerResult<Option<Billing>> {
        let scripts = self.scripts.load();
        let mut inv = scripts.billing.key(keys::account(id));
        inv.arg(op).arg(value);
        let mut r = self.step(id, inv).await?;
        let outcome: String = r.next()?;
        match outcome.as_str() {
            "billing" => {
                let (customer, card, failed): (Option<String>, Option<String>, Option<String>) =
                    (r.next()?, r.next()?, r.next()?);
                Ok(Some(Billing { customer, card, card_failed: failed.is_some() }))
            }
            "noaccount" => Ok(None),
            other => Err(unexpected("billing", other)),
        }
    }

    /// Connects to a standalone Redis (`redis://host:port[/db]`) and loads the scripts.
    pub async fn connect_standalone(url: &str) -> LedgerResult<Self> {
        let client = redis::Client::open(url).map_err(store_error)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            // Reconnection attempts at most half a second apart: a Redis that is back is found
            // quickly (the default backoff grows to seconds).
            .set_max_delay(Duration::from_millis(500));
        Self::connect(Opener::Standalone(client, config)).await
    }

    /// Connects to a Redis Cluster through any of its nodes (`redis://host:port` each) and loads
    /// the scripts on every node.
    pub async fn connect_cluster(nodes: &[String]) -> LedgerResult<Self> {
        let client = ClusterClient::builder(nodes.iter().map(String::as_str))
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT)
            // TRYAGAIN (a multi-key step while its slot is half-moved) and a lost node are
            // retried after 10 to 200 ms instead of the default 1.28 s at least: a resharding
            // blip then costs milliseconds, not a step that outlives store.max_wait_ms and
            // opens the circuit (503 for every account) while the cluster is fine.
            .min_retry_wait(10)
            .max_retry_wait(200)
            .build()
            .map_err(store_error)?;
        Self::connect(Opener::Cluster(client)).await
    }

    /// Connects to the master that Redis Sentinel names for `master_name`, asking the sentinels
    /// (`redis://host:port` each) again after a failover.
    pub async fn connect_sentinel(sentinels: &[String], master_name: &str) -> LedgerResult<Self> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_max_delay(Duration::from_millis(500));
        Self::connect(Opener::Sentinel(Arc::new(SentinelConn::new(sentinels, master_name, config)?))).await
    }

    /// Gives the calling thread — a worker running its own runtime — its own connection, so its
    /// steps never hop to another thread's runtime and back. Without one (a thread that never
    /// called this, or a cluster that could not be reached now) a thread uses the shared one.
    pub async fn attach_worker(&self) {
        match self.opener.open().await {
            Ok((conn, _)) => WORKER_CONNECTIONS.with(|w| w.borrow_mut().push((self.id, conn))),
            Err(e) => {
                tracing::warn!(error = %e, "no Redis connection of its own for this worker; using the shared one")
            }
        }
    }

    /// The connection of the calling thread.
    fn conn(&self) -> Connection {
        WORKER_CONNECTIONS
            .with(|w| w.borrow().iter().find(|(id, _)| *id == self.id).map(|(_, conn)| conn.clone()))
            .unwrap_or_else(|| self.conn.clone())
    }

    /// Warns when the server's settings can lose money: eviction of balances, or no AOF.
    pub async fn check_server_settings(&self) {
        let get = |param: &'static str| {
            let mut cmd = redis::cmd("CONFIG");
            cmd.arg("GET").arg(param);
            cmd
        };
        match self.query::<Vec<String>>(&get("maxmemory-policy")).await {
            Ok(v) if v.get(1).is_some_and(|p| p != "noeviction") => tracing::warn!(
                policy = %v[1],
                "Redis maxmemory-policy is not noeviction: Redis may evict balances under memory pressure (lost money); set maxmemory-policy noeviction"
            ),
            Ok(_) => {}
            Err(e) => tracing::info!(error = %e, "could not read Redis maxmemory-policy (CONFIG may be disabled)"),
        }
        if let Ok(v) = self.query::<Vec<String>>(&get("appendonly")).await
            && v.get(1).is_some_and(|p| p != "yes")
        {
            tracing::warn!(
                "Redis appendonly is off: a Redis crash loses every change since the last RDB snapshot; set appendonly yes"
            );
        }
    }

    fn new(conn: Connection, opener: Opener) -> Self {
        let limits = StoreLimits::default();
        let cluster = matches!(conn, Connection::Cluster(_));
        Self {
            scripts: Arc::new(ArcSwap::from_pointee(Scripts::build(&limits, cluster, ChargePolicy::default()))),
            built: Arc::default(),
            conn,
            opener: Arc::new(opener),
            id: LEDGER_IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            health: Arc::new(Health::new()),
            replication: Arc::default(),
            limits: Arc::new(ArcSwap::from_pointee(limits)),
            dropped_events: Arc::default(),
            export_dirty: Arc::default(),
        }
    }

    /// Opens the shared connection and, when Redis is reachable, loads the function library.
    async fn connect(opener: Opener) -> LedgerResult<Self> {
        let (conn, connected) = opener.open().await?;
        let ledger = Self::new(conn, opener);
        if connected {
            // Every function carries the one library they share.
            ledger.query::<()>(&ledger.scripts.load().account.load_cmd()).await?;
        }
        Ok(ledger)
    }

    /// Runs a script: `FCALL`, and when the function is missing (a fresh or flushed server, a
    /// new primary) a load of the library and one retry. While the account's slot is being
    /// resharded the function refuses to run (`settled_slot`, lib.lua) and is sent again every
    /// [`RESHARD_RETRY`] for up to `store.max_wait_ms`: the refusal comes before its first read,
    /// so nothing was written and sending it again cannot apply the step twice.
    async fn run(&self, invocation: Invocation<'_>) -> LedgerResult<Value> {
        let function = invocation.function;
        let cmd = invocation.into_cmd();
        let deadline = tokio::time::Instant::now() + self.health.max_wait();
        loop {
            match self.call(function, &cmd).await {
                Err(e) if e.0.contains("Function not found") => {
                    tracing::info!(function = %function.name, "ledger function missing on Redis; loading its library");
                    self.query::<()>(&function.load_cmd()).await?;
                    return self.call(function, &cmd).await;
                }
                Err(e) if e.0.contains(SLOT_MOVING) && tokio::time::Instant::now() + RESHARD_RETRY < deadline => {
                    tokio::time::sleep(RESHARD_RETRY).await;
                }
                other => return other,
            }
        }
    }

    /// One `FCALL`. For a step that moves credits, with `store.wait_replicas` set, followed on
    /// the same connection (one pipeline, so the same node) by `WAIT <replicas> <timeout>`: the
    /// step is answered only when that many replicas acknowledged every write sent on that
    /// connection so far, this one included. Fewer within the timeout is an error: the step did
    /// happen on the primary but a failover now could lose it, so the caller treats it as of
    /// unknown fate (a charge is refunded, a refund kept and retried).
    async fn call(&self, function: &Function, cmd: &Cmd) -> LedgerResult<Value> {
        let replicas = self.replication.replicas.load(Ordering::Relaxed);
        if replicas == 0 || !function.replicated {
            return self.send(cmd).await;
        }
        let timeout_ms = self.replication.timeout_ms.load(Ordering::Relaxed);
        let mut pipeline = redis::pipe();
        pipeline.add_command(cmd.clone()).cmd("WAIT").arg(replicas).arg(timeout_ms);
        // Errors stay values, so the step's own error reads as it would without the WAIT.
        pipeline.ignore_errors();
        let replies: Vec<Value> = self.send_pipeline(&pipeline).await?;
        let mut replies = replies.into_iter();
        let (Some(reply), Some(acked)) = (replies.next(), replies.next()) else {
            return Err(LedgerError("a step and its WAIT did not get two replies".to_owned()));
        };
        let reply = reply.extract_error().map_err(store_error)?;
        let acked: u64 = Reply::value(acked.extract_error().map_err(store_error)?)?;
        if acked < u64::from(replicas) {
            return Err(LedgerError(format!(
                "{}: written on the primary but acknowledged by {acked} of {replicas} replicas within \
                 store.wait_timeout_ms ({timeout_ms} ms); a failover could lose it",
                function.name
            )));
        }
        Ok(reply)
    }

    /// Sends `cmd` on the calling thread's connection, waiting at most `store.max_wait_ms` for
    /// the answer. While the store is known to be down ([`Health`]) nothing is sent: the step
    /// fails at once with [`LedgerError::not_sent`].
    async fn send<T: FromRedisValue>(&self, cmd: &Cmd) -> LedgerResult<T> {
        self.bounded(self.send_on_connection(cmd)).await
    }

    /// [`RedisLedger::send`] for a pipeline.
    async fn send_pipeline<T: FromRedisValue>(&self, pipeline: &Pipeline) -> LedgerResult<T> {
        self.bounded(self.once_more(|mut conn| async move { pipeline.query_async(&mut conn).await })).await
    }

    /// Waits for `request` at most `store.max_wait_ms`, and keeps the circuit ([`Health`]).
    async fn bounded<T>(&self, request: impl Future<Output = redis::RedisResult<T>>) -> LedgerResult<T> {
        if self.health.is_down() {
            return Err(LedgerError::not_sent());
        }
        let wait = self.health.max_wait();
        match tokio::time::timeout(wait, request).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() {
                    self.health.mark_down(self, &e);
                }
                Err(store_error(e))
            }
            Err(_) => {
                let e = LedgerError(format!("no answer within store.max_wait_ms ({} ms)", wait.as_millis()));
                self.health.mark_down(self, &e);
                Err(e)
            }
        }
    }

    /// A connection found broken (Redis went away since it was last used, and came back) is
    /// reopened by its manager and the command sent once more, for at most [`CONNECT_TIMEOUT`]:
    /// without that, the first step on each idle connection after an outage would fail although
    /// Redis is back. Sending a step twice is safe (see "Re-sent steps" above).
    async fn send_on_connection<T: FromRedisValue>(&self, cmd: &Cmd) -> redis::RedisResult<T> {
        self.once_more(|mut conn| async move { query(&mut conn, cmd).await }).await
    }

    /// Sends on the calling thread's connection, and once more when it was found broken (see
    /// [`RedisLedger::send_on_connection`]).
    async fn once_more<T, F: Future<Output = redis::RedisResult<T>>>(
        &self,
        send: impl Fn(Connection) -> F,
    ) -> redis::RedisResult<T> {
        // Clones share one multiplexed connection (and its manager's reconnection).
        let conn = self.conn();
        match send(conn.clone()).await {
            Err(e) if e.is_connection_dropped() => match tokio::time::timeout(CONNECT_TIMEOUT, send(conn)).await {
                Ok(result) => result,
                Err(_) => Err(e),
            },
            other => other,
        }
    }

    /// The scripts for a charge: the current ones, or, when the request's charge policy is not
    /// the one written into them (the config was reloaded), ones built with it — kept for the
    /// next time, so requests of two configs in flight across a reload do not build again and
    /// again.
    fn scripts_for(&self, req: &ChargeRequest<'_>) -> arc_swap::Guard<Arc<Scripts>> {
        // A guard, not an Arc: no reference count shared by every core bumped per charge.
        let current = self.scripts.load();
        if current.policy.matches(req) {
            return current;
        }
        drop(current);
        let mut built = self.built.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let limits = self.limits.load_full();
        let found = built.iter().find(|s| s.policy.matches(req) && s.limits == *limits).cloned();
        let scripts = found.unwrap_or_else(|| {
            let cluster = matches!(self.conn, Connection::Cluster(_));
            let scripts = Arc::new(Scripts::build(&limits, cluster, ChargePolicy::of(req)));
            if built.len() == BUILT_KEPT {
                built.remove(0);
            }
            built.push(scripts.clone());
            scripts
        });
        self.scripts.store(scripts.clone());
        arc_swap::Guard::from_inner(scripts)
    }

    /// Sets `store.wait_replicas` and `store.wait_timeout_ms` (0 replicas: no `WAIT`).
    pub fn set_replication_wait(&self, replicas: u32, timeout: Duration) {
        self.replication.timeout_ms.store(timeout.as_millis().max(1) as u64, Ordering::Relaxed);
        self.replication.replicas.store(replicas, Ordering::Relaxed);
    }

    /// Sets `store.max_wait_ms`.
    pub fn set_max_wait(&self, wait: Duration) {
        self.health.max_wait_ms.store(wait.as_millis().max(1) as u64, Ordering::Relaxed);
    }

    /// Whether the store is known to be down (steps fail at once until a probe reaches it), and
    /// how many times that began.
    pub fn health(&self) -> (bool, u64) {
        (self.health.is_down(), self.health.downs.load(Ordering::Relaxed))
    }

    async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> LedgerResult<T> {
        self.send(cmd).await
    }

    /// Runs one step on `account`: a script whose reply starts with the number of outbox events
    /// it appended, followed by the outcome. Indexes the outbox when that number is above 0 (see
    /// the module docs) and returns the rest of the reply.
    async fn step(&self, account: &str, invocation: Invocation<'_>) -> LedgerResult<Reply> {
        let reply = self.run(invocation).await?;
        self.step_reply(account, reply).await
    }

    /// A step's array reply, past its first element (the events it appended; see [`Self::stepped`]).
    async fn step_reply(&self, account: &str, reply: Value) -> LedgerResult<Reply> {
        let mut reply = Reply::new(reply)?;
        let appended: u64 = reply.next()?;
        self.stepped(account, appended).await;
        Ok(reply)
    }

    /// What follows every step of `account` that appended `appended` outbox events.
    async fn stepped(&self, account: &str, appended: u64) {
        if appended > 0 {
            self.index_outbox(account).await;
        }
        // Any step may have appended history (a renewal at least): with export on, the
        // exporter looks at the account (an in-process mark, indexed once per exporter pass).
        self.mark_export(account);
    }

    /// Adds an account to its shard of `index`. A failure is logged, not returned: the step that
    /// wrote the event (queued the job) did happen, and the account's next one or the next sweep
    /// ([`RedisLedger::sweep_outboxes`], [`RedisLedger::sweep_job_queues`]) indexes it.
    async fn index(&self, index: Index, account: &str) {
        let sadd = redis::cmd("SADD").arg(index.shard_of(account)).arg(account).to_owned();
        if let Err(e) = self.query::<()>(&sadd).await {
            tracing::warn!(account, error = %e, "{}", index.lost_message());
        }
    }

    /// Adds an account to its outbox index shard (see [`RedisLedger::index`]).
    async fn index_outbox(&self, account: &str) {
        self.index(Index::Outbox, account).await;
    }

    /// Removes an account whose list (outbox or job queue) was seen empty from `index`, then
    /// re-adds it if an event (a job) arrived meanwhile (the module docs explain why this order
    /// never loses an account).
    async fn unindex_if_empty(&self, index: Index, account: &str) {
        let srem = redis::cmd("SREM").arg(index.shard_of(account)).arg(account).to_owned();
        let queued = async {
            self.query::<()>(&srem).await?;
            match index {
                // A history is never empty: what counts is what is left to export.
                Index::Export => self.export_left(account).await,
                _ => self.query::<u64>(redis::cmd("LLEN").arg(index.list(account))).await,
            }
        };
        match queued.await {
            Ok(0) => {}
            Ok(_) => self.index(index, account).await,
            Err(e) => tracing::warn!(account, error = %e, "could not update the {} of an emptied list", index.name()),
        }
    }

    /// SMEMBERS of every shard of `index`, at once (on a cluster each goes to the node holding it).
    async fn indexed_accounts(&self, index: Index) -> LedgerResult<Vec<String>> {
        let shards = (0..index.shards()).map(|shard| async move {
            self.query::<Vec<String>>(redis::cmd("SMEMBERS").arg(index.shard(shard))).await
        });
        let mut accounts = BTreeSet::new();
        for members in futures_util::future::join_all(shards).await {
            accounts.extend(members?);
        }
        Ok(accounts.into_iter().collect())
    }

    /// Re-indexes every account with undelivered events by scanning the keyspace of every primary
    /// (the standalone server, or each cluster primary) for outboxes: recovers events whose index
    /// update was lost (the process died between a step and its `SADD`). O(keys), so the event
    /// dispatcher runs it once at start-up, not per round. Returns how many outboxes it found.
    pub async fn sweep_outboxes(&self) -> LedgerResult<usize> {
        self.sweep(Index::Outbox).await
    }

    /// Re-indexes every account with queued jobs by scanning the keyspace of every primary for job
    /// queues, like [`RedisLedger::sweep_outboxes`]: recovers queues whose index update was lost
    /// (the process died between queuing a job and its `SADD`). O(keys): for the job runner's
    /// start-up. Returns how many queues it found.
    pub async fn sweep_job_queues(&self) -> LedgerResult<usize> {
        self.sweep(Index::Jobs).await
    }

    async fn sweep(&self, index: Index) -> LedgerResult<usize> {
        let mut found = BTreeSet::new();
        match &self.conn {
            Connection::Standalone(_) | Connection::Sentinel(_) => self.scan_lists(index, None, &mut found).await?,
            Connection::Cluster(c) => {
                let all_primaries = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                let reply = c.clone().route_command(redis::cmd("PING"), all_primaries).await.map_err(store_error)?;
                let Value::Map(primaries) = reply else {
                    return Err(LedgerError(format!("unexpected reply listing the cluster primaries: {reply:?}")));
                };
                for (address, answer) in primaries {
                    if let Value::ServerError(e) = answer {
                        return Err(LedgerError(format!("a primary cannot be swept for {}: {e:?}", index.name())));
                    }
                    let address: String = Reply::value(address)?;
                    let node = address
                        .rsplit_once(':')
                        .and_then(|(host, port)| Some((host.to_owned(), port.parse().ok()?)))
                        .ok_or_else(|| LedgerError(format!("unexpected cluster node address {address:?}")))?;
                    self.scan_lists(index, Some(node), &mut found).await?;
                }
            }
        }
        // Redis deletes a list when it becomes empty, so every list found holds something; a
        // history always does, so for the export index only accounts with entries left count.
        let mut indexed = 0;
        for account in &found {
            if matches!(index, Index::Export) && self.export_left(account).await? == 0 {
                continue;
            }
            self.index(index, account).await;
            indexed += 1;
        }
        Ok(indexed)
    }

    /// Re-indexes every account with history not yet exported, scanning for history lists like
    /// [`RedisLedger::sweep_outboxes`]: recovers accounts whose mark was lost (a crash before the
    /// exporter's `SADD`, or a renewal written by a read). O(keys): for the exporter's start-up
    /// and an occasional pass. Returns how many accounts it indexed.
    pub async fn sweep_exports(&self) -> LedgerResult<usize> {
        self.sweep(Index::Export).await
    }

    /// Notes, with export on, that `account`'s history grew (see `export_dirty`).
    fn mark_export(&self, account: &str) {
        if self.limits.load().history_exported_only {
            let mut dirty = self.export_dirty.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if !dirty.contains(account) {
                dirty.insert(account.to_owned());
            }
        }
    }

    /// Entries of `account` not exported yet (its `hist` beyond its `exp`).
    async fn export_left(&self, account: &str) -> LedgerResult<u64> {
        let (state, hist, exp): (Option<Vec<u8>>, Option<u64>, Option<u64>) =
            self.query(redis::cmd("HMGET").arg(keys::account(account)).arg("state").arg("hist").arg("exp")).await?;
        // `hist` is the state's fourth value (lua/lib.lua); accounts not yet saved in that
        // layout keep it in a field of its own.
        let hist = match state {
            Some(state) => Some(
                state_value(&state, 3)
                    .ok_or_else(|| LedgerError(format!("account {account}: unreadable state {state:?}")))?,
            ),
            None => hist,
        };
        Ok(hist.unwrap_or(0).saturating_sub(exp.unwrap_or(0)))
    }

    /// SCANs one node (the standalone server, or the cluster primary at `node`) for the lists
    /// `index` covers (outboxes or job queues).
    async fn scan_lists(
        &self,
        index: Index,
        node: Option<(String, u16)>,
        found: &mut BTreeSet<String>,
    ) -> LedgerResult<()> {
        let mut cursor = 0_u64;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor).arg("MATCH").arg(index.pattern()).arg("COUNT").arg(1000).arg("TYPE").arg("list");
            let (next, names): (u64, Vec<String>) = match (&self.conn, &node) {
                (Connection::Cluster(c), Some((host, port))) => {
                    let routing =
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host: host.clone(), port: *port });
                    Reply::value(c.clone().route_command(scan, routing).await.map_err(store_error)?)?
                }
                _ => self.query(&scan).await?,
            };
            found.extend(names.iter().filter_map(|name| index.account_of(name)).map(str::to_owned));
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }
}

/// The two indexes of accounts kept beside the scripts (see the module docs).
#[derive(Clone, Copy)]
enum Index {
    /// Accounts whose outbox may hold events.
    Outbox,
    /// Accounts whose job queue may hold jobs.
    Jobs,
    /// Accounts whose history may hold entries not yet exported.
    Export,
}

impl Index {
    fn name(self) -> &'static str {
        match self {
            Index::Outbox => "outbox index",
            Index::Jobs => "job index",
            Index::Export => "export index",
        }
    }

    fn shards(self) -> u32 {
        match self {
            Index::Outbox => keys::OUTBOX_SHARDS,
            Index::Jobs => keys::JOB_SHARDS,
            Index::Export => keys::EXPORT_SHARDS,
        }
    }

    fn shard(self, shard: u32) -> String {
        match self {
            Index::Outbox => keys::outbox_index_shard(shard),
            Index::Jobs => keys::job_index_shard(shard),
            Index::Export => keys::export_index_shard(shard),
        }
    }

    fn shard_of(self, account: &str) -> String {
        match self {
            Index::Outbox => keys::outbox_index(account),
            Index::Jobs => keys::job_index(account),
            Index::Export => keys::export_index(account),
        }
    }

    /// The account's list whose emptiness the index follows.
    fn list(self, account: &str) -> String {
        match self {
            Index::Outbox => keys::outbox(account),
            Index::Jobs => keys::job_queue(account),
            Index::Export => keys::history(account),
        }
    }

    /// SCAN pattern of those lists.
    fn pattern(self) -> &'static str {
        match self {
            Index::Outbox => "cg:{acct:*}:outbox",
            Index::Jobs => "cg:{acct:*}:queue",
            Index::Export => "cg:{acct:*}:history",
        }
    }

    fn account_of(self, key: &str) -> Option<&str> {
        match self {
            Index::Outbox => keys::account_of_outbox(key),
            Index::Jobs => keys::account_of_job_queue(key),
            Index::Export => keys::account_of_history(key),
        }
    }

    fn lost_message(self) -> &'static str {
        match self {
            Index::Outbox => {
                "event written but the outbox index not updated; it is found at the account's next event or outbox sweep"
            }
            Index::Jobs => {
                "job queued but the job index not updated; it is found at the account's next job or job queue sweep"
            }
            Index::Export => "history grew but the export index not updated; it is found at the next export sweep",
        }
    }
}

impl Ledger for RedisLedger {
    fn set_limits(&self, limits: StoreLimits) {
        let _one_at_a_time = self.built.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if **self.limits.load() != limits {
            let cluster = matches!(self.conn, Connection::Cluster(_));
            let policy = self.scripts.load().policy.clone();
            self.limits.store(Arc::new(limits));
            self.scripts.store(Arc::new(Scripts::build(&limits, cluster, policy)));
        }
    }

    fn take_dropped_events(&self) -> u64 {
        self.dropped_events.swap(0, std::sync::atomic::Ordering::Relaxed)
    }

    async fn create_account(&self, new: NewAccount) -> LedgerResult<bool> {
        check_amount(new.allocation)?;
        let scripts = self.scripts.load();
        let mut inv = scripts.create_account.key(keys::account(&new.id));
        inv.arg(&new.plan).arg(new.allocation).arg(new.anchor);
        match &new.email {
            Some(email) => inv.arg("1").arg(email),
            None => inv.arg("0").arg(""),
        };
        let created: i64 = self.step(&new.id, inv).await?.next()?;
        Ok(created == 1)
    }

    async fn account(&self, id: &str) -> LedgerResult<Option<AccountView>> {
        let scripts = self.scripts.load();
        let mut r = self.step(id, scripts.account.key(keys::account(id))).await?;
        let outcome: String = r.next()?;
        match outcome.as_str() {
            "found" => {}
            "noaccount" => return Ok(None),
            other => return Err(unexpected("account", other)),
        }
        let mut view = AccountView {
            id: id.to_owned(),
            plan: r.next()?,
            allocation: r.next()?,
            pending_plan: r.next()?,
            monthly_remaining: r.next()?,
            topup_remaining: r.next()?,
            used_this_period: r.next()?,
            period_start: r.next()?,
            renews_at: r.next()?,
            email: r.next()?,
            auto_topup: None,
            auto_topups_this_period: 0,
        };
        let package: Option<String> = r.next()?;
        let (enabled, threshold, credits, price): (String, u64, u64, String) =
            (r.next()?, r.next()?, r.next()?, r.next()?);
        view.auto_topups_this_period = r.next()?;
        if let Some(package) = package {
            let price_eur =
                price.parse().map_err(|_| LedgerError(format!("account {id}: unreadable auto_price {price:?}")))?;
            view.auto_topup = Some(AutoTopup { enabled: enabled == "1", threshold, package, credits, price_eur });
        }
        Ok(Some(view))
    }

    async fn charge(&self, req: ChargeRequest<'_>) -> LedgerResult<ChargeOutcome> {
        check_amount(req.cost)?;
        let scripts = self.scripts_for(&req);
        let inv = charge_invocation(&scripts.charge, &req);
        let reply = self.run(inv).await?;
        // "charged" comes as one string (lua/charge.lua); every other outcome as an array.
        if let Value::BulkString(bytes) = &reply {
            let (appended, receipt) = compact_receipt(bytes, req.charge_id)?;
            self.stepped(req.account, appended).await;
            return Ok(ChargeOutcome::Charged(receipt));
        }
        let mut r = self.step_reply(req.account, reply).await?;
        let outcome: String = r.next()?;
        Ok(match outcome.as_str() {
            "refunded" => ChargeOutcome::Refunded,
            "refused" => ChargeOutcome::Refused { remaining: r.next()?, renews_at: r.next()? },
            "noaccount" => ChargeOutcome::NoAccount,
            other => ChargeOutcome::Idempotent(r.idem_hit(other).ok_or_else(|| unexpected("charge", other))??),
        })
    }

    async fn refund(&self, account: &str, charge_id: &str) -> LedgerResult<RefundOutcome> {
        let scripts = self.scripts.load();
        let mut inv = scripts.refund.key(keys::account(account));
        inv.key(keys::charge(account, charge_id)).arg(charge_id);
        let mut r = self.step(account, inv).await?;
        let outcome: String = r.next()?;
        Ok(match outcome.as_str() {
            "refunded" => RefundOutcome::Refunded {
                to_monthly: r.next()?,
                to_topup: r.next()?,
                monthly_remaining: r.next()?,
                topup_remaining: r.next()?,
            },
            "already" => RefundOutcome::AlreadyRefunded,
            "unknown" => RefundOutcome::UnknownCharge,
            other => return Err(unexpected("refund", other)),
        })
    }

    async fn complete_idempotent(
        &self,
        account: &str,
        key: &str,
        charge_id: &str,
        response: Option<&StoredResponse>,
    ) -> LedgerResult<bool> {
        let scripts = self.scripts.load();
        let mut inv = scripts.idem_complete.key(keys::account(account));
        inv.key(keys::idempotency(account, key)).arg(charge_id);
        match response {
            Some(res) => inv.arg("done").arg(res.status).arg(res.headers_json()).arg(res.body.as_ref()),
            None => inv.arg("gone"),
        };
        let mut r = self.step(account, inv).await?;
        let outcome: String = r.next()?;
        match outcome.as_str() {
            "stored" => Ok(true),
            "lost" => Ok(false),
            other => Err(unexpected("idem_complete", other)),
        }
    }

    async fn count_free_automatic(
        &self,
        account: &str,
        operation: &str,
        max_per_period: Option<u64>,
        idempotency: Option<super::Idempotency<'_>>,
    ) -> LedgerResult<FreeOutcome> {
        let scripts = self.scripts.load();
        let mut inv = scripts.free_automatic.key(keys::account(account));
        if let Some(idem) = idempotency {
            inv.key(keys::idempotency(account, idem.key));
        }
        // -1: no allowance.
        inv.arg(operation).arg(max_per_period.map_or(-1, |m| m.min(MAX_AMOUNT) as i64));
        if let Some(idem) = idempotency {
            inv.arg(idem.fingerprint);
        }
        let mut r = self.step(account, inv).await?;
        let outcome: String = r.next()?;
        Ok(match outcome.as_str() {
            "free" => FreeOutcome::Free { count: r.next()? },
            "over" => FreeOutcome::OverCap,
            "noaccount" => FreeOutcome::NoAccount,
            other => FreeOutcome::Idempotent(r.idem_hit(other).ok_or_else(|| unexpected("free_automatic", other))??),
        })
    }

    /// RPUSH of the refund's JSON onto its list, or onto the next ones if that list's node does
    /// not answer: on a cluster with a shard down the refund still lands on another.
    async fn defer_refund(&self, refund: &PendingRefund) -> LedgerResult<()> {
        let text = serde_json::to_string(refund).map_err(|e| LedgerError(e.to_string()))?;
        let first = keys::pending_refunds_shard(&refund.charge_id);
        let mut last = LedgerError("no refund list".into());
        for i in 0..keys::REFUND_SHARDS {
            let shard = (first + i) % keys::REFUND_SHARDS;
            match self.query::<()>(redis::cmd("RPUSH").arg(keys::pending_refunds(shard)).arg(&text)).await {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// LRANGE of each list; a list whose node does not answer is skipped this time.
    async fn pending_refunds(&self, max: usize) -> LedgerResult<Vec<PendingRefund>> {
        let mut out = Vec::new();
        for shard in 0..keys::REFUND_SHARDS {
            if out.len() >= max {
                break;
            }
            let range =
                redis::cmd("LRANGE").arg(keys::pending_refunds(shard)).arg(0).arg(max - out.len() - 1).to_owned();
            let Ok(texts) = self.query::<Vec<String>>(&range).await else { continue };
            for text in texts {
                match serde_json::from_str::<PendingRefund>(&text) {
                    Ok(r) => out.push(PendingRefund { slot: shard, ..r }),
                    Err(e) => tracing::error!(error = %e, text, "unreadable pending refund left in the store"),
                }
            }
        }
        Ok(out)
    }

    async fn forget_refund(&self, refund: &PendingRefund) -> LedgerResult<()> {
        let text = serde_json::to_string(refund).map_err(|e| LedgerError(e.to_string()))?;
        self.query::<()>(redis::cmd("LREM").arg(keys::pending_refunds(refund.slot)).arg(0).arg(text)).await
    }

    async fn export_accounts(&self) -> LedgerResult<Vec<String>> {
        let dirty = std::mem::take(&mut *self.export_dirty.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        for account in &dirty {
            self.index(Index::Export, account).await;
        }
        self.indexed_accounts(Index::Export).await
    }

    async fn unexported(&self, account: &str, max: usize) -> LedgerResult<Vec<HistoryEntry>> {
        let scripts = self.scripts.load();
        let mut inv = scripts.export_read.key(keys::account(account));
        inv.arg((max as u64).min(MAX_AMOUNT));
        let mut r = self.step(account, inv).await?;
        let outcome: String = r.next()?;
        match outcome.as_str() {
            "found" => r.json_rest(),
            "noaccount" => Ok(Vec::new()),
            other => Err(unexpected("export_read", other)),
        }
    }

    async fn ack_export(&self, account: &str, seq: u64) -> LedgerResult<u64> {
        let scripts = self.scripts.load();
        let mut inv = scripts.export_ack.key(keys::account(account));
        inv.arg(seq.min(MAX_AMOUNT));
        let mut r = self.step(account, inv).await?;
        let outcome: String = r.next()?;
        let left: u64 = match outcome.as_str() {
            "acked" => r.next()?,
            "noaccount" => 0,
            other => return Err(unexpected("export_ack", other)),
        };
        if left == 0 {
            self.unindex_if_empty(Index::Export, account).await;
        }
        Ok(left)
    }

    async fn topup(&self, req: TopupRequest<'_>) -> LedgerResult<TopupOutcome> {
        check_amount(req.credits)?;
        let scripts = self.scripts.load();
        let mut inv = scripts.topup.key(keys::account(req.account));
        inv.key(keys::topup(req.account, req.payment_ref)).arg(req.payment_ref).arg(req.credits);
        match req.package {
            Some(package) => inv.arg("1").arg(package),
            None => inv.arg("0").arg(""),
        };
        let mut r = self.step(req.account, inv).await?;
        let outcome: String = r.next()?;
        let mut receipt = || -> LedgerResult<TopupReceipt> {
            Ok(TopupReceipt {
                payment_ref: r.next()?,
                credits: r.next()?,
                package: r.next()?,
                topup_remaining: r.next()?,
                created_at: r.next()?,
            })
        };
        Ok(match outcome.as_str() {
            "created" => TopupOutcome::Created(receipt()?),
            "duplicate" => TopupOutcome::Duplicate(receipt()?),
            "noaccount" => TopupOutcome::NoAccount,
            other => return Err(unexpected("topup", other)),
        })
    }

    /// Separate commands, because the key record, its id index and the account live in different
    /// slots: check that the account exists, then write the id → hash index, the record, and the
    /// account's list entry, in that order. Accounts are never deleted, so the check cannot go
    /// stale in between. A crash part-way leaves, at worst, an index entry pointing at nothing or a
    /// live key missing from the account's list — never a live key that cannot be revoked by id —
    /// and the plaintext (with the key id) is only handed out after the last write, so nobody
    /// holds such a half-made key.
    async fn create_key(&self, key: KeyRecord) -> LedgerResult<bool> {
        let exists: bool = self.query(redis::cmd("EXISTS").arg(keys::account(&key.account))).await?;
        if !exists {
            return Ok(false);
        }
        self.query::<()>(redis::cmd("SET").arg(keys::api_key_id(&key.key_id)).arg(&key.hash)).await?;
        let record = redis::cmd("HSET")
            .arg(keys::api_key(&key.hash))
            .arg("key_id")
            .arg(&key.key_id)
            .arg("account")
            .arg(&key.account)
            .arg("role")
            .arg(key.role.as_str())
            .arg("hash")
            .arg(&key.hash)
            .arg("prefix")
            .arg(&key.prefix)
            .arg("created_at")
            .arg(key.created_at)
            .to_owned();
        self.query::<()>(&record).await?;
        let listed = serde_json::to_string(&ListedKey::from(&key)).map_err(|e| LedgerError(e.to_string()))?;
        self.query::<()>(redis::cmd("HSET").arg(keys::account_keys(&key.account)).arg(&key.key_id).arg(listed)).await?;
        Ok(true)
    }

    async fn find_key(&self, hash: &str) -> LedgerResult<Option<KeyRecord>> {
        let mut fields: HashMap<String, String> = self.query(redis::cmd("HGETALL").arg(keys::api_key(hash))).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        let mut field = |name: &str| fields.remove(name).ok_or_else(|| LedgerError(format!("key record lacks {name}")));
        let role = match field("role")?.as_str() {
            "user" => Role::User,
            "system" => Role::System,
            other => return Err(LedgerError(format!("key record has unknown role {other:?}"))),
        };
        let created_at = field("created_at")?;
        Ok(Some(KeyRecord {
            key_id: field("key_id")?,
            account: field("account")?,
            role,
            hash: field("hash")?,
            prefix: field("prefix")?,
            created_at: created_at.parse().map_err(|_| LedgerError(format!("key record created_at {created_at:?}")))?,
        }))
    }

    /// Runs the real account script (loading it if the cache was emptied) on a key no account
    /// has; on a cluster also PINGs every primary, since any of them may hold a given account.
    async fn ping(&self) -> LedgerResult<()> {
        let scripts = self.scripts.load();
        let mut r = Reply::new(self.run(scripts.account.key(keys::READINESS_PROBE)).await?)?;
        let (appended, outcome): (u64, String) = (r.next()?, r.next()?);
        if (appended, outcome.as_str()) != (0, "noaccount") {
            return Err(LedgerError(format!("readiness probe answered {appended} {outcome:?}")));
        }
        if let Connection::Cluster(_) = self.conn {
            self.query::<()>(&redis::cmd("PING")).await?;
        }
        Ok(())
    }

    async fn update_account(
        &self,
        id: &str,
        plan: Option<PlanChange<'_>>,
        email: Option<&str>,
    ) -> LedgerResult<Option<PlanOutcome>> {
        let scripts = self.scripts.load();
        let mut inv = scripts.update_account.key(keys::account(id));
        match plan {
            Some(change) => {
                check_amount(change.allocation)?;
                inv.arg("1").arg(change.plan).arg(change.allocation)
            }
            None => inv.arg("0").arg("").arg(0),
        };
        match email {
            Some(email) => inv.arg("1").arg(email),
            None => inv.arg("0").arg(""),
        };
        let mut r = self.step(id, inv).await?;
        let outcome: String = r.next()?;
        Ok(Some(match outcome.as_str() {
            "upgraded" => PlanOutcome::Upgraded,
            "downgrade_scheduled" => PlanOutcome::DowngradeScheduled,
            "unchanged" => PlanOutcome::Unchanged,
            "noaccount" => return Ok(None),
            other => return Err(unexpected("update_account", other)),
        }))
    }

    async fn set_auto_topup(&self, id: &str, setting: &AutoTopup) -> LedgerResult<bool> {
        check_amount(setting.threshold)?;
        check_amount(setting.credits)?;
        let scripts = self.scripts.load();
        let mut inv = scripts.set_auto_topup.key(keys::account(id));
        inv.arg(if setting.enabled { "1" } else { "0" })
            .arg(setting.threshold)
            .arg(&setting.package)
            .arg(setting.credits)
            // Rust's shortest text that reads back as the same f64, for the account view; and the
            // JSON that `serde_json::json!` writes (`null` when not finite), for the events.
            .arg(setting.price_eur.to_string())
            .arg(super::price_json(setting.price_eur));
        let mut r = self.step(id, inv).await?;
        let outcome: String = r.next()?;
        match outcome.as_str() {
            "set" => Ok(true),
            "noaccount" => Ok(false),
            other => Err(unexpected("set_auto_topup", other)),
        }
    }

    async fn billing(&self, id: &str) -> LedgerResult<Option<Billing>> {
        self.billing_step(id, "read", "").await
    }

    async fn set_billing_customer(&self, id: &str, customer: &str) -> LedgerResult<Option<String>> {
        Ok(self.billing_step(id, "customer", customer).await?.and_then(|b| b.customer))
    }

    async fn set_billing_card(&self, id: &str, card: &str) -> LedgerResult<bool> {
        Ok(self.billing_step(id, "card", card).await?.is_some())
    }

    async fn settle_auto_topup(
        &self,
        id: &str,
        payment_ref: &str,
        credits: u64,
        payment: AutoTopupPayment<'_>,
    ) -> LedgerResult<Settlement> {
        check_amount(credits)?;
        let scripts = self.scripts.load();
        let mut inv = scripts.settle_auto_topup.key(keys::account(id));
        inv.key(keys::autopay(id, payment_ref)).arg(payment_ref).arg(credits);
        match payment {
            AutoTopupPayment::Paid(payment_id) => inv.arg("paid").arg(payment_id),
            AutoTopupPayment::Failed(reason) => inv.arg("failed").arg(reason),
        };
        let mut r = self.step(id, inv).await?;
        let outcome: String = r.next()?;
        Ok(match outcome.as_str() {
            "paid" => Settlement::Paid { payment_id: r.next()? },
            "reversed" => Settlement::Reversed { taken_back: r.next()?, topup_remaining: r.next()? },
            "noaccount" => Settlement::NoAccount,
            other => return Err(unexpected("settle_auto_topup", other)),
        })
    }

    /// One HMGET of the settlement record (written only by settle_auto_topup.lua).
    async fn auto_topup_settlement(&self, id: &str, payment_ref: &str) -> LedgerResult<Option<Settlement>> {
        let hmget = redis::cmd("HMGET")
            .arg(keys::autopay(id, payment_ref))
            .arg("settled")
            .arg("payment_id")
            .arg("taken_back")
            .arg("topup_remaining")
            .to_owned();
        let (settled, payment_id, taken_back, topup_remaining): (
            Option<String>,
            Option<String>,
            Option<u64>,
            Option<u64>,
        ) = self.query(&hmget).await?;
        Ok(match (settled.as_deref(), payment_id, taken_back, topup_remaining) {
            (Some("paid"), Some(payment_id), _, _) => Some(Settlement::Paid { payment_id }),
            (Some("reversed"), _, Some(taken_back), Some(topup_remaining)) => {
                Some(Settlement::Reversed { taken_back, topup_remaining })
            }
            (None, ..) => None,
            (other, ..) => return Err(LedgerError(format!("unreadable settlement of {payment_ref}: {other:?}"))),
        })
    }

    /// One HVALS of the account's key list (the public fields are copied there when a key is
    /// created, so listing never visits the key records in their own slots).
    async fn list_keys(&self, account: &str) -> LedgerResult<Vec<KeyRecord>> {
        let listed: Vec<String> = self.query(redis::cmd("HVALS").arg(keys::account_keys(account))).await?;
        let mut list = listed
            .iter()
            .map(|text| {
                let k: ListedKey = serde_json::from_str(text)
                    .map_err(|e| LedgerError(format!("unreadable key list entry of {account}: {e}")))?;
                Ok(KeyRecord {
                    key_id: k.key_id,
                    account: account.to_owned(),
                    role: k.role,
                    hash: k.hash,
                    prefix: k.prefix,
                    created_at: k.created_at,
                })
            })
            .collect::<LedgerResult<Vec<_>>>()?;
        list.sort_by(|a, b| (a.created_at, &a.key_id).cmp(&(b.created_at, &b.key_id)));
        Ok(list)
    }

    /// Separate commands (id index, record and the account's list are in different slots): read
    /// the record through the id index, then delete the account's list entry, the record (from
    /// here on the key no longer authenticates) and the id index, in that order. A crash part-way
    /// leaves either a live key still revocable by id (a retry finishes the job) or an id index
    /// entry pointing at nothing (a retry answers `None` and deletes it). Of two concurrent
    /// revocations only the one whose DEL removed the record answers with it.
    async fn revoke_key(&self, key_id: &str) -> LedgerResult<Option<KeyRecord>> {
        let index = keys::api_key_id(key_id);
        let Some(hash) = self.query::<Option<String>>(redis::cmd("GET").arg(&index)).await? else {
            return Ok(None);
        };
        let record = self.find_key(&hash).await?;
        if let Some(record) = &record {
            self.query::<()>(redis::cmd("HDEL").arg(keys::account_keys(&record.account)).arg(key_id)).await?;
        }
        let deleted: u64 = self.query(redis::cmd("DEL").arg(keys::api_key(&hash))).await?;
        self.query::<()>(redis::cmd("DEL").arg(&index)).await?;
        Ok(record.filter(|_| deleted == 1))
    }

    async fn history(
        &self,
        account: &str,
        before: Option<u64>,
        limit: usize,
    ) -> LedgerResult<Option<Vec<HistoryEntry>>> {
        let scripts = self.scripts.load();
        let mut inv = scripts.history.key(keys::account(account));
        match before {
            Some(before) => inv.arg(before.min(MAX_AMOUNT)),
            None => inv.arg(""),
        };
        inv.arg((limit as u64).min(MAX_AMOUNT));
        let mut r = self.step(account, inv).await?;
        let outcome: String = r.next()?;
        match outcome.as_str() {
            "found" => Ok(Some(r.json_rest()?)),
            "noaccount" => Ok(None),
            other => Err(unexpected("history", other)),
        }
    }

    async fn usage(&self, account: &str, earlier: usize) -> LedgerResult<Option<Usage>> {
        let scripts = self.scripts.load();
        let mut inv = scripts.usage.key(keys::account(account));
        inv.arg((earlier as u64).min(MAX_AMOUNT));
        let mut r = self.step(account, inv).await?;
        let outcome: String = r.next()?;
        match outcome.as_str() {
            "found" => {}
            "noaccount" => return Ok(None),
            other => return Err(unexpected("usage", other)),
        }
        let (anchor, current): (i64, i64) = (r.next()?, r.next()?);
        let anchor = Anchor::from_unix(anchor);
        // The kept periods, newest first, then the older ones: nothing recorded, 0.
        let mut period = |k: i64| -> LedgerResult<PeriodUsage> {
            let fields: HashMap<String, u64> = match r.0.next() {
                Some(fields) => Reply::value(fields)?,
                None => HashMap::new(),
            };
            period_usage(anchor.period_start(k), anchor.period_start(k + 1), fields)
        };
        let current_usage = period(current)?;
        let earlier = (1..=earlier as i64).map(|i| period(current - i)).collect::<LedgerResult<Vec<_>>>()?;
        Ok(Some(Usage { current: current_usage, earlier }))
    }

    /// SMEMBERS of every index shard, at once (on a cluster each goes to the node holding it). May
    /// name accounts whose outbox was emptied meanwhile (see the module docs).
    async fn event_accounts(&self) -> LedgerResult<Vec<String>> {
        self.indexed_accounts(Index::Outbox).await
    }

    async fn pending_events(&self, account: &str, max: usize) -> LedgerResult<Vec<Event>> {
        let scripts = self.scripts.load();
        let mut inv = scripts.pending_events.key(keys::account(account));
        inv.arg((max as u64).min(MAX_AMOUNT));
        let mut r = self.step(account, inv).await?;
        let outcome: String = r.next()?;
        match outcome.as_str() {
            "found" => {}
            "noaccount" => return Ok(Vec::new()),
            other => return Err(unexpected("pending_events", other)),
        }
        let queued: u64 = r.next()?;
        let dropped: u64 = r.next()?;
        if dropped > 0 {
            tracing::warn!(account, dropped, "outbox full: the oldest undelivered events were dropped");
            self.dropped_events.fetch_add(dropped, std::sync::atomic::Ordering::Relaxed);
        }
        if queued == 0 {
            // A stale index entry, or none: make sure the dispatcher stops visiting.
            self.unindex_if_empty(Index::Outbox, account).await;
        }
        r.json_rest()
    }

    async fn ack_events(&self, account: &str, ids: &[String]) -> LedgerResult<()> {
        let scripts = self.scripts.load();
        let mut inv = scripts.ack_events.key(keys::account(account));
        inv.arg(ids);
        let mut r = self.step(account, inv).await?;
        let outcome: String = r.next()?;
        match outcome.as_str() {
            "acked" => {}
            "noaccount" => return Ok(()),
            other => return Err(unexpected("ack_events", other)),
        }
        let left: u64 = r.next()?;
        if left == 0 {
            self.unindex_if_empty(Index::Outbox, account).await;
        }
        Ok(())
    }
}

// === impl JobStore for RedisLedger ===

/// One script per step on the account's slot (`lua/job_*.lua`), same semantics as the memory
/// store's; the job index is kept on the side (see the module docs).
impl JobStore for RedisLedger {
    async fn enqueue_job(&self, new: NewJob<'_>) -> LedgerResult<EnqueueOutcome> {
        check_amount(new.cost)?;
        // Index first: a job must never sit in a queue the runners cannot find (an entry for a
        // queue that stays empty is dropped by the next claim).
        let sadd = redis::cmd("SADD").arg(Index::Jobs.shard_of(new.account)).arg(new.account).to_owned();
        self.query::<()>(&sadd).await?;
        let scripts = self.scripts.load();
        let mut inv = scripts.job_enqueue.key(keys::account(new.account));
        inv.key(keys::job(new.account, new.id));
        if let Some(idem) = new.idempotency {
            inv.key(keys::idempotency(new.account, idem.key));
        }
        inv.arg(new.id)
            .arg(new.operation)
            .arg(new.category)
            .arg(new.cost)
            .arg(new.upstream)
            .arg(new.method)
            .arg(new.path)
            .arg(headers_json(new.headers)?)
            .arg(new.body)
            .arg(new.request_id)
            .arg(new.max_queued.min(MAX_AMOUNT))
            .arg(new.max_queued_bytes.min(MAX_AMOUNT))
            .arg(new.stored_bytes());
        if let Some(idem) = new.idempotency {
            inv.arg(idem.fingerprint).arg(headers_json(&super::jobs::queued_headers(new.id))?).arg(RETENTION_SECS);
        }
        let mut r = self.step(new.account, inv).await?;
        let outcome: String = r.next()?;
        Ok(match outcome.as_str() {
            "queued" => EnqueueOutcome::Queued { depth: r.next()? },
            "full" => EnqueueOutcome::Full,
            "full_bytes" => EnqueueOutcome::FullBytes,
            "noaccount" => {
                self.unindex_if_empty(Index::Jobs, new.account).await;
                EnqueueOutcome::NoAccount
            }
            other => EnqueueOutcome::Idempotent(r.idem_hit(other).ok_or_else(|| unexpected("job_enqueue", other))??),
        })
    }

    async fn claim_job(&self, account: &str, runner: &str, lease_secs: i64) -> LedgerResult<Option<Job>> {
        let scripts = self.scripts.load();
        let mut inv = scripts.job_claim.key(keys::account(account));
        inv.arg(runner).arg(secs(lease_secs)).arg(super::jobs::CLAIM_SCAN);
        let mut r = self.step(account, inv).await?;
        let outcome: String = r.next()?;
        match outcome.as_str() {
            "claimed" => {}
            "none" => {
                let depth: u64 = r.next()?;
                if depth == 0 {
                    // A stale index entry, or none: make sure the runner stops visiting.
                    self.unindex_if_empty(Index::Jobs, account).await;
                }
                return Ok(None);
            }
            "noaccount" => return Ok(None),
            other => return Err(unexpected("job_claim", other)),
        }
        let _depth: u64 = r.next()?;
        Ok(Some(Job {
            id: r.next()?,
            account: account.to_owned(),
            operation: r.next()?,
            category: r.next()?,
            cost: r.next()?,
            upstream: r.next()?,
            method: r.next()?,
            path: r.next()?,
            headers: parse_headers(&r.next::<String>()?)?,
            body: r.next()?,
            request_id: r.next()?,
            attempts: r.next()?,
            created_at: r.next()?,
        }))
    }

    async fn finish_job(&self, account: &str, job_id: &str, runner: &str, finish: JobFinish) -> LedgerResult<bool> {
        let scripts = self.scripts.load();
        let mut inv = scripts.job_finish.key(keys::account(account));
        inv.key(keys::job(account, job_id)).arg(job_id).arg(runner);
        // Kind, seconds, reason, status, headers, body (see the script's header).
        match &finish {
            JobFinish::Done { status, headers, body, retention_secs } => inv
                .arg("done")
                .arg(secs(*retention_secs))
                .arg("")
                .arg(u32::from(*status))
                .arg(headers_json(headers)?)
                .arg(body.as_slice()),
            JobFinish::Failed { reason, retention_secs } => {
                inv.arg("failed").arg(secs(*retention_secs)).arg(reason).arg(0).arg("").arg("")
            }
            JobFinish::Retry { reason, delay_secs } => {
                inv.arg("retry").arg(secs(*delay_secs)).arg(reason).arg(0).arg("").arg("")
            }
            JobFinish::Release => inv.arg("release").arg(0).arg("").arg(0).arg("").arg(""),
        };
        let mut r = self.step(account, inv).await?;
        let outcome: String = r.next()?;
        match outcome.as_str() {
            "finished" => {}
            "lost" | "noaccount" => return Ok(false),
            other => return Err(unexpected("job_finish", other)),
        }
        let left: u64 = r.next()?;
        if left == 0 {
            self.unindex_if_empty(Index::Jobs, account).await;
        }
        Ok(true)
    }

    async fn withdraw_job(&self, account: &str, job_id: &str) -> LedgerResult<bool> {
        let scripts = self.scripts.load();
        let mut inv = scripts.job_withdraw.key(keys::account(account));
        inv.key(keys::job(account, job_id)).arg(job_id);
        let mut r = self.step(account, inv).await?;
        let outcome: String = r.next()?;
        match outcome.as_str() {
            "withdrawn" | "noaccount" => Ok(true),
            "started" => Ok(false),
            other => Err(unexpected("job_withdraw", other)),
        }
    }

    async fn job(&self, account: &str, job_id: &str) -> LedgerResult<Option<JobView>> {
        let scripts = self.scripts.load();
        let mut inv = scripts.job_read.key(keys::account(account));
        inv.key(keys::job(account, job_id));
        let mut r = self.step(account, inv).await?;
        let outcome: String = r.next()?;
        match outcome.as_str() {
            "found" => {}
            "none" | "noaccount" => return Ok(None),
            other => return Err(unexpected("job_read", other)),
        }
        Ok(Some(JobView {
            id: job_id.to_owned(),
            status: r.next()?,
            operation: r.next()?,
            cost: r.next()?,
            attempts: r.next()?,
            created_at: r.next()?,
            updated_at: r.next()?,
            result_status: r.next()?,
            result_headers: match r.next::<Option<String>>()? {
                Some(text) => parse_headers(&text)?,
                None => Vec::new(),
            },
            result_body: r.next()?,
            error: r.next()?,
        }))
    }

    /// One LLEN of the account's queue (0 for an unknown account). A plain read, not a script:
    /// the runner asks for every queued account each round, and a due renewal is made by the
    /// account's next step (a claim, at the latest).
    async fn queue_depth(&self, account: &str) -> LedgerResult<u64> {
        self.query(redis::cmd("LLEN").arg(keys::job_queue(account))).await
    }

    /// SMEMBERS of every job index shard, at once. May name accounts whose queue was emptied
    /// meanwhile (see the module docs); their next claim finds nothing and drops them.
    async fn job_accounts(&self) -> LedgerResult<Vec<String>> {
        self.indexed_accounts(Index::Jobs).await
    }
}

/// Headers as the job records store them: a JSON array of `[name, value]` pairs.
fn headers_json(headers: &[(String, String)]) -> LedgerResult<String> {
    serde_json::to_string(headers).map_err(|e| LedgerError(e.to_string()))
}

fn parse_headers(text: &str) -> LedgerResult<Vec<(String, String)>> {
    serde_json::from_str(text).map_err(|e| LedgerError(format!("unreadable job headers in the store ({e}): {text}")))
}

/// The charge's `FCALL` (lua/charge.lua has the layout), every argument written straight into the
/// command.
fn charge_invocation<'a>(charge: &'a Function, req: &ChargeRequest<'_>) -> Invocation<'a> {
    let mut inv = charge.key(keys::AccountKey(req.account));
    // The script knows an idempotency key is given by the second KEYS entry.
    if let Some(idem) = req.idempotency {
        inv.key(keys::idempotency(req.account, idem.key));
    }
    let (category, operation) = (req.category, req.operation);
    let mut digits = itoa::Buffer::new();
    let category_len = digits.format(category.len()).as_bytes();
    inv.arg(req.charge_id)
        .arg(req.cost)
        // The record's and the usage counter's spellings of the names (lua/charge.lua):
        // `<length>:<category><length>:<operation>` and `:<length>:<category><operation>`.
        .arg(written(|w| {
            w.write_all(category_len)?;
            w.write_all(b":")?;
            w.write_all(category.as_bytes())?;
            w.write_all(itoa::Buffer::new().format(operation.len()).as_bytes())?;
            w.write_all(b":")?;
            w.write_all(operation.as_bytes())
        }))
        .arg(written(|w| {
            w.write_all(b":")?;
            w.write_all(category_len)?;
            w.write_all(b":")?;
            w.write_all(category.as_bytes())?;
            w.write_all(operation.as_bytes())
        }))
        .arg(written(|w| write_history_tail(w, req)));
    if let Some(idem) = req.idempotency {
        inv.arg(idem.key).arg(idem.fingerprint).arg(secs(idem.lease_secs));
    }
    inv
}

/// The end of a charge's history entry, from the operation on (charge.lua writes the rest):
/// `"operation":…,"category":…,"request_id":…,"charge_id":…}`, members in the order of
/// [`HistoryEntry`], strings escaped by serde.
fn write_history_tail(out: &mut dyn std::io::Write, req: &ChargeRequest<'_>) -> std::io::Result<()> {
    let members = [
        ("operation", req.operation),
        ("category", req.category),
        ("request_id", req.request_id),
        ("charge_id", req.charge_id),
    ];
    for (i, (name, value)) in members.into_iter().enumerate() {
        // Each member after a comma; the last one closes the object.
        out.write_all(if i == 0 { b"\"" } else { b",\"" })?;
        out.write_all(name.as_bytes())?;
        out.write_all(b"\":")?;
        serde_json::to_writer(&mut *out, value).map_err(std::io::Error::other)?;
    }
    out.write_all(b"}")
}

/// A lease, delay or retention as handed to a script (see [`MAX_SECS`]).
fn secs(secs: i64) -> i64 {
    secs.clamp(-MAX_SECS, MAX_SECS)
}

/// The public fields of an API key, as the account's key list stores them (JSON).
#[derive(Serialize, Deserialize)]
struct ListedKey {
    key_id: String,
    role: Role,
    prefix: String,
    created_at: i64,
    hash: String,
}

impl From<&KeyRecord> for ListedKey {
    fn from(k: &KeyRecord) -> Self {
        ListedKey {
            key_id: k.key_id.clone(),
            role: k.role,
            prefix: k.prefix.clone(),
            created_at: k.created_at,
            hash: k.hash.clone(),
        }
    }
}

/// A period's usage from the fields of its usage hash: `u:<day>:<category length>:<category>
/// <operation>` counters (lua/lib.lua `usage_field`), `f:<operation>` (free automatic uses), and
/// the `c:`, `o:`, `d:` counters of hashes written by earlier versions, added in. The total is the
/// sum of the categories (an earlier version's `t` field is ignored).
fn period_usage(period_start: i64, period_end: i64, fields: HashMap<String, u64>) -> LedgerResult<PeriodUsage> {
    let mut u = PeriodUsage { period_start, period_end, ..PeriodUsage::default() };
    let (mut by_category, mut by_operation, mut by_day) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
    let mut free_automatic = BTreeMap::new();
    for (field, credits) in fields {
        match field.split_once(':') {
            // The total of hashes written before it became the sum of the categories.
            None if field == "t" => {}
            Some(("c", category)) => {
                *by_category.entry(category.to_owned()).or_default() += credits;
            }
            Some(("o", operation)) => {
                *by_operation.entry(operation.to_owned()).or_default() += credits;
            }
            Some(("f", operation)) => {
                free_automatic.insert(operation.to_owned(), credits);
            }
            Some(("d", day)) => {
                let day = day.parse().map_err(|_| LedgerError(format!("usage hash has day field {field:?}")))?;
                *by_day.entry(day).or_default() += credits;
            }
            Some(("u", counter)) => {
                let bad = || LedgerError(format!("usage hash has counter field {field:?}"));
                let (day, rest) = counter.split_once(':').ok_or_else(bad)?;
                let (len, names) = rest.split_once(':').ok_or_else(bad)?;
                let len: usize = len.parse().map_err(|_| bad())?;
                let (category, operation) = (names.get(..len).ok_or_else(bad)?, names.get(len..).ok_or_else(bad)?);
                *by_day.entry(day.parse().map_err(|_| bad())?).or_default() += credits;
                *by_category.entry(category.to_owned()).or_default() += credits;
                *by_operation.entry(operation.to_owned()).or_default() += credits;
            }
            _ => return Err(LedgerError(format!("usage hash has unknown field {field:?}"))),
        }
    }
    u.total = by_category.values().sum();
    (u.by_category, u.by_operation, u.by_day, u.free_automatic) = (by_category, by_operation, by_day, free_automatic);
    Ok(u)
}

/// `cmd.query_async(conn)`, with the reply searched for a server error in place: redis-rs's
/// `Value::extract_error` takes every array apart and collects it again to find one.
async fn query<T: FromRedisValue>(conn: &mut Connection, cmd: &Cmd) -> redis::RedisResult<T> {
    let reply = conn.req_packed_command(cmd).await?;
    if let Some(e) = first_error(&reply) {
        return Err(e.clone().into());
    }
    Ok(redis::from_redis_value(reply)?)
}

/// The error `Value::extract_error` would return: the first server error met depth-first, keys
/// of a map before their values, an attribute's data before the attributes.
fn first_error(value: &Value) -> Option<&redis::ServerError> {
    match value {
        Value::ServerError(e) => Some(e),
        Value::Array(items) | Value::Set(items) | Value::Push { data: items, .. } => items.iter().find_map(first_error),
        Value::Map(pairs) => first_error_in_pairs(pairs),
        Value::Attribute { data, attributes } => first_error(data).or_else(|| first_error_in_pairs(attributes)),
        _ => None,
    }
}

fn first_error_in_pairs(pairs: &[(Value, Value)]) -> Option<&redis::ServerError> {
    pairs.iter().find_map(|(k, v)| first_error(k).or_else(|| first_error(v)))
}

// === impl Connection ===

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Standalone(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
            Connection::Sentinel(s) => Box::pin(s.command(cmd)),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Standalone(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Sentinel(s) => Box::pin(s.commands(pipeline, offset, count)),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Standalone(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
            Connection::Sentinel(_) => 0,
        }
    }
}

// === script replies ===

/// A script's array reply, read front to back in the order its header comment states.
struct Reply(std::vec::IntoIter<Value>);

impl Reply {
    fn new(reply: Value) -> LedgerResult<Self> {
        match reply {
            Value::Array(items) => Ok(Reply(items.into_iter())),
            other => Err(LedgerError(format!("unexpected script reply {other:?}"))),
        }
    }

    fn value<T: FromRedisValue>(value: Value) -> LedgerResult<T> {
        redis::from_redis_value(value).map_err(|e| LedgerError(format!("unexpected script reply: {e}")))
    }

    fn next<T: FromRedisValue>(&mut self) -> LedgerResult<T> {
        Self::value(self.0.next().ok_or_else(|| LedgerError("script reply too short".to_owned()))?)
    }

    /// The rest of the reply, each element the JSON text of a `T`.
    fn json_rest<T: serde::de::DeserializeOwned>(self) -> LedgerResult<Vec<T>> {
        self.0
            .map(|v| {
                let text: String = Self::value(v)?;
                serde_json::from_str(&text)
                    .map_err(|e| LedgerError(format!("unreadable JSON in the store ({e}): {text}")))
            })
            .collect()
    }

    /// The rest of a reply whose outcome is one of `lib.lua`'s `idem_hit`; `None` for any other.
    fn idem_hit(&mut self, outcome: &str) -> Option<LedgerResult<IdemHit>> {
        let read = || -> LedgerResult<IdemHit> {
            Ok(match outcome {
                "replay" => {
                    let status: u16 = self.next()?;
                    let headers: String = self.next()?;
                    let body: Vec<u8> = self.next()?;
                    let response =
                        StoredResponse { status, headers: StoredResponse::parse_headers(&headers)?, body: body.into() };
                    IdemHit::Replay { response, remaining: self.next()?, allocation: self.next()? }
                }
                "in_progress" => IdemHit::InProgress { retry_after_secs: self.next()? },
                "reused" => IdemHit::Reused,
                _ => IdemHit::Conflict,
            })
        };
        matches!(outcome, "replay" | "in_progress" | "reused" | "conflict").then(read)
    }
}

/// The events appended and the receipt of charge `charge_id`, from charge.lua's "charged" reply:
/// nine little-endian doubles (lib.lua `receipt`), or six (`fast_receipt`: no events, the cost
/// is what was taken, no auto top-up), each a whole number in 0..=2^53.
fn compact_receipt(bytes: &[u8], charge_id: &str) -> LedgerResult<(u64, Receipt)> {
    let bad = || LedgerError(format!("unexpected charge receipt of {} bytes", bytes.len()));
    let (numbers, []) = bytes.as_chunks::<8>() else { return Err(bad()) };
    let mut values = [0u64; 9];
    if numbers.len() != 9 && numbers.len() != 6 {
        return Err(bad());
    }
    for (value, number) in values.iter_mut().zip(numbers) {
        let x = f64::from_le_bytes(*number);
        if !(0.0..=MAX_AMOUNT as f64).contains(&x) || x.fract() != 0.0 {
            return Err(bad());
        }
        *value = x as u64;
    }
    if numbers.len() == 6 {
        let [from_monthly, from_topup, monthly, topup, allocation, renews_at, ..] = values;
        values = [0, from_monthly + from_topup, from_monthly, from_topup, monthly, topup, allocation, renews_at, 0];
    }
    let [appended, cost, from_monthly, from_topup, monthly_remaining, topup_remaining, allocation, renews_at, auto] =
        values;
    let receipt = Receipt {
        charge_id: charge_id.to_owned(),
        cost,
        from_monthly,
        from_topup,
        monthly_remaining,
        topup_remaining,
        allocation,
        renews_at: renews_at as i64,
        auto_topup: (auto > 0).then_some(auto),
    };
    Ok((appended, receipt))
}

fn store_error(e: redis::RedisError) -> LedgerError {
    LedgerError(e.to_string())
}

fn unexpected(script: &str, outcome: &str) -> LedgerError {
    LedgerError(format!("{script} script answered unknown outcome {outcome:?}"))
}

fn check_amount(amount: u64) -> LedgerResult<()> {
    if amount > MAX_AMOUNT {
        return Err(LedgerError(format!("amount {amount} exceeds the store's limit of {MAX_AMOUNT} credits")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{ChargeRequest, Function, charge_invocation, compact_receipt, first_error, keys, state_value};
    use crate::ledger::{Idempotency, Packages};
    use redis::Value;

    /// [`first_error`] finds the error redis-rs's `extract_error` returns, or none when it finds none.
    #[test]
    fn first_error_is_the_one_extract_error_returns() {
        let error = |text: &str| redis::parse_redis_value(format!("-{text}\r\n").as_bytes()).unwrap();
        let (e1, e2, e3) = (error("ERR one"), error("NOSCRIPT two"), error("ERR three"));
        let nested = Value::Array(vec![Value::Int(1), Value::Array(vec![Value::Nil, e2.clone()]), e1.clone()]);
        let cases = [
            Value::Array(vec![Value::Int(0), Value::BulkString(b"charged".to_vec()), Value::Nil]),
            Value::Int(7),
            e1.clone(),
            nested,
            Value::Map(vec![(Value::Int(1), e1.clone()), (e2.clone(), Value::Int(2))]),
            Value::Map(vec![(e3.clone(), e1.clone())]),
            Value::Set(vec![Value::Okay, e3.clone()]),
            Value::Attribute { data: Box::new(Value::Int(1)), attributes: vec![(Value::Nil, e2.clone())] },
            Value::Attribute { data: Box::new(e1.clone()), attributes: vec![(Value::Nil, e2)] },
        ];
        for value in cases {
            let expected = value.clone().extract_error().err().map(|e| e.to_string());
            let found = first_error(&value).map(|e| redis::RedisError::from(e.clone()).to_string());
            assert_eq!(found, expected, "{value:?}");
        }
    }

    /// struct.pack('<ddddddddd', 2, 5, 3, 2, 0, 2^53, 100, 1767225600, 200), as Redis 7 writes it.
    const RECEIPT: &str = "0000000000000040000000000000144000000000000008400000000000000040000000000000000000000000\
                           000040430000000000005940000000406e55da410000000000006940";

    #[test]
    fn receipts_read_as_struct_pack_writes_them() {
        let bytes = hex::decode(RECEIPT).unwrap();
        let (appended, r) = compact_receipt(&bytes, "chg_1").unwrap();
        assert_eq!(appended, 2);
        assert_eq!(r.charge_id, "chg_1");
        assert_eq!((r.cost, r.from_monthly, r.from_topup), (5, 3, 2));
        assert_eq!((r.monthly_remaining, r.topup_remaining, r.allocation), (0, 1 << 53, 100));
        assert_eq!((r.renews_at, r.auto_topup), (1_767_225_600, Some(200)));
        // No auto top-up: 0.
        let mut none = bytes.clone();
        none[64..].copy_from_slice(&0f64.to_le_bytes());
        assert_eq!(compact_receipt(&none, "chg_1").unwrap().1.auto_topup, None);
    }

    /// struct.pack('<dddddd', 3, 2, 0, 2^53, 100, 1767225600): the fast way's receipt.
    const FAST_RECEIPT: &str = "00000000000008400000000000000040000000000000000000000000000040430000000000005940\
                                000000406e55da41";

    #[test]
    fn fast_receipts_read_as_struct_pack_writes_them() {
        let (appended, r) = compact_receipt(&hex::decode(FAST_RECEIPT).unwrap(), "chg_2").unwrap();
        assert_eq!(appended, 0);
        assert_eq!((r.charge_id.as_str(), r.cost, r.from_monthly, r.from_topup), ("chg_2", 5, 3, 2));
        assert_eq!((r.monthly_remaining, r.topup_remaining, r.allocation), (0, 1 << 53, 100));
        assert_eq!((r.renews_at, r.auto_topup), (1_767_225_600, None));
    }

    #[test]
    fn receipts_that_are_not_nine_whole_amounts_are_errors() {
        let bytes = hex::decode(RECEIPT).unwrap();
        assert!(compact_receipt(&bytes[..56], "c").is_err());
        assert!(compact_receipt(&bytes[..64], "c").is_err());
        assert!(compact_receipt(&bytes[..71], "c").is_err());
        let mut longer = bytes.clone();
        longer.extend_from_slice(&1f64.to_le_bytes());
        assert!(compact_receipt(&longer, "c").is_err());
        for bad in [-1.0, 2.5, 2f64.powi(53) + 2.0, f64::NAN, f64::INFINITY] {
            let mut b = bytes.clone();
            b[8..16].copy_from_slice(&f64::to_le_bytes(bad));
            assert!(compact_receipt(&b, "c").is_err(), "{bad}");
        }
    }

    /// The charge's `FCALL`, byte for byte as it was built with a `String` per key, name and
    /// history entry: writing them straight into the command changed nothing Redis receives.
    #[test]
    fn charge_command_is_unchanged_by_writing_in_place() {
        let function = Function { name: "cg_0123456789ab_charge".to_owned(), library: "".into(), replicated: true };
        let packages = Packages::default();
        let idem = Idempotency { key: "k-\u{e9}\"1", fingerprint: "ab12", lease_secs: 90 };
        for (category, operation, idempotency) in
            [("chat", "completion", None), ("\u{e9}t\u{e9} \"q\"", "op\\n", Some(idem)), ("", "", None)]
        {
            let req = ChargeRequest {
                account: "acme{1}",
                charge_id: "ch_42",
                cost: 1234,
                operation,
                category,
                request_id: "req-\u{1}\u{7f}",
                idempotency,
                thresholds: &[],
                auto_topup_max_per_period: 0,
                packages: &packages,
            };
            let json = |v: &str| serde_json::to_string(v).unwrap();
            let mut keys = vec![keys::account(req.account)];
            if let Some(idem) = idempotency {
                keys.push(keys::idempotency(req.account, idem.key));
            }
            let mut expected = redis::cmd("FCALL");
            expected
                .arg(&function.name)
                .arg(keys.len())
                .arg(&keys)
                .arg(req.charge_id)
                .arg(req.cost)
                .arg(format!("{}:{category}{}:{operation}", category.len(), operation.len()))
                .arg(format!(":{}:{category}{operation}", category.len()))
                .arg(format!(
                    "\"operation\":{},\"category\":{},\"request_id\":{},\"charge_id\":{}}}",
                    json(operation),
                    json(category),
                    json(req.request_id),
                    json(req.charge_id)
                ));
            if let Some(idem) = idempotency {
                expected.arg(idem.key).arg(idem.fingerprint).arg(idem.lease_secs);
            }
            let built = charge_invocation(&function, &req).into_cmd();
            assert_eq!(
                String::from_utf8_lossy(&built.get_packed_command()),
                String::from_utf8_lossy(&expected.get_packed_command())
            );
        }
    }

    /// cmsgpack.pack(1000000000000, 5, -1, 300, 70000, 1764563000, 127, 200, -200, -40000,
    /// -3000000000, 0), as Redis 7 writes it: every integer form cmsgpack uses.
    const PACKED: &str = "cf000000e8d4a5100005ffcd012cce00011170ce692d18387fccc8d1ff38d2ffff63c0d3ffffffff4d2fa20000";

    #[test]
    fn state_values_read_as_cmsgpack_writes_them() {
        let bytes = hex::decode(PACKED).unwrap();
        let values: Vec<Option<u64>> = (0..12).map(|i| state_value(&bytes, i)).collect();
        assert_eq!(
            values,
            [
                Some(1_000_000_000_000),
                Some(5),
                None,
                Some(300),
                Some(70_000),
                Some(1_764_563_000),
                Some(127),
                Some(200),
                None,
                None,
                None,
                Some(0)
            ]
        );
        assert_eq!(state_value(&bytes, 12), None, "past the end");
        assert_eq!(state_value(&bytes[..5], 0), None, "cut short");
        assert_eq!(state_value(b"\xcb\0\0\0\0\0\0\0\0", 0), None, "a float is not a state value");
    }
}
