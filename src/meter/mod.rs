//! Metering: charge before forwarding, settle or refund after the upstream answers.
//!
//! The charge is one ledger step; success settles implicitly (no second round trip). A refund is
//! issued when the upstream fails — transport error, timeout, status ≥ 500 — or when its body
//! breaks off mid-stream ([`MeteredBody`]). A client that hangs up mid-stream keeps its charge:
//! the backend did the work it was asked for; one that hangs up before the answer starts aborts
//! the upstream call, and [`RefundGuard`] returns the credits.
//!
//! Store trouble never silently keeps credits: a charge whose reply is lost is sent again with the
//! same charge id (the scripts apply a charge id once) to learn its fate, and when the store still
//! cannot answer, the charge id is refunded in the background until the store takes it — the
//! refund of a charge that never landed is a harmless no-op. Failed refunds are retried the same
//! way ([`refund_later`]) and the answer says so (`x-credits-refund: pending`).

pub mod body;
pub mod inflight;

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::OnStoreError;
use crate::error::GatewayError;
use crate::ledger::{ChargeOutcome, ChargeRequest, Ledger, Receipt, RefundOutcome, is_low};
use crate::metrics::{CategoryLabels, OperationLabels};
use crate::state::AppState;

pub use body::MeteredBody;

/// `x-credits-charged`
pub const CHARGED: HeaderName = HeaderName::from_static("x-credits-charged");
/// `x-credits-remaining`
pub const REMAINING: HeaderName = HeaderName::from_static("x-credits-remaining");
/// `x-credits-low`
pub const LOW: HeaderName = HeaderName::from_static("x-credits-low");
/// `x-credits-auto-topup`: credits an auto top-up added during this request.
pub const AUTO_TOPUP: HeaderName = HeaderName::from_static("x-credits-auto-topup");
/// `x-credits-refund: pending`: the refund could not be written yet and is being retried.
pub const REFUND: HeaderName = HeaderName::from_static("x-credits-refund");
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
/// so the request goes through uncharged (any charge that landed unseen is refunded later).
pub async fn charge(
    state: &AppState,
    on_error: OnStoreError,
    operation: &Arc<str>,
    category: &Arc<str>,
    req: ChargeRequest<'_>,
) -> Result<Option<Charge>, GatewayError> {
    let metrics = &state.metrics;
    let started = Instant::now();
    let mut outcome = state.ledger.charge(req).await;
    if outcome.is_err() {
        // The reply may be lost while the charge landed: ask again under the same charge id.
        outcome = state.ledger.charge(req).await;
    }
    metrics.store_time(started.elapsed());
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            // Unknown whether it landed: make sure it does not stand.
            refund_later(state.clone(), req.account.into(), req.charge_id.to_owned(), category.clone());
            if on_error == OnStoreError::FailOpen {
                metrics.fail_open.inc();
                tracing::error!(error = %e, operation = req.operation, cost = req.cost, "store unavailable; fail_open: forwarding uncharged");
                return Ok(None);
            }
            // fail_closed: the error response logs the cause.
            return Err(e.into());
        }
    };
    let account: Arc<str> = req.account.into();
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

/// How a refund went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refund {
    /// Written: `refunded` credits came back (less than the cost when the monthly part expired
    /// with its period); `remaining` is the balance after.
    Done {
        /// Credits returned.
        refunded: u64,
        /// Monthly plus top-up after the refund.
        remaining: u64,
    },
    /// Nothing to refund (an idempotent replay, or refunded before).
    None,
    /// The store did not answer; the refund is being retried in the background.
    Pending,
}

/// Returns a charge after an upstream failure. Never fails the request: a refund the store does
/// not take now is retried in the background ([`refund_later`]).
pub async fn refund(state: &AppState, charge: &Charge) -> Refund {
    if charge.replayed {
        return Refund::None;
    }
    match refund_once(state, &charge.account, &charge.receipt.charge_id, &charge.category).await {
        Ok(r) => r,
        Err(()) => {
            refund_later(
                state.clone(),
                charge.account.clone(),
                charge.receipt.charge_id.clone(),
                charge.category.clone(),
            );
            Refund::Pending
        }
    }
}

async fn refund_once(state: &AppState, account: &str, charge_id: &str, category: &Arc<str>) -> Result<Refund, ()> {
    let started = Instant::now();
    let outcome = state.ledger.refund(account, charge_id).await;
    state.metrics.store_time(started.elapsed());
    match outcome {
        Ok(RefundOutcome::Refunded { to_monthly, to_topup, monthly_remaining, topup_remaining }) => {
            let labels = CategoryLabels { category: category.clone() };
            state.metrics.credits_refunded.get_or_create(&labels).inc_by(to_monthly + to_topup);
            tracing::info!(charge_id, to_monthly, to_topup, "refunded");
            Ok(Refund::Done { refunded: to_monthly + to_topup, remaining: monthly_remaining + topup_remaining })
        }
        Ok(other) => {
            tracing::debug!(charge_id, outcome = ?other, "nothing to refund");
            Ok(Refund::None)
        }
        Err(e) => {
            tracing::warn!(charge_id, account, error = %e, "refund not written yet (store unavailable)");
            Err(())
        }
    }
}

/// How long a refund is retried: charge records live 24 h in the store.
const REFUND_RETRY_FOR: Duration = Duration::from_secs(23 * 3600);

/// Refunds `charge_id` in the background, retrying with backoff until the store answers (a
/// charge that never landed makes it a no-op). Gives up — loudly, for reconciliation — only when
/// the charge record would be gone anyway, or when this process stops.
pub fn refund_later(state: AppState, account: Arc<str>, charge_id: String, category: Arc<str>) {
    tokio::spawn(async move {
        let started = Instant::now();
        let mut wait = Duration::from_millis(200);
        while started.elapsed() < REFUND_RETRY_FOR {
            if refund_once(&state, &account, &charge_id, &category).await.is_ok() {
                return;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(30));
        }
        tracing::error!(%charge_id, %account, "REFUND FAILED for a day: reconcile this charge");
    });
}

/// Refunds a charge if dropped while armed: the request was abandoned (the client hung up)
/// before its answer was handed over, which also aborted the upstream call.
pub struct RefundGuard {
    armed: Option<(AppState, Arc<str>, String, Arc<str>)>,
}

impl RefundGuard {
    /// Armed for `charge_id` of `account`.
    pub fn new(state: &AppState, account: &Arc<str>, charge_id: &str, category: &Arc<str>) -> Self {
        RefundGuard { armed: Some((state.clone(), account.clone(), charge_id.to_owned(), category.clone())) }
    }

    /// The request reached its end (answered, refunded, or nothing was charged).
    pub fn disarm(&mut self) {
        self.armed = None;
    }
}

impl Drop for RefundGuard {
    fn drop(&mut self) {
        if let Some((state, account, charge_id, category)) = self.armed.take() {
            tracing::info!(%charge_id, "request abandoned before its answer; refunding");
            refund_later(state, account, charge_id, category);
        }
    }
}
