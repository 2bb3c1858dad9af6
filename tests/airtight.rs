//! Airtight metering, tried as a hostile client would: no AI work without its price.
//!
//! Idempotency-Key repeats are answered from the store and never reach the backend (also at 0
//! credits, also as concurrent copies on two instances); a queued request with a key is one job;
//! hang-ups keep the charge once the backend has the request and refund it before; refunds follow
//! each operation's `refund_on`.

mod support;

use std::time::Duration;

use bytes::Bytes;
use support::gateway::{ConfigBuilder, TestGateway, spend};
use support::http;
use support::stores::{Env, Store};
use support::upstream::{Behaviour, Upstream, refused_url};

const CHAT: &str = "/v1/chat/completions";
const TRANSCRIBE: &str = "/v1/calls/transcribe";

/// Sends the same powerful chat request with an Idempotency-Key `n` times after the first.
async fn repeats(gw: &TestGateway, key: &str, idem: &str, n: usize) -> Vec<http::Response> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(gw.post(key, CHAT, &[("idempotency-key", idem), ("x-ai-tier", "powerful")], "{}").await);
    }
    out
}

async fn repeats_are_replayed_from_the_store_never_forwarded(store: Store) {
    let env = Env::with(store, |b| b).await;
    let (gw, up) = (&env.gw, &env.up);
    let key = gw.account_with_key("acme", "fifty").await;
    up.set(Behaviour::EchoWith(vec![("x-model", "big-model"), ("set-cookie", "a=1")]));
    let first = gw.post(&key, CHAT, &[("idempotency-key", "order-1"), ("x-ai-tier", "powerful")], "{}").await;
    assert_eq!((first.status.as_u16(), first.charged()), (200, 5), "{}", first.text());
    assert_eq!(first.header("x-idempotent-replay"), None);
    // The answer is kept once the first request ended; repeats replay it, byte for byte.
    let replays = repeats(gw, &key, "order-1", 100).await;
    for r in &replays {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.body, first.body, "byte-identical body");
        assert_eq!((r.header("x-idempotent-replay"), r.charged()), (Some("true"), 0));
        assert_eq!((r.header("x-model"), r.header("set-cookie")), (Some("big-model"), Some("a=1")));
        assert_eq!(r.header("content-type"), first.header("content-type"));
        assert_eq!(r.header("x-credits-remaining"), Some("45"));
    }
    assert_eq!(up.count(), 1, "100 repeats = 1 backend call");
    // At 0 credits a repeat is still the stored answer (it was paid), not a 402 and not a call.
    spend(gw, &key, 45).await;
    let at_zero = repeats(gw, &key, "order-1", 3).await;
    for r in at_zero {
        assert_eq!((r.status.as_u16(), r.charged(), &r.body), (200, 0, &first.body));
        assert_eq!(r.header("x-credits-remaining"), Some("0"));
    }
    assert_eq!(up.count(), 2, "only the spend reached the backend besides the first");
    assert_eq!(gw.remaining(&key).await, 0);
}

async fn an_upstream_error_answer_that_was_charged_is_replayed_too(store: Store) {
    // `lead_enrichment` keeps its charge on a 4xx: that answer is the request's answer.
    let env = Env::with(store, |b| b).await;
    let (gw, up) = (&env.gw, &env.up);
    let key = gw.account_with_key("acme", "big").await;
    up.set(Behaviour::Status(422));
    let body = r#"{"leads":[1,2]}"#;
    let first = gw.post(&key, "/v1/leads/enrich", &[("idempotency-key", "e-1")], body).await;
    assert_eq!((first.status.as_u16(), first.charged()), (422, 2));
    up.set(Behaviour::Echo);
    let again = gw.post(&key, "/v1/leads/enrich", &[("idempotency-key", "e-1")], body).await;
    assert_eq!((again.status.as_u16(), again.charged(), &again.body), (422, 0, &first.body));
    assert_eq!(up.count(), 1);
}

