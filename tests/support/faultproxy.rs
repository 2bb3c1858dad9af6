//! A TCP proxy on loopback that a fault test puts between the gateway and Redis (or an upstream)
//! and switches, while traffic runs, between passing bytes, stalling them, losing replies and
//! refusing connections.
//!
//! A lost reply breaks its connection: the request bytes reach the server (the script runs), the
//! reply is thrown away and both sides are closed, as when a network path or a failover cuts a
//! connection after the command left. Keeping the connection open without the reply would
//! shift every later reply onto the wrong request, which no real network does.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Passes bytes both ways.
    Pass,
    /// Holds bytes in both directions (connections stay open) until the mode changes.
    Stall,
    /// Passes requests; a reply that arrives is dropped and its connection closed on both sides.
    DropReplies,
    /// Closes every connection and the listening socket: new connections are refused.
    Refuse,
}

/// Replies to lose whatever the mode: a pattern they contain and how many more times.
type DropNext = Arc<Mutex<Option<(Vec<u8>, usize)>>>;

/// A reply to hold back once: a pattern it contains and for how long.
type DelayNext = Arc<Mutex<Option<(Vec<u8>, Duration)>>>;

/// A running proxy from `127.0.0.1:<port>` to a target; stops (closing everything) on drop.
pub struct FaultProxy {
    port: u16,
    mode: watch::Sender<Fault>,
    drop_next: DropNext,
    delay_next: DelayNext,
}

impl FaultProxy {
    /// Starts a proxy to `target` (a loopback address), passing bytes.
    pub async fn start(target: SocketAddr) -> Self {
        assert!(target.ip().is_loopback(), "fault proxies forward to loopback only");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fault proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let (mode, rx) = watch::channel(Fault::Pass);
        let drop_next = Arc::new(Mutex::new(None));
        let delay_next = Arc::new(Mutex::new(None));
        tokio::spawn(serve(Some(listener), port, target, rx, (drop_next.clone(), delay_next.clone())));
        FaultProxy { port, mode, drop_next, delay_next }
    }

    /// The port it listens on (while not refusing).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Switches the mode; takes effect at once for every connection.
    pub fn set(&self, fault: Fault) {
        self.mode.send_replace(fault);
    }

    /// Loses the next `times` replies that contain `pattern` (each time the connection breaks),
    /// whatever the mode: a test can lose the reply of one particular step, and of its re-sends.
    pub fn drop_replies_with(&self, pattern: &[u8], times: usize) {
        *self.drop_next.lock().unwrap() = Some((pattern.to_vec(), times));
    }

    /// Holds back the next reply that contains `pattern` for `delay` (the step ran; its answer
    /// is late), whatever the mode.
    pub fn delay_reply_with(&self, pattern: &[u8], delay: Duration) {
        *self.delay_next.lock().unwrap() = Some((pattern.to_vec(), delay));
    }

    /// The current mode.
    pub fn mode(&self) -> Fault {
        *self.mode.borrow()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.mode.send_replace(Fault::Refuse);
    }
}

/// Accepts while not refusing; re-binds the same port when a refusal ends.
async fn serve(
    mut listener: Option<TcpListener>,
    port: u16,
    target: SocketAddr,
    mut mode: watch::Receiver<Fault>,
    armed: (DropNext, DelayNext),
) {
    loop {
        let Some(l) = listener.take() else {
            // Refusing: wait for another mode, then listen again on the same port.
            if mode.wait_for(|m| *m != Fault::Refuse).await.is_err() {
                return;
            }
            listener = rebind(port).await;
            if listener.is_none() {
                return;
            }
            continue;
        };
        tokio::select! {
            accepted = l.accept() => {
                listener = Some(l);
                if let Ok((client, _)) = accepted {
                    tokio::spawn(connection(client, target, mode.clone(), armed.clone()));
                }
            }
            changed = mode.changed() => {
                if changed.is_err() {
                    return;
                }
                // Refuse drops the listener (`l`) here; any other mode keeps it.
                if *mode.borrow() != Fault::Refuse {
                    listener = Some(l);
                }
            }
        }
    }
}

