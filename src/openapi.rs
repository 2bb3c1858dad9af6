//! The OpenAPI 3.1 contract: one document for the public and the admin API, served at
//! `GET /openapi.json` on both listeners (no credentials needed).
//!
//! It is generated, not written: utoipa reads the `#[utoipa::path]` of each handler (`api.rs`,
//! `billing/`, `dashboard/`, `admin.rs`) and the `ToSchema` of the types they take and return, and
//! [`ErrorCode`] lists every `error.type` there is. The metered routes are the proxy's, which has
//! no handler per route: they are described here by path stubs, one per route of the shipped
//! `config/gateway.toml` (a deployment with other routes serves the same document). The JSON is
//! rendered once, on first request.

use std::sync::LazyLock;

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, header};
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoResponses, Modify, OpenApi, ToSchema};

use crate::error::{ErrorBody, ErrorCode, ErrorObject};

/// The document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "creditgate",
        description = "A metering gateway in front of AI backends: prepaid credits are charged per request \
            and refunded when the backend fails. The public listener serves the metered AI routes (and proxies \
            every other route free of charge), the customer API (`/v1/credits…`, `/v1/jobs/…`) and the \
            dashboard; the admin listener serves `/admin/v1/…`, `/metrics`, `/healthz` and `/readyz`. Every \
            error is `{\"error\": {\"type\", \"message\", …}}` with a `type` from `ErrorCode`; each operation \
            lists the codes it can answer. Any path answers a method it does not take with 405 \
            `method_not_allowed`; `forbidden` (403) is reserved."
    ),
    paths(
        chat_completions,
        leads_enrich,
        campaigns_generate,
        calls_transcribe,
        insights_position,
        insights_competitive,
        leads_score,
        icebreakers,
        sentiment,
        crate::api::credits,
        crate::api::packages,
        crate::api::usage,
        crate::api::topups,
        crate::api::set_auto_topup,
        crate::api::job,
        crate::billing::checkout,
        crate::billing::webhook,
        crate::dashboard::page,
        crate::admin::create_account,
        crate::admin::read_account,
        crate::admin::update_account,
        crate::admin::create_key,
        crate::admin::list_keys,
        crate::admin::revoke_key,
        crate::admin::create_topup,
        crate::admin::list_topups,
        crate::admin::set_auto_topup,
        crate::admin::ledger,
        crate::admin::usage,
        crate::admin::running_config,
        crate::admin::healthz,
        crate::admin::ready,
        crate::admin::metrics,
        openapi_json,
    ),
    components(schemas(ErrorBody, ErrorObject, ErrorCode, JobQueued)),
    modifiers(&SecuritySchemes),
    tags(
        (name = "metered", description = "AI routes, charged in credits (the shipped price table)"),
        (name = "credits", description = "The caller's balance, usage, packages and auto top-up"),
        (name = "jobs", description = "Requests queued until the account can pay"),
        (name = "billing", description = "Buying top-ups through Stripe (`[billing.stripe]`)"),
        (name = "dashboard", description = "The usage page"),
        (name = "admin", description = "Admin listener: accounts, keys, top-ups (admin token)"),
        (name = "probes", description = "Admin listener, no token: health, readiness, metrics"),
        (name = "document", description = "This document, on both listeners"),
    )
)]
pub struct ApiDoc;

/// Bearer schemes: `api_key` (public listener) and `admin_token` (admin listener).
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        let bearer = |what: &str| {
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).description(Some(what)).build())
        };
        components.add_security_scheme(
            "api_key",
            bearer("`Authorization: Bearer cg_…`: an API key of the account (public listener)"),
        );
        components.add_security_scheme(
            "admin_token",
            bearer("`Authorization: Bearer <admin token>`: the token `server.admin_token_env` names (admin listener)"),
        );
    }
}

/// The document as JSON, rendered once.
pub static DOCUMENT: LazyLock<String> =
    LazyLock::new(|| ApiDoc::openapi().to_pretty_json().expect("the OpenAPI document serialises"));

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "document",
    responses((status = 200, description = "The OpenAPI 3.1 document of both listeners", body = serde_json::Value)))]
pub async fn openapi_json() -> Response {
    serve().await
}

