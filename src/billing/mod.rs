//! Payments through Stripe (`[billing.stripe]`): customers buy top-ups, auto top-ups are paid.
//!
//! - `POST /v1/credits/topups/checkout {package}` creates a PaymentIntent for the account's
//!   Stripe customer (created on first use, its id kept on the account) and returns what the
//!   page needs to confirm it with Stripe.js. Nothing is credited here.
//! - `POST /v1/billing/stripe/webhook` (signed by Stripe, no API key): `payment_intent.succeeded`
//!   of a purchase credits the package once per payment — the PaymentIntent id is the top-up's
//!   `payment_ref`, and the ledger credits a payment reference once, whatever the number of
//!   deliveries or instances — and keeps the card for auto top-ups.
//! - Auto top-ups are credited at once by the charge script (SPEC §1); the notifier then pays
//!   each `auto_topup.purchased` event off-session ([`pay_auto_topup`]) with the top-up's
//!   `payment_ref` as idempotency key, and settles it in the ledger: paid, or declined — then the
//!   credits are taken back as far as unspent and auto top-up is switched off
//!   ([`crate::ledger::Ledger::settle_auto_topup`]).
//!
//! Without `[billing.stripe]` these routes answer 404 and top-ups stay admin-only.

pub mod stripe;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::routing::post;
use http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::auth::Principal;
use crate::error::{ErrorBody, GatewayError};
use crate::extract::JsonBody;
use crate::ledger::{AutoTopupPayment, Event, Ledger, MAX_CREDITS, Settlement, TopupOutcome, TopupRequest};
use crate::openapi::{BodyRefusals, CustomerRefusals};
use crate::state::AppState;
use stripe::{OffSession, Stripe, StripeError, minor_units};

/// Routes of the payments API.
pub fn router() -> Router<AppState> {
    // Paths start with one of `stack::ROUTER_PATHS` (see `api::router`).
    Router::new()
        .route("/v1/credits/topups/checkout", post(checkout))
        .route("/v1/billing/stripe/webhook", post(webhook))
}

fn not_enabled() -> GatewayError {
    GatewayError::NotFound("Buying top-ups is not enabled on this gateway; ask your administrator for credits.".into())
}

fn provider_error(e: StripeError) -> GatewayError {
    tracing::warn!(error = %e, "billing: Stripe call failed");
    GatewayError::PaymentProviderUnavailable(e.to_string())
}

/// Body of `POST /v1/credits/topups/checkout`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CheckoutBody {
    /// The package to buy.
    package: String,
}

/// A purchase started: what Stripe.js needs to confirm the payment.
#[derive(Debug, Serialize, ToSchema)]
pub struct Checkout {
    /// The PaymentIntent id (`pi_…`), the top-up's `payment_ref` once paid.
    pub payment_intent: String,
    /// For Stripe.js to confirm the payment.
    pub client_secret: Option<String>,
    /// The PaymentIntent's status.
    pub status: String,
    /// The package.
    pub package: String,
    /// Credits it adds once paid.
    pub credits: u64,
    /// Price in euros.
    pub price_eur: f64,
    /// Price in the currency's minor units.
    pub amount: u64,
    /// ISO currency code.
    pub currency: String,
    /// Stripe publishable key, for Stripe.js.
    pub publishable_key: Option<String>,
    /// Where to load Stripe.js from.
    pub stripe_js: String,
}

/// The webhook's acknowledgement.
#[derive(Debug, Serialize, ToSchema)]
pub struct Received {
    /// Always `true`.
    pub received: bool,
}

const RECEIVED: Received = Received { received: true };

/// Starts buying a package: 201 with the PaymentIntent for Stripe.js. A client's
/// `Idempotency-Key` makes its retries one payment.
#[utoipa::path(post, path = "/v1/credits/topups/checkout", tag = "billing", security(("api_key" = [])),
    params(("idempotency-key" = Option<String>, Header, description = "1–255 characters: retries with the same key are one payment")),
    request_body = CheckoutBody,
    responses(
        CustomerRefusals, BodyRefusals,
        (status = 201, description = "The PaymentIntent to confirm with Stripe.js; nothing is credited yet", body = Checkout),
        (status = 400, description = "`bad_request`: bad JSON, unknown package, bad Idempotency-Key", body = ErrorBody),
        (status = 404, description = "`not_found`: payments are not enabled (`[billing.stripe]`)", body = ErrorBody),
        (status = 502, description = "`payment_provider_unavailable`: nothing was charged", body = ErrorBody),
    ))]
