//! Idempotency-Key repeats a hostile (or merely retrying) client tried on the free-refresh and
//! job-queue paths (an attacker's review); each test failed before its fix: a retried free
//! automatic refresh is replayed (never re-run, re-counted or charged), and the retry of a keyed
//! request whose queueing was withdrawn queues afresh instead of replaying a dead job's 202.

mod support;

use std::time::Duration;

use support::http;
use support::stores::{Env, Store};

const SCORE: &str = "/v1/leads/score";
const TRANSCRIBE: &str = "/v1/calls/transcribe";

/// A system key's automatic refresh with an `Idempotency-Key`, retried by the client (a lost
/// answer), must run once and be charged at most once. The free path (cost 0) never looks at the
/// key: every retry reaches the backend again and eats the period's free allowance, and once
/// the allowance is gone the same retry is charged in full.
async fn a_retried_free_automatic_refresh_is_replayed_not_rerun_or_charged(store: Store) {
    let mut env = Env::start(store).await;
    env.restart_with("automatic_free = true", "automatic_free = true\nautomatic_free_max_per_period = 2").await;
    let gw = &env.gw;
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
    let run =
        support::faultproxy::LeftWhileQueueing::run(&[("idempotency-key", "call-7")], r#"{"call_id":"c7"}"#).await;
    let (gw, up, key) = (&run.gw, &run.up, &run.key);
    let (url, auth) = (gw.url(TRANSCRIBE), format!("Bearer {key}"));
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
        (runs, gw.remaining(key).await),
        (1, 8),
        "the retry got {} {} (replay: {:?}); its job is {job_status:?}: the work never runs",
        retry.status,
        retry.text(),
        retry.header("x-idempotent-replay")
    );
}
