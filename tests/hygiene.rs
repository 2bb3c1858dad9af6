//! One request, one price (SPEC §4): what a hostile client tries so that the gateway prices one
//! request and the backend serves another — a header tier against a body tier, a pricing field
//! given twice or in another letter case, a compressed body, paths and methods that a backend
//! reads differently, hop-by-hop tricks and pricing headers on routes that did not price them.
//! Every refusal here is checked to charge nothing and to reach no upstream.

mod support;

use std::time::Duration;

use support::gateway::{SHIPPED, TestGateway, leads, spend, split_upstreams as setup};
use support::http::Response;
use support::upstream::Upstream;

const CHAT: &str = "/v1/chat/completions";

/// Sends `method path` and checks it was refused with `status`/`kind`, charged nothing and
/// reached neither upstream; returns the error message.
#[allow(clippy::too_many_arguments)]
async fn refused(
    (gw, ai, app, key): &(TestGateway, Upstream, Upstream, String),
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    status: u16,
    kind: &str,
) -> String {
    let before = gw.remaining(key).await;
    let calls = (ai.count(), app.count());
    let res = gw.call(key, method, path, headers, body).await;
    let what = format!("{method} {path} {headers:?} {body}");
    assert_eq!(res.status, status, "{what}: {}", res.text());
    assert_eq!(res.error_type(), kind, "{what}");
    assert_eq!((ai.count(), app.count()), calls, "{what} reached an upstream");
    assert_eq!(gw.remaining(key).await, before, "{what} charged");
    res.json()["error"]["message"].as_str().unwrap().to_owned()
}

/// A `POST` that must be answered 200 with `cost` charged by the `ai` upstream.
async fn charged(gw: &TestGateway, ai: &Upstream, key: &str, path: &str, headers: &[(&str, &str)], body: &str) -> u64 {
    let calls = ai.count();
    let res: Response = gw.post(key, path, headers, body).await;
    assert_eq!(res.status, 200, "{path} {headers:?} {body}: {}", res.text());
    assert_eq!(ai.count(), calls + 1, "{path} reached the ai upstream");
    res.charged()
}

// === tiers ===

