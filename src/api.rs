//! The customer API on the public listener (SPEC §4): balance, usage, packages, top-ups and the
//! auto top-up setting of the caller's own account, and the dashboard page. Every JSON handler
//! authenticates through the [`Principal`] extractor, which also applies the account's plan rate
//! limit (shared with the proxy); no handler takes an account id from the request, so a key can
//! only ever see its own account.

use std::net::SocketAddr;

use axum::Json;
use axum::Router;
use axum::extract::{ConnectInfo, FromRequestParts, Path, State};
use axum::routing::{get, put};
use http::request::Parts;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::auth::Principal;
use crate::calendar::{civil_from_days, rfc3339};
use crate::error::GatewayError;
use crate::extract::JsonBody;
use crate::ledger::jobs::JobStore;
use crate::ledger::{AccountView, AutoTopup, Ledger, MAX_CREDITS, Usage, is_low};
use crate::state::{AppState, Runtime};

/// How many earlier periods `GET /v1/credits/usage` reports.
pub const EARLIER_PERIODS: usize = 6;

/// Routes of the customer API.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/credits", get(credits))
        .route("/v1/credits/packages", get(packages))
        .route("/v1/credits/usage", get(usage))
        .route("/v1/credits/topups", get(topups))
        .route("/v1/credits/auto-topup", put(set_auto_topup))
        .route("/v1/jobs/{id}", get(job))
        .route("/dashboard", get(crate::dashboard::page))
        .merge(crate::billing::router())
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = GatewayError;

    /// Authenticates and spends one request of the account's plan rate limit — the same
    /// allowance its proxied requests draw from.
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
        crate::auth::admit(state, &state.runtime.load(), &parts.headers, peer).await
    }
}

async fn credits(State(state): State<AppState>, principal: Principal) -> Result<Json<Value>, GatewayError> {
    let view = account_of(&state, &principal).await?;
    Ok(Json(Value::Object(credits_json(&view, &state.runtime.load()))))
}

/// The fields of `GET /v1/credits` for an account (also the base of the admin account view).
pub fn credits_json(view: &AccountView, rt: &Runtime) -> Map<String, Value> {
    let remaining = view.remaining();
    let mut messages_left = Map::new();
    if let Some(chat) = rt.rules.operations.iter().find(|o| !o.tier_costs().is_empty()) {
        for (tier, cost) in chat.tier_costs() {
            messages_left.insert(tier.clone(), json!(remaining / cost));
        }
    }
    let fields = json!({
        "plan": view.plan,
        "allocation": view.allocation,
        "monthly_remaining": view.monthly_remaining,
        "topup_remaining": view.topup_remaining,
        "remaining": remaining,
        "used_this_period": view.used_this_period,
        "period_start": rfc3339(view.period_start),
        "renews_at": rfc3339(view.renews_at),
        "low": is_low(remaining, view.allocation),
        "auto_topup": auto_topup_json(view.auto_topup.as_ref()),
        "messages_left": messages_left,
    });
    match fields {
        Value::Object(m) => m,
        _ => unreachable!("json! object"),
    }
}

async fn packages(State(state): State<AppState>, _principal: Principal) -> Json<Value> {
    let rt = state.runtime.load();
    let mut list: Vec<Value> = rt
        .config
        .topup_packages
        .iter()
        .map(|(name, p)| {
            json!({
                "package": name,
                "credits": p.credits,
                "price_eur": p.price_eur,
                "price_per_credit_eur": (p.price_eur / p.credits as f64 * 10_000.0).round() / 10_000.0,
            })
        })
        .collect();
    list.sort_by_key(|p| p["credits"].as_u64());
    // `checkout`: whether `POST /v1/credits/topups/checkout` takes payments (`[billing.stripe]`).
    Json(json!({ "packages": list, "checkout": rt.stripe.is_some() }))
}

