//! The request body on its way to a backend, watched for two moments the request path needs:
//! a connection took the request (so the time to the answer head starts then, and the connect
//! phase has its own limit, `connect_timeout_ms`), and the whole body went out (so a first-byte
//! timeout is the backend's fault only once it had everything).
//!
//! The first moment is seen through `is_end_stream`: hyper asks it first thing when a
//! connection takes a request (h1 and h2 alike, before writing its head) and nowhere before a
//! connection exists. It is recorded with its time, not signalled: the sender reads it when its
//! timer rings (waking the sender for it would poll the whole request path once more per request).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Instant;

/// What happened to one attempt's request so far (shared with the sender).
#[derive(Debug)]
pub struct Progress {
    /// When the attempt started.
    started: Instant,
    /// Nanoseconds from `started` to when a connection took the request, plus one; 0 until then.
    taken: AtomicU64,
    ended: AtomicBool,
}

impl Progress {
    /// An attempt starting now.
    pub fn new() -> Self {
        Progress { started: Instant::now(), taken: AtomicU64::new(0), ended: AtomicBool::new(false) }
    }

    /// When the attempt started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// When a connection took the request, if one did.
    pub fn taken_at(&self) -> Option<Instant> {
        match self.taken.load(Ordering::Acquire) {
            0 => None,
            n => Some(self.started + Duration::from_nanos(n - 1)),
        }
    }

    /// Whether the whole body went out.
    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    fn mark_taken(&self) {
        if self.taken.load(Ordering::Relaxed) == 0 {
            let nanos = self.started.elapsed().as_nanos().min(u128::from(u64::MAX - 1)) as u64;
            let _ = self.taken.compare_exchange(0, nanos + 1, Ordering::AcqRel, Ordering::Relaxed);
        }
    }
}

pin_project! {
    /// See the module docs.
    pub struct Outgoing<B> {
        #[pin]
        inner: B,
        progress: Arc<Progress>,
    }
}

impl<B> Outgoing<B> {
    /// Wraps `inner`, reporting to `progress`.
    pub fn new(inner: B, progress: Arc<Progress>) -> Self {
        Outgoing { inner, progress }
    }
}

impl<B: Body<Data = Bytes>> Body for Outgoing<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        this.progress.mark_taken();
        let polled = this.inner.poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) {
            this.progress.ended.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.progress.mark_taken();
        let end = self.inner.is_end_stream();
        // An empty body is never polled (its head says `Content-Length: 0`): it is all out now.
        if end || self.inner.size_hint().exact() == Some(0) {
            self.progress.ended.store(true, Ordering::Release);
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
