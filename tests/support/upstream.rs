//! A recording upstream: a real axum server on `127.0.0.1:0` that keeps every request it got
//! (method, path with query, headers, body) and answers the way the test says ([`Behaviour`]).
//!
//! Streamed answers are driven by the test through a [`StreamGate`]: the upstream sends a chunk
//! only when the test releases it, so a test can prove the gateway passed chunk 1 on before the
//! upstream sent chunk 2, or make the body break off mid-stream.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// How the upstream answers.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// 200 JSON `{"ok": true, "method", "path", "body_len"}` with `x-upstream: recorder`.
    Echo,
    /// Like [`Behaviour::Echo`], with these extra response headers.
    EchoWith(Vec<(&'static str, &'static str)>),
    /// This status with a small JSON body.
    Status(u16),
    /// Waits this long, then answers like [`Behaviour::Echo`].
    Delay(Duration),
    /// Waits this long, then answers this status (a slow failure).
    DelayThen(Duration, u16),
    /// 200 `text/event-stream` whose chunks come from the next [`StreamGate`] the test made.
    Stream,
    /// Each request chooses by its JSON body's `"upstream"` field (chaos runs): `"ok"` (also
    /// when absent) answers like [`Behaviour::Echo`] with `"n"`, the request's index in
    /// [`Upstream::requests`]; `"slow"` the same after 300 ms; `"status500"` a 500; `"hang"`
    /// waits this long before answering; `"die"` sends a 200 head and part of the body, then
    /// breaks the connection off.
    Chaos(Duration),
}

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Headers as received.
    pub headers: HeaderMap,
    /// The whole body as received.
    pub body: Bytes,
}

impl Recorded {
    /// A header as text, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().expect("header is text"))
    }
}

enum StreamItem {
    Chunk(Bytes),
    Abort,
}

/// Releases the chunks of one streamed answer. Dropping it (or [`StreamGate::finish`]) ends the
/// stream normally.
pub struct StreamGate {
    tx: mpsc::UnboundedSender<StreamItem>,
}

impl StreamGate {
    /// Lets the upstream send one more chunk.
    pub fn send(&self, chunk: &str) {
        self.tx.send(StreamItem::Chunk(Bytes::copy_from_slice(chunk.as_bytes()))).expect("stream still open");
    }

    /// Ends the stream normally.
    pub fn finish(self) {}

    /// Breaks the connection off mid-body (no terminating chunk).
    pub fn abort(self) {
        self.tx.send(StreamItem::Abort).expect("stream still open");
    }
}

struct Inner {
    behaviour: Mutex<Behaviour>,
    requests: Mutex<Vec<Recorded>>,
    gates: Mutex<VecDeque<mpsc::UnboundedReceiver<StreamItem>>>,
}

/// A running recording upstream.
#[derive(Clone)]
pub struct Upstream {
    /// Bound address.
    pub addr: SocketAddr,
    inner: Arc<Inner>,
}

