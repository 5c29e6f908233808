//! `scripts/soak.sh`: steady load on the native topology for a number of minutes while it
//! is hurt on a schedule, then a verdict. The script starts and stops the cluster; this
//! program drives the minutes, does the harm, samples every process and judges.
//!
//! Each minute is one run of the load generator (its `--json` is read afterwards): 241
//! clients through Nginx at a steady offered rate. On top of it:
//! - every `--kill-every` minutes, 15 s into the minute, `kill -9` of the current master;
//!   once the sentinels have promoted a replica that takes writes and both instances
//!   decide with Redis again, the killed node is started again in place (same port,
//!   folder and config) and rejoins as a replica;
//! - before the middle minute, the policy file is rewritten with other numbers, and the
//!   next minute starts once both instances serve the new version (`GET /v1/policies`);
//! - every `--sample-secs`, the resident memory (VmRSS) and open descriptors of every
//!   process of the topology (those in the cluster's pids file, and Nginx's workers).
//!
//! The checks: no 5xx and no failed request; every client of every minute admitted at
//! most [`client_bound`]; memory and descriptors of every process flat after warm-up
//! ([`flatness`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, sleep};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::machine::{self, Machine};
use crate::procfs::{children_of, memory_kib};
use crate::redis_info::{Node, info_field};
use crate::spawn::{Record, Records, Started, spawn_recorded};
use crate::{LOOPBACK, http, say};

/// The master's name in the sentinels (scripts/cluster.sh).
const MASTER_NAME: &str = "redis-master";
/// The ports of scripts/cluster.sh before its CLUSTER_PORT_OFFSET.
const SENTINEL_PORTS: [u16; 3] = [26379, 26380, 26381];
const APP_PORTS: [u16; 2] = [8001, 8002];
const NGINX_PORT: u16 = 8000;
/// The instances of scripts/cluster.sh: the `n` of the local fallback's shares.
const INSTANCES: u64 = 2;
/// Into each minute, when its master kill comes.
const KILL_AT: Duration = Duration::from_secs(15);
/// Bound on every wait for the topology (a failover, a rejoin, a reload).
const WAIT: Duration = Duration::from_secs(60);
/// Growth allowed between the first sample after warm-up and the last, in percent.
pub const FLAT_PERCENT: f64 = 5.0;

#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// How long the load runs, in minutes (one load-generator run each).
    #[arg(long, value_parser = clap::value_parser!(u64).range(2..=240))]
    minutes: u64,
    /// The cluster's folder (CLUSTER_DIR of scripts/cluster.sh): its pids file, its data
    /// nodes' folders.
    #[arg(long)]
    cluster_dir: PathBuf,
    /// The instances' POLICY_FILE, rewritten for the reload.
    #[arg(long)]
    policy_file: PathBuf,
    /// Only write the first policy to --policy-file, for the cluster to start with.
    #[arg(long)]
    write_policy: bool,
    /// CLUSTER_PORT_OFFSET of scripts/cluster.sh.
    #[arg(long, default_value_t = 0)]
    port_offset: u16,
    /// The password of the data nodes' operators' (default) user, which reads their INFO
    /// and roles (scripts/cluster.sh's REDIS_ADMIN_PASSWORD).
    #[arg(
        long,
        env = "REDIS_ADMIN_PASSWORD",
        default_value = "ratelimiter-dev-admin-password"
    )]
    password: String,
    /// The sentinels' password (scripts/cluster.sh's SENTINEL_PASSWORD).
    #[arg(
        long,
        env = "SENTINEL_PASSWORD",
        default_value = "ratelimiter-dev-sentinel-password"
    )]
    sentinel_password: Option<String>,
    /// The load generator's binary (target/release/loadtest).
    #[arg(long)]
    loadtest: Option<PathBuf>,
    /// Where the load generator's summaries, the samples and the report go.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Requests per second offered over all clients.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(10..=2000))]
    rate: u32,
    /// Seconds between two samples of every process.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=60))]
    sample_secs: u64,
    /// Minutes between two master kills (the first comes in the first minute).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=60))]
    kill_every: u64,
    /// Seconds of warm-up, at least (a quarter of the run when that is longer): samples
    /// of a process count from this long after the load started or the process did,
    /// whichever is later.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(0..=3600))]
    warmup_secs: u64,
}

/// One limit per client address on `/limited_endpoint`; the reload swaps one for the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub label: &'static str,
    /// Tokens per minute.
    pub per_minute: u64,
    pub burst: u64,
}

pub const POLICIES: [Policy; 2] = [
    Policy {
        label: "A",
        per_minute: 12,
        burst: 6,
    },
    Policy {
        label: "B",
        per_minute: 30,
        burst: 10,
    },
];

impl Policy {
    pub fn toml(&self) -> String {
        format!(
            "# Written by scripts/soak.sh (policy {label}); rewritten for its reload.\n\
             [[policy]]\n\
             name = \"soak\"\n\
             match = {{ path = \"/limited_endpoint\" }}\n\
             key = [\"client_ip\"]\n\
             limits = [{{ name = \"minute\", rate = {rate}, per = \"1m\", burst = {burst} }}]\n",
            label = self.label,
            rate = self.per_minute,
            burst = self.burst,
        )
    }

    pub fn refill_per_s(&self) -> f64 {
        self.per_minute as f64 / 60.0
    }