pub(crate) async fn checkout(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    JsonBody(body): JsonBody<CheckoutBody>,
) -> Result<(StatusCode, Json<Checkout>), GatewayError> {
    let rt = state.runtime.load_full();
    let stripe = rt.stripe.as_deref().ok_or_else(not_enabled)?;
    let account: &str = &principal.account;
    let Some(p) = rt.config.topup_packages.get(&body.package) else {
        let known = rt.config.topup_packages.keys().map(String::as_str).collect::<Vec<_>>().join(", ");
        return Err(GatewayError::BadRequest(format!("Unknown package \"{}\"; use one of: {known}.", body.package)));
    };
    let customer = customer_of(&state, stripe, account).await?;
    let key = match headers.get("idempotency-key").and_then(|v| v.to_str().ok()) {
        // Stripe takes keys up to 255 characters: the account and the client's key, hashed.
        Some(k) if !k.is_empty() && k.len() <= 255 => {
            let digest = <sha2::Sha256 as sha2::Digest>::digest(format!("{account}\n{k}").as_bytes());
            format!("creditgate-checkout-{}", hex::encode(digest))
        }
        Some(_) => return Err(GatewayError::BadRequest("Idempotency-Key must be 1 to 255 characters.".into())),
        None => format!("creditgate-checkout-{}", state.ids.next()),
    };
    let amount = minor_units(p.price_eur);
    let intent = stripe
        .purchase_intent(&customer, account, &body.package, p.credits, amount, &key)
        .await
        .map_err(provider_error)?;
    tracing::info!(account, package = %body.package, payment_intent = %intent.id, "billing: purchase started");
    let answer = Checkout {
        payment_intent: intent.id,
        client_secret: intent.client_secret,
        status: intent.status,
        package: body.package,
        credits: p.credits,
        price_eur: p.price_eur,
        amount,
        currency: stripe.currency.clone(),
        publishable_key: stripe.publishable_key.clone(),
        stripe_js: stripe.js_url.clone(),
    };
    Ok((StatusCode::CREATED, Json(answer)))
}

/// The account's Stripe customer, created on first use; when two instances create one at once,
/// the ledger keeps the first and both use it.
async fn customer_of(state: &AppState, stripe: &Stripe, account: &str) -> Result<String, GatewayError> {
    let billing = state.ledger.billing(account).await?.ok_or(GatewayError::AccountGone)?;
    if let Some(customer) = billing.customer {
        return Ok(customer);
    }
    let email = state.ledger.account(account).await?.and_then(|a| a.email);
    let created = stripe.create_customer(account, email.as_deref()).await.map_err(provider_error)?;
    state.ledger.set_billing_customer(account, &created).await?.ok_or(GatewayError::AccountGone)
}

/// Stripe's events. Only a verified delivery is read; 200 once handled (or not ours), 503 when
/// the store cannot take it (Stripe delivers again).
#[utoipa::path(post, path = "/v1/billing/stripe/webhook", tag = "billing",
    params(("stripe-signature" = String, Header, description = "Stripe's signature of the body")),
    request_body(content = serde_json::Value, description = "A Stripe event"),
    responses(
        BodyRefusals,
        (status = 200, description = "Handled, or not one of ours", body = Received),
        (status = 400, description = "`bad_request`: bad signature or not a JSON event", body = ErrorBody),
        (status = 404, description = "`not_found`: payments are not enabled (`[billing.stripe]`)", body = ErrorBody),
        (status = 502, description = "`payment_provider_unavailable`: Stripe delivers again", body = ErrorBody),
        (status = 503, description = "`store_unavailable`: Stripe delivers again", body = ErrorBody),
    ))]
