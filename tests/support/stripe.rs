//! localstripe (PyPI), a stateful fake Stripe, on a free loopback port — and the customer's side
//! of a payment that Stripe.js would do in a browser (create the card, attach it, confirm).
//!
//! `scripts/test` installs localstripe into `target/test-venv` (or says loudly that it could not
//! and sets `CREDITGATE_SKIP_PYPI=1`). Without it the payment tests fail — they never pass by
//! skipping unless that variable says the skip was announced.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::http::{self, Response};

/// The secret key the tests use (localstripe accepts any `sk_…`).
pub const SECRET_KEY: &str = "sk_test_creditgate";
/// Cards with localstripe's behaviour (Stripe's test numbers).
pub const CARD_OK: &str = "4242424242424242";
/// Attaches, but every charge is declined.
pub const CARD_DECLINED_LATER: &str = "4000000000000341";

/// Binds 127.0.0.1 only (localstripe's own `start()` binds every interface) and keeps its store
/// in memory (it would pickle it to /tmp/localstripe.pickle after every write, shared by all).
const LAUNCHER: &str = "
import sys
from aiohttp import web
from localstripe import resources, server
resources.store.dump_to_disk = lambda: None
web.run_app(server.app, host='127.0.0.1', port=int(sys.argv[1]), print=None, access_log=None)
";

/// A running localstripe, killed on drop.
pub struct LocalStripe {
    child: Child,
    port: u16,
}

impl Drop for LocalStripe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("CREDITGATE_TEST_PYTHON") {
        return p.into();
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-venv/bin/python3")
}

impl LocalStripe {
    /// Starts localstripe; `None` only when `CREDITGATE_SKIP_PYPI=1` (scripts/test announced
    /// that it could not install it) — then the caller prints why it skips.
    pub fn start() -> Option<Self> {
        let python = python();
        let importable = Command::new(&python)
            .args(["-c", "import localstripe"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !importable {
            if std::env::var("CREDITGATE_SKIP_PYPI").is_ok_and(|v| v == "1") {
                eprintln!("SKIPPED: localstripe is not installed (scripts/test said why above)");
                return None;
            }
            panic!(
                "localstripe is not importable by {}: run scripts/test, which installs it into target/test-venv \
                 (or set CREDITGATE_TEST_PYTHON to a python that has it)",
                python.display()
            );
        }
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let mut child = Command::new(&python)
                .args(["-c", LAUNCHER, &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start localstripe");
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Some(LocalStripe { child, port });
                }
                if child.try_wait().ok().flatten().is_some() {
                    break; // the port was taken in between: try another
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("localstripe did not start");
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The `[billing.stripe]` section for a gateway using this localstripe, with the secrets in
    /// the variables `key_var` and `whsec_var`.
    pub fn config(&self, key_var: &str, whsec_var: &str) -> String {
        format!(
            "\n[billing.stripe]\nsecret_key_env = \"{key_var}\"\nwebhook_secret_env = \"{whsec_var}\"\n\
             publishable_key_env = \"{key_var}_PK\"\napi_base = \"{url}\"\njs_url = \"{url}/js.stripe.com/v3/\"\n\
             # localstripe refuses the parameter; the test attaches the card as Stripe would.\n\
             setup_future_usage = \"none\"\n",
            url = self.url()
        )
    }

    /// A form-encoded call with the secret key, as any Stripe client makes it.
    pub async fn call(&self, method: &str, path: &str, form: &[(&str, &str)]) -> Response {
        let body = serde_urlencoded::to_string(form).unwrap();
        let auth = format!("Bearer {SECRET_KEY}");
        let headers = [("authorization", auth.as_str()), ("content-type", "application/x-www-form-urlencoded")];
        http::send(method, &format!("{}{path}", self.url()), &headers, body).await
    }

    /// Like [`LocalStripe::call`], expecting a 200 and returning its JSON.
    pub async fn ok(&self, method: &str, path: &str, form: &[(&str, &str)]) -> Value {
        let res = self.call(method, path, form).await;
        assert_eq!(res.status, 200, "localstripe {method} {path}: {}", res.text());
        res.json()
    }

    /// Sends every event to `url`, signed with `secret` (as a Stripe webhook endpoint does).
    pub async fn send_events_to(&self, url: &str, secret: &str) {
        let res = http::send(
            "POST",
            &format!("{}/_config/webhooks/creditgate", self.url()),
            &[("content-type", "application/x-www-form-urlencoded")],
            serde_urlencoded::to_string([("url", url), ("secret", secret)]).unwrap(),
        )
        .await;
        assert_eq!(res.status, 200, "{}", res.text());
    }

    /// A card with `number`, attached to `customer` (what Stripe does for a payment made with
    /// `setup_future_usage`, or the customer does in Stripe's billing portal).
    pub async fn attached_card(&self, customer: &str, number: &str) -> String {
        let pm = self
            .ok(
                "POST",
                "/v1/payment_methods",
                &[
                    ("type", "card"),
                    ("card[number]", number),
                    ("card[exp_month]", "12"),
                    ("card[exp_year]", "2034"),
                    ("card[cvc]", "123"),
                ],
            )
            .await;
        let id = pm["id"].as_str().unwrap().to_owned();
        self.ok("POST", &format!("/v1/payment_methods/{id}/attach"), &[("customer", customer)]).await;
        id
    }

    /// The customer's side of a purchase, as Stripe.js would do it: pays the PaymentIntent
    /// `intent` with a new card `number`. Returns the card's id.
    pub async fn pay(&self, intent: &str, number: &str) -> String {
        let pi = self.ok("GET", &format!("/v1/payment_intents/{intent}"), &[]).await;
        let customer = pi["customer"].as_str().expect("the intent has a customer");
        let card = self.attached_card(customer, number).await;
        self.ok("POST", &format!("/v1/payment_intents/{intent}"), &[("payment_method", &card)]).await;
        let res = self.call("POST", &format!("/v1/payment_intents/{intent}/confirm"), &[]).await;
        assert!(res.status == 200 || number != CARD_OK, "confirm: {}", res.text());
        card
    }

    /// Every PaymentIntent whose metadata names `account`, oldest first.
    pub async fn intents_of(&self, account: &str) -> Vec<Value> {
        let list = self.ok("GET", "/v1/payment_intents?limit=100", &[]).await;
        let mut of: Vec<Value> = list["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|pi| pi["metadata"]["creditgate_account"] == account)
            .cloned()
            .collect();
        of.sort_by_key(|pi| pi["created"].as_i64());
        of
    }
}
