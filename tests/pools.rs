//! Upstream pools that heal (issue 13, item 2): traffic leaves a killed or failing backend and
//! comes back when it recovers; a request is retried on another backend only when it never
//! reached one, and is charged once whatever the retries; a hung backend holds no more than
//! `max_in_flight`; every backend full is 503 `upstream_busy`, refunded; a stalled answer is cut
//! off after `stream_idle_timeout_ms`; `least_requests` sends new work to the idle backend. Found
//! by an attacker's review and fixed: a request no connection took is never charged (empty body
//! included), a hanging connect fails over at `connect_timeout_ms`, slow uploads eject no backend,
//! a full pool is busy rather than a spill onto an ejected backend, and a passing health check does
//! not cut short an ejection traffic caused.
//!
//! The backends are real HTTP servers on loopback ports that can be killed (listener and
//! connections closed) and started again on the same port.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::backend::{Backend, Mode};
use support::gateway::{ConfigBuilder, TestGateway};
use support::http;
use support::upstream::refused_url;

const CHAT: &str = r#"{"messages":[{"role":"user","content":"hi"}]}"#;

async fn gateway(urls: &[String], settings: &[&str]) -> (TestGateway, String) {
    let config = ConfigBuilder::new(&refused_url()).ai_pool(urls, settings).build();
    let gw = TestGateway::start(&config).await;
    let key = gw.account_with_key("acme", "big").await;
    (gw, key)
}

async fn chat(gw: &TestGateway, key: &str) -> http::Response {
    gw.post(key, "/v1/chat/completions", &[("x-ai-tier", "fast")], CHAT).await
}

/// The backend of `upstream` whose URL is `url`, as `GET /admin/v1/config` shows it.
async fn health(gw: &TestGateway, url: &str) -> String {
    let view = gw.admin_call("GET", "/admin/v1/config", None).await.json();
    let backends = view["upstreams"]["ai"]["backends"].as_array().expect("backends").clone();
    let b = backends.iter().find(|b| b["url"] == url).unwrap_or_else(|| panic!("{url} not in {backends:?}"));
    b["health"].as_str().expect("health").to_owned()
}

/// A metric's value for the `ai` backend at `url`.
async fn metric(gw: &TestGateway, name: &str, url: &str) -> f64 {
    let text = http::send("GET", &format!("{}/metrics", gw.admin), &[], "").await.text();
    let want = format!("{name}{{upstream=\"ai\",backend=\"{url}\"}} ");
    let line = text.lines().find(|l| l.starts_with(&want)).unwrap_or_else(|| panic!("no {want} in:\n{text}"));
    line[want.len()..].trim().parse().expect("a number")
}

/// Waits (bounded) until `f` holds.
async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    for _ in 0..200 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("never happened: {what}");
}

#[tokio::test]
async fn traffic_leaves_a_killed_backend_and_returns_when_it_is_back() {
    let mut a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let (gw, key) = gateway(&[a.url(), b.url()], &["eject_after = 2", "eject_ms = 300"]).await;
    for _ in 0..10 {
        assert_eq!(chat(&gw, &key).await.status, 200);
    }
    assert_eq!((a.hits(), b.hits()), (5, 5), "round robin over two backends");
    let before = gw.remaining(&key).await;

    a.kill().await;
    for i in 0..40 {
        let res = chat(&gw, &key).await;
        assert_eq!(res.status, 200, "request {i} after the kill: {}", res.text());
        assert_eq!(res.json()["backend"], "b");
    }
    assert_eq!(b.hits(), 45, "every request went to the live backend");
    assert_eq!(gw.remaining(&key).await, before - 40, "charged once per request, retries or not");
    assert_eq!(health(&gw, &a.url()).await, "ejected");
    assert_eq!(metric(&gw, "creditgate_upstream_ejections_total", &a.url()).await, 1.0);
    assert_eq!(metric(&gw, "creditgate_upstream_healthy", &a.url()).await, 0.0);
    assert!(metric(&gw, "creditgate_upstream_errors_total", &a.url()).await >= 2.0);

    a.restart().await;
    // The cool-down runs out; one request probes the backend, and it is back in the rotation.
    tokio::time::sleep(Duration::from_millis(350)).await;
    for _ in 0..20 {
        assert_eq!(chat(&gw, &key).await.status, 200);
    }
    assert!(a.hits() >= 5 + 9, "traffic came back to the restarted backend: it got {}", a.hits() - 5);
    assert_eq!(health(&gw, &a.url()).await, "healthy");
    assert_eq!(metric(&gw, "creditgate_upstream_in_flight", &b.url()).await, 0.0);
}

