//! Stripe's API, the few calls creditgate makes, and the check of Stripe's webhook signature.
//!
//! Requests are form-encoded POSTs and GETs with the secret key as a bearer token, over
//! `https://` (rustls, webpki roots) or, for a local fake such as localstripe, `http://`.
//! Every call that creates something money-related carries an `Idempotency-Key`, so a retry after
//! a crash or a lost answer never creates a second payment (Stripe keeps keys for 24 h).

use std::time::Duration;

use bytes::Bytes;
use hmac::Mac;
use http::{HeaderValue, Method, Request, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::config::{ConfigError, StripeConfig};

/// Largest answer read from Stripe.
const MAX_ANSWER: usize = 1 << 20;

/// What went wrong with a call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StripeError {
    /// Stripe answered and said no: a declined card (402) or a request it refuses (4xx). Final:
    /// the same call would get the same answer.
    #[error("Stripe refused ({status}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Stripe's error code (`card_declined`, `authentication_required`, …), when given.
        code: Option<String>,
        /// Stripe's sentence.
        message: String,
    },
    /// No answer, a timeout, a 5xx or a 429: worth trying again later.
    #[error("Stripe unavailable: {0}")]
    Unavailable(String),
}

/// A Stripe account as the running config describes it (secrets read from the environment).
pub struct Stripe {
    base: String,
    auth: HeaderValue,
    webhook_secret: Vec<u8>,
    /// Handed to Stripe.js by the dashboard (`publishable_key_env`).
    pub publishable_key: Option<String>,
    /// Where the dashboard loads Stripe.js from.
    pub js_url: String,
    /// ISO currency of every payment.
    pub currency: String,
    js_origin: String,
    api_origin: String,
    tolerance_secs: i64,
    setup_future_usage: Option<String>,
    timeout: Duration,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

/// A PaymentIntent as creditgate reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intent {
    /// `pi_…`
    pub id: String,
    /// `succeeded`, `processing`, `requires_payment_method`, `requires_action`, …
    pub status: String,
    /// For the page to confirm the payment with Stripe.js.
    pub client_secret: Option<String>,
    /// Why the last attempt failed, when it did.
    pub failure: Option<String>,
}

impl Intent {
    fn from_json(v: &Value) -> Result<Self, StripeError> {
        let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        Ok(Intent {
            id: text("id").ok_or_else(|| StripeError::Unavailable("a payment intent without an id".into()))?,
            status: text("status").unwrap_or_default(),
            client_secret: text("client_secret"),
            failure: v
                .get("last_payment_error")
                .and_then(|e| e.get("message").or_else(|| e.get("code")))
                .and_then(Value::as_str)
                .map(str::to_owned),
        })
    }
}

/// What an off-session payment is for (its metadata, and where its webhook goes).
pub struct OffSession<'a> {
    /// Account charged.
    pub account: &'a str,
    /// The auto top-up's payment reference (`auto:<charge id>`, unique across accounts); also
    /// the idempotency key.
    pub payment_ref: &'a str,
    /// Credits the auto top-up added.
    pub credits: u64,
    /// Package bought.
    pub package: &'a str,
    /// Amount in the currency's smallest unit.
    pub amount: u64,
}

impl Stripe {
    /// The client of `[billing.stripe]`; fails when a variable it names is unset or empty.
    pub fn new(c: &StripeConfig, env: &impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let read = |key: &str, var: &str| {
            env(var).filter(|v| !v.is_empty()).ok_or_else(|| ConfigError {
                key: key.into(),
                reason: format!("environment variable {var} is not set"),
            })
        };
        let secret = read("billing.stripe.secret_key_env", &c.secret_key_env)?;
        let mut auth = HeaderValue::from_str(&format!("Bearer {secret}")).map_err(|_| ConfigError {
            key: "billing.stripe.secret_key_env".into(),
            reason: format!("environment variable {} holds characters a header cannot carry", c.secret_key_env),
        })?;
        auth.set_sensitive(true);
        let webhook_secret = read("billing.stripe.webhook_secret_env", &c.webhook_secret_env)?.into_bytes();
        let publishable_key =
            c.publishable_key_env.as_deref().map(|v| read("billing.stripe.publishable_key_env", v)).transpose()?;
        let https =
            hyper_rustls::HttpsConnectorBuilder::new().with_webpki_roots().https_or_http().enable_http1().build();
        let origin = |key: &str, url: &str| {
            let uri = crate::config::parse_web_url(url).map_err(|reason| ConfigError { key: key.into(), reason })?;
            Ok::<_, ConfigError>(format!(
                "{}://{}",
                uri.scheme_str().unwrap_or("https"),
                uri.authority().map_or("", |a| a.as_str())
            ))
        };
        Ok(Stripe {
            js_origin: origin("billing.stripe.js_url", &c.js_url)?,
            api_origin: origin("billing.stripe.api_base", &c.api_base)?,
            base: c.api_base.trim_end_matches('/').to_owned(),
            auth,
            webhook_secret,
            publishable_key,
            js_url: c.js_url.clone(),
            currency: c.currency.clone(),
            tolerance_secs: c.webhook_tolerance_secs as i64,
            setup_future_usage: Some(c.setup_future_usage.clone()).filter(|s| s != "none"),
            timeout: Duration::from_millis(c.timeout_ms),
            client: Client::builder(TokioExecutor::new()).build(https),
        })
    }

