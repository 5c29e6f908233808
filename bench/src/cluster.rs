//! The native topology as the bench and the soak drive it: its ports, from
//! `scripts/ports.env` (the one definition scripts/cluster.sh sources too, so the bench and
//! the cluster it measures never disagree); `scripts/cluster.sh up` and `down` in a folder
//! of their own; and its processes, found by their pid records.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::node::Node;
use crate::process::{Records, children_of, run_logged, tail};

/// Every port of the native topology, shifted by its CLUSTER_PORT_OFFSET.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ports {
    pub nginx: u16,
    pub apps: Vec<u16>,
    pub data: Vec<u16>,
    pub sentinels: Vec<u16>,
    /// Cluster mode's nodes (each with its bus on port + 10000).
    pub cluster: Vec<u16>,
    pub gateway: u16,
    pub upstream: u16,
    pub upstream_count: u16,
}

impl Ports {
    pub fn parse(text: &str, offset: u16) -> Result<Self> {
        let lines = text
            .lines()
            .filter(|line| !line.trim_start().starts_with('#'));
        let pairs = lines.filter_map(|line| line.split_once('='));
        let values: BTreeMap<&str, &str> = pairs.map(|(k, v)| (k, v.trim_matches('"'))).collect();
        let list = |name: &str| -> Result<Vec<u16>> {
            let words = values.get(name).with_context(|| format!("no {name}"))?;
            let ports = words
                .split_whitespace()
                .map(|word| Ok(word.parse::<u16>()? + offset));
            ports
                .collect::<Result<_>>()
                .with_context(|| format!("{name}={words}: not ports"))
        };
        let one = |name: &str| -> Result<u16> { Ok(list(name)?[0]) };
        Ok(Self {
            nginx: one("NGINX_PORT")?,
            apps: list("APP_PORTS")?,
            data: list("DATA_PORTS")?,
            sentinels: list("SENTINEL_PORTS")?,
            cluster: list("CLUSTER_PORTS")?,
            gateway: one("GATEWAY_PORT")?,
            upstream: one("UPSTREAM_PORT")?,
            upstream_count: one("UPSTREAM_COUNT_PORT")?,
        })
    }

    /// Every port a cluster of any mode takes, Cluster mode's buses included.
    pub fn all(&self) -> Vec<u16> {
        let mut ports = vec![self.nginx, self.gateway, self.upstream, self.upstream_count];
        ports.extend(self.apps.iter().chain(&self.data).chain(&self.sentinels));
        ports.extend(self.cluster.iter().flat_map(|&p| [p, p + 10_000]));
        ports
    }
}

/// The pids of each process group whose CPU is counted (`app` are the instances).
pub type Groups = BTreeMap<&'static str, Vec<u32>>;

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
        let path = root.join("scripts/ports.env");
        let text = std::fs::read_to_string(&path);
        let text = text.with_context(|| format!("cannot read {}", path.display()))?;
        let ports = Ports::parse(&text, offset).with_context(|| format!("in {}", path.display()));
        Ok(Self {
            root: root.to_owned(),
            dir,
            ports: ports?,
            offset,
            bin: None,
            password: password.to_owned(),
            up: false,
        })
    }

    pub fn records(&self) -> Records {
        Records(self.dir.join("pids"))
    }

    fn command(&self, verb: &str) -> Command {
        let mut command = Command::new(self.root.join("scripts/cluster.sh"));
        command.arg(verb).env("CLUSTER_DIR", &self.dir);
        command.env("REDIS_ADMIN_PASSWORD", &self.password);
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
        let up = std::mem::take(&mut self.up);
        if up && !run_logged(&mut self.command("down"), log).is_ok_and(|s| s.success()) {
            crate::warn!("scripts/cluster.sh down failed; see {}", log.display());
        }
    }

    /// The processes of its pids file, the data nodes sorted by role; fails unless two
    /// instances, Nginx and the masters of its mode run.
    pub fn processes(&self) -> Result<Processes> {
        let records = self.records();
        let named = |prefix: &str| records.pids(|n| n.starts_with(prefix));
        let with_children = |pid: u32| [vec![pid], children_of(pid)].concat();
        let nginx = records.pids(|n| n == "nginx").into_iter();
        let nginx = nginx.flat_map(with_children).collect();
        let mut groups: Groups = [("app", named("app-")), ("sentinels", named("sentinel-"))].into();
        groups.extend([("upstream", named("demo-upstream")), ("nginx", nginx)]);
        let (ports, prefix, expected) = match named("redis-cluster-").is_empty() {
            false => (&self.ports.cluster, "redis-cluster-", 3),
            true => (&self.ports.data, "redis-", 1),
        };
        let mut masters = Vec::new();
        for &port in ports {
            let node = Node::new(port, Some(&self.password));
            let master = node.is_master();
            let group = if master { "master" } else { "replicas" };
            let pids = records.pids(|n| n == format!("{prefix}{port}"));
            groups.entry(group).or_default().extend(pids);
            masters.extend(master.then_some(node));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_ports_file_is_read_and_shifted_by_the_offset_and_a_broken_one_is_an_error() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let text = std::fs::read_to_string(root.join("scripts/ports.env")).unwrap();
        let ports = Ports::parse(&text, 0).unwrap();
        assert_eq!(
            (ports.nginx, &ports.apps[..], ports.data[0]),
            (8000, &[8001, 8002][..], 6379)
        );
        let shifted = Cluster::new(&root, root.join("run"), 1000, "").unwrap();
        let shifted = shifted.ports;
        let cluster = (shifted.nginx, shifted.sentinels[0], shifted.cluster.len());
        assert_eq!(cluster, (9000, 27379, 6));
        assert!(shifted.all().contains(&18000));
        assert!(Ports::parse(&text.replace("8001", "x"), 0).is_err());
        assert!(Ports::parse("NGINX_PORT=8000\n", 0).is_err());
    }
}