#[tokio::test]
async fn a_failing_backend_is_ejected_and_an_active_health_check_brings_it_back() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    // The cool-down is long: only the health check can bring the backend back within the test.
    let settings = ["eject_after = 2", "eject_ms = 600000", "health_path = \"/health\"", "health_interval_ms = 50"];
    let (gw, key) = gateway(&[a.url(), b.url()], &settings).await;
    a.set(Mode::Sick);
    eventually("the sick backend is ejected by its health checks", async || health(&gw, &a.url()).await == "ejected")
        .await;
    let before = gw.remaining(&key).await;
    for _ in 0..10 {
        let res = chat(&gw, &key).await;
        assert_eq!(res.status, 200);
        assert_eq!(res.json()["backend"], "b");
    }
    assert_eq!(a.hits(), 0, "an ejected backend gets no traffic");
    assert_eq!(gw.remaining(&key).await, before - 10);

    a.set(Mode::Ok);
    eventually("a passing health check brings the backend back", async || health(&gw, &a.url()).await == "healthy")
        .await;
    for _ in 0..10 {
        assert_eq!(chat(&gw, &key).await.status, 200);
    }
    assert!(a.hits() >= 4, "traffic returned to the healed backend: it got {}", a.hits());
}

#[tokio::test]
async fn answers_5xx_in_a_row_eject_a_backend_without_health_checks() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let (gw, key) = gateway(&[a.url(), b.url()], &["eject_after = 3", "eject_ms = 600000"]).await;
    a.set(Mode::Sick);
    let before = gw.remaining(&key).await;
    let mut failed = 0;
    for _ in 0..30 {
        let res = chat(&gw, &key).await;
        if res.status == 500 {
            failed += 1;
        } else {
            assert_eq!(res.status, 200);
        }
    }
    // A 5xx already reached the backend: it is answered (and refunded), never retried.
    assert_eq!(failed, 3, "the third 5xx in a row ejects the backend");
    assert_eq!(a.hits(), 3);
    assert_eq!(gw.remaining(&key).await, before - 27, "the 5xx answers were refunded");
    assert_eq!(health(&gw, &a.url()).await, "ejected");
}

#[tokio::test]
async fn a_request_that_reached_a_backend_is_not_sent_to_another() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let (gw, key) = gateway(&[a.url(), b.url()], &[]).await;
    a.set(Mode::Close);
    let before = gw.remaining(&key).await;
    // Round robin starts at the first backend: it reads the request and hangs up.
    let res = chat(&gw, &key).await;
    assert_eq!(res.status, 502, "{}", res.text());
    assert_eq!((a.hits(), b.hits()), (1, 0), "the backend may have done the work: not sent twice");
    assert_eq!(gw.remaining(&key).await, before, "refunded (status_5xx)");
}

#[tokio::test]
async fn a_hung_backend_holds_no_more_than_max_in_flight() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let settings = ["max_in_flight = 2", "first_byte_timeout_ms = 30000"];
    let (gw, key) = gateway(&[a.url(), b.url()], &settings).await;
    a.set(Mode::Hang);
    let gw = std::sync::Arc::new(gw);
    // One request after another (the other backend has max_in_flight too): round robin sends
    // every other one to the hung backend until it holds two, then they all go to the other.
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (gw2, key2) = (gw.clone(), key.clone());
        let held = a.hits();
        let t = tokio::spawn(async move { chat(&gw2, &key2).await });
        eventually("answered, or held by the hung backend", async || t.is_finished() || a.hits() > held).await;
        tasks.push(t);
    }
    assert_eq!(a.hits(), 2, "the hung backend got only max_in_flight requests");
    assert_eq!(a.most_held(), 2);
    assert_eq!(b.hits(), 18);
    assert_eq!(metric(&gw, "creditgate_upstream_in_flight", &a.url()).await, 2.0);
    for t in tasks {
        if t.is_finished() {
            let res = t.await.expect("task");
            assert_eq!(res.status, 200, "{}", res.text());
            assert_eq!(res.json()["backend"], "b");
        } else {
            t.abort();
        }
    }
}

