//! Metering: charge before forwarding, settle or refund after the upstream answers.
//!
//! The one piece of code through which every money movement of a request goes — the proxy path
//! in [`crate::stack`] and the job runner in [`crate::jobs`] alike — so both count the same
//! metrics and follow the same rules:
//!
//! * [`charge`] is one ledger step; success settles implicitly (no second round trip). Its
//!   answer says whether this request pays ([`Taken::Charged`]) or repeats an earlier one with the
//!   same `Idempotency-Key` ([`Taken::Repeat`]).
//! * A refund follows the operation's `refund_on` ([`Failure`], [`refund_due`]): the request
//!   never reached a backend (`unreachable`), the backend failed (`status_5xx`, also a connection
//!   that broke after delivery or mid-answer), or it sent no answer head in time (`timeout`).
//!   Every refund runs in its own task ([`refund`]), so a client that hangs up meanwhile cannot
//!   cancel it.
//! * A client that hangs up before its request was delivered ([`Delivery`]) is refunded; one
//!   that hangs up after keeps its charge — the backend got the work — and the backend call is
//!   cancelled ([`Guard`], [`MeteredBody`], counted in `client_gone_after_delivery`).
//! * The answer to an idempotent request is kept for replays once it is complete ([`complete`]).
//!
//! Store trouble never silently keeps credits: a charge whose reply is lost is sent again with the
//! same charge id (the scripts apply a charge id once) to learn its fate, and when the store still
//! cannot answer, the charge id is refunded in the background until the store takes it — the
//! refund of a charge that never landed leaves a tombstone, so the charge cannot land after it.

pub mod body;

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::{OnStoreError, RefundOn};
use crate::error::GatewayError;
use crate::ledger::{
    ChargeOutcome, ChargeRequest, IdemHit, Ledger, PendingRefund, Receipt, RefundOutcome, StoredResponse, is_low,
};
use crate::metrics::{CategoryLabels, OperationLabels};

/// Counts a 402 answered for lack of credits (`creditgate_payment_required_total`).
pub fn count_payment_required(state: &AppState, operation: &Arc<str>) {
    state.metrics.payment_required.get_or_create(&OperationLabels { operation: operation.clone() }).inc();
}
use crate::state::AppState;

pub use body::{Capture, Delivery, DeliveryBody, MeteredBody};

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
/// `x-idempotent-replay: true`: the answer is the stored one of an earlier request with the key.
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
    /// The `Idempotency-Key` this charge holds, whose answer is kept for replays.
    pub idempotency_key: Option<Arc<str>>,
}

impl Charge {
    /// Sets the credit headers of a metered response.
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        write_headers(headers, self.receipt.cost, self.receipt.remaining(), self.receipt.allocation);
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

/// What the charge step decided for a request.
#[derive(Debug)]
pub enum Taken {
    /// Debited: forward it.
    Charged(Charge),
    /// An earlier request with the same idempotency key decides the answer.
    Repeat(IdemHit),
    /// This charge id was refunded before (a job attempt whose end was never recorded): a new
    /// attempt needs a new charge id.
    Refunded,
    /// The store is down and `on_error = "fail_open"`: forward uncharged (any charge that landed
    /// unseen is refunded in the background).
    Uncharged,
}

/// What [`charge`] does when the store leaves a charge's outcome unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unknown {
    /// Refund the charge id in the background (it may have landed), then fail closed or open as
    /// `store.on_error` says: a request's charge id is never sent again.
    Refund(OnStoreError),
    /// Leave it: the caller sends the same charge id again later (a job attempt), which finds
    /// the charge that landed or takes it then. A background refund racing that re-send could
    /// leave the run unpaid.
    Resend,
}

