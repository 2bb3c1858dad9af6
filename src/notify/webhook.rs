//! Webhook delivery: a signed JSON POST.
//!
//! `x-creditgate-signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">` (Stripe's
//! scheme, SPEC §7) with the key from the variable `notifications.webhook_secret_env` names
//! (required with a webhook: a config without it, or with the variable unset, is refused).
//!
//! The timestamp is inside the MAC, so a receiver that rejects an old `t` (README: 5 minutes)
//! cannot be fed a captured delivery later. Every attempt is signed afresh: a retry an hour
//! later carries that hour's `t`.

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
            .header("x-creditgate-signature", signature(self.secret, crate::calendar::now(), &body));
        let req = req.body(Body::from(body)).map_err(|e| e.to_string())?;
        match tokio::time::timeout(TIMEOUT, client.request(req)).await {
            Err(_) => Err("timed out".into()),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(res)) if res.status().is_success() => Ok(()),
            Ok(Ok(res)) => Err(format!("answered {}", res.status())),
        }
    }
}

/// `t=<t>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>` for a delivery at Unix time `t`.
pub fn signature(secret: &[u8], t: i64, body: &[u8]) -> String {
    format!("t={t},v1={}", hex::encode(signed_mac(secret, t, body).finalize().into_bytes()))
}

/// HMAC-SHA256 of `"<t>.<body>"` under `secret`: the MAC of this scheme, which Stripe's own
/// webhooks use too (`crate::billing::stripe::Stripe::verify` checks theirs with it).
pub fn signed_mac(secret: &[u8], t: i64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    mac
}

#[cfg(test)]
mod tests {
    #[test]
    fn signature_is_the_hmac_of_t_dot_body() {
        // Computed independently: Python's hmac.new(b"Jefe", b"1700000000.what do ya want for
        // nothing?", hashlib.sha256).hexdigest() (RFC 4231 case 2's key and data, with "<t>.").
        assert_eq!(
            super::signature(b"Jefe", 1_700_000_000, b"what do ya want for nothing?"),
            "t=1700000000,v1=1cdd0650c8be1cb0974b1788d458b1e781206cfef59b85faafc582d2e182c57e"
        );
    }
}
