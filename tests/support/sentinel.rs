//! Redis Sentinel on loopback: a primary, one replica and three sentinels watching them under the
//! name [`MASTER_NAME`], each on a free port, with short timeouts so a failover takes seconds.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::redis::RedisServer;

/// The name the sentinels monitor the primary under.
pub const MASTER_NAME: &str = "creditgate";

/// A sentinel process, killed on drop.
struct Sentinel {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A primary, a replica and three sentinels.
pub struct SentinelSetup {
    /// The first primary (`None` once killed).
    pub primary: Option<RedisServer>,
    /// Its replica, promoted by a failover.
    pub replica: RedisServer,
    sentinels: Vec<Sentinel>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// `redis-cli -p port args…`, its output trimmed; `None` when it could not talk to the port.
fn cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli").args(["-h", "127.0.0.1", "-p", &port.to_string()]).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Polls `done` every 100 ms for at most `limit`; panics with `what` when it never holds.
fn wait(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "waited {limit:?} for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl SentinelSetup {
    /// Starts everything and waits until the replica is in sync and every sentinel knows both.
    pub fn start() -> Self {
        let primary = RedisServer::start();
        let replica = RedisServer::start_with(&[
            "--replicaof",
            "127.0.0.1",
            &primary.port().to_string(),
            "--repl-ping-replica-period",
            "1",
        ]);
        wait(Duration::from_secs(15), "the replica to sync", || {
            replica.command(&["INFO", "replication"]).contains("master_link_status:up")
        });
        let sentinels: Vec<Sentinel> = (0..3).map(|i| Self::sentinel(i, primary.port())).collect();
        for s in &sentinels {
            wait(Duration::from_secs(20), "a sentinel to see the primary and its replica", || {
                cli(s.port, &["SENTINEL", "replicas", MASTER_NAME])
                    .is_some_and(|r| r.contains(&replica.port().to_string()))
                    && cli(s.port, &["SENTINEL", "sentinels", MASTER_NAME])
                        .is_some_and(|r| r.matches("name").count() >= 2)
            });
        }
        SentinelSetup { primary: Some(primary), replica, sentinels }
    }

    fn sentinel(i: usize, primary_port: u16) -> Sentinel {
        for _ in 0..5 {
            let port = free_port();
            let dir = std::env::temp_dir().join(format!("creditgate-sentinel-{}-{port}-{i}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("sentinel dir");
            let conf = dir.join("sentinel.conf");
            // A sentinel rewrites its config file as it learns the topology: it must be its own.
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\nlogfile {}\n\
                     sentinel monitor {MASTER_NAME} 127.0.0.1 {primary_port} 2\n\
                     sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                     sentinel failover-timeout {MASTER_NAME} 3000\n\
                     sentinel parallel-syncs {MASTER_NAME} 1\n",
                    dir.display(),
                    dir.join("sentinel.log").display()
                ),
            )
            .expect("sentinel.conf");
            let child = Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start redis-server --sentinel");
            let mut s = Sentinel { child, port, dir };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if cli(port, &["PING"]).as_deref() == Some("PONG") {
                    return s;
                }
                if s.child.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = s.child.kill();
        }
        panic!("a sentinel did not start");
    }

    /// `redis://127.0.0.1:PORT` of every sentinel.
    pub fn urls(&self) -> Vec<String> {
        self.sentinels.iter().map(|s| format!("redis://127.0.0.1:{}", s.port)).collect()
    }

    /// The primary's port as the first sentinel that answers names it.
    pub fn primary_port(&self) -> Option<u16> {
        self.sentinels.iter().find_map(|s| {
            let reply = cli(s.port, &["SENTINEL", "get-master-addr-by-name", MASTER_NAME])?;
            reply.lines().nth(1)?.trim().parse().ok()
        })
    }

    /// Kills the primary (SIGKILL, as a crash) and waits until the sentinels name the replica.
    pub fn fail_over(&mut self) {
        drop(self.primary.take().expect("a primary to kill"));
        let replica = self.replica.port();
        wait(Duration::from_secs(30), "the sentinels to promote the replica", || self.primary_port() == Some(replica));
        wait(Duration::from_secs(10), "the promoted replica to take writes", || {
            self.replica.command(&["INFO", "replication"]).contains("role:master")
        });
    }
}