pub(crate) async fn webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Json<Received>, GatewayError> {
    let rt = state.runtime.load_full();
    // Nothing is read before payments are known to be on, and no more than any request body.
    let stripe = rt.stripe.as_deref().ok_or_else(not_enabled)?;
    let body = crate::extract::read_body(body, rt.config.server.max_body_bytes).await?;
    let signature = headers.get("stripe-signature").and_then(|v| v.to_str().ok());
    if let Err(why) = stripe.verify(signature, &body, crate::calendar::now()) {
        tracing::warn!(why = %why, "billing: webhook delivery refused");
        return Err(GatewayError::BadRequest(format!("Webhook refused: {why}.")));
    }
    let event: Value = serde_json::from_slice(&body)
        .map_err(|e| GatewayError::BadRequest(format!("The webhook body is not a JSON event: {e}.")))?;
    let kind = event["type"].as_str().unwrap_or_default();
    let intent = &event["data"]["object"];
    let meta = &intent["metadata"];
    let (Some(account), Some(purpose), Some(id)) =
        (meta["creditgate_account"].as_str(), meta["creditgate_purpose"].as_str(), intent["id"].as_str())
    else {
        return Ok(Json(RECEIVED));
    };
    let credits =
        meta["credits"].as_str().and_then(|c| c.parse::<u64>().ok()).filter(|c| (1..=MAX_CREDITS).contains(c));
    match (kind, purpose) {
        // A payment of ours whose metadata is broken cannot be fixed by delivering it again: it is
        // logged for the operator and acknowledged (Stripe would retry a 400 for days).
        ("payment_intent.succeeded", "topup") => {
            let Some(credits) = credits else {
                tracing::error!(account, payment_id = id, "billing: a paid top-up without valid credits metadata");
                return Ok(Json(RECEIVED));
            };
            credit_purchase(&state, stripe, account, id, credits, meta["package"].as_str(), intent).await?;
        }
        ("payment_intent.succeeded" | "payment_intent.payment_failed", "auto_topup") => {
            let (Some(payment_ref), Some(credits)) = (meta["payment_ref"].as_str(), credits) else {
                tracing::error!(
                    account,
                    payment_id = id,
                    "billing: an auto top-up payment without payment_ref or credits"
                );
                return Ok(Json(RECEIVED));
            };
            let failure = intent.pointer("/last_payment_error/message").and_then(Value::as_str);
            let payment = match kind {
                "payment_intent.succeeded" => AutoTopupPayment::Paid(id),
                _ => AutoTopupPayment::Failed(failure.unwrap_or("the payment failed")),
            };
            settle(&state, account, payment_ref, credits, payment).await.map_err(GatewayError::from)?;
        }
        _ => {}
    }
    Ok(Json(RECEIVED))
}

/// A purchase Stripe confirmed: the package credited once per PaymentIntent; its card kept and
/// made the customer's default, for auto top-ups.
async fn credit_purchase(
    state: &AppState,
    stripe: &Stripe,
    account: &str,
    payment_id: &str,
    credits: u64,
    package: Option<&str>,
    intent: &Value,
) -> Result<(), GatewayError> {
    let req = TopupRequest { account, credits, payment_ref: payment_id, package };
    match state.ledger.topup(req).await? {
        TopupOutcome::Created(r) => {
            tracing::info!(
                account,
                payment_id,
                credits,
                topup_remaining = r.topup_remaining,
                "billing: top-up paid and credited"
            );
        }
        TopupOutcome::Duplicate(_) => tracing::info!(account, payment_id, "billing: top-up was credited before"),
        TopupOutcome::NoAccount => {
            tracing::error!(account, payment_id, credits, "billing: a payment for an account that does not exist");
            return Ok(());
        }
    }
    let (Some(card), Some(customer)) = (intent["payment_method"].as_str(), intent["customer"].as_str()) else {
        return Ok(());
    };
    state.ledger.set_billing_card(account, card).await?;
    match stripe.set_default_card(customer, card).await {
        Ok(()) => Ok(()),
        // Stripe delivers again; the top-up is credited once whatever the number of deliveries.
        Err(e @ StripeError::Unavailable(_)) => Err(provider_error(e)),
        Err(e) => {
            tracing::warn!(account, card, error = %e, "billing: the card could not be made the default");
            Ok(())
        }
    }
}

