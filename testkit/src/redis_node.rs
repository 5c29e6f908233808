//! Real `redis-server` and `redis-sentinel` processes on free ports, each in its own
//! temporary folder, killed on `Drop` (after printing their last log lines when the test
//! failed).
//!
//! Every data node runs with the shipped users (`redis/users.acl`, rendered by
//! `scripts/render-config.sh`): [`RedisProcess::url`] logs in as the instances'
//! restricted user, so every test of the service runs with exactly the rights the shipped
//! topologies give it; the harness itself, and tests that arrange or inspect a node, use
//! the default (operators') user with [`PASSWORD`]. Replicas follow their master as the
//! replication user. Sentinels are the shipped `redis/sentinel.conf`: they watch the nodes
//! as the sentinel user, require [`SENTINEL_PASSWORD`] of their default user, and let the
//! instances in as [`SERVICE_USER`] with [`SENTINEL_SERVICE_PASSWORD`].

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::machine::{free_port, log_tail, render, require, send_signal, wait_until};

/// The default user's: the operators' password.
pub const PASSWORD: &str = "test-secret";
/// The instances' user of `redis/users.acl`, and its password.
pub const SERVICE_USER: &str = "ratelimiter";
pub const SERVICE_PASSWORD: &str = "test-service-secret";
const REPLICA_PASSWORD: &str = "test-replica-secret";
/// How the sentinels log in to the data nodes (the `sentinel` user of `redis/users.acl`).
pub const SENTINEL_AUTH_PASSWORD: &str = "test-sentinel-auth-secret";
/// What every sentinel requires of its default (operators') user (`requirepass`), and
/// presents to the others.
pub const SENTINEL_PASSWORD: &str = "test-sentinel-secret";
/// The password of the instances' user on every sentinel ([`SERVICE_USER`] there too),
/// which may read the master's address and follow `+switch-master`, nothing more.
pub const SENTINEL_SERVICE_PASSWORD: &str = "test-sentinel-service-secret";
/// What the instances' user may touch: every test's prefix ([`crate::unique_prefix`])
/// starts with `t`, and the service's default `KEY_PREFIX` is `ratelimit`.
const SERVICE_KEY_PREFIX: &str = "t*";

/// One `redis-server` or `redis-sentinel` process.
pub struct RedisProcess {
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
    pub sentinel: bool,
    stopped: bool,
    /// What it was started with, to start it again the same way ([`RedisProcess::restart`]).
    binary: String,
    args: Vec<String>,
}

impl RedisProcess {
    /// A data node with the harness's own settings (no persistence, no write safety);
    /// `replica_of` makes it a replica.
    pub fn server(replica_of: Option<u16>, extra: &[&str]) -> Self {
        Self::server_on(free_port(), replica_of, extra)
    }

    /// [`RedisProcess::server`] on a given port.
    pub fn server_on(port: u16, replica_of: Option<u16>, extra: &[&str]) -> Self {
        require("redis-server", "redis-server");
        let dir = tempfile::tempdir().expect("temporary folder");
        let users = render_users(dir.path());
        let args = strings(&[
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--aclfile",
            &users,
            "--masteruser",
            "replica",
            "--masterauth",
            REPLICA_PASSWORD,
            "--logfile",
            "redis.log",
            "--repl-diskless-sync",
            "yes",
            "--repl-diskless-sync-delay",
            "0",
        ]);
        Self::start_data_node(args, dir, port, replica_of, extra)
    }

    /// A data node from a shipped template (`redis/master.conf`, `redis/replica.conf` or
    /// `redis/cluster-node.conf`), rendered into its folder by `scripts/render-config.sh`
    /// with `users.acl` beside it, and started with the command line `scripts/cluster.sh`
    /// gives it, so the node behaves as shipped (persistence, write safety and users
    /// included). Only the log file and `extra` (e.g. a shorter timeout) are the harness's.
    pub fn server_from_template(template: &str, replica_of: Option<u16>, extra: &[&str]) -> Self {
        require("redis-server", "redis-server");
        let dir = tempfile::tempdir().expect("temporary folder");
        let port = free_port();
        let copy = dir.path().join("redis.conf");
        render(
            template,
            &copy,
            &[("REDIS_REPLICA_PASSWORD", REPLICA_PASSWORD)],
        );
        // The template loads `users.acl` from its own folder, as the topologies render it.
        render_users(dir.path());
        let args = from_config(&copy, port, dir.path(), "redis.log");
        Self::start_data_node(args, dir, port, replica_of, extra)
    }

