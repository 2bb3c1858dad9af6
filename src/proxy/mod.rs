//! The forwarding half of the gateway: a pooled keep-alive hyper client, upstream pools that
//! heal ([`pool`]), URI rewrite and the header rules of RFC 9110 §7.6.1 (hop-by-hop fields are
//! not forwarded, in either direction). Bodies stream both ways; nothing here buffers them.

pub mod body;
mod h1;
pub mod headers;
mod outgoing;
pub mod pool;
mod resend;
pub mod tls;

pub use body::UpstreamBody;
use pool::Pool;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use http::uri::PathAndQuery;
use http::{HeaderName, HeaderValue, Request, Response, Uri};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::config::{Config, ConfigError, UpstreamUrl, parse_upstream_url};
use crate::error::GatewayError;

/// The shared upstream client: one connection pool for every upstream, kept across reloads;
/// `http://` and `https://` ([`tls`]).
pub type Client = HyperClient<hyper_rustls::HttpsConnector<HttpConnector>, Body>;

/// The upstream clients of one gateway: one per public-listener worker thread, so a worker's
/// upstream connections are driven by its own runtime and never shared with another thread, and
/// one for everything else (admin listener, job runner, notifier).
pub struct Clients {
    id: usize,
    shared: Client,
    workers: Vec<Client>,
    /// What the workers' own HTTP/1 pools ([`h1`]) open plain `http://` connections with: the
    /// clients' connector (address fallback, per-address time limit, socket options).
    connector: HttpConnector,
}

/// Gateways in this process, numbered (tests run several).
static CLIENTS_IDS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// On a worker thread: which gateway's clients, and which worker it is.
    static WORKER: std::cell::Cell<Option<(usize, usize)>> = const { std::cell::Cell::new(None) };
}

impl Clients {
    /// `workers` worker clients plus the shared one, trusting what `tls` says (`tls.ca_file`,
    /// read at start).
    pub fn new(connect_timeout: Duration, workers: usize, tls: &tls::TlsSettings) -> Result<Self, ConfigError> {
        Ok(Clients {
            id: CLIENTS_IDS.fetch_add(1, Ordering::Relaxed),
            shared: client(connect_timeout, tls, "tls.ca_file")?,
            workers: (0..workers).map(|_| client(connect_timeout, tls, "tls.ca_file")).collect::<Result<_, _>>()?,
            connector: connector(connect_timeout),
        })
    }

    /// Marks the calling thread as worker `index` of this gateway.
    pub fn enter_worker(&self, index: usize) {
        WORKER.with(|w| w.set(Some((self.id, index))));
    }

    /// The client of the calling thread.
    pub fn get(&self) -> &Client {
        match WORKER.with(std::cell::Cell::get) {
            Some((id, index)) if id == self.id => &self.workers[index],
            _ => &self.shared,
        }
    }
}

/// The worker index of the calling thread, if it is a public-listener worker.
fn worker_index() -> Option<usize> {
    WORKER.with(std::cell::Cell::get).map(|(_, index)| index)
}

/// Builds an upstream client; `key` names the config key a bad TLS file is reported under.
pub fn client(connect_timeout: Duration, tls: &tls::TlsSettings, key: &str) -> Result<Client, ConfigError> {
    let mut connector = connector(connect_timeout);
    // The TLS layer needs to see `https://` URIs.
    connector.enforce_http(false);
    Ok(HyperClient::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(512)
        .build(tls.connector(connector, key)?))
}

/// A TCP connector: `TCP_NODELAY`, keep-alive probes after 60 s, `connect_timeout` shared out
/// over the addresses a name resolves to (and the other address family tried after 300 ms).
fn connector(connect_timeout: Duration) -> HttpConnector {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_keepalive(Some(Duration::from_secs(60)));
    connector
}

/// Most worker threads (`server.workers`), plus the slot for every other thread.
const CLIENT_SLOTS: usize = 257;

/// The clients of an upstream with TLS settings of its own: one per thread that uses it, made on
/// first use (a worker's connections stay on its runtime, as with [`Clients`]).
struct OwnClients {
    settings: tls::TlsSettings,
    connect_timeout: Duration,
    slots: Box<[OnceLock<Client>]>,
}

impl std::fmt::Debug for OwnClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnClients").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl OwnClients {
    fn get(&self) -> &Client {
        let slot = worker_index().map_or(0, |i| (i + 1).min(CLIENT_SLOTS - 1));
        self.slots[slot].get_or_init(|| {
            client(self.connect_timeout, &self.settings, "upstream").expect("checked when the config was loaded")
        })
    }
}

