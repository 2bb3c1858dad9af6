//! Accounts and money movements over the real admin and customer APIs (issue 4): the admin
//! token, one account's key never seeing another's, accounts and billing anchors, plan changes
//! and renewals, API keys, top-ups, auto top-up, and the ledger history — which must sum exactly
//! to the balances after random traffic.
//!
//! Every behaviour runs on the embedded store and on a real `redis-server` started for the test
//! (`memory::…` and `redis::…`); tests about several gateway instances run on Redis only.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::gateway::{ADMIN_TOKEN, TestGateway, leads, spend};
use support::http::{self, Response};
use support::stores::{Env, Store};
use support::upstream::Behaviour;

const CHAT: &str = "/v1/chat/completions";
const ENRICH: &str = "/v1/leads/enrich";
const TRANSCRIBE: &str = "/v1/calls/transcribe";

// === fixtures ===

on_both_stores!(
    admin_routes_refuse_every_other_credential,
    a_key_reads_only_its_own_account,
    accounts_with_past_and_future_anchors,
    account_creation_errors,
    reading_an_account_shows_every_field,
    upgrade_grows_the_monthly_bucket_at_once,
    downgrade_waits_for_renewal_which_resets_monthly_and_keeps_topups,
    keys_are_listed_without_secrets_and_revoked_at_once,
    topups_by_package_and_credits_credit_each_payment_ref_once,
    customers_read_topups_but_cannot_create_them,
    auto_topup_is_set_by_admin_and_customer,
    auto_topup_buys_one_package_per_crossing,
    auto_topup_is_capped_per_period,
    auto_topup_enabled_below_the_threshold_buys_on_the_next_charge,
    absurd_amounts_are_bad_requests,
    history_pages_newest_first,
    history_sums_to_the_balances_after_random_traffic,
);

/// `POST /admin/v1/accounts` with `body`; panics unless 201.
async fn create(gw: &TestGateway, body: Value) -> Value {
    let res = gw.admin_call("POST", "/admin/v1/accounts", Some(body.clone())).await;
    assert_eq!(res.status, 201, "create {body}: {}", res.text());
    res.json()
}

/// `GET /admin/v1/accounts/{id}`; panics unless 200.
async fn account(gw: &TestGateway, id: &str) -> Value {
    let res = gw.admin_call("GET", &format!("/admin/v1/accounts/{id}"), None).await;
    assert_eq!(res.status, 200, "read {id}: {}", res.text());
    res.json()
}

/// Every history entry of an account, newest first, following `next_before` (bounded).
async fn history(gw: &TestGateway, id: &str) -> Vec<Value> {
    let mut all = Vec::new();
    let mut before: Option<u64> = None;
    for _ in 0..1000 {
        let path = match before {
            Some(b) => format!("/admin/v1/accounts/{id}/ledger?limit=200&before={b}"),
            None => format!("/admin/v1/accounts/{id}/ledger?limit=200"),
        };
        let res = gw.admin_call("GET", &path, None).await;
        assert_eq!(res.status, 200, "{path}: {}", res.text());
        let page = res.json();
        all.extend(page["entries"].as_array().expect("entries").iter().cloned());
        match page["next_before"].as_u64() {
            Some(b) => before = Some(b),
            None => return all,
        }
    }
    panic!("history of {id} did not end after 1000 pages");
}

/// History entries of `kind`, newest first.
async fn entries(gw: &TestGateway, id: &str, kind: &str) -> Vec<Value> {
    history(gw, id).await.into_iter().filter(|e| e["kind"] == kind).collect()
}

/// Polls `GET /admin/v1/accounts/{id}` until `done` holds (at most ~10 s); returns it.
async fn wait_account(gw: &TestGateway, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = account(gw, id).await;
        if done(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{id}: {what} not reached within 10 s: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn now() -> i64 {
    creditgate::calendar::now()
}

fn ts(v: &Value) -> i64 {
    let s = v.as_str().unwrap_or_else(|| panic!("not a time string: {v}"));
    creditgate::calendar::parse_rfc3339(s).unwrap_or_else(|| panic!("not RFC 3339: {s}"))
}

/// (year, month, day, seconds of day) of an RFC 3339 UTC time.
fn civil(v: &Value) -> (i64, i64, i64, i64) {
    let t = ts(v);
    let (y, m, d) = creditgate::calendar::civil_from_days(t.div_euclid(86_400));
    (y, m, d, t.rem_euclid(86_400))
}

/// Months from (y1, m1) to (y2, m2).
fn months_between(a: (i64, i64), b: (i64, i64)) -> i64 {
    (b.0 * 12 + b.1) - (a.0 * 12 + a.1)
}

/// Sleeps until Unix time `t` has passed by a small margin (bounded: at most 10 s).
async fn sleep_past(t: i64) {
    let wait = (t - now() + 1).clamp(0, 10) as u64;
    tokio::time::sleep(Duration::from_millis(wait * 1000 + 300)).await;
}

/// `n` copies of `task(i)` at once, on the runtime's threads.
async fn concurrently<T, F>(n: usize, task: impl Fn(usize) -> F) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = (0..n).map(|i| tokio::spawn(task(i))).collect();
    let mut out = Vec::with_capacity(n);
    for h in handles {
        out.push(h.await.expect("task panicked"));
    }
    out
}

// === authorization ===

async fn admin_routes_refuse_every_other_credential(store: Store) {
    let env = Env::start(store).await;
    let gw = &env.gw;
    let api_key = gw.account_with_key("acme", "pro").await;
    let key_id = gw.admin_call("GET", "/admin/v1/accounts/acme/keys", None).await.json()["keys"][0]["key_id"]
        .as_str()
        .expect("key id")
        .to_owned();
    let routes: Vec<(&str, String, Option<Value>)> = vec![
        ("POST", "/admin/v1/accounts".into(), Some(json!({"id": "intruder", "plan": "pro"}))),
        ("GET", "/admin/v1/accounts/acme".into(), None),
        ("PATCH", "/admin/v1/accounts/acme".into(), Some(json!({"plan": "enterprise"}))),
        ("POST", "/admin/v1/accounts/acme/keys".into(), Some(json!({"role": "system"}))),
        ("GET", "/admin/v1/accounts/acme/keys".into(), None),
        ("DELETE", format!("/admin/v1/keys/{key_id}"), None),
        ("POST", "/admin/v1/accounts/acme/topups".into(), Some(json!({"credits": 5000, "payment_ref": "free-money"}))),
        ("GET", "/admin/v1/accounts/acme/topups".into(), None),
        ("PUT", "/admin/v1/accounts/acme/auto-topup".into(), Some(json!({"enabled": false}))),
        ("GET", "/admin/v1/accounts/acme/ledger".into(), None),
        ("GET", "/admin/v1/accounts/acme/usage".into(), None),
    ];
    let api_auth = format!("Bearer {api_key}");
    let wrong = format!("Bearer {ADMIN_TOKEN}x");
    let prefix = format!("Bearer {}", &ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1]);
    let credentials: [(&str, Option<&str>); 6] = [
        ("no token", None),
        ("wrong token", Some(wrong.as_str())),
        ("a prefix of the token", Some(prefix.as_str())),
        ("the token without Bearer", Some(ADMIN_TOKEN)),
        ("a customer API key", Some(api_auth.as_str())),
        ("an empty bearer", Some("Bearer ")),
    ];
    for (method, path, body) in &routes {
        for (what, auth) in credentials {
            let mut headers = vec![("content-type", "application/json")];
            if let Some(a) = auth {
                headers.push(("authorization", a));
            }
            let body = body.as_ref().map(Value::to_string).unwrap_or_default();
            let res = http::send(method, &format!("{}{path}", gw.admin), &headers, body).await;
            assert_eq!(res.status, 401, "{method} {path} with {what}: {}", res.text());
            assert_eq!(res.error_type(), "unauthorized", "{method} {path} with {what}");
        }
    }
    // Nothing above changed anything.
    let v = account(gw, "acme").await;
    assert_eq!((v["plan"].as_str(), v["topup_remaining"].as_u64()), (Some("pro"), Some(0)), "{v}");
    assert_eq!(gw.admin_call("GET", "/admin/v1/accounts/intruder", None).await.status, 404);
    assert_eq!(gw.remaining(&api_key).await, 2000, "the key was not revoked");
    let keys = gw.admin_call("GET", "/admin/v1/accounts/acme/keys", None).await.json();
    assert_eq!(keys["keys"].as_array().unwrap().len(), 1, "no key was created: {keys}");

    // The admin token is no API key on the public listener: neither the customer API nor a
    // metered route accepts it, and the upstream never sees the request.
    let admin_auth = format!("Bearer {ADMIN_TOKEN}");
    for (method, path) in [("GET", "/v1/credits"), ("GET", "/v1/credits/usage"), ("POST", CHAT), ("POST", "/v1/deals")]
    {
        let res = http::send(method, &gw.url(path), &[("authorization", &admin_auth)], "{}").await;
        assert_eq!(res.status, 401, "{method} {path} with the admin token: {}", res.text());
        assert_eq!(res.error_type(), "unauthorized");
    }
    assert_eq!(env.up.count(), 0, "nothing reached the upstream");
}

