//! Usage export: every ledger entry reaches `export.url` at least once as CloudEvents, through a
//! receiver that fails and comes back; the history is trimmed only past what was exported.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use support::gateway::spend;
use support::receivers::WebhookReceiver;
use support::stores::{Env, Store};

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
