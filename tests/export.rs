//! Usage export: every ledger entry reaches `export.url` at least once as CloudEvents, through a
//! receiver that fails and comes back; the history is trimmed only past what was exported.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::gateway::{ConfigBuilder, leads, spend};
use support::http::{self, Response};
use support::process::{GatewayProcess, admin};
use support::receivers::WebhookReceiver;
use support::redis::RedisServer;
use support::stores::{Env, Store};
use support::upstream::{Behaviour, Upstream};

/// A fresh environment variable holding the export's HMAC key.
fn secret_var(test: &str) -> String {
    let var = format!("CREDITGATE_TEST_EXPORT_SECRET_{}_{}", test.to_ascii_uppercase(), std::process::id());
    // SAFETY: set once per test before the gateway reads it; no thread reads it concurrently.
    unsafe { std::env::set_var(&var, "export-secret") };
    var
}

/// Every CloudEvent the receiver accepted, by id (a resent batch counts once).
fn accepted_events(receiver: &WebhookReceiver) -> BTreeMap<String, Value> {
    let mut by_id = BTreeMap::new();
    for d in receiver.accepted() {
        assert_eq!(d.header("content-type"), Some("application/cloudevents-batch+json"));
        let sig = d.header("x-creditgate-signature").expect("signed");
        support::receivers::verify_webhook(b"export-secret", sig, &d.body, d.received_at)
            .unwrap_or_else(|e| panic!("{e}: {sig}"));
        for event in d.json().as_array().expect("a batch is a JSON array").clone() {
            let id = event["id"].as_str().expect("an id").to_owned();
            if let Some(seen) = by_id.insert(id.clone(), event.clone()) {
                assert_eq!(seen, event, "a resent event {id} is the same event");
            }
        }
    }
    by_id
}

