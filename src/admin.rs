//! The admin listener (SPEC §5): account and key management behind the admin token, plus the
//! token-free probes `/healthz`, `/readyz` and `/metrics`, and the API document `/openapi.json`.
//! Each handler returns a typed body whose `ToSchema` the document (`openapi.rs`) is made from.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Query};
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use subtle::ConstantTimeEq;
use utoipa::ToSchema;

use crate::api::{AutoTopupBody, Credits, EARLIER_PERIODS, Topups, UsageReport, topup_history};
use crate::auth::{bearer, generate_key};
use crate::calendar::{now, parse_rfc3339, rfc3339};
use crate::error::{ErrorBody, GatewayError};
use crate::extract::{JsonBody, PathParam};
use crate::ledger::jobs::JobStore;
use crate::ledger::{
    HistoryEntry, KeyRecord, Ledger, MAX_CREDITS, NewAccount, PlanChange, PlanOutcome, Role, TopupOutcome,
    TopupReceipt, TopupRequest,
};
use crate::openapi::{AdminRefusals, BodyRefusals};
use crate::proxy::headers::client_ip;
use crate::state::AppState;

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
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(crate::openapi::serve))
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
#[utoipa::path(get, path = "/admin/v1/config", tag = "admin", security(("admin_token" = [])),
    responses(
        AdminRefusals,
        (status = 200, description = "The running configuration", body = RunningConfig),
    ))]
pub(crate) async fn running_config(State(state): State<AppState>) -> axum::Json<Value> {
    axum::Json(crate::running::view(&state.runtime.load(), state.config_path.as_deref()))
}

/// `GET /admin/v1/config`. Only the document uses this type: `running::view` builds the answer,
/// whose `config` mirrors the TOML tree and so is described as an object.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct RunningConfig {
    /// `sha256:<hex>` of the config.
    hash: String,
    /// When it was loaded.
    #[schema(format = DateTime)]
    loaded_at: String,
    /// The file it came from, if any.
    file: Option<String>,
    /// Each upstream's backends (URLs with credentials redacted): health and requests in flight.
    #[schema(value_type = Object)]
    upstreams: Value,
    /// The configuration, secrets redacted.
    #[schema(value_type = Object)]
    config: Value,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "probes", responses((status = 200, description = "Alive", body = Health)))]
pub(crate) async fn healthz() -> Json<Health> {
    Json(Health { status: "ok".into(), store: None })
}

/// `/healthz` and `/readyz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok` (`/healthz`), `ready` or `unavailable` (`/readyz`).
    pub status: String,
    /// The store kind (`/readyz`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
}

/// Readiness: the store answers.
#[utoipa::path(get, path = "/readyz", tag = "probes", responses(
    (status = 200, description = "Ready", body = Health),
    (status = 503, description = "The store does not answer", body = Health),
))]
pub(crate) async fn ready(State(state): State<AppState>) -> Response {
    match state.ledger.ping().await {
        Ok(()) => Json(Health { status: "ready".into(), store: Some(state.ledger.kind().into()) }).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness: store check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(Health { status: "unavailable".into(), store: Some(state.ledger.kind().into()) }),
            )
                .into_response()
        }
    }
}

/// Account ids: 1–64 of `[A-Za-z0-9._-]` (no braces: they would break Redis hash tags).
pub fn valid_account_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Body of `POST /admin/v1/accounts`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateAccount {
    /// 1–64 of `[A-Za-z0-9._-]`.
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    id: String,
    /// A configured plan.
    plan: String,
    /// RFC 3339; defaults to now.
    #[schema(format = DateTime)]
    billing_anchor: Option<String>,
    /// Contact e-mail.
    email: Option<String>,
}

/// Creates an account (the billing anchor defaults to now).
#[utoipa::path(post, path = "/admin/v1/accounts", tag = "admin", security(("admin_token" = [])),
    request_body = CreateAccount,
    responses(
        AdminRefusals, BodyRefusals,
        (status = 201, description = "Created", body = AccountDetails),
        (status = 400, description = "`bad_request`: bad JSON, id, plan, anchor or e-mail", body = ErrorBody),
        (status = 409, description = "`conflict`: an account with that id exists", body = ErrorBody),
    ))]
