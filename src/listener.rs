//! Accepting connections with every resource bounded: the hyper HTTP/1 server loop both
//! listeners run, in place of `axum::serve` (which has no timers and no connection cap).
//!
//! * **Connection cap** (`server.max_connections`): a connection needs a permit before it is
//!   served, so beyond the cap each accepting thread holds the one connection it accepted last
//!   and the others wait in the kernel's backlog — never an unbounded number of tasks.
//! * **Header read timeout** (`server.header_read_timeout_ms`): a new connection must deliver a
//!   whole request head within it, and so must every later request on it, counted from its first
//!   byte (or, for a head whose start came pipelined behind the previous request, from that
//!   request's answer); a half-sent head (slowloris) is closed.
//! * **Idle timeout** (`server.idle_timeout_ms`): a keep-alive connection with no request in
//!   flight is closed when no new request starts within it.
//! * **Body read timeout** (`server.body_read_timeout_ms`): a request body that stalls between two
//!   chunks fails with [`BodyTimeout`], which the request path answers 408 `request_timeout`.
//! * **Body total timeout** (`server.body_total_timeout_ms`): a request body must also arrive
//!   whole within this, counted from its request head — else a client dripping one byte just
//!   inside the read timeout would hold its connection (and a `max_connections` permit) forever.
//!   It fails the same way, with [`BodyTimeout`].
//! * **Write timeout** (`server.write_timeout_ms`): an answer that the client stops taking (its
//!   receive window stays shut) closes the connection — also mid-stream, when no other timeout
//!   runs. While any answer bytes are still queued the connection is never idle, so the idle
//!   timeout cannot cut off an answer a slow client is still reading.
//! * **Head size** (`server.max_header_bytes`): hyper's read buffer; a larger head gets 431.
//!
//! One watchdog per connection (a timer in the connection's own task, re-armed rarely) enforces
//! the two connection timeouts from [`ConnState`], which the connection's IO, its service and its
//! response bodies update with plain atomics. Shutdown stops accepting, lets in-flight requests
//! finish (hyper's graceful shutdown closes idle keep-alive connections at once), and returns
//! when every connection is gone.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

use crate::config::ServerConfig;
use crate::metrics::Metrics;
use crate::state::AppState;

/// The bounds one listener enforces (from `[server]`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `server.header_read_timeout_ms`
    pub header_read_timeout: Duration,
    /// `server.idle_timeout_ms`
    pub idle_timeout: Duration,
    /// `server.body_read_timeout_ms`
    pub body_read_timeout: Duration,
    /// `server.body_total_timeout_ms`
    pub body_total_timeout: Duration,
    /// `server.write_timeout_ms`
    pub write_timeout: Duration,
    /// `server.max_connections`
    pub max_connections: usize,
    /// `server.max_header_bytes`
    pub max_header_bytes: usize,
}

impl Limits {
    /// The bounds a config sets.
    pub fn of(server: &ServerConfig) -> Self {
        Limits {
            header_read_timeout: Duration::from_millis(server.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(server.idle_timeout_ms),
            body_read_timeout: Duration::from_millis(server.body_read_timeout_ms),
            body_total_timeout: Duration::from_millis(server.body_total_timeout_ms),
            write_timeout: Duration::from_millis(server.write_timeout_ms),
            max_connections: server.max_connections,
            max_header_bytes: server.max_header_bytes,
        }
    }
}

/// The connection cap of one listener, shared by the threads that accept on it.
pub fn connection_permits(limits: &Limits) -> Arc<Semaphore> {
    Arc::new(Semaphore::new(limits.max_connections))
}

/// Which listener a [`serve`] loop is (they differ in their TLS settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// `server.listen` (`server.tls`).
    Public,
    /// `server.admin_listen` (`server.admin_tls`).
    Admin,
}