#[tokio::test]
async fn every_backend_full_is_503_upstream_busy_and_refunded() {
    let a = Backend::start("a").await;
    let settings = ["max_in_flight = 2", "first_byte_timeout_ms = 30000"];
    let (gw, key) = gateway(&[a.url()], &settings).await;
    a.set(Mode::Hang);
    let before = gw.remaining(&key).await;
    let gw = std::sync::Arc::new(gw);
    let hung: Vec<_> = (0..2)
        .map(|_| {
            let (gw, key) = (gw.clone(), key.clone());
            tokio::spawn(async move { chat(&gw, &key).await })
        })
        .collect();
    eventually("the backend holds two requests", async || a.hits() == 2).await;
    for _ in 0..3 {
        let res = chat(&gw, &key).await;
        assert_eq!(res.status, 503, "{}", res.text());
        assert_eq!(res.json()["error"]["type"], "upstream_busy");
        assert_eq!(res.headers["retry-after"], "1");
        assert_eq!(res.headers["x-credits-charged"], "0", "refunded");
    }
    assert_eq!(a.hits(), 2, "the refused requests were never sent");
    assert_eq!(gw.remaining(&key).await, before - 2, "only the two in flight are charged");
    for h in hung {
        h.abort();
    }
}

#[tokio::test]
async fn a_stalled_answer_is_cut_off_after_stream_idle_timeout_and_refunded() {
    let a = Backend::start("a").await;
    let (gw, key) = gateway(&[a.url()], &["stream_idle_timeout_ms = 300"]).await;
    a.set(Mode::Stall);
    let before = gw.remaining(&key).await;
    let auth = format!("Bearer {key}");
    let headers = [("authorization", auth.as_str()), ("x-ai-tier", "fast"), ("content-type", "application/json")];
    let res = http::send_streaming("POST", &gw.url("/v1/chat/completions"), &headers, http::full(CHAT)).await;
    assert_eq!(res.status(), 200);
    // The first chunk comes through; then the backend goes quiet and the answer is cut off
    // (the client's read ends in an error, not in a hang).
    let body = tokio::time::timeout(Duration::from_secs(20), http_body_util::BodyExt::collect(res.into_body())).await;
    assert!(matches!(body, Ok(Err(_))), "the stalled answer was not cut off: {body:?}");
    gw.wait_for_remaining(&key, before, 100).await;
    assert_eq!(metric(&gw, "creditgate_upstream_in_flight", &a.url()).await, 0.0);
    assert_eq!(metric(&gw, "creditgate_upstream_errors_total", &a.url()).await, 1.0);
}

#[tokio::test]
async fn least_requests_sends_new_work_to_the_idle_backend() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let (gw, key) = gateway(&[a.url(), b.url()], &["balance = \"least_requests\""]).await;
    a.set(Mode::Hang);
    let gw = std::sync::Arc::new(gw);
    // Whichever backend the first request lands on, make it the busy one.
    let first = {
        let (gw, key) = (gw.clone(), key.clone());
        tokio::spawn(async move { chat(&gw, &key).await })
    };
    eventually("the first request reached a backend", async || a.hits() + b.hits() == 1).await;
    if b.hits() == 1 {
        // It went to b, which answered at once; occupy a with the next one instead.
        let _ = first.await;
        let (gw2, key2) = (gw.clone(), key.clone());
        tokio::spawn(async move { chat(&gw2, &key2).await });
        eventually("a holds a request", async || a.hits() == 1).await;
    }
    let b_before = b.hits();
    for _ in 0..10 {
        let res = chat(&gw, &key).await;
        assert_eq!(res.status, 200);
    }
    assert_eq!(a.hits(), 1, "round robin would have sent half of them to the busy backend");
    assert_eq!(b.hits(), b_before + 10);
}

