//! The bank test (issue 11, item 2): accounts with known opening balances, two or three real
//! gateway processes on one Redis (AOF, `appendfsync always`), concurrent clients that record
//! every answer they get (chats, lead enrichments, transcriptions that queue when the account
//! cannot pay), admin top-ups with repeated payment refs, and faults on a schedule —
//! Redis SIGKILLed and restarted, replies lost after the script ran and connections stalled (a
//! [`FaultProxy`] between the gateways and Redis), `FUNCTION FLUSH`, a gateway SIGKILLed
//! mid-stream and restarted, an upstream refusing connections, hanging, failing and dying
//! mid-body. Then, once deferred refunds have settled, every account's books must balance exactly
//! and every answer must agree with the ledger (see [`check`] for the list of rules).
//!
//! It runs briefly in `cargo test` (10 s of traffic); `scripts/chaos` runs it longer with
//! `CHAOS_SECONDS`, `CHAOS_ACCOUNTS`, `CHAOS_INSTANCES`, `CHAOS_CLIENTS` and `CHAOS_SEED`.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use support::faultproxy::{Fault, FaultProxy};
use support::gateway::{ADMIN_TOKEN, ConfigBuilder};
use support::process::GatewayProcess;
use support::redis::RedisServer;
use support::upstream::{Behaviour, Upstream};

/// How long one request (head, then body) may take before the client gives up and records no
/// answer; far above any answer the gateway should give (store waits and upstream timeouts are
/// a second or two here), so it only fires for a gateway that died.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(12);

/// What an answer records when the client stopped waiting for the body: it hung up, which keeps
/// a delivered request's charge (README), so such an answer proves nothing either way.
const GAVE_UP: &str = "client gave up on the body";

/// What an answer records when no connection to the gateway could be made.
const NOT_CONNECTED: &str = "not connected";

/// The gateways' `upstream_timeout_ms`; a hanging upstream waits longer than this.
const UPSTREAM_TIMEOUT_MS: u64 = 1_500;

/// The settings of one run.
#[derive(Debug, Clone)]
struct Settings {
    seconds: u64,
    accounts: usize,
    instances: usize,
    clients: usize,
    seed: u64,
}

impl Settings {
    fn from_env() -> Self {
        let var = |name: &str, default: u64| -> u64 {
            std::env::var(name).ok().map_or(default, |v| v.parse().unwrap_or_else(|_| panic!("{name}={v:?}")))
        };
        let clock = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
        let settings = Settings {
            seconds: var("CHAOS_SECONDS", 10).clamp(3, 3_600),
            accounts: var("CHAOS_ACCOUNTS", 20).clamp(1, 500) as usize,
            instances: var("CHAOS_INSTANCES", 2).clamp(2, 3) as usize,
            clients: var("CHAOS_CLIENTS", 8).clamp(1, 64) as usize,
            seed: var("CHAOS_SEED", clock % 1_000_000),
        };
        println!("chaos: {settings:?} (CHAOS_SEED={} repeats the choices, not the timing)", settings.seed);
        settings
    }
}

/// A small deterministic generator (splitmix64): the run's choices follow `CHAOS_SEED`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
}

// === the fleet of gateways ===

/// One gateway slot: the address of its current process and which process that is.
#[derive(Debug, Clone)]
struct Instance {
    public: String,
    admin: String,
    generation: u64,
}

/// What clients see of the gateways: slots, each up (`Some`) or being restarted.
#[derive(Default)]
struct Fleet {
    slots: RwLock<Vec<Option<Instance>>>,
    in_flight: Vec<AtomicUsize>,
    /// (slot, generation, when) of every SIGKILL.
    kills: Mutex<Vec<(usize, u64, Instant)>>,
}

impl Fleet {
    fn pick(&self, rng: &mut Rng) -> Option<(usize, Instance)> {
        let slots = self.slots.read().unwrap();
        let up: Vec<(usize, &Instance)> =
            slots.iter().enumerate().filter_map(|(i, s)| s.as_ref().map(|s| (i, s))).collect();
        if up.is_empty() {
            return None;
        }
        let (i, s) = up[rng.below(up.len() as u64) as usize];
        Some((i, s.clone()))
    }

    /// When the process `(slot, generation)` was killed, if it was.
    fn killed_at(&self, slot: usize, generation: u64) -> Option<Instant> {
        self.kills.lock().unwrap().iter().find(|k| k.0 == slot && k.1 == generation).map(|k| k.2)
    }
}

// === what the clients sent and got ===

/// One metered request as sent, and its answer.
#[derive(Debug, Clone)]
struct Sent {
    /// `x-request-id`, unique per attempt.
    id: String,
    account: usize,
    key: Option<String>,
    /// A repeat of an earlier request's key (same body).
    resent: bool,
    cost: u64,
    /// The upstream behaviour the body asked for.
    upstream: &'static str,
    /// `ai_chat` (whose `refund_on` adds `timeout`), else `lead_enrichment` or
    /// `call_transcription` (the default `refund_on`).
    chat: bool,
    slot: usize,
    generation: u64,
    started: Instant,
    answer: Answer,
}

#[derive(Debug, Clone)]
enum Answer {
    /// No response head (connection failed, reset, or the client gave up).
    Nothing(String),
    /// A head, and the body or how it broke off.
    Head {
        status: u16,
        charged: Option<u64>,
        remaining: Option<i64>,
        replay: bool,
        refund_pending: bool,
        error_type: Option<String>,
        body: Result<Bytes, String>,
    },
}