/// Serves `router` on `listener` until `shutdown` turns true, then drains (waits until every
/// connection it accepted is gone). `permits` caps the listener's connections; several workers
/// accepting on one address share it. The public side serves through
/// [`crate::stack::serve_public`], which hands the proxied paths to the proxy without the router.
pub async fn serve(
    side: Side,
    listener: TcpListener,
    router: Router,
    limits: Limits,
    permits: Arc<Semaphore>,
    state: AppState,
    mut shutdown: watch::Receiver<bool>,
) {
    // This loop's own connections, for the drain.
    let mine = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let (tcp, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        // At the cap this loop waits, holding this one connection, and the rest wait in the
        // kernel's backlog. (Taking the permit before accepting would let an idle worker sit on
        // a permit that a worker with a waiting connection needs.)
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("never closed"),
            _ = stopped(&mut shutdown) => break,
        };
        let own = mine.clone().try_acquire_owned().expect("no more connections than the shared cap");
        let _ = tcp.set_nodelay(true);
        let (router, state, stop) = (router.clone(), state.clone(), shutdown.clone());
        tokio::spawn(async move {
            let public = (side == Side::Public).then(|| state.clone());
            let served = Served { router, public };
            let metrics = &state.metrics;
            metrics.connections_open.inc();
            // `server.tls`, as the running config has it (a reload brings renewed certificates).
            let tls = {
                let rt = state.runtime.load();
                if side == Side::Public { rt.tls_acceptor.clone() } else { rt.admin_tls_acceptor.clone() }
            };
            match tls {
                None => connection(tcp, addr, served, limits, metrics, stop).await,
                // The handshake must finish within the header timeout, like a request head.
                Some(acceptor) => match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => connection(tls, addr, served, limits, metrics, stop).await,
                    Ok(Err(e)) => tracing::debug!(%addr, error = %e, "TLS handshake failed"),
                    Err(_) => {
                        metrics.connections_header_timeout.inc();
                        tracing::debug!(%addr, "closing connection: TLS handshake timeout");
                    }
                },
            }
            metrics.connections_open.dec();
            drop((permit, own));
        });
    }
    drop(listener);
    // Every connection holds one of `mine` until it is gone.
    let _ = mine.acquire_many(limits.max_connections as u32).await;
}

/// The bytes `req` took on the wire, at least: its request line and headers as parsed (values
/// without the whitespace around them) and its declared body; `None` when that cannot be told
/// (a chunked body, an absolute-form target). Extra whitespace only makes the true size larger,
/// which at worst starts a header timer for a connection that is merely idle.
fn wire_size(req: &hyper::Request<Incoming>) -> Option<u64> {
    if req.uri().scheme().is_some() || req.headers().contains_key(http::header::TRANSFER_ENCODING) {
        return None;
    }
    let target = req.uri().path_and_query().map_or(1, |pq| pq.as_str().len());
    // "METHOD SP target SP HTTP/1.1 CRLF", each "name: value CRLF", the final CRLF.
    let line = req.method().as_str().len() + 1 + target + 1 + 8 + 2;
    let headers: usize = req.headers().iter().map(|(k, v)| k.as_str().len() + 2 + v.len() + 2).sum();
    let body = match req.headers().get(http::header::CONTENT_LENGTH) {
        Some(v) => v.to_str().ok()?.trim().parse::<u64>().ok()?,
        None => 0,
    };
    Some((line + headers + 2) as u64 + body)
}

/// Resolves once `shutdown` turns true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Why a connection's watchdog closed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    Header,
    Idle,
    Write,
}

/// What a connection's requests go to.
#[derive(Clone)]
struct Served {
    router: Router,
    /// The public listener's state: see [`crate::stack::serve_public`].
    public: Option<AppState>,
}

async fn connection<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    tcp: S,
    addr: SocketAddr,
    served: Served,
    limits: Limits,
    metrics: &Metrics,
    mut stop: watch::Receiver<bool>,
) {
    let state = Arc::new(ConnState::new());
    let io = TokioIo::new(Tracked { inner: tcp, state: state.clone() });
    let service_state = state.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        service_state.request_started(wire_size(&req));
        let (state, served) = (service_state.clone(), served.clone());
        async move {
            let mut req = req.map(|body| {
                if http_body::Body::is_end_stream(&body) {
                    Body::new(body)
                } else {
                    Body::new(TimedBody::new(body, limits.body_read_timeout, limits.body_total_timeout))
                }
            });
            req.extensions_mut().insert(ConnectInfo(addr));
            let res = match &served.public {
                Some(public) => crate::stack::serve_public(public, served.router, req).await,
                None => served.router.oneshot(req).await.unwrap_or_else(|never| match never {}),
            };
            Ok::<_, std::convert::Infallible>(res.map(|body| Done { inner: body, state: Some(state) }))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // hyper's own header timer would also run while a keep-alive connection waits for its next
    // request; the watchdog below keeps the two timeouts apart.
    builder.header_read_timeout(None).max_buf_size(limits.max_header_bytes).keep_alive(true);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        let check = state.next_check(limits);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, %addr, "connection ended with an error");
                }
                return;
            }
            _ = tokio::time::sleep_until(check) => {
                if let Some(why) = state.expired(limits) {
                    tracing::debug!(%addr, ?why, "closing connection: timeout");
                    let reason = match why {
                        Expired::Header => &metrics.connections_header_timeout,
                        Expired::Idle => &metrics.connections_idle_timeout,
                        Expired::Write => &metrics.connections_write_timeout,
                    };
                    reason.inc();
                    // Either nothing is in flight and nothing is queued for the client, or the
                    // client stopped taking its answer: dropping the connection closes it.
                    return;
                }
            }
            _ = stopped(&mut stop), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

