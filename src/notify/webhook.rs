//! Webhook delivery: a signed JSON POST.
//!
//! `x-creditgate-signature: sha256=<hex HMAC-SHA256 of the raw body>` with the key from the
//! variable `notifications.webhook_secret_env` names (required with a webhook: a config without
//! it, or with the variable unset, is refused).

use std::time::Duration;

use axum::body::Body;
use hmac::{Hmac, KeyInit, Mac};
use http::{Method, Request, header};
use sha2::Sha256;

use crate::ledger::Event;
use crate::proxy::Client;

/// Time allowed for one delivery.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Where and how to deliver.
pub struct Target<'a> {
    url: &'a str,
    secret: &'a [u8],
}

impl<'a> Target<'a> {
    /// The target of `webhook_url`, signing with `secret`.
    pub fn new(url: &'a str, secret: &'a [u8]) -> Self {
        Target { url, secret }
    }

    /// POSTs one event; Ok on a 2xx answer.
    pub async fn deliver(&self, client: &Client, event: &Event) -> Result<(), String> {
        let body = super::event_body(event);
        let req = Request::builder()
            .method(Method::POST)
            .uri(self.url)
            .header(header::CONTENT_TYPE, "application/json")
            .header("x-creditgate-event-id", &event.id)
            .header("x-creditgate-event-type", &event.kind)
            .header("x-creditgate-signature", signature(self.secret, &body));
        let req = req.body(Body::from(body)).map_err(|e| e.to_string())?;
        match tokio::time::timeout(TIMEOUT, client.request(req)).await {
            Err(_) => Err("timed out".into()),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(res)) if res.status().is_success() => Ok(()),
            Ok(Ok(res)) => Err(format!("answered {}", res.status())),
        }
    }
}

/// `sha256=<hex HMAC-SHA256(secret, body)>`
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn signature_matches_rfc_4231_test_case_2() {
        // RFC 4231 §4.3: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            super::signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
