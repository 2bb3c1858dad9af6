//! The admin CLI and the running-config view end to end: a real `creditgate serve` child process,
//! and the built `creditgate` binary run as a child process for every command — `admin …`
//! (tables, `--json`, exit codes), `GET /admin/v1/config` (no secret in it, hash and load time
//! follow a reload) and `check --against` (exactly the changes a reload would make).

mod support;

use std::net::TcpListener;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use support::gateway::{ADMIN_TOKEN, ConfigBuilder};
use support::http;
use support::process::GatewayProcess;
use support::upstream::Upstream;

const BIN: &str = env!("CARGO_BIN_EXE_creditgate");

/// One finished CLI run.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn show(&self) -> String {
        format!("exit {:?}\nstdout:\n{}\nstderr:\n{}", self.code, self.stdout, self.stderr)
    }

    fn ok(self) -> Self {
        assert_eq!(self.code, Some(0), "{}", self.show());
        self
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("--json printed no JSON ({e}): {}", self.show()))
    }

    /// The value of a `label  value` line of a human-readable answer.
    fn field(&self, label: &str) -> String {
        let line = self.stdout.lines().find(|l| l.split("  ").next() == Some(label));
        let line = line.unwrap_or_else(|| panic!("no `{label}` line: {}", self.show()));
        line[label.len()..].trim().to_owned()
    }

    /// The data rows of a table (the header line, `(none)` and `next page` hints left out).
    fn rows(&self) -> Vec<Vec<String>> {
        let lines =
            self.stdout.lines().skip(1).filter(|l| !l.is_empty() && *l != "(none)" && !l.starts_with("next page"));
        lines.map(|l| l.split_whitespace().map(str::to_owned).collect()).collect()
    }
}

