//! The OpenAPI 3.1 contract (`/openapi.json`): served on both listeners, describing every route
//! the routers serve and every error code there is; and schemathesis (PyPI, installed by
//! `scripts/test` into `target/test-venv`) fuzzing a live gateway on Redis against it: no 5xx,
//! every answer as the document says.

mod support;

use std::collections::BTreeSet;
use std::process::Command;

use creditgate::error::ErrorCode;
use serde_json::Value;
use support::gateway::{ADMIN_TOKEN, ConfigBuilder, TestGateway};
use support::http;
use support::redis::RedisServer;

/// Every route of the public listener (customer API, dashboard, the shipped metered routes) and of
/// the admin listener, as `METHOD path`. A route added to a router but not to the document, or
/// documented but gone, fails [`the_document_describes_every_route_and_error_on_both_listeners`]
/// once added here.
const ROUTES: &[&str] = &[
    // public: customer API, billing, dashboard
    "GET /v1/credits",
    "GET /v1/credits/packages",
    "GET /v1/credits/usage",
    "GET /v1/credits/topups",
    "PUT /v1/credits/auto-topup",
    "GET /v1/jobs/{id}",
    "POST /v1/credits/topups/checkout",
    "POST /v1/billing/stripe/webhook",
    "GET /dashboard",
    // public: the metered routes of config/gateway.toml
    "POST /v1/chat/completions",
    "POST /v1/leads/enrich",
    "POST /v1/campaigns/generate",
    "POST /v1/calls/transcribe",
    "POST /v1/insights/position",
    "POST /v1/insights/competitive",
    "POST /v1/leads/score",
    "POST /v1/icebreakers",
    "POST /v1/sentiment",
    // admin
    "POST /admin/v1/accounts",
    "GET /admin/v1/accounts/{id}",
    "PATCH /admin/v1/accounts/{id}",
    "POST /admin/v1/accounts/{id}/keys",
    "GET /admin/v1/accounts/{id}/keys",
    "DELETE /admin/v1/keys/{key_id}",
    "POST /admin/v1/accounts/{id}/topups",
    "GET /admin/v1/accounts/{id}/topups",
    "PUT /admin/v1/accounts/{id}/auto-topup",
    "GET /admin/v1/accounts/{id}/ledger",
    "GET /admin/v1/accounts/{id}/usage",
    "GET /admin/v1/config",
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
    // both
    "GET /openapi.json",
];

/// Codes no single operation answers with: any path answers a method it does not take with 405
/// `method_not_allowed` (the document's description says so); `forbidden` is reserved (SPEC §6)
/// and nothing answers it yet.
const NOT_PER_OPERATION: &[&str] = &["method_not_allowed", "forbidden"];

async fn document(base: &str) -> (Value, String) {
    let res = http::send("GET", &format!("{base}/openapi.json"), &[], "").await;
    assert_eq!(res.status, 200, "{base}/openapi.json: {}", res.text());
    assert_eq!(res.header("content-type"), Some("application/json"));
    (res.json(), res.text())
}

/// `(METHOD path, operation)` of every operation in `doc`.
fn operations(doc: &Value) -> Vec<(String, &Value)> {
    let paths = doc["paths"].as_object().expect("paths");
    paths
        .iter()
        .flat_map(|(path, item)| {
            let item = item.as_object().expect("path item");
            item.iter().map(move |(method, op)| (format!("{} {path}", method.to_uppercase()), op))
        })
        .collect()
}