#[tokio::test]
async fn first_byte_timeout_is_per_upstream() {
    let a = Backend::start("a").await;
    let (gw, key) = gateway(&[a.url()], &["first_byte_timeout_ms = 200"]).await;
    a.set(Mode::Hang);
    let before = gw.remaining(&key).await;
    let res = chat(&gw, &key).await;
    assert_eq!(res.status, 504, "{}", res.text());
    assert_eq!(res.json()["error"]["type"], "upstream_timeout");
    // ai_chat's refund_on includes "timeout" in the shipped config.
    assert_eq!(gw.remaining(&key).await, before);
    let view: Value = gw.admin_call("GET", "/admin/v1/config", None).await.json();
    assert_eq!(view["config"]["upstreams"]["ai"]["first_byte_timeout_ms"], 200);
}

// === requests that never reached a backend ===

const POSITION: &str = "/v1/insights/position";

/// A loopback port whose accept queue is full: a connect to it is neither accepted nor refused
/// (Linux drops the SYN), so it hangs until the connector gives up. Keep the returned values
/// alive for as long as the port should stay that way.
async fn unanswered_port() -> (tokio::net::TcpListener, Vec<tokio::net::TcpStream>, String) {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind("127.0.0.1:0".parse().unwrap()).expect("bind");
    let listener = sock.listen(1).expect("listen");
    let addr = listener.local_addr().expect("addr");
    let mut held = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_millis(300), tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(s)) => held.push(s),
            Ok(Err(e)) => panic!("connect to the full listener failed instead of hanging: {e}"),
            Err(_) => break,
        }
        assert!(held.len() < 64, "the accept queue never filled");
    }
    (listener, held, format!("http://{addr}"))
}

/// A request with a body whose backend connect never completes is answered 502 at
/// `connect_timeout_ms` (the connect phase has its own limit; the wait for the answer head starts
/// once a connection took the request) and refunded: nothing was delivered.
#[tokio::test]
async fn a_request_whose_connect_never_completed_is_502_and_refunded() {
    let (_l, _held, url) = unanswered_port().await;
    let (gw, key) = gateway(&[url], &["connect_timeout_ms = 300"]).await;
    let before = gw.remaining(&key).await;
    let res = gw.post(&key, POSITION, &[], "{}").await;
    assert_eq!((res.status.as_u16(), res.error_type().as_str()), (502, "upstream_unavailable"), "{}", res.text());
    assert_eq!(gw.wait_for_remaining(&key, before, 40).await, before, "refunded: the backend never got it");
}

/// The same with an empty body, which is never read: it counts as delivered only once a
/// connection took the request, so a connect that never completed is refunded too.
#[tokio::test]
async fn an_empty_request_whose_connect_never_completed_is_refunded() {
    let (_l, _held, url) = unanswered_port().await;
    let (gw, key) = gateway(&[url], &["connect_timeout_ms = 300"]).await;
    let before = gw.remaining(&key).await;
    let res = gw.post(&key, POSITION, &[], "").await;
    assert_eq!(res.status, 502, "{}", res.text());
    assert_eq!(
        gw.wait_for_remaining(&key, before, 40).await,
        before,
        "charged for a request no backend ever saw (x-credits-charged: {:?})",
        res.header("x-credits-charged")
    );
}

