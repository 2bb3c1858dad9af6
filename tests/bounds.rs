//! A store that cannot be filled: what one busy account costs Redis after 50,000 charges, with
//! the history trimmed in the charging step and the balance still reconciling.

mod support;

use std::sync::Arc;

use creditgate::ledger::redis::RedisLedger;
use creditgate::ledger::{ChargeOutcome, ChargeRequest, Ledger, NewAccount, Packages, StoreLimits};
use support::redis::RedisServer;

/// The stated bound (README, "Running on Redis"): one account's keys after 50,000 charges within
/// a day — 10,000 history entries, the usage hash, and 50,000 charge records that expire after
/// 24 h — stay below this.
const BOUND_BYTES: u64 = 24 * 1024 * 1024;

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
    let history = redis.command(&["LLEN", "cg:{acct:busy}:history"]);
    assert_eq!(history.trim(), "10000", "trimmed to history.max_entries in the charging step");
    // The kept history plus the carried-forward opening balance still gives the balance.
    let kept = ledger.history("busy", None, 20_000).await.unwrap().unwrap();
    let oldest = kept.last().unwrap();
    let opening = oldest.monthly_after as i64 - oldest.monthly_delta;
    let sum: i64 = kept.iter().map(|e| e.monthly_delta).sum();
    let view = ledger.account("busy").await.unwrap().unwrap();
    assert_eq!(opening + sum, view.monthly_remaining as i64);
    assert_eq!(view.monthly_remaining, 1_000_000 - 50_000);
}
