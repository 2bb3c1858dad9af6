//! Load bench: what the gateway costs per request, side by side from one run.
//!
//! `cargo bench --bench load` starts, in one process and one tokio multi-thread runtime:
//!
//! * a fast upstream: a bare hyper HTTP/1 server answering every request with a small fixed JSON
//!   body over keep-alive, so the numbers show the gateway, not a backend;
//! * the gateway (`creditgate::server::start`) on the memory store, configured from the shipped
//!   `config/gateway.toml` with loopback listeners on port 0, both upstreams pointing at the fast
//!   one, a literal backend credential and `log.level = "warn"`; an `enterprise` account with a
//!   `user` key and a generous top-up through the admin API;
//! * a closed-loop client: `LOAD_CONCURRENCY` tasks (default 64), each with its own keep-alive
//!   HTTP/1 connection, sending requests back to back until `LOAD_REQUESTS` (default 20,000) have
//!   been sent.
//!
//! Three scenarios, each with a warm-up (`LOAD_WARMUP`, default 1,000) before it is measured:
//! (a) the upstream directly, (b) a free route through the gateway (`GET /v1/deals`), (c) a metered
//! chat (`POST /v1/chat/completions`, `x-ai-tier: fast`, so the body is streamed, never parsed).
//! A phase is cut off after 60 s. Every answer must be a 200 (the metered ones with
//! `x-credits-charged: 1`), every gateway request must reach the upstream once, the free route
//! must leave the balance alone and the metered one must take exactly one credit per success;
//! anything else is printed and the bench exits with status 1.
//!
//! `cargo bench --bench load -- --quick` (or `LOAD_REQUESTS=2000`) is a fast smoke run;
//! `LOAD_COUNT_ALLOCS=1` adds heap allocations per request to the report.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use creditgate::config::Config;
use creditgate::ledger::Ledger;
use creditgate::server::{self, Gateway, StartOptions};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// Counts heap allocations while [`COUNT_ALLOCS`] is on (`LOAD_COUNT_ALLOCS=1`); otherwise one
/// relaxed load per allocation on top of the system allocator.
struct CountingAlloc;

static COUNT_ALLOCS: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is passed on unchanged to the system allocator.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_alloc();
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_alloc();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_alloc();
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

