//! Payments through Stripe (`[billing.stripe]`), against localstripe on loopback: a purchase is
//! credited only when Stripe confirms it, once per payment whatever the number of webhook
//! deliveries or instances; forged and stale deliveries are refused; an auto top-up is paid once
//! per crossing, and a declined one is taken back and switches auto top-up off.
//!
//! The customer's side of a payment (what Stripe.js does in the browser: a card, attached to the
//! customer, confirming the PaymentIntent) is done by [`LocalStripe::pay`]; localstripe then
//! sends its signed `payment_intent.succeeded` to the gateway's webhook, as Stripe would.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::gateway::{ConfigBuilder, TestGateway, spend};
use support::http::{self, Response};
use support::receivers::WebhookReceiver;
use support::redis::RedisServer;
use support::stripe::{CARD_DECLINED_LATER, CARD_OK, LocalStripe};
use support::upstream::Upstream;

const CHECKOUT: &str = "/v1/credits/topups/checkout";
const WEBHOOK: &str = "/v1/billing/stripe/webhook";

/// localstripe, the Stripe secrets in variables of this test's own, and a backend for spending.
struct Shop {
    stripe: LocalStripe,
    whsec: String,
    key_var: String,
    whsec_var: String,
    upstream: Upstream,
}

impl Shop {
    /// `None` when localstripe could not be installed and scripts/test said so.
    async fn open(test: &str) -> Option<Shop> {
        static N: AtomicU64 = AtomicU64::new(0);
        let stripe = LocalStripe::start()?;
        let n = N.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}_{}_{n}", test.to_uppercase(), std::process::id());
        let (key_var, whsec_var) = (format!("CG_STRIPE_KEY_{tag}"), format!("CG_STRIPE_WHSEC_{tag}"));
        let whsec = format!("whsec_test_{tag}");
        // SAFETY: variables of this test's own, set before the gateway that reads them starts.
        unsafe {
            std::env::set_var(&key_var, support::stripe::SECRET_KEY);
            std::env::set_var(format!("{key_var}_PK"), "pk_test_creditgate");
            std::env::set_var(&whsec_var, &whsec);
        }
        Some(Shop { stripe, whsec, key_var, whsec_var, upstream: Upstream::echo().await })
    }

    /// The test config with `[billing.stripe]` pointing at localstripe.
    fn config(&self) -> ConfigBuilder {
        ConfigBuilder::new(&self.upstream.url()).extra(&self.stripe.config(&self.key_var, &self.whsec_var))
    }

    /// A gateway on [`Shop::config`] whose webhook endpoint localstripe delivers to.
    async fn gateway(&self, config: ConfigBuilder) -> TestGateway {
        let gw = TestGateway::start(&config.build()).await;
        self.stripe.send_events_to(&gw.url(WEBHOOK), &self.whsec).await;
        gw
    }

    /// `Stripe-Signature` for `body` at time `t`, with `secret`.
    fn signed(secret: &str, t: i64, body: &[u8]) -> String {
        creditgate::notify::webhook::signature(secret.as_bytes(), t, body)
    }

    /// Delivers `event` to `gw`'s webhook signed with the right secret, now.
    async fn deliver(&self, gw: &TestGateway, event: &Value) -> Response {
        let body = serde_json::to_vec(event).unwrap();
        let sig = Self::signed(&self.whsec, now(), &body);
        http::send("POST", &gw.url(WEBHOOK), &[("stripe-signature", &sig), ("content-type", "application/json")], body)
            .await
    }

    /// The `payment_intent.succeeded` event of `intent` as Stripe would send it.
    async fn succeeded_event(&self, intent: &str) -> Value {
        let pi = self.stripe.ok("GET", &format!("/v1/payment_intents/{intent}"), &[]).await;
        assert_eq!(pi["status"], "succeeded");
        json!({"id": format!("evt_replay_{intent}"), "object": "event", "type": "payment_intent.succeeded",
            "created": now(), "data": {"object": pi}})
    }
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Starts buying `package`; asserts 201 and returns the answer.
async fn checkout(gw: &TestGateway, key: &str, package: &str) -> Value {
    let res = gw.post(key, CHECKOUT, &[], &json!({"package": package}).to_string()).await;
    assert_eq!(res.status, 201, "checkout: {}", res.text());
    res.json()
}

