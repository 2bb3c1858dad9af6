//! Keep-alive connections to a plain `http://` backend (the public workers' own HTTP/1 pool,
//! src/proxy/h1.rs): a connection is reused once its answer was read to the end — an empty and a
//! chunked answer included — and never while part of an answer is unread; one the backend closed
//! is not used again, and the request goes out on a new one; one whose answer the client broke off
//! is closed (hyper's own rule; the pool must not keep it alive); one whose answer came before the
//! request had gone out whole is not used again (the backend may close it without saying so).
//!
//! The backend is a bare TCP server written here, so the test sees connections themselves: how
//! many were opened, and when the gateway closed one.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::gateway::{ConfigBuilder, TestGateway};
use support::http;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Connections the backend accepted, and those the gateway closed while an answer was streaming.
#[derive(Default)]
struct Seen {
    opened: AtomicUsize,
    closed_mid_answer: AtomicUsize,
    /// Request bodies that arrived after their early answer.
    late_bodies: AtomicUsize,
    /// Requests refused (connection closed, no answer) on a connection that answered early.
    refused: AtomicUsize,
}

/// A backend answering each request by its path's `mode=`: `keep` a 200 with a 2-byte body,
/// `empty` a 204, `chunked` a 200 with a chunked 2-byte body, `close` a 200 then, 50 ms later, closes the connection (no `connection: close`
/// said),
/// `stream` a chunked 200 with one chunk, then waits for the gateway to close the connection,
/// `early` a chunked 200 with one chunk at once, before the request's body (`Content-Length`)
/// arrived; the body is read after it, then the answer's last chunk sent, and a further request
/// on that connection is met by a close, no answer (what hyper's server does when a handler
/// leaves the body unread: it answers, then closes without saying so, here at the worst moment).
async fn backend() -> (String, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            s.opened.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(stream, s.clone()));
        }
    });
    (url, seen)
}

async fn serve(mut stream: TcpStream, seen: Arc<Seen>) {
    let mut buf = Vec::new();
    let mut answered_early = false;
    loop {
        // One request head (only `early` requests have a body).
        let end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        if answered_early {
            seen.refused.fetch_add(1, Ordering::SeqCst);
            return;
        }
        let mode = head.split_whitespace().nth(1).and_then(|p| p.split("mode=").nth(1)).unwrap_or("keep").to_owned();
        let answer: &[u8] = match mode.as_str() {
            "empty" => b"HTTP/1.1 204 No Content\r\n\r\n",
            "chunked" => b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            "stream" | "early" => {
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n"
            }
            _ => b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
        };
        if stream.write_all(answer).await.is_err() {
            return;
        }
        match mode.as_str() {
            "early" => {
                answered_early = true;
                let len = http::content_length(&head);
                while buf.len() < len {
                    let mut chunk = [0u8; 4096];
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                buf.drain(..len);
                seen.late_bodies.fetch_add(1, Ordering::SeqCst);
                // The answer's end comes after the body.
                if stream.write_all(b"6\r\n world\r\n0\r\n\r\n").await.is_err() {
                    return;
                }
            }
            "close" => {
                // A moment later, as a backend's idle timeout would: the connection is in the
                // gateway's pool by then.
                tokio::time::sleep(Duration::from_millis(50)).await;
                return;
            }
            "stream" => {
                // The rest of the answer never comes; the gateway closing the connection ends it.
                let mut chunk = [0u8; 64];
                if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk)).await {
                    seen.closed_mid_answer.fetch_add(1, Ordering::SeqCst);
                }
                return;
            }
            _ => {}
        }
    }
}

/// A gateway with one public worker (so every request shares one connection pool) in front of
/// `url`, and a key.
async fn gateway(url: &str) -> (TestGateway, String) {
    let gw = TestGateway::start(&ConfigBuilder::new(url).server("workers = 1").build()).await;
    let key = gw.account_with_key("acme", "big").await;
    (gw, key)
}

async fn get(gw: &TestGateway, key: &str, mode: &str) -> http::Response {
    gw.call(key, "GET", &format!("/v1/deals?mode={mode}"), &[], "").await
}