    pub fn describe(&self) -> String {
        format!(
            "{}: {}/min, burst {}",
            self.label, self.per_minute, self.burst
        )
    }
}

/// The most a client may be admitted in one minute's run: what its bucket holds at most
/// when the run starts (`C`, a full bucket; a policy changed by the reload starts full)
/// plus the refill over the time its decisions can span (`span_s`, its first send to
/// its last answer), plus `allowance` for the failovers of that minute.
pub fn client_bound(policy: &Policy, span_s: f64, allowance: u64) -> u64 {
    (policy.burst as f64 + policy.refill_per_s() * span_s).floor() as u64 + allowance
}

/// What one failover may add per client (docs/RELIABILITY.md, "Measured"): while the
/// local fallback decides for `fallback_s`, each of the `n` instances gives the client a
/// share of its own, `max(1, floor(C / n))` tokens refilled at `rate / n`, charged to no
/// shared bucket.
pub fn failover_allowance(policy: &Policy, instances: u64, fallback_s: f64) -> u64 {
    let share = (policy.burst / instances).max(1);
    let refill = (policy.refill_per_s() * fallback_s / instances as f64).floor() as u64;
    instances * (share + refill)
}

/// What the load generator's `--json` says of one minute (loadtest/src/summary.rs).
#[derive(Debug, Clone, Deserialize)]
pub struct MinuteSummary {
    pub requests: MinuteRequests,
    pub classes: MinuteClasses,
    #[serde(default)]
    pub by_decision_source: BTreeMap<String, u64>,
    pub latency_ms: Option<MinuteLatency>,
    pub clients: Vec<ClientSummary>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub struct MinuteRequests {
    pub answered: u64,
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub struct MinuteClasses {
    pub admitted: u64,
    pub rejected: u64,
    pub server_errors: u64,
    pub other: u64,
    pub errors: u64,
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub struct MinuteLatency {
    pub p99: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ClientSummary {
    pub address: String,
    pub admitted: u64,
    pub span_s: f64,
}

/// One master kill, and how the topology came back.
#[derive(Debug, Clone)]
pub struct Failover {
    pub old_port: u16,
    pub new_port: u16,
    /// Kill → every sentinel names the new master and it takes writes.
    pub promoted_s: f64,
    /// Kill → both instances answer a probe with a Redis decision: an upper bound on how
    /// long the fallback decided.
    pub fallback_s: f64,
    /// The killed node's restart → it is a replica of the new master, linked.
    pub rejoined_s: f64,
}

/// One minute of load and what it showed.
#[derive(Debug, Clone)]
pub struct Minute {
    pub index: u64,
    /// When its load generator started and ended, in seconds of the soak.
    pub load_s: (f64, f64),
    pub policy: Policy,
    pub summary: MinuteSummary,
    pub failovers: Vec<Failover>,
    pub reload_s: Option<f64>,
}

/// The worst client of a minute, and how many were over.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub allowance: u64,
    pub worst_address: String,
    pub worst_admitted: u64,
    pub worst_bound: u64,
    pub over: usize,
}

impl Minute {
    pub fn allowance(&self) -> u64 {
        self.failovers
            .iter()
            .map(|f| failover_allowance(&self.policy, INSTANCES, f.fallback_s))
            .sum()
    }

    /// The client closest to (or furthest over) its bound.
    pub fn verdict(&self) -> Verdict {
        let allowance = self.allowance();
        let mut verdict = Verdict {
            allowance,
            worst_address: String::new(),
            worst_admitted: 0,
            worst_bound: 0,
            over: 0,
        };
        let mut worst_margin = i64::MAX;
        for client in &self.summary.clients {
            let bound = client_bound(&self.policy, client.span_s, allowance);
            let margin = bound as i64 - client.admitted as i64;
            if margin < 0 {
                verdict.over += 1;
            }
            if margin < worst_margin {
                worst_margin = margin;
                verdict.worst_address = client.address.clone();
                verdict.worst_admitted = client.admitted;
                verdict.worst_bound = bound;
            }
        }
        verdict
    }

    /// Decisions not taken by Redis (the local fallback).
    pub fn fallback_decisions(&self) -> u64 {
        self.summary
            .by_decision_source
            .iter()
            .filter(|(source, _)| source.as_str() != "redis")
            .map(|(_, count)| count)
            .sum()
    }
}

/// One look at one process (Nginx's workers: all of them, summed, under the master's pid).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub at_s: f64,
    pub name: String,
    pub pid: u32,
    pub rss_kib: u64,
    pub fds: u64,
    /// A data node: is its replication backlog full (`repl_backlog_histlen` reached
    /// `repl_backlog_size`)? Until then it grows with every write, by design, up to
    /// `repl-backlog-size`. `None` for every other process.
    pub backlog_full: Option<bool>,
    /// A data node: `master` or `slave`. Its descriptors follow its role (a master holds
    /// the instances' connections and its replicas'), so only samples of one role compare.
    pub role: Option<String>,
}

/// A process's memory and descriptors from the first sample after its warm-up to its last.
#[derive(Debug, Clone, PartialEq)]
pub struct Flatness {
    pub name: String,
    pub pid: u32,
    pub from_s: f64,
    pub to_s: f64,
    pub rss_kib: (u64, u64),
    pub fds: (u64, u64),
}

impl Flatness {
    pub fn rss_growth(&self) -> f64 {
        growth_percent(self.rss_kib)
    }

    pub fn fds_growth(&self) -> f64 {
        growth_percent(self.fds)
    }

    pub fn flat(&self) -> bool {
        self.rss_growth() < FLAT_PERCENT && self.fds_growth() < FLAT_PERCENT
    }
}

pub fn growth_percent((first, last): (u64, u64)) -> f64 {
    if first == 0 {
        return if last == 0 { 0.0 } else { f64::INFINITY };
    }
    100.0 * (last as f64 - first as f64) / first as f64
}

/// The shortest stretch between the two samples compared that is worth a verdict.
pub const MIN_JUDGED_S: f64 = 30.0;
/// How many samples stand for "the first after warm-up" and "the last": their median,
/// so that one passing connection (Nginx opens more to an instance for a moment when a
/// request is slow, and closes them after its 4 s keep-alive) is not taken for growth.
pub const MEDIAN_OF: usize = 6;

/// The lower median of `value` over `samples` (not empty).
fn median(samples: &[&Sample], value: impl Fn(&Sample) -> u64) -> u64 {
    let mut values: Vec<u64> = samples.iter().map(|s| value(s)).collect();
    values.sort_unstable();
    values[(values.len() - 1) / 2]
}

/// Per process (name and pid, in the order first seen): its warm-up ends `warmup_s`
/// after its first sample (the load starts at 0 s, with every process of the cluster
/// already up), and for a data node not before its replication backlog is full; of a
/// data node, only the samples taken in the role it ended in count.
/// Compared are the first samples after warm-up and the last ones (the median of
/// [`MEDIAN_OF`] each, fewer when there are fewer), all taken while the load ran
/// (`under_load`: connections, and so descriptors, come and go between the load
/// generator's runs). A process whose judged samples span less than [`MIN_JUDGED_S`] is
/// `None`: too short to judge.
pub fn flatness(
    samples: &[Sample],
    warmup_s: f64,
    under_load: impl Fn(f64) -> bool,
) -> Vec<(String, u32, Option<Flatness>)> {
    let mut order: Vec<(String, u32)> = Vec::new();
    for sample in samples {
        let key = (sample.name.clone(), sample.pid);
        if !order.contains(&key) {
            order.push(key);
        }
    }
    order
        .into_iter()
        .map(|(name, pid)| {
            let own: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.name == name && s.pid == pid)
                .collect();
            let warm = own.first().map_or(0.0, |s| s.at_s) + warmup_s;
            let final_role = own.last().and_then(|s| s.role.clone());
            let judged: Vec<&Sample> = own
                .iter()
                .copied()
                .filter(|s| under_load(s.at_s) && s.role == final_role)
                .skip_while(|s| s.at_s < warm || s.backlog_full == Some(false))
                .collect();
            let (Some(first), Some(last)) = (judged.first(), judged.last()) else {
                return (name, pid, None);
            };
            if last.at_s - first.at_s < MIN_JUDGED_S {
                return (name, pid, None);
            }
            let k = (judged.len() / 2).clamp(1, MEDIAN_OF);
            let (head, tail) = (&judged[..k], &judged[judged.len() - k..]);
            let flatness = Flatness {
                name: name.clone(),
                pid,
                from_s: first.at_s,
                to_s: last.at_s,
                rss_kib: (median(head, |s| s.rss_kib), median(tail, |s| s.rss_kib)),
                fds: (median(head, |s| s.fds), median(tail, |s| s.fds)),
            };
            (name, pid, Some(flatness))
        })
        .collect()
}

/// The ports of the cluster, after its offset.
#[derive(Debug, Clone)]
struct Ports {
    sentinels: Vec<u16>,
    apps: Vec<u16>,
    nginx: u16,
}

impl Ports {
    fn new(offset: u16) -> Self {
        let shift = |ports: &[u16]| ports.iter().map(|p| p + offset).collect();
        Self {
            sentinels: shift(&SENTINEL_PORTS),
            apps: shift(&APP_PORTS),
            nginx: NGINX_PORT + offset,
        }
    }
}

struct Soak {
    options: Options,
    ports: Ports,
    cluster: Records,
    own: Records,
    out_dir: PathBuf,
    loadtest: PathBuf,
    started: Instant,
}

pub fn run(options: Options) -> Result<()> {
    if options.write_policy {
        return write_policy(&options.policy_file, &POLICIES[0]);
    }
    let out_dir = options
        .out_dir
        .clone()
        .context("--out-dir is required for a run")?;
    let loadtest = options
        .loadtest
        .clone()
        .context("--loadtest is required for a run")?;
    fs::create_dir_all(&out_dir).with_context(|| format!("cannot make {}", out_dir.display()))?;
    let soak = Soak {
        ports: Ports::new(options.port_offset),
        cluster: Records::new(options.cluster_dir.join("pids")),
        own: Records::new(out_dir.join("pids")),
        out_dir,
        loadtest,
        started: Instant::now(),
        options,
    };
    soak.run()
}

/// The warm-up: `at_least` seconds, or a quarter of the run when that is longer. Memory
/// settles where the first hard minutes leave it (the first failovers and the first
/// slow calls: allocators keep what the busiest moment asked for), which comes later in
/// a longer run; a leak goes on growing over the three quarters left.
pub fn warmup_secs(at_least: u64, minutes: u64) -> u64 {
    at_least.max(minutes * 60 / 4)
}

fn write_policy(path: &Path, policy: &Policy) -> Result<()> {
    // A new file renamed over the old: the watcher never reads half a file.
    let fresh = path.with_extension("toml.new");
    fs::write(&fresh, policy.toml())
        .with_context(|| format!("cannot write {}", fresh.display()))?;
    fs::rename(&fresh, path).with_context(|| format!("cannot replace {}", path.display()))
}

impl Soak {
    fn run(&self) -> Result<()> {
        let started_at = SystemTime::now();
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (samples, stop) = (Arc::clone(&samples), Arc::clone(&stop));
            let pids_file = self.options.cluster_dir.join("pids");
            let every = Duration::from_secs(self.options.sample_secs);
            let started = self.started;
            let password = self.options.password.clone();
            thread::spawn(move || {
                sample_until(&pids_file, &password, every, started, &samples, &stop)
            })
        };
        let reload_minute = self.options.minutes / 2;
        say!(
            "{} minutes at {}/s from 241 clients through Nginx on {}; master kill every {} min; reload before minute {}",
            self.options.minutes,
            self.options.rate,
            self.ports.nginx,
            self.options.kill_every,
            reload_minute + 1
        );
        let mut minutes = Vec::new();
        let mut outcome = Ok(());
        for index in 0..self.options.minutes {
            match self.minute(index, reload_minute) {
                Ok(minute) => minutes.push(minute),
                Err(error) => {
                    outcome = Err(error.context(format!("minute {}", index + 1)));
                    break;
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        let _ = sampler.join();
        let samples = samples.lock().map(|s| s.clone()).unwrap_or_default();
        write_samples(&self.out_dir.join("samples.csv"), &samples)?;
        let report = Report {
            minutes,
            samples,
            warmup_s: warmup_secs(self.options.warmup_secs, self.options.minutes) as f64,
            rate: self.options.rate,
            started: machine::utc_minute(started_at),
            machine: Machine::read(),
            load: machine::load_average(),
        };
        let text = report.render();
        println!("{text}");
        fs::write(self.out_dir.join("report.md"), &text)?;
        outcome?;
        let failed = report.failed_checks();
        if failed > 0 {
            bail!(
                "{failed} check(s) failed (report: {})",
                self.out_dir.join("report.md").display()
            );
        }
        say!("every check passed");
        Ok(())
    }

    fn at_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn minute(&self, index: u64, reload_minute: u64) -> Result<Minute> {
        let mut reload_s = None;
        if index == reload_minute {
            reload_s = Some(self.reload(&POLICIES[1])?);
        }
        let policy = POLICIES[usize::from(index >= reload_minute)];
        let json = self.out_dir.join(format!("minute-{:03}.json", index + 1));
        let log = self.out_dir.join("loadtest.log");
        let begun = Instant::now();
        let load_from = self.at_s();
        let mut load = Started::spawn(
            &self.own,
            "loadtest",
            Command::new(&self.loadtest)
                .arg("--url")
                .arg(format!(
                    "http://{LOOPBACK}:{}/limited_endpoint",
                    self.ports.nginx
                ))
                .args(["--rate", &self.options.rate.to_string()])
                .args(["--duration", "60s", "--timeout", "5s", "--window", "60"])
                .args(["--limit", &policy.per_minute.to_string()])
                .args(["--burst", &policy.burst.to_string()])
                .arg("--json")
                .arg(&json),
            &log,
        )?;
        let mut failovers = Vec::new();
        if index.is_multiple_of(self.options.kill_every) {
            sleep(KILL_AT.saturating_sub(begun.elapsed()));
            failovers.push(self.kill_master()?);
        }
        let status = load.wait()?;
        let load_s = (load_from, self.at_s());
        if !status.success() {
            bail!(
                "the load generator failed ({status}); see {}",
                log.display()
            );
        }
        let text =
            fs::read_to_string(&json).with_context(|| format!("cannot read {}", json.display()))?;
        let summary: MinuteSummary = serde_json::from_str(&text)
            .with_context(|| format!("cannot parse {}", json.display()))?;
        let minute = Minute {
            index,
            load_s,
            policy,
            summary,
            failovers,
            reload_s,
        };
        let verdict = minute.verdict();
        say!(
            "minute {}: {} answered, {} admitted, {} 5xx, {} errors; worst client {} of {} allowed{}",
            index + 1,
            minute.summary.requests.answered,
            minute.summary.classes.admitted,
            minute.summary.classes.server_errors,
            minute.summary.classes.errors,
            verdict.worst_admitted,
            verdict.worst_bound,
            if verdict.over > 0 {
                format!("; {} client(s) OVER", verdict.over)
            } else {
                String::new()
            }
        );
        Ok(minute)
    }

    /// Rewrites the policy file and waits until both instances serve the new version.
    fn reload(&self, policy: &Policy) -> Result<f64> {
        let before: Vec<String> = self
            .ports
            .apps
            .iter()
            .map(|&port| policy_version(port))
            .collect::<Result<_>>()?;
        let begun = Instant::now();
        write_policy(&self.options.policy_file, policy)?;
        for (&port, old) in self.ports.apps.iter().zip(&before) {
            wait_until(
                &format!("the instance on {port} serves the rewritten policy file"),
                || policy_version(port).is_ok_and(|version| &version != old),
            )?;
        }
        let took = begun.elapsed().as_secs_f64();
        say!(
            "policy reloaded ({}) on both instances in {took:.1} s",
            policy.describe()
        );
        Ok(took)
    }

    fn sentinel(&self, port: u16) -> Node {
        Node::new(port, self.options.sentinel_password.as_deref())
    }

    fn data_node(&self, port: u16) -> Node {
        Node::new(port, Some(&self.options.password))
    }

    fn master_port(&self) -> Result<u16> {
        self.ports
            .sentinels
            .iter()
            .find_map(|&port| self.sentinel(port).sentinel_master_port(MASTER_NAME).ok())
            .context("no sentinel names a master")
    }

    fn kill_master(&self) -> Result<Failover> {
        let old_port = self.master_port()?;
        let name = format!("redis-{old_port}");
        let record = running_record(&self.options.cluster_dir.join("pids"), &name)
            .with_context(|| format!("the master {name} is not a running recorded process"))?;
        let killed = Instant::now();
        let status = Command::new("kill")
            .args(["-KILL", &record.pid.to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -KILL {} ({name}) failed", record.pid);
        }
        say!(
            "at {:.0} s: kill -9 of the master {name} (pid {})",
            self.at_s(),
            record.pid
        );
        let mut new_port = 0;
        wait_until(
            "every sentinel names a new master that takes writes",
            || {
                let named: Vec<Option<u16>> = self
                    .ports
                    .sentinels
                    .iter()
                    .map(|&port| self.sentinel(port).sentinel_master_port(MASTER_NAME).ok())
                    .collect();
                let Some(Some(first)) = named.first().copied() else {
                    return false;
                };
                if first == old_port || named.iter().any(|port| *port != Some(first)) {
                    return false;
                }
                new_port = first;
                takes_writes(&self.data_node(first))
            },
        )?;
        let promoted_s = killed.elapsed().as_secs_f64();
        for &port in &self.ports.apps {
            wait_until(
                &format!("the instance on {port} decides with Redis again"),
                || decides_with_redis(port),
            )?;
        }
        let fallback_s = killed.elapsed().as_secs_f64();
        say!(
            "new master {new_port} after {promoted_s:.1} s; both instances decide with Redis after {fallback_s:.1} s"
        );

        // In place: its port, folder and config (which Sentinel rewrote when it last
        // changed the node's role), as scripts/cluster.sh started it.
        let dir = self.options.cluster_dir.join(format!("redis-{old_port}"));
        let restarted = Instant::now();
        let pid = spawn_recorded(
            &self.cluster,
            &name,
            Command::new("redis-server")
                .arg(dir.join("redis.conf"))
                .args(["--port", &old_port.to_string(), "--bind", LOOPBACK])
                .arg("--dir")
                .arg(&dir),
            &dir.join("redis.log"),
        )?;
        let old = self.data_node(old_port);
        wait_until(
            &format!("the restarted {name} is a linked replica of {new_port}"),
            || {
                old.info("replication").is_ok_and(|info| {
                    info_field(&info, "role") == Some("slave")
                        && info_field(&info, "master_port") == Some(&new_port.to_string())
                        && info_field(&info, "master_link_status") == Some("up")
                })
            },
        )?;
        let rejoined_s = restarted.elapsed().as_secs_f64();
        say!("{name} restarted in place (pid {pid}); a linked replica after {rejoined_s:.1} s");
        Ok(Failover {
            old_port,
            new_port,
            promoted_s,
            fallback_s,
            rejoined_s,
        })
    }
}

fn running_record(pids_file: &Path, name: &str) -> Option<Record> {
    let text = fs::read_to_string(pids_file).unwrap_or_default();
    text.lines()
        .filter_map(Record::parse)
        .rfind(|record| record.name == name && record.running())
}

fn takes_writes(node: &Node) -> bool {
    node.info("replication").is_ok_and(|info| {
        info_field(&info, "role") == Some("master")
            && info_field(&info, "min_slaves_good_slaves")
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|n| n >= 1)
    })
}

/// A request straight to the instance (from 127.0.0.1, a client of its own, not one of
/// the load's): was it decided by Redis? Denied or not, the answer says who decided.
fn decides_with_redis(port: u16) -> bool {
    http::get(port, "/limited_endpoint", Duration::from_secs(2))
        .is_ok_and(|response| response.header("x-ratelimit-source") == Some("redis"))
}

fn policy_version(port: u16) -> Result<String> {
    let response = http::get(port, "/v1/policies", Duration::from_secs(2))?;
    let value: serde_json::Value = serde_json::from_str(&response.body)
        .with_context(|| format!("GET /v1/policies on {port}: not JSON"))?;
    value
        .get("version")
        .map(|version| version.to_string())
        .with_context(|| format!("GET /v1/policies on {port}: no version"))
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    while !done() {
        if Instant::now() >= deadline {
            bail!("not the case after {} s: {what}", WAIT.as_secs());
        }
        sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn open_fds(pid: u32) -> Option<u64> {
    Some(fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// VmRSS and open descriptors of PID; `None` for a process that is gone.
fn look_at(pid: u32) -> Option<(u64, u64)> {
    let (rss_kib, _) = memory_kib(pid);
    let fds = open_fds(pid)?;
    (rss_kib > 0).then_some((rss_kib, fds))
}

/// A data node's role, and whether its replication backlog is full.
fn replication(node: &Node) -> (Option<String>, bool) {
    let Ok(info) = node.info("replication") else {
        return (None, false);
    };
    let field = |name| info_field(&info, name).and_then(|v| v.parse::<u64>().ok());
    let full = matches!((field("repl_backlog_histlen"), field("repl_backlog_size")), (Some(len), Some(size)) if len >= size);
    (info_field(&info, "role").map(str::to_owned), full)
}

/// Every running process of the pids file, and Nginx's workers (one sample for all of
/// them: each client's connection lands on one worker or another by chance).
fn sample_once(pids_file: &Path, password: &str, at_s: f64) -> Vec<Sample> {
    let text = fs::read_to_string(pids_file).unwrap_or_default();
    let mut taken = Vec::new();
    for record in text.lines().filter_map(Record::parse) {
        if !record.running() {
            continue;
        }
        let Some((rss_kib, fds)) = look_at(record.pid) else {
            continue;
        };
        let replication = record
            .name
            .strip_prefix("redis-")
            .and_then(|port| port.parse::<u16>().ok())
            .map(|port| replication(&Node::new(port, Some(password))));
        if record.name == "nginx" {
            let workers: Vec<(u64, u64)> = children_of(record.pid)
                .into_iter()
                .filter_map(look_at)
                .collect();
            taken.push(Sample {
                at_s,
                name: format!("nginx workers ({})", workers.len()),
                pid: record.pid,
                rss_kib: workers.iter().map(|w| w.0).sum(),
                fds: workers.iter().map(|w| w.1).sum(),
                backlog_full: None,
                role: None,
            });
        }
        taken.push(Sample {
            at_s,
            name: record.name,
            pid: record.pid,
            rss_kib,
            fds,
            backlog_full: replication.as_ref().map(|r| r.1),
            role: replication.and_then(|r| r.0),
        });
    }
    taken
}

fn sample_until(
    pids_file: &Path,
    password: &str,
    every: Duration,
    started: Instant,
    samples: &Mutex<Vec<Sample>>,
    stop: &AtomicBool,
) {
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let taken = sample_once(pids_file, password, started.elapsed().as_secs_f64());
        if let Ok(mut samples) = samples.lock() {
            samples.extend(taken);
        }
        next += every;
        while Instant::now() < next && !stop.load(Ordering::Relaxed) {
            sleep(Duration::from_millis(100));
        }
    }
}

fn write_samples(path: &Path, samples: &[Sample]) -> Result<()> {
    let mut text = String::from("at_s,name,pid,rss_kib,fds,backlog_full,role\n");
    for s in samples {
        let backlog = s
            .backlog_full
            .map_or(String::new(), |full| full.to_string());
        let _ = writeln!(
            text,
            "{:.1},{},{},{},{},{backlog},{}",
            s.at_s,
            s.name,
            s.pid,
            s.rss_kib,
            s.fds,
            s.role.as_deref().unwrap_or("")
        );
    }
    fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

struct Report {
    minutes: Vec<Minute>,
    samples: Vec<Sample>,
    warmup_s: f64,
    rate: u32,
    started: String,
    machine: Machine,
    load: String,
}

impl Report {
    fn server_errors(&self) -> u64 {
        self.minutes
            .iter()
            .map(|m| m.summary.classes.server_errors)
            .sum()
    }

    fn failed_requests(&self) -> u64 {
        self.minutes
            .iter()
            .map(|m| m.summary.classes.errors + m.summary.classes.other)
            .sum()
    }

    fn clients_over(&self) -> usize {
        self.minutes.iter().map(|m| m.verdict().over).sum()
    }

    /// Fallback decisions in minutes without a kill: a Redis call that failed on its own
    /// (a timeout on a busy machine). Reported, not judged: the per-client bound, which
    /// allows nothing for them, is the check.
    fn stray_fallbacks(&self) -> u64 {
        self.minutes
            .iter()
            .filter(|m| m.failovers.is_empty())
            .map(Minute::fallback_decisions)
            .sum()
    }

    /// Is a sample taken at `at_s` one of steady load: at least 5 s into a minute's
    /// load generator run, and at least 1 s before it ended?
    fn under_load(&self, at_s: f64) -> bool {
        self.minutes
            .iter()
            .any(|m| at_s >= m.load_s.0 + 5.0 && at_s <= m.load_s.1 - 1.0)
    }

    fn flatness(&self) -> Vec<(String, u32, Option<Flatness>)> {
        flatness(&self.samples, self.warmup_s, |at_s| self.under_load(at_s))
    }

    fn not_flat(&self) -> usize {
        self.flatness()
            .iter()
            .filter(|(_, _, f)| f.as_ref().is_some_and(|f| !f.flat()))
            .count()
    }

    fn failed_checks(&self) -> usize {
        [
            self.server_errors() > 0,
            self.failed_requests() > 0,
            self.clients_over() > 0,
            self.not_flat() > 0,
        ]
        .iter()
        .filter(|failed| **failed)
        .count()
    }

    fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Soak of {} minute(s), started {}: {}/s offered from 241 clients; {} cores, {}, kernel {}; load average at the end {}",
            self.minutes.len(),
            self.started,
            self.rate,
            self.machine.cores,
            self.machine.model,
            self.machine.kernel,
            self.load
        );
        out.push('\n');
        out.push_str(
            "| minute | policy | answered | 200 | 429 | 5xx | failed | p99 / max ms | not Redis | worst client: admitted / bound | events |\n\
             |---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for m in &self.minutes {
            let v = m.verdict();
            let mut events = Vec::new();
            if let Some(took) = m.reload_s {
                events.push(format!("policy reload before it ({took:.1} s)"));
            }
            for f in &m.failovers {
                events.push(format!(
                    "kill -9 of master {} → {}: promoted {:.1} s, fallback ≤ {:.1} s (+{} per client), restarted node linked in {:.1} s",
                    f.old_port,
                    f.new_port,
                    f.promoted_s,
                    f.fallback_s,
                    failover_allowance(&m.policy, INSTANCES, f.fallback_s),
                    f.rejoined_s
                ));
            }
            let c = &m.summary.classes;
            let latency = m
                .summary
                .latency_ms
                .map_or_else(|| "—".into(), |l| format!("{:.1} / {:.0}", l.p99, l.max));
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {}{} | {} |",
                m.index + 1,
                m.policy.describe(),
                m.summary.requests.answered,
                c.admitted,
                c.rejected,
                c.server_errors,
                c.errors + c.other,
                latency,
                m.fallback_decisions(),
                v.worst_admitted,
                v.worst_bound,
                if v.over > 0 {
                    format!(" ({} over)", v.over)
                } else {
                    String::new()
                },
                if events.is_empty() {
                    "—".into()
                } else {
                    events.join("; ")
                }
            );
        }
        out.push('\n');
        let _ = writeln!(
            out,
            "Memory and descriptors under load, first samples after warm-up ({} s after the process's first sample; for a data node, not before its replication backlog is full) → last samples, the median of {MEDIAN_OF} each:",
            self.warmup_s
        );
        out.push('\n');
        out.push_str(
            "| process | pid | judged over | VmRSS KiB | growth | open fds | growth | flat |\n\
             |---|---|---|---|---|---|---|---|\n",
        );
        for (name, pid, judged) in self.flatness() {
            match judged {
                Some(f) => {
                    let _ = writeln!(
                        out,
                        "| {name} | {pid} | {:.0}–{:.0} s | {} → {} | {:+.1} % | {} → {} | {:+.1} % | {} |",
                        f.from_s,
                        f.to_s,
                        f.rss_kib.0,
                        f.rss_kib.1,
                        f.rss_growth(),
                        f.fds.0,
                        f.fds.1,
                        f.fds_growth(),
                        if f.flat() { "yes" } else { "NO" }
                    );
                }
                None => {
                    let _ = writeln!(
                        out,
                        "| {name} | {pid} | — | — | — | — | — | not judged: no two samples {MIN_JUDGED_S} s apart after its warm-up |"
                    );
                }
            }
        }
        out.push('\n');
        let check = |failed: bool| if failed { "FAILED" } else { "ok" };
        let answered: u64 = self
            .minutes
            .iter()
            .map(|m| m.summary.requests.answered)
            .sum();
        let failovers: usize = self.minutes.iter().map(|m| m.failovers.len()).sum();
        let _ = writeln!(
            out,
            "| check | result |\n|---|---|\n\
             | no 5xx ({answered} answers) | {} ({}) |\n\
             | no failed request (timeouts, connection errors, other statuses) | {} ({}) |\n\
             | every client of every minute within C + r·t + the failover allowance ({failovers} failover(s)) | {} ({} over) |\n\
             | decisions by the fallback in minutes without a kill (reported: a store call that timed out on a busy machine; the bound above still holds them) | {} |\n\
             | VmRSS and open fds of every judged process grew < {FLAT_PERCENT} % | {} ({} not flat) |",
            check(self.server_errors() > 0),
            self.server_errors(),
            check(self.failed_requests() > 0),
            self.failed_requests(),
            check(self.clients_over() > 0),
            self.clients_over(),
            self.stray_fallbacks(),
            check(self.not_flat() > 0),
            self.not_flat(),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Policy = POLICIES[0];

    #[test]
    fn a_client_may_have_its_burst_and_the_refill_of_its_span() {
        // 6 + 0.2 × 59.9 = 17.98
        assert_eq!(client_bound(&A, 59.9, 0), 17);
        assert_eq!(client_bound(&A, 60.0, 0), 18);
        assert_eq!(client_bound(&A, 60.0, 6), 24);
    }

    #[test]
    fn a_failover_allows_each_instance_a_share_and_its_refill() {
        // Shares of floor(6 / 2) = 3; 0.2 × 5 / 2 = 0.5 refills nothing more.
        assert_eq!(failover_allowance(&A, 2, 5.0), 6);
        // 0.2 × 12 / 2 = 1.2: one more token per instance.
        assert_eq!(failover_allowance(&A, 2, 12.0), 8);
        // A burst smaller than the instances still gives each one token.
        let tiny = Policy {
            label: "t",
            per_minute: 1,
            burst: 1,
        };
        assert_eq!(failover_allowance(&tiny, 2, 1.0), 2);
    }

    #[test]
    fn the_policy_file_says_what_the_bounds_assume() {
        let text = POLICIES[1].toml();
        assert!(
            text.contains("rate = 30, per = \"1m\", burst = 10"),
            "{text}"
        );
        assert!(text.contains("key = [\"client_ip\"]"), "{text}");
    }

    fn sample(at_s: f64, name: &str, pid: u32, rss_kib: u64, fds: u64) -> Sample {
        Sample {
            at_s,
            name: name.into(),
            pid,
            rss_kib,
            fds,
            backlog_full: None,
            role: None,
        }
    }

    fn always(_: f64) -> bool {
        true
    }

    #[test]
    fn flatness_compares_the_first_sample_after_warm_up_with_the_last() {
        let samples = vec![
            sample(0.0, "app-1", 10, 5000, 20),
            sample(30.0, "app-1", 10, 9000, 30),
            sample(60.0, "app-1", 10, 10_000, 40),
            sample(90.0, "app-1", 10, 10_400, 41),
            sample(120.0, "app-1", 10, 10_499, 41),
        ];
        let judged = flatness(&samples, 60.0, always);
        let f = judged[0].2.clone().unwrap();
        assert_eq!((f.from_s, f.to_s), (60.0, 120.0));
        // Three samples after warm-up: one stands for the first, one for the last.
        assert_eq!(f.rss_kib, (10_000, 10_499));
        assert!(f.flat(), "{f:?}");
        let grown = flatness(
            &[
                sample(0.0, "app-1", 10, 10_000, 40),
                sample(60.0, "app-1", 10, 10_000, 40),
                sample(90.0, "app-1", 10, 10_000, 42),
            ],
            60.0,
            always,
        );
        assert!(!grown[0].2.clone().unwrap().flat());
    }

    #[test]
    fn warm_up_is_a_minute_or_a_quarter_of_the_run() {
        assert_eq!(warmup_secs(60, 2), 60);
        assert_eq!(warmup_secs(60, 30), 450);
    }

    #[test]
    fn a_data_node_is_judged_in_the_role_it_ended_in() {
        let node = |at_s, fds, role: &str| Sample {
            role: Some(role.into()),
            ..sample(at_s, "redis-7381", 9, 18_000, fds)
        };
        let samples = vec![
            node(60.0, 17, "slave"),
            node(90.0, 17, "slave"),
            node(120.0, 20, "master"),
            node(150.0, 20, "master"),
        ];
        let f = flatness(&samples, 0.0, always)[0].2.clone().unwrap();
        assert_eq!((f.from_s, f.fds), (120.0, (20, 20)));
    }

    #[test]
    fn one_passing_connection_at_the_end_is_not_growth_but_a_steady_climb_is() {
        let fds = |values: &[u64]| -> Vec<Sample> {
            values
                .iter()
                .enumerate()
                .map(|(i, &fds)| sample(60.0 + 5.0 * i as f64, "app-1", 3, 7000, fds))
                .collect()
        };
        let spike = fds(&[24, 24, 25, 24, 24, 24, 24, 24, 24, 26, 24, 29]);
        assert!(flatness(&spike, 0.0, always)[0].2.clone().unwrap().flat());
        let climb = fds(&[24, 24, 24, 24, 24, 24, 26, 26, 26, 26, 26, 26]);
        let f = flatness(&climb, 0.0, always)[0].2.clone().unwrap();
        assert_eq!(f.fds, (24, 26));
        assert!(!f.flat());
    }

    #[test]
    fn samples_between_the_load_runs_and_before_a_backlog_is_full_are_not_compared() {
        let node = |at_s, rss_kib, full| Sample {
            backlog_full: Some(full),
            ..sample(at_s, "redis-7380", 7, rss_kib, 17)
        };
        let samples = vec![
            node(0.0, 12_000, false),
            node(60.0, 14_000, false),
            node(90.0, 16_000, true),
            node(120.0, 10_000, true),
            node(150.0, 16_100, true),
        ];
        let f = flatness(&samples, 60.0, |at_s| at_s != 120.0)[0]
            .2
            .clone()
            .unwrap();
        assert_eq!((f.from_s, f.to_s), (90.0, 150.0));
        assert!(f.flat(), "{f:?}");
        assert!(flatness(&samples, 60.0, |at_s| at_s < 100.0)[0].2.is_none());
    }

    #[test]
    fn a_process_started_late_has_its_own_warm_up_and_may_be_too_young_to_judge() {
        let samples = vec![
            sample(0.0, "redis-7379", 10, 8000, 12),
            sample(40.0, "redis-7379", 20, 8000, 12),
            sample(90.0, "redis-7379", 20, 8000, 12),
            sample(90.0, "redis-7379", 10, 8000, 12),
            sample(120.0, "redis-7379", 10, 8000, 12),
        ];
        let judged = flatness(&samples, 60.0, always);
        assert_eq!(judged.len(), 2);
        assert_eq!(judged[0].1, 10);
        assert!(judged[0].2.is_some());
        assert_eq!(judged[1].1, 20);
        assert!(judged[1].2.is_none(), "{:?}", judged[1]);
    }

    #[test]
    fn growth_of_nothing_is_none_and_from_nothing_is_infinite() {
        assert_eq!(growth_percent((0, 0)), 0.0);
        assert!(growth_percent((0, 1)).is_infinite());
        assert_eq!(growth_percent((200, 210)), 5.0);
    }
}