/// Takes the credits for a request (or a queued job's attempt) and counts it.
pub async fn charge(
    state: &AppState,
    unknown: Unknown,
    category: &Arc<str>,
    req: ChargeRequest<'_>,
) -> Result<Taken, GatewayError> {
    let metrics = &state.metrics;
    let started = Instant::now();
    // A client that hangs up while the step runs drops this future: a charge may land that no
    // request will use. Refund its id then (a tombstone bars it if it has not landed yet).
    // A job attempt is never cancelled that way, and re-sends its id instead.
    let hangup = OnDrop::new(|| {
        if matches!(unknown, Unknown::Refund(_)) {
            tracing::info!(charge_id = req.charge_id, "client left while its charge was being taken; refunding");
            refund_later(state.clone(), req.account.into(), req.charge_id.to_owned(), category.clone());
        }
    });
    let mut outcome = state.ledger.charge(req).await;
    // Whether a copy of the step may have reached the store (one that was not sent cannot land).
    let mut sent = !matches!(&outcome, Err(e) if e.was_not_sent());
    if outcome.is_err() && sent {
        // The reply may be lost while the charge landed: ask again under the same charge id.
        outcome = state.ledger.charge(req).await;
    }
    metrics.store_time(started.elapsed());
    // From here on nothing awaits: the caller's own guard takes over a charge.
    hangup.disarm();
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            let Unknown::Refund(on_error) = unknown else { return Err(e.into()) };
            sent |= !e.was_not_sent();
            if sent {
                // Unknown whether it landed: make sure it does not stand.
                refund_later(state.clone(), req.account.into(), req.charge_id.to_owned(), category.clone());
            }
            if on_error == OnStoreError::FailOpen {
                metrics.fail_open.inc();
                tracing::error!(error = %e, operation = req.operation, cost = req.cost, "store unavailable; fail_open: forwarding uncharged");
                return Ok(Taken::Uncharged);
            }
            // fail_closed: the error response logs the cause.
            return Err(e.into());
        }
    };
    match outcome {
        ChargeOutcome::Charged(receipt) => {
            metrics.credits_charged.get_or_create(&CategoryLabels { category: category.clone() }).inc_by(req.cost);
            Ok(Taken::Charged(Charge {
                account: req.account.into(),
                category: category.clone(),
                receipt,
                idempotency_key: req.idempotency.map(|i| i.key.into()),
            }))
        }
        ChargeOutcome::Refunded => Ok(Taken::Refunded),
        ChargeOutcome::Idempotent(hit) => Ok(Taken::Repeat(hit)),
        // Counted in `payment_required` where a 402 is answered: a queued job or a request
        // that queues instead is no 402.
        ChargeOutcome::Refused { remaining, renews_at } => Err(if remaining == 0 {
            GatewayError::NoCredits { renews_at }
        } else {
            GatewayError::InsufficientCredits { required: req.cost, remaining, renews_at }
        }),
        ChargeOutcome::NoAccount => Err(GatewayError::AccountGone),
    }
}

// === refunds ===

/// An upstream failure, as `refund_on` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The request never reached a backend.
    Unreachable,
    /// The backend answered 5xx, or its connection broke after the request was delivered.
    Status5xx,
    /// No answer head in time after delivery.
    Timeout,
    /// Never sent: every backend was at `max_in_flight` (refunded whatever `refund_on` says:
    /// the gateway itself turned it away).
    Busy,
}

impl Failure {
    /// How a forwarding error counts: nothing is "delivered" until the backend had the whole
    /// request ([`Delivery`]).
    pub fn of_error(e: &GatewayError, delivered: bool) -> Failure {
        match e {
            GatewayError::UpstreamUnreachable(_) => Failure::Unreachable,
            GatewayError::UpstreamBusy(_) => Failure::Busy,
            _ if !delivered => Failure::Unreachable,
            GatewayError::UpstreamTimeout => Failure::Timeout,
            _ => Failure::Status5xx,
        }
    }
}

/// Whether `refund_on` gives the credits back for `failure`.
pub fn refund_due(refund_on: &[RefundOn], failure: Failure) -> bool {
    let rule = match failure {
        Failure::Unreachable => RefundOn::Unreachable,
        Failure::Status5xx => RefundOn::Status5xx,
        Failure::Timeout => RefundOn::Timeout,
        Failure::Busy => return true,
    };
    refund_on.contains(&rule)
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
    /// Nothing to refund (refunded before).
    None,
    /// The store did not answer; the refund is being retried in the background.
    Pending,
}