async fn a_key_reads_only_its_own_account(store: Store) {
    let env = Env::start(store).await;
    let gw = &env.gw;
    let key_a = gw.account_with_key("alpha", "pro").await;
    let key_b = gw.account_with_key("beta", "fifty").await;
    // A spends 7 on chat; B buys a top-up, spends everything and queues a transcription.
    assert_eq!(gw.post(&key_a, CHAT, &[("x-ai-tier", "powerful")], "{}").await.charged(), 5);
    assert_eq!(gw.post(&key_a, CHAT, &[("x-ai-tier", "fast")], "{}").await.charged(), 1);
    assert_eq!(gw.post(&key_a, "/v1/sentiment", &[], "{}").await.charged(), 1);
    assert_eq!(gw.topup("beta", 10, "beta-pay-1").await.status, 201);
    spend(gw, &key_b, 60).await;
    let res = gw.post(&key_b, TRANSCRIBE, &[], r#"{"audio_url":"http://x/a.mp3"}"#).await;
    assert_eq!(res.status, 202, "{}", res.text());
    let job_b = res.json()["job_id"].as_str().expect("job id").to_owned();

    let a = gw.credits(&key_a).await;
    assert_eq!(a["plan"], "pro");
    assert_eq!(a["allocation"], 2000);
    assert_eq!(a["remaining"], 1993);
    assert_eq!(a["topup_remaining"], 0);
    assert_eq!(a["used_this_period"], 7);
    // Whatever account a client names in the query, the key decides.
    for path in ["/v1/credits?account=beta", "/v1/credits?account_id=beta&id=beta"] {
        let res = gw.call(&key_a, "GET", path, &[], "").await;
        assert_eq!(res.status, 200, "{path}: {}", res.text());
        assert_eq!(res.json(), a, "{path} still shows alpha");
    }
    let usage_a = gw.call(&key_a, "GET", "/v1/credits/usage", &[], "").await.json();
    assert_eq!(usage_a["total"], 7, "{usage_a}");
    assert_eq!(usage_a["by_category"]["Enrichment"], 0, "beta's enrichment is not alpha's: {usage_a}");
    let topups_a = gw.call(&key_a, "GET", "/v1/credits/topups", &[], "").await.json();
    assert_eq!(topups_a["topups"], json!([]), "beta's top-up is not listed for alpha");
    let res = gw.call(&key_a, "GET", &format!("/v1/jobs/{job_b}"), &[], "").await;
    assert_eq!(res.status, 404, "alpha cannot read beta's job: {}", res.text());
    assert_eq!(res.error_type(), "not_found");
    assert!(!res.text().contains("transcri"), "the 404 reveals nothing of the job: {}", res.text());

    let b = gw.credits(&key_b).await;
    assert_eq!((b["plan"].as_str(), b["remaining"].as_u64()), (Some("fifty"), Some(0)), "{b}");
    let res = gw.call(&key_b, "GET", &format!("/v1/jobs/{job_b}"), &[], "").await;
    assert_eq!(res.status, 200, "beta reads its own job: {}", res.text());
    let topups_b = gw.call(&key_b, "GET", "/v1/credits/topups", &[], "").await.json();
    assert_eq!(topups_b["topups"].as_array().map(Vec::len), Some(1), "{topups_b}");
}

// === accounts ===

async fn accounts_with_past_and_future_anchors(store: Store) {
    let env = Env::start(store).await;
    let gw = &env.gw;

    // Anchor years ago: the current period started on the anchor's day and time this month (or
    // last month), and renews one month after it.
    let v = create(gw, json!({"id": "old", "plan": "starter", "billing_anchor": "2021-03-15T10:20:30Z"})).await;
    let (start, renews) = (ts(&v["period_start"]), ts(&v["renews_at"]));
    assert!(start <= now() && now() < renews, "now inside the period: {v}");
    let (sy, sm, sd, ss) = civil(&v["period_start"]);
    let (ry, rm, rd, rs) = civil(&v["renews_at"]);
    assert_eq!((sd, ss, rd, rs), (15, 37_230, 15, 37_230), "day 15 at 10:20:30 UTC: {v}");
    assert_eq!(months_between((sy, sm), (ry, rm)), 1, "a one-month period: {v}");
    assert_eq!((v["monthly_remaining"].as_u64(), v["used_this_period"].as_u64()), (Some(500), Some(0)));

    // Anchor 40 days ahead: the account still has a current period, on the anchor's schedule
    // (same day of month and time), and the anchor itself is one of its renewals.
    let anchor = now() + 40 * 86_400;
    let text = creditgate::calendar::rfc3339(anchor);
    let v = create(gw, json!({"id": "future", "plan": "pro", "billing_anchor": text})).await;
    let (start, renews) = (ts(&v["period_start"]), ts(&v["renews_at"]));
    assert!(start <= now() && now() < renews, "now inside the period: {v}");
    assert!(renews <= anchor, "the first renewal is at or before the anchor: {v}");
    let anchor_civil = civil(&json!(text));
    let (ry, rm, rd, rs) = civil(&v["renews_at"]);
    assert_eq!(rs, anchor_civil.3, "same time of day: {v}");
    let clamped = creditgate::calendar::days_in_month(ry, rm).min(anchor_civil.2);
    assert_eq!(rd, clamped, "same day of month (clamped): {v}");
    assert!(months_between((ry, rm), (anchor_civil.0, anchor_civil.1)) >= 0);
    assert_eq!(v["monthly_remaining"], 2000, "the whole allocation from the start: {v}");

    // A fractional-second and offset anchor is accepted as the same instant in UTC.
    let v = create(gw, json!({"id": "offset", "plan": "pro", "billing_anchor": "2024-06-10T12:00:00.250+02:00"})).await;
    let (_, _, d, s) = civil(&v["renews_at"]);
    assert_eq!((d, s), (10, 10 * 3600), "12:00+02:00 is 10:00 UTC on the 10th: {v}");

    // No anchor: now.
    let before = now();
    let v = create(gw, json!({"id": "plain", "plan": "free"})).await;
    assert!((before..=now()).contains(&ts(&v["period_start"])), "anchor defaults to now: {v}");
}

async fn account_creation_errors(store: Store) {
    let env = Env::start(store).await;
    let gw = &env.gw;
    create(gw, json!({"id": "acme", "plan": "starter"})).await;
    let res = gw.admin_call("POST", "/admin/v1/accounts", Some(json!({"id": "acme", "plan": "pro"}))).await;
    assert_eq!(res.status, 409, "duplicate id: {}", res.text());
    assert!(res.json()["error"]["message"].as_str().unwrap().contains("acme"), "{}", res.text());
    assert_eq!(account(gw, "acme").await["plan"], "starter", "the first account is untouched");

    let long = "a".repeat(65);
    for (body, named) in [
        (json!({"id": "", "plan": "pro"}), "id"),
        (json!({"id": "has space", "plan": "pro"}), "id"),
        (json!({"id": "brace{x}", "plan": "pro"}), "id"),
        (json!({"id": "slash/x", "plan": "pro"}), "id"),
        (json!({"id": long, "plan": "pro"}), "id"),
        (json!({"id": 42, "plan": "pro"}), ""),
        (json!({"id": "u1", "plan": "platinum"}), "platinum"),
        (json!({"id": "u2"}), "plan"),
        (json!({"id": "u3", "plan": "pro", "billing_anchor": "2026-13-01T00:00:00Z"}), "billing_anchor"),
        (json!({"id": "u4", "plan": "pro", "billing_anchor": 1700000000}), ""),
    ] {
        let res = gw.admin_call("POST", "/admin/v1/accounts", Some(body.clone())).await;
        assert_eq!(res.status, 400, "{body}: {}", res.text());
        assert_eq!(res.error_type(), "bad_request", "{body}");
        let message = res.json()["error"]["message"].as_str().unwrap().to_lowercase();
        assert!(message.contains(named), "{body}: the message names {named}: {message}");
    }
    let res = http::send(
        "POST",
        &format!("{}/admin/v1/accounts", gw.admin),
        &[("authorization", &format!("Bearer {ADMIN_TOKEN}")), ("content-type", "application/json")],
        "{not json",
    )
    .await;
    assert_eq!(res.status, 400, "{}", res.text());
    assert_eq!(res.error_type(), "bad_request");
    // 64 characters of every allowed kind is fine.
    let id = format!("A-z_0.9{}", "x".repeat(57));
    create(gw, json!({"id": id, "plan": "pro"})).await;
    for id in ["u1", "u2", "u3", "u4"] {
        assert_eq!(gw.admin_call("GET", &format!("/admin/v1/accounts/{id}"), None).await.status, 404, "{id}");
    }
}

async fn reading_an_account_shows_every_field(store: Store) {
    let env = Env::start(store).await;
    let gw = &env.gw;
    create(gw, json!({"id": "acme", "plan": "fifty", "email": "billing@acme.test"})).await;
    let key = gw.create_key("acme", "user").await;
    let v = account(gw, "acme").await;
    let expected = json!({
        "id": "acme", "plan": "fifty", "allocation": 50, "monthly_remaining": 50, "topup_remaining": 0,
        "remaining": 50, "used_this_period": 0, "low": false, "email": "billing@acme.test",
        "pending_plan": null, "queue_depth": 0,
        "messages_left": {"fast": 50, "balanced": 16, "powerful": 10},
    });
    for (field, want) in expected.as_object().unwrap() {
        assert_eq!(&v[field], want, "{field} in {v}");
    }
    assert_eq!(v["auto_topup"]["enabled"], false, "{v}");
    assert!(ts(&v["period_start"]) <= now() && now() < ts(&v["renews_at"]), "{v}");
    // The customer view is the same figures without the admin fields.
    let c = gw.credits(&key).await;
    for (field, value) in c.as_object().unwrap() {
        assert_eq!(&v[field], value, "{field}: admin and customer views agree");
    }

    // A transcription the account cannot pay is queued and counted; a top-up runs it.
    spend(gw, &key, 49).await;
    let res = gw.post(&key, TRANSCRIBE, &[], r#"{"audio_url":"http://x/a.mp3"}"#).await;
    assert_eq!(res.status, 202, "{}", res.text());
    let v = account(gw, "acme").await;
    assert_eq!(
        (v["queue_depth"].as_u64(), v["remaining"].as_u64(), v["low"].as_bool()),
        (Some(1), Some(1), Some(true))
    );
    assert_eq!(gw.topup("acme", 5, "pay-1").await.status, 201);
    let v = wait_account(gw, "acme", "queue drained", |v| v["queue_depth"] == 0).await;
    assert_eq!(v["remaining"], 4, "the job paid 2 of 6: {v}");

    // E-mail can be changed; a bad one is refused.
    let res = gw.admin_call("PATCH", "/admin/v1/accounts/acme", Some(json!({"email": "new@acme.test"}))).await;
    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(res.json()["email"], "new@acme.test");
    let res = gw.admin_call("PATCH", "/admin/v1/accounts/acme", Some(json!({"email": "nope"}))).await;
    assert_eq!(res.status, 400, "{}", res.text());
    assert_eq!(account(gw, "acme").await["email"], "new@acme.test");
    let res = gw.admin_call("PATCH", "/admin/v1/accounts/nobody", Some(json!({"plan": "pro"}))).await;
    assert_eq!(res.status, 404, "{}", res.text());
    assert_eq!(res.error_type(), "not_found");
}

// === plan changes and renewal ===

async fn upgrade_grows_the_monthly_bucket_at_once(store: Store) {
    let env = Env::start(store).await;
    let gw = &env.gw;
    let key = gw.account_with_key("acme", "starter").await;
    spend(gw, &key, 100).await;
    assert_eq!(gw.topup("acme", 30, "pay-1").await.status, 201);

    let res = gw.admin_call("PATCH", "/admin/v1/accounts/acme", Some(json!({"plan": "pro"}))).await;
    assert_eq!(res.status, 200, "{}", res.text());
    let v = res.json();
    assert_eq!(v["plan_change"], "upgraded", "{v}");
    assert_eq!((v["plan"].as_str(), v["allocation"].as_u64()), (Some("pro"), Some(2000)), "{v}");
    assert_eq!(v["monthly_remaining"], 400 + 1500, "grew by 2,000 − 500 at once: {v}");
    assert_eq!((v["topup_remaining"].as_u64(), v["remaining"].as_u64()), (Some(30), Some(1930)), "{v}");
    assert_eq!(v["used_this_period"], 100, "{v}");
    assert_eq!(v["pending_plan"], Value::Null);

    // The next charge sees the new figures.
    let res = gw.post(&key, CHAT, &[("x-ai-tier", "fast")], "{}").await;
    assert_eq!(res.header("x-credits-remaining"), Some("1929"));
    let last_change = entries(gw, "acme", "plan_change").await;
    assert_eq!(last_change.len(), 1, "{last_change:?}");
    assert_eq!(
        (last_change[0]["monthly_delta"].as_i64(), last_change[0]["topup_delta"].as_i64()),
        (Some(1500), Some(0))
    );
    assert_eq!(last_change[0]["plan"], "pro");

    // The same plan again changes nothing; an unknown plan is a 400 that names it.
    let res = gw.admin_call("PATCH", "/admin/v1/accounts/acme", Some(json!({"plan": "pro"}))).await;
    assert_eq!(res.status, 200);
    assert_eq!(res.json()["monthly_remaining"], 1899);
    let res = gw.admin_call("PATCH", "/admin/v1/accounts/acme", Some(json!({"plan": "gold"}))).await;
    assert_eq!(res.status, 400, "{}", res.text());
    assert!(res.text().contains("gold"));
    let v = account(gw, "acme").await;
    assert_eq!((v["plan"].as_str(), v["monthly_remaining"].as_u64()), (Some("pro"), Some(1899)));
}

async fn downgrade_waits_for_renewal_which_resets_monthly_and_keeps_topups(store: Store) {
    // One auto top-up per period, so the renewal is seen to restart the count.
    let env = Env::with(store, |b| b.extra("[auto_topup]\nmax_per_period = 1")).await;
    let gw = &env.gw;
    // The current period ends in ~2 s.
    let anchor = now() + 2;
    let anchor_text = creditgate::calendar::rfc3339(anchor);
    create(gw, json!({"id": "acme", "plan": "pro", "billing_anchor": anchor_text})).await;
    create(gw, json!({"id": "auto", "plan": "fifty", "billing_anchor": anchor_text})).await;
    let key = gw.create_key("acme", "user").await;
    let auto_key = gw.create_key("auto", "user").await;
    let before = account(gw, "acme").await;
    assert_eq!(ts(&before["renews_at"]), anchor, "{before}");

    assert_eq!(gw.topup("acme", 300, "pay-1").await.status, 201);
    spend(gw, &key, 50).await;
    let res = gw.admin_call("PATCH", "/admin/v1/accounts/acme", Some(json!({"plan": "starter"}))).await;
    assert_eq!(res.status, 200, "{}", res.text());
    let v = res.json();
    assert_eq!(v["plan_change"], "downgrade_scheduled", "{v}");
    assert_eq!((v["plan"].as_str(), v["pending_plan"].as_str()), (Some("pro"), Some("starter")), "{v}");
    assert_eq!((v["allocation"].as_u64(), v["monthly_remaining"].as_u64()), (Some(2000), Some(1950)), "{v}");

    // Auto top-up, capped at one per period: the first crossing buys, the second does not.
    let setting = json!({"enabled": true, "threshold": 40, "package": "200"});
    assert_eq!(gw.admin_call("PUT", "/admin/v1/accounts/auto/auto-topup", Some(setting)).await.status, 200);
    assert_eq!(spend(gw, &auto_key, 11).await.header("x-credits-auto-topup"), Some("200"));
    let res = spend(gw, &auto_key, 200).await;
    assert_eq!(res.header("x-credits-auto-topup"), None, "capped");
    assert_eq!(res.header("x-credits-remaining"), Some("39"));

    sleep_past(anchor).await;

    // Visible on a plain read, before any charge: new period, downgrade applied, monthly reset
    // to the new allocation (no roll-over of the 1,950), top-ups untouched.
    let v = account(gw, "acme").await;
    assert_eq!((v["plan"].as_str(), v["allocation"].as_u64()), (Some("starter"), Some(500)), "{v}");
    assert_eq!(v["pending_plan"], Value::Null, "{v}");
    assert_eq!((v["monthly_remaining"].as_u64(), v["topup_remaining"].as_u64()), (Some(500), Some(300)), "{v}");
    assert_eq!((v["remaining"].as_u64(), v["used_this_period"].as_u64()), (Some(800), Some(0)), "{v}");
    assert_eq!(ts(&v["period_start"]), anchor, "{v}");
    assert!(ts(&v["renews_at"]) > anchor + 27 * 86_400, "next renewal a month on: {v}");
    let renewals = entries(gw, "acme", "renewal").await;
    assert_eq!(renewals.len(), 1, "one renewal entry: {renewals:?}");
    let r = &renewals[0];
    assert_eq!((r["monthly_delta"].as_i64(), r["topup_delta"].as_i64()), (Some(500 - 1950), Some(0)), "{r}");
    assert_eq!((r["monthly_after"].as_u64(), r["topup_after"].as_u64()), (Some(500), Some(300)), "{r}");
    assert_eq!(r["plan"], "starter", "{r}");
    assert_eq!(history(gw, "acme").await[0]["kind"], "renewal", "the newest entry");
    // Reading again does not renew again.
    assert_eq!(account(gw, "acme").await["monthly_remaining"], 500);
    assert_eq!(entries(gw, "acme", "renewal").await.len(), 1);

    // The renewed period may buy again: 50 + 39 → 39 crosses 40.
    let res = spend(gw, &auto_key, 50).await;
    assert_eq!(res.header("x-credits-auto-topup"), Some("200"), "the count restarted at renewal");
    assert_eq!(res.header("x-credits-remaining"), Some("239"));
    assert_eq!(entries(gw, "auto", "auto_topup").await.len(), 2);
}

// === API keys ===

async fn keys_are_listed_without_secrets_and_revoked_at_once(store: Store) {
    let env = Env::start(store).await;
    let gw = &env.gw;
    gw.create_account("acme", "pro").await;
    let mut created = Vec::new();
    for role in ["user", "system"] {
        let res = gw.admin_call("POST", "/admin/v1/accounts/acme/keys", Some(json!({"role": role}))).await;
        assert_eq!(res.status, 201, "{}", res.text());
        let v = res.json();
        let key = v["key"].as_str().unwrap().to_owned();
        assert!(
            key.strip_prefix("cg_").is_some_and(|r| r.len() >= 32 && r.bytes().all(|b| b.is_ascii_alphanumeric())),
            "key shape: {key}"
        );
        created.push((v["key_id"].as_str().unwrap().to_owned(), key, role));
    }
    // Use both so they sit in the key cache.
    for (_, key, _) in &created {
        assert_eq!(gw.remaining(key).await, 2000);
    }

    let res = gw.admin_call("GET", "/admin/v1/accounts/acme/keys", None).await;
    assert_eq!(res.status, 200, "{}", res.text());
    let text = res.text();
    let list = res.json()["keys"].as_array().expect("keys").clone();
    assert_eq!(list.len(), 2, "{text}");
    for (key_id, key, role) in &created {
        let hash = hex::encode(Sha256::digest(key.as_bytes()));
        assert!(!text.contains(&key[3..]) && !text.contains(&hash), "the list leaks a secret or its hash: {text}");
        let item = list.iter().find(|k| k["key_id"] == key_id.as_str()).unwrap_or_else(|| panic!("{key_id} listed"));
        let fields: BTreeSet<&str> = item.as_object().unwrap().keys().map(String::as_str).collect();
        for required in ["key_id", "prefix", "role", "created_at"] {
            assert!(fields.contains(required), "{required} in {item}");
        }
        for secret in ["key", "hash", "secret"] {
            assert!(!fields.contains(secret), "{secret} in {item}");
        }
        assert_eq!(item["role"], *role);
        let prefix = item["prefix"].as_str().unwrap();
        assert!(prefix.starts_with("cg_") && key.starts_with(prefix) && prefix.len() <= 12, "prefix {prefix}");
        assert!((ts(&item["created_at"]) - now()).abs() < 3600, "{item}");
    }

    // Revoking the user key refuses it at once on this instance (it was cached).
    let (user_id, user_key, _) = &created[0];
    let res = gw.admin_call("DELETE", &format!("/admin/v1/keys/{user_id}"), None).await;
    assert_eq!(res.status, 200, "{}", res.text());
    for (method, path) in [("GET", "/v1/credits"), ("POST", CHAT), ("POST", "/v1/deals")] {
        let res = gw.call(user_key, method, path, &[], "{}").await;
        assert_eq!(res.status, 401, "{method} {path} with a revoked key: {}", res.text());
        assert_eq!(res.error_type(), "unauthorized");
    }
    assert_eq!(env.up.count(), 0, "the revoked key reached nothing");
    let list = gw.admin_call("GET", "/admin/v1/accounts/acme/keys", None).await.json();
    let ids: Vec<&str> = list["keys"].as_array().unwrap().iter().map(|k| k["key_id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![created[1].0.as_str()], "{list}");
    assert_eq!(gw.remaining(&created[1].1).await, 2000, "the other key still works");

    let res = gw.admin_call("DELETE", &format!("/admin/v1/keys/{user_id}"), None).await;
    assert_eq!(res.status, 404, "revoking twice: {}", res.text());
    assert_eq!(res.error_type(), "not_found");
    assert_eq!(gw.admin_call("DELETE", "/admin/v1/keys/no-such-key", None).await.status, 404);
    assert_eq!(gw.admin_call("GET", "/admin/v1/accounts/nobody/keys", None).await.status, 404);
}

/// Issue 4 §3: a revocation reaches every instance within 5 s (instances share only the store).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_reaches_another_instance_within_five_seconds() {
    let env = Env::start(Store::Redis).await;
    let other = env.second_instance().await;
    let key = env.gw.account_with_key("acme", "pro").await;
    let key_id = env.gw.admin_call("GET", "/admin/v1/accounts/acme/keys", None).await.json()["keys"][0]["key_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // The other instance knows (and caches) the key.
    assert_eq!(other.remaining(&key).await, 2000);
    assert_eq!(env.gw.admin_call("DELETE", &format!("/admin/v1/keys/{key_id}"), None).await.status, 200);
    let revoked = Instant::now();
    // The contract is 5 s: the cache trusts an entry for 4 s (auth::FRESH), so by then a lookup
    // must have happened; 5 s leaves one second for it on a slow machine.
    let deadline = revoked + Duration::from_secs(5);
    loop {
        let res =
            http::send("GET", &other.url("/v1/credits"), &[("authorization", &format!("Bearer {key}"))], "").await;
        if res.status == 401 {
            break;
        }
        assert_eq!(res.status, 200, "{}", res.text());
        assert!(
            Instant::now() < deadline,
            "the other instance still accepts the key {:?} after revocation",
            revoked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// === top-ups ===

async fn topups_by_package_and_credits_credit_each_payment_ref_once(store: Store) {
    let env = Env::start(store).await;
    let gw = &env.gw;
    let key = gw.account_with_key("acme", "starter").await;
    let path = "/admin/v1/accounts/acme/topups";

    let res = gw.admin_call("POST", path, Some(json!({"package": "1500", "payment_ref": "stripe_pi_1"}))).await;
    assert_eq!(res.status, 201, "{}", res.text());
    let first = res.json();
    assert_eq!((first["credits"].as_u64(), first["package"].as_str()), (Some(1500), Some("1500")), "{first}");
    assert_eq!((first["payment_ref"].as_str(), first["topup_remaining"].as_u64()), (Some("stripe_pi_1"), Some(1500)));
    let res = gw.topup("acme", 42, "grant-7").await;
    assert_eq!(res.status, 201, "{}", res.text());
    assert_eq!((res.json()["credits"].as_u64(), res.json()["topup_remaining"].as_u64()), (Some(42), Some(1542)));
    assert_eq!(res.json()["package"], Value::Null, "a grant is no package");

    // The same reference: 200 with the first result, whatever the retry says.
    for retry in
        [json!({"package": "1500", "payment_ref": "stripe_pi_1"}), json!({"credits": 5, "payment_ref": "stripe_pi_1"})]
    {
        let res = gw.admin_call("POST", path, Some(retry)).await;
        assert_eq!(res.status, 200, "{}", res.text());
        assert_eq!(res.json(), first);
    }
    assert_eq!(gw.credits(&key).await["topup_remaining"], 1542);

    // 20 copies of one new payment at once: one 201, nineteen 200 with the same result.
    let admin = gw.admin.clone();
    let results = concurrently(20, |_| {
        let url = format!("{admin}{path}");
        async move {
            let auth = format!("Bearer {ADMIN_TOKEN}");
            let body = json!({"package": "500", "payment_ref": "stripe_pi_2"}).to_string();
            http::send("POST", &url, &[("authorization", &auth), ("content-type", "application/json")], body).await
        }
    })
    .await;
    let created: Vec<&Response> = results.iter().filter(|r| r.status == 201).collect();
    assert_eq!(
        created.len(),
        1,
        "exactly one copy credits: {:?}",
        results.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert!(results.iter().all(|r| r.status == 200 || r.status == 201));
    let original = created[0].json();
    assert_eq!(original["topup_remaining"], 2042);
    for r in &results {
        assert_eq!(r.json(), original, "every copy answers with the one result");
    }
    let c = gw.credits(&key).await;
    assert_eq!((c["topup_remaining"].as_u64(), c["remaining"].as_u64()), (Some(2042), Some(2542)), "{c}");
    let topups = entries(gw, "acme", "topup").await;
    let refs: Vec<&str> = topups.iter().map(|e| e["payment_ref"].as_str().unwrap()).collect();
    assert_eq!(refs, vec!["stripe_pi_2", "grant-7", "stripe_pi_1"], "one entry per payment, newest first");
    assert_eq!(topups[0]["topup_delta"], 500);
    assert_eq!(topups[0]["package"], "500");
}

async fn customers_read_topups_but_cannot_create_them(store: Store) {
    let env = Env::start(store).await;
    let gw = &env.gw;
    let key = gw.account_with_key("acme", "pro").await;
    let admin_path = "/admin/v1/accounts/acme/topups";
    assert_eq!(
        gw.admin_call("POST", admin_path, Some(json!({"package": "200", "payment_ref": "p1"}))).await.status,
        201
    );
    assert_eq!(gw.topup("acme", 25, "p2").await.status, 201);

    let res = gw.call(&key, "GET", "/v1/credits/topups", &[], "").await;
    assert_eq!(res.status, 200, "{}", res.text());
    let list = res.json()["topups"].as_array().expect("topups").clone();
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!((list[0]["payment_ref"].as_str(), list[0]["credits"].as_u64()), (Some("p2"), Some(25)), "newest first");
    assert_eq!((list[1]["package"].as_str(), list[1]["credits"].as_u64()), (Some("200"), Some(200)));
    assert_eq!(list[0]["topup_remaining"], 225);
    // The admin list is the same.
    assert_eq!(gw.admin_call("GET", admin_path, None).await.json()["topups"], json!(list));

    // No customer route creates a top-up: the read route refuses writes.
    let mut refusals = Vec::new();
    for method in ["POST", "PUT", "PATCH", "DELETE"] {
        let body = json!({"credits": 1000, "payment_ref": "self-service"}).to_string();
        let res = gw.call(&key, method, "/v1/credits/topups", &[], &body).await;
        assert!(
            res.status == 404 || res.status == 405,
            "{method} /v1/credits/topups must not exist for customers: {} {}",
            res.status,
            res.text()
        );
        refusals.push((method, res));
    }
    // The admin path on the public listener is no way in either, with the customer's key.
    let body = json!({"credits": 1000, "payment_ref": "sneaky"}).to_string();
    gw.call(&key, "POST", admin_path, &[], &body).await;
    let c = gw.credits(&key).await;
    assert_eq!((c["topup_remaining"].as_u64(), c["remaining"].as_u64()), (Some(225), Some(2225)), "nothing credited");
    assert_eq!(entries(gw, "acme", "topup").await.len(), 2);

    // SPEC §6: every error is JSON {"error": {"type", "message"}} — a refused method too.
    for (method, res) in refusals {
        let parsed: Option<Value> = serde_json::from_slice(&res.body).ok();
        assert!(
            parsed.as_ref().is_some_and(|v| v["error"]["type"].is_string() && v["error"]["message"].is_string()),
            "{method} /v1/credits/topups answered {} with {:?} (content-type {:?}), not a SPEC §6 JSON error",
            res.status,
            res.text(),
            res.header("content-type")
        );
    }
}

// === auto top-up ===

async fn auto_topup_is_set_by_admin_and_customer(store: Store) {
    let env = Env::start(store).await;
    let gw = &env.gw;
    let key = gw.account_with_key("acme", "pro").await;
    assert_eq!(gw.credits(&key).await["auto_topup"]["enabled"], false);

    let res = gw
        .admin_call(
            "PUT",
            "/admin/v1/accounts/acme/auto-topup",
            Some(json!({"enabled": true, "threshold": 100, "package": "500"})),
        )
        .await;
    assert_eq!(res.status, 200, "{}", res.text());
    let a = &res.json()["auto_topup"];
    assert_eq!(
        (a["enabled"].as_bool(), a["threshold"].as_u64(), a["package"].as_str()),
        (Some(true), Some(100), Some("500"))
    );
    assert_eq!(gw.credits(&key).await["auto_topup"], *a);

    let res = gw
        .call(&key, "PUT", "/v1/credits/auto-topup", &[], r#"{"enabled":true,"threshold":250,"package":"1500"}"#)
        .await;
    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!((res.json()["threshold"].as_u64(), res.json()["package"].as_str()), (Some(250), Some("1500")));
    let c = gw.credits(&key).await;
    assert_eq!((c["auto_topup"]["threshold"].as_u64(), c["auto_topup"]["credits"].as_u64()), (Some(250), Some(1500)));
    assert_eq!(account(gw, "acme").await["auto_topup"], c["auto_topup"]);

    for body in [
        r#"{"enabled":true,"threshold":100,"package":"999"}"#,
        r#"{"enabled":true,"threshold":100}"#,
        r#"{"enabled":true,"package":"200"}"#,
        r#"{"enabled":true,"threshold":0,"package":"200"}"#,
        r#"{"enabled":true,"threshold":-5,"package":"200"}"#,
        r#"{"enabled":"yes","threshold":100,"package":"200"}"#,
        r#"{"enabled":true,"threshold":100,"package":"200","account":"other"}"#,
        "not json",
    ] {
        let res = gw.call(&key, "PUT", "/v1/credits/auto-topup", &[], body).await;
        assert_eq!(res.status, 400, "{body}: {}", res.text());
        assert_eq!(res.error_type(), "bad_request", "{body}");
        let res = gw.admin_call("PUT", "/admin/v1/accounts/acme/auto-topup", serde_json::from_str(body).ok()).await;
        assert_eq!(res.status, 400, "admin {body}: {}", res.text());
    }
    let res =
        gw.call(&key, "PUT", "/v1/credits/auto-topup", &[], r#"{"enabled":true,"threshold":1,"package":"999"}"#).await;
    assert!(res.json()["error"]["message"].as_str().unwrap().contains("999"), "names the package: {}", res.text());
    assert_eq!(gw.credits(&key).await["auto_topup"], c["auto_topup"], "refused settings changed nothing");

    let res = gw.call(&key, "PUT", "/v1/credits/auto-topup", &[], r#"{"enabled":false}"#).await;
    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(gw.credits(&key).await["auto_topup"]["enabled"], false);
    let res = gw.admin_call("PUT", "/admin/v1/accounts/nobody/auto-topup", Some(json!({"enabled": false}))).await;
    assert_eq!(res.status, 404);
}

async fn auto_topup_buys_one_package_per_crossing(store: Store) {
    let env = Env::start(store).await;
    let gw = &env.gw;
    let key = gw.account_with_key("acme", "fifty").await;
    let res =
        gw.call(&key, "PUT", "/v1/credits/auto-topup", &[], r#"{"enabled":true,"threshold":20,"package":"200"}"#).await;
    assert_eq!(res.status, 200, "{}", res.text());

    // 50 → 20: not below the threshold yet.
    let res = spend(gw, &key, 30).await;
    assert_eq!(res.header("x-credits-auto-topup"), None);
    assert_eq!(res.header("x-credits-remaining"), Some("20"));
    // 20 → 19 crosses: one package, credited in the same step.
    let res = gw.post(&key, CHAT, &[("x-ai-tier", "fast")], "{}").await;
    assert_eq!(res.charged(), 1);
    assert_eq!(res.header("x-credits-auto-topup"), Some("200"), "{:?}", res.headers);
    assert_eq!(res.header("x-credits-remaining"), Some("219"));
    let c = gw.credits(&key).await;
    assert_eq!((c["monthly_remaining"].as_u64(), c["topup_remaining"].as_u64()), (Some(19), Some(200)), "{c}");

    let autos = entries(gw, "acme", "auto_topup").await;
    assert_eq!(autos.len(), 1, "{autos:?}");
    let e = &autos[0];
    assert_eq!((e["topup_delta"].as_i64(), e["monthly_delta"].as_i64()), (Some(200), Some(0)), "{e}");
    assert_eq!(e["package"], "200");
    assert!(e["payment_ref"].as_str().is_some_and(|r| !r.is_empty()), "{e}");
    let listed = gw.call(&key, "GET", "/v1/credits/topups", &[], "").await.json();
    assert_eq!(listed["topups"][0]["kind"], "auto_topup", "{listed}");

    // Above the threshold again: further charges buy nothing until the next crossing.
    for _ in 0..5 {
        let res = gw.post(&key, CHAT, &[("x-ai-tier", "powerful")], "{}").await;
        assert_eq!(res.header("x-credits-auto-topup"), None);
    }
    assert_eq!(gw.remaining(&key).await, 194);
    // 194 → 19: the second crossing buys the second package.
    let res = spend(gw, &key, 175).await;
    assert_eq!(res.header("x-credits-auto-topup"), Some("200"));
    assert_eq!(res.header("x-credits-remaining"), Some("219"));
    assert_eq!(entries(gw, "acme", "auto_topup").await.len(), 2);

    // A disabled setting buys nothing.
    assert_eq!(gw.call(&key, "PUT", "/v1/credits/auto-topup", &[], r#"{"enabled":false}"#).await.status, 200);
    let res = spend(gw, &key, 210).await;
    assert_eq!(res.header("x-credits-auto-topup"), None);
    assert_eq!(gw.remaining(&key).await, 9);

    // A charge refused for lack of credits never buys.
    let setting = json!({"enabled": true, "threshold": 5, "package": "200"});
    assert_eq!(gw.admin_call("PUT", "/admin/v1/accounts/acme/auto-topup", Some(setting)).await.status, 200);
    let res = gw.post(&key, ENRICH, &[], &leads(10)).await;
    assert_eq!(res.status, 402, "{}", res.text());
    assert_eq!(gw.remaining(&key).await, 9);
    assert_eq!(entries(gw, "acme", "auto_topup").await.len(), 2);
}

/// Issue 4 §5: 50 concurrent charges crossing the threshold buy exactly one package — on Redis
/// with the requests split over two gateway instances.
async fn concurrent_crossing(store: Store) {
    let env = Env::start(store).await;
    let other = if store == Store::Redis { Some(Arc::new(env.second_instance().await)) } else { None };
    let gw = &env.gw;
    let key = gw.account_with_key("acme", "fifty").await;
    let setting = json!({"enabled": true, "threshold": 30, "package": "200"});
    assert_eq!(gw.admin_call("PUT", "/admin/v1/accounts/acme/auto-topup", Some(setting)).await.status, 200);

    let urls: Vec<String> = std::iter::once(gw.url(CHAT)).chain(other.iter().map(|o| o.url(CHAT))).collect();
    let results = concurrently(50, |i| {
        let url = urls[i % urls.len()].clone();
        let auth = format!("Bearer {key}");
        async move {
            let headers =
                [("authorization", auth.as_str()), ("content-type", "application/json"), ("x-ai-tier", "fast")];
            http::send("POST", &url, &headers, "{}").await
        }
    })
    .await;
    for r in &results {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.charged(), 1);
    }
    let bought: Vec<&str> = results.iter().filter_map(|r| r.header("x-credits-auto-topup")).collect();
    assert_eq!(bought, vec!["200"], "exactly one response reports the purchase");
    assert_eq!(entries(gw, "acme", "auto_topup").await.len(), 1);
    let c = gw.credits(&key).await;
    assert_eq!((c["monthly_remaining"].as_u64(), c["topup_remaining"].as_u64()), (Some(0), Some(200)), "{c}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_charges_crossing_the_threshold_buy_once_memory() {
    concurrent_crossing(Store::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_charges_crossing_the_threshold_buy_once_on_two_redis_instances() {
    concurrent_crossing(Store::Redis).await;
}

async fn auto_topup_is_capped_per_period(store: Store) {
    let env = Env::with(store, |b| b.extra("[auto_topup]\nmax_per_period = 2")).await;
    let gw = &env.gw;
    let key = gw.account_with_key("acme", "fifty").await;
    let setting = json!({"enabled": true, "threshold": 20, "package": "200"});
    assert_eq!(gw.admin_call("PUT", "/admin/v1/accounts/acme/auto-topup", Some(setting)).await.status, 200);

    assert_eq!(spend(gw, &key, 31).await.header("x-credits-auto-topup"), Some("200"), "first crossing");
    assert_eq!(spend(gw, &key, 200).await.header("x-credits-auto-topup"), Some("200"), "second crossing");
    let res = spend(gw, &key, 200).await;
    assert_eq!(res.header("x-credits-auto-topup"), None, "third crossing: over max_per_period");
    assert_eq!(res.header("x-credits-remaining"), Some("19"));
    assert_eq!(entries(gw, "acme", "auto_topup").await.len(), 2);
    let c = gw.credits(&key).await;
    assert_eq!((c["remaining"].as_u64(), c["auto_topup"]["enabled"].as_bool()), (Some(19), Some(true)), "{c}");
}

/// Enabling auto top-up while already below the threshold: the next charge, still below it,
/// buys — otherwise a customer who turns it on when the low-credit banner shows (the moment the
/// dashboard invites it) never gets a package and runs into 402s.
async fn auto_topup_enabled_below_the_threshold_buys_on_the_next_charge(store: Store) {
    let env = Env::start(store).await;
    let gw = &env.gw;
    let key = gw.account_with_key("acme", "fifty").await;
    spend(gw, &key, 45).await;
    let res =
        gw.call(&key, "PUT", "/v1/credits/auto-topup", &[], r#"{"enabled":true,"threshold":20,"package":"200"}"#).await;
    assert_eq!(res.status, 200, "{}", res.text());
    let res = gw.post(&key, CHAT, &[("x-ai-tier", "fast")], "{}").await;
    assert_eq!(res.charged(), 1);
    assert_eq!(
        res.header("x-credits-auto-topup"),
        Some("200"),
        "5 → 4 credits with auto top-up on below 20: no package bought (remaining {:?})",
        res.header("x-credits-remaining")
    );
    // And only once: the next charges are above the threshold again.
    let res = gw.post(&key, CHAT, &[("x-ai-tier", "fast")], "{}").await;
    assert_eq!(res.header("x-credits-auto-topup"), None);
    assert_eq!(entries(gw, "acme", "auto_topup").await.len(), 1);
}

/// Amounts no store can hold are a client error (400), never a 5xx, a crash or a wrong balance.
async fn absurd_amounts_are_bad_requests(store: Store) {
    let env = Env::start(store).await;
    let gw = &env.gw;
    let key = gw.account_with_key("acme", "fifty").await;
    for credits in [u64::MAX, 1 << 60, (1 << 53) + 1] {
        let res = gw.topup("acme", credits, &format!("huge-{credits}")).await;
        assert_eq!(res.status, 400, "top-up of {credits}: {} {}", res.status, res.text());
        assert_eq!(res.error_type(), "bad_request");
    }
    let c = gw.credits(&key).await;
    assert_eq!((c["remaining"].as_u64(), c["topup_remaining"].as_u64()), (Some(50), Some(0)), "{c}");
    for threshold in [u64::MAX, 1 << 60] {
        let body = json!({"enabled": true, "threshold": threshold, "package": "200"}).to_string();
        let res = gw.call(&key, "PUT", "/v1/credits/auto-topup", &[], &body).await;
        assert_eq!(res.status, 400, "threshold {threshold}: {} {}", res.status, res.text());
        assert_eq!(res.error_type(), "bad_request");
    }
    assert_eq!(gw.credits(&key).await["auto_topup"]["enabled"], false);
    // The largest accepted amount is MAX_CREDITS; one more is refused; large top-ups add up exactly.
    let max = creditgate::ledger::MAX_CREDITS;
    assert_eq!(gw.topup("acme", max + 1, "over").await.status, 400);
    assert_eq!(gw.topup("acme", max, "big-1").await.status, 201);
    assert_eq!(gw.topup("acme", max, "big-2").await.status, 201);
    let c = gw.credits(&key).await;
    assert_eq!(c["topup_remaining"].as_u64(), Some(2 * max), "{c}");
    assert_eq!(c["remaining"].as_u64(), Some(2 * max + 50), "{c}");
}

// === ledger history ===

async fn history_pages_newest_first(store: Store) {
    let env = Env::start(store).await;
    let gw = &env.gw;
    let key = gw.account_with_key("acme", "fifty").await;
    // created, charge ×3, top-up, charge (split), refunded charge (charge + refund).
    let mut request_ids = Vec::new();
    for tier in ["fast", "balanced", "powerful"] {
        let res = gw.post(&key, CHAT, &[("x-ai-tier", tier)], "{}").await;
        request_ids.push(res.header("x-request-id").expect("x-request-id").to_owned());
    }
    assert_eq!(gw.topup("acme", 10, "pay-1").await.status, 201);
    let res = spend(gw, &key, 45).await; // 41 from monthly, 4 from top-ups
    request_ids.push(res.header("x-request-id").unwrap().to_owned());
    env.up.set(Behaviour::Status(500));
    let res = gw.post(&key, "/v1/insights/position", &[("x-request-id", "req-failing-1")], "{}").await;
    assert_eq!((res.status.as_u16(), res.charged()), (500, 0));
    env.up.set(Behaviour::Echo);

    let all = history(gw, "acme").await;
    let kinds: Vec<&str> = all.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["refund", "charge", "charge", "topup", "charge", "charge", "charge", "created"]);
    let seqs: Vec<u64> = all.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=8).rev().collect::<Vec<_>>(), "newest first, no gaps");
    let mut last_at = i64::MAX;
    for e in &all {
        let at = ts(&e["at"]);
        assert!(at <= last_at && (now() - at).abs() < 600, "times run backwards page order: {e}");
        last_at = at;
    }

    // Charges: operation, category, bucket split, request id.
    let charges: Vec<&Value> = all.iter().filter(|e| e["kind"] == "charge").collect();
    let refunded = charges[0];
    assert_eq!(
        (refunded["operation"].as_str(), refunded["category"].as_str()),
        (Some("insights_position"), Some("Insights"))
    );
    assert_eq!(refunded["request_id"], "req-failing-1");
    let split = charges[1];
    assert_eq!(
        (split["operation"].as_str(), split["category"].as_str()),
        (Some("lead_enrichment"), Some("Enrichment"))
    );
    assert_eq!((split["monthly_delta"].as_i64(), split["topup_delta"].as_i64()), (Some(-41), Some(-4)), "{split}");
    assert_eq!((split["monthly_after"].as_u64(), split["topup_after"].as_u64()), (Some(0), Some(6)), "{split}");
    assert_eq!(split["request_id"], request_ids[3].as_str());
    let chats: Vec<&&Value> = charges[2..].iter().collect();
    for (e, (cost, rid)) in chats.iter().zip([(5, &request_ids[2]), (3, &request_ids[1]), (1, &request_ids[0])]) {
        assert_eq!((e["operation"].as_str(), e["category"].as_str()), (Some("ai_chat"), Some("AI Chat")), "{e}");
        assert_eq!((e["monthly_delta"].as_i64(), e["topup_delta"].as_i64()), (Some(-cost), Some(0)), "{e}");
        assert_eq!(e["request_id"], rid.as_str(), "{e}");
    }
    // The refund returns each part to its bucket.
    let refund = &all[0];
    assert_eq!((refund["monthly_delta"].as_i64(), refund["topup_delta"].as_i64()), (Some(0), Some(5)), "{refund}");
    assert_eq!(refund["operation"], "insights_position");
    let topup = &all[3];
    assert_eq!((topup["topup_delta"].as_i64(), topup["payment_ref"].as_str()), (Some(10), Some("pay-1")), "{topup}");
    assert_eq!((all[7]["monthly_delta"].as_i64(), all[7]["plan"].as_str()), (Some(50), Some("fifty")));

    // Pages of 3: 8,7,6 → 5,4,3 → 2,1 (no next page).
    let mut before: Option<u64> = None;
    let mut paged = Vec::new();
    let mut pages = Vec::new();
    for _ in 0..10 {
        let path = match before {
            Some(b) => format!("/admin/v1/accounts/acme/ledger?limit=3&before={b}"),
            None => "/admin/v1/accounts/acme/ledger?limit=3".to_owned(),
        };
        let page = gw.admin_call("GET", &path, None).await.json();
        let got: Vec<u64> = page["entries"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        pages.push(got.clone());
        paged.extend(page["entries"].as_array().unwrap().iter().cloned());
        match page["next_before"].as_u64() {
            Some(b) => {
                assert_eq!(Some(&b), got.last(), "next_before is the last seq of the page");
                before = Some(b);
            }
            None => break,
        }
    }
    assert_eq!(pages, vec![vec![8, 7, 6], vec![5, 4, 3], vec![2, 1]]);
    assert_eq!(paged, all, "pages join to the whole history");

    for bad in ["?limit=abc", "?before=-1", "?limit=3&before=x"] {
        let res = gw.admin_call("GET", &format!("/admin/v1/accounts/acme/ledger{bad}"), None).await;
        assert_eq!(res.status, 400, "{bad}: {}", res.text());
        assert_eq!(res.error_type(), "bad_request");
    }
    assert_eq!(gw.admin_call("GET", "/admin/v1/accounts/nobody/ledger", None).await.status, 404);
}

/// A small deterministic PRNG (xorshift64*), so a failure replays with the same seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

async fn history_sums_to_the_balances_after_random_traffic(store: Store) {
    const SEED: u64 = 0x5EED_C0FF_EE15_2026;
    let env = Env::start(store).await;
    let gw = &env.gw;
    let key = gw.account_with_key("recon", "starter").await;
    let mut rng = Rng(SEED);
    // What the test itself saw being charged, by category (refunds subtract).
    let mut charged: BTreeMap<String, i64> = BTreeMap::new();
    let (mut charges, mut refunds, mut refused) = (0, 0, 0);

    for step in 0..160 {
        if step == 80 {
            let res = gw.admin_call("PATCH", "/admin/v1/accounts/recon", Some(json!({"plan": "pro"}))).await;
            assert_eq!(res.status, 200, "{}", res.text());
        }
        if step == 120 {
            let res = gw.admin_call("PATCH", "/admin/v1/accounts/recon", Some(json!({"plan": "free"}))).await;
            assert_eq!(res.json()["plan_change"], "downgrade_scheduled");
        }
        match rng.below(10) {
            0 => {
                let credits = 1 + rng.below(120);
                assert_eq!(gw.topup("recon", credits, &format!("seed-pay-{step}")).await.status, 201);
                continue;
            }
            1 => {
                // A duplicate of an earlier payment reference adds nothing.
                let res = gw.topup("recon", 999, "seed-pay-dup").await;
                assert!(res.status == 200 || res.status == 201, "{}", res.text());
                continue;
            }
            _ => {}
        }
        let (path, headers, body, category): (&str, Vec<(&str, &str)>, String, &str) = match rng.below(7) {
            0 => {
                let tier = ["fast", "balanced", "powerful"][rng.below(3) as usize];
                (CHAT, vec![("x-ai-tier", tier)], "{}".into(), "AI Chat")
            }
            1 => (CHAT, vec![], r#"{"messages":[]}"#.into(), "AI Chat"),
            2 => (ENRICH, vec![], leads(1 + rng.below(30) as usize), "Enrichment"),
            3 => {
                let body = json!({"steps": rng.below(6), "variants": rng.below(4), "channels": rng.below(3)});
                ("/v1/campaigns/generate", vec![], body.to_string(), "Campaigns")
            }
            4 => ("/v1/insights/competitive", vec![], "{}".into(), "Insights"),
            5 => ("/v1/sentiment", vec![], "{}".into(), "Insights"),
            _ => ("/v1/icebreakers", vec![], leads(1 + rng.below(4) as usize), "Campaigns"),
        };
        let failing = rng.below(5) == 0;
        env.up.set(if failing { Behaviour::Status(500) } else { Behaviour::Echo });
        let res = gw.post(&key, path, &headers, &body).await;
        match res.status.as_u16() {
            200 => {
                charges += 1;
                *charged.entry(category.to_owned()).or_default() += res.charged() as i64;
            }
            500 => {
                assert!(failing);
                refunds += 1;
                assert_eq!(res.charged(), 0, "a failed upstream is refunded");
            }
            402 => refused += 1,
            other => panic!("step {step}: unexpected {other}: {}", res.text()),
        }
    }
    env.up.set(Behaviour::Echo);
    assert!(charges > 50 && refunds > 5, "the seed exercises charges ({charges}) and refunds ({refunds})");
    let _ = refused;

    let c = gw.credits(&key).await;
    let all = history(gw, "recon").await;
    let sum = |field: &str| all.iter().map(|e| e[field].as_i64().unwrap()).sum::<i64>();
    assert_eq!(sum("monthly_delta"), c["monthly_remaining"].as_i64().unwrap(), "monthly deltas sum to the bucket: {c}");
    assert_eq!(sum("topup_delta"), c["topup_remaining"].as_i64().unwrap(), "top-up deltas sum to the bucket: {c}");
    // Replayed oldest first, each entry's balances follow from the one before.
    let (mut monthly, mut topup) = (0i64, 0i64);
    for e in all.iter().rev() {
        monthly += e["monthly_delta"].as_i64().unwrap();
        topup += e["topup_delta"].as_i64().unwrap();
        assert_eq!((e["monthly_after"].as_i64(), e["topup_after"].as_i64()), (Some(monthly), Some(topup)), "{e}");
        assert!(monthly >= 0 && topup >= 0, "never overdrawn: {e}");
    }
    // Charges minus refunds, per category, are the usage and what the responses said.
    let mut net: BTreeMap<String, i64> = BTreeMap::new();
    for e in &all {
        let delta = e["monthly_delta"].as_i64().unwrap() + e["topup_delta"].as_i64().unwrap();
        match e["kind"].as_str().unwrap() {
            "charge" | "refund" => {
                assert!(e["operation"].is_string(), "{e}");
                *net.entry(e["category"].as_str().unwrap().to_owned()).or_default() -= delta;
            }
            "created" | "topup" | "plan_change" => {}
            other => panic!("unexpected entry kind {other}: {e}"),
        }
    }
    net.retain(|_, v| *v != 0);
    charged.retain(|_, v| *v != 0);
    assert_eq!(net, charged, "history by category = what the responses charged");
    let total: i64 = charged.values().sum();
    assert_eq!(c["used_this_period"].as_i64(), Some(total), "{c}");
    let usage = gw.call(&key, "GET", "/v1/credits/usage", &[], "").await.json();
    assert_eq!(usage["total"].as_i64(), Some(total), "{usage}");
    for (category, n) in &charged {
        assert_eq!(usage["by_category"][category].as_i64(), Some(*n), "{category}: {usage}");
    }
    let topups = all.iter().filter(|e| e["kind"] == "topup").count();
    let listed = gw.call(&key, "GET", "/v1/credits/topups", &[], "").await.json();
    assert_eq!(listed["topups"].as_array().unwrap().len(), topups);
    assert_eq!(c["pending_plan"], Value::Null, "the customer view has no admin fields");
    assert_eq!(account(gw, "recon").await["pending_plan"], "free");
}
