//! The admin listener through a real gateway (SPEC §5): the token, accounts, keys, top-ups, and
//! how top-up credits are spent after the monthly bucket.

mod support;

use serde_json::{Value, json};
use support::gateway::{ADMIN_TOKEN, TestGateway};
use support::http;
use support::upstream::{Behaviour, Upstream};

async fn gateway() -> (TestGateway, Upstream) {
    let up = Upstream::echo().await;
    let gw = TestGateway::with_upstream(&up.url()).await;
    (gw, up)
}

fn is_key(k: &str) -> bool {
    k.strip_prefix("cg_").is_some_and(|rest| rest.len() >= 32 && rest.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// Days in `month` of `year`.
fn days_in_month(year: i32, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        _ => 28,
    }
}

/// (year, month, day, time) of an RFC 3339 UTC time `YYYY-MM-DDTHH:MM:SSZ`.
fn ymd(t: &Value) -> (i32, u32, u32, String) {
    let s = t.as_str().unwrap_or_else(|| panic!("not a time string: {t}"));
    let (date, time) = s.split_once('T').unwrap_or_else(|| panic!("not RFC 3339: {s}"));
    let mut p = date.split('-').map(|x| x.parse::<u32>().unwrap());
    let (y, m, d) = (p.next().unwrap() as i32, p.next().unwrap(), p.next().unwrap());
    (y, m, d, time.to_owned())
}

// === the token ===

#[tokio::test]
async fn admin_routes_need_the_admin_token() {
    let (gw, _up) = gateway().await;
    let api_key = gw.account_with_key("acme", "pro").await;
    let body = json!({"id": "intruder", "plan": "pro"}).to_string();
    let url = format!("{}/admin/v1/accounts", gw.admin);
    let api_auth = format!("Bearer {api_key}");
    for auth in [None, Some("Bearer wrong-token"), Some(api_auth.as_str()), Some(ADMIN_TOKEN)] {
        let mut headers = vec![("content-type", "application/json")];
        if let Some(a) = auth {
            headers.push(("authorization", a));
        }
        let res = http::send("POST", &url, &headers, body.clone()).await;
        assert_eq!(res.status, 401, "{auth:?}: {}", res.text());
        assert_eq!(res.error_type(), "unauthorized");
        let res = http::send("GET", &format!("{}/admin/v1/accounts/acme", gw.admin), &headers, "").await;
        assert_eq!(res.status, 401, "{auth:?}: {}", res.text());
    }
    let res = gw.admin_call("GET", "/admin/v1/accounts/intruder", None).await;
    assert_eq!(res.status, 404, "no account was created without the token");
    // Probes need no token.
    let res = http::send("GET", &format!("{}/healthz", gw.admin), &[], "").await;
    assert_eq!(res.status, 200);
    // The admin API is not on the public listener.
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let res = http::send("GET", &gw.url("/admin/v1/accounts/acme"), &[("authorization", &auth)], "").await;
    assert_eq!(res.status, 401, "{}", res.text());
}

// === accounts ===

#[tokio::test]
async fn create_and_read_accounts() {
    let (gw, _up) = gateway().await;
    let v = gw.create_account("acme", "pro").await;
    assert_eq!(v["id"], "acme");
    assert_eq!(v["plan"], "pro");
    assert_eq!(v["allocation"], 2000);
    assert_eq!(v["monthly_remaining"], 2000);
    assert_eq!(v["topup_remaining"], 0);
    assert_eq!(v["remaining"], 2000);
    assert_eq!(v["used_this_period"], 0);
    assert!(v["renews_at"].is_string() && v["period_start"].is_string(), "{v}");

    let res = gw.admin_call("GET", "/admin/v1/accounts/acme", None).await;
    assert_eq!(res.status, 200);
    let read = res.json();
    for field in ["id", "plan", "allocation", "remaining", "renews_at", "period_start"] {
        assert_eq!(read[field], v[field], "{field}");
    }
    for field in ["email", "pending_plan", "queue_depth", "messages_left", "low"] {
        assert!(read.get(field).is_some(), "GET account lacks {field}: {read}");
    }
    assert_eq!(read["messages_left"], json!({"fast": 2000, "balanced": 666, "powerful": 400}));

    let res = gw.admin_call("GET", "/admin/v1/accounts/nobody", None).await;
    assert_eq!(res.status, 404);
    assert_eq!(res.error_type(), "not_found");
}

#[tokio::test]
async fn account_creation_errors() {
    let (gw, _up) = gateway().await;
    gw.create_account("acme", "starter").await;
    let res = gw.admin_call("POST", "/admin/v1/accounts", Some(json!({"id": "acme", "plan": "pro"}))).await;
    assert_eq!(res.status, 409, "duplicate: {}", res.text());
    res.error_type();
    let read = gw.admin_call("GET", "/admin/v1/accounts/acme", None).await.json();
    assert_eq!(read["plan"], "starter", "the first account is untouched");

    for (body, what) in [
        (json!({"id": "b1", "plan": "platinum"}), "platinum"),
        (json!({"id": "b2", "plan": "pro", "billing_anchor": "next tuesday"}), "billing_anchor"),
        (json!({"id": "b3", "plan": "pro", "billing_anchor": "2026-02-30T00:00:00Z"}), "billing_anchor"),
        (json!({"plan": "pro"}), "id"),
        (json!({"id": "has space", "plan": "pro"}), "id"),
        (json!({"id": "b4", "plan": "pro", "email": "not-an-address"}), "not-an-address"),
    ] {
        let res = gw.admin_call("POST", "/admin/v1/accounts", Some(body.clone())).await;
        assert_eq!(res.status, 400, "{body}: {}", res.text());
        assert_eq!(res.error_type(), "bad_request");
        assert!(res.text().to_lowercase().contains(what), "{body}: the message names {what}: {}", res.text());
    }
    for id in ["b1", "b2", "b3", "b4"] {
        assert_eq!(gw.admin_call("GET", &format!("/admin/v1/accounts/{id}"), None).await.status, 404);
    }
}

/// Bodies are JSON objects: an array of field values (which serde would read as the fields in
/// order) is refused, not taken as `{"id", "plan"}` or as a PATCH that changes nothing.
/// (Found by schemathesis, tests/openapi.rs.)
#[tokio::test]
async fn bodies_that_are_not_json_objects_are_refused() {
    let (gw, _up) = gateway().await;
    gw.create_account("acme", "starter").await;
    for (method, path, body) in [
        ("POST", "/admin/v1/accounts", json!(["b5", "pro", null, null])),
        ("PATCH", "/admin/v1/accounts/acme", json!([null, null])),
        ("PATCH", "/admin/v1/accounts/acme", json!(["pro", null])),
        ("POST", "/admin/v1/accounts/acme/keys", json!(["user"])),
        ("POST", "/admin/v1/accounts/acme/topups", json!([null, 10, "ref-1"])),
        ("PUT", "/admin/v1/accounts/acme/auto-topup", json!([false, null, null])),
    ] {
        let res = gw.admin_call(method, path, Some(body.clone())).await;
        assert_eq!(res.status, 400, "{method} {path} {body}: {}", res.text());
        assert_eq!(res.error_type(), "bad_request");
    }
    assert_eq!(gw.admin_call("GET", "/admin/v1/accounts/b5", None).await.status, 404);
    let acme = gw.admin_call("GET", "/admin/v1/accounts/acme", None).await.json();
    assert_eq!(acme["plan"], "starter");
    assert_eq!(acme["topup_remaining"], 0);
    let keys = gw.admin_call("GET", "/admin/v1/accounts/acme/keys", None).await.json();
    assert_eq!(keys["keys"], json!([]));
}

#[tokio::test]
async fn billing_anchor_and_email_are_kept() {
    let (gw, _up) = gateway().await;
    let body = json!({"id": "eom", "plan": "starter", "billing_anchor": "2024-01-31T09:30:00Z", "email": "a@b.io"});
    let res = gw.admin_call("POST", "/admin/v1/accounts", Some(body)).await;
    assert_eq!(res.status, 201, "{}", res.text());
    let v = res.json();
    assert_eq!(v["email"], "a@b.io");
    // Periods start on the 31st, or the last day of shorter months, at the anchor's time.
    for field in ["period_start", "renews_at"] {
        let (y, m, d, time) = ymd(&v[field]);
        assert_eq!(d, days_in_month(y, m).min(31), "{field} = {}", v[field]);
        assert_eq!(time, "09:30:00Z", "{field} = {}", v[field]);
    }
    assert_ne!(v["period_start"], v["renews_at"]);
}

// === keys ===

#[tokio::test]
async fn create_keys() {
    let (gw, _up) = gateway().await;
    gw.create_account("acme", "pro").await;
    let mut seen = Vec::new();
    for role in ["user", "system"] {
        let res = gw.admin_call("POST", "/admin/v1/accounts/acme/keys", Some(json!({"role": role}))).await;
        assert_eq!(res.status, 201, "{}", res.text());
        let v = res.json();
        assert_eq!(v["role"], role);
        let key = v["key"].as_str().expect("key");
        assert!(is_key(key), "key shape: {key}");
        assert!(v["key_id"].as_str().is_some_and(|id| !id.is_empty() && !id.contains(&key[3..])), "{v}");
        assert_eq!(gw.credits(key).await["plan"], "pro", "the new key works");
        seen.push(key.to_owned());
    }
    assert_ne!(seen[0], seen[1]);

    let res = gw.admin_call("POST", "/admin/v1/accounts/nobody/keys", Some(json!({"role": "user"}))).await;
    assert_eq!(res.status, 404, "{}", res.text());
    assert_eq!(res.error_type(), "not_found");
    let res = gw.admin_call("POST", "/admin/v1/accounts/acme/keys", Some(json!({"role": "admin"}))).await;
    assert_eq!(res.status, 400, "{}", res.text());
    assert_eq!(res.error_type(), "bad_request");
}

// === top-ups ===

#[tokio::test]
async fn topups_by_package_and_by_credits_are_idempotent_by_payment_ref() {
    let (gw, _up) = gateway().await;
    let key = gw.account_with_key("acme", "pro").await;

    let path = "/admin/v1/accounts/acme/topups";
    let res = gw.admin_call("POST", path, Some(json!({"package": "200", "payment_ref": "pay_1"}))).await;
    assert_eq!(res.status, 201, "{}", res.text());
    let first = res.json();
    assert_eq!(first["credits"], 200);
    assert_eq!(first["topup_remaining"], 200);

    let res = gw.topup("acme", 75, "pay_2").await;
    assert_eq!(res.status, 201, "{}", res.text());
    assert_eq!(res.json()["credits"], 75);
    assert_eq!(res.json()["topup_remaining"], 275);

    // The same payment reference again: 200 with the first result, nothing added — also when
    // the retry names something else.
    let res = gw.admin_call("POST", path, Some(json!({"package": "200", "payment_ref": "pay_1"}))).await;
    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(res.json(), first);
    let res = gw.topup("acme", 999, "pay_1").await;
    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(res.json(), first);

    let credits = gw.credits(&key).await;
    assert_eq!(credits["topup_remaining"], 275);
    assert_eq!(credits["monthly_remaining"], 2000);
    assert_eq!(credits["remaining"], 2275);

    for body in [
        json!({"package": "300", "payment_ref": "pay_3"}),
        json!({"payment_ref": "pay_4"}),
        json!({"package": "200", "credits": 5, "payment_ref": "pay_5"}),
        json!({"credits": 0, "payment_ref": "pay_6"}),
        json!({"credits": 10, "payment_ref": ""}),
    ] {
        let res = gw.admin_call("POST", path, Some(body.clone())).await;
        assert_eq!(res.status, 400, "{body}: {}", res.text());
        assert_eq!(res.error_type(), "bad_request");
    }
    assert_eq!(gw.topup("nobody", 10, "pay_7").await.status, 404);
    assert_eq!(gw.remaining(&key).await, 2275, "refused top-ups added nothing");
}

#[tokio::test]
async fn topup_credits_are_spent_only_after_the_monthly_bucket() {
    let (gw, up) = gateway().await;
    let key = gw.account_with_key("acme", "fifty").await;
    assert_eq!(gw.topup("acme", 10, "pay_1").await.status, 201);

    // 49 credits: all from the monthly bucket, top-ups untouched.
    let leads: Vec<String> = (0..49).map(|i| i.to_string()).collect();
    let res = gw.post(&key, "/v1/leads/enrich", &[], &format!(r#"{{"leads":[{}]}}"#, leads.join(","))).await;
    assert_eq!((res.status.as_u16(), res.charged()), (200, 49), "{}", res.text());
    let c = gw.credits(&key).await;
    assert_eq!((c["monthly_remaining"].as_u64(), c["topup_remaining"].as_u64()), (Some(1), Some(10)), "{c}");

    // A split charge whose upstream fails goes back to both buckets.
    up.set(Behaviour::Status(500));
    let res = gw.post(&key, "/v1/chat/completions", &[("x-ai-tier", "powerful")], "{}").await;
    assert_eq!((res.status.as_u16(), res.charged()), (500, 0));
    let c = gw.credits(&key).await;
    assert_eq!((c["monthly_remaining"].as_u64(), c["topup_remaining"].as_u64()), (Some(1), Some(10)), "{c}");

    // 5 credits with 1 left in the month: 1 from the month, 4 from top-ups.
    up.set(Behaviour::Echo);
    let res = gw.post(&key, "/v1/chat/completions", &[("x-ai-tier", "powerful")], "{}").await;
    assert_eq!((res.status.as_u16(), res.charged()), (200, 5), "{}", res.text());
    assert_eq!(res.header("x-credits-remaining"), Some("6"));
    let c = gw.credits(&key).await;
    assert_eq!((c["monthly_remaining"].as_u64(), c["topup_remaining"].as_u64()), (Some(0), Some(6)), "{c}");
    assert_eq!(c["remaining"], 6);

    // Then top-ups alone, down to the last credit.
    for _ in 0..6 {
        assert_eq!(gw.post(&key, "/v1/sentiment", &[], "{}").await.charged(), 1);
    }
    let res = gw.post(&key, "/v1/sentiment", &[], "{}").await;
    assert_eq!(res.status, 402);
    assert_eq!(res.error_type(), "no_credits");
    let c = gw.credits(&key).await;
    assert_eq!((c["monthly_remaining"].as_u64(), c["topup_remaining"].as_u64()), (Some(0), Some(0)), "{c}");
}
