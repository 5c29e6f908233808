//! `scripts/bench.sh`: the chosen phases of [`PHASES`], each measured by one loop
//! ([`Bench::phase`]): start its topology, warm up, measure every target round by round.
//! Every measurement is a JSON line; the report is rendered from those lines alone
//! (`report::render`).

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::cluster::{Cluster, Processes};
use crate::machine::{self, Machine};
use crate::measure::{self, Snapshot, Traffic};
use crate::node::script_calls;
use crate::phases::{self, PHASES, Phase, Target, Tool, Topology, Via};
use crate::probe::{self, Counts, WrkReport, port_open};
use crate::process::{MachineTicks, Records, Started, children_of, run_counted, tail};
use crate::report::{self, RunInfo};
use crate::{LOOPBACK, append_json, gateway, say, warn};

#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Length of one measurement, in seconds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=60))]
    duration: u32,
    /// Rounds per phase; each round measures every target of the phase once, in reverse
    /// order every other round.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: u32,
    /// wrk threads (two cores are shared by everything).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    threads: u32,
    /// The machine is "quiet" when processes outside the benchmark use at most this % of it.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u32).range(1..=100))]
    quiet_max: u32,
    /// How long each measurement waits for a quiet machine, in seconds (0: never).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(0..=600))]
    quiet_wait: u32,
    /// Also write the run into docs/BENCHMARKS.md.
    #[arg(long)]
    record: bool,
    /// The phases to run, comma-separated, in any order (they run in the usual one), or
    /// `all`. `--record` needs all of them.
    #[arg(long, default_value = "all", value_parser = |t: &str| phases::parse(t).map(Chosen))]
    phases: Chosen,
    /// The command line the report quotes (the wrapper's own).
    #[arg(long, default_value = "scripts/bench.sh")]
    invocation: String,
    /// CLUSTER_PORT_OFFSET of every phase's cluster (Nginx on 8000 + offset).
    #[arg(long, env = "CLUSTER_PORT_OFFSET", default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=30000))]
    port_offset: u16,
}

