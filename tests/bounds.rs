//! A store that cannot be filled: what one busy account costs Redis after 50,000 charges, with
//! the history trimmed in the charging step and the balance still reconciling.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use creditgate::ledger::memory::Clock;
use creditgate::ledger::redis::RedisLedger;
use creditgate::ledger::{ChargeOutcome, ChargeRequest, Ledger, MemoryLedger, NewAccount, Packages, StoreLimits};
use creditgate::server::{self, StartOptions};
use support::gateway::{ADMIN_TOKEN, ConfigBuilder, TestGateway, spend};
use support::redis::RedisServer;
use support::stores::{Env, Store};

/// The stated bound (README, "Running on Redis"): one account's keys after 50,000 charges within
/// a day — 10,000 history entries, the usage hash, and 50,000 charge records that expire after
/// 24 h — stay below this.
const BOUND_BYTES: u64 = 12 * 1024 * 1024;

/// Sum of `MEMORY USAGE` over every key of `account`.
fn account_memory(redis: &RedisServer, account: &str) -> (u64, usize) {
    let pattern = format!("cg:{{acct:{account}}}*");
    let (mut bytes, mut keys, mut cursor) = (0u64, 0usize, "0".to_owned());
    for _ in 0..100_000 {
        let reply = redis.command(&["SCAN", &cursor, "MATCH", &pattern, "COUNT", "1000"]);
        let mut lines = reply.lines();
        cursor = lines.next().unwrap_or("0").trim().to_owned();
        for key in lines.map(str::trim).filter(|k| !k.is_empty()) {
            bytes += redis.command(&["MEMORY", "USAGE", key, "SAMPLES", "0"]).trim().parse::<u64>().unwrap_or(0);
            keys += 1;
        }
        if cursor == "0" {
            break;
        }
    }
    (bytes, keys)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_thousand_charges_leave_one_account_within_its_bound() {
    let redis = RedisServer::start();
    let ledger = Arc::new(RedisLedger::connect_standalone(&redis.url()).await.unwrap());
    ledger.set_limits(StoreLimits::default());
    let new = NewAccount { id: "busy".into(), plan: "big".into(), allocation: 1_000_000, anchor: 0, email: None };
    assert!(ledger.create_account(new).await.unwrap());
    let packages = Arc::new(Packages::default());
    let tasks: Vec<_> = (0..50)
        .map(|t| {
            let (ledger, packages) = (ledger.clone(), packages.clone());
            tokio::spawn(async move {
                for i in 0..1_000 {
                    let id = format!("req-{t}-{i}");
                    let req = ChargeRequest {
                        account: "busy",
                        charge_id: &id,
                        cost: 1,
                        operation: "ai_chat",
                        category: "AI Chat",
                        request_id: &id,
                        idempotency: None,
                        thresholds: &[20, 10, 0],
                        auto_topup_max_per_period: 5,
                        packages: &packages,
                    };
                    assert!(matches!(ledger.charge(req).await.unwrap(), ChargeOutcome::Charged(_)));
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let (bytes, keys) = account_memory(&redis, "busy");
    println!("one account after 50,000 charges: {keys} keys, {bytes} bytes");
    assert!(bytes < BOUND_BYTES, "{bytes} bytes in {keys} keys, bound {BOUND_BYTES}");
    // Readers see history.max_entries; the list drops the trimmed ones in batches (lua/lib.lua).
    let history: u64 = redis.command(&["LLEN", "cg:{acct:busy}:history"]).trim().parse().unwrap();
    let batch = StoreLimits::default().history_trim_batch();
    assert!((10_000..10_000 + batch).contains(&history), "{history} entries in the list, batch {batch}");
    // The kept history plus the carried-forward opening balance still gives the balance.
    let kept = ledger.history("busy", None, 20_000).await.unwrap().unwrap();
    let oldest = kept.last().unwrap();
    let opening = oldest.monthly_after as i64 - oldest.monthly_delta;
    let sum: i64 = kept.iter().map(|e| e.monthly_delta).sum();
    let view = ledger.account("busy").await.unwrap().unwrap();
    assert_eq!(opening + sum, view.monthly_remaining as i64);
    assert_eq!(view.monthly_remaining, 1_000_000 - 50_000);
}

/// 1,000 × 1 MiB transcriptions at zero credits used to all be queued (about 1 GiB for one
/// account). Queued bodies now have their own size limit and a per-account byte budget.
async fn queued_requests_are_bounded_in_size_and_in_bytes(store: Store) {
    let env =
        Env::with(store, |b| b.extra("[jobs]\nmax_body_bytes = 1000\nmax_queued_bytes_per_account = 2500\n")).await;
    let gw = &env.gw;
    let key = gw.account_with_key("acme", "fifty").await;
    spend(gw, &key, 50).await;
    let body = |n: usize| format!(r#"{{"call":"{}"}}"#, "x".repeat(n - 11));
    let big = gw.post(&key, "/v1/calls/transcribe", &[], &body(1500)).await;
    assert_eq!((big.status.as_u16(), big.error_type().as_str()), (413, "payload_too_large"), "{}", big.text());
    assert!(big.text().contains("1000"), "names the queue's limit: {}", big.text());
    for _ in 0..2 {
        assert_eq!(gw.post(&key, "/v1/calls/transcribe", &[], &body(900)).await.status, 202);
    }
    let third = gw.post(&key, "/v1/calls/transcribe", &[], &body(900)).await;
    assert_eq!((third.status.as_u16(), third.error_type().as_str()), (429, "rate_limited"), "{}", third.text());
    assert!(third.header("retry-after").is_some());
    let account = gw.admin_call("GET", "/admin/v1/accounts/acme", None).await.json();
    assert_eq!(account["queue_depth"], 2);
}

on_both_stores!(queued_requests_are_bounded_in_size_and_in_bytes);

/// `jobs.max_queue_age_hours`: a job left waiting longer than that is not run when the account
/// can pay at last; it expires, and its client polling `GET /v1/jobs/{id}` is told so. The
/// gateway runs for real on loopback; only its store's clock is the test's (the memory ledger
/// takes one), moved 61 minutes on — an hour is the smallest age the config allows. The same
/// expiry on Redis (`job_claim.lua`) is held to this by `tests/conformance.rs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_queued_longer_than_max_queue_age_hours_expires_and_its_client_is_told() {
    let offset = Arc::new(AtomicI64::new(0));
    let clock: Clock = {
        let offset = offset.clone();
        Arc::new(move || creditgate::calendar::now() + offset.load(Ordering::SeqCst))
    };
    let up = support::upstream::Upstream::echo().await;
    let text = ConfigBuilder::new(&up.url()).extra("[jobs]\nmax_queue_age_hours = 1\n").build();
    let config = creditgate::config::Config::parse(&text).expect("test config");
    let store = creditgate::store::Store::Memory(MemoryLedger::with_clock(clock));
    let opts = StartOptions { admin_token: Some(ADMIN_TOKEN.into()), store: Some(store), ..Default::default() };
    let gw = TestGateway::from_running(server::start(config, opts).await.expect("gateway starts"));
    let key = gw.account_with_key("acme", "fifty").await;
    spend(&gw, &key, 50).await;
    let res = gw
        .post(&key, "/v1/calls/transcribe", &[], r#"{"call_id":"c1","audio_url":"https://example.test/1.wav"}"#)
        .await;
    assert_eq!(res.status, 202, "queued at zero credits: {}", res.text());
    let location = res.header("location").expect("a job location").to_owned();
    let calls = up.count();

    // 61 minutes later by the store's clock the account is topped up, which wakes the runner.
    offset.store(61 * 60, Ordering::SeqCst);
    assert_eq!(gw.topup("acme", 10, "pay-1").await.status, 201);
    let mut job = serde_json::Value::Null;
    for _ in 0..200 {
        let res = gw.call(&key, "GET", &location, &[], "").await;
        assert_eq!(res.status, 200, "{location}: {}", res.text());
        job = res.json();
        if job["status"] != "queued" && job["status"] != "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(job["status"], "expired", "{job}");
    let error = job["error"].as_str().unwrap_or_else(|| panic!("the client is told why: {job}"));
    assert!(error.contains("not run within 1 h"), "{error}");
    assert_eq!(up.count(), calls, "the expired job never reached the backend");
    assert_eq!(gw.remaining(&key).await, 10, "nor was it charged");
}
