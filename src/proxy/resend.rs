//! A request body lent to one attempt at a time, so that a request no backend accepted a
//! connection for can be sent to the next one whole.
//!
//! The body sits in a shared slot; an attempt takes it out only when its connection first asks
//! for data. An attempt that failed before that (no connection could be made) leaves it there,
//! and [`Lent::untouched`] says the next attempt may send it. A body once taken is never sent
//! again: part of it may have reached a backend.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};

/// A handle on the lent body. A clone is another attempt's handle on the same body.
pub struct Lent {
    slot: Arc<Mutex<Option<Body>>>,
    /// This attempt's body, once its connection asked for data.
    taken: Option<Body>,
}

impl Clone for Lent {
    fn clone(&self) -> Self {
        Lent { slot: self.slot.clone(), taken: None }
    }
}

impl Lent {
    /// Lends `body`.
    pub fn new(body: Body) -> Self {
        Lent { slot: Arc::new(Mutex::new(Some(body))), taken: None }
    }

    /// No attempt has taken the body yet: it can be sent whole.
    pub fn untouched(&self) -> bool {
        self.lock().is_some()
    }

    fn lock(&self) -> MutexGuard<'_, Option<Body>> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl http_body::Body for Lent {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.taken.is_none() {
            let body = this.lock().take();
            match body {
                Some(b) => this.taken = Some(b),
                // Another attempt took it (never retried then): fail rather than send it short.
                None => return Poll::Ready(Some(Err(axum::Error::new("the request body was already sent")))),
            }
        }
        Pin::new(this.taken.as_mut().expect("taken above")).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        match &self.taken {
            Some(b) => b.is_end_stream(),
            None => self.lock().as_ref().is_none_or(http_body::Body::is_end_stream),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.taken {
            Some(b) => b.size_hint(),
            None => self.lock().as_ref().map_or_else(|| SizeHint::with_exact(0), http_body::Body::size_hint),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn an_untaken_body_goes_whole_to_the_next_attempt() {
        let first = Lent::new(Body::from("abc"));
        let second = first.clone();
        assert_eq!(first.size_hint().exact(), Some(3));
        drop(first); // an attempt that never asked for data
        assert!(second.untouched());
        let bytes = second.clone().collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"abc");
        assert!(!second.untouched(), "a body once read is not sent again");
    }
}
