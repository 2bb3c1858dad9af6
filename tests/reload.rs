//! Config reload of a running `creditgate serve`: a changed file (and SIGHUP) swaps prices in
//! atomically; a bad new config is rejected and the old one stays in force.

mod support;

use std::time::Duration;

use serde_json::json;
use support::gateway::{ADMIN_TOKEN, ConfigBuilder};
use support::http;
use support::process::GatewayProcess;
use support::upstream::Upstream;

async fn fast_chat_cost(base: &str, key: &str) -> u64 {
    let auth = format!("Bearer {key}");
    let res = http::send(
        "POST",
        &format!("{base}/v1/chat/completions"),
        &[("authorization", &auth), ("x-ai-tier", "fast")],
        "{}",
    )
    .await;
    assert_eq!(res.status, 200, "{}", res.text());
    res.charged()
}

/// Sends fast chats until one costs `cost` (the reload is polled once a second); bounded.
async fn wait_for_cost(base: &str, key: &str, cost: u64) -> bool {
    for _ in 0..50 {
        if fast_chat_cost(base, key).await == cost {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

#[tokio::test]
async fn prices_reload_from_the_file_and_a_bad_file_is_rejected() {
    let up = Upstream::echo().await;
    let config = ConfigBuilder::new(&up.url()).build();
    let gw = GatewayProcess::start(&config).await;
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let admin = |path: &str| format!("{}{path}", gw.admin);
    let res = http::send(
        "POST",
        &admin("/admin/v1/accounts"),
        &[("authorization", &auth)],
        json!({"id": "acme", "plan": "big"}).to_string(),
    )
    .await;
    assert_eq!(res.status, 201);
    let res =
        http::send("POST", &admin("/admin/v1/accounts/acme/keys"), &[("authorization", &auth)], r#"{"role":"user"}"#)
            .await;
    let key = res.json()["key"].as_str().unwrap().to_owned();
    assert_eq!(fast_chat_cost(&gw.public, &key).await, 1);

    // A new price in the file takes effect without a restart.
    let path = gw.config_path();
    let current = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, current.replacen("fast = 1,", "fast = 2,", 1)).unwrap();
    assert!(wait_for_cost(&gw.public, &key, 2).await, "the changed file was reloaded");

    // A broken file is rejected: the old config (fast = 2) stays in force.
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, good.replacen("fast = 2,", "fast = 0,", 1)).unwrap();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(fast_chat_cost(&gw.public, &key).await, 2, "a bad config never replaces a good one");

    // SIGHUP reloads too (file fixed again, with another price). The new file keeps the old one's
    // modification time, so the file watcher cannot be what reloads it: only the signal can.
    let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
    let staged = path.with_extension("staged");
    std::fs::write(&staged, good.replacen("fast = 2,", "fast = 4,", 1)).unwrap();
    std::fs::File::options().write(true).open(&staged).unwrap().set_modified(modified).unwrap();
    std::fs::rename(&staged, &path).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), modified);
    gw.signal("HUP");
    assert!(wait_for_cost(&gw.public, &key, 4).await, "SIGHUP reloaded");
}

/// What a customer agreed to when switching auto top-up on is what a purchase may cost: after a
/// reload that changes the package, the crossing buys nothing, switches the setting off and
/// says so in an event.
#[tokio::test]
async fn auto_topup_after_a_reload_that_changed_its_package_buys_nothing() {
    let up = Upstream::echo().await;
    let gw = GatewayProcess::start(&ConfigBuilder::new(&up.url()).build()).await;
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let admin = |path: &str| format!("{}{path}", gw.admin);
    let body = json!({"id": "acme", "plan": "fifty"}).to_string();
    assert_eq!(http::send("POST", &admin("/admin/v1/accounts"), &[("authorization", &auth)], body).await.status, 201);
    let res =
        http::send("POST", &admin("/admin/v1/accounts/acme/keys"), &[("authorization", &auth)], r#"{"role":"user"}"#)
            .await;
    let key = res.json()["key"].as_str().unwrap().to_owned();
    let customer = format!("Bearer {key}");
    let setting = json!({"enabled": true, "threshold": 20, "package": "200"}).to_string();
    let res =
        http::send("PUT", &format!("{}/v1/credits/auto-topup", gw.public), &[("authorization", &customer)], setting)
            .await;
    assert_eq!(res.status, 200, "{}", res.text());

    // The operator doubles the package's price; the customer saved it at €10.
    let path = gw.config_path();
    let current = std::fs::read_to_string(&path).unwrap();
    let changed = "\"200\" = { credits = 200, price_eur = 20 }";
    std::fs::write(&path, current.replacen("\"200\" = { credits = 200, price_eur = 10 }", changed, 1)).unwrap();
    gw.signal("HUP");
    let mut reloaded = false;
    for _ in 0..50 {
        let packages =
            http::send("GET", &format!("{}/v1/credits/packages", gw.public), &[("authorization", &customer)], "")
                .await
                .json();
        let package = packages["packages"].as_array().unwrap().iter().find(|p| p["package"] == "200").cloned();
        if package.is_some_and(|p| p["price_eur"].as_f64() == Some(20.0)) {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reloaded, "the new package price is in force");

    // 50 → 10 crosses the threshold of 20: nothing bought at a price never agreed to.
    let spend = json!({"leads": (0..40).collect::<Vec<_>>()}).to_string();
    let res =
        http::send("POST", &format!("{}/v1/leads/enrich", gw.public), &[("authorization", &customer)], spend).await;
    assert_eq!((res.status.as_u16(), res.charged(), res.header("x-credits-auto-topup")), (200, 40, None));
    let credits =
        http::send("GET", &format!("{}/v1/credits", gw.public), &[("authorization", &customer)], "").await.json();
    assert_eq!((credits["remaining"].as_u64(), credits["auto_topup"]["enabled"].as_bool()), (Some(10), Some(false)));
}