/// The body and headers of one metered request.
#[derive(Debug, Clone)]
struct Prepared {
    path: &'static str,
    headers: Vec<(&'static str, String)>,
    body: String,
    cost: u64,
    upstream: &'static str,
}

/// One admin top-up as sent and answered.
#[derive(Debug, Clone)]
struct TopupSent {
    account: usize,
    payment_ref: String,
    credits: u64,
    status: Option<u16>,
}

fn account_id(i: usize) -> String {
    format!("chaos{i:03}")
}

/// Plans cycle over the accounts: some run dry (402s, all-or-nothing), some never do.
fn plan_of(i: usize) -> (&'static str, u64) {
    [("fifty", 50), ("starter", 500), ("starter", 500), ("big", 10_000)][i % 4]
}

fn prepare(rng: &mut Rng, marker: &str) -> Prepared {
    let upstream = match rng.below(100) {
        0..72 => "ok",
        72..82 => "slow",
        82..89 => "status500",
        89..93 => "hang",
        _ => "die",
    };
    let pick = rng.below(100);
    if pick < 10 {
        // Queued when the account cannot pay (202), run by the job runner once it can.
        let body = json!({"call_id": marker, "upstream": upstream, "marker": marker});
        Prepared { path: TRANSCRIBE, headers: Vec::new(), body: body.to_string(), cost: 2, upstream }
    } else if pick < 60 {
        let (tier, cost) = [("fast", 1), ("balanced", 3), ("powerful", 5)][rng.below(3) as usize];
        let mut headers = Vec::new();
        let body = if rng.percent(50) {
            headers.push(("x-ai-tier", tier.to_owned()));
            json!({"messages": [{"role": "user", "content": "hi"}], "upstream": upstream, "marker": marker})
        } else {
            json!({"messages": [{"role": "user", "content": "hi"}], "tier": tier, "upstream": upstream, "marker": marker})
        };
        Prepared { path: "/v1/chat/completions", headers, body: body.to_string(), cost, upstream }
    } else {
        let n = 1 + rng.below(4);
        let leads: Vec<Value> = (0..n).map(|i| json!({"id": i})).collect();
        let body = json!({"leads": leads, "upstream": upstream, "marker": marker});
        Prepared { path: "/v1/leads/enrich", headers: Vec::new(), body: body.to_string(), cost: n, upstream }
    }
}

const TRANSCRIBE: &str = "/v1/calls/transcribe";

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends one request and records whatever came back, never panicking.
async fn attempt(client: &HttpClient, method: &str, url: &str, headers: &[(&str, &str)], body: String) -> Answer {
    let mut req = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body))).expect("request");
    let res = match tokio::time::timeout(CLIENT_TIMEOUT, client.request(req)).await {
        Err(_) => return Answer::Nothing("no answer head in time".into()),
        // A connection that could not be made never reached a gateway.
        Ok(Err(e)) if e.is_connect() => return Answer::Nothing(format!("{NOT_CONNECTED}: {e:?}")),
        Ok(Err(e)) => return Answer::Nothing(format!("{e:?}")),
        Ok(Ok(res)) => res,
    };
    let (parts, incoming) = res.into_parts();
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = match tokio::time::timeout(CLIENT_TIMEOUT, incoming.collect()).await {
        Err(_) => Err(GAVE_UP.to_owned()),
        Ok(Err(e)) => Err(format!("{e:?}")),
        Ok(Ok(b)) => Ok(b.to_bytes()),
    };
    let error_type = body
        .as_ref()
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(b).ok())
        .and_then(|v| v["error"]["type"].as_str().map(str::to_owned));
    Answer::Head {
        status: parts.status.as_u16(),
        charged: header("x-credits-charged").and_then(|v| v.parse().ok()),
        remaining: header("x-credits-remaining").and_then(|v| v.parse().ok()),
        replay: header("x-idempotent-replay").as_deref() == Some("true"),
        refund_pending: header("x-credits-refund").as_deref() == Some("pending"),
        error_type,
        body,
    }
}

/// Everything the clients and the top-up task share.
struct Traffic {
    fleet: Arc<Fleet>,
    keys: Vec<String>,
    /// Per account, the keyed requests sent so far (key, request), for re-sends.
    keyed: Mutex<Vec<Vec<(String, Prepared)>>>,
    sent: Mutex<Vec<Sent>>,
    stop: Instant,
}

