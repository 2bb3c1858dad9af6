//! Test receivers for outbound deliveries: a webhook endpoint and a minimal SMTP server, both on
//! `127.0.0.1:0`, recording everything they get.
//!
//! [`WebhookReceiver`] answers with a status the test can change at any time (503 to play a
//! target that is down), or 503 to the next N deliveries only, and records every delivery with
//! the status it answered and when, so a test can tell failed attempts from successful ones and
//! measure the gaps between them. [`SmtpReceiver`] speaks just enough SMTP for a
//! client like lettre (greeting, EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT) and keeps each
//! message with its envelope.

#![allow(dead_code)] // each test binary uses its own subset

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::http::{HeaderMap, StatusCode};
use axum::Router;
use axum::extract::{Request, State};
use axum::response::IntoResponse;
use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http_body_util::BodyExt;
use serde_json::Value;
use sha2::Sha256;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// How often the `wait_*` helpers look again.
const POLL: Duration = Duration::from_millis(25);

// === webhook ===

/// One webhook request as received.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Headers as received.
    pub headers: HeaderMap,
    /// The raw body (what the signature covers).
    pub body: Bytes,
    /// The status this receiver answered.
    pub answered: u16,
    /// When it arrived, Unix seconds (a receiver checks the signature's `t` against its clock).
    pub received_at: i64,
    /// When it arrived, for measuring the gaps between attempts.
    pub at: Instant,
}

impl Delivery {
    /// A header as text, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().expect("header is text"))
    }

    /// The body as JSON; panics with the body when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("webhook body is not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// True when this receiver answered 2xx, i.e. the sender saw a successful delivery.
    pub fn accepted(&self) -> bool {
        (200..300).contains(&self.answered)
    }
}

struct WebhookInner {
    status: AtomicU16,
    /// Deliveries still to be answered 503 before `status` applies again.
    failures_left: AtomicU32,
    /// How long each delivery waits for its answer, in ms (a slow receiver).
    delay_ms: AtomicU64,
    deliveries: Mutex<Vec<Delivery>>,
}

/// A recording webhook endpoint.
#[derive(Clone)]
pub struct WebhookReceiver {
    /// Bound address.
    pub addr: SocketAddr,
    inner: Arc<WebhookInner>,
}

impl WebhookReceiver {
    /// Starts a receiver that answers 200.
    pub async fn start() -> Self {
        Self::start_on(0).await
    }

