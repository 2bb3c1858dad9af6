//! `MeteredBody<B>`: a response body that refunds its charge when the upstream breaks off.
//!
//! End of stream settles the charge (nothing to do: it was taken up front). An error from the
//! upstream body means the answer was not delivered: the charge is refunded in the background
//! (the response head is already out, so the refund cannot change it). Dropping the body before
//! its end means the client went away: the charge stands.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::Charge;
use crate::state::AppState;

pin_project! {
    /// Wraps an upstream body; see the module docs.
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        pending: Option<(AppState, Charge)>,
    }
}

impl<B> MeteredBody<B> {
    /// Wraps `inner`; `charge` is refunded if `inner` fails.
    pub fn new(inner: B, state: AppState, charge: Charge) -> Self {
        Self { inner, pending: Some((state, charge)) }
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
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(None) => *this.pending = None,
            Poll::Ready(Some(Err(e))) => {
                if let Some((state, charge)) = this.pending.take() {
                    tracing::warn!(error = %e, charge_id = %charge.receipt.charge_id, "upstream body failed mid-stream; refunding");
                    tokio::spawn(async move { super::refund(&state, &charge).await });
                }
            }
            _ => {}
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