async fn concurrent_copies_on_two_instances_reach_the_backend_once(store: Store) {
    let env = Env::with(store, |b| b).await;
    // Two instances share a balance only through Redis; on the embedded store all copies go to one.
    let second = match store {
        Store::Redis => Some(env.second_instance().await),
        Store::Memory => None,
    };
    let second_url = second.as_ref().map_or_else(|| env.gw.url(CHAT), |g| g.url(CHAT));
    let key = env.gw.account_with_key("acme", "big").await;
    env.up.set(Behaviour::Delay(Duration::from_millis(300)));
    let auth = format!("Bearer {key}");
    let urls: Vec<String> = (0..12).map(|i| if i % 2 == 0 { env.gw.url(CHAT) } else { second_url.clone() }).collect();
    let copies = urls.into_iter().map(|url| {
        let auth = auth.clone();
        tokio::spawn(async move {
            let headers = [("authorization", auth.as_str()), ("idempotency-key", "burst"), ("x-ai-tier", "powerful")];
            http::send("POST", &url, &headers, "{}").await
        })
    });
    let results: Vec<http::Response> =
        futures_util::future::join_all(copies).await.into_iter().map(|r| r.expect("task")).collect();
    let paid: Vec<_> = results.iter().filter(|r| r.charged() == 5).collect();
    assert_eq!(paid.len(), 1, "one copy pays");
    for r in &results {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.body, paid[0].body, "every copy gets the one answer");
    }
    assert_eq!(env.up.count(), 1, "12 concurrent copies on two instances: 1 backend call");
    assert_eq!(env.gw.remaining(&key).await, 9_995);
}

on_both_stores!(
    repeats_are_replayed_from_the_store_never_forwarded,
    an_upstream_error_answer_that_was_charged_is_replayed_too,
    concurrent_copies_on_two_instances_reach_the_backend_once,
    queued_request_with_a_key_is_one_job_charged_once,
    free_automatic_refreshes_are_counted_and_capped,
    saving_auto_topup_again_below_the_threshold_buys_nothing_more,
);

#[tokio::test]
async fn a_streamed_answer_is_replayed_whole() {
    let up = Upstream::start(Behaviour::Stream).await;
    let gw = TestGateway::with_upstream(&up.url()).await;
    let key = gw.account_with_key("acme", "big").await;
    let gate = up.stream_gate();
    let (url, auth) = (gw.url(CHAT), format!("Bearer {key}"));
    let first = tokio::spawn(async move {
        let headers = [("authorization", auth.as_str()), ("idempotency-key", "sse-1"), ("x-ai-tier", "fast")];
        http::send("POST", &url, &headers, "{}").await
    });
    for chunk in ["data: {\"delta\":\"Hel\"}\n\n", "data: {\"delta\":\"lo\"}\n\n", "data: [DONE]\n\n"] {
        gate.send(chunk);
    }
    gate.finish();
    let first = first.await.unwrap();
    assert_eq!((first.status.as_u16(), first.charged()), (200, 1));
    let replay = wait_for_replay(&gw, &key, "sse-1").await;
    assert_eq!(replay.body, first.body, "the whole event stream");
    assert_eq!(replay.header("content-type"), Some("text/event-stream"));
    assert_eq!(up.count(), 1);
}

/// Repeats a fast chat with `idem` until it is a replay (the answer is stored just after the first
/// one ended, so a repeat at that instant may briefly wait for it).
async fn wait_for_replay(gw: &TestGateway, key: &str, idem: &str) -> http::Response {
    let res = gw.post(key, CHAT, &[("idempotency-key", idem), ("x-ai-tier", "fast")], "{}").await;
    assert_eq!(res.header("x-idempotent-replay"), Some("true"), "{} {}", res.status, res.text());
    res
}

