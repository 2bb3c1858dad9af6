//! The durable queue of work an account could not pay for yet (SPEC §4: transcriptions queue at
//! zero credits and run, oldest first, as soon as the account can pay).
//!
//! [`JobStore`] is the store side: each method is one atomic step, like [`super::Ledger`]'s.
//! Claims carry a lease so that with several gateway instances a job runs on one of them at a
//! time, and a crashed runner's job is picked up by another once its lease expires. The charge
//! of an attempt uses a charge id made of the job id and its attempt number, which only moves on
//! a recorded failure: a job re-claimed after a crash re-sends the same charge id and is not
//! charged twice.

use std::future::Future;

use serde::{Deserialize, Serialize};

use super::LedgerResult;

/// How many job ids at the head of an account's queue a claim looks at (bounds the claim's time;
/// jobs further back wait until one of these is claimed or finished). Handed to the Lua script
/// as an argument.
pub const CLAIM_SCAN: usize = 100;

/// A request to queue.
#[derive(Debug, Clone)]
pub struct NewJob<'a> {
    /// Job id (unique).
    pub id: &'a str,
    /// Paying account.
    pub account: &'a str,
    /// Operation name.
    pub operation: &'a str,
    /// Category name.
    pub category: &'a str,
    /// Credits the job costs.
    pub cost: u64,
    /// Upstream name.
    pub upstream: &'a str,
    /// HTTP method.
    pub method: &'a str,
    /// Path and query.
    pub path: &'a str,
    /// The request headers that matter (content type, tier, …).
    pub headers: &'a [(String, String)],
    /// The request body.
    pub body: &'a [u8],
    /// Request id of the original request.
    pub request_id: &'a str,
    /// Most jobs an account may have waiting.
    pub max_queued: u64,
    /// Most bytes (see [`NewJob::stored_bytes`]) an account's waiting and running jobs may
    /// hold together.
    pub max_queued_bytes: u64,
    /// The request's idempotency key: the 202 answer is kept under it ([`queued_response`]), so
    /// a repeat replays it instead of queueing (or running) the request again.
    pub idempotency: Option<super::Idempotency<'a>>,
}

/// What a queued request holds in the store and counts against `max_queued_bytes`: its method,
/// path, headers (names and values) and body — all of it is kept to be replayed.
fn stored_bytes(method: &str, path: &str, headers: &[(String, String)], body: &[u8]) -> u64 {
    (method.len() + path.len() + headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() + body.len()) as u64
}

impl NewJob<'_> {
    /// The bytes this job will hold ([`stored_bytes`]).
    pub fn stored_bytes(&self) -> u64 {
        stored_bytes(self.method, self.path, self.headers, self.body)
    }
}

/// The 202 answer to a queued request, built the same way by every store (`lua/job_enqueue.lua`
/// writes the same bytes).
pub fn queued_response(job_id: &str, depth: u64) -> super::StoredResponse {
    super::StoredResponse {
        status: 202,
        headers: queued_headers(job_id),
        body: format!("{{\"job_id\":\"{job_id}\",\"status\":\"queued\",\"queue_depth\":{depth}}}").into(),
    }
}

/// The headers of [`queued_response`].
pub fn queued_headers(job_id: &str) -> Vec<(String, String)> {
    vec![("content-type".into(), "application/json".into()), ("location".into(), format!("/v1/jobs/{job_id}"))]
}

/// A claimed job, everything needed to run it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// Job id.
    pub id: String,
    /// Paying account.
    pub account: String,
    /// Operation name.
    pub operation: String,
    /// Category name.
    pub category: String,
    /// Credits.
    pub cost: u64,
    /// Upstream name.
    pub upstream: String,
    /// HTTP method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Headers to send.
    pub headers: Vec<(String, String)>,
    /// Body to send.
    pub body: Vec<u8>,
    /// Request id of the original request.
    pub request_id: String,
    /// Failed attempts so far.
    pub attempts: u32,
    /// When it was queued, Unix seconds.
    pub created_at: i64,
}

impl Job {
    /// The bytes it holds in the store while queued ([`NewJob::stored_bytes`]).
    pub fn stored_bytes(&self) -> u64 {
        stored_bytes(&self.method, &self.path, &self.headers, &self.body)
    }