#[tokio::test]
async fn one_upstream_connection_serves_request_after_request() {
    let (url, seen) = backend().await;
    let (gw, key) = gateway(&url).await;
    for i in 0..5 {
        let res = get(&gw, &key, "keep").await;
        assert_eq!((res.status.as_u16(), res.text().as_str()), (200, "{}"), "request {i}");
    }
    // An answer with no body, and one whose length only its last chunk tells, leave the
    // connection reusable too.
    let res = get(&gw, &key, "empty").await;
    assert_eq!(res.status, 204);
    let res = get(&gw, &key, "chunked").await;
    assert_eq!((res.status.as_u16(), res.text().as_str()), (200, "{}"));
    let res = get(&gw, &key, "keep").await;
    assert_eq!(res.status, 200);
    assert_eq!(seen.opened.load(Ordering::SeqCst), 1, "every request on the first connection");
}

#[tokio::test]
async fn a_connection_the_backend_closed_is_not_used_again() {
    let (url, seen) = backend().await;
    let (gw, key) = gateway(&url).await;
    let res = get(&gw, &key, "close").await;
    assert_eq!(res.status, 200);
    // The backend's close reaches the gateway's side of the idle connection.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..3 {
        let res = get(&gw, &key, "keep").await;
        assert_eq!((res.status.as_u16(), res.text().as_str()), (200, "{}"), "request {i} after the close");
    }
    assert_eq!(seen.opened.load(Ordering::SeqCst), 2, "one new connection, then reused");
}

#[tokio::test]
async fn an_answer_the_client_broke_off_closes_its_connection_and_the_next_request_gets_a_new_one() {
    let (url, seen) = backend().await;
    let (gw, key) = gateway(&url).await;
    let res = http::send_streaming(
        "GET",
        &gw.url("/v1/deals?mode=stream"),
        &[("authorization", &format!("Bearer {key}"))],
        http::full(""),
    )
    .await;
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    assert_eq!(http::next_data(&mut body, Duration::from_secs(5)).await.as_deref(), Some(&b"hello"[..]));
    // The client hangs up with the answer half read.
    drop(body);
    let mut closed = false;
    for _ in 0..200 {
        if seen.closed_mid_answer.load(Ordering::SeqCst) == 1 {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(closed, "the gateway closed the connection whose answer nobody reads");
    let res = get(&gw, &key, "keep").await;
    assert_eq!((res.status.as_u16(), res.text().as_str()), (200, "{}"));
    assert_eq!(seen.opened.load(Ordering::SeqCst), 2, "the half-read connection was not reused");
}

#[tokio::test]
async fn a_connection_answered_before_its_request_went_out_whole_is_not_used_again() {
    let (url, seen) = backend().await;
    let (gw, key) = gateway(&url).await;
    // A client that sends its body only once the answer is there: the gateway forwards the head,
    // the backend answers at once, and the body follows on the same connection.
    let mut client = TcpStream::connect(gw.public.trim_start_matches("http://")).await.expect("connect");
    let head = format!(
        "POST /v1/deals?mode=early HTTP/1.1\r\nhost: gateway\r\nauthorization: Bearer {key}\r\n\
         content-type: text/plain\r\ncontent-length: 5\r\n\r\n"
    );
    client.write_all(head.as_bytes()).await.expect("write head");
    let answer = http::read_until(&mut client, "hello\r\n", Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(seen.late_bodies.load(Ordering::SeqCst), 0, "answered before the body was sent");
    client.write_all(b"hello").await.expect("write body");
    // The rest of the answer still comes through (the connection is closed only after it).
    let answer = http::read_until(&mut client, "0\r\n\r\n", Duration::from_secs(10)).await;
    assert!(answer.contains(" world\r\n0\r\n\r\n"), "{answer:?}");
    assert_eq!(seen.late_bodies.load(Ordering::SeqCst), 1, "the body reached the backend");
    // The next requests go out on a new connection, not the one the backend refuses.
    for i in 0..2 {
        let res = get(&gw, &key, "keep").await;
        assert_eq!((res.status.as_u16(), res.text().as_str()), (200, "{}"), "request {i} after the early answer");
    }
    assert_eq!(seen.refused.load(Ordering::SeqCst), 0, "no request was written to the early-answered connection");
    assert_eq!(seen.opened.load(Ordering::SeqCst), 2, "one new connection, then reused");
}