fn count_alloc() {
    if COUNT_ALLOCS.load(Ordering::Relaxed) {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

const DEFAULT_REQUESTS: usize = 20_000;
const DEFAULT_WARMUP: usize = 1_000;
const QUICK_REQUESTS: usize = 2_000;
const QUICK_WARMUP: usize = 200;
const DEFAULT_CONCURRENCY: usize = 64;
/// A phase (warm-up or measurement) is cut off after this long.
const PHASE_LIMIT: Duration = Duration::from_secs(60);

const ACCOUNT: &str = "bench";
const PLAN: &str = "enterprise";
const ADMIN_TOKEN: &str = "bench-admin-token";
const BACKEND_CREDENTIAL: &str = "Bearer bench-backend-key";
/// What the fast upstream answers to everything (the size of a short chat completion).
const UPSTREAM_BODY: &[u8] = br#"{"id":"chatcmpl-bench","object":"chat.completion","model":"bench","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
/// The metered scenario's request body.
const CHAT_BODY: &[u8] = br#"{"model":"bench","messages":[{"role":"user","content":"hi"}]}"#;
const CREDITS_CHARGED: HeaderName = HeaderName::from_static("x-credits-charged");
const TIER: HeaderName = HeaderName::from_static("x-ai-tier");

/// Run parameters, from the command line and the environment.
struct Settings {
    requests: usize,
    warmup: usize,
    concurrency: usize,
    /// `LOAD_COUNT_ALLOCS=1`: also report heap allocations per request (slows every allocation a little).
    count_allocs: bool,
}

impl Settings {
    fn from_env() -> Self {
        // `cargo bench` passes `--bench`; only `--quick` means anything here.
        let quick = std::env::args().skip(1).any(|a| a == "--quick");
        let (requests, warmup) =
            if quick { (QUICK_REQUESTS, QUICK_WARMUP) } else { (DEFAULT_REQUESTS, DEFAULT_WARMUP) };
        let settings = Settings {
            requests: env_usize("LOAD_REQUESTS", requests),
            warmup: env_usize("LOAD_WARMUP", warmup),
            concurrency: env_usize("LOAD_CONCURRENCY", DEFAULT_CONCURRENCY),
            count_allocs: env_usize("LOAD_COUNT_ALLOCS", 0) != 0,
        };
        assert!(settings.requests > 0, "LOAD_REQUESTS must be at least 1");
        assert!(settings.concurrency > 0, "LOAD_CONCURRENCY must be at least 1");
        settings
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v.trim().replace('_', "").parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a whole number")),
        Err(_) => default,
    }
}

fn main() {
    let settings = Settings::from_env();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let workers = runtime.metrics().num_workers();
    let failed = runtime.block_on(run(&settings, workers));
    if failed {
        std::process::exit(1);
    }
}

/// Runs all three scenarios and prints the table; true when anything was wrong.
async fn run(settings: &Settings, workers: usize) -> bool {
    let hits = Arc::new(AtomicU64::new(0));
    let upstream = start_upstream(hits.clone()).await;
    let config = bench_config(upstream);
    init_logging(&config);
    let opts = StartOptions { admin_token: Some(ADMIN_TOKEN.into()), ..StartOptions::default() };
    let gateway = server::start(config, opts).await.expect("gateway starts");
    let key = seed(&gateway, settings).await;
    let gw = gateway.public_addr;
    let bearer = HeaderValue::from_str(&format!("Bearer {key}")).expect("key is a header value");

    let free = Target {
        addr: upstream,
        method: Method::GET,
        path: "/v1/deals",
        headers: vec![(AUTHORIZATION, bearer.clone())],
        body: Bytes::new(),
        metered: false,
    };
    let direct = Target { ..free.clone() };
    let free = Target { addr: gw, ..free };
    let chat = chat_target(gw, bearer);

    let mut problems = Vec::new();
    let balance_at_start = balance(&gateway).await;
    let a = scenario("(a) upstream direct", direct, settings, &hits, &mut problems).await;
    let b = scenario("(b) free route via gateway", free, settings, &hits, &mut problems).await;
    let after_free = balance(&gateway).await;
    if after_free != balance_at_start {
        problems.push(format!("the free route changed the balance: {balance_at_start} → {after_free}"));
    }
    let c = scenario("(c) metered chat via gateway", chat, settings, &hits, &mut problems).await;
    let after_metered = balance(&gateway).await;
    let charged = (c.warmup.ok + c.measured.ok) as u64;
    let dropped = after_free.saturating_sub(after_metered);
    let balance_line = format!(
        "balance check: {charged} successful metered requests (warm-up included), balance {after_free} → \
         {after_metered} (−{dropped})"
    );
    if dropped != charged || after_metered > after_free {
        problems.push(format!("{balance_line}: the drop does not match"));
    }

    gateway.shutdown(Duration::from_secs(2)).await;

    // (d) the same metered chat with Redis as the store, when a redis-server is at hand.
    let d = match redis::Server::start() {
        Some(redis) => Some(redis_scenario(&redis, upstream, settings, &hits, &mut problems).await),
        None => {
            println!("(d) skipped: no redis-server on the PATH (apt-get install redis-server)");
            None
        }
    };
    let mut rows = vec![&a, &b, &c];
    rows.extend(d.as_ref().map(|(s, _)| s));
    print_table(settings, workers, &rows, &balance_line);
    if let Some((_, calls_line)) = &d {
        println!();
        println!("{calls_line}");
    }

    if problems.is_empty() {
        println!("\nOK: every answer was 200 and every credit is accounted for.");
        false
    } else {
        eprintln!("\n!!!!!!!!!! LOAD BENCH FAILED: {} problem(s) !!!!!!!!!!", problems.len());
        for p in &problems {
            eprintln!("!!! {p}");
        }
        eprintln!("!!! the numbers above are not trustworthy");
        true
    }
}

// === the fast upstream ===

/// A bare hyper HTTP/1 server: reads the request body, answers [`UPSTREAM_BODY`], keeps the
/// connection alive; counts requests in `hits`.
/// A fast-tier chat (tier in the header: priced without reading the body) at `addr`.
fn chat_target(addr: SocketAddr, bearer: HeaderValue) -> Target {
    Target {
        addr,
        method: Method::POST,
        path: "/v1/chat/completions",
        headers: vec![
            (AUTHORIZATION, bearer),
            (CONTENT_TYPE, HeaderValue::from_static("application/json")),
            (TIER, HeaderValue::from_static("fast")),
        ],
        body: Bytes::from_static(CHAT_BODY),
        metered: true,
    }
}

/// Scenario (d): a gateway on a fresh Redis; checks the balance and that every metered request
/// cost exactly one script call (Redis `INFO commandstats`).
async fn redis_scenario(
    redis: &redis::Server,
    upstream: SocketAddr,
    settings: &Settings,
    hits: &Arc<AtomicU64>,
    problems: &mut Vec<String>,
) -> (Scenario, String) {
    let mut config = bench_config(upstream);
    config.store.kind = creditgate::config::StoreKind::Redis;
    config.store.url = Some(redis.url());
    let opts = StartOptions { admin_token: Some(ADMIN_TOKEN.into()), ..StartOptions::default() };
    let gateway = server::start(config, opts).await.expect("gateway on Redis starts");
    let key = seed(&gateway, settings).await;
    let bearer = HeaderValue::from_str(&format!("Bearer {key}")).expect("key is a header value");
    let chat = chat_target(gateway.public_addr, bearer);
    let before = balance(&gateway).await;
    let scripts_before = redis.script_calls();
    let d = scenario("(d) metered chat via gateway, Redis store", chat, settings, hits, problems).await;
    let scripts = redis.script_calls() - scripts_before;
    let after = balance(&gateway).await;
    let charged = (d.warmup.ok + d.measured.ok) as u64;
    if before - after != charged {
        problems.push(format!("Redis: {charged} metered requests but the balance dropped by {}", before - after));
    }
    // The key cache refreshes about every 4 s (two reads): a handful of extra calls at most.
    let per_request = scripts as f64 / charged.max(1) as f64;
    if !(1.0..1.01).contains(&per_request) {
        problems.push(format!("Redis: {per_request:.3} script calls per metered request, expected 1"));
    }
    let line = format!(
        "Redis function calls (FCALL) during (d): {scripts} for {charged} metered requests = \
         {per_request:.3} per request (key-cache refreshes included)."
    );
    gateway.shutdown(Duration::from_secs(2)).await;
    (d, line)
}

/// A throwaway `redis-server` on a free loopback port (no persistence), killed on drop.
mod redis {
    use std::io::{BufRead, BufReader, Write};
    use std::net::{TcpListener, TcpStream};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    pub struct Server {
        child: Child,
        port: u16,
    }

    impl Server {
        /// `None` when `redis-server` is not installed.
        pub fn start() -> Option<Self> {
            let port = TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .ok()?;
            let server = Server { child, port };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if server.info("server").is_some() {
                    return Some(server);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            None
        }

        pub fn url(&self) -> String {
            format!("redis://127.0.0.1:{}", self.port)
        }

        fn info(&self, section: &str) -> Option<String> {
            let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
            stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            write!(stream, "*2\r\n$4\r\nINFO\r\n${}\r\n{section}\r\n", section.len()).ok()?;
            let mut reader = BufReader::new(stream);
            let mut header = String::new();
            reader.read_line(&mut header).ok()?;
            let len: usize = header.trim().strip_prefix('$')?.parse().ok()?;
            let mut body = vec![0; len + 2];
            std::io::Read::read_exact(&mut reader, &mut body).ok()?;
            String::from_utf8(body).ok()
        }

        /// Calls of FCALL (the ledger functions) so far.
        pub fn script_calls(&self) -> u64 {
            let info = self.info("commandstats").expect("INFO commandstats");
            info.lines()
                .filter(|l| l.starts_with("cmdstat_fcall:"))
                .filter_map(|l| l.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok())
                .sum()
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

async fn start_upstream(hits: Arc<AtomicU64>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the upstream");
    let addr = listener.local_addr().expect("upstream address");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let _ = tcp.set_nodelay(true);
            let hits = hits.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let hits = hits.clone();
                    async move {
                        // Drain the body so the connection stays reusable.
                        let _ = req.into_body().collect().await;
                        hits.fetch_add(1, Ordering::Relaxed);
                        let mut res = Response::new(Full::new(Bytes::from_static(UPSTREAM_BODY)));
                        res.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                        Ok::<_, Infallible>(res)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
            });
        }
    });
    addr
}

// === the gateway ===

/// The shipped config, pointed at the fast upstream, on the memory store, listening on port 0.
fn bench_config(upstream: SocketAddr) -> Config {
    let text = include_str!("../config/gateway.toml");
    let mut doc: toml::Table = text.parse().expect("config/gateway.toml is TOML");
    let s = |v: &str| toml::Value::String(v.to_owned());
    let urls = toml::Value::Array(vec![s(&format!("http://{upstream}"))]);
    let server = table(&mut doc, &["server"]);
    server.insert("listen".into(), s("127.0.0.1:0"));
    server.insert("admin_listen".into(), s("127.0.0.1:0"));
    let store = table(&mut doc, &["store"]);
    store.insert("kind".into(), s("memory"));
    store.remove("url");
    let ai = table(&mut doc, &["upstreams", "ai"]);
    ai.insert("urls".into(), urls.clone());
    ai.insert(
        "headers".into(),
        toml::Value::Table([("authorization".to_owned(), s(BACKEND_CREDENTIAL))].into_iter().collect()),
    );
    table(&mut doc, &["upstreams", "app"]).insert("urls".into(), urls);
    table(&mut doc, &["log"]).insert("level".into(), s("warn"));
    // The limiter stays on (its cost is part of the measurement) with a rate the bench cannot reach.
    table(&mut doc, &["plans", PLAN]).insert("rate_limit_per_second".into(), toml::Value::Integer(1_000_000));
    Config::parse(&doc.to_string()).expect("the bench config is valid")
}

/// The table at `path`; panics naming it when the shipped config lacks it.
fn table<'a>(doc: &'a mut toml::Table, path: &[&str]) -> &'a mut toml::Table {
    let mut t = doc;
    for key in path {
        t = t.get_mut(*key).and_then(toml::Value::as_table_mut).unwrap_or_else(|| panic!("no [{}]", path.join(".")));
    }
    t
}