#[derive(Debug, Clone)]
pub struct Chosen(Vec<&'static Phase>);

/// A measurement during which others used the machine is taken again at most this often.
const RETAKES: u32 = 2;
/// The distinct keys of scripts/bench/keys.lua.
const KEYS: u64 = 100_000;
/// Instance settings that pass through to every phase, named in the report when set.
const PASSED_SETTINGS: &str = "WORKERS REDIS_POOL_SIZE REDIS_TIMEOUT_MS ACCESS_LOG";

struct Bench {
    o: Options,
    root: PathBuf,
    out: PathBuf,
    /// The processes this program starts itself (run/bench/pids).
    own: Records,
    cluster: Cluster,
    /// What every phase runs: a copy of the release binary, or RATELIMITER_BIN.
    bin: PathBuf,
    /// The embedded-store instance and its port, where [`Via::Direct`] goes in its phase
    /// (else to the first instance).
    embedded: Option<(Started, u16)>,
    /// The gateway phase's own Nginxes in front of the demo upstream, each the way in it
    /// serves and its port: straight to it, and the in-Nginx Lua limiter.
    bench_nginxes: Vec<(Via, Started, u16)>,
    procs: Processes,
    commands: Vec<String>,
    /// Measurements taken again, and kept although others still used the machine.
    retaken: (u32, u32),
}

pub fn run(o: Options) -> Result<()> {
    let (started, started_at) = (Instant::now(), SystemTime::now());
    let root = std::env::current_dir()?;
    if o.record && o.phases.0.len() != PHASES.len() {
        bail!(
            "--record rewrites the whole block of docs/BENCHMARKS.md, so it needs every phase: drop --phases"
        );
    }
    let out = root.join("run/bench");
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out)?;
    let password = std::env::var("REDIS_ADMIN_PASSWORD");
    let password = password.unwrap_or_else(|_| "ratelimiter-dev-admin-password".into());
    let dir = root.join("run/bench-cluster");
    let mut cluster = Cluster::new(&root, dir, o.port_offset, &password)?;
    let mut busy = cluster.ports.all();
    busy.retain(|&port| port_open(port));
    if let Some(first) = busy.first() {
        bail!(
            "port(s) {busy:?} are in use (a cluster running? scripts/cluster.sh down); see: ss -ltnp 'sport = :{first}'"
        );
    }
    let (bin, service) = machine::service_binary(&root, &out)?;
    cluster.bin = Some(bin.clone());
    let own = Records(out.join("pids"));
    let (embedded, bench_nginxes, procs, commands, retaken) = Default::default();
    let mut b = Bench {
        o,
        root,
        out,
        own,
        cluster,
        bin,
        embedded,
        bench_nginxes,
        procs,
        commands,
        retaken,
    };
    let (load_before, cores) = (machine::load_average(), Machine::read().cores);
    say!(
        "load average now: {load_before} ({cores} cores); other engineers' work moves the figures, see the 'other processes' column"
    );
    let chosen = b.o.phases.0.clone();
    let names: Vec<&str> = chosen.iter().map(|p| p.name).collect();
    say!("phases: {}", names.join(","));
    let outcome = chosen.iter().try_for_each(|phase| b.phase(phase));
    b.down();
    outcome?;

    let value = |name: &str| std::env::var(name).unwrap_or_default();
    let set = PASSED_SETTINGS.split(' ').filter(|n| !value(n).is_empty());
    let info = RunInfo {
        started: machine::utc_minute(started_at),
        machine: Machine::read(),
        software: machine::software(),
        service,
        load: (load_before, machine::load_average()),
        rounds: b.o.rounds,
        duration_s: b.o.duration,
        threads: b.o.threads,
        elapsed_s: started.elapsed().as_secs(),
        quiet_max: b.o.quiet_max,
        retaken: b.retaken,
        instance_settings: set.map(|name| format!("{name}={}", value(name))).collect(),
        invocation: b.o.invocation.clone(),
        commands: b.commands.clone(),
    };
    fs::write(b.out.join("run.json"), serde_json::to_string_pretty(&info)?)?;
    let text = report::render(&b.out)?;
    let (elapsed, raw) = (info.elapsed_s, b.rel(&b.out));
    say!("done in {elapsed}s; raw outputs in {raw}");
    report::publish(&b.root, &b.out, &text, b.o.record.then_some("bench.sh"))
}

impl Bench {
    fn rel(&self, path: &Path) -> String {
        let path = path.strip_prefix(&self.root).unwrap_or(path);
        path.display().to_string()
    }

    /// Remembers a command for the report (once) and shows it.
    fn note(&mut self, text: &str) {
        let mut text = text.replace(&format!("{}/", self.root.display()), "");
        if let Some((_, port)) = &self.embedded {
            let port = format!("{LOOPBACK}:{port}");
            text = text.replace(&port, &format!("{LOOPBACK}:PORT"));
        }
        if !self.commands.contains(&text) {
            say!("+ {text}");
            self.commands.push(text);
        }
    }

    /// The one loop: any phase, from its topology up to its topology down.
    fn phase(&mut self, phase: &Phase) -> Result<()> {
        let outcome = self.up(phase).and_then(|()| {
            // A way in this run does not have (the Lua peer without PEER_LUA) is skipped.
            let mut targets = phase.targets();
            targets.retain(|t| t.via != Via::Peer || self.port(Via::Peer) != 0);
            self.warm_up(&targets);
            for round in 1..=self.o.rounds {
                say!("phase {}, round {round} of {}", phase.name, self.o.rounds);
                // In reverse every other round, so that drift hits pairs of figures alike.
                let mut ordered = targets.clone();
                if round % 2 == 0 {
                    ordered.reverse();
                }
                for target in &ordered {
                    self.measure(phase.name, round, target)?;
                }
            }
            Ok(())
        });
        self.down();
        outcome
    }

