//! The ONE place the public request path is assembled.
//!
//! ```text
//! public listener (serve_public: a path none of the router's own routes can match skips the
//!                  axum Router and goes straight to the fallback, proxy_handler)
//! ├── /v1/credits…, /v1/jobs/…     customer API (api.rs); the `Principal` extractor runs steps
//! │                                1–2 below (client address, auth, the same plan rate limit)
//! ├── /dashboard                   static page, CSP by hash (dashboard/)
//! └── fallback → proxy_handler     the metered proxy, in this order:
//!       1. request id      x-request-id kept (if sane) or generated; a tracing span carries it
//!          request line    non-standard method, %2F %5C %00 \ ; in the path → 400; path
//!                          normalised (classify/path.rs); Connection-named headers removed
//!          client address  the TCP peer, or X-Forwarded-For from a trusted proxy; a client's
//!                          own Forwarded / X-Real-IP / X-Forwarded-For dropped (proxy/headers.rs)
//!       2. auth            Bearer key → Principal {account, role, plan}  (auth/, cached);
//!                          failures limited per client address, unknown keys remembered
//!          rate limit      per account, by plan → 429 with Retry-After   (ratelimit.rs)
//!       3. route           method + path → Route (first match wins; a metered route in any
//!                          letter case, forwarded as it spells it)       (classify/)
//!       4. body limit      Content-Length > max_body_bytes → 413; streamed bodies capped
//!       5. classify        Operation::price(headers, role, body?) → cost (classify/)
//!                          body buffered only if the rule or Idempotency-Key needs it;
//!                          pricing headers bound to the price (classify::bind_headers)
//!       6. meter           one ledger step: charge (or 402/409/503, or queue); a hang-up
//!                          during the step refunds (or withdraws the job)  (meter/)
//!       7. proxy           a backend of the upstream's pool, streaming both ways; a request
//!                          no connection was made for goes to the next one (proxy/)
//!       8. settle/refund   the operation's refund_on decides (unreachable, status_5xx,
//!                          timeout); MeteredBody refunds a body that breaks off mid-stream
//! ```
//! Free routes skip 5, 6 and 8 and never touch the store beyond the cached key lookup.
//! Everything a step hands to the next is typed (`Principal`, `Price`, `Charge`), never a header.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderValue, header};
use sha2::{Digest, Sha256};
use tower::ServiceExt;
use tracing::Instrument;

use crate::auth::Principal;
use crate::classify::Operation;
use crate::classify::Price;
use crate::config::{OnEmpty, OnStoreError};
use crate::error::GatewayError;
use crate::extract::read_body;
use crate::ledger::jobs::{EnqueueOutcome, JobStore, NewJob};
use crate::ledger::{ChargeRequest, FreeOutcome, IdemHit, Idempotency, Ledger, StoredResponse};
use crate::meter::{self, Capture, Charge, Failure, MeteredBody, Taken};
use crate::proxy::{self, Forwarded, headers::REQUEST_ID};
use crate::state::{AppState, Runtime};

/// Most characters an `Idempotency-Key` may have.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

/// The public router: customer API, dashboard, and the proxy as fallback.
pub fn public_router(state: AppState) -> Router {
    crate::api::router()
        .fallback(proxy_handler)
        .method_not_allowed_fallback(|| async { GatewayError::MethodNotAllowed })
        .with_state(state)
}

/// Where every path of [`public_router`]'s own routes starts (`api.rs`, `billing/`); a route
/// added there must start with one of these.
const ROUTER_PATHS: [&str; 5] = ["/v1/credits", "/v1/jobs/", "/v1/billing/", "/dashboard", "/openapi.json"];