async fn settle(
    state: &AppState,
    account: &str,
    payment_ref: &str,
    credits: u64,
    payment: AutoTopupPayment<'_>,
) -> Result<(), crate::ledger::LedgerError> {
    match state.ledger.settle_auto_topup(account, payment_ref, credits, payment).await? {
        Settlement::Paid { payment_id } => {
            tracing::info!(account, payment_ref, payment_id, "billing: auto top-up paid")
        }
        Settlement::Reversed { taken_back, topup_remaining } => tracing::warn!(
            account,
            payment_ref,
            taken_back,
            topup_remaining,
            "billing: auto top-up not paid; credits taken back, auto top-up switched off"
        ),
        Settlement::NoAccount => {
            tracing::error!(account, payment_ref, "billing: auto top-up of an account that does not exist")
        }
    }
    Ok(())
}

/// Pays the auto top-up an `auto_topup.purchased` event reports: off-session, on the card the
/// customer set as default in Stripe, else the card of their last purchase. `Ok` once settled
/// (or handed to the webhook, for a payment still processing); `Err` when Stripe or the store
/// could not be reached — the notifier tries again, and the idempotency key makes it one payment.
pub async fn pay_auto_topup(state: &AppState, stripe: &Stripe, event: &Event) -> Result<(), String> {
    let d = &event.data;
    let account = event.account_id.as_str();
    let (Some(payment_ref), Some(credits)) = (d["payment_ref"].as_str(), d["credits"].as_u64()) else {
        tracing::error!(event_id = %event.id, "billing: an auto_topup.purchased event without payment_ref or credits");
        return Ok(());
    };
    // Settled already (paid before a restart, or declined): never a second payment.
    if state.ledger.auto_topup_settlement(account, payment_ref).await.map_err(|e| e.to_string())?.is_some() {
        return Ok(());
    }
    let fail =
        async |reason: &str| settle(state, account, payment_ref, credits, AutoTopupPayment::Failed(reason)).await;
    let billing = match state.ledger.billing(account).await.map_err(|e| e.to_string())? {
        Some(b) => b,
        None => return Ok(()),
    };
    let Some(customer) = billing.customer else {
        return fail("no card on file (no top-up was ever bought)").await.map_err(|e| e.to_string());
    };
    let card = match stripe.default_card(&customer).await {
        Ok(Some(card)) => Some(card),
        Ok(None) | Err(StripeError::Refused { .. }) => billing.card,
        Err(e @ StripeError::Unavailable(_)) => return Err(e.to_string()),
    };
    let Some(card) = card else {
        return fail("no card on file (no top-up was ever bought)").await.map_err(|e| e.to_string());
    };
    let price = d["price_eur"].as_f64().unwrap_or(0.0);
    let package = d["package"].as_str().unwrap_or_default();
    let what = OffSession { account, payment_ref, credits, package, amount: minor_units(price) };
    // Ok: the payment id; Err: why it was not paid.
    let outcome: Result<String, String> = match stripe.charge_off_session(&customer, &card, &what).await {
        Ok(intent) => match intent.status.as_str() {
            "succeeded" => Ok(intent.id),
            // The webhook settles it when Stripe knows.
            "processing" => return Ok(()),
            status => Err(intent.failure.unwrap_or_else(|| format!("the payment ended {status}"))),
        },
        Err(StripeError::Refused { message, .. }) => Err(message),
        Err(e @ StripeError::Unavailable(_)) => return Err(e.to_string()),
    };
    let payment = match &outcome {
        Ok(id) => AutoTopupPayment::Paid(id),
        Err(reason) => AutoTopupPayment::Failed(reason),
    };
    settle(state, account, payment_ref, credits, payment).await.map_err(|e| e.to_string())
}
