//! Connection hygiene on the listeners, tried as an attacker would: half-sent heads, idle
//! keep-alive connections, stalled bodies, oversized heads, connection floods — each bounded by a
//! `[server]` setting — and a graceful shutdown that still finishes what is in flight.

mod support;

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use support::gateway::{ADMIN_TOKEN, ConfigBuilder, TestGateway};
use support::http;
use support::process::GatewayProcess;
use support::upstream::{Behaviour, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The host:port of a gateway URL.
fn addr(url: &str) -> String {
    url.trim_start_matches("http://").to_owned()
}

/// One complete request on `stream`, reading the answer head and its `Content-Length` body.
async fn request(stream: &mut TcpStream, raw: &str) -> String {
    stream.write_all(raw.as_bytes()).await.unwrap();
    let answer = http::read_answer(stream, Duration::from_secs(10)).await;
    assert!(answer.contains("\r\n\r\n"), "closed before the answer: {answer}");
    answer
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.trim().parse::<f64>().ok()))
        .map_or(0, |v| v as u64)
}

async fn metrics(gw: &TestGateway) -> String {
    http::send("GET", &format!("{}/metrics", gw.admin), &[], "").await.text()
}

#[tokio::test]
async fn half_sent_heads_and_silent_connections_are_closed_after_the_header_timeout() {
    let up = Upstream::echo().await;
    let config = ConfigBuilder::new(&up.url()).server("header_read_timeout_ms = 300").build();
    let gw = TestGateway::start(&config).await;
    let mut conns = Vec::new();
    for i in 0..60 {
        let mut s = TcpStream::connect(addr(&gw.public)).await.unwrap();
        if i % 2 == 0 {
            // Slowloris: a head that never ends.
            s.write_all(b"GET /dashboard HTTP/1.1\r\nHost: x\r\nX-Slow: ").await.unwrap();
        }
        conns.push(s);
    }
    for s in &mut conns {
        let (closed, _) = http::closed_within(s, Duration::from_secs(10)).await;
        assert!(closed, "a connection without a whole head is closed");
    }
    // The admin listener has the same bound.
    let mut s = TcpStream::connect(addr(&gw.admin)).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
    assert!(http::closed_within(&mut s, Duration::from_secs(10)).await.0);
    assert!(metric(&metrics(&gw).await, "creditgate_connections_header_timeout_total") >= 61);
    // Honest clients are unaffected.
    assert_eq!(http::send("GET", &gw.url("/dashboard"), &[], "").await.status, 200);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout_not_before_its_next_request() {
    let up = Upstream::echo().await;
    let config =
        ConfigBuilder::new(&up.url()).server("header_read_timeout_ms = 60000").server("idle_timeout_ms = 1500").build();
    let gw = TestGateway::start(&config).await;
    let mut s = TcpStream::connect(addr(&gw.public)).await.unwrap();
    let get = "GET /dashboard HTTP/1.1\r\nHost: x\r\n\r\n";
    assert!(request(&mut s, get).await.starts_with("HTTP/1.1 200"));
    // A pause shorter than the idle timeout keeps the connection.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(request(&mut s, get).await.starts_with("HTTP/1.1 200"), "kept alive");
    // Silence past it closes the connection (the header timeout, 60 s, is not what does it).
    let (closed, _) = http::closed_within(&mut s, Duration::from_secs(20)).await;
    assert!(closed, "the idle connection was closed");
    assert_eq!(metric(&metrics(&gw).await, "creditgate_connections_idle_timeout_total"), 1);
}

#[tokio::test]
async fn a_stalled_body_is_408_and_nothing_is_charged() {
    let up = Upstream::echo().await;
    let config = ConfigBuilder::new(&up.url()).server("body_read_timeout_ms = 300").build();
    let gw = TestGateway::start(&config).await;
    let key = gw.account_with_key("acme", "big").await;
    // A fixed-price route streams its body on; a per-lead route buffers it for pricing.
    for path in ["/v1/sentiment", "/v1/leads/enrich"] {
        let mut s = TcpStream::connect(addr(&gw.public)).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"leads\":[1,"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let (_, answer) = http::closed_within(&mut s, Duration::from_secs(10)).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{path}: {answer}");
        assert!(answer.contains("request_timeout"), "{path}: {answer}");
    }
    assert_eq!(gw.wait_for_remaining(&key, 10_000, 100).await, 10_000, "nothing charged");
}

/// A body dripping one byte every 200 ms never stalls past `body_read_timeout_ms`, so only a
/// whole-body deadline ends it: without one a client held its connection, and with
/// `max_connections = 1` everyone else's, for as long as it liked.
#[tokio::test]
async fn a_body_dripping_inside_the_read_timeout_is_408_at_the_total_deadline() {
    let up = Upstream::echo().await;
    let config = ConfigBuilder::new(&up.url())
        .server("body_read_timeout_ms = 1000")
        .server("body_total_timeout_ms = 1500")
        .server("max_connections = 1")
        .build();
    let gw = TestGateway::start(&config).await;
    let key = gw.account_with_key("acme", "big").await;
    // A fixed-price route streams its body on; a per-lead route buffers it for pricing.
    for path in ["/v1/sentiment", "/v1/leads/enrich"] {
        let mut s = TcpStream::connect(addr(&gw.public)).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        // At most 50 drops (10 s, far past the 1.5 s deadline); JSON allows leading blanks.
        let mut answer = Vec::new();
        let mut drops = 0;
        while drops < 50 && answer.is_empty() {
            if s.write_all(b" ").await.is_err() {
                break;
            }
            drops += 1;
            let (closed, got) = http::read_all(&mut s, Duration::from_millis(200)).await;
            answer.extend(got);
            if closed {
                break;
            }
        }
        // Answered while the client still drips (a pause now would end it as a stall).
        assert!(!answer.is_empty(), "{path}: still reading the body after {drops} drops");
        answer.extend(http::read_all(&mut s, Duration::from_secs(5)).await.1);
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 408"), "{path}: after {drops} drops: {answer:?}");
        assert!(answer.contains("request_timeout"), "{path}: {answer}");
    }
    // The one connection slot is free again, and nothing was charged.
    assert_eq!(gw.wait_for_remaining(&key, 10_000, 100).await, 10_000, "nothing charged");
}

#[tokio::test]
async fn a_head_larger_than_max_header_bytes_is_431() {
    let up = Upstream::echo().await;
    let config = ConfigBuilder::new(&up.url()).server("max_header_bytes = 8192").build();
    let gw = TestGateway::start(&config).await;
    let big = "x".repeat(20_000);
    let mut s = TcpStream::connect(addr(&gw.public)).await.unwrap();
    let raw = format!("GET /dashboard HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
    let _ = s.write_all(raw.as_bytes()).await;
    let (_, answer) = http::closed_within(&mut s, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn beyond_max_connections_new_connections_wait_until_one_closes() {
    let up = Upstream::echo().await;
    let config = ConfigBuilder::new(&up.url()).server("max_connections = 4").build();
    let gw = TestGateway::start(&config).await;
    let get = "GET /dashboard HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(addr(&gw.public)).await.unwrap();
        assert!(request(&mut s, get).await.starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    // The fifth connects (the kernel's backlog) but is not served while four are open.
    let mut fifth = TcpStream::connect(addr(&gw.public)).await.unwrap();
    fifth.write_all(get.as_bytes()).await.unwrap();
    let mut buf = [0u8; 64];
    let waited = tokio::time::timeout(Duration::from_millis(500), fifth.read(&mut buf)).await;
    assert!(waited.is_err(), "not served beyond the cap");
    // Four on the public listener and the admin connection asking.
    assert_eq!(metric(&metrics(&gw).await, "creditgate_connections_open"), 5);
    drop(held.pop());
    let n = tokio::time::timeout(Duration::from_secs(10), fifth.read(&mut buf)).await.expect("served").unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"), "served once a slot freed");
}

#[tokio::test]
async fn shutdown_finishes_requests_in_flight() {
    let up = Upstream::start(Behaviour::Delay(Duration::from_millis(600))).await;
    let gw = TestGateway::start(&ConfigBuilder::new(&up.url()).build()).await;
    let key = gw.account_with_key("acme", "big").await;
    let (url, auth) = (gw.url("/v1/deals"), format!("Bearer {key}"));
    let slow = tokio::spawn(async move { http::send("GET", &url, &[("authorization", &auth)], "").await });
    up.wait_for_count(1).await;
    let public = gw.public.clone();
    gw.gateway.shutdown(Duration::from_secs(10)).await;
    assert_eq!(slow.await.unwrap().status, 200, "the request in flight got its answer");
    assert!(TcpStream::connect(addr(&public)).await.is_err(), "no longer listening");
}

/// A key of a new account on a gateway process (admin API).
async fn process_key(gw: &GatewayProcess) -> String {
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let admin = |path: &str| format!("{}{path}", gw.admin);
    let account = r#"{"id":"acme","plan":"big"}"#;
    assert_eq!(
        http::send("POST", &admin("/admin/v1/accounts"), &[("authorization", &auth)], account).await.status,
        201
    );
    let res =
        http::send("POST", &admin("/admin/v1/accounts/acme/keys"), &[("authorization", &auth)], r#"{"role":"user"}"#)
            .await;
    res.json()["key"].as_str().expect("a key").to_owned()
}

/// SIGTERM on the real binary: the request in flight gets its answer, new connections are
/// refused, and the process exits 0 by itself.
#[tokio::test]
async fn sigterm_finishes_requests_in_flight_and_exits_0() {
    let up = Upstream::start(Behaviour::Delay(Duration::from_millis(800))).await;
    let mut gw = GatewayProcess::start(&ConfigBuilder::new(&up.url()).build()).await;
    let key = process_key(&gw).await;
    let (url, auth) = (format!("{}/v1/deals", gw.public), format!("Bearer {key}"));
    let slow = tokio::spawn(async move { http::send("GET", &url, &[("authorization", &auth)], "").await });
    up.wait_for_count(1).await;
    gw.signal("TERM");
    assert_eq!(slow.await.unwrap().status, 200, "the request in flight got its answer");
    let status = gw.wait_exit(Duration::from_secs(10)).await.expect("exited by itself");
    assert!(status.success(), "exit status {status:?}");
    assert!(TcpStream::connect(addr(&gw.public)).await.is_err(), "no longer listening");
}

/// `server.shutdown_grace_ms` bounds the drain: a request that outlasts it does not keep the
/// process alive (here the upstream would take 20 s; the hang guard is 10 s).
#[tokio::test]
async fn sigterm_stops_waiting_after_the_grace_period() {
    let up = Upstream::start(Behaviour::Delay(Duration::from_secs(20))).await;
    let config = ConfigBuilder::new(&up.url()).server("shutdown_grace_ms = 200").build();
    let mut gw = GatewayProcess::start(&config).await;
    let key = process_key(&gw).await;
    let mut slow = TcpStream::connect(addr(&gw.public)).await.unwrap();
    let request = format!("GET /v1/deals HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n");
    slow.write_all(request.as_bytes()).await.unwrap();
    up.wait_for_count(1).await;
    gw.signal("TERM");
    let status = gw.wait_exit(Duration::from_secs(10)).await.expect("exited once the grace period was over");
    assert!(status.success(), "exit status {status:?}");
    let (closed, answer) = http::closed_within(&mut slow, Duration::from_secs(5)).await;
    assert!(closed && answer.is_empty(), "the cut request's connection closed without an answer: {answer:?}");
}

/// An upstream answering every request with `size` bytes of JSON-ish text.
async fn big_upstream(size: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = listener.local_addr().unwrap();
    let app = Router::new().fallback(move || async move {
        let mut body = vec![b' '; size];
        body[0] = b'{';
        body[size - 1] = b'}';
        axum::response::Response::builder().header("content-type", "application/json").body(Body::from(body)).unwrap()
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{a}")
}

/// A client that asks for a large answer and never reads it used to hold its connection (and one
/// of `max_connections`) forever. With the cap at 2, two such clients locked everyone out; the
/// write timeout closes them.
#[tokio::test]
async fn a_client_that_stops_reading_its_answer_is_closed_after_the_write_timeout() {
    let up = big_upstream(64 << 20).await;
    let config = ConfigBuilder::new(&up)
        .server("max_connections = 2")
        .server("header_read_timeout_ms = 300")
        .server("idle_timeout_ms = 300")
        .server("body_read_timeout_ms = 300")
        .server("write_timeout_ms = 500")
        .build();
    let gw = TestGateway::start(&config).await;
    let key = gw.account_with_key("acme", "big").await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr(&gw.public)).await.unwrap();
        let raw = format!("GET /v1/deals HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n");
        s.write_all(raw.as_bytes()).await.unwrap();
        held.push(s); // never read
    }
    // Far beyond every configured timeout.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut honest = TcpStream::connect(addr(&gw.public)).await.unwrap();
    honest.write_all(b"GET /dashboard HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let (_, got) = http::read_all(&mut honest, Duration::from_secs(5)).await;
    assert!(
        String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"),
        "an honest client is served after two non-reading clients sat on the connection cap \
         (got {} bytes)",
        got.len()
    );
}

/// A slow reader: the answer's body was handed to hyper (so it counts as over) but still sat in
/// hyper's write queue when the idle timeout fired, and the answer was cut off: a truncated 200.
/// Queued bytes now keep the connection out of idleness.
#[tokio::test]
async fn the_idle_timeout_never_cuts_off_an_answer_a_slow_client_is_still_reading() {
    const SIZE: usize = 8 << 20;
    let up = big_upstream(SIZE).await;
    let config =
        ConfigBuilder::new(&up).server("header_read_timeout_ms = 60000").server("idle_timeout_ms = 300").build();
    let gw = TestGateway::start(&config).await;
    let key = gw.account_with_key("acme", "big").await;
    let mut s = TcpStream::connect(addr(&gw.public)).await.unwrap();
    let raw = format!("GET /v1/deals HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n");
    s.write_all(raw.as_bytes()).await.unwrap();
    // A slow client: reads 64 KiB every 20 ms (~3 MiB/s), so the 32 MiB take ~10 s.
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 16 << 10];
    let mut closed = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
        let text_len = seen.windows(4).position(|w| w == b"\r\n\r\n");
        if let Some(end) = text_len
            && seen.len() >= end + 4 + SIZE
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let end = seen.windows(4).position(|w| w == b"\r\n\r\n").expect("an answer head") + 4;
    let head = String::from_utf8_lossy(&seen[..end]).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(seen.len() - end, SIZE, "the whole 200 answer arrives (closed early: {closed}); head: {head}");
}