impl Upstream {
    /// Starts an upstream that answers with `behaviour`.
    pub async fn start(behaviour: Behaviour) -> Self {
        let inner = Arc::new(Inner {
            behaviour: Mutex::new(behaviour),
            requests: Mutex::new(Vec::new()),
            gates: Mutex::new(VecDeque::new()),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        let app = Router::new().fallback(handle).with_state(inner.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Upstream { addr, inner }
    }

    /// A 200 JSON echo upstream.
    pub async fn echo() -> Self {
        Self::start(Behaviour::Echo).await
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Changes how later requests are answered.
    pub fn set(&self, behaviour: Behaviour) {
        *self.inner.behaviour.lock().unwrap() = behaviour;
    }

    /// Makes the gate for the next [`Behaviour::Stream`] answer.
    pub fn stream_gate(&self) -> StreamGate {
        let (tx, rx) = mpsc::unbounded_channel();
        self.inner.gates.lock().unwrap().push_back(rx);
        StreamGate { tx }
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.requests.lock().unwrap().clone()
    }

    /// How many requests were received.
    pub fn count(&self) -> usize {
        self.inner.requests.lock().unwrap().len()
    }

    /// Waits (at most 10 s, polling) until `n` requests were received; panics otherwise.
    pub async fn wait_for_count(&self, n: usize) {
        for _ in 0..1000 {
            if self.count() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the upstream got {} requests, expected {n}", self.count());
    }

    /// The only request received; panics unless exactly one arrived.
    pub fn only(&self) -> Recorded {
        let all = self.requests();
        assert_eq!(all.len(), 1, "expected exactly one upstream request, got {}", all.len());
        all.into_iter().next().unwrap()
    }
}

/// A URL nothing listens on: a port bound and released at once (connection refused).
pub fn refused_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    format!("http://{addr}")
}

async fn handle(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let method = parts.method.to_string();
    let body_len = body.len();
    let chosen = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["upstream"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "ok".to_owned());
    let n = {
        let mut requests = inner.requests.lock().unwrap();
        requests.push(Recorded { method: method.clone(), path: path.clone(), headers: parts.headers, body });
        requests.len() - 1
    };
    let behaviour = inner.behaviour.lock().unwrap().clone();
    let numbered_path = path.clone();
    let echo = move || {
        let mut res =
            axum::Json(json!({"ok": true, "method": method, "path": path, "body_len": body_len})).into_response();
        res.headers_mut().insert("x-upstream", HeaderValue::from_static("recorder"));
        res
    };
    match behaviour {
        Behaviour::Echo => echo(),
        Behaviour::EchoWith(headers) => {
            let mut res = echo();
            for (k, v) in headers {
                res.headers_mut().append(k, HeaderValue::from_static(v));
            }
            res
        }
        Behaviour::Status(code) => {
            let status = StatusCode::from_u16(code).expect("status");
            (status, axum::Json(json!({"upstream_error": code}))).into_response()
        }
        Behaviour::Delay(d) => {
            tokio::time::sleep(d).await;
            echo()
        }
        Behaviour::DelayThen(d, code) => {
            tokio::time::sleep(d).await;
            let status = StatusCode::from_u16(code).expect("status");
            (status, axum::Json(json!({"upstream_error": code}))).into_response()
        }
        Behaviour::Chaos(hang) => {
            let numbered = || {
                let mut res = axum::Json(json!({"ok": true, "n": n, "path": numbered_path, "body_len": body_len}))
                    .into_response();
                res.headers_mut().insert("x-upstream", HeaderValue::from_static("recorder"));
                res
            };
            match chosen.as_str() {
                "slow" => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    numbered()
                }
                "status500" => (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(json!({"upstream_error": 500, "n": n})))
                    .into_response(),
                "hang" => {
                    tokio::time::sleep(hang).await;
                    numbered()
                }
                "die" => {
                    let head = Bytes::from(format!(r#"{{"n":{n},"partial":""#));
                    let chunks = futures_util::stream::unfold(0, move |step| {
                        let head = head.clone();
                        async move {
                            match step {
                                0 => Some((Ok(head), 1)),
                                1 => {
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                    Some((Err(std::io::Error::other("upstream died mid-body")), 2))
                                }
                                _ => None,
                            }
                        }
                    });
                    let mut res = Body::from_stream(chunks).into_response();
                    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    res
                }
                _ => numbered(),
            }
        }
        Behaviour::Stream => {
            let Some(rx) = inner.gates.lock().unwrap().pop_front() else {
                return (StatusCode::INTERNAL_SERVER_ERROR, "test made no stream gate").into_response();
            };
            let chunks = futures_util::stream::unfold(rx, |mut rx| async move {
                match rx.recv().await {
                    Some(StreamItem::Chunk(c)) => Some((Ok(c), rx)),
                    Some(StreamItem::Abort) => Some((Err(std::io::Error::other("upstream broke off")), rx)),
                    None => None,
                }
            });
            let mut res = Body::from_stream(chunks).into_response();
            res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            res
        }
    }
}
