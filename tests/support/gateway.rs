//! A real gateway on loopback port 0 for black-box tests, plus a builder for its config.
//!
//! [`ConfigBuilder`] starts from the shipped `config/gateway.toml` (so the tests price requests
//! with exactly the table users get) and changes only what a test needs: the embedded store,
//! port-0 listeners, recording upstreams and literal upstream credentials.

use std::time::Duration;

use creditgate::config::Config;
use creditgate::server::{self, Gateway, StartOptions};
use serde_json::{Value, json};

use super::http::{self, Response};
use super::upstream::Upstream;

/// The admin token every test gateway uses.
pub const ADMIN_TOKEN: &str = "test-admin-token";
/// The credentials the `ai` upstream is configured to receive.
pub const BACKEND_AUTH: &str = "Bearer backend-secret";

/// The usage categories of the shipped price table (SPEC §1).
pub const CATEGORIES: [&str; 5] = ["AI Chat", "Enrichment", "Campaigns", "Transcription", "Insights"];

/// The operations of the shipped price table (SPEC §1).
pub const OPERATIONS: [&str; 9] = [
    "ai_chat",
    "lead_enrichment",
    "campaign_generation",
    "call_transcription",
    "insights_position",
    "insights_competitive",
    "lead_scoring_refresh",
    "icebreaker",
    "sentiment_analysis",
];

/// The shipped price table, plans and packages.
pub const SHIPPED: &str = include_str!("../../config/gateway.toml");

/// Builds a test config from the shipped one.
#[derive(Debug, Clone)]
pub struct ConfigBuilder {
    ai: String,
    ai_urls: Vec<String>,
    ai_settings: Vec<String>,
    app: String,
    upstream_timeout_ms: Option<u64>,
    max_body_bytes: Option<usize>,
    store: Option<String>,
    notifications: Vec<String>,
    server: Vec<String>,
    extra: String,
    keep_rate_limits: bool,
    rate_limits: Vec<String>,
}

impl ConfigBuilder {
    /// Both upstreams at `url`.
    pub fn new(url: &str) -> Self {
        ConfigBuilder {
            ai: url.to_owned(),
            ai_urls: Vec::new(),
            ai_settings: Vec::new(),
            app: url.to_owned(),
            upstream_timeout_ms: None,
            max_body_bytes: None,
            store: None,
            notifications: Vec::new(),
            server: Vec::new(),
            extra: String::new(),
            keep_rate_limits: false,
            rate_limits: Vec::new(),
        }
    }

    /// The `ai` upstream (metered routes).
    pub fn ai(mut self, url: &str) -> Self {
        self.ai = url.to_owned();
        self
    }

