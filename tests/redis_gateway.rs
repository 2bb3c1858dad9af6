//! The gateway on a real Redis: several gateway processes sharing one balance (standalone and
//! Redis Cluster), store outages (fail_closed, fail_open, recovery without restart), an emptied
//! script cache, no acknowledged charge lost across a Redis restart with `appendonly yes`, a
//! charge whose reply is lost after it ran (tests/support/faultproxy.rs), refunds the store
//! cannot take now, and two gateways whose clocks differ by 5 minutes (one under libfaketime)
//! renewing an account once.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::gateway::{ConfigBuilder, TestGateway};
use support::http::{self, Response};
use support::lostreply::LostReplyProxy;
use support::process::{GatewayProcess, admin};
use support::redis::{RedisCluster, RedisServer, state};
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

/// Reads `GET /v1/credits`, 100 ms apart, until it answers 200 (true) or 15 s have passed.
async fn credits_readable_via(base: &str, key: &str) -> bool {
    let auth = format!("Bearer {key}");
    for _ in 0..150 {
        if http::send("GET", &format!("{base}/v1/credits"), &[("authorization", &auth)], "").await.status == 200 {
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

/// The reply to a charge is lost after Redis ran it (a proxy between gateway and Redis passes
/// the FCALL, throws the answer away and closes the connection). The gateway sends the same
/// charge id again on a new connection, learns that the charge landed, and serves the request:
/// charged once, not refused, not refunded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_whose_reply_is_lost_is_charged_once_not_refused() {
    let redis = RedisServer::start();
    let proxy = LostReplyProxy::start(redis.port()).await;
    let up = Upstream::echo().await;
    let store = format!("kind = \"redis\"\nurl = \"{}\"", proxy.url());
    let gw = TestGateway::start(&ConfigBuilder::new(&up.url()).store(&store).build()).await;
    let key = gw.account_with_key("acme", "fifty").await;
    assert_eq!(gw.remaining(&key).await, 50, "the key is verified and cached before the fault");

    // The charge function's name ends in `_charge` (src/ledger/redis.rs).
    proxy.lose_reply_to("_charge\r\n");
    let res = gw.post(&key, CHAT, &[("x-ai-tier", "powerful")], "{}").await;
    assert_eq!(proxy.lost(), 1, "the charge's reply was lost after Redis ran it");
    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!((res.charged(), res.header("x-credits-refund")), (5, None));
    assert_eq!(up.count(), 1, "forwarded once");
    assert_eq!(
        redis.command(&["EVAL", state::GET, "1", "cg:{acct:acme}", state::MONTHLY]).trim(),
        "45",
        "charged once"
    );
    // Nothing is refunded later either.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(gw.remaining(&key).await, 45, "the charge stands");
    let history = gw.admin_call("GET", "/admin/v1/accounts/acme/ledger", None).await.json();
    let kinds: Vec<&str> = history["entries"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["charge", "created"], "one charge, no refund: {history}");
    assert_eq!(charge_records(&[&redis], "acme"), 1);
}

/// How many refunds wait in the store's pending lists.
fn pending_refunds(redis: &RedisServer) -> usize {
    (0..creditgate::ledger::keys::REFUND_SHARDS)
        .map(|s| {
            redis.command(&["LLEN", &creditgate::ledger::keys::pending_refunds(s)]).trim().parse::<usize>().unwrap()
        })
        .sum()
}

/// A gateway process on `redis` whose backend answers 500 after 600 ms, account `acme` (50
/// credits) and a powerful chat (5) under way: returns once the backend has it, with the
/// gateway's config, the process, the key and the client's answer to come.
async fn failing_chat_under_way(
    redis: &RedisServer,
) -> (Upstream, String, GatewayProcess, String, tokio::task::JoinHandle<Response>) {
    let up = Upstream::start(support::upstream::Behaviour::DelayThen(Duration::from_millis(600), 500)).await;
    let config = ConfigBuilder::new(&up.url()).store(&redis_store(redis)).build();
    let a = GatewayProcess::start(&config).await;
    let key = new_account(&a.admin, "acme").await;
    let (url, auth) = (format!("{}{CHAT}", a.public), format!("Bearer {key}"));
    let sent = tokio::spawn(async move {
        http::send("POST", &url, &[("authorization", &auth), ("x-ai-tier", "powerful")], "{}").await
    });
    up.wait_for_count(1).await;
    (up, config, a, key, sent)
}

#[tokio::test]
async fn a_refund_the_store_could_not_write_survives_its_gateway_and_another_writes_it() {
    let redis = RedisServer::start();
    let (_up, config, mut a, key, sent) = failing_chat_under_way(&redis).await;
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
    assert_eq!(
        redis.command(&["EVAL", state::GET, "1", "cg:{acct:acme}", state::MONTHLY]).trim(),
        "45",
        "still charged"
    );
    let b = GatewayProcess::start(&config).await;
    let mut monthly = String::new();
    for _ in 0..200 {
        monthly = redis.command(&["EVAL", state::GET, "1", "cg:{acct:acme}", state::MONTHLY]).trim().to_owned();
        if monthly == "50" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(monthly, "50", "refunded by the other instance");
    assert_eq!(pending_refunds(&redis), 0);
    assert_eq!(remaining_via(&b.public, &key).await, 50);
}

/// The backend fails while Redis is down: the refund can be neither written nor kept in the
/// store, so the answer says `x-credits-refund: pending` and `x-credits-charged: 0`, and the
/// instance keeps retrying the refund itself. Once Redis is back (its AOF kept the charge) the
/// balance is whole, exactly: refunded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_while_the_store_is_down_is_pending_then_written_once() {
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let up = Upstream::start(support::upstream::Behaviour::DelayThen(Duration::from_millis(600), 500)).await;
    let gw = TestGateway::start(&ConfigBuilder::new(&up.url()).store(&redis_store(&redis)).build()).await;
    let key = gw.account_with_key("acme", "fifty").await;
    assert_eq!(gw.remaining(&key).await, 50, "the key is verified and cached before the fault");
    let (url, auth) = (gw.url(CHAT), format!("Bearer {key}"));
    let sent = tokio::spawn(async move {
        http::send("POST", &url, &[("authorization", &auth), ("x-ai-tier", "powerful")], "{}").await
    });
    up.wait_for_count(1).await;
    // Charged; the backend is about to fail; Redis goes away before it does.
    shutdown(&redis);
    let res = sent.await.unwrap();
    assert_eq!(res.status, 500, "{}", res.text());
    assert_eq!((res.header("x-credits-refund"), res.charged()), (Some("pending"), 0));
    tokio::time::sleep(Duration::from_millis(1_000)).await;

    redis.restart();
    assert_eq!(
        redis.command(&["EVAL", state::GET, "1", "cg:{acct:acme}", state::MONTHLY]).trim(),
        "45",
        "the charge survived"
    );
    assert!(credits_readable_via(&gw.public, &key).await, "the gateway reaches Redis again");
    assert_eq!(gw.wait_for_remaining(&key, 50, 300).await, 50, "refunded once Redis is back");
    // And only once: nothing more comes back later.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(gw.remaining(&key).await, 50);
    let history = gw.admin_call("GET", "/admin/v1/accounts/acme/ledger", None).await.json();
    let kinds: Vec<&str> = history["entries"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["refund", "charge", "created"], "{history}");
    assert_eq!(pending_refunds(&redis), 0);
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

/// A client that hangs up while its charge is being taken (Redis stalled) is refunded: nothing
/// was forwarded, and its Idempotency-Key runs and pays on the retry.
#[tokio::test]
async fn a_hang_up_while_the_charge_is_taken_is_refunded() {
    let redis = RedisServer::start();
    let (up, gw, key) = charged_once(&redis_store(&redis)).await;
    let port = redis.port().to_string();
    let stall = std::thread::spawn(move || stall_redis(&port, "1.5"));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (url, auth) = (gw.url(CHAT), format!("Bearer {key}"));
    let headers =
        move || [("authorization", auth.clone()), ("x-ai-tier", "fast".into()), ("idempotency-key", "k-1".into())];
    let h = headers();
    let client = tokio::spawn(async move {
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
        http::send("POST", &url, &h, "{}").await
    });
    // The charge step waits on the stalled Redis; the client gives up meanwhile.
    tokio::time::sleep(Duration::from_millis(400)).await;
    client.abort();
    let _ = client.await;
    stall.join().unwrap();
    assert_eq!(gw.wait_for_remaining(&key, 49, 100).await, 49, "the charge of a request never forwarded stood");
    assert_eq!(up.count(), 1, "nothing was forwarded for the request that left");
    // Its key was released with the refund: the retry pays and runs.
    let h = headers();
    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let res = http::send("POST", &gw.url(CHAT), &h, "{}").await;
    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(res.charged(), 1);
    assert_eq!((up.count(), gw.remaining(&key).await), (2, 48));
}

/// Blocks the Redis on `port` for `secs` seconds (`DEBUG SLEEP`); panics unless it really did.
fn stall_redis(port: &str, secs: &str) {
    let out =
        std::process::Command::new("redis-cli").args(["-p", port, "DEBUG", "SLEEP", secs]).output().expect("redis-cli");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK", "DEBUG SLEEP refused: the stall did not happen");
}

// === clocks ===

/// Unix seconds of an HTTP `Date` header (`Mon, 30 Nov 2026 18:52:05 GMT`).
fn http_date(text: &str) -> i64 {
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let parts: Vec<&str> = text.split_whitespace().collect();
    let [_, day, month, year, time, "GMT"] = parts[..] else { panic!("not an HTTP date: {text:?}") };
    let month = MONTHS.iter().position(|m| *m == month).expect("month") as i64 + 1;
    let hms: Vec<i64> = time.split(':').map(|p| p.parse().expect("time")).collect();
    let days = creditgate::calendar::days_from_civil(year.parse().expect("year"), month, day.parse().expect("day"));
    days * 86_400 + hms[0] * 3_600 + hms[1] * 60 + hms[2]
}

/// The wall clock of the gateway at `admin`, from the `Date` header its `/healthz` answer carries.
async fn clock_of(admin: &str) -> i64 {
    let res = http::send("GET", &format!("{admin}/healthz"), &[], "").await;
    http_date(res.header("date").expect("a Date header"))
}

/// Two gateway processes whose wall clocks differ by 5 minutes (one runs under libfaketime, 5
/// minutes ahead of the other and of Redis) charge one account, concurrently, across its billing
/// anchor. Renewals follow Redis's clock, so the one that is ahead does not renew 5 minutes
/// early, and the account renews exactly once, at the anchor: one `renewal` history entry, one
/// `credits.renewed` event, and every credit charged before it or after it accounted for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_whose_clocks_differ_by_5_minutes_renew_once() {
    let redis = RedisServer::start();
    let up = Upstream::echo().await;
    let config = ConfigBuilder::new(&up.url()).store(&redis_store(&redis)).build();
    let ahead = support::process::skewed_clock("+5m");
    let (a, b) = (GatewayProcess::start(&config).await, GatewayProcess::start_with_env(&config, None, &ahead).await);
    let real = creditgate::calendar::now();
    let (clock_a, clock_b) = (clock_of(&a.admin).await, clock_of(&b.admin).await);
    assert!((clock_a - real).abs() <= 2, "gateway A runs on the real clock: {clock_a} vs {real}");
    assert!((clock_b - real - 300).abs() <= 2, "gateway B runs 5 minutes ahead: {clock_b} vs {real}");

    let anchor = creditgate::calendar::now() + 4;
    let body = json!({"id": "skew", "plan": "big", "billing_anchor": creditgate::calendar::rfc3339(anchor)});
    assert_eq!(admin(&b.admin, "POST", "/admin/v1/accounts", Some(body)).await.status, 201);
    let res = admin(&b.admin, "POST", "/admin/v1/accounts/skew/keys", Some(json!({"role": "user"}))).await;
    let key = res.json()["key"].as_str().expect("a key").to_owned();

    // Both instances charge, 20 times a second each, from before the anchor to 2 s after it.
    let clients = [a.public.clone(), b.public.clone()].map(|base| {
        let key = key.clone();
        tokio::spawn(async move {
            let mut served = 0u64;
            while creditgate::calendar::now() < anchor + 2 {
                let res = chat(&base, &key).await;
                assert_eq!(res.status, 200, "{base}: {}", res.text());
                served += res.charged();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            served
        })
    });
    // Half-way to the anchor the instance that is ahead still sees the old period.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let credits =
        http::send("GET", &format!("{}/v1/credits", b.public), &[("authorization", &format!("Bearer {key}"))], "")
            .await
            .json();
    assert!(creditgate::calendar::now() < anchor, "the setup took too long to test a renewal");
    assert_eq!(credits["renews_at"], creditgate::calendar::rfc3339(anchor), "not renewed early: {credits}");
    let mut charged = 0;
    for client in clients {
        charged += client.await.unwrap();
    }

    let history = admin(&a.admin, "GET", "/admin/v1/accounts/skew/ledger?limit=500", None).await.json();
    let entries = history["entries"].as_array().unwrap();
    assert_eq!(entries.len() as u64, entries[0]["seq"].as_u64().unwrap(), "the whole history, no seq missing");
    let renewals: Vec<&Value> = entries.iter().filter(|e| e["kind"] == "renewal").collect();
    assert_eq!(renewals.len(), 1, "renewed exactly once: {renewals:?}");
    let at = creditgate::calendar::parse_rfc3339(renewals[0]["at"].as_str().unwrap()).unwrap();
    assert!((anchor..anchor + 2).contains(&at), "renewed at the anchor by Redis's clock: {at} vs {anchor}");
    let seq = renewals[0]["seq"].as_u64().unwrap();
    let spent = |after: bool| -> u64 {
        entries
            .iter()
            .filter(|e| e["kind"] == "charge" && (e["seq"].as_u64().unwrap() > seq) == after)
            .map(|e| -e["monthly_delta"].as_i64().unwrap() as u64)
            .sum()
    };
    let (before, after) = (spent(false), spent(true));
    assert!(before > 0 && after > 0, "charges on both sides of the anchor: {before} before, {after} after");
    assert_eq!(before + after, charged, "every charge is in the history once");
    let credits =
        http::send("GET", &format!("{}/v1/credits", a.public), &[("authorization", &format!("Bearer {key}"))], "")
            .await
            .json();
    assert_eq!(credits["monthly_remaining"], 10_000 - after, "the renewal reset the bucket once: {credits}");
    assert_eq!(
        credits["renews_at"],
        creditgate::calendar::rfc3339(creditgate::calendar::Anchor::from_unix(anchor).period_start(1))
    );

    // No notifier is configured, so the events wait in the outbox: one renewal event.
    let outbox = redis.command(&["LRANGE", "cg:{acct:skew}:outbox", "0", "-1"]);
    let renewed = outbox.lines().filter(|e| e.contains("\"credits.renewed\"")).count();
    assert_eq!(renewed, 1, "one credits.renewed event: {outbox}");
}

/// A refund decided while Redis is down lives only in its instance's memory until the store
/// answers again (README: "Only while the store takes nothing at all"). Once Redis is back it
/// must reach the store soon — not after a retry backoff grown during the outage (it reached
/// 6.4 s, then 12.8 s, up to 30 s), during which a SIGKILL of that instance lost the refund of a
/// failed call whose answer had said `x-credits-charged: 0`.
#[tokio::test]
async fn a_refund_decided_during_an_outage_reaches_the_store_soon_after_it_returns() {
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let (_up, _config, mut a, _key, sent) = failing_chat_under_way(&redis).await;
    // Charged (5 of 50, on disk); Redis dies before the backend's 500 arrives.
    redis.kill();
    let res = sent.await.unwrap();
    assert_eq!((res.status.as_u16(), res.header("x-credits-refund")), (500, Some("pending")));
    assert_eq!(res.charged(), 0);
    // A long outage, then Redis returns; a little later the instance holding the refund dies.
    tokio::time::sleep(Duration::from_secs(7)).await;
    redis.relaunch();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    a.kill();
    assert_eq!(
        redis.command(&["EVAL", state::GET, "1", "cg:{acct:acme}", state::MONTHLY]).trim(),
        "50",
        "refunded before the kill"
    );
    assert_eq!(pending_refunds(&redis), 0);
}

/// A transcription the account cannot pay for is queued. When the replies of that queueing step
/// are lost (the step ran; the connection broke, and again for the re-send on a fresh one), the
/// request is answered 503 `store_unavailable` — and its job must not sit in the queue and run,
/// paid, after the next top-up: work and a charge the client was told did not happen. Found by
/// `tests/chaos.rs` (a stall does the same: the step lands after `store.max_wait_ms`). Either
/// answer is fine — 202 with the job, or 503 and no job ever runs — but not 503 and a paid run:
/// the gateway withdraws a job of unknown fate as soon as the store answers (`job_withdraw.lua`,
/// as a charge of unknown fate is refunded), leaving a record so a step landing late queues
/// nothing.
#[tokio::test]
async fn a_lost_reply_of_the_queueing_step_is_not_answered_503_while_the_job_runs_paid() {
    let redis = RedisServer::start();
    let proxy = support::faultproxy::FaultProxy::start(format!("127.0.0.1:{}", redis.port()).parse().unwrap()).await;
    let up = Upstream::echo().await;
    let store = format!("kind = \"redis\"\nurl = \"redis://{}\"", proxy.addr());
    let gw = TestGateway::start(&ConfigBuilder::new(&up.url()).store(&store).build()).await;
    let key = gw.account_with_key("acme", "fifty").await;
    support::gateway::spend(&gw, &key, 50).await;
    // The reply of the queueing step (it answers "queued") is lost after the step ran, and that
    // of its re-send on a fresh connection too.
    proxy.drop_replies_with(b"queued", 2);
    let res = gw.post(&key, TRANSCRIBE, &[], r#"{"call_id":"c1"}"#).await;
    if res.status == 503 {
        // The job the step queued unseen is withdrawn as soon as the store answers again.
        let withdrawn = || {
            let keys = redis.command(&["KEYS", "cg:{acct:acme}:job:*"]);
            keys.lines().any(|k| redis.command(&["HGET", k, "status"]) == "withdrawn")
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !withdrawn() {
            assert!(std::time::Instant::now() < deadline, "the job of unknown fate was not withdrawn within 10 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // The store is marked down for a moment after the broken connections.
    let mut topup = gw.topup("acme", 10, "p1").await;
    for _ in 0..100 {
        if topup.status == 201 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        topup = gw.topup("acme", 10, "p1").await;
    }
    assert_eq!(topup.status, 201, "{}", topup.text());
    match res.status.as_u16() {
        202 => {
            let job = res.json()["job_id"].as_str().expect("a job id").to_owned();
            let done = wait_done(&gw.public, &key, &format!("/v1/jobs/{job}"), 100).await;
            assert_eq!(done["status"], "done", "{done}");
            assert_eq!(up.requests().iter().filter(|r| r.path == TRANSCRIBE).count(), 1, "the job ran once");
            assert_eq!(gw.remaining(&key).await, 8, "and was paid once");
        }
        503 => {
            // The top-up wakes the job runner at once; give it time to run anything queued.
            tokio::time::sleep(Duration::from_secs(3)).await;
            assert_eq!(up.requests().iter().filter(|r| r.path == TRANSCRIBE).count(), 0, "a 503 ran nothing");
            assert_eq!(gw.remaining(&key).await, 10, "and charged nothing");
        }
        other => panic!("unexpected {other}: {}", res.text()),
    }
}

/// A client that hangs up while its request is being queued never learns of the job: the job is
/// withdrawn, and the next top-up runs nothing and charges nothing.
#[tokio::test]
async fn a_hang_up_while_the_request_is_queued_withdraws_the_job() {
    let run = support::faultproxy::LeftWhileQueueing::run(&[], r#"{"call_id":"c1"}"#).await;
    let (gw, up, key) = (&run.gw, &run.up, &run.key);
    assert_eq!(gw.topup("acme", 10, "p1").await.status, 201);
    // The top-up wakes the job runner at once; give it time to run anything queued.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(up.requests().iter().filter(|r| r.path == TRANSCRIBE).count(), 0, "the withdrawn job ran");
    assert_eq!(gw.remaining(key).await, 10, "and charged nothing");
}

/// A job attempt whose charge id was refunded before the runner took it (its refund landed, the
/// attempt's end was never recorded) runs under a new attempt: charged once, sent once — never
/// answered "charged" under the refunded id and run for free.
#[tokio::test]
async fn a_job_attempt_refunded_before_it_was_charged_runs_paid_under_a_new_attempt() {
    use creditgate::ledger::{Ledger, RefundOutcome, redis::RedisLedger};
    let redis = RedisServer::start();
    let up = Upstream::echo().await;
    let config = ConfigBuilder::new(&up.url()).store(&redis_store(&redis)).build();
    let gw = GatewayProcess::start(&config).await;
    let key = new_account(&gw.admin, "refunded-attempt").await;
    exhaust_via(&gw.public, &key, 50).await;
    let res = post(&gw.public, &key, TRANSCRIBE, r#"{"call_id":"r1"}"#).await;
    assert_eq!(res.status, 202, "{}", res.text());
    let (job_id, location) =
        (res.json()["job_id"].as_str().unwrap().to_owned(), res.header("location").unwrap().to_owned());
    // The first attempt's charge id, refunded before anything was charged under it.
    let ledger = RedisLedger::connect_standalone(&redis.url()).await.unwrap();
    let refund = ledger.refund("refunded-attempt", &format!("job-{job_id}-0")).await.unwrap();
    assert_eq!(refund, RefundOutcome::UnknownCharge, "a tombstone now stands for attempt 0");

    let res = admin(
        &gw.admin,
        "POST",
        "/admin/v1/accounts/refunded-attempt/topups",
        Some(json!({"credits": 10, "payment_ref": "p1"})),
    )
    .await;
    assert_eq!(res.status, 201);
    let job = wait_done(&gw.public, &key, &location, 200).await;
    assert_eq!(job["status"], "done", "{job}");
    assert_eq!(job["attempts"], 1, "attempt 0 counts as failed (refunded); attempt 1 ran: {job}");
    assert_eq!(remaining_via(&gw.public, &key).await, 8, "charged once, under the new attempt");
    assert_eq!(up.requests().iter().filter(|r| r.path == TRANSCRIBE).count(), 1, "sent once");
}

/// A key whose account was removed from the store behind the gateway's key cache is 401
/// `unauthorized` on every route that reads the account — never a 500, never forwarded.
#[tokio::test]
async fn a_key_whose_account_is_gone_is_401_on_every_route() {
    let redis = RedisServer::start();
    let up = Upstream::echo().await;
    let config = ConfigBuilder::new(&up.url()).store(&redis_store(&redis)).build();
    let gw = GatewayProcess::start(&config).await;
    let key = new_account(&gw.admin, "gone").await;
    assert_eq!(chat(&gw.public, &key).await.status, 200, "the key is cached now");
    assert_eq!(redis.command(&["DEL", &creditgate::ledger::keys::account("gone")]).trim(), "1");
    let sent_before = up.count();
    let auth = format!("Bearer {key}");
    let calls = [
        ("POST", CHAT, "{}"),
        ("POST", TRANSCRIBE, r#"{"call_id":"g1"}"#),
        ("GET", "/v1/credits", ""),
        ("GET", "/v1/credits/usage", ""),
        ("PUT", "/v1/credits/auto-topup", r#"{"enabled":false}"#),
    ];
    for (method, path, body) in calls {
        let headers = [("authorization", auth.as_str()), ("content-type", "application/json"), ("x-ai-tier", "fast")];
        let res = http::send(method, &format!("{}{path}", gw.public), &headers, body).await;
        assert_eq!(res.status, 401, "{method} {path}: {}", res.text());
        assert_eq!(res.error_type(), "unauthorized", "{method} {path}");
    }
    assert_eq!(up.count(), sent_before, "nothing reached the backend");
}
