//! The customer API on the public listener (SPEC §4): balances and packages for the caller's
//! own account. Every handler authenticates through the [`Principal`] extractor.

use axum::Json;
use axum::Router;
use axum::extract::{FromRequestParts, State};
use axum::routing::get;
use http::request::Parts;
use serde_json::{Map, Value, json};

use crate::auth::Principal;
use crate::calendar::rfc3339;
use crate::error::GatewayError;
use crate::ledger::{AccountView, Ledger, is_low};
use crate::state::{AppState, Runtime};

/// Routes of the customer API.
pub fn router() -> Router<AppState> {
    Router::new().route("/v1/credits", get(credits)).route("/v1/credits/packages", get(packages))
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = GatewayError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        state.keys.authenticate(&parts.headers, &*state.ledger).await
    }
}

async fn credits(State(state): State<AppState>, principal: Principal) -> Result<Json<Value>, GatewayError> {
    let view = state
        .ledger
        .account(&principal.account)
        .await?
        .ok_or_else(|| GatewayError::NotFound("The account of this API key no longer exists.".into()))?;
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
        "auto_topup": { "enabled": false, "threshold": null, "package": null },
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
    Json(json!({ "packages": list }))
}