fn finished(out: Output) -> Run {
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `creditgate ARGS` with `token` (or none) in `CREDITGATE_ADMIN_TOKEN`. Bounded: every command
/// gives up on the gateway after `--timeout-ms` (10 s by default).
fn run_with(token: Option<&str>, args: &[&str]) -> Run {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    match token {
        Some(t) => cmd.env("CREDITGATE_ADMIN_TOKEN", t),
        None => cmd.env_remove("CREDITGATE_ADMIN_TOKEN"),
    };
    finished(cmd.output().expect("run creditgate"))
}

/// `creditgate admin --url ADMIN ARGS` with the right token.
fn admin(gw: &GatewayProcess, args: &[&str]) -> Run {
    let mut all = vec!["admin", "--url", gw.admin.as_str()];
    all.extend_from_slice(args);
    run_with(Some(ADMIN_TOKEN), &all)
}

/// The admin API's own answer, for comparing with `--json`.
async fn api(gw: &GatewayProcess, path: &str) -> Value {
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let res = http::send("GET", &format!("{}{path}", gw.admin), &[("authorization", &auth)], "").await;
    assert_eq!(res.status, 200, "{path}: {}", res.text());
    res.json()
}

async fn public_status(gw: &GatewayProcess, key: &str) -> u16 {
    let auth = format!("Bearer {key}");
    http::send("GET", &format!("{}/v1/credits", gw.public), &[("authorization", &auth)], "").await.status.as_u16()
}

/// A loopback address where nothing listens.
fn closed_port() -> String {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    format!("http://127.0.0.1:{port}")
}

#[tokio::test]
async fn admin_cli_end_to_end() {
    let up = Upstream::echo().await;
    let gw = GatewayProcess::start(&ConfigBuilder::new(&up.url()).build()).await;

    // Accounts.
    let created = admin(&gw, &["accounts", "create", "acme", "--plan", "fifty", "--email", "ops@acme.test"]).ok();
    assert_eq!(
        (created.field("id"), created.field("plan"), created.field("remaining")),
        ("acme".into(), "fifty".into(), "50".into())
    );
    let shown = admin(&gw, &["accounts", "show", "acme"]).ok();
    assert_eq!((shown.field("email"), shown.field("monthly")), ("ops@acme.test".into(), "50 of 50".into()));
    assert_eq!(
        admin(&gw, &["--json", "accounts", "show", "acme"]).ok().json(),
        api(&gw, "/admin/v1/accounts/acme").await
    );

    // A key: printed once, works on the public listener, listed without its secret.
    let made = admin(&gw, &["keys", "create", "acme"]).ok();
    let (key, key_id) = (made.field("key"), made.field("key_id"));
    assert!(key.starts_with("cg_") && key.len() >= 35, "{}", made.show());
    assert!(made.stderr.contains("only this once"), "{}", made.show());
    assert_eq!(public_status(&gw, &key).await, 200);
    let listed = admin(&gw, &["keys", "list", "acme"]).ok();
    assert_eq!(listed.rows().len(), 1, "{}", listed.show());
    assert_eq!(listed.rows()[0][0], key_id);
    assert!(!listed.stdout.contains(&key), "a listing never shows the secret: {}", listed.show());
    let as_json = admin(&gw, &["keys", "list", "acme", "--json"]).ok().json();
    assert_eq!(as_json, api(&gw, "/admin/v1/accounts/acme/keys").await);

    // Top-ups: the same payment_ref twice credits once; both succeed, the second says so.
    let first = admin(&gw, &["topups", "create", "acme", "--credits", "100", "--payment-ref", "inv-1"]).ok();
    assert!(first.stdout.starts_with("credited 100 top-up credits"), "{}", first.show());
    let again = admin(&gw, &["topups", "create", "acme", "--credits", "100", "--payment-ref", "inv-1"]).ok();
    assert!(again.stdout.starts_with("already credited"), "{}", again.show());
    assert_eq!(admin(&gw, &["accounts", "show", "acme"]).ok().field("top-up"), "100");
    let repeat = admin(&gw, &["--json", "topups", "create", "acme", "--credits", "100", "--payment-ref", "inv-1"]).ok();
    assert_eq!((repeat.json()["credits"].as_u64(), repeat.json()["topup_remaining"].as_u64()), (Some(100), Some(100)));

    // One charge, so the ledger has three entries: created, topup, charge.
    let auth = format!("Bearer {key}");
    let chat = http::send(
        "POST",
        &format!("{}/v1/chat/completions", gw.public),
        &[("authorization", &auth), ("x-ai-tier", "fast")],
        "{}",
    )
    .await;
    assert_eq!((chat.status.as_u16(), chat.charged()), (200, 1), "{}", chat.text());

    // The ledger, paged: two newest, then the rest from the printed hint.
    let page = admin(&gw, &["ledger", "acme", "--limit", "2"]).ok();
    let kinds: Vec<String> = page.rows().iter().map(|r| r[2].clone()).collect();
    assert_eq!(kinds, ["charge", "topup"], "{}", page.show());
    let hint = page.stdout.lines().find_map(|l| l.strip_prefix("next page: --before ")).expect("a next-page hint");
    let rest = admin(&gw, &["ledger", "acme", "--limit", "2", "--before", hint]).ok();
    assert_eq!(rest.rows().iter().map(|r| r[2].clone()).collect::<Vec<_>>(), ["created"], "{}", rest.show());
    assert!(!rest.stdout.contains("next page"), "the last page: {}", rest.show());
    let every = admin(&gw, &["ledger", "acme", "--all", "--limit", "1", "--json"]).ok().json();
    let from_api = api(&gw, "/admin/v1/accounts/acme/ledger").await;
    assert_eq!(every["entries"], from_api["entries"], "--all followed every page");
    let paged = admin(&gw, &["--json", "ledger", "acme", "--limit", "2"]).ok().json();
    assert_eq!(paged, api(&gw, "/admin/v1/accounts/acme/ledger?limit=2").await);

    // Usage.
    let usage = admin(&gw, &["usage", "acme"]).ok();
    assert_eq!(usage.field("total"), "1 credits");
    assert!(
        usage.stdout.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["ai_chat", "1"]),
        "{}",
        usage.show()
    );
    assert_eq!(admin(&gw, &["usage", "acme", "--json"]).ok().json(), api(&gw, "/admin/v1/accounts/acme/usage").await);

    // Plan change.
    let updated = admin(&gw, &["accounts", "update", "acme", "--plan", "big"]).ok();
    assert_eq!((updated.field("plan"), updated.field("plan change")), ("big".into(), "upgraded".into()));
    let updated = admin(&gw, &["--json", "accounts", "update", "acme", "--email", "new@acme.test"]).ok().json();
    assert_eq!((updated["plan"].as_str(), updated["email"].as_str()), (Some("big"), Some("new@acme.test")));

    // Revocation: the key is refused on the public listener within 5 s.
    let revoked = admin(&gw, &["keys", "revoke", &key_id]).ok();
    assert!(revoked.stdout.contains(&key_id), "{}", revoked.show());
    let mut status = 0;
    for _ in 0..50 {
        status = public_status(&gw, &key).await;
        if status == 401 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 401, "the revoked key is refused");
    assert_eq!(admin(&gw, &["keys", "list", "acme"]).ok().rows().len(), 0);

    // Exit codes.
    let unknown = admin(&gw, &["accounts", "show", "nobody"]);
    assert_eq!(unknown.code, Some(1), "{}", unknown.show());
    assert!(unknown.stderr.contains("not_found") && unknown.stderr.contains("nobody"), "{}", unknown.show());
    let refused = admin(&gw, &["topups", "create", "acme", "--package", "nope", "--payment-ref", "x"]);
    assert_eq!(refused.code, Some(1), "{}", refused.show());
    assert!(refused.stderr.contains("bad_request"), "{}", refused.show());
    let wrong = run_with(Some("wrong-token"), &["admin", "--url", &gw.admin, "accounts", "show", "acme"]);
    assert_eq!(wrong.code, Some(4), "{}", wrong.show());
    assert!(wrong.stderr.contains("unauthorized"), "{}", wrong.show());
    let missing = run_with(None, &["admin", "--url", &gw.admin, "accounts", "show", "acme"]);
    assert_eq!(missing.code, Some(2), "no token in the environment: {}", missing.show());
    assert!(missing.stderr.contains("CREDITGATE_ADMIN_TOKEN"), "{}", missing.show());
    for bad in [
        &["accounts", "create", "x"][..],
        &["accounts", "update", "acme"],
        &["ledger", "acme", "--limit", "0"],
        &["topups", "create", "acme", "--payment-ref", "x"],
        &["keys", "create", "acme", "--role", "root"],
        &["frobnicate"],
    ] {
        let r = admin(&gw, bad);
        assert_eq!(r.code, Some(2), "{bad:?}: {}", r.show());
    }
    let closed = closed_port();
    let unreachable = run_with(Some(ADMIN_TOKEN), &["admin", "--url", &closed, "accounts", "show", "acme"]);
    assert_eq!(unreachable.code, Some(3), "{}", unreachable.show());
    assert!(unreachable.stderr.contains("cannot reach"), "{}", unreachable.show());
    // A listener that accepts and never answers: the timeout, not a hang.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let hung = run_with(Some(ADMIN_TOKEN), &["admin", "--url", &url, "--timeout-ms", "300", "usage", "acme"]);
    assert_eq!(hung.code, Some(3), "{}", hung.show());
    assert!(hung.stderr.contains("no answer within 300 ms"), "{}", hung.show());
}

