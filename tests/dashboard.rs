//! The usage dashboard (`GET /dashboard`) in a real browser: headless Chromium loads the page
//! with an API key in the URL fragment, runs its script against a real gateway, and the test
//! reads the rendered DOM — balance bar text, monthly and top-up figures, renewal date,
//! category breakdown, low-credit banner — and checks it against `GET /v1/credits` and
//! `/v1/credits/usage`. A screenshot is kept as `target/test-artifacts/dashboard.png`.
//!
//! Chromium must be installed (`scripts/test` installs Debian's `chromium`; `CHROMIUM` may name
//! another binary). Without it these tests fail saying so: a dashboard nobody looked at is not
//! tested.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::gateway::TestGateway;
use support::http;
use support::upstream::Upstream;

const CHAT: &str = "/v1/chat/completions";

/// Longest one Chromium run may take.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(60);

// === the browser ===

/// The Chromium binary: `$CHROMIUM`, else `/usr/bin/chromium`, else one on the PATH.
fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return PathBuf::from(p);
    }
    for candidate in ["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"] {
        if Path::new(candidate).exists() {
            return PathBuf::from(candidate);
        }
    }
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        if Command::new(name).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok() {
            return PathBuf::from(name);
        }
    }
    panic!(
        "Chromium not found: the dashboard tests drive the page in headless Chromium. Install it \
         (`apt-get install -y chromium`), run scripts/test (which does), or set CHROMIUM to a \
         Chromium/Chrome binary."
    );
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "creditgate-dashboard-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs headless Chromium on `url` with `extra` arguments (off the async threads, so the
/// gateway keeps serving the page's requests); returns its stdout. Bounded by
/// [`BROWSER_TIMEOUT`]; the browser is killed if it overruns.
async fn run_chromium(url: &str, extra: &[String]) -> String {
    let binary = chromium();
    let url = url.to_owned();
    let extra = extra.to_vec();
    tokio::task::spawn_blocking(move || {
        let scratch = Scratch::new();
        let out_path = scratch.0.join("stdout");
        let err_path = scratch.0.join("stderr");
        let mut child = Command::new(&binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--virtual-time-budget=5000",
            ])
            .arg(format!("--user-data-dir={}", scratch.0.join("profile").display()))
            .args(&extra)
            .arg(&url)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out_path).expect("stdout file"))
            .stderr(std::fs::File::create(&err_path).expect("stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let deadline = Instant::now() + BROWSER_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for chromium") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "chromium did not finish within {BROWSER_TIMEOUT:?} on {url}; stderr:\n{}",
                    std::fs::read_to_string(&err_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
        assert!(
            status.success(),
            "chromium exited with {status} on {url}; stderr:\n{}",
            std::fs::read_to_string(&err_path).unwrap_or_default()
        );
        stdout
    })
    .await
    .expect("chromium task")
}

/// The rendered DOM of `url` once its script (and its fetches) ran.
async fn rendered_dom(url: &str) -> Dom {
    let html = run_chromium(url, &["--dump-dom".to_owned()]).await;
    assert!(html.contains("</html>"), "chromium printed no DOM for {url}:\n{html}");
    Dom(html)
}

// === reading the DOM ===

/// Serialized HTML as Chromium's `--dump-dom` prints it.
struct Dom(String);

impl Dom {
    /// The start tag and inner HTML of the element with `id` (elements of the same tag name
    /// nested inside it are balanced).
    fn element(&self, id: &str) -> (&str, &str) {
        let html = &self.0;
        let needle = format!("id=\"{id}\"");
        let at = html.find(&needle).unwrap_or_else(|| panic!("no element #{id} in the page:\n{html}"));
        let open = html[..at].rfind('<').expect("start tag");
        let tag_end = open + html[open..].find('>').expect("end of start tag") + 1;
        let tag = &html[open + 1..];
        let name: String = tag.chars().take_while(|c| c.is_ascii_alphanumeric()).collect();
        let (opener, closer) = (format!("<{name}"), format!("</{name}>"));
        let mut depth = 1;
        let mut pos = tag_end;
        while depth > 0 {
            let next_close = html[pos..].find(&closer).map(|i| pos + i).unwrap_or_else(|| panic!("#{id} not closed"));
            let next_open = html[pos..].find(&opener).map(|i| pos + i).filter(|i| *i < next_close);
            match next_open {
                Some(o) => {
                    depth += 1;
                    pos = o + opener.len();
                }
                None => {
                    depth -= 1;
                    pos = next_close + closer.len();
                }
            }
        }
        (&html[open..tag_end], &html[tag_end..pos - closer.len()])
    }

    /// The text of the element with `id`: tags removed, entities decoded, whitespace collapsed.
    fn text(&self, id: &str) -> String {
        text_of(self.element(id).1)
    }

    /// Whether the element with `id` is shown: neither it nor its nearest `hidden`/`display:
    /// none` start tag says otherwise.
    fn shown(&self, id: &str) -> bool {
        let (tag, _) = self.element(id);
        !(tag.contains("display: none") || tag.contains("display:none") || has_class(tag, "hidden"))
    }