/// Polls `GET /v1/credits` (at most 15 s) until `done` holds; returns the last answer.
async fn credits_until(gw: &TestGateway, key: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let c = gw.credits(key).await;
        if done(&c) {
            return c;
        }
        assert!(Instant::now() < deadline, "waited 15 s for {what}; credits now {c}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Buys `package` (of `credits`) with a card `number` and waits until Stripe's webhook credited
/// it; returns the PaymentIntent id.
async fn buy(shop: &Shop, gw: &TestGateway, key: &str, package: &str, credits: u64, number: &str) -> String {
    let before = gw.credits(key).await["topup_remaining"].as_u64().unwrap();
    let intent = checkout(gw, key, package).await["payment_intent"].as_str().unwrap().to_owned();
    shop.stripe.pay(&intent, number).await;
    credits_until(gw, key, "the purchase to be credited", |c| c["topup_remaining"] == before + credits).await;
    intent
}

/// The account's top-up entries of the admin ledger, oldest first.
async fn ledger(gw: &TestGateway, account: &str) -> Vec<Value> {
    let res = gw.admin_call("GET", &format!("/admin/v1/accounts/{account}/ledger"), None).await;
    assert_eq!(res.status, 200, "{}", res.text());
    let mut entries = res.json()["entries"].as_array().cloned().unwrap_or_default();
    entries.reverse();
    entries
}

fn auto_topup_on(threshold: u64) -> String {
    json!({"enabled": true, "threshold": threshold, "package": "200"}).to_string()
}

// === tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_purchase_is_credited_once_when_stripe_confirms_it() {
    let Some(shop) = Shop::open("purchase").await else { return };
    let gw = shop.gateway(shop.config()).await;
    let key = gw.account_with_key("buyer", "fifty").await;

    // Before any purchase there is no card to charge: auto top-up cannot be switched on.
    let res = gw.call(&key, "PUT", "/v1/credits/auto-topup", &[], &auto_topup_on(20)).await;
    assert_eq!((res.status.as_u16(), res.error_type()), (402, "payment_method_required".into()), "{}", res.text());

    let started = checkout(&gw, &key, "500").await;
    assert_eq!(
        (&started["package"], &started["credits"], &started["amount"], &started["currency"], &started["status"]),
        (&json!("500"), &json!(500), &json!(2000), &json!("eur"), &json!("requires_payment_method"))
    );
    assert_eq!(started["publishable_key"], "pk_test_creditgate");
    let intent = started["payment_intent"].as_str().unwrap().to_owned();
    assert!(started["client_secret"].as_str().unwrap().starts_with(&format!("{intent}_secret_")));
    let pi = shop.stripe.ok("GET", &format!("/v1/payment_intents/{intent}"), &[]).await;
    assert_eq!((pi["amount"].as_u64(), pi["metadata"]["creditgate_account"].as_str()), (Some(2000), Some("buyer")));
    let customer = pi["customer"].as_str().expect("a customer was created").to_owned();

    // Started is not paid: nothing credited until Stripe confirms.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(gw.credits(&key).await["topup_remaining"], 0);

    let card = shop.stripe.pay(&intent, CARD_OK).await;
    let c = credits_until(&gw, &key, "the purchase to be credited", |c| c["topup_remaining"] == 500).await;
    assert_eq!(c["remaining"], 550);
    let topups = ledger(&gw, "buyer").await.into_iter().filter(|e| e["kind"] == "topup").collect::<Vec<_>>();
    assert_eq!(topups.len(), 1);
    assert_eq!((&topups[0]["payment_ref"], &topups[0]["package"]), (&json!(intent), &json!("500")));

    // Stripe delivers at least once: the same event again, many times, credits nothing more.
    let event = shop.succeeded_event(&intent).await;
    for _ in 0..5 {
        let res = shop.deliver(&gw, &event).await;
        assert_eq!(res.status, 200, "{}", res.text());
    }
    assert_eq!(gw.credits(&key).await["topup_remaining"], 500);

    // The purchase's card is the customer's default now, and auto top-up can be switched on.
    let cus = shop.stripe.ok("GET", &format!("/v1/customers/{customer}"), &[]).await;
    assert_eq!(cus["invoice_settings"]["default_payment_method"], card.as_str());
    let res = gw.call(&key, "PUT", "/v1/credits/auto-topup", &[], &auto_topup_on(20)).await;
    assert_eq!(res.status, 200, "{}", res.text());

    // A second purchase reuses the customer; an unknown package is refused before Stripe.
    let second = checkout(&gw, &key, "200").await;
    let path = format!("/v1/payment_intents/{}", second["payment_intent"].as_str().unwrap());
    assert_eq!(shop.stripe.ok("GET", &path, &[]).await["customer"], customer.as_str());
    let res = gw.post(&key, CHECKOUT, &[], r#"{"package":"999"}"#).await;
    assert_eq!((res.status.as_u16(), res.error_type()), (400, "bad_request".into()), "{}", res.text());
    assert!(res.text().contains("200, 500"), "the packages are named: {}", res.text());
    assert_eq!(shop.stripe.intents_of("buyer").await.len(), 2, "no intent for the refused package");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_credit_a_payment_once_and_share_one_customer() {
    let Some(shop) = Shop::open("instances").await else { return };
    let redis = RedisServer::start();
    let config = shop.config().store(&format!("kind = \"redis\"\nurl = \"{}\"", redis.url()));
    let a = shop.gateway(config.clone()).await;
    let b = TestGateway::start(&config.build()).await;
    let key = a.account_with_key("shared", "fifty").await;

    // Two first purchases at once, one on each instance: one customer is kept and used by both.
    let (one, two) = tokio::join!(checkout(&a, &key, "200"), checkout(&b, &key, "500"));
    let intents = shop.stripe.intents_of("shared").await;
    assert_eq!(intents.len(), 2);
    assert_eq!(intents[0]["customer"], intents[1]["customer"], "one customer for the account");

    shop.stripe.pay(one["payment_intent"].as_str().unwrap(), CARD_OK).await;
    credits_until(&a, &key, "the purchase to be credited", |c| c["topup_remaining"] == 200).await;
    // Every copy of the event, to both instances at once.
    let event = shop.succeeded_event(one["payment_intent"].as_str().unwrap()).await;
    let shop = &shop;
    let copies = (0..12).map(|i| {
        let (gw, event) = (if i % 2 == 0 { &a } else { &b }, &event);
        async move { shop.deliver(gw, event).await }
    });
    for res in futures_util::future::join_all(copies).await {
        assert_eq!(res.status, 200, "{}", res.text());
    }
    assert_eq!(b.credits(&key).await["topup_remaining"], 200, "credited once");
    // The other purchase was never paid: never credited.
    assert_eq!(two["credits"], 500);
    assert_eq!(a.credits(&key).await["remaining"], 250);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_stale_or_unsigned_deliveries_are_refused() {
    let Some(shop) = Shop::open("forged").await else { return };
    let gw = shop.gateway(shop.config()).await;
    let key = gw.account_with_key("victim", "fifty").await;
    // A payment that never happened, made up by an attacker who does not have the secret.
    let forged = json!({"id": "evt_forged", "type": "payment_intent.succeeded", "data": {"object": {
        "id": "pi_forged", "object": "payment_intent", "status": "succeeded", "amount": 15000, "currency": "eur",
        "metadata": {"creditgate_account": "victim", "creditgate_purpose": "topup", "package": "5000", "credits": "5000"}}}});
    let body = serde_json::to_vec(&forged).unwrap();
    let url = gw.url(WEBHOOK);
    let post = async |sig: Option<String>, body: &[u8]| {
        let mut headers = vec![("content-type", "application/json")];
        if let Some(sig) = &sig {
            headers.push(("stripe-signature", sig.as_str()));
        }
        let res = http::send("POST", &url, &headers, body.to_vec()).await;
        (res.status.as_u16(), res.text())
    };
    let refused = [
        ("unsigned", post(None, &body).await),
        ("another secret", post(Some(Shop::signed("whsec_guess", now(), &body)), &body).await),
        ("stale", post(Some(Shop::signed(&shop.whsec, now() - 301, &body)), &body).await),
        ("from the future", post(Some(Shop::signed(&shop.whsec, now() + 301, &body)), &body).await),
        ("body changed after signing", {
            let sig = Shop::signed(&shop.whsec, now(), br#"{"type":"ping"}"#);
            post(Some(sig), &body).await
        }),
        ("garbage header", post(Some("t=abc,v1=zz".into()), &body).await),
    ];
    for (what, (status, text)) in &refused {
        assert_eq!(*status, 400, "{what}: {text}");
        assert!(text.contains("bad_request") && text.contains("Stripe-Signature"), "{what}: {text}");
    }
    assert_eq!(gw.credits(&key).await["topup_remaining"], 0, "nothing credited by a refused delivery");
    // The same body signed with the real secret, now, is accepted: the refusals above were the
    // signature check, not the event.
    let (status, text) = post(Some(Shop::signed(&shop.whsec, now(), &body)), &body).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(gw.credits(&key).await["topup_remaining"], 5000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_auto_topup_is_paid_once_per_crossing() {
    let Some(shop) = Shop::open("autopay").await else { return };
    let gw = shop.gateway(shop.config()).await;
    let key = gw.account_with_key("auto", "fifty").await;
    buy(&shop, &gw, &key, "200", 200, CARD_OK).await; // 50 monthly + 200 top-up
    let res = gw.call(&key, "PUT", "/v1/credits/auto-topup", &[], &auto_topup_on(240)).await;
    assert_eq!(res.status, 200, "{}", res.text());

    spend(&gw, &key, 5).await; // 245: above the threshold
    spend(&gw, &key, 10).await; // 235: crossed, 200 bought at once
    assert_eq!(gw.credits(&key).await["remaining"], 435);
    let deadline = Instant::now() + Duration::from_secs(15);
    let paid = loop {
        let autos: Vec<Value> = shop
            .stripe
            .intents_of("auto")
            .await
            .into_iter()
            .filter(|pi| pi["metadata"]["creditgate_purpose"] == "auto_topup")
            .collect();
        if !autos.is_empty() {
            break autos;
        }
        assert!(Instant::now() < deadline, "no auto top-up payment within 15 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(paid.len(), 1);
    let pi = &paid[0];
    assert_eq!((pi["amount"].as_u64(), pi["status"].as_str()), (Some(1000), Some("succeeded")), "{pi}");
    let entries = ledger(&gw, "auto").await;
    let auto = entries.iter().find(|e| e["kind"] == "auto_topup").expect("an auto_topup entry");
    assert_eq!(pi["metadata"]["payment_ref"], auto["payment_ref"], "the payment is that top-up's");

    // No new crossing, no new payment; Stripe's own webhook for the auto payment adds nothing.
    spend(&gw, &key, 5).await;
    tokio::time::sleep(Duration::from_millis(2500)).await; // notifier rounds and localstripe's 1 s webhook delay
    let autos = shop.stripe.intents_of("auto").await;
    assert_eq!(autos.iter().filter(|pi| pi["metadata"]["creditgate_purpose"] == "auto_topup").count(), 1);
    let c = gw.credits(&key).await;
    assert_eq!((c["remaining"].as_u64(), c["auto_topup"]["enabled"].as_bool()), (Some(430), Some(true)));
    assert!(!ledger(&gw, "auto").await.iter().any(|e| e["kind"] == "auto_topup_reversed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_declined_auto_topup_is_taken_back_and_switches_auto_topup_off() {
    let Some(shop) = Shop::open("declined").await else { return };
    let hooks = WebhookReceiver::start().await;
    let var = format!("CG_EVENTS_{}", std::process::id());
    // SAFETY: a variable of this test's own, set before the gateway starts.
    unsafe { std::env::set_var(&var, "events-secret") };
    let config = shop
        .config()
        .notification(&format!("webhook_url = \"{}\"", hooks.url()))
        .notification(&format!("webhook_secret_env = \"{var}\""));
    let gw = shop.gateway(config).await;
    let key = gw.account_with_key("declined", "fifty").await;
    let first = buy(&shop, &gw, &key, "200", 200, CARD_OK).await;
    let res = gw.call(&key, "PUT", "/v1/credits/auto-topup", &[], &auto_topup_on(240)).await;
    assert_eq!(res.status, 200, "{}", res.text());
    // The customer changes their card in Stripe to one that attaches but cannot be charged.
    let customer = shop.stripe.ok("GET", &format!("/v1/payment_intents/{first}"), &[]).await["customer"]
        .as_str()
        .unwrap()
        .to_owned();
    let bad = shop.stripe.attached_card(&customer, CARD_DECLINED_LATER).await;
    shop.stripe
        .ok("POST", &format!("/v1/customers/{customer}"), &[("invoice_settings[default_payment_method]", &bad)])
        .await;

    spend(&gw, &key, 15).await; // 235: crossed, 200 credited at once
    let c =
        credits_until(&gw, &key, "the declined auto top-up to be taken back", |c| c["auto_topup"]["enabled"] == false)
            .await;
    assert_eq!((c["remaining"].as_u64(), c["topup_remaining"].as_u64()), (Some(235), Some(200)), "{c}");
    let entries = ledger(&gw, "declined").await;
    let bought = entries.iter().find(|e| e["kind"] == "auto_topup").expect("bought");
    let reversed = entries.iter().find(|e| e["kind"] == "auto_topup_reversed").expect("taken back");
    assert_eq!((&reversed["topup_delta"], &reversed["payment_ref"]), (&json!(-200), &bought["payment_ref"]));
    let events = hooks
        .wait_until(Duration::from_secs(15), "auto_topup.payment_failed", |d| {
            d.iter().any(|d| d.json()["type"] == "auto_topup.payment_failed")
        })
        .await;
    let event = events.iter().map(|d| d.json()).find(|e| e["type"] == "auto_topup.payment_failed").unwrap();
    assert_eq!((&event["data"]["taken_back"], &event["data"]["payment_ref"]), (&json!(200), &bought["payment_ref"]));
    assert!(event["data"]["reason"].as_str().is_some_and(|r| !r.is_empty()), "{event}");
    let autos: Vec<Value> = shop.stripe.intents_of("declined").await;
    let autos: Vec<&Value> = autos.iter().filter(|pi| pi["metadata"]["creditgate_purpose"] == "auto_topup").collect();
    assert_eq!(
        (autos.len(), autos[0]["payment_method"].as_str()),
        (1, Some(bad.as_str())),
        "one attempt, the default card"
    );

    // Off stays off: switching it on again needs a purchase with a card that works.
    let res = gw.call(&key, "PUT", "/v1/credits/auto-topup", &[], &auto_topup_on(240)).await;
    assert_eq!((res.status.as_u16(), res.error_type()), (402, "payment_method_required".into()), "{}", res.text());
    spend(&gw, &key, 10).await; // 225: below the threshold, but off: nothing bought
    assert_eq!(gw.credits(&key).await["remaining"], 225);
    buy(&shop, &gw, &key, "200", 200, CARD_OK).await; // 425, and the good card is the default again
    let res = gw.call(&key, "PUT", "/v1/credits/auto-topup", &[], &auto_topup_on(430)).await;
    assert_eq!(res.status, 200, "{}", res.text());
    spend(&gw, &key, 1).await; // switched on below the threshold: the next charge buys
    credits_until(&gw, &key, "the second auto top-up to be paid", |c| c["remaining"] == 624).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ledger(&gw, "declined")
        .await
        .iter()
        .any(|e| e["kind"] == "auto_topup" && e["payment_ref"] != bought["payment_ref"])
    {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let c = gw.credits(&key).await;
    assert_eq!((c["remaining"].as_u64(), c["auto_topup"]["enabled"].as_bool()), (Some(624), Some(true)), "paid: kept");
}

#[tokio::test]
async fn without_billing_stripe_top_ups_stay_admin_only() {
    let up = Upstream::echo().await;
    let gw = TestGateway::with_upstream(&up.url()).await;
    let key = gw.account_with_key("plain", "fifty").await;
    let res = gw.post(&key, CHECKOUT, &[], r#"{"package":"200"}"#).await;
    assert_eq!((res.status.as_u16(), res.error_type()), (404, "not_found".into()), "{}", res.text());
    let res = http::send("POST", &gw.url(WEBHOOK), &[("stripe-signature", "t=1,v1=00")], "{}").await;
    assert_eq!(res.status, 404);
    // Auto top-up is switched on without a card, as before: nothing to pay with.
    let res = gw.call(&key, "PUT", "/v1/credits/auto-topup", &[], &auto_topup_on(20)).await;
    assert_eq!(res.status, 200, "{}", res.text());
}

#[test]
fn a_stripe_section_whose_secret_is_not_set_refuses_to_start() {
    let text = ConfigBuilder::new("http://127.0.0.1:9").build()
        + "\n[billing.stripe]\nsecret_key_env = \"CG_UNSET_STRIPE_KEY\"\nwebhook_secret_env = \"CG_UNSET_WHSEC\"\n";
    let config = creditgate::config::Config::parse(&text).expect("the file itself is valid");
    let err = creditgate::state::Runtime::with_env(config, |_| None).err().expect("refused");
    assert_eq!(err.key, "billing.stripe.secret_key_env");
    assert!(err.reason.contains("CG_UNSET_STRIPE_KEY"), "{err}");
    for (line, key) in [
        ("currency = \"EUR\"", "billing.stripe.currency"),
        ("api_base = \"ftp://stripe\"", "billing.stripe.api_base"),
        ("webhook_tolerance_secs = 0", "billing.stripe.webhook_tolerance_secs"),
        ("setup_future_usage = \"always\"", "billing.stripe.setup_future_usage"),
    ] {
        let err = creditgate::config::Config::parse(&format!("{text}{line}\n")).expect_err(line);
        assert_eq!(err.key, key, "{line}: {err}");
    }
}

/// The dashboard's Buy flow in headless Chromium, up to where Stripe takes over: the top-up card
/// lists the four packages with their price per credit and a Buy button; Buy creates the payment
/// and mounts Stripe.js's card field (localstripe's), within the page's Content-Security-Policy.
/// Nothing is credited by that.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_buy_flow_hands_the_payment_to_stripe() {
    let Some(shop) = Shop::open("dashboard").await else { return };
    let gw = shop.gateway(shop.config()).await;
    let key = gw.account_with_key("page", "fifty").await;
    let mut browser = support::browser::Browser::start(1200, 1600);
    browser.open(&gw.url(&format!("/dashboard#key={key}")));
    browser.wait_until("!document.getElementById('link-key').classList.contains('hidden')");
    browser.click("link-key-confirm");
    browser.wait_until("document.querySelectorAll('#buy-packages tr').length === 4");
    let rows = browser
        .eval("[...document.querySelectorAll('#buy-packages tr')].map(r => r.innerText.replace(/\\s+/g, ' ').trim())");
    assert_eq!(
        rows,
        json!([
            "200 credits · €10 €0.05 per credit Buy",
            "500 credits · €20 €0.04 per credit Buy",
            "1,500 credits · €50 €0.0333 per credit Buy",
            "5,000 credits · €150 €0.03 per credit Buy",
        ])
    );
    browser.click("buy-500");
    browser.wait_until("document.querySelectorAll('#card-element input').length >= 4");
    assert_eq!(
        browser.eval("document.getElementById('checkout-summary').textContent"),
        json!("€20.00 for 500 credits: enter your card, Stripe takes the payment.")
    );
    let shown = browser.eval("document.getElementById('checkout').dataset.paymentIntent");
    let intents = shop.stripe.intents_of("page").await;
    assert_eq!(intents.len(), 1, "one payment started");
    assert_eq!((&intents[0]["id"], &intents[0]["metadata"]["package"]), (&shown, &json!("500")));
    let violations = browser.csp_violations();
    assert!(violations.is_empty(), "CSP violations in the Buy flow: {violations:?}");
    assert_eq!(gw.credits(&key).await["topup_remaining"], 0, "nothing credited before Stripe confirms");
    let png = browser.screenshot();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    let _ = std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(dir.join("dashboard-buy.png"), png));
}

/// Stripe's idempotency in front of localstripe (which has none): a request with an
/// `Idempotency-Key` seen before gets the first answer back, as Stripe does for 24 h. It records
/// every request, and can hold back its first off-session answer past the gateway's timeout (the
/// payment was made, the gateway never heard: a lost answer, as in a crash).
struct IdempotentStripe {
    url: String,
    seen: Seen,
}

/// Every request as (`METHOD path[ off_session]`, idempotency key).
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, Option<String>)>>>;

impl IdempotentStripe {
    async fn start(target: String, hold_first_off_session: Duration) -> Self {
        use std::collections::HashMap;
        use std::sync::Arc;
        type Answers = Arc<tokio::sync::Mutex<HashMap<String, (u16, bytes::Bytes)>>>;
        let seen: Seen = Arc::default();
        let answers: Answers = Arc::default();
        let held = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, target) = (seen.clone(), Arc::new(target));
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let (seen, answers, held, target) = (s.clone(), answers.clone(), held.clone(), target.clone());
            async move {
                let (parts, body) = req.into_parts();
                let body = http_body_util::BodyExt::collect(body).await.unwrap().to_bytes();
                let header = |n: &str| parts.headers.get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
                let key = header("idempotency-key");
                let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
                let off_session = String::from_utf8_lossy(&body).contains("off_session=true");
                let what = format!("{} {path}{}", parts.method, if off_session { " off_session" } else { "" });
                seen.lock().unwrap().push((what, key.clone()));
                // One request per key at a time, like Stripe; a repeat gets the first answer.
                let mut answers = answers.lock().await;
                if let Some((status, body)) = key.as_ref().and_then(|k| answers.get(k)) {
                    return (::http::StatusCode::from_u16(*status).unwrap(), body.clone());
                }
                let headers: Vec<(String, String)> = ["authorization", "content-type"]
                    .iter()
                    .filter_map(|n| Some((n.to_string(), header(n)?)))
                    .collect();
                let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let res = http::send(parts.method.as_str(), &format!("{target}{path}"), &headers, body.clone()).await;
                if let Some(k) = key {
                    answers.insert(k, (res.status.as_u16(), res.body.clone()));
                }
                drop(answers);
                if off_session && !held.swap(true, Ordering::SeqCst) {
                    tokio::time::sleep(hold_first_off_session).await;
                }
                (res.status, res.body)
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        IdempotentStripe { url, seen }
    }

    /// The off-session payments asked for, with their idempotency keys.
    fn off_session_keys(&self) -> Vec<Option<String>> {
        let seen = self.seen.lock().unwrap();
        seen.iter().filter(|(what, _)| what == "POST /v1/payment_intents off_session").map(|(_, k)| k.clone()).collect()
    }
}

/// The auto top-up's payment is made but its answer is lost (the gateway times out, as after a
/// crash): the notifier tries again with the same idempotency key — the top-up's `payment_ref` —
/// so Stripe answers with the first payment and the card is charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_answer_is_retried_under_the_same_key_and_charges_once() {
    let Some(shop) = Shop::open("lost").await else { return };
    let proxy = IdempotentStripe::start(shop.stripe.url(), Duration::from_secs(3)).await;
    let config = shop.config().extra("timeout_ms = 1000\n");
    let text = config
        .build()
        .replace(&format!("api_base = \"{}\"", shop.stripe.url()), &format!("api_base = \"{}\"", proxy.url));
    let gw = TestGateway::start(&text).await;
    shop.stripe.send_events_to(&gw.url(WEBHOOK), &shop.whsec).await;
    let key = gw.account_with_key("lost", "fifty").await;
    buy(&shop, &gw, &key, "200", 200, CARD_OK).await;
    let res = gw.call(&key, "PUT", "/v1/credits/auto-topup", &[], &auto_topup_on(240)).await;
    assert_eq!(res.status, 200, "{}", res.text());
    // Stripe's own webhook for the payment is late (here: never comes), so only the retry can
    // settle it.
    shop.stripe.send_events_to(&support::upstream::refused_url(), &shop.whsec).await;
    spend(&gw, &key, 15).await; // crossed: 200 credited at once, then paid off-session
    let payment_ref = {
        let entries = ledger(&gw, "lost").await;
        entries.iter().find(|e| e["kind"] == "auto_topup").expect("bought")["payment_ref"].as_str().unwrap().to_owned()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while proxy.off_session_keys().len() < 2 {
        assert!(Instant::now() < deadline, "no second attempt after the lost answer: {:?}", proxy.off_session_keys());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let keys = proxy.off_session_keys();
    assert!(
        keys.iter().all(|k| k.as_deref() == Some(payment_ref.as_str())),
        "every attempt under {payment_ref}: {keys:?}"
    );
    let autos: Vec<Value> = shop.stripe.intents_of("lost").await;
    let autos: Vec<&Value> = autos.iter().filter(|pi| pi["metadata"]["creditgate_purpose"] == "auto_topup").collect();
    assert_eq!(autos.len(), 1, "charged once: {autos:?}");
    assert_eq!(autos[0]["status"], "succeeded");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let c = gw.credits(&key).await;
    assert_eq!((c["remaining"].as_u64(), c["auto_topup"]["enabled"].as_bool()), (Some(435), Some(true)), "paid: kept");
}
