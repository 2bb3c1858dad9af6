//! The typed configuration tree (SPEC §3): defaults, `deny_unknown_fields`, and
//! `load = read → parse → validate`.
//!
//! Every validation failure names the key path and the reason in one line, e.g.
//! `routes[2].upstream: unknown upstream "aii" (known: ai, app)`, so that `creditgate check`
//! and a refused start-up tell the operator exactly what to fix.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// A configuration problem: the dotted key path and a sentence saying what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where the problem is, e.g. `operations.ai_chat.default_tier`.
    pub key: String,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

impl std::error::Error for ConfigError {}

fn bad(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError { key: key.into(), reason: reason.into() }
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listeners, limits and timeouts.
    pub server: ServerConfig,
    /// Where balances live.
    pub store: StoreConfig,
    /// Named upstream pools that routes forward to.
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// Route table; the first matching route wins.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Priced operations, by name.
    #[serde(default)]
    pub operations: BTreeMap<String, OperationConfig>,
    /// Plans with their monthly allocation.
    #[serde(default)]
    pub plans: BTreeMap<String, PlanConfig>,
    /// Per-client-address limits on failed authentication, and limiter housekeeping.
    #[serde(default)]
    pub rate_limits: RateLimitsConfig,
    /// Top-up packages, by name (e.g. `"200"`).
    #[serde(default)]
    pub topup_packages: BTreeMap<String, PackageConfig>,
    /// Low-credit warnings and event delivery.
    #[serde(default)]
    pub notifications: NotificationsConfig,
    /// Auto top-up limits.
    #[serde(default)]
    pub auto_topup: AutoTopupConfig,
    /// The queue of requests waiting for credits (`on_empty = "queue"`).
    #[serde(default)]
    pub jobs: JobsConfig,
    /// `Idempotency-Key` handling on metered routes.
    #[serde(default)]
    pub idempotency: IdempotencyConfig,
    /// How much ledger history each account keeps.
    #[serde(default)]
    pub history: HistoryConfig,
    /// Usage export: every ledger entry delivered as CloudEvents (optional).
    #[serde(default)]
    pub export: ExportConfig,
    /// How long charge records are kept.
    #[serde(default)]
    pub charges: ChargesConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Payments: customers buy top-ups and auto top-ups are paid (optional).
    #[serde(default)]
    pub billing: BillingConfig,
    /// Outgoing TLS.
    #[serde(default)]
    pub tls: TlsConfig,
    /// Demo mode: a built-in fake AI backend and a seeded account (see `config/demo.toml`).
    pub demo: Option<DemoConfig>,
}

/// `[demo]`: makes `serve` start the built-in fake AI backend and create a demo account and key.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DemoConfig {
    /// Where the fake backend listens; upstream URLs should point here.
    pub backend_listen: String,
    /// Id of the demo account.
    #[serde(default = "default_demo_account")]
    pub account: String,
    /// Plan of the demo account.
    #[serde(default = "default_demo_plan")]
    pub plan: String,
}

fn default_demo_account() -> String {
    "demo".to_owned()
}
fn default_demo_plan() -> String {
    "pro".to_owned()
}

/// `[server]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Public listener: AI traffic, customer API, dashboard.
    pub listen: String,
    /// Admin listener: admin API, metrics, health.
    pub admin_listen: Option<String>,
    /// Name of the environment variable holding the admin token.
    #[serde(default = "default_admin_token_env")]
    pub admin_token_env: String,
    /// Largest request body the gateway accepts (413 above it).
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// How long to wait for an upstream's response head before answering 504.
    #[serde(default = "default_upstream_timeout_ms")]
    pub upstream_timeout_ms: u64,
    /// How long to wait for a TCP connection to an upstream before answering 502.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// How long a client may take to send a request head: from accepting a connection, and
    /// from the first byte of each later request on it. Past it the connection is closed.
    #[serde(default = "default_header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// How long a keep-alive connection may wait, with no request in flight, for its next one.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Longest gap between two chunks of a request body (408 `request_timeout`).
    #[serde(default = "default_body_read_timeout_ms")]
    pub body_read_timeout_ms: u64,
    /// Longest a whole request body may take, from its request head (408 `request_timeout`): a
    /// body dripping just inside `body_read_timeout_ms` cannot hold a connection forever.
    #[serde(default = "default_body_total_timeout_ms")]
    pub body_total_timeout_ms: u64,
    /// Longest an answer may wait for the client to take more bytes (a client that stops
    /// reading); past it the connection is closed.
    #[serde(default = "default_write_timeout_ms")]
    pub write_timeout_ms: u64,
    /// Most client connections open at once, per listener; further ones wait in the backlog.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// On SIGTERM / Ctrl-C: how long requests in flight may take to finish before the process
    /// exits anyway; new connections are refused at once.
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// Threads serving the public listener, each a single-threaded runtime with its own
    /// `SO_REUSEPORT` socket and upstream connection pool; 0 (the default): one per CPU core.
    #[serde(default)]
    pub workers: usize,
    /// Largest request head (request line and headers) in bytes; at least 8192. Larger: 431.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Load balancers (CIDRs) whose `X-Forwarded-For` names the client; from any other peer the
    /// peer's own address is the client's, and its forwarding headers are replaced.
    #[serde(default)]
    pub trusted_proxies: Vec<crate::proxy::headers::Cidr>,
    /// TLS termination on the public listener; the files are read again on every reload (SIGHUP).
    pub tls: Option<ListenerTls>,
    /// TLS termination on the admin listener, likewise.
    pub admin_tls: Option<ListenerTls>,
}

/// `server.tls = { cert_file, key_file }`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// The certificate chain (PEM), leaf first.
    pub cert_file: String,
    /// Its private key (PEM).
    pub key_file: String,
}

fn default_header_read_timeout_ms() -> u64 {
    10_000
}
fn default_idle_timeout_ms() -> u64 {
    60_000
}
fn default_body_read_timeout_ms() -> u64 {
    30_000
}
fn default_body_total_timeout_ms() -> u64 {
    120_000
}
fn default_write_timeout_ms() -> u64 {
    30_000
}
fn default_shutdown_grace_ms() -> u64 {
    30_000
}
fn default_max_connections() -> usize {
    10_000
}
fn default_max_header_bytes() -> usize {
    64 * 1024
}

fn default_admin_token_env() -> String {
    "CREDITGATE_ADMIN_TOKEN".to_owned()
}
fn default_max_body_bytes() -> usize {
    1024 * 1024
}
fn default_upstream_timeout_ms() -> u64 {
    120_000
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}

/// Which ledger implementation backs the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StoreKind {
    /// Embedded, in-process; for the demo and unit tests.
    Memory,
    /// One Redis server.
    Redis,
    /// A Redis Cluster.
    RedisCluster,
    /// One Redis primary (and replicas) watched by Redis Sentinel, which names the primary.
    RedisSentinel,
}

/// What metered routes do when the store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnStoreError {
    /// Answer 503 `store_unavailable` (default: never give away credits).
    #[default]
    FailClosed,
    /// Forward uncharged; log and count it.
    FailOpen,
}

