//! Keep-alive HTTP/1.1 connections to plain `http://` backends, pooled per public-listener
//! worker thread. Each worker runs its own single-threaded runtime ([`crate::server`]), so its
//! pool needs no lock, no shared map and no hashing: a short list of backends, each with a stack
//! of idle connections. hyper-util's pooled client, which the gateway uses everywhere else
//! (`https://` backends, upstreams with TLS settings of their own, other threads), spends about
//! 9,000 instructions per request on its shared pool (locking, SipHash of the authority twice, a
//! checkout racing a lazy connect, a task per request to put the connection back); this does
//! the same job for a few hundred.
//!
//! The rules are the pooled client's: a connection goes back to the pool only once its answer
//! has been read to the end (one dropped part-way is closed); a pooled connection that turns out
//! closed before the request was written to it is set aside and the next one (or a new one) takes
//! the request — the request was never sent, so nothing is lost or sent twice; idle connections
//! are closed after [`IDLE_TIMEOUT`], and at most [`MAX_IDLE`] are kept per backend. One rule is
//! nginx's: a connection whose answer came before its request had gone out whole is not lent again
//! (the caller drops its [`Lent`]; see `proxy::send`).

use std::cell::RefCell;
use std::time::Duration;

use axum::body::Body;
use http::uri::Authority;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::client::legacy::connect::HttpConnector;
use tower::ServiceExt;

/// How long an idle connection is kept (hyper-util's pool: 90 s).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Most idle connections kept per backend and worker.
pub const MAX_IDLE: usize = 512;

/// One backend's idle connections, the most recently used last.
struct Idle {
    authority: Authority,
    conns: Vec<(SendRequest<Body>, u64)>,
}

thread_local! {
    static IDLE: RefCell<Vec<Idle>> = const { RefCell::new(Vec::new()) };
    /// When every backend's idle connections were last looked over (ms on the pool clock).
    static SWEPT: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How often a returning connection also looks over the other backends' idle ones (a backend
/// the config no longer names gets no returns of its own).
const SWEEP_EVERY_MS: u64 = 10_000;

/// Why a request could not be sent.
#[derive(Debug)]
pub enum SendError {
    /// No connection to the backend could be made, or a new one closed before the request was
    /// written to it: nothing was sent.
    Connect(Box<dyn std::error::Error + Send + Sync>),
    /// The connection failed while the request was being sent or answered.
    Http(hyper::Error),
}

/// A connection lent to one request: [`Lent::give_back`] once its answer was read to the end
/// puts it back in the pool; dropped otherwise, which closes it.
pub struct Lent {
    authority: Authority,
    sender: Option<SendRequest<Body>>,
}

/// Whether an idle connection (idle since `since`, ms on the pool clock) is of no more use at
/// `now`: closed, or idle for [`IDLE_TIMEOUT`].
fn stale(conn: &SendRequest<Body>, since: u64, now: u64) -> bool {
    conn.is_closed() || now.saturating_sub(since) >= IDLE_TIMEOUT.as_millis() as u64
}

impl Lent {
    fn new(authority: &Authority, sender: SendRequest<Body>) -> Self {
        Lent { authority: authority.clone(), sender: Some(sender) }
    }

    /// Returns the connection to the calling thread's pool.
    pub fn give_back(&mut self) {
        let Some(sender) = self.sender.take() else { return };
        if sender.is_closed() {
            return;
        }
        let now = super::pool::clock_ms();
        IDLE.with(|idle| {
            let mut idle = idle.borrow_mut();
            let at = match idle.iter().position(|i| i.authority.as_str() == self.authority.as_str()) {
                Some(at) => at,
                None => {
                    idle.push(Idle { authority: self.authority.clone(), conns: Vec::new() });
                    idle.len() - 1
                }
            };
            let conns = &mut idle[at].conns;
            // One too many: the oldest is closed. (Idle ones go at checkout and in the sweep.)
            if conns.len() >= MAX_IDLE {
                conns.remove(0);
            }
            conns.push((sender, now));
            if now >= SWEPT.get() + SWEEP_EVERY_MS {
                SWEPT.set(now);
                sweep(&mut idle, now);
            }
        });
    }
}

/// Closes the idle connections older than [`IDLE_TIMEOUT`] at `now` and forgets closed ones.
fn sweep(idle: &mut Vec<Idle>, now: u64) {
    for backend in idle.iter_mut() {
        backend.conns.retain(|(c, since)| !stale(c, *since, now));
    }
    idle.retain(|backend| !backend.conns.is_empty());
}

/// An idle connection to `authority` ready for a request, if the pool has one. Closed ones and
/// ones idle for [`IDLE_TIMEOUT`] are dropped; one not ready yet (its last answer read, but the
/// connection has not caught up, or its request body is still being sent) stays.
fn checkout(authority: &Authority) -> Option<SendRequest<Body>> {
    checkout_at(authority, super::pool::clock_ms())
}

/// [`checkout`] at `now` (ms on the pool clock).
fn checkout_at(authority: &Authority, now: u64) -> Option<SendRequest<Body>> {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let conns = &mut idle.iter_mut().find(|i| i.authority.as_str() == authority.as_str())?.conns;
        let mut waiting = 0;
        while conns.len() > waiting {
            let i = conns.len() - 1 - waiting;
            if stale(&conns[i].0, conns[i].1, now) {
                conns.remove(i);
            } else if conns[i].0.is_ready() {
                return Some(conns.remove(i).0);
            } else {
                waiting += 1;
            }
        }
        None
    })
}