#[tokio::test]
async fn the_document_describes_every_route_and_error_on_both_listeners() {
    let up = support::upstream::Upstream::echo().await;
    let gw = TestGateway::with_upstream(&up.url()).await;
    let (doc, public_text) = document(&gw.public).await;
    let (_, admin_text) = document(&gw.admin).await;
    assert_eq!(public_text, admin_text, "both listeners serve the one document");
    // No credentials needed, and the proxy never sees the request.
    assert_eq!(up.count(), 0);

    let version = doc["openapi"].as_str().expect("openapi version");
    assert!(version.starts_with("3.1."), "OpenAPI {version}");

    let documented: BTreeSet<String> = operations(&doc).into_iter().map(|(route, _)| route).collect();
    let served: BTreeSet<String> = ROUTES.iter().map(|r| r.to_string()).collect();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&served).collect();
    assert!(undocumented.is_empty(), "served but not in the document: {undocumented:?}");
    assert!(unknown.is_empty(), "in the document but not served: {unknown:?}");

    // Every operation has credentials declared where it needs them.
    for (route, op) in operations(&doc) {
        let scheme = op["security"][0].as_object().and_then(|s| s.keys().next().cloned());
        let expected = match route.split_once(' ').unwrap().1 {
            p if p.starts_with("/admin/") => Some("admin_token"),
            "/healthz" | "/readyz" | "/metrics" | "/openapi.json" | "/dashboard" | "/v1/billing/stripe/webhook" => None,
            _ => Some("api_key"),
        };
        assert_eq!(scheme.as_deref(), expected, "{route}: security");
    }
    let schemes = &doc["components"]["securitySchemes"];
    for name in ["api_key", "admin_token"] {
        assert_eq!(schemes[name]["type"], "http", "{name}");
        assert_eq!(schemes[name]["scheme"], "bearer", "{name}");
    }

    // Every error code (the list in src/error.rs) is in the Error schema, and each one an
    // operation can answer is documented there, under its status.
    let enumerated: Vec<&str> = doc["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .expect("ErrorCode enum")
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(enumerated.len(), ErrorCode::ALL.len(), "{enumerated:?}");
    for code in ErrorCode::ALL {
        let name = code.as_str();
        assert!(enumerated.contains(&name), "error code {name} is not in the ErrorCode schema");
        if NOT_PER_OPERATION.contains(&name) {
            continue;
        }
        let status = code.status().as_u16().to_string();
        let documented_at: Vec<String> = operations(&doc)
            .into_iter()
            .filter(|(_, op)| {
                op["responses"][&status]["description"].as_str().is_some_and(|d| d.contains(&format!("`{name}`")))
            })
            .map(|(route, _)| route)
            .collect();
        assert!(!documented_at.is_empty(), "no operation documents error {name} under status {status}");
    }
    // A code a response names is one of its status.
    for (route, op) in operations(&doc) {
        for (status, res) in op["responses"].as_object().unwrap() {
            let description = res["description"].as_str().unwrap_or_default();
            for named in description.split('`').skip(1).step_by(2) {
                if let Some(code) = ErrorCode::ALL.iter().find(|c| c.as_str() == named) {
                    assert_eq!(code.status().as_u16().to_string(), *status, "{route}: `{named}` under {status}");
                }
            }
        }
    }
    // The error body's schema: `{"error": {"type", "message", …}}`.
    let error = &doc["components"]["schemas"]["ErrorObject"];
    assert_eq!(error["required"], serde_json::json!(["type", "message"]));
    assert_eq!(error["properties"]["type"]["$ref"], "#/components/schemas/ErrorCode");
    // The metered routes carry the credit headers.
    let chat = &doc["paths"]["/v1/chat/completions"]["post"]["responses"];
    for header in ["x-credits-charged", "x-credits-remaining", "x-credits-low"] {
        assert!(chat["200"]["headers"][header].is_object(), "{header}: {}", chat["200"]);
    }
    assert!(chat["402"]["description"].as_str().unwrap().contains("`insufficient_credits`"));
}

// === schemathesis ===

/// The schemathesis CLI of the test venv, or `None` (skipped) when scripts/test could not install it.
fn schemathesis() -> Option<String> {
    let venv = format!("{}/target/test-venv/bin", env!("CARGO_MANIFEST_DIR"));
    let ok =
        Command::new(format!("{venv}/python3")).args(["-c", "import schemathesis"]).status().is_ok_and(|s| s.success());
    if !ok && std::env::var("CREDITGATE_SKIP_PYPI").is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED: schemathesis is not installed (scripts/test said why above)");
        return None;
    }
    assert!(ok, "schemathesis is not importable by {venv}/python3: run scripts/test, which installs it");
    Some(format!("{venv}/schemathesis"))
}

/// Test cases per operation and phase: enough to find what the contract gets wrong, few enough
/// that both runs end in well under a minute on two cores.
const MAX_EXAMPLES: &str = "25";

/// Runs schemathesis against `base` (its document and its operations of `tags`) with `auth` and
/// `config` (a `schemathesis.toml`); panics with its report unless every check passed.
async fn fuzz(cli: &str, base: &str, tags: &[&str], auth: &str, config: &str) {
    // Hypothesis keeps its example database in the working directory: one of the run's own.
    static RUN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let run = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("creditgate-schemathesis-{}-{run}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("schemathesis.toml"), config).unwrap();
    let mut cmd = Command::new(cli);
    cmd.arg("--config-file")
        .arg(dir.join("schemathesis.toml"))
        .arg("run")
        .arg(format!("{base}/openapi.json"))
        .args(["--url", base])
        .args(["--header", &format!("Authorization: Bearer {auth}")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_headers_conformance,response_schema_conformance",
        ])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--max-examples", MAX_EXAMPLES])
        .args(["--seed", "1"])
        .args(["--workers", "2"])
        .args(["--request-timeout", "10"])
        .args(["--suppress-health-check", "all"]);
    for tag in tags {
        cmd.args(["--include-tag", tag]);
    }
    cmd.current_dir(&dir).env("NO_COLOR", "1");
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run schemathesis")).await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis against {base} ({tags:?}) failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn schemathesis_finds_no_5xx_and_every_answer_conforms() {
    let Some(cli) = schemathesis() else { return };
    let redis = RedisServer::start();
    // The demo backend answers every metered route with 200 JSON, as a real one would.
    let backend = creditgate::demo::start_backend("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let config =
        ConfigBuilder::new(&format!("http://{backend}")).store(&format!("kind = \"redis\"\nurl = \"{}\"", redis.url()));
    let gw = TestGateway::start(&config.build()).await;
    let key = gw.account_with_key("fuzz", "big").await;
    gw.account_with_key("managed", "pro").await;

    let public = ["metered", "credits", "jobs", "billing", "dashboard", "document"];
    fuzz(&cli, &gw.public, &public, &key, "").await;
    // Most admin operations act on one account: fuzzed with random ids they would only ever
    // answer 404, so the path's account id is an existing one (its other inputs stay random).
    fuzz(&cli, &gw.admin, &["admin", "probes", "document"], ADMIN_TOKEN, "[parameters]\n\"path.id\" = \"managed\"\n")
        .await;
}
