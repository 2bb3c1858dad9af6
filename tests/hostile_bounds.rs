//! Bounds a hostile client tried to step around (an attacker's review): each test states the
//! bound it holds the gateway to, and each failed before its fix — the Stripe webhook's body
//! bound, queued jobs' header bytes, concurrent key guesses from one address, non-UTF-8 path
//! parameters, the customer API's body bound, non-ASCII paths, a half head pipelined behind a
//! whole request.

mod support;

use support::gateway::{ConfigBuilder, TestGateway, spend};
use support::stores::{Env, Store};

const WEBHOOK: &str = "/v1/billing/stripe/webhook";

/// `server.max_body_bytes` ("larger bodies get 413") holds on every public route, also for a
/// client without any credentials: the Stripe webhook reads nothing while payments are off
/// (404), and with them on refuses a body over the bound with the JSON 413 — also above axum's
/// own 2 MB default, which answers in plain text.
#[tokio::test]
async fn the_stripe_webhook_reads_no_body_over_max_body_bytes() {
    let up = support::upstream::Upstream::echo().await;
    let off = TestGateway::start(&ConfigBuilder::new(&up.url()).max_body_bytes(4096).build()).await;
    let answer = declare_and_send_part(&off.public, 256 * 1024).await;
    assert!(answer.starts_with("HTTP/1.1 404") && answer.contains("\"not_found\""), "off: {answer}");

    let var = format!("CG_ATTACK10_STRIPE_{}", std::process::id());
    // SAFETY: a variable of this test's own, set before the gateway that reads it starts.
    unsafe {
        std::env::set_var(&var, "sk_test_x");
        std::env::set_var(format!("{var}_PK"), "pk_test_x");
        std::env::set_var(format!("{var}_WH"), "whsec_x");
    }
    let stripe = format!(
        "\n[billing.stripe]\nsecret_key_env = \"{var}\"\nwebhook_secret_env = \"{var}_WH\"\n\
         publishable_key_env = \"{var}_PK\"\napi_base = \"http://127.0.0.1:9\"\n"
    );
    let on = TestGateway::start(&ConfigBuilder::new(&up.url()).max_body_bytes(4096).extra(&stripe).build()).await;
    for size in [256 * 1024, 3 * 1024 * 1024] {
        let answer = declare_and_send_part(&on.public, size).await;
        assert!(answer.starts_with("HTTP/1.1 413") && answer.contains("\"payload_too_large\""), "{size}: {answer}");
    }
}

/// Sends a webhook POST that declares `declared` body bytes but sends only 1 KiB of them, and
/// returns what the gateway answers (it must answer without waiting for the rest).
async fn declare_and_send_part(base: &str, declared: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(base.trim_start_matches("http://")).await.unwrap();
    let head = format!(
        "POST {WEBHOOK} HTTP/1.1\r\nHost: x\r\nStripe-Signature: t=1,v1=00\r\nContent-Length: {declared}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&[b'x'; 1024]).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while !String::from_utf8_lossy(&answer).contains("}}") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer while the body is still owed: {:?}", String::from_utf8_lossy(&answer));
    String::from_utf8_lossy(&answer).into_owned()
}

/// `jobs.max_queued_bytes_per_account` bounds what one account's waiting jobs cost the store.
/// A queued job keeps its request headers and path too (they are replayed to the backend), but
/// only the body is counted: with an empty body and ~45 KB of headers per request, an account
/// at zero credits queues `max_queued_per_account` such jobs — 1,000 × 45 KB ≈ 45 MB by
/// default against a stated 16 MiB — and the byte budget never triggers.
async fn queued_headers_count_against_the_queue_byte_budget(store: Store) {
    const BUDGET: usize = 20_000;
    let env = Env::with(store, |b| {
        b.extra(&format!("[jobs]\nmax_body_bytes = 1000\nmax_queued_bytes_per_account = {BUDGET}\n"))
    })
    .await;
    let gw = &env.gw;
    let key = gw.account_with_key("acme", "fifty").await;
    spend(gw, &key, 50).await;
    let pad = "p".repeat(5_000);
    let headers = [("x-pad-a", pad.as_str()), ("x-pad-b", pad.as_str()), ("x-pad-c", pad.as_str())];
    let mut queued = 0usize;
    for _ in 0..6 {
        let res = gw.post(&key, "/v1/calls/transcribe", &headers, "{}").await;
        match res.status.as_u16() {
            202 => queued += 1,
            429 => break,
            other => panic!("unexpected {other}: {}", res.text()),
        }
    }
    // What the queue holds is really the headers: a top-up runs the jobs with them.
    assert_eq!(gw.topup("acme", 1000, "pay-1").await.status, 201);
    env.up.wait_for_count(1 + 1).await;
    let ran = env.up.requests().into_iter().filter(|r| r.path == "/v1/calls/transcribe").collect::<Vec<_>>();
    assert!(ran.iter().any(|r| r.header("x-pad-a").is_some_and(|v| v.len() == 5_000)), "headers were stored");
    assert!(queued >= 1, "one job of ~15 KB fits the budget");
    let stored = queued * 3 * 5_000;
    assert!(
        stored <= BUDGET,
        "{queued} jobs queued holding {stored} bytes of request headers, against \
         jobs.max_queued_bytes_per_account = {BUDGET}"
    );
}

