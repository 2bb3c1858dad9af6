//! Soak run: ten minutes of mixed, partly hostile traffic against a real `creditgate serve` on
//! Redis, printing every 30 s what must level off — the gateway's RSS, open file descriptors and
//! live tasks, Redis memory, open connections and the outbox depth.
//!
//! `scripts/soak` (or `cargo bench --bench soak`) starts, all on loopback: a `redis-server` with
//! AOF in a temporary directory, a fake AI backend (JSON answers and, for `"stream": true`, a
//! slow SSE stream), and the release binary of the gateway on a config derived from the shipped
//! one (tight connection timeouts, small per-account queue budgets). It seeds 20 accounts, then
//! runs for `SOAK_SECS` (default 900):
//!
//! * metered chats from 16 workers (about 200/s each) over keep-alive connections, a fifth of
//!   them streaming and a tenth with an `Idempotency-Key` from a bounded set, each repeated;
//! * free requests from 4 workers;
//! * 2 workers with unknown keys (a key scanner: 401 and then 429 per address);
//! * 2 slow clients that send a body in pieces and sometimes give up half-way;
//! * every 30 s, 50 half-open connections that send half a request head and wait;
//! * transcriptions on an account without credits (queued until its byte budget is full);
//! * a Redis restart (SIGTERM, start again on the same port and AOF) in the middle.
//!
//! The run ends with a verdict on each series (the last third against the middle third); it is a
//! measurement to read, not a pass/fail test.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ADMIN_TOKEN: &str = "soak-admin-token";
const ACCOUNTS: usize = 20;
const REPORT_EVERY: Duration = Duration::from_secs(30);

type Body = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    refused: AtomicU64,
    errors: AtomicU64,
    by_status: std::sync::Mutex<std::collections::BTreeMap<u16, u64>>,
}