/// `[store]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `memory`, `redis`, `redis-cluster` or `redis-sentinel`.
    pub kind: StoreKind,
    /// Redis URL, for `kind = "redis"`.
    pub url: Option<String>,
    /// Cluster seed nodes, for `kind = "redis-cluster"`.
    pub nodes: Option<Vec<String>>,
    /// Sentinel addresses (`redis://host:port`), for `kind = "redis-sentinel"`.
    pub sentinels: Option<Vec<String>>,
    /// The name the sentinels monitor the primary under, for `kind = "redis-sentinel"`.
    pub master_name: Option<String>,
    /// Behaviour of metered routes when the store is down.
    #[serde(default)]
    pub on_error: OnStoreError,
    /// Longest a step waits for the store; past it the store counts as down, and steps fail at
    /// once (503 `store_unavailable`) until a probe finds it answering again.
    #[serde(default = "default_store_max_wait_ms")]
    pub max_wait_ms: u64,
    /// Replicas that must acknowledge a step that moves credits (charge, refund, top-up, plan
    /// change, account creation) before it is answered: Redis `WAIT`. 0 (default): answered
    /// once the primary has it, and a failover may lose the last acknowledged steps.
    #[serde(default)]
    pub wait_replicas: u32,
    /// How long `WAIT` waits for those replicas; fewer in time fails the step (503, refunded).
    #[serde(default = "default_store_wait_timeout_ms")]
    pub wait_timeout_ms: u64,
}

fn default_store_wait_timeout_ms() -> u64 {
    500
}

fn default_store_max_wait_ms() -> u64 {
    3_000
}

/// `[upstreams.NAME]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URLs (`http://host:port` or `https://host[:port]`); several are used round robin.
    pub urls: Vec<String>,
    /// Headers set on every forwarded request; a value `env:NAME` reads the variable.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// A CA certificate file (PEM) trusted for this upstream's `https://` URLs, besides the
    /// webpki roots.
    pub ca_file: Option<String>,
    /// Client certificate chain (PEM) presented to this upstream (mTLS); with `client_key_file`.
    pub client_cert_file: Option<String>,
    /// The client certificate's private key (PEM).
    pub client_key_file: Option<String>,
    /// Speak HTTP/2 to a backend whose TLS handshake (ALPN) offers it.
    #[serde(default = "yes")]
    pub http2: bool,
    /// How a backend is chosen for each request.
    #[serde(default)]
    pub balance: Balance,
    /// Longest wait for a TCP (and TLS) connection to one backend; the request then goes to
    /// another backend, or is answered 502. Default: `server.connect_timeout_ms`.
    pub connect_timeout_ms: Option<u64>,
    /// Longest wait for a backend's response head (504), counted from the moment a connection
    /// took the request. Default: `server.upstream_timeout_ms`.
    pub first_byte_timeout_ms: Option<u64>,
    /// Longest gap between two chunks of a backend's answer; past it the answer is cut off as
    /// a broken stream. Absent: no limit.
    pub stream_idle_timeout_ms: Option<u64>,
    /// Most requests one backend may have in flight (answer streams included); when every
    /// backend is full: 503 `upstream_busy`, refunded. Absent: no limit.
    pub max_in_flight: Option<usize>,
    /// Failures in a row (a connect that fails, a 5xx answer, a failed health check) after
    /// which a backend is ejected.
    #[serde(default = "default_eject_after")]
    pub eject_after: u32,
    /// How long an ejected backend gets no traffic; then one request (or health check) probes
    /// it, and a success brings it back.
    #[serde(default = "default_eject_ms")]
    pub eject_ms: u64,
    /// Path an active health check asks with `GET` (2xx = healthy); absent: passive health only.
    pub health_path: Option<String>,
    /// How often the active health check runs.
    #[serde(default = "default_health_interval_ms")]
    pub health_interval_ms: u64,
}

/// `upstreams.NAME.balance`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Each backend in turn.
    #[default]
    RoundRobin,
    /// The backend with the fewest requests in flight (ties in turn).
    LeastRequests,
}

fn default_eject_after() -> u32 {
    5
}
fn default_eject_ms() -> u64 {
    10_000
}
fn default_health_interval_ms() -> u64 {
    5_000
}

fn yes() -> bool {
    true
}

/// `[tls]`: outgoing TLS for every destination (upstreams, webhooks, export, Stripe).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// A CA certificate file (PEM) trusted besides the webpki roots; read at start.
    pub ca_file: Option<String>,
}

/// `[[routes]]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// HTTP method to match; any method when absent.
    pub method: Option<String>,
    /// Exact path to match.
    pub path: Option<String>,
    /// Path prefix to match (when `path` is absent).
    pub path_prefix: Option<String>,
    /// Upstream name the request is forwarded to.
    pub upstream: String,
    /// Priced operation; a route without one is free.
    pub operation: Option<String>,
}

/// What an operation does when the account cannot pay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnEmpty {
    /// 402 `no_credits` / `insufficient_credits`.
    #[default]
    Reject,
    /// Accept as a queued job (202) that runs once the account can pay.
    Queue,
}

/// `[operations.NAME]`: exactly one pricing rule (`cost`, `tiers`, `per_item`, or the campaign
/// formula `base`/`per_step`/`per_variant`/`per_channel` with `min`/`max`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OperationConfig {
    /// Usage category shown to users (e.g. "AI Chat").
    pub category: String,
    /// Fixed cost in credits.
    pub cost: Option<u64>,
    /// Cost per tier: `fast = 1`, or `fast = { cost = 1, model = "…", upstream = "…", aliases = […] }`.
    pub tiers: Option<BTreeMap<String, TierConfig>>,
    /// With tiers that name a `model`: let a request ask for a model no tier names (forwarded as
    /// sent) instead of refusing it.
    #[serde(default)]
    pub allow_other_models: bool,
    /// Tier used when the request names none.
    pub default_tier: Option<String>,
    /// Optional upstream per tier.
    #[serde(default)]
    pub tier_upstreams: BTreeMap<String, String>,
    /// Cost per item of the JSON array field named by `items`.
    pub per_item: Option<u64>,
    /// JSON body field holding the items.
    pub items: Option<String>,
    /// When true, `x-trigger: automatic` from a `system` key is free.
    #[serde(default)]
    pub automatic_free: bool,
    /// With `automatic_free`: most free automatic refreshes per account and billing period;
    /// beyond it they are charged like any request (unset: no limit).
    pub automatic_free_max_per_period: Option<u64>,
    /// Campaign formula: constant part.
    pub base: Option<u64>,
    /// Campaign formula: credits per step.
    pub per_step: Option<u64>,
    /// Campaign formula: credits per variant.
    pub per_variant: Option<u64>,
    /// Campaign formula: credits per channel.
    pub per_channel: Option<u64>,
    /// Campaign formula: lower clamp.
    pub min: Option<u64>,
    /// Campaign formula: upper clamp.
    pub max: Option<u64>,
    /// What happens when the account cannot pay.
    #[serde(default)]
    pub on_empty: OnEmpty,
    /// Upstream failures that give the credits back (default `["unreachable", "status_5xx"]`).
    #[serde(default = "default_refund_on")]
    pub refund_on: Vec<RefundOn>,
}

/// One tier of a tiered operation.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum TierConfig {
    /// `fast = 1`: the cost alone.
    Cost(u64),
    /// `fast = { cost = 1, model = "…", upstream = "…", aliases = ["…"] }`.
    Full(TierSpec),
}

/// The long form of a tier.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TierSpec {
    /// Credits per request.
    pub cost: u64,
    /// The model the backend is asked for: the forwarded body's `model` is set to it.
    pub model: Option<String>,
    /// The upstream this tier's requests go to (instead of the route's).
    pub upstream: Option<String>,
    /// More names a request may send as `model` to pick this tier.
    #[serde(default)]
    pub aliases: Vec<String>,
}