    /// `scheme://host[:port]` of Stripe.js (the dashboard's CSP lets it in).
    pub fn js_origin(&self) -> &str {
        &self.js_origin
    }

    /// `scheme://host[:port]` of the API (Stripe.js calls it from the page).
    pub fn api_origin(&self) -> &str {
        &self.api_origin
    }

    /// One call; `form` is sent as the body of a POST, or as the query of a GET.
    async fn call(
        &self,
        method: Method,
        path: &str,
        form: &[(&str, &str)],
        idempotency_key: Option<&str>,
    ) -> Result<Value, StripeError> {
        let encoded = serde_urlencoded::to_string(form).map_err(|e| StripeError::Unavailable(e.to_string()))?;
        let (uri, body) = if method == Method::GET && !encoded.is_empty() {
            (format!("{}{path}?{encoded}", self.base), Bytes::new())
        } else {
            (format!("{}{path}", self.base), Bytes::from(encoded))
        };
        let mut req = Request::builder()
            .method(method)
            .uri(&uri)
            .header(header::AUTHORIZATION, self.auth.clone())
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        if let Some(key) = idempotency_key {
            req = req.header("idempotency-key", key);
        }
        let req = req.body(Full::new(body)).map_err(|e| StripeError::Unavailable(format!("{uri}: {e}")))?;
        let answer = async {
            let res = self.client.request(req).await.map_err(|e| StripeError::Unavailable(format!("{uri}: {e}")))?;
            let status = res.status();
            let body = Limited::new(res.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| StripeError::Unavailable(format!("{uri}: reading the answer: {e}")))?
                .to_bytes();
            Ok::<_, StripeError>((status, body))
        };
        let (status, body) = tokio::time::timeout(self.timeout, answer)
            .await
            .map_err(|_| StripeError::Unavailable(format!("{uri}: no answer within {:?}", self.timeout)))??;
        let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(json);
        }
        let error = json.get("error");
        let text = |k: &str| error.and_then(|e| e.get(k)).and_then(Value::as_str).map(str::to_owned);
        let message = text("message").unwrap_or_else(|| format!("answered {status}"));
        if status.is_server_error() || status.as_u16() == 429 {
            return Err(StripeError::Unavailable(format!("{uri}: {message}")));
        }
        Err(StripeError::Refused { status: status.as_u16(), code: text("code"), message })
    }

    /// Creates the customer of an account (idempotent per account for Stripe's 24 h).
    pub async fn create_customer(&self, account: &str, email: Option<&str>) -> Result<String, StripeError> {
        let mut form = vec![("metadata[creditgate_account]", account)];
        if let Some(email) = email {
            form.push(("email", email));
        }
        let v =
            self.call(Method::POST, "/v1/customers", &form, Some(&format!("creditgate-customer-{account}"))).await?;
        v.get("id")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| StripeError::Unavailable("a customer without an id".into()))
    }

    /// Starts a top-up purchase: a PaymentIntent the customer confirms on the page. `key` makes
    /// a double click one payment.
    pub async fn purchase_intent(
        &self,
        customer: &str,
        account: &str,
        package: &str,
        credits: u64,
        amount: u64,
        key: &str,
    ) -> Result<Intent, StripeError> {
        let (credits, amount) = (credits.to_string(), amount.to_string());
        let mut form = vec![
            ("amount", amount.as_str()),
            ("currency", self.currency.as_str()),
            ("customer", customer),
            ("payment_method_types[0]", "card"),
            ("metadata[creditgate_account]", account),
            ("metadata[creditgate_purpose]", "topup"),
            ("metadata[package]", package),
            ("metadata[credits]", credits.as_str()),
        ];
        if let Some(usage) = &self.setup_future_usage {
            form.push(("setup_future_usage", usage));
        }
        Intent::from_json(&self.call(Method::POST, "/v1/payment_intents", &form, Some(key)).await?)
    }

    /// The card the customer chose as default in Stripe (`invoice_settings`), if any.
    pub async fn default_card(&self, customer: &str) -> Result<Option<String>, StripeError> {
        let v = self.call(Method::GET, &format!("/v1/customers/{customer}"), &[], None).await?;
        Ok(v.pointer("/invoice_settings/default_payment_method").and_then(Value::as_str).map(str::to_owned))
    }

    /// Makes `card` the customer's default (`invoice_settings.default_payment_method`): the
    /// card of the last purchase is the one auto top-ups charge, until the customer picks
    /// another in Stripe.
    pub async fn set_default_card(&self, customer: &str, card: &str) -> Result<(), StripeError> {
        let form = [("invoice_settings[default_payment_method]", card)];
        self.call(Method::POST, &format!("/v1/customers/{customer}"), &form, None).await.map(drop)
    }

    /// Charges a saved card without the customer present, confirmed at once; the auto top-up's
    /// payment reference is the idempotency key, so a retry never charges twice.
    pub async fn charge_off_session(
        &self,
        customer: &str,
        card: &str,
        p: &OffSession<'_>,
    ) -> Result<Intent, StripeError> {
        let (credits, amount) = (p.credits.to_string(), p.amount.to_string());
        let form = [
            ("amount", amount.as_str()),
            ("currency", self.currency.as_str()),
            ("customer", customer),
            ("payment_method", card),
            ("confirm", "true"),
            ("off_session", "true"),
            ("metadata[creditgate_account]", p.account),
            ("metadata[creditgate_purpose]", "auto_topup"),
            ("metadata[payment_ref]", p.payment_ref),
            ("metadata[package]", p.package),
            ("metadata[credits]", credits.as_str()),
        ];
        Intent::from_json(&self.call(Method::POST, "/v1/payment_intents", &form, Some(p.payment_ref)).await?)
    }

    /// Checks `Stripe-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">[,v1=…]` against
    /// the webhook secret, with `t` within the tolerance of `now` (a captured delivery cannot be
    /// replayed later). Says why in words when it does not hold.
    pub fn verify(&self, header: Option<&str>, body: &[u8], now: i64) -> Result<(), String> {
        let header = header.ok_or("no Stripe-Signature header")?;
        let mut t = None;
        let mut signatures = Vec::new();
        for part in header.split(',') {
            match part.trim().split_once('=') {
                Some(("t", v)) => t = v.parse::<i64>().ok(),
                Some(("v1", v)) => signatures.extend(hex::decode(v)),
                _ => {}
            }
        }
        let t = t.ok_or("Stripe-Signature has no valid t=")?;
        if (now - t).abs() > self.tolerance_secs {
            return Err(format!("Stripe-Signature t={t} is outside the tolerance of {} s", self.tolerance_secs));
        }
        let mac = || crate::notify::webhook::signed_mac(&self.webhook_secret, t, body);
        // Constant-time comparison of each candidate (Stripe sends several while a secret rolls).
        if signatures.iter().any(|s| mac().verify_slice(s).is_ok()) {
            Ok(())
        } else {
            Err("Stripe-Signature does not match the body".into())
        }
    }
}

