//! Real Redis for tests: a standalone `redis-server` and a 3-master Redis Cluster, on free
//! loopback ports, each node in its own temp dir, killed and cleaned up on drop.
//!
//! Tests never use a Redis the machine happens to run. `redis-server` and `redis-cli` must be on
//! the PATH (`scripts/test` installs them); without them the fixtures panic saying so.

#![allow(dead_code)] // each test binary uses its own subset

use std::io::{self, BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a server gets to answer PING, and a cluster to reach `cluster_state:ok`.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Tries with fresh ports when a server cannot start (another process took its port meanwhile).
const START_ATTEMPTS: usize = 5;

/// One `redis-server` process on 127.0.0.1.
pub struct RedisServer {
    child: Child,
    port: u16,
    /// Arguments after the common ones, kept for [`RedisServer::restart`].
    extra: Vec<String>,
    dir: TempDir,
}

impl RedisServer {
    /// A standalone server, no persistence.
    pub fn start() -> Self {
        Self::spawn("standalone", |_| Vec::new())
    }

    /// A standalone server with more `redis-server` arguments, which override the defaults
    /// (e.g. `["--appendonly", "yes", "--appendfsync", "always"]`).
    pub fn start_with(args: &[&str]) -> Self {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        Self::spawn("standalone", move |_| args.clone())
    }

    /// Kills the server (SIGKILL, as a crash would) and starts it again on the same port, data
    /// directory and arguments; returns once PING answers.
    pub fn restart(&mut self) {
        self.kill();
        self.relaunch();
    }

    /// Kills the server (SIGKILL, as a crash would); [`RedisServer::relaunch`] starts it again.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a killed server again on the same port, data directory and arguments; returns once
    /// PING answers.
    pub fn relaunch(&mut self) {
        self.child = launch(self.port, self.dir.path(), &self.extra);
        assert!(self.wait_for_ping(), "redis-server did not restart on port {}:\n{}", self.port, self.log());
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Sends one command and returns the reply as text; panics on an error reply.
    pub fn command(&self, args: &[&str]) -> String {
        match command(self.port, args) {
            Ok(Ok(reply)) => reply,
            Ok(Err(error)) => panic!("redis {args:?} on port {}: {error}", self.port),
            Err(e) => panic!("redis {args:?} on port {}: {e}", self.port),
        }
    }

    /// A cluster-enabled node, not yet part of a cluster.
    fn start_cluster_node() -> Self {
        Self::spawn("cluster", |dir| {
            vec![
                "--cluster-enabled".into(),
                "yes".into(),
                "--cluster-config-file".into(),
                dir.join("nodes.conf").display().to_string(),
                // The bus port would default to port + 10000, which may be taken or past 65535.
                "--cluster-port".into(),
                free_port().to_string(),
                "--cluster-node-timeout".into(),
                "5000".into(),
            ]
        })
    }

    fn spawn(label: &str, extra: impl Fn(&Path) -> Vec<String>) -> Self {
        require("redis-server");
        let mut last_log = String::new();
        for _ in 0..START_ATTEMPTS {
            let dir = TempDir::new(label);
            let port = free_port();
            let extra = extra(dir.path());
            let child = launch(port, dir.path(), &extra);
            let mut server = RedisServer { child, port, extra, dir };
            if server.wait_for_ping() {
                return server;
            }
            last_log = server.log();
        }
        panic!("redis-server did not start in {START_ATTEMPTS} attempts; last log:\n{last_log}");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// True once PING answers; false if the process exited or the deadline passed.
    fn wait_for_ping(&mut self) -> bool {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if let Ok(Ok(reply)) = command(self.port, &["PING"])
                && reply == "PONG"
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three cluster-enabled masters joined by `redis-cli --cluster create`, no replicas.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts the nodes, creates the cluster, waits until every node reports `cluster_state:ok`.
    pub fn start() -> Self {
        require("redis-cli");
        let nodes: Vec<RedisServer> = (0..3).map(|_| RedisServer::start_cluster_node()).collect();
        let output = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli: {e}"));
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let cluster = RedisCluster { nodes };
        let deadline = Instant::now() + START_TIMEOUT;
        while !cluster.nodes.iter().all(|n| n.command(&["CLUSTER", "INFO"]).contains("cluster_state:ok")) {
            assert!(Instant::now() < deadline, "cluster did not reach cluster_state:ok in {START_TIMEOUT:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
        cluster
    }

    /// `redis://127.0.0.1:<port>` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The nodes (all masters).
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }
}

/// Starts `redis-server` on 127.0.0.1:`port` with its files in `dir`; `extra` overrides the
/// defaults (no RDB snapshots, no AOF). `DEBUG` is allowed from loopback, so fault tests can
/// stall the server (`DEBUG SLEEP`); Redis 7 refuses it by default.
fn launch(port: u16, dir: &Path, extra: &[String]) -> Child {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--enable-debug-command", "local"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start redis-server: {e}"))
}

/// Panics with a clear message when a Redis binary is not on the PATH.
fn require(binary: &str) {
    let found = Command::new(binary).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
    assert!(
        found,
        "`{binary}` not found on the PATH: these tests start their own Redis. Install it \
         (`apt-get install -y redis-server redis-tools`) or run scripts/test, which does."
    );
}

/// A loopback port nobody listens on right now (the OS picks it; we release it at once).
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// One RESP command on a fresh connection. The outer error is I/O; the inner one an error reply.
/// An array reply (SCAN, KEYS, ...) comes back as its elements one per line, nested arrays
/// flattened in order and nil elements as empty lines: SCAN answers its cursor, then the names.
fn command(port: u16, args: &[&str]) -> io::Result<Result<String, String>> {
    let stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    (&stream).write_all(request.as_bytes())?;
    let mut reader = BufReader::new(&stream);
    let mut lines = Vec::new();
    Ok(read_reply(&mut reader, &mut lines)?.map(|()| lines.join("\n")))
}

/// Reads one RESP2 reply, appending its text (one line per element of an array) to `out`.
fn read_reply(reader: &mut impl BufRead, out: &mut Vec<String>) -> io::Result<Result<(), String>> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let line = line.trim_end_matches("\r\n");
    let (kind, rest) = line.split_at(line.len().min(1));
    let length = |rest: &str| -> io::Result<i64> {
        rest.parse().map_err(|_| io::Error::other(format!("bad length {rest:?} in reply {line:?}")))
    };
    match kind {
        "+" | ":" => out.push(rest.to_owned()),
        "-" => return Ok(Err(rest.to_owned())),
        "$" => {
            let len = length(rest)?;
            if len < 0 {
                out.push(String::new());
                return Ok(Ok(()));
            }
            let mut body = vec![0; len as usize + 2];
            reader.read_exact(&mut body)?;
            body.truncate(len as usize);
            out.push(String::from_utf8_lossy(&body).into_owned());
        }
        "*" => {
            for _ in 0..length(rest)?.max(0) {
                if let Err(e) = read_reply(reader, out)? {
                    return Ok(Err(e));
                }
            }
        }
        _ => return Err(io::Error::other(format!("unsupported reply {line:?}"))),
    }
    Ok(Ok(()))
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "creditgate-redis-{label}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
