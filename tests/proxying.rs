//! Proxying through the real gateway: free routes, what the upstream receives (credentials,
//! hop-by-hop headers, request ids, the account, the exact body) and public-listener auth.

mod support;

use support::gateway::{ADMIN_TOKEN, BACKEND_AUTH, ConfigBuilder, TestGateway};
use support::http::{self, chunked, send_body};
use support::upstream::{Behaviour, Upstream};

const CHAT: &str = "/v1/chat/completions";

/// A request: path, extra headers, body.
type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str);

/// Separate `ai` and `app` upstreams, a gateway and a `user` key of account `acme`.
async fn setup() -> (TestGateway, Upstream, Upstream, String) {
    support::gateway::split_upstreams().await
}

// === free routes ===

#[tokio::test]
async fn free_routes_are_proxied_uncharged() {
    let (gw, ai, app, key) = setup().await;
    let before = gw.credits(&key).await;

    let res = gw.call(&key, "GET", "/v1/deals?stage=won&page=2", &[], "").await;
    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(res.header("x-upstream"), Some("recorder"), "the upstream's answer");
    assert_eq!(res.json()["path"], "/v1/deals?stage=won&page=2");
    assert_eq!(res.header("x-credits-charged"), None);
    assert_eq!(res.header("x-credits-remaining"), None);

    let email = r#"{"to":"bob@example.com","subject":"hi"}"#;
    let res = gw.call(&key, "POST", "/v1/emails", &[], email).await;
    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(res.header("x-credits-charged"), None);

    // A metered path with another method is not the metered route.
    let res = gw.call(&key, "GET", CHAT, &[], "").await;
    assert_eq!((res.status.as_u16(), res.header("x-credits-charged")), (200, None));

    let got = app.requests();
    assert_eq!(got.len(), 3, "free routes go to the app upstream");
    assert_eq!((got[0].method.as_str(), got[0].path.as_str()), ("GET", "/v1/deals?stage=won&page=2"));
    assert_eq!((got[1].method.as_str(), got[1].path.as_str()), ("POST", "/v1/emails"));
    assert_eq!(&got[1].body[..], email.as_bytes());
    assert_eq!(got[1].header("x-creditgate-account"), Some("acme"));
    assert_eq!(ai.count(), 0);
    assert_eq!(gw.credits(&key).await, before, "no credit touched");
}

