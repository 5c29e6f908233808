//! The soak (`scripts/soak.sh`, which builds the release binaries, runs this with
//! `cargo test --test soak -- --ignored --nocapture` and cleans up after it): steady load
//! on the native topology for a number of minutes while it is hurt on a schedule, then a
//! verdict ([`judge`]). The test starts the cluster through the bench's library
//! (`scripts/cluster.sh up`, FAIL_MODE=local, ports shifted by SOAK_PORT_OFFSET), drives
//! the minutes, does the harm, samples every process, judges, and stops the cluster.
//!
//! Each minute is one run of the load generator (its `--json` is read afterwards): 241
//! clients through Nginx at a steady offered rate. On top of it:
//! - every third minute, 15 s into the minute, `kill -9` of the current master;
//!   once the sentinels have promoted a replica that takes writes and both instances
//!   decide with Redis again, the killed node is started again in place (same port,
//!   folder and config) and must rejoin as a replica;
//! - before the middle minute, the policy file is rewritten with other numbers, and the
//!   minute starts once both instances serve the new version (`GET /v1/policies`);
//! - every 5 s, the resident memory (VmRSS) and open descriptors of every
//!   process of the topology (those in the cluster's pids file, and Nginx's workers).
//!
//! Its settings come from the environment: SOAK_MINUTES (2 to 240, required), SOAK_DIR,
//! SOAK_PORT_OFFSET, REDIS_ADMIN_PASSWORD and SENTINEL_PASSWORD ([`Options::from_env`]);
//! RATELIMITER_BIN and LOADTEST_BIN, the binaries it runs (default: the release builds).

mod judge;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, sleep};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};

use bench::cluster::Cluster;
use bench::machine::{self, Machine};
use bench::node::{Node, info_field};
use bench::phases::LIMITED;
use bench::process::{Records, Started, children_of, memory_kib, open_fds, signal, wait_until};
use bench::{LOOPBACK, probe, say};
use judge::{Failover, Minute, POLICIES, Policy, Report, Sample, warmup_secs};

/// The master's name in the sentinels (scripts/cluster.sh).
const MASTER_NAME: &str = "redis-master";
/// Into each minute, when its master kill comes.
const KILL_AT: Duration = Duration::from_secs(15);
/// Bound on every wait for the topology (a failover, a rejoin, a reload).
const WAIT: Duration = Duration::from_secs(60);
/// Requests per second offered over all clients.
const RATE: u32 = 200;
/// Between two samples of every process.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Minutes between two master kills (the first comes in the first minute).
const KILL_EVERY: u64 = 3;
/// Seconds of warm-up, at least (a quarter of the run when that is longer): samples of a
/// process count from this long after its first one.
const WARMUP_SECS: u64 = 60;

/// The soak's settings, from the environment (scripts/soak.sh sets them).
#[derive(Debug, Clone)]
struct Options {
    /// SOAK_MINUTES: how long the load runs, in minutes (one load-generator run each).
    minutes: u64,
    /// SOAK_DIR (default run/soak): the soak's folder; its cluster's CLUSTER_DIR is
    /// cluster/ in it, the summaries, samples and report go to out/.
    dir: PathBuf,
    /// SOAK_PORT_OFFSET (default 1000): CLUSTER_PORT_OFFSET of its cluster (Nginx on
    /// 8000 + offset).
    port_offset: u16,
    /// REDIS_ADMIN_PASSWORD: the data nodes' operators' (default) user, which reads their
    /// INFO and roles.
    password: String,
    /// SENTINEL_PASSWORD: the sentinels' password.
    sentinel_password: String,
}

impl Options {
    fn from_env() -> Result<Self> {
        let var = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
        let or = |name: &str, default: &str| var(name).unwrap_or_else(|| default.to_owned());
        let minutes = std::env::var("SOAK_MINUTES").ok();
        let parsed = minutes.as_deref().and_then(|m| m.parse().ok());
        let minutes = parsed.filter(|m| (2..=240).contains(m)).with_context(|| {
            let value = minutes.map_or_else(|| "unset".to_owned(), |m| format!("{m:?}"));
            format!("SOAK_MINUTES must be the soak's length in minutes, from 2 to 240 (scripts/soak.sh --minutes N sets it), not {value}")
        })?;
        let port_offset = or("SOAK_PORT_OFFSET", "1000");
        let port_offset = port_offset.parse().with_context(|| {
            format!("SOAK_PORT_OFFSET must be a port offset, from 0 to 65535, not {port_offset:?}")
        })?;
        Ok(Self {
            minutes,
            dir: or("SOAK_DIR", "run/soak").into(),
            port_offset,
            password: or("REDIS_ADMIN_PASSWORD", "ratelimiter-dev-admin-password"),
            sentinel_password: or("SENTINEL_PASSWORD", "ratelimiter-dev-sentinel-password"),
        })
    }
}