    /// The `ai` upstream as a pool of these backends, with these lines added to
    /// `[upstreams.ai]` (e.g. `max_in_flight = 2`).
    pub fn ai_pool(mut self, urls: &[String], settings: &[&str]) -> Self {
        self.ai_urls = urls.to_vec();
        self.ai_settings = settings.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// The `app` upstream (the free catch-all route).
    pub fn app(mut self, url: &str) -> Self {
        self.app = url.to_owned();
        self
    }

    /// `server.upstream_timeout_ms`.
    pub fn upstream_timeout_ms(mut self, ms: u64) -> Self {
        self.upstream_timeout_ms = Some(ms);
        self
    }

    /// `server.max_body_bytes`.
    pub fn max_body_bytes(mut self, n: usize) -> Self {
        self.max_body_bytes = Some(n);
        self
    }

    /// The `[store]` lines after `kind` (e.g. `kind = "redis"\nurl = "redis://…"`), instead of memory.
    pub fn store(mut self, lines: &str) -> Self {
        self.store = Some(lines.to_owned());
        self
    }

    /// A line added to `[notifications]`.
    pub fn notification(mut self, line: &str) -> Self {
        self.notifications.push(line.to_owned());
        self
    }

    /// A line added to `[server]` (e.g. `idle_timeout_ms = 500`).
    pub fn server(mut self, line: &str) -> Self {
        self.server.push(line.to_owned());
        self
    }

    /// TOML appended at the end (new tables only, e.g. `[jobs]`).
    pub fn extra(mut self, toml: &str) -> Self {
        self.extra.push('\n');
        self.extra.push_str(toml);
        self.extra.push('\n');
        self
    }

    /// Keeps the shipped plans' `rate_limit_per_second` and `[rate_limits]` failed-authentication
    /// limits (by default tests lift them, so bursts of test traffic measure credits and nothing else).
    pub fn keep_rate_limits(mut self) -> Self {
        self.keep_rate_limits = true;
        self
    }

    /// A line set in `[rate_limits]` (e.g. `failed_auth_burst = 3`), replacing the shipped one.
    pub fn rate_limit(mut self, line: &str) -> Self {
        self.rate_limits.push(line.to_owned());
        self
    }

    /// The config text.
    ///
    /// Adds two plans with no practical rate limit, so that bursts of test traffic measure the
    /// credits and nothing else: `fifty` (50 monthly credits, like `free`) and `big` (10,000).
    pub fn build(&self) -> String {
        let mut text = String::new();
        let mut seen = [false; 7];
        for line in SHIPPED.lines() {
            let t = line.trim_start();
            let out = if t.starts_with("listen = ") {
                seen[0] = true;
                "listen = \"127.0.0.1:0\"".to_owned()
            } else if t.starts_with("admin_listen = ") {
                seen[1] = true;
                "admin_listen = \"127.0.0.1:0\"".to_owned()
            } else if t.starts_with("kind = \"redis\"") {
                seen[2] = true;
                self.store.clone().unwrap_or_else(|| "kind = \"memory\"".to_owned())
            } else if t.starts_with("url = \"redis://") {
                seen[3] = true;
                continue;
            } else if t.starts_with("urls = [\"http://127.0.0.1:8000\"]") {
                seen[4] = true;
                if self.ai_urls.is_empty() {
                    format!("urls = [\"{}\"]", self.ai)
                } else {
                    let urls: Vec<String> = self.ai_urls.iter().map(|u| format!("{u:?}")).collect();
                    format!("urls = [{}]\n{}", urls.join(", "), self.ai_settings.join("\n"))
                }
            } else if t.starts_with("urls = [\"http://127.0.0.1:8001\"]") {
                seen[5] = true;
                format!("urls = [\"{}\"]", self.app)
            } else if t.starts_with("headers = { authorization = \"env:AI_BACKEND_KEY\" }") {
                seen[6] = true;
                format!("headers = {{ authorization = \"{BACKEND_AUTH}\" }}")
            } else if t.starts_with("on_error = ") && self.store.as_deref().is_some_and(|l| l.contains("on_error")) {
                continue;
            } else if t.starts_with("upstream_timeout_ms = ")
                && let Some(ms) = self.upstream_timeout_ms
            {
                format!("upstream_timeout_ms = {ms}")
            } else if t.starts_with("max_body_bytes = ")
                && let Some(n) = self.max_body_bytes
            {
                format!("max_body_bytes = {n}")
            } else if t.starts_with("rate_limit_per_second = ") && !self.keep_rate_limits {
                "rate_limit_per_second = 1000000".to_owned()
            } else if let Some((key, _)) = t.split_once(" = ")
                && self.rate_limits.iter().any(|l| l.split_once(" = ").is_some_and(|(k, _)| k.trim() == key))
            {
                continue;
            } else if (t.starts_with("failed_auth_per_minute = ") || t.starts_with("failed_auth_burst = "))
                && !self.keep_rate_limits
            {
                format!("{} = 1000000", t.split_once(" = ").map_or(t, |(k, _)| k))
            } else if t == "[server]" || t == "[notifications]" || t == "[rate_limits]" {
                let mut out = line.to_owned();
                let added = match t {
                    "[server]" => &self.server,
                    "[notifications]" => &self.notifications,
                    _ => &self.rate_limits,
                };
                for l in added {
                    out.push('\n');
                    out.push_str(l);
                }
                out
            } else {
                line.to_owned()
            };
            text.push_str(&out);
            text.push('\n');
        }
        assert!(seen.iter().all(|s| *s), "config/gateway.toml changed shape; update the test builder ({seen:?})");
        text.push_str(
            "\n[plans.fifty]\nmonthly_credits = 50\nrate_limit_per_second = 1000000\n\
             \n[plans.big]\nmonthly_credits = 10000\nrate_limit_per_second = 1000000\n",
        );
        text.push_str(&self.extra);
        text
    }
}

/// A running gateway with its base URLs.
pub struct TestGateway {
    /// The gateway itself (shut down on drop of the test runtime).
    pub gateway: Gateway,
    /// `http://127.0.0.1:PORT` of the public listener.
    pub public: String,
    /// `http://127.0.0.1:PORT` of the admin listener.
    pub admin: String,
    /// The Redis a memory-store config was moved to (`CREDITGATE_TEST_STORE`).
    _redis: Option<MovedStore>,
}

/// The store a memory-store test gateway runs on instead, kept running as long as the gateway.
enum MovedStore {
    Redis(super::redis::RedisServer),
    Cluster(super::redis::RedisCluster),
}

/// `CREDITGATE_TEST_STORE=redis` runs every gateway whose config asks for the memory store on a
/// fresh `redis-server` of its own instead, and `CREDITGATE_TEST_STORE=cluster` on a fresh
/// 3-master Redis Cluster: `scripts/test` runs the gateway-level suites (metering, proxying,
/// jobs, admin) on Redis too, and metering and jobs on a cluster, so they prove their behaviour
/// on every store.
fn moved_to_redis(config: &mut Config) -> Option<MovedStore> {
    use creditgate::config::StoreKind;
    if config.store.kind != StoreKind::Memory {
        return None;
    }
    match std::env::var("CREDITGATE_TEST_STORE").as_deref() {
        Ok("redis") => {
            let redis = super::redis::RedisServer::start();
            config.store.kind = StoreKind::Redis;
            config.store.url = Some(redis.url());
            Some(MovedStore::Redis(redis))
        }
        Ok("cluster") => {
            let cluster = super::redis::RedisCluster::start();
            config.store.kind = StoreKind::RedisCluster;
            config.store.nodes = Some(cluster.urls());
            Some(MovedStore::Cluster(cluster))
        }
        Ok("memory") | Ok("") | Err(_) => None,
        Ok(other) => panic!("CREDITGATE_TEST_STORE={other:?}: use redis, cluster or memory"),
    }
}

impl TestGateway {
    /// Parses `config_toml` and starts a gateway on it with the test admin token.
    pub async fn start(config_toml: &str) -> Self {
        // `CREDITGATE_TEST_LOG=filter` shows an in-process gateway's log (e.g. with `--nocapture`).
        if let Ok(filter) = std::env::var("CREDITGATE_TEST_LOG") {
            let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
        }
        let mut config = Config::parse(config_toml).unwrap_or_else(|e| panic!("test config invalid: {e}"));
        let redis = moved_to_redis(&mut config);
        let opts = StartOptions { admin_token: Some(ADMIN_TOKEN.into()), ..Default::default() };
        let gateway = server::start(config, opts).await.unwrap_or_else(|e| panic!("gateway did not start: {e}"));
        TestGateway { _redis: redis, ..Self::from_running(gateway) }
    }