/// Serves one request of the public listener. A path that none of the router's own routes can
/// match goes to [`proxy_handler`] straight away, and its answer gets what the router would do
/// to it (the fallback's route future: `Content-Length` from an exact body size, no body for
/// `HEAD`, none with a 2xx to `CONNECT`) — matching the path twice (routes, then the fallback's
/// catch-all), a boxed route and a boxed handler future per request cost about as much as the
/// rest of the handler's own work. Any other path goes through `router`.
pub async fn serve_public(state: &AppState, router: Router, req: Request) -> Response {
    let path = req.uri().path();
    if ROUTER_PATHS.iter().any(|p| path.starts_with(p)) {
        return router.oneshot(req).await.unwrap_or_else(|never| match never {});
    }
    let method = req.method().clone();
    // Not boxed: the steps whose state is large (a key lookup in the store, the upstream send, a
    // metered request's steps) box their own, so this future stays small for hyper to hold.
    let mut res = proxy_handler(State(state.clone()), req).await;
    if method == http::Method::CONNECT && res.status().is_success() {
        let empty = !res.headers().contains_key(header::CONTENT_LENGTH)
            && !res.headers().contains_key(header::TRANSFER_ENCODING)
            && http_body::Body::size_hint(res.body()).lower() == 0;
        if !empty {
            res = res.map(|_| Body::empty());
        }
        return res;
    }
    if !res.headers().contains_key(header::CONTENT_LENGTH)
        && let Some(size) = http_body::Body::size_hint(res.body()).exact()
    {
        res.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    }
    if method == http::Method::HEAD {
        *res.body_mut() = Body::empty();
    }
    res
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
    let principal = crate::auth::admit(state, &rt, req.headers(), client_addr).await?;
    proxy::headers::sanitize_forwarding(req.headers_mut(), client_addr, &rt.config.server.trusted_proxies);
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
        let res = proxy::forward(state, upstream_of(&route.upstream)?, req, fwd).await;
        return with_limit(res.map(|r| r.map(Body::new)), max_body);
    };

    *label = Label::Operation(op.name.clone());
    let metered =
        Metered { state, rt: &rt, principal: &principal, op, route_upstream: &route.upstream, fwd, idem: None };
    // Boxed: a metered request's steps (charge, settle, replay, queue) make a future of several
    // kilobytes, which a free request's would otherwise carry too (and get boxed for).
    Box::pin(metered.serve(req, max_body)).await
}

/// How much longer than the upstream timeout an idempotent request may run (streaming answers
/// go on after their head) before a copy stops waiting for it.
const IDEMPOTENCY_LEASE_MARGIN_SECS: i64 = 300;

/// Longest pause between two looks at an idempotency key whose first request is running.
const IDEMPOTENCY_POLL_MAX: Duration = Duration::from_millis(250);

/// Steps 5–8 for one priced request: everything they share, with the steps as methods.
/// What pricing decided: a price, or — a retried free refresh — what its key answers.
enum Priced {
    At(Price),
    Repeat(IdemHit),
}

struct Metered<'a> {
    state: &'a AppState,
    rt: &'a Runtime,
    principal: &'a Principal,
    op: &'a Operation,
    route_upstream: &'a Arc<str>,
    fwd: Forwarded<'a>,
    idem: Option<Idempotency<'a>>,
}

// === impl Metered ===

