//! Seeing credits through the real gateway (issue 6): `GET /v1/credits` and the credit headers,
//! usage by category, operation and day, notifications by webhook (signed, retried within
//! `max_backoff_ms`, once per threshold, dropped and counted past `event_ttl_hours`) and by
//! e-mail to a real SMTP listener, Prometheus `/metrics` checked by a strict parser of the text
//! format, and the probes.
//!
//! Every behaviour runs on the embedded store and on a real `redis-server` started for the test
//! (`memory::…` and `redis::…`); on Redis the threshold test splits its traffic between this
//! process's gateway and a second gateway process (the real binary) sharing the store.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::gateway::{CATEGORIES, ConfigBuilder, OPERATIONS, TestGateway, leads, spend};
use support::http::{self, Response};
use support::process::GatewayProcess;
use support::receivers::{Delivery, SmtpReceiver, WebhookReceiver};
use support::stores::{Env, Store};
use support::upstream::{Behaviour, Upstream};

const CHAT: &str = "/v1/chat/completions";
const ENRICH: &str = "/v1/leads/enrich";

// === fixtures ===

/// A webhook receiver and the config lines that point the gateway at it, signing with a secret
/// in an environment variable whose name no other test uses (tests share the process).
struct Hook {
    receiver: WebhookReceiver,
    secret: String,
    var: String,
}

impl Hook {
    async fn start(test: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let var = format!("CREDITGATE_TEST_WEBHOOK_SECRET_{}_{}_{n}", test.to_ascii_uppercase(), std::process::id());
        let secret = format!("whsec-{test}-{n}-{}", std::process::id());
        // SAFETY: the name is unique to this test, so no other thread reads or writes it.
        unsafe { std::env::set_var(&var, &secret) };
        Hook { receiver: WebhookReceiver::start().await, secret, var }
    }

    /// Adds the `[notifications]` lines (retries at most 1 s apart, to keep tests short).
    fn configure(&self, b: ConfigBuilder) -> ConfigBuilder {
        self.configure_backoff(b, 1_000)
    }

    /// Adds the `[notifications]` lines with retries at most `max_backoff_ms` apart.
    fn configure_backoff(&self, b: ConfigBuilder, max_backoff_ms: u64) -> ConfigBuilder {
        b.notification(&format!("webhook_url = \"{}\"", self.receiver.url()))
            .notification(&format!("webhook_secret_env = \"{}\"", self.var))
            .notification(&format!("max_backoff_ms = {max_backoff_ms}"))
    }

    /// Asserts the delivery passes the receiver check the README documents (signature
    /// `t=…,v1=…` over `"<t>.<raw body>"`, `t` within 5 minutes of receipt), and that the same
    /// check rejects it when replayed later, with its body or `t` changed, or under another key.
    fn verify(&self, d: &Delivery) {
        let sig = d.header("x-creditgate-signature").unwrap_or_else(|| panic!("unsigned delivery: {:?}", d.headers));
        let secret = self.secret.as_bytes();
        let t = support::receivers::verify_webhook(secret, sig, &d.body, d.received_at)
            .unwrap_or_else(|e| panic!("{e}: {sig} for body {}", String::from_utf8_lossy(&d.body)));
        assert!((t - d.received_at).abs() <= 5, "t={t} is the time of sending, received at {}", d.received_at);
        // A captured delivery replayed six minutes later is refused, as is one from the future.
        assert_eq!(support::receivers::verify_webhook(secret, sig, &d.body, d.received_at + 360), Err("stale"));
        assert_eq!(support::receivers::verify_webhook(secret, sig, &d.body, d.received_at - 360), Err("stale"));
        // Moving t forward to pass the check breaks the signature, as does another body or key.
        let fresh = sig.replacen(&format!("t={t},"), &format!("t={},", t + 360), 1);
        assert_eq!(
            support::receivers::verify_webhook(secret, &fresh, &d.body, d.received_at + 360),
            Err("bad signature")
        );
        assert_eq!(support::receivers::verify_webhook(secret, sig, b"{}", d.received_at), Err("bad signature"));
        assert_eq!(
            support::receivers::verify_webhook(b"another secret", sig, &d.body, d.received_at),
            Err("bad signature")
        );
    }
}

on_both_stores!(
    credits_shows_the_balance_and_messages_left,
    metered_answers_carry_the_credit_headers,
    usage_by_category_operation_and_day,
    threshold_events_fire_once_under_200_concurrent_chats,
    webhook_down_then_up_delivers_each_event_once,
    retries_never_wait_longer_than_max_backoff,
    money_events_are_delivered_and_renewal_moves_usage_to_earlier_periods,
    emails_carry_the_subject_and_figures,
    a_mail_relay_that_is_down_does_not_hold_back_webhooks,
    metrics_parse_and_carry_no_account_data,
    jobs_gauge_counts_queued_jobs,
    outbox_gauge_counts_undelivered_events,
    a_full_outbox_drops_its_oldest_events_and_says_so,
    probes_need_no_token,
);

async fn create(gw: &TestGateway, body: Value) -> Value {
    let res = gw.admin_call("POST", "/admin/v1/accounts", Some(body.clone())).await;
    assert_eq!(res.status, 201, "create {body}: {}", res.text());
    res.json()
}

async fn usage(gw: &TestGateway, key: &str) -> Value {
    let res = gw.call(key, "GET", "/v1/credits/usage", &[], "").await;
    assert_eq!(res.status, 200, "{}", res.text());
    res.json()
}

fn now() -> i64 {
    creditgate::calendar::now()
}

fn ts(v: &Value) -> i64 {
    let s = v.as_str().unwrap_or_else(|| panic!("not a time string: {v}"));
    creditgate::calendar::parse_rfc3339(s).unwrap_or_else(|| panic!("not RFC 3339: {s}"))
}

/// `YYYY-MM-DD` of a Unix time, UTC.
fn date(t: i64) -> String {
    let (y, m, d) = creditgate::calendar::civil_from_days(t.div_euclid(86_400));
    format!("{y:04}-{m:02}-{d:02}")
}

async fn sleep_past(t: i64) {
    let wait = (t - now() + 1).clamp(0, 10) as u64;
    tokio::time::sleep(Duration::from_millis(wait * 1000 + 300)).await;
}

/// The events among `deliveries` for `account`, parsed, with the shape of SPEC §7 checked.
fn events(deliveries: &[Delivery], account: &str) -> Vec<Value> {
    deliveries
        .iter()
        .map(Delivery::json)
        .filter(|v| v["account_id"] == account)
        .inspect(|v| {
            let keys: BTreeSet<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
            assert_eq!(keys, BTreeSet::from(["id", "type", "account_id", "created_at", "data"]), "event shape: {v}");
            assert!(v["id"].as_str().is_some_and(|id| !id.is_empty()), "{v}");
            let kinds =
                ["credits.low", "credits.exhausted", "credits.renewed", "topup.completed", "auto_topup.purchased"];
            assert!(kinds.contains(&v["type"].as_str().unwrap_or("")), "event type: {v}");
            assert!((ts(&v["created_at"]) - now()).abs() < 600, "created_at is an RFC 3339 time of now: {v}");
            assert!(v["data"].is_object(), "{v}");
        })
        .collect()
}

/// Events of `kind` (distinct ids), in delivery order.
fn of_kind<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    let mut seen = BTreeSet::new();
    events.iter().filter(|e| e["type"] == kind && seen.insert(e["id"].as_str().unwrap().to_owned())).collect()
}

