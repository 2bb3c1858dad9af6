//! The customer API on the public listener (SPEC §4): balance, usage, packages, top-ups and the
//! auto top-up setting of the caller's own account, and the dashboard page. Every JSON handler
//! authenticates through the [`Principal`] extractor, which also applies the account's plan rate
//! limit (shared with the proxy); no handler takes an account id from the request, so a key can
//! only ever see its own account. The API document (`openapi.rs`) is served here too, without
//! credentials, and is made from these handlers' typed bodies.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use axum::Json;
use axum::Router;
use axum::extract::{ConnectInfo, FromRequestParts, State};
use axum::routing::{get, put};
use http::request::Parts;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::auth::Principal;
use crate::calendar::{civil_from_days, rfc3339};
use crate::error::{ErrorBody, GatewayError};
use crate::extract::{JsonBody, PathParam};
use crate::ledger::jobs::JobStore;
use crate::ledger::{AccountView, AutoTopup, Ledger, MAX_CREDITS, Usage, is_low};
use crate::openapi::{BodyRefusals, CustomerRefusals};
use crate::state::{AppState, Runtime};

/// How many earlier periods `GET /v1/credits/usage` reports.
pub const EARLIER_PERIODS: usize = 6;

/// Routes of the customer API. Every path starts with one of `stack::ROUTER_PATHS` (the public
/// listener sends the others to the proxy without asking the router).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/credits", get(credits))
        .route("/v1/credits/packages", get(packages))
        .route("/v1/credits/usage", get(usage))
        .route("/v1/credits/topups", get(topups))
        .route("/v1/credits/auto-topup", put(set_auto_topup))
        .route("/v1/jobs/{id}", get(job))
        .route("/dashboard", get(crate::dashboard::page))
        .route("/openapi.json", get(crate::openapi::serve))
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

/// The balance of the caller's account.
#[utoipa::path(get, path = "/v1/credits", tag = "credits", security(("api_key" = [])),
    responses(
        CustomerRefusals,
        (status = 200, description = "The balance", body = Credits),
    ))]
pub(crate) async fn credits(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<Credits>, GatewayError> {
    let view = account_of(&state, &principal).await?;
    Ok(Json(Credits::of(&view, &state.runtime.load())))
}

/// `GET /v1/credits` (also the base of the admin account view).
#[derive(Debug, Serialize, ToSchema)]
pub struct Credits {
    /// Current plan.
    pub plan: String,
    /// Credits granted at each renewal.
    pub allocation: u64,
    /// Monthly bucket.
    pub monthly_remaining: u64,
    /// Top-up bucket (never expires; spent after the monthly bucket).
    pub topup_remaining: u64,
    /// Monthly plus top-up.
    pub remaining: u64,
    /// Credits charged this period, net of refunds.
    pub used_this_period: u64,
    /// Start of the current period.
    #[schema(format = DateTime)]
    pub period_start: String,
    /// Next renewal.
    #[schema(format = DateTime)]
    pub renews_at: String,
    /// Whether `remaining` is below 10 % of the allocation.
    pub low: bool,
    /// The auto top-up setting.
    pub auto_topup: AutoTopupView,
    /// How many chat messages the remaining credits buy at each tier.
    pub messages_left: BTreeMap<String, u64>,
}

impl Credits {
    /// The balance of `view` under the running price table.
    pub fn of(view: &AccountView, rt: &Runtime) -> Self {
        let remaining = view.remaining();
        let mut messages_left = BTreeMap::new();
        if let Some(chat) = rt.rules.operations.iter().find(|o| !o.tier_costs().is_empty()) {
            for (tier, cost) in chat.tier_costs() {
                messages_left.insert(tier.clone(), remaining / cost);
            }
        }
        Credits {
            plan: view.plan.clone(),
            allocation: view.allocation,
            monthly_remaining: view.monthly_remaining,
            topup_remaining: view.topup_remaining,
            remaining,
            used_this_period: view.used_this_period,
            period_start: rfc3339(view.period_start),
            renews_at: rfc3339(view.renews_at),
            low: is_low(remaining, view.allocation),
            auto_topup: AutoTopupView::of(view.auto_topup.as_ref()),
            messages_left,
        }
    }
}

/// The top-up packages, for a billing page.
#[utoipa::path(get, path = "/v1/credits/packages", tag = "credits", security(("api_key" = [])),
    responses(
        CustomerRefusals,
        (status = 200, description = "The packages, cheapest first", body = Packages),
    ))]