/// Either form, with an error that says what a tier may be (an untagged enum would only say that
/// nothing matched).
impl<'de> Deserialize<'de> for TierConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Tier;
        impl<'de> serde::de::Visitor<'de> for Tier {
            type Value = TierConfig;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a cost in credits (a positive whole number) or a table { cost, model, upstream, aliases }")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<TierConfig, E> {
                Ok(TierConfig::Cost(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<TierConfig, E> {
                u64::try_from(v)
                    .map(TierConfig::Cost)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<TierConfig, A::Error> {
                TierSpec::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(TierConfig::Full)
            }
        }
        d.deserialize_any(Tier)
    }
}

impl TierConfig {
    /// Credits per request.
    pub fn cost(&self) -> u64 {
        match self {
            TierConfig::Cost(c) => *c,
            TierConfig::Full(t) => t.cost,
        }
    }

    /// The model the backend is asked for, if set.
    pub fn model(&self) -> Option<&str> {
        match self {
            TierConfig::Full(t) => t.model.as_deref(),
            TierConfig::Cost(_) => None,
        }
    }

    /// The tier's own upstream, if set.
    pub fn upstream(&self) -> Option<&str> {
        match self {
            TierConfig::Full(t) => t.upstream.as_deref(),
            TierConfig::Cost(_) => None,
        }
    }

    /// More names for the tier as a `model`.
    pub fn aliases(&self) -> &[String] {
        match self {
            TierConfig::Full(t) => &t.aliases,
            TierConfig::Cost(_) => &[],
        }
    }
}

/// An upstream failure that `refund_on` may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefundOn {
    /// The request never reached a backend (connect failed or refused, nothing was sent).
    Unreachable,
    /// The backend answered 5xx, or its connection broke after the request was delivered.
    #[serde(rename = "status_5xx")]
    Status5xx,
    /// The backend got the request but sent no answer head within `upstream_timeout_ms`.
    Timeout,
}

fn default_refund_on() -> Vec<RefundOn> {
    vec![RefundOn::Unreachable, RefundOn::Status5xx]
}

/// `[plans.NAME]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    /// Credits granted at each renewal.
    pub monthly_credits: u64,
    /// Monthly price, for display.
    #[serde(default)]
    pub price_eur: f64,
    /// Requests per second per account, proxy and customer API together (per gateway instance).
    pub rate_limit_per_second: Option<u32>,
}

/// `[rate_limits]`: what a client without a valid key may cost (see `ratelimit.rs`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitsConfig {
    /// Failed authentications (missing, unknown or revoked API key; wrong admin token) one client
    /// address may make per minute, on both listeners together; beyond it 429 `rate_limited`.
    #[serde(default = "default_failed_auth_per_minute")]
    pub failed_auth_per_minute: u32,
    /// How many failed authentications an address may make in a row before the rate applies.
    #[serde(default = "default_failed_auth_burst")]
    pub failed_auth_burst: u32,
    /// How often idle limiter entries (and expired cached keys) are forgotten.
    #[serde(default = "default_cleanup_interval_ms")]
    pub cleanup_interval_ms: u64,
    /// How long a key the store did not know is answered 401 without asking the store again.
    /// Keys are random, so no key is presented before it exists; a revoked key never comes back.
    #[serde(default = "default_unknown_key_cache_ttl_ms")]
    pub unknown_key_cache_ttl_ms: u64,
    /// Most unknown keys remembered at once; beyond it further unknown keys are looked up each
    /// time (the per-address limit still bounds those lookups).
    #[serde(default = "default_unknown_key_cache_entries")]
    pub unknown_key_cache_entries: usize,
}

impl Default for RateLimitsConfig {
    fn default() -> Self {
        Self {
            failed_auth_per_minute: default_failed_auth_per_minute(),
            failed_auth_burst: default_failed_auth_burst(),
            cleanup_interval_ms: default_cleanup_interval_ms(),
            unknown_key_cache_ttl_ms: default_unknown_key_cache_ttl_ms(),
            unknown_key_cache_entries: default_unknown_key_cache_entries(),
        }
    }
}

fn default_failed_auth_per_minute() -> u32 {
    30
}
fn default_failed_auth_burst() -> u32 {
    20
}
fn default_cleanup_interval_ms() -> u64 {
    60_000
}
fn default_unknown_key_cache_ttl_ms() -> u64 {
    30_000
}
fn default_unknown_key_cache_entries() -> usize {
    65_536
}

/// `[topup_packages.NAME]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PackageConfig {
    /// Credits the package adds to the top-up bucket.
    pub credits: u64,
    /// Price, for display and invoicing.
    pub price_eur: f64,
}

/// `[notifications]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NotificationsConfig {
    /// Remaining-credit thresholds (percent of the allocation) that raise events.
    #[serde(default = "default_thresholds")]
    pub thresholds_percent: Vec<u8>,
    /// Where events are POSTed.
    pub webhook_url: Option<String>,
    /// Environment variable with the HMAC key for `x-creditgate-signature`.
    pub webhook_secret_env: Option<String>,
    /// Events undelivered for this long are dropped (logged).
    #[serde(default = "default_event_ttl_hours")]
    pub event_ttl_hours: u64,
    /// Longest wait between delivery attempts.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
    /// E-mail delivery over SMTP.
    pub smtp: Option<SmtpConfig>,
    /// Undelivered events kept per account; beyond it the oldest are dropped (logged, counted).
    #[serde(default = "default_max_outbox")]
    pub max_outbox_per_account: u64,
}

impl Default for NotificationsConfig {
    fn default() -> Self {
        Self {
            thresholds_percent: default_thresholds(),
            webhook_url: None,
            webhook_secret_env: None,
            event_ttl_hours: default_event_ttl_hours(),
            max_backoff_ms: default_max_backoff_ms(),
            smtp: None,
            max_outbox_per_account: default_max_outbox(),
        }
    }
}

fn default_max_outbox() -> u64 {
    1_000
}

/// `[history]`: the per-account ledger history.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryConfig {
    /// Entries kept per account; older ones are trimmed in the step that appends (with usage
    /// export on, only once exported).
    #[serde(default = "default_history_max_entries")]
    pub max_entries: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self { max_entries: default_history_max_entries() }
    }
}

fn default_history_max_entries() -> u64 {
    10_000
}

/// `[charges]`: the per-charge records refunds and re-sent steps read.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ChargesConfig {
    /// Seconds a charge record is kept (one per charge: the largest per-traffic memory cost in
    /// the store). It must outlast a request and its refund: at least the upstream timeout plus
    /// 6 minutes; background refunds of older charges find nothing left to return.
    #[serde(default = "default_charge_record_ttl_secs")]
    pub record_ttl_secs: u64,
}

impl Default for ChargesConfig {
    fn default() -> Self {
        Self { record_ttl_secs: default_charge_record_ttl_secs() }
    }
}

fn default_charge_record_ttl_secs() -> u64 {
    86_400
}

/// `[export]`: every ledger entry, delivered at least once as a CloudEvents 1.0 JSON batch.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// Where batches are POSTed (`application/cloudevents-batch+json`); unset: no export.
    pub url: Option<String>,
    /// Environment variable with the HMAC key for `x-creditgate-signature` (required with `url`).
    pub secret_env: Option<String>,
    /// CloudEvents `source` of every entry.
    #[serde(default = "default_export_source")]
    pub source: String,
    /// Most entries per batch.
    #[serde(default = "default_export_batch")]
    pub batch_size: usize,
    /// Longest wait between delivery attempts to a failing receiver.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            url: None,
            secret_env: None,
            source: default_export_source(),
            batch_size: default_export_batch(),
            max_backoff_ms: default_max_backoff_ms(),
        }
    }
}

fn default_export_source() -> String {
    "creditgate".to_owned()
}
fn default_export_batch() -> usize {
    100
}

fn default_event_ttl_hours() -> u64 {
    72
}
fn default_max_backoff_ms() -> u64 {
    60_000
}

/// `[billing]`: how top-ups are paid. Without `[billing.stripe]` top-ups are admin-only.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BillingConfig {
    /// Stripe payments.
    pub stripe: Option<StripeConfig>,
}