// === impl ConnState ===

/// What the watchdog of one connection knows: requests in flight and when it last went idle or
/// started receiving a head. Times are milliseconds since the connection was accepted.
struct ConnState {
    accepted: Instant,
    /// Requests whose answer has not been sent completely.
    active: AtomicU32,
    /// When the last answer ended (0: none yet).
    idle_since_ms: AtomicU64,
    /// When the first byte of the next head arrived; `NONE` while no byte did.
    head_started_ms: AtomicU64,
    /// Whether any request has started on this connection.
    served: AtomicU32,
    /// Since when a write to the client has been waiting (its window shut); `NONE` when the
    /// last write went through — so also: whether answer bytes are still queued.
    write_blocked_ms: AtomicU64,
    /// Bytes read from the client so far.
    read_total: AtomicU64,
    /// Bytes the requests so far took on the wire (heads as hyper parsed them, plus declared
    /// bodies); `NONE` once a request's size cannot be told (a chunked body). When an answer
    /// ends with more read than that, the start of the next head is already in hyper's buffer
    /// (pipelined behind the request) and its header timer starts then.
    consumed: AtomicU64,
}

const NONE: u64 = u64::MAX;

impl ConnState {
    fn new() -> Self {
        ConnState {
            accepted: Instant::now(),
            active: AtomicU32::new(0),
            idle_since_ms: AtomicU64::new(0),
            head_started_ms: AtomicU64::new(NONE),
            served: AtomicU32::new(0),
            write_blocked_ms: AtomicU64::new(NONE),
            read_total: AtomicU64::new(0),
            consumed: AtomicU64::new(0),
        }
    }

    fn write_blocked(&self) {
        if self.write_blocked_ms.load(Ordering::Relaxed) == NONE {
            self.write_blocked_ms.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    fn wrote(&self) {
        self.write_blocked_ms.store(NONE, Ordering::Relaxed);
    }

    fn now_ms(&self) -> u64 {
        self.accepted.elapsed().as_millis() as u64
    }

    fn request_started(&self, wire_size: Option<u64>) {
        match wire_size {
            Some(n) => {
                let _ =
                    self.consumed.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| (c != NONE).then(|| c + n));
            }
            None => self.consumed.store(NONE, Ordering::Relaxed),
        }
        self.active.fetch_add(1, Ordering::AcqRel);
        self.served.store(1, Ordering::Relaxed);
        self.head_started_ms.store(NONE, Ordering::Relaxed);
    }

    fn answer_done(&self) {
        let now = self.now_ms();
        self.idle_since_ms.store(now, Ordering::Relaxed);
        if self.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            let consumed = self.consumed.load(Ordering::Relaxed);
            // Bytes beyond what the requests took: a next head has begun (see `consumed`).
            if consumed != NONE
                && self.read_total.load(Ordering::Relaxed) > consumed
                && self.head_started_ms.load(Ordering::Relaxed) == NONE
            {
                self.head_started_ms.store(now, Ordering::Relaxed);
            }
        }
    }

