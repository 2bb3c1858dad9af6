//! Metering: charge before forwarding, settle or refund after the upstream answers.
//!
//! The charge is one ledger step; success settles implicitly (no second round trip). A refund is
//! issued when the upstream fails — transport error, timeout, status ≥ 500 — or when its body
//! breaks off mid-stream ([`MeteredBody`]). A client that hangs up keeps its charge: the backend
//! did the work it was asked for.

pub mod body;

use std::sync::Arc;
use std::time::Instant;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::OnStoreError;
use crate::error::GatewayError;
use crate::ledger::{ChargeOutcome, ChargeRequest, Ledger, Receipt, RefundOutcome, is_low};
use crate::metrics::{CategoryLabels, Metrics, OperationLabels};
use crate::store::Store;

pub use body::MeteredBody;

/// `x-credits-charged`
pub const CHARGED: HeaderName = HeaderName::from_static("x-credits-charged");
/// `x-credits-remaining`
pub const REMAINING: HeaderName = HeaderName::from_static("x-credits-remaining");
/// `x-credits-low`
pub const LOW: HeaderName = HeaderName::from_static("x-credits-low");
/// `x-credits-auto-topup`: credits an auto top-up added during this request.
pub const AUTO_TOPUP: HeaderName = HeaderName::from_static("x-credits-auto-topup");
/// `x-idempotent-replay`: set when an idempotency key was charged before.
pub const REPLAY: HeaderName = HeaderName::from_static("x-idempotent-replay");

/// A charge taken for one request.
#[derive(Debug, Clone)]
pub struct Charge {
    /// Paying account.
    pub account: Arc<str>,
    /// Usage category (metrics).
    pub category: Arc<str>,
    /// What the ledger answered.
    pub receipt: Receipt,
    /// True when an earlier request with the same idempotency key paid; nothing was debited now.
    pub replayed: bool,
}

impl Charge {
    /// Credits debited by this request (0 on a replay).
    pub fn charged(&self) -> u64 {
        if self.replayed { 0 } else { self.receipt.cost }
    }

    /// Sets the credit headers of a metered response.
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        write_headers(headers, self.charged(), self.receipt.remaining(), self.receipt.allocation);
        if self.replayed {
            headers.insert(REPLAY, HeaderValue::from_static("true"));
        }
        if let Some(credits) = self.receipt.auto_topup {
            headers.insert(AUTO_TOPUP, HeaderValue::from(credits));
        }
    }
}

/// Sets `x-credits-charged`, `x-credits-remaining` and (when low) `x-credits-low`.
pub fn write_headers(headers: &mut HeaderMap, charged: u64, remaining: u64, allocation: u64) {
    headers.insert(CHARGED, HeaderValue::from(charged));
    headers.insert(REMAINING, HeaderValue::from(remaining));
    if is_low(remaining, allocation) {
        headers.insert(LOW, HeaderValue::from_static("true"));
    }
}

/// Takes the credits for a request. `Ok(None)`: the store is down and `on_error = "fail_open"`,
/// so the request goes through uncharged.
pub async fn charge(
    ledger: &Store,
    metrics: &Metrics,
    on_error: OnStoreError,
    account: &Arc<str>,
    operation: &Arc<str>,
    category: &Arc<str>,
    req: ChargeRequest<'_>,
) -> Result<Option<Charge>, GatewayError> {
    let started = Instant::now();
    let outcome = ledger.charge(req).await;
    metrics.store_time(started.elapsed());
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) if on_error == OnStoreError::FailOpen => {
            metrics.fail_open.inc();
            tracing::error!(error = %e, operation = req.operation, cost = req.cost, "store unavailable; fail_open: forwarding uncharged");
            return Ok(None);
        }
        // fail_closed: the error response logs the cause.
        Err(e) => return Err(e.into()),
    };
    let charge = |receipt, replayed| Charge { account: account.clone(), category: category.clone(), receipt, replayed };
    match outcome {
        ChargeOutcome::Charged(receipt) => {
            metrics.credits_charged.get_or_create(&CategoryLabels { category: category.clone() }).inc_by(req.cost);
            Ok(Some(charge(receipt, false)))
        }
        ChargeOutcome::Replayed(receipt) => Ok(Some(charge(receipt, true))),
        ChargeOutcome::Refused { remaining, renews_at } => {
            metrics.payment_required.get_or_create(&OperationLabels { operation: operation.clone() }).inc();
            Err(if remaining == 0 {
                GatewayError::NoCredits { renews_at }
            } else {
                GatewayError::InsufficientCredits { required: req.cost, remaining, renews_at }
            })
        }
        ChargeOutcome::Conflict => Err(GatewayError::IdempotencyConflict),
        ChargeOutcome::NoAccount => {
            Err(GatewayError::Unauthorized("The account of this API key no longer exists.".into()))
        }
    }
}

/// Returns a charge after an upstream failure; the remaining balance after it when known.
/// Never fails the request: a refund that cannot be written is logged loudly for reconciliation.
pub async fn refund(ledger: &Store, metrics: &Metrics, charge: &Charge) -> Option<u64> {
    if charge.replayed {
        return None;
    }
    let started = Instant::now();
    let outcome = ledger.refund(&charge.account, &charge.receipt.charge_id).await;
    metrics.store_time(started.elapsed());
    match outcome {
        Ok(RefundOutcome::Refunded { to_monthly, to_topup, monthly_remaining, topup_remaining }) => {
            let labels = CategoryLabels { category: charge.category.clone() };
            metrics.credits_refunded.get_or_create(&labels).inc_by(to_monthly + to_topup);
            tracing::info!(charge_id = %charge.receipt.charge_id, to_monthly, to_topup, "refunded");
            Some(monthly_remaining + topup_remaining)
        }
        Ok(other) => {
            tracing::warn!(charge_id = %charge.receipt.charge_id, outcome = ?other, "refund not applied");
            None
        }
        Err(e) => {
            tracing::error!(charge_id = %charge.receipt.charge_id, account = %charge.account, error = %e,
                "REFUND FAILED: store unavailable; reconcile this charge");
            None
        }
    }
}