fn auto_topup_json(a: Option<&AutoTopup>) -> Value {
    match a {
        Some(a) => json!({"enabled": a.enabled, "threshold": a.threshold, "package": a.package, "credits": a.credits}),
        None => json!({"enabled": false, "threshold": null, "package": null, "credits": null}),
    }
}

async fn account_of(state: &AppState, principal: &Principal) -> Result<AccountView, GatewayError> {
    state.ledger.account(&principal.account).await?.ok_or(GatewayError::AccountGone)
}

async fn usage(State(state): State<AppState>, principal: Principal) -> Result<Json<Value>, GatewayError> {
    let usage = state.ledger.usage(&principal.account, EARLIER_PERIODS).await?.ok_or(GatewayError::AccountGone)?;
    Ok(Json(usage_json(&usage, &state.runtime.load())))
}

/// `GET /v1/credits/usage`: this period by category (every configured category, 0 when unused) and
/// operation, a daily series over the whole period (days without use are 0), earlier periods' totals.
pub fn usage_json(usage: &Usage, rt: &Runtime) -> Value {
    let cur = &usage.current;
    let mut by_category = Map::new();
    for op in rt.config.operations.values() {
        by_category.insert(op.category.clone(), json!(0));
    }
    for (c, n) in &cur.by_category {
        by_category.insert(c.clone(), json!(n));
    }
    let mut by_operation = Map::new();
    for name in rt.config.operations.keys() {
        by_operation.insert(name.clone(), json!(0));
    }
    for (o, n) in &cur.by_operation {
        by_operation.insert(o.clone(), json!(n));
    }
    // Free automatic refreshes (requests, not credits) of every operation that has them.
    let mut free_automatic = Map::new();
    for op in rt.rules.operations.iter().filter(|op| op.has_automatic_free()) {
        free_automatic
            .insert(op.name.to_string(), json!(cur.free_automatic.get(op.name.as_ref()).copied().unwrap_or(0)));
    }
    let first = cur.period_start.div_euclid(86_400);
    let last = (cur.period_end - 1).div_euclid(86_400);
    let daily: Vec<Value> = (first..=last)
        .map(|day| {
            let (y, m, d) = civil_from_days(day);
            json!({"date": format!("{y:04}-{m:02}-{d:02}"), "credits": cur.by_day.get(&day).copied().unwrap_or(0)})
        })
        .collect();
    let earlier: Vec<Value> = usage
        .earlier
        .iter()
        .map(|p| json!({"period_start": rfc3339(p.period_start), "period_end": rfc3339(p.period_end), "credits": p.total}))
        .collect();
    json!({
        "period_start": rfc3339(cur.period_start),
        "renews_at": rfc3339(cur.period_end),
        "total": cur.total,
        "by_category": by_category,
        "by_operation": by_operation,
        "free_automatic": free_automatic,
        "daily": daily,
        "earlier_periods": earlier,
    })
}

async fn topups(State(state): State<AppState>, principal: Principal) -> Result<Json<Value>, GatewayError> {
    let list = topup_history(&state, &principal.account).await?;
    Ok(Json(json!({ "topups": list })))
}

/// How many of the newest history entries the top-up list looks through.
pub const TOPUP_SCAN: usize = 10_000;

/// Top-ups and auto top-ups of an account, newest first, among its last [`TOPUP_SCAN`] balance
/// changes (the full record is the admin ledger).
pub async fn topup_history(state: &AppState, account: &str) -> Result<Vec<Value>, GatewayError> {
    let history = state
        .ledger
        .history(account, None, TOPUP_SCAN)
        .await?
        .ok_or_else(|| GatewayError::NotFound(format!("No account with id \"{account}\".")))?;
    Ok(history
        .iter()
        .filter(|e| e.kind == "topup" || e.kind == "auto_topup")
        .map(|e| {
            json!({"kind": e.kind, "credits": e.topup_delta, "package": e.package, "payment_ref": e.payment_ref,
                "created_at": rfc3339(e.at), "topup_remaining": e.topup_after})
        })
        .collect())
}

