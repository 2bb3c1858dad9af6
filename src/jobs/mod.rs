//! The job runner: queued requests run, oldest first per account, as soon as the account can pay.
//!
//! Each gateway instance runs one runner. A round looks at the accounts with queued jobs (idle
//! accounts cost nothing) and drains each in its own task: claim the oldest due job (a lease in
//! the store, so one instance runs it), charge it through the same metering code as the proxy
//! ([`crate::meter`]; charge id `job-<id>-<attempt>`: a job re-claimed after a crash re-sends the
//! same charge id and is not charged twice; one whose attempt was refunded but never recorded
//! finds that charge id refunded and starts a new attempt), forward it, store the answer. When the account cannot pay, the job goes back
//! and the account rests until its renewal — or until a top-up on this instance wakes the runner
//! ([`wake`]). An upstream failure refunds the charge and retries with exponential backoff up to
//! `jobs.max_attempts`, then marks the job `failed`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use http::{HeaderName, HeaderValue, Method, Request};
use http_body_util::BodyExt;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::calendar::now;
use crate::config::RefundOn;
use crate::error::GatewayError;
use crate::ledger::ChargeRequest;
use crate::ledger::jobs::{Job, JobFinish, JobStore};
use crate::meter::{self, Charge, Delivery, DeliveryBody, Failure, Taken};
use crate::proxy::{self, Forwarded};
use crate::state::AppState;

/// How often accounts with queued jobs are looked at without a wake-up.
pub const POLL: Duration = Duration::from_secs(1);
/// Longest rest of an account that could not pay (a top-up elsewhere is seen by then).
const MAX_REST_SECS: i64 = 30;

/// Wakes this instance's runner (after a top-up or an auto top-up).
pub fn wake(state: &AppState) {
    state.jobs_wake.notify_one();
}

/// Starts the runner; it ends when `shutdown` turns true.
pub fn spawn(state: AppState, mut shutdown: tokio::sync::watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let runner_id = format!("runner-{}", crate::auth::keys::random_alnum(12));
        let resting: Arc<Mutex<HashMap<String, i64>>> = Arc::default();
        let busy: Arc<Mutex<HashSet<String>>> = Arc::default();
        let slots = Arc::new(Semaphore::new(state.runtime.load().config.jobs.concurrency));
        // Queues whose index entry was lost (a crash between the enqueue and the index write).
        if let crate::store::Store::Redis(r) = &*state.ledger {
            match r.sweep_job_queues().await {
                Ok(n) if n > 0 => tracing::info!(accounts = n, "job runner: re-indexed queues"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "job runner: queue sweep failed"),
            }
        }
        loop {
            let woken = tokio::select! {
                _ = state.jobs_wake.notified() => true,
                _ = tokio::time::sleep(POLL) => false,
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            if woken {
                resting.lock().expect("lock").clear();
            }
            let accounts = match state.ledger.job_accounts().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "job runner: cannot list queued accounts");
                    continue;
                }
            };
            let mut queued = 0;
            for account in accounts {
                queued += state.ledger.queue_depth(&account).await.unwrap_or(0);
                let t = now();
                if resting.lock().expect("lock").get(&account).is_some_and(|until| *until > t) {
                    continue;
                }
                if !busy.lock().expect("lock").insert(account.clone()) {
                    continue;
                }
                let (state, runner_id, resting, busy, slots) =
                    (state.clone(), runner_id.clone(), resting.clone(), busy.clone(), slots.clone());
                tokio::spawn(async move {
                    if let Some(until) = drain(&state, &account, &runner_id, &slots).await {
                        resting.lock().expect("lock").insert(account.clone(), until);
                    }
                    busy.lock().expect("lock").remove(&account);
                });
            }
            state.metrics.jobs_queued.set(queued as i64);
        }
    })
}

