//! Private Redis servers for the tests: a `redis-server` on a free port ([`Redis`]),
//! and a real Redis Cluster ([`RedisCluster`]): N `redis-server` processes with
//! `--cluster-enabled yes`, each with its own directory in a temp dir, joined with
//! `redis-cli --cluster create`; and a master with a replica watched by three
//! sentinels ([`SentinelGroup`]). Every process is killed when its handle drops.

use std::collections::HashMap;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::port::{ephemeral_range, free_port};
use crate::wait::wait_until;

/// How many times Redis ran `command`, from the text of `INFO commandstats` (`None`
/// if it never did).
pub fn command_calls(info: &str, command: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse().ok())
}

/// A private redis-server, bound to 127.0.0.1, no persistence.
pub struct Redis {
    pub port: u16,
    extra: Vec<String>,
    child: Option<Child>,
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_with(&[])
    }

    /// Starts on a given port.
    pub fn start_on(port: u16) -> Redis {
        let mut r = Redis {
            port,
            extra: Vec::new(),
            child: None,
        };
        r.spawn();
        r
    }

    /// Starts with extra `--name value` arguments.
    pub fn start_with(extra: &[&str]) -> Redis {
        let mut r = Redis {
            port: free_port(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let port = self.port.to_string();
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port,
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        self.child = Some(child);
        let url = match self.extra.iter().position(|a| a == "--requirepass") {
            Some(i) => format!("redis://:{}@127.0.0.1:{}/", self.extra[i + 1], self.port),
            None => self.url(),
        };
        assert!(
            wait_until(Duration::from_secs(10), || {
                redis::Client::open(url.as_str())
                    .and_then(|c| c.get_connection())
                    .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                    .is_ok()
            }),
            "redis-server did not start on {}",
            self.port
        );
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A fresh synchronous connection, for inspecting Redis from the test.
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url().as_str())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// Kills the server (SIGKILL: no goodbye to clients) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends a signal (e.g. `STOP`, `CONT`) to the server process.
    pub fn signal(&self, sig: &str) {
        crate::process::signal(self.child.as_ref().expect("running").id(), sig);
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Sorted topic channel names matching `pattern` (`PUBSUB CHANNELS`), without
    /// the nodes' control channel (see [`is_control`]).
    pub fn channels(&self, pattern: &str) -> Vec<String> {
        let mut v: Vec<String> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .arg(pattern)
            .query(&mut self.conn())
            .unwrap();
        v.retain(|c| !is_control(c));
        v.sort();
        v
    }

    /// `redis-cli PUBLISH channel payload`: a backend using the stock client.
    pub fn cli_publish(&self, channel: &str, payload: &str) {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["PUBLISH", channel, payload])
            .output()
            .expect("redis-cli is installed");
        assert!(out.status.success(), "redis-cli failed: {out:?}");
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Cluster bus timeout: short, so a killed primary's replica takes over in ~2 s.
pub const NODE_TIMEOUT_MS: &str = "1000";

/// A port `p` free for a cluster node: `p` and its bus port `p + 10000`.
fn free_cluster_port(taken: &[u16]) -> u16 {
    let ephemeral = ephemeral_range();
    loop {
        let p = free_port();
        // The bus port must be outside the ephemeral range too.
        let Some(bus) = p.checked_add(10000).filter(|b| !ephemeral.contains(b)) else {
            continue;
        };
        if taken.contains(&p) || taken.contains(&bus) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", bus)).is_ok() {
            return p;
        }
    }
}

pub struct ClusterNode {
    pub port: u16,
    child: Option<Child>,
}

pub struct RedisCluster {
    pub nodes: Vec<ClusterNode>,
    access: Access,
    _dir: tempfile::TempDir,
}

/// How the cluster is reached: plain and open by default, or TLS and a password.
#[derive(Clone, Default)]
pub struct Access {
    /// Extra `redis-server` arguments (TLS files, `requirepass`, ACL users). With
    /// `tls`, the node's port is its TLS port and the plain port is off.
    pub server_args: Vec<String>,
    /// Extra `redis-cli` arguments (`--tls --cacert …`, `-a …`).
    pub cli_args: Vec<String>,
    pub tls: bool,
    /// The default user's password, if any (for the test's own connections).
    pub password: Option<String>,
}

impl RedisCluster {
    fn cli(&self, port: u16, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(&self.access.cli_args)
            .args(["--no-auth-warning"])
            .args(args)
            .output()
            .expect("redis-cli is installed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl RedisCluster {
    /// `primaries` primaries with `replicas` replicas each; returns once every node
    /// reports `cluster_state:ok` and knows every other node.
    pub fn start(primaries: usize, replicas: usize) -> RedisCluster {
        Self::start_with(primaries, replicas, Access::default())
    }

    /// As [`Self::start`], reached as `access` says (TLS, passwords).
    pub fn start_with(primaries: usize, replicas: usize, access: Access) -> RedisCluster {
        let cluster = Self::spawn_with(primaries * (1 + replicas), access);
        cluster.create(replicas);
        cluster
    }

    /// `n` cluster-enabled servers that do not form a cluster yet.
    pub fn spawn(n: usize) -> RedisCluster {
        Self::spawn_with(n, Access::default())
    }

    fn spawn_with(n: usize, access: Access) -> RedisCluster {
        let dir = tempfile::tempdir().unwrap();
        let mut ports = Vec::new();
        let mut nodes = Vec::new();
        for _ in 0..n {
            let port = free_cluster_port(&ports);
            ports.push(port);
            ports.push(port + 10000);
            let d = dir.path().join(port.to_string());
            std::fs::create_dir_all(&d).unwrap();
            let ports: Vec<String> = if access.tls {
                vec![
                    "--port".into(),
                    "0".into(),
                    "--tls-port".into(),
                    port.to_string(),
                ]
            } else {
                vec!["--port".into(), port.to_string()]
            };
            let child = Command::new("redis-server")
                .args(["--bind", "127.0.0.1"])
                .args(&ports)
                .args(&access.server_args)
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", "nodes.conf"])
                .args(["--cluster-node-timeout", NODE_TIMEOUT_MS])
                // A replica takes over however stale its data (tests, not durability),
                // and its first sync starts at once (diskless sync waits 5 s by default).
                .args(["--cluster-replica-validity-factor", "0"])
                .args(["--repl-diskless-sync-delay", "0"])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .args(["--loglevel", "warning"])
                .arg("--dir")
                .arg(&d)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server is installed");
            nodes.push(ClusterNode {
                port,
                child: Some(child),
            });
        }
        let cluster = RedisCluster {
            nodes,
            access,
            _dir: dir,
        };
        for node in &cluster.nodes {
            assert!(
                wait_until(Duration::from_secs(10), || cluster
                    .cli(node.port, &["PING"])
                    .contains("PONG")),
                "redis-server {} did not start",
                node.port
            );
        }
        cluster
    }

    /// `redis-cli --cluster create` over every node.
    pub fn create(&self, replicas: usize) {
        let cluster = self;
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(&self.access.cli_args)
            .args(["--no-auth-warning"])
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .unwrap();
        assert!(out.status.success(), "cluster create: {out:?}");
        cluster.wait_healthy();
    }

    /// Waits until every live node says the cluster is ok and knows all nodes.
    pub fn wait_healthy(&self) {
        let n = self.nodes.len();
        let ok = wait_until(Duration::from_secs(30), || {
            self.live().all(|node| {
                let info = self.cli(node.port, &["CLUSTER", "INFO"]);
                let repl = self.cli(node.port, &["INFO", "replication"]);
                info.contains("cluster_state:ok")
                    && info.contains(&format!("cluster_known_nodes:{n}"))
                    && info.contains("cluster_slots_ok:16384")
                    && (repl.contains("role:master") || repl.contains("master_link_status:up"))
            })
        });
        assert!(ok, "cluster did not become healthy");
    }

    fn live(&self) -> impl Iterator<Item = &ClusterNode> {
        self.nodes.iter().filter(|n| n.child.is_some())
    }

    /// Seed URLs for `--redis-url`, comma-separated (the first two nodes).
    pub fn seeds(&self) -> String {
        self.nodes
            .iter()
            .take(2)
            .map(|n| format!("{}://127.0.0.1:{}", self.scheme(), n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn scheme(&self) -> &'static str {
        if self.access.tls {
            "rediss"
        } else {
            "redis"
        }
    }

    /// A port of a live node, to ask things.
    pub fn any_port(&self) -> u16 {
        self.live().next().expect("a live node").port
    }

    /// The slot of a key, from the cluster itself (`CLUSTER KEYSLOT`).
    pub fn keyslot(&self, key: &str) -> u16 {
        self.cli(self.any_port(), &["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .unwrap()
    }

    /// `(first slot, last slot, primary port)` ranges from `CLUSTER SLOTS`.
    pub fn slot_ranges(&self) -> Vec<(u16, u16, u16)> {
        let auth = match &self.access.password {
            Some(p) => format!(":{p}@"),
            None => String::new(),
        };
        // The test's own look at the cluster: TLS without verification is fine here.
        let insecure = if self.access.tls { "#insecure" } else { "" };
        let url = format!(
            "{}://{auth}127.0.0.1:{}/{insecure}",
            self.scheme(),
            self.any_port()
        );
        let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
        let v: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query(&mut conn).unwrap();
        let mut out = Vec::new();
        for e in v {
            let redis::Value::Array(f) = e else { continue };
            let (redis::Value::Int(a), redis::Value::Int(b), redis::Value::Array(node)) =
                (&f[0], &f[1], &f[2])
            else {
                continue;
            };
            let redis::Value::Int(port) = node[1] else {
                continue;
            };
            out.push((*a as u16, *b as u16, port as u16));
        }
        out.sort();
        out
    }

    /// The primary port serving `channel`'s slot.
    pub fn owner(&self, channel: &str) -> u16 {
        let slot = self.keyslot(channel);
        self.slot_ranges()
            .into_iter()
            .find(|(a, b, _)| (*a..=*b).contains(&slot))
            .map(|(_, _, p)| p)
            .expect("slot is served")
    }

    /// Ports of the primaries, in slot order.
    pub fn primaries(&self) -> Vec<u16> {
        let mut p: Vec<u16> = Vec::new();
        for (_, _, port) in self.slot_ranges() {
            if !p.contains(&port) {
                p.push(port);
            }
        }
        p
    }

    /// Sorted `PUBSUB SHARDCHANNELS` of one node: its topic channels, without the
    /// nodes' control channel (see [`is_control`]).
    pub fn shardchannels(&self, port: u16) -> Vec<String> {
        let mut v: Vec<String> = self
            .cli(port, &["PUBSUB", "SHARDCHANNELS"])
            .lines()
            .map(str::to_string)
            .filter(|l| !l.is_empty() && !is_control(l))
            .collect();
        v.sort();
        v
    }

    /// Subscribers of a shard channel on one node (`PUBSUB SHARDNUMSUB`).
    pub fn shardnumsub(&self, port: u16, channel: &str) -> u64 {
        self.cli(port, &["PUBSUB", "SHARDNUMSUB", channel])
            .lines()
            .nth(1)
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// `redis-cli -c SPUBLISH channel payload`: a backend using the stock client,
    /// which follows `MOVED` to the owner.
    pub fn cli_spublish(&self, channel: &str, payload: &str) -> String {
        self.cli(self.any_port(), &["-c", "SPUBLISH", channel, payload])
    }

    pub fn node_id(&self, port: u16) -> String {
        self.cli(port, &["CLUSTER", "MYID"]).trim().to_string()
    }

    /// Kills the node on `port` (SIGKILL).
    pub fn kill(&mut self, port: u16) {
        let node = self.nodes.iter_mut().find(|n| n.port == port).unwrap();
        if let Some(mut c) = node.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `redis-cli --cluster reshard`: moves `slots` slots from `from` to `to`.
    pub fn reshard(&self, from: u16, to: u16, slots: u16) {
        let out = Command::new("redis-cli")
            .args(&self.access.cli_args)
            .args(["--no-auth-warning"])
            .args([
                "--cluster",
                "reshard",
                &format!("127.0.0.1:{}", self.any_port()),
            ])
            .args(["--cluster-from", &self.node_id(from)])
            .args(["--cluster-to", &self.node_id(to)])
            .args(["--cluster-slots", &slots.to_string(), "--cluster-yes"])
            .output()
            .unwrap();
        assert!(out.status.success(), "reshard: {out:?}");
    }

    /// `redis-cli` on a node with the cluster's access arguments.
    pub fn cli_on(&self, port: u16, args: &[&str]) -> String {
        self.cli(port, args)
    }

    /// The pids of the live nodes, by port (for CPU accounting).
    pub fn pids(&self) -> Vec<(u16, u32)> {
        self.live()
            .map(|n| (n.port, n.child.as_ref().unwrap().id()))
            .collect()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Whether `channel` is the nodes' control channel (`<prefix>#control`, where server
/// commands go), which every node holds at all times whatever its clients want.
pub fn is_control(channel: &str) -> bool {
    channel.ends_with("#control")
}

/// The master name the sentinels of a [`SentinelGroup`] monitor.
pub const SENTINEL_MASTER: &str = "wsgate-master";

/// A `redis-server --sentinel` with its own writable config file (sentinels rewrite it).
pub struct Sentinel {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Sentinel {
    /// A sentinel monitoring [`SENTINEL_MASTER`] at `master_port` (quorum 2, down after
    /// 1 s, failover timeout 3 s).
    pub fn start(master_port: u16) -> Sentinel {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                 sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
                 sentinel failover-timeout {SENTINEL_MASTER} 3000\n\
                 sentinel parallel-syncs {SENTINEL_MASTER} 1\n",
                dir = dir.path().display()
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&conf)
            .args(["--sentinel", "--loglevel", "warning"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        let s = Sentinel {
            port,
            child,
            _dir: dir,
        };
        assert!(
            wait_until(Duration::from_secs(10), || s.master_port().is_some()),
            "sentinel did not start on {port}"
        );
        s
    }

    /// A connection to the sentinel, if it answers within a second.
    pub fn conn(&self) -> Option<redis::Connection> {
        redis::Client::open(format!("redis://127.0.0.1:{}/", self.port))
            .ok()?
            .get_connection_with_timeout(Duration::from_secs(1))
            .ok()
    }

    /// The master's port as this sentinel sees it now.
    pub fn master_port(&self) -> Option<u16> {
        let addr: Option<(String, String)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(SENTINEL_MASTER)
            .query(&mut self.conn()?)
            .ok()?;
        addr?.1.parse().ok()
    }

    /// `SENTINEL MASTER <name>` as a map.
    pub fn master_info(&self) -> HashMap<String, String> {
        self.conn()
            .and_then(|mut c| {
                redis::cmd("SENTINEL")
                    .arg("MASTER")
                    .arg(SENTINEL_MASTER)
                    .query(&mut c)
                    .ok()
            })
            .unwrap_or_default()
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `master` has a replica in sync.
pub fn replication_online(master: &Redis) -> bool {
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query(&mut master.conn())
        .unwrap_or_default();
    info.contains("state=online")
}

/// A master, its replica (in sync), and three sentinels that know both and each
/// other.
pub struct SentinelGroup {
    pub master: Redis,
    pub replica: Redis,
    pub sentinels: Vec<Sentinel>,
    _dirs: [tempfile::TempDir; 2],
}

impl SentinelGroup {
    pub fn start() -> SentinelGroup {
        let master_dir = tempfile::tempdir().unwrap();
        let replica_dir = tempfile::tempdir().unwrap();
        let master = Redis::start_with(&["--dir", master_dir.path().to_str().unwrap()]);
        let master_port = master.port.to_string();
        let replica = Redis::start_with(&[
            "--dir",
            replica_dir.path().to_str().unwrap(),
            "--replicaof",
            "127.0.0.1",
            &master_port,
        ]);
        assert!(
            wait_until(Duration::from_secs(15), || replication_online(&master)),
            "replica in sync"
        );
        let sentinels: Vec<Sentinel> = (0..3).map(|_| Sentinel::start(master.port)).collect();
        // Before any failure: every sentinel knows the replica and the other sentinels.
        assert!(
            wait_until(Duration::from_secs(20), || sentinels.iter().all(|s| {
                let m = s.master_info();
                m.get("num-slaves").map(String::as_str) == Some("1")
                    && m.get("num-other-sentinels").map(String::as_str) == Some("2")
            })),
            "sentinels discovered each other and the replica"
        );
        SentinelGroup {
            master,
            replica,
            sentinels,
            _dirs: [master_dir, replica_dir],
        }
    }

    /// `--redis-sentinel host:port,… --redis-sentinel-master <name>` for a node.
    pub fn node_args(&self) -> Vec<String> {
        let list = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",");
        vec![
            "--redis-sentinel".into(),
            list,
            "--redis-sentinel-master".into(),
            SENTINEL_MASTER.into(),
        ]
    }
}
