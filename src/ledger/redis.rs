//! The production store: balances in Redis, standalone or Redis Cluster, every step one Lua script.
//!
//! Each [`Ledger`] method is one script in `lua/` (prefixed by the shared `lua/lib.lua`), run with
//! EVALSHA on the keys of one account, which all share the hash tag `{acct:<id>}` (see [`keys`]),
//! so the same scripts run on standalone Redis and on Redis Cluster. A charge is exactly one
//! EVALSHA round trip whose reply carries the whole [`Receipt`]. Every script
//! does all its reads and checks before its first write: Redis does not roll back a script that
//! fails half-way, so a failing check must leave nothing behind.
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
//! (deadpool-redis) would buy nothing here: every step is a single EVALSHA with no connection
//! state (no MULTI/WATCH, no blocking command), Redis executes commands one at a time per shard
//! anyway, and a pool adds a checkout per request and caps concurrency at its size. Redis Cluster
//! goes through the redis-rs async cluster client, itself multiplexed per node, which follows
//! MOVED/ASK redirects and retries on I/O errors.
//!
//! # Re-sent steps and the script cache
//!
//! A step can reach Redis twice: the cluster client retries after an I/O error, and the gateway
//! may retry after a timeout (a [`LedgerError`] means the step may or may not have happened).
//! Every step therefore takes effect at most once: a charge by its charge id (a copy answers with
//! the original receipt), a refund by the charge's `refunded` flag (a copy answers
//! `AlreadyRefunded`), a top-up by its payment reference, an account by its id.
//!
//! The scripts are loaded (`SCRIPT LOAD`, on every node of a cluster) when connecting and then run
//! with EVALSHA. [`redis::Script`] answers a `NOSCRIPT` error (cache flushed, restart, failover to
//! a replica) by loading the script and retrying once, so an emptied cache costs one extra round
//! trip and nothing else.
//!
//! # Numbers
//!
//! Lua in Redis computes with doubles, exact for integers below 2^53; amounts above
//! [`MAX_AMOUNT`] are refused before they reach a script.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Pipeline, RedisFuture, Script, ScriptInvocation, Value};

use super::{
    AccountView, ChargeOutcome, ChargeRequest, KeyRecord, Ledger, LedgerError, LedgerResult, NewAccount, Receipt,
    RefundOutcome, Role, TopupOutcome, TopupReceipt, TopupRequest, keys,
};

/// How long charge records (for refunds and re-sent steps) and idempotency keys are kept.
const RETENTION_SECS: i64 = 24 * 3600;

/// Largest credit amount a script computes exactly (2^53, where doubles stop being exact).
pub const MAX_AMOUNT: u64 = 1 << 53;

/// Time to open a connection to a Redis node.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Time to wait for one reply; past it the step counts as failed (it may still have happened).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The Lua prelude every script starts with: calendar (a port of [`crate::calendar`]), clock,
/// account load / renew / save. Public so tests can run its calendar functions on a real Redis.
pub const LUA_PRELUDE: &str = include_str!("../../lua/lib.lua");

/// The ledger scripts, each the prelude followed by one `lua/` file.
struct Scripts {
    create_account: Script,
    account: Script,
    charge: Script,
    refund: Script,
    topup: Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| {
    let script = |body: &str| Script::new(&format!("{LUA_PRELUDE}\n{body}"));
    Scripts {
        create_account: script(include_str!("../../lua/create_account.lua")),
        account: script(include_str!("../../lua/account.lua")),
        charge: script(include_str!("../../lua/charge.lua")),
        refund: script(include_str!("../../lua/refund.lua")),
        topup: script(include_str!("../../lua/topup.lua")),
    }
});

/// The Redis ledger; cheap to clone (clones share the connection).
#[derive(Clone)]
pub struct RedisLedger {
    conn: Connection,
}

/// A standalone or a cluster connection, both multiplexed and cheap to clone.
#[derive(Clone)]
enum Connection {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

// === impl RedisLedger ===

impl RedisLedger {
    /// Connects to a standalone Redis (`redis://host:port[/db]`) and loads the scripts.
    pub async fn connect_standalone(url: &str) -> LedgerResult<Self> {
        let client = redis::Client::open(url).map_err(store_error)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let conn = match ConnectionManager::new_with_config(client.clone(), config.clone()).await {
            Ok(conn) => conn,
            Err(e) => {
                // Start anyway: free routes do not need the store, and metered routes answer 503
                // until Redis is reachable; the manager keeps trying in the background.
                tracing::warn!(error = %e, "Redis unreachable at start-up; continuing, will reconnect");
                let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(store_error)?;
                return Ok(Self { conn: Connection::Standalone(conn) });
            }
        };
        Self::with_scripts(Connection::Standalone(conn)).await
    }

    /// Connects to a Redis Cluster through any of its nodes (`redis://host:port` each) and loads
    /// the scripts on every node.
    pub async fn connect_cluster(nodes: &[String]) -> LedgerResult<Self> {
        let client = ClusterClient::builder(nodes.iter().map(String::as_str))
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT)
            .build()
            .map_err(store_error)?;
        let conn = client.get_async_connection().await.map_err(store_error)?;
        Self::with_scripts(Connection::Cluster(conn)).await
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