#[tokio::test]
async fn an_answer_too_large_to_keep_makes_repeats_409_key_reused() {
    let up = Upstream::echo().await;
    let config = ConfigBuilder::new(&up.url()).extra("[idempotency]\nmax_stored_bytes = 10\n").build();
    let gw = TestGateway::start(&config).await;
    let key = gw.account_with_key("acme", "big").await;
    let idem = [("idempotency-key", "big-answer"), ("x-ai-tier", "powerful")];
    let first = gw.post(&key, CHAT, &idem, "{}").await;
    assert_eq!((first.status.as_u16(), first.charged()), (200, 5));
    assert!(first.body.len() > 10);
    for _ in 0..3 {
        let again = gw.post(&key, CHAT, &idem, "{}").await;
        assert_eq!(again.status, 409, "{}", again.text());
        assert_eq!(again.error_type(), "idempotency_key_reused");
    }
    assert_eq!(up.count(), 1, "never forwarded again");
    assert_eq!(gw.remaining(&key).await, 9_995);
}

#[tokio::test]
async fn a_copy_that_waits_too_long_gets_409_in_progress_with_retry_after() {
    let up = Upstream::start(Behaviour::Delay(Duration::from_millis(1500))).await;
    let config = ConfigBuilder::new(&up.url()).extra("[idempotency]\nwait_ms = 200\n").build();
    let gw = TestGateway::start(&config).await;
    let key = gw.account_with_key("acme", "big").await;
    let (url, auth) = (gw.url(CHAT), format!("Bearer {key}"));
    let first = tokio::spawn({
        let (url, auth) = (url.clone(), auth.clone());
        async move {
            let headers = [("authorization", auth.as_str()), ("idempotency-key", "slow"), ("x-ai-tier", "fast")];
            http::send("POST", &url, &headers, "{}").await
        }
    });
    up.wait_for_count(1).await;
    let copy = gw.post(&key, CHAT, &[("idempotency-key", "slow"), ("x-ai-tier", "fast")], "{}").await;
    assert_eq!(copy.status, 409, "{}", copy.text());
    assert_eq!(copy.error_type(), "idempotency_in_progress");
    let retry_after: u64 = copy.header("retry-after").expect("Retry-After").parse().unwrap();
    assert!(retry_after >= 1);
    assert_eq!(first.await.unwrap().charged(), 1);
    assert_eq!(up.count(), 1, "the copy never reached the backend");
}