    /// Wraps a gateway started by other means.
    pub fn from_running(gateway: Gateway) -> Self {
        let public = format!("http://{}", gateway.public_addr);
        let admin = format!("http://{}", gateway.admin_addr.expect("admin listener configured"));
        TestGateway { gateway, public, admin, _redis: None }
    }

    /// Starts a gateway whose upstreams both point at `url`.
    pub async fn with_upstream(url: &str) -> Self {
        Self::start(&ConfigBuilder::new(url).build()).await
    }

    /// A public URL for `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.public)
    }

    /// An admin request with the admin token.
    pub async fn admin_call(&self, method: &str, path: &str, body: Option<Value>) -> Response {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        let url = format!("{}{path}", self.admin);
        match body {
            Some(b) => {
                let headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
                http::send(method, &url, &headers, b.to_string()).await
            }
            None => http::send(method, &url, &[("authorization", auth.as_str())], "").await,
        }
    }

    /// Creates an account; panics unless the answer is 201.
    pub async fn create_account(&self, id: &str, plan: &str) -> Value {
        let res = self.admin_call("POST", "/admin/v1/accounts", Some(json!({"id": id, "plan": plan}))).await;
        assert_eq!(res.status, 201, "create account {id}: {}", res.text());
        res.json()
    }

    /// Creates an API key with `role` (`user` or `system`); returns the plaintext key.
    pub async fn create_key(&self, account: &str, role: &str) -> String {
        let path = format!("/admin/v1/accounts/{account}/keys");
        let res = self.admin_call("POST", &path, Some(json!({"role": role}))).await;
        assert_eq!(res.status, 201, "create key for {account}: {}", res.text());
        res.json()["key"].as_str().expect("key in answer").to_owned()
    }

