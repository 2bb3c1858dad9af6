//! `GatewayError`: every way a request can be refused, and the ONE place that turns it into an
//! HTTP answer (SPEC §6): `{"error": {"type", "message", ...fields}}` with the matching status.
//!
//! Each variant records where the failure came from (the client, the store, an upstream), which
//! decides the status; messages are sentences a person can read as they are and never carry
//! internals (store errors are logged, not shown).

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde_json::{Map, Value, json};

use crate::calendar::{human_date, rfc3339};

/// A refused or failed request.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// Malformed input: bad JSON, unknown tier, missing field, a path or method refused (client).
    #[error("{0}")]
    BadRequest(String),
    /// The `x-ai-tier` header and the body's `tier` name different tiers (client).
    #[error("{0}")]
    TierMismatch(String),
    /// A pricing field given twice, or in a spelling that differs only in case (client).
    #[error("{0}")]
    AmbiguousBody(String),
    /// A body-priced request with a body the gateway cannot read, e.g. compressed (client).
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Missing or unknown credentials (client).
    #[error("{0}")]
    Unauthorized(String),
    /// Zero credits left (account).
    #[error("no credits")]
    NoCredits {
        /// Next renewal, Unix seconds.
        renews_at: i64,
    },
    /// Some credits, fewer than the cost (account).
    #[error("insufficient credits")]
    InsufficientCredits {
        /// Cost of the request.
        required: u64,
        /// What the account has.
        remaining: u64,
        /// Next renewal, Unix seconds.
        renews_at: i64,
    },
    /// Authenticated but not allowed (client).
    #[error("{0}")]
    Forbidden(String),
    /// No such thing (client).
    #[error("{0}")]
    NotFound(String),
    /// The path exists, the method does not (client).
    #[error("method not allowed")]
    MethodNotAllowed,
    /// A resource with that id exists already (client).
    #[error("{0}")]
    Conflict(String),
    /// The idempotency key was used for a different request (client).
    #[error("idempotency conflict")]
    IdempotencyConflict,
    /// 409 `idempotency_in_progress`: the first request with this key is still running.
    #[error("idempotency key in progress")]
    IdempotencyInProgress {
        /// Seconds to wait (`Retry-After`).
        retry_after_secs: u64,
    },
    /// 409 `idempotency_key_reused`: the key's request was charged but its answer was not kept.
    #[error("idempotency key reused")]
    IdempotencyKeyReused,
    /// 401 `unauthorized`: the API key's account no longer exists (one answer wherever it is found).
    #[error("account gone")]
    AccountGone,
    /// 408 `request_timeout`: the request body stalled (client).
    #[error("request timeout")]
    RequestTimeout,
    /// The body is larger than `server.max_body_bytes` (client).
    #[error("payload too large")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The account's queued requests hold `limit_bytes` already: 429 `rate_limited` (client).
    #[error("queue bytes full")]
    QueueBytesFull {
        /// `jobs.max_queued_bytes_per_account`.
        limit_bytes: u64,
    },
    /// Too many requests (client).
    #[error("rate limited")]
    RateLimited {
        /// Seconds until a retry may succeed.
        retry_after_secs: u64,
    },
    /// The account's job queue is full (account).
    #[error("queue full")]
    QueueFull {
        /// Most jobs an account may have waiting.
        limit: u64,
    },
    /// The upstream could not be reached or broke the connection (upstream).
    #[error("upstream unavailable: {0}")]
    UpstreamUnavailable(String),
    /// 502 `upstream_unavailable` too, but the request never left: no connection to the backend
    /// could be made (refunded as `unreachable`).
    #[error("upstream unreachable: {0}")]
    UpstreamUnreachable(String),
    /// The upstream did not answer in time (upstream).
    #[error("upstream timeout")]
    UpstreamTimeout,
    /// Every backend of the upstream has `max_in_flight` requests running; this one was never
    /// sent (always refunded).
    #[error("upstream busy: {0}")]
    UpstreamBusy(String),
    /// The store could not be reached (store).
    #[error("store unavailable: {0}")]
    StoreUnavailable(String),
    /// The payment provider could not be reached or refused the call (billing).
    #[error("payment provider unavailable: {0}")]
    PaymentProviderUnavailable(String),
    /// Auto top-up needs a card that can be charged (billing); the sentence says what to do.
    #[error("payment method required")]
    PaymentMethodRequired(String),
}