    /// A sentinel from the shipped `redis/sentinel.conf`, watching `master_port` as
    /// `redis-master`, on its own writable copy; `down_after_ms` and a 3 s failover
    /// timeout replace the shipped timings, so that tests fail over fast.
    pub fn sentinel(master_port: u16, down_after_ms: u64) -> Self {
        Self::sentinel_with(master_port, down_after_ms, "")
    }

    /// [`RedisProcess::sentinel`] with `extra` lines appended to its config, e.g. a
    /// `sentinel config-epoch` that a real sentinel would only reach by failovers.
    pub fn sentinel_with(master_port: u16, down_after_ms: u64, extra: &str) -> Self {
        require("redis-sentinel", "redis-sentinel");
        let dir = tempfile::tempdir().expect("temporary folder");
        let port = free_port();
        let copy = dir.path().join("sentinel.conf");
        let timings = format!(
            "sentinel down-after-milliseconds redis-master {down_after_ms}\n\
             sentinel failover-timeout redis-master 3000\n{extra}"
        );
        render(
            "redis/sentinel.conf",
            &copy,
            &[
                ("MASTER_HOST", "127.0.0.1"),
                ("MASTER_PORT", &master_port.to_string()),
                ("SENTINEL_AUTH_PASSWORD", SENTINEL_AUTH_PASSWORD),
                ("SENTINEL_PASSWORD", SENTINEL_PASSWORD),
                ("SENTINEL_SERVICE_PASSWORD", SENTINEL_SERVICE_PASSWORD),
                ("EXTRA_CONFIG", &timings),
            ],
        );
        let args = from_config(&copy, port, dir.path(), "sentinel.log");
        Self::spawn("redis-sentinel", args, dir, port, true)
    }

    /// Picks the node on `port` out of a topology's nodes.
    pub fn on_port(nodes: &[Self], port: u16) -> &Self {
        nodes
            .iter()
            .find(|n| n.port == port)
            .expect("a node on that port")
    }

    /// [`RedisProcess::on_port`], to stop or restart it.
    pub fn on_port_mut(nodes: &mut [Self], port: u16) -> &mut Self {
        nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("a node on that port")
    }

    fn start_data_node(
        mut args: Vec<String>,
        dir: tempfile::TempDir,
        port: u16,
        replica_of: Option<u16>,
        extra: &[&str],
    ) -> Self {
        if let Some(master) = replica_of {
            args.extend(strings(&["--replicaof", "127.0.0.1", &master.to_string()]));
        }
        args.extend(strings(extra));
        Self::spawn("redis-server", args, dir, port, false)
    }

    fn spawn(
        binary: &str,
        args: Vec<String>,
        dir: tempfile::TempDir,
        port: u16,
        sentinel: bool,
    ) -> Self {
        let child = Self::launch(binary, &args, dir.path());
        let process = Self {
            port,
            child,
            dir,
            sentinel,
            stopped: false,
            binary: binary.to_string(),
            args,
        };
        process.wait_for_answer();
        process
    }

    fn launch(binary: &str, args: &[String], dir: &Path) -> Child {
        Command::new(binary)
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {binary}: {err}"))
    }

    /// Until it answers PING (a data node still loading its files answers `LOADING`), and
    /// the process answering is this one: a port chosen free may be taken by another test's
    /// process before this one binds it, and then this one has exited.
    fn wait_for_answer(&self) {
        let mut answered = None;
        wait_until(
            &format!("{} on port {}", self.binary, self.port),
            Duration::from_secs(10),
            || {
                answered = self.try_connection();
                answered.is_some()
            },
        );
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query(&mut answered.expect("a connection"))
            .expect("INFO server");
        let pid = format!("process_id:{}", self.child.id());
        assert!(
            info.lines().any(|line| line.trim() == pid),
            "port {} answers for another process than {} ({}): it was taken before this one \
             could bind it\n{}",
            self.port,
            self.binary,
            self.child.id(),
            self.log_tail()
        );
    }

    /// Starts a process that was killed again: the same port, folder and command line,
    /// as a supervisor (Compose's `restart:`, systemd) would.
    pub fn restart(&mut self) {
        assert!(self.stopped, "restart a process that was killed first");
        self.child = Self::launch(&self.binary, &self.args, self.dir.path());
        self.stopped = false;
        self.wait_for_answer();
    }

    /// The node as the instances' restricted user sees it: what the service is given.
    pub fn url(&self) -> String {
        format!(
            "redis://{SERVICE_USER}:{SERVICE_PASSWORD}@127.0.0.1:{}",
            self.port
        )
    }