/// Sends `req` (origin-form URI, `Host` set) to `authority` on a pooled connection, or a new one
/// opened with `connector`.
pub async fn send(
    connector: &HttpConnector,
    authority: &Authority,
    mut req: Request<Body>,
) -> Result<(Response<Incoming>, Lent), SendError> {
    while let Some(mut sender) = checkout(authority) {
        match sender.try_send_request(req).await {
            Ok(res) => return Ok((res, Lent::new(authority, sender))),
            Err(mut e) => match e.take_message() {
                // Closed before the request was written: the next connection.
                Some(back) => req = back,
                None => return Err(SendError::Http(e.into_error())),
            },
        }
    }
    // Boxed: the rare path's state stays out of every request's future.
    let mut sender = Box::pin(connect(connector, authority)).await.map_err(SendError::Connect)?;
    match sender.try_send_request(req).await {
        Ok(res) => Ok((res, Lent::new(authority, sender))),
        // Closed before the request was written to it (accepted, then reset): nothing reached
        // the backend, as with a refused connect.
        Err(mut e) => match e.take_message() {
            Some(_) => Err(SendError::Connect(Box::new(e.into_error()))),
            None => Err(SendError::Http(e.into_error())),
        },
    }
}

/// A new connection to `authority` made by `connector` (as hyper-util's client makes them), driven
/// by a task on the calling thread's runtime.
async fn connect(
    connector: &HttpConnector,
    authority: &Authority,
) -> Result<SendRequest<Body>, Box<dyn std::error::Error + Send + Sync>> {
    let uri = Uri::builder().scheme("http").authority(authority.clone()).path_and_query("/").build()?;
    let io = connector.clone().oneshot(uri).await?;
    let (sender, conn) = http1::handshake(io).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection closed");
        }
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` connections to a loopback listener that accepts and holds them, each with its accepted
    /// side, once each takes requests; and the listener's authority.
    async fn conns(n: usize) -> (Authority, Vec<(SendRequest<Body>, tokio::net::TcpStream)>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let connector = HttpConnector::new();
        let mut made = Vec::new();
        for _ in 0..n {
            let (sender, accepted) = tokio::join!(connect(&connector, &authority), listener.accept());
            made.push((sender.expect("connects"), accepted.expect("accepts").0));
        }
        eventually("every connection takes requests", || made.iter().all(|(c, _)| c.is_ready())).await;
        (authority, made)
    }

    /// Waits (at most 2 s) until `f` holds.
    async fn eventually(what: &str, f: impl Fn() -> bool) {
        for _ in 0..200 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(f(), "{what}");
    }

    #[tokio::test]
    async fn a_sweep_drops_connections_idle_too_long_and_closed_ones_and_keeps_the_rest() {
        let (authority, mut made) = conns(3).await;
        let (closed, closed_peer) = made.pop().unwrap();
        let (fresh, _fresh_peer) = made.pop().unwrap();
        let (old, _old_peer) = made.pop().unwrap();
        drop(closed_peer);
        eventually("the connection task saw the peer close", || closed.is_closed()).await;
        let now = 1_000_000;
        let timeout = IDLE_TIMEOUT.as_millis() as u64;
        let mut idle = vec![
            Idle {
                authority: authority.clone(),
                conns: vec![(old, now - timeout), (fresh, now - 1), (closed, now - 1)],
            },
            Idle { authority: "127.0.0.1:1".parse().unwrap(), conns: Vec::new() },
        ];
        sweep(&mut idle, now);
        assert_eq!(idle.len(), 1, "a backend with nothing left is forgotten");
        assert_eq!(idle[0].conns.len(), 1);
        assert_eq!(idle[0].conns[0].1, now - 1);
        assert!(!idle[0].conns[0].0.is_closed());
    }

    #[tokio::test]
    async fn a_checkout_passes_over_a_connection_idle_too_long() {
        let (authority, mut made) = conns(2).await;
        let (fresh, _fresh_peer) = made.pop().unwrap();
        let (old, _old_peer) = made.pop().unwrap();
        let now = 1_000_000;
        let timeout = IDLE_TIMEOUT.as_millis() as u64;
        // The idle-too-long one on top, where a checkout looks first.
        IDLE.with(|idle| {
            idle.borrow_mut()
                .push(Idle { authority: authority.clone(), conns: vec![(fresh, now - 1), (old, now - timeout)] })
        });
        let taken = checkout_at(&authority, now).expect("the fresh connection");
        assert!(!taken.is_closed());
        let left = IDLE.with(|idle| idle.borrow().iter().map(|i| i.conns.len()).sum::<usize>());
        assert_eq!(left, 0, "the one idle too long was dropped, not kept or taken");
    }
}