/// A client that hangs up while the gateway is still connecting to the backend is refunded, also
/// when its request has an empty body (which is never read: it counts as delivered only once a
/// connection took it).
#[tokio::test]
async fn a_hang_up_while_connecting_refunds_an_empty_request() {
    let (_l, _held, url) = unanswered_port().await;
    let (gw, key) = gateway(&[url], &["first_byte_timeout_ms = 30000"]).await;
    let before = gw.remaining(&key).await;
    for body in ["{}", ""] {
        let (u, auth) = (gw.url(POSITION), format!("Bearer {key}"));
        let client = tokio::spawn(async move { http::send("POST", &u, &[("authorization", &auth)], body).await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!client.is_finished(), "the connect was not held back");
        client.abort();
        let _ = client.await;
        assert_eq!(
            gw.wait_for_remaining(&key, before, 60).await,
            before,
            "body {body:?}: a client that left before anything reached a backend kept its charge"
        );
    }
}

// === places on a backend come back ===

/// A client that takes the first chunk of a stalled stream and then leaves gives its place on
/// the backend back (no `stream_idle_timeout_ms`: only the hang-up can end it).
#[tokio::test]
async fn a_client_that_leaves_a_stalled_stream_frees_its_place() {
    let a = Backend::start("a").await;
    let (gw, key) = gateway(&[a.url()], &["max_in_flight = 1"]).await;
    a.set(Mode::Stall);
    let auth = format!("Bearer {key}");
    let headers = [("authorization", auth.as_str()), ("x-ai-tier", "fast"), ("content-type", "application/json")];
    let res = http::send_streaming("POST", &gw.url("/v1/chat/completions"), &headers, http::full(CHAT)).await;
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    assert!(http::next_data(&mut body, Duration::from_secs(5)).await.is_some());
    assert_eq!(metric(&gw, "creditgate_upstream_in_flight", &a.url()).await, 1.0);
    drop(body);
    eventually("the place on the backend is given back", async || {
        metric(&gw, "creditgate_upstream_in_flight", &a.url()).await == 0.0
    })
    .await;
}

/// A client that leaves while a hung backend holds its request gives its place back.
#[tokio::test]
async fn a_client_that_leaves_a_hung_request_frees_its_place() {
    let a = Backend::start("a").await;
    let (gw, key) = gateway(&[a.url()], &["max_in_flight = 1", "first_byte_timeout_ms = 30000"]).await;
    a.set(Mode::Hang);
    let gw = std::sync::Arc::new(gw);
    let (gw2, key2) = (gw.clone(), key.clone());
    let t = tokio::spawn(async move { chat(&gw2, &key2).await });
    eventually("the backend holds the request", async || a.hits() == 1).await;
    t.abort();
    let _ = t.await;
    eventually("the place on the backend is given back", async || {
        metric(&gw, "creditgate_upstream_in_flight", &a.url()).await == 0.0
    })
    .await;
    a.set(Mode::Ok);
    assert_eq!(chat(&gw, &key).await.status, 200);
}

// === a slow client is not a failing backend ===

/// A request body of one chunk now and the rest never (the sender is returned to keep it open).
fn slow_body() -> (tokio::sync::mpsc::Sender<bytes::Bytes>, http::ReqBody) {
    use http_body_util::BodyExt;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
    tx.try_send(bytes::Bytes::from_static(b"{\"a\":")).unwrap();
    let stream = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx).map(|c| c.map(|c| Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(c))))
    });
    (tx, http_body_util::StreamBody::new(stream).boxed())
}

/// Clients that upload their body slowly do not eject a healthy backend: a first-byte timeout
/// counts against the backend only once it had the whole body (otherwise `eject_after` slow
/// clients in a row could steer traffic away from a backend that never failed anything).
#[tokio::test]
async fn slow_uploading_clients_do_not_eject_a_healthy_backend() {
    let a = Backend::start("a").await;
    let settings = ["first_byte_timeout_ms = 300", "eject_after = 2", "eject_ms = 600000"];
    let (gw, key) = gateway(&[a.url()], &settings).await;
    let auth = format!("Bearer {key}");
    let mut keep = Vec::new();
    for _ in 0..2 {
        let (tx, body) = slow_body();
        keep.push(tx);
        let headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
        let res = http::send_body("POST", &gw.url(POSITION), &headers, body).await;
        assert_eq!(res.status, 504, "{}", res.text());
    }
    // (The test backend counts a hit even for a body cut short, so `a.hits()` says nothing here.)
    assert_eq!(health(&gw, &a.url()).await, "healthy", "a backend was ejected for its clients' slowness");
}

