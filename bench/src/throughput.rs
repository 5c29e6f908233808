//! `scripts/bench.sh`: the chosen phases of [`PHASES`], each measured by one loop
//! ([`Bench::phase`]): start its topology, warm up, measure every target round by round,
//! then what comes after the rounds. Every measurement is a JSON line; the report is
//! rendered from those lines alone (`report::render`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use loadtest::summary::Summary;

use crate::cluster::{Cluster, Processes};
use crate::machine::{self, Machine};
use crate::measure::{Measurement, Snapshot, Traffic, round_to};
use crate::node::{Node, ScriptCounters};
use crate::phases::{self, After, LIMITED, PHASES, Phase, Target, Tool, Topology, Via};
use crate::probe::{self, Counts, WrkReport, port_open};
use crate::procfs::{MachineTicks, children_of, clock_ticks_per_second};
use crate::report::{self, RunInfo};
use crate::spawn::{Records, Started, run_counted, tail};
use crate::{LOOPBACK, append_json, gateway, say, warn};

#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Length of one measurement, in seconds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=60))]
    duration: u32,
    /// Rounds per phase; each round measures every target of the phase once, in reverse
    /// order every other round.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(3..=20))]
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
    /// The policy of the mixed phase: RATE_LIMIT = BURST per 1 s.
    #[arg(long, env = "MIXED_RATE", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    mixed_rate: u64,
    /// The phases to run, comma-separated, in any order (they run in the usual one), or
    /// `all`. `--record` needs all of them.
    #[arg(long, default_value = "all", value_parser = |t: &str| phases::parse(t).map(Chosen))]
    phases: Chosen,
    /// The command line the report quotes (the wrapper's own).
    #[arg(long, default_value = "scripts/bench.sh")]
    invocation: String,
}