    /// Rows of the table with `id` as cell texts.
    fn rows(&self, id: &str) -> Vec<Vec<String>> {
        let (_, inner) = self.element(id);
        inner
            .split("<tr")
            .skip(1)
            .map(|row| row.split("<td").skip(1).map(|cell| text_of(&format!("<td{cell}"))).collect())
            .collect()
    }
}

fn has_class(tag: &str, class: &str) -> bool {
    tag.split("class=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .is_some_and(|c| c.split_whitespace().any(|x| x == class))
}

fn text_of(html: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                out.push(' ');
            }
            _ if !in_tag => out.push(c),
            _ => {}
        }
    }
    let out = out
        .replace("&nbsp;", " ")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&");
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// 1350 → "1,350" (the gateway's own formatting).
fn grouped(n: u64) -> String {
    creditgate::notify::email::thousands(n)
}

/// "15 Dec 2026" for an RFC 3339 time (en-GB short month; "Sept" is also seen for September).
fn day_month_year(v: &Value) -> Vec<String> {
    let t = creditgate::calendar::parse_rfc3339(v.as_str().expect("time")).expect("RFC 3339");
    let (y, m, d) = creditgate::calendar::civil_from_days(t.div_euclid(86_400));
    let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let mut forms = vec![format!("{d} {} {y}", months[(m - 1) as usize])];
    if m == 9 {
        forms.push(format!("{d} Sept {y}"));
    }
    forms
}

// === fixtures ===