pub(crate) async fn create_account(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<CreateAccount>,
) -> Result<(StatusCode, Json<AccountDetails>), GatewayError> {
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

/// An account: its balance (as `GET /v1/credits`) and its admin fields.
#[utoipa::path(get, path = "/admin/v1/accounts/{id}", tag = "admin", security(("admin_token" = [])),
    params(("id" = String, Path, description = "Account id: 1–64 of `[A-Za-z0-9._-]`")),
    responses(
        AdminRefusals,
        (status = 200, description = "The account", body = AccountDetails),
        (status = 404, description = "`not_found`: no such account", body = ErrorBody),
    ))]
pub(crate) async fn read_account(
    State(state): State<AppState>,
    PathParam(id): PathParam<String>,
) -> Result<Json<AccountDetails>, GatewayError> {
    account_json(&state, &id).await
}

async fn account_json(state: &AppState, id: &str) -> Result<Json<AccountDetails>, GatewayError> {
    // Two reads, the queue first: a job that left the queue was charged before it did, so the
    // balance read after it shows that charge (read the other way round, a job could run
    // between the reads and be in neither figure).
    let queue_depth = state.ledger.queue_depth(id).await?;
    let view = state.ledger.account(id).await?.ok_or_else(|| no_account(id))?;
    let credits = Credits::of(&view, &state.runtime.load());
    Ok(Json(AccountDetails { credits, id: view.id, email: view.email, pending_plan: view.pending_plan, queue_depth }))
}

/// An account as the admin API shows it: the fields of `GET /v1/credits` and its own.
#[derive(Debug, Serialize, ToSchema)]
pub struct AccountDetails {
    /// The balance.
    #[serde(flatten)]
    pub credits: Credits,
    /// Account id.
    pub id: String,
    /// Contact e-mail.
    pub email: Option<String>,
    /// Plan that takes effect at the next renewal (a downgrade).
    pub pending_plan: Option<String>,
    /// Requests queued for credits.
    pub queue_depth: u64,
}

fn no_account(id: &str) -> GatewayError {
    GatewayError::NotFound(format!("No account with id \"{id}\"."))
}

/// Body of `POST /admin/v1/accounts/{id}/keys`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateKey {
    /// `user`, or `system` (may trigger free automatic refreshes).
    #[schema(value_type = KeyRole)]
    role: Role,
}

/// Role of an API key.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)] // the schema of `Role` (ledger/), which this module does not own
pub(crate) enum KeyRole {
    /// A customer's user or app.
    User,
    /// The customer's own automation.
    System,
}

/// A new API key: the plaintext `key` is shown only here.
#[derive(Debug, Serialize, ToSchema)]
pub struct NewKey {
    /// Its id (for revoking).
    pub key_id: String,
    /// The plaintext key, `cg_…`.
    pub key: String,
    /// Its role.
    #[schema(value_type = KeyRole)]
    pub role: Role,
    /// The first characters, for recognising it in lists.
    pub prefix: String,
}

/// A new API key for the account.
#[utoipa::path(post, path = "/admin/v1/accounts/{id}/keys", tag = "admin", security(("admin_token" = [])),
    params(("id" = String, Path, description = "Account id: 1–64 of `[A-Za-z0-9._-]`")),
    request_body = CreateKey,
    responses(
        AdminRefusals, BodyRefusals,
        (status = 201, description = "Created; the plaintext key is shown only now", body = NewKey),
        (status = 400, description = "`bad_request`: bad JSON or role", body = ErrorBody),
        (status = 404, description = "`not_found`: no such account", body = ErrorBody),
    ))]
pub(crate) async fn create_key(
    State(state): State<AppState>,
    PathParam(id): PathParam<String>,
    JsonBody(body): JsonBody<CreateKey>,
) -> Result<(StatusCode, Json<NewKey>), GatewayError> {
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
    Ok((StatusCode::CREATED, Json(NewKey { key_id: k.key_id, key: k.key, role: body.role, prefix: k.prefix })))
}

/// Body of `POST /admin/v1/accounts/{id}/topups`: exactly one of `package` and `credits`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateTopup {
    /// A configured package.
    package: Option<String>,
    /// Credits, 1 to 1,000,000,000.
    #[schema(minimum = 1, maximum = 1_000_000_000)] // MAX_CREDITS (a test compares them)
    credits: Option<u64>,
    /// 1–255 characters; the same reference credits once.
    #[schema(min_length = 1, max_length = 255)]
    payment_ref: String,
}

