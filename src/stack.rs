//! The ONE place the public request path is assembled.
//!
//! ```text
//! public listener (axum Router)
//! ├── /v1/credits…, /v1/jobs/…     customer API (api.rs); auth via the `Principal` extractor
//! ├── /dashboard                   static page
//! └── fallback → proxy_handler     the metered proxy, in this order:
//!       1. request id      x-request-id kept (if sane) or generated; a tracing span carries it
//!          request line    non-standard method, %2F %5C %00 \ ; in the path → 400; path
//!                          normalised (classify/path.rs); Connection-named headers removed
//!       2. auth            Bearer key → Principal {account, role, plan}  (auth/, cached)
//!          rate limit      per account, by plan → 429 with Retry-After   (ratelimit.rs)
//!       3. route           method + path → Route (first match wins; a metered route in any
//!                          letter case, forwarded as it spells it)       (classify/)
//!       4. body limit      Content-Length > max_body_bytes → 413; streamed bodies capped
//!       5. classify        Operation::price(headers, role, body?) → cost (classify/)
//!                          body buffered only if the rule or Idempotency-Key needs it;
//!                          pricing headers bound to the price (classify::bind_headers)
//!       6. meter           one ledger step: charge (or 402/409/503)      (meter/)
//!       7. proxy           hyper client, streaming both ways             (proxy/)
//!       8. settle/refund   status ≥ 500, transport error, timeout → refund; MeteredBody
//!                          refunds if the body breaks off mid-stream
//! ```
//! Free routes skip 5, 6 and 8 and never touch the store beyond the cached key lookup.
//! Everything a step hands to the next is typed (`Principal`, `Price`, `Charge`), never a header.

use std::net::SocketAddr;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderValue, header};
use sha2::{Digest, Sha256};
use tracing::Instrument;

use crate::auth::Principal;
use crate::config::OnEmpty;
use crate::error::GatewayError;
use crate::ledger::jobs::{EnqueueOutcome, JobStore, NewJob};
use crate::ledger::{ChargeRequest, Idempotency};
use crate::meter::{self, MeteredBody};
use crate::proxy::{self, Forwarded, headers::REQUEST_ID};
use crate::state::AppState;

/// Most characters an `Idempotency-Key` may have.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

/// The public router: customer API, dashboard, and the proxy as fallback.
pub fn public_router(state: AppState) -> Router {
    crate::api::router()
        .fallback(proxy_handler)
        .method_not_allowed_fallback(|| async { GatewayError::MethodNotAllowed })
        .with_state(state)
}

/// Steps 1–8 above, for every request no other public route claimed.
pub async fn proxy_handler(State(state): State<AppState>, req: Request) -> Response {
    let started = Instant::now();
    let request_id = request_id(req.headers()).map_or_else(|| state.ids.next(), str::to_owned);
    let span = tracing::info_span!("request", id = %request_id, method = %req.method(), path = %req.uri().path());
    async move {
        let client_addr = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
        let mut label = Label::None;
        let mut res = match handle(&state, req, &request_id, client_addr, &mut label).await {
            Ok(res) => res,
            Err(e) => {
                tracing::info!(error = %e, "refused");
                e.into_response()
            }
        };
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            res.headers_mut().insert(REQUEST_ID, v);
        }
        let status = res.status().as_u16();
        state.metrics.request(label.name(), status);
        tracing::debug!(status, elapsed_us = started.elapsed().as_micros() as u64, "done");
        res
    }
    .instrument(span)
    .await
}

/// What a request was, for the request counter.
enum Label {
    None,
    Free,
    Operation(std::sync::Arc<str>),
}

static NONE: std::sync::LazyLock<std::sync::Arc<str>> = std::sync::LazyLock::new(|| "none".into());
static FREE: std::sync::LazyLock<std::sync::Arc<str>> = std::sync::LazyLock::new(|| "free".into());

impl Label {
    fn name(&self) -> &std::sync::Arc<str> {
        match self {
            Label::None => &NONE,
            Label::Free => &FREE,
            Label::Operation(op) => op,
        }
    }
}

/// Forwards and records the time to the upstream's response head.
async fn forward(
    state: &AppState,
    upstream: &proxy::Upstream,
    req: Request,
    fwd: Forwarded<'_>,
    timeout: std::time::Duration,
) -> Result<http::Response<hyper::body::Incoming>, GatewayError> {
    let started = Instant::now();
    let res = proxy::forward(&state.client, upstream, req, fwd, timeout).await;
    state.metrics.upstream_time(started.elapsed());
    res
}