/// The upstream's `Host` is its URL's authority, or the one its config sets in `headers`
/// (a virtual host behind plain HTTP); the client's own goes to `x-forwarded-host`.
#[tokio::test]
async fn the_upstream_host_is_its_own_or_the_configured_one() {
    let ai = Upstream::echo().await;
    let app = Upstream::echo().await;
    let configured = format!("headers = {{ authorization = \"{BACKEND_AUTH}\" }}");
    let config = ConfigBuilder::new(&ai.url()).app(&app.url()).build();
    assert!(config.contains(&configured));
    let config = config.replace(
        &configured,
        &format!("headers = {{ authorization = \"{BACKEND_AUTH}\", host = \"models.internal\" }}"),
    );
    let gw = TestGateway::start(&config).await;
    let key = gw.account_with_key("acme", "big").await;
    let client_host = [("host", "gateway.example")];
    let res = gw.call(&key, "POST", CHAT, &client_host, r#"{"messages":[]}"#).await;
    assert_eq!(res.status, 200, "{}", res.text());
    let res = gw.call(&key, "GET", "/v1/deals", &client_host, "").await;
    assert_eq!(res.status, 200, "{}", res.text());
    let (to_ai, to_app) = (&ai.requests()[0], &app.requests()[0]);
    assert_eq!(to_ai.header("host"), Some("models.internal"), "the configured Host");
    let app_authority = app.url().trim_start_matches("http://").trim_end_matches('/').to_owned();
    assert_eq!(to_app.header("host"), Some(app_authority.as_str()), "the upstream's own");
    for got in [to_ai, to_app] {
        assert_eq!(got.header("x-forwarded-host"), Some("gateway.example"));
    }
}

#[tokio::test]
async fn upstream_status_and_body_pass_through_on_free_routes() {
    let ai = Upstream::echo().await;
    let app = Upstream::start(Behaviour::Status(503)).await;
    let gw = TestGateway::start(&ConfigBuilder::new(&ai.url()).app(&app.url()).build()).await;
    let key = gw.account_with_key("acme", "big").await;
    let res = gw.call(&key, "GET", "/v1/analytics", &[], "").await;
    assert_eq!(res.status, 503);
    assert_eq!(res.json()["upstream_error"], 503);
    assert_eq!(res.header("x-credits-charged"), None);
    assert_eq!(gw.remaining(&key).await, 10_000);
}

// === what the upstream receives ===

#[tokio::test]
async fn upstream_gets_its_own_credentials_never_the_clients_key() {
    let (gw, ai, app, key) = setup().await;
    assert_eq!(gw.post(&key, CHAT, &[("x-ai-tier", "fast")], "{}").await.status, 200);
    assert_eq!(gw.call(&key, "GET", "/v1/deals", &[], "").await.status, 200);

    let got = ai.only();
    assert_eq!(got.header("authorization"), Some(BACKEND_AUTH));
    let got_app = app.only();
    assert_eq!(got_app.header("authorization"), None, "app has no configured credentials: none at all");
    for r in [got, got_app] {
        for (name, value) in &r.headers {
            let v = String::from_utf8_lossy(value.as_bytes());
            assert!(!v.contains(&key), "client key leaked to the upstream in {name}");
        }
    }
}

#[tokio::test]
async fn hop_by_hop_headers_are_not_forwarded() {
    let (gw, ai, app, key) = setup().await;
    let hop = [
        ("connection", "keep-alive, x-hop-custom"),
        ("x-hop-custom", "secret-hop"),
        ("keep-alive", "timeout=5"),
        ("te", "trailers"),
        ("upgrade", "h2c"),
        ("proxy-authorization", "Basic Zm9vOmJhcg=="),
        ("x-end-to-end", "kept"),
    ];
    assert_eq!(gw.post(&key, CHAT, &[&[("x-ai-tier", "fast")][..], &hop[..]].concat(), "{}").await.status, 200);
    assert_eq!(gw.call(&key, "GET", "/v1/deals", &hop, "").await.status, 200);
    for got in [ai.only(), app.only()] {
        for name in ["x-hop-custom", "keep-alive", "te", "upgrade", "proxy-authorization"] {
            assert_eq!(got.header(name), None, "{name} was forwarded to {}", got.path);
        }
        if let Some(c) = got.header("connection") {
            assert!(!c.contains("x-hop-custom"), "the client's Connection list was forwarded: {c}");
        }
        assert_eq!(got.header("x-end-to-end"), Some("kept"), "end-to-end headers pass");
    }
}

#[tokio::test]
async fn hop_by_hop_headers_of_the_upstream_answer_stop_at_the_gateway() {
    let (gw, ai, app, key) = setup().await;
    let answer = vec![
        ("connection", "x-up-hop"),
        ("x-up-hop", "secret"),
        ("keep-alive", "timeout=99"),
        ("proxy-authenticate", "Basic"),
        ("x-up-end-to-end", "kept"),
    ];
    ai.set(Behaviour::EchoWith(answer.clone()));
    app.set(Behaviour::EchoWith(answer));
    let metered = gw.post(&key, CHAT, &[("x-ai-tier", "fast")], "{}").await;
    let free = gw.call(&key, "GET", "/v1/deals", &[], "").await;
    for res in [metered, free] {
        assert_eq!(res.status, 200, "{}", res.text());
        assert_eq!(res.header("x-up-end-to-end"), Some("kept"));
        for name in ["x-up-hop", "keep-alive", "proxy-authenticate"] {
            assert_eq!(res.header(name), None, "{name} passed through: {:?}", res.headers);
        }
        if let Some(c) = res.header("connection") {
            assert!(!c.contains("x-up-hop"), "the upstream's Connection list passed through: {c}");
        }
    }
    // The upstream really sends them: it is the gateway that drops them.
    let direct = http::send("GET", &format!("{}/v1/deals", app.url()), &[], "").await;
    assert_eq!(direct.header("x-up-hop"), Some("secret"));
    assert_eq!(direct.header("keep-alive"), Some("timeout=99"));
    assert_eq!(direct.header("proxy-authenticate"), Some("Basic"));
}

#[tokio::test]
async fn credit_headers_come_from_the_gateway_never_the_upstream() {
    let (gw, ai, app, key) = setup().await;
    let spoof = vec![("x-credits-charged", "99"), ("x-credits-remaining", "123456"), ("x-credits-low", "true")];
    ai.set(Behaviour::EchoWith(spoof.clone()));
    app.set(Behaviour::EchoWith(spoof));

    // Metered, plenty left: the gateway's numbers, and no low flag.
    let res = gw.post(&key, CHAT, &[("x-ai-tier", "fast")], "{}").await;
    assert_eq!(res.status, 200);
    let values = |name: &str| res.headers.get_all(name).iter().map(|v| v.to_str().unwrap().to_owned()).collect();
    let charged: Vec<String> = values("x-credits-charged");
    let remaining: Vec<String> = values("x-credits-remaining");
    let low: Vec<String> = values("x-credits-low");
    assert_eq!((charged, remaining), (vec!["1".to_owned()], vec!["9999".to_owned()]));
    assert!(low.is_empty(), "x-credits-low from the upstream reached the client with 9,999 of 10,000 left");

    // Free: no credit headers at all.
    let res = gw.call(&key, "GET", "/v1/deals", &[], "").await;
    assert_eq!(res.status, 200);
    for name in ["x-credits-charged", "x-credits-remaining", "x-credits-low"] {
        assert_eq!(res.header(name), None, "{name} from the upstream reached the client on a free route");
    }
}

#[tokio::test]
async fn request_id_is_kept_or_generated_and_returned() {
    let (gw, ai, _app, key) = setup().await;
    let res = gw.post(&key, CHAT, &[("x-ai-tier", "fast"), ("x-request-id", "req-abc-123")], "{}").await;
    assert_eq!(res.header("x-request-id"), Some("req-abc-123"));
    assert_eq!(ai.requests()[0].header("x-request-id"), Some("req-abc-123"));

    let res = gw.post(&key, CHAT, &[("x-ai-tier", "fast")], "{}").await;
    let generated = res.header("x-request-id").expect("generated id on the response").to_owned();
    assert!(!generated.is_empty());
    assert_eq!(ai.requests()[1].header("x-request-id"), Some(generated.as_str()), "same id upstream");

    let res = gw.post(&key, CHAT, &[("x-ai-tier", "fast")], "{}").await;
    assert_ne!(res.header("x-request-id"), Some(generated.as_str()), "ids are unique");

    // Refusals carry one too.
    let res = gw.post(&key, CHAT, &[("x-ai-tier", "turbo"), ("x-request-id", "req-bad-1")], "{}").await;
    assert_eq!((res.status.as_u16(), res.header("x-request-id")), (400, Some("req-bad-1")));
}

#[tokio::test]
async fn account_header_is_set_by_the_gateway() {
    let (gw, ai, _app, key) = setup().await;
    let res = gw.post(&key, CHAT, &[("x-ai-tier", "fast"), ("x-creditgate-account", "someone-else")], "{}").await;
    assert_eq!(res.status, 200);
    let got = ai.only();
    let values: Vec<_> = got.headers.get_all("x-creditgate-account").iter().collect();
    assert_eq!(values, ["acme"], "spoofed value replaced");
}

#[tokio::test]
async fn request_bodies_are_forwarded_byte_for_byte() {
    let (gw, ai, _app, key) = setup().await;
    // Odd spacing, escapes, unicode, key order: anything a re-serialisation would change.
    let chat = "{ \"tier\" : \"fast\",\n  \"messages\":[{\"content\":\"h\\u00e9llo — ☃\"}], \"z\":1.50 ,\"a\":null }  ";
    let cases: [Case; 4] = [
        (CHAT, vec![], chat),                      // read for pricing (tier in the body)
        (CHAT, vec![("x-ai-tier", "fast")], chat), // streamed (priced by header)
        ("/v1/leads/enrich", vec![], "{\"leads\" :[ 1, {\"n\":\"ü\"} ]}\n"), // read for counting
        (CHAT, vec![("x-ai-tier", "fast"), ("idempotency-key", "byte-test")], chat), // read for the fingerprint
    ];
    for (i, (path, headers, body)) in cases.iter().enumerate() {
        let res = gw.post(&key, path, headers, body).await;
        assert_eq!(res.status, 200, "{}", res.text());
        let got = &ai.requests()[i];
        assert_eq!(got.path, *path);
        assert_eq!(&got.body[..], body.as_bytes(), "case {i}: body changed on the way");
    }

    // A chunked upload of a metered request arrives whole and unchanged.
    let auth = format!("Bearer {key}");
    let parts = ["{\"tier\":", " \"powerful\",", " \"messages\": []", "}"];
    let chunks = parts.iter().map(|p| bytes::Bytes::from(p.to_string())).collect();
    let res = send_body("POST", &gw.url(CHAT), &[("authorization", &auth)], chunked(chunks)).await;
    assert_eq!((res.status.as_u16(), res.charged()), (200, 5));
    assert_eq!(&ai.requests()[4].body[..], parts.concat().as_bytes());
}

// === public auth ===

#[tokio::test]
async fn requests_without_a_valid_key_are_401() {
    let (gw, ai, app, key) = setup().await;
    let unknown = format!("Bearer cg_{}", "A".repeat(40));
    for (path, method) in [(CHAT, "POST"), ("/v1/deals", "GET"), ("/v1/credits", "GET")] {
        for auth in [None, Some(unknown.as_str()), Some("Basic Zm9vOmJhcg=="), Some("Bearer ")] {
            let mut headers = vec![("x-ai-tier", "fast")];
            if let Some(a) = auth {
                headers.push(("authorization", a));
            }
            let res = http::send(method, &gw.url(path), &headers, "{}").await;
            assert_eq!(res.status, 401, "{method} {path} with {auth:?}: {}", res.text());
            assert_eq!(res.error_type(), "unauthorized");
            assert_eq!(res.header("content-type"), Some("application/json"));
        }
    }
    // The admin token is not an API key.
    let admin = format!("Bearer {ADMIN_TOKEN}");
    for (path, method) in [(CHAT, "POST"), ("/v1/credits", "GET")] {
        let res = http::send(method, &gw.url(path), &[("authorization", &admin), ("x-ai-tier", "fast")], "{}").await;
        assert_eq!(res.status, 401, "admin token on the public listener: {}", res.text());
        assert_eq!(res.error_type(), "unauthorized");
    }
    assert_eq!(ai.count() + app.count(), 0, "nothing reached an upstream");
    assert_eq!(gw.remaining(&key).await, 10_000);
}

// === upstream pools and tier routing ===

#[tokio::test]
async fn several_urls_are_used_round_robin() {
    let (one, two) = (Upstream::echo().await, Upstream::echo().await);
    let config = ConfigBuilder::new(&one.url()).build().replacen(
        &format!("urls = [\"{}\"]", one.url()),
        &format!("urls = [\"{}\", \"{}\"]", one.url(), two.url()),
        1,
    );
    let gw = TestGateway::start(&config).await;
    let key = gw.account_with_key("acme", "big").await;
    for _ in 0..6 {
        assert_eq!(gw.post(&key, CHAT, &[("x-ai-tier", "fast")], "{}").await.status, 200);
    }
    assert_eq!((one.count(), two.count()), (3, 3), "requests alternate between the two URLs");
}

#[tokio::test]
async fn a_tier_can_have_its_own_upstream() {
    let (ai, large) = (Upstream::echo().await, Upstream::echo().await);
    let config = ConfigBuilder::new(&ai.url()).build().replacen(
        "default_tier = \"balanced\"",
        "default_tier = \"balanced\"\ntier_upstreams = { powerful = \"ai-large\" }",
        1,
    ) + &format!("\n[upstreams.ai-large]\nurls = [\"{}\"]\n", large.url());
    let gw = TestGateway::start(&config).await;
    let key = gw.account_with_key("acme", "big").await;
    let res = gw.post(&key, CHAT, &[("x-ai-tier", "powerful")], "{}").await;
    assert_eq!((res.status.as_u16(), res.charged()), (200, 5));
    assert_eq!((ai.count(), large.count()), (0, 1), "powerful goes to ai-large");
    let res = gw.post(&key, CHAT, &[], r#"{"tier":"fast"}"#).await;
    assert_eq!((res.status.as_u16(), res.charged()), (200, 1));
    assert_eq!((ai.count(), large.count()), (1, 1), "other tiers stay on the route's upstream");
}