async fn queued_request_with_a_key_is_one_job_charged_once(store: Store) {
    let env = Env::with(store, |b| b).await;
    let (gw, up) = (&env.gw, &env.up);
    let key = gw.account_with_key("acme", "fifty").await;
    spend(gw, &key, 50).await;
    let idem = [("idempotency-key", "call-1")];
    let first = gw.post(&key, TRANSCRIBE, &idem, r#"{"call":"c1"}"#).await;
    assert_eq!(first.status, 202, "{}", first.text());
    let job_id = first.json()["job_id"].as_str().unwrap().to_owned();
    let again = gw.post(&key, TRANSCRIBE, &idem, r#"{"call":"c1"}"#).await;
    assert_eq!((again.status.as_u16(), &again.body), (202, &first.body), "the same 202, replayed");
    assert_eq!(again.header("x-idempotent-replay"), Some("true"));
    assert_eq!(again.header("location"), Some(format!("/v1/jobs/{job_id}").as_str()));
    // After a top-up the job runs; a repeat now is still the 202 (it is one job), never a
    // second, direct run.
    assert_eq!(gw.topup("acme", 10, "pay-1").await.status, 201);
    let auth = format!("Bearer {key}");
    let mut status = String::new();
    for _ in 0..200 {
        let res = http::send("GET", &gw.url(&format!("/v1/jobs/{job_id}")), &[("authorization", &auth)], "").await;
        status = res.json()["status"].as_str().unwrap_or_default().to_owned();
        if status == "done" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, "done");
    for _ in 0..3 {
        let after = gw.post(&key, TRANSCRIBE, &idem, r#"{"call":"c1"}"#).await;
        assert_eq!((after.status.as_u16(), &after.body), (202, &first.body));
    }
    let transcriptions = up.requests().iter().filter(|r| r.path == TRANSCRIBE).count();
    assert_eq!(transcriptions, 1, "one run");
    assert_eq!(gw.remaining(&key).await, 8, "charged once: 10 - 2");
}

// === hang-ups and refund rules ===

#[tokio::test]
async fn a_client_that_hangs_up_after_delivery_keeps_its_charge() {
    let up = Upstream::start(Behaviour::Delay(Duration::from_millis(800))).await;
    let gw = TestGateway::with_upstream(&up.url()).await;
    let key = gw.account_with_key("acme", "big").await;
    let (url, auth) = (gw.url(CHAT), format!("Bearer {key}"));
    let abandoned = tokio::time::timeout(
        Duration::from_millis(300),
        http::send("POST", &url, &[("authorization", &auth), ("x-ai-tier", "powerful")], "{}"),
    )
    .await;
    assert!(abandoned.is_err(), "the client hung up before the answer");
    assert_eq!(up.count(), 1, "the backend had the request");
    // Give a wrongful refund every chance to land.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(gw.remaining(&key).await, 9_995, "the backend did the work: the 5 credits stay charged");
    let metrics = http::send("GET", &format!("{}/metrics", gw.admin), &[], "").await.text();
    assert!(metrics.contains("creditgate_client_gone_after_delivery_total 1"), "{metrics}");

    // With an Idempotency-Key the hang-up buys no free second run either: the key's charge
    // stands and its answer was never kept.
    let headers = [("authorization", auth.as_str()), ("x-ai-tier", "powerful"), ("idempotency-key", "left")];
    let abandoned = tokio::time::timeout(Duration::from_millis(300), http::send("POST", &url, &headers, "{}")).await;
    assert!(abandoned.is_err());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let again = gw.post(&key, CHAT, &[("x-ai-tier", "powerful"), ("idempotency-key", "left")], "{}").await;
    assert_eq!(again.status, 409, "{}", again.text());
    assert_eq!(again.error_type(), "idempotency_key_reused");
    assert_eq!(up.count(), 2, "the repeat never reached the backend");
    assert_eq!(gw.remaining(&key).await, 9_990);
}

#[tokio::test]
async fn a_client_that_hangs_up_before_delivery_is_refunded() {
    // A fixed-price operation streams its body on without buffering it: the client sends half
    // a body and leaves, so the backend never gets the whole request.
    let up = Upstream::echo().await;
    let gw = TestGateway::with_upstream(&up.url()).await;
    let key = gw.account_with_key("acme", "big").await;
    let (url, auth) = (gw.url("/v1/sentiment"), format!("Bearer {key}"));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    tx.send(Bytes::from_static(b"{\"conversation\":\"hel")).unwrap();
    let body = http_body_util::StreamBody::new(tokio_stream_from(rx));
    let sending = tokio::spawn(async move {
        let headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
        let _ = tokio::time::timeout(
            Duration::from_millis(400),
            http::send_streaming("POST", &url, &headers, http_body_util::BodyExt::boxed(body)),
        )
        .await;
    });
    // Charged once the gateway forwards; then the client leaves mid-body.
    let mut charged = false;
    for _ in 0..100 {
        if gw.remaining(&key).await == 9_999 {
            charged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(charged, "the request was charged before it was forwarded");
    sending.await.unwrap();
    drop(tx);
    assert_eq!(gw.wait_for_remaining(&key, 10_000, 100).await, 10_000, "never delivered: refunded");
}

/// A stream of request body chunks fed by the test.
fn tokio_stream_from(
    rx: tokio::sync::mpsc::UnboundedReceiver<Bytes>,
) -> impl futures_util::Stream<Item = Result<hyper::body::Frame<Bytes>, std::convert::Infallible>> {
    futures_util::stream::unfold(rx, |mut rx| async move { Some((Ok(hyper::body::Frame::data(rx.recv().await?)), rx)) })
}

#[tokio::test]
async fn refunds_follow_each_operations_refund_on() {
    let up = Upstream::start(Behaviour::Delay(Duration::from_millis(600))).await;
    let config = only_unreachable_refunds(ConfigBuilder::new(&up.url()).upstream_timeout_ms(200).build());
    let gw = TestGateway::start(&config).await;
    let key = gw.account_with_key("acme", "big").await;
    // ai_chat refunds a timeout (shipped config); sentiment (default rules) keeps it.
    let chat = gw.post(&key, CHAT, &[("x-ai-tier", "powerful")], "{}").await;
    assert_eq!((chat.status.as_u16(), chat.error_type().as_str(), chat.charged()), (504, "upstream_timeout", 0));
    let sentiment = gw.post(&key, "/v1/sentiment", &[], "{}").await;
    assert_eq!((sentiment.status.as_u16(), sentiment.charged()), (504, 1), "timeout is not in its refund_on");
    assert_eq!(gw.remaining(&key).await, 9_999);
    // A 5xx: refunded by default, kept where refund_on leaves it out.
    up.set(Behaviour::Status(503));
    assert_eq!(gw.post(&key, "/v1/insights/position", &[], "{}").await.charged(), 0);
    let kept = gw.post(&key, "/v1/insights/competitive", &[], "{}").await;
    assert_eq!((kept.status.as_u16(), kept.charged()), (503, 5));
    assert_eq!(gw.remaining(&key).await, 9_994);
}

#[tokio::test]
async fn an_unreachable_backend_is_refunded_everywhere() {
    let config = only_unreachable_refunds(ConfigBuilder::new(&refused_url()).build());
    let gw = TestGateway::start(&config).await;
    let key = gw.account_with_key("acme", "big").await;
    for (path, body) in [(CHAT, "{}"), ("/v1/insights/competitive", "{}"), ("/v1/leads/enrich", r#"{"leads":[1]}"#)] {
        let res = gw.post(&key, path, &[], body).await;
        assert_eq!((res.status.as_u16(), res.charged()), (502, 0), "{path}: {}", res.text());
    }
    assert_eq!(gw.remaining(&key).await, 10_000);
}

/// The test config with `insights_competitive` refunding only an unreachable backend.
fn only_unreachable_refunds(config: String) -> String {
    let op = "[operations.insights_competitive]\ncategory = \"Insights\"\ncost = 5\n";
    assert!(config.contains(op), "the shipped config changed shape");
    config.replace(op, &format!("{op}refund_on = [\"unreachable\"]\n"))
}

// === free automatic refreshes ===

async fn free_automatic_refreshes_are_counted_and_capped(store: Store) {
    let mut env = Env::start(store).await;
    env.restart_with("automatic_free = true", "automatic_free = true\nautomatic_free_max_per_period = 2").await;
    let gw = &env.gw;
    gw.create_account("acme", "big").await;
    let system = gw.create_key("acme", "system").await;
    let user = gw.create_key("acme", "user").await;
    let auto = [("x-trigger", "automatic")];
    let body = r#"{"leads":[1,2,3]}"#;
    for _ in 0..2 {
        let res = gw.post(&system, "/v1/leads/score", &auto, body).await;
        assert_eq!((res.status.as_u16(), res.header("x-credits-charged")), (200, None), "{}", res.text());
    }
    let beyond = gw.post(&system, "/v1/leads/score", &auto, body).await;
    assert_eq!((beyond.status.as_u16(), beyond.charged()), (200, 3), "past the allowance it pays per lead");
    let from_user = gw.post(&user, "/v1/leads/score", &auto, body).await;
    assert_eq!(from_user.charged(), 3, "a user key's x-trigger is charged");
    // The backend got x-trigger only where it made the refresh free.
    let triggers: Vec<Option<String>> =
        env.up.requests().iter().map(|r| r.header("x-trigger").map(str::to_owned)).collect();
    assert_eq!(triggers, [Some("automatic".to_owned()), Some("automatic".to_owned()), None, None]);
    let auth = format!("Bearer {user}");
    let usage = http::send("GET", &gw.url("/v1/credits/usage"), &[("authorization", &auth)], "").await.json();
    assert_eq!(usage["free_automatic"], serde_json::json!({"lead_scoring_refresh": 2}));
    assert_eq!(usage["by_operation"]["lead_scoring_refresh"], 6);
    assert_eq!(gw.remaining(&user).await, 9_994);
}

// === auto top-up ===

/// Each `PUT auto-topup {enabled: true}` while below the threshold used to re-arm the purchase:
/// one save, one package. Only switching it on (off → on) arms it.
async fn saving_auto_topup_again_below_the_threshold_buys_nothing_more(store: Store) {
    let env = Env::with(store, |b| b).await;
    let gw = &env.gw;
    let key = gw.account_with_key("acme", "fifty").await;
    spend(gw, &key, 45).await;
    let auth = format!("Bearer {key}");
    let put = |enabled: bool| {
        let (url, auth) = (gw.url("/v1/credits/auto-topup"), auth.clone());
        async move {
            let body = serde_json::json!({"enabled": enabled, "threshold": 500, "package": "200"}).to_string();
            let res = http::send("PUT", &url, &[("authorization", &auth)], body).await;
            assert_eq!(res.status, 200, "{}", res.text());
        }
    };
    put(true).await;
    assert_eq!(spend(gw, &key, 1).await.header("x-credits-auto-topup"), Some("200"), "switched on: armed once");
    for _ in 0..3 {
        put(true).await;
        assert_eq!(spend(gw, &key, 1).await.header("x-credits-auto-topup"), None, "saved again: no new purchase");
    }
    put(false).await;
    put(true).await;
    assert_eq!(spend(gw, &key, 1).await.header("x-credits-auto-topup"), Some("200"), "off → on arms again");
    // 5 left, 5 spent, two packages of 200 bought.
    assert_eq!(gw.remaining(&key).await, 400);
}

// === found by the review: the job runner and empty bodies follow the same rules ===

/// `call_transcription` keeps a timeout's charge (default `refund_on`). A queued job delivered to
/// a backend that answers too late must keep it too — not be refunded and run again for free.
#[tokio::test]
async fn a_queued_job_follows_its_operations_refund_on() {
    let up = Upstream::start(Behaviour::Delay(Duration::from_millis(700))).await;
    let config = ConfigBuilder::new(&up.url())
        .upstream_timeout_ms(300)
        .extra("[jobs]\nmax_attempts = 2\nretry_base_ms = 100\n")
        .build();
    let gw = TestGateway::start(&config).await;
    let key = gw.account_with_key("acme", "fifty").await;
    // Sent directly: 504, and the 2 credits stay.
    let direct = gw.post(&key, TRANSCRIBE, &[], r#"{"call_id":"direct"}"#).await;
    assert_eq!((direct.status.as_u16(), direct.charged()), (504, 2), "{}", direct.text());
    up.set(Behaviour::Echo);
    spend(&gw, &key, 48).await;
    let queued = gw.post(&key, TRANSCRIBE, &[], r#"{"call_id":"queued"}"#).await;
    assert_eq!(queued.status, 202, "{}", queued.text());
    up.set(Behaviour::Delay(Duration::from_millis(700)));
    assert_eq!(gw.topup("acme", 10, "pay-1").await.status, 201);
    let auth = format!("Bearer {key}");
    let location = queued.header("location").unwrap().to_owned();
    let mut job = serde_json::Value::Null;
    for _ in 0..200 {
        job = http::send("GET", &gw.url(&location), &[("authorization", &auth)], "").await.json();
        if job["status"] == "done" || job["status"] == "failed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!((job["status"].as_str(), job["attempts"].as_u64()), (Some("failed"), Some(1)), "{job}");
    let runs = up.requests().iter().filter(|r| r.path == TRANSCRIBE).count();
    assert_eq!(runs, 2, "the direct request and one job attempt, no free second run");
    assert_eq!(gw.remaining(&key).await, 8, "the delivered attempt stays paid");
}

/// An empty body is never read by the upstream connection, so its delivery cannot be seen that
/// way; it counts as delivered once sent (a connection that cannot be made is its own error).
#[tokio::test]
async fn empty_bodied_requests_are_delivered_like_any_other() {
    let up = Upstream::start(Behaviour::Delay(Duration::from_millis(800))).await;
    let gw = TestGateway::with_upstream(&up.url()).await;
    let key = gw.account_with_key("acme", "big").await;
    let auth = format!("Bearer {key}");
    // A hang-up after the backend has it keeps the charge.
    for (path, extra, cost) in [("/v1/insights/position", None, 5), (CHAT, Some(("x-ai-tier", "powerful")), 5)] {
        let before = gw.remaining(&key).await;
        let mut headers = vec![("authorization", auth.as_str())];
        headers.extend(extra);
        let abandoned =
            tokio::time::timeout(Duration::from_millis(300), http::send("POST", &gw.url(path), &headers, "")).await;
        assert!(abandoned.is_err(), "the client hung up before the answer");
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(gw.remaining(&key).await, before - cost, "{path}: kept");
    }
    // A timeout the operation keeps charged (sentiment) is charged with or without a body.
    let config = ConfigBuilder::new(&up.url()).upstream_timeout_ms(200).build();
    let gw = TestGateway::start(&config).await;
    let key = gw.account_with_key("acme", "big").await;
    let auth = format!("Bearer {key}");
    let with_body = gw.post(&key, "/v1/sentiment", &[], "{}").await;
    assert_eq!((with_body.status.as_u16(), with_body.charged()), (504, 1));
    let empty = http::send("POST", &gw.url("/v1/sentiment"), &[("authorization", auth.as_str())], "").await;
    assert_eq!((empty.status.as_u16(), empty.charged()), (504, 1), "same failure, same rule");
}

/// An empty answer (204) is complete as soon as its head is: it is kept and replayed like any
/// other, not mistaken for a client that went away.
#[tokio::test]
async fn an_empty_answer_is_kept_and_replayed() {
    let up = Upstream::start(Behaviour::Status(204)).await;
    let gw = TestGateway::with_upstream(&up.url()).await;
    let key = gw.account_with_key("acme", "big").await;
    let idem = [("idempotency-key", "empty-1"), ("x-ai-tier", "fast")];
    let first = gw.post(&key, CHAT, &idem, "{}").await;
    assert_eq!((first.status.as_u16(), first.charged(), first.body.len()), (204, 1, 0));
    let again = gw.post(&key, CHAT, &idem, "{}").await;
    assert_eq!((again.status.as_u16(), again.header("x-idempotent-replay")), (204, Some("true")), "{}", again.text());
    assert_eq!(up.count(), 1);
    let metrics = http::send("GET", &format!("{}/metrics", gw.admin), &[], "").await.text();
    assert!(metrics.contains("creditgate_client_gone_after_delivery_total 0"), "{metrics}");
}

/// A client that hangs up cancels the backend call: the gateway closes its connection to the
/// backend instead of waiting out an answer nobody will read. The backend here holds the request
/// unanswered and watches its socket; it sees the gateway close it long before its own 10 s.
#[tokio::test]
async fn a_hang_up_cancels_the_call_to_the_backend() {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = format!("http://{}", listener.local_addr().unwrap());
    let watcher = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "the gateway closed before sending the request");
            head.extend_from_slice(&buf[..n]);
        }
        // Never answer; report whether the gateway closed the connection within 10 s.
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        (String::from_utf8_lossy(&head).into_owned(), closed.is_ok())
    });
    let gw = TestGateway::start(&ConfigBuilder::new(&backend).build()).await;
    let key = gw.account_with_key("acme", "big").await;
    let (url, auth) = (gw.url(CHAT), format!("Bearer {key}"));
    let headers = [("authorization", auth.as_str()), ("x-ai-tier", "fast")];
    let abandoned = tokio::time::timeout(Duration::from_millis(500), http::send("POST", &url, &headers, "{}")).await;
    assert!(abandoned.is_err(), "the backend never answers");
    let (head, closed) = watcher.await.unwrap();
    assert!(head.starts_with("POST /v1/chat/completions"), "{head}");
    assert!(closed, "the gateway kept the backend call open after its client left");
}
