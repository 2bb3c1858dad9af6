//! A backend's answer body on its way out: it holds the request's place on the backend
//! ([`Slot`]) until it ends, so a streaming answer counts against `max_in_flight`, and cuts off
//! an answer that stalls longer than `stream_idle_timeout_ms` between two chunks. A connection
//! from the worker's own pool ([`super::h1`]) goes back to it once the answer was read to the end.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::h1::Lent;
use super::pool::{Pool, Slot};

/// The error of an answer that stalled.
#[derive(Debug, thiserror::Error)]
#[error("the backend sent nothing for {0:?} (stream_idle_timeout_ms)")]
pub struct StreamIdle(Duration);

/// The stall timer: armed when a poll finds nothing to send (time the client takes to read
/// is not the backend's stall).
struct Idle {
    limit: Duration,
    sleep: Pin<Box<Sleep>>,
    armed: bool,
}

/// What an [`UpstreamBody`] fails with.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

pin_project! {
    /// See the module docs.
    pub struct UpstreamBody {
        #[pin]
        inner: Incoming,
        // Released at end of stream (or when the body is dropped).
        slot: Option<Slot>,
        // The connection, when it is the worker pool's: given back at the end of the stream (or
        // when the body is dropped with nothing left to read).
        conn: Option<Lent>,
        idle: Option<Idle>,
        eject_after: u32,
        eject: Duration,
    }

    impl PinnedDrop for UpstreamBody {
        fn drop(this: Pin<&mut Self>) {
            // An answer with nothing more to read (its last frame taken, a length-delimited or
            // empty one that was never asked for its end) leaves its connection reusable too.
            let this = this.project();
            if this.inner.is_end_stream() {
                give_back(this.conn);
            }
        }
    }
}

impl UpstreamBody {
    /// Wraps a backend's answer.
    pub fn new(inner: Incoming, slot: Slot, conn: Option<Lent>, idle: Option<Duration>, pool: &Pool) -> Self {
        let idle = idle.map(|limit| Idle { limit, sleep: Box::pin(tokio::time::sleep(limit)), armed: false });
        UpstreamBody { inner, slot: Some(slot), conn, idle, eject_after: pool.eject_after, eject: pool.eject }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(idle) = this.idle {
                    idle.armed = false;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(slot) = this.slot.as_mut() {
                    slot.failed_late(*this.eject_after, *this.eject, "answer broke off");
                }
                *this.slot = None;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                *this.slot = None;
                give_back(this.conn);
                Poll::Ready(None)
            }
            Poll::Pending => {
                let Some(idle) = this.idle else { return Poll::Pending };
                if !idle.armed {
                    idle.sleep.as_mut().reset(Instant::now() + idle.limit);
                    idle.armed = true;
                }
                if idle.sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                if let Some(mut slot) = this.slot.take() {
                    tracing::warn!(upstream = %slot.backend().upstream, backend = %slot.backend().label, "answer stalled; cut off");
                    slot.failed_late(*this.eject_after, *this.eject, "answer stalled");
                }
                Poll::Ready(Some(Err(Box::new(StreamIdle(idle.limit)))))
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

/// Puts a pooled connection back, once.
fn give_back(conn: &mut Option<Lent>) {
    if let Some(mut conn) = conn.take() {
        conn.give_back();
    }
}
