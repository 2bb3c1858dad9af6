//! Micro-benches: the CPU cost of the request path's pure steps, and of one charge.
//!
//! `cargo bench --bench micro` (a filter narrows it: `cargo bench --bench micro -- classify`).
//! Every group runs on the shipped `config/gateway.toml` and calls the functions the request path
//! calls (`src/stack.rs`), not copies of them:
//!
//! * `classify/<operation>[/<case>]` — steps 3 and 5 for one request per pricing rule:
//!   [`Rules::route`], [`Route::respell`], [`Operation::needs_body`], [`Operation::price`] (with the
//!   body only when `needs_body` says so) and [`classify::bind_headers`]. `classify/free_route` is
//!   a path no metered route lists (the free catch-all); `classify/request_line/*` is the method
//!   and path check and normalisation that run before routing.
//! * `json_probe/*` — [`json::probe`] alone on a small chat body, a chat body with a long
//!   `messages` array, and a leads body with 100 items (throughput in bytes).
//! * `keys/*` — the SHA-256 of a bearer key as the cache looks it up, [`hash_key`] (the hex form
//!   stored and asked of the store on a miss), and a [`KeyCache::authenticate`] hit.
//! * `charge/*` — one [`Ledger::charge`] on the memory store and on a throwaway local
//!   `redis-server` (skipped with a note when it is not installed), each driven by a tokio
//!   current-thread runtime's `block_on`.
//!
//! Timings are short (1 s warm-up, 2 s measured, 20 samples) so the whole run stays near a
//! minute; they are for spotting regressions and outliers, not for publishing.

use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use creditgate::auth::{KeyCache, hash_key};
use creditgate::classify::{self, Rules, json};
use creditgate::config::Config;
use creditgate::ledger::{
    ChargeOutcome, ChargeRequest, KeyRecord, Ledger, MemoryLedger, NewAccount, Packages, RedisLedger, Role,
    TopupOutcome, TopupRequest,
};
use creditgate::ratelimit::RateLimits;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use futures_util::FutureExt;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use sha2::{Digest, Sha256};

/// An API key of the shape `generate_key` makes (`cg_` + 40 alphanumerics).
const KEY: &str = "cg_0123456789abcdefghijABCDEFGHIJ0123456789";

fn config() -> Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/gateway.toml");
    Config::load(&path).expect("config/gateway.toml loads")
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    pairs
        .iter()
        .map(|(k, v)| (HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap()))
        .collect()
}

/// A JSON list of `n` leads as a CRM would send them.
fn leads(n: usize) -> String {
    let items: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"id":"lead_{i:05}","email":"person{i}@example.com","company":"Company {i} GmbH","title":"Head of Sales","linkedin":"https://www.linkedin.com/in/person-{i}"}}"#
            )
        })
        .collect();
    format!("[{}]", items.join(","))
}