/// `GET /openapi.json` on either listener.
pub async fn serve() -> Response {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], DOCUMENT.as_str()).into_response()
}

// === answers many operations share ===

/// The refusals of every customer API operation besides its own: its API key (the `Principal`
/// extractor, which also spends the plan's rate limit) and the store.
#[derive(IntoResponses)]
#[allow(dead_code)] // only its responses are used
pub(crate) enum CustomerRefusals {
    /// `unauthorized`: no, unknown or revoked API key, or its account is gone
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// `rate_limited`: the plan's requests per second (shared with the metered routes), or too many failed keys from this address
    #[response(status = 429, headers(("retry-after" = u64, description = "Seconds to wait")))]
    RateLimited(ErrorBody),
    /// `store_unavailable`
    #[response(status = 503, headers(("retry-after" = u64, description = "Seconds to wait")))]
    StoreUnavailable(ErrorBody),
}

/// The refusals of every `/admin/…` operation besides its own: the admin token and the store.
#[derive(IntoResponses)]
#[allow(dead_code)] // only its responses are used
pub(crate) enum AdminRefusals {
    /// `unauthorized`: no or wrong admin token
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// `rate_limited`: too many failed tokens from this address
    #[response(status = 429, headers(("retry-after" = u64, description = "Seconds to wait")))]
    RateLimited(ErrorBody),
    /// `store_unavailable`
    #[response(status = 503, headers(("retry-after" = u64, description = "Seconds to wait")))]
    StoreUnavailable(ErrorBody),
}

/// The refusals of every operation that reads a JSON body (`extract::JsonBody`).
#[derive(IntoResponses)]
#[allow(dead_code)] // only its responses are used
pub(crate) enum BodyRefusals {
    /// `request_timeout`: the body stopped arriving
    #[response(status = 408)]
    RequestTimeout(ErrorBody),
    /// `payload_too_large`: bodies up to 64 KiB
    #[response(status = 413)]
    PayloadTooLarge(ErrorBody),
}

/// `202` of a metered route whose operation queues when credits run out (`on_empty = "queue"`).
#[derive(Debug, Serialize, ToSchema)]
pub struct JobQueued {
    /// Poll `GET /v1/jobs/{job_id}` (also the `Location` header).
    pub job_id: String,
    /// `queued`.
    pub status: String,
    /// The account's queued requests, this one included.
    pub queue_depth: u64,
}

// === the metered routes (proxy path stubs) ===

/// One path stub per metered route: the request is forwarded to the backend and charged; the
/// answers are the backend's (with the `x-credits-*` headers) or the gateway's own errors.
macro_rules! metered_route {
    ($name:ident, $path:literal, $what:literal $(, [$($param:tt)*])? $(,)?) => {
        #[doc = $what]
        #[utoipa::path(post, path = $path, tag = "metered", security(("api_key" = [])),
            params(
                ("idempotency-key" = Option<String>, Header, description = "1–255 characters: within 24 h the same key runs and is charged at most once; repeats get the stored answer"),
                $($($param)*)?
            ),
            request_body(content = serde_json::Value, description = "The backend's request, forwarded as it is; the pricing fields are read from it"),
            responses(
                (status = 200, description = "The backend's answer, streamed; charged", headers(
                    ("x-credits-charged" = String, description = "Credits this request cost (0 on an idempotent replay)"),
                    ("x-credits-remaining" = String, description = "Monthly + top-up credits after this charge"),
                    ("x-credits-low" = String, description = "`true` when the remaining is below 10 % of the monthly allocation"),
                    ("x-idempotent-replay" = String, description = "`true` on an answer replayed for an Idempotency-Key"),
                ), content(
                    (serde_json::Value = "application/json"),
                    (String = "text/event-stream"),
                )),
                (status = 202, description = "Out of credits and the operation queues (`on_empty = \"queue\"`): queued until the account can pay", body = JobQueued,
                    headers(("location" = String, description = "`/v1/jobs/{id}`"))),
                (status = 400, description = "`bad_request` (unknown tier, unreadable pricing field, refused path), `tier_mismatch`, `ambiguous_body`", body = ErrorBody),
                (status = 401, description = "`unauthorized`", body = ErrorBody),
                (status = 402, description = "`no_credits` (with `renews_at`), `insufficient_credits` (with `required`, `remaining`)", body = ErrorBody),
                (status = 408, description = "`request_timeout`", body = ErrorBody),
                (status = 409, description = "`idempotency_conflict`, `idempotency_in_progress` (with `Retry-After`), `idempotency_key_reused`", body = ErrorBody,
                    headers(("retry-after" = String, description = "Seconds to wait (`idempotency_in_progress`)"))),
                (status = 413, description = "`payload_too_large`", body = ErrorBody),
                (status = 415, description = "`unsupported_media_type`: a body the gateway cannot price (e.g. compressed)", body = ErrorBody),
                (status = 429, description = "`rate_limited`: the plan's rate, or too many queued", body = ErrorBody,
                    headers(("retry-after" = String, description = "Seconds to wait"))),
                (status = 502, description = "`upstream_unavailable`: refunded when it never reached the backend", body = ErrorBody),
                (status = 503, description = "`store_unavailable`, or `upstream_busy`: every backend at its `max_in_flight`, nothing sent or charged", body = ErrorBody, headers(("retry-after" = String, description = "Seconds to wait"))),
                (status = 504, description = "`upstream_timeout`", body = ErrorBody),
                (status = "default", description = "Any other status is the backend's own answer, passed through (a 5xx is refunded as the operation's `refund_on` says)"),
            ))]
        #[allow(dead_code)]
        fn $name() {}
    };
}