/// Logging as `creditgate serve` sets it up, at the config's level.
fn init_logging(config: &Config) {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&config.log.level))
        .with_writer(std::io::stderr)
        .init();
}

/// Creates the account and its key, tops it up through the admin API (SPEC §5) so the metered
/// scenario never runs dry.
async fn seed(gateway: &Gateway, settings: &Settings) -> String {
    let key = creditgate::demo::seed(&gateway.state, ACCOUNT, PLAN).await.expect("seed the bench account");
    let credits = 2 * (settings.requests + settings.warmup) as u64 + 1_000_000;
    let admin = gateway.admin_addr.expect("the bench config has an admin listener");
    let mut sender = connect(admin).await.expect("connect to the admin listener");
    let body = serde_json::json!({"credits": credits, "payment_ref": "bench-topup"}).to_string();
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("/admin/v1/accounts/{ACCOUNT}/topups"))
        .header(HOST, admin.to_string())
        .header(AUTHORIZATION, format!("Bearer {ADMIN_TOKEN}"))
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("a valid request");
    let res = sender.send_request(req).await.expect("top-up request");
    let status = res.status();
    let answer = res.into_body().collect().await.expect("top-up answer").to_bytes();
    assert_eq!(status, StatusCode::CREATED, "top-up refused: {}", String::from_utf8_lossy(&answer));
    key
}

