//! The usage dashboard (`GET /dashboard`) in a real browser: headless Chromium, driven over the
//! DevTools protocol (`support::browser`), opens the page with an API key in the URL fragment,
//! confirms it, lets the page's script run against a real gateway, and the test reads the
//! rendered DOM — balance bar text, monthly and top-up figures, renewal date, category
//! breakdown, low-credit banner — and checks it against `GET /v1/credits` and
//! `/v1/credits/usage`. Every page load is also checked for Content-Security-Policy violations,
//! and the requests the page sent are watched (a key from a link is not used unconfirmed). A
//! screenshot is kept as `target/test-artifacts/dashboard.png`.

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::browser::Browser;
use support::gateway::TestGateway;
use support::http;
use support::upstream::Upstream;

const CHAT: &str = "/v1/chat/completions";

/// True once the page shows its figures or an error under the sign-in form.
const SETTLED: &str = "!document.getElementById('app').classList.contains('hidden') \
     || document.getElementById('login-error').textContent !== ''";

/// True while the page asks whether to use a key from the link.
const ASKING: &str = "!document.getElementById('link-key').classList.contains('hidden')";

// === the browser ===

/// Opens `url` and asserts the page broke no rule of its Content-Security-Policy.
fn open(browser: &mut Browser, url: &str) {
    browser.open(url);
    let violations = browser.csp_violations();
    assert!(violations.is_empty(), "CSP violations on {url}: {violations:?}");
}

/// Opens the dashboard with `key` in the link, confirms it (unless the tab is signed in with it
/// already: then the page does not ask), and returns the settled DOM.
fn signed_in(browser: &mut Browser, gw: &TestGateway, key: &str) -> Dom {
    open(browser, "about:blank"); // a fresh document even if the tab shows the dashboard already
    open(browser, &dashboard_url(gw, key));
    browser.wait_until(&format!("{ASKING} || {SETTLED}"));
    if browser.eval(ASKING) == json!(true) {
        browser.click("link-key-confirm");
        browser.wait_until(SETTLED);
    }
    let violations = browser.csp_violations();
    assert!(violations.is_empty(), "CSP violations after signing in: {violations:?}");
    Dom(browser.dom())
}