metered_route!(
    chat_completions,
    "/v1/chat/completions",
    "AI chat (`ai_chat`): 1, 3 or 5 credits by tier (`fast`, `balanced` (default), `powerful`), from `x-ai-tier`, else the body's `tier`, else the body's `model` naming a tier.",
    [("x-ai-tier" = Option<String>, Header, description = "The tier; must agree with a body `tier`")]
);
metered_route!(
    leads_enrich,
    "/v1/leads/enrich",
    "Lead enrichment (`lead_enrichment`): 1 credit per lead in the body's `leads` array."
);
metered_route!(
    campaigns_generate,
    "/v1/campaigns/generate",
    "Campaign generation (`campaign_generation`): 3 to 10 credits, from the body's `steps`, `variants` and `channels`."
);
metered_route!(
    calls_transcribe,
    "/v1/calls/transcribe",
    "Call transcription (`call_transcription`): 2 credits per call; queued (202) rather than refused when credits run out."
);
metered_route!(insights_position, "/v1/insights/position", "Positioning insights (`insights_position`): 5 credits.");
metered_route!(
    insights_competitive,
    "/v1/insights/competitive",
    "Competitive insights (`insights_competitive`): 5 credits."
);
metered_route!(
    leads_score,
    "/v1/leads/score",
    "Lead scoring refresh (`lead_scoring_refresh`): 1 credit per lead; free for a `system` key sending `x-trigger: automatic`.",
    [("x-trigger" = Option<String>, Header, description = "`automatic` (from a `system` key): free")]
);
metered_route!(icebreakers, "/v1/icebreakers", "Icebreakers (`icebreaker`): 1 credit per lead in the body's `leads`.");
metered_route!(sentiment, "/v1/sentiment", "Sentiment analysis (`sentiment_analysis`): 1 credit per conversation.");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_bounds_in_the_document_are_the_ledgers() {
        let doc: serde_json::Value = serde_json::from_str(&DOCUMENT).unwrap();
        let schemas = &doc["components"]["schemas"];
        for (schema, field) in [("AutoTopupBody", "threshold"), ("CreateTopup", "credits")] {
            let max = &schemas[schema]["properties"][field]["maximum"];
            assert_eq!(max.as_u64(), Some(crate::ledger::MAX_CREDITS), "{schema}.{field}: {max}");
        }
    }

    #[test]
    fn the_document_is_openapi_3_1_with_every_error_code() {
        let doc: serde_json::Value = serde_json::from_str(&DOCUMENT).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1."), "{}", doc["openapi"]);
        let codes = &doc["components"]["schemas"]["ErrorCode"]["enum"];
        for code in ErrorCode::ALL {
            assert!(codes.as_array().unwrap().iter().any(|c| c == code.as_str()), "{} missing: {codes}", code.as_str());
        }
    }
}
