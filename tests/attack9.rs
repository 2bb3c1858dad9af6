//! attack9: hostile clients on the idempotency and job-queue paths. Each test here failed on
//! main when written.

mod support;

use std::time::Duration;

use support::gateway::{ConfigBuilder, TestGateway};
use support::http;
use support::redis::RedisServer;
use support::stores::{Env, Store};
use support::upstream::Upstream;

const SCORE: &str = "/v1/leads/score";
const TRANSCRIBE: &str = "/v1/calls/transcribe";

/// A system key's automatic refresh with an `Idempotency-Key`, retried by the client (a lost
/// answer), must run once and be charged at most once. The free path (cost 0) never looks at the
/// key: every retry reaches the backend again and eats the period's free allowance, and once
/// the allowance is gone the same retry is charged in full.
async fn a_retried_free_automatic_refresh_is_replayed_not_rerun_or_charged(store: Store) {
    let env = Env::with(store, |b| b).await;
    let config =
        env.config.replace("automatic_free = true", "automatic_free = true\nautomatic_free_max_per_period = 2");
    assert_ne!(config, env.config, "the shipped config changed shape");
    drop(env.gw);
    let gw = TestGateway::start(&config).await;
    gw.create_account("acme", "big").await;
    let system = gw.create_key("acme", "system").await;
    let headers = [("x-trigger", "automatic"), ("idempotency-key", "refresh-1")];
    let body = r#"{"leads":[1,2,3]}"#;
    let first = gw.post(&system, SCORE, &headers, body).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let before = gw.remaining(&system).await;
    let mut charged = Vec::new();
    for _ in 0..3 {
        let again = gw.post(&system, SCORE, &headers, body).await;
        assert_eq!(again.status, 200, "{}", again.text());
        charged.push(again.header("x-credits-charged").map(str::to_owned));
    }
    let after = gw.remaining(&system).await;
    let runs = env.up.requests().iter().filter(|r| r.path == SCORE).count();
    let auth = format!("Bearer {system}");
    let usage = http::send("GET", &gw.url("/v1/credits/usage"), &[("authorization", &auth)], "").await.json();
    assert_eq!(
        (runs, before - after, usage["free_automatic"]["lead_scoring_refresh"].as_u64()),
        (1, 0, Some(1)),
        "3 retries of one keyed refresh: backend runs, credits charged, allowance used \
         (x-credits-charged of the retries: {charged:?})"
    );
}

on_both_stores!(a_retried_free_automatic_refresh_is_replayed_not_rerun_or_charged,);

/// A client that hangs up while its keyed request is being queued never learns of the job, which
/// is withdrawn (it never runs). Its retry under the same `Idempotency-Key` must get the work
/// done (queued again, or run) — not the replayed 202 of the withdrawn job, which the queueing
/// step stored with the key in the same step: the client is told "queued" for a job that will
/// never run, for 24 h, whatever it pays in.
#[tokio::test]
async fn a_retry_of_a_withdrawn_keyed_queueing_is_not_the_dead_jobs_202() {
    let redis = RedisServer::start();
    let proxy = support::faultproxy::FaultProxy::start(format!("127.0.0.1:{}", redis.port()).parse().unwrap()).await;
    let up = Upstream::echo().await;
    let store = format!("kind = \"redis\"\nurl = \"redis://{}\"", proxy.addr());
    let gw = TestGateway::start(&ConfigBuilder::new(&up.url()).store(&store).build()).await;
    let key = gw.account_with_key("acme", "fifty").await;
    support::gateway::spend(&gw, &key, 50).await;
    proxy.delay_reply_with(b"queued", Duration::from_millis(800));
    let (url, auth) = (gw.url(TRANSCRIBE), format!("Bearer {key}"));
    let client = {
        let (url, auth) = (url.clone(), auth.clone());
        tokio::spawn(async move {
            let h = [("authorization", auth.as_str()), ("idempotency-key", "call-7")];
            http::send("POST", &url, &h, r#"{"call_id":"c7"}"#).await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!client.is_finished(), "the queueing step was not held back");
    client.abort();
    let _ = client.await;
    let withdrawn = || {
        let keys = redis.command(&["KEYS", "cg:{acct:acme}:job:*"]);
        keys.lines().any(|k| redis.command(&["HGET", k, "status"]) == "withdrawn")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !withdrawn() {
        assert!(std::time::Instant::now() < deadline, "the job nobody was told of was not withdrawn");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(900)).await;
    // The client retries with the same key (it never got an answer).
    let h = [("authorization", auth.as_str()), ("idempotency-key", "call-7")];
    let retry = http::send("POST", &url, &h, r#"{"call_id":"c7"}"#).await;
    assert_eq!(gw.topup("acme", 10, "p1").await.status, 201);
    let mut job_status = String::new();
    if retry.status == 202 {
        let job_id = retry.json()["job_id"].as_str().unwrap_or_default().to_owned();
        for _ in 0..60 {
            let res = http::send("GET", &gw.url(&format!("/v1/jobs/{job_id}")), &[("authorization", &auth)], "").await;
            job_status = res.json()["status"].as_str().unwrap_or_default().to_owned();
            if job_status == "done" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let runs = up.requests().iter().filter(|r| r.path == TRANSCRIBE).count();
    assert_eq!(
        (runs, gw.remaining(&key).await),
        (1, 8),
        "the retry got {} {} (replay: {:?}); its job is {job_status:?}: the work never runs",
        retry.status,
        retry.text(),
        retry.header("x-idempotent-replay")
    );
}