    fn up(&mut self, phase: &Phase) -> Result<()> {
        let name = phase.name;
        let mut env = phase.env.to_owned();
        if let Some(policy) = phase.policy {
            let file = self.out.join(format!("{name}.toml"));
            fs::write(&file, policy)?;
            let policy_file = format!("POLICY_FILE={}", file.display());
            env = format!("{env} {policy_file}").trim_start().into();
        }
        self.procs = Processes::default();
        match phase.topology {
            Topology::Cluster(flags) => {
                let flag: String = flags.iter().map(|f| format!(" {f}")).collect();
                let offset = match self.cluster.offset {
                    0 => String::new(),
                    offset => format!(" CLUSTER_PORT_OFFSET={offset}"),
                };
                let dir = self.rel(&self.cluster.dir);
                let up = format!("{env}{offset} CLUSTER_DIR={dir} scripts/cluster.sh up{flag}");
                self.note(&up);
                let log = self.out.join(format!("cluster-{name}.log"));
                let shown = self.rel(&log);
                say!("phase {name}: starting the cluster (log: {shown})");
                let last = self.cluster.start(&env, flags, &log)?;
                say!("phase {name}: {last}");
                self.procs = self.cluster.processes()?;
                if flags.contains(&"--gateway") {
                    self.bench_nginxes_up()?;
                }
            }
            Topology::Embedded => {
                let settings = format!("INSTANCE_NAME=bench-memory {env}");
                let bin = self.bin.display();
                self.note(&format!("env -i HOST={LOOPBACK} PORT=0 {settings} {bin} &"));
                let log = self.out.join("memory-instance.log");
                let started =
                    probe::start_instance(&self.own, "bench-memory", &self.bin, &settings, &log);
                let see = || format!("the embedded-store instance; see {}", self.rel(&log));
                let (instance, port) = started.with_context(see)?;
                self.procs.groups.insert("app", vec![instance.pid()]);
                self.embedded = Some((instance, port));
            }
        }
        let groups = self.procs.groups.iter().filter(|g| !g.1.is_empty());
        let groups: Vec<String> = groups.map(|(g, p)| format!("{g} {p:?}")).collect();
        let masters: Vec<u16> = self.procs.masters.iter().map(|m| m.port).collect();
        say!("processes: {}; masters {masters:?}", groups.join(", "));
        if !self.bench_nginxes.is_empty() {
            // One request through the gateway and one through each of the bench's Nginxes:
            // each a 200 that the demo upstream counted once.
            let vias = [Via::Gateway, Via::Proxy, Via::Peer];
            for via in vias.into_iter().filter(|&via| self.port(via) != 0) {
                let (port, path) = (self.port(via), phases::GATEWAY_PATH);
                let before = self.upstream_count(path)?;
                let status = probe::status(port, path);
                let counted = self.upstream_count(path)? - before;
                if status != Some(200) || counted != 1 {
                    bail!(
                        "GET {path} through {via:?} (port {port}) answered {status:?}, the upstream counted {counted} (want 200 and 1)"
                    );
                }
            }
        }
        Ok(())
    }

    /// The gateway phase's own Nginxes in front of the demo upstream: straight to it, and,
    /// when `PEER_LUA` holds it, the in-Nginx Lua limiter deciding on the master. Their CPU
    /// counts as one group, "the bench's Nginx": only one of them carries load at a time.
    fn bench_nginxes_up(&mut self) -> Result<()> {
        let upstream = self.cluster.ports.upstream;
        let here = (self.root.as_path(), self.out.as_path(), &self.own);
        let (proxy, port, command) = gateway::bench_nginx_up(here, "proxy-nginx", upstream, &[])?;
        self.note(&command);
        let mut pids = [vec![proxy.pid()], children_of(proxy.pid())].concat();
        self.bench_nginxes.push((Via::Proxy, proxy, port));
        match gateway::peer_lua() {
            Ok(lua) => {
                let master = self.procs.masters.first().context("no master")?.port;
                let more = [
                    ("@LUA@", lua.display().to_string()),
                    ("@REDIS_PORT@", master.to_string()),
                    ("@REDIS_PASSWORD@", self.cluster.password.clone()),
                ];
                let here = (self.root.as_path(), self.out.as_path(), &self.own);
                let (peer, port, command) =
                    gateway::bench_nginx_up(here, "peer-nginx", upstream, &more)?;
                self.note(&command.replace(&self.cluster.password, "$REDIS_ADMIN_PASSWORD"));
                pids.extend([vec![peer.pid()], children_of(peer.pid())].concat());
                self.bench_nginxes.push((Via::Peer, peer, port));
            }
            Err(why) => say!("phase gateway: the in-Nginx Lua peer is skipped: {why}"),
        }
        self.procs.groups.insert("proxy", pids);
        Ok(())
    }