/// Binds `127.0.0.1:port` again, a few tries (the old socket may still be closing).
async fn rebind(port: u16) -> Option<TcpListener> {
    for _ in 0..50 {
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)).await {
            return Some(l);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

async fn connection(client: TcpStream, target: SocketAddr, mode: watch::Receiver<Fault>, armed: (DropNext, DelayNext)) {
    if *mode.borrow() == Fault::Refuse {
        return;
    }
    let Ok(server) = TcpStream::connect(target).await else { return };
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // Whichever direction ends first closes both: dropping the halves closes the sockets.
    tokio::select! {
        _ = pump(client_read, server_write, mode.clone(), None) => {}
        _ = pump(server_read, client_write, mode, Some(armed)) => {}
    }
}

/// Copies `from` to `to` as the mode allows; `drop_next` is given for the server-to-client
/// direction (replies).
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut mode: watch::Receiver<Fault>,
    armed: Option<(DropNext, DelayNext)>,
) {
    let replies = armed.is_some();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // Nothing moves while stalled.
        let Ok(current) = mode.wait_for(|m| *m != Fault::Stall).await.map(|m| *m) else { return };
        if current == Fault::Refuse {
            return;
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            changed = mode.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        // Bytes read during a stall are held until it ends.
        let Ok(current) = mode.wait_for(|m| *m != Fault::Stall).await.map(|m| *m) else { return };
        match current {
            Fault::Refuse => return,
            Fault::DropReplies if replies => return,
            _ => {}
        }
        if let Some((_, delay_next)) = &armed {
            let delay = {
                let mut next = delay_next.lock().unwrap();
                match next.as_ref() {
                    Some((pattern, d)) if buf[..n].windows(pattern.len()).any(|w| w == pattern.as_slice()) => {
                        let d = *d;
                        *next = None;
                        Some(d)
                    }
                    _ => None,
                }
            };
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
        }
        if let Some((drop_next, _)) = &armed {
            let mut armed = drop_next.lock().unwrap();
            if let Some((pattern, times)) = armed.as_mut()
                && buf[..n].windows(pattern.len()).any(|w| w == pattern.as_slice())
            {
                *times -= 1;
                if *times == 0 {
                    *armed = None;
                }
                return;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A gateway on a Redis behind a [`FaultProxy`], an account "acme" at 0 credits (plan `fifty`,
/// spent), and a client that sends a transcription with `headers` and leaves while its queueing
/// step's reply is held back (800 ms): returns once the gateway has withdrawn the job.
pub struct LeftWhileQueueing {
    /// The Redis (keep it alive).
    pub redis: super::redis::RedisServer,
    /// The proxy in front of it.
    pub proxy: FaultProxy,
    /// The backend.
    pub up: super::upstream::Upstream,
    /// The gateway.
    pub gw: super::gateway::TestGateway,
    /// The account's API key.
    pub key: String,
}

impl LeftWhileQueueing {
    /// Runs the scenario (see the type).
    pub async fn run(headers: &[(&str, &str)], body: &str) -> Self {
        use std::time::Duration;
        let redis = super::redis::RedisServer::start();
        let proxy = FaultProxy::start(format!("127.0.0.1:{}", redis.port()).parse().unwrap()).await;
        let up = super::upstream::Upstream::echo().await;
        let store = format!("kind = \"redis\"\nurl = \"redis://{}\"", proxy.addr());
        let gw =
            super::gateway::TestGateway::start(&super::gateway::ConfigBuilder::new(&up.url()).store(&store).build())
                .await;
        let key = gw.account_with_key("acme", "fifty").await;
        super::gateway::spend(&gw, &key, 50).await;
        // The queueing step runs; its answer ("queued") comes late, and the client leaves meanwhile.
        proxy.delay_reply_with(b"queued", Duration::from_millis(800));
        let url = gw.url("/v1/calls/transcribe");
        let auth = format!("Bearer {key}");
        let mut all: Vec<(String, String)> = vec![("authorization".into(), auth)];
        all.extend(headers.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let body = body.to_owned();
        let client = tokio::spawn(async move {
            let h: Vec<(&str, &str)> = all.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            super::http::send("POST", &url, &h, body).await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!client.is_finished(), "the queueing step was not held back");
        client.abort();
        let _ = client.await;
        let withdrawn = || {
            let keys = redis.command(&["KEYS", "cg:{acct:acme}:job:*"]);
            keys.lines().any(|k| redis.command(&["HGET", k, "status"]) == "withdrawn")
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !withdrawn() {
            assert!(std::time::Instant::now() < deadline, "the job nobody was told of was not withdrawn");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        LeftWhileQueueing { redis, proxy, up, gw, key }
    }
}