async fn client_loop(traffic: Arc<Traffic>, client_no: usize, seed: u64) {
    let mut rng = Rng(seed ^ (client_no as u64).wrapping_mul(0xA24B_AED4_963E_E407));
    let http = http_client();
    let accounts = traffic.keys.len();
    // Bounded in count as well as in time.
    for seq in 0..100_000u64 {
        if Instant::now() >= traffic.stop {
            return;
        }
        // 40 % to the small-plan accounts (every fourth), which run dry: 402s, queued jobs.
        let account = match rng.below(accounts as u64) as usize {
            a if rng.percent(40) => a - a % 4,
            a => a,
        };
        let id = format!("chaos-{client_no}-{seq}");
        let resend = {
            let keyed = traffic.keyed.lock().unwrap();
            let list = &keyed[account];
            (!list.is_empty() && rng.percent(25)).then(|| {
                let recent = list.len().saturating_sub(20);
                list[recent + rng.below((list.len() - recent) as u64) as usize].clone()
            })
        };
        let (key, prepared, resent) = match resend {
            Some((key, prepared)) => (Some(key), prepared, true),
            None if rng.percent(40) => {
                let key = format!("key-{id}");
                let prepared = prepare(&mut rng, &key);
                traffic.keyed.lock().unwrap()[account].push((key.clone(), prepared.clone()));
                (Some(key), prepared, false)
            }
            None => (None, prepare(&mut rng, &id), false),
        };
        let Some((slot, instance)) = traffic.fleet.pick(&mut rng) else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let auth = format!("Bearer {}", traffic.keys[account]);
        let mut headers: Vec<(&str, &str)> =
            vec![("authorization", &auth), ("content-type", "application/json"), ("x-request-id", &id)];
        if let Some(k) = &key {
            headers.push(("idempotency-key", k));
        }
        headers.extend(prepared.headers.iter().map(|(k, v)| (*k, v.as_str())));
        let url = format!("{}{}", instance.public, prepared.path);
        let started = Instant::now();
        traffic.fleet.in_flight[slot].fetch_add(1, Ordering::Relaxed);
        let answer = attempt(&http, "POST", &url, &headers, prepared.body.clone()).await;
        traffic.fleet.in_flight[slot].fetch_sub(1, Ordering::Relaxed);
        // A client that is refused backs off a little, as real ones do (503s come with
        // Retry-After), so a fault window is not all the traffic of the run.
        let pause = match &answer {
            Answer::Head { status: 502 | 503, .. } => 150,
            Answer::Nothing(_) => 100,
            _ => 0,
        };
        traffic.sent.lock().unwrap().push(Sent {
            id,
            account,
            key,
            resent,
            cost: prepared.cost,
            upstream: prepared.upstream,
            chat: prepared.path == "/v1/chat/completions",
            slot,
            generation: instance.generation,
            started,
            answer,
        });
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

async fn admin_call(client: &HttpClient, base: &str, method: &str, path: &str, body: Option<Value>) -> Answer {
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
    attempt(client, method, &format!("{base}{path}"), &headers, body.map(|b| b.to_string()).unwrap_or_default()).await
}

/// Top-ups through the admin API every 250 ms, some with a payment ref sent before.
async fn topup_loop(traffic: Arc<Traffic>, seed: u64) -> Vec<TopupSent> {
    let mut rng = Rng(seed ^ 0x7070);
    let http = http_client();
    let mut sent: Vec<TopupSent> = Vec::new();
    for n in 0..100_000u64 {
        if Instant::now() >= traffic.stop {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        // Half go to the small-plan accounts, which run dry and queue transcriptions: a top-up
        // is what runs their jobs.
        let accounts = traffic.keys.len() as u64;
        let account = match rng.below(accounts) as usize {
            a if rng.percent(50) => a - a % 4,
            a => a,
        };
        let earlier: Vec<&TopupSent> = sent.iter().filter(|t| t.account == account).collect();
        let (payment_ref, credits) = if !earlier.is_empty() && rng.percent(30) {
            let t = earlier[rng.below(earlier.len() as u64) as usize];
            (t.payment_ref.clone(), t.credits)
        } else {
            // Small ones for the small plan: they keep running dry and queueing.
            let sizes = if plan_of(account).1 <= 50 { [10, 20, 50] } else { [50, 200, 500] };
            (format!("pay-{account}-{n}"), sizes[rng.below(3) as usize])
        };
        let Some((_, instance)) = traffic.fleet.pick(&mut rng) else { continue };
        let path = format!("/admin/v1/accounts/{}/topups", account_id(account));
        let body = json!({"credits": credits, "payment_ref": payment_ref});
        let status = match admin_call(&http, &instance.admin, "POST", &path, Some(body)).await {
            Answer::Head { status, .. } => Some(status),
            Answer::Nothing(_) => None,
        };
        sent.push(TopupSent { account, payment_ref, credits, status });
    }
    sent
}

// === faults ===

/// The fault kinds, in the order of one cycle, at fractions of the cycle.
const SCHEDULE: [(f64, &str); 8] = [
    (0.08, "gateway SIGKILL + restart"),
    (0.18, "upstream refusing (0.8 s)"),
    (0.28, "FUNCTION FLUSH"),
    (0.38, "redis replies lost (0.7 s)"),
    (0.52, "redis stalled (1.5 s)"),
    (0.68, "redis SIGKILL + restart"),
    (0.80, "FUNCTION FLUSH"),
    (0.88, "redis replies lost (0.3 s)"),
];

struct Faults {
    redis: RedisServer,
    redis_proxy: FaultProxy,
    upstream_proxy: FaultProxy,
    gateways: Vec<GatewayProcess>,
    config: String,
    fleet: Arc<Fleet>,
    counts: BTreeMap<&'static str, u64>,
    next_generation: u64,
}

impl Faults {
    /// Runs the schedule: one cycle per 12 s of traffic (at least one), all within `seconds`.
    async fn run(&mut self, start: Instant, seconds: u64, seed: u64) {
        let mut rng = Rng(seed ^ 0xFA17);
        let cycles = (seconds / 12).max(1);
        let cycle = Duration::from_secs_f64(seconds as f64 / cycles as f64);
        for c in 0..cycles {
            for (at, kind) in SCHEDULE {
                let when = start + cycle * c as u32 + cycle.mul_f64(at);
                tokio::time::sleep_until(when.into()).await;
                self.inject(kind, &mut rng).await;
                *self.counts.entry(kind).or_default() += 1;
            }
        }
    }

    async fn inject(&mut self, kind: &str, rng: &mut Rng) {
        let window = |s: f64| tokio::time::sleep(Duration::from_secs_f64(s));
        match kind {
            "gateway SIGKILL + restart" => self.kill_gateway(rng).await,
            "upstream refusing (0.8 s)" => {
                self.upstream_proxy.set(Fault::Refuse);
                window(0.8).await;
                self.upstream_proxy.set(Fault::Pass);
            }
            "FUNCTION FLUSH" => {
                tokio::task::block_in_place(|| self.redis.command(&["FUNCTION", "FLUSH"]));
            }
            "redis replies lost (0.7 s)" | "redis replies lost (0.3 s)" => {
                self.redis_proxy.set(Fault::DropReplies);
                window(if kind.contains("0.7") { 0.7 } else { 0.3 }).await;
                self.redis_proxy.set(Fault::Pass);
            }
            "redis stalled (1.5 s)" => {
                self.redis_proxy.set(Fault::Stall);
                window(1.5).await;
                self.redis_proxy.set(Fault::Pass);
            }
            "redis SIGKILL + restart" => {
                tokio::task::block_in_place(|| self.redis.kill());
                window(0.5).await;
                tokio::task::block_in_place(|| self.redis.relaunch());
            }
            other => unreachable!("{other}"),
        }
    }

    /// SIGKILLs one gateway while it has requests in flight, then starts a new process in its slot.
    async fn kill_gateway(&mut self, rng: &mut Rng) {
        let slot = rng.below(self.gateways.len() as u64) as usize;
        // Mid-stream: wait (bounded) until the victim is serving something.
        for _ in 0..100 {
            if self.fleet.in_flight[slot].load(Ordering::Relaxed) > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let generation = self.fleet.slots.write().unwrap()[slot].take().map(|i| i.generation).unwrap_or_default();
        self.gateways[slot].kill();
        self.fleet.kills.lock().unwrap().push((slot, generation, Instant::now()));
        let process = GatewayProcess::start_logging(&self.config, "error").await;
        self.next_generation += 1;
        let instance =
            Instance { public: process.public.clone(), admin: process.admin.clone(), generation: self.next_generation };
        self.gateways[slot] = process;
        self.fleet.slots.write().unwrap()[slot] = Some(instance);
    }
}

// === the books ===

/// One history entry as the admin API shows it.
#[derive(Debug, Clone)]
struct Entry {
    seq: u64,
    kind: String,
    monthly_delta: i64,
    topup_delta: i64,
    monthly_after: i64,
    topup_after: i64,
    request_id: Option<String>,
    charge_id: Option<String>,
    payment_ref: Option<String>,
}

impl Entry {
    fn parse(v: &Value) -> Entry {
        let int = |k: &str| v[k].as_i64().unwrap_or_else(|| panic!("history entry without {k}: {v}"));
        let text = |k: &str| v[k].as_str().map(str::to_owned);
        Entry {
            seq: int("seq") as u64,
            kind: text("kind").unwrap_or_default(),
            monthly_delta: int("monthly_delta"),
            topup_delta: int("topup_delta"),
            monthly_after: int("monthly_after"),
            topup_after: int("topup_after"),
            request_id: text("request_id"),
            charge_id: text("charge_id"),
            payment_ref: text("payment_ref"),
        }
    }

    fn delta(&self) -> i64 {
        self.monthly_delta + self.topup_delta
    }

    fn line(&self) -> String {
        format!(
            "  #{:<4} {:<9} monthly {:+5} topup {:+5} → {:>6} / {:<6} {}{}{}",
            self.seq,
            self.kind,
            self.monthly_delta,
            self.topup_delta,
            self.monthly_after,
            self.topup_after,
            self.request_id.as_deref().map(|r| format!("request {r} ")).unwrap_or_default(),
            self.charge_id.as_deref().map(|c| format!("charge {c} ")).unwrap_or_default(),
            self.payment_ref.as_deref().map(|p| format!("payment_ref {p}")).unwrap_or_default(),
        )
    }
}

/// An account's whole history (oldest first) and its balance as `GET /admin/v1/accounts/{id}` says.
struct Books {
    history: Vec<Entry>,
    monthly: i64,
    topup: i64,
}

async fn read_books(http: &HttpClient, admin: &str, account: usize) -> Result<Books, String> {
    let id = account_id(account);
    let json = |a: Answer| -> Result<Value, String> {
        match a {
            Answer::Head { status: 200, body: Ok(b), .. } => serde_json::from_slice(&b).map_err(|e| e.to_string()),
            other => Err(format!("{other:?}")),
        }
    };
    let view = json(admin_call(http, admin, "GET", &format!("/admin/v1/accounts/{id}"), None).await)?;
    let mut history = Vec::new();
    let mut before: Option<u64> = None;
    for _ in 0..1_000 {
        let page = match before {
            Some(b) => format!("/admin/v1/accounts/{id}/ledger?limit=500&before={b}"),
            None => format!("/admin/v1/accounts/{id}/ledger?limit=500"),
        };
        let page = json(admin_call(http, admin, "GET", &page, None).await)?;
        history.extend(page["entries"].as_array().ok_or("no entries")?.iter().map(Entry::parse));
        match page["next_before"].as_u64() {
            Some(b) => before = Some(b),
            None => break,
        }
    }
    history.sort_by_key(|e| e.seq);
    let int = |k: &str| view[k].as_i64().ok_or_else(|| format!("account view without {k}: {view}"));
    Ok(Books { history, monthly: int("monthly_remaining")?, topup: int("topup_remaining")? })
}

/// What `GET /v1/jobs/{id}` says of each job a 202 named: account and the job's JSON.
type Jobs = BTreeMap<String, (usize, Value)>;

/// The job ids of every 202 (`{"job_id", "status": "queued"}`), first or replayed.
fn queued_jobs(sent: &[Sent]) -> BTreeMap<String, usize> {
    let mut jobs = BTreeMap::new();
    for s in sent {
        if let Answer::Head { status: 202, body: Ok(b), .. } = &s.answer
            && let Some(id) =
                serde_json::from_slice::<Value>(b).ok().and_then(|v| v["job_id"].as_str().map(str::to_owned))
        {
            jobs.insert(id, s.account);
        }
    }
    jobs
}

async fn read_jobs(http: &HttpClient, public: &str, keys: &[String], queued: &BTreeMap<String, usize>) -> Jobs {
    let mut jobs = Jobs::new();
    for (id, &account) in queued {
        let auth = format!("Bearer {}", keys[account]);
        let answer =
            attempt(http, "GET", &format!("{public}/v1/jobs/{id}"), &[("authorization", &auth)], String::new()).await;
        if let Answer::Head { status: 200, body: Ok(b), .. } = answer
            && let Ok(v) = serde_json::from_slice::<Value>(&b)
        {
            jobs.insert(id.clone(), (account, v));
        }
    }
    jobs
}

/// One broken rule. `settling` ones may still resolve by themselves (a refund written late).
#[derive(Debug, Clone)]
struct Anomaly {
    account: usize,
    settling: bool,
    text: String,
}

/// Totals for the printed table.
#[derive(Debug, Default)]
struct Totals {
    charges: u64,
    charged_credits: i64,
    refunds: u64,
    refunded_credits: i64,
    topups: u64,
    topup_credits: i64,
    kept_unanswered: u64,
    refunded_503: u64,
    job_attempts: u64,
    jobs: BTreeMap<String, u64>,
    known_503_jobs: u64,
}

/// The rules, per account, over the books and every recorded answer:
///
/// 1. The history is whole (seq 1..n, opening `created` with the plan's allocation) and chained:
///    each entry's buckets are the previous ones plus its deltas, never negative, and the last
///    equals the account's balance. Only `created`, `charge`, `refund` and `topup` appear.
/// 2. opening + top-ups − charges + refunds = balance.
/// 3. Top-ups: each payment ref credited at most once, with the credits sent; every ref answered
///    200/201 is credited; nothing credited that was not sent.
/// 4. Charges: one per request id at most, each for a request a client sent, for its price; each
///    refund is of a charge of the account, at most once, and returns exactly that charge.
/// 5. Answers (SPEC §4, README "Guarantees"): a 2xx that says `x-credits-charged: c > 0` and
///    whose body arrived whole has its charge, of c = the price, standing (not refunded), and says
///    as `x-credits-remaining` the balance that charge left; one whose body broke
///    off is refunded (`refund_on` has `status_5xx` for both operations), unless its gateway was
///    killed; the upstream's 500, a 502 and a chat's 504 say `x-credits-charged: 0` and leave no
///    charge standing (`refund_on` of the shipped config); a lead enrichment's 504 (a timeout
///    after delivery, which its `refund_on` keeps) says it charged the price and the charge
///    stands; a 503 `store_unavailable`, a 402 and a 409 leave no charge standing; a replay
///    (`x-idempotent-replay: true`) has no charge of its own and carries the answer of a paid
///    request with the same key. A request that could not connect has no charge; one with no
///    answer head at all may have a standing charge or not (README: a gateway that dies after
///    charging keeps the charge); it is counted.
/// 6. No idempotency key has two standing charges.
/// 7. Every request the upstream received was charged first (nothing forwarded uncharged).
/// 8. Queued jobs (charge ids `job-<id>-<attempt>`, one per attempt): each for a request that was
///    answered 202 (or not at all), at its price; at most one attempt of a job stands ("ran at
///    most once paid"); a job `done` with a 2xx result has exactly one, and its result is the
///    upstream's answer to that job; a job still `queued` has none. A job of a request answered
///    503 is a known bug (README, "Not guaranteed yet"): counted in the table, not an anomaly.
fn check(
    books: &[Books],
    sent: &[Sent],
    topups: &[TopupSent],
    jobs: &Jobs,
    upstream: &Upstream,
    fleet: &Fleet,
    totals: &mut Totals,
) -> Vec<Anomaly> {
    let mut anomalies = Vec::new();
    let mut flag = |account: usize, settling: bool, text: String| anomalies.push(Anomaly { account, settling, text });
    let by_id: HashMap<&str, &Sent> = sent.iter().map(|s| (s.id.as_str(), s)).collect();
    // Per request id: (charge entry, refunded?); job attempts apart, per job id.
    let mut charge_of: HashMap<String, Vec<(Entry, bool)>> = HashMap::new();
    let mut job_charges: HashMap<String, Vec<(Entry, bool)>> = HashMap::new();

    for (account, b) in books.iter().enumerate() {
        let (_, allocation) = plan_of(account);
        // 1. whole and chained
        let mut prev: Option<&Entry> = None;
        for (i, e) in b.history.iter().enumerate() {
            if e.seq != i as u64 + 1 {
                flag(account, false, format!("history not whole: entry {} at position {}", e.seq, i + 1));
                break;
            }
            if e.monthly_after < 0 || e.topup_after < 0 {
                flag(account, false, format!("negative balance at #{}", e.seq));
            }
            match prev {
                None if e.kind != "created" || e.monthly_after != allocation as i64 || e.topup_after != 0 => {
                    flag(account, false, format!("opening entry is not `created` with {allocation}: {}", e.line()));
                }
                Some(p)
                    if p.monthly_after + e.monthly_delta != e.monthly_after
                        || p.topup_after + e.topup_delta != e.topup_after =>
                {
                    flag(account, false, format!("history does not chain at #{}", e.seq));
                }
                _ => {}
            }
            if prev.is_some() && !matches!(e.kind.as_str(), "charge" | "refund" | "topup") {
                flag(account, false, format!("unexpected history entry: {}", e.line()));
            }
            prev = Some(e);
        }
        let last = b.history.last();
        if last.map(|e| (e.monthly_after, e.topup_after)) != Some((b.monthly, b.topup)) {
            flag(account, false, format!("balance {} + {} is not the history's last entry", b.monthly, b.topup));
        }
        if b.monthly < 0 || b.topup < 0 {
            flag(account, false, format!("negative balance {} + {}", b.monthly, b.topup));
        }

        // 2. the bank equation
        let sum = |kind: &str| b.history.iter().filter(|e| e.kind == kind).map(Entry::delta).sum::<i64>();
        let (charged, refunded, topped) = (-sum("charge"), sum("refund"), sum("topup"));
        if allocation as i64 + topped - charged + refunded != b.monthly + b.topup {
            flag(
                account,
                false,
                format!(
                    "books do not balance: {allocation} + {topped} − {charged} + {refunded} ≠ {}",
                    b.monthly + b.topup
                ),
            );
        }
        totals.charged_credits += charged;
        totals.refunded_credits += refunded;
        totals.topup_credits += topped;

        // 3. top-ups
        let mut credited: HashMap<&str, i64> = HashMap::new();
        for e in b.history.iter().filter(|e| e.kind == "topup") {
            totals.topups += 1;
            let r = e.payment_ref.as_deref().unwrap_or("");
            if credited.insert(r, e.topup_delta).is_some() {
                flag(account, false, format!("payment ref {r} credited twice"));
            }
            match topups.iter().find(|t| t.account == account && t.payment_ref == r) {
                None => flag(account, false, format!("top-up {r} credited but never sent")),
                Some(t) if (t.credits as i64, 0) != (e.topup_delta, e.monthly_delta) => {
                    flag(account, false, format!("top-up {r} sent {} credited {}", t.credits, e.line()))
                }
                Some(_) => {}
            }
        }
        for t in topups.iter().filter(|t| t.account == account && matches!(t.status, Some(200 | 201))) {
            if !credited.contains_key(t.payment_ref.as_str()) {
                flag(account, false, format!("top-up {} answered {:?} but not credited", t.payment_ref, t.status));
            }
        }

        // 4. charges and refunds
        let mut charges: HashMap<&str, &Entry> = HashMap::new();
        let mut refunds: HashMap<&str, &Entry> = HashMap::new();
        for e in &b.history {
            let cid = e.charge_id.as_deref().unwrap_or("");
            match e.kind.as_str() {
                "charge" => {
                    totals.charges += 1;
                    if charges.insert(cid, e).is_some() {
                        flag(account, false, format!("charge id {cid} charged twice"));
                    }
                    let rid = e.request_id.as_deref().unwrap_or("");
                    match by_id.get(rid) {
                        Some(s) if s.account == account && s.cost as i64 == -e.delta() => {}
                        Some(s) => flag(
                            account,
                            false,
                            format!("charge of {} for request {rid} of cost {}", -e.delta(), s.cost),
                        ),
                        None => flag(account, false, format!("charge for a request nobody sent: {}", e.line())),
                    }
                }
                "refund" => {
                    totals.refunds += 1;
                    if refunds.insert(cid, e).is_some() {
                        flag(account, false, format!("charge {cid} refunded twice"));
                    }
                    match charges.get(cid) {
                        None => flag(account, false, format!("refund of no earlier charge: {}", e.line())),
                        Some(c) if (c.monthly_delta, c.topup_delta) != (-e.monthly_delta, -e.topup_delta) => {
                            flag(account, false, format!("refund does not return its charge: {}", e.line()))
                        }
                        Some(_) => {}
                    }
                }
                _ => {}
            }
        }
        for (cid, e) in &charges {
            let refunded = refunds.contains_key(cid);
            match cid.strip_prefix("job-").and_then(|rest| rest.rsplit_once('-')) {
                Some((job, _attempt)) => job_charges.entry(job.to_owned()).or_default().push(((*e).clone(), refunded)),
                None => charge_of
                    .entry(e.request_id.clone().unwrap_or_default())
                    .or_default()
                    .push(((*e).clone(), refunded)),
            }
        }
    }

    // 5. every answer against the ledger
    let standing = |id: &str| -> Option<bool> { charge_of.get(id).map(|c| c.iter().any(|(_, refunded)| !refunded)) };
    let requests = upstream.requests();
    for s in sent {
        let charges = charge_of.get(&s.id).map_or(0, Vec::len);
        if charges > 1 {
            flag(s.account, false, format!("request {} charged {charges} times", s.id));
        }
        let stands = standing(&s.id) == Some(true);
        let Answer::Head { status, charged, remaining, replay, refund_pending, error_type, body } = &s.answer else {
            if matches!(&s.answer, Answer::Nothing(why) if why.starts_with(NOT_CONNECTED)) && charges > 0 {
                flag(s.account, false, format!("request {} never reached a gateway but was charged", s.id));
            }
            totals.kept_unanswered += u64::from(stands);
            continue;
        };
        let killed_after_start = fleet.killed_at(s.slot, s.generation).is_some_and(|k| k >= s.started);
        let what = format!(
            "request {} ({}, key {:?}, upstream {}) answered {status} charged {charged:?}{}{}",
            s.id,
            s.cost,
            s.key,
            s.upstream,
            if *replay { " replay" } else { "" },
            if *refund_pending { " refund pending" } else { "" }
        );
        if *replay {
            if charges > 0 {
                flag(s.account, false, format!("{what}: a replay has a charge of its own"));
            }
            if *charged != Some(0) {
                flag(s.account, false, format!("{what}: a replay says it charged"));
            }
            // The replayed answer is the stored one of a paid request with the same key.
            if let Some(n) =
                body.as_ref().ok().and_then(|b| serde_json::from_slice::<Value>(b).ok()).and_then(|v| v["n"].as_u64())
            {
                let original =
                    requests.get(n as usize).and_then(|r| r.header("x-request-id")).and_then(|id| by_id.get(id));
                match original {
                    Some(o) if o.account == s.account && o.key == s.key => {
                        if standing(&o.id) != Some(true) {
                            flag(
                                s.account,
                                true,
                                format!("{what}: replays request {} whose charge does not stand", o.id),
                            );
                        }
                    }
                    _ => flag(s.account, false, format!("{what}: replays upstream answer {n} of another request")),
                }
            }
            continue;
        }
        match (*status, *charged) {
            // Queued (the account could not pay): nothing charged now; the job pays (rule 8).
            (202, _) => {
                if *charged != Some(0) || charges > 0 {
                    flag(s.account, false, format!("{what}: a queued request was charged"));
                }
            }
            (200..=299, Some(c)) if c > 0 => {
                // The price, and the balance right after this charge (no auto top-up here).
                let after = charge_of.get(&s.id).and_then(|c| c.first()).map(|(e, _)| e.monthly_after + e.topup_after);
                if c != s.cost || (after.is_some() && *remaining != after) {
                    flag(
                        s.account,
                        false,
                        format!("{what}: says remaining {remaining:?}, the ledger {after:?} (price {})", s.cost),
                    );
                }
                if charges == 0 {
                    flag(s.account, false, format!("{what}: no charge in the history"));
                } else if body.is_ok() && !stands {
                    flag(s.account, false, format!("{what}: its charge was refunded"));
                } else if body.as_ref().is_err_and(|e| !e.contains(GAVE_UP)) && stands && !killed_after_start {
                    flag(
                        s.account,
                        true,
                        format!("{what}: the body broke off ({:?}) but the charge stands", body.as_ref().err()),
                    );
                }
                if let Some(n) = body
                    .as_ref()
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Value>(b).ok())
                    .and_then(|v| v["n"].as_u64())
                    && requests.get(n as usize).and_then(|r| r.header("x-request-id")) != Some(s.id.as_str())
                {
                    flag(s.account, false, format!("{what}: answered with upstream answer {n} of another request"));
                }
            }
            (200..=299, _) => flag(s.account, false, format!("{what}: a metered 2xx without a charge")),
            // The backend failed in a way `refund_on` names: the upstream's 500, a 502, a
            // chat's 504 — refunded, and the answer says so.
            (500 | 502, _) | (504, _) if *status != 504 || s.chat => {
                if *charged != Some(0) {
                    flag(s.account, false, format!("{what}: a failed call that refund_on refunds must say charged 0"));
                }
                if stands {
                    flag(s.account, true, format!("{what}: a failed call that refund_on refunds is still charged"));
                }
            }
            // A lead enrichment's 504: `refund_on` keeps a timeout after delivery (the hanging
            // upstream reads the body first) and refunds one before; either way the answer says
            // which.
            (504, Some(c)) if c == s.cost => {
                if !stands {
                    flag(s.account, false, format!("{what}: a timeout refund_on keeps must stand"));
                }
            }
            (_, Some(c)) if c > 0 => {
                if !stands {
                    flag(s.account, false, format!("{what}: said charged but the charge does not stand"));
                }
            }
            _ => {
                if stands {
                    flag(s.account, true, format!("{what} ({error_type:?}): the charge stands"));
                }
                if *status == 402 && charges > 0 {
                    flag(s.account, false, format!("{what}: a 402 left a charge entry"));
                }
                if *status == 503 && charges > 0 && !stands {
                    totals.refunded_503 += 1;
                }
            }
        }
    }

    // 6. one standing charge per idempotency key
    let mut per_key: HashMap<(usize, &str), Vec<&str>> = HashMap::new();
    for s in sent.iter().filter(|s| standing(&s.id) == Some(true)) {
        if let Some(k) = &s.key {
            per_key.entry((s.account, k)).or_default().push(&s.id);
        }
    }
    for ((account, key), ids) in per_key {
        if ids.len() > 1 {
            flag(account, false, format!("idempotency key {key} charged {} times: requests {ids:?}", ids.len()));
        }
    }

    // 7. nothing forwarded uncharged
    for r in &requests {
        let Some(s) = r.header("x-request-id").and_then(|id| by_id.get(id)) else { continue };
        let job = r.header("idempotency-key").and_then(|k| k.strip_prefix("job-"));
        let paid = match job {
            Some(job) => job_charges.contains_key(job),
            None => charge_of.contains_key(&s.id),
        };
        if !paid {
            flag(s.account, false, format!("request {} ({job:?}) reached the upstream without a charge", s.id));
        }
    }

    // 8. queued jobs ran at most once paid
    let mut known_503_jobs = HashSet::new();
    for (job, attempts) in &job_charges {
        let account = attempts[0].0.request_id.as_deref().and_then(|r| by_id.get(r)).map_or(0, |s| s.account);
        for (e, _) in attempts {
            let rid = e.request_id.as_deref().unwrap_or("");
            match by_id.get(rid) {
                Some(s)
                    if s.cost as i64 == -e.delta()
                        && matches!(s.answer, Answer::Nothing(_) | Answer::Head { status: 202, .. }) => {}
                // Known, not yet fixed (README, "Not guaranteed yet"; the ignored
                // `redis_gateway.rs` test): the queueing step landed but its reply was lost, the
                // request was answered 503, and the job ran paid later. Counted, not failed on.
                Some(s)
                    if s.cost as i64 == -e.delta()
                        && matches!(&s.answer, Answer::Head { status: 503, error_type: Some(t), .. } if t == "store_unavailable") =>
                {
                    known_503_jobs.insert(job.clone());
                }
                _ => flag(
                    account,
                    false,
                    format!("job {job} charged for request {rid}, which was not queued: {}", e.line()),
                ),
            }
        }
        let standing = attempts.iter().filter(|(_, refunded)| !refunded).count();
        totals.job_attempts += attempts.len() as u64;
        if standing > 1 {
            flag(account, false, format!("job {job} paid {standing} times"));
        }
        match jobs.get(job).map(|(_, v)| v) {
            Some(v) if v["status"] == "queued" && standing > 0 => {
                flag(account, true, format!("job {job} is queued but an attempt stands: {v}"))
            }
            Some(v)
                if v["status"] == "done" && v["result"]["status"].as_u64().is_some_and(|s| (200..300).contains(&s)) =>
            {
                if standing != 1 {
                    flag(
                        account,
                        true,
                        format!("job {job} done with {} but {standing} attempts stand", v["result"]["status"]),
                    );
                }
                if let Some(n) = v["result"]["body"]["n"].as_u64()
                    && requests.get(n as usize).and_then(|r| r.header("idempotency-key")) != Some(&format!("job-{job}"))
                {
                    flag(account, false, format!("job {job}'s result is upstream answer {n} of another request"));
                }
            }
            _ => {}
        }
    }
    totals.known_503_jobs = known_503_jobs.len() as u64;
    for (job, (account, v)) in jobs {
        *totals.jobs.entry(v["status"].as_str().unwrap_or("?").to_owned()).or_default() += 1;
        if v["status"] == "done"
            && v["result"]["status"].as_u64().is_some_and(|s| (200..300).contains(&s))
            && !job_charges.contains_key(job)
        {
            flag(*account, false, format!("job {job} done without a charge: {v}"));
        }
    }
    anomalies
}

/// How many refunds wait in the store's pending lists.
fn pending_refunds(redis: &RedisServer) -> usize {
    (0..creditgate::ledger::keys::REFUND_SHARDS)
        .map(|s| {
            redis.command(&["LLEN", &creditgate::ledger::keys::pending_refunds(s)]).trim().parse::<usize>().unwrap_or(0)
        })
        .sum()
}

// === the run ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_books_balance_through_faults() {
    let settings = Settings::from_env();
    let began = Instant::now();
    let redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let redis_proxy = FaultProxy::start(format!("127.0.0.1:{}", redis.port()).parse().unwrap()).await;
    let upstream = Upstream::start(Behaviour::Chaos(Duration::from_millis(UPSTREAM_TIMEOUT_MS + 1_000))).await;
    let upstream_proxy = FaultProxy::start(upstream.addr).await;
    let config = ConfigBuilder::new(&format!("http://{}", upstream_proxy.addr()))
        .store(&format!("kind = \"redis\"\nurl = \"redis://{}\"\nmax_wait_ms = 1000", redis_proxy.addr()))
        .upstream_timeout_ms(UPSTREAM_TIMEOUT_MS)
        .extra("[idempotency]\nwait_ms = 1000")
        .build();

    let mut gateways = Vec::new();
    for _ in 0..settings.instances {
        gateways.push(GatewayProcess::start_logging(&config, "error").await);
    }
    let fleet = Arc::new(Fleet {
        slots: RwLock::new(
            gateways
                .iter()
                .enumerate()
                .map(|(i, g)| Some(Instance { public: g.public.clone(), admin: g.admin.clone(), generation: i as u64 }))
                .collect(),
        ),
        in_flight: (0..settings.instances).map(|_| AtomicUsize::new(0)).collect(),
        kills: Mutex::new(Vec::new()),
    });
    let http = http_client();
    let mut keys = Vec::new();
    for i in 0..settings.accounts {
        let admin = &gateways[i % gateways.len()].admin;
        let (plan, _) = plan_of(i);
        let created =
            admin_call(&http, admin, "POST", "/admin/v1/accounts", Some(json!({"id": account_id(i), "plan": plan})))
                .await;
        assert!(matches!(created, Answer::Head { status: 201, .. }), "create account: {created:?}");
        let path = format!("/admin/v1/accounts/{}/keys", account_id(i));
        let Answer::Head { status: 201, body: Ok(body), .. } =
            admin_call(&http, admin, "POST", &path, Some(json!({"role": "user"}))).await
        else {
            panic!("create key failed");
        };
        keys.push(serde_json::from_slice::<Value>(&body).unwrap()["key"].as_str().unwrap().to_owned());
    }

    // Traffic and faults, side by side.
    let start = Instant::now();
    let traffic = Arc::new(Traffic {
        fleet: fleet.clone(),
        keys,
        keyed: Mutex::new(vec![Vec::new(); settings.accounts]),
        sent: Mutex::new(Vec::new()),
        stop: start + Duration::from_secs(settings.seconds),
    });
    let clients: Vec<_> =
        (0..settings.clients).map(|c| tokio::spawn(client_loop(traffic.clone(), c, settings.seed))).collect();
    let topups = tokio::spawn(topup_loop(traffic.clone(), settings.seed));
    let mut faults = Faults {
        redis,
        redis_proxy,
        upstream_proxy,
        gateways,
        config,
        fleet: fleet.clone(),
        counts: BTreeMap::new(),
        next_generation: settings.instances as u64,
    };
    faults.run(start, settings.seconds, settings.seed).await;
    for c in clients {
        c.await.expect("client task");
    }
    let topups = topups.await.expect("top-up task");
    let traffic_secs = start.elapsed().as_secs_f64();

    // Settle: the pending-refund lists drain (every instance's sweeper writes them), then the
    // rules are checked; only "a refund is still due" may resolve by itself, within a bound.
    let settle_bound = Duration::from_secs(settings.seconds.clamp(8, 40));
    let settle_start = Instant::now();
    while pending_refunds(&faults.redis) > 0 && settle_start.elapsed() < settle_bound {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let sent = traffic.sent.lock().unwrap().clone();
    let queued = queued_jobs(&sent);
    let (anomalies, books, totals) = loop {
        let admin = fleet.pick(&mut Rng(1)).expect("a gateway is up").1.admin;
        let mut books = Vec::new();
        for a in 0..settings.accounts {
            // The store may still be closing its circuit after the last fault: a few tries.
            let mut read = read_books(&http, &admin, a).await;
            for _ in 0..40 {
                if read.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
                read = read_books(&http, &admin, a).await;
            }
            books.push(read.unwrap_or_else(|e| panic!("reading the books of {a}: {e}")));
        }
        let public = fleet.pick(&mut Rng(1)).expect("a gateway is up").1.public;
        let jobs = read_jobs(&http, &public, &traffic.keys, &queued).await;
        let mut totals = Totals::default();
        let anomalies = check(&books, &sent, &topups, &jobs, &upstream, &fleet, &mut totals);
        let settling = !anomalies.is_empty() && anomalies.iter().all(|a| a.settling);
        if !settling || settle_start.elapsed() >= settle_bound {
            break (anomalies, books, totals);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let pending = pending_refunds(&faults.redis);

    // The table.
    let mut by_status: BTreeMap<String, u64> = BTreeMap::new();
    let mut replays = 0;
    for s in &sent {
        let label = match &s.answer {
            Answer::Nothing(why) if why.contains("in time") => "no answer in time (client gave up)".to_owned(),
            Answer::Nothing(why) if why.starts_with(NOT_CONNECTED) => "no answer (could not connect)".to_owned(),
            Answer::Nothing(_) => "no answer (connection broke)".to_owned(),
            Answer::Head { replay: true, .. } => {
                replays += 1;
                "replayed (x-idempotent-replay)".to_owned()
            }
            Answer::Head { status, error_type, body: Err(_), .. } => {
                format!("{status} {} + body broke off", error_type.as_deref().unwrap_or(""))
            }
            Answer::Head { status, error_type, .. } => format!("{status} {}", error_type.as_deref().unwrap_or("")),
        };
        *by_status.entry(label).or_default() += 1;
    }
    let mut upstream_asked: BTreeMap<&str, u64> = BTreeMap::new();
    for s in &sent {
        *upstream_asked.entry(s.upstream).or_default() += 1;
    }
    println!(
        "\n=== chaos run: {:.1} s of traffic, {} accounts, {} gateways, {} clients, seed {} ===",
        traffic_secs, settings.accounts, settings.instances, settings.clients, settings.seed
    );
    println!("{:<48} {:>8}", "requests sent", sent.len());
    println!("{:<48} {:>8}", "  with Idempotency-Key", sent.iter().filter(|s| s.key.is_some()).count());
    println!("{:<48} {:>8}", "  re-sent keys", sent.iter().filter(|s| s.resent).count());
    for (kind, n) in &upstream_asked {
        println!("{:<48} {:>8}", format!("  upstream asked to: {kind}"), n);
    }
    println!("answers");
    for (label, n) in &by_status {
        println!("{:<48} {:>8}", format!("  {label}"), n);
    }
    println!("faults");
    for (kind, n) in &faults.counts {
        println!("{:<48} {:>8}", format!("  {kind}"), n);
    }
    println!("ledger");
    println!(
        "{:<48} {:>8}",
        "  charges (entries / credits)",
        format!("{} / {}", totals.charges, totals.charged_credits)
    );
    println!(
        "{:<48} {:>8}",
        "  refunds (entries / credits)",
        format!("{} / {}", totals.refunds, totals.refunded_credits)
    );
    println!(
        "{:<48} {:>8}",
        "  top-ups sent (refs repeated)",
        format!(
            "{} ({})",
            topups.len(),
            topups.len() - topups.iter().map(|t| (t.account, &t.payment_ref)).collect::<HashSet<_>>().len()
        )
    );
    println!(
        "{:<48} {:>8}",
        "  top-ups credited (entries / credits)",
        format!("{} / {}", totals.topups, totals.topup_credits)
    );
    println!("{:<48} {:>8}", "  503s whose charge landed and was refunded", totals.refunded_503);
    println!("{:<48} {:>8}", "  queued jobs (charged attempts)", format!("{} ({})", queued.len(), totals.job_attempts));
    for (status, n) in &totals.jobs {
        println!("{:<48} {:>8}", format!("    {status}"), n);
    }
    println!("{:<48} {:>8}", "  unanswered requests whose charge stands", totals.kept_unanswered);
    println!("{:<48} {:>8}", "  KNOWN BUG: 503s whose job was queued and ran", totals.known_503_jobs);
    println!("{:<48} {:>8}", "  refunds still pending in the store", pending);
    println!("{:<48} {:>8}", "  settle time (s)", format!("{:.1}", settle_start.elapsed().as_secs_f64()));
    println!("{:<48} {:>8}", "ANOMALIES", anomalies.len());
    println!("(whole run {:.1} s, {} replays)", began.elapsed().as_secs_f64(), replays);

    if !anomalies.is_empty() {
        for a in anomalies.iter().take(40) {
            println!("ANOMALY {}: {}", account_id(a.account), a.text);
        }
        let mut shown = HashSet::new();
        for a in &anomalies {
            if shown.len() < 3 && shown.insert(a.account) {
                println!("--- ledger of {} ---", account_id(a.account));
                for e in &books[a.account].history {
                    println!("{}", e.line());
                }
            }
        }
        for (i, g) in faults.gateways.iter().enumerate() {
            let log = g.log();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            println!("--- gateway {i} log (last {} error lines) ---", tail.len());
            for l in tail.iter().rev() {
                println!("{l}");
            }
        }
    }
    assert_eq!(pending, 0, "deferred refunds left in the store");
    assert!(anomalies.is_empty(), "{} anomalies (see above)", anomalies.len());
}
