//! `GatewayError`: every way a request can be refused, and the ONE place that turns it into an
//! HTTP answer (SPEC §6): `{"error": {"type", "message", ...fields}}` with the matching status.
//!
//! Each variant records where the failure came from (the client, the store, an upstream), which
//! decides the status; messages are sentences a person can read as they are and never carry
//! internals (store errors are logged, not shown).

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

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

/// Declares [`ErrorCode`]: every `error.type` string (SPEC §6) with its status, from one list, so
/// the answers and the OpenAPI document (`openapi.rs`) cannot disagree about the set.
macro_rules! error_codes {
    ($( $(#[$doc:meta])* $variant:ident = ($status:ident, $name:tt), )*) => {
        /// The `error.type` of an error answer, with its HTTP status.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
        pub enum ErrorCode {
            $( $(#[$doc])* #[serde(rename = $name)] $variant, )*
        }

        impl ErrorCode {
            /// Every code, in the order of SPEC §6 (and the extra ones after it).
            pub const ALL: &[ErrorCode] = &[$(ErrorCode::$variant),*];

            /// The `error.type` string.
            pub fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => $name,)* }
            }

            /// The HTTP status of answers with this code.
            pub fn status(self) -> StatusCode {
                match self { $(ErrorCode::$variant => StatusCode::$status,)* }
            }
        }
    };
}

error_codes! {
    /// Malformed input, unknown tier, missing field, a refused path.
    BadRequest = (BAD_REQUEST, "bad_request"),
    /// The `x-ai-tier` header and the body's `tier` disagree.
    TierMismatch = (BAD_REQUEST, "tier_mismatch"),
    /// A pricing field given twice, or in spellings that differ only in case.
    AmbiguousBody = (BAD_REQUEST, "ambiguous_body"),
    /// Missing or unknown credentials, or the key's account is gone.
    Unauthorized = (UNAUTHORIZED, "unauthorized"),
    /// Zero credits left.
    NoCredits = (PAYMENT_REQUIRED, "no_credits"),
    /// Some credits, fewer than the cost.
    InsufficientCredits = (PAYMENT_REQUIRED, "insufficient_credits"),
    /// Authenticated but not allowed.
    Forbidden = (FORBIDDEN, "forbidden"),
    /// No such thing.
    NotFound = (NOT_FOUND, "not_found"),
    /// The body stopped arriving.
    RequestTimeout = (REQUEST_TIMEOUT, "request_timeout"),
    /// The Idempotency-Key was used for a different request.
    IdempotencyConflict = (CONFLICT, "idempotency_conflict"),
    /// The first request with this Idempotency-Key is still running (`Retry-After`).
    IdempotencyInProgress = (CONFLICT, "idempotency_in_progress"),
    /// The key's request was charged but its answer was not kept.
    IdempotencyKeyReused = (CONFLICT, "idempotency_key_reused"),
    /// The body is larger than the limit.
    PayloadTooLarge = (PAYLOAD_TOO_LARGE, "payload_too_large"),
    /// A body-priced request with a body the gateway cannot read (e.g. compressed).
    UnsupportedMediaType = (UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
    /// Too many requests, or too many queued (`Retry-After`).
    RateLimited = (TOO_MANY_REQUESTS, "rate_limited"),
    /// The backend could not be reached or broke the connection.
    UpstreamUnavailable = (BAD_GATEWAY, "upstream_unavailable"),
    /// The credit store is unavailable (`Retry-After`).
    StoreUnavailable = (SERVICE_UNAVAILABLE, "store_unavailable"),
    /// The backend did not answer in time.
    UpstreamTimeout = (GATEWAY_TIMEOUT, "upstream_timeout"),
    /// Every backend of the upstream is at its `max_in_flight`; nothing was sent or charged (`Retry-After`).
    UpstreamBusy = (SERVICE_UNAVAILABLE, "upstream_busy"),
    /// The path exists, the method does not.
    MethodNotAllowed = (METHOD_NOT_ALLOWED, "method_not_allowed"),
    /// A resource with that id exists already.
    Conflict = (CONFLICT, "conflict"),
    /// The payment provider could not take the payment.
    PaymentProviderUnavailable = (BAD_GATEWAY, "payment_provider_unavailable"),
    /// Auto top-up needs a card that can be charged.
    PaymentMethodRequired = (PAYMENT_REQUIRED, "payment_method_required"),
}

/// The body of every error answer: `{"error": {...}}`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorObject,
}

/// The `error` object: `type` and `message` always, the other fields where the error has them.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorObject {
    /// The kind of error; decides the status.
    #[serde(rename = "type")]
    pub kind: ErrorCode,
    /// A sentence a person can read as it is.
    pub message: String,
    /// Credits the request needs (`insufficient_credits`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub required: Option<u64>,
    /// Credits the account has (`no_credits`, `insufficient_credits`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remaining: Option<u64>,
    /// Next renewal, RFC 3339 (`no_credits`, `insufficient_credits`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    pub renews_at: Option<String>,
    /// Seconds to wait before retrying (`rate_limited`, `idempotency_in_progress`); also `Retry-After`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
    /// The body limit in bytes (`payload_too_large`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit_bytes: Option<u64>,
    /// Most requests an account may have queued (`rate_limited`, queue full).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_limit: Option<u64>,
    /// Most bytes an account's queued requests may hold (`rate_limited`, queue full).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_limit_bytes: Option<u64>,
}