/// One named upstream: its backends ([`pool::Pool`]), credentials and limits.
#[derive(Debug)]
pub struct Upstream {
    /// Name from the config.
    pub name: Arc<str>,
    /// The backends and how they are chosen.
    pub pool: Pool,
    headers: Vec<(HeaderName, HeaderValue)>,
    /// With `ca_file`, a client certificate, `http2 = false` or a `connect_timeout_ms` of its
    /// own: clients of its own.
    own: Option<OwnClients>,
    /// `connect_timeout_ms` (default `server.connect_timeout_ms`): how long an attempt may take
    /// to get a connection (TLS handshake included) that takes the request.
    connect_timeout: Duration,
    /// `first_byte_timeout_ms` (default `server.upstream_timeout_ms`), from the moment a
    /// connection took the request.
    pub first_byte_timeout: Duration,
    /// `stream_idle_timeout_ms`.
    stream_idle_timeout: Option<Duration>,
    /// `health_path` and `health_interval_ms`.
    health: Option<(PathAndQuery, Duration)>,
    /// When the active health check last ran (ms on the pool clock; 0: never).
    last_check: std::sync::atomic::AtomicU64,
}

/// Every upstream of one config generation.
#[derive(Debug, Default)]
pub struct Upstreams {
    map: HashMap<Arc<str>, Arc<Upstream>>,
}

impl Upstreams {
    /// Builds the pools, resolving `env:NAME` header values now (a missing variable is a config error).
    pub fn new(config: &Config, env: &impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut map = HashMap::new();
        for (name, up) in &config.upstreams {
            let mut headers = Vec::new();
            for (h, v) in &up.headers {
                let key = format!("upstreams.{name}.headers.{h}");
                let value = match v.strip_prefix("env:") {
                    Some(var) => env(var).ok_or_else(|| ConfigError {
                        key: key.clone(),
                        reason: format!("environment variable {var} is not set"),
                    })?,
                    None => v.clone(),
                };
                let value = HeaderValue::from_str(&value)
                    .map_err(|_| ConfigError { key: key.clone(), reason: "not a valid header value".into() })?;
                headers.push((HeaderName::from_bytes(h.as_bytes()).expect("validated"), value));
            }
            let settings = tls::TlsSettings {
                ca_files: up.ca_file.iter().chain(&config.tls.ca_file).cloned().collect(),
                client_cert: up.client_cert_file.clone().zip(up.client_key_file.clone()),
                http2: up.http2,
            };
            let connect_timeout =
                Duration::from_millis(up.connect_timeout_ms.unwrap_or(config.server.connect_timeout_ms));
            let own = if up.ca_file.is_some()
                || settings.client_cert.is_some()
                || !up.http2
                || up.connect_timeout_ms.is_some_and(|ms| ms != config.server.connect_timeout_ms)
            {
                // Read the files now: a bad one refuses the config, not a request later.
                settings.client_config(&format!("upstreams.{name}"))?;
                Some(OwnClients {
                    settings,
                    connect_timeout,
                    slots: (0..CLIENT_SLOTS).map(|_| OnceLock::new()).collect(),
                })
            } else {
                None
            };
            let name: Arc<str> = name.as_str().into();
            let urls = up
                .urls
                .iter()
                .map(|u| {
                    let label = crate::running::redact_url(u).unwrap_or_else(|| u.clone());
                    (parse_upstream_url(u).expect("validated"), Arc::from(label))
                })
                .collect();
            let pool = Pool::new(
                &name,
                urls,
                up.balance,
                up.max_in_flight,
                up.eject_after,
                Duration::from_millis(up.eject_ms),
            );
            let health = up.health_path.as_ref().map(|p| {
                (PathAndQuery::try_from(p.as_str()).expect("validated"), Duration::from_millis(up.health_interval_ms))
            });
            let upstream = Upstream {
                name: name.clone(),
                pool,
                headers,
                own,
                connect_timeout,
                first_byte_timeout: Duration::from_millis(
                    up.first_byte_timeout_ms.unwrap_or(config.server.upstream_timeout_ms),
                ),
                stream_idle_timeout: up.stream_idle_timeout_ms.map(Duration::from_millis),
                health,
                last_check: Default::default(),
            };
            map.insert(name, Arc::new(upstream));
        }
        Ok(Upstreams { map })
    }

    /// The pool with that name.
    pub fn get(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.map.get(name)
    }

    /// Keeps the health and figures of `old`'s backends that are still configured (a reload);
    /// only before this generation is shared.
    pub fn adopt(&mut self, old: &Upstreams) {
        for (name, up) in &mut self.map {
            if let (Some(up), Some(prev)) = (Arc::get_mut(up), old.map.get(name)) {
                up.pool.adopt(&prev.pool);
            }
        }
    }

