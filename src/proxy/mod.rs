//! The forwarding half of the gateway: a pooled keep-alive hyper client, round-robin upstream
//! pools, URI rewrite and the header rules of RFC 9110 §7.6.1 (hop-by-hop fields are not
//! forwarded, in either direction). Bodies stream both ways; nothing here buffers them.

pub mod headers;
pub mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use http::uri::PathAndQuery;
use http::{HeaderName, HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
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
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_keepalive(Some(Duration::from_secs(60)));
    // The TLS layer needs to see `https://` URIs.
    connector.enforce_http(false);
    Ok(HyperClient::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(512)
        .build(tls.connector(connector, key)?))
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

/// One named upstream pool.
#[derive(Debug)]
pub struct Upstream {
    /// Name from the config.
    pub name: Arc<str>,
    urls: Vec<UpstreamUrl>,
    next: AtomicUsize,
    headers: Vec<(HeaderName, HeaderValue)>,
    /// With `ca_file`, a client certificate or `http2 = false`: clients of its own.
    own: Option<OwnClients>,
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
            let urls = up.urls.iter().map(|u| parse_upstream_url(u).expect("validated")).collect();
            let settings = tls::TlsSettings {
                ca_files: up.ca_file.iter().chain(&config.tls.ca_file).cloned().collect(),
                client_cert: up.client_cert_file.clone().zip(up.client_key_file.clone()),
                http2: up.http2,
            };
            let own = if up.ca_file.is_some() || settings.client_cert.is_some() || !up.http2 {
                // Read the files now: a bad one refuses the config, not a request later.
                settings.client_config(&format!("upstreams.{name}"))?;
                let connect_timeout = Duration::from_millis(config.server.connect_timeout_ms);
                Some(OwnClients {
                    settings,
                    connect_timeout,
                    slots: (0..CLIENT_SLOTS).map(|_| OnceLock::new()).collect(),
                })
            } else {
                None
            };
            let name: Arc<str> = name.as_str().into();
            map.insert(name.clone(), Arc::new(Upstream { name, urls, next: AtomicUsize::new(0), headers, own }));
        }
        Ok(Upstreams { map })
    }

    /// The pool with that name.
    pub fn get(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.map.get(name)
    }
}

impl Upstream {
    /// The next base URL, round robin.
    fn pick(&self) -> &UpstreamUrl {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        &self.urls[i % self.urls.len()]
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

/// Sends a request to `upstream` and returns its response head with the body still streaming.
pub async fn forward(
    client: &Client,
    upstream: &Upstream,
    req: Request<Body>,
    fwd: Forwarded<'_>,
    timeout: Duration,
) -> Result<Response<Incoming>, GatewayError> {
    let client = upstream.own.as_ref().map_or(client, OwnClients::get);
    let (mut parts, body) = req.into_parts();
    let base = upstream.pick();
    let pq = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    let pq = if base.base_path.is_empty() {
        pq
    } else {
        PathAndQuery::try_from(format!("{}{}", base.base_path, pq.as_str()))
            .map_err(|_| GatewayError::BadRequest("The request path is not valid.".into()))?
    };
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(base.scheme.clone());
    uri.authority = Some(base.authority.clone());
    uri.path_and_query = Some(pq);
    parts.uri = Uri::from_parts(uri).expect("scheme, authority and path are set");
    headers::prepare_request(&mut parts.headers, &upstream.headers, fwd);
    parts.version = http::Version::HTTP_11;

    match tokio::time::timeout(timeout, client.request(Request::from_parts(parts, body))).await {
        Err(_) => Err(GatewayError::UpstreamTimeout),
        Ok(Err(e)) => Err(classify_error(&upstream.name, e)),
        Ok(Ok(mut res)) => {
            headers::strip_hop_by_hop(res.headers_mut());
            headers::strip_gateway_owned(res.headers_mut());
            Ok(res)
        }
    }
}

fn classify_error(upstream: &str, e: hyper_util::client::legacy::Error) -> GatewayError {
    if crate::error::cause_ref::<http_body_util::LengthLimitError>(&e).is_some() {
        return GatewayError::PayloadTooLarge { limit: 0 };
    }
    if crate::error::cause_ref::<crate::listener::BodyTimeout>(&e).is_some() {
        return GatewayError::RequestTimeout;
    }
    let detail = if e.is_connect() { "connect failed" } else { "connection error" };
    tracing::warn!(upstream, error = ?e, "upstream request failed: {detail}");
    if e.is_connect() {
        GatewayError::UpstreamUnreachable(format!("{upstream}: {detail}"))
    } else {
        GatewayError::UpstreamUnavailable(format!("{upstream}: {detail}"))
    }
}