// === GET /v1/credits and the headers ===

async fn credits_shows_the_balance_and_messages_left(store: Store) {
    let env = Env::start(store).await;
    let gw = &env.gw;
    let key = gw.account_with_key("acme", "pro").await;
    for _ in 0..20 {
        assert_eq!(gw.post(&key, CHAT, &[("x-ai-tier", "powerful")], "{}").await.charged(), 5);
    }
    spend(gw, &key, 550).await;

    let res = gw.call(&key, "GET", "/v1/credits", &[], "").await;
    assert_eq!(res.status, 200, "{}", res.text());
    assert!(res.header("content-type").is_some_and(|c| c.starts_with("application/json")));
    let c = res.json();
    let fields: BTreeSet<&str> = c.as_object().unwrap().keys().map(String::as_str).collect();
    for f in [
        "plan",
        "allocation",
        "monthly_remaining",
        "topup_remaining",
        "remaining",
        "used_this_period",
        "period_start",
        "renews_at",
        "low",
        "auto_topup",
        "messages_left",
    ] {
        assert!(fields.contains(f), "GET /v1/credits lacks {f}: {c}");
    }
    let want = json!({
        "plan": "pro", "allocation": 2000, "monthly_remaining": 1350, "topup_remaining": 0, "remaining": 1350,
        "used_this_period": 650, "low": false,
        "messages_left": {"fast": 1350, "balanced": 450, "powerful": 270},
    });
    for (f, v) in want.as_object().unwrap() {
        assert_eq!(&c[f], v, "{f} in {c}");
    }
    assert!(ts(&c["period_start"]) <= now() && now() < ts(&c["renews_at"]), "{c}");
    for f in ["id", "email", "pending_plan", "queue_depth"] {
        assert!(!fields.contains(f), "the customer view has no {f}: {c}");
    }

    // Top-ups count in the remaining and in messages_left, not in the monthly figures.
    assert_eq!(gw.topup("acme", 100, "pay-1").await.status, 201);
    let c = gw.credits(&key).await;
    assert_eq!((c["remaining"].as_u64(), c["topup_remaining"].as_u64()), (Some(1450), Some(100)), "{c}");
    assert_eq!(c["messages_left"], json!({"fast": 1450, "balanced": 483, "powerful": 290}));
    assert_eq!((c["monthly_remaining"].as_u64(), c["used_this_period"].as_u64()), (Some(1350), Some(650)));

    // Without a key there is nothing to see.
    let res = http::send("GET", &gw.url("/v1/credits"), &[], "").await;
    assert_eq!(res.status, 401, "{}", res.text());
    assert_eq!(res.error_type(), "unauthorized");
}