    async fn with_scripts(mut conn: Connection) -> LedgerResult<Self> {
        let s = &*SCRIPTS;
        for script in [&s.create_account, &s.account, &s.charge, &s.refund, &s.topup] {
            script.load_async(&mut conn).await.map_err(store_error)?;
        }
        Ok(Self { conn })
    }

    /// Runs a script: EVALSHA, and on NOSCRIPT a load and one retry (see [`redis::Script`]).
    async fn run(&self, invocation: &ScriptInvocation<'_>) -> LedgerResult<Value> {
        invocation.invoke_async(&mut self.conn.clone()).await.map_err(store_error)
    }

    async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> LedgerResult<T> {
        cmd.query_async(&mut self.conn.clone()).await.map_err(store_error)
    }
}

impl Ledger for RedisLedger {
    async fn create_account(&self, new: NewAccount) -> LedgerResult<bool> {
        check_amount(new.allocation)?;
        let mut inv = SCRIPTS.create_account.key(keys::account(&new.id));
        inv.arg(&new.plan).arg(new.allocation).arg(new.anchor);
        match &new.email {
            Some(email) => inv.arg("1").arg(email),
            None => inv.arg("0").arg(""),
        };
        let created: i64 = Reply::value(self.run(&inv).await?)?;
        Ok(created == 1)
    }

    async fn account(&self, id: &str) -> LedgerResult<Option<AccountView>> {
        let reply = self.run(&SCRIPTS.account.key(keys::account(id))).await?;
        if reply == Value::Nil {
            return Ok(None);
        }
        let mut r = Reply::new(reply)?;
        Ok(Some(AccountView {
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
        }))
    }

    async fn charge(&self, req: ChargeRequest<'_>) -> LedgerResult<ChargeOutcome> {
        check_amount(req.cost)?;
        let mut inv = SCRIPTS.charge.key(keys::account(req.account));
        inv.key(keys::charge(req.account, req.charge_id));
        // The script knows an idempotency key is given by the third KEYS entry.
        let (idem_key, fingerprint) = match req.idempotency {
            Some(idem) => {
                inv.key(keys::idempotency(req.account, idem.key));
                (idem.key, idem.fingerprint)
            }
            None => ("", ""),
        };
        inv.arg(req.charge_id)
            .arg(req.cost)
            .arg(req.operation)
            .arg(req.category)
            .arg(req.request_id)
            .arg(idem_key)
            .arg(fingerprint)
            .arg(RETENTION_SECS);
        let mut r = Reply::new(self.run(&inv).await?)?;
        let outcome: String = r.next()?;
        Ok(match outcome.as_str() {
            "charged" => ChargeOutcome::Charged(r.receipt()?),
            "replayed" => ChargeOutcome::Replayed(r.receipt()?),
            "refused" => ChargeOutcome::Refused { remaining: r.next()?, renews_at: r.next()? },
            "conflict" => ChargeOutcome::Conflict,
            "noaccount" => ChargeOutcome::NoAccount,
            other => return Err(unexpected("charge", other)),
        })
    }

    async fn refund(&self, account: &str, charge_id: &str) -> LedgerResult<RefundOutcome> {
        let mut inv = SCRIPTS.refund.key(keys::account(account));
        inv.key(keys::charge(account, charge_id)).arg(charge_id);
        let mut r = Reply::new(self.run(&inv).await?)?;
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

    async fn topup(&self, req: TopupRequest<'_>) -> LedgerResult<TopupOutcome> {
        check_amount(req.credits)?;
        let mut inv = SCRIPTS.topup.key(keys::account(req.account));
        inv.key(keys::topup(req.account, req.payment_ref)).arg(req.payment_ref).arg(req.credits);
        match req.package {
            Some(package) => inv.arg("1").arg(package),
            None => inv.arg("0").arg(""),
        };
        let mut r = Reply::new(self.run(&inv).await?)?;
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

    /// Two steps, because the key record and the account live in different slots: check that the
    /// account exists, then write the record. Accounts are never deleted, so the check cannot go
    /// stale in between. The id → hash index is written first: a crash in between leaves an
    /// index entry pointing at nothing, never a live key that cannot be revoked by id.
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
        let reply = self.run(&SCRIPTS.account.key(keys::READINESS_PROBE)).await?;
        if reply != Value::Nil {
            return Err(LedgerError(format!("readiness probe answered {reply:?}")));
        }
        if let Connection::Cluster(_) = self.conn {
            self.query::<()>(&redis::cmd("PING")).await?;
        }
        Ok(())
    }
}

// === impl Connection ===

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Standalone(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
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
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Standalone(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
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

    /// The rest of a `charged` / `replayed` reply.
    fn receipt(&mut self) -> LedgerResult<Receipt> {
        Ok(Receipt {
            charge_id: self.next()?,
            cost: self.next()?,
            from_monthly: self.next()?,
            from_topup: self.next()?,
            monthly_remaining: self.next()?,
            topup_remaining: self.next()?,
            allocation: self.next()?,
            renews_at: self.next()?,
        })
    }
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