/// Returns a charge after an upstream failure. Runs in its own task on the gateway's main
/// runtime, so neither a client that hangs up nor a worker thread that stops can cancel it; a refund the store does not take now is retried in the
/// background ([`refund_later`]).
pub async fn refund(state: &AppState, charge: &Charge) -> Refund {
    let (state, account, charge_id, category) =
        (state.clone(), charge.account.clone(), charge.receipt.charge_id.clone(), charge.category.clone());
    let task = state.background.clone().spawn(async move {
        match refund_once(&state, &account, &charge_id, &category).await {
            Ok(r) => r,
            Err(()) => {
                refund_later(state, account, charge_id, category);
                Refund::Pending
            }
        }
    });
    task.await.unwrap_or(Refund::Pending)
}

/// Like [`refund`], but without the background retry: `None` when the store did not answer, so
/// the charge may still stand. For the job runner, which then leaves the job to run again under
/// the same charge id (a background refund racing that run could make it free).
pub async fn refund_or_keep(state: &AppState, charge: &Charge) -> Option<Refund> {
    let (state, account, charge_id, category) =
        (state.clone(), charge.account.clone(), charge.receipt.charge_id.clone(), charge.category.clone());
    let task =
        state.background.clone().spawn(async move { refund_once(&state, &account, &charge_id, &category).await.ok() });
    task.await.ok().flatten()
}

