//! `contrib/grafana/creditgate.json` queries only metrics the gateway exports: every
//! `creditgate_…` name in a panel's query is found in a live gateway's `/metrics`.

mod support;

use serde_json::Value;
use support::gateway::{ConfigBuilder, TestGateway, leads, spend};
use support::http;
use support::upstream::{Behaviour, Upstream};

const DASHBOARD: &str = include_str!("../contrib/grafana/creditgate.json");

/// Every `creditgate_…` metric name in the queries of `dashboard`'s panels.
fn queried(dashboard: &Value) -> Vec<String> {
    let mut names = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let expr = target["expr"].as_str().expect("every target has a PromQL expr");
            let mut rest = expr;
            while let Some(at) = rest.find("creditgate_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                names.push(name);
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

/// Whether `/metrics` text has a sample of `name` (a family with no samples yet is not listed at
/// all, so the test makes traffic that gives every family one).
fn exported(metrics: &str, name: &str) -> bool {
    metrics.lines().any(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with('{') || r.starts_with(' ')))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_exists() {
    let dashboard: Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    let names = queried(&dashboard);
    assert!(names.len() >= 15, "the dashboard queries {names:?}");
    for wanted in ["creditgate_requests_total", "creditgate_credits_charged_total", "creditgate_payment_required_total"]
    {
        assert!(names.iter().any(|n| n == wanted), "{wanted} is not on the dashboard: {names:?}");
    }
    // Traffic that makes every family have samples: a charge, a refund (a 5xx answer), a 402, and
    // a limiter cleanup pass.
    let up = Upstream::echo().await;
    let config = ConfigBuilder::new(&up.url()).rate_limit("cleanup_interval_ms = 100").build();
    let gw = TestGateway::start(&config).await;
    let key = gw.account_with_key("metrics", "fifty").await;
    spend(&gw, &key, 3).await;
    up.set(Behaviour::Status(500));
    let res = gw.post(&key, "/v1/leads/enrich", &[], &leads(2)).await;
    assert_eq!((res.status.as_u16(), res.charged()), (500, 0), "refunded");
    let res = gw.post(&key, "/v1/leads/enrich", &[], &leads(100)).await;
    assert_eq!(res.status, 402);
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let metrics = http::send("GET", &format!("{}/metrics", gw.admin), &[], "").await.text();
    let missing: Vec<&String> = names.iter().filter(|n| !exported(&metrics, n)).collect();
    assert!(missing.is_empty(), "queried by the dashboard but not in /metrics: {missing:?}");
    // The check itself can fail.
    assert!(!exported(&metrics, "creditgate_no_such_metric_total"));
    assert!(!exported(&metrics, "creditgate_requests"), "a family name alone is not a sample name");
}