/// Adds top-up credits; the same `payment_ref` credits once.
#[utoipa::path(post, path = "/admin/v1/accounts/{id}/topups", tag = "admin", security(("admin_token" = [])),
    params(("id" = String, Path, description = "Account id: 1–64 of `[A-Za-z0-9._-]`")),
    request_body = CreateTopup,
    responses(
        AdminRefusals, BodyRefusals,
        (status = 200, description = "That payment_ref was credited before: the first result, nothing added", body = TopupReceiptView),
        (status = 201, description = "Credited", body = TopupReceiptView),
        (status = 400, description = "`bad_request`: bad JSON, package, credits or payment_ref", body = ErrorBody),
        (status = 404, description = "`not_found`: no such account", body = ErrorBody),
    ))]
pub(crate) async fn create_topup(
    State(state): State<AppState>,
    PathParam(id): PathParam<String>,
    JsonBody(body): JsonBody<CreateTopup>,
) -> Result<(StatusCode, Json<TopupReceiptView>), GatewayError> {
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

fn topup_json(account: &str, r: &TopupReceipt) -> Json<TopupReceiptView> {
    Json(TopupReceiptView {
        account_id: account.to_owned(),
        payment_ref: r.payment_ref.clone(),
        package: r.package.clone(),
        credits: r.credits,
        topup_remaining: r.topup_remaining,
        created_at: rfc3339(r.created_at),
    })
}

/// A recorded top-up.
#[derive(Debug, Serialize, ToSchema)]
pub struct TopupReceiptView {
    /// The account credited.
    pub account_id: String,
    /// Its payment reference.
    pub payment_ref: String,
    /// Package, when bought as one.
    pub package: Option<String>,
    /// Credits added.
    pub credits: u64,
    /// Top-up bucket right after it.
    pub topup_remaining: u64,
    /// When it was credited.
    #[schema(format = DateTime)]
    pub created_at: String,
}

/// Body of `PATCH /admin/v1/accounts/{id}`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdateAccount {
    /// A configured plan: an upgrade at once, a downgrade at the next renewal.
    plan: Option<String>,
    /// Contact e-mail.
    email: Option<String>,
}

/// The account after `PATCH`, with what a plan change did.
#[derive(Debug, Serialize, ToSchema)]
pub struct UpdatedAccount {
    /// The account now.
    #[serde(flatten)]
    pub account: AccountDetails,
    /// `upgraded`, `downgrade_scheduled` or `unchanged`; `null` when no plan was sent.
    pub plan_change: Option<PlanChangeOutcome>,
}

/// What a plan change did.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PlanChangeOutcome {
    /// The new allocation applies now.
    Upgraded,
    /// The new plan starts at the next renewal.
    DowngradeScheduled,
    /// Same plan.
    Unchanged,
}

/// Changes an account's plan or e-mail.
#[utoipa::path(patch, path = "/admin/v1/accounts/{id}", tag = "admin", security(("admin_token" = [])),
    params(("id" = String, Path, description = "Account id: 1–64 of `[A-Za-z0-9._-]`")),
    request_body = UpdateAccount,
    responses(
        AdminRefusals, BodyRefusals,
        (status = 200, description = "The account now", body = UpdatedAccount),
        (status = 400, description = "`bad_request`: bad JSON, plan or e-mail", body = ErrorBody),
        (status = 404, description = "`not_found`: no such account", body = ErrorBody),
    ))]
pub(crate) async fn update_account(
    State(state): State<AppState>,
    PathParam(id): PathParam<String>,
    JsonBody(body): JsonBody<UpdateAccount>,
) -> Result<Json<UpdatedAccount>, GatewayError> {
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
    let Json(account) = account_json(&state, &id).await?;
    let plan_change = match (change, outcome) {
        (None, _) => None,
        (Some(_), PlanOutcome::Upgraded) => Some(PlanChangeOutcome::Upgraded),
        (Some(_), PlanOutcome::DowngradeScheduled) => Some(PlanChangeOutcome::DowngradeScheduled),
        (Some(_), PlanOutcome::Unchanged) => Some(PlanChangeOutcome::Unchanged),
    };
    tracing::info!(account = %id, plan = ?body.plan, outcome = ?plan_change, "account updated");
    Ok(Json(UpdatedAccount { account, plan_change }))
}

/// The account's API keys (never their plaintext).
#[utoipa::path(get, path = "/admin/v1/accounts/{id}/keys", tag = "admin", security(("admin_token" = [])),
    params(("id" = String, Path, description = "Account id: 1–64 of `[A-Za-z0-9._-]`")),
    responses(
        AdminRefusals,
        (status = 200, description = "The keys", body = KeyList),
        (status = 404, description = "`not_found`: no such account", body = ErrorBody),
    ))]