/// Refuses a method or path that backends read differently, and rewrites the path to its normal
/// form (see [`crate::classify::path`]).
fn normalize_uri(req: &mut Request) -> Result<(), GatewayError> {
    crate::classify::path::check_method(req.method())?;
    crate::classify::path::check_target(req.uri().path())?;
    let std::borrow::Cow::Owned(path) = crate::classify::path::normalize(req.uri().path()) else { return Ok(()) };
    set_path(req, path)
}

/// Replaces the request's path, keeping its query.
fn set_path(req: &mut Request, path: String) -> Result<(), GatewayError> {
    let uri = req.uri();
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query =
        Some(pq.parse().map_err(|_| GatewayError::BadRequest("The request path is not valid.".into()))?);
    *req.uri_mut() =
        http::Uri::from_parts(parts).map_err(|_| GatewayError::BadRequest("The request path is not valid.".into()))?;
    Ok(())
}

/// A client-supplied request id, if it is short printable ASCII.
fn request_id(headers: &http::HeaderMap) -> Option<&str> {
    let v = headers.get(REQUEST_ID)?.to_str().ok()?;
    (!v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic())).then_some(v)
}

async fn handle(
    state: &AppState,
    req: Request,
    request_id: &str,
    client_addr: Option<SocketAddr>,
    label: &mut Label,
) -> Result<Response, GatewayError> {
    // Before anything reads the request: a standard method, a path with one meaning, and none of
    // the headers the client made hop-by-hop, so it is priced as the upstream will see it.
    let mut req = req;
    normalize_uri(&mut req)?;
    proxy::headers::strip_hop_by_hop(req.headers_mut());
    let rt = state.runtime.load_full();
    let principal = state.keys.authenticate(req.headers(), &*state.ledger).await?;
    rt.rate_limits.check(&principal.plan, &principal.account)?;
    let route = rt
        .rules
        .route(req.method(), req.uri().path())
        .ok_or_else(|| GatewayError::NotFound("No route matches this request.".into()))?;
    if let Some(path) = route.respell(req.uri().path()) {
        set_path(&mut req, path)?;
    }
    if route.operation.is_none() {
        crate::classify::bind_headers(req.headers_mut(), None);
    }
    let max_body = rt.config.server.max_body_bytes;
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max_body as u64) {
        return Err(GatewayError::PayloadTooLarge { limit: max_body });
    }
    let fwd = Forwarded { request_id, account: Some(&principal.account), client_addr };
    let upstream_of = |name: &str| {
        rt.upstreams.get(name).ok_or_else(|| GatewayError::UpstreamUnavailable(format!("no upstream {name}")))
    };

    // A body without Content-Length (chunked) is capped as it streams.
    let req = if declared.is_some() { req } else { req.map(|b| Body::new(http_body_util::Limited::new(b, max_body))) };

    let Some(op) = rt.rules.operation(route) else {
        *label = Label::Free;
        let res = forward(state, upstream_of(&route.upstream)?, req, fwd, rt.upstream_timeout).await;
        return with_limit(res.map(|r| r.map(Body::new)), max_body);
    };

    *label = Label::Operation(op.name.clone());
    let idempotency_key = idempotency_key(req.headers())?.map(str::to_owned);
    let (parts, body) = req.into_parts();
    // A queueing operation keeps the body: it is stored with the job when the account cannot pay.
    let queues = op.on_empty == OnEmpty::Queue;
    if !(op.needs_body(&parts.headers, principal.role) || idempotency_key.is_some() || queues) {
        // Not needed for pricing: stream it on untouched.
        let req = Request::from_parts(parts, body);
        let res = metered(state, &rt, &principal, op, &route.upstream, req, None, None, fwd).await;
        return with_limit(res, max_body);
    }
    let body_bytes = read_body(body, max_body).await?;
    let fingerprint =
        idempotency_key.as_ref().map(|_| fingerprint(&parts.method, &parts.uri, &parts.headers, &body_bytes));
    let idem =
        idempotency_key.as_deref().zip(fingerprint.as_deref()).map(|(key, fp)| Idempotency { key, fingerprint: fp });
    let req = Request::from_parts(parts, Body::empty());
    // A copy of a request still running here waits for it (until its answer head is out).
    let _slot = match &idempotency_key {
        Some(key) => Some(state.inflight.enter(&principal.account, key).await),
        None => None,
    };
    metered(state, &rt, &principal, op, &route.upstream, req, Some(body_bytes), idem, fwd).await
}