async fn metered_answers_carry_the_credit_headers(store: Store) {
    let env = Env::start(store).await;
    let gw = &env.gw;
    let key = gw.account_with_key("acme", "fifty").await;

    // Every metered answer: charged, remaining after it (as GET shows), low only below 10 %.
    let mut expected_remaining = 50u64;
    for (path, body, cost) in [
        (CHAT, r#"{"tier":"powerful"}"#.to_owned(), 5),
        ("/v1/insights/position", "{}".to_owned(), 5),
        (ENRICH, leads(30), 30),
        ("/v1/campaigns/generate", "{}".to_owned(), 3),
        (CHAT, r#"{"tier":"fast"}"#.to_owned(), 1),
        ("/v1/sentiment", "{}".to_owned(), 1),
    ] {
        let res = gw.post(&key, path, &[], &body).await;
        assert_eq!(res.status, 200, "{path}: {}", res.text());
        expected_remaining -= cost;
        assert_eq!(res.charged(), cost, "{path}");
        assert_eq!(res.header("x-credits-remaining"), Some(expected_remaining.to_string().as_str()), "{path}");
        assert_eq!(gw.remaining(&key).await, expected_remaining);
        // 5 left of 50 is exactly 10 %: not low yet.
        assert_eq!(res.header("x-credits-low"), None, "{path} with {expected_remaining} left");
    }
    assert_eq!(gw.credits(&key).await["low"], false);

    // 4 of 50: below 10 %.
    let res = gw.post(&key, CHAT, &[("x-ai-tier", "fast")], "{}").await;
    assert_eq!((res.charged(), res.header("x-credits-remaining")), (1, Some("4")));
    assert_eq!(res.header("x-credits-low"), Some("true"));
    assert_eq!(gw.credits(&key).await["low"], true);

    // A failed upstream: nothing charged, the headers say so.
    env.up.set(Behaviour::Status(502));
    let res = gw.post(&key, CHAT, &[("x-ai-tier", "fast")], "{}").await;
    assert_eq!(res.status, 502);
    assert_eq!((res.charged(), res.header("x-credits-remaining")), (0, Some("4")), "{:?}", res.headers);
    env.up.set(Behaviour::Echo);

    // Free routes carry no credit headers and touch nothing.
    let res = gw.call(&key, "GET", "/v1/deals/42", &[], "").await;
    assert_eq!(res.status, 200, "{}", res.text());
    for h in ["x-credits-charged", "x-credits-remaining", "x-credits-low"] {
        assert_eq!(res.header(h), None, "free route with {h}");
    }

    // A top-up lifts the flag: 4 + 10 = 14 of 50.
    assert_eq!(gw.topup("acme", 10, "pay-1").await.status, 201);
    let res = gw.post(&key, CHAT, &[("x-ai-tier", "fast")], "{}").await;
    assert_eq!((res.header("x-credits-remaining"), res.header("x-credits-low")), (Some("13"), None));
    assert_eq!(gw.credits(&key).await["low"], false);
}

// === usage ===

async fn usage_by_category_operation_and_day(store: Store) {
    let env = Env::start(store).await;
    let gw = &env.gw;
    // Anchored 10 days ago: the period started then, so the daily series has past days at 0.
    let anchor = now() - 10 * 86_400;
    create(gw, json!({"id": "acme", "plan": "pro", "billing_anchor": creditgate::calendar::rfc3339(anchor)})).await;
    let key = gw.create_key("acme", "user").await;
    let system_key = gw.create_key("acme", "system").await;
    gw.account_with_key("idle", "pro").await;

    // An account with no use: all five categories and every operation at 0.
    let idle_key = gw.create_key("idle", "user").await;
    let u = usage(gw, &idle_key).await;
    assert_eq!(u["total"], 0);
    for c in CATEGORIES {
        assert_eq!(u["by_category"][c], 0, "{c} present as 0: {u}");
    }
    for o in OPERATIONS {
        assert_eq!(u["by_operation"][o], 0, "{o} present as 0: {u}");
    }

    for (path, headers, body, cost) in [
        (CHAT, vec![("x-ai-tier", "fast")], "{}".to_owned(), 1),
        (CHAT, vec![("x-ai-tier", "fast")], "{}".to_owned(), 1),
        (CHAT, vec![], "{}".to_owned(), 3),
        (ENRICH, vec![], leads(4), 4),
        ("/v1/leads/score", vec![], leads(3), 3),
        ("/v1/campaigns/generate", vec![], r#"{"steps":2,"variants":1,"channels":1}"#.to_owned(), 4),
        ("/v1/icebreakers", vec![], leads(2), 2),
        ("/v1/calls/transcribe", vec![], r#"{"audio_url":"http://x/a.mp3"}"#.to_owned(), 2),
        ("/v1/insights/position", vec![], "{}".to_owned(), 5),
        ("/v1/sentiment", vec![], "{}".to_owned(), 1),
    ] {
        let res = gw.post(&key, path, &headers, &body).await;
        assert_eq!((res.status.as_u16(), res.charged()), (200, cost), "{path}: {}", res.text());
    }
    // Free automatic scoring by a system key, and a refunded failure, add nothing.
    let res = gw.post(&system_key, "/v1/leads/score", &[("x-trigger", "automatic")], &leads(50)).await;
    assert_eq!(res.status, 200);
    env.up.set(Behaviour::Status(500));
    let res = gw.post(&key, "/v1/insights/competitive", &[], "{}").await;
    assert_eq!(res.status, 500);
    env.up.set(Behaviour::Echo);

    let u = usage(gw, &key).await;
    let by_category = json!({"AI Chat": 5, "Enrichment": 7, "Campaigns": 6, "Transcription": 2, "Insights": 6});
    for (c, n) in by_category.as_object().unwrap() {
        assert_eq!(&u["by_category"][c], n, "{c}: {u}");
    }
    let by_operation = json!({
        "ai_chat": 5, "lead_enrichment": 4, "lead_scoring_refresh": 3, "campaign_generation": 4, "icebreaker": 2,
        "call_transcription": 2, "insights_position": 5, "insights_competitive": 0, "sentiment_analysis": 1,
    });
    for (o, n) in by_operation.as_object().unwrap() {
        assert_eq!(&u["by_operation"][o], n, "{o}: {u}");
    }
    assert_eq!(u["total"], 26, "{u}");
    assert_eq!(gw.credits(&key).await["used_this_period"], 26);

    // The daily series: every UTC day of the period, in order, zeros included; the use is today.
    let (start, renews) = (ts(&u["period_start"]), ts(&u["renews_at"]));
    assert_eq!(start, anchor, "{u}");
    let daily = u["daily"].as_array().expect("daily");
    let dates: Vec<&str> = daily.iter().map(|d| d["date"].as_str().unwrap()).collect();
    let mut want = Vec::new();
    let mut day = start.div_euclid(86_400);
    while day <= (renews - 1).div_euclid(86_400) {
        want.push(date(day * 86_400));
        day += 1;
    }
    assert_eq!(dates, want, "one entry per day of the period");
    assert!(dates.len() >= 28, "a month of days: {}", dates.len());
    let sum: u64 = daily.iter().map(|d| d["credits"].as_u64().unwrap()).sum();
    assert_eq!(sum, 26, "{daily:?}");
    let today = date(now());
    let today_credits = daily.iter().find(|d| d["date"] == today.as_str()).unwrap()["credits"].as_u64().unwrap();
    let yesterday = date(now() - 86_400);
    for d in daily {
        if d["date"] != today.as_str() && d["date"] != yesterday.as_str() {
            assert_eq!(d["credits"], 0, "no use on {d}");
        }
    }
    assert!(today_credits > 0, "{daily:?}");

    // Six earlier periods, newest first, back to back, nothing used (the account is new).
    let earlier = u["earlier_periods"].as_array().expect("earlier_periods");
    assert_eq!(earlier.len(), 6, "{u}");
    let mut end = start;
    for p in earlier {
        assert_eq!(ts(&p["period_end"]), end, "contiguous: {p}");
        assert!(ts(&p["period_start"]) < end && end - ts(&p["period_start"]) >= 28 * 86_400, "{p}");
        assert_eq!(p["credits"], 0, "{p}");
        end = ts(&p["period_start"]);
    }

    // Admins read the same figures.
    let res = gw.admin_call("GET", "/admin/v1/accounts/acme/usage", None).await;
    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(res.json(), u);
    assert_eq!(gw.admin_call("GET", "/admin/v1/accounts/nobody/usage", None).await.status, 404);
}

// === webhook notifications ===

async fn threshold_events_fire_once_under_200_concurrent_chats(store: Store) {
    let hook = Hook::start("thresholds").await;
    let env = Env::with(store, |b| hook.configure(b)).await;
    // On Redis a second gateway *process* (the real binary) shares the store, the outbox and
    // the traffic; its notifier delivers too.
    let other = if store == Store::Redis { Some(GatewayProcess::start(&env.config).await) } else { None };
    let gw = &env.gw;
    let key = gw.account_with_key("acme", "fifty").await;

    let urls: Vec<String> =
        std::iter::once(gw.url(CHAT)).chain(other.iter().map(|o| format!("{}{CHAT}", o.public))).collect();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let url = urls[i % urls.len()].clone();
            let auth = format!("Bearer {key}");
            tokio::spawn(async move {
                let headers =
                    [("authorization", auth.as_str()), ("content-type", "application/json"), ("x-ai-tier", "fast")];
                http::send("POST", &url, &headers, "{}").await
            })
        })
        .collect();
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    for t in tasks {
        *statuses.entry(t.await.expect("request task").status.as_u16()).or_default() += 1;
    }
    assert_eq!(statuses, BTreeMap::from([(200, 50), (402, 150)]), "50 credits buy 50 fast chats");

    let is_threshold = |e: &Value| e["type"] == "credits.low" || e["type"] == "credits.exhausted";
    hook.receiver
        .wait_until(Duration::from_secs(10), "credits.low 20, credits.low 10 and credits.exhausted", |d| {
            let ids: BTreeSet<String> = d
                .iter()
                .map(Delivery::json)
                .filter(|e| e["account_id"] == "acme" && is_threshold(e))
                .map(|e| e["id"].as_str().unwrap_or_default().to_owned())
                .collect();
            ids.len() >= 3
        })
        .await;
    // Three notifier passes more: nothing else may come.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let delivered = hook.receiver.accepted();
    for d in &delivered {
        hook.verify(d);
        assert_eq!(d.method, "POST");
        assert_eq!(d.path, "/hooks");
        assert!(d.header("content-type").is_some_and(|c| c.starts_with("application/json")), "{:?}", d.headers);
    }
    let all = events(&delivered, "acme");
    let thresholds: Vec<&Value> = all.iter().filter(|e| is_threshold(e)).collect();
    let mut by_id: BTreeMap<&str, Vec<&Value>> = BTreeMap::new();
    for e in &thresholds {
        by_id.entry(e["id"].as_str().unwrap()).or_default().push(e);
    }
    assert_eq!(by_id.len(), 3, "exactly three threshold events: {thresholds:#?}");
    let mut fired: Vec<(String, u64, u64)> = by_id
        .values()
        .map(|copies| {
            assert!(copies.iter().all(|c| c == &copies[0]), "copies of one event are identical: {copies:?}");
            let e = copies[0];
            (
                e["type"].as_str().unwrap().to_owned(),
                e["data"]["threshold"].as_u64().unwrap(),
                e["data"]["remaining"].as_u64().unwrap(),
            )
        })
        .collect();
    fired.sort_by_key(|(_, t, _)| std::cmp::Reverse(*t));
    let kinds: Vec<(&str, u64)> = fired.iter().map(|(k, t, _)| (k.as_str(), *t)).collect();
    assert_eq!(kinds, vec![("credits.low", 20), ("credits.low", 10), ("credits.exhausted", 0)]);
    assert!(fired[0].2 <= 10 && fired[1].2 <= 5 && fired[2].2 == 0, "remaining at or below each threshold: {fired:?}");
    if store == Store::Memory {
        assert_eq!(thresholds.len(), 3, "one instance delivers each event once: {thresholds:#?}");
        let order: Vec<u64> = thresholds.iter().map(|e| e["data"]["threshold"].as_u64().unwrap()).collect();
        assert_eq!(order, vec![20, 10, 0], "delivered in the order they happened");
    }
    // The events are still "once per period": more charges (after a top-up) raise nothing new.
    assert_eq!(gw.topup("acme", 3, "pay-1").await.status, 201);
    for _ in 0..3 {
        assert_eq!(gw.post(&key, CHAT, &[("x-ai-tier", "fast")], "{}").await.status, 200);
    }
    hook.receiver
        .wait_until(Duration::from_secs(10), "topup.completed", |d| {
            d.iter().map(Delivery::json).any(|e| e["type"] == "topup.completed")
        })
        .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let again = events(&hook.receiver.accepted(), "acme");
    let ids: BTreeSet<&str> = again.iter().filter(|e| is_threshold(e)).map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 3, "no second exhausted/low event in the same period");
}

async fn webhook_down_then_up_delivers_each_event_once(store: Store) {
    let hook = Hook::start("downup").await;
    hook.receiver.set_status(503);
    let env = Env::with(store, |b| hook.configure(b)).await;
    let gw = &env.gw;
    let key = gw.account_with_key("acme", "fifty").await;
    spend(gw, &key, 40).await; // 10 left: credits.low 20
    spend(gw, &key, 5).await; // 5 left: credits.low 10
    assert_eq!(gw.topup("acme", 20, "pay-1").await.status, 201); // topup.completed

    // The target is down: the notifier tries, fails, and retries.
    let deadline = Instant::now() + Duration::from_secs(10);
    while hook.receiver.deliveries().len() < 2 {
        assert!(Instant::now() < deadline, "no retry within 10 s: {} attempts", hook.receiver.deliveries().len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(hook.receiver.accepted().is_empty());
    let failed = hook.receiver.deliveries();
    for d in &failed {
        hook.verify(d);
    }

    hook.receiver.set_status(200);
    let accepted =
        hook.receiver.wait_until(Duration::from_secs(10), "the three events after recovery", |d| d.len() >= 3).await;
    assert!(accepted.len() >= 3);
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let accepted = hook.receiver.accepted();
    for d in &accepted {
        hook.verify(d);
    }
    let got = events(&accepted, "acme");
    let summary: Vec<(String, Value)> =
        got.iter().map(|e| (e["type"].as_str().unwrap().to_owned(), e["data"]["threshold"].clone())).collect();
    assert_eq!(
        summary,
        vec![
            ("credits.low".to_owned(), json!(20)),
            ("credits.low".to_owned(), json!(10)),
            ("topup.completed".to_owned(), Value::Null)
        ],
        "each event accepted exactly once, in order"
    );
    let ids: BTreeSet<&str> = got.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 3);
    // Every failed attempt was one of these events, signed the same way as the successful copy.
    for d in &failed {
        let e = d.json();
        assert!(ids.contains(e["id"].as_str().unwrap()), "{e}");
        let ok = accepted.iter().find(|a| a.json()["id"] == e["id"]).unwrap();
        assert_eq!(ok.body, d.body, "a retry sends the same body");
    }
}

/// A receiver that fails five times, then takes the event: the retries come at most
/// `max_backoff_ms` apart (plus one notifier poll), never doubling past the cap, and the event is
/// then delivered once.
async fn retries_never_wait_longer_than_max_backoff(store: Store) {
    const MAX_BACKOFF_MS: u64 = 300;
    let hook = Hook::start("backoff").await;
    hook.receiver.fail_next(5);
    let env = Env::with(store, |b| hook.configure_backoff(b, MAX_BACKOFF_MS)).await;
    let gw = &env.gw;
    gw.create_account("acme", "fifty").await;
    assert_eq!(gw.topup("acme", 20, "pay-1").await.status, 201); // topup.completed
    let accepted =
        hook.receiver.wait_until(Duration::from_secs(30), "the event after 5 failures", |d| !d.is_empty()).await;
    let attempts = hook.receiver.deliveries();
    assert_eq!(attempts.len(), 6, "five failed attempts, then the one taken");
    assert!(attempts.iter().all(|d| d.body == accepted[0].body), "every attempt carries the one event");
    // Uncapped, the waits would double: 0.5, 1, 2, 4 s. Capped, each gap is the cap rounded up to
    // the next notifier poll; the allowance is generous, as this is about the cap, not timing.
    let allowed = Duration::from_millis(MAX_BACKOFF_MS) + creditgate::notify::POLL + Duration::from_millis(700);
    for pair in attempts.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(gap <= allowed, "a retry came {gap:?} after the attempt before it (cap {MAX_BACKOFF_MS} ms)");
    }
}

/// `"created_at":<n>` of an event as stored in a Redis outbox, set to `created_at`.
fn aged(event: &str, created_at: i64) -> String {
    let start = event.find("\"created_at\":").expect("created_at in the event") + "\"created_at\":".len();
    let end = start + event[start..].find(|c: char| !c.is_ascii_digit()).expect("a number");
    format!("{}{created_at}{}", &event[..start], &event[end..])
}

/// Events undelivered for longer than `event_ttl_hours` are dropped, with a log line each and
/// counted in `creditgate_events_expired_total`, and never delivered; a fresh event behind them
/// is. The events are real ones whose age is faked in the store (their `created_at` moved two
/// hours back) while the receiver is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_past_their_ttl_are_dropped_logged_and_counted() {
    let redis = support::redis::RedisServer::start();
    let hook = Hook::start("ttl").await;
    hook.receiver.set_status(503);
    let up = Upstream::echo().await;
    let store = format!("kind = \"redis\"\nurl = \"{}\"", redis.url());
    let config =
        hook.configure(ConfigBuilder::new(&up.url()).store(&store)).notification("event_ttl_hours = 1").build();
    // The child inherits the webhook secret's variable, which Hook set in this process.
    let gw = GatewayProcess::start_with_env(&config, Some("warn"), &[]).await;
    let admin_auth = format!("Bearer {}", support::gateway::ADMIN_TOKEN);
    let admin = |method: &'static str, path: &'static str, body: Value| {
        let (url, auth) = (format!("{}{path}", gw.admin), admin_auth.clone());
        async move {
            let headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
            http::send(method, &url, &headers, body.to_string()).await
        }
    };
    assert_eq!(admin("POST", "/admin/v1/accounts", json!({"id": "acme", "plan": "fifty"})).await.status, 201);
    let key = admin("POST", "/admin/v1/accounts/acme/keys", json!({"role": "user"})).await.json()["key"]
        .as_str()
        .expect("a key")
        .to_owned();
    let auth = format!("Bearer {key}");
    let res = http::send("POST", &format!("{}{ENRICH}", gw.public), &[("authorization", &auth)], leads(45)).await;
    assert_eq!(res.charged(), 45, "{}", res.text()); // credits.low 20 and 10

    // The receiver is down: the events wait in the outbox, where they are aged.
    let outbox = "cg:{acct:acme}:outbox";
    let deadline = Instant::now() + Duration::from_secs(10);
    while hook.receiver.deliveries().is_empty() {
        assert!(Instant::now() < deadline, "no delivery attempt within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let events: Vec<String> = redis.command(&["LRANGE", outbox, "0", "-1"]).lines().map(str::to_owned).collect();
    assert_eq!(events.len(), 2, "{events:?}");
    for (i, event) in events.iter().enumerate() {
        redis.command(&["LSET", outbox, &i.to_string(), &aged(event, now() - 2 * 3_600)]);
    }
    let res = admin("POST", "/admin/v1/accounts/acme/topups", json!({"credits": 20, "payment_ref": "pay-1"})).await;
    assert_eq!(res.status, 201, "{}", res.text()); // topup.completed, fresh
    hook.receiver.set_status(200);

    hook.receiver.wait_until(Duration::from_secs(10), "the fresh event", |d| !d.is_empty()).await;
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let kinds: Vec<String> =
        hook.receiver.accepted().iter().map(|d| d.json()["type"].as_str().unwrap().to_owned()).collect();
    assert_eq!(kinds, ["topup.completed"], "only the fresh event is delivered");
    assert_eq!(redis.command(&["LLEN", outbox]), "0", "the expired events left the outbox");
    assert_eq!(unlabelled_value(&gw.admin, "creditgate_events_expired_total").await, 2.0);
    let log = gw.log();
    assert_eq!(log.matches("event expired undelivered; dropping").count(), 2, "one log line per event:\n{log}");
}

async fn money_events_are_delivered_and_renewal_moves_usage_to_earlier_periods(store: Store) {
    let hook = Hook::start("money").await;
    let env = Env::with(store, |b| hook.configure(b)).await;
    let gw = &env.gw;
    let anchor = now() + 2;
    create(gw, json!({"id": "acme", "plan": "fifty", "billing_anchor": creditgate::calendar::rfc3339(anchor)})).await;
    let key = gw.create_key("acme", "user").await;
    let res =
        gw.call(&key, "PUT", "/v1/credits/auto-topup", &[], r#"{"enabled":true,"threshold":20,"package":"200"}"#).await;
    assert_eq!(res.status, 200, "{}", res.text());

    let res = gw
        .admin_call("POST", "/admin/v1/accounts/acme/topups", Some(json!({"package": "500", "payment_ref": "inv-77"})))
        .await;
    assert_eq!(res.status, 201, "{}", res.text());
    let res = spend(gw, &key, 531).await; // 550 → 19: crosses 20, buys 200
    assert_eq!(res.header("x-credits-auto-topup"), Some("200"));
    let before = usage(gw, &key).await;
    assert_eq!(before["total"], 531);

    sleep_past(anchor).await;
    // Renewal is visible at once, and moves this period's usage into the earlier periods.
    let c = gw.credits(&key).await;
    assert_eq!((c["monthly_remaining"].as_u64(), c["topup_remaining"].as_u64()), (Some(50), Some(219)), "{c}");
    let after = usage(gw, &key).await;
    assert_eq!(after["total"], 0, "{after}");
    assert!(CATEGORIES.iter().all(|c| after["by_category"][c] == 0), "{after}");
    assert_eq!(ts(&after["period_start"]), anchor);
    let earlier = after["earlier_periods"].as_array().unwrap();
    assert_eq!(earlier.len(), 6);
    assert_eq!((ts(&earlier[0]["period_end"]), earlier[0]["credits"].as_u64()), (anchor, Some(531)), "{after}");
    assert_eq!(earlier[0]["period_start"], before["period_start"]);
    assert!(earlier[1..].iter().all(|p| p["credits"] == 0), "{after}");

    let delivered = hook
        .receiver
        .wait_until(Duration::from_secs(10), "topup.completed, auto_topup.purchased and credits.renewed", |d| {
            let kinds: BTreeSet<String> =
                d.iter().map(|x| x.json()["type"].as_str().unwrap_or("").to_owned()).collect();
            ["topup.completed", "auto_topup.purchased", "credits.renewed"].iter().all(|k| kinds.contains(*k))
        })
        .await;
    for d in &delivered {
        hook.verify(d);
    }
    let got = events(&delivered, "acme");
    let topup = of_kind(&got, "topup.completed");
    assert_eq!(topup.len(), 1, "{got:#?}");
    let d = &topup[0]["data"];
    assert_eq!(
        (d["credits"].as_u64(), d["payment_ref"].as_str(), d["package"].as_str()),
        (Some(500), Some("inv-77"), Some("500")),
        "{d}"
    );
    let auto = of_kind(&got, "auto_topup.purchased");
    assert_eq!(auto.len(), 1, "{got:#?}");
    let d = &auto[0]["data"];
    assert_eq!((d["package"].as_str(), d["credits"].as_u64()), (Some("200"), Some(200)), "{d}");
    assert_eq!(d["price_eur"].as_f64(), Some(10.0), "priced for invoicing: {d}");
    let renewed = of_kind(&got, "credits.renewed");
    assert_eq!(renewed.len(), 1, "{got:#?}");
    let d = &renewed[0]["data"];
    assert_eq!((d["plan"].as_str(), d["allocation"].as_u64()), (Some("fifty"), Some(50)), "{d}");
    let low = of_kind(&got, "credits.low");
    assert!(low.is_empty(), "the auto top-up kept the balance above every threshold: {low:?}");
}

/// A mail relay that is down must not hold back the webhook: the channels are independent, and
/// an account with an e-mail address still gets its events to the webhook (SPEC §7).
async fn a_mail_relay_that_is_down_does_not_hold_back_webhooks(store: Store) {
    let hook = Hook::start("relaydown").await;
    let refused = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let smtp =
        format!("smtp = {{ host = \"127.0.0.1\", port = {refused}, from = \"creditgate <billing@example.test>\" }}");
    let env = Env::with(store, |b| hook.configure(b).notification(&smtp)).await;
    let gw = &env.gw;
    create(gw, json!({"id": "acme", "plan": "fifty", "email": "owner@acme.test"})).await;
    assert_eq!(gw.topup("acme", 10, "pay-1").await.status, 201);
    assert_eq!(gw.topup("acme", 20, "pay-2").await.status, 201);

    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let got = events(&hook.receiver.accepted(), "acme");
        let refs: BTreeSet<&str> = got.iter().filter_map(|e| e["data"]["payment_ref"].as_str()).collect();
        if refs.len() == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "with the SMTP relay down, the webhook got {} deliveries in 6 s, covering only {refs:?} of \
             the two topup.completed events: a failing mail channel holds back (and repeats) webhooks",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `webhook_secret_env` naming a variable that is not set: the gateway must not quietly send
/// unsigned webhooks — it refuses to start naming the key, or never sends without a signature.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unset_webhook_secret_never_means_unsigned_webhooks() {
    let receiver = WebhookReceiver::start().await;
    let up = Upstream::echo().await;
    let var = format!("CREDITGATE_TEST_NEVER_SET_{}", std::process::id());
    let config = ConfigBuilder::new(&up.url())
        .notification(&format!("webhook_url = \"{}\"", receiver.url()))
        .notification(&format!("webhook_secret_env = \"{var}\""))
        .build();
    let config = creditgate::config::Config::parse(&config).expect("config parses");
    let opts = creditgate::server::StartOptions {
        admin_token: Some(support::gateway::ADMIN_TOKEN.into()),
        ..Default::default()
    };
    let gateway = match creditgate::server::start(config, opts).await {
        Err(e) => {
            assert!(e.to_string().contains("webhook_secret_env"), "the refusal names the key: {e}");
            return;
        }
        Ok(g) => g,
    };
    let gw = TestGateway::from_running(gateway);
    gw.create_account("acme", "fifty").await;
    assert_eq!(gw.topup("acme", 10, "pay-1").await.status, 201);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let unsigned: Vec<String> = receiver
        .deliveries()
        .iter()
        .filter(|d| d.header("x-creditgate-signature").is_none())
        .map(|d| String::from_utf8_lossy(&d.body).into_owned())
        .collect();
    assert!(
        unsigned.is_empty(),
        "webhook_secret_env names the unset variable {var}, and the gateway started and sent {} \
         unsigned webhook(s): {unsigned:?}",
        unsigned.len()
    );
}

// === e-mail ===

async fn emails_carry_the_subject_and_figures(store: Store) {
    let smtp = SmtpReceiver::start().await;
    let line = format!(
        "smtp = {{ host = \"127.0.0.1\", port = {}, from = \"creditgate <billing@example.test>\" }}",
        smtp.port()
    );
    let env = Env::with(store, |b| b.notification(&line)).await;
    let gw = &env.gw;
    create(gw, json!({"id": "acme", "plan": "fifty", "email": "owner@acme.test"})).await;
    let key = gw.create_key("acme", "user").await;
    // An account without an address gets no mail.
    let silent = gw.account_with_key("silent", "fifty").await;
    spend(gw, &silent, 50).await;

    spend(gw, &key, 40).await;
    spend(gw, &key, 5).await;
    spend(gw, &key, 5).await;
    assert_eq!(
        gw.admin_call(
            "POST",
            "/admin/v1/accounts/acme/topups",
            Some(json!({"package": "200", "payment_ref": "inv-9"}))
        )
        .await
        .status,
        201
    );

    let mails = smtp.wait_until(Duration::from_secs(15), "four messages", |m| m.len() >= 4).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mails = if smtp.mails().len() > mails.len() { smtp.mails() } else { mails };
    let subjects: Vec<String> = mails.iter().map(|m| m.subject()).collect();
    assert_eq!(
        subjects,
        vec![
            "Your AI credits are running low: 10 left",
            "Your AI credits are running low: 5 left",
            "You're out of AI credits",
            "Top-up received: 200 credits",
        ],
        "one message per event, in order, none for the account without an address"
    );
    for m in &mails {
        assert_eq!(m.from, "billing@example.test");
        assert_eq!(m.to, vec!["owner@acme.test".to_owned()]);
        assert!(m.header("from").is_some_and(|f| f.contains("billing@example.test")), "{:?}", m.header("from"));
        assert!(m.header("to").is_some_and(|t| t.contains("owner@acme.test")), "{:?}", m.header("to"));
    }
    let renews = gw.credits(&key).await["renews_at"].clone();
    let renew_day = {
        let (y, m, d) = creditgate::calendar::civil_from_days(ts(&renews).div_euclid(86_400));
        let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
        format!("{d} {} {y}", months[(m - 1) as usize])
    };
    let text: Vec<String> = mails.iter().map(|m| m.text()).collect();
    assert!(text[0].contains("10 of its 50") && text[0].contains("20%"), "{}", text[0]);
    assert!(text[0].contains(&renew_day), "renewal date {renew_day} in: {}", text[0]);
    assert!(text[1].contains("5 of its 50") && text[1].contains("10%"), "{}", text[1]);
    assert!(text[2].contains(&renew_day) && text[2].contains("acme"), "{}", text[2]);
    assert!(text[3].contains("200") && text[3].contains("inv-9"), "{}", text[3]);
    for t in &text {
        assert!(t.contains("Event id: evt_"), "the event id, for support: {t}");
    }
}

// === /metrics ===

/// One sample of the exposition.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed exposition: metric families by name (with their type) and every sample.
#[derive(Debug, Default)]
struct Exposition {
    types: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

impl Exposition {
    /// The value of the sample `name` whose labels include all of `labels`; 0 when none.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
            .map(|s| s.value)
            .sum()
    }

    fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }
}

fn valid_metric_name(s: &str) -> bool {
    let mut b = s.bytes();
    b.next().is_some_and(|c| c.is_ascii_alphabetic() || c == b'_' || c == b':')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b':')
}

fn valid_label_name(s: &str) -> bool {
    let mut b = s.bytes();
    b.next().is_some_and(|c| c.is_ascii_alphabetic() || c == b'_') && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ if s.bytes().all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b)) => {
            s.parse().map_err(|e| format!("value {s:?}: {e}"))
        }
        _ => Err(format!("value {s:?} is not a number")),
    }
}