pub(crate) async fn list_keys(
    State(state): State<AppState>,
    PathParam(id): PathParam<String>,
) -> Result<Json<KeyList>, GatewayError> {
    state.ledger.account(&id).await?.ok_or_else(|| no_account(&id))?;
    let keys = state
        .ledger
        .list_keys(&id)
        .await?
        .into_iter()
        .map(|k| KeyInfo { key_id: k.key_id, prefix: k.prefix, role: k.role, created_at: rfc3339(k.created_at) })
        .collect();
    Ok(Json(KeyList { keys }))
}

/// An account's keys.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    /// Its keys.
    pub keys: Vec<KeyInfo>,
}

/// An API key, without its plaintext.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyInfo {
    /// Its id.
    pub key_id: String,
    /// Its first characters.
    pub prefix: String,
    /// Its role.
    #[schema(value_type = KeyRole)]
    pub role: Role,
    /// When it was created.
    #[schema(format = DateTime)]
    pub created_at: String,
}

/// Revokes a key (effective on every instance within 5 s).
#[utoipa::path(delete, path = "/admin/v1/keys/{key_id}", tag = "admin", security(("admin_token" = [])),
    params(("key_id" = String, Path, description = "The key's `key_id`")),
    responses(
        AdminRefusals,
        (status = 200, description = "Revoked", body = RevokedKey),
        (status = 404, description = "`not_found`: no such key", body = ErrorBody),
    ))]
pub(crate) async fn revoke_key(
    State(state): State<AppState>,
    PathParam(key_id): PathParam<String>,
) -> Result<Json<RevokedKey>, GatewayError> {
    let record = state
        .ledger
        .revoke_key(&key_id)
        .await?
        .ok_or_else(|| GatewayError::NotFound(format!("No key with id \"{key_id}\".")))?;
    state.keys.forget_key_id(&key_id);
    tracing::info!(account = %record.account, key_id = %key_id, "API key revoked");
    Ok(Json(RevokedKey { key_id, account_id: record.account, revoked: true }))
}

/// A revoked key.
#[derive(Debug, Serialize, ToSchema)]
pub struct RevokedKey {
    /// Its id.
    pub key_id: String,
    /// Its account.
    pub account_id: String,
    /// Always `true`.
    pub revoked: bool,
}

/// The account's top-ups and auto top-ups, newest first.
#[utoipa::path(get, path = "/admin/v1/accounts/{id}/topups", tag = "admin", security(("admin_token" = [])),
    params(("id" = String, Path, description = "Account id: 1–64 of `[A-Za-z0-9._-]`")),
    responses(
        AdminRefusals,
        (status = 200, description = "The top-ups", body = Topups),
        (status = 404, description = "`not_found`: no such account", body = ErrorBody),
    ))]
pub(crate) async fn list_topups(
    State(state): State<AppState>,
    PathParam(id): PathParam<String>,
) -> Result<Json<Topups>, GatewayError> {
    Ok(Json(Topups { topups: topup_history(&state, &id).await? }))
}

/// Sets an account's auto top-up.
#[utoipa::path(put, path = "/admin/v1/accounts/{id}/auto-topup", tag = "admin", security(("admin_token" = [])),
    params(("id" = String, Path, description = "Account id: 1–64 of `[A-Za-z0-9._-]`")),
    request_body = AutoTopupBody,
    responses(
        AdminRefusals, BodyRefusals,
        (status = 200, description = "The account now", body = AccountDetails),
        (status = 400, description = "`bad_request`: bad JSON, no threshold or package to enable, unknown package", body = ErrorBody),
        (status = 404, description = "`not_found`: no such account", body = ErrorBody),
    ))]
pub(crate) async fn set_auto_topup(
    State(state): State<AppState>,
    PathParam(id): PathParam<String>,
    JsonBody(body): JsonBody<AutoTopupBody>,
) -> Result<Json<AccountDetails>, GatewayError> {
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

/// Every balance change of the account, newest first, a page at a time.
#[utoipa::path(get, path = "/admin/v1/accounts/{id}/ledger", tag = "admin", security(("admin_token" = [])),
    params(("id" = String, Path, description = "Account id: 1–64 of `[A-Za-z0-9._-]`"),
        ("limit" = Option<u64>, Query, description = "Entries per page, 1 to 500 (default 100; larger values are capped)"),
        ("before" = Option<u64>, Query, description = "Only entries with `seq` below this: the `next_before` of the previous page")),
    responses(
        AdminRefusals,
        (status = 200, description = "A page of the history", body = LedgerPage),
        (status = 400, description = "`bad_request`: bad `limit` or `before`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such account", body = ErrorBody),
    ))]
