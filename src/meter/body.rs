//! The two body wrappers of a metered request.
//!
//! * [`DeliveryBody`] wraps the request body on its way to the backend and marks the request
//!   [`Delivery`] once the connection has read all of it: before that, the backend has nothing
//!   to work on and a failure or a hang-up is refunded; after it, the work was handed over. An
//!   empty body is never read (hyper sends `Content-Length: 0` and moves on), so such a request
//!   counts as delivered once a connection took it: hyper asks the body's `is_end_stream` then,
//!   right before the head goes out, and never before a connection exists (a connect that hangs
//!   or a client that leaves while it does is not delivery). A response head from the backend
//!   marks delivery too.
//! * [`MeteredBody`] wraps the backend's answer on its way to the client, like linkerd's
//!   body-eos: at end of stream it keeps the answer of an idempotent request ([`Capture`]); on an
//!   error from the backend it refunds when `refund_on` says so; dropped before its end (the
//!   client went away) it keeps the charge — the backend did the work it was given.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::Charge;
use crate::ledger::StoredResponse;
use crate::state::AppState;

/// Whether the backend has the whole request (shared between the body and the request path).
#[derive(Debug, Clone, Default)]
pub struct Delivery(Arc<AtomicBool>);

impl Delivery {
    /// True once the upstream connection read the request body to its end.
    pub fn happened(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// Records that the backend has the request (its body was read, or it answered).
    pub fn mark(&self) {
        self.0.store(true, Ordering::Release);
    }
}

pin_project! {
    /// A request body that marks its [`Delivery`] when read to its end.
    pub struct DeliveryBody<B> {
        #[pin]
        inner: B,
        delivery: Delivery,
        polled: bool,
        empty: bool,
    }
}

impl<B> DeliveryBody<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, delivery: Delivery) -> Self
    where
        B: Body,
    {
        let empty = inner.size_hint().exact() == Some(0);
        Self { inner, delivery, polled: false, empty }
    }
}

impl<B: Body<Data = Bytes>> Body for DeliveryBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        *this.polled = true;
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.delivery.mark(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.delivery.mark(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        // A connection took the request (see the module docs): an empty body is all there is.
        if self.empty {
            self.delivery.mark();
        }
        // An empty body must still be polled once where a connection does poll it.
        self.polled && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Collects an idempotent request's answer for replays, up to a size limit.
#[derive(Debug)]
pub struct Capture {
    status: u16,
    headers: Vec<(String, String)>,
    body: Option<BytesMut>,
    limit: usize,
}

impl Capture {
    /// Starts with the answer head; the end-to-end headers are kept except the ones each answer
    /// gets afresh (credit headers, request id, framing).
    pub fn new(status: StatusCode, headers: &HeaderMap, limit: usize) -> Self {
        let headers = headers
            .iter()
            .filter(|(k, _)| {
                let k = k.as_str();
                !(k.starts_with("x-credits-")
                    || matches!(k, "x-idempotent-replay" | "x-request-id" | "content-length" | "transfer-encoding"))
            })
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect();
        Capture { status: status.as_u16(), headers, body: Some(BytesMut::new()), limit }
    }

    /// Adds a chunk; past the limit the answer is not kept.
    pub fn push(&mut self, chunk: &[u8]) {
        if let Some(body) = &mut self.body {
            if body.len() + chunk.len() > self.limit {
                self.body = None;
            } else {
                body.extend_from_slice(chunk);
            }
        }
    }

    /// The whole answer, or `None` when it outgrew the limit.
    pub fn finish(self) -> Option<StoredResponse> {
        Some(StoredResponse { status: self.status, headers: self.headers, body: self.body?.freeze() })
    }
}

/// What a [`MeteredBody`] settles when its stream ends, fails or is dropped.
struct Settle {
    state: AppState,
    charge: Charge,
    refund_on_break: bool,
    capture: Option<Capture>,
}

impl Settle {
    fn ended(mut self) {
        if let Some(capture) = self.capture.take() {
            super::complete(&self.state, &self.charge, capture.finish());
        }
    }

    fn broke(self, error: &dyn std::fmt::Display) {
        let Settle { state, charge, refund_on_break, .. } = self;
        if refund_on_break {
            tracing::warn!(%error, charge_id = %charge.receipt.charge_id, "upstream body failed mid-stream; refunding");
            // The head is out already, so the refund cannot change it; it releases the key too.
            state.background.clone().spawn(async move { super::refund(&state, &charge).await });
        } else {
            tracing::warn!(%error, charge_id = %charge.receipt.charge_id, "upstream body failed mid-stream; charge kept (refund_on)");
            super::complete(&state, &charge, None);
        }
    }
}

pin_project! {
    /// Wraps an upstream answer body; see the module docs.
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        settle: Option<Settle>,
    }

    impl<B> PinnedDrop for MeteredBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(s) = this.project().settle.take() {
                // The client went away before the end: the backend got the work, the charge stands.
                super::client_gone(&s.state, &s.charge, true);
            }
        }
    }
}

impl<B: Body> MeteredBody<B> {
    /// Wraps `inner`; `charge` is refunded if `inner` fails and `refund_on_break`; `capture`
    /// keeps the answer of an idempotent request.
    pub fn new(inner: B, state: AppState, charge: Charge, refund_on_break: bool, capture: Option<Capture>) -> Self {
        let settle = Settle { state, charge, refund_on_break, capture };
        if inner.is_end_stream() {
            // An empty answer is complete already (hyper will not even poll it).
            settle.ended();
            return Self { inner, settle: None };
        }
        Self { inner, settle: Some(settle) }
    }
}

impl<B> Body for MeteredBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(s)) = (frame.data_ref(), this.settle.as_mut())
                    && let Some(capture) = &mut s.capture
                {
                    capture.push(data);
                }
                if this.inner.is_end_stream()
                    && let Some(s) = this.settle.take()
                {
                    s.ended();
                }
            }
            Poll::Ready(None) => {
                if let Some(s) = this.settle.take() {
                    s.ended();
                }
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(s) = this.settle.take() {
                    s.broke(e);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        // Until settled it must be polled, also when empty, so that its end is seen.
        self.settle.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