// === GET /admin/v1/config ===

/// Secrets the gateway reads from its environment, each a value that must never be shown.
const SECRETS: [(&str, &str); 6] = [
    ("CG_TEST_AI_KEY", "Bearer ai-key-value-6b1f"),
    ("CG_TEST_WEBHOOK_SECRET", "webhook-secret-value-82be"),
    ("CG_TEST_EXPORT_SECRET", "export-secret-value-4d2b"),
    ("CG_TEST_STRIPE_KEY", "sk_test_stripe-value-11aa"),
    ("CG_TEST_STRIPE_WHSEC", "whsec_stripe-value-22bb"),
    ("CG_TEST_SMTP_PASSWORD", "smtp-password-value-33cc"),
];
/// Secrets written into the config itself.
const LITERAL_SECRETS: [&str; 2] = ["literal-header-value-7f3a", "export-url-password-55dd"];

fn config_with_secrets(upstream: &str) -> String {
    let text = ConfigBuilder::new(upstream)
        .notification("webhook_url = \"http://127.0.0.1:9/hooks\"")
        .notification("webhook_secret_env = \"CG_TEST_WEBHOOK_SECRET\"")
        .extra(
            "[notifications.smtp]\nhost = \"127.0.0.1\"\nport = 9\nfrom = \"cg <billing@example.test>\"\n\
             username_env = \"CG_TEST_SMTP_USER\"\npassword_env = \"CG_TEST_SMTP_PASSWORD\"\n\n\
             [export]\nurl = \"http://exporter:export-url-password-55dd@127.0.0.1:9/ingest\"\n\
             secret_env = \"CG_TEST_EXPORT_SECRET\"\n\n\
             [billing.stripe]\nsecret_key_env = \"CG_TEST_STRIPE_KEY\"\nwebhook_secret_env = \"CG_TEST_STRIPE_WHSEC\"\n\
             api_base = \"http://127.0.0.1:9\"\n",
        )
        .build();
    let literal = format!("headers = {{ authorization = \"{}\" }}", support::gateway::BACKEND_AUTH);
    assert!(text.contains(&literal), "the builder's header line changed");
    text.replacen(
        &literal,
        "headers = { authorization = \"env:CG_TEST_AI_KEY\", x-org = \"literal-header-value-7f3a\" }",
        1,
    )
}