#[test]
#[ignore = "needs the release binaries, redis-server, redis-sentinel and nginx, and 2 minutes or more: scripts/soak.sh runs it"]
fn soak() {
    bench::set_name("soak");
    // How many checks failed and where the report is (printed above), or why the soak
    // could not run.
    if let Err(error) = Options::from_env().and_then(run) {
        panic!("{error:#}");
    }
}

struct Soak {
    o: Options,
    cluster: Cluster,
    policy_file: PathBuf,
    /// The load generator runs this test starts (out/pids).
    own: Records,
    out: PathBuf,
    loadtest: PathBuf,
    started: Instant,
}

fn run(o: Options) -> Result<()> {
    let root = std::env::current_dir()?;
    let out = o.dir.join("out");
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out).with_context(|| format!("cannot make {}", out.display()))?;
    let mut cluster = Cluster::new(&root, o.dir.join("cluster"), o.port_offset, &o.password)?;
    cluster.bin = std::env::var_os("RATELIMITER_BIN").map(PathBuf::from);
    let policy_file = o.dir.join("policies.toml");
    write_policy(&policy_file, &POLICIES[0])?;
    // The bounds assume the local fallback.
    let env = format!("POLICY_FILE={} FAIL_MODE=local", policy_file.display());
    let loadtest = std::env::var_os("LOADTEST_BIN").map(PathBuf::from);
    let loadtest = loadtest.unwrap_or_else(|| bench::release_binary(&root, "loadtest"));
    let own = Records(out.join("pids"));
    let started = Instant::now();
    let mut soak = Soak {
        own,
        loadtest,
        started,
        policy_file,
        cluster,
        out,
        o,
    };
    let (dir, offset) = (soak.cluster.dir.display(), soak.o.port_offset);
    let policy = POLICIES[0].describe();
    say!("starting the cluster in {dir} (CLUSTER_PORT_OFFSET={offset}), policy {policy}");
    let started = soak.cluster.start(&env, &[], &soak.out.join("up.log"));
    let outcome = started.and_then(|last| {
        say!("{last}");
        soak.started = Instant::now();
        soak.run()
    });
    soak.cluster.stop(&soak.out.join("down.log"));
    outcome
}

/// The load generator's `--json` summary in `path`.
fn read_summary(path: &Path) -> Result<loadtest::summary::Summary> {
    let text = fs::read_to_string(path);
    let text = text.with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("in {}", path.display()))
}

fn write_policy(path: &Path, policy: &Policy) -> Result<()> {
    // A new file renamed over the old: the watcher never reads half a file.
    let fresh = path.with_extension("toml.new");
    fs::write(&fresh, policy.toml())?;
    fs::rename(&fresh, path).with_context(|| format!("cannot replace {}", path.display()))
}

impl Soak {
    fn run(&self) -> Result<()> {
        let started_at = SystemTime::now();
        let (samples, stop) = (Mutex::new(Vec::new()), AtomicBool::new(false));
        let (minutes, outcome) = thread::scope(|scope| {
            scope.spawn(|| self.sample_until(&samples, &stop));
            let outcome = self.minutes();
            stop.store(true, Ordering::Relaxed);
            outcome
        });
        let samples = samples.into_inner().unwrap_or_default();
        let samples_file = self.out.join("samples.jsonl");
        let saved = samples
            .iter()
            .map(|sample| bench::append_json(&samples_file, sample));
        saved.collect::<Result<()>>()?;
        let warmup_s = warmup_secs(WARMUP_SECS, self.o.minutes) as f64;
        let (started, load) = (machine::utc_minute(started_at), machine::load_average());
        let Machine {
            cores,
            model,
            kernel,
            ..
        } = Machine::read();
        let heading = format!(
            "Soak of {} minute(s), started {started}: {RATE}/s offered from 241 clients; {cores} cores, {model}, kernel {kernel}; load average at the end {load}",
            minutes.len()
        );
        let report = Report {
            minutes,
            samples,
            warmup_s,
            heading,
        };
        let (text, failed) = report.judge();
        println!("{text}");
        fs::write(self.out.join("report.md"), &text)?;
        outcome?;
        if failed > 0 {
            let report = self.out.join("report.md");
            bail!("{failed} check(s) failed (report: {})", report.display());
        }
        say!("every check passed");
        Ok(())
    }