async fn every_entry_is_exported_once_the_receiver_takes_it(store: Store) {
    let receiver = WebhookReceiver::start().await;
    receiver.set_status(503);
    let var = secret_var(&format!("{store:?}"));
    let env = Env::with(store, |b| {
        b.extra(&format!(
            "[export]\nurl = \"{}\"\nsecret_env = \"{var}\"\nmax_backoff_ms = 300\n\n[history]\nmax_entries = 5\n",
            receiver.url()
        ))
    })
    .await;
    let gw = &env.gw;
    let key = gw.account_with_key("acme", "big").await;
    for _ in 0..20 {
        spend(gw, &key, 1).await;
    }
    // The receiver is down: nothing is exported, so nothing may be trimmed.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(!receiver.deliveries().is_empty(), "the exporter tried");
    let ledger = gw.admin_call("GET", "/admin/v1/accounts/acme/ledger?limit=100", None).await.json();
    assert_eq!(ledger["entries"].as_array().unwrap().len(), 21, "created + 20 charges, all kept: {ledger}");
    // Back up: every entry arrives, none invented.
    receiver.set_status(200);
    let mut events = BTreeMap::new();
    for _ in 0..200 {
        events = accepted_events(&receiver);
        if events.len() >= 21 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ids: Vec<&String> = events.keys().collect();
    let expected: Vec<String> = (1..=21).map(|seq| format!("acme:{seq}")).collect();
    let mut expected_sorted = expected.clone();
    expected_sorted.sort();
    assert_eq!(ids, expected_sorted.iter().collect::<Vec<_>>(), "every entry once, none invented");
    let first = &events["acme:1"];
    assert_eq!((first["specversion"].as_str(), first["type"].as_str()), (Some("1.0"), Some("creditgate.created")));
    assert_eq!((first["subject"].as_str(), first["source"].as_str()), (Some("acme"), Some("creditgate")));
    let charge = &events["acme:2"];
    assert_eq!(
        (charge["type"].as_str(), charge["data"]["monthly_delta"].as_i64()),
        (Some("creditgate.charge"), Some(-1))
    );
    // Exported, the history may now be trimmed (at the next entry).
    spend(gw, &key, 1).await;
    let ledger = gw.admin_call("GET", "/admin/v1/accounts/acme/ledger?limit=100", None).await.json();
    assert_eq!(ledger["entries"].as_array().unwrap().len(), 5, "{ledger}");
}

on_both_stores!(every_entry_is_exported_once_the_receiver_takes_it);

/// A metered request through a gateway process; panics unless it answers `status`.
async fn metered(gw: &GatewayProcess, key: &str, path: &str, body: String, status: u16) -> Response {
    let auth = format!("Bearer {key}");
    let headers = [("authorization", auth.as_str()), ("content-type", "application/json"), ("x-ai-tier", "fast")];
    let res = http::send("POST", &format!("{}{path}", gw.public), &headers, body).await;
    assert_eq!(res.status, status, "{path}: {}", res.text());
    res
}

/// Export through everything that can go wrong on the way, on Redis: the receiver is not there
/// (connection refused), then comes up on the same port but answers slowly, and the gateway is
/// killed (SIGKILL) mid-export — a batch delivered and never acknowledged — and started again.
/// The traffic writes every kind of entry: account creation, charges, a failed request refunded
/// (upstream 502), an admin top-up, an auto top-up, a plan change and a renewal. Every entry of
/// the ledger arrives at least once (deduped by `id`), identical each time, none is invented, and
/// each kind appears as its CloudEvents `type`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_entry_is_exported_through_a_vanishing_receiver_and_a_killed_gateway() {
    let redis = RedisServer::start();
    let up = Upstream::echo().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let var = secret_var("killed");
    let config = ConfigBuilder::new(&up.url())
        .store(&format!("kind = \"redis\"\nurl = \"{}\"", redis.url()))
        .extra(&format!(
            "[export]\nurl = \"http://127.0.0.1:{port}/hooks\"\nsecret_env = \"{var}\"\nmax_backoff_ms = 300\nbatch_size = 1\n"
        ))
        .build();
    // The child inherits the secret's variable, set in this process.
    let mut gw = GatewayProcess::start(&config).await;

    // The account renews 8 s from now, after the restart below.
    let anchor = creditgate::calendar::now() + 8;
    let body = json!({"id": "acme", "plan": "fifty", "billing_anchor": creditgate::calendar::rfc3339(anchor)});
    assert_eq!(admin(&gw.admin, "POST", "/admin/v1/accounts", Some(body)).await.status, 201);
    let res = admin(&gw.admin, "POST", "/admin/v1/accounts/acme/keys", Some(json!({"role": "user"}))).await;
    let key = res.json()["key"].as_str().expect("a key").to_owned();
    let auto = json!({"enabled": true, "threshold": 20, "package": "200"});
    assert_eq!(admin(&gw.admin, "PUT", "/admin/v1/accounts/acme/auto-topup", Some(auto)).await.status, 200);
    metered(&gw, &key, "/v1/leads/enrich", leads(10), 200).await; // charge: 40 left
    up.set(Behaviour::Status(502));
    metered(&gw, &key, "/v1/chat/completions", "{}".into(), 502).await; // charge, refund
    up.set(Behaviour::Echo);
    let topup = json!({"credits": 10, "payment_ref": "pay-1"});
    assert_eq!(admin(&gw.admin, "POST", "/admin/v1/accounts/acme/topups", Some(topup)).await.status, 201);
    let res = metered(&gw, &key, "/v1/leads/enrich", leads(35), 200).await; // 50 → 15: auto top-up
    assert_eq!(res.header("x-credits-auto-topup"), Some("200"), "{:?}", res.headers);
    let plan = json!({"plan": "big"});
    assert_eq!(admin(&gw.admin, "PATCH", "/admin/v1/accounts/acme", Some(plan)).await.status, 200);

    // Nothing listens on the port yet: every attempt is refused. Then a slow receiver comes up
    // there, and the gateway is killed while batches are still going out.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let failures = metric(&gw.admin, "creditgate_export_failures_total").await;
    assert!(failures >= 1, "the exporter tried and was refused ({failures} failures)");
    let pending = metric(&gw.admin, "creditgate_export_pending_entries").await;
    assert!(pending >= 1, "the unexported entries are visible ({pending})");
    let receiver = WebhookReceiver::start_on(port).await;
    receiver.set_delay(Duration::from_millis(300));
    receiver.wait_until(Duration::from_secs(10), "a first batch", |got| got.len() >= 2).await;
    gw.kill();
    let delivered_before_kill = accepted_events(&receiver).len();

    // Started again (new ports, same store), the gateway carries on; more traffic meanwhile,
    // after the anchor, so the account renews.
    receiver.set_delay(Duration::ZERO);
    let gw = GatewayProcess::start(&config).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while creditgate::calendar::now() <= anchor {
        assert!(Instant::now() < deadline, "the anchor never came");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    metered(&gw, &key, "/v1/leads/enrich", leads(1), 200).await; // renewal, charge

    let history = admin(&gw.admin, "GET", "/admin/v1/accounts/acme/ledger?limit=500", None).await.json();
    let entries = history["entries"].as_array().expect("entries").clone();
    let kinds: BTreeMap<String, String> = entries
        .iter()
        .map(|e| (format!("acme:{}", e["seq"]), format!("creditgate.{}", e["kind"].as_str().unwrap())))
        .collect();
    assert_eq!(entries.len() as u64, entries[0]["seq"].as_u64().unwrap(), "the whole history, no seq missing");
    for _ in 0..300 {
        if accepted_events(&receiver).len() >= kinds.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1_000)).await; // anything more would be invented
    let events = accepted_events(&receiver);
    let exported: BTreeMap<String, String> =
        events.iter().map(|(id, e)| (id.clone(), e["type"].as_str().unwrap().to_owned())).collect();
    assert_eq!(exported, kinds, "every entry exported as its kind, none invented");
    for (id, e) in &events {
        assert_eq!(format!("acme:{}", e["data"]["seq"]), *id, "{e}");
    }
    let types: BTreeSet<&str> = exported.values().map(String::as_str).collect();
    for kind in ["charge", "refund", "topup", "auto_topup", "plan_change", "renewal"] {
        assert!(types.contains(format!("creditgate.{kind}").as_str()), "no {kind} in {types:?}");
    }
    assert!(
        delivered_before_kill < kinds.len(),
        "the gateway was killed mid-export ({delivered_before_kill} of {} delivered)",
        kinds.len()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&gw.admin, "creditgate_export_pending_entries").await > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metric(&gw.admin, "creditgate_export_pending_entries").await, 0, "nothing left to export");
}

/// An unlabelled sample of a gateway's `/metrics`, 0 when absent.
async fn metric(admin_base: &str, name: &str) -> u64 {
    let text = http::send("GET", &format!("{admin_base}/metrics"), &[], "").await.text();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0, |v| v.trim().parse::<f64>().expect("a number") as u64)
}
