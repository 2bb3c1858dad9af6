//! Model-based property tests of the ledger (issue 11): random sequences of steps — charges with
//! and without idempotency keys, re-sent charge ids, refunds (twice, late, of unknown ids),
//! top-ups with repeated payment references, auto top-up settings, plan changes, clock steps
//! across renewals at month ends and leap days, and the job queue — applied both to a small
//! [`Model`] written from SPEC §1 and to each store: `memory`, Redis standalone and a 3-master
//! Redis Cluster. After every step the answers, balances, bucket split, usage, history, events
//! and jobs must agree with the model.
//!
//! # The clock
//!
//! The memory store reads a clock the test sets ([`MemoryLedger::with_clock`]). The Redis scripts
//! use `max(Redis TIME, the account's clock high-water mark)` (the `now` field of the account
//! hash, `lua/lib.lua` `clock`), so the test moves a Redis account's clock by writing that field,
//! always to a time years ahead of the real one. Each case runs on its own fresh account.
//!
//! Records Redis expires with a real TTL (idempotency keys, finished jobs) do not age with that
//! clock, while the memory store forgets them by its clock after 24 h (finished jobs after their
//! retention). So the steps come in epochs: within an epoch the clock moves less than a day in
//! total, and a jump to the next epoch moves it more than two days (also past Redis's charge
//! record buckets, which keep a record between one and two TTLs). Idempotency keys and job ids
//! carry their epoch in their name and are never used again in a later one, and a finished job
//! is not read once its retention has passed; charge ids are reused across epochs on purpose
//! (an expired charge id charges anew, a late refund finds nothing).
//!
//! # Cases
//!
//! By default 256 cases on memory (a fraction of a second) and 48 on each Redis store (about two
//! seconds each in a debug build); `PROPTEST_CASES=<n>` sets every store's count for longer runs. A failing case is shrunk
//! to a short sequence, printed as a [`Case`]; shrunk counterexamples worth keeping become plain
//! cases at the end of this file ([`counterexamples`]), which every store runs first.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use creditgate::ledger::jobs::{EnqueueOutcome, Job, JobFinish, JobStore, JobView, NewJob, queued_response};
use creditgate::ledger::{
    AutoTopup, ChargeOutcome, ChargeRequest, HistoryEntry, IdemHit, Idempotency, Ledger, MemoryLedger, NewAccount,
    Packages, PeriodUsage, PlanChange, PlanOutcome, Receipt, RedisLedger, RefundOutcome, StoredResponse, TopupOutcome,
    TopupReceipt, TopupRequest, keys,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use support::redis::{RedisCluster, RedisServer, state};
use time::{Date, Month, OffsetDateTime, Time};

// === the stores ===

#[test]
fn memory_follows_the_model() {
    let clock = Arc::new(AtomicI64::new(0));
    let time = clock.clone();
    let fresh = move || {
        MemoryLedger::with_clock(Arc::new({
            let time = time.clone();
            move || time.load(Ordering::SeqCst)
        }))
    };
    let rt = runtime();
    run_cases(256, |case| {
        let ledger = fresh();
        rt.block_on(run_case(&ledger, &Clock::Memory(clock.clone()), case))
    });
}

#[test]
fn redis_standalone_follows_the_model() {
    let server = RedisServer::start();
    let rt = runtime();
    let (ledger, clock) = rt.block_on(async {
        let ledger = RedisLedger::connect_standalone(&server.url()).await.expect("connect");
        let client = redis::Client::open(server.url()).expect("url");
        (ledger, Clock::Redis(client.get_multiplexed_async_connection().await.expect("connect")))
    });
    run_cases(REDIS_CASES, |case| rt.block_on(run_case(&ledger, &clock, case)));
}

#[test]
fn redis_cluster_follows_the_model() {
    let cluster = RedisCluster::start();
    let rt = runtime();
    let (ledger, clock) = rt.block_on(async {
        let ledger = RedisLedger::connect_cluster(&cluster.urls()).await.expect("connect");
        let client = redis::cluster::ClusterClient::new(cluster.urls()).expect("urls");
        (ledger, Clock::Cluster(client.get_async_connection().await.expect("connect")))
    });
    run_cases(REDIS_CASES, |case| rt.block_on(run_case(&ledger, &clock, case)));
}

/// Cases per Redis store unless `PROPTEST_CASES` says otherwise: each step is a few round trips.
const REDIS_CASES: u32 = 48;

/// One runtime per test, built once; proptest runs plain closures that `block_on` in it.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

/// Runs `check` on the [`counterexamples`], then on [`case_strategy`]'s cases (`PROPTEST_CASES`,
/// else `default_cases`), shrinking a failure.
fn run_cases(default_cases: u32, check: impl Fn(Case) -> Result<(), String>) {
    for (name, case) in counterexamples() {
        if let Err(e) = check(case.clone()) {
            panic!("counterexample `{name}` fails: {e}\n{case:#?}");
        }
    }
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default_cases);
    // No failure persistence: counterexamples worth keeping are written out as tests below.
    let config = Config { cases, failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&case_strategy(), |case| check(case).map_err(TestCaseError::fail));
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// How the test moves a store's clock.
enum Clock {
    /// The memory store's clock (one per test; each case has a fresh store on it).
    Memory(Arc<AtomicI64>),
    /// A standalone Redis: the account's clock high-water mark.
    Redis(redis::aio::MultiplexedConnection),
    /// A Redis Cluster: the same, on the account's shard.
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Clock {
    async fn set(&self, account: &str, now: i64) {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(state::SET).arg(1).arg(keys::account(account)).arg(state::NOW).arg(now);
        match self {
            Clock::Memory(clock) => clock.store(now, Ordering::SeqCst),
            Clock::Redis(conn) => cmd.query_async::<()>(&mut conn.clone()).await.expect("state now"),
            Clock::Cluster(conn) => cmd.query_async::<()>(&mut conn.clone()).await.expect("state now"),
        }
    }
}

// === the steps ===

/// A random case: where the account's calendar starts, its plan, and the steps.
#[derive(Debug, Clone)]
struct Case {
    start: Start,
    plan: usize,
    ops: Vec<Op>,
}

/// The billing anchor, in the leap year [`base_year`] or the year after, and where the clock
/// starts relative to it.
#[derive(Debug, Clone)]
struct Start {
    year: i32,
    month: u8,
    /// Clamped to the month's length: 31 in April is April 30.
    day: u8,
    second_of_day: u32,
    /// The clock starts this many seconds after the anchor (before it when negative).
    offset_secs: i64,
}

/// One step. Indexes pick from small pools so that ids and keys repeat.
#[derive(Debug, Clone)]
enum Op {
    /// Charge id `c<id>`; with an idempotency key `k<epoch>-<key>` and fingerprint `fp<fp>`.
    Charge { id: u8, cost: u64, idem: Option<(u8, u8)>, operation: u8 },
    /// Records the answer (or, `keep` false, that none is kept) of the charge holding key
    /// `k<epoch>-<key>`, or of a charge that does not hold it (`wrong`).
    Complete { key: u8, wrong: bool, keep: bool },
    /// Refund of charge id `c<id>` (made or not, refunded before or not), or, `live`, of the
    /// `id`-th charge of the model that stands and was not refunded, if there is one.
    Refund { id: u8, live: bool },
    /// Top-up of `credits` under payment reference `pay<pay>`.
    Topup { pay: u8, credits: u64, package: bool },
    /// Auto top-up setting: on or off, threshold, and one of [`AUTO_PACKAGES`].
    SetAuto { enabled: bool, threshold: u64, package: u8 },
    /// Plan change to [`PLANS`]`[plan]`.
    Plan { plan: u8 },
    /// The clock moves `secs` within the epoch (skipped when the epoch would reach a day).
    Tick { secs: i64 },
    /// The clock jumps to a renewal (`ahead` periods after the next one) plus `offset_secs`,
    /// or a later one when that is less than [`EPOCH_GAP`] away. New epoch.
    ToRenewal { ahead: u8, offset_secs: i64 },
    /// The clock jumps `hours` (at least [`EPOCH_GAP`]). New epoch.
    Jump { hours: i64 },
    /// Queues job `j<epoch>-<job>` with a body of `body` bytes, optionally under a key.
    Enqueue { job: u8, body: u8, idem: Option<(u8, u8)> },
    /// Runner `r<runner>` claims the oldest due job.
    Claim { runner: u8 },
    /// Runner `r<runner>` (2: whoever holds the lease) finishes the `job`-th leased job, or the
    /// `job`-th job ever queued when none is leased.
    Finish { job: u8, runner: u8, how: How },
}

/// How [`Op::Finish`] ends an attempt.
#[derive(Debug, Clone, Copy)]
enum How {
    Done,
    Retry { delay_secs: i64 },
    Failed,
    Release,
}

/// Plans with small allocations, so a few charges empty the monthly bucket.
const PLANS: [(&str, u64); 4] = [("bronze", 10), ("silver", 30), ("gold", 60), ("platinum", 100)];

/// Operations and their categories.
const OPERATIONS: [(&str, &str); 3] =
    [("ai_chat", "AI Chat"), ("lead_enrichment", "Enrichment"), ("insights_position", "Insights")];

/// The packages of the running config.
static PACKAGES: std::sync::LazyLock<Packages> =
    std::sync::LazyLock::new(|| Packages::new(vec![("p20".into(), 20, 5.0), ("p50".into(), 50, 10.0)]));

/// Auto top-up settings: two current packages, one whose credits changed since the setting was
/// made, one no longer offered. (name, credits, price)
const AUTO_PACKAGES: [(&str, u64, f64); 4] =
    [("p20", 20, 5.0), ("p50", 50, 10.0), ("p50", 60, 10.0), ("p99", 99, 30.0)];

/// Low-credit thresholds of every charge (events are not compared; they run the same code).
const THRESHOLDS: [u8; 3] = [20, 10, 0];
const AUTO_MAX_PER_PERIOD: u64 = 2;
const IDEM_LEASE_SECS: i64 = 600;
const JOB_LEASE_SECS: i64 = 600;
const JOB_MAX_QUEUED: u64 = 4;
/// What a model job holds besides its body (method, path, headers: `NewJob::stored_bytes`).
const JOB_OVERHEAD: u64 = 45;
const JOB_MAX_BYTES: u64 = 10 + 2 * JOB_OVERHEAD;
const JOB_BODIES: [usize; 3] = [0, 3, 5];
const JOB_RETENTION_SECS: i64 = 2 * 86_400;
/// `StoreLimits::default()`'s job bounds, which the stores run with here.
const JOB_MAX_AGE_SECS: i64 = 768 * 3600;
const JOB_EXPIRED_RETENTION_SECS: i64 = 168 * 3600;
/// Records live 24 h: an epoch stays below it, a jump between epochs exceeds twice it.
const RECORD_SECS: i64 = 86_400;
const EPOCH_LENGTH: i64 = RECORD_SECS - 3600;
const EPOCH_GAP: i64 = 2 * RECORD_SECS + 3600;

fn op_strategy() -> impl Strategy<Value = Op> {
    let idem = prop::option::weighted(0.5, (0..2u8, 0..2u8));
    prop_oneof![
        10 => (0..6u8, 1..=25u64, idem.clone(), 0..3u8)
            .prop_map(|(id, cost, idem, operation)| Op::Charge { id, cost, idem, operation }),
        2 => (0..2u8, prop::bool::weighted(0.2), any::<bool>())
            .prop_map(|(key, wrong, keep)| Op::Complete { key, wrong, keep }),
        4 => (0..8u8, prop::bool::weighted(0.6)).prop_map(|(id, live)| Op::Refund { id, live }),
        3 => (0..4u8, prop::sample::select(vec![5u64, 20, 50]), any::<bool>())
            .prop_map(|(pay, credits, package)| Op::Topup { pay, credits, package }),
        2 => (prop::bool::weighted(0.7), prop::sample::select(vec![0u64, 5, 15, 40]), 0..4u8)
            .prop_map(|(enabled, threshold, package)| Op::SetAuto { enabled, threshold, package }),
        2 => (0..4u8).prop_map(|plan| Op::Plan { plan }),
        3 => (1..=1800i64).prop_map(|secs| Op::Tick { secs }),
        2 => (0..3u8, -5400..=5400i64).prop_map(|(ahead, offset_secs)| Op::ToRenewal { ahead, offset_secs }),
        1 => (49..=24 * 70i64).prop_map(|hours| Op::Jump { hours }),
        3 => (0..4u8, 0..3u8, prop::option::weighted(0.3, (0..2u8, 0..2u8)))
            .prop_map(|(job, body, idem)| Op::Enqueue { job, body, idem }),
        3 => (0..2u8).prop_map(|runner| Op::Claim { runner }),
        3 => (0..6u8, prop_oneof![1 => 0..2u8, 2 => Just(2u8)], prop_oneof![
                Just(How::Done),
                prop::sample::select(vec![0i64, 900]).prop_map(|delay_secs| How::Retry { delay_secs }),
                Just(How::Failed),
                Just(How::Release),
            ])
            .prop_map(|(job, runner, how)| Op::Finish { job, runner, how }),
    ]
}

fn case_strategy() -> impl Strategy<Value = Case> {
    let start = (0..2i32, 1..=12u8, prop::sample::select(vec![1u8, 15, 28, 29, 30, 31]), 0..86_400u32, -40..=60i64)
        .prop_map(|(year, month, day, second_of_day, offset_days)| Start {
            year: base_year() + year,
            month,
            day,
            second_of_day,
            offset_secs: offset_days * 86_400 + i64::from(second_of_day % 7_200),
        });
    (start, 0..PLANS.len(), prop::collection::vec(op_strategy(), 1..60)).prop_map(|(start, plan, ops)| Case {
        start,
        plan,
        ops,
    })
}

/// The first leap year at least two years ahead: the model's clock stays ahead of the real one
/// (which the Redis scripts would otherwise use) and passes through a Feb 29.
fn base_year() -> i32 {
    let mut year = OffsetDateTime::now_utc().year() + 2;
    while !time::util::is_leap_year(year) {
        year += 1;
    }
    year
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// A name no other case uses (the Redis stores serve every case of a test).
fn unique(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{prefix}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

// === running a case ===

/// Fails the case with a message naming the step.
macro_rules! same {
    ($step:expr, $what:expr, $store:expr, $model:expr) => {{
        let (store, model) = (&$store, &$model);
        if store != model {
            return Err(format!("step {}: {} differ\n store: {:?}\n model: {:?}", $step.0, $what, store, model));
        }
    }};
}

/// Applies `case` to `l` and to a [`Model`], comparing after every step.
async fn run_case<L: Ledger + JobStore>(l: &L, clock: &Clock, case: Case) -> Result<(), String> {
    let acct = unique("model");
    let (plan, allocation) = PLANS[case.plan];
    let anchor = case.start.anchor();
    // Created on the real clock (Redis's own until its clock is set), then moved to the start.
    if let Clock::Memory(time) = clock {
        time.store(now(), Ordering::SeqCst);
    }
    let new = NewAccount { id: acct.clone(), plan: plan.into(), allocation, anchor, email: None };
    assert!(l.create_account(new).await.expect("create"), "fresh account");
    let start = anchor + case.start.offset_secs;
    clock.set(&acct, start).await;
    let mut model = Model::new(plan, allocation, anchor, start);
    let mut seen = Seen::default();
    check(l, &acct, &model, &mut seen, (0, &Op::Tick { secs: 0 }), true).await?;

    for (i, op) in case.ops.iter().enumerate() {
        let step = (i + 1, op);
        apply(l, clock, &acct, &mut model, step).await?;
        check(l, &acct, &model, &mut seen, step, false).await?;
    }
    Ok(())
}

/// One step on the store and the model; their answers must agree.
async fn apply<L: Ledger + JobStore>(
    l: &L,
    clock: &Clock,
    acct: &str,
    m: &mut Model,
    step: (usize, &Op),
) -> Result<(), String> {
    match *step.1 {
        Op::Charge { id, cost, idem, operation } => {
            let charge_id = format!("c{id}");
            let key = idem.map(|(k, fp)| (m.idem_key(k), format!("fp{fp}")));
            let (op, category) = OPERATIONS[operation as usize];
            let req = ChargeRequest {
                account: acct,
                charge_id: &charge_id,
                cost,
                operation: op,
                category,
                request_id: "req",
                idempotency: key.as_ref().map(|(key, fingerprint)| Idempotency {
                    key,
                    fingerprint,
                    lease_secs: IDEM_LEASE_SECS,
                }),
                thresholds: &THRESHOLDS,
                auto_topup_max_per_period: AUTO_MAX_PER_PERIOD,
                packages: &PACKAGES,
            };
            let got = l.charge(req).await.expect("charge");
            let want = m.charge(&charge_id, cost, key.as_ref().map(|(k, f)| (k.as_str(), f.as_str())), op, category);
            same!(step, "charge outcomes", got, want);
        }
        Op::Complete { key, wrong, keep } => {
            let key = m.idem_key(key);
            let holder = m.idem.get(&key).and_then(|r| r.charge_id.clone());
            let charge_id = if wrong { "c-other".to_owned() } else { holder.unwrap_or_else(|| "c-none".into()) };
            let response = keep.then(|| answer(&charge_id));
            let got = l.complete_idempotent(acct, &key, &charge_id, response.as_ref()).await.expect("complete");
            same!(step, "completions", got, m.complete(&key, &charge_id, response));
        }
        Op::Refund { id, live } => {
            let mut standing: Vec<&String> = m.charges.iter().filter(|(_, c)| !c.refunded).map(|(id, _)| id).collect();
            standing.sort();
            let charge_id = match standing.len() {
                n if live && n > 0 => standing[id as usize % n].clone(),
                _ => format!("c{id}"),
            };
            let got = l.refund(acct, &charge_id).await.expect("refund");
            same!(step, "refund outcomes", got, m.refund(&charge_id));
        }
        Op::Topup { pay, credits, package } => {
            let payment_ref = format!("pay{pay}");
            let package = package.then_some("p-manual");
            let req = TopupRequest { account: acct, credits, payment_ref: &payment_ref, package };
            let got = l.topup(req).await.expect("topup");
            same!(step, "top-up outcomes", got, m.topup(&payment_ref, credits, package));
        }
        Op::SetAuto { enabled, threshold, package } => {
            let (package, credits, price_eur) = AUTO_PACKAGES[package as usize];
            let setting = AutoTopup { enabled, threshold, package: package.into(), credits, price_eur };
            assert!(l.set_auto_topup(acct, &setting).await.expect("set auto"), "account exists");
            m.set_auto(setting);
        }
        Op::Plan { plan } => {
            let (plan, allocation) = PLANS[plan as usize];
            let got = l.update_account(acct, Some(PlanChange { plan, allocation }), None).await.expect("plan");
            same!(step, "plan outcomes", got, Some(m.change_plan(plan, allocation)));
        }
        Op::Tick { secs } => {
            if m.now + secs - m.epoch_start < EPOCH_LENGTH {
                m.advance(m.now + secs, false);
            }
        }
        Op::ToRenewal { ahead, offset_secs } => {
            let mut k = m.period + 1 + i64::from(ahead);
            while m.period_start(k) + offset_secs < m.now + EPOCH_GAP {
                k += 1;
            }
            m.advance(m.period_start(k) + offset_secs, true);
        }
        Op::Jump { hours } => m.advance(m.now + hours.max(EPOCH_GAP / 3600 + 1) * 3600, true),
        Op::Enqueue { job, body, idem } => {
            let id = format!("j{}-{job}", m.epoch);
            let body = vec![b'x'; JOB_BODIES[body as usize]];
            let key = idem.map(|(k, fp)| (m.idem_key(k), format!("fp{fp}")));
            let headers = job_headers();
            let new = NewJob {
                id: &id,
                account: acct,
                operation: "call_transcription",
                category: "Transcription",
                cost: 2,
                upstream: "ai",
                method: "POST",
                path: "/v1/calls/transcribe",
                headers: &headers,
                body: &body,
                request_id: "req-job",
                max_queued: JOB_MAX_QUEUED,
                max_queued_bytes: JOB_MAX_BYTES,
                idempotency: key.as_ref().map(|(key, fingerprint)| Idempotency {
                    key,
                    fingerprint,
                    lease_secs: IDEM_LEASE_SECS,
                }),
            };
            assert_eq!(new.stored_bytes(), body.len() as u64 + JOB_OVERHEAD, "JOB_OVERHEAD is out of date");
            let got = l.enqueue_job(new).await.expect("enqueue");
            let want = m.enqueue(&id, body, key.as_ref().map(|(k, f)| (k.as_str(), f.as_str())));
            same!(step, "enqueue outcomes", got, want);
        }
        Op::Claim { runner } => {
            let runner = format!("r{runner}");
            let got = l.claim_job(acct, &runner, JOB_LEASE_SECS).await.expect("claim");
            same!(step, "claimed jobs", got, m.claim(&runner, acct));
        }
        Op::Finish { job, runner, how } => {
            let leased: Vec<&ModelJob> = m.jobs.iter().filter(|j| j.lease.is_some()).collect();
            let id = match (leased.len(), m.jobs.len()) {
                (0, 0) => "j-none".to_owned(),
                (0, n) => m.jobs[job as usize % n].id.clone(),
                (n, _) => leased[job as usize % n].id.clone(),
            };
            let holder = m.job(&id).and_then(|j| j.lease.clone()).map(|(r, _)| r);
            let runner = if runner == 2 { holder.unwrap_or_else(|| "r-none".into()) } else { format!("r{runner}") };
            let finish = match how {
                How::Done => JobFinish::Done {
                    status: 200,
                    headers: vec![("content-type".into(), "text/plain".into())],
                    body: format!("result of {id}").into_bytes(),
                    retention_secs: JOB_RETENTION_SECS,
                },
                How::Retry { delay_secs } => JobFinish::Retry { reason: "upstream answered 502".into(), delay_secs },
                How::Failed => JobFinish::Failed { reason: "gave up".into(), retention_secs: JOB_RETENTION_SECS },
                How::Release => JobFinish::Release,
            };
            let want = m.finish(&id, &runner, &finish);
            let got = l.finish_job(acct, &id, &runner, finish).await.expect("finish");
            same!(step, "finish answers", got, want);
        }
    }
    if matches!(step.1, Op::Tick { .. } | Op::ToRenewal { .. } | Op::Jump { .. }) {
        clock.set(acct, m.now).await;
    }
    Ok(())
}

/// What the checks saw before: how many history entries the store had when the model started,
/// and how many it has now.
#[derive(Default)]
struct Seen {
    setup_entries: usize,
    /// The same for outbox events.
    setup_events: usize,
}

/// Everything a reader sees must agree with the model: the account, its whole history (deltas
/// chaining to the balances, never below zero, the new entries as the model made them), the
/// outbox events, usage of this period and the two before, and the job queue.
async fn check<L: Ledger + JobStore>(
    l: &L,
    acct: &str,
    m: &Model,
    seen: &mut Seen,
    step: (usize, &Op),
    setup: bool,
) -> Result<(), String> {
    let v = l.account(acct).await.expect("account").expect("account exists");
    let want = m.view(acct);
    same!(step, "accounts", v, want);

    let mut history = l.history(acct, None, 100_000).await.expect("history").expect("account exists");
    history.reverse();
    let (mut monthly, mut topup) = (0i64, 0i64);
    for (i, e) in history.iter().enumerate() {
        same!(step, "history seq", e.seq, i as u64 + 1);
        monthly += e.monthly_delta;
        topup += e.topup_delta;
        if monthly < 0 || topup < 0 {
            return Err(format!("step {}: history goes below zero at {e:?}", step.0));
        }
        same!(
            step,
            format!("balances after entry {}", e.seq),
            (e.monthly_after, e.topup_after),
            (monthly as u64, topup as u64)
        );
    }
    same!(step, "history sums and balances", (monthly as u64, topup as u64), (v.monthly_remaining, v.topup_remaining));
    if setup {
        seen.setup_entries = history.len();
    } else {
        let entries: Vec<Entry> = history[seen.setup_entries.min(history.len())..].iter().map(Entry::from).collect();
        same!(step, "history entries since the start", entries, m.history);
    }

    // Nothing acknowledges events here, so the outbox holds every one since the account began.
    let events = l.pending_events(acct, 100_000).await.expect("events");
    let ids: std::collections::HashSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
    same!(step, "distinct event ids", ids.len(), events.len());
    if setup {
        seen.setup_events = events.len();
    } else {
        let kinds: Vec<(String, Option<u64>)> = events[seen.setup_events.min(events.len())..]
            .iter()
            .map(|e| (e.kind.clone(), e.data.get("threshold").and_then(|t| t.as_u64())))
            .collect();
        same!(step, "events since the start", kinds, m.events);
    }

    let usage = l.usage(acct, 2).await.expect("usage").expect("account exists");
    let periods: Vec<PeriodUsage> = std::iter::once(&usage.current).chain(&usage.earlier).map(nonzero).collect();
    let want: Vec<PeriodUsage> = (0..3).map(|i| m.usage(m.period - i)).collect();
    same!(step, "usage", periods, want);

    same!(step, "queue depth", l.queue_depth(acct).await.expect("depth"), m.queue.len() as u64);
    for j in &m.jobs {
        if j.expires_at.is_some_and(|t| t <= m.now) {
            continue; // forgotten by the memory store, kept by Redis's real TTL: not comparable
        }
        let got = l.job(acct, &j.id).await.expect("job");
        same!(step, format!("job {}", j.id), got, Some(j.view()));
    }
    Ok(())
}

/// The usage of a period without the counters at 0 (a charge refunded in full leaves one).
fn nonzero(u: &PeriodUsage) -> PeriodUsage {
    let keep = |m: &BTreeMap<String, u64>| m.iter().filter(|(_, v)| **v > 0).map(|(k, v)| (k.clone(), *v)).collect();
    PeriodUsage {
        by_category: keep(&u.by_category),
        by_operation: keep(&u.by_operation),
        by_day: u.by_day.iter().filter(|(_, v)| **v > 0).map(|(k, v)| (*k, *v)).collect(),
        ..u.clone()
    }
}

fn answer(charge_id: &str) -> StoredResponse {
    StoredResponse {
        status: 200,
        headers: vec![("content-type".into(), "application/json".into())],
        body: format!("{{\"answer\":\"{charge_id}\"}}").into(),
    }
}

fn job_headers() -> Vec<(String, String)> {
    vec![("content-type".into(), "audio/wav".into())]
}

impl Start {
    fn anchor(&self) -> i64 {
        let month = Month::try_from(self.month).expect("1..=12");
        let day = self.day.min(time::util::days_in_month(month, self.year));
        let date = Date::from_calendar_date(self.year, month, day).expect("valid date");
        date.midnight().assume_utc().unix_timestamp() + i64::from(self.second_of_day)
    }
}

// === the model ===

/// The ledger as SPEC §1 describes it, for one account, written for clarity rather than speed.
struct Model {
    now: i64,
    /// Epochs of the clock (see the module comment) and when the current one started.
    epoch: u32,
    epoch_start: i64,
    anchor: OffsetDateTime,
    /// Index of the current period: it starts `period` months after the anchor.
    period: i64,
    plan: String,
    allocation: u64,
    pending: Option<(String, u64)>,
    monthly: u64,
    topup: u64,
    used: u64,
    auto: Option<AutoTopup>,
    /// Buys on the next charge that ends below the threshold, crossing or not: set when the
    /// setting is switched on or a renewal leaves the total below the threshold.
    auto_armed: bool,
    auto_count: u64,
    charges: HashMap<String, ChargeRecord>,
    idem: HashMap<String, IdemRecord>,
    topups: HashMap<String, TopupReceipt>,
    usage: BTreeMap<i64, PeriodUsage>,
    /// History entries since the start.
    history: Vec<Entry>,
    /// Outbox events since the start: type and, for threshold events, the threshold.
    events: Vec<(String, Option<u64>)>,
    /// Low-credit threshold → the period it last fired in (SPEC §7: once per period each).
    fired: HashMap<u8, i64>,
    /// Every job ever queued, oldest first, and the ids in the queue.
    jobs: Vec<ModelJob>,
    queue: Vec<String>,
}

struct ChargeRecord {
    cost: u64,
    from_monthly: u64,
    from_topup: u64,
    period: i64,
    day: i64,
    operation: String,
    category: String,
    idem_key: Option<String>,
    auto_topup: Option<u64>,
    refunded: bool,
}

struct IdemRecord {
    fingerprint: String,
    /// The charge holding the key; none for a queued job's 202.
    charge_id: Option<String>,
    state: IdemState,
}

enum IdemState {
    Running { until: i64 },
    Done(StoredResponse),
    Gone,
}

/// A history entry as the model predicts it.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    kind: String,
    monthly_delta: i64,
    topup_delta: i64,
    monthly_after: u64,
    topup_after: u64,
}

impl From<&HistoryEntry> for Entry {
    fn from(e: &HistoryEntry) -> Self {
        Entry {
            kind: e.kind.clone(),
            monthly_delta: e.monthly_delta,
            topup_delta: e.topup_delta,
            monthly_after: e.monthly_after,
            topup_after: e.topup_after,
        }
    }
}

type JobResult = (u16, Vec<(String, String)>, Vec<u8>);

struct ModelJob {
    id: String,
    body: Vec<u8>,
    status: &'static str,
    lease: Option<(String, i64)>,
    not_before: i64,
    attempts: u32,
    created_at: i64,
    updated_at: i64,
    /// Upstream status, headers and body, once done.
    result: Option<JobResult>,
    error: Option<String>,
    expires_at: Option<i64>,
}

impl ModelJob {
    fn view(&self) -> JobView {
        JobView {
            id: self.id.clone(),
            status: self.status.into(),
            operation: "call_transcription".into(),
            cost: 2,
            attempts: self.attempts,
            created_at: self.created_at,
            updated_at: self.updated_at,
            result_status: self.result.as_ref().map(|r| r.0),
            result_headers: self.result.as_ref().map(|r| r.1.clone()).unwrap_or_default(),
            result_body: self.result.as_ref().map(|r| r.2.clone()),
            error: self.error.clone(),
        }
    }
}

impl Model {
    fn new(plan: &str, allocation: u64, anchor: i64, now: i64) -> Self {
        let anchor = OffsetDateTime::from_unix_timestamp(anchor).expect("anchor");
        let mut m = Model {
            now,
            epoch: 0,
            epoch_start: now,
            anchor,
            period: 0,
            plan: plan.into(),
            allocation,
            pending: None,
            monthly: allocation,
            topup: 0,
            used: 0,
            auto: None,
            auto_armed: false,
            auto_count: 0,
            charges: HashMap::new(),
            idem: HashMap::new(),
            topups: HashMap::new(),
            usage: BTreeMap::new(),
            history: Vec::new(),
            events: Vec::new(),
            fired: HashMap::new(),
            jobs: Vec::new(),
            queue: Vec::new(),
        };
        m.period = m.period_at(now);
        m
    }

    // --- the calendar, from the SPEC's words: same day each month, else the month's last day ---

    fn period_start(&self, k: i64) -> i64 {
        let a = self.anchor;
        let months = i64::from(a.year()) * 12 + (a.month() as i64 - 1) + k;
        let year = months.div_euclid(12) as i32;
        let month = Month::try_from((months.rem_euclid(12) + 1) as u8).expect("1..=12");
        let day = a.day().min(time::util::days_in_month(month, year));
        let date = Date::from_calendar_date(year, month, day).expect("valid date");
        date.with_time(Time::from_hms(a.hour(), a.minute(), a.second()).expect("time")).assume_utc().unix_timestamp()
    }

    fn period_at(&self, t: i64) -> i64 {
        let mut k = 0;
        while self.period_start(k) > t {
            k -= 1;
        }
        while self.period_start(k + 1) <= t {
            k += 1;
        }
        k
    }

    /// Moves the clock; renews when a billing date passed. A new epoch forgets what the stores
    /// keep for 24 h (charge records, tombstones, idempotency keys).
    fn advance(&mut self, to: i64, new_epoch: bool) {
        assert!(to > self.now, "the clock only moves forward");
        self.now = to;
        if new_epoch {
            self.epoch += 1;
            self.epoch_start = to;
            self.charges.clear();
            self.idem.clear();
        }
        let k = self.period_at(to);
        if k > self.period {
            if let Some((plan, allocation)) = self.pending.take() {
                self.plan = plan;
                self.allocation = allocation;
            }
            let expired = self.monthly;
            self.period = k;
            // No roll-over: the monthly bucket is the allocation, whatever was left.
            self.monthly = self.allocation;
            self.used = 0;
            self.auto_count = 0;
            if self.auto.as_ref().is_some_and(|a| a.enabled && self.total() < a.threshold) {
                self.auto_armed = true;
            }
            self.entry("renewal", self.allocation as i64 - expired as i64, 0);
            self.event("credits.renewed", None);
        }
    }

    fn idem_key(&self, k: u8) -> String {
        format!("k{}-{k}", self.epoch)
    }

    fn total(&self) -> u64 {
        self.monthly + self.topup
    }

    fn entry(&mut self, kind: &str, monthly_delta: i64, topup_delta: i64) {
        let (monthly_after, topup_after) = (self.monthly, self.topup);
        self.history.push(Entry { kind: kind.into(), monthly_delta, topup_delta, monthly_after, topup_after });
    }

    fn event(&mut self, kind: &str, threshold: Option<u64>) {
        self.events.push((kind.into(), threshold));
    }

    /// After a charge: each threshold the remaining credits are at or below (0: none left)
    /// raises its event, once per period.
    fn thresholds(&mut self) {
        let remaining = self.total();
        for t in THRESHOLDS {
            let reached = if t == 0 { remaining == 0 } else { remaining * 100 <= self.allocation * u64::from(t) };
            if reached && self.fired.get(&t) != Some(&self.period) {
                self.fired.insert(t, self.period);
                let kind = if t == 0 { "credits.exhausted" } else { "credits.low" };
                self.event(kind, Some(u64::from(t)));
            }
        }
    }

    fn renews_at(&self) -> i64 {
        self.period_start(self.period + 1)
    }

    fn view(&self, id: &str) -> creditgate::ledger::AccountView {
        creditgate::ledger::AccountView {
            id: id.into(),
            plan: self.plan.clone(),
            allocation: self.allocation,
            pending_plan: self.pending.as_ref().map(|p| p.0.clone()),
            monthly_remaining: self.monthly,
            topup_remaining: self.topup,
            used_this_period: self.used,
            period_start: self.period_start(self.period),
            renews_at: self.renews_at(),
            email: None,
            auto_topup: self.auto.clone(),
            auto_topups_this_period: self.auto_count,
        }
    }

    fn usage(&self, k: i64) -> PeriodUsage {
        PeriodUsage {
            period_start: self.period_start(k),
            period_end: self.period_start(k + 1),
            ..self.usage.get(&k).cloned().unwrap_or_default()
        }
    }

    /// Adds (or, refunding, takes back) credits in a period's usage; never below 0.
    fn count_usage(&mut self, k: i64, day: i64, category: &str, operation: &str, credits: i64) {
        let u = self.usage.entry(k).or_default();
        let add = |v: &mut u64| *v = v.saturating_add_signed(credits);
        add(&mut u.total);
        add(u.by_category.entry(category.into()).or_default());
        add(u.by_operation.entry(operation.into()).or_default());
        add(u.by_day.entry(day).or_default());
        u.by_category.retain(|_, v| *v > 0);
        u.by_operation.retain(|_, v| *v > 0);
        u.by_day.retain(|_, v| *v > 0);
    }

    /// What an idempotency key used before answers, or `None` for a fresh key.
    fn idem_hit(&self, key: &str, fingerprint: &str) -> Option<IdemHit> {
        let r = self.idem.get(key)?;
        if r.fingerprint != fingerprint {
            return Some(IdemHit::Conflict);
        }
        Some(match &r.state {
            IdemState::Done(response) => {
                IdemHit::Replay { response: response.clone(), remaining: self.total(), allocation: self.allocation }
            }
            IdemState::Running { until } if *until > self.now => {
                IdemHit::InProgress { retry_after_secs: (until - self.now) as u64 }
            }
            _ => IdemHit::Reused,
        })
    }

    fn receipt(&self, charge_id: &str, c: &ChargeRecord) -> Receipt {
        Receipt {
            charge_id: charge_id.into(),
            cost: c.cost,
            from_monthly: c.from_monthly,
            from_topup: c.from_topup,
            monthly_remaining: self.monthly,
            topup_remaining: self.topup,
            allocation: self.allocation,
            renews_at: self.renews_at(),
            auto_topup: c.auto_topup,
        }
    }

    fn charge(
        &mut self,
        charge_id: &str,
        cost: u64,
        idem: Option<(&str, &str)>,
        operation: &str,
        category: &str,
    ) -> ChargeOutcome {
        // The same charge id again: what it did the first time, nothing more.
        if let Some(c) = self.charges.get(charge_id) {
            if c.refunded {
                return ChargeOutcome::Refunded;
            }
            return ChargeOutcome::Charged(self.receipt(charge_id, c));
        }
        if let Some(hit) = idem.and_then(|(key, fingerprint)| self.idem_hit(key, fingerprint)) {
            return ChargeOutcome::Idempotent(hit);
        }
        // All or nothing; monthly first, then top-ups.
        let before = self.total();
        if before < cost {
            return ChargeOutcome::Refused { remaining: before, renews_at: self.renews_at() };
        }
        let from_monthly = cost.min(self.monthly);
        let from_topup = cost - from_monthly;
        self.monthly -= from_monthly;
        self.topup -= from_topup;
        self.used += cost;
        let day = self.now.div_euclid(86_400);
        self.count_usage(self.period, day, category, operation, cost as i64);
        self.entry("charge", -(from_monthly as i64), -(from_topup as i64));
        if let Some((key, fingerprint)) = idem {
            let state = IdemState::Running { until: self.now + IDEM_LEASE_SECS };
            let record = IdemRecord { fingerprint: fingerprint.into(), charge_id: Some(charge_id.into()), state };
            self.idem.insert(key.into(), record);
        }
        let auto_topup = self.auto_topup(before);
        let record = ChargeRecord {
            cost,
            from_monthly,
            from_topup,
            period: self.period,
            day,
            operation: operation.into(),
            category: category.into(),
            idem_key: idem.map(|(key, _)| key.into()),
            auto_topup,
            refunded: false,
        };
        self.thresholds();
        let receipt = self.receipt(charge_id, &record);
        self.charges.insert(charge_id.into(), record);
        ChargeOutcome::Charged(receipt)
    }

    /// After a charge took the total from `before` to now: buys the package when the total fell
    /// below the threshold from at or above it (or armed), at most AUTO_MAX_PER_PERIOD times a
    /// period, and only the package the customer agreed to (else the setting goes off).
    fn auto_topup(&mut self, before: u64) -> Option<u64> {
        let auto = self.auto.clone().filter(|a| a.enabled)?;
        if self.total() >= auto.threshold {
            self.auto_armed = false;
            return None;
        }
        if !(before >= auto.threshold || self.auto_armed) || self.auto_count >= AUTO_MAX_PER_PERIOD {
            return None;
        }
        self.auto_armed = false;
        if PACKAGES.get(&auto.package) != Some((auto.credits, auto.price_eur)) {
            self.auto.as_mut().expect("set").enabled = false;
            self.event("auto_topup.disabled", None);
            return None;
        }
        self.topup += auto.credits;
        self.auto_count += 1;
        self.entry("auto_topup", 0, auto.credits as i64);
        self.event("auto_topup.purchased", None);
        Some(auto.credits)
    }

    fn complete(&mut self, key: &str, charge_id: &str, response: Option<StoredResponse>) -> bool {
        let Some(r) = self.idem.get_mut(key) else { return false };
        if r.charge_id.as_deref() != Some(charge_id) || !matches!(r.state, IdemState::Running { .. }) {
            return false;
        }
        r.state = response.map_or(IdemState::Gone, IdemState::Done);
        true
    }

    fn refund(&mut self, charge_id: &str) -> RefundOutcome {
        let period = self.period;
        let Some(c) = self.charges.get_mut(charge_id) else {
            // Unknown (or forgotten): a tombstone, so the charge arriving late does not stand.
            let tombstone = ChargeRecord {
                cost: 0,
                from_monthly: 0,
                from_topup: 0,
                period,
                day: 0,
                operation: String::new(),
                category: String::new(),
                idem_key: None,
                auto_topup: None,
                refunded: true,
            };
            self.charges.insert(charge_id.into(), tombstone);
            return RefundOutcome::UnknownCharge;
        };
        if c.refunded {
            return RefundOutcome::AlreadyRefunded;
        }
        c.refunded = true;
        // Each part back to its bucket; the monthly part only within the charge's period.
        let same_period = c.period == period;
        let to_monthly = if same_period { c.from_monthly } else { 0 };
        let to_topup = c.from_topup;
        let (cost, charge_period, day) = (c.cost, c.period, c.day);
        let (operation, category) = (c.operation.clone(), c.category.clone());
        if let Some(key) = c.idem_key.take()
            && self.idem.get(&key).is_some_and(|r| r.charge_id.as_deref() == Some(charge_id))
        {
            self.idem.remove(&key);
        }
        if same_period {
            self.used -= cost;
        }
        self.monthly += to_monthly;
        self.topup += to_topup;
        self.count_usage(charge_period, day, &category, &operation, -((to_monthly + to_topup) as i64));
        self.entry("refund", to_monthly as i64, to_topup as i64);
        RefundOutcome::Refunded { to_monthly, to_topup, monthly_remaining: self.monthly, topup_remaining: self.topup }
    }

    fn topup(&mut self, payment_ref: &str, credits: u64, package: Option<&str>) -> TopupOutcome {
        if let Some(r) = self.topups.get(payment_ref) {
            return TopupOutcome::Duplicate(r.clone());
        }
        self.topup += credits;
        let receipt = TopupReceipt {
            payment_ref: payment_ref.into(),
            credits,
            package: package.map(Into::into),
            topup_remaining: self.topup,
            created_at: self.now,
        };
        self.topups.insert(payment_ref.into(), receipt.clone());
        self.entry("topup", 0, credits as i64);
        self.event("topup.completed", None);
        TopupOutcome::Created(receipt)
    }

    fn set_auto(&mut self, setting: AutoTopup) {
        let was_on = self.auto.as_ref().is_some_and(|a| a.enabled);
        if setting.enabled && !was_on {
            self.auto_armed = true;
        } else if !setting.enabled {
            self.auto_armed = false;
        }
        self.auto = Some(setting);
    }

    /// Upgrade now (the monthly bucket grows by the difference), downgrade at the next renewal;
    /// the current plan again cancels a pending downgrade.
    fn change_plan(&mut self, plan: &str, allocation: u64) -> PlanOutcome {
        if plan == self.plan {
            self.pending = None;
            return PlanOutcome::Unchanged;
        }
        if allocation < self.allocation {
            self.pending = Some((plan.into(), allocation));
            self.entry("plan_change", 0, 0);
            return PlanOutcome::DowngradeScheduled;
        }
        let grow = allocation - self.allocation;
        self.plan = plan.into();
        self.allocation = allocation;
        self.pending = None;
        self.monthly += grow;
        self.entry("plan_change", grow as i64, 0);
        PlanOutcome::Upgraded
    }

    // --- the job queue ---

    fn job(&self, id: &str) -> Option<&ModelJob> {
        self.jobs.iter().find(|j| j.id == id)
    }

    fn enqueue(&mut self, id: &str, body: Vec<u8>, idem: Option<(&str, &str)>) -> EnqueueOutcome {
        if let Some(hit) = idem.and_then(|(key, fingerprint)| self.idem_hit(key, fingerprint)) {
            return EnqueueOutcome::Idempotent(hit);
        }
        let depth = self.queue.len() as u64;
        if self.job(id).is_some() {
            return EnqueueOutcome::Queued { depth };
        }
        if depth >= JOB_MAX_QUEUED {
            return EnqueueOutcome::Full;
        }
        let held: u64 = self.queue.iter().map(|q| self.job(q).expect("queued").body.len() as u64 + JOB_OVERHEAD).sum();
        if held + body.len() as u64 + JOB_OVERHEAD > JOB_MAX_BYTES {
            return EnqueueOutcome::FullBytes;
        }
        self.jobs.push(ModelJob {
            id: id.into(),
            body,
            status: "queued",
            lease: None,
            not_before: self.now,
            attempts: 0,
            created_at: self.now,
            updated_at: self.now,
            result: None,
            error: None,
            expires_at: None,
        });
        self.queue.push(id.into());
        let depth = self.queue.len() as u64;
        if let Some((key, fingerprint)) = idem {
            let state = IdemState::Done(queued_response(id, depth));
            self.idem.insert(key.into(), IdemRecord { fingerprint: fingerprint.into(), charge_id: None, state });
        }
        EnqueueOutcome::Queued { depth }
    }

    /// The oldest due job nobody holds a live lease on; jobs waiting too long expire on the way.
    fn claim(&mut self, runner: &str, account: &str) -> Option<Job> {
        let now = self.now;
        let mut chosen = None;
        let mut expired = Vec::new();
        for id in &self.queue {
            let j = self.jobs.iter_mut().find(|j| &j.id == id).expect("queued");
            let leased = j.lease.as_ref().is_some_and(|(_, until)| *until > now);
            if !leased && now - j.created_at >= JOB_MAX_AGE_SECS {
                j.status = "expired";
                j.lease = None;
                j.body.clear();
                j.updated_at = now;
                j.error = Some(format!("not run within {} h of queueing", JOB_MAX_AGE_SECS / 3600));
                j.expires_at = Some(now + JOB_EXPIRED_RETENTION_SECS);
                expired.push(id.clone());
                continue;
            }
            if leased || j.not_before > now {
                continue;
            }
            j.lease = Some((runner.into(), now + JOB_LEASE_SECS));
            j.status = "running";
            j.updated_at = now;
            chosen = Some(Job {
                id: j.id.clone(),
                account: account.into(),
                operation: "call_transcription".into(),
                category: "Transcription".into(),
                cost: 2,
                upstream: "ai".into(),
                method: "POST".into(),
                path: "/v1/calls/transcribe".into(),
                headers: job_headers(),
                body: j.body.clone(),
                request_id: "req-job".into(),
                attempts: j.attempts,
                created_at: j.created_at,
            });
            break;
        }
        self.queue.retain(|id| !expired.contains(id));
        chosen
    }

    /// Only the runner holding the lease may finish an attempt (its lease may have run out).
    fn finish(&mut self, id: &str, runner: &str, finish: &JobFinish) -> bool {
        let now = self.now;
        let Some(j) = self.jobs.iter_mut().find(|j| j.id == id) else { return false };
        if j.lease.as_ref().is_none_or(|(holder, _)| holder != runner) {
            return false;
        }
        j.lease = None;
        j.updated_at = now;
        let finished = match finish {
            JobFinish::Done { status, headers, body, retention_secs } => {
                j.status = "done";
                j.error = None;
                j.result = Some((*status, headers.clone(), body.clone()));
                j.expires_at = Some(now + retention_secs);
                true
            }
            JobFinish::Failed { reason, retention_secs } => {
                j.status = "failed";
                j.attempts += 1;
                j.error = Some(reason.clone());
                j.expires_at = Some(now + retention_secs);
                true
            }
            JobFinish::Retry { reason, delay_secs } => {
                j.status = "queued";
                j.attempts += 1;
                j.error = Some(reason.clone());
                j.not_before = now + delay_secs;
                false
            }
            JobFinish::Release => {
                j.status = "queued";
                false
            }
        };
        if finished {
            j.body.clear();
            self.queue.retain(|q| q != id);
        }
        true
    }
}

// === counterexamples ===

/// Shrunk counterexamples, kept so that each store runs them on every test run. Each is what
/// proptest shrank to when the named behaviour was broken on purpose (in memory.rs or the Lua
/// scripts) to check that the properties can fail.
fn counterexamples() -> Vec<(&'static str, Case)> {
    let charge = |id, cost| Op::Charge { id, cost, idem: None, operation: 0 };
    vec![
        // Refund parts swapped between the buckets: a 1-credit charge re-sent twice, refunded.
        (
            "a refund goes back to the bucket it came from",
            case(1, 1, 0, 0, vec![charge(0, 1), charge(0, 1), charge(0, 1), Op::Refund { id: 0, live: false }]),
        ),
        // The idempotency check skipped in lua/charge.lua: the key of a queued job's 202.
        (
            "a charge under the key of a queued job replays the 202",
            case(
                1,
                1,
                0,
                0,
                vec![
                    Op::Enqueue { job: 0, body: 0, idem: Some((0, 0)) },
                    Op::Charge { id: 0, cost: 1, idem: Some((0, 0)), operation: 0 },
                ],
            ),
        ),
        // Leap years left out of the Lua calendar: anchored Jan 29, renewing Feb 29.
        ("an anchor on Jan 29 of a leap year renews on Feb 29", case(1, 29, 0, 0, vec![charge(0, 1)])),
        // Auto top-up bought on every charge below the threshold, not once per crossing.
        (
            "auto top-up buys once per crossing",
            case(
                1,
                1,
                0,
                0,
                vec![Op::SetAuto { enabled: true, threshold: 40, package: 0 }, charge(0, 1), charge(1, 1)],
            ),
        ),
        // Unused monthly credits rolled over at renewal (lua/lib.lua).
        (
            "no roll-over at renewal",
            case(1, 1, 0, 0, vec![charge(0, 5), Op::ToRenewal { ahead: 0, offset_secs: 0 }, charge(1, 1)]),
        ),
        // Threshold events fired on every charge at or below them (memory.rs); proptest stopped
        // at 8 steps, this is the same failure by hand.
        ("each threshold event fires once per period", case(1, 1, 0, 0, vec![charge(0, 9), charge(1, 1)])),
        // A job finished by a runner that does not hold its lease (memory.rs).
        (
            "only the lease holder finishes a job",
            case(
                1,
                1,
                0,
                0,
                vec![
                    Op::Enqueue { job: 0, body: 0, idem: None },
                    Op::Claim { runner: 1 },
                    Op::Finish { job: 0, runner: 0, how: How::Done },
                ],
            ),
        ),
        // The monthly part of a refund returned after the period renewed.
        (
            "a refund after the renewal returns no monthly credits",
            case(
                1,
                1,
                0,
                0,
                vec![
                    Op::ToRenewal { ahead: 0, offset_secs: -1 },
                    charge(0, 1),
                    Op::Tick { secs: 1 },
                    Op::Refund { id: 0, live: false },
                ],
            ),
        ),
    ]
}

/// A case on plan [`PLANS`]`[plan]`, anchored at midnight on `month`/`day` of [`base_year`],
/// the clock starting `offset_secs` after the anchor.
fn case(month: u8, day: u8, offset_secs: i64, plan: usize, ops: Vec<Op>) -> Case {
    let start = Start { year: base_year(), month, day, second_of_day: 0, offset_secs };
    Case { start, plan, ops }
}