/// `[billing.stripe]`: top-ups bought through Stripe, auto top-ups charged off-session.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StripeConfig {
    /// Environment variable with the secret API key (`sk_…`).
    pub secret_key_env: String,
    /// Environment variable with the webhook signing secret (`whsec_…`).
    pub webhook_secret_env: String,
    /// Environment variable with the publishable key (`pk_…`) the dashboard hands to Stripe.js.
    pub publishable_key_env: Option<String>,
    /// Stripe's API (a fake such as localstripe in tests).
    #[serde(default = "default_stripe_api_base")]
    pub api_base: String,
    /// Where the dashboard loads Stripe.js from.
    #[serde(default = "default_stripe_js_url")]
    pub js_url: String,
    /// ISO currency of every payment, lower case.
    #[serde(default = "default_currency")]
    pub currency: String,
    /// Webhook deliveries whose `t` is further than this from now are refused (replays).
    #[serde(default = "default_webhook_tolerance")]
    pub webhook_tolerance_secs: u64,
    /// `setup_future_usage` of a top-up purchase: `"off_session"` saves the card for auto
    /// top-ups; `"none"` leaves the parameter out (localstripe does not know it).
    #[serde(default = "default_setup_future_usage")]
    pub setup_future_usage: String,
    /// Time allowed for one call to Stripe.
    #[serde(default = "default_stripe_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_stripe_api_base() -> String {
    "https://api.stripe.com".to_owned()
}
fn default_stripe_js_url() -> String {
    "https://js.stripe.com/v3/".to_owned()
}
fn default_currency() -> String {
    "eur".to_owned()
}
fn default_webhook_tolerance() -> u64 {
    300
}
fn default_setup_future_usage() -> String {
    "off_session".to_owned()
}
fn default_stripe_timeout_ms() -> u64 {
    10_000
}

impl StripeConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        parse_web_url(&self.api_base).map_err(|r| bad("billing.stripe.api_base", r))?;
        parse_web_url(&self.js_url).map_err(|r| bad("billing.stripe.js_url", r))?;
        if self.currency.len() != 3 || !self.currency.bytes().all(|b| b.is_ascii_lowercase()) {
            return Err(bad("billing.stripe.currency", "must be a three-letter ISO code in lower case, e.g. \"eur\""));
        }
        if !(1..=3600).contains(&self.webhook_tolerance_secs) {
            return Err(bad("billing.stripe.webhook_tolerance_secs", "must be 1..=3600"));
        }
        if !["off_session", "on_session", "none"].contains(&self.setup_future_usage.as_str()) {
            return Err(bad(
                "billing.stripe.setup_future_usage",
                "must be \"off_session\", \"on_session\" or \"none\"",
            ));
        }
        positive("billing.stripe.timeout_ms", self.timeout_ms)?;
        for (key, var) in [
            ("billing.stripe.secret_key_env", Some(&self.secret_key_env)),
            ("billing.stripe.webhook_secret_env", Some(&self.webhook_secret_env)),
            ("billing.stripe.publishable_key_env", self.publishable_key_env.as_ref()),
        ] {
            if var.is_some_and(|v| v.is_empty()) {
                return Err(bad(key, "must name an environment variable"));
            }
        }
        Ok(())
    }
}

/// Checks an `http://` or `https://` URL of a web service (Stripe's API, a script).
pub fn parse_web_url(raw: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = raw.parse().map_err(|e| format!("not a URL ({e})"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        Some(s) => return Err(format!("scheme {s} is not supported (http:// or https://)")),
        None => return Err("missing scheme (write https://host)".into()),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("missing host".into());
    }
    Ok(uri)
}

/// `[notifications.smtp]`: plain SMTP to a relay (a local MTA or a loopback smarthost).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    /// Relay host.
    pub host: String,
    /// Relay port.
    #[serde(default = "default_smtp_port")]
    pub port: u16,
    /// Sender, e.g. `creditgate <billing@example.com>`.
    pub from: String,
    /// Environment variable with the SMTP user name (AUTH PLAIN when set).
    pub username_env: Option<String>,
    /// Environment variable with the SMTP password.
    pub password_env: Option<String>,
    /// `none` (plain, for a relay on the same host), `starttls` (upgrade, required) or `implicit`
    /// (TLS from the first byte, e.g. port 465). The relay's certificate must verify against the
    /// webpki roots or `tls.ca_file`.
    #[serde(default)]
    pub tls: SmtpTls,
}

/// How the SMTP connection is secured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SmtpTls {
    /// Plain SMTP.
    #[default]
    None,
    /// STARTTLS, required.
    Starttls,
    /// TLS from the first byte.
    Implicit,
}

fn default_smtp_port() -> u16 {
    25
}

fn default_thresholds() -> Vec<u8> {
    vec![20, 10, 0]
}

/// `[auto_topup]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AutoTopupConfig {
    /// Most automatic purchases per account per billing period.
    #[serde(default = "default_max_per_period")]
    pub max_per_period: u64,
}

impl Default for AutoTopupConfig {
    fn default() -> Self {
        Self { max_per_period: default_max_per_period() }
    }
}

fn default_max_per_period() -> u64 {
    5
}

/// `[idempotency]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// Largest answer kept for replays; a repeat of a larger one gets 409 `idempotency_key_reused`.
    #[serde(default = "default_max_stored_bytes")]
    pub max_stored_bytes: usize,
    /// How long a copy waits for the first request with its key to finish before it gets 409
    /// `idempotency_in_progress`.
    #[serde(default = "default_idempotency_wait_ms")]
    pub wait_ms: u64,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self { max_stored_bytes: default_max_stored_bytes(), wait_ms: default_idempotency_wait_ms() }
    }
}

fn default_max_stored_bytes() -> usize {
    1 << 20
}
fn default_idempotency_wait_ms() -> u64 {
    5_000
}

/// `[jobs]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JobsConfig {
    /// Most jobs one account may have waiting (429 beyond).
    #[serde(default = "default_max_queued")]
    pub max_queued_per_account: u64,
    /// Most request-body bytes one account's waiting jobs may hold together (429 beyond).
    #[serde(default = "default_max_queued_bytes")]
    pub max_queued_bytes_per_account: u64,
    /// Largest request body that may be queued (413 beyond; below `server.max_body_bytes`).
    #[serde(default = "default_job_max_body_bytes")]
    pub max_body_bytes: usize,
    /// A job not run within this many hours of queueing expires unrun (status `expired`).
    #[serde(default = "default_max_queue_age_hours")]
    pub max_queue_age_hours: u64,
    /// How long a finished job's result stays readable.
    #[serde(default = "default_retention_hours")]
    pub result_retention_hours: u64,
    /// Largest upstream body kept as a job result (longer ones are cut and marked).
    #[serde(default = "default_max_result_bytes")]
    pub max_result_bytes: usize,
    /// Attempts before a job is `failed`.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt.
    #[serde(default = "default_retry_base_ms")]
    pub retry_base_ms: u64,
    /// Jobs run at the same time by one gateway instance.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// A claimed job's lease lasts the upstream timeout plus this; a crashed instance's job is
    /// taken over by another once it runs out.
    #[serde(default = "default_lease_margin_secs")]
    pub lease_margin_secs: u64,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            max_queued_per_account: default_max_queued(),
            max_queued_bytes_per_account: default_max_queued_bytes(),
            max_body_bytes: default_job_max_body_bytes(),
            max_queue_age_hours: default_max_queue_age_hours(),
            result_retention_hours: default_retention_hours(),
            max_result_bytes: default_max_result_bytes(),
            max_attempts: default_max_attempts(),
            retry_base_ms: default_retry_base_ms(),
            concurrency: default_concurrency(),
            lease_margin_secs: default_lease_margin_secs(),
        }
    }
}

