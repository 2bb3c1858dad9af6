//! The admin listener (SPEC §5): account and key management behind the admin token, plus the
//! token-free probes `/healthz` and `/readyz`.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::{ConnectInfo, Query};
use axum::extract::{Path, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use crate::api::{AutoTopupBody, EARLIER_PERIODS, credits_json, topup_history, usage_json};
use crate::auth::{bearer, generate_key};
use crate::calendar::{now, parse_rfc3339, rfc3339};
use crate::error::GatewayError;
use crate::extract::JsonBody;
use crate::ledger::jobs::JobStore;
use crate::ledger::{
    KeyRecord, Ledger, MAX_CREDITS, NewAccount, PlanChange, PlanOutcome, Role, TopupOutcome, TopupReceipt, TopupRequest,
};
use crate::proxy::headers::client_ip;
use crate::state::AppState;

type Json = axum::Json<Value>;

/// The admin router: `/admin/…` behind the token, probes open.
pub fn router(state: AppState) -> Router {
    let admin = Router::new()
        .route("/admin/v1/accounts", post(create_account))
        .route("/admin/v1/accounts/{id}", get(read_account).patch(update_account))
        .route("/admin/v1/accounts/{id}/keys", post(create_key).get(list_keys))
        .route("/admin/v1/keys/{key_id}", delete(revoke_key))
        .route("/admin/v1/accounts/{id}/topups", post(create_topup).get(list_topups))
        .route("/admin/v1/accounts/{id}/auto-topup", put(set_auto_topup))
        .route("/admin/v1/accounts/{id}/ledger", get(ledger))
        .route("/admin/v1/accounts/{id}/usage", get(usage))
        .route("/admin/v1/config", get(running_config))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin));
    Router::new()
        .route("/healthz", get(|| async { axum::Json(json!({"status": "ok"})) }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .merge(admin)
        .fallback(|| async { GatewayError::NotFound("No such admin route.".into()) })
        .method_not_allowed_fallback(|| async { GatewayError::MethodNotAllowed })
        .with_state(state)
}

/// The admin token check. Wrong tokens count against the client's address like failed API keys
/// (`ratelimit.rs`); an address over its allowance is refused before its token is compared, so
/// a guess is refused even when it is right.
async fn require_admin(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let rt = state.runtime.load();
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    let client = client_ip(peer, req.headers(), &rt.config.server.trusted_proxies);
    if let Err(refused) = rt.rate_limits.check_client(client) {
        return refused.into_response();
    }
    let token = state.admin_token.as_deref().unwrap_or_default().as_bytes();
    let given = bearer(req.headers()).unwrap_or_default().as_bytes();
    if token.is_empty() || !bool::from(token.ct_eq(given)) {
        let failure =
            GatewayError::Unauthorized("This admin route needs `Authorization: Bearer <admin token>`.".into());
        return rt.rate_limits.auth_failed(client, failure).into_response();
    }
    drop(rt);
    next.run(req).await
}

/// The config in force, secrets redacted, with its hash, load time and backends (`running.rs`).
async fn running_config(State(state): State<AppState>) -> Json {
    axum::Json(crate::running::view(&state.runtime.load(), state.config_path.as_deref()))
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
    let allocation = plan_allocation(&state, &body.plan)?;
    let anchor = match &body.billing_anchor {
        Some(text) => parse_rfc3339(text).ok_or_else(|| {
            GatewayError::BadRequest(format!(
                "billing_anchor {text:?} is not an RFC 3339 time like 2026-12-15T09:00:00Z."
            ))
        })?,
        None => now(),
    };
    if let Some(email) = &body.email {
        check_email(email)?;
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
    m.insert("queue_depth".into(), json!(state.ledger.queue_depth(id).await?));
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
        (None, Some(c)) if c > 0 && c <= MAX_CREDITS => c,
        (None, Some(_)) => {
            return Err(GatewayError::BadRequest(format!("credits must be a whole number from 1 to {MAX_CREDITS}.")));
        }
        _ => return Err(GatewayError::BadRequest("Send exactly one of package or credits.".into())),
    };
    let req = TopupRequest { account: &id, credits, payment_ref: &body.payment_ref, package: body.package.as_deref() };
    match state.ledger.topup(req).await? {
        TopupOutcome::Created(r) => {
            tracing::info!(account = %id, credits, payment_ref = %r.payment_ref, "top-up credited");
            crate::jobs::wake(&state);
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateAccount {
    plan: Option<String>,
    email: Option<String>,
}

async fn update_account(
    State(state): State<AppState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<UpdateAccount>,
) -> Result<Json, GatewayError> {
    if let Some(email) = &body.email {
        check_email(email)?;
    }
    let allocation = match &body.plan {
        Some(plan) => Some(plan_allocation(&state, plan)?),
        None => None,
    };
    let change = body.plan.as_deref().zip(allocation).map(|(plan, allocation)| PlanChange { plan, allocation });
    let outcome =
        state.ledger.update_account(&id, change, body.email.as_deref()).await?.ok_or_else(|| no_account(&id))?;
    let mut v = account_json(&state, &id).await?;
    let outcome = match (change, outcome) {
        (None, _) => None,
        (Some(_), PlanOutcome::Upgraded) => Some("upgraded"),
        (Some(_), PlanOutcome::DowngradeScheduled) => Some("downgrade_scheduled"),
        (Some(_), PlanOutcome::Unchanged) => Some("unchanged"),
    };
    tracing::info!(account = %id, plan = ?body.plan, outcome, "account updated");
    v.0["plan_change"] = json!(outcome);
    Ok(v)
}

async fn list_keys(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json, GatewayError> {
    state.ledger.account(&id).await?.ok_or_else(|| no_account(&id))?;
    let keys: Vec<Value> = state
        .ledger
        .list_keys(&id)
        .await?
        .into_iter()
        .map(|k| json!({"key_id": k.key_id, "prefix": k.prefix, "role": k.role, "created_at": rfc3339(k.created_at)}))
        .collect();
    Ok(axum::Json(json!({ "keys": keys })))
}

async fn revoke_key(State(state): State<AppState>, Path(key_id): Path<String>) -> Result<Json, GatewayError> {
    let record = state
        .ledger
        .revoke_key(&key_id)
        .await?
        .ok_or_else(|| GatewayError::NotFound(format!("No key with id \"{key_id}\".")))?;
    state.keys.forget_key_id(&key_id);
    tracing::info!(account = %record.account, key_id = %key_id, "API key revoked");
    Ok(axum::Json(json!({"key_id": key_id, "account_id": record.account, "revoked": true})))
}

async fn list_topups(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json, GatewayError> {
    Ok(axum::Json(json!({ "topups": topup_history(&state, &id).await? })))
}

async fn set_auto_topup(
    State(state): State<AppState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<AutoTopupBody>,
) -> Result<Json, GatewayError> {
    let setting = body.into_setting(&state.runtime.load())?;
    if !state.ledger.set_auto_topup(&id, &setting).await? {
        return Err(no_account(&id));
    }
    account_json(&state, &id).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Page {
    before: Option<u64>,
    limit: Option<usize>,
}

/// Most history entries one page returns.
const MAX_PAGE: usize = 500;

async fn ledger(State(state): State<AppState>, Path(id): Path<String>, uri: http::Uri) -> Result<Json, GatewayError> {
    let Query(page) = Query::<Page>::try_from_uri(&uri)
        .map_err(|_| GatewayError::BadRequest("Use ?limit=N (1 to 500) and ?before=SEQ, whole numbers.".into()))?;
    let limit = page.limit.unwrap_or(100).clamp(1, MAX_PAGE);
    let entries = state.ledger.history(&id, page.before, limit).await?.ok_or_else(|| no_account(&id))?;
    let next = entries.last().filter(|e| entries.len() == limit && e.seq > 1).map(|e| e.seq);
    let list: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut v = serde_json::to_value(e).unwrap_or_default();
            v["at"] = json!(rfc3339(e.at));
            v
        })
        .collect();
    Ok(axum::Json(json!({"account_id": id, "entries": list, "next_before": next})))
}

async fn usage(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json, GatewayError> {
    let usage = state.ledger.usage(&id, EARLIER_PERIODS).await?.ok_or_else(|| no_account(&id))?;
    Ok(axum::Json(usage_json(&usage, &state.runtime.load())))
}

fn plan_allocation(state: &AppState, plan: &str) -> Result<u64, GatewayError> {
    let rt = state.runtime.load();
    rt.config.plans.get(plan).map(|p| p.monthly_credits).ok_or_else(|| {
        let known: Vec<&str> = rt.config.plans.keys().map(String::as_str).collect();
        GatewayError::BadRequest(format!("Unknown plan \"{plan}\"; use one of: {}.", known.join(", ")))
    })
}

fn check_email(email: &str) -> Result<(), GatewayError> {
    if email.contains('@') && email.len() <= 254 && !email.chars().any(char::is_whitespace) {
        Ok(())
    } else {
        Err(GatewayError::BadRequest(format!("{email:?} is not an e-mail address.")))
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    // Live tasks of the gateway's runtimes (this handler's and the workers'): a soak run watches
    // it level off.
    let workers = state.workers.get().map_or(0, |w| w.iter().map(|h| h.metrics().num_alive_tasks()).sum());
    let tasks = tokio::runtime::Handle::current().metrics().num_alive_tasks() + workers;
    state.metrics.tasks.set(tasks as i64);
    let (down, downs) = state.ledger.health();
    state.metrics.store_up.set(i64::from(!down));
    state.metrics.store_downs.set(downs as i64);
    let body = state.metrics.render();
    ([(http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body).into_response()
}