/// The requests the page sent to the customer API so far, as (path, authorization).
fn api_calls(browser: &mut Browser) -> Vec<(String, Option<String>)> {
    browser
        .requests()
        .into_iter()
        .filter_map(|r| {
            let path = r.url.split_once("://").and_then(|(_, rest)| rest.find('/').map(|i| rest[i..].to_owned()))?;
            path.starts_with("/v1/").then_some((path, r.authorization))
        })
        .collect()
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

    // Without a key the page asks for one and calls nothing; with a wrong one it says why.
    let mut browser = Browser::start(1000, 1400);
    open(&mut browser, &gw.url("/dashboard"));
    let dom = Dom(browser.dom());
    assert!(dom.shown("login") && !dom.shown("app") && !dom.shown("link-key"), "sign-in form shown, figures hidden");
    assert_eq!(api_calls(&mut browser), [], "no key, no API call");
    let dom = signed_in(&mut browser, &gw, "cg_notavalidkeynotavalidkeynotavalid00");
    assert!(dom.shown("login") && !dom.shown("app"));
    assert!(dom.text("login-error").contains("not valid"), "error shown: {}", dom.text("login-error"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_page_carries_a_strict_content_security_policy() {
    let up = Upstream::echo().await;
    let gw = TestGateway::with_upstream(&up.url()).await;
    let res = http::send("GET", &gw.url("/dashboard"), &[], "").await;
    assert_eq!(res.status, 200, "{}", res.text());
    let html = res.text();
    let csp = res.header("content-security-policy").expect("a Content-Security-Policy");
    let directives: Vec<&str> = csp.split(';').map(str::trim).collect();
    // The page's one inline script and one inline style, allowed by hash and nothing else.
    let hash = |tag: &str| {
        let open = format!("<{tag}>");
        let start = html.find(&open).expect(tag) + open.len();
        let text = &html[start..start + html[start..].find(&format!("</{tag}>")).expect("closed")];
        use base64::prelude::{BASE64_STANDARD, Engine};
        format!("'sha256-{}'", BASE64_STANDARD.encode(Sha256::digest(text.as_bytes())))
    };
    assert!(directives.contains(&format!("script-src {}", hash("script")).as_str()), "{csp}");
    assert!(directives.contains(&format!("style-src {}", hash("style")).as_str()), "{csp}");
    for d in ["default-src 'none'", "connect-src 'self'", "frame-ancestors 'none'", "base-uri 'none'"] {
        assert!(directives.contains(&d), "{d} in {csp}");
    }
    assert!(!csp.contains("unsafe-") && !csp.contains('*'), "{csp}");
    assert_eq!(res.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(res.header("referrer-policy"), Some("no-referrer"));
    assert_eq!(res.header("x-frame-options"), Some("DENY"));
    // The other tests load the page under this policy and fail on any violation; here the
    // browser also confirms the policy is in force (an injected inline script is refused).
    let mut browser = Browser::start(800, 600);
    open(&mut browser, &gw.url("/dashboard"));
    browser.eval(
        "(() => { const s = document.createElement('script'); s.textContent = 'window.__injected = 1'; \
         document.body.appendChild(s); })()",
    );
    assert_eq!(browser.eval("window.__injected === undefined"), json!(true), "an injected script ran");
    let violations = browser.csp_violations();
    assert!(violations.iter().any(|v| v.starts_with("script-src")), "refused and reported: {violations:?}");
}

/// A link can carry someone else's key: opening it must not sign the reader into that account
/// before they confirm — not a single API call with it — and saying no keeps their own session.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_in_a_link_is_used_only_after_the_person_confirms() {
    let up = Upstream::echo().await;
    let gw = TestGateway::with_upstream(&up.url()).await;
    let own = gw.account_with_key("mine", "pro").await;
    let theirs = gw.account_with_key("theirs", "starter").await;
    let bearer = |k: &str| Some(format!("Bearer {k}"));
    let mut browser = Browser::start(1000, 1400);

    open(&mut browser, &dashboard_url(&gw, &own));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(api_calls(&mut browser), [], "no API call before the click");
    assert_eq!(browser.eval(ASKING), json!(true), "the page asks");
    assert_eq!(
        browser.eval("document.getElementById('link-key-prefix').textContent"),
        json!(format!("{}…", &own[..8]))
    );
    assert_eq!(browser.eval("location.hash"), json!(""), "the key left the address bar");
    assert_eq!(browser.eval("sessionStorage.length"), json!(0), "not stored before confirming");
    browser.click("link-key-confirm");
    browser.wait_until(SETTLED);
    let dom = Dom(browser.dom());
    assert!(dom.shown("app") && dom.text("balance-text").starts_with("0 / 2,000"), "{}", dom.text("balance-text"));
    let calls = api_calls(&mut browser);
    assert!(!calls.is_empty() && calls.iter().all(|(_, auth)| *auth == bearer(&own)), "{calls:?}");

    // Signed in as "mine", the tab opens a link with another account's key: it asks, naming
    // both, and calls nothing with the new key; declining keeps "mine".
    open(&mut browser, "about:blank");
    let before = api_calls(&mut browser).len();
    open(&mut browser, &dashboard_url(&gw, &theirs));
    browser.wait_until(ASKING);
    let current = browser.eval("document.getElementById('link-key-current').textContent");
    assert!(current.as_str().is_some_and(|c| c.contains(&own[..8])), "names the key in use: {current}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(api_calls(&mut browser).len(), before, "nothing fetched while asking");
    browser.click("link-key-cancel");
    browser.wait_until(SETTLED);
    let dom = Dom(browser.dom());
    assert!(dom.text("balance-text").starts_with("0 / 2,000"), "still the pro account: {}", dom.text("balance-text"));
    let calls = api_calls(&mut browser);
    assert!(calls.iter().all(|(_, auth)| *auth != bearer(&theirs)), "the link's key was never used: {calls:?}");
    assert_eq!(browser.eval("sessionStorage.getItem('creditgate-key')"), json!(own));
    assert!(api_calls(&mut browser).len() > before, "declining reloads the own account's figures");

    // Confirming switches.
    let dom = signed_in(&mut browser, &gw, &theirs);
    assert!(dom.text("balance-text").starts_with("0 / 500"), "{}", dom.text("balance-text"));
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

    let mut browser = Browser::start(1000, 1400);
    let dom = signed_in(&mut browser, &gw, &key);
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
    let bytes = browser.screenshot();
    std::fs::write(&png, &bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", png.display()));
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

    let mut browser = Browser::start(1000, 1400);
    let dom = signed_in(&mut browser, &gw, &key);
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
    let dom = signed_in(&mut browser, &gw, &key);
    let banner = dom.text("low-banner");
    assert!(banner.starts_with("You're out of AI credits. They renew on "), "{banner}");
    assert!(
        day_month_year(&c["renews_at"]).iter().any(|d| banner.contains(d.as_str())),
        "{banner} / {}",
        c["renews_at"]
    );
    assert_eq!(dom.text("remaining"), "0");
}
