//! The gateway on a real Redis: several gateway processes sharing one balance (standalone and
//! Redis Cluster), store outages (fail_closed, fail_open, recovery without restart), an emptied
//! script cache, and no acknowledged charge lost across a Redis restart with `appendonly yes`.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::gateway::{ConfigBuilder, TestGateway};
use support::http::{self, Response};
use support::process::{GatewayProcess, admin};
use support::redis::{RedisCluster, RedisServer};
use support::upstream::Upstream;

const CHAT: &str = "/v1/chat/completions";

async fn chat(base: &str, key: &str) -> Response {
    let auth = format!("Bearer {key}");
    http::send("POST", &format!("{base}{CHAT}"), &[("authorization", &auth), ("x-ai-tier", "fast")], "{}").await
}

/// Counts the charge records of `account` on the given Redis nodes.
fn charge_records(nodes: &[&RedisServer], account: &str) -> usize {
    // One field per charge in the account's record buckets (lua/lib.lua).
    let pattern = format!("cg:{{acct:{account}}}:charges:*");
    let mut total = 0;
    for node in nodes {
        let mut cursor = "0".to_owned();
        for _ in 0..10_000 {
            let reply = node.command(&["SCAN", &cursor, "MATCH", &pattern, "COUNT", "1000"]);
            let mut lines = reply.lines();
            cursor = lines.next().unwrap_or("0").trim().to_owned();
            for bucket in lines.map(str::trim).filter(|l| !l.is_empty()) {
                total += node.command(&["HLEN", bucket]).trim().parse::<usize>().expect("HLEN is a number");
            }
            if cursor == "0" {
                break;
            }
        }
    }
    total
}