    /// Every backend, by upstream name then config order.
    pub fn backends(&self) -> Vec<Arc<pool::Backend>> {
        let mut names: Vec<&Arc<str>> = self.map.keys().collect();
        names.sort();
        names.iter().flat_map(|n| self.map[*n].pool.backends().iter().cloned()).collect()
    }

    /// The longest time any upstream may take to its answer head (leases outlast it).
    pub fn longest_first_byte_timeout(&self) -> Duration {
        self.map.values().map(|u| u.first_byte_timeout).max().unwrap_or_default()
    }
}

/// Who the request is for, told to the upstream.
#[derive(Debug, Clone, Copy)]
pub struct Forwarded<'a> {
    /// `x-request-id`.
    pub request_id: &'a str,
    /// Authenticated account, when there is one.
    pub account: Option<&'a str>,
    /// The client's address (`x-forwarded-for`).
    pub client_addr: Option<SocketAddr>,
}

/// Sends a request to one of `upstream`'s backends and returns its response head with the body
/// still streaming, on the calling thread's client; records the time to the answer head
/// (`creditgate_upstream_seconds`).
///
/// A request that could not be sent (no connection to the backend could be made) goes to the
/// next backend, each backend at most once: its body was never read, so nothing reached a
/// backend and it is sent whole. Anything else (a broken connection, a timeout, a 5xx) is not
/// retried: the backend may have the request.
pub async fn forward(
    state: &crate::state::AppState,
    upstream: &Upstream,
    req: Request<Body>,
    fwd: Forwarded<'_>,
) -> Result<Response<UpstreamBody>, GatewayError> {
    let started = std::time::Instant::now();
    // Boxed: the send's state (request head, backend choice, timers: kilobytes) would otherwise
    // sit in every future that waits on it, each copying it along when it is made.
    let res = Box::pin(send(&state.clients, upstream, req, fwd)).await;
    state.metrics.upstream_time(started.elapsed());
    res
}