    /// Starts a receiver that answers 200 on `127.0.0.1:port` (0: any free port) — e.g. one that
    /// comes up where the sender has so far found no one listening.
    pub async fn start_on(port: u16) -> Self {
        let inner = Arc::new(WebhookInner {
            status: AtomicU16::new(200),
            failures_left: AtomicU32::new(0),
            delay_ms: AtomicU64::new(0),
            deliveries: Mutex::new(Vec::new()),
        });
        let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind webhook receiver");
        let addr = listener.local_addr().expect("webhook receiver addr");
        let app = Router::new().fallback(receive).with_state(inner.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        WebhookReceiver { addr, inner }
    }

    /// `http://127.0.0.1:PORT/hooks`
    pub fn url(&self) -> String {
        format!("http://{}/hooks", self.addr)
    }

    /// The status later deliveries get (e.g. 503 while "down").
    pub fn set_status(&self, status: u16) {
        self.inner.status.store(status, Ordering::SeqCst);
    }

    /// Holds each later delivery this long before answering it (recorded once answered).
    pub fn set_delay(&self, delay: Duration) {
        self.inner.delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Answers the next `n` deliveries 503, then the status set with [`WebhookReceiver::set_status`].
    pub fn fail_next(&self, n: u32) {
        self.inner.failures_left.store(n, Ordering::SeqCst);
    }

    /// Every delivery so far, in arrival order.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.inner.deliveries.lock().unwrap().clone()
    }

    /// Deliveries this receiver accepted (answered 2xx).
    pub fn accepted(&self) -> Vec<Delivery> {
        self.deliveries().into_iter().filter(Delivery::accepted).collect()
    }

    /// Polls until `done(accepted deliveries)` holds, at most `limit`; returns the accepted
    /// deliveries at that point, or panics saying what arrived.
    pub async fn wait_until(&self, limit: Duration, what: &str, done: impl Fn(&[Delivery]) -> bool) -> Vec<Delivery> {
        let deadline = Instant::now() + limit;
        loop {
            let accepted = self.accepted();
            if done(&accepted) {
                return accepted;
            }
            if Instant::now() >= deadline {
                let seen: Vec<String> =
                    self.deliveries().iter().map(|d| String::from_utf8_lossy(&d.body).into_owned()).collect();
                panic!("webhook: {what} not seen within {limit:?}; got {} deliveries: {seen:#?}", seen.len());
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

async fn receive(State(inner): State<Arc<WebhookInner>>, req: Request) -> axum::response::Response {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let delay = inner.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let failing = inner.failures_left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
    let answered = if failing { 503 } else { inner.status.load(Ordering::SeqCst) };
    inner.deliveries.lock().unwrap().push(Delivery {
        method: parts.method.to_string(),
        path: parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
        headers: parts.headers,
        body,
        answered,
        received_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64),
        at: Instant::now(),
    });
    StatusCode::from_u16(answered).expect("status").into_response()
}

// === SMTP ===

/// One message as received over SMTP.
#[derive(Debug, Clone)]
pub struct Mail {
    /// `MAIL FROM` address.
    pub from: String,
    /// `RCPT TO` addresses.
    pub to: Vec<String>,
    /// The DATA section, dot-unstuffed, CRLF line ends, without the final `.` line.
    pub data: String,
}

impl Mail {
    /// The message headers (unfolded) and body, split at the first empty line.
    fn split(&self) -> (Vec<(String, String)>, &str) {
        let (head, body) = self.data.split_once("\r\n\r\n").unwrap_or((&self.data, ""));
        let mut headers: Vec<(String, String)> = Vec::new();
        for line in head.split("\r\n") {
            if line.starts_with([' ', '\t']) {
                if let Some(last) = headers.last_mut() {
                    last.1.push(' ');
                    last.1.push_str(line.trim());
                }
            } else if let Some((k, v)) = line.split_once(':') {
                headers.push((k.trim().to_owned(), v.trim().to_owned()));
            }
        }
        (headers, body)
    }

    /// A header's unfolded value (first one; case-insensitive name), RFC 2047 words decoded
    /// when they are `=?utf-8?b?…?=` or `=?utf-8?q?…?=`.
    pub fn header(&self, name: &str) -> Option<String> {
        let (headers, _) = self.split();
        headers.into_iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| decode_words(&v))
    }

    /// `Subject`.
    pub fn subject(&self) -> String {
        self.header("subject").unwrap_or_default()
    }

    /// The body text, decoded from quoted-printable or base64 when the message says so.
    pub fn text(&self) -> String {
        let (_, body) = self.split();
        match self.header("content-transfer-encoding").map(|e| e.to_ascii_lowercase()) {
            Some(e) if e == "quoted-printable" => quoted_printable(body),
            Some(e) if e == "base64" => String::from_utf8_lossy(&base64(&body.replace(['\r', '\n'], ""))).into_owned(),
            _ => body.to_owned(),
        }
    }
}

/// A minimal SMTP server that accepts every message.
#[derive(Clone)]
pub struct SmtpReceiver {
    /// Bound address.
    pub addr: SocketAddr,
    mails: Arc<Mutex<Vec<Mail>>>,
}

impl SmtpReceiver {
    /// Starts the server.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind SMTP receiver");
        let addr = listener.local_addr().expect("SMTP receiver addr");
        let mails = Arc::new(Mutex::new(Vec::new()));
        let store = mails.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let store = store.clone();
                tokio::spawn(async move {
                    // A session that breaks off (client gone, bad bytes) just ends.
                    let _ = smtp_session(stream, store).await;
                });
            }
        });
        SmtpReceiver { addr, mails }
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Every message so far.
    pub fn mails(&self) -> Vec<Mail> {
        self.mails.lock().unwrap().clone()
    }