pub(crate) async fn packages(State(state): State<AppState>, _principal: Principal) -> Json<Packages> {
    let rt = state.runtime.load();
    let mut packages: Vec<Package> = rt
        .config
        .topup_packages
        .iter()
        .map(|(name, p)| Package {
            package: name.clone(),
            credits: p.credits,
            price_eur: p.price_eur,
            price_per_credit_eur: (p.price_eur / p.credits as f64 * 10_000.0).round() / 10_000.0,
        })
        .collect();
    packages.sort_by_key(|p| p.credits);
    Json(Packages { packages, checkout: rt.stripe.is_some() })
}

/// `GET /v1/credits/packages`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Packages {
    /// The packages, fewest credits first.
    pub packages: Vec<Package>,
    /// Whether `POST /v1/credits/topups/checkout` takes payments (`[billing.stripe]`).
    pub checkout: bool,
}

/// A top-up package.
#[derive(Debug, Serialize, ToSchema)]
pub struct Package {
    /// Its name (what `package` fields take).
    pub package: String,
    /// Credits it adds.
    pub credits: u64,
    /// Price in euros.
    pub price_eur: f64,
    /// Price per credit in euros, rounded to 4 decimals.
    pub price_per_credit_eur: f64,
}

/// An account's auto top-up setting as the APIs show it (all `null` when never set).
#[derive(Debug, Serialize, ToSchema)]
pub struct AutoTopupView {
    /// Whether it buys at all.
    pub enabled: bool,
    /// Buy when the total remaining drops below this.
    pub threshold: Option<u64>,
    /// Package bought.
    pub package: Option<String>,
    /// Credits of that package.
    pub credits: Option<u64>,
}

impl AutoTopupView {
    fn of(a: Option<&AutoTopup>) -> Self {
        match a {
            Some(a) => AutoTopupView {
                enabled: a.enabled,
                threshold: Some(a.threshold),
                package: Some(a.package.clone()),
                credits: Some(a.credits),
            },
            None => AutoTopupView { enabled: false, threshold: None, package: None, credits: None },
        }
    }
}

async fn account_of(state: &AppState, principal: &Principal) -> Result<AccountView, GatewayError> {
    state.ledger.account(&principal.account).await?.ok_or(GatewayError::AccountGone)
}

/// This period's credits by category and operation, a daily series, earlier periods' totals.
#[utoipa::path(get, path = "/v1/credits/usage", tag = "credits", security(("api_key" = [])),
    responses(
        CustomerRefusals,
        (status = 200, description = "The usage report", body = UsageReport),
    ))]