impl Metered<'_> {
    /// Reads the body when pricing or idempotency needs it, then [`Metered::run`].
    async fn serve(self, req: Request, max_body: usize) -> Result<Response, GatewayError> {
        let Metered { state, rt, principal, op, route_upstream, fwd, .. } = self;
        let idempotency_key = idempotency_key(req.headers())?.map(str::to_owned);
        let (parts, body) = req.into_parts();
        let metered = |idem| Metered { state, rt, principal, op, route_upstream, fwd, idem };
        // A queueing operation keeps the body: it is stored with the job when the account cannot pay.
        let queues = op.on_empty == OnEmpty::Queue;
        if !(op.needs_body(&parts.headers, principal.role) || idempotency_key.is_some() || queues) {
            // Not needed for pricing: stream it on untouched.
            let res = metered(None).run(Request::from_parts(parts, body), None).await;
            return with_limit(res, max_body);
        }
        let body_bytes = read_body(body, max_body).await?;
        let fingerprint =
            idempotency_key.as_ref().map(|_| fingerprint(&parts.method, &parts.uri, &parts.headers, &body_bytes));
        // The first request with a key holds it this long; a copy waits for its answer meanwhile.
        let lease_secs = rt.upstream_timeout.as_secs() as i64 + IDEMPOTENCY_LEASE_MARGIN_SECS;
        let idem = idempotency_key.as_deref().zip(fingerprint.as_deref()).map(|(key, fingerprint)| Idempotency {
            key,
            fingerprint,
            lease_secs,
        });
        metered(idem).run(Request::from_parts(parts, Body::empty()), Some(body_bytes)).await
    }

    /// Prices, charges (or replays, or queues), forwards and settles. `body` is `Some` when it
    /// was buffered for pricing or idempotency; otherwise `req` still carries its stream.
    async fn run(&self, req: Request, body: Option<Bytes>) -> Result<Response, GatewayError> {
        let price = match self.price(req.headers(), body.as_deref()).await? {
            Priced::At(price) => price,
            Priced::Repeat(hit) => return self.answer_repeat(hit),
        };
        let upstream_name = price.upstream.as_ref().unwrap_or(self.route_upstream);
        let upstream = self
            .rt
            .upstreams
            .get(upstream_name)
            .ok_or_else(|| GatewayError::UpstreamUnavailable(format!("no upstream {upstream_name}")))?;
        let (req, job_body) = self.bind(req, body, &price)?;
        // Free and without an Idempotency-Key: nothing to record. A keyed free request takes the
        // charge step at 0 credits, which keeps its key, so that a retry is replayed.
        if price.cost == 0 && self.idem.is_none() {
            let res = proxy::forward(self.state, upstream, req, self.fwd).await?;
            return Ok(res.map(Body::new));
        }
        self.take_and_forward(upstream, upstream_name, req, job_body, price.cost).await
    }

    /// Step 1: the price, a free automatic refresh counted (or paid past its allowance) — or,
    /// for a retried refresh, what its Idempotency-Key answers.
    async fn price(&self, headers: &http::HeaderMap, body: Option<&[u8]>) -> Result<Priced, GatewayError> {
        let price = self.op.price(headers, self.principal.role, body)?;
        if price.automatic { self.automatic(price, headers, body).await } else { Ok(Priced::At(price)) }
    }

    /// Step 2: the request bound to its price — the upstream (and a queued job) sees exactly the
    /// priced headers, and a tier that names a model asks the backend for exactly that one.
    /// Returns the request to send and, for a queueing operation, its body for the job (a handle,
    /// no copy).
    fn bind(
        &self,
        mut req: Request,
        body: Option<Bytes>,
        price: &Price,
    ) -> Result<(Request, Option<Bytes>), GatewayError> {
        crate::classify::bind_headers(req.headers_mut(), Some(price));
        let body = match (price.model.as_deref(), body) {
            (Some(model), Some(b)) if !b.is_empty() => {
                let b = Bytes::from(
                    crate::classify::json::set_string_field(&b, "model", model)
                        .map_err(|e| GatewayError::from(crate::classify::ClassifyError::from(e)))?,
                );
                if req.headers().contains_key(http::header::CONTENT_LENGTH) {
                    req.headers_mut().insert(http::header::CONTENT_LENGTH, HeaderValue::from(b.len()));
                }
                Some(b)
            }
            (_, b) => b,
        };
        let job_body = body.clone().filter(|_| self.op.on_empty == OnEmpty::Queue);
        let req = match body {
            Some(b) => req.map(|_| Body::from(b)),
            None => req,
        };
        Ok((req, job_body))
    }

    /// Step 3: the charge, then what it decides — forward and settle, replay a repeat (waiting,
    /// bounded, for a first request with the same key still running), queue, or refuse.
    async fn take_and_forward(
        &self,
        upstream: &proxy::Upstream,
        upstream_name: &Arc<str>,
        req: Request,
        job_body: Option<Bytes>,
        cost: u64,
    ) -> Result<Response, GatewayError> {
        let charge_id = self.state.ids.next();
        let deadline = Instant::now() + Duration::from_millis(self.rt.config.idempotency.wait_ms);
        let mut pause = Duration::from_millis(20);
        loop {
            let repeat = match self.charge(&charge_id, cost).await {
                Ok(Taken::Charged(charge)) => return self.forward_charged(charge, upstream, req).await,
                Ok(Taken::Repeat(repeat)) => repeat,
                Ok(Taken::Uncharged) => {
                    let mut res = proxy::forward(self.state, upstream, req, self.fwd).await?;
                    res.headers_mut().insert(meter::CHARGED, HeaderValue::from_static("0"));
                    return Ok(res.map(Body::new));
                }
                // A fresh charge id cannot have been refunded, unless its reply was lost and a
                // refund overtook it: nothing was debited, and nothing is sent.
                Ok(Taken::Refunded) => {
                    return Err(GatewayError::StoreUnavailable(format!(
                        "charge {charge_id} was refunded before it landed"
                    )));
                }
                Err(GatewayError::NoCredits { .. } | GatewayError::InsufficientCredits { .. })
                    if self.op.on_empty == OnEmpty::Queue =>
                {
                    let parts = req.into_parts().0;
                    return match self.enqueue(upstream_name, parts, job_body.unwrap_or_default(), cost).await? {
                        Queued::Answer(res) => Ok(res),
                        Queued::Repeat(repeat) => self.answer_repeat(repeat),
                    };
                }
                Err(e) => {
                    if matches!(e, GatewayError::NoCredits { .. } | GatewayError::InsufficientCredits { .. }) {
                        meter::count_payment_required(self.state, &self.op.name);
                    }
                    return Err(e);
                }
            };
            match repeat {
                IdemHit::InProgress { retry_after_secs } if Instant::now() + pause >= deadline => {
                    return Err(GatewayError::IdempotencyInProgress {
                        retry_after_secs: retry_after_secs.clamp(1, 60),
                    });
                }
                // The first request with the key is running (here or on another instance):
                // wait for its answer, or for its refund, after which this one pays and runs.
                IdemHit::InProgress { .. } => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(IDEMPOTENCY_POLL_MAX);
                }
                replay => return self.answer_repeat(replay),
            }
        }
    }

    /// A free automatic refresh is counted in the period's usage; past the operation's allowance
    /// it pays like any request. A retry (its Idempotency-Key used before) counts nothing and
    /// gets what the key answers; one whose first is still running waits for it in the charge
    /// step.
    async fn automatic(
        &self,
        free: Price,
        headers: &http::HeaderMap,
        body: Option<&[u8]>,
    ) -> Result<Priced, GatewayError> {
        let (op, account) = (self.op, &self.principal.account);
        match self.state.ledger.count_free_automatic(account, &op.name, op.automatic_free_max, self.idem).await {
            Ok(FreeOutcome::Free { .. } | FreeOutcome::Idempotent(IdemHit::InProgress { .. })) => Ok(Priced::At(free)),
            Ok(FreeOutcome::Idempotent(hit)) => Ok(Priced::Repeat(hit)),
            Ok(FreeOutcome::OverCap) => Ok(Priced::At(op.price_paid(headers, body)?)),
            Ok(FreeOutcome::NoAccount) => Err(GatewayError::AccountGone),
            // Without an allowance the count is only for the usage page: serve, log the gap.
            Err(e) if op.automatic_free_max.is_none() || self.rt.config.store.on_error == OnStoreError::FailOpen => {
                tracing::warn!(error = %e, operation = %op.name, "free automatic refresh not counted (store unavailable)");
                Ok(Priced::At(free))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The charge step.
    async fn charge(&self, charge_id: &str, cost: u64) -> Result<Taken, GatewayError> {
        let rt = self.rt;
        let req = ChargeRequest {
            account: &self.principal.account,
            charge_id,
            cost,
            operation: &self.op.name,
            category: &self.op.category,
            request_id: self.fwd.request_id,
            idempotency: self.idem,
            ..rt.charge_terms()
        };
        let unknown = meter::Unknown::Refund(rt.config.store.on_error);
        let taken = meter::charge(self.state, unknown, &self.op.category, req).await?;
        if let Taken::Charged(c) = &taken {
            tracing::debug!(operation = %self.op.name, cost, "charged");
            if c.receipt.auto_topup.is_some() {
                crate::jobs::wake(self.state);
            }
        }
        Ok(taken)
    }

    /// Forwards a charged request and settles: the answer streams on in a [`MeteredBody`]; a
    /// failure is refunded as the operation's `refund_on` says.
    async fn forward_charged(
        &self,
        charge: Charge,
        upstream: &proxy::Upstream,
        req: Request,
    ) -> Result<Response, GatewayError> {
        let delivery = meter::Delivery::default();
        let req = req.map(|b| Body::new(meter::DeliveryBody::new(b, delivery.clone())));
        // Dropped with this future if the client hangs up before the answer head is out.
        let guard = meter::Guard::new(self.state, charge, delivery.clone());
        let result = proxy::forward(self.state, upstream, req, self.fwd).await;
        if result.is_ok() {
            delivery.mark();
        }
        let charge = guard.disarm();
        let failure = match &result {
            Err(e) => Some(Failure::of_error(e, delivery.happened())),
            Ok(res) if res.status().is_server_error() => Some(Failure::Status5xx),
            Ok(_) => None,
        };
        let refund_on = &self.op.refund_on;
        match (result, failure) {
            (result, Some(failure)) if meter::refund_due(refund_on, failure) => {
                let outcome = meter::refund(self.state, &charge).await;
                let mut res = match result {
                    Ok(res) => res.map(Body::new),
                    Err(e) => {
                        tracing::info!(error = %e, "upstream failed; refunded");
                        with_limit(Err(e), self.rt.config.server.max_body_bytes).into_response()
                    }
                };
                meter::write_refund_headers(res.headers_mut(), &charge, outcome);
                Ok(res)
            }
            (Ok(res), _) => Ok(self.stream(charge, res)),
            (Err(e), _) => {
                // Delivered and failed in a way `refund_on` leaves charged: the error is this
                // request's answer, kept for its idempotency key like any other.
                tracing::info!(error = %e, "upstream failed; charge kept (refund_on)");
                let res = e.into_response();
                let (mut parts, body) = res.into_parts();
                let bytes = read_body(body, usize::MAX).await.unwrap_or_default();
                if charge.idempotency_key.is_some() {
                    let mut capture = Capture::new(parts.status, &parts.headers, usize::MAX);
                    capture.push(&bytes);
                    meter::complete(self.state, &charge, capture.finish());
                }
                charge.write_headers(&mut parts.headers);
                Ok(Response::from_parts(parts, Body::from(bytes)))
            }
        }
    }

    /// The upstream's answer, streamed on with its charge settled at the end.
    fn stream(&self, charge: Charge, res: http::Response<proxy::UpstreamBody>) -> Response {
        let (mut parts, body) = res.into_parts();
        let max = self.rt.config.idempotency.max_stored_bytes;
        let capture = charge.idempotency_key.is_some().then(|| Capture::new(parts.status, &parts.headers, max));
        charge.write_headers(&mut parts.headers);
        let refund_on_break = meter::refund_due(&self.op.refund_on, Failure::Status5xx);
        let body = MeteredBody::new(body, self.state.clone(), charge, refund_on_break, capture);
        Response::from_parts(parts, Body::new(body))
    }

    /// Answers a repeat of an idempotency key from the store (a wait that ran out is an error).
    fn answer_repeat(&self, repeat: IdemHit) -> Result<Response, GatewayError> {
        match repeat {
            IdemHit::Replay { response, remaining, allocation } => Ok(replay(response, remaining, allocation)),
            IdemHit::InProgress { retry_after_secs } => {
                Err(GatewayError::IdempotencyInProgress { retry_after_secs: retry_after_secs.clamp(1, 60) })
            }
            IdemHit::Reused => Err(GatewayError::IdempotencyKeyReused),
            IdemHit::Conflict => Err(GatewayError::IdempotencyConflict),
        }
    }

    /// Queues a request its account cannot pay for yet: 202 with the job id and its `Location`.
    async fn enqueue(
        &self,
        upstream: &str,
        parts: http::request::Parts,
        body: Bytes,
        cost: u64,
    ) -> Result<Queued, GatewayError> {
        let headers: Vec<(String, String)> = parts
            .headers
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "authorization" | "host" | "content-length" | "idempotency-key"))
            .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_owned())))
            .collect();
        let max_body = self.rt.config.jobs.max_body_bytes;
        if body.len() > max_body {
            return Err(GatewayError::PayloadTooLarge { limit: max_body });
        }
        // Random per enqueue, so the job's charge ids never repeat; an Idempotency-Key makes a
        // repeat replay this 202 instead of queueing again (the store keeps it with the key).
        let job_id = format!("job_{}", crate::auth::keys::random_alnum(20));
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let new = NewJob {
            id: &job_id,
            account: &self.principal.account,
            operation: &self.op.name,
            category: &self.op.category,
            cost,
            upstream,
            method: parts.method.as_str(),
            path,
            headers: &headers,
            body: &body,
            request_id: self.fwd.request_id,
            max_queued: self.rt.config.jobs.max_queued_per_account,
            max_queued_bytes: self.rt.config.jobs.max_queued_bytes_per_account,
            idempotency: self.idem,
        };
        // A client that hangs up while the step runs never learns of the job: withdraw it.
        let hangup = meter::OnDrop::new(|| {
            tracing::info!(job_id, "client left while its request was being queued; withdrawing the job");
            withdraw_later(self.state, &self.principal.account, &job_id);
        });
        let enqueued = self.state.ledger.enqueue_job(new).await;
        hangup.disarm();
        let outcome = match enqueued {
            Ok(outcome) => outcome,
            Err(e) => {
                // The step may have run with its reply lost: the job would wait, then run paid,
                // for a request answered 503. It is withdrawn in the background (out of the
                // queue, or barred should the enqueue still arrive).
                if !e.was_not_sent() {
                    withdraw_later(self.state, &self.principal.account, &job_id);
                }
                return Err(e.into());
            }
        };
        match outcome {
            EnqueueOutcome::Queued { depth } => {
                tracing::info!(job_id, depth, operation = %self.op.name, "queued until the account can pay");
                let stored = crate::ledger::jobs::queued_response(&job_id, depth);
                let mut res = stored_response(stored);
                res.headers_mut().insert(meter::CHARGED, HeaderValue::from_static("0"));
                Ok(Queued::Answer(res))
            }
            EnqueueOutcome::Idempotent(hit) => Ok(Queued::Repeat(hit)),
            EnqueueOutcome::Full => Err(GatewayError::QueueFull { limit: self.rt.config.jobs.max_queued_per_account }),
            EnqueueOutcome::FullBytes => {
                Err(GatewayError::QueueBytesFull { limit_bytes: self.rt.config.jobs.max_queued_bytes_per_account })
            }
            EnqueueOutcome::NoAccount => Err(GatewayError::AccountGone),
        }
    }
}

