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
//! are closed after [`IDLE_TIMEOUT`], and at most [`MAX_IDLE`] are kept per backend.

use std::cell::RefCell;
use std::time::Duration;

use axum::body::Body;
use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

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
    /// No connection to the backend could be made: nothing was sent.
    Connect(std::io::Error),
    /// The connection failed while the request was being sent or answered.
    Http(hyper::Error),
}

/// A connection lent to one request: [`Lent::give_back`] once its answer was read to the end
/// puts it back in the pool; dropped otherwise, which closes it.
pub struct Lent {
    authority: Authority,
    sender: Option<SendRequest<Body>>,
}

impl Lent {
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
            // The oldest first: one idle too long (or one too many) is closed.
            if conns.first().is_some_and(|(_, since)| now.saturating_sub(*since) >= IDLE_TIMEOUT.as_millis() as u64)
                || conns.len() >= MAX_IDLE
            {
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
    let timeout = IDLE_TIMEOUT.as_millis() as u64;
    for backend in idle.iter_mut() {
        backend.conns.retain(|(c, since)| !c.is_closed() && now.saturating_sub(*since) < timeout);
    }
    idle.retain(|backend| !backend.conns.is_empty());
}

/// An idle connection to `authority` ready for a request, if the pool has one. Closed ones are
/// dropped; one not ready yet (its last answer read, but the connection has not caught up) stays.
fn checkout(authority: &Authority) -> Option<SendRequest<Body>> {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let conns = &mut idle.iter_mut().find(|i| i.authority.as_str() == authority.as_str())?.conns;
        let mut waiting = 0;
        while conns.len() > waiting {
            let i = conns.len() - 1 - waiting;
            if conns[i].0.is_closed() {
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

/// Sends `req` (origin-form URI, `Host` set) to `authority` on a pooled connection, or a new one.
pub async fn send(authority: &Authority, mut req: Request<Body>) -> Result<(Response<Incoming>, Lent), SendError> {
    while let Some(mut sender) = checkout(authority) {
        match sender.try_send_request(req).await {
            Ok(res) => return Ok((res, Lent { authority: authority.clone(), sender: Some(sender) })),
            Err(mut e) => match e.take_message() {
                // Closed before the request was written: the next connection.
                Some(back) => req = back,
                None => return Err(SendError::Http(e.into_error())),
            },
        }
    }
    // Boxed: the rare path's state stays out of every request's future.
    let mut sender = Box::pin(connect(authority)).await.map_err(SendError::Connect)?;
    match sender.send_request(req).await {
        Ok(res) => Ok((res, Lent { authority: authority.clone(), sender: Some(sender) })),
        Err(e) => Err(SendError::Http(e)),
    }
}

/// A new connection to `authority`, driven by a task on the calling thread's runtime (as
/// hyper-util's connector does it: `TCP_NODELAY`, TCP keep-alive after 60 s).
async fn connect(authority: &Authority) -> std::io::Result<SendRequest<Body>> {
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    let stream = tokio::net::TcpStream::connect((host, authority.port_u16().unwrap_or(80))).await?;
    stream.set_nodelay(true)?;
    socket2::SockRef::from(&stream)
        .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(Duration::from_secs(60)))?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.map_err(std::io::Error::other)?;
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

    /// A connection to a loopback listener that accepts and holds it, and the accepted side.
    async fn conn(listener: &tokio::net::TcpListener) -> (SendRequest<Body>, tokio::net::TcpStream) {
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let (sender, accepted) = tokio::join!(connect(&authority), listener.accept());
        (sender.expect("connects"), accepted.expect("accepts").0)
    }

    #[tokio::test]
    async fn a_sweep_drops_connections_idle_too_long_and_closed_ones_and_keeps_the_rest() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let (old, _old_peer) = conn(&listener).await;
        let (fresh, _fresh_peer) = conn(&listener).await;
        let (closed, closed_peer) = conn(&listener).await;
        drop(closed_peer);
        for _ in 0..200 {
            if closed.is_closed() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(closed.is_closed(), "the connection task saw the peer close");
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
}
