//! Out of credits: "no credits" answers, the transcription queue, the jobs API and replay on
//! top-up and renewal (SPEC §4), on the embedded store. The same flows on Redis are in
//! `tests/redis_gateway.rs`.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::gateway::{ConfigBuilder, TestGateway};
use support::upstream::{Behaviour, Upstream};

const TRANSCRIBE: &str = "/v1/calls/transcribe";

/// Polls `GET /v1/jobs/{id}` until the job leaves `queued`/`running` (bounded).
async fn wait_job(gw: &TestGateway, key: &str, location: &str) -> Value {
    for _ in 0..200 {
        let res = gw.call(key, "GET", location, &[], "").await;
        assert_eq!(res.status, 200, "{location}: {}", res.text());
        let v = res.json();
        if v["status"] != "queued" && v["status"] != "running" {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("job {location} did not finish");
}

/// Spends an account's whole balance with fast chats (1 credit each).
async fn exhaust(gw: &TestGateway, key: &str) {
    let n = gw.remaining(key).await;
    for _ in 0..n {
        let res = gw.post(key, "/v1/chat/completions", &[("x-ai-tier", "fast")], "{}").await;
        assert_eq!(res.status, 200);
    }
    assert_eq!(gw.remaining(key).await, 0);
}

#[tokio::test]
async fn queued_transcriptions_run_in_order_after_a_topup() {
    let up = Upstream::echo().await;
    let gw = TestGateway::with_upstream(&up.url()).await;
    let key = gw.account_with_key("acme", "fifty").await;
    exhaust(&gw, &key).await;
    let calls_before = up.count();

    let mut locations = Vec::new();
    for i in 0..3 {
        let body = format!(r#"{{"call_id":"call-{i}","audio_url":"https://example.test/{i}.wav"}}"#);
        let res = gw.post(&key, TRANSCRIBE, &[("content-type", "application/json")], &body).await;
        assert_eq!(res.status, 202, "{}", res.text());
        let v = res.json();
        assert_eq!(v["status"], "queued");
        let job_id = v["job_id"].as_str().unwrap().to_owned();
        let location = res.header("location").unwrap().to_owned();
        assert_eq!(location, format!("/v1/jobs/{job_id}"));
        locations.push(location);
    }
    // Nothing ran, nothing was charged.
    assert_eq!(up.count(), calls_before);
    let acct = gw.admin_call("GET", "/admin/v1/accounts/acme", None).await.json();
    assert_eq!(acct["queue_depth"], 3);
    let job = gw.call(&key, "GET", &locations[0], &[], "").await.json();
    assert_eq!(job["status"], "queued");

    // AI features answer "no credits" with the SPEC fields; free routes keep working.
    let chat = gw.post(&key, "/v1/chat/completions", &[], "{}").await;
    assert_eq!(chat.status, 402);
    let err = &chat.json()["error"];
    assert_eq!(err["type"], "no_credits");
    assert!(err["renews_at"].is_string());
    assert!(err["message"].as_str().unwrap().starts_with("You're out of AI credits. They renew on "));
    assert_eq!(gw.call(&key, "GET", "/v1/deals", &[], "").await.status, 200);

    // A top-up wakes the runner: all three run once, oldest first, 2 credits each.
    assert_eq!(gw.topup("acme", 10, "pay-1").await.status, 201);
    for loc in &locations {
        let job = wait_job(&gw, &key, loc).await;
        assert_eq!(job["status"], "done", "{job}");
        assert_eq!(job["cost"], 2);
        assert_eq!(job["result"]["status"], 200);
        assert_eq!(job["result"]["body"]["path"], TRANSCRIBE);
    }
    let ran: Vec<_> = up.requests().into_iter().skip(calls_before).filter(|r| r.path == TRANSCRIBE).collect();
    assert_eq!(ran.len(), 3, "each job ran exactly once");
    for (i, r) in ran.iter().enumerate() {
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["call_id"], format!("call-{i}"), "oldest first, body forwarded unchanged");
        assert!(r.header("authorization").is_some_and(|a| !a.contains("cg_")), "client key never forwarded");
        assert_eq!(r.header("x-creditgate-account"), Some("acme"));
    }
    assert_eq!(gw.remaining(&key).await, 4, "10 top-up credits − 3 × 2");
    let acct = gw.admin_call("GET", "/admin/v1/accounts/acme", None).await.json();
    assert_eq!(acct["queue_depth"], 0);
}

#[tokio::test]
async fn insufficient_credits_also_queue_and_other_accounts_cannot_see_the_job() {
    let up = Upstream::echo().await;
    let gw = TestGateway::with_upstream(&up.url()).await;
    let key = gw.account_with_key("acme", "fifty").await;
    let other = gw.account_with_key("globex", "fifty").await;
    exhaust(&gw, &key).await;
    assert_eq!(gw.topup("acme", 1, "pay-1").await.status, 201); // 1 < cost 2
    let res = gw.post(&key, TRANSCRIBE, &[], r#"{"call_id":"x"}"#).await;
    assert_eq!(res.status, 202, "{}", res.text());
    let location = res.header("location").unwrap().to_owned();
    let theirs = gw.call(&other, "GET", &location, &[], "").await;
    assert_eq!(theirs.status, 404);
    assert_eq!(theirs.error_type(), "not_found");
    assert_eq!(gw.call(&key, "GET", "/v1/jobs/job_doesnotexist", &[], "").await.status, 404);
    // Still queued: 1 credit does not pay for it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(gw.call(&key, "GET", &location, &[], "").await.json()["status"], "queued");
    assert_eq!(gw.remaining(&key).await, 1);
    assert_eq!(gw.topup("acme", 1, "pay-2").await.status, 201);
    let job = wait_job(&gw, &key, &location).await;
    assert_eq!(job["status"], "done");
    assert_eq!(gw.remaining(&key).await, 0);
}

#[tokio::test]
async fn the_queue_has_a_per_account_cap() {
    let up = Upstream::echo().await;
    let gw =
        TestGateway::start(&ConfigBuilder::new(&up.url()).extra("[jobs]\nmax_queued_per_account = 2").build()).await;
    let key = gw.account_with_key("acme", "fifty").await;
    exhaust(&gw, &key).await;
    for _ in 0..2 {
        assert_eq!(gw.post(&key, TRANSCRIBE, &[], "{}").await.status, 202);
    }
    let res = gw.post(&key, TRANSCRIBE, &[], "{}").await;
    assert_eq!(res.status, 429, "{}", res.text());
    assert_eq!(res.error_type(), "rate_limited");
    assert!(res.header("retry-after").is_some());
    assert_eq!(res.json()["error"]["queue_limit"], 2);
}

#[tokio::test]
async fn a_failing_upstream_refunds_and_retries_then_fails() {
    let up = Upstream::echo().await;
    let config = ConfigBuilder::new(&up.url()).extra("[jobs]\nmax_attempts = 2\nretry_base_ms = 100").build();
    let gw = TestGateway::start(&config).await;
    let key = gw.account_with_key("acme", "fifty").await;
    exhaust(&gw, &key).await;
    up.set(Behaviour::Status(503));
    let calls_before = up.count();
    let res = gw.post(&key, TRANSCRIBE, &[], "{}").await;
    assert_eq!(res.status, 202);
    let location = res.header("location").unwrap().to_owned();
    assert_eq!(gw.topup("acme", 2, "pay-1").await.status, 201);
    let job = wait_job(&gw, &key, &location).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["attempts"], 2);
    assert!(job["error"].as_str().unwrap().contains("503"));
    assert_eq!(up.count() - calls_before, 2, "two attempts");
    assert_eq!(gw.remaining(&key).await, 2, "every failed attempt refunded");
}

#[tokio::test]
async fn a_renewal_drains_the_queue() {
    let up = Upstream::echo().await;
    let gw = TestGateway::with_upstream(&up.url()).await;
    // Anchor 2 s ahead: the current period ends (and the account renews) in 2 s.
    let anchor = creditgate::calendar::rfc3339(creditgate::calendar::now() + 2);
    let res = gw
        .admin_call(
            "POST",
            "/admin/v1/accounts",
            Some(json!({"id": "acme", "plan": "fifty", "billing_anchor": anchor})),
        )
        .await;
    assert_eq!(res.status, 201, "{}", res.text());
    let key = gw.create_key("acme", "user").await;
    exhaust(&gw, &key).await;
    let res = gw.post(&key, TRANSCRIBE, &[], "{}").await;
    assert_eq!(res.status, 202);
    let location = res.header("location").unwrap().to_owned();
    let job = wait_job(&gw, &key, &location).await;
    assert_eq!(job["status"], "done", "{job}");
    let credits = gw.credits(&key).await;
    assert_eq!(credits["monthly_remaining"], 48, "renewed to 50, then the job took 2");
}

#[tokio::test]
async fn a_repeated_idempotency_key_queues_one_job_and_pays_once() {
    let up = Upstream::echo().await;
    let gw = TestGateway::with_upstream(&up.url()).await;
    let key = gw.account_with_key("acme", "fifty").await;
    exhaust(&gw, &key).await;
    let headers = [("idempotency-key", "call-77")];
    let first = gw.post(&key, TRANSCRIBE, &headers, r#"{"call_id":"77"}"#).await;
    let second = gw.post(&key, TRANSCRIBE, &headers, r#"{"call_id":"77"}"#).await;
    assert_eq!((first.status.as_u16(), second.status.as_u16()), (202, 202));
    assert_eq!(first.json()["job_id"], second.json()["job_id"], "one job for one key");
    assert_eq!(gw.admin_call("GET", "/admin/v1/accounts/acme", None).await.json()["queue_depth"], 1);
    assert_eq!(gw.topup("acme", 10, "pay-1").await.status, 201);
    let job = wait_job(&gw, &key, first.header("location").unwrap()).await;
    assert_eq!(job["status"], "done");
    assert_eq!(gw.remaining(&key).await, 8, "charged once: 2 credits");
    assert_eq!(up.requests().iter().filter(|r| r.path == TRANSCRIBE).count(), 1);
}

/// Sums the samples of `name` in `/metrics` text whose labels include `label` (e.g.
/// `category="Transcription"`); 0 when there are none.
fn metric_sum(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn job_charges_are_counted_and_job_ids_are_random_and_per_account() {
    let up = Upstream::echo().await;
    let gw = TestGateway::with_upstream(&up.url()).await;
    let metrics = || async { support::http::send("GET", &format!("{}/metrics", gw.admin), &[], "").await.text() };
    let keys = [gw.account_with_key("acme", "fifty").await, gw.account_with_key("beta", "fifty").await];
    let mut ids = Vec::new();
    for key in &keys {
        exhaust(&gw, key).await;
        // The same Idempotency-Key on two accounts: two jobs, neither id derived from the key.
        let res = gw.post(key, TRANSCRIBE, &[("idempotency-key", "same-key")], r#"{"call_id":"1"}"#).await;
        assert_eq!(res.status, 202, "{}", res.text());
        let id = res.json()["job_id"].as_str().unwrap().to_owned();
        let suffix = id.strip_prefix("job_").unwrap_or_else(|| panic!("job id {id} starts with job_"));
        assert!(suffix.len() == 20 && suffix.chars().all(|c| c.is_ascii_alphanumeric()), "job id {id}");
        assert!(!id.contains("same-key"));
        ids.push((key.clone(), res.header("location").unwrap().to_owned(), id));
    }
    assert_ne!(ids[0].2, ids[1].2, "one job per account, each with its own id");
    let text = metrics().await;
    assert_eq!(metric_sum(&text, "creditgate_credits_charged_total", "category=\"Transcription\""), 0.0, "{text}");
    assert_eq!(
        metric_sum(&text, "creditgate_payment_required_total", "operation=\"call_transcription\""),
        0.0,
        "a queued request is answered 202, not 402: {text}"
    );

    for (account, (key, location, _)) in ["acme", "beta"].iter().zip(&ids) {
        assert_eq!(gw.topup(account, 10, &format!("pay-{account}")).await.status, 201);
        assert_eq!(wait_job(&gw, key, location).await["status"], "done");
        assert_eq!(gw.remaining(key).await, 8, "{account}: the job charged 2");
        // The other account's job is not found under this key.
        let other = if location == &ids[0].1 { &ids[1].1 } else { &ids[0].1 };
        assert_eq!(gw.call(key, "GET", other, &[], "").await.status, 404);
    }
    let text = metrics().await;
    assert_eq!(
        metric_sum(&text, "creditgate_credits_charged_total", "category=\"Transcription\""),
        4.0,
        "the runner's charges are counted like a request's: {text}"
    );
}
