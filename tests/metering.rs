//! Metering through the real gateway: the SPEC §1 price table, 402s, refunds, idempotency,
//! body limits, streaming and concurrent charges. Each test starts its own gateway and
//! recording upstream on loopback port 0.

mod support;

use std::time::Duration;

use support::gateway::{ConfigBuilder, TestGateway, leads};
use support::http::{self, chunked, next_data, send_body, send_streaming, try_next_data};
use support::upstream::{Behaviour, Upstream, refused_url};

const CHAT: &str = "/v1/chat/completions";

/// A gateway in front of an echo upstream, and a `user` key on an account of the `big` plan.
async fn setup(plan: &str) -> (TestGateway, Upstream, String) {
    let up = Upstream::echo().await;
    let gw = TestGateway::with_upstream(&up.url()).await;
    let key = gw.account_with_key("acme", plan).await;
    (gw, up, key)
}

/// Sends one request and checks the charge in the header, in `x-credits-remaining` and in the
/// balance of `GET /v1/credits`, and that the upstream got the request.
async fn assert_costs(
    gw: &TestGateway,
    up: &Upstream,
    key: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    expected: u64,
) {
    let before = gw.remaining(key).await;
    let calls = up.count();
    let res = gw.post(key, path, headers, body).await;
    assert_eq!(res.status, 200, "{path} {headers:?} {body}: {}", res.text());
    assert_eq!(res.charged(), expected, "x-credits-charged for {path} {headers:?} {body}");
    let after = gw.remaining(key).await;
    assert_eq!(before - after, expected, "balance change for {path} {headers:?} {body}");
    assert_eq!(res.header("x-credits-remaining"), Some(after.to_string().as_str()), "x-credits-remaining");
    assert_eq!(up.count(), calls + 1, "upstream called once for {path}");
    assert_eq!(up.requests().last().unwrap().path, path);
}

/// An error answer that charged nothing and never reached the upstream.
#[allow(clippy::too_many_arguments)]
async fn assert_refused(
    gw: &TestGateway,
    up: &Upstream,
    key: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    status: u16,
    kind: &str,
) -> serde_json::Value {
    let before = gw.remaining(key).await;
    let calls = up.count();
    let res = gw.post(key, path, headers, body).await;
    assert_eq!(res.status, status, "{path} {headers:?} {body}: {}", res.text());
    assert_eq!(res.error_type(), kind, "{}", res.text());
    assert_eq!(res.header("content-type"), Some("application/json"));
    assert_eq!(gw.remaining(key).await, before, "nothing charged for {path} {body}");
    assert_eq!(up.count(), calls, "upstream not called for {path} {body}");
    res.json()
}

/// A gateway in front of a gated SSE upstream, and a streaming chat request already answered:
/// the test releases (or breaks off) the upstream's chunks through the gate.
async fn open_stream(
    header: (&str, &str),
    body: &'static str,
) -> (TestGateway, Upstream, String, support::upstream::StreamGate, ::http::Response<hyper::body::Incoming>) {
    let up = Upstream::start(Behaviour::Stream).await;
    let gw = TestGateway::with_upstream(&up.url()).await;
    let key = gw.account_with_key("acme", "big").await;
    let gate = up.stream_gate();
    let auth = format!("Bearer {key}");
    let res = send_streaming("POST", &gw.url(CHAT), &[("authorization", &auth), header], http::full(body)).await;
    (gw, up, key, gate, res)
}

// === the price table (SPEC §1) ===

