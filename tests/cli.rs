//! The real `creditgate` binary: `check` on the shipped and a broken config, `demo` serving a
//! chat with the key it prints, and `serve` refusing to start without an admin token.

mod support;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use support::http;

const BIN: &str = env!("CARGO_BIN_EXE_creditgate");
const SHIPPED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/gateway.toml");

/// Kills the child when the test ends, pass or fail.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A temp file removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, text: &str) -> Self {
        let path = std::env::temp_dir().join(format!("creditgate-cli-{}-{name}", std::process::id()));
        std::fs::write(&path, text).expect("write temp config");
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn check_prints_the_price_table() {
    let out = Command::new(BIN).args(["check", "--config", SHIPPED]).env_remove("AI_BACKEND_KEY").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stdout: {stdout}\nstderr: {stderr}");
    let chat = stdout.lines().find(|l| l.contains("/v1/chat/completions")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(chat.contains("ai_chat") && chat.contains("balanced=3"), "{chat}");
    assert!(chat.contains("fast=1") && chat.contains("powerful=5"), "{chat}");
    for op in support::gateway::OPERATIONS {
        assert!(stdout.contains(op), "{op} missing from the table:\n{stdout}");
    }
    let catch_all = stdout.lines().find(|l| l.contains("/*")).unwrap_or_else(|| panic!("no catch-all: {stdout}"));
    assert!(catch_all.contains("free"), "{catch_all}");
}

#[test]
fn check_names_the_key_of_a_broken_config() {
    let shipped = std::fs::read_to_string(SHIPPED).unwrap();
    let needle = "upstream = \"ai\"\noperation = \"ai_chat\"";
    assert!(shipped.contains(needle), "shipped config changed shape");
    let broken =
        TempFile::new("broken.toml", &shipped.replacen(needle, "upstream = \"nowhere\"\noperation = \"ai_chat\"", 1));
    let out = Command::new(BIN).args(["check", "--config"]).arg(&broken.0).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("routes[0].upstream"), "{stderr}");
    assert!(stderr.contains("nowhere"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");

    let out = Command::new(BIN).args(["check", "--config", "/nonexistent/creditgate.toml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test]
async fn demo_serves_a_fast_chat_with_the_printed_key() {
    // Hold the demo's preferred ports (when free) so it takes its fall-back free ports: no race
    // with another process grabbing 8080/9090 between the demo's probe and its bind.
    let _held: Vec<_> =
        ["127.0.0.1:8080", "127.0.0.1:9090"].iter().filter_map(|a| std::net::TcpListener::bind(a).ok()).collect();
    let child = Command::new(BIN)
        .arg("demo")
        .env_remove("CREDITGATE_ADMIN_TOKEN")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn demo");
    let mut child = KillOnDrop(child);
    let stdout = child.0.stdout.take().unwrap();

    // Read the banner on a thread; the test waits for it with a bound.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut gateway = None;
    let mut key = None;
    let mut seen = Vec::new();
    while key.is_none() {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("demo printed no `API key:` line; got:\n{}", seen.join("\n")));
        if let Some(rest) = line.trim().strip_prefix("Gateway:") {
            gateway = rest.split_whitespace().next().map(str::to_owned);
        }
        if let Some(rest) = line.trim().strip_prefix("API key:") {
            key = Some(rest.trim().to_owned());
        }
        seen.push(line);
    }
    let gateway = gateway.unwrap_or_else(|| panic!("no `Gateway:` line before the key:\n{}", seen.join("\n")));
    let key = key.unwrap();
    assert!(gateway.starts_with("http://127.0.0.1:"), "{gateway}");
    assert!(key.starts_with("cg_") && key.len() >= 35, "{key}");

    let auth = format!("Bearer {key}");
    let body = r#"{"model":"demo","messages":[{"role":"user","content":"hi"}]}"#;
    let headers = [("authorization", auth.as_str()), ("x-ai-tier", "fast"), ("content-type", "application/json")];
    let res = http::send("POST", &format!("{gateway}/v1/chat/completions"), &headers, body).await;
    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(res.charged(), 1);
    assert_eq!(res.header("x-credits-remaining"), Some("1999"), "a pro demo account");
    assert!(res.json()["choices"][0]["message"]["content"].is_string(), "{}", res.text());
    assert!(child.0.try_wait().unwrap().is_none(), "demo still running");
}

/// `serve` with an admin listener but no admin token (the variable unset, or set to nothing)
/// refuses to start, naming the setting: it never serves an admin API that anyone — or no one —
/// could use.
#[test]
fn serve_refuses_to_start_without_an_admin_token() {
    let config = TempFile::new("no-token.toml", &support::gateway::ConfigBuilder::new("http://127.0.0.1:9").build());
    for token in [None, Some("")] {
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--config"]).arg(&config.0).env("RUST_LOG", "warn");
        match token {
            None => cmd.env_remove("CREDITGATE_ADMIN_TOKEN"),
            Some(t) => cmd.env("CREDITGATE_ADMIN_TOKEN", t),
        };
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn serve");
        let mut child = KillOnDrop(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.0.try_wait().unwrap() {
                break status;
            }
            assert!(std::time::Instant::now() < deadline, "serve with token {token:?} is running: it should refuse");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(1), "token {token:?}: {stderr}");
        assert!(stderr.contains("server.admin_token_env") && stderr.contains("CREDITGATE_ADMIN_TOKEN"), "{stderr}");
    }
}