    /// Every minute, or those before the one that failed and why it did.
    fn minutes(&self) -> (Vec<Minute>, Result<()>) {
        let reload_minute = self.o.minutes / 2;
        let (nginx, count, reload) = (self.cluster.ports.nginx, self.o.minutes, reload_minute + 1);
        say!(
            "{count} minutes at {RATE}/s from 241 clients through Nginx on {nginx}; master kill every {KILL_EVERY} min; reload before minute {reload}"
        );
        let mut minutes = Vec::new();
        for index in 0..self.o.minutes {
            match self.minute(index, reload_minute) {
                Ok(minute) => minutes.push(minute),
                Err(error) => {
                    return (minutes, Err(error.context(format!("minute {}", index + 1))));
                }
            }
        }
        (minutes, Ok(()))
    }

    fn at_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Samples every process each [`SAMPLE_EVERY`] until `stop`.
    fn sample_until(&self, samples: &Mutex<Vec<Sample>>, stop: &AtomicBool) {
        let records = self.cluster.records();
        while !stop.load(Ordering::Relaxed) {
            let next = Instant::now() + SAMPLE_EVERY;
            let taken = sample_once(&records, &self.o.password, self.at_s());
            samples.lock().map(|mut s| s.extend(taken)).ok();
            while Instant::now() < next && !stop.load(Ordering::Relaxed) {
                sleep(Duration::from_millis(100));
            }
        }
    }