on_both_stores!(queued_headers_count_against_the_queue_byte_budget);

/// `server.header_read_timeout_ms` holds "every later request on [a connection] from its first
/// byte". A slowloris that pipelines the start of its second head in the same packet as a whole
/// first request used to escape it (the second head's bytes arrive before the first request is
/// parsed, so its start cleared the head timer) and held the connection until `idle_timeout_ms`.
/// The listener now compares the bytes read with what the requests took on the wire.
#[tokio::test]

async fn a_partial_head_pipelined_behind_a_request_is_closed_at_the_header_timeout() {
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    let up = support::upstream::Upstream::echo().await;
    let config =
        ConfigBuilder::new(&up.url()).server("header_read_timeout_ms = 500").server("idle_timeout_ms = 60000").build();
    let gw = TestGateway::start(&config).await;
    let addr = gw.public.trim_start_matches("http://").to_owned();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"GET /dashboard HTTP/1.1\r\nHost: x\r\n\r\nGET /dashboard HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let (closed, answer) = support::http::closed_within(&mut s, Duration::from_secs(8)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "the first request is answered: {answer:.100}");
    assert!(closed, "a half-sent second head is still held open 8 s later (header_read_timeout_ms = 500)");
}

/// The other side of the case above: a connection whose requests were all taken whole stays
/// open, idle, past the header timeout, until `idle_timeout_ms` (a request with a body included).
#[tokio::test]
async fn a_keep_alive_connection_with_nothing_pending_waits_for_the_idle_timeout() {
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    let up = support::upstream::Upstream::echo().await;
    let config =
        ConfigBuilder::new(&up.url()).server("header_read_timeout_ms = 500").server("idle_timeout_ms = 60000").build();
    let gw = TestGateway::start(&config).await;
    let key = gw.account_with_key("acme", "fifty").await;
    let addr = gw.public.trim_start_matches("http://").to_owned();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let body = r#"{"leads":[1]}"#;
    let head = format!(
        "POST /v1/leads/enrich HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}GET /dashboard HTTP/1.1\r\nHost: x\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // Both answers (they may come in one read): the second, the dashboard page, ends the stream.
    let mut both = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    while !String::from_utf8_lossy(&both).contains("</html>") {
        use tokio::io::AsyncReadExt;
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await.expect("answers").unwrap();
        assert!(n > 0, "closed before both answers: {}", String::from_utf8_lossy(&both));
        both.extend_from_slice(&buf[..n]);
    }
    let both = String::from_utf8_lossy(&both);
    assert!(both.starts_with("HTTP/1.1 200") && both.matches("HTTP/1.1 200").count() == 2, "{both:.300}");
    let (closed, _) = support::http::closed_within(&mut s, Duration::from_millis(1500)).await;
    assert!(!closed, "an idle keep-alive connection was closed at the header timeout");
}

/// Calls of one Redis command so far (`INFO commandstats`).
fn redis_calls(redis: &support::redis::RedisServer, command: &str) -> u64 {
    let info = redis.command(&["INFO", "commandstats"]);
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.trim().strip_prefix(&prefix).and_then(|r| r.split(',').next()?.parse().ok()))
        .unwrap_or(0)
}

