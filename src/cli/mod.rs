//! The client side of the `creditgate` command: `admin …` ([`admin`]) and `check --against`
//! ([`check`]), both talking to a running gateway's admin API.
//!
//! Exit codes are part of the interface (README, "Commands"): [`Exit`]. Every failure is one
//! [`CliError`], turned into a line on stderr and an exit code in one place ([`CliError::exit`]).

pub mod admin;
pub mod check;

use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// What a script can rely on: the process exit code of `admin …` and `check --against`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Done.
    Ok = 0,
    /// The gateway answered with an error (printed: its type and message), or a config file is invalid.
    Api = 1,
    /// Bad arguments (clap's own code), or no admin token in the environment.
    Usage = 2,
    /// The gateway could not be reached, or did not answer in time.
    Unreachable = 3,
    /// The gateway refused the admin token (401 or 403).
    Unauthorized = 4,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e as u8)
    }
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad arguments or environment.
    #[error("{0}")]
    Usage(String),
    /// No connection, or no answer in time.
    #[error("cannot reach the gateway at {url}: {reason}")]
    Unreachable {
        /// The admin URL.
        url: String,
        /// What went wrong (connection refused, timeout, …).
        reason: String,
    },
    /// The gateway answered 401 or 403.
    #[error("{kind} (HTTP {status}): {message} (the token is read from ${token_env})")]
    Unauthorized {
        /// HTTP status.
        status: u16,
        /// The error type.
        kind: String,
        /// The error message.
        message: String,
        /// The variable the token came from.
        token_env: String,
    },
    /// Any other error answer.
    #[error("{kind} (HTTP {status}): {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The error type (`not_found`, `bad_request`, …).
        kind: String,
        /// The error message.
        message: String,
    },
    /// A config file that does not load, or an answer that makes no sense.
    #[error("{0}")]
    Invalid(String),
}

impl CliError {
    /// The exit code for this failure.
    pub fn exit(&self) -> Exit {
        match self {
            CliError::Usage(_) => Exit::Usage,
            CliError::Unreachable { .. } => Exit::Unreachable,
            CliError::Unauthorized { .. } => Exit::Unauthorized,
            CliError::Api { .. } | CliError::Invalid(_) => Exit::Api,
        }
    }
}

/// Prints the outcome (a failure as one `creditgate: …` line on stderr) and returns its exit code.
pub fn finish(result: Result<(), CliError>) -> ExitCode {
    match result {
        Ok(()) => Exit::Ok.into(),
        Err(e) => {
            eprintln!("creditgate: {e}");
            e.exit().into()
        }
    }
}

/// Where the admin API is and how to authenticate to it.
#[derive(Debug, Clone, clap::Args)]
pub struct Endpoint {
    /// The gateway's admin listener.
    #[arg(long, global = true, default_value = "http://127.0.0.1:9090")]
    pub url: String,
    /// The environment variable holding the admin token (the token itself is never an argument:
    /// `ps` shows arguments to every user of the machine).
    #[arg(long, global = true, default_value = "CREDITGATE_ADMIN_TOKEN", value_name = "VAR")]
    pub token_env: String,
    /// Longest wait for an answer, in milliseconds (then exit 3).
    #[arg(long, global = true, default_value_t = 10_000, value_name = "MS")]
    pub timeout_ms: u64,
}

/// A client of one gateway's admin API.
pub struct AdminClient {
    base: String,
    token: String,
    token_env: String,
    timeout: Duration,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

/// An answer of the admin API: status, body as sent, and the body parsed.
pub struct Answer {
    /// HTTP status (2xx: errors are [`CliError`]s).
    pub status: StatusCode,
    /// The body bytes as the gateway sent them (what `--json` prints).
    pub raw: Bytes,
    /// The body as JSON.
    pub json: Value,
}

impl AdminClient {
    /// Checks the URL and reads the token from the environment.
    pub fn new(endpoint: &Endpoint) -> Result<Self, CliError> {
        let base = endpoint.url.trim_end_matches('/').to_owned();
        let uri: http::Uri = base.parse().map_err(|e| CliError::Usage(format!("--url {base:?}: not a URL ({e})")))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(CliError::Usage(format!("--url {base:?}: write http://HOST:PORT of the admin listener")));
        }
        let token = std::env::var(&endpoint.token_env).ok().filter(|t| !t.is_empty()).ok_or_else(|| {
            CliError::Usage(format!("set the admin token in the environment variable {}", endpoint.token_env))
        })?;
        let https =
            hyper_rustls::HttpsConnectorBuilder::new().with_webpki_roots().https_or_http().enable_http1().build();
        Ok(AdminClient {
            base,
            token,
            token_env: endpoint.token_env.clone(),
            timeout: Duration::from_millis(endpoint.timeout_ms),
            client: Client::builder(TokioExecutor::new()).build(https),
        })
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Result<Answer, CliError> {
        self.call(Method::GET, path, None).await
    }

    /// One request; a non-2xx answer is an error carrying the answer's error type and message.
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<Answer, CliError> {
        let url = format!("{}{path}", self.base);
        let unreachable = |reason: String| CliError::Unreachable { url: self.base.clone(), reason };
        let mut req = Request::builder()
            .method(method)
            .uri(&url)
            .header(http::header::AUTHORIZATION, format!("Bearer {}", self.token))
            .header(http::header::ACCEPT, "application/json");
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let req = req.body(Full::new(body)).map_err(|e| CliError::Usage(format!("{url}: {e}")))?;
        let exchange = async {
            let res = self.client.request(req).await.map_err(|e| {
                let io = crate::error::cause_ref::<std::io::Error>(&e);
                unreachable(io.map_or_else(|| e.to_string(), ToString::to_string))
            })?;
            let status = res.status();
            let raw = res.into_body().collect().await.map_err(|e| unreachable(e.to_string()))?.to_bytes();
            Ok::<_, CliError>((status, raw))
        };
        let (status, raw) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| unreachable(format!("no answer within {} ms", self.timeout.as_millis())))??;
        let json: Option<Value> = serde_json::from_slice(&raw).ok();
        if status.is_success() {
            let json =
                json.ok_or_else(|| CliError::Invalid(format!("{url}: the answer (HTTP {status}) is not JSON")))?;
            return Ok(Answer { status, raw, json });
        }
        let error = json.as_ref().map(|j| &j["error"]);
        let kind = error.and_then(|e| e["type"].as_str()).unwrap_or("error").to_owned();
        let message = error
            .and_then(|e| e["message"].as_str())
            .map_or_else(|| String::from_utf8_lossy(&raw).trim().to_owned(), str::to_owned);
        let status = status.as_u16();
        if status == 401 || status == 403 {
            return Err(CliError::Unauthorized { status, kind, message, token_env: self.token_env.clone() });
        }
        Err(CliError::Api { status, kind, message })
    }
}

/// A path segment with every byte outside `[A-Za-z0-9._~-]` percent-encoded, so an id can never
/// reach another route.
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"._~-".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Runs `f` on a small single-threaded runtime (a command makes a handful of requests).
pub fn block_on<T>(f: impl std::future::Future<Output = Result<T, CliError>>) -> Result<T, CliError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Invalid(format!("cannot start a runtime: {e}")))?;
    rt.block_on(f)
}