    /// Polls until `done(messages)` holds, at most `limit`; panics with what arrived otherwise.
    pub async fn wait_until(&self, limit: Duration, what: &str, done: impl Fn(&[Mail]) -> bool) -> Vec<Mail> {
        let deadline = Instant::now() + limit;
        loop {
            let mails = self.mails();
            if done(&mails) {
                return mails;
            }
            if Instant::now() >= deadline {
                let subjects: Vec<String> = mails.iter().map(Mail::subject).collect();
                panic!("SMTP: {what} not seen within {limit:?}; subjects so far: {subjects:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// Longest a session may sit idle before the server hangs up.
const SMTP_IDLE: Duration = Duration::from_secs(30);

async fn smtp_session(stream: TcpStream, store: Arc<Mutex<Vec<Mail>>>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    write.write_all(b"220 receiver.test ESMTP test receiver\r\n").await?;
    let mut from = String::new();
    let mut to = Vec::new();
    loop {
        let Some(line) = read_line(&mut lines).await? else { return Ok(()) };
        let upper = line.to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") {
            b"250-receiver.test\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n"
        } else if upper.starts_with("HELO") {
            b"250 receiver.test\r\n"
        } else if upper.starts_with("MAIL FROM:") {
            from = address(&line["MAIL FROM:".len()..]);
            to.clear();
            b"250 OK\r\n"
        } else if upper.starts_with("RCPT TO:") {
            to.push(address(&line["RCPT TO:".len()..]));
            b"250 OK\r\n"
        } else if upper == "DATA" {
            write.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n").await?;
            let mut data = String::new();
            loop {
                let Some(l) = read_line(&mut lines).await? else { return Ok(()) };
                if l == "." {
                    break;
                }
                data.push_str(l.strip_prefix('.').unwrap_or(&l));
                data.push_str("\r\n");
            }
            store.lock().unwrap().push(Mail { from: from.clone(), to: std::mem::take(&mut to), data });
            b"250 OK: queued\r\n"
        } else if upper == "RSET" || upper == "NOOP" {
            b"250 OK\r\n"
        } else if upper == "QUIT" {
            write.write_all(b"221 Bye\r\n").await?;
            return Ok(());
        } else {
            b"502 Command not implemented\r\n"
        };
        write.write_all(reply).await?;
    }
}

/// One line without its CRLF; `None` at end of stream or after [`SMTP_IDLE`] of silence.
async fn read_line(r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    match tokio::time::timeout(SMTP_IDLE, r.read_until(b'\n', &mut buf)).await {
        Err(_) | Ok(Ok(0)) => Ok(None),
        Ok(Ok(_)) => {
            while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                buf.pop();
            }
            Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
        }
        Ok(Err(e)) => Err(e),
    }
}

/// `<a@b>` (with optional parameters after it) → `a@b`.
fn address(arg: &str) -> String {
    let arg = arg.trim();
    match (arg.find('<'), arg.find('>')) {
        (Some(s), Some(e)) if s < e => arg[s + 1..e].to_owned(),
        _ => arg.split_whitespace().next().unwrap_or_default().to_owned(),
    }
}

/// Decodes RFC 2047 encoded words (`=?charset?B|Q?text?=`), assuming UTF-8.
fn decode_words(v: &str) -> String {
    let mut out = String::new();
    let mut rest = v;
    let mut last_was_word = false;
    while let Some(start) = rest.find("=?") {
        let before = &rest[..start];
        let after = &rest[start + 2..];
        let parts: Vec<&str> = after.splitn(3, '?').collect();
        let Some(end) = parts.get(2).and_then(|p| p.find("?=")) else { break };
        // Whitespace between two adjacent encoded words is not part of the text.
        if !(last_was_word && before.trim().is_empty()) {
            out.push_str(before);
        }
        let text = &parts[2][..end];
        let bytes = match parts[1].to_ascii_uppercase().as_str() {
            "B" => base64(text),
            _ => quoted_printable(&text.replace('_', " ")).into_bytes(),
        };
        out.push_str(&String::from_utf8_lossy(&bytes));
        rest = &parts[2][end + 2..];
        last_was_word = true;
    }
    out.push_str(rest);
    out
}

/// Quoted-printable → text (soft line breaks removed, `=XX` decoded as UTF-8 bytes).
fn quoted_printable(s: &str) -> String {
    let s = s.replace("=\r\n", "").replace("=\n", "");
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'='
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Standard base64 → bytes (padding and unknown characters ignored).
fn base64(s: &str) -> Vec<u8> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter_map(value) {
        acc = (acc << 6) | c;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// The receiver-side check of README "Events", in Rust: parse `t` and the `v1` signatures,
/// refuse a `t` more than 300 s from `now`, compare HMAC-SHA256(secret, "<t>.<body>") in
/// constant time. Ok(t) when it verifies.
pub fn verify_webhook(secret: &[u8], header: &str, body: &[u8], now: i64) -> Result<i64, &'static str> {
    const TOLERANCE_SECS: i64 = 300;
    let mut t = None;
    let mut v1 = Vec::new();
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => v1.extend(hex::decode(v).ok()),
            _ => {}
        }
    }
    let t = t.ok_or("no timestamp")?;
    if (now - t).abs() > TOLERANCE_SECS {
        return Err("stale");
    }
    // verify_slice compares in constant time; any v1 may match (a receiver rotating secrets).
    let ok = v1.iter().any(|sig| {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
        mac.update(format!("{t}.").as_bytes());
        mac.update(body);
        mac.verify_slice(sig).is_ok()
    });
    if ok { Ok(t) } else { Err("bad signature") }
}
