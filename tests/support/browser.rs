//! Headless Chromium driven over the DevTools protocol, for tests that must click, watch the
//! page's requests or catch Content-Security-Policy violations — things `--dump-dom` cannot.
//!
//! The protocol runs over `--remote-debugging-pipe` (JSON messages ending in NUL, the browser
//! reading fd 3 and writing fd 4; a `sh` wrapper maps them onto the child's stdin and stdout, so
//! no unsafe `dup2` is needed). Calls block: use them from the test body of a multi-threaded
//! tokio test, where the gateway's tasks keep running on the worker threads.
//!
//! Chromium must be installed (`scripts/test` installs Debian's `chromium`; `CHROMIUM` may name
//! another binary). Without it these tests fail saying so: a dashboard nobody looked at is not
//! tested.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Longest one protocol call or wait may take.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The Chromium binary: `$CHROMIUM`, else `/usr/bin/chromium`, else one on the PATH.
pub fn chromium() -> PathBuf {
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
            "creditgate-browser-{}-{}",
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

/// Recorded in every page before its own script runs: CSP violations the page caused.
const WATCH_CSP: &str = "window.__cspViolations = []; document.addEventListener('securitypolicyviolation', \
     e => window.__cspViolations.push(e.violatedDirective + ' blocked ' + (e.blockedURI || 'inline') + ' at ' + \
     e.sourceFile + ':' + e.lineNumber));";

/// One request the page sent, as the browser reported it.
#[derive(Debug, Clone)]
pub struct PageRequest {
    /// Full URL.
    pub url: String,
    /// Its `Authorization` header, if any.
    pub authorization: Option<String>,
}

/// A headless Chromium with one tab, killed on drop.
pub struct Browser {
    child: Child,
    to_browser: ChildStdin,
    from_browser: Receiver<Value>,
    next_id: u64,
    session: String,
    /// Protocol events seen so far (`{"method", "params"}`), in order.
    events: Vec<Value>,
    _scratch: Scratch,
}

impl Browser {
    /// Starts Chromium with a `width`×`height` window and opens one tab, with network events on
    /// and CSP violations recorded.
    pub fn start(width: u32, height: u32) -> Self {
        let binary = chromium();
        let scratch = Scratch::new();
        let stderr = std::fs::File::create(scratch.0.join("stderr")).expect("stderr file");
        // fd 3 ← our stdin pipe, fd 4 → our stdout pipe; the browser's own stdio goes nowhere.
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>/dev/null"#)
            .arg(&binary)
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
                "--hide-scrollbars",
                "--remote-debugging-pipe",
            ])
            .arg(format!("--window-size={width},{height}"))
            .arg(format!("--user-data-dir={}", scratch.0.join("profile").display()))
            .arg("about:blank")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let to_browser = child.stdin.take().expect("stdin");
        let mut reader = BufReader::new(child.stdout.take().expect("stdout"));
        let (tx, from_browser) = channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            while reader.read_until(0, &mut buf).is_ok_and(|n| n > 0) {
                buf.pop_if(|b| *b == 0);
                if let Ok(v) = serde_json::from_slice::<Value>(&buf)
                    && tx.send(v).is_err()
                {
                    return;
                }
                buf.clear();
            }
        });
        let mut b = Browser {
            child,
            to_browser,
            from_browser,
            next_id: 0,
            session: String::new(),
            events: Vec::new(),
            _scratch: scratch,
        };
        let target = b.call("Target.createTarget", json!({"url": "about:blank"}));
        let target = target["targetId"].as_str().expect("targetId").to_owned();
        let attached = b.call("Target.attachToTarget", json!({"targetId": target, "flatten": true}));
        b.session = attached["sessionId"].as_str().expect("sessionId").to_owned();
        for domain in ["Page.enable", "Network.enable", "Runtime.enable"] {
            b.call(domain, json!({}));
        }
        b.call("Page.addScriptToEvaluateOnNewDocument", json!({"source": WATCH_CSP}));
        b
    }

    /// Sends one protocol command (to the tab once attached) and returns its result.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(0);
        self.to_browser.write_all(&bytes).and_then(|()| self.to_browser.flush()).expect("write to chromium");
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.from_browser.recv_timeout(left) {
                Ok(v) if v["id"].as_u64() == Some(id) => {
                    assert!(v.get("error").is_none(), "{method} failed: {v}");
                    return v["result"].clone();
                }
                Ok(v) => self.events.push(v),
                Err(RecvTimeoutError::Timeout) => panic!("chromium did not answer {method} within {TIMEOUT:?}"),
                Err(RecvTimeoutError::Disconnected) => panic!("chromium exited during {method}"),
            }
        }
    }

    /// Navigates the tab to `url` and waits for its load event.
    pub fn open(&mut self, url: &str) {
        let seen = self.events.len();
        self.call("Page.navigate", json!({"url": url}));
        self.wait_for_event("Page.loadEventFired", seen);
    }

    fn wait_for_event(&mut self, method: &str, after: usize) {
        let deadline = Instant::now() + TIMEOUT;
        while !self.events[after..].iter().any(|e| e["method"] == method) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.from_browser.recv_timeout(left) {
                Ok(v) => self.events.push(v),
                Err(_) => panic!("no {method} within {TIMEOUT:?}"),
            }
        }
    }

    /// Evaluates `expression` in the page (promises awaited) and returns its value.
    pub fn eval(&mut self, expression: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true, "userGesture": true}),
        );
        assert!(r.get("exceptionDetails").is_none(), "{expression} threw: {r}");
        r["result"]["value"].clone()
    }

    /// Waits until `expression` is true in the page.
    pub fn wait_until(&mut self, expression: &str) {
        let deadline = Instant::now() + TIMEOUT;
        while self.eval(expression) != json!(true) {
            assert!(Instant::now() < deadline, "still not true after {TIMEOUT:?}: {expression}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Clicks the element with `id` (a real DOM click).
    pub fn click(&mut self, id: &str) {
        let done = self.eval(&format!(
            "(e => {{ if (!e) return false; e.click(); return true; }})(document.getElementById({id:?}))"
        ));
        assert_eq!(done, json!(true), "no element #{id} to click");
    }

    /// The serialized DOM, as `--dump-dom` prints it.
    pub fn dom(&mut self) -> String {
        self.eval("document.documentElement.outerHTML").as_str().expect("outerHTML").to_owned()
    }

    /// The CSP violations the current page caused.
    pub fn csp_violations(&mut self) -> Vec<String> {
        let v = self.eval("window.__cspViolations || []");
        v.as_array().expect("array").iter().map(|s| s.as_str().unwrap_or_default().to_owned()).collect()
    }

    /// Every request the tab sent so far (after draining the events that arrived).
    pub fn requests(&mut self) -> Vec<PageRequest> {
        while let Ok(v) = self.from_browser.try_recv() {
            self.events.push(v);
        }
        self.events
            .iter()
            .filter(|e| e["method"] == "Network.requestWillBeSent")
            .map(|e| {
                let req = &e["params"]["request"];
                let headers = req["headers"].as_object();
                let authorization = headers.and_then(|h| {
                    h.iter().find(|(k, _)| k.eq_ignore_ascii_case("authorization")).and_then(|(_, v)| v.as_str())
                });
                PageRequest {
                    url: req["url"].as_str().unwrap_or_default().to_owned(),
                    authorization: authorization.map(str::to_owned),
                }
            })
            .collect()
    }

    /// A PNG of the viewport.
    pub fn screenshot(&mut self) -> Vec<u8> {
        use base64::prelude::{BASE64_STANDARD, Engine};
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}));
        BASE64_STANDARD.decode(r["data"].as_str().expect("data")).expect("base64 PNG")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ask it to close (it takes its renderer processes along), then make sure.
        let _ = self.to_browser.write_all(b"{\"id\":0,\"method\":\"Browser.close\"}\0");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