    /// The charge id of the current attempt: stable across re-claims after a crash, new after a
    /// recorded failure, and never seen before this job (job ids are random per enqueue).
    pub fn charge_id(&self) -> String {
        format!("job-{}-{}", self.id, self.attempts)
    }
}

/// How an attempt ended.
#[derive(Debug, Clone)]
pub enum JobFinish {
    /// The upstream answered (status < 500): keep the result for `retention_secs`.
    Done {
        /// Upstream status.
        status: u16,
        /// Upstream headers worth keeping (content type, …).
        headers: Vec<(String, String)>,
        /// Upstream body (capped).
        body: Vec<u8>,
        /// How long the result is kept.
        retention_secs: i64,
    },
    /// The attempt failed; try again after `delay_secs` (counts an attempt).
    Retry {
        /// Why.
        reason: String,
        /// Wait before the next attempt.
        delay_secs: i64,
    },
    /// Give up (counts an attempt); keep the failure for `retention_secs`.
    Failed {
        /// Why.
        reason: String,
        /// How long the record is kept.
        retention_secs: i64,
    },
    /// The account cannot pay (yet): back to the queue, no attempt counted.
    Release,
}

/// A job as its account sees it (`GET /v1/jobs/{id}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobView {
    /// Job id.
    pub id: String,
    /// `queued`, `running`, `done` or `failed`.
    pub status: String,
    /// Operation name.
    pub operation: String,
    /// Credits.
    pub cost: u64,
    /// Failed attempts.
    pub attempts: u32,
    /// Queued at, Unix seconds.
    pub created_at: i64,
    /// Last change, Unix seconds.
    pub updated_at: i64,
    /// Upstream status, when done.
    pub result_status: Option<u16>,
    /// Upstream headers, when done.
    pub result_headers: Vec<(String, String)>,
    /// Upstream body, when done.
    pub result_body: Option<Vec<u8>>,
    /// Why it failed (last failure while retrying).
    pub error: Option<String>,
}

/// How queuing ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnqueueOutcome {
    /// Queued; the account's queue depth now.
    Queued {
        /// Jobs waiting or running.
        depth: u64,
    },
    /// The account's queue is at `max_queued`.
    Full,
    /// This body would take the account's queue past `max_queued_bytes`.
    FullBytes,
    /// The idempotency key was used before; nothing queued.
    Idempotent(super::IdemHit),
    /// No such account.
    NoAccount,
}

/// The store side of the job queue.
pub trait JobStore: Send + Sync + 'static {
    /// Queues a job at the tail of its account's queue.
    fn enqueue_job(&self, job: NewJob<'_>) -> impl Future<Output = LedgerResult<EnqueueOutcome>> + Send;

    /// Claims the oldest queued job of `account` that is due and not leased, leasing it to
    /// `runner` for `lease_secs`.
    fn claim_job(
        &self,
        account: &str,
        runner: &str,
        lease_secs: i64,
    ) -> impl Future<Output = LedgerResult<Option<Job>>> + Send;

    /// Records how an attempt ended; `false` when `runner` no longer holds the lease.
    fn finish_job(
        &self,
        account: &str,
        job_id: &str,
        runner: &str,
        finish: JobFinish,
    ) -> impl Future<Output = LedgerResult<bool>> + Send;

    /// Withdraws a job whose queueing could not be confirmed (its request was answered 503):
    /// out of the queue if still queued, a record that stops a late enqueue if never queued;
    /// `false` when it already started (running, done, failed, expired).
    fn withdraw_job(&self, account: &str, job_id: &str) -> impl Future<Output = LedgerResult<bool>> + Send;

    /// A job of `account` (`None` for another account's job or an unknown id).
    fn job(&self, account: &str, job_id: &str) -> impl Future<Output = LedgerResult<Option<JobView>>> + Send;

    /// Jobs waiting or running for `account`.
    fn queue_depth(&self, account: &str) -> impl Future<Output = LedgerResult<u64>> + Send;

    /// Accounts that may have queued jobs.
    fn job_accounts(&self) -> impl Future<Output = LedgerResult<Vec<String>>> + Send;
}