/// Steps 5–8 for a priced route. `body` is `Some` when it was buffered for pricing; otherwise the
/// request still carries its streaming body.
#[allow(clippy::too_many_arguments)]
async fn metered(
    state: &AppState,
    rt: &crate::state::Runtime,
    principal: &Principal,
    op: &crate::classify::Operation,
    route_upstream: &std::sync::Arc<str>,
    req: Request,
    body: Option<Bytes>,
    idem: Option<Idempotency<'_>>,
    fwd: Forwarded<'_>,
) -> Result<Response, GatewayError> {
    let price = op.price(req.headers(), principal.role, body.as_deref())?;
    let mut req = req;
    crate::classify::bind_headers(req.headers_mut(), Some(&price));
    // A queueing operation always has its body buffered; keep a handle (no copy) for the job.
    let job_body = body.clone().filter(|_| op.on_empty == OnEmpty::Queue);
    let req = match body {
        Some(b) => req.map(|_| Body::from(b)),
        None => req,
    };
    let upstream_name = price.upstream.as_ref().unwrap_or(route_upstream);
    let upstream = rt
        .upstreams
        .get(upstream_name)
        .ok_or_else(|| GatewayError::UpstreamUnavailable(format!("no upstream {upstream_name}")))?;
    if price.cost == 0 {
        let res = forward(state, upstream, req, fwd, rt.upstream_timeout).await?;
        return Ok(res.map(Body::new));
    }
    let charge_id = state.ids.next();
    let charge_req = ChargeRequest {
        account: &principal.account,
        charge_id: &charge_id,
        cost: price.cost,
        operation: &op.name,
        category: &op.category,
        request_id: fwd.request_id,
        idempotency: idem,
        thresholds: &rt.config.notifications.thresholds_percent,
        auto_topup_max_per_period: rt.config.auto_topup.max_per_period,
    };
    let on_error = rt.config.store.on_error;
    // Armed before the charge is sent: if this request is dropped (the client hangs up) at any
    // point before its answer is handed over, the charge id is refunded.
    let mut guard = meter::RefundGuard::new(state, &principal.account, &charge_id, &op.category);
    let charge = match meter::charge(state, on_error, &op.name, &op.category, charge_req).await {
        Err(GatewayError::NoCredits { .. } | GatewayError::InsufficientCredits { .. })
            if op.on_empty == OnEmpty::Queue =>
        {
            guard.disarm();
            let body = job_body.unwrap_or_default();
            let parts = req.into_parts().0;
            return enqueue(state, rt, principal, op, upstream_name, parts, body, price.cost, fwd.request_id, idem)
                .await;
        }
        Err(e) => {
            // Nothing charged (or a background refund already covers an unknown outcome).
            guard.disarm();
            return Err(e);
        }
        Ok(charge) => charge,
    };
    match &charge {
        Some(c) if !c.replayed => {}
        // A replay or fail_open charged nothing now; fail_open's unknown charge is refunded already.
        _ => guard.disarm(),
    }
    if charge.as_ref().is_some_and(|c| c.receipt.auto_topup.is_some()) {
        crate::jobs::wake(state);
    }
    tracing::debug!(operation = %op.name, tier = ?price.tier, cost = price.cost, "charged");
    let result = forward(state, upstream, req, fwd, rt.upstream_timeout).await;
    let Some(charge) = charge else {
        // fail_open: forwarded uncharged.
        let mut res = result?.map(Body::new);
        res.headers_mut().insert(meter::CHARGED, HeaderValue::from_static("0"));
        return Ok(res);
    };
    guard.disarm();
    match result {
        Err(e) => {
            meter::refund(state, &charge).await;
            Err(e)
        }
        Ok(res) if res.status().is_server_error() => {
            let outcome = meter::refund(state, &charge).await;
            let mut res = res.map(Body::new);
            match outcome {
                meter::Refund::Done { refunded, remaining } => {
                    let kept = charge.charged().saturating_sub(refunded);
                    meter::write_headers(res.headers_mut(), kept, remaining, charge.receipt.allocation);
                }
                meter::Refund::None => {
                    meter::write_headers(res.headers_mut(), 0, charge.receipt.remaining(), charge.receipt.allocation);
                }
                meter::Refund::Pending => {
                    meter::write_headers(res.headers_mut(), 0, charge.receipt.remaining(), charge.receipt.allocation);
                    res.headers_mut().insert(meter::REFUND, HeaderValue::from_static("pending"));
                }
            }
            Ok(res)
        }
        Ok(res) => {
            let (mut parts, body) = res.into_parts();
            charge.write_headers(&mut parts.headers);
            Ok(Response::from_parts(parts, Body::new(MeteredBody::new(body, state.clone(), charge))))
        }
    }
}