/// `{a="x",b="y"}` at the start of `s` → labels and the rest after `}`.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').ok_or("labels must start with {")?;
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').ok_or_else(|| format!("label without = in {s:?}"))?;
        let name = &rest[..eq];
        if !valid_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..].strip_prefix('"').ok_or_else(|| format!("label {name} value not quoted"))?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err(format!("unterminated label value in {s:?}")),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape {other:?} in {s:?}")),
                },
                Some((_, '\n')) => return Err("newline in label value".into()),
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(name.to_owned(), value).is_some() {
            return Err(format!("label {name} twice in {s:?}"));
        }
        rest = &rest[end + 1..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.starts_with('}') {
            return Err(format!("expected , or }} after label {name} in {s:?}"));
        }
    }
}

/// A strict parser of the Prometheus / OpenMetrics text format: every line is `# HELP`,
/// `# TYPE`, `# UNIT`, a final `# EOF`, or a sample `name{labels} value [timestamp]` of a family
/// declared before it, with a suffix its type allows; no series twice; histograms cumulative
/// with a `+Inf` bucket equal to `_count`.
fn parse_exposition(text: &str) -> Result<Exposition, String> {
    const TYPES: [&str; 9] =
        ["counter", "gauge", "histogram", "summary", "untyped", "unknown", "info", "stateset", "gaugehistogram"];
    let mut out = Exposition::default();
    let mut helps = BTreeSet::new();
    let mut series = BTreeSet::new();
    let mut eof = false;
    let body = text.strip_suffix('\n').ok_or("the exposition must end with a newline")?;
    for (n, line) in body.split('\n').enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if eof {
            return Err(at("content after # EOF".into()));
        }
        if line.is_empty() {
            return Err(at("empty line".into()));
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut parts = comment.trim_start_matches(' ').splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("EOF"), None, None) => eof = true,
                (Some("HELP"), Some(name), _) if valid_metric_name(name) => {
                    if !helps.insert(name.to_owned()) {
                        return Err(at("HELP twice".into()));
                    }
                }
                (Some("TYPE"), Some(name), Some(kind)) if valid_metric_name(name) => {
                    if !TYPES.contains(&kind) {
                        return Err(at(format!("unknown type {kind}")));
                    }
                    if out.types.insert(name.to_owned(), kind.to_owned()).is_some() {
                        return Err(at("TYPE twice".into()));
                    }
                    if out.samples.iter().any(|s| s.name.starts_with(name)) {
                        return Err(at("TYPE after samples of the family".into()));
                    }
                }
                (Some("UNIT"), Some(name), Some(_)) if valid_metric_name(name) => {}
                _ => return Err(at("not a HELP, TYPE, UNIT or EOF line".into())),
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        if !valid_metric_name(name) {
            return Err(at(format!("bad metric name {name:?}")));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(at)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let rest = rest.strip_prefix(' ').ok_or_else(|| at("no space before the value".into()))?;
        let mut fields = rest.split(' ');
        let value = parse_value(fields.next().unwrap_or_default()).map_err(at)?;
        if let Some(ts) = fields.next() {
            parse_value(ts).map_err(at)?;
        }
        if fields.next().is_some() {
            return Err(at("trailing fields".into()));
        }
        // The family: the name itself, or the name less a suffix its type allows.
        let family = out
            .types
            .iter()
            .find(|(family, kind)| {
                let suffixes: &[&str] = match kind.as_str() {
                    "counter" => &["_total", "_created", ""],
                    "histogram" | "gaugehistogram" => &["_bucket", "_count", "_sum", "_created", "_gcount", "_gsum"],
                    "summary" => &["_count", "_sum", "_created", ""],
                    "info" => &["_info"],
                    _ => &[""],
                };
                suffixes.iter().any(|s| name.strip_suffix(s) == Some(family.as_str()))
            })
            .map(|(f, _)| f.clone())
            .ok_or_else(|| at(format!("sample {name} of no declared family")))?;
        if out.types[&family].contains("histogram") && name.ends_with("_bucket") && !labels.contains_key("le") {
            return Err(at("bucket without le".into()));
        }
        if !series.insert((name.to_owned(), labels.clone())) {
            return Err(at("series twice".into()));
        }
        out.samples.push(Sample { name: name.to_owned(), labels, value });
    }
    // Histograms: per label set, cumulative buckets ending in +Inf = _count.
    for (family, kind) in &out.types {
        if kind != "histogram" {
            continue;
        }
        let mut sets: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> = BTreeMap::new();
        for s in out.samples.iter().filter(|s| s.name == format!("{family}_bucket")) {
            let mut key = s.labels.clone();
            let le = parse_value(&key.remove("le").unwrap())?;
            sets.entry(key).or_default().push((le, s.value));
        }
        for (labels, buckets) in sets {
            let mut last = (f64::NEG_INFINITY, 0.0);
            for &(le, count) in &buckets {
                if le <= last.0 || count < last.1 {
                    return Err(format!("{family}{labels:?}: buckets not cumulative: {buckets:?}"));
                }
                last = (le, count);
            }
            if last.0 != f64::INFINITY {
                return Err(format!("{family}{labels:?}: no +Inf bucket"));
            }
            let count = out
                .samples
                .iter()
                .find(|s| s.name == format!("{family}_count") && s.labels == labels)
                .ok_or_else(|| format!("{family}{labels:?}: no _count"))?;
            if count.value != last.1 {
                return Err(format!("{family}{labels:?}: +Inf bucket {} != count {}", last.1, count.value));
            }
        }
    }
    Ok(out)
}