/// Runs an account's due jobs; `Some(until)` when the account cannot pay and should rest.
async fn drain(state: &AppState, account: &str, runner: &str, slots: &Semaphore) -> Option<i64> {
    loop {
        let _slot = slots.acquire().await.ok()?;
        let rt = state.runtime.load_full();
        let lease = rt.upstream_timeout.as_millis().div_ceil(1000) as i64 + rt.config.jobs.lease_margin_secs as i64;
        let job = match state.ledger.claim_job(account, runner, lease).await {
            Ok(Some(job)) => job,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(error = %e, account, "job runner: claim failed");
                return None;
            }
        };
        let charge_id = job.charge_id();
        let category: Arc<str> = job.category.as_str().into();
        let req = ChargeRequest {
            account,
            charge_id: &charge_id,
            cost: job.cost,
            operation: &job.operation,
            category: &job.category,
            request_id: &job.request_id,
            ..rt.charge_terms()
        };
        // An unknown outcome is settled by the next claim re-sending this very charge id.
        match meter::charge(state, meter::Unknown::Resend, &category, req).await {
            Ok(Taken::Charged(charge)) => {
                tracing::info!(job_id = %job.id, account, cost = charge.receipt.cost, "job charged; running");
                state.metrics.jobs_running.inc();
                run(state, &rt, &job, runner, &charge).await;
                state.metrics.jobs_running.dec();
            }
            Ok(Taken::Refunded) => {
                // This attempt failed and was refunded, but its end was never recorded: count it
                // and run again under a new charge id — never under the refunded one, for free.
                tracing::warn!(job_id = %job.id, charge_id, "job attempt was refunded before; starting a new attempt");
                let finish = JobFinish::Retry { reason: "attempt refunded".into(), delay_secs: 1 };
                let _ = state.ledger.finish_job(account, &job.id, runner, finish).await;
            }
            Err(GatewayError::NoCredits { renews_at } | GatewayError::InsufficientCredits { renews_at, .. }) => {
                let _ = state.ledger.finish_job(account, &job.id, runner, JobFinish::Release).await;
                return Some(renews_at.min(now() + MAX_REST_SECS));
            }
            Err(GatewayError::StoreUnavailable(e)) => {
                tracing::warn!(error = %e, job_id = %job.id, "job runner: store unavailable; job released");
                let _ = state.ledger.finish_job(account, &job.id, runner, JobFinish::Release).await;
                return Some(now() + 5);
            }
            other => {
                tracing::error!(job_id = %job.id, outcome = ?other, "job runner: unexpected charge outcome");
                let finish =
                    JobFinish::Failed { reason: format!("cannot charge: {other:?}"), retention_secs: retention(&rt) };
                let _ = state.ledger.finish_job(account, &job.id, runner, finish).await;
            }
        }
    }
}

fn retention(rt: &crate::state::Runtime) -> i64 {
    rt.config.jobs.result_retention_hours as i64 * 3600
}

/// Sends a charged job upstream and records the outcome. A failure is refunded (and the job
/// retried) exactly when the operation's `refund_on` names it, as for a request sent directly;
/// otherwise the attempt stays paid: a 5xx answer becomes the job's result, a timeout or a broken
/// connection after delivery ends the job `failed`.
async fn run(state: &AppState, rt: &crate::state::Runtime, job: &Job, runner: &str, charge: &Charge) {
    let cfg = &rt.config.jobs;
    // The whole attempt (head and body) must end well inside the lease, or another instance
    // could take the job over while this one still reads the answer.
    let budget = rt.upstream_timeout + Duration::from_secs(cfg.lease_margin_secs / 2);
    let delivery = Delivery::default();
    let outcome = match tokio::time::timeout(budget, send(state, rt, job, &delivery)).await {
        Ok(Ok(answer)) if answer.0 >= 500 => {
            Err((Failure::Status5xx, format!("upstream answered {}", answer.0), Some(answer)))
        }
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err((failure, reason))) => Err((failure, reason, None)),
        Err(_) => {
            let failure = if delivery.happened() { Failure::Timeout } else { Failure::Unreachable };
            Err((failure, format!("no complete answer within {} s", budget.as_secs()), None))
        }
    };
    let refund_on = rt.rules.operation_named(&job.operation).map_or(DEFAULT_REFUND_ON, |op| op.refund_on.as_slice());
    let done = |(status, headers, body)| JobFinish::Done { status, headers, body, retention_secs: retention(rt) };
    let finish = match outcome {
        Ok(answer) => done(answer),
        // Delivered and failed in a way the operation keeps charged: the attempt is paid.
        Err((failure, reason, answer)) if !meter::refund_due(refund_on, failure) => {
            tracing::info!(job_id = %job.id, ?failure, reason, "job attempt failed; charge kept (refund_on)");
            match answer {
                Some(answer) => done(answer),
                None => JobFinish::Failed { reason, retention_secs: retention(rt) },
            }
        }
        Err((_, reason, _)) => {
            match meter::refund_or_keep(state, charge).await {
                Some(r) => tracing::info!(job_id = %job.id, outcome = ?r, "job attempt failed; refunded"),
                None => {
                    // Leave the job leased: once the lease runs out it runs again under this very
                    // charge id — the charge that stands pays for the run that succeeds, and if
                    // the refund did land unseen, the charge id answers "refunded" and a new
                    // attempt pays.
                    tracing::warn!(job_id = %job.id, charge_id = %charge.receipt.charge_id, "job attempt failed and the refund could not be written; the job will run again under the same charge");
                    return;
                }
            }
            if job.attempts + 1 >= cfg.max_attempts {
                JobFinish::Failed { reason, retention_secs: retention(rt) }
            } else {
                let delay_ms = cfg.retry_base_ms.saturating_mul(1 << job.attempts.min(16));
                JobFinish::Retry { reason, delay_secs: (delay_ms / 1000).max(1) as i64 }
            }
        }
    };
    let kind = match &finish {
        JobFinish::Done { .. } => "done",
        JobFinish::Failed { .. } => "failed",
        _ => "retry",
    };
    match state.ledger.finish_job(&job.account, &job.id, runner, finish).await {
        Ok(true) => tracing::info!(job_id = %job.id, outcome = kind, "job finished"),
        Ok(false) => tracing::warn!(job_id = %job.id, "job lease lost before finishing; another runner owns it"),
        Err(e) => tracing::error!(job_id = %job.id, error = %e, "job result could not be stored; it will run again"),
    }
}

