//! attack9: hostile clients on the idempotency and job-queue paths. Each test here failed on
//! main when written.

mod support;

use std::time::Duration;

use support::gateway::TestGateway;
use support::http;
use support::stores::{Env, Store};

const SCORE: &str = "/v1/leads/score";

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
