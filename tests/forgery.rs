//! What a client can forge or learn from outside (issue 10, part 5): a log line of its own
//! making through a value the gateway logs, or the gateway's traffic from the ids it hands out.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::gateway::{ADMIN_TOKEN, ConfigBuilder, TestGateway};
use support::http;
use support::process::GatewayProcess;
use support::upstream::Upstream;

const CHAT: &str = "/v1/chat/completions";

async fn admin(base: &str, method: &str, path: &str, body: Value) -> Value {
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let res = http::send(method, &format!("{base}{path}"), &[("authorization", &auth)], body.to_string()).await;
    assert!(res.status.is_success(), "{method} {path}: {}", res.text());
    res.json()
}

/// A tier string carrying a newline (JSON lets a body say `\n`) is quoted in the error the
/// gateway logs; the text log must keep it on the `refused` line, escaped, not start a new line
/// that looks like the gateway's own.
#[tokio::test]
async fn a_client_value_cannot_forge_a_text_log_line() {
    let up = Upstream::echo().await;
    let config = ConfigBuilder::new(&up.url()).build();
    assert!(config.contains("format = \"text\""), "the shipped config logs text");
    let gw = GatewayProcess::start_logging(&config, "info").await;
    admin(&gw.admin, "POST", "/admin/v1/accounts", json!({"id": "mallory", "plan": "pro"})).await;
    let key = admin(&gw.admin, "POST", "/admin/v1/accounts/mallory/keys", json!({"role": "user"})).await["key"]
        .as_str()
        .expect("key")
        .to_owned();
    let auth = format!("Bearer {key}");

    let forged = "2026-01-01T00:00:00.000000Z  INFO creditgate: forged line account=victim";
    for sep in ["\n", "\r\n", "\r", "\u{2028}", "\u{85}"] {
        let body = json!({ "tier": format!("fast{sep}{forged}") }).to_string();
        let res = http::send("POST", &format!("{}{CHAT}", gw.public), &[("authorization", &auth)], body).await;
        assert_eq!(res.status, 400, "{}", res.text());
    }

    // The five refusals are logged at INFO; wait for them, then read every line.
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.log().matches("forged line").count() < 5 {
        assert!(Instant::now() < deadline, "the refusals were not logged:\n{}", gw.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = gw.log();
    for line in log.split(['\n', '\r', '\u{2028}', '\u{85}']) {
        assert!(
            !line.contains("forged line") || line.contains("refused"),
            "a client value started its own log line: {line:?}\nwhole log:\n{log}"
        );
    }
    assert_eq!(log.matches("fast\\n2026-01-01").count(), 1, "the newline is written escaped:\n{log}");
    assert_eq!(log.matches("fast\\r\\n2026-01-01").count(), 1, "{log}");
    assert_eq!(log.matches("fast\\u{2028}2026-01-01").count(), 1, "{log}");
}

/// Generated request ids (charge ids come from the same generator) are unique and do not count:
/// a counter would tell any client how much traffic the gateway carries between two requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_request_ids_do_not_reveal_a_counter() {
    let up = Upstream::echo().await;
    let gw = TestGateway::with_upstream(&up.url()).await;
    let key = gw.account_with_key("curious", "pro").await;
    let mut ids = Vec::new();
    for _ in 0..500 {
        let res = gw.call(&key, "GET", "/app/anything", &[], "").await;
        assert_eq!(res.status, 200, "{}", res.text());
        ids.push(res.header("x-request-id").expect("generated x-request-id").to_owned());
    }
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), ids.len(), "unique");
    // Random ids share a leading character 1 time in 16 (hex) or 62; a prefix plus a counter
    // shares the whole prefix every time.
    let shared: usize =
        ids.windows(2).map(|w| w[0].bytes().zip(w[1].bytes()).take_while(|(a, b)| a == b).count()).sum();
    assert!(shared < ids.len() / 4, "neighbouring ids share {shared} leading characters: {:?}", &ids[..5]);
    // Nor do they share a tail (a counter written the other way round).
    let shared_tail: usize =
        ids.windows(2).map(|w| w[0].bytes().rev().zip(w[1].bytes().rev()).take_while(|(a, b)| a == b).count()).sum();
    assert!(shared_tail < ids.len() / 4, "neighbouring ids share {shared_tail} trailing characters");
    assert!(ids.iter().all(|id| id.len() >= 22), "at least 128 bits: {:?}", &ids[..3]);
}