/// A chat body with `n` messages of about 400 bytes each.
fn chat(n: usize, tier: Option<&str>) -> String {
    let text = "Summarise the last call with this lead and suggest a follow-up. ".repeat(6);
    let messages: Vec<String> = (0..n)
        .map(|i| {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            format!(r#"{{"role":"{role}","content":"{text}{i}"}}"#)
        })
        .collect();
    let tier = tier.map(|t| format!(r#","tier":"{t}""#)).unwrap_or_default();
    format!(r#"{{"model":"gpt-4o-mini","messages":[{}]{tier},"temperature":0.2}}"#, messages.join(","))
}

// === classify ===

/// One request as the classifier sees it.
struct Case {
    name: &'static str,
    method: Method,
    path: &'static str,
    role: Role,
    headers: HeaderMap,
    body: String,
    /// The cost the shipped config gives it (`None`: a free route), checked once before timing.
    cost: Option<u64>,
}

/// Steps 3 and 5 of `stack::handle` for one request: route, respell, needs_body, price, bind
/// the pricing headers. Returns the cost (`None` for a free route).
fn classify_one(rules: &Rules, case: &Case, headers: &mut HeaderMap) -> Option<u64> {
    let route = rules.route(&case.method, case.path).expect("the catch-all matches everything");
    black_box(route.respell(case.path));
    let Some(op) = rules.operation(route) else {
        classify::bind_headers(headers, None);
        return None;
    };
    let body = op.needs_body(headers, case.role).then_some(case.body.as_bytes());
    let price = op.price(headers, case.role, body).expect("the bench requests are valid");
    classify::bind_headers(headers, Some(&price));
    Some(price.cost)
}

fn classify_cases() -> Vec<Case> {
    let post = |name, path, headers, body: String, cost| Case {
        name,
        method: Method::POST,
        path,
        role: Role::User,
        headers,
        body,
        cost: Some(cost),
    };
    let leads10 = format!(r#"{{"leads":{}}}"#, leads(10));
    let chat_path = "/v1/chat/completions";
    vec![
        // The tier in the header and an empty body: the body is not read.
        post(
            "ai_chat/tier_header",
            chat_path,
            headers(&[("x-ai-tier", "fast"), ("content-length", "0")]),
            "".into(),
            1,
        ),
        // The tier in the body: the body is probed.
        post("ai_chat/tier_body", chat_path, HeaderMap::new(), chat(4, Some("powerful")), 5),
        // Both: the body is still probed, and must agree.
        post("ai_chat/tier_header_and_body", chat_path, headers(&[("x-ai-tier", "fast")]), chat(4, Some("fast")), 1),
        // Neither: the default tier, after probing the body.
        post("ai_chat/default_tier", chat_path, HeaderMap::new(), chat(4, None), 3),
        // A metered path in another letter case (matched case-insensitively, respelled).
        post(
            "ai_chat/respelled_path",
            "/V1/Chat/Completions",
            headers(&[("x-ai-tier", "fast"), ("content-length", "0")]),
            "".into(),
            1,
        ),
        post("lead_enrichment", "/v1/leads/enrich", HeaderMap::new(), leads10.clone(), 10),
        post(
            "campaign_generation",
            "/v1/campaigns/generate",
            HeaderMap::new(),
            r#"{"steps":["intro","follow-up","break-up"],"variants":2,"channels":["email"],"audience":"CTOs"}"#.into(),
            6,
        ),
        post("call_transcription", "/v1/calls/transcribe", HeaderMap::new(), "".into(), 2),
        post("insights_position", "/v1/insights/position", HeaderMap::new(), "".into(), 5),
        post("insights_competitive", "/v1/insights/competitive", HeaderMap::new(), "".into(), 5),
        post("lead_scoring_refresh/paid", "/v1/leads/score", HeaderMap::new(), leads10.clone(), 10),
        Case {
            name: "lead_scoring_refresh/automatic_free",
            role: Role::System,
            ..post("", "/v1/leads/score", headers(&[("x-trigger", "automatic")]), leads10.clone(), 0)
        },
        post("icebreaker", "/v1/icebreakers", HeaderMap::new(), leads10, 10),
        // The last metered route in the table: the longest route scan to a fixed price.
        post("sentiment_analysis", "/v1/sentiment", HeaderMap::new(), "".into(), 1),
        // No metered route lists it: every route is tried before the catch-all.
        Case {
            name: "free_route",
            method: Method::GET,
            path: "/v1/deals/12345",
            role: Role::User,
            headers: HeaderMap::new(),
            body: String::new(),
            cost: None,
        },
    ]
}

fn bench_classify(c: &mut Criterion) {
    let rules = Rules::new(&config());
    let mut g = c.benchmark_group("classify");
    for case in classify_cases() {
        let mut h = case.headers.clone();
        assert_eq!(classify_one(&rules, &case, &mut h), case.cost, "{}: unexpected price", case.name);
        // bind_headers rewrites the map, so each iteration gets the request's own headers back
        // (cloned outside the timing).
        g.bench_function(case.name, |b| {
            b.iter_batched_ref(|| case.headers.clone(), |h| classify_one(&rules, &case, h), BatchSize::SmallInput)
        });
    }
    // The request-line checks of step 1 (`stack::normalize_uri`), before any route is looked up.
    for (name, path) in
        [("request_line/plain", "/v1/chat/completions"), ("request_line/normalised", "/v1//chat/%63ompletions/")]
    {
        g.bench_function(name, |b| {
            b.iter(|| {
                classify::path::check_method(&Method::POST).unwrap();
                classify::path::check_target(black_box(path)).unwrap();
                classify::path::normalize(black_box(path)).len()
            })
        });
    }
    g.finish();
}

// === json probe ===

fn bench_json(c: &mut Criterion) {
    let mut g = c.benchmark_group("json_probe");
    let small = chat(1, Some("fast"));
    let long = chat(100, Some("fast"));
    let leads100 = format!(r#"{{"leads":{},"fields":["email","company"]}}"#, leads(100));
    for (name, body, field) in
        [("small_chat", &small, "tier"), ("chat_100_messages", &long, "tier"), ("leads_100", &leads100, "leads")]
    {
        assert!(!matches!(json::probe(body.as_bytes(), [field]).unwrap(), [json::Field::Missing]));
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(name, |b| b.iter(|| json::probe(black_box(body.as_bytes()), [field]).unwrap()));
    }
    g.finish();
}

// === keys ===

fn bench_keys(c: &mut Criterion) {
    let mut g = c.benchmark_group("keys");
    // What `KeyCache::authenticate` computes for every request.
    g.bench_function("sha256_digest", |b| b.iter(|| -> [u8; 32] { Sha256::digest(black_box(KEY).as_bytes()).into() }));
    g.bench_function("hash_key_hex", |b| b.iter(|| hash_key(black_box(KEY))));

    let config = config();
    let limits = RateLimits::new(&config);
    let ledger = MemoryLedger::new();
    let cache = KeyCache::default();
    let client = IpAddr::from([192, 0, 2, 1]);
    let auth = headers(&[("authorization", &format!("Bearer {KEY}"))]);
    let account =
        NewAccount { id: "bench".into(), plan: "enterprise".into(), allocation: 10_000, anchor: 0, email: None };
    let record = KeyRecord {
        key_id: "key_bench".into(),
        account: "bench".into(),
        role: Role::User,
        hash: hash_key(KEY),
        prefix: KEY[..8].into(),
        created_at: 0,
    };
    // The memory store answers without awaiting, so no runtime is needed to drive it.
    assert!(ledger.create_account(account).now_or_never().expect("no await").unwrap());
    assert!(ledger.create_key(record).now_or_never().expect("no await").unwrap());
    let authenticate = || cache.authenticate(&auth, &ledger, client, &limits).now_or_never().expect("no await");
    authenticate().expect("the key is known"); // fills the cache
    // An entry is trusted for `auth::FRESH` (4 s), about one bench's length: the lookup that
    // refreshes it then is one iteration in millions, invisible in the median.
    g.bench_function("cache_hit", |b| b.iter(|| authenticate().unwrap()));
    g.finish();
}

// === charge ===

/// Charge ids unique across the run: a repeated id would replay the first receipt.
static CHARGE_IDS: AtomicU64 = AtomicU64::new(0);

/// Creates the `bench` account with credits enough for any run.
async fn fund<L: Ledger>(ledger: &L) {
    let account =
        NewAccount { id: "bench".into(), plan: "enterprise".into(), allocation: 10_000, anchor: 0, email: None };
    assert!(ledger.create_account(account).await.expect("create account"));
    let topup = TopupRequest { account: "bench", credits: 1_000_000_000_000, payment_ref: "bench", package: None };
    assert!(matches!(ledger.topup(topup).await.expect("top up"), TopupOutcome::Created(_)));
}

/// One metered chat's charge, shaped as `stack::Metered::charge` builds it.
async fn charge_once<L: Ledger>(ledger: &L, config: &Config, packages: &Packages, charge_id: &str) {
    let req = ChargeRequest {
        account: "bench",
        charge_id,
        cost: 1,
        operation: "ai_chat",
        category: "AI Chat",
        request_id: "req_bench",
        idempotency: None,
        thresholds: &config.notifications.thresholds_percent,
        auto_topup_max_per_period: config.auto_topup.max_per_period,
        packages,
    };
    let outcome = ledger.charge(req).await.expect("store answers");
    assert!(matches!(outcome, ChargeOutcome::Charged(_)), "{outcome:?}");
}

fn bench_charge_on<L: Ledger>(c: &mut Criterion, name: &str, rt: &tokio::runtime::Runtime, ledger: &L) {
    let config = config();
    let packages =
        Packages::new(config.topup_packages.iter().map(|(name, p)| (name.clone(), p.credits, p.price_eur)).collect());
    rt.block_on(fund(ledger));
    c.benchmark_group("charge").bench_function(name, |b| {
        b.iter_batched(
            || format!("chg_{}", CHARGE_IDS.fetch_add(1, Ordering::Relaxed)),
            |id| rt.block_on(charge_once(ledger, &config, &packages, &id)),
            BatchSize::SmallInput,
        )
    });
}

fn bench_charge(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    bench_charge_on(c, "memory", &rt, &MemoryLedger::new());
    match RedisProcess::start() {
        Some(redis) => {
            let ledger = rt.block_on(RedisLedger::connect_standalone(&redis.url())).expect("connect to redis");
            bench_charge_on(c, "redis", &rt, &ledger);
        }
        None => eprintln!("charge/redis skipped: redis-server is not on the PATH"),
    }
}

/// A throwaway `redis-server` on a free loopback port, no persistence, killed on drop.
struct RedisProcess {
    child: Child,
    port: u16,
}

impl RedisProcess {
    /// `None` when `redis-server` is not installed.
    fn start() -> Option<Self> {
        let port = TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let redis = RedisProcess { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !redis.pings() {
            assert!(Instant::now() < deadline, "redis-server did not answer PING on port {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(redis)
    }

    fn pings(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let mut reply = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn criterion() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20)
        .without_plots()
}

criterion_group! {
    name = micro;
    config = criterion();
    targets = bench_classify, bench_json, bench_keys, bench_charge
}
criterion_main!(micro);