/// Sets the credit headers of an answer whose charge was refunded as `outcome` says.
pub fn write_refund_headers(headers: &mut HeaderMap, charge: &Charge, outcome: Refund) {
    let (kept, remaining) = match outcome {
        Refund::Done { refunded, remaining } => (charge.receipt.cost.saturating_sub(refunded), remaining),
        Refund::None | Refund::Pending => (0, charge.receipt.remaining()),
    };
    write_headers(headers, kept, remaining, charge.receipt.allocation);
    if outcome == Refund::Pending {
        headers.insert(REFUND, HeaderValue::from_static("pending"));
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

/// How long a refund is retried: while the charge's record is still in the store
/// (`charges.record_ttl_secs`, default 24 h), less a margin of an hour (half the lifetime when
/// that is shorter) — a refund written after the record expired would find nothing to return.
pub fn refund_retry_for(record_ttl_secs: u64) -> Duration {
    Duration::from_secs(record_ttl_secs - (record_ttl_secs / 2).min(3600))
}

/// Longest pause between two tries of a refund the store did not take. Short, because until the
/// store takes it the refund lives only in this process: a longer backoff grown during an outage
/// would leave it there long after the store is back, and lost if the process dies meanwhile.
/// Cheap while the store is marked down: each try then fails at once without reaching it.
const REFUND_RETRY_MAX: Duration = Duration::from_secs(1);

/// Refunds `charge_id` in the background (a charge that never landed leaves a tombstone). The
/// refund is handed to the store as a pending refund as soon as the store takes that
/// ([`crate::ledger::Ledger::defer_refund`]; on a cluster it may while the account's shard cannot
/// take the refund itself): from then on every instance's [`spawn_refund_sweeper`] retries it,
/// and it survives this process. Until then this task retries both, at least every
/// [`REFUND_RETRY_MAX`]; it gives up —
/// loudly, for reconciliation — only when the charge record would be gone anyway, or when this
/// process stops before the store ever answered.
pub fn refund_later(state: AppState, account: Arc<str>, charge_id: String, category: Arc<str>) {
    state.background.clone().spawn(async move {
        let started = Instant::now();
        let mut wait = Duration::from_millis(200);
        let mut tries: u64 = 0;
        let retry_for = refund_retry_for(state.runtime.load().config.charges.record_ttl_secs);
        while started.elapsed() < retry_for {
            tries += 1;
            if refund_once(&state, &account, &charge_id, &category).await.is_ok() {
                return;
            }
            let pending = PendingRefund {
                account: account.to_string(),
                charge_id: charge_id.clone(),
                category: category.to_string(),
                slot: 0,
            };
            match state.ledger.defer_refund(&pending).await {
                Ok(()) => {
                    tracing::warn!(%charge_id, %account, "refund deferred to the store; any instance will write it");
                    return;
                }
                // Tries come every second during an outage: log the 1st, 2nd, 4th, 8th, …
                Err(e) if tries.is_power_of_two() => {
                    tracing::warn!(%charge_id, tries, error = %e, "refund neither written nor deferred yet")
                }
                Err(_) => {}
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(REFUND_RETRY_MAX);
        }
        tracing::error!(%charge_id, %account, ?retry_for, "REFUND FAILED while the charge record lived: reconcile this charge");
    });
}

/// How often each instance looks for deferred refunds.
pub const REFUND_SWEEP: Duration = Duration::from_secs(2);

/// Writes the refunds deferred to the store (by any instance, also one that stopped since), at
/// start and every [`REFUND_SWEEP`]. Several instances may write the same one at once: a refund
/// applies once per charge id, so the others find it done and forget it too.
pub fn spawn_refund_sweeper(
    state: AppState,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match state.ledger.pending_refunds(100).await {
                Ok(pending) => {
                    for p in pending {
                        let category: Arc<str> = p.category.as_str().into();
                        if refund_once(&state, &p.account, &p.charge_id, &category).await.is_ok() {
                            tracing::info!(charge_id = %p.charge_id, "deferred refund written");
                            if let Err(e) = state.ledger.forget_refund(&p).await {
                                tracing::warn!(error = %e, "deferred refund written but not yet forgotten");
                            }
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "deferred refunds not readable now"),
            }
            tokio::select! {
                _ = tokio::time::sleep(REFUND_SWEEP) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    })
}

// === idempotent answers ===

/// Records the end of an idempotent request in the background: its answer for replays, or
/// `None` when it is not kept (too large, or the client left). A few quick retries; if the store
/// stays away, the key answers `idempotency_key_reused` once its lease ends, which never serves
/// work for free.
pub fn complete(state: &AppState, charge: &Charge, response: Option<StoredResponse>) {
    let Some(key) = charge.idempotency_key.clone() else { return };
    let (state, account, charge_id) = (state.clone(), charge.account.clone(), charge.receipt.charge_id.clone());
    state.background.clone().spawn(async move {
        let mut wait = Duration::from_millis(100);
        for _ in 0..6 {
            match state.ledger.complete_idempotent(&account, &key, &charge_id, response.as_ref()).await {
                Ok(_) => return,
                Err(e) => tracing::warn!(%charge_id, error = %e, "idempotent answer not stored yet"),
            }
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
    });
}

/// Guards a charged request while it is forwarded. Dropped while armed (the client hung up
/// before the answer head was handed over, which also cancels the backend call): refunded if the
/// backend never had the whole request, kept otherwise.
pub struct Guard {
    armed: Option<(AppState, Charge)>,
    delivery: Delivery,
}

impl Guard {
    /// Armed for `charge`; `delivery` tells whether the backend got the request.
    pub fn new(state: &AppState, charge: Charge, delivery: Delivery) -> Self {
        Guard { armed: Some((state.clone(), charge)), delivery }
    }

    /// The forwarding step returned: the charge goes on to be settled by the caller.
    pub fn disarm(mut self) -> Charge {
        self.armed.take().expect("armed until disarmed").1
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some((state, charge)) = self.armed.take() {
            client_gone(&state, &charge, self.delivery.happened());
        }
    }
}

/// Runs a closure when dropped unless disarmed: what to undo when a client's hang-up cancels a
/// request between two steps. It holds only borrows, so it costs nothing unless it fires.
pub struct OnDrop<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> OnDrop<F> {
    /// Armed with `f`.
    pub fn new(f: F) -> Self {
        OnDrop(Some(f))
    }

    /// The step ended: nothing to undo.
    pub fn disarm(mut self) {
        self.0 = None;
    }
}

impl<F: FnOnce()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// A client hung up before its answer ended: refund what the backend never got, keep the rest.
pub fn client_gone(state: &AppState, charge: &Charge, delivered: bool) {
    if delivered {
        tracing::info!(charge_id = %charge.receipt.charge_id, "client left after the backend got the request; charge kept");
        state.metrics.client_gone_after_delivery.inc();
        complete(state, charge, None);
    } else {
        tracing::info!(charge_id = %charge.receipt.charge_id, "client left before the backend got the request; refunding");
        refund_later(state.clone(), charge.account.clone(), charge.receipt.charge_id.clone(), charge.category.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refunds_are_retried_while_the_charge_record_lives() {
        assert_eq!(refund_retry_for(86_400), Duration::from_secs(23 * 3600));
        assert_eq!(refund_retry_for(7_200), Duration::from_secs(3_600));
        // The shortest record life the config accepts: an upstream timeout plus 6 minutes.
        assert_eq!(refund_retry_for(600), Duration::from_secs(300));
    }
}
