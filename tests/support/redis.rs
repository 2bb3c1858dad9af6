//! Real Redis for tests: a standalone `redis-server` and a 3-master Redis Cluster (with or without
//! a replica per master), on free loopback ports, each node in its own temp dir, killed and
//! cleaned up on drop.
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

/// The values of an account's `state` field (MessagePack, lua/lib.lua), by place, for tests that
/// read or move them by hand: `EVAL STATE_GET 1 <account key> <place>` answers one, `EVAL
/// STATE_SET 1 <account key> <place> <value> ...` sets some.
pub mod state {
    pub const GET: &str = "return ({cmsgpack.unpack(redis.call('HGET', KEYS[1], 'state'))})[tonumber(ARGV[1])]";
    pub const SET: &str = "local v = {cmsgpack.unpack(redis.call('HGET', KEYS[1], 'state'))} \
        for i = 1, #ARGV, 2 do v[tonumber(ARGV[i])] = tonumber(ARGV[i + 1]) end \
        redis.call('HSET', KEYS[1], 'state', cmsgpack.pack(unpack(v))) return 1";
    pub const MONTHLY: &str = "1";
    pub const USED: &str = "3";
    pub const NOW: &str = "6";
    pub const PERIOD: &str = "9";
}

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

    /// Kills the server with SIGKILL, as a crash would; [`RedisServer::relaunch`] starts it again.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a killed server again on the same port, data directory and arguments (a cluster
    /// node keeps its `nodes.conf`, so it rejoins its cluster); returns once PING answers.
    pub fn relaunch(&mut self) {
        self.child = launch(self.port, self.dir.path(), &self.extra);
        assert!(self.wait_for_ping(), "redis-server did not restart on port {}:\n{}", self.port, self.log());
    }

    /// Sends a signal (`STOP`, `CONT`, …) to the server process with `kill`.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{name} {} failed", self.child.id());
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

    /// Like [`RedisServer::command`], but a refused connection or an error reply is returned.
    pub fn try_command(&self, args: &[&str]) -> Result<String, String> {
        match command(self.port, args) {
            Ok(reply) => reply,
            Err(e) => Err(e.to_string()),
        }
    }

    /// A cluster-enabled node, not yet part of a cluster, that thinks a node is down after
    /// `node_timeout_ms` without an answer.
    fn start_cluster_node(node_timeout_ms: u64) -> Self {
        Self::spawn("cluster", move |dir| {
            vec![
                "--cluster-enabled".into(),
                "yes".into(),
                "--cluster-config-file".into(),
                dir.join("nodes.conf").display().to_string(),
                // The bus port would default to port + 10000, which may be taken or past 65535.
                "--cluster-port".into(),
                free_port().to_string(),
                "--cluster-node-timeout".into(),
                node_timeout_ms.to_string(),
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

/// Three cluster-enabled masters joined by `redis-cli --cluster create`, with or without one
/// replica each. Nodes are addressed by their index in [`RedisCluster::nodes`], which stays the
/// same whatever role a failover gives them.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

/// How long a failover, a node's return or a slot's move may take before a test gives up.
const CLUSTER_CHANGE_TIMEOUT: Duration = Duration::from_secs(20);

/// A node as one line of `CLUSTER NODES` describes it.
#[derive(Debug, Clone)]
pub struct ClusterNode {
    /// The node's id.
    pub id: String,
    /// Its client port.
    pub port: u16,
    /// `master` or `slave`, plus `myself`, `fail`, `fail?`, … as Redis reports them.
    pub flags: Vec<String>,
    /// The id of the master it replicates (replicas only).
    pub master_id: Option<String>,
    /// The slot ranges it serves (masters only).
    pub slots: Vec<(u16, u16)>,
}

impl ClusterNode {
    /// A master not marked failed.
    pub fn is_live_master(&self) -> bool {
        self.flags.iter().any(|f| f == "master") && !self.flags.iter().any(|f| f.starts_with("fail"))
    }

    fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
    }
}

impl RedisCluster {
    /// Three masters, no replicas; waits until every node reports `cluster_state:ok`.
    pub fn start() -> Self {
        Self::create(3, 0, 5000)
    }

    /// Three masters and one replica each (`--cluster-replicas 1`), nodes declaring a peer down
    /// after 1 s without an answer so a failover takes seconds; waits until the cluster is ok
    /// and every replica is in sync with its master.
    pub fn start_with_replicas() -> Self {
        let cluster = Self::create(6, 1, 1000);
        cluster.wait(CLUSTER_CHANGE_TIMEOUT, "every replica linked to its master", |c| {
            let replicas = c.topology().into_iter().filter(|n| n.flags.iter().any(|f| f == "slave"));
            let mut linked = 0;
            for replica in replicas {
                let node = c.node_by_port(replica.port);
                if !c.nodes[node]
                    .try_command(&["INFO", "replication"])
                    .is_ok_and(|i| i.contains("master_link_status:up"))
                {
                    return false;
                }
                linked += 1;
            }
            linked == 3
        });
        cluster
    }

    fn create(count: usize, replicas: usize, node_timeout_ms: u64) -> Self {
        require("redis-cli");
        let nodes: Vec<RedisServer> = (0..count).map(|_| RedisServer::start_cluster_node(node_timeout_ms)).collect();
        let output = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
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
        cluster.wait(START_TIMEOUT, "cluster_state:ok on every node", |c| {
            c.nodes.iter().all(|n| n.try_command(&["CLUSTER", "INFO"]).is_ok_and(|i| i.contains("cluster_state:ok")))
        });
        cluster
    }

    /// `redis://127.0.0.1:<port>` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The nodes, masters and replicas, in the order they were started.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// One node, by index.
    pub fn node(&self, index: usize) -> &RedisServer {
        &self.nodes[index]
    }

    /// The cluster as the first node that answers sees it (`CLUSTER NODES`).
    pub fn topology(&self) -> Vec<ClusterNode> {
        for node in &self.nodes {
            if let Ok(text) = node.try_command(&["CLUSTER", "NODES"]) {
                return text.lines().filter(|l| !l.trim().is_empty()).map(parse_cluster_node).collect();
            }
        }
        panic!("no cluster node answers CLUSTER NODES");
    }

    /// The hash slot of `key`.
    pub fn slot_of(&self, key: &str) -> u16 {
        let node = self.nodes.iter().find(|n| n.try_command(&["PING"]).is_ok()).expect("a node answers");
        node.command(&["CLUSTER", "KEYSLOT", key]).trim().parse().expect("KEYSLOT is a number")
    }

    /// The index of the live master serving `slot`.
    pub fn master_of_slot(&self, slot: u16) -> usize {
        let topology = self.topology();
        let master = topology
            .iter()
            .find(|n| n.is_live_master() && n.serves(slot))
            .unwrap_or_else(|| panic!("no live master serves slot {slot}: {topology:?}"));
        self.node_by_port(master.port)
    }

    /// The index of the live master serving `key`'s slot.
    pub fn master_of_key(&self, key: &str) -> usize {
        self.master_of_slot(self.slot_of(key))
    }

    /// The index of the (first) replica of the master at `master`.
    pub fn replica_of(&self, master: usize) -> usize {
        let topology = self.topology();
        let id = self.id_of(master);
        let replica = topology
            .iter()
            .find(|n| n.master_id.as_deref() == Some(id.as_str()) && n.flags.iter().any(|f| f == "slave"))
            .unwrap_or_else(|| panic!("node {master} has no replica: {topology:?}"));
        self.node_by_port(replica.port)
    }

    /// The cluster node id of the node at `index` (its own answer).
    pub fn id_of(&self, index: usize) -> String {
        self.nodes[index].command(&["CLUSTER", "MYID"]).trim().to_owned()
    }

    /// Kills the node at `index` with SIGKILL, as a crash would.
    pub fn kill(&mut self, index: usize) {
        self.nodes[index].kill();
    }

    /// Waits until the node at `replica` serves slots as a master and every live node reports
    /// `cluster_state:ok` (the failover is complete); panics after [`CLUSTER_CHANGE_TIMEOUT`].
    pub fn wait_promoted(&self, replica: usize) {
        let port = self.nodes[replica].port;
        self.wait(CLUSTER_CHANGE_TIMEOUT, "the replica to be promoted", |c| {
            let Ok(text) = c.nodes[replica].try_command(&["CLUSTER", "NODES"]) else { return false };
            let promoted = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(parse_cluster_node)
                .any(|n| n.port == port && n.is_live_master() && !n.slots.is_empty());
            promoted
                && c.nodes
                    .iter()
                    .filter(|n| n.try_command(&["PING"]).is_ok())
                    .all(|n| n.try_command(&["CLUSTER", "INFO"]).is_ok_and(|i| i.contains("cluster_state:ok")))
        });
    }

    /// Starts the killed node at `index` again (same port, data dir and `nodes.conf`) and waits
    /// until it has rejoined as a replica in sync with its master.
    pub fn restart(&mut self, index: usize) {
        self.nodes[index].relaunch();
        self.wait(CLUSTER_CHANGE_TIMEOUT, "the restarted node to rejoin as a replica", |c| {
            c.nodes[index]
                .try_command(&["INFO", "replication"])
                .is_ok_and(|i| i.contains("role:slave") && i.contains("master_link_status:up"))
        });
    }

    /// Moves `slot` from the master at `from` to the master at `to` by hand, one key per
    /// `MIGRATE`, oldest key first, sleeping `pause` after each (`CLUSTER SETSLOT … IMPORTING / MIGRATING`, then
    /// `… NODE` on every master), so requests meet the slot half-moved. Returns how many keys it
    /// moved; panics when a `MIGRATE` fails (e.g. `BUSYKEY`: a key was written on both sides).
    pub fn migrate_slot(&self, slot: u16, from: usize, to: usize, pause: Duration) -> usize {
        let (from_id, to_id) = (self.id_of(from), self.id_of(to));
        let slot_arg = slot.to_string();
        let to_port = self.nodes[to].port.to_string();
        self.nodes[to].command(&["CLUSTER", "SETSLOT", &slot_arg, "IMPORTING", &from_id]);
        self.nodes[from].command(&["CLUSTER", "SETSLOT", &slot_arg, "MIGRATING", &to_id]);
        let mut moved = 0;
        let deadline = Instant::now() + CLUSTER_CHANGE_TIMEOUT;
        loop {
            assert!(Instant::now() < deadline, "slot {slot} not migrated in {CLUSTER_CHANGE_TIMEOUT:?}");
            // Oldest key first (Redis lists a slot's keys newest first): the account hash moves
            // before its lists, the order that shows a script a half-moved account on both sides.
            let keys = self.nodes[from].command(&["CLUSTER", "GETKEYSINSLOT", &slot_arg, "100000"]);
            let Some(key) = keys.lines().map(str::trim).rfind(|k| !k.is_empty()) else {
                break;
            };
            let reply = self.nodes[from].try_command(&["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000", "KEYS", key]);
            assert!(reply.is_ok(), "MIGRATE of {key} from node {from} to node {to}: {reply:?}");
            moved += 1;
            std::thread::sleep(pause);
        }
        // The new owner first, then the old one, then the others (the order redis-cli uses).
        let masters: Vec<usize> =
            self.topology().iter().filter(|n| n.is_live_master()).map(|n| self.node_by_port(n.port)).collect();
        let rest = masters.into_iter().filter(|&m| m != from && m != to);
        for node in [to, from].into_iter().chain(rest) {
            self.nodes[node].command(&["CLUSTER", "SETSLOT", &slot_arg, "NODE", &to_id]);
        }
        moved
    }

    fn node_by_port(&self, port: u16) -> usize {
        self.nodes.iter().position(|n| n.port == port).unwrap_or_else(|| panic!("no node on port {port}"))
    }

    /// Polls `done` every 50 ms for at most `limit`; panics with `what` when it never holds.
    fn wait(&self, limit: Duration, what: &str, done: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + limit;
        while !done(self) {
            assert!(Instant::now() < deadline, "waited {limit:?} for {what}: {:?}", self.topology());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// One line of `CLUSTER NODES`: `<id> <ip:port@cport> <flags> <master> <ping> <pong> <epoch>
/// <link> <slot ranges…>` (ranges `a-b` or `a`; `[…]` entries are slots in migration, skipped).
fn parse_cluster_node(line: &str) -> ClusterNode {
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert!(fields.len() >= 8, "unexpected CLUSTER NODES line {line:?}");
    let address = fields[1].split('@').next().unwrap_or_default();
    let port = address.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let slots = fields[8..]
        .iter()
        .filter(|r| !r.starts_with('['))
        .filter_map(|r| match r.split_once('-') {
            Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
            None => r.parse().ok().map(|s| (s, s)),
        })
        .collect();
    ClusterNode {
        id: fields[0].to_owned(),
        port,
        flags: fields[2].split(',').map(str::to_owned).collect(),
        master_id: (fields[3] != "-").then(|| fields[3].to_owned()),
        slots,
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
