//! A backend for pool tests that can be killed and brought back on the same port, and told how
//! to behave ([`Mode`]). Killing it closes the listener and every open connection (a crashed
//! process), so a gateway's pooled keep-alive connections die with it.
//!
//! It counts what reached it: requests (health checks apart), health checks, and the most
//! requests it held at once.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How the backend answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// 200 JSON naming the backend; `/health` 200.
    Ok = 0,
    /// 500 to everything, `/health` included.
    Sick = 1,
    /// Reads the request, then never answers (until killed); `/health` 200.
    Hang = 2,
    /// Reads the request, then closes the connection without an answer.
    Close = 3,
    /// 200 head and one chunk, then nothing more (until killed).
    Stall = 4,
}

struct Inner {
    name: &'static str,
    mode: AtomicU8,
    hits: AtomicUsize,
    health_checks: AtomicUsize,
    held: AtomicUsize,
    most_held: AtomicUsize,
}

/// See the module docs.
pub struct Backend {
    /// Bound address (kept across kills).
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    kill: Option<watch::Sender<bool>>,
}

impl Backend {
    /// Starts a backend named `name` (its answers say which backend answered).
    pub async fn start(name: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
        let inner = Arc::new(Inner {
            name,
            mode: AtomicU8::new(Mode::Ok as u8),
            hits: AtomicUsize::new(0),
            health_checks: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
            most_held: AtomicUsize::new(0),
        });
        let addr = listener.local_addr().expect("addr");
        let mut b = Backend { addr, inner, kill: None };
        b.serve(listener);
        b
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Changes how later requests are answered.
    pub fn set(&self, mode: Mode) {
        self.inner.mode.store(mode as u8, Ordering::SeqCst);
    }

    /// Requests received (health checks not counted).
    pub fn hits(&self) -> usize {
        self.inner.hits.load(Ordering::SeqCst)
    }

    /// Health checks received.
    pub fn health_checks(&self) -> usize {
        self.inner.health_checks.load(Ordering::SeqCst)
    }

    /// The most requests it held at once.
    pub fn most_held(&self) -> usize {
        self.inner.most_held.load(Ordering::SeqCst)
    }

    /// Closes the listener and every connection: nothing answers on the port any more.
    pub async fn kill(&mut self) {
        if let Some(k) = self.kill.take() {
            let _ = k.send(true);
            // Give the tasks a moment to drop their sockets.
            for _ in 0..100 {
                if tokio::net::TcpStream::connect(self.addr).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("backend {} still accepts connections after kill", self.inner.name);
        }
    }

    /// Listens on the same port again.
    pub async fn restart(&mut self) {
        assert!(self.kill.is_none(), "restart of a running backend");
        let listener = TcpListener::bind(self.addr).await.expect("rebind backend port");
        self.serve(listener);
    }

    fn serve(&mut self, listener: TcpListener) {
        let (tx, rx) = watch::channel(false);
        self.kill = Some(tx);
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let mut stop = rx.clone();
            loop {
                let (stream, _) = tokio::select! {
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
                    _ = stop.wait_for(|k| *k) => return,
                };
                let (inner, mut stop) = (inner.clone(), rx.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req| answer(inner.clone(), req));
                    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = conn => {}
                        _ = stop.wait_for(|k| *k) => {}
                    }
                });
            }
        });
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(k) = self.kill.take() {
            let _ = k.send(true);
        }
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// Counts a request in flight for as long as it lives.
struct Held(Arc<Inner>);

impl Held {
    fn new(inner: &Arc<Inner>) -> Self {
        let now = inner.held.fetch_add(1, Ordering::SeqCst) + 1;
        inner.most_held.fetch_max(now, Ordering::SeqCst);
        Held(inner.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An `Err` makes hyper close the connection without an answer ([`Mode::Close`]).
async fn answer(inner: Arc<Inner>, req: hyper::Request<Incoming>) -> Result<hyper::Response<Body>, std::io::Error> {
    let health = req.uri().path() == "/health";
    let _ = req.into_body().collect().await;
    let mode = inner.mode.load(Ordering::SeqCst);
    let status = |code: u16, text: String| {
        hyper::Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(text)).boxed())
            .expect("response")
    };
    if health {
        inner.health_checks.fetch_add(1, Ordering::SeqCst);
        let code = if mode == Mode::Sick as u8 { 503 } else { 200 };
        return Ok(status(code, "{}".into()));
    }
    inner.hits.fetch_add(1, Ordering::SeqCst);
    let held = Held::new(&inner);
    let ok = format!(r#"{{"backend":"{}","choices":[]}}"#, inner.name);
    Ok(match mode {
        m if m == Mode::Sick as u8 => status(500, r#"{"error":"sick"}"#.into()),
        m if m == Mode::Hang as u8 => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        m if m == Mode::Close as u8 => {
            drop(held);
            return Err(std::io::Error::other("closing without an answer"));
        }
        m if m == Mode::Stall as u8 => {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
            let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"data: {\"part\":1}\n\n")))).await;
            tokio::spawn(async move {
                let _keep = (tx, held);
                std::future::pending::<()>().await;
            });
            let stream = tokio_stream_of(rx);
            hyper::Response::builder()
                .header("content-type", "text/event-stream")
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .expect("response")
        }
        _ => {
            drop(held);
            status(200, ok)
        }
    })
}

/// A stream of the receiver's frames.
fn tokio_stream_of(
    mut rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, Infallible>>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