// === passive ejection and active health checks ===

/// A backend that fails every real request with a 5xx but answers its health check stays out
/// for the whole `eject_ms`: a passing health check lifts only an ejection health checks caused.
#[tokio::test]
async fn a_backend_ejected_for_5xx_answers_stays_out_for_eject_ms() {
    use support::upstream::{Behaviour, Upstream};
    let sick = Upstream::start(Behaviour::Chaos(Duration::from_secs(1))).await;
    let b = Backend::start("b").await;
    let settings = ["eject_after = 2", "eject_ms = 600000", "health_path = \"/health\"", "health_interval_ms = 100"];
    let (gw, key) = gateway(&[sick.url(), b.url()], &settings).await;
    let failing = r#"{"messages":[{"role":"user","content":"hi"}],"upstream":"status500"}"#;
    let mut sent_to_sick = Vec::new();
    for round in 0..3 {
        for _ in 0..10 {
            gw.post(&key, "/v1/chat/completions", &[("x-ai-tier", "fast")], failing).await;
        }
        sent_to_sick.push(sick.requests().iter().filter(|r| r.path == "/v1/chat/completions").count());
        if round == 0 {
            assert_eq!(health(&gw, &sick.url()).await, "ejected");
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_eq!(
        sent_to_sick[2], sent_to_sick[0],
        "the ejected backend got more real requests within eject_ms (after each round: {sent_to_sick:?})"
    );
}

/// A backend whose connect hangs is given up at `connect_timeout_ms` and the request goes to the
/// next backend — also when `first_byte_timeout_ms` is shorter (that timer starts only once a
/// connection took the request).
#[tokio::test]
async fn a_connect_that_hangs_goes_to_the_next_backend() {
    let (_l, _held, url) = unanswered_port().await;
    let b = Backend::start("b").await;
    let (gw, key) = gateway(&[url, b.url()], &["first_byte_timeout_ms = 300", "connect_timeout_ms = 1000"]).await;
    // Round robin starts at the first backend, the one whose connect hangs.
    let res = chat(&gw, &key).await;
    assert_eq!(res.status, 200, "{}", res.text());
}

/// When the healthy backends are at `max_in_flight`, the answer is 503 `upstream_busy` (always
/// refunded), not a spill onto an ejected backend (where the request would likely time out after
/// delivery and keep its charge).
#[tokio::test]
async fn full_healthy_backends_are_busy_not_a_spill_to_an_ejected_one() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let settings = ["max_in_flight = 1", "first_byte_timeout_ms = 300", "eject_after = 1", "eject_ms = 600000"];
    let (gw, key) = gateway(&[a.url(), b.url()], &settings).await;
    a.set(Mode::Hang);
    b.set(Mode::Stall);
    let auth = format!("Bearer {key}");
    let headers = [("authorization", auth.as_str()), ("x-ai-tier", "fast"), ("content-type", "application/json")];
    // 1st request: backend a (round robin starts there), which hangs: 504, a is ejected.
    let first = http::send_streaming("POST", &gw.url("/v1/chat/completions"), &headers, http::full(CHAT)).await;
    assert_eq!(first.status(), 504);
    assert_eq!(health(&gw, &a.url()).await, "ejected");
    // 2nd: backend b, whose answer stays open: b is full.
    let second = http::send_streaming("POST", &gw.url("/v1/chat/completions"), &headers, http::full(CHAT)).await;
    assert_eq!(second.status(), 200);
    assert_eq!(metric(&gw, "creditgate_upstream_in_flight", &b.url()).await, 1.0);
    // Every backend that gets traffic is full: this one is upstream_busy, refunded.
    let before = gw.remaining(&key).await;
    let res = gw.post(&key, POSITION, &[], "{}").await;
    let charged = before - gw.wait_for_remaining(&key, before, 20).await;
    assert_eq!(
        (res.status.as_u16(), charged),
        (503, 0),
        "sent to the ejected backend instead: {} {}",
        res.status,
        res.text()
    );
    drop(second);
}