/// The first error of type `E` in `err`'s source chain, `err` itself included (linkerd's
/// `cause_ref`): the one place that walks a chain.
pub fn cause_ref<'a, E: std::error::Error + 'static>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a E> {
    let mut source = Some(err);
    while let Some(s) = source {
        if let Some(e) = s.downcast_ref::<E>() {
            return Some(e);
        }
        source = s.source();
    }
    None
}

impl From<crate::ledger::LedgerError> for GatewayError {
    fn from(e: crate::ledger::LedgerError) -> Self {
        GatewayError::StoreUnavailable(e.0)
    }
}

impl From<crate::classify::ClassifyError> for GatewayError {
    fn from(e: crate::classify::ClassifyError) -> Self {
        use crate::classify::ClassifyError::*;
        match e {
            Invalid(m) => GatewayError::BadRequest(m),
            TierMismatch(m) => GatewayError::TierMismatch(m),
            Ambiguous(m) => GatewayError::AmbiguousBody(m),
            Encoded(m) => GatewayError::UnsupportedMediaType(m),
        }
    }
}

impl GatewayError {
    /// HTTP status and the `error.type` string.
    pub fn status_and_type(&self) -> (StatusCode, &'static str) {
        use GatewayError::*;
        match self {
            BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            TierMismatch(_) => (StatusCode::BAD_REQUEST, "tier_mismatch"),
            AmbiguousBody(_) => (StatusCode::BAD_REQUEST, "ambiguous_body"),
            UnsupportedMediaType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            NoCredits { .. } => (StatusCode::PAYMENT_REQUIRED, "no_credits"),
            InsufficientCredits { .. } => (StatusCode::PAYMENT_REQUIRED, "insufficient_credits"),
            Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            IdempotencyConflict => (StatusCode::CONFLICT, "idempotency_conflict"),
            IdempotencyInProgress { .. } => (StatusCode::CONFLICT, "idempotency_in_progress"),
            IdempotencyKeyReused => (StatusCode::CONFLICT, "idempotency_key_reused"),
            AccountGone => (StatusCode::UNAUTHORIZED, "unauthorized"),
            PayloadTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            RequestTimeout => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            RateLimited { .. } | QueueFull { .. } | QueueBytesFull { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "rate_limited")
            }
            UpstreamUnavailable(_) | UpstreamUnreachable(_) => (StatusCode::BAD_GATEWAY, "upstream_unavailable"),
            UpstreamTimeout => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
            UpstreamBusy(_) => (StatusCode::SERVICE_UNAVAILABLE, "upstream_busy"),
            StoreUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            PaymentProviderUnavailable(_) => (StatusCode::BAD_GATEWAY, "payment_provider_unavailable"),
            PaymentMethodRequired(_) => (StatusCode::PAYMENT_REQUIRED, "payment_method_required"),
        }
    }

    /// The person-readable sentence and the extra fields of the error object.
    fn message_and_fields(&self) -> (String, Map<String, Value>) {
        use GatewayError::*;
        let mut fields = Map::new();
        let message = match self {
            BadRequest(m)
            | TierMismatch(m)
            | AmbiguousBody(m)
            | UnsupportedMediaType(m)
            | Unauthorized(m)
            | Forbidden(m)
            | NotFound(m)
            | PaymentMethodRequired(m)
            | Conflict(m) => m.clone(),
            NoCredits { renews_at } => {
                fields.insert("remaining".into(), json!(0));
                fields.insert("renews_at".into(), json!(rfc3339(*renews_at)));
                format!("You're out of AI credits. They renew on {} — or buy a top-up.", human_date(*renews_at))
            }
            InsufficientCredits { required, remaining, renews_at } => {
                fields.insert("required".into(), json!(required));
                fields.insert("remaining".into(), json!(remaining));
                fields.insert("renews_at".into(), json!(rfc3339(*renews_at)));
                format!(
                    "This request needs {required} credits but only {remaining} remain. Credits renew on {} — or buy a top-up.",
                    human_date(*renews_at)
                )
            }
            MethodNotAllowed => "This path does not take that method.".into(),
            IdempotencyConflict => {
                "This Idempotency-Key was already used for a different request (method, path, tier or body).".into()
            }
            IdempotencyInProgress { retry_after_secs } => {
                fields.insert("retry_after".into(), json!(retry_after_secs));
                format!("A request with this Idempotency-Key is still running; retry in {retry_after_secs} s to get its answer.")
            }
            IdempotencyKeyReused => "This Idempotency-Key was used for a request that was charged, but its answer could not be kept (too large, or the client left before it ended); use a new key.".into(),
            AccountGone => "The account of this API key no longer exists.".into(),
            RequestTimeout => "The request body stopped arriving; send it again without pauses.".into(),
            PayloadTooLarge { limit } => {
                fields.insert("limit_bytes".into(), json!(limit));
                format!("The request body is larger than the limit of {limit} bytes.")
            }
            RateLimited { retry_after_secs } => {
                fields.insert("retry_after".into(), json!(retry_after_secs));
                format!("Too many requests; retry in {retry_after_secs} s.")
            }
            QueueBytesFull { limit_bytes } => {
                fields.insert("queue_limit_bytes".into(), json!(limit_bytes));
                format!("Your requests waiting for credits already hold {limit_bytes} bytes; wait for them to run or buy a top-up.")
            }
            QueueFull { limit } => {
                fields.insert("queue_limit".into(), json!(limit));
                format!("You already have {limit} requests waiting for credits; wait for them to run or buy a top-up.")
            }
            // Whether the credits came back follows the operation's `refund_on`; the answer's
            // `x-credits-charged` header says what was kept.
            UpstreamUnavailable(_) => "The AI backend failed to answer.".into(),
            UpstreamUnreachable(_) => "The AI backend could not be reached.".into(),
            UpstreamTimeout => "The AI backend did not answer in time.".into(),
            UpstreamBusy(_) => "The AI backend is busy with other requests; nothing was charged. Please retry shortly.".into(),
            StoreUnavailable(_) => "The credit store is unavailable right now; please retry shortly.".into(),
            PaymentProviderUnavailable(_) => {
                "The payment provider could not take the payment right now; nothing was charged. Please retry shortly.".into()
            }
        };
        (message, fields)
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        if let GatewayError::StoreUnavailable(detail) = &self {
            // The client gets a plain sentence; the operator gets the cause.
            tracing::error!(detail = %detail, "store unavailable");
        }
        let (status, kind) = self.status_and_type();
        let (message, mut fields) = self.message_and_fields();
        fields.insert("type".into(), json!(kind));
        fields.insert("message".into(), json!(message));
        let body = serde_json::to_vec(&json!({ "error": fields })).unwrap_or_default();
        let mut res = Response::new(Body::from(body));
        *res.status_mut() = status;
        res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        match self {
            GatewayError::RateLimited { retry_after_secs } => {
                res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            }
            GatewayError::IdempotencyInProgress { retry_after_secs } => {
                res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            }
            GatewayError::QueueFull { .. } | GatewayError::QueueBytesFull { .. } => {
                res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
            }
            GatewayError::StoreUnavailable(_) | GatewayError::UpstreamBusy(_) => {
                res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn json_of(e: GatewayError) -> (StatusCode, Value) {
        let res = e.into_response();
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn insufficient_credits_carries_spec_fields_inside_error() {
        let renews = crate::calendar::parse_rfc3339("2026-12-15T00:00:00Z").unwrap();
        let (s, v) = json_of(GatewayError::InsufficientCredits { required: 5, remaining: 2, renews_at: renews }).await;
        assert_eq!(s, 402);
        assert_eq!(v["error"]["type"], "insufficient_credits");
        assert_eq!(v["error"]["required"], 5);
        assert_eq!(v["error"]["remaining"], 2);
        assert_eq!(v["error"]["renews_at"], "2026-12-15T00:00:00Z");
        assert!(v["error"]["message"].as_str().unwrap().contains("15 Dec 2026"));
    }

    #[tokio::test]
    async fn no_credits_message_is_readable() {
        let renews = crate::calendar::parse_rfc3339("2026-12-15T00:00:00Z").unwrap();
        let (s, v) = json_of(GatewayError::NoCredits { renews_at: renews }).await;
        assert_eq!(s, 402);
        assert_eq!(v["error"]["message"], "You're out of AI credits. They renew on 15 Dec 2026 — or buy a top-up.");
    }

    #[tokio::test]
    async fn store_errors_do_not_leak_internals() {
        let (s, v) = json_of(GatewayError::StoreUnavailable("redis://secret@10.0.0.1 refused".into())).await;
        assert_eq!(s, 503);
        assert!(!v.to_string().contains("secret"));
    }

    #[test]
    fn rate_limited_sets_retry_after() {
        let res = GatewayError::RateLimited { retry_after_secs: 2 }.into_response();
        assert_eq!(res.status(), 429);
        assert_eq!(res.headers()[header::RETRY_AFTER], "2");
    }
}