#[derive(Debug, Clone)]
pub struct Chosen(Vec<&'static Phase>);

/// A measurement during which others used the machine is taken again at most this often.
const RETAKES: u32 = 2;
/// The sources of the load generator (the mixed phase): 241 clients.
const MIXED_SOURCES: &str = "127.0.0.10-250";
/// The distinct keys of scripts/bench/keys.lua, and of the cluster phase's spread.
const KEYS: u64 = 100_000;
/// Instance settings that pass through to every phase, named in the report when set.
const PASSED_SETTINGS: [&str; 4] = [
    "WORKERS",
    "REDIS_POOL_SIZE",
    "REDIS_TIMEOUT_MS",
    "ACCESS_LOG",
];
const DOC: &str = "docs/BENCHMARKS.md";

struct Bench {
    o: Options,
    root: PathBuf,
    out: PathBuf,
    hz: u64,
    /// The processes this program starts itself (run/bench/pids).
    own: Records,
    cluster: Cluster,
    /// What every phase runs: a copy of the release binary, or RATELIMITER_BIN.
    bin: PathBuf,
    /// Where [`Via::Direct`] goes: instance 8001, or the embedded-store one.
    direct_port: u16,
    embedded: Option<Started>,
    /// The bench's own Nginx in front of the demo upstream, and its port.
    proxy: Option<(Started, u16)>,
    procs: Processes,
    rows: Vec<Measurement>,
    commands: Vec<String>,
    /// Measurements taken again, and kept although others still used the machine.
    retaken: (u32, u32),
}

pub fn run(o: Options) -> Result<()> {
    let (started, started_at) = (Instant::now(), SystemTime::now());
    let root = std::env::current_dir()?;
    if o.record && o.phases.0.len() != PHASES.len() {
        bail!("--record rewrites the whole block of {DOC}, so it needs every phase: drop --phases");
    }
    let out = root.join("run/bench");
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out)?;
    let password = std::env::var("REDIS_ADMIN_PASSWORD");
    let password = password.unwrap_or_else(|_| "ratelimiter-dev-admin-password".into());
    let mut cluster = Cluster::new(&root, root.join("run/bench-cluster"), 0, &password)?;
    let wanted = cluster
        .ports
        .all(false, true)
        .into_iter()
        .chain(cluster.ports.all(true, false));
    let busy: Vec<String> = wanted
        .filter(|&p| port_open(p))
        .map(|p| p.to_string())
        .collect();
    if let Some(first) = busy.first() {
        let busy = busy.join(" ");
        bail!(
            "port(s) {busy} are in use (a cluster running? scripts/cluster.sh down); see: ss -ltnp 'sport = :{first}'"
        );
    }
    let given = std::env::var_os("RATELIMITER_BIN").map(PathBuf::from);
    let rel = |path: &Path| {
        path.strip_prefix(&root)
            .unwrap_or(path)
            .display()
            .to_string()
    };
    let (bin, service) = match given {
        Some(bin) => (bin.clone(), machine::service_note(Some(&bin), "", "")),
        None => {
            // Every phase runs the same binary, even if the tree is rebuilt meanwhile.
            let (built, copy) = (
                crate::release_binary(&root, "ratelimiter"),
                out.join("ratelimiter"),
            );
            let copied = fs::copy(&built, &copy);
            copied.with_context(|| format!("cannot copy {} (is it built?)", built.display()))?;
            (
                copy.clone(),
                machine::service_note(None, &rel(&built), &rel(&copy)),
            )
        }
    };
    cluster.bin = Some(bin.clone());
    let (hz, own, direct_port) = (
        clock_ticks_per_second()?,
        Records(out.join("pids")),
        cluster.ports.apps[0],
    );
    let (embedded, proxy, procs, rows, commands, retaken) = Default::default();
    let mut b = Bench {
        o,
        root,
        out,
        hz,
        own,
        cluster,
        bin,
        direct_port,
        embedded,
        proxy,
        procs,
        rows,
        commands,
        retaken,
    };
    let load_before = machine::load_average();
    let cores = Machine::read().cores;
    say!(
        "load average now: {load_before} ({cores} cores); other engineers' work moves the figures, see the 'other processes' column"
    );
    let chosen = b.o.phases.0.clone();
    say!(
        "phases: {}",
        chosen.iter().map(|p| p.name).collect::<Vec<_>>().join(",")
    );
    let outcome = chosen.iter().try_for_each(|phase| b.phase(phase));
    b.down();
    outcome?;

    let mut keepalive: Vec<(String, Option<String>)> = Vec::new();
    for entry in fs::read_dir(b.root.join("nginx"))?.flatten() {
        let name = format!("nginx/{}", entry.file_name().to_string_lossy());
        if name.contains(".conf") {
            keepalive.push((name, report::keepalive(&fs::read_to_string(entry.path())?)));
        }
    }
    keepalive.sort();
    let setting = |name: &&str| {
        Some(format!(
            "{name}={}",
            std::env::var(name).ok().filter(|v| !v.is_empty())?
        ))
    };
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
        instance_settings: PASSED_SETTINGS.iter().filter_map(setting).collect(),
        invocation: b.o.invocation.clone(),
        commands: b.commands.clone(),
        keepalive,
    };
    fs::write(b.out.join("run.json"), serde_json::to_string_pretty(&info)?)?;
    let text = report::render(&b.out)?;
    fs::write(b.out.join("report.md"), &text)?;
    println!("\n{text}");
    say!(
        "done in {}s; raw outputs in {}",
        info.elapsed_s,
        b.rel(&b.out)
    );
    if b.o.record {
        report::record(&b.root.join(DOC), "bench.sh", &text)?;
        say!("recorded in {DOC}");
    }
    Ok(())
}

impl Bench {
    fn rel(&self, path: &Path) -> String {
        path.strip_prefix(&self.root)
            .unwrap_or(path)
            .display()
            .to_string()
    }