/// Withdraws a job of unknown fate ([`JobStore::withdraw_job`]) on the main runtime (which
/// outlives the request), retrying until the store takes it: every 50 ms for 10 s — the job must
/// be gone before a top-up lets the runner claim it — then every second, for 10 minutes in all.
fn withdraw_later(state: &AppState, account: &str, job_id: &str) {
    let (state, account, job_id) = (state.clone(), account.to_owned(), job_id.to_owned());
    state.background.clone().spawn(async move {
        for attempt in 0..790 {
            match state.ledger.withdraw_job(&account, &job_id).await {
                Ok(true) => {
                    tracing::info!(
                        account,
                        job_id,
                        "a job of unknown fate was withdrawn (its request was answered 503)"
                    );
                    return;
                }
                Ok(false) => {
                    tracing::error!(account, job_id, "a job of unknown fate had started before it could be withdrawn");
                    return;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(if attempt < 200 { 50 } else { 1000 })).await,
            }
        }
        tracing::error!(account, job_id, "a job of unknown fate could not be withdrawn within 10 minutes");
    });
}

/// How queueing ended.
enum Queued {
    /// The 202.
    Answer(Response),
    /// The idempotency key was used before.
    Repeat(IdemHit),
}

/// A stored answer as a response.
fn stored_response(stored: StoredResponse) -> Response {
    let mut res = Response::new(Body::from(stored.body));
    *res.status_mut() = http::StatusCode::from_u16(stored.status).unwrap_or(http::StatusCode::OK);
    for (k, v) in &stored.headers {
        if let (Ok(k), Ok(v)) = (http::HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
            res.headers_mut().append(k, v);
        }
    }
    res
}