/// Two `creditgate serve` processes on one store, 400 concurrent cost-1 requests against 50 credits.
async fn many_gateways_one_balance(store_lines: &str, nodes: &[&RedisServer]) {
    let up = Upstream::echo().await;
    let config = ConfigBuilder::new(&up.url()).store(store_lines).build();
    let (a, b) = (GatewayProcess::start(&config).await, GatewayProcess::start(&config).await);
    let res = admin(&a.admin, "POST", "/admin/v1/accounts", Some(json!({"id": "shared", "plan": "fifty"}))).await;
    assert_eq!(res.status, 201, "{}", res.text());
    let res = admin(&b.admin, "POST", "/admin/v1/accounts/shared/keys", Some(json!({"role": "user"}))).await;
    assert_eq!(res.status, 201, "{}", res.text());
    let key = res.json()["key"].as_str().unwrap().to_owned();

    let mut tasks = Vec::new();
    for i in 0..400 {
        let base = if i % 2 == 0 { a.public.clone() } else { b.public.clone() };
        let key = key.clone();
        tasks.push(tokio::spawn(async move { chat(&base, &key).await.status.as_u16() }));
    }
    let mut ok = 0;
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            200 => ok += 1,
            402 => refused += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!((ok, refused), (50, 350));
    for g in [&a, &b] {
        let credits =
            http::send("GET", &format!("{}/v1/credits", g.public), &[("authorization", &format!("Bearer {key}"))], "")
                .await;
        assert_eq!(credits.json()["remaining"], 0, "{}", credits.text());
    }
    assert_eq!(up.count(), 50, "only paid requests reached the upstream");
    assert_eq!(charge_records(nodes, "shared"), 50, "the store recorded exactly 50 charges");
    let history = admin(&a.admin, "GET", "/admin/v1/accounts/shared/ledger?limit=500", None).await;
    assert_eq!(history.status, 200, "{}", history.text());
    let charged: i64 = history.json()["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "charge")
        .map(|e| -(e["monthly_delta"].as_i64().unwrap() + e["topup_delta"].as_i64().unwrap()))
        .sum();
    assert_eq!(charged, 50, "the history's charges add up to 50");
}

#[tokio::test]
async fn two_gateway_processes_share_one_balance_on_redis() {
    let redis = RedisServer::start();
    many_gateways_one_balance(&redis_store(&redis), &[&redis]).await;
}

#[tokio::test]
async fn two_gateway_processes_share_one_balance_on_a_redis_cluster() {
    let cluster = RedisCluster::start();
    let nodes: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    let lines = format!("kind = \"redis-cluster\"\nnodes = [{}]", nodes.join(", "));
    let refs: Vec<&RedisServer> = cluster.nodes().iter().collect();
    many_gateways_one_balance(&lines, &refs).await;
}

/// The `[store]` lines for a standalone `redis`.
fn redis_store(redis: &RedisServer) -> String {
    format!("kind = \"redis\"\nurl = \"{}\"", redis.url())
}

fn shutdown(redis: &RedisServer) {
    let status = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port().to_string(), "shutdown", "nosave"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("redis-cli");
    // redis-cli reports the dropped connection of a successful SHUTDOWN as an error; either is fine.
    let _ = status;
}

/// Sends metered chats, 100 ms apart, until one is served (true) or 15 s have passed.
async fn metered_recovers(gw: &TestGateway, key: &str) -> bool {
    metered_recovers_via(&gw.public, key).await
}

/// [`metered_recovers`] for the gateway at `base`.
async fn metered_recovers_via(base: &str, key: &str) -> bool {
    for _ in 0..150 {
        if chat(base, key).await.status == 200 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// An echo upstream and a gateway on `store` (lines of `[store]`), with a `fifty` account whose
/// key has paid for one fast chat already.
async fn charged_once(store: &str) -> (Upstream, TestGateway, String) {
    let up = Upstream::echo().await;
    let gw = TestGateway::start(&ConfigBuilder::new(&up.url()).store(store).build()).await;
    let key = gw.account_with_key("acme", "fifty").await;
    assert_eq!(gw.post(&key, CHAT, &[("x-ai-tier", "fast")], "{}").await.charged(), 1);
    (up, gw, key)
}

async fn readyz(gw: &TestGateway) -> u16 {
    http::send("GET", &format!("{}/readyz", gw.admin), &[], "").await.status.as_u16()
}

#[tokio::test]
async fn redis_outage_fail_closed_then_recovery_without_restart() {
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let up = Upstream::echo().await;
    let gw = TestGateway::start(&ConfigBuilder::new(&up.url()).store(&redis_store(&redis)).build()).await;
    let key = gw.account_with_key("acme", "fifty").await;
    assert_eq!(gw.post(&key, CHAT, &[("x-ai-tier", "powerful")], "{}").await.charged(), 5);
    assert_eq!(readyz(&gw).await, 200);

    shutdown(&redis);
    let calls = up.count();
    let res = gw.post(&key, CHAT, &[("x-ai-tier", "fast")], "{}").await;
    assert_eq!(res.status, 503, "{}", res.text());
    assert_eq!(res.error_type(), "store_unavailable");
    assert_eq!(up.count(), calls, "nothing forwarded uncharged");
    assert_eq!(gw.call(&key, "GET", "/v1/deals", &[], "").await.status, 200, "free routes keep working");
    assert_eq!(readyz(&gw).await, 503);
    // Past the key cache's freshness: the recently verified key still opens free routes.
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    assert_eq!(gw.call(&key, "GET", "/v1/deals", &[], "").await.status, 200, "free routes keep working");

    redis.restart();
    assert!(metered_recovers(&gw, &key).await, "metered routes work again once Redis is back, without a restart");
    assert_eq!(readyz(&gw).await, 200);
    // 50 − 5 (before the outage, acknowledged, survived the restart) − 1 (after).
    assert_eq!(gw.remaining(&key).await, 44);
}

/// A Redis that stops answering (paused, its socket open) costs a metered request at most
/// `store.max_wait_ms`: the request gets 503 `store_unavailable` with `Retry-After` instead of
/// waiting the stall out (it would then have been served and charged), later ones fail at once
/// while the store is known to be down (`/readyz`, `creditgate_store_up`), and it all recovers by
/// itself. The charge that was sent into the stall lands when Redis resumes, and is refunded: the
/// books balance exactly.
#[tokio::test]
async fn a_stalled_store_is_answered_in_bounded_time_and_the_books_balance() {
    let redis = RedisServer::start();
    let (up, gw, key) = charged_once(&format!("{}\nmax_wait_ms = 300", redis_store(&redis))).await;
    let calls = up.count();

    // Every client of this Redis waits 1.9 s (the test's own commands too, so none until then):
    // shorter than the client's own response timeout (2 s), so only max_wait_ms turns the
    // stall into an answer — without it the first request would be served, late.
    redis.command(&["CLIENT", "PAUSE", "1900", "ALL"]);
    for attempt in ["waits at most max_wait_ms", "fails at once while down"] {
        let res = gw.post(&key, CHAT, &[("x-ai-tier", "fast")], "{}").await;
        assert_eq!(res.status, 503, "{attempt}: {}", res.text());
        assert_eq!(res.error_type(), "store_unavailable", "{attempt}");
        assert_eq!(res.header("retry-after"), Some("1"), "{attempt}");
    }
    assert_eq!(up.count(), calls, "nothing forwarded uncharged");
    assert_eq!(readyz(&gw).await, 503, "readiness says the store is down");
    let metrics = http::send("GET", &format!("{}/metrics", gw.admin), &[], "").await.text();
    assert!(metrics.lines().any(|l| l == "creditgate_store_up 0"), "{metrics}");
    assert!(metrics.lines().any(|l| l == "creditgate_store_downs 1"), "{metrics}");
    assert_eq!(gw.call(&key, "GET", "/v1/deals", &[], "").await.status, 200, "free routes keep working");

    // Redis resumes: the circuit closes by itself, metered requests are served again.
    assert!(metered_recovers(&gw, &key).await, "metered routes work again once Redis answers, without a restart");
    assert_eq!(readyz(&gw).await, 200);
    // 50 - 1 before - 1 after; the charge sent into the stall ran when Redis resumed and is
    // refunded in the background.
    let mut remaining = 0;
    for _ in 0..100 {
        remaining = gw.remaining(&key).await;
        if remaining == 48 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(remaining, 48, "two requests served, two credits taken");
}

/// Redis out of memory refuses the charge function before it runs: the request gets 503
/// `store_unavailable`, nothing reaches the backend, and nothing was written — the balance is
/// whole once Redis has room again.
#[tokio::test]
async fn a_store_out_of_memory_charges_nothing() {
    let redis = RedisServer::start();
    let (up, gw, key) = charged_once(&redis_store(&redis)).await;
    let calls = up.count();
    redis.command(&["CONFIG", "SET", "maxmemory", "1"]);
    let res = gw.post(&key, CHAT, &[("x-ai-tier", "powerful")], "{}").await;
    assert_eq!(res.status, 503, "{}", res.text());
    assert_eq!(res.error_type(), "store_unavailable");
    assert_eq!(up.count(), calls, "nothing forwarded");
    redis.command(&["CONFIG", "SET", "maxmemory", "0"]);
    assert_eq!(gw.remaining(&key).await, 49, "the refused charge wrote nothing");
    assert_eq!(gw.post(&key, CHAT, &[("x-ai-tier", "fast")], "{}").await.charged(), 1, "and charges work again");
}

/// The real binary starts while Redis is down: it serves (`/healthz`), says it is not ready,
/// answers the store's steps 503 `store_unavailable`, and becomes ready and charges by itself
/// once Redis is there — no restart.
#[tokio::test]
async fn start_up_with_redis_down_then_recovery() {
    let mut redis = RedisServer::start();
    shutdown(&redis);
    let up = Upstream::echo().await;
    let gw = GatewayProcess::start(&ConfigBuilder::new(&up.url()).store(&redis_store(&redis)).build()).await;
    let ready = || async { http::send("GET", &format!("{}/readyz", gw.admin), &[], "").await.status.as_u16() };
    assert_eq!(ready().await, 503, "not ready without its store");
    let res = admin(&gw.admin, "POST", "/admin/v1/accounts", Some(json!({"id": "acme", "plan": "fifty"}))).await;
    assert_eq!(res.status, 503, "{}", res.text());
    assert_eq!(res.error_type(), "store_unavailable");

    redis.restart();
    let mut became_ready = false;
    for _ in 0..150 {
        if ready().await == 200 {
            became_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(became_ready, "ready once Redis answers");
    let res = admin(&gw.admin, "POST", "/admin/v1/accounts", Some(json!({"id": "acme", "plan": "fifty"}))).await;
    assert_eq!(res.status, 201, "{}", res.text());
    let res = admin(&gw.admin, "POST", "/admin/v1/accounts/acme/keys", Some(json!({"role": "user"}))).await;
    let key = res.json()["key"].as_str().expect("a key").to_owned();
    assert!(metered_recovers_via(&gw.public, &key).await, "metered requests are served");
    assert_eq!(remaining_via(&gw.public, &key).await, 49);
}

/// Redis busy running another client's long script answers BUSY: the request gets 503
/// `store_unavailable`, nothing reaches the backend, the charge never ran, and once the script is
/// done everything works again.
#[tokio::test]
async fn a_busy_store_charges_nothing() {
    let redis = RedisServer::start_with(&["--busy-reply-threshold", "100"]);
    let (up, gw, key) = charged_once(&redis_store(&redis)).await;
    let calls = up.count();
    // Another client's script that keeps Redis busy for 1.5 s.
    let port = redis.port().to_string();
    let busy = std::thread::spawn(move || {
        let spin = "local t = redis.call('TIME') local s = t[1] * 1000000 + t[2] \
                    repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] - s > 1500000";
        std::process::Command::new("redis-cli").args(["-p", &port, "EVAL", spin, "0"]).output().expect("redis-cli")
    });
    // Until Redis answers BUSY (the script has started and passed the threshold).
    let mut refused = None;
    for _ in 0..50 {
        let res = gw.post(&key, CHAT, &[("x-ai-tier", "powerful")], "{}").await;
        if res.status != 200 {
            refused = Some(res);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let res = refused.expect("a request met the busy Redis");
    assert_eq!(res.status, 503, "{}", res.text());
    assert_eq!(res.error_type(), "store_unavailable");
    let served = up.count() - calls;
    busy.join().expect("the busy script ended");
    assert!(metered_recovers(&gw, &key).await, "served again once the script is done");
    // 50 - 1 before - 5 for each powerful chat served before Redis got busy - 1 after.
    assert_eq!(gw.remaining(&key).await, 50 - 1 - 5 * served as u64 - 1, "the refused charge wrote nothing");
}

#[tokio::test]
async fn redis_outage_fail_open_forwards_uncharged() {
    let redis = RedisServer::start();
    let (up, gw, key) = charged_once(&format!("{}\non_error = \"fail_open\"", redis_store(&redis))).await;
    shutdown(&redis);
    let calls = up.count();
    let res = gw.post(&key, CHAT, &[("x-ai-tier", "fast")], "{}").await;
    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(res.charged(), 0);
    assert_eq!(up.count(), calls + 1);
    let metrics = http::send("GET", &format!("{}/metrics", gw.admin), &[], "").await.text();
    assert!(metrics.lines().any(|l| l.starts_with("creditgate_fail_open_total 1")), "counted:\n{metrics}");
}

#[tokio::test]
async fn an_emptied_function_library_is_reloaded_not_hidden() {
    let redis = RedisServer::start();
    let up = Upstream::echo().await;
    let gw = TestGateway::start(&ConfigBuilder::new(&up.url()).store(&redis_store(&redis)).build()).await;
    let key = gw.account_with_key("acme", "fifty").await;
    redis.command(&["FUNCTION", "FLUSH"]);
    assert_eq!(readyz(&gw).await, 200, "readiness runs a real script (reloading it)");
    redis.command(&["FUNCTION", "FLUSH"]);
    assert_eq!(gw.post(&key, CHAT, &[("x-ai-tier", "fast")], "{}").await.charged(), 1);
    assert_eq!(gw.remaining(&key).await, 49);
}

// === the job queue across instances ===

const TRANSCRIBE: &str = "/v1/calls/transcribe";

async fn post(base: &str, key: &str, path: &str, body: &str) -> Response {
    let auth = format!("Bearer {key}");
    let body = body.to_owned();
    http::send(
        "POST",
        &format!("{base}{path}"),
        &[("authorization", &auth), ("content-type", "application/json")],
        body,
    )
    .await
}

/// `remaining` of `GET /v1/credits` through the gateway at `base`.
async fn remaining_via(base: &str, key: &str) -> u64 {
    let res =
        http::send("GET", &format!("{base}/v1/credits"), &[("authorization", &format!("Bearer {key}"))], "").await;
    assert_eq!(res.status, 200, "{}", res.text());
    res.json()["remaining"].as_u64().expect("remaining")
}

async fn exhaust_via(base: &str, key: &str, credits: u64) {
    for _ in 0..credits {
        assert_eq!(chat(base, key).await.status, 200);
    }
    assert_eq!(chat(base, key).await.status, 402);
}

async fn wait_done(base: &str, key: &str, location: &str, tries: usize) -> Value {
    let auth = format!("Bearer {key}");
    for _ in 0..tries {
        let v = http::send("GET", &format!("{base}{location}"), &[("authorization", &auth)], "").await.json();
        if v["status"] == "done" || v["status"] == "failed" {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("job {location} did not finish");
}

async fn new_account(admin_base: &str, id: &str) -> String {
    let res = admin(admin_base, "POST", "/admin/v1/accounts", Some(json!({"id": id, "plan": "fifty"}))).await;
    assert_eq!(res.status, 201, "{}", res.text());
    let res = admin(admin_base, "POST", &format!("/admin/v1/accounts/{id}/keys"), Some(json!({"role": "user"}))).await;
    res.json()["key"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn two_gateway_processes_drain_one_queue_running_each_job_once() {
    let redis = RedisServer::start();
    let up = Upstream::echo().await;
    let config = ConfigBuilder::new(&up.url()).store(&redis_store(&redis)).build();
    let (a, b) = (GatewayProcess::start(&config).await, GatewayProcess::start(&config).await);
    let key = new_account(&a.admin, "queued").await;
    exhaust_via(&a.public, &key, 50).await;
    let mut locations = Vec::new();
    for i in 0..6 {
        let base = if i % 2 == 0 { &a.public } else { &b.public };
        let res = post(base, &key, TRANSCRIBE, &format!(r#"{{"call_id":"c{i}"}}"#)).await;
        assert_eq!(res.status, 202, "{}", res.text());
        locations.push(res.header("location").unwrap().to_owned());
    }
    let res =
        admin(&b.admin, "POST", "/admin/v1/accounts/queued/topups", Some(json!({"credits": 12, "payment_ref": "p1"})))
            .await;
    assert_eq!(res.status, 201);
    for loc in &locations {
        let job = wait_done(&a.public, &key, loc, 200).await;
        assert_eq!(job["status"], "done", "{job}");
    }
    let mut seen: Vec<String> = up
        .requests()
        .iter()
        .filter(|r| r.path == TRANSCRIBE)
        .map(|r| serde_json::from_slice::<Value>(&r.body).unwrap()["call_id"].as_str().unwrap().to_owned())
        .collect();
    seen.sort();
    assert_eq!(seen, ["c0", "c1", "c2", "c3", "c4", "c5"], "each job ran exactly once");
    assert_eq!(remaining_via(&b.public, &key).await, 0, "6 jobs × 2 credits, charged once each");
}

#[tokio::test]
async fn a_job_whose_gateway_dies_mid_run_completes_once_elsewhere() {
    let redis = RedisServer::start();
    let up = Upstream::echo().await;
    let config = ConfigBuilder::new(&up.url())
        .store(&redis_store(&redis))
        .upstream_timeout_ms(2_000)
        .extra("[jobs]\nlease_margin_secs = 1")
        .build();
    let mut a = GatewayProcess::start(&config).await;
    let key = new_account(&a.admin, "crashy").await;
    exhaust_via(&a.public, &key, 50).await;
    let res = post(&a.public, &key, TRANSCRIBE, r#"{"call_id":"slow"}"#).await;
    assert_eq!(res.status, 202);
    let location = res.header("location").unwrap().to_owned();
    up.set(support::upstream::Behaviour::Delay(Duration::from_millis(1_500)));
    let res =
        admin(&a.admin, "POST", "/admin/v1/accounts/crashy/topups", Some(json!({"credits": 2, "payment_ref": "p1"})))
            .await;
    assert_eq!(res.status, 201);
    // Wait until gateway A has sent the job upstream, then kill it mid-run.
    let mut sent = false;
    for _ in 0..100 {
        if up.requests().iter().any(|r| r.path == TRANSCRIBE) {
            sent = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(sent, "gateway A started the job");
    a.kill();
    let b = GatewayProcess::start(&config).await;
    let job = wait_done(&b.public, &key, &location, 200).await;
    assert_eq!(job["status"], "done", "{job}");
    let runs: Vec<_> = up.requests().into_iter().filter(|r| r.path == TRANSCRIBE).collect();
    assert_eq!(runs.len(), 2, "A's interrupted run and B's");
    let job_key = runs[0].header("idempotency-key");
    assert!(job_key.is_some_and(|k| k.starts_with("job-")), "the upstream gets the job's key: {job_key:?}");
    assert_eq!(job_key, runs[1].header("idempotency-key"), "the same job key on both runs");
    assert_eq!(remaining_via(&b.public, &key).await, 0, "charged once: 2 credits");
}

#[tokio::test]
async fn a_charge_whose_reply_is_late_is_charged_once_not_refused() {
    let redis = RedisServer::start();
    let up = Upstream::echo().await;
    let gw = TestGateway::start(&ConfigBuilder::new(&up.url()).store(&redis_store(&redis)).build()).await;
    let key = gw.account_with_key("acme", "fifty").await;
    // Redis stalls for 3 s: longer than the 2 s reply timeout of the first attempt.
    let port = redis.port().to_string();
    let stall = std::thread::spawn(move || stall_redis(&port, "3"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let res = gw.post(&key, CHAT, &[("x-ai-tier", "powerful")], "{}").await;
    stall.join().unwrap();
    match res.status.as_u16() {
        // The re-sent charge (same charge id) learned that the first one landed.
        200 => assert_eq!((res.charged(), gw.remaining(&key).await), (5, 45)),
        // Or the store stayed silent too long: then nothing may stand once it is back.
        503 => assert_eq!(gw.wait_for_remaining(&key, 50, 100).await, 50),
        other => panic!("unexpected {other}: {}", res.text()),
    }
    let history = gw.admin_call("GET", "/admin/v1/accounts/acme/ledger", None).await.json();
    let charges = history["entries"].as_array().unwrap().iter().filter(|e| e["kind"] == "charge").count();
    assert!(charges <= 1, "never charged twice: {history}");
}

/// How many refunds wait in the store's pending lists.
fn pending_refunds(redis: &RedisServer) -> usize {
    (0..creditgate::ledger::keys::REFUND_SHARDS)
        .map(|s| {
            redis.command(&["LLEN", &creditgate::ledger::keys::pending_refunds(s)]).trim().parse::<usize>().unwrap()
        })
        .sum()
}

#[tokio::test]
async fn a_refund_the_store_could_not_write_survives_its_gateway_and_another_writes_it() {
    let redis = RedisServer::start();
    let up = Upstream::start(support::upstream::Behaviour::DelayThen(Duration::from_millis(600), 500)).await;
    let config = ConfigBuilder::new(&up.url()).store(&redis_store(&redis)).build();
    let mut a = GatewayProcess::start(&config).await;
    let key = new_account(&a.admin, "acme").await;
    let (url, auth) = (format!("{}{CHAT}", a.public), format!("Bearer {key}"));
    let sent = tokio::spawn(async move {
        http::send("POST", &url, &[("authorization", &auth), ("x-ai-tier", "powerful")], "{}").await
    });
    up.wait_for_count(1).await;
    // The backend is failing; by the time it says so, no script may run (the refund cannot be
    // written), while plain commands still work (the refund can be kept in the store).
    assert_eq!(redis.command(&["ACL", "SETUSER", "default", "-@scripting"]).trim(), "OK");
    let res = sent.await.unwrap();
    assert_eq!((res.status.as_u16(), res.header("x-credits-refund")), (500, Some("pending")));
    for _ in 0..100 {
        if pending_refunds(&redis) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(pending_refunds(&redis), 1, "the refund waits in the store");
    // The gateway that decided the refund dies; the store comes back; another instance writes it.
    a.kill();
    assert_eq!(redis.command(&["ACL", "SETUSER", "default", "+@all"]).trim(), "OK");
    assert_eq!(redis.command(&["HGET", "cg:{acct:acme}", "monthly"]).trim(), "45", "still charged");
    let b = GatewayProcess::start(&config).await;
    let mut monthly = String::new();
    for _ in 0..200 {
        monthly = redis.command(&["HGET", "cg:{acct:acme}", "monthly"]).trim().to_owned();
        if monthly == "50" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(monthly, "50", "refunded by the other instance");
    assert_eq!(pending_refunds(&redis), 0);
    assert_eq!(remaining_via(&b.public, &key).await, 50);
}

/// A client that hangs up while the refund of its failed call is being written cannot cancel
/// that refund: the refund runs in its own task.
#[tokio::test]
async fn a_hang_up_during_the_refund_of_a_failed_call_keeps_the_refund() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let redis = RedisServer::start();
    // A backend that answers 500 only when the test says so.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = format!("http://{}", listener.local_addr().unwrap());
    let (got_tx, got_rx) = tokio::sync::oneshot::channel::<()>();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let _ = socket.read(&mut buf).await;
        let _ = got_tx.send(());
        let _ = go_rx.await;
        let body = r#"{"error":"backend broke"}"#;
        let head = format!(
            "HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let _ = socket.write_all(format!("{head}{body}").as_bytes()).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let config = ConfigBuilder::new(&backend).store(&redis_store(&redis)).build();
    let gw = TestGateway::start(&config).await;
    let key = gw.account_with_key("acme", "fifty").await;
    let (url, auth) = (gw.url(CHAT), format!("Bearer {key}"));
    let client = tokio::spawn(async move {
        http::send("POST", &url, &[("authorization", &auth), ("x-ai-tier", "powerful")], "{}").await
    });
    got_rx.await.unwrap();
    // Redis stalls, so the refund the 500 calls for is still being written when the client leaves.
    let port = redis.port().to_string();
    let stall = std::thread::spawn(move || stall_redis(&port, "1.5"));
    tokio::time::sleep(Duration::from_millis(150)).await;
    go_tx.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    client.abort();
    let _ = client.await;
    stall.join().unwrap();
    assert_eq!(gw.wait_for_remaining(&key, 50, 100).await, 50, "the refund was written after the hang-up");
}

/// Blocks the Redis on `port` for `secs` seconds (`DEBUG SLEEP`); panics unless it really did.
fn stall_redis(port: &str, secs: &str) {
    let out =
        std::process::Command::new("redis-cli").args(["-p", port, "DEBUG", "SLEEP", secs]).output().expect("redis-cli");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK", "DEBUG SLEEP refused: the stall did not happen");
}