fn default_max_queued_bytes() -> u64 {
    16 * 1024 * 1024
}
fn default_job_max_body_bytes() -> usize {
    256 * 1024
}
/// 32 days: a job queued just after a renewal still runs at the next one.
fn default_max_queue_age_hours() -> u64 {
    768
}
fn default_max_queued() -> u64 {
    1000
}
fn default_retention_hours() -> u64 {
    7 * 24
}
fn default_max_result_bytes() -> usize {
    1024 * 1024
}
fn default_max_attempts() -> u32 {
    5
}
fn default_retry_base_ms() -> u64 {
    1000
}
fn default_concurrency() -> usize {
    8
}
fn default_lease_margin_secs() -> u64 {
    30
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    #[serde(default)]
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `creditgate=debug` (`RUST_LOG` overrides it).
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::default(), level: default_log_level() }
    }
}

fn default_log_level() -> String {
    "info".to_owned()
}

/// Upstream URL parts the proxy needs, parsed once at load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// `http`
    pub scheme: http::uri::Scheme,
    /// `host:port`
    pub authority: http::uri::Authority,
    /// Path prefix prepended to the request path (no trailing slash); usually empty.
    pub base_path: String,
    /// For `http://`: the `Host` field of every request to it, made once here — the client
    /// would otherwise format it per request (see [`host_field`]). `None` for `https://`,
    /// whose connection may turn out to be HTTP/2, which has no `Host` field.
    pub host: Option<http::HeaderValue>,
}

/// The `Host` field hyper-util's client gives a plain HTTP/1 request to `authority` (its
/// `set_host`): the host, with the port unless it is 80.
fn host_field(authority: &http::uri::Authority) -> Option<http::HeaderValue> {
    let host = authority.host();
    match authority.port() {
        Some(port) if port.as_u16() != 80 => http::HeaderValue::from_str(&format!("{host}:{port}")).ok(),
        _ => http::HeaderValue::from_str(host).ok(),
    }
}