fn main() {
    let secs: u64 = std::env::var("SOAK_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(900);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(run(Duration::from_secs(secs)));
}

/// `redis-server` on `port` with AOF in `dir`.
fn start_redis(port: u16, dir: &PathBuf) -> Child {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server (apt-get install redis-server)")
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli").arg("-p").arg(port.to_string()).args(args).output().expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn wait_port(port: u16) {
    for _ in 0..200 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing listens on {port}");
}

async fn run(duration: Duration) {
    let dir = std::env::temp_dir().join(format!("creditgate-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let redis_port = free_port();
    let mut redis = start_redis(redis_port, &dir);
    wait_port(redis_port).await;
    let upstream = start_upstream().await;
    let (public, admin) = (free_port(), free_port());
    let config = soak_config(public, admin, redis_port, upstream);
    let config_path = dir.join("soak.toml");
    std::fs::write(&config_path, config).unwrap();
    let mut gateway = Command::new(env!("CARGO_BIN_EXE_creditgate"))
        .args(["serve", "--config"])
        .arg(&config_path)
        .env("CREDITGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("gateway.log")).expect("log file"))
        .spawn()
        .expect("creditgate");
    let pid = gateway.id();
    wait_port(admin).await;
    let client: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new()).build_http();
    let public_url = format!("http://127.0.0.1:{public}");
    let admin_url = format!("http://127.0.0.1:{admin}");
    let keys = seed(&client, &admin_url, &public_url).await;
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..16 {
        let (client, url, key, counts, stop) =
            (client.clone(), public_url.clone(), keys[w % (ACCOUNTS - 1)].clone(), counts.clone(), stop.clone());
        tasks.push(tokio::spawn(async move { metered_worker(w, client, url, key, counts, stop).await }));
    }
    for _ in 0..4 {
        let (client, url, key, counts, stop) =
            (client.clone(), public_url.clone(), keys[0].clone(), counts.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let res = send(&client, Method::GET, &format!("{url}/v1/deals"), &key, &[], full("")).await;
                if !matches!(res, Ok(200)) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                tally(&counts, res);
            }
        }));
    }
    for s in 0..2 {
        let (client, url, counts, stop) = (client.clone(), public_url.clone(), counts.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let key = format!("cg_scanner{s}x{n:032}");
                let res =
                    send(&client, Method::POST, &format!("{url}/v1/chat/completions"), &key, &[], full("{}")).await;
                tally(&counts, res);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    for s in 0..2 {
        let (url, key, counts, stop) = (public_url.clone(), keys[1].clone(), counts.clone(), stop.clone());
        tasks.push(tokio::spawn(async move { slow_client(s, &url, &key, counts, stop).await }));
    }
    {
        let (client, url, key, counts, stop) =
            (client.clone(), public_url.clone(), keys[ACCOUNTS - 1].clone(), counts.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let body = format!(r#"{{"call":"{}"}}"#, "x".repeat(4000));
                let res =
                    send(&client, Method::POST, &format!("{url}/v1/calls/transcribe"), &key, &[], full(body)).await;
                tally(&counts, res);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    println!("soak: {}s of mixed traffic; gateway pid {pid}, redis port {redis_port}", duration.as_secs());
    println!(
        "{:>6} {:>9} {:>8} {:>8} {:>9} {:>6} {:>6} {:>11} {:>6} {:>7}",
        "t (s)", "ok", "refused", "errors", "RSS (MB)", "fds", "tasks", "redis (MB)", "conns", "outbox"
    );
    let started = Instant::now();
    let mut rows: Vec<[f64; 5]> = Vec::new();
    let mut restarted = false;
    let mut next_report = REPORT_EVERY;
    let mut half_open: Vec<TcpStream> = Vec::new();
    while started.elapsed() < duration {
        // Half-open connections: half a request head, then silence (the header timeout ends them).
        half_open.clear();
        for _ in 0..50 {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", public)).await {
                let _ = s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthor").await;
                half_open.push(s);
            }
        }
        if !restarted && started.elapsed() >= duration / 2 {
            restarted = true;
            println!("-- restarting Redis (SIGTERM, start again on the same AOF) --");
            let _ = Command::new("kill").arg("-TERM").arg(redis.id().to_string()).status();
            let _ = redis.wait();
            redis = start_redis(redis_port, &dir);
            wait_port(redis_port).await;
        }
        let wait = next_report.saturating_sub(started.elapsed()).min(Duration::from_secs(30));
        tokio::time::sleep(wait).await;
        if started.elapsed() >= next_report {
            next_report += REPORT_EVERY;
            let metrics = get_text(&client, &format!("{admin_url}/metrics")).await;
            let rss = proc_rss_mb(pid);
            let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0) as f64;
            let tasks = metric(&metrics, "creditgate_tasks");
            let redis_mb = redis_cli(redis_port, &["INFO", "memory"])
                .lines()
                .find_map(|l| l.strip_prefix("used_memory:"))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
                / 1e6;
            let conns = metric(&metrics, "creditgate_connections_open");
            let outbox = metric(&metrics, "creditgate_outbox_depth");
            println!(
                "{:>6} {:>9} {:>8} {:>8} {:>9.1} {:>6} {:>6} {:>11.2} {:>6} {:>7}",
                started.elapsed().as_secs(),
                counts.ok.load(Ordering::Relaxed),
                counts.refused.load(Ordering::Relaxed),
                counts.errors.load(Ordering::Relaxed),
                rss,
                fds,
                tasks,
                redis_mb,
                conns,
                outbox
            );
            rows.push([rss, fds, tasks, redis_mb, outbox]);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    println!("answers by status: {:?}", counts.by_status.lock().unwrap());
    verdict(&rows);
    let _ = gateway.kill();
    let _ = gateway.wait();
    let _ = redis.kill();
    let _ = redis.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether each series levelled off: the last third's peak against the middle third's, allowing
/// 20 % plus the series' own noise (connections and tasks come and go with the half-open bursts),
/// and the last third itself not still climbing (its last sample against its first, by more than
/// the noise and 5 %): a series that rises steadily to the end is not called level.
fn verdict(rows: &[[f64; 5]]) {
    if rows.len() < 3 {
        println!("too short a run for a verdict ({} samples)", rows.len());
        return;
    }
    let third = rows.len() / 3;
    let series = [("RSS (MB)", 2.0), ("fds", 20.0), ("tasks", 20.0), ("redis memory (MB)", 2.0), ("outbox", 5.0)];
    for (i, (name, noise)) in series.iter().enumerate() {
        let peak = |r: &[[f64; 5]]| r.iter().map(|row| row[i]).fold(0.0, f64::max);
        let (middle, last) = (peak(&rows[third..2 * third]), peak(&rows[2 * third..]));
        let (first_of_last, final_sample) = (rows[2 * third][i], rows[rows.len() - 1][i]);
        let climbing = final_sample > first_of_last * 1.05 + noise;
        let word = if last <= middle * 1.2 + noise && !climbing { "levelled off" } else { "STILL GROWING" };
        println!("{name}: middle-third peak {middle:.1}, last-third peak {last:.1}: {word}");
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok()).unwrap_or(0.0)
}

fn proc_rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").to_owned()))
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn tally(counts: &Counts, res: Result<u16, String>) {
    if let Ok(status) = res {
        *counts.by_status.lock().unwrap().entry(status).or_default() += 1;
    }
    match res {
        Ok(s) if s < 400 => counts.ok.fetch_add(1, Ordering::Relaxed),
        Ok(_) => counts.refused.fetch_add(1, Ordering::Relaxed),
        Err(_) => counts.errors.fetch_add(1, Ordering::Relaxed),
    };
}

async fn send(
    client: &Client<HttpConnector, Body>,
    method: Method,
    url: &str,
    key: &str,
    headers: &[(&str, &str)],
    body: Body,
) -> Result<u16, String> {
    let mut req = Request::builder().method(method).uri(url).header("authorization", format!("Bearer {key}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(body).map_err(|e| e.to_string())?;
    let res = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .map_err(|_| "timeout".to_owned())?
        .map_err(|e| e.to_string())?;
    let status = res.status().as_u16();
    let _ = tokio::time::timeout(Duration::from_secs(30), res.into_body().collect()).await;
    Ok(status)
}

async fn get_text(client: &Client<HttpConnector, Body>, url: &str) -> String {
    let req = Request::get(url).body(full("")).unwrap();
    match client.request(req).await {
        Ok(res) => String::from_utf8_lossy(&res.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default())
            .into_owned(),
        Err(_) => String::new(),
    }
}

async fn metered_worker(
    w: usize,
    client: Client<HttpConnector, Body>,
    url: String,
    key: String,
    counts: Arc<Counts>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let chat = format!("{url}/v1/chat/completions");
        let res = if n.is_multiple_of(10) {
            // A bounded set of keys, each repeated: replays, and idempotency records that stop growing.
            let idem = format!("soak-{w}-{}", (n / 20) % 25);
            send(&client, Method::POST, &chat, &key, &[("x-ai-tier", "fast"), ("idempotency-key", &idem)], full("{}"))
                .await
        } else if n.is_multiple_of(5) {
            send(&client, Method::POST, &chat, &key, &[("x-ai-tier", "fast")], full(r#"{"stream":true}"#)).await
        } else {
            send(&client, Method::POST, &chat, &key, &[("x-ai-tier", "fast")], full("{}")).await
        };
        // A steady load, not a throughput test (the load bench is that): about 200 requests a
        // second per worker; and a refusal (Redis restarting: 503) comes back at once, so back off.
        let pause = if matches!(res, Ok(200)) { 5 } else { 50 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
        tally(&counts, res);
    }
}

/// Sends a body in pieces over a raw connection; every third time it leaves half-way.
async fn slow_client(s: usize, url: &str, key: &str, counts: Arc<Counts>, stop: Arc<std::sync::atomic::AtomicBool>) {
    let addr: SocketAddr = url.trim_start_matches("http://").parse().unwrap();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let Ok(mut tcp) = TcpStream::connect(addr).await else { continue };
        let body = br#"{"conversation":"a slow client sends this in pieces"}"#;
        let head = format!(
            "POST /v1/sentiment HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let _ = tcp.write_all(head.as_bytes()).await;
        for (i, chunk) in body.chunks(8).enumerate() {
            if (n + s as u64).is_multiple_of(3) && i == 3 {
                break; // gives up half-way
            }
            let _ = tcp.write_all(chunk).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut buf = [0u8; 512];
        match tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => counts.ok.fetch_add(1, Ordering::Relaxed),
            _ => counts.refused.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// A fake AI backend: JSON answers; `"stream": true` bodies get five SSE chunks 50 ms apart.
async fn start_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    if body.windows(6).any(|w| w == b"stream") {
                        let chunks = futures_util::stream::unfold(0, |i| async move {
                            if i == 5 {
                                return None;
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            let data = Bytes::from(format!("data: {{\"delta\":\"{i}\"}}\n\n"));
                            Some((Ok::<_, std::convert::Infallible>(Frame::data(data)), i + 1))
                        });
                        let res = Response::builder()
                            .header("content-type", "text/event-stream")
                            .body(BodyExt::boxed(StreamBody::new(chunks)))
                            .unwrap();
                        Ok::<_, std::convert::Infallible>(res)
                    } else {
                        let res = Response::builder()
                            .header("content-type", "application/json")
                            .body(full(r#"{"id":"soak","choices":[{"message":{"content":"ok"}}]}"#))
                            .unwrap();
                        Ok(res)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
            });
        }
    });
    addr
}

/// The shipped config with the soak's listeners, store and upstream, tighter connection limits
/// and small per-account queue budgets.
fn soak_config(public: u16, admin: u16, redis_port: u16, upstream: SocketAddr) -> String {
    let shipped = include_str!("../config/gateway.toml");
    let mut out = String::new();
    for line in shipped.lines() {
        let t = line.trim_start();
        let line = if t.starts_with("listen = ") {
            format!(
                "listen = \"127.0.0.1:{public}\"\nheader_read_timeout_ms = 2000\nidle_timeout_ms = 5000\nbody_read_timeout_ms = 2000"
            )
        } else if t.starts_with("upstream_timeout_ms = ") {
            "upstream_timeout_ms = 10000".to_owned()
        } else if t.starts_with("rate_limit_per_second = ") {
            // The accounts' own limits would turn most of the load into 429s.
            "rate_limit_per_second = 100000".to_owned()
        } else if t.starts_with("admin_listen = ") {
            format!("admin_listen = \"127.0.0.1:{admin}\"")
        } else if t.starts_with("url = \"redis://") {
            format!("url = \"redis://127.0.0.1:{redis_port}\"")
        } else if t.starts_with("urls = [\"http://127.0.0.1:800") {
            format!("urls = [\"http://{upstream}\"]")
        } else if t.starts_with("level = ") {
            "level = \"error\"".to_owned()
        } else if t.starts_with("headers = { authorization = \"env:") {
            "headers = { authorization = \"Bearer soak-backend\" }".to_owned()
        } else {
            line.to_owned()
        };
        out.push_str(&line);
        out.push('\n');
    }
    // Charge records kept 370 s (the least the 10 s upstream timeout allows) and 2,000 history
    // entries per account, so that Redis memory reaches its plateau within the run.
    out.push_str("\n[jobs]\nmax_queued_bytes_per_account = 1000000\n");
    out.push_str("\n[history]\nmax_entries = 2000\n\n[charges]\nrecord_ttl_secs = 370\n");
    out
}

/// 20 enterprise accounts with a user key each and a large top-up; the last one has no credits
/// (its transcriptions queue).
async fn seed(client: &Client<HttpConnector, Body>, admin: &str, public: &str) -> Vec<String> {
    let mut keys = Vec::new();
    for i in 0..ACCOUNTS {
        let id = format!("soak{i}");
        let plan = if i == ACCOUNTS - 1 { "free" } else { "enterprise" };
        admin_call(client, admin, "/admin/v1/accounts", &format!(r#"{{"id":"{id}","plan":"{plan}"}}"#)).await;
        let key = admin_call(client, admin, &format!("/admin/v1/accounts/{id}/keys"), r#"{"role":"user"}"#).await;
        let v: serde_json::Value = serde_json::from_str(&key).expect("key JSON");
        keys.push(v["key"].as_str().unwrap().to_owned());
        if i < ACCOUNTS - 1 {
            let body = format!(r#"{{"credits":100000000,"payment_ref":"soak-{i}"}}"#);
            admin_call(client, admin, &format!("/admin/v1/accounts/{id}/topups"), &body).await;
        }
    }
    // The last account spends its 50 free credits, so its transcriptions queue.
    let leads: Vec<u32> = (0..50).collect();
    let body = format!(r#"{{"leads":{leads:?}}}"#);
    let spent =
        send(client, Method::POST, &format!("{public}/v1/leads/enrich"), &keys[ACCOUNTS - 1], &[], full(body)).await;
    assert_eq!(spent, Ok(200), "the free account spends its credits");
    keys
}

async fn admin_call(client: &Client<HttpConnector, Body>, admin: &str, path: &str, body: &str) -> String {
    let req = Request::post(format!("{admin}{path}"))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .header("content-type", "application/json")
        .body(full(body.to_owned()))
        .unwrap();
    let res = client.request(req).await.expect("admin call");
    String::from_utf8_lossy(&res.into_body().collect().await.unwrap().to_bytes()).into_owned()
}