#[tokio::test]
async fn ai_chat_tiers_cost_1_3_5() {
    let (gw, up, key) = setup("big").await;
    assert_costs(&gw, &up, &key, CHAT, &[("x-ai-tier", "fast")], r#"{"messages":[]}"#, 1).await;
    assert_costs(&gw, &up, &key, CHAT, &[("x-ai-tier", "balanced")], r#"{"messages":[]}"#, 3).await;
    assert_costs(&gw, &up, &key, CHAT, &[("x-ai-tier", "powerful")], r#"{"messages":[]}"#, 5).await;
    assert_costs(&gw, &up, &key, CHAT, &[], r#"{"tier":"fast"}"#, 1).await;
    assert_costs(&gw, &up, &key, CHAT, &[], r#"{"tier":"powerful"}"#, 5).await;
    assert_costs(&gw, &up, &key, CHAT, &[], r#"{"messages":[{"role":"user","content":"hi"}]}"#, 3).await;
    let credits = gw.credits(&key).await;
    assert_eq!(credits["used_this_period"], 18);
    assert_eq!(credits["remaining"], 10_000 - 18);
}

#[tokio::test]
async fn disguised_paths_are_priced_like_the_real_one_and_forwarded_normalised() {
    let (gw, up, key) = setup("big").await;
    for path in
        ["/v1/chat//completions", "/v1/chat/%63ompletions", "/v1/chat/completions/", "/v1/x/../chat/completions"]
    {
        let before = gw.remaining(&key).await;
        let res = gw.post(&key, path, &[("x-ai-tier", "fast")], "{}").await;
        assert_eq!(res.status, 200, "{path}: {}", res.text());
        assert_eq!(res.charged(), 1, "{path} must be metered");
        assert_eq!(gw.remaining(&key).await, before - 1);
        assert_eq!(up.requests().last().unwrap().path, CHAT, "{path} forwarded as the priced path");
    }
}

#[tokio::test]
async fn tier_comes_from_header_else_body_else_default() {
    let (gw, up, key) = setup("big").await;
    assert_costs(&gw, &up, &key, CHAT, &[("x-ai-tier", "powerful")], r#"{"tier":"powerful"}"#, 5).await;
    assert_costs(&gw, &up, &key, CHAT, &[("x-ai-tier", "fast")], r#"{"messages":[]}"#, 1).await;
    assert_costs(&gw, &up, &key, CHAT, &[], r#"{"tier":"fast"}"#, 1).await;
    assert_costs(&gw, &up, &key, CHAT, &[], r#"{}"#, 3).await;
    // Header and body that disagree, and bodies the gateway cannot read: tests/hygiene.rs.
}

#[tokio::test]
async fn unknown_tier_is_a_400_and_charges_nothing() {
    let (gw, up, key) = setup("big").await;
    let v = assert_refused(&gw, &up, &key, CHAT, &[("x-ai-tier", "turbo")], "{}", 400, "bad_request").await;
    assert!(v["error"]["message"].as_str().unwrap().contains("turbo"), "{v}");
    let v = assert_refused(&gw, &up, &key, CHAT, &[], r#"{"tier":"turbo"}"#, 400, "bad_request").await;
    assert!(v["error"]["message"].as_str().unwrap().contains("turbo"), "{v}");
    // An unknown header tier is an error, not a fall-back to the body's valid tier.
    assert_refused(&gw, &up, &key, CHAT, &[("x-ai-tier", "ultra")], r#"{"tier":"fast"}"#, 400, "bad_request").await;
    assert_refused(&gw, &up, &key, CHAT, &[], r#"{"tier":3}"#, 400, "bad_request").await;
    assert_eq!(gw.credits(&key).await["used_this_period"], 0);
}

#[tokio::test]
async fn lead_enrichment_costs_one_per_lead() {
    let (gw, up, key) = setup("big").await;
    let path = "/v1/leads/enrich";
    assert_costs(&gw, &up, &key, path, &[], r#"{"leads":[{"email":"a@x.io"}]}"#, 1).await;
    assert_costs(&gw, &up, &key, path, &[], r#"{"leads":[{"id":1},{"id":2},{"id":3},{"id":4}],"x":1}"#, 4).await;
    assert_costs(&gw, &up, &key, path, &[], &leads(25), 25).await;
}

#[tokio::test]
async fn campaign_generation_follows_the_clamped_formula() {
    let (gw, up, key) = setup("big").await;
    let path = "/v1/campaigns/generate";
    for (body, cost) in [
        (r#"{}"#, 3),                                                            // 0 → clamped up to 3
        (r#"{"steps":1,"variants":1,"channels":1}"#, 3),                         // exactly min
        (r#"{"steps":1,"variants":1}"#, 3),                                      // 2 → 3
        (r#"{"steps":2,"variants":1,"channels":1}"#, 4),                         // inside the range
        (r#"{"steps":["a","b","c"],"variants":[1,2],"channels":["email"]}"#, 6), // arrays count
        (r#"{"steps":5,"variants":3,"channels":1}"#, 9),
        (r#"{"steps":4,"variants":4,"channels":2}"#, 10),  // exactly max
        (r#"{"steps":20,"variants":3,"channels":3}"#, 10), // 26 → clamped down to 10
    ] {
        assert_costs(&gw, &up, &key, path, &[], body, cost).await;
    }
}

#[tokio::test]
async fn fixed_cost_operations() {
    let (gw, up, key) = setup("big").await;
    let transcribe = r#"{"audio_url":"http://x/a.mp3","duration_seconds":5400}"#;
    assert_costs(&gw, &up, &key, "/v1/calls/transcribe", &[], transcribe, 2).await;
    let short = r#"{"audio_url":"http://x/b.mp3","duration_seconds":3}"#;
    assert_costs(&gw, &up, &key, "/v1/calls/transcribe", &[], short, 2).await;
    assert_costs(&gw, &up, &key, "/v1/insights/position", &[], r#"{"company":"acme"}"#, 5).await;
    assert_costs(&gw, &up, &key, "/v1/insights/competitive", &[], r#"{"competitors":["a","b"]}"#, 5).await;
    assert_costs(&gw, &up, &key, "/v1/sentiment", &[], r#"{"conversation":"ok"}"#, 1).await;
}

#[tokio::test]
async fn lead_scoring_and_icebreakers_cost_one_per_lead() {
    let (gw, up, key) = setup("big").await;
    assert_costs(&gw, &up, &key, "/v1/leads/score", &[], r#"{"leads":[1,2,3]}"#, 3).await;
    assert_costs(&gw, &up, &key, "/v1/icebreakers", &[], r#"{"leads":[{"id":1},{"id":2}]}"#, 2).await;
    assert_costs(&gw, &up, &key, "/v1/icebreakers", &[], r#"{"leads":[{"id":1}]}"#, 1).await;
}

#[tokio::test]
async fn per_item_errors_name_the_field() {
    let (gw, up, key) = setup("big").await;
    for path in ["/v1/leads/enrich", "/v1/leads/score", "/v1/icebreakers"] {
        for body in [r#"{}"#, r#"{"leads":[]}"#, r#"{"leads":"everyone"}"#] {
            let v = assert_refused(&gw, &up, &key, path, &[], body, 400, "bad_request").await;
            assert!(v["error"]["message"].as_str().unwrap().contains("leads"), "{path} {body}: {v}");
        }
        assert_refused(&gw, &up, &key, path, &[], "{not json", 400, "bad_request").await;
    }
}

#[tokio::test]
async fn automatic_scoring_is_free_only_for_system_keys() {
    let (gw, up, user_key) = setup("big").await;
    let system_key = gw.create_key("acme", "system").await;
    let body = r#"{"leads":[1,2,3]}"#;
    let auto = [("x-trigger", "automatic")];

    let before = gw.remaining(&system_key).await;
    let res = gw.post(&system_key, "/v1/leads/score", &auto, body).await;
    assert_eq!(res.status, 200, "{}", res.text());
    assert!(matches!(res.header("x-credits-charged"), None | Some("0")), "free: {:?}", res.headers);
    assert_eq!(gw.remaining(&system_key).await, before, "automatic refresh by a system key is free");
    assert_eq!(up.count(), 1, "still forwarded");

    // The same header from a user key is charged normally; so is a system key without it.
    assert_costs(&gw, &up, &user_key, "/v1/leads/score", &auto, body, 3).await;
    assert_costs(&gw, &up, &system_key, "/v1/leads/score", &[], body, 3).await;
    assert_costs(&gw, &up, &system_key, "/v1/leads/score", &[("x-trigger", "manual")], body, 3).await;
}

// === out of credits ===

#[tokio::test]
async fn no_credits_is_402_with_renews_at() {
    let (gw, up, key) = setup("fifty").await;
    assert_costs(&gw, &up, &key, "/v1/leads/enrich", &[], &leads(50), 50).await;
    let renews_at = gw.credits(&key).await["renews_at"].clone();
    assert!(renews_at.is_string(), "{renews_at}");

    let v = assert_refused(&gw, &up, &key, CHAT, &[("x-ai-tier", "fast")], "{}", 402, "no_credits").await;
    assert_eq!(v["error"]["renews_at"], renews_at, "{v}");
    assert_eq!(v["error"]["remaining"], 0, "{v}");
    assert_eq!(gw.remaining(&key).await, 0);
}

#[tokio::test]
async fn insufficient_credits_is_402_with_required_and_remaining() {
    let (gw, up, key) = setup("fifty").await;
    assert_costs(&gw, &up, &key, "/v1/leads/enrich", &[], &leads(48), 48).await;
    let renews_at = gw.credits(&key).await["renews_at"].clone();

    let v = assert_refused(&gw, &up, &key, CHAT, &[("x-ai-tier", "powerful")], "{}", 402, "insufficient_credits").await;
    assert_eq!(v["error"]["required"], 5, "{v}");
    assert_eq!(v["error"]["remaining"], 2, "{v}");
    assert_eq!(v["error"]["renews_at"], renews_at, "{v}");
    assert_eq!(v.as_object().unwrap().len(), 1, "fields live inside `error`: {v}");
    // What is left can still be spent.
    assert_costs(&gw, &up, &key, CHAT, &[("x-ai-tier", "fast")], "{}", 1).await;
    assert_eq!(gw.remaining(&key).await, 1);
}

#[tokio::test]
async fn low_credits_flag_below_ten_percent_of_the_allocation() {
    let (gw, up, key) = setup("fifty").await;
    assert_costs(&gw, &up, &key, "/v1/leads/enrich", &[], &leads(44), 44).await;
    // 5 of 50 left: exactly 10 %, not below it.
    let res = gw.post(&key, CHAT, &[("x-ai-tier", "fast")], "{}").await;
    assert_eq!((res.charged(), res.header("x-credits-remaining"), res.header("x-credits-low")), (1, Some("5"), None));
    assert_eq!(gw.credits(&key).await["low"], false);
    let res = gw.post(&key, CHAT, &[("x-ai-tier", "fast")], "{}").await;
    assert_eq!((res.charged(), res.header("x-credits-remaining")), (1, Some("4")));
    assert_eq!(res.header("x-credits-low"), Some("true"));
    assert_eq!(gw.credits(&key).await["low"], true);
}

// === refunds ===

#[tokio::test]
async fn upstream_500_is_passed_on_and_refunded() {
    let up = Upstream::start(Behaviour::Status(500)).await;
    let gw = TestGateway::with_upstream(&up.url()).await;
    let key = gw.account_with_key("acme", "big").await;
    let res = gw.post(&key, CHAT, &[("x-ai-tier", "powerful")], "{}").await;
    assert_eq!(res.status, 500, "{}", res.text());
    assert_eq!(res.json()["upstream_error"], 500, "the upstream's own answer");
    assert_eq!(res.charged(), 0);
    assert_eq!(res.header("x-credits-remaining"), Some("10000"));
    assert_eq!(up.count(), 1);
    let credits = gw.credits(&key).await;
    assert_eq!(credits["remaining"], 10_000);
    assert_eq!(credits["used_this_period"], 0);

    // 503 too; a 4xx is the client's fault and stays charged.
    up.set(Behaviour::Status(503));
    let res = gw.post(&key, CHAT, &[("x-ai-tier", "fast")], "{}").await;
    assert_eq!((res.status.as_u16(), res.charged()), (503, 0));
    up.set(Behaviour::Status(422));
    let res = gw.post(&key, CHAT, &[("x-ai-tier", "fast")], "{}").await;
    assert_eq!((res.status.as_u16(), res.charged()), (422, 1));
    assert_eq!(gw.remaining(&key).await, 9_999);
}

#[tokio::test]
async fn connection_refused_is_502_and_refunded() {
    let gw = TestGateway::with_upstream(&refused_url()).await;
    let key = gw.account_with_key("acme", "big").await;
    let res = gw.post(&key, CHAT, &[("x-ai-tier", "powerful")], "{}").await;
    assert_eq!(res.status, 502, "{}", res.text());
    assert_eq!(res.error_type(), "upstream_unavailable");
    let credits = gw.credits(&key).await;
    assert_eq!(credits["remaining"], 10_000);
    assert_eq!(credits["used_this_period"], 0);
}

#[tokio::test]
async fn upstream_timeout_is_504_and_refunded() {
    let up = Upstream::start(Behaviour::Delay(Duration::from_secs(3))).await;
    let gw = TestGateway::start(&ConfigBuilder::new(&up.url()).upstream_timeout_ms(300).build()).await;
    let key = gw.account_with_key("acme", "big").await;
    let res = gw.post(&key, CHAT, &[], r#"{"tier":"powerful"}"#).await;
    assert_eq!(res.status, 504, "{}", res.text());
    assert_eq!(res.error_type(), "upstream_timeout");
    assert_eq!(up.count(), 1, "the request did reach the slow upstream");
    assert_eq!(gw.remaining(&key).await, 10_000);
}

#[tokio::test]
async fn body_breaking_off_mid_stream_is_refunded() {
    let (gw, _up, key, gate, res) = open_stream(("x-ai-tier", "powerful"), r#"{"stream":true}"#).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-credits-charged"], "5");
    assert_eq!(gw.remaining(&key).await, 9_995, "charged while streaming");

    let mut body = res.into_body();
    gate.send("data: {\"n\":1}\n\n");
    let first = next_data(&mut body, Duration::from_secs(5)).await.expect("first chunk");
    assert_eq!(&first[..], b"data: {\"n\":1}\n\n");
    gate.abort();
    let mut ended_in_error = false;
    for _ in 0..10 {
        match try_next_data(&mut body, Duration::from_secs(5)).await {
            Ok(Some(_)) => continue,
            Ok(None) => break,
            Err(_) => {
                ended_in_error = true;
                break;
            }
        }
    }
    assert!(ended_in_error, "the client must see the answer break off, not a clean end");
    assert_eq!(gw.wait_for_remaining(&key, 10_000, 100).await, 10_000, "refunded after the break");
}

// === idempotency ===

#[tokio::test]
async fn idempotency_key_charges_once() {
    let (gw, up, key) = setup("big").await;
    let idem = [("idempotency-key", "order-42")];
    let first = gw.post(&key, CHAT, &idem, r#"{"tier":"balanced"}"#).await;
    assert_eq!((first.status.as_u16(), first.charged()), (200, 3));
    let second = gw.post(&key, CHAT, &idem, r#"{"tier":"balanced"}"#).await;
    assert_eq!(second.status, 200, "{}", second.text());
    assert_eq!(second.charged(), 0);
    assert_eq!(second.header("x-credits-remaining"), Some("9997"));
    assert_eq!(gw.remaining(&key).await, 9_997);

    // A different key is a different request.
    let other = gw.post(&key, CHAT, &[("idempotency-key", "order-43")], r#"{"tier":"balanced"}"#).await;
    assert_eq!(other.charged(), 3);
    assert_eq!(gw.remaining(&key).await, 9_994);

    // A repeat never reaches the backend, so a backend failing now changes nothing.
    up.set(Behaviour::Status(500));
    let calls = up.count();
    let replay = gw.post(&key, CHAT, &idem, r#"{"tier":"balanced"}"#).await;
    assert_eq!((replay.status.as_u16(), replay.charged(), &replay.body), (200, 0, &first.body));
    assert_eq!(up.count(), calls);
    assert_eq!(gw.remaining(&key).await, 9_994);
}

#[tokio::test]
async fn twenty_concurrent_copies_are_charged_once() {
    let (gw, _up, key) = setup("big").await;
    let auth = format!("Bearer {key}");
    let url = gw.url(CHAT);
    let copies = (0..20).map(|_| {
        let (auth, url) = (auth.clone(), url.clone());
        tokio::spawn(async move {
            let headers = [("authorization", auth.as_str()), ("idempotency-key", "burst-1")];
            http::send("POST", &url, &headers, r#"{"tier":"powerful"}"#).await
        })
    });
    let results = futures_util::future::join_all(copies).await;
    let mut charged = Vec::new();
    for r in results {
        let res = r.expect("task");
        assert_eq!(res.status, 200, "{}", res.text());
        charged.push(res.charged());
    }
    charged.sort();
    assert_eq!(charged.iter().sum::<u64>(), 5, "{charged:?}");
    assert_eq!(charged.iter().filter(|c| **c == 5).count(), 1, "{charged:?}");
    assert_eq!(gw.remaining(&key).await, 9_995);
}

#[tokio::test]
async fn idempotency_key_with_a_different_body_is_409() {
    let (gw, up, key) = setup("big").await;
    let idem = [("idempotency-key", "k-1")];
    assert_eq!(gw.post(&key, CHAT, &idem, r#"{"tier":"fast"}"#).await.charged(), 1);
    assert_refused(&gw, &up, &key, CHAT, &idem, r#"{"tier":"powerful"}"#, 409, "idempotency_conflict").await;
    // Same body on another path is a different request too.
    assert_refused(&gw, &up, &key, "/v1/sentiment", &idem, r#"{"tier":"fast"}"#, 409, "idempotency_conflict").await;
    assert_eq!(gw.remaining(&key).await, 9_999);
}

#[tokio::test]
async fn idempotency_keys_are_per_account_and_at_most_255_characters() {
    let (gw, up, key) = setup("big").await;
    let other = gw.account_with_key("globex", "big").await;
    let idem = [("idempotency-key", "shared-name")];
    assert_eq!(gw.post(&key, CHAT, &idem, r#"{"tier":"fast"}"#).await.charged(), 1);
    assert_eq!(gw.post(&other, CHAT, &idem, r#"{"tier":"fast"}"#).await.charged(), 1, "another account's key");
    assert_eq!(gw.remaining(&other).await, 9_999);

    let longest = "k".repeat(255);
    let res = gw.post(&key, CHAT, &[("idempotency-key", &longest)], r#"{"tier":"fast"}"#).await;
    assert_eq!((res.status.as_u16(), res.charged()), (200, 1));
    let too_long = "k".repeat(256);
    assert_refused(&gw, &up, &key, CHAT, &[("idempotency-key", &too_long)], r#"{"tier":"fast"}"#, 400, "bad_request")
        .await;
}

#[tokio::test]
async fn refunded_first_attempt_is_charged_again_on_retry() {
    let up = Upstream::start(Behaviour::Status(500)).await;
    let gw = TestGateway::with_upstream(&up.url()).await;
    let key = gw.account_with_key("acme", "big").await;
    let idem = [("idempotency-key", "retry-me")];
    let res = gw.post(&key, CHAT, &idem, r#"{"tier":"balanced"}"#).await;
    assert_eq!((res.status.as_u16(), res.charged()), (500, 0));
    assert_eq!(gw.remaining(&key).await, 10_000);

    up.set(Behaviour::Echo);
    let res = gw.post(&key, CHAT, &idem, r#"{"tier":"balanced"}"#).await;
    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(res.charged(), 3, "the refunded attempt was not served, so the retry pays");
    assert_eq!(gw.remaining(&key).await, 9_997);
    // And from now on the key is settled.
    assert_eq!(gw.post(&key, CHAT, &idem, r#"{"tier":"balanced"}"#).await.charged(), 0);
    assert_eq!(gw.remaining(&key).await, 9_997);
}

// === body limit ===

#[tokio::test]
async fn oversized_body_with_content_length_is_413() {
    let up = Upstream::echo().await;
    let gw = TestGateway::start(&ConfigBuilder::new(&up.url()).max_body_bytes(1024).build()).await;
    let key = gw.account_with_key("acme", "big").await;
    let big = format!(r#"{{"tier":"fast","pad":"{}"}}"#, "x".repeat(2000));
    for (path, headers) in [(CHAT, vec![]), (CHAT, vec![("x-ai-tier", "fast")]), ("/v1/insights/position", vec![])] {
        let v = assert_refused(&gw, &up, &key, path, &headers, &big, 413, "payload_too_large").await;
        assert!(v["error"]["message"].as_str().unwrap().contains("1024"), "{v}");
    }
    // Just under the limit passes.
    let ok = format!(r#"{{"tier":"fast","pad":"{}"}}"#, "x".repeat(900));
    assert_costs(&gw, &up, &key, CHAT, &[], &ok, 1).await;
}

#[tokio::test]
async fn oversized_chunked_body_on_a_metered_route_is_413() {
    let up = Upstream::echo().await;
    let gw = TestGateway::start(&ConfigBuilder::new(&up.url()).max_body_bytes(1024).build()).await;
    let key = gw.account_with_key("acme", "big").await;
    let auth = format!("Bearer {key}");
    let chunks = || {
        let mut c = vec![bytes::Bytes::from_static(br#"{"tier":"fast","pad":""#)];
        c.extend((0..10).map(|_| bytes::Bytes::from(vec![b'x'; 300])));
        c.push(bytes::Bytes::from_static(br#""}"#));
        c
    };
    // Chat priced from the body (read for pricing), chat priced by header (body not needed for
    // pricing) and a fixed-cost operation: all must refuse the body, none may charge.
    for (path, tier) in [(CHAT, None), (CHAT, Some("fast")), ("/v1/insights/position", None)] {
        let mut headers = vec![("authorization", auth.as_str()), ("content-type", "application/json")];
        if let Some(t) = tier {
            headers.push(("x-ai-tier", t));
        }
        let res = send_body("POST", &gw.url(path), &headers, chunked(chunks())).await;
        assert_eq!(
            res.status,
            413,
            "{path} tier {tier:?}: {} (charged {:?})",
            res.text(),
            res.header("x-credits-charged")
        );
        assert_eq!(res.error_type(), "payload_too_large");
        assert!(res.text().contains("1024"), "the message names the limit: {}", res.text());
        assert_eq!(gw.remaining(&key).await, 10_000, "{path} tier {tier:?}: nothing charged");
    }
}

// === streaming ===

#[tokio::test]
async fn sse_chunks_reach_the_client_before_the_upstream_sends_the_next() {
    let (gw, _up, key, gate, res) =
        open_stream(("content-type", "application/json"), r#"{"stream":true,"messages":[]}"#).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-credits-charged"], "3");
    assert_eq!(res.headers()["x-credits-remaining"], "9997");
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut body = res.into_body();

    // Each chunk is released only after the previous one arrived at the client: the gateway
    // cannot be holding the answer back until the upstream finishes.
    let chunks = ["data: {\"delta\":\"Hel\"}\n\n", "data: {\"delta\":\"lo\"}\n\n", "data: [DONE]\n\n"];
    for chunk in chunks {
        gate.send(chunk);
        let got = next_data(&mut body, Duration::from_secs(5)).await.expect("a chunk");
        assert_eq!(String::from_utf8_lossy(&got), chunk);
    }
    gate.finish();
    assert_eq!(next_data(&mut body, Duration::from_secs(5)).await, None, "clean end");
    assert_eq!(gw.remaining(&key).await, 9_997, "a completed stream stays charged");
}

// === concurrency ===

#[tokio::test]
async fn two_hundred_concurrent_chats_against_fifty_credits() {
    let (gw, up, key) = setup("fifty").await;
    let auth = format!("Bearer {key}");
    let url = gw.url(CHAT);
    let tasks = (0..200).map(|_| {
        let (auth, url) = (auth.clone(), url.clone());
        tokio::spawn(async move {
            http::send("POST", &url, &[("authorization", auth.as_str()), ("x-ai-tier", "fast")], "{}").await
        })
    });
    let mut ok = 0;
    let mut refused = 0;
    for r in futures_util::future::join_all(tasks).await {
        let res = r.expect("task");
        match res.status.as_u16() {
            200 => {
                assert_eq!(res.charged(), 1);
                ok += 1;
            }
            402 => {
                assert_eq!(res.error_type(), "no_credits", "{}", res.text());
                refused += 1;
            }
            s => panic!("unexpected status {s}: {}", res.text()),
        }
    }
    assert_eq!((ok, refused), (50, 150));
    assert_eq!(up.count(), 50, "only paid requests reach the upstream");
    let credits = gw.credits(&key).await;
    assert_eq!(credits["remaining"], 0);
    assert_eq!(credits["used_this_period"], 50);
}

// === rate limits ===

#[tokio::test]
async fn a_burst_beyond_the_plan_rate_is_429_with_retry_after_and_charges_nothing() {
    let up = Upstream::echo().await;
    let gw = TestGateway::start(&ConfigBuilder::new(&up.url()).keep_rate_limits().build()).await;
    // The shipped `free` plan allows 5 requests per second per account.
    let key = gw.account_with_key("acme", "free").await;
    let other = gw.account_with_key("globex", "free").await;
    let mut tasks = Vec::new();
    for _ in 0..30 {
        let url = gw.url(CHAT);
        let auth = format!("Bearer {key}");
        tasks.push(tokio::spawn(async move {
            http::send("POST", &url, &[("authorization", &auth), ("x-ai-tier", "fast")], "{}").await
        }));
    }
    let mut ok = 0;
    let mut limited = 0;
    for t in tasks {
        let res = t.await.unwrap();
        match res.status.as_u16() {
            200 => ok += 1,
            429 => {
                limited += 1;
                assert_eq!(res.error_type(), "rate_limited");
                let wait: u64 = res.header("retry-after").expect("Retry-After").parse().unwrap();
                assert!(wait >= 1);
                assert_eq!(res.header("x-credits-charged"), None, "refused before metering");
            }
            other => panic!("unexpected {other}: {}", res.text()),
        }
    }
    assert!(limited > 0, "30 concurrent requests exceed 5 per second ({ok} admitted)");
    // Reading the balance draws from the same allowance (the customer API shares it): let it refill.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(gw.remaining(&key).await, 50 - ok, "only admitted requests were charged");
    assert_eq!(up.count(), ok as usize);
    // Another account of the same plan has its own allowance.
    assert_eq!(gw.post(&other, CHAT, &[("x-ai-tier", "fast")], "{}").await.status, 200);
}

// === abandoned requests ===

#[tokio::test]
async fn an_idempotent_replay_cannot_change_the_tier() {
    let (gw, up, key) = setup("big").await;
    let headers = |tier| vec![("idempotency-key", "k-tier"), ("x-ai-tier", tier)];
    let first = gw.post(&key, CHAT, &headers("fast"), "{}").await;
    assert_eq!((first.status.as_u16(), first.charged()), (200, 1));
    let calls = up.count();
    let res = gw.post(&key, CHAT, &headers("powerful"), "{}").await;
    assert_eq!(res.status, 409, "{}", res.text());
    assert_eq!(res.error_type(), "idempotency_conflict");
    assert_eq!(up.count(), calls, "not forwarded");
}

#[tokio::test]
async fn the_upstream_sees_exactly_the_priced_tier() {
    let (gw, up, key) = setup("big").await;
    let res = gw.post(&key, CHAT, &[("x-ai-tier", "fast"), ("x-ai-tier", " fast")], r#"{"tier":"fast"}"#).await;
    assert_eq!(res.charged(), 1);
    let seen: Vec<_> = up.requests().last().unwrap().headers.get_all("x-ai-tier").iter().cloned().collect();
    assert_eq!(seen, ["fast"]);
    let res = gw.post(&key, CHAT, &[], r#"{"tier":"powerful"}"#).await;
    assert_eq!(res.charged(), 5);
    assert_eq!(up.requests().last().unwrap().header("x-ai-tier"), Some("powerful"), "the body's tier is made explicit");
}

#[tokio::test]
async fn a_copy_waits_for_a_first_attempt_that_fails_and_then_pays() {
    let up = Upstream::start(Behaviour::DelayThen(Duration::from_millis(400), 500)).await;
    let gw = TestGateway::with_upstream(&up.url()).await;
    let key = gw.account_with_key("acme", "big").await;
    let url = gw.url(CHAT);
    let auth = format!("Bearer {key}");
    let send = |url: String, auth: String| async move {
        let headers = [("authorization", auth.as_str()), ("x-ai-tier", "powerful"), ("idempotency-key", "k-slow")];
        http::send("POST", &url, &headers, "{}").await
    };
    let first = tokio::spawn(send(url.clone(), auth.clone()));
    // The first attempt is at the upstream (slow, about to fail) when the copy arrives.
    for _ in 0..100 {
        if up.count() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    up.set(Behaviour::Echo);
    let copy = send(url, auth).await;
    let first = first.await.unwrap();
    assert_eq!((first.status.as_u16(), first.charged()), (500, 0), "the first attempt failed and was refunded");
    assert_eq!(copy.status, 200);
    assert_eq!(copy.charged(), 5, "the copy is the real attempt: it pays, it is not a free replay");
    assert_eq!(copy.header("x-idempotent-replay"), None);
    assert_eq!(gw.remaining(&key).await, 10_000 - 5);
}