/// The refund rules of a job whose operation the running config no longer has: the defaults.
const DEFAULT_REFUND_ON: &[RefundOn] = &[RefundOn::Unreachable, RefundOn::Status5xx];

/// Headers of an upstream answer kept in a job result.
const KEPT: [&str; 3] = ["content-type", "content-language", "x-request-id"];

type Answer = (u16, Vec<(String, String)>, Vec<u8>);

/// One attempt: the upstream's whole answer (any status), or how it failed.
async fn send(
    state: &AppState,
    rt: &crate::state::Runtime,
    job: &Job,
    delivery: &Delivery,
) -> Result<Answer, (Failure, String)> {
    let unreachable = |reason: String| (Failure::Unreachable, reason);
    let upstream =
        rt.upstreams.get(&job.upstream).ok_or_else(|| unreachable(format!("unknown upstream {}", job.upstream)))?;
    let method = Method::from_bytes(job.method.as_bytes()).map_err(|e| unreachable(e.to_string()))?;
    let mut req = Request::builder().method(method).uri(&job.path);
    for (k, v) in &job.headers {
        if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
            req = req.header(k, v);
        }
    }
    // The job id lets an idempotent upstream recognise a re-run after a runner crash.
    req = req.header("idempotency-key", format!("job-{}", job.id));
    let body = Body::new(DeliveryBody::new(Body::from(job.body.clone()), delivery.clone()));
    let req = req.body(body).map_err(|e| unreachable(e.to_string()))?;
    let fwd = Forwarded { request_id: &job.request_id, account: Some(&job.account), client_addr: None };
    let res = proxy::forward(state, upstream, req, fwd)
        .await
        .map_err(|e| (Failure::of_error(&e, delivery.happened()), e.to_string()))?;
    delivery.mark();
    let status = res.status().as_u16();
    let mut headers: Vec<(String, String)> = res
        .headers()
        .iter()
        .filter(|(k, _)| KEPT.contains(&k.as_str()))
        .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_owned())))
        .collect();
    let cap = rt.config.jobs.max_result_bytes;
    let mut body = Vec::new();
    let mut incoming = res.into_body();
    while let Some(frame) = incoming.frame().await {
        let frame = frame.map_err(|e| (Failure::Status5xx, format!("upstream body failed: {e}")))?;
        if let Ok(data) = frame.into_data() {
            let room = cap - body.len();
            body.extend_from_slice(&data[..data.len().min(room)]);
            if data.len() > room {
                headers.push(("x-creditgate-truncated".into(), "true".into()));
                break;
            }
        }
    }
    Ok((status, headers, body))
}
