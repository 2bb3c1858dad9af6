//! The admin listener (SPEC §5): account and key management behind the admin token, plus the
//! token-free probes `/healthz` and `/readyz`.

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use crate::api::credits_json;
use crate::auth::{bearer, generate_key};
use crate::calendar::{parse_rfc3339, rfc3339};
use crate::error::GatewayError;
use crate::extract::JsonBody;
use crate::ledger::{KeyRecord, Ledger, NewAccount, Role, TopupOutcome, TopupReceipt, TopupRequest};
use crate::state::AppState;

type Json = axum::Json<Value>;

/// The admin router: `/admin/…` behind the token, probes open.
pub fn router(state: AppState) -> Router {
    let admin = Router::new()
        .route("/admin/v1/accounts", post(create_account))
        .route("/admin/v1/accounts/{id}", get(read_account))
        .route("/admin/v1/accounts/{id}/keys", post(create_key))
        .route("/admin/v1/accounts/{id}/topups", post(create_topup))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin));
    Router::new()
        .route("/healthz", get(|| async { axum::Json(json!({"status": "ok"})) }))
        .route("/readyz", get(ready))
        .merge(admin)
        .fallback(|| async { GatewayError::NotFound("No such admin route.".into()) })
        .with_state(state)
}

async fn require_admin(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let token = state.admin_token.as_deref().unwrap_or_default().as_bytes();
    let given = bearer(req.headers()).unwrap_or_default().as_bytes();
    if token.is_empty() || !bool::from(token.ct_eq(given)) {
        return GatewayError::Unauthorized("This admin route needs `Authorization: Bearer <admin token>`.".into())
            .into_response();
    }
    next.run(req).await
}

async fn ready(State(state): State<AppState>) -> Response {
    match state.ledger.ping().await {
        Ok(()) => axum::Json(json!({"status": "ready", "store": state.ledger.kind()})).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness: store check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(json!({"status": "unavailable", "store": state.ledger.kind()})),
            )
                .into_response()
        }
    }
}

/// Account ids: 1–64 of `[A-Za-z0-9._-]` (no braces: they would break Redis hash tags).
pub fn valid_account_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateAccount {
    id: String,
    plan: String,
    billing_anchor: Option<String>,
    email: Option<String>,
}

async fn create_account(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<CreateAccount>,
) -> Result<(StatusCode, Json), GatewayError> {
    if !valid_account_id(&body.id) {
        return Err(GatewayError::BadRequest(
            "Account ids are 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-'.".into(),
        ));
    }
    let allocation = {
        let rt = state.runtime.load();
        let plan = rt.config.plans.get(&body.plan).ok_or_else(|| {
            let known: Vec<&str> = rt.config.plans.keys().map(String::as_str).collect();
            GatewayError::BadRequest(format!("Unknown plan \"{}\"; use one of: {}.", body.plan, known.join(", ")))
        })?;
        plan.monthly_credits
    };
    let anchor = match &body.billing_anchor {
        Some(text) => parse_rfc3339(text).ok_or_else(|| {
            GatewayError::BadRequest(format!(
                "billing_anchor {text:?} is not an RFC 3339 time like 2026-12-15T09:00:00Z."
            ))
        })?,
        None => now(),
    };
    if let Some(email) = &body.email
        && (!email.contains('@') || email.len() > 254)
    {
        return Err(GatewayError::BadRequest(format!("{email:?} is not an e-mail address.")));
    }
    let new = NewAccount { id: body.id.clone(), plan: body.plan, allocation, anchor, email: body.email };
    if !state.ledger.create_account(new).await? {
        return Err(GatewayError::Conflict(format!("An account with id \"{}\" exists already.", body.id)));
    }
    tracing::info!(account = %body.id, "account created");
    Ok((StatusCode::CREATED, account_json(&state, &body.id).await?))
}

async fn read_account(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json, GatewayError> {
    account_json(&state, &id).await
}

async fn account_json(state: &AppState, id: &str) -> Result<Json, GatewayError> {
    let view = state.ledger.account(id).await?.ok_or_else(|| no_account(id))?;
    let mut m = credits_json(&view, &state.runtime.load());
    m.insert("id".into(), json!(view.id));
    m.insert("email".into(), json!(view.email));
    m.insert("pending_plan".into(), json!(view.pending_plan));
    m.insert("queue_depth".into(), json!(0));
    Ok(axum::Json(Value::Object(m)))
}

fn no_account(id: &str) -> GatewayError {
    GatewayError::NotFound(format!("No account with id \"{id}\"."))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    role: Role,
}

async fn create_key(
    State(state): State<AppState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<CreateKey>,
) -> Result<(StatusCode, Json), GatewayError> {
    let k = generate_key();
    let record = KeyRecord {
        key_id: k.key_id.clone(),
        account: id.clone(),
        role: body.role,
        hash: k.hash,
        prefix: k.prefix.clone(),
        created_at: now(),
    };
    if !state.ledger.create_key(record).await? {
        return Err(no_account(&id));
    }
    tracing::info!(account = %id, key_id = %k.key_id, role = body.role.as_str(), "API key created");
    let body = json!({"key_id": k.key_id, "key": k.key, "role": body.role, "prefix": k.prefix});
    Ok((StatusCode::CREATED, axum::Json(body)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTopup {
    package: Option<String>,
    credits: Option<u64>,
    payment_ref: String,
}

async fn create_topup(
    State(state): State<AppState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<CreateTopup>,
) -> Result<(StatusCode, Json), GatewayError> {
    if body.payment_ref.is_empty() || body.payment_ref.len() > 255 {
        return Err(GatewayError::BadRequest("payment_ref must be 1 to 255 characters.".into()));
    }
    let credits = match (&body.package, body.credits) {
        (Some(name), None) => {
            let rt = state.runtime.load();
            rt.config.topup_packages.get(name).map(|p| p.credits).ok_or_else(|| {
                let known: Vec<&str> = rt.config.topup_packages.keys().map(String::as_str).collect();
                GatewayError::BadRequest(format!("Unknown package \"{name}\"; use one of: {}.", known.join(", ")))
            })?
        }
        (None, Some(c)) if c > 0 => c,
        (None, Some(_)) => return Err(GatewayError::BadRequest("credits must be a positive whole number.".into())),
        _ => return Err(GatewayError::BadRequest("Send exactly one of package or credits.".into())),
    };
    let req = TopupRequest { account: &id, credits, payment_ref: &body.payment_ref, package: body.package.as_deref() };
    match state.ledger.topup(req).await? {
        TopupOutcome::Created(r) => {
            tracing::info!(account = %id, credits, payment_ref = %r.payment_ref, "top-up credited");
            Ok((StatusCode::CREATED, topup_json(&id, &r)))
        }
        TopupOutcome::Duplicate(r) => Ok((StatusCode::OK, topup_json(&id, &r))),
        TopupOutcome::NoAccount => Err(no_account(&id)),
    }
}

fn topup_json(account: &str, r: &TopupReceipt) -> Json {
    axum::Json(json!({
        "account_id": account,
        "payment_ref": r.payment_ref,
        "package": r.package,
        "credits": r.credits,
        "topup_remaining": r.topup_remaining,
        "created_at": rfc3339(r.created_at),
    }))
}

/// Now, Unix seconds.
pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}