/// Queues a request its account cannot pay for yet: 202 with the job id and its `Location`.
#[allow(clippy::too_many_arguments)]
async fn enqueue(
    state: &AppState,
    rt: &crate::state::Runtime,
    principal: &Principal,
    op: &crate::classify::Operation,
    upstream: &str,
    parts: http::request::Parts,
    body: Bytes,
    cost: u64,
    request_id: &str,
    idem: Option<Idempotency<'_>>,
) -> Result<Response, GatewayError> {
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "authorization" | "host" | "content-length" | "idempotency-key"))
        .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_owned())))
        .collect();
    // With an Idempotency-Key the job id follows from it, so a repeat lands on the same job (a
    // re-sent enqueue changes nothing) instead of queueing — and later paying for — a copy.
    let job_id = match idem {
        Some(i) => {
            let digest = Sha256::new().chain_update(principal.account.as_bytes()).chain_update([0]).chain_update(i.key);
            format!("job_{}", &hex::encode(digest.finalize())[..24])
        }
        None => format!("job_{}", crate::auth::keys::random_alnum(20)),
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let new = NewJob {
        id: &job_id,
        account: &principal.account,
        operation: &op.name,
        category: &op.category,
        cost,
        upstream,
        method: parts.method.as_str(),
        path,
        headers: &headers,
        body: &body,
        request_id,
        max_queued: rt.config.jobs.max_queued_per_account,
    };
    match state.ledger.enqueue_job(new).await? {
        EnqueueOutcome::Queued { depth } => {
            tracing::info!(job_id, depth, operation = %op.name, "queued until the account can pay");
            let body = serde_json::json!({"job_id": job_id, "status": "queued", "queue_depth": depth});
            let mut res = (http::StatusCode::ACCEPTED, axum::Json(body)).into_response();
            let location = format!("/v1/jobs/{job_id}");
            res.headers_mut().insert(header::LOCATION, HeaderValue::from_str(&location).expect("ascii id"));
            meter::write_headers(res.headers_mut(), 0, 0, 0);
            res.headers_mut().remove(meter::REMAINING);
            res.headers_mut().remove(meter::LOW);
            Ok(res)
        }
        EnqueueOutcome::Full => Err(GatewayError::QueueFull { limit: rt.config.jobs.max_queued_per_account }),
        EnqueueOutcome::NoAccount => {
            Err(GatewayError::Unauthorized("The account of this API key no longer exists.".into()))
        }
    }
}

/// Names the configured limit in a 413 that the proxy detected while streaming the body.
fn with_limit(res: Result<Response, GatewayError>, max_body: usize) -> Result<Response, GatewayError> {
    match res {
        Err(GatewayError::PayloadTooLarge { .. }) => Err(GatewayError::PayloadTooLarge { limit: max_body }),
        other => other,
    }
}

fn idempotency_key(headers: &http::HeaderMap) -> Result<Option<&str>, GatewayError> {
    let Some(v) = headers.get("idempotency-key") else { return Ok(None) };
    let key = v.to_str().ok().filter(|k| !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY);
    key.map(Some).ok_or_else(|| {
        GatewayError::BadRequest(format!(
            "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters."
        ))
    })
}

/// Reads a whole body, refusing more than `limit` bytes.
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, GatewayError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = source {
            if s.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                return GatewayError::PayloadTooLarge { limit };
            }
            source = s.source();
        }
        GatewayError::BadRequest("The request body could not be read.".into())
    })
}

/// Hex SHA-256 over method, path with query, the headers that set the price (`x-ai-tier`,
/// `x-trigger`) and body: what an idempotency key is bound to. A replay may not change the tier.
fn fingerprint(method: &http::Method, uri: &http::Uri, headers: &http::HeaderMap, body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(method.as_str().as_bytes());
    h.update([0]);
    h.update(uri.path_and_query().map_or("/", |p| p.as_str()).as_bytes());
    for name in [crate::classify::TIER_HEADER, crate::classify::TRIGGER_HEADER] {
        h.update([0]);
        for v in headers.get_all(name) {
            h.update(v.as_bytes());
            h.update([1]);
        }
    }
    h.update([0]);
    h.update(body);
    hex::encode(h.finalize())
}