pub(crate) async fn usage(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<UsageReport>, GatewayError> {
    let usage = state.ledger.usage(&principal.account, EARLIER_PERIODS).await?.ok_or(GatewayError::AccountGone)?;
    Ok(Json(UsageReport::of(&usage, &state.runtime.load())))
}

/// `GET /v1/credits/usage` (and the admin equivalent).
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageReport {
    /// Start of the current period.
    #[schema(format = DateTime)]
    pub period_start: String,
    /// Next renewal (end of the current period).
    #[schema(format = DateTime)]
    pub renews_at: String,
    /// Credits used this period.
    pub total: u64,
    /// This period's credits by category; every configured category, 0 when unused.
    pub by_category: BTreeMap<String, u64>,
    /// This period's credits by operation; every configured operation, 0 when unused.
    pub by_operation: BTreeMap<String, u64>,
    /// Free automatic refreshes (requests, not credits) of every operation that has them.
    pub free_automatic: BTreeMap<String, u64>,
    /// One entry per day of the period, 0 on days without use.
    pub daily: Vec<DailyCredits>,
    /// Totals of earlier periods, newest first.
    pub earlier_periods: Vec<EarlierPeriod>,
}

/// Credits used on one day.
#[derive(Debug, Serialize, ToSchema)]
pub struct DailyCredits {
    /// `YYYY-MM-DD` (UTC).
    #[schema(format = Date)]
    pub date: String,
    /// Credits used that day.
    pub credits: u64,
}

/// An earlier period's total.
#[derive(Debug, Serialize, ToSchema)]
pub struct EarlierPeriod {
    /// Its start.
    #[schema(format = DateTime)]
    pub period_start: String,
    /// Its end.
    #[schema(format = DateTime)]
    pub period_end: String,
    /// Credits used in it.
    pub credits: u64,
}

impl UsageReport {
    /// This period by category (every configured category, 0 when unused) and operation, a daily
    /// series over the whole period (days without use are 0), earlier periods' totals.
    pub fn of(usage: &Usage, rt: &Runtime) -> Self {
        let cur = &usage.current;
        let mut by_category: BTreeMap<String, u64> =
            rt.config.operations.values().map(|op| (op.category.clone(), 0)).collect();
        by_category.extend(cur.by_category.iter().map(|(c, n)| (c.clone(), *n)));
        let mut by_operation: BTreeMap<String, u64> = rt.config.operations.keys().map(|n| (n.clone(), 0)).collect();
        by_operation.extend(cur.by_operation.iter().map(|(o, n)| (o.clone(), *n)));
        let free_automatic = rt
            .rules
            .operations
            .iter()
            .filter(|op| op.has_automatic_free())
            .map(|op| (op.name.to_string(), cur.free_automatic.get(op.name.as_ref()).copied().unwrap_or(0)))
            .collect();
        let first = cur.period_start.div_euclid(86_400);
        let last = (cur.period_end - 1).div_euclid(86_400);
        let daily = (first..=last)
            .map(|day| {
                let (y, m, d) = civil_from_days(day);
                DailyCredits {
                    date: format!("{y:04}-{m:02}-{d:02}"),
                    credits: cur.by_day.get(&day).copied().unwrap_or(0),
                }
            })
            .collect();
        let earlier_periods = usage
            .earlier
            .iter()
            .map(|p| EarlierPeriod {
                period_start: rfc3339(p.period_start),
                period_end: rfc3339(p.period_end),
                credits: p.total,
            })
            .collect();
        UsageReport {
            period_start: rfc3339(cur.period_start),
            renews_at: rfc3339(cur.period_end),
            total: cur.total,
            by_category,
            by_operation,
            free_automatic,
            daily,
            earlier_periods,
        }
    }
}

/// Top-ups and auto top-ups of the caller's account, newest first.
#[utoipa::path(get, path = "/v1/credits/topups", tag = "credits", security(("api_key" = [])),
    responses(
        CustomerRefusals,
        (status = 200, description = "The top-ups", body = Topups),
    ))]
pub(crate) async fn topups(State(state): State<AppState>, principal: Principal) -> Result<Json<Topups>, GatewayError> {
    let topups = topup_history(&state, &principal.account).await?;
    Ok(Json(Topups { topups }))
}

/// A list of top-ups.
#[derive(Debug, Serialize, ToSchema)]
pub struct Topups {
    /// Newest first.
    pub topups: Vec<TopupItem>,
}

/// One top-up in an account's history.
#[derive(Debug, Serialize, ToSchema)]
pub struct TopupItem {
    /// `topup` or `auto_topup`.
    pub kind: String,
    /// Credits added.
    pub credits: i64,
    /// Package bought, if any.
    pub package: Option<String>,
    /// Payment reference.
    pub payment_ref: Option<String>,
    /// When it was credited.
    #[schema(format = DateTime)]
    pub created_at: String,
    /// Top-up bucket right after it.
    pub topup_remaining: u64,
}

/// How many of the newest history entries the top-up list looks through.
pub const TOPUP_SCAN: usize = 10_000;