/// Parses an upstream base URL: `http://` or `https://`.
pub fn parse_upstream_url(raw: &str) -> Result<UpstreamUrl, String> {
    let uri: http::Uri = raw.parse().map_err(|e| format!("not a URL ({e})"))?;
    let scheme = uri.scheme().cloned().ok_or("missing scheme (write http://host:port or https://host)")?;
    if scheme != http::uri::Scheme::HTTP && scheme != http::uri::Scheme::HTTPS {
        return Err(format!("scheme {scheme} is not supported (http:// or https://)"));
    }
    let authority = uri.authority().cloned().ok_or("missing host")?;
    if uri.query().is_some() {
        return Err("a query string is not allowed in an upstream URL".into());
    }
    let base_path = uri.path().trim_end_matches('/').to_owned();
    let host = if scheme == http::uri::Scheme::HTTP { host_field(&authority) } else { None };
    Ok(UpstreamUrl { scheme, authority, base_path, host })
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad(path.display().to_string(), format!("cannot read file: {e}")))?;
        Self::parse(&text)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| toml_error(text, e))?;
        config.validate()
    }

    /// Checks every cross-reference and range; returns the config unchanged when it is sound.
    pub fn validate(self) -> Result<Self, ConfigError> {
        let s = &self.server;
        parse_addr("server.listen", &s.listen)?;
        if let Some(admin) = &s.admin_listen {
            parse_addr("server.admin_listen", admin)?;
        }
        if s.max_body_bytes == 0 {
            return Err(bad("server.max_body_bytes", "must be greater than 0"));
        }
        if s.upstream_timeout_ms == 0 {
            return Err(bad("server.upstream_timeout_ms", "must be greater than 0"));
        }
        for (key, v) in [
            ("server.connect_timeout_ms", s.connect_timeout_ms),
            ("server.header_read_timeout_ms", s.header_read_timeout_ms),
            ("server.idle_timeout_ms", s.idle_timeout_ms),
            ("server.body_read_timeout_ms", s.body_read_timeout_ms),
            ("server.body_total_timeout_ms", s.body_total_timeout_ms),
            ("server.write_timeout_ms", s.write_timeout_ms),
            ("server.max_connections", s.max_connections as u64),
            ("server.shutdown_grace_ms", s.shutdown_grace_ms),
        ] {
            positive(key, v)?;
        }
        if s.workers > 256 {
            return Err(bad("server.workers", "must be at most 256 (0: one per CPU core)"));
        }
        if s.max_header_bytes < 8192 {
            return Err(bad("server.max_header_bytes", "must be at least 8192"));
        }
        let r = &self.rate_limits;
        for (key, v) in [
            ("rate_limits.failed_auth_per_minute", u64::from(r.failed_auth_per_minute)),
            ("rate_limits.failed_auth_burst", u64::from(r.failed_auth_burst)),
            ("rate_limits.cleanup_interval_ms", r.cleanup_interval_ms),
            ("rate_limits.unknown_key_cache_ttl_ms", r.unknown_key_cache_ttl_ms),
            ("rate_limits.unknown_key_cache_entries", r.unknown_key_cache_entries as u64),
        ] {
            positive(key, v)?;
        }
        self.validate_store()?;
        for (name, up) in &self.upstreams {
            let key = format!("upstreams.{name}");
            if up.urls.is_empty() {
                return Err(bad(format!("{key}.urls"), "needs at least one URL"));
            }
            for (i, url) in up.urls.iter().enumerate() {
                parse_upstream_url(url).map_err(|r| bad(format!("{key}.urls[{i}]"), r))?;
            }
            for (field, v) in [
                ("connect_timeout_ms", up.connect_timeout_ms),
                ("first_byte_timeout_ms", up.first_byte_timeout_ms),
                ("stream_idle_timeout_ms", up.stream_idle_timeout_ms),
                ("max_in_flight", up.max_in_flight.map(|n| n as u64)),
                ("eject_after", Some(u64::from(up.eject_after))),
                ("eject_ms", Some(up.eject_ms)),
                ("health_interval_ms", Some(up.health_interval_ms)),
            ] {
                if let Some(v) = v {
                    positive(&format!("{key}.{field}"), v)?;
                }
            }
            if let Some(p) = &up.health_path
                && (!p.starts_with('/') || http::uri::PathAndQuery::try_from(p.as_str()).is_err())
            {
                return Err(bad(format!("{key}.health_path"), format!("{p:?} must be a path starting with /")));
            }
            for (h, v) in &up.headers {
                let hkey = format!("{key}.headers.{h}");
                http::HeaderName::from_bytes(h.as_bytes()).map_err(|_| bad(&hkey, "not a valid header name"))?;
                if v.strip_prefix("env:").is_none() {
                    http::HeaderValue::from_str(v).map_err(|_| bad(&hkey, "not a valid header value"))?;
                }
            }
        }
        if self.routes.is_empty() {
            return Err(bad("routes", "at least one route is required"));
        }
        for (i, r) in self.routes.iter().enumerate() {
            let key = format!("routes[{i}]");
            match (&r.path, &r.path_prefix) {
                (Some(_), Some(_)) => return Err(bad(&key, "set either path or path_prefix, not both")),
                (None, None) => return Err(bad(&key, "needs path or path_prefix")),
                (Some(p), None) | (None, Some(p)) if !p.starts_with('/') => {
                    return Err(bad(&key, format!("path {p:?} must start with /")));
                }
                _ => {}
            }
            if let Some(m) = &r.method {
                http::Method::from_bytes(m.as_bytes())
                    .map_err(|_| bad(format!("{key}.method"), format!("{m:?} is not an HTTP method")))?;
            }
            if !self.upstreams.contains_key(&r.upstream) {
                return Err(bad(
                    format!("{key}.upstream"),
                    format!("unknown upstream {:?} (known: {})", r.upstream, names(&self.upstreams)),
                ));
            }
            if let Some(op) = &r.operation
                && !self.operations.contains_key(op)
            {
                return Err(bad(
                    format!("{key}.operation"),
                    format!("unknown operation {op:?} (known: {})", names(&self.operations)),
                ));
            }
        }
        for (name, op) in &self.operations {
            op.validate(&format!("operations.{name}"), &self.upstreams)?;
        }
        if self.plans.is_empty() {
            return Err(bad("plans", "at least one plan is required"));
        }
        for (name, plan) in &self.plans {
            let key = format!("plans.{name}");
            check_name(&key, name)?;
            positive(&format!("{key}.monthly_credits"), plan.monthly_credits)?;
            check_price(&format!("{key}.price_eur"), plan.price_eur)?;
            if plan.rate_limit_per_second == Some(0) {
                return Err(bad(format!("{key}.rate_limit_per_second"), "must be greater than 0"));
            }
        }
        for (name, p) in &self.topup_packages {
            let key = format!("topup_packages.{name}");
            positive(&format!("{key}.credits"), p.credits)?;
            check_price(&format!("{key}.price_eur"), p.price_eur)?;
        }
        let j = &self.jobs;
        for (key, v) in [
            ("jobs.max_queued_per_account", j.max_queued_per_account),
            ("jobs.max_queued_bytes_per_account", j.max_queued_bytes_per_account),
            ("jobs.max_body_bytes", j.max_body_bytes as u64),
            ("jobs.max_queue_age_hours", j.max_queue_age_hours),
            ("jobs.result_retention_hours", j.result_retention_hours),
            ("jobs.max_result_bytes", j.max_result_bytes as u64),
            ("jobs.max_attempts", j.max_attempts as u64),
            ("jobs.concurrency", j.concurrency as u64),
        ] {
            positive(key, v)?;
        }
        // A repeated Idempotency-Key replays the 202 of a queued request for 24 h: its job must
        // stay readable at least as long.
        if j.result_retention_hours < 24 {
            return Err(bad("jobs.result_retention_hours", "must be at least 24 (idempotency keys replay for 24 h)"));
        }
        positive("idempotency.max_stored_bytes", self.idempotency.max_stored_bytes as u64)?;
        positive("history.max_entries", self.history.max_entries)?;
        let floor = self.server.upstream_timeout_ms / 1000 + 360;
        if self.charges.record_ttl_secs < floor {
            return Err(bad(
                "charges.record_ttl_secs",
                format!(
                    "must be at least {floor} (the upstream timeout plus 6 minutes, so a request and its refund fit)"
                ),
            ));
        }
        positive("export.batch_size", self.export.batch_size as u64)?;
        if let Some(url) = &self.export.url {
            parse_upstream_url(url).map_err(|reason| bad("export.url", reason))?;
            if self.export.secret_env.is_none() {
                return Err(bad("export.secret_env", "required with export.url (deliveries are always signed)"));
            }
        }
        positive("notifications.max_outbox_per_account", self.notifications.max_outbox_per_account)?;
        if let Some(stripe) = &self.billing.stripe {
            stripe.validate()?;
        }
        if self.auto_topup.max_per_period == 0 {
            return Err(bad("auto_topup.max_per_period", "must be greater than 0"));
        }
        for (i, t) in self.notifications.thresholds_percent.iter().enumerate() {
            if *t > 100 {
                return Err(bad(format!("notifications.thresholds_percent[{i}]"), "must be 0..=100"));
            }
        }
        if let Some(demo) = &self.demo {
            parse_addr("demo.backend_listen", &demo.backend_listen)?;
            if !self.plans.contains_key(&demo.plan) {
                return Err(bad("demo.plan", format!("unknown plan {:?} (known: {})", demo.plan, names(&self.plans))));
            }
        }
        if let Some(url) = &self.notifications.webhook_url {
            parse_upstream_url(url).map_err(|r| bad("notifications.webhook_url", r))?;
            if self.notifications.webhook_secret_env.is_none() {
                return Err(bad(
                    "notifications.webhook_secret_env",
                    "required with webhook_url: every delivery is signed (x-creditgate-signature)",
                ));
            }
        }
        if self.notifications.event_ttl_hours == 0 {
            return Err(bad("notifications.event_ttl_hours", "must be greater than 0"));
        }
        if let Some(smtp) = &self.notifications.smtp {
            if smtp.host.is_empty() {
                return Err(bad("notifications.smtp.host", "must not be empty"));
            }
            if smtp.from.parse::<lettre::message::Mailbox>().is_err() {
                return Err(bad(
                    "notifications.smtp.from",
                    format!("{:?} is not a mailbox like Name <a@b.c>", smtp.from),
                ));
            }
        }
        Ok(self)
    }

    fn validate_store(&self) -> Result<(), ConfigError> {
        let st = &self.store;
        if st.max_wait_ms == 0 || st.max_wait_ms > 60_000 {
            return Err(bad("store.max_wait_ms", "must be between 1 and 60000"));
        }
        if st.wait_replicas > 0 && st.kind == StoreKind::Memory {
            return Err(bad("store.wait_replicas", "only for a Redis store; remove it"));
        }
        // The WAIT's answer must arrive before the step's own deadline and the connection's
        // 2 s response timeout, or a slow replica would look like a store outage.
        if st.wait_replicas > 0
            && (st.wait_timeout_ms == 0 || st.wait_timeout_ms > 1_000 || st.wait_timeout_ms >= st.max_wait_ms)
        {
            return Err(bad("store.wait_timeout_ms", "must be between 1 and 1000, and below store.max_wait_ms"));
        }
        match st.kind {
            StoreKind::Memory => {
                if st.url.is_some() {
                    return Err(bad("store.url", "not used with kind = \"memory\"; remove it"));
                }
                if st.nodes.is_some() {
                    return Err(bad("store.nodes", "not used with kind = \"memory\"; remove it"));
                }
            }
            StoreKind::Redis => {
                let url = st.url.as_deref().ok_or_else(|| bad("store.url", "required with kind = \"redis\""))?;
                check_redis_url("store.url", url)?;
                if st.nodes.is_some() {
                    return Err(bad("store.nodes", "only for kind = \"redis-cluster\"; use store.url"));
                }
            }
            StoreKind::RedisCluster => {
                let nodes =
                    st.nodes.as_deref().ok_or_else(|| bad("store.nodes", "required with kind = \"redis-cluster\""))?;
                if nodes.is_empty() {
                    return Err(bad("store.nodes", "needs at least one node URL"));
                }
                for (i, n) in nodes.iter().enumerate() {
                    check_redis_url(&format!("store.nodes[{i}]"), n)?;
                }
                if st.url.is_some() {
                    return Err(bad("store.url", "only for kind = \"redis\"; use store.nodes"));
                }
            }
            StoreKind::RedisSentinel => {
                let sentinels = st
                    .sentinels
                    .as_deref()
                    .ok_or_else(|| bad("store.sentinels", "required with kind = \"redis-sentinel\""))?;
                if sentinels.is_empty() {
                    return Err(bad("store.sentinels", "needs at least one sentinel URL"));
                }
                for (i, n) in sentinels.iter().enumerate() {
                    check_redis_url(&format!("store.sentinels[{i}]"), n)?;
                }
                if st.master_name.as_deref().is_none_or(str::is_empty) {
                    return Err(bad(
                        "store.master_name",
                        "required with kind = \"redis-sentinel\" (the name the sentinels monitor)",
                    ));
                }
                if st.url.is_some() || st.nodes.is_some() {
                    return Err(bad("store.url", "not used with kind = \"redis-sentinel\"; use store.sentinels"));
                }
            }
        }
        if st.kind != StoreKind::RedisSentinel {
            if st.sentinels.is_some() {
                return Err(bad("store.sentinels", "only for kind = \"redis-sentinel\""));
            }
            if st.master_name.is_some() {
                return Err(bad("store.master_name", "only for kind = \"redis-sentinel\""));
            }
        }
        Ok(())
    }

    /// The public listener address.
    pub fn listen_addr(&self) -> SocketAddr {
        self.server.listen.parse().expect("validated at load")
    }

    /// The admin listener address, when configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.server.admin_listen.as_ref().map(|a| a.parse().expect("validated at load"))
    }
}