    fn minute(&self, index: u64, reload_minute: u64) -> Result<Minute> {
        let reload_s = (index == reload_minute).then(|| self.reload(&POLICIES[1]));
        let reload_s = reload_s.transpose()?;
        let policy = POLICIES[usize::from(index >= reload_minute)];
        let json = self.out.join(format!("minute-{:03}.json", index + 1));
        let log = self.out.join("loadtest.log");
        let (begun, load_from) = (Instant::now(), self.at_s());
        let (nginx, limit, burst) = (self.cluster.ports.nginx, policy.per_minute, policy.burst);
        let url = format!("http://{LOOPBACK}:{nginx}{LIMITED}");
        let args = format!(
            "--url {url} --rate {RATE} --duration 60s --timeout 5s --window 60 --limit {limit} --burst {burst} --json"
        );
        let mut command = Command::new(&self.loadtest);
        command.args(args.split(' ')).arg(&json);
        let mut load = Started::spawn(&self.own, "loadtest", &mut command, &log)?;
        let mut failovers = Vec::new();
        if index.is_multiple_of(KILL_EVERY) {
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
        let summary = read_summary(&json)?;
        let bucket = summary.policy.clone();
        let bucket = bucket.with_context(|| format!("{}: no policy", json.display()))?;
        let minute = Minute {
            index,
            load_s,
            policy,
            bucket,
            summary,
            failovers,
            reload_s,
        };
        let (v, c) = (minute.verdict(), &minute.summary.classes);
        let answered = minute.summary.requests.answered;
        let (admitted, errors, server_errors) = (c.admitted, c.errors, c.server_errors);
        let (number, worst, bound, over) = (index + 1, v.worst.1, v.worst.2, v.over);
        say!(
            "minute {number}: {answered} answered, {admitted} admitted, {server_errors} 5xx, {errors} errors; worst client {worst} of {bound} allowed; {over} client(s) over"
        );
        Ok(minute)
    }

    /// Rewrites the policy file and waits until both instances serve the new version.
    fn reload(&self, policy: &Policy) -> Result<f64> {
        let version = |port| Some(probe::json(port, "/v1/policies").ok()?["version"].to_string());
        let apps = &self.cluster.ports.apps;
        let before: Vec<Option<String>> = apps.iter().map(|&p| version(p)).collect();
        let begun = Instant::now();
        write_policy(&self.policy_file, policy)?;
        for (&port, old) in apps.iter().zip(&before) {
            let what = format!("the instance on {port} serves the rewritten policy file");
            wait_until(&what, WAIT, || {
                version(port).is_some_and(|v| Some(&v) != old.as_ref())
            })?;
        }
        let took = begun.elapsed().as_secs_f64();
        let policy = policy.describe();
        say!("policy reloaded ({policy}) on both instances in {took:.1} s");
        Ok(took)
    }

    fn data_node(&self, port: u16) -> Node {
        Node::new(port, Some(&self.o.password))
    }

    /// What every sentinel names as the master (`None` for one that does not answer).
    fn named_masters(&self) -> Vec<Option<u16>> {
        let sentinel = |port| Node::new(port, Some(&self.o.sentinel_password));
        let named = |&port: &u16| sentinel(port).sentinel_master_port(MASTER_NAME);
        self.cluster.ports.sentinels.iter().map(named).collect()
    }

    fn kill_master(&self) -> Result<Failover> {
        let named = self.named_masters().into_iter().flatten().next();
        let old_port = named.context("no sentinel names a master")?;
        let name = format!("redis-{old_port}");
        let records = self.cluster.records();
        let pid = records.pids(|n| n == name).last().copied();
        let pid = pid.with_context(|| format!("the master {name} is not running"))?;
        let killed = Instant::now();
        if !signal(pid, "KILL") {
            bail!("kill -KILL {pid} ({name}) failed");
        }
        say!(
            "at {:.0} s: kill -9 of the master {name} (pid {pid})",
            self.at_s()
        );
        let mut new_port = 0;
        let promoted = || {
            let named = self.named_masters();
            new_port = named.first().copied().flatten().unwrap_or(old_port);
            let all = named.iter().all(|p| *p == Some(new_port));
            new_port != old_port && all && self.takes_writes(new_port)
        };
        wait_until(
            "every sentinel names a new master that takes writes",
            WAIT,
            promoted,
        )?;
        let promoted_s = killed.elapsed().as_secs_f64();
        for &port in &self.cluster.ports.apps {
            // A request straight to the instance (from 127.0.0.1, not one of the load's
            // clients): denied or not, the answer says who decided.
            let source = || {
                Some(
                    probe::get(port, LIMITED)
                        .ok()?
                        .headers
                        .get("x-ratelimit-source")?
                        .clone(),
                )
            };
            let what = format!("the instance on {port} decides with Redis again");
            wait_until(&what, WAIT, || source().as_deref() == Some("redis"))?;
        }
        let fallback_s = killed.elapsed().as_secs_f64();
        say!(
            "new master {new_port} after {promoted_s:.1} s; both instances decide with Redis after {fallback_s:.1} s"
        );

        // In place: its port, folder and config (which Sentinel rewrote when it last
        // changed the node's role), as scripts/cluster.sh started it. Not owned here:
        // `scripts/cluster.sh down` stops it with the rest.
        let (dir, restarted) = (self.cluster.dir.join(&name), Instant::now());
        let mut command = Command::new("redis-server");
        let args = format!("--port {old_port} --bind {LOOPBACK} --dir");
        command
            .arg(dir.join("redis.conf"))
            .args(args.split(' '))
            .arg(&dir);
        let pid = records
            .spawn(&name, &mut command, &dir.join("redis.log"))?
            .id();
        let old = self.data_node(old_port);
        let field = |n| old.info_field("replication", n).unwrap_or_default();
        let up =
            || field("master_link_status") == "up" && field("master_port") == new_port.to_string();
        let what = format!("the restarted {name} is a linked replica of {new_port}");
        wait_until(&what, WAIT, || field("role") == "slave" && up())?;
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

    /// A master with at least one good replica: it takes writes (min-replicas-to-write).
    fn takes_writes(&self, port: u16) -> bool {
        let node = self.data_node(port);
        let good = node.info_field("replication", "min_slaves_good_slaves");
        let good = good.and_then(|n| n.parse::<u64>().ok());
        node.is_master() && good.is_some_and(|n| n >= 1)
    }
}

/// VmRSS and open descriptors of PID; `None` for a process that is gone.
fn usage(pid: u32) -> Option<(u64, u64)> {
    let (rss_kib, _) = memory_kib(pid);
    Some((rss_kib, open_fds(pid)?)).filter(|_| rss_kib > 0)
}

/// Every running process of the pids file, and Nginx's workers (one sample for all of
/// them: each client's connection lands on one worker or another by chance).
fn sample_once(records: &Records, password: &str, at_s: f64) -> Vec<Sample> {
    let mut taken = Vec::new();
    for (name, pid) in records.running() {
        let Some(own) = usage(pid) else {
            continue;
        };
        if name == "nginx" {
            let workers: Vec<(u64, u64)> = children_of(pid).into_iter().filter_map(usage).collect();
            let usage = workers.iter().fold((0, 0), |(r, f), w| (r + w.0, f + w.1));
            let process = (format!("nginx workers ({})", workers.len()), pid);
            taken.push(Sample {
                at_s,
                process,
                usage,
                node: None,
            });
        }
        // A data node's role, and whether its replication backlog is full.
        let port = name
            .strip_prefix("redis-")
            .and_then(|p| p.parse::<u16>().ok());
        let info = port.and_then(|port| Node::new(port, Some(password)).info("replication").ok());
        let node = info.and_then(|info| {
            let field = |name| info_field(&info, name).and_then(|v| v.parse::<u64>().ok());
            let full = field("repl_backlog_histlen")
                .zip(field("repl_backlog_size"))
                .is_some_and(|(length, size)| length >= size);
            Some((info_field(&info, "role")?.to_owned(), full))
        });
        taken.push(Sample {
            at_s,
            process: (name, pid),
            usage: own,
            node,
        });
    }
    taken
}
