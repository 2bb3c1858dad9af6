//! A TCP proxy between the gateway and Redis that loses replies on request: the honest way to
//! make a step's reply go missing *after* Redis ran it.
//!
//! Every connection the gateway opens to the proxy gets its own connection to Redis, and bytes
//! are copied both ways as they come. [`LostReplyProxy::lose_reply_to`] arms it: the next command
//! whose bytes contain the given text is passed to Redis, and when Redis answers, the answer is
//! thrown away and the gateway's connection closed — the step ran, its reply never arrived, as
//! when a network path breaks at the wrong moment. Later connections pass normally.

#![allow(dead_code)] // each test binary uses its own subset

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Default)]
struct Inner {
    /// The text of the command whose reply is to be lost, while armed.
    armed: Mutex<Option<Vec<u8>>>,
    /// Replies thrown away so far.
    lost: AtomicUsize,
}

/// A proxy on `127.0.0.1:0` in front of one Redis.
pub struct LostReplyProxy {
    addr: SocketAddr,
    inner: Arc<Inner>,
    accept: tokio::task::JoinHandle<()>,
}

impl LostReplyProxy {
    /// Starts proxying to the Redis at `127.0.0.1:<redis_port>`.
    pub async fn start(redis_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fault proxy");
        let addr = listener.local_addr().expect("fault proxy addr");
        let inner = Arc::new(Inner::default());
        let shared = inner.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", redis_port)).await else { continue };
                tokio::spawn(pipe(client, server, shared.clone()));
            }
        });
        LostReplyProxy { addr, inner, accept }
    }

    /// `redis://127.0.0.1:<proxy port>`, for the gateway's `store.url`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Loses the reply to the next command whose bytes contain `needle` (see the module docs).
    pub fn lose_reply_to(&self, needle: &str) {
        *self.inner.armed.lock().unwrap() = Some(needle.as_bytes().to_vec());
    }

    /// How many replies were thrown away.
    pub fn lost(&self) -> usize {
        self.inner.lost.load(Ordering::SeqCst)
    }
}

impl Drop for LostReplyProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies one connection both ways until either side closes, losing a reply when armed.
async fn pipe(client: TcpStream, server: TcpStream, inner: Arc<Inner>) {
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    // Set once this connection carried the command whose reply is to be lost.
    let (marked_tx, marked_rx) = tokio::sync::watch::channel(false);
    let upstream = {
        let inner = inner.clone();
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match client_rx.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let chunk = &buf[..n];
                {
                    let mut armed = inner.armed.lock().unwrap();
                    if armed.as_ref().is_some_and(|needle| chunk.windows(needle.len()).any(|w| w == needle)) {
                        *armed = None;
                        let _ = marked_tx.send(true);
                    }
                }
                if server_tx.write_all(chunk).await.is_err() {
                    return;
                }
            }
        }
    };
    let downstream = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match server_rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if *marked_rx.borrow() {
                // Redis ran it; its answer never reaches the gateway.
                inner.lost.fetch_add(1, Ordering::SeqCst);
                let _ = client_tx.shutdown().await;
                return;
            }
            if client_tx.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    // Either direction ending ends the connection (both halves are dropped).
    tokio::select! {
        _ = upstream => {}
        _ = downstream => {}
    }
}