impl OperationConfig {
    fn validate(&self, key: &str, upstreams: &BTreeMap<String, UpstreamConfig>) -> Result<(), ConfigError> {
        if self.category.trim().is_empty() {
            return Err(bad(format!("{key}.category"), "must not be empty"));
        }
        let campaign = [self.base, self.per_step, self.per_variant, self.per_channel, self.min, self.max];
        let is_campaign = campaign.iter().any(Option::is_some);
        let rules = [self.cost.is_some(), self.tiers.is_some(), self.per_item.is_some(), is_campaign];
        match rules.iter().filter(|r| **r).count() {
            0 => {
                return Err(bad(
                    key,
                    "needs a pricing rule: cost, tiers, per_item + items, or base/per_step/per_variant/per_channel + min/max",
                ));
            }
            1 => {}
            _ => return Err(bad(key, "set only one pricing rule (cost, tiers, per_item, or the campaign formula)")),
        }
        if let Some(c) = self.cost {
            positive(&format!("{key}.cost"), c)?;
        }
        if let Some(tiers) = &self.tiers {
            if tiers.is_empty() {
                return Err(bad(format!("{key}.tiers"), "needs at least one tier"));
            }
            let mut names_seen: BTreeMap<&str, String> =
                tiers.keys().map(|t| (t.as_str(), format!("tier {t:?}"))).collect();
            let mut models_seen: BTreeMap<&str, &str> = BTreeMap::new();
            for (t, tier) in tiers {
                let k = format!("{key}.tiers.{t}");
                positive(
                    &if matches!(tier, TierConfig::Cost(_)) { k.clone() } else { format!("{k}.cost") },
                    tier.cost(),
                )?;
                if let Some(model) = tier.model() {
                    if model.is_empty() {
                        return Err(bad(format!("{k}.model"), "must not be empty"));
                    }
                    if let Some(other) = models_seen.insert(model, t) {
                        return Err(bad(
                            format!("{k}.model"),
                            format!("{model:?} is also tier {other:?}'s model: a model must pick one tier"),
                        ));
                    }
                }
                if let Some(up) = tier.upstream() {
                    if !upstreams.contains_key(up) {
                        return Err(bad(
                            format!("{k}.upstream"),
                            format!("unknown upstream {up:?} (known: {})", names(upstreams)),
                        ));
                    }
                    if self.tier_upstreams.contains_key(t) {
                        return Err(bad(
                            format!("{key}.tier_upstreams.{t}"),
                            "the tier sets its own upstream; keep one",
                        ));
                    }
                }
                for alias in tier.aliases() {
                    if alias.is_empty() {
                        return Err(bad(format!("{k}.aliases"), "an alias must not be empty"));
                    }
                    if let Some(other) = names_seen.insert(alias, format!("an alias of tier {t:?}")) {
                        return Err(bad(format!("{k}.aliases"), format!("{alias:?} is already {other}")));
                    }
                }
            }
            for (t, tier) in tiers {
                for name in std::iter::once(t).chain(tier.aliases()) {
                    if let Some(owner) = models_seen.get(name.as_str()).filter(|owner| **owner != t) {
                        return Err(bad(
                            format!("{key}.tiers.{t}"),
                            format!("{name:?} names this tier but is tier {owner:?}'s model"),
                        ));
                    }
                }
            }
            let d = self
                .default_tier
                .as_deref()
                .ok_or_else(|| bad(format!("{key}.default_tier"), "required with tiers"))?;
            if !tiers.contains_key(d) {
                return Err(bad(
                    format!("{key}.default_tier"),
                    format!("{d:?} is not one of the tiers ({})", names(tiers)),
                ));
            }
            for (t, up) in &self.tier_upstreams {
                let k = format!("{key}.tier_upstreams.{t}");
                if !tiers.contains_key(t) {
                    return Err(bad(k, format!("{t:?} is not one of the tiers ({})", names(tiers))));
                }
                if !upstreams.contains_key(up) {
                    return Err(bad(k, format!("unknown upstream {up:?} (known: {})", names(upstreams))));
                }
            }
        } else {
            if self.default_tier.is_some() {
                return Err(bad(format!("{key}.default_tier"), "only allowed with tiers"));
            }
            if self.allow_other_models {
                return Err(bad(format!("{key}.allow_other_models"), "only allowed with tiers"));
            }
            if !self.tier_upstreams.is_empty() {
                return Err(bad(format!("{key}.tier_upstreams"), "only allowed with tiers"));
            }
        }
        match (self.per_item, &self.items) {
            (Some(c), Some(field)) => {
                positive(&format!("{key}.per_item"), c)?;
                if field.is_empty() {
                    return Err(bad(format!("{key}.items"), "must name a JSON body field"));
                }
            }
            (Some(_), None) => return Err(bad(format!("{key}.items"), "required with per_item")),
            (None, Some(_)) => return Err(bad(format!("{key}.items"), "only allowed with per_item")),
            (None, None) => {}
        }
        if self.automatic_free_max_per_period.is_some() && !self.automatic_free {
            return Err(bad(format!("{key}.automatic_free_max_per_period"), "only allowed with automatic_free = true"));
        }
        if self.automatic_free && self.per_item.is_none() && self.cost.is_none() {
            return Err(bad(format!("{key}.automatic_free"), "only allowed with cost or per_item"));
        }
        if is_campaign {
            let min = self.min.ok_or_else(|| bad(format!("{key}.min"), "required with the campaign formula"))?;
            let max = self.max.ok_or_else(|| bad(format!("{key}.max"), "required with the campaign formula"))?;
            positive(&format!("{key}.min"), min)?;
            if min > max {
                return Err(bad(format!("{key}.min"), format!("{min} is greater than max ({max})")));
            }
        }
        Ok(())
    }
}

fn toml_error(text: &str, e: toml::de::Error) -> ConfigError {
    // toml's message names the offending field for unknown fields; where in the file it is comes
    // from the span, as the line and the text there. One line, so the refusal is one log line.
    let msg = e.message().replace('\n', " ");
    let key = match e.span().filter(|s| s.start <= text.len()) {
        Some(span) => {
            let line = text[..span.start].matches('\n').count() + 1;
            let source = text.lines().nth(line - 1).unwrap_or_default().trim();
            let shown: String = source.chars().take(100).collect();
            let more = if shown.len() < source.len() { "…" } else { "" };
            format!("line {line} ({shown}{more})")
        }
        None => "toml".to_owned(),
    };
    bad(key, msg)
}

fn parse_addr(key: &str, v: &str) -> Result<SocketAddr, ConfigError> {
    v.parse().map_err(|_| bad(key, format!("{v:?} is not an address like 127.0.0.1:8080")))
}

fn check_redis_url(key: &str, url: &str) -> Result<(), ConfigError> {
    if url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("redis+unix://") {
        Ok(())
    } else {
        Err(bad(key, format!("{url:?} is not a redis:// URL")))
    }
}

fn positive(key: &str, v: u64) -> Result<(), ConfigError> {
    let max = crate::ledger::MAX_CREDITS;
    if v == 0 {
        Err(bad(key, "must be a positive integer"))
    } else if v > max {
        Err(bad(key, format!("must be at most {max}")))
    } else {
        Ok(())
    }
}

