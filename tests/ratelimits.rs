//! Rate limits on every route a key can reach, tried as an attacker would: the customer API
//! hammered on a small plan, key scanners and admin-token guessers from one address, limiter
//! tables filled with 100,000 addresses, and clients that forge their own `X-Forwarded-For`.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ::http::{Request, StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use support::gateway::{ADMIN_TOKEN, ConfigBuilder, TestGateway};
use support::http::{self, Response};
use support::redis::RedisServer;
use support::upstream::Upstream;
use tokio::net::TcpSocket;

const CHAT: &str = "/v1/chat/completions";

/// A plan whose allowance is one request per second, so "spent" stays spent for a while.
const SLOW_PLAN: &str = "[plans.slow]\nmonthly_credits = 50\nrate_limit_per_second = 1";

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// A random key of the right shape that no account has.
fn unknown_key() -> String {
    format!("cg_{}", creditgate::auth::keys::random_alnum(40))
}

fn assert_rate_limited(res: &Response, what: &str) {
    assert_eq!(res.status, 429, "{what}: {}", res.text());
    assert_eq!(res.error_type(), "rate_limited", "{what}");
    let wait: u64 = res.header("retry-after").unwrap_or_else(|| panic!("{what}: no Retry-After")).parse().unwrap();
    assert!(wait >= 1, "{what}: Retry-After {wait}");
}

// === a keep-alive client with a chosen source address ===

/// One HTTP/1.1 connection from `local` (any 127.x.y.z works on Linux) to `server`.
struct Conn {
    send: http1::SendRequest<Full<Bytes>>,
}

impl Conn {
    async fn open(local: IpAddr, server: SocketAddr) -> Conn {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.bind(SocketAddr::new(local, 0)).unwrap_or_else(|e| panic!("bind {local}: {e}"));
        let tcp = socket.connect(server).await.expect("connect");
        let (send, conn) = http1::handshake(TokioIo::new(tcp)).await.expect("handshake");
        tokio::spawn(conn);
        Conn { send }
    }

    async fn send(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Response {
        let mut req = Request::builder().method(method).uri(path).header("host", "gateway.test");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::from(body.to_owned()))).expect("request");
        let exchange = async {
            self.send.ready().await.expect("connection usable");
            let res = self.send.send_request(req).await.expect("response");
            let (parts, body) = res.into_parts();
            let body = body.collect().await.expect("body").to_bytes();
            Response { status: parts.status, headers: parts.headers, body }
        };
        tokio::time::timeout(http::TIMEOUT, exchange).await.expect("answer in time")
    }
}

/// One request on a fresh connection from `local`.
async fn send_from(local: &str, url: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> Response {
    let server: SocketAddr = url.trim_start_matches("http://").parse().expect("gateway address");
    Conn::open(local.parse().unwrap(), server).await.send(method, path, headers, "{}").await
}

/// Calls of one Redis command so far (`INFO commandstats`).
fn redis_calls(redis: &RedisServer, command: &str) -> u64 {
    let info = redis.command(&["INFO", "commandstats"]);
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().expect("calls is a number"))
}

async fn redis_gateway(redis: &RedisServer, builder: ConfigBuilder) -> TestGateway {
    let builder = builder.store(&format!("kind = \"redis\"\nurl = \"{}\"", redis.url()));
    TestGateway::start(&builder.build()).await
}