#[test]
fn the_exposition_parser_is_strict() {
    let good = "# HELP x_total Things.\n# TYPE x counter\nx_total{a=\"1\",b=\"q\\\"\"} 3\n\
                # TYPE h histogram\nh_bucket{le=\"0.5\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.7\nh_count 2\n# EOF\n";
    let e = parse_exposition(good).expect("valid");
    assert_eq!(e.value("x_total", &[("b", "q\"")]), 3.0);
    for bad in [
        "x 1\n",                                                                          // no family
        "# TYPE x gauge\nx{a=1} 1\n",                                                     // unquoted label
        "# TYPE x gauge\nx one\n",                                                        // not a number
        "# TYPE x gauge\nx 1\nx 2\n",                                                     // series twice
        "# TYPE x gauge\n9x 1\n",                                                         // bad name
        "# TYPE x gauge\nx 1",                                                            // no final newline
        "# TYPE x gauge\n\nx 1\n",                                                        // empty line
        "# random comment\n",                                                             // not HELP/TYPE
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n", // not cumulative
        "# TYPE x gauge\nx 1\n# EOF\nx 2\n",                                              // after EOF
    ] {
        assert!(parse_exposition(bad).is_err(), "accepted: {bad:?}");
    }
}

async fn metrics_text(admin: &str) -> (Response, Exposition) {
    let res = http::send("GET", &format!("{admin}/metrics"), &[], "").await;
    assert_eq!(res.status, 200, "GET /metrics needs no token: {}", res.text());
    let parsed =
        parse_exposition(&res.text()).unwrap_or_else(|e| panic!("/metrics does not parse: {e}\n{}", res.text()));
    (res, parsed)
}