    fn bytes_read(&self, n: usize) {
        self.read_total.fetch_add(n as u64, Ordering::Relaxed);
        if self.active.load(Ordering::Acquire) == 0 && self.head_started_ms.load(Ordering::Relaxed) == NONE {
            self.head_started_ms.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// The deadline that applies now, in ms since accept; `None` with a request in flight whose
    /// answer the client keeps taking.
    fn deadline_ms(&self, limits: Limits) -> Option<u64> {
        let blocked = self.write_blocked_ms.load(Ordering::Relaxed);
        if blocked != NONE {
            return Some(blocked + limits.write_timeout.as_millis() as u64);
        }
        if self.active.load(Ordering::Acquire) > 0 {
            return None;
        }
        let header = limits.header_read_timeout.as_millis() as u64;
        let head_started = self.head_started_ms.load(Ordering::Relaxed);
        if head_started != NONE {
            return Some(head_started + header);
        }
        if self.served.load(Ordering::Relaxed) == 0 {
            // A new connection owes its first head within the header timeout.
            return Some(header);
        }
        Some(self.idle_since_ms.load(Ordering::Relaxed) + limits.idle_timeout.as_millis() as u64)
    }

    /// Whether the connection is past its deadline, and which.
    fn expired(&self, limits: Limits) -> Option<Expired> {
        let deadline = self.deadline_ms(limits)?;
        if self.now_ms() < deadline {
            return None;
        }
        if self.write_blocked_ms.load(Ordering::Relaxed) != NONE {
            return Some(Expired::Write);
        }
        let header = self.head_started_ms.load(Ordering::Relaxed) != NONE || self.served.load(Ordering::Relaxed) == 0;
        Some(if header { Expired::Header } else { Expired::Idle })
    }

    /// When to look again: the deadline, but at least every header (or idle) timeout, since the
    /// state can move the deadline earlier without waking anyone (a head starting on an idle
    /// connection, an answer ending).
    fn next_check(&self, limits: Limits) -> Instant {
        let recheck = Instant::now() + limits.header_read_timeout.min(limits.idle_timeout).min(limits.write_timeout);
        match self.deadline_ms(limits) {
            Some(ms) => (self.accepted + Duration::from_millis(ms)).min(recheck),
            None => recheck,
        }
    }
}

pin_project! {
    /// The connection's socket (plain or TLS), telling [`ConnState`] when bytes arrive.
    struct Tracked<S> {
        #[pin]
        inner: S,
        state: Arc<ConnState>,
    }
}

impl<S: AsyncRead> AsyncRead for Tracked<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.inner.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.state.bytes_read(buf.filled().len() - before);
        }
        polled
    }
}

impl<S: AsyncWrite> AsyncWrite for Tracked<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write(cx, buf);
        track_write(this.state, &polled);
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write_vectored(cx, bufs);
        track_write(this.state, &polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A write that waits starts (or continues) the write timer; one that goes through stops it.
fn track_write(state: &ConnState, polled: &Poll<std::io::Result<usize>>) {
    match polled {
        Poll::Pending => state.write_blocked(),
        Poll::Ready(Ok(n)) if *n > 0 => state.wrote(),
        _ => {}
    }
}

pin_project! {
    /// An answer body that tells [`ConnState`] when the answer is over (sent or abandoned).
    struct Done<B> {
        #[pin]
        inner: B,
        state: Option<Arc<ConnState>>,
    }

    impl<B> PinnedDrop for Done<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(state) = this.project().state.take() {
                state.answer_done();
            }
        }
    }
}

impl<B: http_body::Body<Data = Bytes>> http_body::Body for Done<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(None) = polled
            && let Some(state) = this.state.take()
        {
            state.answer_done();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that did not arrive in time: it stalled longer than `server.body_read_timeout_ms`
/// between two chunks, or was still not whole after `server.body_total_timeout_ms`.
#[derive(Debug, thiserror::Error)]
pub enum BodyTimeout {
    /// No chunk within `server.body_read_timeout_ms`.
    #[error("the request body stalled for longer than {0:?}")]
    Stalled(Duration),
    /// Not whole within `server.body_total_timeout_ms` of its request head.
    #[error("the request body took longer than {0:?} in all")]
    Total(Duration),
}

pin_project! {
    /// A request body that fails with [`BodyTimeout`] when no chunk arrives within the read
    /// timeout, or the body is not whole by its deadline. The timer exists only once the body is
    /// actually waited for (most bodies arrive with their head and never allocate one).
    struct TimedBody {
        #[pin]
        inner: Incoming,
        timeout: Duration,
        total: Duration,
        // When the whole body must have arrived.
        deadline: Instant,
        timer: Option<Pin<Box<Sleep>>>,
        // Whether the timer runs for the current wait (it is re-armed after each chunk).
        waiting: bool,
    }
}

impl TimedBody {
    fn new(inner: Incoming, timeout: Duration, total: Duration) -> Self {
        TimedBody { inner, timeout, total, deadline: Instant::now() + total, timer: None, waiting: false }
    }
}

impl http_body::Body for TimedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                *this.waiting = false;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                // Each wait runs to the next chunk's timeout or the whole body's deadline,
                // whichever comes first; a steady drip reaches the deadline.
                let (timeout, deadline) = (*this.timeout, *this.deadline);
                let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if !*this.waiting {
                    *this.waiting = true;
                    timer.as_mut().reset((Instant::now() + timeout).min(deadline));
                }
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) if Instant::now() >= deadline => {
                        Poll::Ready(Some(Err(Box::new(BodyTimeout::Total(*this.total)))))
                    }
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout::Stalled(timeout))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