/// Top-ups and auto top-ups of an account, newest first, among its last [`TOPUP_SCAN`] balance
/// changes (the full record is the admin ledger).
pub async fn topup_history(state: &AppState, account: &str) -> Result<Vec<TopupItem>, GatewayError> {
    let history = state
        .ledger
        .history(account, None, TOPUP_SCAN)
        .await?
        .ok_or_else(|| GatewayError::NotFound(format!("No account with id \"{account}\".")))?;
    Ok(history
        .iter()
        .filter(|e| e.kind == "topup" || e.kind == "auto_topup")
        .map(|e| TopupItem {
            kind: e.kind.clone(),
            credits: e.topup_delta,
            package: e.package.clone(),
            payment_ref: e.payment_ref.clone(),
            created_at: rfc3339(e.at),
            topup_remaining: e.topup_after,
        })
        .collect())
}

/// Body of `PUT /v1/credits/auto-topup` (and the admin equivalent).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AutoTopupBody {
    /// Whether to buy automatically.
    enabled: bool,
    /// Buy when the total remaining drops below this (> 0 to enable).
    #[schema(maximum = 1_000_000_000)] // MAX_CREDITS (a test compares them)
    threshold: Option<u64>,
    /// The package to buy (required to enable).
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

/// Sets the auto top-up of the caller's account.
#[utoipa::path(put, path = "/v1/credits/auto-topup", tag = "credits", security(("api_key" = [])),
    request_body = AutoTopupBody,
    responses(
        CustomerRefusals, BodyRefusals,
        (status = 200, description = "The setting now in force", body = AutoTopupView),
        (status = 400, description = "`bad_request`: bad JSON, no threshold or package to enable, unknown package", body = ErrorBody),
        (status = 402, description = "`payment_method_required`: with payments on, auto top-up needs a card that works", body = ErrorBody),
    ))]
pub(crate) async fn set_auto_topup(
    State(state): State<AppState>,
    principal: Principal,
    JsonBody(body): JsonBody<AutoTopupBody>,
) -> Result<Json<AutoTopupView>, GatewayError> {
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
    Ok(Json(AutoTopupView::of(view.auto_topup.as_ref())))
}

/// A queued job of the caller's account; another account's job is a 404.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs", security(("api_key" = [])),
    params(("id" = String, Path, description = "The `job_id` of the 202 that queued it")),
    responses(
        CustomerRefusals,
        (status = 200, description = "The job", body = JobStatus),
        (status = 404, description = "`not_found`: no such job on this account", body = ErrorBody),
    ))]
pub(crate) async fn job(
    State(state): State<AppState>,
    principal: Principal,
    PathParam(id): PathParam<String>,
) -> Result<Json<JobStatus>, GatewayError> {
    let job = state
        .ledger
        .job(&principal.account, &id)
        .await?
        .ok_or_else(|| GatewayError::NotFound(format!("No job with id \"{id}\" on this account.")))?;
    let result = match (job.result_status, &job.result_body) {
        (Some(status), Some(body)) => Some(JobResult {
            status,
            headers: job.result_headers.iter().cloned().collect(),
            // JSON bodies are embedded as JSON, anything else as (lossy) text.
            body: serde_json::from_slice::<Value>(body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned())),
        }),
        _ => None,
    };
    Ok(Json(JobStatus {
        job_id: job.id,
        status: job.status,
        operation: job.operation,
        cost: job.cost,
        attempts: job.attempts,
        created_at: rfc3339(job.created_at),
        updated_at: rfc3339(job.updated_at),
        error: job.error,
        result,
    }))
}

/// `GET /v1/jobs/{id}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobStatus {
    /// The job's id.
    pub job_id: String,
    /// `queued`, `running`, `done` or `failed`.
    pub status: String,
    /// Operation it pays for.
    pub operation: String,
    /// Its cost in credits.
    pub cost: u64,
    /// Failed attempts so far.
    pub attempts: u32,
    /// When it was queued.
    #[schema(format = DateTime)]
    pub created_at: String,
    /// Its last change.
    #[schema(format = DateTime)]
    pub updated_at: String,
    /// Why the last attempt failed.
    pub error: Option<String>,
    /// The backend's answer, once done.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<JobResult>,
}

/// The backend's answer to a job.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobResult {
    /// Its status.
    pub status: u16,
    /// Its end-to-end headers.
    pub headers: BTreeMap<String, String>,
    /// Its body: JSON as JSON, anything else as text.
    pub body: Value,
}