/// `rate_limits.failed_auth_burst`: "an address over its allowance is refused before its key is
/// looked up, so a key scanner costs no store lookups". The allowance is spent only *after* a
/// lookup failed, so without a bound a scanner sending its guesses at once (one per connection,
/// up to `server.max_connections`) had every one looked up before the first failure counted. At
/// most `failed_auth_burst` lookups of one address run at once, so such a burst costs at most
/// twice the burst in lookups (the turns taken before the allowance was known to be spent).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_concurrent_key_scan_costs_no_more_lookups_than_the_failed_auth_burst() {
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    const BURST: u64 = 3;
    const GUESSES: usize = 150;
    let env = Env::with(Store::Redis, |b| {
        b.rate_limit(&format!("failed_auth_burst = {BURST}")).rate_limit("failed_auth_per_minute = 1")
    })
    .await;
    let redis = env.redis.as_ref().unwrap();
    let addr = env.gw.public.trim_start_matches("http://").to_owned();
    let mut conns = Vec::new();
    for _ in 0..GUESSES {
        conns.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = redis_calls(redis, "hgetall");
    for (i, s) in conns.iter_mut().enumerate() {
        let head = format!(
            "GET /v1/credits HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer cg_guess_{i:06}_aaaaaaaaaaaaaaaa\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
    }
    let mut statuses = std::collections::BTreeMap::<String, usize>::new();
    for s in &mut conns {
        let answer = support::http::read_answer(s, Duration::from_secs(10)).await;
        *statuses.entry(answer.get(9..12).unwrap_or("???").to_owned()).or_default() += 1;
    }
    let lookups = redis_calls(redis, "hgetall") - before;
    assert!(
        lookups <= 2 * BURST,
        "{GUESSES} concurrent guesses from one address cost {lookups} key lookups with \
         failed_auth_burst = {BURST} (answers: {statuses:?})"
    );
}

/// Every refusal is the gateway's JSON error (SPEC §6). A job id that is not UTF-8 once
/// percent-decoded is refused by axum's `Path` extractor with its own plain-text 400.
#[tokio::test]
async fn a_job_id_that_is_not_utf8_gets_the_json_error_shape() {
    let up = support::upstream::Upstream::echo().await;
    let gw = TestGateway::with_upstream(&up.url()).await;
    let key = gw.account_with_key("acme", "fifty").await;
    let res = gw.call(&key, "GET", "/v1/jobs/%FF%FE", &[], "").await;
    let json = serde_json::from_slice::<serde_json::Value>(&res.body).ok();
    assert!(json.as_ref().is_some_and(|v| v["error"]["type"].is_string()), "{}: {:?}", res.status, res.text());
    // The admin API, likewise.
    let res = gw.admin_call("GET", "/admin/v1/accounts/%FF%FE", None).await;
    let json = serde_json::from_slice::<serde_json::Value>(&res.body).ok();
    assert!(json.as_ref().is_some_and(|v| v["error"]["type"].is_string()), "{}: {:?}", res.status, res.text());
}

/// `server.max_body_bytes` holds on the customer API too: its JSON bodies are read up to a
/// fixed 64 KiB whatever the configured bound.
#[tokio::test]
async fn the_customer_api_refuses_a_body_over_max_body_bytes() {
    let up = support::upstream::Upstream::echo().await;
    let gw = TestGateway::start(&ConfigBuilder::new(&up.url()).max_body_bytes(4096).build()).await;
    let key = gw.account_with_key("acme", "fifty").await;
    let body = format!(r#"{{"enabled": false, "pad": "{}"}}"#, "x".repeat(60_000));
    let res = gw.call(&key, "PUT", "/v1/credits/auto-topup", &[], &body).await;
    assert_eq!(res.status, 413, "a 60 KB body with max_body_bytes = 4096: {}", res.text());
}

/// Path normalisation must not change bytes it has no rule for. A raw UTF-8 path that also has
/// something to normalise (here a trailing slash) reaches the backend with every non-ASCII
/// byte re-encoded as a Latin-1 character (`/v1/déals/` → `/v1/dÃ©als`): `decode_unreserved`
/// pushes each byte as a `char`.
#[tokio::test]
async fn normalising_a_utf8_path_keeps_its_bytes() {
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    let up = support::upstream::Upstream::echo().await;
    let gw = TestGateway::with_upstream(&up.url()).await;
    let key = gw.account_with_key("acme", "fifty").await;
    let addr = gw.public.trim_start_matches("http://").to_owned();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!("GET /v1/d\u{e9}als/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let answer = support::http::read_answer(&mut s, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let got = up.only().path;
    assert_eq!(got, "/v1/d\u{e9}als", "the backend got {got:?}");
}