/// Body of `PUT /v1/credits/auto-topup` (and the admin equivalent).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoTopupBody {
    enabled: bool,
    threshold: Option<u64>,
    package: Option<String>,
}

impl AutoTopupBody {
    /// Validates against the config's packages.
    pub fn into_setting(self, rt: &Runtime) -> Result<AutoTopup, GatewayError> {
        let packages = &rt.config.topup_packages;
        let known = || packages.keys().map(String::as_str).collect::<Vec<_>>().join(", ");
        if self.threshold.is_some_and(|t| t > MAX_CREDITS) {
            return Err(GatewayError::BadRequest(format!("threshold must be at most {MAX_CREDITS} credits.")));
        }
        let (threshold, package) = match (self.threshold, self.package) {
            (Some(t), Some(p)) if t > 0 => (t, p),
            (t, p) if !self.enabled => (t.unwrap_or(0), p.unwrap_or_default()),
            _ => {
                return Err(GatewayError::BadRequest(format!(
                    "To enable auto top-up send a threshold (> 0) and a package ({}).",
                    known()
                )));
            }
        };
        let (credits, price_eur) = match packages.get(&package) {
            Some(p) => (p.credits, p.price_eur),
            None if !self.enabled && package.is_empty() => (0, 0.0),
            None => {
                return Err(GatewayError::BadRequest(format!(
                    "Unknown package \"{package}\"; use one of: {}.",
                    known()
                )));
            }
        };
        Ok(AutoTopup { enabled: self.enabled, threshold, package, credits, price_eur })
    }
}

async fn set_auto_topup(
    State(state): State<AppState>,
    principal: Principal,
    JsonBody(body): JsonBody<AutoTopupBody>,
) -> Result<Json<Value>, GatewayError> {
    let rt = state.runtime.load_full();
    let setting = body.into_setting(&rt)?;
    if setting.enabled && rt.stripe.is_some() {
        // Paid auto top-ups charge the card of the last purchase: without one that works, the
        // credits would be granted unpaid (and taken back only as far as unspent).
        let billing = state.ledger.billing(&principal.account).await?.ok_or(GatewayError::AccountGone)?;
        if billing.card.is_none() {
            return Err(GatewayError::PaymentMethodRequired(
                "Auto top-up charges the card of your last top-up purchase: buy a top-up first, then switch it on."
                    .into(),
            ));
        }
        if billing.card_failed {
            return Err(GatewayError::PaymentMethodRequired(
                "Your card was declined for an auto top-up, so auto top-up was switched off: buy a top-up with a card that works, then switch it on again.".into(),
            ));
        }
    }
    if !state.ledger.set_auto_topup(&principal.account, &setting).await? {
        return Err(GatewayError::AccountGone);
    }
    let view = account_of(&state, &principal).await?;
    Ok(Json(auto_topup_json(view.auto_topup.as_ref())))
}

/// `GET /v1/jobs/{id}`: a queued job of the caller's account; another account's job is a 404.
async fn job(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<Value>, GatewayError> {
    let job = state
        .ledger
        .job(&principal.account, &id)
        .await?
        .ok_or_else(|| GatewayError::NotFound(format!("No job with id \"{id}\" on this account.")))?;
    let mut v = json!({
        "job_id": job.id,
        "status": job.status,
        "operation": job.operation,
        "cost": job.cost,
        "attempts": job.attempts,
        "created_at": rfc3339(job.created_at),
        "updated_at": rfc3339(job.updated_at),
        "error": job.error,
    });
    if let (Some(status), Some(body)) = (job.result_status, &job.result_body) {
        let headers: Map<String, Value> = job.result_headers.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        // JSON bodies are embedded as JSON, text as a string, anything else base64-free as lossy text.
        let body_value = serde_json::from_slice::<Value>(body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()));
        v["result"] = json!({"status": status, "headers": headers, "body": body_value});
    }
    Ok(Json(v))
}
