//! The native topology as the bench and the soak drive it: `scripts/cluster.sh up` and
//! `down` in a folder of their own, and its processes found by their pid records.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Result, bail};

use crate::measure::Groups;
use crate::node::Node;
use crate::ports::Ports;
use crate::process::{Records, children_of, run_logged, tail};

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
        let (ports, root, password) = (
            Ports::read(root, offset)?,
            root.to_owned(),
            password.to_owned(),
        );
        let (bin, up) = (None, false);
        Ok(Self {
            root,
            dir,
            ports,
            offset,
            bin,
            password,
            up,
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
        command.envs(self.bin.iter().map(|bin| ("RATELIMITER_BIN", bin)));
        command
    }

    /// `scripts/cluster.sh up FLAGS` with exactly the settings phases decide that `env`
    /// (`NAME=value` words) sets; returns its last line.
    pub fn start(&mut self, env: &str, flags: &[&str], log: &Path) -> Result<String> {
        let mut command = self.command("up");
        for var in crate::phases::PHASE_VARS.split(' ') {
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
        let nginx = records.pids(|n| n == "nginx").into_iter();
        let nginx = nginx
            .flat_map(|p| [vec![p], children_of(p)])
            .flatten()
            .collect();
        let mut groups: Groups = [("app", named("app-")), ("sentinels", named("sentinel-"))].into();
        groups.extend([("upstream", named("demo-upstream")), ("nginx", nginx)]);
        let redis_cluster = !named("redis-cluster-").is_empty();
        let (ports, prefix, expected) = match redis_cluster {
            true => (&self.ports.cluster, "redis-cluster-", 3),
            false => (&self.ports.data, "redis-", 1),
        };
        let mut masters = Vec::new();
        for &port in ports {
            let node = Node::new(port, Some(&self.password));
            let group = if node.is_master() {
                "master"
            } else {
                "replicas"
            };
            let pids = records.pids(|n| n == format!("{prefix}{port}"));
            groups.entry(group).or_default().extend(pids);
            masters.extend((group == "master").then_some(node));
        }
        let count = |g: &str| groups.get(g).map_or(0, Vec::len);
        let (apps, nginx, found) = (count("app"), count("nginx"), count("master"));
        if apps != 2 || nginx < 2 || found != expected {
            let pids = records.0.display();
            bail!(
                "cannot find the cluster's processes in {pids} (instances: {apps}, nginx: {nginx}, masters: {found})"
            );
        }
        Ok(Processes { groups, masters })
    }
}