/// The replay of a stored answer: same status, headers and bytes; nothing charged.
fn replay(stored: StoredResponse, remaining: u64, allocation: u64) -> Response {
    let mut res = stored_response(stored);
    meter::write_headers(res.headers_mut(), 0, remaining, allocation);
    res.headers_mut().insert(meter::REPLAY, HeaderValue::from_static("true"));
    res
}

/// Names the configured limit in a 413 that the proxy detected while streaming the body.
fn with_limit(res: Result<Response, GatewayError>, max_body: usize) -> Result<Response, GatewayError> {
    match res {
        Err(GatewayError::PayloadTooLarge { .. }) => Err(GatewayError::PayloadTooLarge { limit: max_body }),
        other => other,
    }
}

fn idempotency_key(headers: &http::HeaderMap) -> Result<Option<&str>, GatewayError> {
    // A name, not a `&str`: a `&str` name is parsed and hashed again at every lookup.
    const IDEMPOTENCY_KEY: http::HeaderName = http::HeaderName::from_static("idempotency-key");
    let Some(v) = headers.get(IDEMPOTENCY_KEY) else { return Ok(None) };
    let key = v.to_str().ok().filter(|k| !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY);
    key.map(Some).ok_or_else(|| {
        GatewayError::BadRequest(format!(
            "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters."
        ))
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