fn check_price(key: &str, v: f64) -> Result<(), ConfigError> {
    if v.is_finite() && v >= 0.0 { Ok(()) } else { Err(bad(key, "must be a number >= 0")) }
}

fn check_name(key: &str, name: &str) -> Result<(), ConfigError> {
    if !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        Ok(())
    } else {
        Err(bad(key, "names use only letters, digits, _ and -"))
    }
}

fn names<V>(map: &BTreeMap<String, V>) -> String {
    map.keys().map(String::as_str).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: &str = include_str!("../config/gateway.toml");

    #[test]
    fn shipped_config_is_valid() {
        let c = Config::parse(SHIPPED).expect("shipped config validates");
        assert_eq!(c.plans["pro"].monthly_credits, 2000);
        assert_eq!(c.topup_packages["1500"].credits, 1500);
        assert_eq!(c.operations["ai_chat"].tiers.as_ref().unwrap()["powerful"].cost(), 5);
    }

    #[test]
    fn an_http_upstream_has_the_host_field_its_client_would_write() {
        let host = |url: &str| parse_upstream_url(url).unwrap().host.map(|h| h.to_str().unwrap().to_owned());
        assert_eq!(host("http://127.0.0.1:8000").as_deref(), Some("127.0.0.1:8000"));
        assert_eq!(host("http://backend.internal:80/v2").as_deref(), Some("backend.internal"));
        assert_eq!(host("http://backend.internal").as_deref(), Some("backend.internal"));
        assert_eq!(host("http://[::1]:8080").as_deref(), Some("[::1]:8080"));
        assert_eq!(host("http://user:pw@10.0.0.1:443").as_deref(), Some("10.0.0.1:443"));
        assert_eq!(host("https://backend.internal:8443"), None, "left to the client (HTTP/2 has no Host)");
    }

    fn with(replace: &str, by: &str) -> Result<Config, ConfigError> {
        assert!(SHIPPED.contains(replace), "fixture text {replace:?} missing");
        Config::parse(&SHIPPED.replacen(replace, by, 1))
    }

    #[test]
    fn unknown_upstream_names_the_route() {
        let e = with("upstream = \"ai\"\noperation = \"ai_chat\"", "upstream = \"aii\"\noperation = \"ai_chat\"")
            .unwrap_err();
        assert_eq!(e.key, "routes[0].upstream");
        assert!(e.reason.contains("unknown upstream \"aii\""), "{e}");
    }

    #[test]
    fn refund_rules_and_idempotency_settings() {
        let c = Config::parse(SHIPPED).unwrap();
        let all = [RefundOn::Unreachable, RefundOn::Status5xx, RefundOn::Timeout];
        assert_eq!(c.operations["ai_chat"].refund_on, all, "the shipped chat refunds timeouts too");
        assert_eq!(c.operations["sentiment_analysis"].refund_on, default_refund_on());
        assert_eq!((c.idempotency.max_stored_bytes, c.idempotency.wait_ms), (1 << 20, 5_000));
        let e =
            with("refund_on = [\"unreachable\", \"status_5xx\", \"timeout\"]", "refund_on = [\"later\"]").unwrap_err();
        assert!(e.to_string().contains("later"), "{e}");
        // A replayed 202 must never point at a job already forgotten.
        let e = Config::parse(&format!("{SHIPPED}\n[jobs]\nresult_retention_hours = 23\n")).unwrap_err();
        assert_eq!(e.key, "jobs.result_retention_hours");
        let e = with("automatic_free = true", "automatic_free_max_per_period = 5").unwrap_err();
        assert_eq!(e.key, "operations.lead_scoring_refresh.automatic_free_max_per_period");
    }

    #[test]
    fn unknown_operation_is_rejected() {
        let e = with("operation = \"ai_chat\"", "operation = \"ai_chatt\"").unwrap_err();
        assert_eq!(e.key, "routes[0].operation");
    }

    #[test]
    fn default_tier_must_be_a_tier() {
        let e = with("default_tier = \"balanced\"", "default_tier = \"turbo\"").unwrap_err();
        assert_eq!(e.key, "operations.ai_chat.default_tier");
    }

    #[test]
    fn zero_cost_is_rejected() {
        let e = with("fast = 1", "fast = 0").unwrap_err();
        assert_eq!(e.key, "operations.ai_chat.tiers.fast");
    }

    #[test]
    fn negative_cost_is_a_type_error_naming_the_key() {
        let e = with("fast = 1", "fast = -1").unwrap_err();
        assert!(e.to_string().contains("fast") || e.to_string().contains("invalid value"), "{e}");
    }

    #[test]
    fn min_above_max_is_rejected() {
        let e = with("min = 3", "min = 30").unwrap_err();
        assert_eq!(e.key, "operations.campaign_generation.min");
    }

    #[test]
    fn bad_listen_address_is_rejected() {
        let e = with("listen = \"127.0.0.1:8080\"", "listen = \"localhost\"").unwrap_err();
        assert_eq!(e.key, "server.listen");
    }

    #[test]
    fn store_section_must_fit_kind() {
        let e = with("kind = \"redis\"", "kind = \"memory\"").unwrap_err();
        assert_eq!(e.key, "store.url");
        let e = with("kind = \"redis\"", "kind = \"redis-cluster\"").unwrap_err();
        assert_eq!(e.key, "store.nodes");
        let e = with("url = \"redis://127.0.0.1:6379\"", "url = \"http://127.0.0.1:6379\"").unwrap_err();
        assert_eq!(e.key, "store.url");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = with("[server]", "[server]\nlisten_port = 1").unwrap_err();
        assert!(e.reason.contains("listen_port"), "{e}");
    }

    #[test]
    fn two_pricing_rules_are_refused() {
        let e = with("cost = 5", "cost = 5\nper_item = 1\nitems = \"leads\"").unwrap_err();
        assert!(e.reason.contains("only one pricing rule"), "{e}");
    }

    #[test]
    fn pool_settings_are_checked_naming_the_key() {
        let pool = |line: &str| {
            with("urls = [\"http://127.0.0.1:8000\"]", &format!("urls = [\"http://127.0.0.1:8000\"]\n{line}"))
        };
        assert_eq!(pool("max_in_flight = 0").unwrap_err().key, "upstreams.ai.max_in_flight");
        assert_eq!(pool("eject_after = 0").unwrap_err().key, "upstreams.ai.eject_after");
        assert_eq!(pool("stream_idle_timeout_ms = 0").unwrap_err().key, "upstreams.ai.stream_idle_timeout_ms");
        assert_eq!(pool("health_path = \"health\"").unwrap_err().key, "upstreams.ai.health_path");
        let e = pool("balance = \"random\"").unwrap_err();
        assert!(e.to_string().contains("balance") && e.to_string().contains("least_requests"), "{e}");
        let c = pool("balance = \"least_requests\"\nmax_in_flight = 8\nhealth_path = \"/health\"").unwrap();
        assert_eq!(c.upstreams["ai"].balance, Balance::LeastRequests);
        assert_eq!(c.upstreams["ai"].eject_after, 5, "default");
    }

    #[test]
    fn upstream_url_needs_http_or_https() {
        assert_eq!(parse_upstream_url("https://x:1").unwrap().scheme, http::uri::Scheme::HTTPS);
        assert!(parse_upstream_url("ftp://x:1").unwrap_err().contains("not supported"));
        assert!(parse_upstream_url("127.0.0.1:1").is_err());
        let u = parse_upstream_url("http://127.0.0.1:8000/base/").unwrap();
        assert_eq!(u.base_path, "/base");
        assert_eq!(u.authority.as_str(), "127.0.0.1:8000");
    }
}