pub(crate) async fn ledger(
    State(state): State<AppState>,
    PathParam(id): PathParam<String>,
    uri: http::Uri,
) -> Result<Json<LedgerPage>, GatewayError> {
    let Query(page) = Query::<Page>::try_from_uri(&uri)
        .map_err(|_| GatewayError::BadRequest("Use ?limit=N (1 to 500) and ?before=SEQ, whole numbers.".into()))?;
    let limit = page.limit.unwrap_or(100).clamp(1, MAX_PAGE);
    let entries = state.ledger.history(&id, page.before, limit).await?.ok_or_else(|| no_account(&id))?;
    let next = entries.last().filter(|e| entries.len() == limit && e.seq > 1).map(|e| e.seq);
    let entries = entries.iter().map(LedgerEntry::of).collect();
    Ok(Json(LedgerPage { account_id: id, entries, next_before: next }))
}

/// A page of an account's history.
#[derive(Debug, Serialize, ToSchema)]
pub struct LedgerPage {
    /// The account.
    pub account_id: String,
    /// Newest first.
    pub entries: Vec<LedgerEntry>,
    /// `before` for the next page; `null` on the last.
    pub next_before: Option<u64>,
}

/// One balance change ([`HistoryEntry`] with its time in RFC 3339).
#[derive(Debug, Serialize, ToSchema)]
pub struct LedgerEntry {
    /// Position in the account's history, from 1.
    pub seq: u64,
    /// `created`, `charge`, `refund`, `topup`, `auto_topup`, `auto_topup_reversed`, `renewal` or `plan_change`.
    pub kind: String,
    /// When.
    #[schema(format = DateTime)]
    pub at: String,
    /// Change of the monthly bucket.
    pub monthly_delta: i64,
    /// Change of the top-up bucket.
    pub topup_delta: i64,
    /// Monthly bucket after the change.
    pub monthly_after: u64,
    /// Top-up bucket after the change.
    pub topup_after: u64,
    /// Operation, for charges and refunds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    /// Category, for charges and refunds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// Request id, for charges.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Charge id, for charges and refunds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub charge_id: Option<String>,
    /// Payment reference, for top-ups.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payment_ref: Option<String>,
    /// Package, for top-ups.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub package: Option<String>,
    /// Plan after the change, for created / renewal / plan_change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
}

impl LedgerEntry {
    fn of(e: &HistoryEntry) -> Self {
        LedgerEntry {
            seq: e.seq,
            kind: e.kind.clone(),
            at: rfc3339(e.at),
            monthly_delta: e.monthly_delta,
            topup_delta: e.topup_delta,
            monthly_after: e.monthly_after,
            topup_after: e.topup_after,
            operation: e.operation.clone(),
            category: e.category.clone(),
            request_id: e.request_id.clone(),
            charge_id: e.charge_id.clone(),
            payment_ref: e.payment_ref.clone(),
            package: e.package.clone(),
            plan: e.plan.clone(),
        }
    }
}

/// The account's usage report (as `GET /v1/credits/usage`).
#[utoipa::path(get, path = "/admin/v1/accounts/{id}/usage", tag = "admin", security(("admin_token" = [])),
    params(("id" = String, Path, description = "Account id: 1–64 of `[A-Za-z0-9._-]`")),
    responses(
        AdminRefusals,
        (status = 200, description = "The usage report", body = UsageReport),
        (status = 404, description = "`not_found`: no such account", body = ErrorBody),
    ))]
pub(crate) async fn usage(
    State(state): State<AppState>,
    PathParam(id): PathParam<String>,
) -> Result<Json<UsageReport>, GatewayError> {
    let usage = state.ledger.usage(&id, EARLIER_PERIODS).await?.ok_or_else(|| no_account(&id))?;
    Ok(Json(UsageReport::of(&usage, &state.runtime.load())))
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

/// Prometheus metrics (OpenMetrics text).
#[utoipa::path(get, path = "/metrics", tag = "probes", responses(
    (status = 200, description = "The metrics", body = String, content_type = "application/openmetrics-text"),
))]
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
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