async fn balance(gateway: &Gateway) -> u64 {
    gateway.state.ledger.account(ACCOUNT).await.expect("ledger answers").expect("bench account exists").remaining()
}

// === the client ===

/// What one scenario sends, over and over.
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    method: Method,
    path: &'static str,
    /// Sent on every request (`Host` is added per scenario).
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
    /// A metered 200 must say `x-credits-charged: 1`.
    metered: bool,
}

/// One client connection; reconnects after a failure.
struct Conn {
    addr: SocketAddr,
    sender: Option<SendRequest<Full<Bytes>>>,
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| format!("connect to {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// Sends one request and reads the whole answer; `Err` says what was wrong with it.
async fn one_request(conn: &mut Conn, target: &Target) -> Result<(), String> {
    if conn.sender.as_ref().is_none_or(SendRequest::is_closed) {
        conn.sender = Some(connect(conn.addr).await?);
    }
    let sender = conn.sender.as_mut().expect("connected above");
    let mut req = Request::new(Full::new(target.body.clone()));
    *req.method_mut() = target.method.clone();
    *req.uri_mut() = hyper::Uri::from_static(target.path);
    let headers = req.headers_mut();
    for (k, v) in &target.headers {
        headers.insert(k.clone(), v.clone());
    }
    let sent = async {
        sender.ready().await.map_err(|e| format!("connection: {e}"))?;
        let res = sender.send_request(req).await.map_err(|e| format!("send: {e}"))?;
        let (parts, body) = res.into_parts();
        let body = body.collect().await.map_err(|e| format!("response body: {e}"))?.to_bytes();
        Ok::<_, String>((parts, body))
    };
    let (parts, body) = match sent.await {
        Ok(r) => r,
        Err(e) => {
            conn.sender = None;
            return Err(e);
        }
    };
    if parts.status != StatusCode::OK {
        let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
        return Err(format!("status {}: {text}", parts.status));
    }
    if target.metered && parts.headers.get(&CREDITS_CHARGED).is_none_or(|v| v != "1") {
        return Err(format!("200 without `x-credits-charged: 1` (got {:?})", parts.headers.get(&CREDITS_CHARGED)));
    }
    Ok(())
}

/// The result of one warm-up or measurement phase.
#[derive(Default)]
struct Phase {
    ok: usize,
    /// Error message → count.
    errors: BTreeMap<String, usize>,
    /// Latencies of the successful requests, nanoseconds, sorted.
    latencies: Vec<u64>,
    elapsed: Duration,
    aborted: bool,
}

impl Phase {
    fn error_count(&self) -> usize {
        self.errors.values().sum()
    }

    fn completed(&self) -> usize {
        self.ok + self.error_count()
    }

    fn per_second(&self) -> f64 {
        self.completed() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Nearest-rank percentile of the successful requests, in microseconds.
    fn percentile_us(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * self.latencies.len() as f64).ceil() as usize;
        self.latencies[rank.clamp(1, self.latencies.len()) - 1] as f64 / 1_000.0
    }

    fn merge(&mut self, other: Phase) {
        self.ok += other.ok;
        for (e, n) in other.errors {
            *self.errors.entry(e).or_default() += n;
        }
        self.latencies.extend(other.latencies);
        self.aborted |= other.aborted;
    }
}

/// One closed-loop client task: requests back to back until `total` are taken or time is up.
async fn worker(
    mut conn: Conn,
    target: Arc<Target>,
    next: Arc<AtomicUsize>,
    total: usize,
    deadline: tokio::time::Instant,
) -> (Conn, Phase) {
    let mut phase = Phase { latencies: Vec::with_capacity(total / 16 + 16), ..Phase::default() };
    // One timer for the whole phase, not one per request: the client should cost little.
    let cutoff = tokio::time::sleep_until(deadline);
    tokio::pin!(cutoff);
    while next.fetch_add(1, Ordering::Relaxed) < total {
        let started = Instant::now();
        let outcome = tokio::select! {
            biased;
            r = one_request(&mut conn, &target) => Some(r),
            _ = &mut cutoff => None,
        };
        let elapsed = started.elapsed();
        match outcome {
            Some(Ok(())) => {
                phase.ok += 1;
                phase.latencies.push(elapsed.as_nanos() as u64);
            }
            Some(Err(e)) => *phase.errors.entry(e).or_default() += 1,
            None => {
                *phase.errors.entry(format!("cut off: phase ran over {PHASE_LIMIT:?}")).or_default() += 1;
                phase.aborted = true;
                conn.sender = None;
                break;
            }
        }
    }
    (conn, phase)
}

/// Sends `total` requests over `conns`, all at once; hands the connections back.
async fn phase(conns: Vec<Conn>, target: &Arc<Target>, total: usize) -> (Vec<Conn>, Phase) {
    let next = Arc::new(AtomicUsize::new(0));
    let deadline = tokio::time::Instant::now() + PHASE_LIMIT;
    let started = Instant::now();
    let tasks: Vec<_> =
        conns.into_iter().map(|c| tokio::spawn(worker(c, target.clone(), next.clone(), total, deadline))).collect();
    let mut conns = Vec::with_capacity(tasks.len());
    let mut result = Phase::default();
    for task in tasks {
        let (conn, p) = task.await.expect("client task");
        conns.push(conn);
        result.merge(p);
    }
    result.elapsed = started.elapsed();
    result.latencies.sort_unstable();
    (conns, result)
}

/// One scenario as measured.
struct Scenario {
    name: &'static str,
    what: String,
    warmup: Phase,
    measured: Phase,
    /// Heap allocations in the whole process during the measured phase (0 unless counted).
    allocs: u64,
}

/// Connects, warms up, measures; records anything wrong in `problems`.
async fn scenario(
    name: &'static str,
    mut target: Target,
    settings: &Settings,
    hits: &AtomicU64,
    problems: &mut Vec<String>,
) -> Scenario {
    let what = format!("{} {}", target.method, target.path);
    let host = HeaderValue::from_str(&target.addr.to_string()).expect("an address is a header value");
    target.headers.push((HOST, host));
    let target = Arc::new(target);
    let conns = (0..settings.concurrency).map(|_| Conn { addr: target.addr, sender: None }).collect();
    let hits_before = hits.load(Ordering::Relaxed);
    let (conns, warmup) = phase(conns, &target, settings.warmup).await;
    COUNT_ALLOCS.store(settings.count_allocs, Ordering::Relaxed);
    let allocs_before = ALLOCS.load(Ordering::Relaxed);
    let (conns, measured) = phase(conns, &target, settings.requests).await;
    COUNT_ALLOCS.store(false, Ordering::Relaxed);
    let allocs = ALLOCS.load(Ordering::Relaxed) - allocs_before;
    drop(conns);
    let reached = hits.load(Ordering::Relaxed) - hits_before;
    for (label, p) in [("warm-up", &warmup), ("measured", &measured)] {
        for (e, n) in &p.errors {
            problems.push(format!("{name}, {label}: {n} × {e}"));
        }
    }
    let answered = (warmup.ok + measured.ok) as u64;
    if reached < answered {
        problems.push(format!("{name}: {answered} answers but only {reached} requests reached the upstream"));
    }
    eprintln!(
        "{name}: {} ok, {} errors in {:.2} s",
        measured.ok,
        measured.error_count(),
        measured.elapsed.as_secs_f64()
    );
    Scenario { name, what, warmup, measured, allocs }
}

// === the report ===

fn print_table(settings: &Settings, workers: usize, rows: &[&Scenario], balance_line: &str) {
    println!();
    println!("| scenario | requests | req/s | p50 (µs) | p99 (µs) | errors |");
    println!("|---|---:|---:|---:|---:|---:|");
    for s in rows {
        let m = &s.measured;
        let errors = match (m.error_count(), m.aborted) {
            (n, true) => format!("**{n} (cut off after {PHASE_LIMIT:?})**"),
            (0, false) => "0".to_owned(),
            (n, false) => format!("**{n}**"),
        };
        println!(
            "| {} `{}` | {} | {} | {} | {} | {} |",
            s.name,
            s.what,
            thousands(m.completed() as f64),
            thousands(m.per_second()),
            thousands(m.percentile_us(50.0)),
            thousands(m.percentile_us(99.0)),
            errors
        );
    }
    let ratio = |x: &Scenario, y: &Scenario| {
        let (x, y) = (&x.measured, &y.measured);
        let r = |n: f64, d: f64| if (n / d).is_finite() { format!("{:.2}×", n / d) } else { "–".to_owned() };
        format!(
            "req/s {}, p50 {}, p99 {}",
            r(x.per_second(), y.per_second()),
            r(x.percentile_us(50.0), y.percentile_us(50.0)),
            r(x.percentile_us(99.0), y.percentile_us(99.0))
        )
    };
    if let [a, b, c, rest @ ..] = rows {
        println!();
        println!("- **b/a** (free route through the gateway vs. the upstream directly): {}", ratio(b, a));
        println!("- **c/b** (metered chat vs. free route, both through the gateway): {}", ratio(c, b));
        if let [d] = rest {
            println!("- **d/b** (metered chat on Redis vs. free route): {}", ratio(d, b));
        }
    }
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!();
    println!(
        "{} requests per scenario after {} warm-up, {} closed-loop clients each on its own keep-alive \
         HTTP/1.1 connection over 127.0.0.1; one tokio multi-thread runtime ({workers} workers) on {cores} \
         cores shared by the client, the gateway and the fast upstream, so the gateway never has the machine \
         to itself; memory store for (a)–(c), a local redis-server (no persistence) for (d), `log.level = \"warn\"`. Latency = send until the whole answer is read, \
         successful requests only. {balance_line}.",
        thousands(settings.requests as f64),
        thousands(settings.warmup as f64),
        settings.concurrency,
    );
    if settings.count_allocs {
        let per_request = |s: &Scenario| s.allocs as f64 / s.measured.completed().max(1) as f64;
        let list: Vec<String> = rows.iter().map(|s| format!("{} {:.1}", &s.name[..3], per_request(s))).collect();
        println!();
        println!(
            "Heap allocations per request, whole process (client + upstream + gateway): {}; the gateway's \
             share is the difference to (a). Counting slows every allocation, so take the timings from a run \
             without `LOAD_COUNT_ALLOCS`.",
            list.join(", ")
        );
    }
}

/// `12345.6` → `12,346`; below 100 keeps one decimal.
fn thousands(x: f64) -> String {
    if !x.is_finite() {
        return "–".to_owned();
    }
    if x < 100.0 {
        return format!("{x:.1}");
    }
    let digits = format!("{:.0}", x);
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}