    /// Remembers a command for the report (once) and shows it.
    fn note(&mut self, text: &str) {
        let mut text = text.replace(&format!("{}/", self.root.display()), "");
        if self.embedded.is_some() {
            text = text.replace(
                &format!("{LOOPBACK}:{}", self.direct_port),
                &format!("{LOOPBACK}:PORT"),
            );
        }
        if !self.commands.contains(&text) {
            say!("+ {text}");
            self.commands.push(text);
        }
    }

    /// The one loop: any phase, from its topology up to its topology down.
    fn phase(&mut self, phase: &Phase) -> Result<()> {
        if let Some(setting) = phase.requires
            && !fs::read(&self.bin).is_ok_and(|bytes| {
                bytes
                    .windows(setting.len())
                    .any(|w| w == setting.as_bytes())
            })
        {
            say!(
                "phase {} skipped: this binary has no {setting} setting",
                phase.name
            );
            return Ok(());
        }
        let outcome = self.up(phase).and_then(|()| {
            let targets = phase.targets();
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
            match phase.after {
                After::ScriptAlone => self.script_alone(),
                After::Spread => self.spread(phase.name),
                After::Nothing => Ok(()),
            }
        });
        self.down();
        outcome
    }

    fn up(&mut self, phase: &Phase) -> Result<()> {
        let mut env = phase
            .env
            .replace("$MIXED_RATE", &self.o.mixed_rate.to_string());
        if let Some(policy) = phase.policy {
            let file = self.out.join(format!("{}.toml", phase.name));
            fs::write(&file, policy)?;
            env = format!("{env} POLICY_FILE={}", file.display())
                .trim_start()
                .to_owned();
        }
        self.direct_port = self.cluster.ports.apps[0];
        let name = phase.name;
        match phase.topology {
            Topology::Cluster(flags) => {
                let (dir, flag) = (
                    self.rel(&self.cluster.dir),
                    flags.iter().map(|f| format!(" {f}")).collect::<String>(),
                );
                self.note(&format!(
                    "{env} CLUSTER_DIR={dir} scripts/cluster.sh up{flag}"
                ));
                let log = self.out.join(format!("cluster-{name}.log"));
                say!(
                    "phase {name}: starting the cluster (log: {})",
                    self.rel(&log)
                );
                let last = self.cluster.start(&env, flags, &log)?;
                say!("phase {name}: {last}");
                if flags.contains(&"--gateway") {
                    let upstream = self.cluster.ports.upstream;
                    let (proxy, port, command) =
                        gateway::proxy_up(&self.root, &self.out, &self.own, upstream)?;
                    self.note(&command);
                    self.proxy = Some((proxy, port));
                }
                self.procs = self.cluster.processes()?;
                if let Some((proxy, _)) = &self.proxy {
                    self.procs.groups.insert(
                        "proxy",
                        [vec![proxy.pid()], children_of(proxy.pid())].concat(),
                    );
                }
            }
            Topology::Embedded => {
                let settings = format!("HOST={LOOPBACK} PORT=0 INSTANCE_NAME=bench-memory {env}");
                self.note(&format!("env -i {settings} {} &", self.bin.display()));
                let log = self.out.join("memory-instance.log");
                let mut command = Command::new(&self.bin);
                command
                    .env_clear()
                    .env("PATH", std::env::var_os("PATH").unwrap_or_default());
                command
                    .env("RUST_LOG", "info")
                    .envs(crate::env_pairs(&settings));
                let mut instance = Started::spawn(&self.own, "bench-memory", &mut command, &log)?;
                let port = probe::wait_for_instance(&mut instance, &log);
                self.direct_port = port.with_context(|| {
                    format!("the embedded-store instance; see {}", self.rel(&log))
                })?;
                self.procs = Processes {
                    groups: [("app", vec![instance.pid()])].into(),
                    masters: Vec::new(),
                };
                self.embedded = Some(instance);
            }
        }
        let groups: Vec<String> = self
            .procs
            .groups
            .iter()
            .filter(|g| !g.1.is_empty())
            .map(|(g, p)| format!("{g} {p:?}"))
            .collect();
        let masters: Vec<u16> = self.procs.masters.iter().map(|m| m.port).collect();
        say!("processes: {}; masters {masters:?}", groups.join(", "));
        if self.proxy.is_some() {
            // One request through the gateway and one through the bench's Nginx: each a
            // 200 that the demo upstream counted once.
            for via in [Via::Gateway, Via::Proxy] {
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

    fn down(&mut self) {
        self.proxy.take();
        self.embedded.take();
        if self.cluster.up {
            self.note(&format!(
                "CLUSTER_DIR={} scripts/cluster.sh down",
                self.rel(&self.cluster.dir)
            ));
            self.cluster.stop(&self.out.join("cluster-down.log"));
        }
    }

    fn upstream_count(&self, path: &str) -> Result<u64> {
        gateway::upstream_count(self.cluster.ports.upstream_count, path)
    }

    fn port(&self, via: Via) -> u16 {
        match via {
            Via::Nginx => self.cluster.ports.nginx,
            Via::Direct => self.direct_port,
            Via::Gateway => self.cluster.ports.gateway,
            Via::Proxy => self.proxy.as_ref().map_or(0, |p| p.1),
        }
    }

    fn url(&self, via: Via, path: &str) -> String {
        format!("http://{LOOPBACK}:{}{path}", self.port(via))
    }

    /// Short unrecorded runs, so that pools, connections and caches are warm.
    fn warm_up(&self, targets: &[Target]) {
        say!("warming up (2 s per target, not recorded)");
        let mut done = Vec::new();
        for t in targets {
            if done.contains(&(t.via, t.path)) {
                continue;
            }
            done.push((t.via, t.path));
            let keys: &[&str] = if t.tool == Tool::WrkKeys {
                &["-s", "scripts/bench/keys.lua"]
            } else {
                &[]
            };
            let mut wrk = Command::new("wrk");
            wrk.args(["-t1", "-c16", "-d2s"])
                .args(keys)
                .arg(self.url(t.via, t.path))
                .current_dir(&self.root);
            let _ = wrk.stdout(Stdio::null()).stderr(Stdio::null()).status();
        }
    }

    /// Waits, at most --quiet-wait seconds, until the machine is at most --quiet-max % busy.
    fn wait_quiet(&self) {
        let deadline = Instant::now() + Duration::from_secs(self.o.quiet_wait.into());
        while self.o.quiet_wait > 0 && Instant::now() < deadline + Duration::from_secs(2) {
            let before = MachineTicks::read();
            sleep(Duration::from_millis(500));
            let busy = before.busy_percent_until(&MachineTicks::read()).trunc();
            if busy <= f64::from(self.o.quiet_max) {
                return;
            }
            if Instant::now() >= deadline {
                return say!(
                    "  the machine is still {busy}% busy after {}s; measuring anyway",
                    self.o.quiet_wait
                );
            }
            sleep(Duration::from_secs(1));
        }
    }

    /// One record. A measurement during which other processes used more than --quiet-max
    /// % of the machine is taken again (at most RETAKES times); the quietest one is kept.
    fn measure(&mut self, phase: &str, round: u32, target: &Target) -> Result<()> {
        let mut best: Option<Measurement> = None;
        for attempt in 0..=RETAKES {
            self.wait_quiet();
            let row = self.measure_once(phase, round, target)?;
            let others = row.others_percent;
            if best.as_ref().is_none_or(|b| others < b.others_percent) {
                best = Some(row);
            }
            if others <= f64::from(self.o.quiet_max) {
                break;
            }
            if attempt < RETAKES {
                self.retaken.0 += 1;
                say!("  other processes used {others}% of the machine meanwhile; measuring again");
            } else {
                self.retaken.1 += 1;
            }
        }
        let row = best.expect("at least one attempt");
        append_json(&self.out.join("results.jsonl"), &row)?;
        self.rows.push(row);
        Ok(())
    }

    fn measure_once(&mut self, phase: &str, round: u32, t: &Target) -> Result<Measurement> {
        let (port, url, c, d) = (
            self.port(t.via),
            self.url(t.via, t.path),
            t.connections,
            self.o.duration,
        );
        let name = format!(
            "{phase}-r{round}-{:?}-{:?}-{}-c{c}",
            t.tool,
            t.via,
            t.path.replace('/', "_")
        );
        let (out, json) = (
            self.out.join(format!("{name}.txt").to_lowercase()),
            self.out.join(format!("{name}.json").to_lowercase()),
        );
        let wrk = format!(
            "-t{} -c{c} -d{d}s --latency -s scripts/bench",
            self.o.threads
        );
        let (program, args) = match t.tool {
            Tool::Loadtest => {
                let args = format!(
                    "--url {url} --connections {c} --duration {d}s --sources {MIXED_SOURCES} --max-requests 100000000 --json"
                );
                (
                    crate::release_binary(&self.root, "loadtest")
                        .display()
                        .to_string(),
                    args,
                )
            }
            Tool::Wrk => ("wrk".into(), format!("{wrk}/report.lua {url}")),
            Tool::WrkKeys => ("wrk".into(), format!("{wrk}/keys.lua {url} -- {KEYS}")),
        };
        let shown = if t.tool == Tool::Loadtest {
            " run/bench/NAME.json"
        } else {
            ""
        };
        self.note(&format!("{program} {args}{shown}"));
        let mut command = Command::new(&program);
        command.args(args.split(' ')).current_dir(&self.root);
        if t.tool == Tool::Loadtest {
            command.arg(&json);
        }
        let access_log = match t.via {
            Via::Proxy => self.out.join("proxy-nginx/logs/access.log"),
            _ => self.cluster.dir.join("nginx/logs/access.log"),
        };
        let offset = fs::metadata(&access_log).map_or(0, |m| m.len());
        let direct = t.via == Via::Direct;
        let counted_before = if direct {
            Counts::of_instance(port, t.path)
        } else {
            Counts::default()
        };
        let upstream_counted = matches!(t.via, Via::Gateway | Via::Proxy);
        let upstream_before = if upstream_counted {
            self.upstream_count(t.path)?
        } else {
            0
        };
        let before = Snapshot::take(&self.procs.groups, ScriptCounters::sum(&self.procs.masters));
        let (status, generator_ticks) = run_counted(&self.own, &program, &mut command, &out)?;
        let after = Snapshot::take(&self.procs.groups, ScriptCounters::sum(&self.procs.masters));
        let upstream = if upstream_counted {
            self.upstream_count(t.path)? - upstream_before
        } else {
            0
        };
        if !status.success() {
            bail!(
                "the load generator failed ({status}): {program} {args}\n{}",
                tail(&out, 5)
            );
        }
        let mut closed = 0;
        let traffic = if t.tool == Tool::Loadtest {
            let text = fs::read_to_string(&json)
                .with_context(|| format!("cannot read {}", json.display()))?;
            let summary: Summary =
                serde_json::from_str(&text).with_context(|| format!("in {}", json.display()))?;
            Traffic::of_summary(&summary)
        } else {
            let report = WrkReport::from_output(&fs::read_to_string(&out)?)
                .with_context(|| format!("in {}", out.display()))?;
            // Through Nginx its access log counts; directly, the instance's /metrics.
            let counted = || Counts::of_instance(port, t.path).minus(&counted_before);
            let counts = match direct.then(counted) {
                // METRICS=off: the instance counted nothing, so wrk's count stands in
                // (no 429 is expected there; any status >= 400 is "other").
                Some(none) if none.total() == 0 => {
                    let other = report.errors.status;
                    Counts {
                        ok: report.requests.saturating_sub(other),
                        other,
                        ..none
                    }
                }
                Some(delta) => delta,
                None => Counts::from_access_log(&access_log, offset)?,
            };
            closed = counts.closed;
            Traffic::of_wrk(&report, &counts)
        };
        let traffic = Traffic {
            upstream,
            ..traffic
        };
        let row = Measurement::compute(
            (phase, round),
            t,
            &traffic,
            &before,
            &after,
            generator_ticks,
            self.hz,
        );
        say!("  {}", row.progress_line());
        if upstream_counted {
            match gateway::check_admitted(row.ok, row.denied, row.other, closed, row.upstream) {
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

    /// The Lua script alone on the master, after the rounds.
    fn script_alone(&mut self) -> Result<()> {
        let master = self
            .procs
            .masters
            .first()
            .context("no Redis master found")?
            .clone();
        let pids = self.procs.groups.get("master").cloned().unwrap_or_default();
        let commands =
            crate::script::run(&master, &pids, &self.root, &self.out, &self.own, self.hz)?;
        commands.iter().for_each(|c| self.note(c));
        Ok(())
    }

    /// One wrk run through Nginx long enough for [`KEYS`] requests (from the rounds'
    /// rate), keys 0 to KEYS - 1 in turn; each master's share of the script calls.
    fn spread(&mut self, phase: &str) -> Result<()> {
        let rates: Vec<f64> = self
            .rows
            .iter()
            .filter(|r| r.phase == phase && r.via == Via::Nginx)
            .map(|r| r.per_second)
            .collect();
        let rate = report::median(&rates).unwrap_or(1000.0).max(1.0);
        // A quarter more than the rounds' rate needs, and a second to connect.
        let seconds = ((KEYS as f64 * 1.25 / rate).ceil() as u64 + 1).clamp(3, 60);
        let args = format!(
            "-t{} -c64 -d{seconds}s -s scripts/bench/keys.lua {} -- {KEYS}",
            self.o.threads,
            self.url(Via::Nginx, LIMITED)
        );
        self.note(&format!("wrk {args}"));
        let calls = |masters: &[Node]| -> Result<Vec<u64>> {
            masters
                .iter()
                .map(|m| Ok(m.command_stats()?.script_counters().script_calls))
                .collect()
        };
        let before = calls(&self.procs.masters)?;
        let out = self.out.join(format!("{phase}-spread.txt"));
        say!(
            "phase {phase}: the spread of {KEYS} keys over the masters ({seconds} s through Nginx)"
        );
        let mut command = Command::new("wrk");
        let (status, _) = run_counted(
            &self.own,
            "wrk",
            command.args(args.split(' ')).current_dir(&self.root),
            &out,
        )?;
        let after = calls(&self.procs.masters)?;
        if !status.success() {
            bail!("wrk failed ({status}): {}", tail(&out, 5));
        }
        let report = WrkReport::from_output(&fs::read_to_string(&out)?)?;
        let deltas: Vec<u64> = before
            .iter()
            .zip(&after)
            .map(|(b, a)| a.saturating_sub(*b))
            .collect();
        let total = deltas.iter().sum::<u64>().max(1);
        for (master, calls) in self.procs.masters.iter().zip(deltas) {
            let share = round_to(100.0 * calls as f64 / total as f64, 2);
            let (requests, seconds) = (
                report.requests,
                round_to(report.duration_us as f64 / 1e6, 1),
            );
            let record = serde_json::json!({"phase": phase, "master": format!("{LOOPBACK}:{}", master.port), "script_calls": calls,
                "share_percent": share, "requests": requests, "seconds": seconds, "keys": requests.min(KEYS)});
            append_json(&self.out.join("spread.jsonl"), &record)?;
            say!(
                "  master {}: {calls} script calls, {share} % of {total}",
                master.port
            );
        }
        Ok(())
    }
}