/// An amount in euros as the smallest unit of the currency (cents).
pub fn minor_units(price: f64) -> u64 {
    (price * 100.0).round().max(0.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stripe(tolerance: u64) -> Stripe {
        let c: StripeConfig = toml::from_str(&format!(
            "secret_key_env = \"S\"\nwebhook_secret_env = \"W\"\nwebhook_tolerance_secs = {tolerance}"
        ))
        .unwrap();
        Stripe::new(&c, &|v| Some(if v == "W" { "whsec_test".into() } else { "sk_test_1".into() })).unwrap()
    }

    #[test]
    fn a_signature_made_as_stripe_makes_it_verifies_and_nothing_else() {
        let s = stripe(300);
        let body = br#"{"id":"evt_1"}"#;
        let good = crate::notify::webhook::signature(b"whsec_test", 1_000, body);
        assert_eq!(s.verify(Some(&good), body, 1_000), Ok(()));
        assert_eq!(s.verify(Some(&format!("{good},v0=00")), body, 1_200), Ok(()), "other schemes ignored");
        assert_eq!(s.verify(Some(&format!("t=1000,v1=00,{}", &good[7..])), body, 1_000), Ok(()), "any v1");
        assert!(s.verify(Some(&good), br#"{"id":"evt_2"}"#, 1_000).unwrap_err().contains("does not match"));
        assert!(s.verify(Some(&good), body, 1_301).unwrap_err().contains("tolerance"), "stale");
        assert!(s.verify(Some(&good), body, 699).unwrap_err().contains("tolerance"), "from the future");
        let other = crate::notify::webhook::signature(b"whsec_other", 1_000, body);
        assert!(s.verify(Some(&other), body, 1_000).is_err(), "another secret");
        assert!(s.verify(None, body, 1_000).unwrap_err().contains("no Stripe-Signature"));
        assert!(s.verify(Some("v1=abc"), body, 1_000).is_err());
        assert!(s.verify(Some("t=1000"), body, 1_000).is_err(), "no signature at all");
    }

    #[test]
    fn euros_become_cents() {
        assert_eq!((minor_units(10.0), minor_units(9.99), minor_units(150.0)), (1000, 999, 15_000));
    }
}