#[tokio::test]
async fn running_config_shows_no_secret_and_follows_reloads() {
    let up = Upstream::echo().await;
    let mut env: Vec<(&str, String)> = SECRETS.iter().map(|(k, v)| (*k, v.to_string())).collect();
    env.push(("CG_TEST_SMTP_USER", "smtp-user".into()));
    let gw = GatewayProcess::start_with_env(&config_with_secrets(&up.url()), None, &env).await;

    let auth = format!("Bearer {ADMIN_TOKEN}");
    let url = format!("{}/admin/v1/config", gw.admin);
    let res = http::send("GET", &url, &[], "").await;
    assert_eq!(res.status, 401, "the running config needs the admin token");
    let res = http::send("GET", &url, &[("authorization", &auth)], "").await;
    assert_eq!(res.status, 200, "{}", res.text());
    let body = res.text();
    for secret in SECRETS.iter().map(|(_, v)| *v).chain(LITERAL_SECRETS).chain([ADMIN_TOKEN]) {
        assert!(!body.contains(secret), "{secret:?} is in GET /admin/v1/config: {body}");
    }
    // What is shown instead: variable names, and a marker where a literal secret was.
    let v = res.json();
    let c = &v["config"];
    assert_eq!(c["upstreams"]["ai"]["headers"]["authorization"], "env:CG_TEST_AI_KEY");
    assert_eq!(c["upstreams"]["ai"]["headers"]["x-org"], "[redacted]");
    assert_eq!(c["export"]["url"], "http://exporter:[redacted]@127.0.0.1:9/ingest");
    assert_eq!(c["billing"]["stripe"]["secret_key_env"], "CG_TEST_STRIPE_KEY");
    assert_eq!(c["notifications"]["smtp"]["password_env"], "CG_TEST_SMTP_PASSWORD");
    assert_eq!(c["server"]["admin_token_env"], "CREDITGATE_ADMIN_TOKEN");
    assert_eq!(c["operations"]["ai_chat"]["tiers"]["fast"], 1);
    assert_eq!(v["upstreams"]["ai"]["backends"][0]["url"], up.url());
    assert_eq!(v["upstreams"]["ai"]["backends"][0]["health"], "healthy");
    let hash = v["hash"].as_str().expect("hash").to_owned();
    assert!(hash.strip_prefix("sha256:").is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())));
    let loaded_at = v["loaded_at"].as_str().expect("loaded_at").to_owned();
    assert!(loaded_at.len() >= 20 && loaded_at.ends_with('Z') && loaded_at.as_bytes()[10] == b'T', "{loaded_at}");

    // A price change, reloaded: a new hash and a new load time.
    let path = gw.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replacen("fast = 1,", "fast = 2,", 1)).unwrap();
    gw.signal("HUP");
    let mut after = Value::Null;
    for _ in 0..100 {
        after = http::send("GET", &url, &[("authorization", &auth)], "").await.json();
        if after["config"]["operations"]["ai_chat"]["tiers"]["fast"] == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(after["config"]["operations"]["ai_chat"]["tiers"]["fast"], 2, "reloaded");
    assert_ne!(after["hash"].as_str(), Some(hash.as_str()), "the hash follows the config");
    assert_ne!(after["loaded_at"].as_str(), Some(loaded_at.as_str()), "the load time follows the reload");
    let again = http::send("GET", &url, &[("authorization", &auth)], "").await.json();
    assert_eq!(again["hash"], after["hash"], "the hash is stable while the config is");
}