impl GatewayError {
    /// The `error.type` of this error.
    pub fn code(&self) -> ErrorCode {
        use GatewayError::*;
        match self {
            BadRequest(_) => ErrorCode::BadRequest,
            TierMismatch(_) => ErrorCode::TierMismatch,
            AmbiguousBody(_) => ErrorCode::AmbiguousBody,
            UnsupportedMediaType(_) => ErrorCode::UnsupportedMediaType,
            Unauthorized(_) | AccountGone => ErrorCode::Unauthorized,
            NoCredits { .. } => ErrorCode::NoCredits,
            InsufficientCredits { .. } => ErrorCode::InsufficientCredits,
            Forbidden(_) => ErrorCode::Forbidden,
            NotFound(_) => ErrorCode::NotFound,
            MethodNotAllowed => ErrorCode::MethodNotAllowed,
            Conflict(_) => ErrorCode::Conflict,
            IdempotencyConflict => ErrorCode::IdempotencyConflict,
            IdempotencyInProgress { .. } => ErrorCode::IdempotencyInProgress,
            IdempotencyKeyReused => ErrorCode::IdempotencyKeyReused,
            PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
            RequestTimeout => ErrorCode::RequestTimeout,
            RateLimited { .. } | QueueFull { .. } | QueueBytesFull { .. } => ErrorCode::RateLimited,
            UpstreamUnavailable(_) | UpstreamUnreachable(_) => ErrorCode::UpstreamUnavailable,
            UpstreamTimeout => ErrorCode::UpstreamTimeout,
            UpstreamBusy(_) => ErrorCode::UpstreamBusy,
            StoreUnavailable(_) => ErrorCode::StoreUnavailable,
            PaymentProviderUnavailable(_) => ErrorCode::PaymentProviderUnavailable,
            PaymentMethodRequired(_) => ErrorCode::PaymentMethodRequired,
        }
    }

    /// HTTP status and the `error.type` string.
    pub fn status_and_type(&self) -> (StatusCode, &'static str) {
        let code = self.code();
        (code.status(), code.as_str())
    }

    /// The error object: the person-readable sentence and the error's own values.
    pub fn to_object(&self) -> ErrorObject {
        use GatewayError::*;
        let mut o = ErrorObject {
            kind: self.code(),
            message: String::new(),
            required: None,
            remaining: None,
            renews_at: None,
            retry_after: None,
            limit_bytes: None,
            queue_limit: None,
            queue_limit_bytes: None,
        };
        o.message = match self {
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
                o.remaining = Some(0);
                o.renews_at = Some(rfc3339(*renews_at));
                format!("You're out of AI credits. They renew on {} — or buy a top-up.", human_date(*renews_at))
            }
            InsufficientCredits { required, remaining, renews_at } => {
                o.required = Some(*required);
                o.remaining = Some(*remaining);
                o.renews_at = Some(rfc3339(*renews_at));
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
                o.retry_after = Some(*retry_after_secs);
                format!("A request with this Idempotency-Key is still running; retry in {retry_after_secs} s to get its answer.")
            }
            IdempotencyKeyReused => "This Idempotency-Key was used for a request that was charged, but its answer could not be kept (too large, or the client left before it ended); use a new key.".into(),
            AccountGone => "The account of this API key no longer exists.".into(),
            RequestTimeout => "The request body stopped arriving; send it again without pauses.".into(),
            PayloadTooLarge { limit } => {
                o.limit_bytes = Some(*limit as u64);
                format!("The request body is larger than the limit of {limit} bytes.")
            }
            RateLimited { retry_after_secs } => {
                o.retry_after = Some(*retry_after_secs);
                format!("Too many requests; retry in {retry_after_secs} s.")
            }
            QueueBytesFull { limit_bytes } => {
                o.queue_limit_bytes = Some(*limit_bytes);
                format!("Your requests waiting for credits already hold {limit_bytes} bytes; wait for them to run or buy a top-up.")
            }
            QueueFull { limit } => {
                o.queue_limit = Some(*limit);
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
        o
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        if let GatewayError::StoreUnavailable(detail) = &self {
            // The client gets a plain sentence; the operator gets the cause.
            tracing::error!(detail = %detail, "store unavailable");
        }
        let status = self.code().status();
        let body = serde_json::to_vec(&ErrorBody { error: self.to_object() }).unwrap_or_default();
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
    use serde_json::Value;

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
