//! A request costs its worker thread no wake-up of its own: the only write system calls it makes
//! are the request to the upstream and the answer to the client (src/server.rs `timer_floor`:
//! without it, tokio wrote to its eventfd once per request, for the request's timers).
//!
//! Counted with the worker thread's own `/proc/self/task/<tid>/io` (`syscw`: write system calls),
//! which needs the gateway in this process and alone in this test binary — one worker thread,
//! found by its name.

mod support;

use support::gateway::{ConfigBuilder, TestGateway};
use support::upstream::Upstream;

/// `syscw` of the one thread named `creditgate-worker-0` (its name, cut to 15 bytes).
fn worker_writes() -> u64 {
    let mut found = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let dir = task.expect("task").path();
        let Ok(name) = std::fs::read_to_string(dir.join("comm")) else { continue };
        if name.trim_end() != "creditgate-work" {
            continue;
        }
        let io = std::fs::read_to_string(dir.join("io")).expect("task io");
        let line = io.lines().find(|l| l.starts_with("syscw:")).expect("syscw");
        found.push(line["syscw:".len()..].trim().parse::<u64>().expect("a number"));
    }
    assert_eq!(found.len(), 1, "one public worker thread");
    found[0]
}

#[tokio::test]
async fn a_request_makes_two_write_calls_on_its_worker_and_no_wake_up() {
    let upstream = Upstream::echo().await;
    let gw = TestGateway::start(&ConfigBuilder::new(&upstream.url()).server("workers = 1").build()).await;
    let key = gw.account_with_key("acme", "big").await;
    let chat = r#"{"messages":[{"role":"user","content":"hi"}]}"#;
    let send = async |metered: bool| {
        let res = if metered {
            gw.post(&key, "/v1/chat/completions", &[("x-ai-tier", "fast")], chat).await
        } else {
            gw.call(&key, "GET", "/v1/deals", &[], "").await
        };
        assert_eq!(res.status, 200, "{}", res.text());
    };
    // Connections and caches warm.
    for _ in 0..5 {
        send(false).await;
        send(true).await;
    }
    for metered in [false, true] {
        let n = 40;
        let before = worker_writes();
        for _ in 0..n {
            send(metered).await;
        }
        let writes = worker_writes() - before;
        // One write to the upstream and one to the client per request; a few spare for what the
        // worker may do besides (nothing, today).
        assert!(
            writes <= 2 * n + 3,
            "{} requests: {writes} write calls on the worker ({:.2} per request; 2 expected)",
            if metered { "metered" } else { "free" },
            writes as f64 / n as f64
        );
    }
}