#[tokio::test]
async fn header_and_body_tier_must_agree() {
    let t = setup().await;
    let (gw, ai, _app, key) = &t;
    let m = refused(&t, "POST", CHAT, &[("x-ai-tier", "fast")], r#"{"tier":"powerful"}"#, 400, "tier_mismatch").await;
    assert!(m.contains("\"fast\"") && m.contains("\"powerful\""), "the message names both tiers: {m}");
    refused(&t, "POST", CHAT, &[("x-ai-tier", "powerful")], r#"{"tier":"fast"}"#, 400, "tier_mismatch").await;
    // Two header lines that disagree are no better.
    refused(&t, "POST", CHAT, &[("x-ai-tier", "fast"), ("x-ai-tier", "powerful")], "{}", 400, "tier_mismatch").await;
    // With a header the body is still read: a body the gateway cannot parse could hold a tier
    // for a lenient backend.
    refused(&t, "POST", CHAT, &[("x-ai-tier", "fast")], r#"{"tier":"powerful",}"#, 400, "bad_request").await;

    // Agreeing, or only one of them: priced, and the backend gets exactly the priced tier.
    assert_eq!(charged(gw, ai, key, CHAT, &[("x-ai-tier", "powerful")], r#"{"tier":"powerful"}"#).await, 5);
    assert_eq!(charged(gw, ai, key, CHAT, &[("x-ai-tier", " fast ")], r#"{"messages":[]}"#).await, 1);
    assert_eq!(ai.requests().last().unwrap().header("x-ai-tier"), Some("fast"));
    assert_eq!(charged(gw, ai, key, CHAT, &[("x-ai-tier", "fast")], "").await, 1, "an empty body carries no tier");
    assert_eq!(charged(gw, ai, key, CHAT, &[], r#"{"tier":"fast"}"#).await, 1);
    assert_eq!(ai.requests().last().unwrap().header("x-ai-tier"), Some("fast"), "a body tier is forwarded too");
}

// === pricing fields given twice ===

#[tokio::test]
async fn a_pricing_field_given_twice_or_in_another_case_is_ambiguous() {
    let t = setup().await;
    let thousand: Vec<String> = (0..1000).map(|i| i.to_string()).collect();
    let many_leads = format!(r#"{{"leads":[1],"LEADS":[{}]}}"#, thousand.join(","));
    for (path, headers, body) in [
        (CHAT, vec![], r#"{"tier":"fast","TIER":"powerful"}"#),
        (CHAT, vec![], r#"{"TIER":"powerful","tier":"fast"}"#),
        (CHAT, vec![], r#"{"tier":"fast","tier":"powerful"}"#),
        (CHAT, vec![], r#"{"Tier":"powerful"}"#),
        (CHAT, vec![("x-ai-tier", "fast")], r#"{"TIER":"powerful"}"#),
        ("/v1/leads/enrich", vec![], r#"{"leads":[1],"LEADS":[1,2,3]}"#),
        ("/v1/leads/enrich", vec![], many_leads.as_str()),
        ("/v1/leads/enrich", vec![], r#"{"leads":[1],"leads":[1,2,3]}"#),
        ("/v1/icebreakers", vec![], r#"{"Leads":[1,2]}"#),
        ("/v1/campaigns/generate", vec![], r#"{"steps":1,"STEPS":20}"#),
        ("/v1/campaigns/generate", vec![], r#"{"variants":1,"variants":9}"#),
        // `model` may pick a tier (and sets the backend's model): a pricing field on tiered routes.
        (CHAT, vec![], r#"{"tier":"fast","Model":"a","model":"b"}"#),
        (CHAT, vec![], r#"{"model":"fast","model":"powerful"}"#),
    ] {
        let m = refused(&t, "POST", path, &headers, body, 400, "ambiguous_body").await;
        assert!(m.contains('"'), "the message names the field: {m}");
    }
    // Other fields may repeat; nested objects are the backend's business.
    let (gw, ai, _app, key) = &t;
    assert_eq!(
        charged(gw, ai, key, CHAT, &[], r#"{"tier":"fast","Stream":true,"stream":false,"x":{"TIER":1}}"#).await,
        1
    );
}

// === encodings ===

#[tokio::test]
async fn body_priced_routes_refuse_compressed_bodies() {
    let t = setup().await;
    let gz = [("content-encoding", "gzip")];
    for (path, body) in
        [(CHAT, "{}".to_owned()), ("/v1/leads/enrich", leads(1)), ("/v1/campaigns/generate", "{}".into())]
    {
        refused(&t, "POST", path, &gz, &body, 415, "unsupported_media_type").await;
    }
    refused(
        &t,
        "POST",
        CHAT,
        &[("x-ai-tier", "fast"), ("content-encoding", "br")],
        "{}",
        415,
        "unsupported_media_type",
    )
    .await;
    let (gw, ai, _app, key) = &t;
    assert_eq!(charged(gw, ai, key, CHAT, &[("content-encoding", "identity")], r#"{"tier":"fast"}"#).await, 1);
    assert_eq!(charged(gw, ai, key, "/v1/sentiment", &gz, "opaque").await, 1, "a fixed price reads no body");
}

// === paths and methods ===

#[tokio::test]
async fn paths_that_backends_read_differently_are_refused_before_routing() {
    let t = setup().await;
    for path in [
        "/v1/chat%2Fcompletions",
        "/v1/chat%2fcompletions",
        "/v1/chat/completions;x=1",
        "/v1%5Cchat/completions",
        "/v1%5cchat/completions",
        "/v1\\chat/completions",
        "/v1/chat/completions%00",
    ] {
        let m = refused(&t, "POST", path, &[("x-ai-tier", "fast")], "{}", 400, "bad_request").await;
        assert!(m.contains("path"), "{path}: {m}");
    }
    // Free routes too.
    refused(&t, "GET", "/v1/deals;jsessionid=1", &[], "", 400, "bad_request").await;
    refused(&t, "GET", "/v1/files/a%2Fb", &[], "", 400, "bad_request").await;
    // The query is not the path: encoded URLs there are fine.
    let (gw, _ai, app, key) = &t;
    let res = gw.call(key, "GET", "/v1/deals?next=%2Fv1%2Fdeals%3Bx", &[], "").await;
    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(app.only().path, "/v1/deals?next=%2Fv1%2Fdeals%3Bx");
}

#[tokio::test]
async fn a_priced_path_in_other_letter_case_is_priced_and_forwarded_as_the_route() {
    let (gw, ai, app, key) = setup().await;
    for path in ["/V1/chat/completions", "/v1/Chat/COMPLETIONS"] {
        assert_eq!(charged(&gw, &ai, &key, path, &[("x-ai-tier", "fast")], "{}").await, 1, "{path}");
        assert_eq!(ai.requests().last().unwrap().path, CHAT, "{path} forwarded as priced");
    }
    assert_eq!(charged(&gw, &ai, &key, "/V1/LEADS/ENRICH?x=1", &[], &leads(3)).await, 3);
    assert_eq!(ai.requests().last().unwrap().path, "/v1/leads/enrich?x=1");
    assert_eq!(app.count(), 0, "nothing fell through to the free catch-all");
}

#[tokio::test]
async fn a_method_that_is_not_standard_upper_case_is_refused() {
    let t = setup().await;
    for method in ["post", "Post", "FOO"] {
        let m = refused(&t, method, CHAT, &[("x-ai-tier", "fast")], "{}", 400, "bad_request").await;
        assert!(m.contains(method), "{m}");
    }
    refused(&t, "get", "/v1/deals", &[], "", 400, "bad_request").await;

    // What hyper hands the gateway is the method as sent: a raw request line says so.
    let (gw, _ai, _app, key) = &t;
    let reply = raw(gw, &format!("post {CHAT} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}")).await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.contains("\"bad_request\""), "{reply}");
}

/// Writes `request` on a fresh connection and reads the answer until the server closes it.
async fn raw(gw: &TestGateway, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(gw.gateway.public_addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await.unwrap().unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

// === headers ===

#[tokio::test]
async fn a_tier_header_named_in_connection_is_not_priced_and_the_priced_tier_is_forwarded() {
    let (gw, ai, _app, key) = setup().await;
    let hop = [("x-ai-tier", "fast"), ("connection", "keep-alive, X-AI-Tier")];
    // No usable header: the default tier is priced, and forwarded.
    assert_eq!(charged(&gw, &ai, &key, CHAT, &hop, r#"{"messages":[]}"#).await, 3);
    assert_eq!(ai.requests().last().unwrap().header("x-ai-tier"), Some("balanced"));
    // The body's tier is priced, not a mismatch with a header that was never the request's.
    assert_eq!(charged(&gw, &ai, &key, CHAT, &hop, r#"{"tier":"powerful"}"#).await, 5);
    assert_eq!(ai.requests().last().unwrap().header("x-ai-tier"), Some("powerful"));
    // The gateway's own headers are set after all stripping.
    let hop = [("x-request-id", "rid-7"), ("connection", "x-request-id, x-creditgate-account")];
    assert_eq!(charged(&gw, &ai, &key, CHAT, &hop, r#"{"tier":"fast"}"#).await, 1);
    let got = ai.requests().pop().unwrap();
    assert_eq!((got.header("x-ai-tier"), got.header("x-creditgate-account")), (Some("fast"), Some("acme")));
    assert!(got.header("x-request-id").is_some_and(|id| !id.is_empty()));
    // Nothing the client made hop-by-hop is read, credentials included.
    let res = gw.post(&key, CHAT, &[("connection", "authorization")], r#"{"tier":"fast"}"#).await;
    assert_eq!(res.status, 401, "{}", res.text());
}

#[tokio::test]
async fn pricing_headers_reach_the_backend_only_where_they_priced_the_request() {
    let (gw, ai, app, key) = setup().await;
    let sent = [("x-ai-tier", "powerful"), ("x-trigger", "automatic")];
    // Free route: neither.
    assert_eq!(gw.call(&key, "GET", "/v1/deals", &sent, "").await.status, 200);
    assert_eq!(gw.call(&key, "POST", "/v1/emails", &sent, "{}").await.status, 200);
    for got in app.requests() {
        assert_eq!((got.header("x-ai-tier"), got.header("x-trigger")), (None, None), "{}", got.path);
    }
    // Metered, not tiered, not free for a user key: neither.
    assert_eq!(charged(&gw, &ai, &key, "/v1/leads/score", &sent, &leads(2)).await, 2);
    let got = ai.requests().pop().unwrap();
    assert_eq!((got.header("x-ai-tier"), got.header("x-trigger")), (None, None));
    // Tiered: exactly the priced tier, once; no x-trigger.
    let two = [("x-ai-tier", "fast"), ("x-ai-tier", "fast"), ("x-trigger", "automatic")];
    assert_eq!(charged(&gw, &ai, &key, CHAT, &two, "{}").await, 1);
    let got = ai.requests().pop().unwrap();
    assert_eq!(got.headers.get_all("x-ai-tier").iter().collect::<Vec<_>>(), ["fast"]);
    assert_eq!(got.header("x-trigger"), None);
    // Where x-trigger made the request free, the backend learns it (and nothing else).
    let system = gw.create_key("acme", "system").await;
    let auto = [("x-trigger", "Automatic"), ("x-ai-tier", "fast")];
    let res = gw.post(&system, "/v1/leads/score", &auto, &leads(3)).await;
    assert_eq!((res.status.as_u16(), res.header("x-credits-charged")), (200, None), "free: {}", res.text());
    let got = ai.requests().pop().unwrap();
    assert_eq!((got.header("x-trigger"), got.header("x-ai-tier")), (Some("automatic"), None));
}

#[tokio::test]
async fn method_override_headers_never_reach_the_backend() {
    let (gw, ai, app, key) = setup().await;
    let overrides = [("x-http-method-override", "DELETE"), ("X-HTTP-Method", "PUT"), ("x-method-override", "GET")];
    assert_eq!(charged(&gw, &ai, &key, CHAT, &overrides, r#"{"tier":"fast"}"#).await, 1);
    assert_eq!(gw.call(&key, "POST", "/v1/deals", &overrides, "{}").await.status, 200);
    for got in [ai.only(), app.only()] {
        for (name, _) in overrides {
            assert_eq!(got.header(name), None, "{name} reached {}", got.path);
        }
    }
}

#[tokio::test]
async fn a_queued_job_forwards_only_what_was_priced() {
    let (gw, ai, _app, _) = setup().await;
    let key = gw.account_with_key("poor", "fifty").await;
    spend(&gw, &key, 50).await;
    let sent = [
        ("x-ai-tier", "powerful"),
        ("x-trigger", "automatic"),
        ("x-http-method-override", "DELETE"),
        ("x-hop", "1"),
        ("connection", "x-hop"),
    ];
    let res = gw.post(&key, "/v1/calls/transcribe", &sent, r#"{"call_id":"c1"}"#).await;
    assert_eq!(res.status, 202, "{}", res.text());
    let location = res.header("location").unwrap().to_owned();
    assert_eq!(gw.topup("poor", 10, "pay-hygiene").await.status, 201);
    for _ in 0..200 {
        if gw.call(&key, "GET", &location, &[], "").await.json()["status"] == "done" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = ai.requests().pop().unwrap();
    assert_eq!(got.path, "/v1/calls/transcribe", "the job ran");
    for name in ["x-ai-tier", "x-trigger", "x-http-method-override", "x-hop"] {
        assert_eq!(got.header(name), None, "{name} reached the backend through the job runner");
    }
}

// === creditgate check ===

#[test]
fn check_warns_when_a_free_route_shares_a_metered_upstream() {
    let bin = env!("CARGO_BIN_EXE_creditgate");
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/gateway.toml");
    let out = std::process::Command::new(bin).args(["check", "--config", shipped]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("warning"), "the shipped config sends free routes to `app` only: {stderr}");

    let shared =
        SHIPPED.replacen("path_prefix = \"/\"\nupstream = \"app\"", "path_prefix = \"/\"\nupstream = \"ai\"", 1);
    assert_ne!(shared, SHIPPED);
    let path = std::env::temp_dir().join(format!("creditgate-hygiene-{}.toml", std::process::id()));
    std::fs::write(&path, shared).unwrap();
    let out = std::process::Command::new(bin).args(["check", "--config"]).arg(&path).output().unwrap();
    let _ = std::fs::remove_file(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "a warning, not an error: {stderr}");
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.starts_with("warning:")).collect();
    assert_eq!(warnings.len(), 1, "one line: {stderr}");
    assert!(warnings[0].contains("* /*") && warnings[0].contains("\"ai\""), "{}", warnings[0]);
}