    fn down(&mut self) {
        (self.bench_nginxes, self.embedded) = (Vec::new(), None);
        if self.cluster.up {
            let dir = self.rel(&self.cluster.dir);
            self.note(&format!("CLUSTER_DIR={dir} scripts/cluster.sh down"));
            self.cluster.stop(&self.out.join("cluster-down.log"));
        }
    }

    fn upstream_count(&self, path: &str) -> Result<u64> {
        gateway::upstream_count(self.cluster.ports.upstream_count, path)
    }

    fn port(&self, via: Via) -> u16 {
        let first = self.cluster.ports.apps[0];
        match via {
            Via::Nginx => self.cluster.ports.nginx,
            Via::Direct => self.embedded.as_ref().map_or(first, |e| e.1),
            Via::Gateway => self.cluster.ports.gateway,
            Via::Proxy | Via::Peer => {
                let serving = self.bench_nginxes.iter().find(|(way, ..)| *way == via);
                serving.map_or(0, |(.., port)| *port)
            }
        }
    }

    fn url(&self, via: Via, path: &str) -> String {
        format!("http://{LOOPBACK}:{}{path}", self.port(via))
    }

    /// wrk on a target with its script (scripts/bench/report.lua, or keys.lua over KEYS
    /// keys), run in the checkout; and its command line.
    fn wrk(&self, t: &Target, connections: u32, seconds: u32) -> (Command, String) {
        let (threads, url) = (self.o.threads, self.url(t.via, t.path));
        let script = match t.tool {
            Tool::Wrk => format!("report.lua {url}"),
            Tool::WrkKeys => format!("keys.lua {url} -- {KEYS}"),
        };
        let line = format!(
            "wrk -t{threads} -c{connections} -d{seconds}s --latency -s scripts/bench/{script}"
        );
        let mut wrk = Command::new("wrk");
        wrk.args(line.split(' ').skip(1)).current_dir(&self.root);
        (wrk, line)
    }

    /// Short unrecorded runs, so that pools, connections and caches are warm.
    fn warm_up(&self, targets: &[Target]) {
        say!("warming up (2 s per target, not recorded)");
        let mut seen = HashSet::new();
        for t in targets.iter().filter(|t| seen.insert((t.via, t.path))) {
            let (mut wrk, _) = self.wrk(t, 16, 2);
            let _ = wrk.stdout(Stdio::null()).stderr(Stdio::null()).status();
        }
    }

    /// Waits, at most --quiet-wait seconds, until the machine is at most --quiet-max % busy.
    fn wait_quiet(&self) {
        let (wait, quiet_max) = (self.o.quiet_wait, f64::from(self.o.quiet_max));
        let deadline = Instant::now() + Duration::from_secs(wait.into());
        if wait == 0 {
            return;
        }
        loop {
            let before = MachineTicks::read();
            sleep(Duration::from_millis(500));
            let busy = before.busy_percent_until(&MachineTicks::read()).trunc();
            if busy <= quiet_max {
                return;
            }
            if Instant::now() >= deadline {
                return say!("  the machine is still {busy}% busy after {wait}s; measuring anyway");
            }
            sleep(Duration::from_secs(1));
        }
    }

    /// One record. A measurement during which other processes used more than --quiet-max
    /// % of the machine is taken again (at most RETAKES times); the quietest one is kept.
    fn measure(&mut self, phase: &str, round: u32, target: &Target) -> Result<()> {
        let others = |row: &Value| row["others_percent"].as_f64().unwrap_or(0.0);
        let quiet_max = f64::from(self.o.quiet_max);
        self.wait_quiet();
        let mut best = self.measure_once(phase, round, target)?;
        for _ in 0..RETAKES {
            if others(&best) <= quiet_max {
                break;
            }
            let busy = others(&best);
            self.retaken.0 += 1;
            say!("  other processes used {busy}% of the machine meanwhile; measuring again");
            self.wait_quiet();
            let row = self.measure_once(phase, round, target)?;
            if others(&row) < others(&best) {
                best = row;
            }
        }
        self.retaken.1 += u32::from(others(&best) > quiet_max);
        append_json(&self.out.join("results.jsonl"), &best)
    }