/// The value of the unlabelled sample `name` in `/metrics`, read without the strict parser (so a
/// gauge test does not depend on the rest of the exposition); panics when absent.
async fn unlabelled_value(admin: &str, name: &str) -> f64 {
    let res = http::send("GET", &format!("{admin}/metrics"), &[], "").await;
    assert_eq!(res.status, 200, "{}", res.text());
    let text = res.text();
    let line =
        text.lines().find(|l| l.split(' ').next() == Some(name)).unwrap_or_else(|| panic!("no {name} in:\n{text}"));
    parse_value(line.split(' ').nth(1).unwrap_or_default()).unwrap_or_else(|e| panic!("{e}"))
}

async fn metrics_parse_and_carry_no_account_data(store: Store) {
    let env = Env::start(store).await;
    let gw = &env.gw;
    let account = "acct-7f3e-secret-customer";
    let key = gw.account_with_key(account, "fifty").await;
    for _ in 0..3 {
        assert_eq!(gw.post(&key, CHAT, &[("x-ai-tier", "powerful")], "{}").await.status, 200);
    }
    spend(gw, &key, 4).await;
    assert_eq!(gw.call(&key, "GET", "/v1/deals/9", &[], "").await.status, 200);
    env.up.set(Behaviour::Status(500));
    assert_eq!(gw.post(&key, "/v1/insights/position", &[], "{}").await.status, 500);
    env.up.set(Behaviour::Echo);
    let res = gw.post(&key, ENRICH, &[], &leads(40)).await;
    assert_eq!(res.status, 402, "{}", res.text());

    let (res, m) = metrics_text(&gw.admin).await;
    let text = res.text();
    assert!(
        res.header("content-type").is_some_and(|c| c.contains("text/plain") || c.contains("openmetrics")),
        "{:?}",
        res.headers
    );
    for (family, kind) in [
        ("creditgate_requests", "counter"),
        ("creditgate_credits_charged", "counter"),
        ("creditgate_credits_refunded", "counter"),
        ("creditgate_payment_required", "counter"),
        ("creditgate_store_seconds", "histogram"),
        ("creditgate_upstream_seconds", "histogram"),
        ("creditgate_jobs_queued", "gauge"),
        ("creditgate_jobs_running", "gauge"),
        ("creditgate_outbox_depth", "gauge"),
    ] {
        let declared = m.types.get(family).or_else(|| m.types.get(&format!("{family}_total")));
        assert_eq!(declared.map(String::as_str), Some(kind), "{family} declared as {kind}:\n{text}");
    }
    let requests = "creditgate_requests_total";
    assert_eq!(m.value(requests, &[("operation", "ai_chat"), ("status", "200")]), 3.0, "\n{text}");
    assert_eq!(m.value(requests, &[("operation", "lead_enrichment"), ("status", "200")]), 1.0);
    assert_eq!(m.value(requests, &[("operation", "lead_enrichment"), ("status", "402")]), 1.0);
    assert_eq!(m.value(requests, &[("operation", "insights_position"), ("status", "500")]), 1.0);
    assert_eq!(m.value(requests, &[("operation", "free"), ("status", "200")]), 1.0);
    assert_eq!(m.value("creditgate_credits_charged_total", &[("category", "AI Chat")]), 15.0);
    assert_eq!(m.value("creditgate_credits_charged_total", &[("category", "Enrichment")]), 4.0);
    assert_eq!(m.value("creditgate_credits_charged_total", &[("category", "Insights")]), 5.0, "charged, then refunded");
    assert_eq!(m.value("creditgate_credits_refunded_total", &[("category", "Insights")]), 5.0);
    assert_eq!(m.value("creditgate_payment_required_total", &[("operation", "lead_enrichment")]), 1.0);
    assert!(m.value("creditgate_store_seconds_count", &[]) >= 6.0, "store steps timed:\n{text}");
    assert!(m.value("creditgate_upstream_seconds_count", &[]) >= 6.0, "upstream calls timed:\n{text}");
    assert!(m.has("creditgate_store_seconds_bucket") && m.has("creditgate_upstream_seconds_sum"));

    // Low cardinality and no account data: only known label names (upstream and backend are the
    // operator's own config names and URLs); no id, key or path in any.
    let allowed = BTreeSet::from(["operation", "status", "category", "le", "upstream", "backend"]);
    for s in &m.samples {
        for (k, v) in &s.labels {
            assert!(allowed.contains(k.as_str()), "unexpected label {k} on {}", s.name);
            assert!(!v.contains(account) && !v.contains("acct-") && !v.starts_with('/'), "{}{{{k}={v:?}}}", s.name);
        }
    }
    assert!(!text.contains(account) && !text.contains(&key[3..]), "the exposition mentions the account or key");
}