async fn send(
    clients: &Clients,
    upstream: &Upstream,
    req: Request<Body>,
    fwd: Forwarded<'_>,
) -> Result<Response<UpstreamBody>, GatewayError> {
    let client = upstream.own.as_ref().map_or_else(|| clients.get(), OwnClients::get);
    let (mut parts, body) = req.into_parts();
    headers::prepare_request(&mut parts.headers, &upstream.headers, fwd);
    parts.version = http::Version::HTTP_11;
    let pq = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    // With more than one backend the body is lent, so that a request refused at connect can be
    // sent again, and the head is kept for that.
    let several = upstream.pool.backends().len() > 1;
    let (lent, mut body) = if several {
        let lent = resend::Lent::new(body);
        (Some(lent.clone()), Some(Body::new(lent)))
    } else {
        (None, Some(body))
    };
    let spare_head = several.then(|| (parts.method.clone(), parts.headers.clone()));
    let mut tried = 0u64;
    let mut parts = Some(parts);
    loop {
        let mut slot = match upstream.pool.pick(tried) {
            Ok(slot) => slot,
            Err(pool::NoBackend::Busy) => {
                return Err(GatewayError::UpstreamBusy(format!("{}: every backend at max_in_flight", upstream.name)));
            }
            Err(pool::NoBackend::Exhausted) => {
                return Err(GatewayError::UpstreamUnreachable(format!(
                    "{}: no backend could be reached",
                    upstream.name
                )));
            }
        };
        tried |= 1u64.checked_shl(slot.index() as u32).unwrap_or(0);
        let base = &slot.backend().url;
        let mut head = match parts.take() {
            Some(p) => p,
            None => {
                let (method, headers) = spare_head.clone().expect("kept when there are several backends");
                let mut p = Request::new(()).into_parts().0;
                p.method = method;
                p.headers = headers;
                p.version = http::Version::HTTP_11;
                p
            }
        };
        // The client would set the same `Host` (formatting it per request) unless the upstream's
        // config sets one; the client's own was moved to `x-forwarded-host` by `prepare_request`.
        if let Some(host) = &base.host {
            head.headers.entry(http::header::HOST).or_insert_with(|| host.clone());
        }
        // Plain `http://` on a worker thread: the worker's own HTTP/1 pool ([`h1`]), which takes
        // the request line's origin form; hyper-util's client otherwise, which takes the URI whole.
        let direct = upstream.own.is_none() && base.scheme == http::uri::Scheme::HTTP && worker_index().is_some();
        head.uri = if direct { Uri::from(backend_path(base, &pq)?) } else { backend_uri(base, &pq)? };
        let req_body = match body.take() {
            Some(b) => b,
            None => Body::new(lent.clone().expect("lent when there are several backends")),
        };
        let progress = Arc::new(outgoing::Progress::new());
        let req = Request::from_parts(head, Body::new(outgoing::Outgoing::new(req_body, progress.clone())));
        let backend = slot.backend();
        let answer = if direct {
            let call = async {
                match h1::send(&clients.connector, &base.authority, req).await {
                    Ok((res, conn)) => Ok((res, Some(conn))),
                    Err(h1::SendError::Connect(e)) => Err(classify_error(&upstream.name, backend, &*e, true)),
                    Err(h1::SendError::Http(e)) => Err(classify_error(&upstream.name, backend, &e, false)),
                }
            };
            attempt(upstream, backend, call, &progress).await
        } else {
            let call = async {
                match client.request(req).await {
                    Ok(res) => Ok((res, None)),
                    Err(e) => Err(classify_error(&upstream.name, backend, &e, e.is_connect())),
                }
            };
            attempt(upstream, backend, call, &progress).await
        };
        match answer {
            Err(e) => {
                // A failed connection, or no head in time once the backend had the whole request
                // (a client still sending its body is not the backend being slow).
                let blame = match e {
                    GatewayError::UpstreamUnreachable(_) | GatewayError::UpstreamUnavailable(_) => true,
                    GatewayError::UpstreamTimeout => progress.ended(),
                    _ => false,
                };
                if blame {
                    slot.failed(&upstream.pool, &e.to_string());
                }
                // Never reached a backend, and the body is still whole: the next one.
                let resendable = lent.as_ref().is_some_and(resend::Lent::untouched);
                if matches!(e, GatewayError::UpstreamUnreachable(_)) && resendable && tried.count_ones() < 64 {
                    drop(slot);
                    continue;
                }
                return Err(e);
            }
            Ok((res, conn)) => {
                if res.status().is_server_error() {
                    slot.failed(&upstream.pool, "answered 5xx");
                } else {
                    slot.answered();
                }
                // A backend that answered before it had the whole request may close the
                // connection once its answer is out, without saying so (hyper's server does when
                // its handler left the body unread): such a connection is not pooled, or the next
                // request written to it would meet the close and fail (nginx's keepalive rule).
                let conn = conn.filter(|_| progress.ended());
                let (mut parts, body) = res.into_parts();
                headers::strip_hop_by_hop(&mut parts.headers);
                headers::strip_gateway_owned(&mut parts.headers);
                let body = UpstreamBody::new(body, slot, conn, upstream.stream_idle_timeout, &upstream.pool);
                return Ok(Response::from_parts(parts, body));
            }
        }
    }
}

/// Runs `call`, which sends a request to `backend`: the connect phase (pool checkout, TCP, TLS) bounded by
/// the upstream's `connect_timeout_ms` (past it 502 `upstream_unavailable`, as unreachable:
/// nothing was sent), then the wait for the answer head by `first_byte_timeout_ms` (504),
/// counted from the moment a connection took the request.
///
/// One timer serves both limits, and the sender is not woken when a connection takes the
/// request (that wake-up polled the whole request path once more). The timer never rings later
/// than the limit that applies: first at the earlier of the two counted from the start (neither
/// can run out sooner); when it rings, the limit in force is worked out from `progress` —
/// expired, or the timer set again for it (while no connection has taken the request, no later
/// than one first-byte timeout ahead, since one could take it any moment).
async fn attempt<T>(
    upstream: &Upstream,
    backend: &pool::Backend,
    call: impl Future<Output = Result<T, GatewayError>>,
    progress: &outgoing::Progress,
) -> Result<T, GatewayError> {
    let (connect, first_byte) = (upstream.connect_timeout, upstream.first_byte_timeout);
    let connect_deadline = later(progress.started(), connect);
    tokio::pin!(call);
    let timer = tokio::time::sleep_until(later(progress.started(), connect.min(first_byte)));
    tokio::pin!(timer);
    loop {
        tokio::select! {
            biased;
            done = &mut call => return done,
            () = &mut timer => {}
        }
        let now = tokio::time::Instant::now();
        let next = match progress.taken_at() {
            None if now >= connect_deadline => {
                return Err(GatewayError::UpstreamUnreachable(format!(
                    "{}: no connection to {} within connect_timeout_ms ({} ms)",
                    upstream.name,
                    backend.label,
                    connect.as_millis()
                )));
            }
            None => connect_deadline.min(later(now, first_byte)),
            Some(taken) if now >= later(taken, first_byte) => return Err(GatewayError::UpstreamTimeout),
            Some(taken) => later(taken, first_byte),
        };
        timer.as_mut().reset(next);
    }
}