// === check --against ===

#[tokio::test]
async fn check_against_prints_what_a_reload_would_change() {
    let up = Upstream::echo().await;
    let gw = GatewayProcess::start(&ConfigBuilder::new(&up.url()).build()).await;
    let running = gw.config_path();
    let check = |file: &str| run_with(Some(ADMIN_TOKEN), &["check", "--config", file, "--against", &gw.admin]);
    let changes = |r: &Run| -> Vec<String> {
        r.stdout.lines().filter(|l| l.starts_with(['+', '-', '~'])).map(str::to_owned).collect()
    };

    let same = check(running.to_str().unwrap()).ok();
    assert_eq!(changes(&same), Vec::<String>::new(), "{}", same.show());
    assert!(same.stdout.contains("no changes"), "{}", same.show());

    let text = std::fs::read_to_string(&running).unwrap();
    let package = "\"500\" = { credits = 500, price_eur = 20 }";
    assert!(text.contains(package) && text.contains("fast = 1,"), "the shipped config changed shape");
    let edited =
        text.replacen("fast = 1,", "fast = 2,", 1).replacen(package, "\"500\" = { credits = 600, price_eur = 20 }", 1);
    let copy = std::env::temp_dir().join(format!("creditgate-against-{}.toml", std::process::id()));
    std::fs::write(&copy, &edited).unwrap();
    let diff = check(copy.to_str().unwrap()).ok();
    assert_eq!(
        changes(&diff),
        ["~ price     ai_chat tiers.fast: 1 → 2", "~ package   500 credits: 500 → 600"],
        "{}",
        diff.show()
    );
    assert!(diff.stdout.contains("2 changes"), "{}", diff.show());

    // An invalid file: non-zero, naming the key, nothing fetched.
    std::fs::write(&copy, text.replacen("fast = 1,", "fast = 0,", 1)).unwrap();
    let invalid = check(copy.to_str().unwrap());
    assert_eq!(invalid.code, Some(1), "{}", invalid.show());
    assert!(invalid.stderr.contains("operations.ai_chat.tiers.fast"), "{}", invalid.show());

    // The gateway refusing the token, or not there.
    std::fs::write(&copy, &edited).unwrap();
    let file = copy.to_str().unwrap();
    let wrong = run_with(Some("wrong-token"), &["check", "--config", file, "--against", &gw.admin]);
    assert_eq!(wrong.code, Some(4), "{}", wrong.show());
    let closed = closed_port();
    let gone = run_with(Some(ADMIN_TOKEN), &["check", "--config", file, "--against", &closed]);
    assert_eq!(gone.code, Some(3), "{}", gone.show());
    assert!(gone.stderr.contains("cannot reach"), "{}", gone.show());
    let _ = std::fs::remove_file(&copy);
}
