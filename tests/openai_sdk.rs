//! Tiers choose models, seen through the official OpenAI Python SDK (PyPI `openai`, installed by
//! `scripts/test` into `target/test-venv`): `model="powerful"` is charged as the powerful tier and
//! the backend is asked for that tier's model; a model of a dearer tier cannot be had at a cheaper
//! tier's price; an unknown model is a 400 the SDK reports as `BadRequestError`.

mod support;

use std::process::Command;

use serde_json::{Value, json};
use support::gateway::{ConfigBuilder, TestGateway};

/// Asks the SDK for one completion per model named, streamed or not, and prints one JSON line
/// each: the charge, the model the backend answered for (the demo backend echoes the one it was
/// asked for), the text — or the error the SDK raised.
const CLIENT: &str = r#"
import json, os, sys
import openai
# Through a TLS listener: trust exactly the test CA.
http_client = openai.DefaultHttpxClient(verify=os.environ["CA_FILE"]) if os.environ.get("CA_FILE") else None
client = openai.OpenAI(base_url=os.environ["BASE_URL"], api_key=os.environ["API_KEY"], max_retries=0,
                       http_client=http_client)
for model, stream in [(m, s == "stream") for m, s in (a.split(":") for a in sys.argv[1:])]:
    try:
        if stream:
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": "hi"}], stream=True)
            text, seen = "", set()
            for chunk in raw.parse():
                seen.add(chunk.model)
                text += "".join(c.delta.content or "" for c in chunk.choices)
            out = {"charged": raw.headers.get("x-credits-charged"), "model": sorted(seen), "text": text}
        else:
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": "hi"}])
            c = raw.parse()
            out = {"charged": raw.headers.get("x-credits-charged"), "model": c.model,
                   "text": c.choices[0].message.content}
    except openai.APIStatusError as e:
        out = {"status": e.status_code, "error": e.body}
    print(json.dumps(out), flush=True)
"#;

/// Runs [`CLIENT`] for `asks` (`model:plain|stream`) against `base_url` with `key` (trusting
/// only `ca` when given) and returns its JSON lines; panics when the script fails.
async fn run_client(
    python: String,
    asks: &[&str],
    base_url: &str,
    key: &str,
    ca: Option<std::path::PathBuf>,
) -> Vec<Value> {
    let mut cmd = Command::new(python);
    cmd.args(["-c", CLIENT]).args(asks).env("BASE_URL", base_url).env("API_KEY", key);
    if let Some(ca) = ca {
        cmd.env("CA_FILE", ca);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run python")).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn python() -> Option<String> {
    let p = format!("{}/target/test-venv/bin/python3", env!("CARGO_MANIFEST_DIR"));
    let ok = Command::new(&p).args(["-c", "import openai"]).status().is_ok_and(|s| s.success());
    if !ok && std::env::var("CREDITGATE_SKIP_PYPI").is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED: the openai package is not installed (scripts/test said why above)");
        return None;
    }
    assert!(ok, "the openai package is not importable by {p}: run scripts/test, which installs it");
    Some(p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_openai_sdk_picks_a_tier_by_model_and_gets_that_tiers_model() {
    let Some(python) = python() else { return };
    let backend = creditgate::demo::start_backend("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let config = ConfigBuilder::new(&format!("http://{backend}")).build().replace(
        "tiers = { fast = 1, balanced = 3, powerful = 5 }",
        "tiers = { fast = { cost = 1, model = \"demo-small\", aliases = [\"mini\"] }, balanced = 3, \
         powerful = { cost = 5, model = \"demo-large\" } }",
    );
    assert!(config.contains("demo-large"), "the shipped ai_chat tiers changed shape");
    let gw = TestGateway::start(&config).await;
    let key = gw.account_with_key("sdk", "big").await;
    let asks = ["powerful:plain", "mini:stream", "demo-large:plain", "gpt-5:plain", "balanced:plain"];
    let lines = run_client(python, &asks, &gw.url("/v1"), &key, None).await;
    assert_eq!(lines.len(), 5, "{lines:?}");
    // A tier's name as the model: that tier's price, and its model at the backend.
    assert_eq!(
        lines[0],
        json!({"charged": "5", "model": "demo-large", "text": "Hello from the creditgate demo backend. 👋"})
    );
    // An alias, streamed: every chunk from the tier's model.
    assert_eq!((&lines[1]["charged"], &lines[1]["model"]), (&json!("1"), &json!(["demo-small"])), "{}", lines[1]);
    // A dearer tier's model by name, without its tier: refused, not sold at the default price.
    assert_eq!(lines[2]["status"], 400, "{}", lines[2]);
    assert_eq!(lines[2]["error"]["type"], "tier_mismatch", "{}", lines[2]);
    assert_eq!((&lines[3]["status"], &lines[3]["error"]["type"]), (&json!(400), &json!("bad_request")), "{}", lines[3]);
    // A tier without a model of its own forwards the body's model as sent.
    assert_eq!((&lines[4]["charged"], &lines[4]["model"]), (&json!("3"), &json!("balanced")), "{}", lines[4]);
    assert_eq!(gw.remaining(&key).await, 10_000 - 5 - 1 - 3);
}

/// The same SDK through the public listener with TLS termination (`server.tls`, a certificate
/// of a CA made here), trusting exactly that CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_openai_sdk_works_through_a_tls_listener() {
    let Some(python) = python() else { return };
    let ca = support::tls::TestCa::new("sdk");
    let cert = ca.server("gateway");
    let backend = creditgate::demo::start_backend("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let tls =
        format!("tls = {{ cert_file = \"{}\", key_file = \"{}\" }}", cert.cert_file.display(), cert.key_file.display());
    let gw = TestGateway::start(&ConfigBuilder::new(&format!("http://{backend}")).server(&tls).build()).await;
    let key = gw.account_with_key("sdk-tls", "big").await;
    let base_url = format!("https://127.0.0.1:{}/v1", gw.gateway.public_addr.port());
    let lines = run_client(python, &["powerful:plain", "fast:stream"], &base_url, &key, Some(ca.cert_file())).await;
    assert_eq!((&lines[0]["charged"], &lines[0]["model"]), (&json!("5"), &json!("powerful")), "{lines:?}");
    assert_eq!(lines[1]["charged"], "1", "{lines:?}");
    assert_eq!(lines[1]["text"], "Hello from the creditgate demo backend. 👋", "{lines:?}");
}