/// `d` after `t`; a timeout too long to represent never runs out (as with `tokio::time::timeout`).
fn later(t: tokio::time::Instant, d: Duration) -> tokio::time::Instant {
    t.checked_add(d).unwrap_or_else(|| t + Duration::from_secs(86_400 * 365 * 30))
}

/// The path (and query) of `pq` on backend `base`: its `base_path` first.
fn backend_path(base: &UpstreamUrl, pq: &PathAndQuery) -> Result<PathAndQuery, GatewayError> {
    if base.base_path.is_empty() {
        return Ok(pq.clone());
    }
    PathAndQuery::try_from(format!("{}{}", base.base_path, pq.as_str()))
        .map_err(|_| GatewayError::BadRequest("The request path is not valid.".into()))
}

/// The URI of `pq` on backend `base`.
fn backend_uri(base: &UpstreamUrl, pq: &PathAndQuery) -> Result<Uri, GatewayError> {
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(base.scheme.clone());
    uri.authority = Some(base.authority.clone());
    uri.path_and_query = Some(backend_path(base, pq)?);
    Ok(Uri::from_parts(uri).expect("scheme, authority and path are set"))
}

/// Runs the active health checks of every upstream with a `health_path`, as their intervals
/// come due, until shutdown.
pub fn spawn_health_checks(
    state: crate::state::AppState,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => health_checks_due(&state),
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    })
}

/// Starts the health checks whose interval has come.
fn health_checks_due(state: &crate::state::AppState) {
    {
        let rt = state.runtime.load_full();
        for up in rt.upstreams.map.values() {
            let Some((path, interval)) = &up.health else { continue };
            let now = pool::clock_ms();
            let last = up.last_check.load(Ordering::Relaxed);
            if last != 0 && now < last + interval.as_millis() as u64 {
                continue;
            }
            up.last_check.store(now, Ordering::Relaxed);
            for backend in up.pool.backends() {
                let (state, up, backend, path) = (state.clone(), up.clone(), backend.clone(), path.clone());
                let timeout = (*interval).min(up.first_byte_timeout);
                tokio::spawn(async move {
                    let client = up.own.as_ref().map_or_else(|| state.clients.get(), OwnClients::get);
                    match check_health(client, &up, &backend.url, &path, timeout).await {
                        Ok(()) => backend.check_passed(),
                        Err(why) => backend.check_failed(up.pool.eject_after, up.pool.eject, &why),
                    }
                });
            }
        }
    }
}

/// One `GET health_path` to one backend: `Ok` on a 2xx within `timeout`.
async fn check_health(
    client: &Client,
    up: &Upstream,
    base: &UpstreamUrl,
    path: &PathAndQuery,
    timeout: Duration,
) -> Result<(), String> {
    let mut req = Request::new(Body::empty());
    *req.uri_mut() = backend_uri(base, path).map_err(|e| e.to_string())?;
    for (name, value) in &up.headers {
        req.headers_mut().insert(name.clone(), value.clone());
    }
    match tokio::time::timeout(timeout, client.request(req)).await {
        Err(_) => Err("health check timed out".into()),
        Ok(Err(e)) => Err(format!("health check failed: {e}")),
        Ok(Ok(res)) if res.status().is_success() => Ok(()),
        Ok(Ok(res)) => Err(format!("health check answered {}", res.status().as_u16())),
    }
}

/// The gateway's error for a request to `backend` that failed with `e` (`connect`: no
/// connection could be made, so nothing was sent).
fn classify_error(
    upstream: &str,
    backend: &pool::Backend,
    e: &(dyn std::error::Error + 'static),
    connect: bool,
) -> GatewayError {
    if crate::error::cause_ref::<http_body_util::LengthLimitError>(e).is_some() {
        return GatewayError::PayloadTooLarge { limit: 0 };
    }
    if crate::error::cause_ref::<crate::listener::BodyTimeout>(e).is_some() {
        return GatewayError::RequestTimeout;
    }
    let detail = if connect { "connect failed" } else { "connection error" };
    tracing::warn!(upstream, backend = %backend.label, error = ?e, "upstream request failed: {detail}");
    if connect {
        GatewayError::UpstreamUnreachable(format!("{upstream}: {detail}"))
    } else {
        GatewayError::UpstreamUnavailable(format!("{upstream}: {detail}"))
    }
}