// === 1. the customer API shares the plan's rate limit ===

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_customer_api_is_limited_by_the_plan_rate() {
    let up = Upstream::echo().await;
    let gw = TestGateway::start(&ConfigBuilder::new(&up.url()).keep_rate_limits().build()).await;
    // The shipped `free` plan allows 5 requests per second per account; `topups` reads up to
    // 10,000 history entries per call.
    let key = gw.account_with_key("acme", "free").await;
    let auth = bearer(&key);
    let calls = (0..100).map(|_| {
        let (url, auth) = (gw.url("/v1/credits/topups"), auth.clone());
        tokio::spawn(async move { http::send("GET", &url, &[("authorization", &auth)], "").await })
    });
    let mut ok = 0;
    for call in calls.collect::<Vec<_>>() {
        let res = call.await.unwrap();
        match res.status {
            StatusCode::OK => ok += 1,
            _ => assert_rate_limited(&res, "GET /v1/credits/topups beyond the plan rate"),
        }
    }
    assert!((1..=15).contains(&ok), "100 calls at once on a 5/s plan: {ok} answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxy_and_customer_api_draw_from_one_allowance() {
    let up = Upstream::echo().await;
    let gw = TestGateway::start(&ConfigBuilder::new(&up.url()).keep_rate_limits().extra(SLOW_PLAN).build()).await;
    let key = gw.account_with_key("acme", "slow").await;
    let other = gw.account_with_key("globex", "slow").await;
    let auth = bearer(&key);
    let headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
    // The one request of this second goes through the proxy (a free route) ...
    assert_eq!(http::send("GET", &gw.url("/v1/deals"), &headers, "").await.status, 200);
    // ... so every customer API route is refused until the allowance refills.
    let body = r#"{"enabled": false}"#;
    for (method, path) in [
        ("GET", "/v1/credits"),
        ("GET", "/v1/credits/usage"),
        ("GET", "/v1/credits/packages"),
        ("GET", "/v1/credits/topups"),
        ("PUT", "/v1/credits/auto-topup"),
        ("GET", "/v1/jobs/job_nope"),
    ] {
        let res = http::send(method, &gw.url(path), &headers, body).await;
        assert_rate_limited(&res, &format!("{method} {path} after the proxy spent the allowance"));
    }
    // And the other way round: the API spends it, the proxy is refused.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(http::send("GET", &gw.url("/v1/credits"), &headers, "").await.status, 200);
    let res = gw.post(&key, CHAT, &[("x-ai-tier", "fast")], "{}").await;
    assert_rate_limited(&res, "a chat after the customer API spent the allowance");
    assert_eq!(gw.credits(&other).await["remaining"], 50, "another account has its own allowance");
    assert_eq!(up.count(), 1, "only the first request reached the upstream");
}

// === 2. failed authentication is limited per client address ===

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_scanner_is_limited_per_address_and_costs_few_lookups() {
    let redis = RedisServer::start();
    let up = Upstream::echo().await;
    let builder = ConfigBuilder::new(&up.url())
        .keep_rate_limits()
        .rate_limit("failed_auth_per_minute = 6")
        .rate_limit("failed_auth_burst = 5");
    let gw = redis_gateway(&redis, builder).await;
    let lookups_before = redis_calls(&redis, "hgetall");
    let (mut unauthorized, mut limited) = (0, 0);
    for i in 0..200 {
        let key = unknown_key();
        let auth = bearer(&key);
        // Missing keys and unknown keys, on the proxy and on the customer API.
        let headers: Vec<(&str, &str)> = if i % 10 == 9 { vec![] } else { vec![("authorization", auth.as_str())] };
        let (method, path) = [("POST", CHAT), ("GET", "/v1/deals"), ("GET", "/v1/credits")][i % 3];
        let res = http::send(method, &gw.url(path), &headers, "{}").await;
        match res.status.as_u16() {
            401 => unauthorized += 1,
            _ => {
                assert_rate_limited(&res, &format!("{method} {path} from a scanner"));
                limited += 1;
            }
        }
    }
    let lookups = redis_calls(&redis, "hgetall") - lookups_before;
    assert!((5..=7).contains(&unauthorized), "a burst of 5 failures, then 429: {unauthorized} answered 401");
    assert_eq!(limited, 200 - unauthorized);
    assert!(lookups <= 10, "200 unknown keys from one address cost {lookups} store lookups");
    assert_eq!(up.count(), 0);

    // Another address is not affected, and neither is a key the gateway already knows.
    let res =
        send_from("127.0.0.2", &gw.public, "GET", "/v1/credits", &[("authorization", &bearer(&unknown_key()))]).await;
    assert_eq!(res.status, 401, "another address: {}", res.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repeated_unknown_key_is_looked_up_once() {
    let redis = RedisServer::start();
    let up = Upstream::echo().await;
    // Per-address limits lifted (the builder's default): only the negative cache saves lookups.
    let gw = redis_gateway(&redis, ConfigBuilder::new(&up.url())).await;
    let revoked = gw.account_with_key("acme", "pro").await;
    let key_id = gw.admin_call("GET", "/admin/v1/accounts/acme/keys", None).await.json()["keys"][0]["key_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(gw.admin_call("DELETE", &format!("/admin/v1/keys/{key_id}"), None).await.status, 200);
    let unknown = unknown_key();
    let before = redis_calls(&redis, "hgetall");
    for key in [&unknown, &revoked] {
        for path in ["/v1/credits", "/v1/deals", "/v1/credits", "/v1/deals"].iter().cycle().take(40) {
            let res = http::send("GET", &gw.url(path), &[("authorization", &bearer(key))], "").await;
            assert_eq!(res.status, 401, "GET {path}: {}", res.text());
        }
    }
    let lookups = redis_calls(&redis, "hgetall") - before;
    assert!(lookups <= 4, "an unknown and a revoked key, 40 times each, cost {lookups} store lookups");
}

/// 50 requests that arrive together with a key the gateway has not cached (a fresh instance
/// under load, a restart) wait for one store lookup instead of making 50. Redis is paused while
/// they arrive, so every one of them finds the first lookup still under way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_first_requests_of_one_key_make_one_lookup() {
    let redis = RedisServer::start();
    let up = Upstream::echo().await;
    let gw = redis_gateway(&redis, ConfigBuilder::new(&up.url())).await;
    let key = gw.account_with_key("acme", "pro").await;
    let before = redis_calls(&redis, "hgetall");
    redis.command(&["CLIENT", "PAUSE", "700", "ALL"]);
    let calls = (0..50).map(|_| {
        let (url, auth) = (gw.url("/v1/deals"), bearer(&key));
        tokio::spawn(async move { http::send("GET", &url, &[("authorization", &auth)], "").await })
    });
    for call in calls.collect::<Vec<_>>() {
        let res = call.await.unwrap();
        assert_eq!(res.status, 200, "{}", res.text());
    }
    let lookups = redis_calls(&redis, "hgetall") - before;
    assert_eq!(lookups, 1, "50 concurrent first requests of one key: {lookups} store lookups");
    assert_eq!(up.count(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_admin_tokens_are_limited_per_address_even_when_the_guess_is_right() {
    let up = Upstream::echo().await;
    let config = ConfigBuilder::new(&up.url())
        .keep_rate_limits()
        .rate_limit("failed_auth_per_minute = 6")
        .rate_limit("failed_auth_burst = 3")
        .build();
    let gw = TestGateway::start(&config).await;
    let right = bearer(ADMIN_TOKEN);
    let path = "/admin/v1/accounts/acme";
    for i in 0..3 {
        let res =
            send_from("127.0.0.1", &gw.admin, "GET", path, &[("authorization", &format!("Bearer guess-{i}"))]).await;
        assert_eq!(res.status, 401, "guess {i}: {}", res.text());
    }
    let res = send_from("127.0.0.1", &gw.admin, "GET", path, &[]).await;
    assert_rate_limited(&res, "a fourth failure (no token at all)");
    let res = send_from("127.0.0.1", &gw.admin, "GET", path, &[("authorization", &right)]).await;
    assert_rate_limited(&res, "the right token from a refused address");
    // The allowance is one per address across both listeners.
    let res = send_from("127.0.0.1", &gw.public, "GET", "/v1/credits", &[("authorization", &right)]).await;
    assert_rate_limited(&res, "a wrong API key from the same address");
    // Another address is served; probes need no token and are never refused.
    let res = send_from("127.0.0.2", &gw.admin, "GET", path, &[("authorization", &right)]).await;
    assert_eq!(res.status, 404, "the right token from another address: {}", res.text());
    assert_eq!(send_from("127.0.0.1", &gw.admin, "GET", "/healthz", &[]).await.status, 200);
}

// === 3. limiter state is bounded ===

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_thousand_addresses_are_forgotten_once_idle() {
    const ADDRESSES: usize = 100_000;
    const CONNECTIONS: usize = 16;
    let up = Upstream::echo().await;
    // Loopback is the load balancer, so each request can come from its own client address.
    // One failure is one emission interval, 60 s / 12 = 5 s; governor forgets a key once its
    // theoretical arrival time is an interval in the past, so 10 s after its last failure.
    let config = ConfigBuilder::new(&up.url())
        .keep_rate_limits()
        .server(r#"trusted_proxies = ["127.0.0.1"]"#)
        .rate_limit("failed_auth_per_minute = 12")
        .rate_limit("cleanup_interval_ms = 500")
        .build();
    let gw = TestGateway::start(&config).await;
    let state = gw.gateway.state.clone();
    let clients = move || state.runtime.load().rate_limits.entries().clients;
    let started = Instant::now();
    let senders = (0..CONNECTIONS).map(|c| {
        let server = gw.gateway.public_addr;
        tokio::spawn(async move {
            let mut conn = Conn::open("127.0.0.1".parse().unwrap(), server).await;
            for i in (c..ADDRESSES).step_by(CONNECTIONS) {
                let client = format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255);
                let res = conn.send("GET", "/v1/deals", &[("x-forwarded-for", client.as_str())], "").await;
                assert_eq!(res.status, 401, "request {i}: {}", res.text());
            }
        })
    });
    let senders: Vec<_> = senders.collect();
    let mut peak = 0;
    while !senders.iter().all(|s| s.is_finished()) {
        peak = peak.max(clients());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for s in senders {
        s.await.unwrap();
    }
    peak = peak.max(clients());
    let sent_in = started.elapsed();
    assert!(peak >= 5_000, "the table grew with the addresses (peak {peak} after {sent_in:?})");

    // Idle for those 10 s, plus cleanups and a slow machine's margin.
    let deadline = Instant::now() + Duration::from_secs(20);
    while clients() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(clients(), 0, "idle addresses are forgotten ({ADDRESSES} sent in {sent_in:?}, peak {peak})");
    let metrics = http::send("GET", &format!("{}/metrics", gw.admin), &[], "").await.text();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("creditgate_rate_limit_entries{table=\"clients\"}"))
        .unwrap_or_else(|| panic!("no limiter gauge in:\n{metrics}"));
    assert!(line.ends_with(" 0"), "{line}");
}

/// The gauge `creditgate_rate_limit_entries{table="…"}` as the admin listener shows it now.
async fn limiter_gauge(gw: &TestGateway, table: &str) -> u64 {
    let metrics = http::send("GET", &format!("{}/metrics", gw.admin), &[], "").await.text();
    let name = format!("creditgate_rate_limit_entries{{table=\"{table}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(name.as_str())).map_or(0, |v| v.trim().parse().expect("a count"))
}

/// A key scanner's 100,000 distinct keys: the negative cache that spares the store their repeats
/// holds at most `unknown_key_cache_entries` of them at any time, and forgets them after
/// `unknown_key_cache_ttl_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_thousand_unknown_keys_stay_within_the_cache_cap_and_are_forgotten() {
    const KEYS: usize = 100_000;
    const CONNECTIONS: usize = 16;
    const CAP: u64 = 1_600;
    let up = Upstream::echo().await;
    // Per-address limits lifted (the builder's default), so every key is looked up and remembered.
    let config = ConfigBuilder::new(&up.url())
        .rate_limit("cleanup_interval_ms = 100")
        .rate_limit("unknown_key_cache_ttl_ms = 2000")
        .rate_limit(&format!("unknown_key_cache_entries = {CAP}"))
        .build();
    let gw = TestGateway::start(&config).await;
    let started = Instant::now();
    let senders: Vec<_> = (0..CONNECTIONS)
        .map(|c| {
            let server = gw.gateway.public_addr;
            tokio::spawn(async move {
                let mut conn = Conn::open("127.0.0.1".parse().unwrap(), server).await;
                for i in (c..KEYS).step_by(CONNECTIONS) {
                    let auth = bearer(&format!("cg_scan{i:07}"));
                    let res = conn.send("GET", "/v1/deals", &[("authorization", auth.as_str())], "").await;
                    assert_eq!(res.status, 401, "key {i}: {}", res.text());
                }
            })
        })
        .collect();
    // The gauge is written by every cleanup (each 100 ms); at no cleanup may it exceed the cap.
    let mut peak = 0;
    while !senders.iter().all(|s| s.is_finished()) {
        peak = peak.max(limiter_gauge(&gw, "unknown_keys").await);
        assert!(peak <= CAP, "the unknown-key cache holds {peak} keys, more than its {CAP}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for s in senders {
        s.await.unwrap();
    }
    let sent_in = started.elapsed();
    peak = peak.max(limiter_gauge(&gw, "unknown_keys").await);
    assert!(peak <= CAP, "the unknown-key cache holds {peak} keys, more than its {CAP}");
    assert!(peak >= CAP / 2, "the cache filled up to its cap (peak {peak} after {KEYS} keys in {sent_in:?})");

    // Idle past the 2 s TTL (plus cleanups and a slow machine's margin): forgotten.
    let deadline = Instant::now() + Duration::from_secs(20);
    while limiter_gauge(&gw, "unknown_keys").await > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(limiter_gauge(&gw, "unknown_keys").await, 0, "unknown keys are forgotten after their TTL");
}

// === 4. the client address, and who may vouch for it ===

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_a_trusted_proxy_names_the_client() {
    let up = Upstream::echo().await;
    let config = ConfigBuilder::new(&up.url())
        .keep_rate_limits()
        .server(r#"trusted_proxies = ["127.0.0.2/32"]"#)
        .rate_limit("failed_auth_per_minute = 6")
        .rate_limit("failed_auth_burst = 2")
        .build();
    let gw = TestGateway::start(&config).await;
    let key = gw.account_with_key("acme", "big").await;
    let auth = bearer(&key);
    let forged = [
        ("authorization", auth.as_str()),
        ("x-forwarded-for", "203.0.113.9"),
        ("forwarded", "for=203.0.113.9"),
        ("x-real-ip", "203.0.113.9"),
    ];

    // A client that is no trusted proxy: what it says about itself is replaced, not appended to.
    assert_eq!(send_from("127.0.0.1", &gw.public, "GET", "/v1/deals", &forged).await.status, 200);
    let seen = up.requests().pop().unwrap();
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!((seen.header("forwarded"), seen.header("x-real-ip")), (None, None));

    // The load balancer: its trail is kept and extended with itself.
    let via_lb = [("authorization", auth.as_str()), ("x-forwarded-for", "198.51.100.1, 203.0.113.9")];
    assert_eq!(send_from("127.0.0.2", &gw.public, "GET", "/v1/deals", &via_lb).await.status, 200);
    let seen = up.requests().pop().unwrap();
    assert_eq!(seen.header("x-forwarded-for"), Some("198.51.100.1, 203.0.113.9, 127.0.0.2"));

    // The per-address limit counts the client the load balancer names (the right-most entry) ...
    let bad = bearer(&unknown_key());
    let failure = |peer: &'static str, xff: &'static str| {
        let (public, bad) = (gw.public.clone(), bad.clone());
        async move {
            let headers = [("authorization", bad.as_str()), ("x-forwarded-for", xff)];
            send_from(peer, &public, "GET", "/v1/credits", &headers).await
        }
    };
    assert_eq!(failure("127.0.0.2", "1.1.1.1, 203.0.113.9").await.status, 401);
    assert_eq!(failure("127.0.0.2", "2.2.2.2, 203.0.113.9").await.status, 401);
    assert_rate_limited(&failure("127.0.0.2", "3.3.3.3, 203.0.113.9").await, "a third failure of 203.0.113.9");
    assert_eq!(failure("127.0.0.2", "203.0.113.10").await.status, 401, "another client behind the same proxy");
    // ... and ignores what any other peer claims.
    assert_eq!(failure("127.0.0.3", "198.51.100.20").await.status, 401);
    assert_eq!(failure("127.0.0.3", "198.51.100.21").await.status, 401);
    let res = failure("127.0.0.3", "198.51.100.22").await;
    assert_rate_limited(&res, "127.0.0.3's third failure, whatever it claims to be");
}
