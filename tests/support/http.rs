//! A tiny HTTP/1.1 client for black-box tests, on hyper-util's legacy client.
//!
//! Every call is bounded by [`TIMEOUT`] so a hung gateway fails the test instead of hanging it.
//! Each call builds its own client: tests run on separate tokio runtimes, and a pooled
//! connection must not outlive the runtime that opened it.

use std::convert::Infallible;
use std::time::Duration;

use ::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use bytes::Bytes;
use futures_util::stream;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// Longest any single request (head and whole body) may take in a test.
pub const TIMEOUT: Duration = Duration::from_secs(15);

/// Request body type: a whole buffer or a chunked stream.
pub type ReqBody = BoxBody<Bytes, Infallible>;

/// A complete response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: StatusCode,
    /// Response headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl Response {
    /// A header as text, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().expect("header is text"))
    }

    /// `x-credits-charged` as a number; panics when absent.
    pub fn charged(&self) -> u64 {
        let v = self
            .header("x-credits-charged")
            .unwrap_or_else(|| panic!("no x-credits-charged header (status {}, body {})", self.status, self.text()));
        v.parse().expect("x-credits-charged is a number")
    }

    /// The body parsed as JSON; panics with the body text when it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}), status {}: {}", self.status, self.text()))
    }

    /// The body as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// `error.type` of a SPEC §6 error body; panics when the body is not one.
    pub fn error_type(&self) -> String {
        let v = self.json();
        let t = v["error"]["type"].as_str().unwrap_or_else(|| panic!("not a SPEC error body: {v}"));
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "error without a readable message: {v}");
        t.to_owned()
    }
}

/// A whole-buffer request body.
pub fn full(body: impl Into<Bytes>) -> ReqBody {
    Full::new(body.into()).boxed()
}

/// A streamed request body of the given chunks, with no size hint: sent chunked, no Content-Length.
pub fn chunked(chunks: Vec<Bytes>) -> ReqBody {
    let frames = chunks.into_iter().map(|c| Ok::<_, Infallible>(Frame::data(c)));
    StreamBody::new(stream::iter(frames)).boxed()
}

/// Sends a request and returns the response head with its body still streaming.
pub async fn send_streaming(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: ReqBody,
) -> ::http::Response<Incoming> {
    let client: Client<_, ReqBody> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = Request::builder().method(Method::from_bytes(method.as_bytes()).expect("method")).uri(url);
    for (k, v) in headers {
        req = req.header(HeaderName::from_bytes(k.as_bytes()).expect("name"), HeaderValue::from_str(v).expect("value"));
    }
    let req = req.body(body).expect("request");
    match tokio::time::timeout(TIMEOUT, client.request(req)).await {
        Ok(Ok(res)) => res,
        Ok(Err(e)) => panic!("{method} {url}: request failed: {e:?}"),
        Err(_) => panic!("{method} {url}: no response head within {TIMEOUT:?}"),
    }
}

/// Sends a request with any body and reads the whole response.
pub async fn send_body(method: &str, url: &str, headers: &[(&str, &str)], body: ReqBody) -> Response {
    let res = send_streaming(method, url, headers, body).await;
    let (parts, body) = res.into_parts();
    let body = match tokio::time::timeout(TIMEOUT, body.collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => panic!("{method} {url}: response body failed: {e:?}"),
        Err(_) => panic!("{method} {url}: response body not complete within {TIMEOUT:?}"),
    };
    Response { status: parts.status, headers: parts.headers, body }
}

/// Sends a request with a whole-buffer body (sent with Content-Length) and reads the whole response.
pub async fn send(method: &str, url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Response {
    send_body(method, url, headers, full(body)).await
}

/// The next data frame of a streaming body (trailers skipped); `None` at the end. Panics if
/// none arrives within `wait`, or on a body error.
pub async fn next_data(body: &mut Incoming, wait: Duration) -> Option<Bytes> {
    try_next_data(body, wait).await.unwrap_or_else(|e| panic!("response body failed: {e}"))
}

/// Like [`next_data`], but returns a body error instead of panicking on it.
pub async fn try_next_data(body: &mut Incoming, wait: Duration) -> Result<Option<Bytes>, String> {
    loop {
        let frame = match tokio::time::timeout(wait, body.frame()).await {
            Ok(f) => f,
            Err(_) => panic!("no body frame within {wait:?}"),
        };
        match frame {
            None => return Ok(None),
            Some(Err(e)) => return Err(format!("{e:?}")),
            Some(Ok(f)) => {
                if let Ok(data) = f.into_data()
                    && !data.is_empty()
                {
                    return Ok(Some(data));
                }
            }
        }
    }
}

/// Reads one HTTP/1.1 answer (its head and `Content-Length` body) from a raw connection, or
/// whatever came before the peer closed or `limit` passed.
pub async fn read_answer(stream: &mut tokio::net::TcpStream, limit: std::time::Duration) -> String {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + limit;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&seen).into_owned();
        if let Some(end) = text.find("\r\n\r\n")
            && seen.len() >= end + 4 + content_length(&text[..end])
        {
            return text;
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => seen.extend_from_slice(&buf[..n]),
            _ => return text,
        }
    }
}

/// The `Content-Length` a raw request or answer head declares (0 without one).
pub fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

/// What a raw connection sends until `marker` has come, the peer closed it, or `limit` passed.
pub async fn read_until(stream: &mut tokio::net::TcpStream, marker: &str, limit: std::time::Duration) -> String {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + limit;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(marker) {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => seen.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

/// Reads a raw connection until the peer closes it or `limit` passes; true when it closed, with
/// whatever arrived before.
pub async fn read_all(stream: &mut tokio::net::TcpStream, limit: std::time::Duration) -> (bool, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return (false, seen),
            Ok(Ok(0)) | Ok(Err(_)) => return (true, seen),
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

/// [`read_all`] with the bytes as text.
pub async fn closed_within(stream: &mut tokio::net::TcpStream, limit: std::time::Duration) -> (bool, String) {
    let (closed, bytes) = read_all(stream, limit).await;
    (closed, String::from_utf8_lossy(&bytes).into_owned())
}