async fn jobs_gauge_counts_queued_jobs(store: Store) {
    let env = Env::start(store).await;
    let gw = &env.gw;
    let key = gw.account_with_key("acme", "fifty").await;
    spend(gw, &key, 50).await;
    // A queued job shows in the jobs gauge.
    let res = gw.post(&key, "/v1/calls/transcribe", &[], r#"{"audio_url":"http://x/a.mp3"}"#).await;
    assert_eq!(res.status, 202, "{}", res.text());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if unlabelled_value(&gw.admin, "creditgate_jobs_queued").await >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "creditgate_jobs_queued never showed the queued job");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn outbox_gauge_counts_undelivered_events(store: Store) {
    let env = Env::start(store).await;
    let gw = &env.gw;
    let key = gw.account_with_key("acme", "fifty").await;
    // Two credits.low events and credits.exhausted are written.
    spend(gw, &key, 50).await;

    // Undelivered events are counted: with no webhook and no SMTP configured, those three
    // events wait in the outbox.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let depth = unlabelled_value(&gw.admin, "creditgate_outbox_depth").await;
        if depth >= 3.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "creditgate_outbox_depth is {depth} after 5 s although this account's credits.low and \
             credits.exhausted events are undelivered (no webhook, no SMTP configured)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// === probes ===

/// `notifications.max_outbox_per_account = 3` with the webhook receiver down (nothing listens on
/// its port) and five events: the two oldest are dropped in the appending step, counted in
/// `creditgate_outbox_dropped_total` and logged (one line per outbox read that found drops, not
/// one per event); once a receiver listens there, exactly the three newest arrive. The gateway is
/// the real binary, so the log is its own.
async fn a_full_outbox_drops_its_oldest_events_and_says_so(store: Store) {
    let hook = Hook::start("cap").await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let up = Upstream::echo().await;
    let redis = (store == Store::Redis).then(support::redis::RedisServer::start);
    let mut builder = ConfigBuilder::new(&up.url())
        .notification(&format!("webhook_url = \"http://127.0.0.1:{port}/hooks\""))
        .notification(&format!("webhook_secret_env = \"{}\"", hook.var))
        .notification("max_backoff_ms = 300")
        .notification("max_outbox_per_account = 3");
    if let Some(r) = &redis {
        builder = builder.store(&format!("kind = \"redis\"\nurl = \"{}\"", r.url()));
    }
    // The child inherits the webhook secret's variable, which Hook set in this process.
    let gw = GatewayProcess::start_with_env(&builder.build(), Some("warn"), &[]).await;
    let admin = |path: &'static str, body: Value| support::process::admin(&gw.admin, "POST", path, Some(body));
    assert_eq!(admin("/admin/v1/accounts", json!({"id": "acme", "plan": "big"})).await.status, 201);
    for i in 1..=5 {
        let res =
            admin("/admin/v1/accounts/acme/topups", json!({"credits": 10, "payment_ref": format!("pay-{i}")})).await;
        assert_eq!(res.status, 201, "{}", res.text()); // topup.completed
    }

    let deadline = Instant::now() + Duration::from_secs(10);
    while unlabelled_value(&gw.admin, "creditgate_outbox_dropped_total").await < 2.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1_200)).await; // a few more notifier passes
    assert_eq!(unlabelled_value(&gw.admin, "creditgate_outbox_dropped_total").await, 2.0, "the two oldest, once");
    let log = gw.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("outbox full")).collect();
    let logged: u64 = lines
        .iter()
        .map(|l| {
            let at = l.find("dropped=").unwrap_or_else(|| panic!("the line says how many: {l}")) + "dropped=".len();
            l[at..].split(|c: char| !c.is_ascii_digit()).next().unwrap().parse::<u64>().unwrap()
        })
        .sum();
    assert_eq!(logged, 2, "the drop is logged, counting each event once:\n{log}");
    assert!((1..=2).contains(&lines.len()), "not one line per event:\n{log}");

    // A receiver comes up on the port: the three newest events arrive, nothing else.
    let receiver = WebhookReceiver::start_on(port).await;
    let refs = |got: &[Delivery]| -> BTreeSet<String> {
        got.iter().map(|d| d.json()["data"]["payment_ref"].as_str().expect("a top-up event").to_owned()).collect()
    };
    receiver.wait_until(Duration::from_secs(10), "three events", |got| refs(got).len() >= 3).await;
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let got = receiver.accepted();
    for d in &got {
        hook.verify(d);
    }
    assert_eq!(refs(&got), BTreeSet::from(["pay-3", "pay-4", "pay-5"].map(String::from)), "exactly the 3 newest");
    assert_eq!(unlabelled_value(&gw.admin, "creditgate_outbox_depth").await, 0.0);
}

async fn probes_need_no_token(store: Store) {
    let mut env = Env::start(store).await;
    let admin = env.gw.admin.clone();
    let res = http::send("GET", &format!("{admin}/healthz"), &[], "").await;
    assert_eq!(res.status, 200, "{}", res.text());
    let res = http::send("GET", &format!("{admin}/readyz"), &[], "").await;
    assert_eq!(res.status, 200, "{}", res.text());
    let v = res.json();
    assert_eq!(v["store"], if store == Store::Redis { "redis" } else { "memory" }, "{v}");
    assert_eq!(http::send("GET", &format!("{admin}/metrics"), &[], "").await.status, 200);
    // The probes are not on the public listener's customer surface with account data.
    assert!(!res.text().contains("acme"));

    if store == Store::Redis {
        // Readiness includes the store: with Redis gone, not ready; alive all the same.
        drop(env.redis.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let res = http::send("GET", &format!("{admin}/readyz"), &[], "").await;
            if res.status == 503 {
                break;
            }
            assert!(Instant::now() < deadline, "/readyz still {} with Redis down", res.status);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(http::send("GET", &format!("{admin}/healthz"), &[], "").await.status, 200);
    }
}
