//! The native topology as the bench and the soak drive it: `scripts/cluster.sh up` and
//! `down` in a folder of their own, and its processes found by their pid records.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Result, bail};

use crate::measure::Groups;
use crate::node::Node;
use crate::ports::Ports;
use crate::procfs::children_of;
use crate::spawn::{Records, run_logged, tail};

pub struct Cluster {
    pub root: PathBuf,
    /// Its CLUSTER_DIR: configs, data, logs and the pids file.
    pub dir: PathBuf,
    pub ports: Ports,
    pub offset: u16,
    /// RATELIMITER_BIN for scripts/cluster.sh, if not its own build.
    pub bin: Option<PathBuf>,
    /// The data nodes' default (operators') user's password: INFO, ROLE, SCRIPT LOAD.
    pub password: String,
    /// Whether this program started it (and so stops it).
    pub up: bool,
}

/// The running cluster's processes: each group's pids, and its masters.
#[derive(Debug, Clone, Default)]
pub struct Processes {
    pub groups: Groups,
    /// The master (Sentinel mode) or the three masters (Cluster mode).
    pub masters: Vec<Node>,
}

impl Cluster {
    /// The cluster of `dir` on the ports of scripts/ports.env shifted by `offset`.
    pub fn new(root: &Path, dir: PathBuf, offset: u16, password: &str) -> Result<Self> {
        let ports = Ports::read(root, offset)?;
        let (root, password) = (root.to_owned(), password.to_owned());
        Ok(Self {
            root,
            dir,
            ports,
            offset,
            bin: None,
            password,
            up: false,
        })
    }

    pub fn records(&self) -> Records {
        Records(self.dir.join("pids"))
    }

    fn command(&self, verb: &str) -> Command {
        let mut command = Command::new(self.root.join("scripts/cluster.sh"));
        command
            .arg(verb)
            .env("CLUSTER_DIR", &self.dir)
            .env("REDIS_ADMIN_PASSWORD", &self.password);
        command.env("CLUSTER_PORT_OFFSET", self.offset.to_string());
        if let Some(bin) = &self.bin {
            command.env("RATELIMITER_BIN", bin);
        }
        command
    }

    /// `scripts/cluster.sh up FLAGS` with exactly the settings phases decide that `env`
    /// (`NAME=value` words) sets; returns its last line.
    pub fn start(&mut self, env: &str, flags: &[&str], log: &Path) -> Result<String> {
        let mut command = self.command("up");
        for var in crate::phases::PHASE_VARS {
            command.env_remove(var);
        }
        self.up = true;
        if !run_logged(command.args(flags).envs(crate::env_pairs(env)), log)?.success() {
            eprintln!("{}", tail(log, 20));
            bail!("scripts/cluster.sh up failed; see {}", log.display());
        }
        Ok(tail(log, 1).trim_start_matches("cluster: ").to_owned())
    }

    /// `scripts/cluster.sh down`, if this program started it.
    pub fn stop(&mut self, log: &Path) {
        if std::mem::take(&mut self.up)
            && !run_logged(&mut self.command("down"), log).is_ok_and(|s| s.success())
        {
            crate::warn!("scripts/cluster.sh down failed; see {}", log.display());
        }
    }

    /// The processes of its pids file, the data nodes sorted by role; fails unless two
    /// instances, Nginx and the masters of its mode run.
    pub fn processes(&self) -> Result<Processes> {
        let records = self.records();
        let named = |prefix: &str| records.pids(|n| n.starts_with(prefix));
        let mut groups = Groups::new();
        groups.insert("app", named("app-"));
        groups.insert("sentinels", named("sentinel-"));
        groups.insert("upstream", named("demo-upstream"));
        let nginx = records.pids(|n| n == "nginx");
        groups.insert(
            "nginx",
            nginx
                .iter()
                .flat_map(|&p| [vec![p], children_of(p)])
                .flatten()
                .collect(),
        );
        let redis_cluster = !named("redis-cluster-").is_empty();
        let (ports, prefix) = if redis_cluster {
            (&self.ports.cluster, "redis-cluster-")
        } else {
            (&self.ports.data, "redis-")
        };
        let mut masters = Vec::new();
        for &port in ports {
            let node = Node::new(port, Some(&self.password));
            let pids = records.pids(|n| n == format!("{prefix}{port}"));
            let group = if node.is_master() {
                "master"
            } else {
                "replicas"
            };
            groups.entry(group).or_default().extend(pids);
            if group == "master" {
                masters.push(node);
            }
        }
        let expected = if redis_cluster { 3 } else { 1 };
        let count = |g: &str| groups.get(g).map_or(0, Vec::len);
        if count("app") != 2 || count("nginx") < 2 || count("master") != expected {
            bail!(
                "cannot find the cluster's processes in {} (instances: {}, nginx: {}, masters: {})",
                records.0.display(),
                count("app"),
                count("nginx"),
                count("master")
            );
        }
        Ok(Processes { groups, masters })
    }
}