    fn measure_once(&mut self, phase: &str, round: u32, t: &Target) -> Result<Value> {
        let (port, c) = (self.port(t.via), t.connections);
        let name = format!(
            "{phase}-r{round}-{:?}-{:?}-{}-c{c}.txt",
            t.tool, t.via, t.path
        );
        let out = self.out.join(name.replace('/', "_").to_lowercase());
        let (mut command, shown) = self.wrk(t, c, self.o.duration);
        self.note(&shown);
        let access_log = match t.via {
            Via::Proxy => self.out.join("proxy-nginx/logs/access.log"),
            Via::Peer => self.out.join("peer-nginx/logs/access.log"),
            _ => self.cluster.dir.join("nginx/logs/access.log"),
        };
        let offset = fs::metadata(&access_log).map_or(0, |m| m.len());
        let direct = t.via == Via::Direct;
        let counted_before = direct.then(|| Counts::of_instance(port, t.path));
        let counted_before = counted_before.transpose()?;
        let upstream_counted = matches!(t.via, Via::Gateway | Via::Proxy | Via::Peer);
        let upstream = || -> Result<u64> {
            let count = upstream_counted.then(|| self.upstream_count(t.path));
            count.unwrap_or(Ok(0))
        };
        let upstream_before: u64 = upstream()?;
        let masters = &self.procs.masters;
        let before = Snapshot::take(&self.procs.groups, script_calls(masters)?);
        let (status, generator_ticks) =
            run_counted(&self.own, "load generator", &mut command, &out)?;
        let after = Snapshot::take(&self.procs.groups, script_calls(masters)?);
        let upstream = upstream()? - upstream_before;
        if !status.success() {
            bail!(
                "the load generator failed ({status}): {shown}\n{}",
                tail(&out, 5)
            );
        }
        let report = WrkReport::from_output(&fs::read_to_string(&out)?);
        let report = report.with_context(|| format!("in {}", out.display()))?;
        // Through Nginx its access log counts; directly, the instance's /metrics.
        let counts = match counted_before {
            Some(before) => Counts::of_instance(port, t.path)?.minus(&before),
            None => Counts::from_access_log(&access_log, offset)?,
        };
        // METRICS=off: the instance counted nothing, so wrk's count stands in (no 429 is
        // expected there; any status >= 400 is "other").
        let (other, closed) = (report.status_errors(), counts.closed);
        let wrk_counted = [report.requests.saturating_sub(other), 0, other];
        let counted = [counts.ok, counts.denied, counts.other];
        let [ok, denied, other] = if direct && counts.total() == 0 {
            wrk_counted
        } else {
            counted
        };
        let other = other + report.socket_errors();
        let traffic = Traffic {
            requests: report.requests,
            seconds: report.duration_us as f64 / 1e6,
            latency_ms: report.latency_ms(),
            statuses: [ok, denied, other],
            upstream,
        };
        let (snapshots, hz) = ((&before, &after), procfs::ticks_per_second());
        let row = measure::compute((phase, round), t, &traffic, snapshots, generator_ticks, hz);
        say!("  {}", measure::progress_line(&row));
        if upstream_counted {
            match gateway::check_admitted(traffic.statuses, closed, upstream) {
                Ok(None) => {}
                Ok(Some(odd)) => warn!("  through {:?} (port {port}): {odd}", t.via),
                Err(wrong) => bail!("through {:?} (port {port}): {wrong}", t.via),
            }
        }
        if closed > 0 {
            // A 499 is Nginx logging a request the load generator abandoned at its end.
            say!(
                "  ({closed} requests abandoned by the load generator at its end: Nginx logged 499)"
            );
        }
        Ok(row)
    }
}
