//! The real `creditgate` binary as a child process (`serve --config FILE`), for tests that need
//! several gateway processes or a gateway that outlives a store outage.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::gateway::ADMIN_TOKEN;
use super::http::{self, Response};

/// A running `creditgate serve`, killed on drop.
pub struct GatewayProcess {
    child: Child,
    /// `http://127.0.0.1:PORT` of the public listener.
    pub public: String,
    /// `http://127.0.0.1:PORT` of the admin listener.
    pub admin: String,
    config: PathBuf,
    /// Everything written to stderr so far, when started with [`GatewayProcess::start_logging`].
    log: Option<Arc<Mutex<Vec<u8>>>>,
}

/// An admin API call with the test admin token: `base` is a gateway's admin address.
pub async fn admin(base: &str, method: &str, path: &str, body: Option<serde_json::Value>) -> Response {
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    http::send(
        method,
        &format!("{base}{path}"),
        &[("authorization", &auth), ("content-type", "application/json")],
        body,
    )
    .await
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

impl GatewayProcess {
    /// Starts the binary on `config_toml`, whose `listen`/`admin_listen` lines (port 0) are
    /// replaced by free ports; waits until `/healthz` answers.
    pub async fn start(config_toml: &str) -> Self {
        Self::spawn(config_toml, None, &[]).await
    }

    /// Like [`GatewayProcess::start`] with more environment variables (e.g. `LD_PRELOAD`); with
    /// a `log_filter`, keeps the log as [`GatewayProcess::start_logging`] does.
    pub async fn start_with_env(config_toml: &str, log_filter: Option<&str>, env: &[(&str, String)]) -> Self {
        Self::spawn(config_toml, log_filter, env).await
    }

    /// Like [`GatewayProcess::start`] with `RUST_LOG=filter`, keeping stderr (the log) for
    /// [`GatewayProcess::log`] instead of passing it through.
    pub async fn start_logging(config_toml: &str, filter: &str) -> Self {
        Self::spawn(config_toml, Some(filter), &[]).await
    }

    /// The log written so far (only with [`GatewayProcess::start_logging`]).
    pub fn log(&self) -> String {
        let log = self.log.as_ref().expect("started with start_logging");
        String::from_utf8_lossy(&log.lock().unwrap()).into_owned()
    }

    async fn spawn(config_toml: &str, log_filter: Option<&str>, env: &[(&str, String)]) -> Self {
        for _ in 0..5 {
            let (public, admin) = (free_port(), free_port());
            let text = config_toml
                .replace("listen = \"127.0.0.1:0\"\n", &format!("listen = \"127.0.0.1:{public}\"\n"))
                .replacen("admin_listen = \"127.0.0.1:0\"", &format!("admin_listen = \"127.0.0.1:{admin}\""), 1);
            let text = text.replacen(
                &format!("admin_listen = \"127.0.0.1:{public}\""),
                &format!("admin_listen = \"127.0.0.1:{admin}\""),
                1,
            );
            let config = std::env::temp_dir().join(format!("creditgate-test-{public}-{}.toml", std::process::id()));
            std::fs::File::create(&config).and_then(|mut f| f.write_all(text.as_bytes())).expect("write config");
            let mut child = Command::new(env!("CARGO_BIN_EXE_creditgate"))
                .args(["serve", "--config"])
                .arg(&config)
                .env("CREDITGATE_ADMIN_TOKEN", ADMIN_TOKEN)
                .env("RUST_LOG", log_filter.unwrap_or("warn"))
                .envs(env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(if log_filter.is_some() { Stdio::piped() } else { Stdio::inherit() })
                .spawn()
                .expect("spawn creditgate");
            let log = child.stderr.take().map(|mut stderr| {
                let log = Arc::new(Mutex::new(Vec::new()));
                let sink = log.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n @ 1..) = stderr.read(&mut buf) {
                        sink.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                });
                log
            });
            let mut p = GatewayProcess {
                child,
                public: format!("http://127.0.0.1:{public}"),
                admin: format!("http://127.0.0.1:{admin}"),
                config,
                log,
            };
            if p.wait_healthy().await {
                return p;
            }
        }
        panic!("creditgate serve did not become healthy");
    }

    async fn wait_healthy(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            let addr = self.admin.trim_start_matches("http://");
            if std::net::TcpStream::connect(addr).is_ok() {
                let url = format!("{}/healthz", self.admin);
                return http::send("GET", &url, &[], "").await.status == 200;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// The config file the process runs on.
    pub fn config_path(&self) -> PathBuf {
        self.config.clone()
    }

    /// Sends a signal (`HUP`, `TERM`, …) with `kill`.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{name} failed");
    }

    /// Waits up to `limit` for the process to exit by itself: its exit status, or `None` if it
    /// is still running.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Kills the process (SIGKILL).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.config);
    }
}

/// Where Debian's `libfaketime` package puts the library, per architecture.
const LIBFAKETIME: [&str; 3] = [
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/local/lib/faketime/libfaketime.so.1",
];

/// The environment that runs a child process with its wall clock `offset` away from the real one
/// (libfaketime's syntax: `"+5m"`, `"-300"`); its monotonic clock (timers, timeouts) stays real.
/// Panics saying how to install libfaketime when it is missing (`scripts/test` installs it).
pub fn skewed_clock(offset: &str) -> Vec<(&'static str, String)> {
    let lib = LIBFAKETIME.iter().find(|p| std::path::Path::new(p).exists()).unwrap_or_else(|| {
        panic!(
            "libfaketime not found (looked in {LIBFAKETIME:?}): the clock-skew test runs a gateway \
             under it. Install it (`apt-get install -y faketime`) or run scripts/test, which does."
        )
    });
    vec![("LD_PRELOAD", lib.to_string()), ("FAKETIME", offset.to_owned()), ("FAKETIME_DONT_FAKE_MONOTONIC", "1".into())]
}