    /// An account on `plan` and a `user` key for it.
    pub async fn account_with_key(&self, id: &str, plan: &str) -> String {
        self.create_account(id, plan).await;
        self.create_key(id, "user").await
    }

    /// Adds `credits` top-up credits under `payment_ref`; returns the raw answer.
    pub async fn topup(&self, account: &str, credits: u64, payment_ref: &str) -> Response {
        let path = format!("/admin/v1/accounts/{account}/topups");
        self.admin_call("POST", &path, Some(json!({"credits": credits, "payment_ref": payment_ref}))).await
    }

    /// `GET /v1/credits` for the key's account; panics unless 200.
    pub async fn credits(&self, key: &str) -> Value {
        let auth = format!("Bearer {key}");
        let res = http::send("GET", &self.url("/v1/credits"), &[("authorization", &auth)], "").await;
        assert_eq!(res.status, 200, "GET /v1/credits: {}", res.text());
        res.json()
    }

    /// Total remaining credits of the key's account.
    pub async fn remaining(&self, key: &str) -> u64 {
        self.credits(key).await["remaining"].as_u64().expect("remaining is a number")
    }

    /// Polls the balance until it equals `expected`, at most `tries` × 50 ms; returns the last value.
    pub async fn wait_for_remaining(&self, key: &str, expected: u64, tries: usize) -> u64 {
        let mut last = self.remaining(key).await;
        for _ in 0..tries {
            if last == expected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            last = self.remaining(key).await;
        }
        last
    }

    /// A public request authenticated with `key`, plus extra headers.
    pub async fn call(&self, key: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Response {
        let auth = format!("Bearer {key}");
        let mut all: Vec<(&str, &str)> = vec![("authorization", &auth), ("content-type", "application/json")];
        all.extend_from_slice(headers);
        http::send(method, &self.url(path), &all, body.to_owned()).await
    }

    /// `POST path` with `key` and a JSON body.
    pub async fn post(&self, key: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Response {
        self.call(key, "POST", path, headers, body).await
    }
}

/// Separate recording `ai` and `app` upstreams (metered and free routes), a gateway in front of
/// them and a `user` key of account `acme` on plan `big`.
pub async fn split_upstreams() -> (TestGateway, Upstream, Upstream, String) {
    let ai = Upstream::echo().await;
    let app = Upstream::echo().await;
    let gw = TestGateway::start(&ConfigBuilder::new(&ai.url()).app(&app.url()).build()).await;
    let key = gw.account_with_key("acme", "big").await;
    (gw, ai, app, key)
}

/// A body of `n` leads for the per-lead operations (costs `n`).
pub fn leads(n: usize) -> String {
    let list: Vec<String> = (0..n).map(|i| format!(r#"{{"id":{i}}}"#)).collect();
    format!(r#"{{"leads":[{}]}}"#, list.join(","))
}

/// Spends exactly `n` credits with one lead-enrichment request; panics unless charged.
pub async fn spend(gw: &TestGateway, key: &str, n: usize) -> Response {
    let res = gw.post(key, "/v1/leads/enrich", &[], &leads(n)).await;
    assert_eq!(res.status, 200, "spend {n}: {}", res.text());
    assert_eq!(res.charged(), n as u64);
    res
}