    /// A sentinel, with the password it requires.
    pub fn sentinel_url(&self) -> String {
        format!("redis://:{SENTINEL_PASSWORD}@127.0.0.1:{}", self.port)
    }

    /// The node as its default (operators') user.
    pub fn admin_url(&self) -> String {
        format!("redis://:{PASSWORD}@127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn try_connection(&self) -> Option<redis::Connection> {
        let url = if self.sentinel {
            self.sentinel_url()
        } else {
            self.admin_url()
        };
        let client = redis::Client::open(url).ok()?;
        let mut conn = client
            .get_connection_with_timeout(Duration::from_millis(500))
            .ok()?;
        conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        conn.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
        redis::cmd("PING").query::<String>(&mut conn).ok()?;
        Some(conn)
    }

    /// A connection with timeouts, as the operators' user; panics if the process does not
    /// answer.
    pub fn connection(&self) -> redis::Connection {
        self.try_connection()
            .unwrap_or_else(|| panic!("no answer from port {}\n{}", self.port, self.log_tail()))
    }

    /// `args` as the operators' user; panics on an error reply.
    pub fn command<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query(&mut self.connection())
            .unwrap_or_else(|err| panic!("{args:?} on port {}: {err}", self.port))
    }

    /// What `args` get from this process logged in as `login` (`None`: without logging
    /// in): the reply, or the error in upper case.
    pub fn reply_to(
        &self,
        login: Option<(&str, &str)>,
        args: &[&str],
    ) -> Result<redis::Value, String> {
        let url = match login {
            Some((user, password)) => format!("redis://{user}:{password}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        };
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        redis::Client::open(url)
            .and_then(|client| client.get_connection_with_timeout(Duration::from_secs(2)))
            .and_then(|mut conn| {
                conn.set_read_timeout(Some(Duration::from_secs(2)))?;
                cmd.query::<redis::Value>(&mut conn)
            })
            .map_err(|err| err.to_string().to_uppercase())
    }

    /// How many times `command` ran here (`INFO commandstats`), e.g. `"evalsha"`.
    pub fn command_calls(&self, command: &str) -> u64 {
        let stats: String = self.command(&["INFO", "commandstats"]);
        let prefix = format!("cmdstat_{command}:calls=");
        stats
            .lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .and_then(|calls| calls.parse().ok())
            .unwrap_or(0)
    }

    /// `master` or `slave`; `None` when it does not answer.
    pub fn role(&self) -> Option<String> {
        let mut conn = self.try_connection()?;
        let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut conn).ok()?;
        match role.first()? {
            redis::Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
            redis::Value::SimpleString(text) => Some(text.clone()),
            _ => None,
        }
    }

    pub fn log_tail(&self) -> String {
        let name = if self.sentinel {
            "sentinel.log"
        } else {
            "redis.log"
        };
        log_tail(&self.dir.path().join(name))
    }

    pub fn signal(&self, signal: &str) {
        send_signal(self.pid(), signal);
    }

    /// `kill -9`, and reap it.
    pub fn kill(&mut self) {
        if !self.stopped {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.stopped = true;
        }
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.stopped {
            eprintln!(
                "--- last lines of the process on port {} ---\n{}",
                self.port,
                self.log_tail()
            );
        }
        // A stopped (SIGSTOP) process ignores SIGKILL until continued, on some kernels.
        if !self.stopped {
            let _ = Command::new("kill")
                .args(["-CONT", &self.pid().to_string()])
                .stderr(Stdio::null())
                .status();
        }
        self.kill();
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|arg| arg.to_string()).collect()
}

/// `redis/users.acl` rendered into `dir` with the harness's passwords; its path.
fn render_users(dir: &Path) -> String {
    let path = dir.join("users.acl");
    render(
        "redis/users.acl",
        &path,
        &[
            ("REDIS_ADMIN_PASSWORD", PASSWORD),
            ("REDIS_PASSWORD", SERVICE_PASSWORD),
            ("KEY_PREFIX", SERVICE_KEY_PREFIX),
            ("REDIS_REPLICA_PASSWORD", REPLICA_PASSWORD),
            ("SENTINEL_AUTH_PASSWORD", SENTINEL_AUTH_PASSWORD),
        ],
    );
    path.display().to_string()
}

/// The command line of a node started from a rendered config: the harness's port, address,
/// folder and log file on top of it.
fn from_config(config: &Path, port: u16, dir: &Path, log_file: &str) -> Vec<String> {
    strings(&[
        &config.display().to_string(),
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--dir",
        &dir.display().to_string(),
        "--logfile",
        log_file,
    ])
}
