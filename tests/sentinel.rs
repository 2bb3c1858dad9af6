//! `store.kind = "redis-sentinel"`: the gateway asks Redis Sentinel for the primary, and after a
//! failover (the primary killed, its replica promoted) follows the new one without a restart.

mod support;

use std::time::{Duration, Instant};

use support::gateway::{ConfigBuilder, TestGateway, leads};
use support::sentinel::{MASTER_NAME, SentinelSetup};
use support::upstream::Upstream;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_gateway_follows_a_sentinel_failover_and_the_books_balance() {
    let mut redis = SentinelSetup::start();
    let up = Upstream::echo().await;
    let sentinels: Vec<String> = redis.urls().iter().map(|u| format!("\"{u}\"")).collect();
    let store =
        format!("kind = \"redis-sentinel\"\nsentinels = [{}]\nmaster_name = \"{MASTER_NAME}\"", sentinels.join(", "));
    let gw = TestGateway::start(&ConfigBuilder::new(&up.url()).store(&store).build()).await;
    let key = gw.account_with_key("ha", "big").await;
    let mut charged = 0;
    for n in 1..=10 {
        let res = gw.post(&key, "/v1/leads/enrich", &[], &leads(n)).await;
        assert_eq!(res.status, 200, "{}", res.text());
        charged += res.charged();
    }
    assert_eq!(charged, 55);
    let primary = redis.primary.as_ref().unwrap();
    assert_eq!(redis.primary_port(), Some(primary.port()));
    // Replication is asynchronous: wait until the replica has every write, so this test is about
    // following the failover (what an unsynced failover can lose is Redis's, see the README).
    assert_eq!(primary.command(&["WAIT", "1", "5000"]), "1");

    redis.fail_over();

    // The first requests may find the old primary gone (503 store_unavailable, bounded by
    // store.max_wait_ms); within a bounded time the gateway answers from the new one.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut refused = 0;
    loop {
        let res = gw.post(&key, "/v1/leads/enrich", &[], &leads(1)).await;
        if res.status == 200 {
            charged += res.charged();
            break;
        }
        assert_eq!(res.status, 503, "{}", res.text());
        assert!(res.header("x-credits-charged").is_none_or(|c| c == "0"), "a refused request is not charged");
        refused += 1;
        assert!(Instant::now() < deadline, "no metered answer 30 s after the failover ({refused} refused)");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for _ in 0..10 {
        let res = gw.post(&key, "/v1/leads/enrich", &[], &leads(2)).await;
        assert_eq!(res.status, 200, "after the failover: {}", res.text());
        charged += res.charged();
    }
    assert_eq!(charged, 76);
    // Every acknowledged charge is in the promoted replica's books, nothing twice.
    assert_eq!(gw.remaining(&key).await, 10_000 - 76);
    let ready = support::http::send("GET", &format!("{}/readyz", gw.admin), &[], "").await;
    assert_eq!(ready.status, 200, "{}", ready.text());
}

#[test]
fn a_sentinel_store_needs_its_sentinels_and_master_name() {
    let base = ConfigBuilder::new("http://127.0.0.1:9");
    for (store, key) in [
        ("kind = \"redis-sentinel\"\nmaster_name = \"m\"", "store.sentinels"),
        ("kind = \"redis-sentinel\"\nsentinels = []\nmaster_name = \"m\"", "store.sentinels"),
        ("kind = \"redis-sentinel\"\nsentinels = [\"http://127.0.0.1:1\"]\nmaster_name = \"m\"", "store.sentinels[0]"),
        ("kind = \"redis-sentinel\"\nsentinels = [\"redis://127.0.0.1:26379\"]", "store.master_name"),
        ("kind = \"redis\"\nurl = \"redis://127.0.0.1:1\"\nmaster_name = \"m\"", "store.master_name"),
    ] {
        let err = creditgate::config::Config::parse(&base.clone().store(store).build()).expect_err(store);
        assert_eq!(err.key, key, "{store}: {err}");
    }
}