fn leads(n: usize) -> String {
    let list: Vec<String> = (0..n).map(|i| format!(r#"{{"id":{i}}}"#)).collect();
    format!(r#"{{"leads":[{}]}}"#, list.join(","))
}

/// Sends `n` copies of one metered request, 10 at a time; each must be charged `cost`.
async fn repeat(gw: &TestGateway, key: &str, n: usize, path: &str, headers: &[(&str, &str)], body: &str, cost: u64) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(10) {
        let batch = chunk.iter().map(|_| gw.post(key, path, headers, body));
        for res in futures_util::future::join_all(batch).await {
            assert_eq!((res.status.as_u16(), res.charged()), (200, cost), "{path}: {}", res.text());
        }
    }
}

fn dashboard_url(gw: &TestGateway, key: &str) -> String {
    gw.url(&format!("/dashboard#key={key}"))
}

// === tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_page_is_self_contained_and_needs_no_key_to_load() {
    let up = Upstream::echo().await;
    let gw = TestGateway::with_upstream(&up.url()).await;
    let res = http::send("GET", &gw.url("/dashboard"), &[], "").await;
    assert_eq!(res.status, 200, "{}", res.text());
    assert!(res.header("content-type").is_some_and(|c| c.starts_with("text/html")), "{:?}", res.headers);
    let html = res.text();
    // No CDN, no external asset: every URL in the page is the SVG namespace.
    for scheme in ["http://", "https://", "//cdn"] {
        for (i, _) in html.match_indices(scheme) {
            let rest = &html[i..];
            assert!(
                rest.starts_with("http://www.w3.org/2000/svg"),
                "external reference in the page: {}",
                &rest[..rest.len().min(60)]
            );
        }
    }
    assert_eq!(up.count(), 0, "the page is served by the gateway, not the upstream");

    // Without a key the page asks for one; with a wrong one it says why.
    let dom = rendered_dom(&gw.url("/dashboard")).await;
    assert!(dom.shown("login") && !dom.shown("app"), "sign-in form shown, figures hidden");
    let dom = rendered_dom(&gw.url("/dashboard#key=cg_notavalidkeynotavalidkeynotavalid00")).await;
    assert!(dom.shown("login") && !dom.shown("app"));
    assert!(dom.text("login-error").contains("not valid"), "error shown: {}", dom.text("login-error"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_shows_the_figures_of_v1_credits() {
    let up = Upstream::echo().await;
    let gw = TestGateway::with_upstream(&up.url()).await;
    let key = gw.account_with_key("acme", "pro").await;
    // 650 credits: AI Chat 150, Enrichment 300, Insights 100, Campaigns 100.
    repeat(&gw, &key, 30, CHAT, &[("x-ai-tier", "powerful")], "{}", 5).await;
    repeat(&gw, &key, 3, "/v1/leads/enrich", &[], &leads(100), 100).await;
    repeat(&gw, &key, 20, "/v1/insights/position", &[], "{}", 5).await;
    repeat(&gw, &key, 10, "/v1/campaigns/generate", &[], r#"{"steps":20}"#, 10).await;
    let c = gw.credits(&key).await;
    assert_eq!((c["used_this_period"].as_u64(), c["remaining"].as_u64()), (Some(650), Some(1350)), "{c}");

    let dom = rendered_dom(&dashboard_url(&gw, &key)).await;
    assert!(dom.shown("app") && !dom.shown("login"), "the key from the URL signed in");
    assert_eq!(dom.text("balance-text"), "650 / 2,000 · 33% used this month · 1,350 remaining");
    // The figures are those of GET /v1/credits.
    assert_eq!(dom.text("monthly"), grouped(c["monthly_remaining"].as_u64().unwrap()));
    assert_eq!(dom.text("topup"), grouped(c["topup_remaining"].as_u64().unwrap()));
    assert_eq!(dom.text("remaining"), grouped(c["remaining"].as_u64().unwrap()));
    let renews = dom.text("renews");
    assert!(day_month_year(&c["renews_at"]).contains(&renews), "renewal date {renews} for {}", c["renews_at"]);
    let ml = &c["messages_left"];
    let messages = dom.text("messages-left");
    assert!(messages.starts_with("That is about ") && messages.ends_with(" chat messages."), "{messages}");
    for tier in ["fast", "balanced", "powerful"] {
        let n = format!("{} {tier}", grouped(ml[tier].as_u64().unwrap()));
        assert!(messages.contains(&n), "{n} in {messages:?}");
    }
    assert!(!dom.shown("low-banner"), "no low-credit banner at 67 % left");

    // The breakdown by category, largest first, every category present, as /v1/credits/usage.
    let usage = gw.call(&key, "GET", "/v1/credits/usage", &[], "").await.json();
    let rows = dom.rows("categories");
    let shown: Vec<(String, String)> = rows.iter().map(|r| (r[0].clone(), r[2].clone())).collect();
    assert_eq!(
        shown,
        [("Enrichment", "300"), ("AI Chat", "150"), ("Campaigns", "100"), ("Insights", "100"), ("Transcription", "0")]
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
            .to_vec(),
        "rows: {rows:?}"
    );
    for (name, n) in &shown {
        assert_eq!(usage["by_category"][name].to_string(), n.replace(',', ""), "{name}");
    }
    // The daily trend: one bar per day of the period, today's the only tall one.
    let (_, trend) = dom.element("trend");
    let bars = trend.matches("<rect").count();
    assert_eq!(bars, usage["daily"].as_array().unwrap().len(), "one bar per day");
    assert!(trend.contains(": 650 credits"), "today's bar carries 650 credits");
    // Auto top-up setting shown as off.
    assert_eq!(dom.text("auto-status"), "Off.");

    // A screenshot for people to look at.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("create target/test-artifacts");
    let png = dir.join("dashboard.png");
    let _ = std::fs::remove_file(&png);
    run_chromium(
        &dashboard_url(&gw, &key),
        &[
            format!("--screenshot={}", png.display()),
            "--window-size=1000,1400".to_owned(),
            "--hide-scrollbars".to_owned(),
        ],
    )
    .await;
    let bytes = std::fs::read(&png).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", png.display()));
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(bytes.len() > 20_000, "a blank page? the screenshot has only {} bytes", bytes.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_low_credit_banner_shows_below_ten_percent() {
    let up = Upstream::echo().await;
    let gw = TestGateway::with_upstream(&up.url()).await;
    let key = gw.account_with_key("acme", "pro").await;
    repeat(&gw, &key, 2, "/v1/leads/enrich", &[], &leads(925), 925).await; // 150 of 2,000 left
    assert_eq!(gw.topup("acme", 30, "pay-1").await.status, 201); // 180 left: still below 10 %
    let setting = json!({"enabled": true, "threshold": 100, "package": "500"});
    assert_eq!(gw.admin_call("PUT", "/admin/v1/accounts/acme/auto-topup", Some(setting)).await.status, 200);
    let c = gw.credits(&key).await;
    assert_eq!((c["remaining"].as_u64(), c["low"].as_bool()), (Some(180), Some(true)), "{c}");

    let dom = rendered_dom(&dashboard_url(&gw, &key)).await;
    assert!(dom.shown("low-banner"), "the banner is shown");
    assert_eq!(dom.text("low-banner"), "Credits are running low: 180 left (below 10% of your 2,000 monthly credits).");
    assert_eq!(dom.text("balance-text"), "1,850 / 2,000 · 93% used this month · 180 remaining");
    assert_eq!(
        (dom.text("monthly"), dom.text("topup"), dom.text("remaining")),
        ("150".into(), "30".into(), "180".into())
    );
    assert_eq!(dom.text("auto-status"), "On: buys 500 when fewer than 100 credits remain.");

    // Out of credits: the banner says so and names the renewal date.
    assert_eq!(gw.call(&key, "PUT", "/v1/credits/auto-topup", &[], r#"{"enabled":false}"#).await.status, 200);
    repeat(&gw, &key, 1, "/v1/leads/enrich", &[], &leads(180), 180).await;
    let c = gw.credits(&key).await;
    let dom = rendered_dom(&dashboard_url(&gw, &key)).await;
    let banner = dom.text("low-banner");
    assert!(banner.starts_with("You're out of AI credits. They renew on "), "{banner}");
    assert!(
        day_month_year(&c["renews_at"]).iter().any(|d| banner.contains(d.as_str())),
        "{banner} / {}",
        c["renews_at"]
    );
    assert_eq!(dom.text("remaining"), "0");
}
