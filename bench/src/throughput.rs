//! `scripts/bench.sh`: every phase under its own policy, each measurement counted per
//! process group, then the report. See the script's header for what each phase is.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};

use crate::http;
use crate::loadgen::LoadtestSummary;
use crate::machine::{self, Machine};
use crate::procfs::{self, MachineTicks, ProcStat, ticks_of};
use crate::prom::{self, StatusCounts};
use crate::record;
use crate::redis_info::{Node, ScriptCounters, info_field};
use crate::report::{self, RunInfo};
use crate::row::{AppDetail, GroupTicks, Label, Row, Snapshot, Target, Tool, Traffic, Via};
use crate::script::{self, ScriptRow, ScriptRun};
use crate::spawn::{self, Records, Started, recorded_pids, tail};
use crate::wrk::WrkReport;
use crate::{LOOPBACK, say, warn};

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
    #[arg(long, default_value = "all", value_parser = parse_phases)]
    phases: Phases,
    /// The command line the report quotes (the wrapper's own).
    #[arg(long, default_value = "scripts/bench.sh")]
    invocation: String,
}

const NGINX_PORT: u16 = 8000;
/// The gateway server of the cluster's Nginx, the demo upstream behind it and its counts.
const GATEWAY_PORT: u16 = 8080;
const UPSTREAM_PORT: u16 = 8081;
const UPSTREAM_COUNT_PORT: u16 = 8082;
/// The first port tried for the bench's own Nginx in front of the demo upstream.
const PROXY_PORTS: std::ops::RangeInclusive<u16> = 8090..=8099;
/// What wrk asks for through the gateway: any path reaches the demo upstream.
const GATEWAY_PATH: &str = report::GATEWAY_PATH;
const APP_PORTS: [u16; 2] = [8001, 8002];
const DATA_PORTS: [u16; 3] = [6379, 6380, 6381];
const SENTINEL_PORTS: [u16; 3] = [26379, 26380, 26381];
/// The nodes of `scripts/cluster.sh up --redis-cluster` (each with its bus on port + 10000).
const CLUSTER_PORTS: [u16; 6] = [7000, 7001, 7002, 7003, 7004, 7005];
/// The distinct keys of the cluster phase's spread measurement.
const CLUSTER_KEYS: u64 = 100_000;
/// The wrk script that gives every request its own key (X-Bench-Key).
const KEYS_SCRIPT: &str = "scripts/bench/keys.lua";
const MIXED_SOURCES: &str = "127.0.0.10-250";
const BENCH_KEY_PREFIX: &str = "ratelimit:bench";
const LUA_REPORT: &str = "scripts/bench/report.lua";
const DOC: &str = "docs/BENCHMARKS.md";
/// A measurement during which others used the machine is taken again at most this often.
const RETAKES: u32 = 2;
/// Environment the bench decides per phase; everything else reaches the instances as given.
const PHASE_VARS: [&str; 8] = [
    "RATE_LIMIT",
    "TIME_WINDOW",
    "BURST",
    "DENY_CACHE_SIZE",
    "FAIL_MODE",
    "REDIS_CLIENT",
    "METRICS",
    "POLICY_FILE",
];

/// The policy of the two-limits phase: one policy of two limits on `/limited_endpoint`,
/// both so large that every request runs the whole decision and is admitted.
const TWO_LIMITS: &str = r#"[[policy]]
name = "two"
match = { path = "/limited_endpoint" }
limits = [
    { name = "second", rate = 1000000000, per = "1s" },
    { name = "minute", rate = 1000000000, per = "1m" },
]
"#;
/// The policy of the gateway phase: one policy on every path (no `match`), per client
/// address, so large that every request through the gateway runs the whole decision and
/// is admitted.
const GATEWAY_POLICY: &str = r#"[[policy]]
name = "gateway"
key = ["client_ip"]
limits = [{ name = "second", rate = 1000000000, per = "1s" }]
"#;

/// The policy of the cluster phase: `/limited_endpoint` keyed by X-Bench-Key (which
/// scripts/bench/keys.lua sets), so large that every request runs the whole decision and is
/// admitted. One load generator thus decides many keys, spread over every master in Cluster
/// mode. A request without the header is not limited (the warm-up's are all keyed anyway).
const KEYED_POLICY: &str = r#"[[policy]]
name = "keyed"
match = { path = "/limited_endpoint" }
key = ["header:x-bench-key"]
on_missing = "skip"
limits = [{ name = "second", rate = 1000000000, per = "1s" }]
"#;

/// Every phase of the bench's own cluster, in the order they run.
pub const PHASES: [&str; 10] = [
    "allow",
    "two-limits",
    "metrics-off",
    "allow-pool",
    "memory-store",
    "mixed",
    "flood",
    "flood-nocache",
    "gateway",
    "cluster",
];

/// The phases `--phases` chose, in the order of [`PHASES`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Phases(Vec<&'static str>);

impl Phases {
    pub fn has(&self, name: &str) -> bool {
        self.0.contains(&name)
    }

    pub fn is_all(&self) -> bool {
        self.0.len() == PHASES.len()
    }

    pub fn names(&self) -> String {
        self.0.join(",")
    }
}

/// `--phases`: `all`, or phase names separated by commas (spaces around them, repeats
/// and order do not matter).
pub fn parse_phases(text: &str) -> Result<Phases, String> {
    let names: Vec<&str> = text
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .collect();
    if names.is_empty() {
        return Err(format!(
            "name at least one phase (or all): {}",
            PHASES.join(",")
        ));
    }
    if names == ["all"] {
        return Ok(Phases(PHASES.to_vec()));
    }
    if let Some(unknown) = names.iter().find(|name| !PHASES.contains(name)) {
        return Err(format!(
            "no phase '{unknown}'; the phases: {} (or all)",
            PHASES.join(",")
        ));
    }
    Ok(Phases(
        PHASES
            .iter()
            .copied()
            .filter(|phase| names.contains(phase))
            .collect(),
    ))
}

/// The two targets of the gateway phase: through the gateway, then through the bench's
/// own Nginx straight to the same upstream, at 64 connections.
fn gateway_targets() -> Vec<Target> {
    [Via::Gateway, Via::Proxy]
        .into_iter()
        .map(|via| Target {
            tool: Tool::Wrk,
            via,
            path: GATEWAY_PATH,
            connections: 64,
        })
        .collect()
}

/// The bench's own Nginx: the settings of the shipped gateway server (nginx/nginx.conf.template)
/// that concern the way to the application, without the auth_request, in front of the
/// same demo upstream. `dir` holds its pid, logs and temp files.
fn proxy_config(dir: &Path, port: u16) -> String {
    let dir = dir.display();
    format!(
        r#"# Written by the bench (gateway phase): Nginx straight to the demo upstream, with the
# gateway server's worker, keepalive and proxy settings, and no rate-limit check.
daemon off;
worker_processes auto;
pid {dir}/nginx.pid;
error_log {dir}/logs/error.log notice;

events {{
    worker_connections 1024;
}}

http {{
    access_log {dir}/logs/access.log;
    client_body_temp_path {dir}/temp/client_body;
    proxy_temp_path {dir}/temp/proxy;
    fastcgi_temp_path {dir}/temp/fastcgi;
    uwsgi_temp_path {dir}/temp/uwsgi;
    scgi_temp_path {dir}/temp/scgi;

    default_type application/octet-stream;
    server_tokens off;

    upstream application {{
        server {LOOPBACK}:{UPSTREAM_PORT};
        keepalive 64;
        keepalive_timeout 4s;
    }}

    server {{
        listen {LOOPBACK}:{port};

        client_header_timeout 10s;
        client_body_timeout 10s;
        send_timeout 10s;
        keepalive_timeout 30s;
        client_header_buffer_size 1k;
        large_client_header_buffers 4 8k;

        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_set_header X-Real-IP $remote_addr;
        proxy_set_header X-Forwarded-For $remote_addr;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_set_header Forwarded "";

        location / {{
            proxy_pass http://application;
        }}
    }}
}}
"#
    )
}

/// Whether the answers through the gateway are what its phase needs: some 200s, no 429
/// (the policy admits everything), and the demo upstream counted each 200 (and at most
/// the requests wrk abandoned or that failed besides). An error says what is wrong; a
/// warning (`Ok(Some)`) what is odd but leaves the figures standing.
pub fn check_admitted(
    ok: u64,
    denied: u64,
    other: u64,
    closed: u64,
    upstream: u64,
) -> Result<Option<String>, String> {
    if ok == 0 {
        return Err("no request was answered 200".into());
    }
    if denied > 0 {
        return Err(format!(
            "{denied} requests were denied (429): the policy should admit every request"
        ));
    }
    if upstream < ok {
        return Err(format!(
            "the demo upstream counted {upstream} requests, fewer than the {ok} answered 200"
        ));
    }
    let mut odd = Vec::new();
    if other > 0 {
        odd.push(format!(
            "{other} answers other than 200/429 (or socket errors)"
        ));
    }
    if upstream > ok + closed + other {
        odd.push(format!(
            "the demo upstream counted {upstream} requests, more than the {ok} answered 200 and {} abandoned or failed",
            closed + other
        ));
    }
    Ok((!odd.is_empty()).then(|| odd.join("; ")))
}

/// Instance settings that pass through to every phase, named in the report when set.
const PASSED_SETTINGS: [&str; 4] = [
    "WORKERS",
    "REDIS_POOL_SIZE",
    "REDIS_TIMEOUT_MS",
    "ACCESS_LOG",
];
const LIMITED: &str = "/limited_endpoint";
const ROOT_PATH: &str = "/";

/// The targets of a phase: for each connection count, each way in, `/limited_endpoint`
/// then `/`.
fn targets(tool: Tool, vias: &[Via], connections: &[u32]) -> Vec<Target> {
    let mut list = Vec::new();
    for &connections in connections {
        for &via in vias {
            for path in [LIMITED, ROOT_PATH] {
                list.push(Target {
                    tool,
                    via,
                    path,
                    connections,
                });
            }
        }
    }
    list
}

/// The process groups of the topology, found once per phase.
#[derive(Debug, Clone, Default)]
struct Groups {
    app: Vec<u32>,
    nginx: Vec<u32>,
    master: Vec<u32>,
    replicas: Vec<u32>,
    sentinels: Vec<u32>,
    /// The demo upstream (gateway phase).
    upstream: Vec<u32>,
    /// The bench's own Nginx in front of the demo upstream (gateway phase).
    proxy: Vec<u32>,
}

impl Groups {
    fn ticks(&self) -> GroupTicks {
        GroupTicks {
            app: ticks_of(&self.app),
            nginx: ticks_of(&self.nginx),
            master: ticks_of(&self.master),
            replicas: ticks_of(&self.replicas),
            sentinels: ticks_of(&self.sentinels),
            upstream: ticks_of(&self.upstream),
            proxy: ticks_of(&self.proxy),
        }
    }

    fn app_detail(&self) -> AppDetail {
        let mut detail = AppDetail::default();
        for &pid in &self.app {
            if let Some(stat) = ProcStat::read(pid) {
                detail.user += stat.utime;
                detail.system += stat.stime;
                detail.threads += stat.threads;
            }
            detail.switches += procfs::context_switches(pid);
        }
        detail
    }
}

/// Responses Nginx logged, by status, from its access log's lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AccessCounts {
    pub ok: u64,
    pub denied: u64,
    pub other: u64,
    /// 499: the client (the load generator, at its end) closed the connection first.
    pub closed: u64,
}

impl AccessCounts {
    /// Counts one line of the combined log format: the status follows the request's
    /// closing quote.
    pub fn add_line(&mut self, line: &str) {
        let status = line
            .split('"')
            .nth(2)
            .and_then(|rest| rest.split_whitespace().next());
        match status {
            Some("200") => self.ok += 1,
            Some("429") => self.denied += 1,
            Some("499") => self.closed += 1,
            _ => self.other += 1,
        }
    }
}

struct Bench {
    options: Options,
    root: PathBuf,
    out: PathBuf,
    hz: u64,
    /// The data nodes' default (operators') user's password.
    password: String,
    bin: PathBuf,
    loadtest: PathBuf,
    records: Records,
    cluster_dir: PathBuf,
    own_cluster: bool,
    cluster_up: bool,
    direct_port: u16,
    memory_instance: Option<Started>,
    /// The bench's own Nginx in front of the demo upstream, and its port.
    proxy: Option<Started>,
    proxy_port: u16,
    groups: Groups,
    master: Option<Node>,
    /// Cluster mode: every master, whose counters the rows sum.
    masters: Vec<Node>,
    /// The cluster phase's spread of keys over the masters, and its side-by-side table.
    cluster_report: String,
    rows: Vec<Row>,
    scripts: Vec<ScriptRow>,
    commands: Vec<String>,
    seen_commands: HashSet<String>,
    retaken: u32,
    still_busy: u32,
}

pub fn run(options: Options) -> Result<()> {
    let started = Instant::now();
    let started_at = SystemTime::now();
    let root = std::env::current_dir()?;
    if !root.join("scripts/cluster.sh").is_file() {
        bail!("run this from the repository (scripts/bench.sh does)");
    }
    if options.record && !options.phases.is_all() {
        bail!(
            "--record rewrites the whole block of {DOC}, so it needs every phase: drop --phases {}",
            options.phases.names()
        );
    }
    let target_dir =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let out = root.join("run/bench");
    if out.exists() {
        fs::remove_dir_all(&out).with_context(|| format!("cannot empty {}", out.display()))?;
    }
    fs::create_dir_all(&out)?;
    let given_bin = std::env::var_os("RATELIMITER_BIN").map(PathBuf::from);
    let mut bench = Bench {
        hz: procfs::clock_ticks_per_second()?,
        // The bench reads the nodes (INFO, SCRIPT LOAD, redis-benchmark on keys of its own)
        // as their operators' user: the instances' user may do none of that.
        password: std::env::var("REDIS_ADMIN_PASSWORD")
            .unwrap_or_else(|_| "ratelimiter-dev-admin-password".into()),
        bin: given_bin
            .clone()
            .unwrap_or_else(|| target_dir.join("release/ratelimiter")),
        loadtest: target_dir.join("release/loadtest"),
        records: Records::new(out.join("pids")),
        cluster_dir: root.join("run/cluster"),
        own_cluster: false,
        cluster_up: false,
        direct_port: APP_PORTS[0],
        memory_instance: None,
        proxy: None,
        proxy_port: *PROXY_PORTS.start(),
        groups: Groups::default(),
        master: None,
        masters: Vec::new(),
        cluster_report: String::new(),
        rows: Vec::new(),
        scripts: Vec::new(),
        commands: Vec::new(),
        seen_commands: HashSet::new(),
        retaken: 0,
        still_busy: 0,
        options,
        root,
        out,
    };

    let load_before = machine::load_average();
    say!(
        "load average now: {load_before} ({} cores); other engineers' work moves the figures, see the 'other processes' column",
        Machine::read().cores
    );

    let service;
    if http::healthy(NGINX_PORT) && APP_PORTS.iter().all(|&port| http::ready(port)) {
        if let Some(dir) = std::env::var_os("CLUSTER_DIR") {
            bench.cluster_dir = PathBuf::from(dir);
        }
        let pids = bench.cluster_dir.join("pids");
        if recorded_pids(&pids, |name| name == "nginx").is_empty() {
            bail!(
                "something answers on 8000-8002 but it is not a native cluster with pid records in {} (Compose?): stop it, or set CLUSTER_DIR to its run folder",
                bench.rel(&bench.cluster_dir)
            );
        }
        if bench.options.record {
            bail!(
                "--record needs every phase, so the bench's own cluster: stop the running one first (scripts/cluster.sh down)"
            );
        }
        if !bench.options.phases.is_all() {
            bail!(
                "--phases chooses phases of the bench's own cluster, but a cluster is running (it gets one phase, \"running\"): stop it first (scripts/cluster.sh down), or drop --phases"
            );
        }
        say!(
            "using the running cluster ({}); it keeps its policy and keeps running",
            bench.rel(&bench.cluster_dir)
        );
        let policy = http::get(NGINX_PORT, LIMITED, Duration::from_secs(5))
            .ok()
            .and_then(|response| response.header("ratelimit-policy").map(str::to_owned))
            .unwrap_or_default();
        say!("its policy: {policy}");
        service = format!(
            "the running cluster's binary; this checkout is at commit {}",
            machine::commit()
        );
        bench.running_phase()?;
    } else {
        let gateway_ports: &[u16] = if bench.options.phases.has("gateway") {
            &[UPSTREAM_PORT, UPSTREAM_COUNT_PORT]
        } else {
            &[]
        };
        let cluster_ports: Vec<u16> = if bench.options.phases.has("cluster") {
            CLUSTER_PORTS
                .iter()
                .flat_map(|&p| [p, p + 10_000])
                .collect()
        } else {
            Vec::new()
        };
        let busy: Vec<String> = [NGINX_PORT, GATEWAY_PORT]
            .iter()
            .chain(gateway_ports)
            .chain(&cluster_ports)
            .chain(&APP_PORTS)
            .chain(&DATA_PORTS)
            .chain(&SENTINEL_PORTS)
            .filter(|&&port| port_open(port))
            .map(u16::to_string)
            .collect();
        if let Some(first) = busy.first() {
            bail!(
                "port(s) {} are in use but no native cluster answers on 8000-8002; free them (see: ss -ltnp 'sport = :{first}') and retry",
                busy.join(" ")
            );
        }
        bench.own_cluster = true;
        bench.cluster_dir = bench.root.join("run/bench-cluster");
        service = match &given_bin {
            Some(bin) => {
                let built = fs::metadata(bin)
                    .and_then(|m| m.modified())
                    .map_or_else(|_| "at an unknown time".into(), machine::utc_minute);
                format!(
                    "RATELIMITER_BIN={} (built {built}); this checkout is at commit {}",
                    bench.rel(bin),
                    machine::commit()
                )
            }
            None => {
                // Every phase runs the same binary, even if the working tree is rebuilt
                // meanwhile: a copy, made once.
                let copy = bench.out.join("ratelimiter");
                fs::copy(&bench.bin, &copy).with_context(|| {
                    format!("cannot copy {} (is it built?)", bench.bin.display())
                })?;
                let note = machine::service_note(
                    Path::new(&bench.rel(&bench.bin)),
                    false,
                    &bench.rel(&copy),
                );
                bench.bin = copy;
                say!("every phase runs a copy of it: {}", bench.rel(&bench.bin));
                note
            }
        };
        say!("phases: {}", bench.options.phases.names());
        let outcome = bench.own_phases();
        bench.proxy_down();
        bench.memory_instance_down();
        bench.cluster_down();
        outcome?;
    }

    let info = RunInfo {
        started: machine::utc_minute(started_at),
        machine: Machine::read(),
        software: machine::software(),
        service,
        load_before,
        load_after: machine::load_average(),
        rounds: bench.options.rounds,
        duration_s: bench.options.duration,
        threads: bench.options.threads,
        elapsed_s: started.elapsed().as_secs(),
        quiet_max: bench.options.quiet_max,
        retaken: bench.retaken,
        still_busy: bench.still_busy,
        instance_settings: PASSED_SETTINGS
            .iter()
            .filter_map(|name| {
                let value = std::env::var(name).ok().filter(|v| !v.is_empty())?;
                Some(format!("{name}={value}"))
            })
            .collect(),
        invocation: bench.options.invocation.clone(),
        commands: bench.commands.clone(),
        nginx_configs: nginx_configs(&bench.root)?,
    };
    let mut report = report::render(&info, &bench.rows, &bench.scripts);
    report.push_str(&bench.cluster_report);
    fs::write(bench.out.join("report.md"), &report)?;
    println!("\n{report}");
    say!(
        "done in {}s; raw outputs in {}",
        info.elapsed_s,
        bench.rel(&bench.out)
    );
    if bench.options.record {
        record::record(&bench.root.join(DOC), "bench.sh", &report)?;
        say!("recorded in {DOC}");
    }
    Ok(())
}

/// Every shipped Nginx config (`nginx/*.conf*`), by path.
fn nginx_configs(root: &Path) -> Result<Vec<(String, String)>> {
    let mut configs = Vec::new();
    for entry in fs::read_dir(root.join("nginx")).context("cannot list nginx/")? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.contains(".conf") {
            configs.push((format!("nginx/{name}"), fs::read_to_string(entry.path())?));
        }
    }
    configs.sort();
    Ok(configs)
}

fn port_open(port: u16) -> bool {
    let address = format!("{LOOPBACK}:{port}")
        .parse()
        .expect("a loopback address");
    std::net::TcpStream::connect_timeout(&address, Duration::from_millis(500)).is_ok()
}

/// Whether a binary knows a setting: its name is among the binary's strings.
fn binary_mentions(binary: &Path, needle: &[u8]) -> bool {
    fs::read(binary).is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
}

impl Bench {
    fn rel(&self, path: &Path) -> String {
        path.strip_prefix(&self.root)
            .unwrap_or(path)
            .display()
            .to_string()
    }

    fn running_phase(&mut self) -> Result<()> {
        self.find_processes()?;
        self.warm_up(&[
            (NGINX_PORT, LIMITED),
            (NGINX_PORT, ROOT_PATH),
            (APP_PORTS[0], LIMITED),
        ]);
        self.run_rounds(
            "running",
            &targets(Tool::Wrk, &[Via::Nginx, Via::Direct], &[16, 64]),
        )?;
        self.run_script_alone()
    }

    fn own_phases(&mut self) -> Result<()> {
        let allow = [
            ("RATE_LIMIT", "1000000000".to_owned()),
            ("TIME_WINDOW", "1".to_owned()),
            ("BURST", "1000000000".to_owned()),
        ];
        let with = |extra: (&'static str, &str)| {
            let mut vars = allow.to_vec();
            vars.push((extra.0, extra.1.to_owned()));
            vars
        };
        let both = [Via::Nginx, Via::Direct];
        let warm = [
            (NGINX_PORT, LIMITED),
            (NGINX_PORT, ROOT_PATH),
            (APP_PORTS[0], LIMITED),
        ];

        let phases = self.options.phases.clone();
        let wants = |name: &str| phases.has(name);
        if wants("allow") {
            self.cluster_phase(
                "allow",
                &allow,
                &targets(Tool::Wrk, &both, &[16, 64]),
                &warm,
            )?;
            self.run_script_alone()?;
            self.cluster_down();
        }

        if wants("two-limits") {
            // A policy of two limits, decided in one script call over one hash.
            let two_limits = self.out.join("two-limits.toml");
            fs::write(&two_limits, TWO_LIMITS)?;
            self.cluster_phase(
                "two-limits",
                &[("POLICY_FILE", two_limits.display().to_string())],
                &targets(Tool::Wrk, &both, &[64]),
                &warm,
            )?;
            self.cluster_down();
        }

        if wants("metrics-off") {
            // What /metrics costs: the allow phase again with every metric switched off.
            self.cluster_phase(
                "metrics-off",
                &with(("METRICS", "off")),
                &targets(Tool::Wrk, &both, &[64]),
                &warm,
            )?;
            self.cluster_down();
        }

        if wants("allow-pool") {
            if binary_mentions(&self.bin, b"REDIS_CLIENT") {
                self.cluster_phase(
                    "allow-pool",
                    &with(("REDIS_CLIENT", "pool")),
                    &targets(Tool::Wrk, &both, &[16, 64]),
                    &warm,
                )?;
                self.cluster_down();
            } else {
                say!(
                    "phase allow-pool skipped: this binary has no REDIS_CLIENT setting (one Redis client design only)"
                );
            }
        }

        if wants("memory-store") {
            self.memory_instance_up(&allow)?;
            let port = self.direct_port;
            self.warm_up(&[(port, LIMITED), (port, ROOT_PATH)]);
            self.run_rounds(
                "memory-store",
                &targets(Tool::Wrk, &[Via::Direct], &[16, 64]),
            )?;
            self.memory_instance_down();
        }

        if wants("mixed") {
            let mixed = self.options.mixed_rate.to_string();
            let mixed = [
                ("RATE_LIMIT", mixed.clone()),
                ("TIME_WINDOW", "1".to_owned()),
                ("BURST", mixed),
            ];
            self.cluster_phase(
                "mixed",
                &mixed,
                &targets(Tool::Loadtest, &both, &[16, 64]),
                &warm,
            )?;
            self.cluster_down();
        }

        let flood = [
            ("RATE_LIMIT", "10".to_owned()),
            ("TIME_WINDOW", "60".to_owned()),
        ];
        let flood_targets = targets(Tool::Wrk, &[Via::Nginx], &[64]);
        if wants("flood") {
            self.cluster_phase("flood", &flood, &flood_targets, &warm)?;
            self.cluster_down();
        }

        if wants("flood-nocache") {
            let mut nocache = flood.to_vec();
            nocache.push(("DENY_CACHE_SIZE", "0".to_owned()));
            self.cluster_phase("flood-nocache", &nocache, &flood_targets, &warm)?;
            self.cluster_down();
        }

        if wants("gateway") {
            self.gateway_phase()?;
        }

        if wants("cluster") {
            self.cluster_comparison()?;
        }
        Ok(())
    }

    /// Sentinel mode, then Cluster mode, under the same keyed policy and load; then how
    /// [`CLUSTER_KEYS`] keys spread their decisions over the three masters.
    fn cluster_comparison(&mut self) -> Result<()> {
        let policy = self.out.join("keyed.toml");
        fs::write(&policy, KEYED_POLICY)?;
        let vars = [("POLICY_FILE", policy.display().to_string())];
        let list: Vec<Target> = [Via::Nginx, Via::Direct]
            .into_iter()
            .map(|via| Target {
                tool: Tool::WrkKeys,
                via,
                path: LIMITED,
                connections: 64,
            })
            .collect();
        for (phase, flags) in [
            ("cluster-sentinel", &[][..]),
            ("cluster-redis", &["--redis-cluster"][..]),
        ] {
            self.cluster_up_with(phase, &vars, flags)?;
            self.find_processes()?;
            self.warm_up_keys(&[NGINX_PORT, APP_PORTS[0]]);
            self.run_rounds(phase, &list)?;
            if !self.masters.is_empty() {
                self.measure_spread(phase)?;
            }
            self.cluster_down();
        }
        self.cluster_report.insert_str(0, &self.side_by_side());
        Ok(())
    }

    /// Like [`warm_up`](Self::warm_up), with a key of its own in every request, so that
    /// every instance has connections to every master before the rounds.
    fn warm_up_keys(&self, ports: &[u16]) {
        say!("warming up (2 s per target, keyed, not recorded)");
        for port in ports {
            let _ = Command::new("wrk")
                .args([
                    "-t1",
                    "-c16",
                    "-d2s",
                    "-s",
                    KEYS_SCRIPT,
                    &format!("http://{LOOPBACK}:{port}{LIMITED}"),
                ])
                .current_dir(&self.root)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    /// One wrk run through Nginx long enough for at least [`CLUSTER_KEYS`] requests (from
    /// the rounds' rate), keys 0 to CLUSTER_KEYS - 1 in turn; each master's share of the
    /// script calls it caused (`INFO commandstats`).
    fn measure_spread(&mut self, phase: &str) -> Result<()> {
        let rates: Vec<f64> = self
            .rows
            .iter()
            .filter(|r| r.phase == phase && r.via == Via::Nginx)
            .map(|r| r.per_second)
            .collect();
        let rate = crate::stats::median(&rates).unwrap_or(1000.0).max(1.0);
        // A quarter more than the rounds' rate needs, and a second to connect.
        let seconds = ((CLUSTER_KEYS as f64 * 1.25 / rate).ceil() as u64 + 1).clamp(3, 60);
        let url = format!("http://{LOOPBACK}:{NGINX_PORT}{LIMITED}");
        let argv: Vec<String> = [
            "wrk",
            &format!("-t{}", self.options.threads),
            "-c64",
            &format!("-d{seconds}s"),
            "-s",
            KEYS_SCRIPT,
            &url,
            "--",
            &CLUSTER_KEYS.to_string(),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        self.note_command(&argv.join(" "));
        let calls = |masters: &[Node]| -> Result<Vec<u64>> {
            masters
                .iter()
                .map(|m| Ok(m.command_stats()?.script_counters().script_calls))
                .collect()
        };
        let before = calls(&self.masters)?;
        let out = self.out.join(format!("{phase}-spread.txt"));
        say!(
            "phase {phase}: the spread of {CLUSTER_KEYS} keys over the masters ({seconds} s through Nginx)"
        );
        let (status, _) = spawn::run_counted(
            &self.records,
            "wrk",
            Command::new(&argv[0])
                .args(&argv[1..])
                .current_dir(&self.root),
            &out,
        )?;
        let after = calls(&self.masters)?;
        if !status.success() {
            bail!("wrk failed ({status}): {}", tail(&out, 5));
        }
        let report = WrkReport::from_output(&fs::read_to_string(&out)?)
            .with_context(|| format!("in {}", self.rel(&out)))?;
        let deltas: Vec<u64> = before
            .iter()
            .zip(&after)
            .map(|(b, a)| a.saturating_sub(*b))
            .collect();
        let total: u64 = deltas.iter().sum();
        let keys = report.requests.min(CLUSTER_KEYS);
        let mut text = format!(
            "\n### Cluster mode: {keys} keys over {} masters\n\n`{}`: {} requests through Nginx in {:.1} s, so keys 0 to {} each decided at least once; \
             the script calls (EVALSHA + EVAL, `INFO commandstats` deltas) each master ran meanwhile. \
             Goal: each share within ±10 % of a third (30.0 % to 36.7 %).\n\n\
             | master | script calls | share | within ±10 % of ⅓ |\n|---|---|---|---|\n",
            self.masters.len(),
            argv.join(" "),
            report.requests,
            report.seconds(),
            keys.saturating_sub(1),
        );
        let mut all_within = true;
        for (master, calls) in self.masters.iter().zip(&deltas) {
            let share = if total > 0 {
                *calls as f64 / total as f64
            } else {
                0.0
            };
            let within = (share - 1.0 / 3.0).abs() <= 0.1 / 3.0;
            all_within &= within;
            text.push_str(&format!(
                "| {LOOPBACK}:{} | {calls} | {:.2} % | {} |\n",
                master.port,
                100.0 * share,
                if within { "yes" } else { "**no**" }
            ));
            say!(
                "  master {}: {calls} script calls, {:.2} % of {total}",
                master.port,
                100.0 * share
            );
        }
        text.push_str(&format!(
            "\nEvery share within ±10 % of a third: {}.\n",
            if all_within && total > 0 {
                "yes"
            } else {
                "**no**"
            }
        ));
        self.cluster_report.push_str(&text);
        Ok(())
    }

    /// Sentinel and Cluster mode beside each other: medians of the CPU per decision
    /// (through Nginx and directly, 64 connections) of each process group.
    fn side_by_side(&self) -> String {
        let mut text = String::from(
            "\n### Sentinel and Cluster mode, side by side\n\n\
             The same keyed policy (`/limited_endpoint`, 10^9 per 1 s per X-Bench-Key, every request admitted) and load \
             (wrk -c64 with scripts/bench/keys.lua: a new key every request). Medians over the rounds; CPU in µs per decision. \
             \"Redis masters\" is the one master in Sentinel mode and all three together in Cluster mode.\n\n\
             | mode | via | req/s | p99 ms | app µs | Nginx µs | Redis masters µs | replicas µs | sentinels µs | script calls/req | Redis µs/call |\n\
             |---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for (phase, mode) in [
            ("cluster-sentinel", "Sentinel"),
            ("cluster-redis", "Cluster"),
        ] {
            for via in [Via::Nginx, Via::Direct] {
                let rows: Vec<&Row> = self
                    .rows
                    .iter()
                    .filter(|r| r.phase == phase && r.via == via)
                    .collect();
                if rows.is_empty() {
                    continue;
                }
                let median = |field: fn(&Row) -> f64| {
                    crate::stats::median(&rows.iter().map(|r| field(r)).collect::<Vec<_>>())
                        .unwrap_or(0.0)
                };
                text.push_str(&format!(
                    "| {mode} | {via} | {:.0} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.3} | {:.2} |\n",
                    median(|r| r.per_second),
                    median(|r| r.p99_ms),
                    median(|r| r.cpu.app),
                    median(|r| r.cpu.nginx),
                    median(|r| r.cpu.master),
                    median(|r| r.cpu.replicas),
                    median(|r| r.cpu.sentinels),
                    median(|r| r.script_calls_per_request),
                    median(|r| r.usec_per_script_call),
                ));
            }
        }
        text
    }

    /// The gateway (8080: auth_request to an instance's /v1/check, then the demo upstream)
    /// beside the bench's own Nginx proxying straight to the same upstream.
    fn gateway_phase(&mut self) -> Result<()> {
        let policy = self.out.join("gateway.toml");
        fs::write(&policy, GATEWAY_POLICY)?;
        self.cluster_up_with(
            "gateway",
            &[("POLICY_FILE", policy.display().to_string())],
            &["--gateway"],
        )?;
        self.proxy_up()?;
        self.find_processes()?;
        for (port, what) in [
            (GATEWAY_PORT, "the gateway"),
            (self.proxy_port, "the bench's Nginx"),
        ] {
            let before = self.upstream_count(GATEWAY_PATH)?;
            let response = http::get(port, GATEWAY_PATH, Duration::from_secs(5))?;
            let after = self.upstream_count(GATEWAY_PATH)?;
            if response.status != 200 || after != before + 1 {
                bail!(
                    "GET {GATEWAY_PATH} through {what} (port {port}) answered {} and the demo upstream counted {} of it (want 200 and 1)",
                    response.status,
                    after.saturating_sub(before)
                );
            }
        }
        self.warm_up(&[
            (GATEWAY_PORT, GATEWAY_PATH),
            (self.proxy_port, GATEWAY_PATH),
        ]);
        self.run_rounds("gateway", &gateway_targets())?;
        self.proxy_down();
        self.cluster_down();
        Ok(())
    }

    // --- the bench's own Nginx, straight to the demo upstream -----------------------

    fn proxy_dir(&self) -> PathBuf {
        self.out.join("proxy-nginx")
    }

    fn proxy_up(&mut self) -> Result<()> {
        let port = PROXY_PORTS
            .clone()
            .find(|&port| !port_open(port))
            .with_context(|| {
                format!(
                    "no free port in {}-{} for the bench's Nginx",
                    PROXY_PORTS.start(),
                    PROXY_PORTS.end()
                )
            })?;
        let dir = self.proxy_dir();
        fs::create_dir_all(dir.join("logs"))?;
        fs::create_dir_all(dir.join("temp"))?;
        let config = dir.join("nginx.conf");
        fs::write(&config, proxy_config(&dir, port))?;
        let error_log = dir.join("logs/error.log");
        let args = [
            "-e".to_owned(),
            error_log.display().to_string(),
            "-p".to_owned(),
            format!("{}/", dir.display()),
            "-c".to_owned(),
            config.display().to_string(),
        ];
        self.note_command(&format!("nginx {} &", args.join(" ")));
        let log = dir.join("nginx.log");
        let mut proxy = Started::spawn(
            &self.records,
            "proxy-nginx",
            Command::new("nginx").args(&args),
            &log,
        )?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !port_open(port) {
            if !proxy.running() {
                bail!(
                    "the bench's Nginx exited: {} {}",
                    tail(&log, 5),
                    tail(&error_log, 5)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "the bench's Nginx does not listen on {port} after 10 s; see {}",
                    self.rel(&error_log)
                );
            }
            sleep(Duration::from_millis(100));
        }
        say!(
            "phase gateway: the bench's Nginx (pid {}) on {port} proxies straight to {LOOPBACK}:{UPSTREAM_PORT} ({})",
            proxy.pid(),
            self.rel(&config)
        );
        self.proxy_port = port;
        self.proxy = Some(proxy);
        Ok(())
    }

    fn proxy_down(&mut self) {
        if let Some(mut proxy) = self.proxy.take() {
            proxy.stop(Duration::from_secs(10));
        }
    }

    /// What the demo upstream counted for `path` so far.
    fn upstream_count(&self, path: &str) -> Result<u64> {
        let response = http::get(
            UPSTREAM_COUNT_PORT,
            "/__upstream/count",
            Duration::from_secs(5),
        )?;
        let counts: serde_json::Value = serde_json::from_str(&response.body)
            .context("the demo upstream's counts are not JSON")?;
        Ok(counts["paths"][path].as_u64().unwrap_or(0))
    }

    fn cluster_phase(
        &mut self,
        phase: &str,
        vars: &[(&str, String)],
        list: &[Target],
        warm: &[(u16, &str)],
    ) -> Result<()> {
        self.cluster_up_with(phase, vars, &[])?;
        self.find_processes()?;
        self.warm_up(warm);
        self.run_rounds(phase, list)
    }

    // --- commands -------------------------------------------------------------------

    /// Remembers a command for the report (once) and shows it.
    fn note_command(&mut self, text: &str) {
        let mut text = text.replace(&format!("{}/", self.root.display()), "");
        if self.memory_instance.is_some() {
            text = text.replace(
                &format!("http://{LOOPBACK}:{}", self.direct_port),
                &format!("http://{LOOPBACK}:PORT"),
            );
        }
        if self.seen_commands.insert(text.clone()) {
            say!("+ {text}");
            self.commands.push(text);
        }
    }

    // --- the cluster ----------------------------------------------------------------

    /// `scripts/cluster.sh up` with `flags` (`--gateway`: also the demo upstream behind the
    /// gateway; `--redis-cluster`: a Redis Cluster instead of Sentinel).
    fn cluster_up_with(
        &mut self,
        phase: &str,
        vars: &[(&str, String)],
        flags: &[&str],
    ) -> Result<()> {
        let log = self.out.join(format!("cluster-{phase}.log"));
        let assignments: Vec<String> = vars.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let flag: String = flags.iter().map(|f| format!(" {f}")).collect();
        self.note_command(&format!(
            "{} CLUSTER_DIR={} scripts/cluster.sh up{flag}",
            assignments.join(" "),
            self.rel(&self.cluster_dir)
        ));
        say!(
            "phase {phase}: starting the cluster (log: {})",
            self.rel(&log)
        );
        self.cluster_up = true;
        let mut command = self.cluster_command("up");
        command.args(flags);
        for var in PHASE_VARS {
            command.env_remove(var);
        }
        command.envs(vars.iter().map(|(k, v)| (*k, v.as_str())));
        let file = File::create(&log)?;
        let status = command
            .stdout(file.try_clone()?)
            .stderr(file)
            .status()
            .context("cannot run scripts/cluster.sh")?;
        if !status.success() {
            eprintln!("{}", tail(&log, 20));
            bail!(
                "scripts/cluster.sh up failed (phase {phase}); see {}",
                self.rel(&log)
            );
        }
        let last = tail(&log, 1);
        say!(
            "phase {phase}: {}",
            last.strip_prefix("cluster: ").unwrap_or(&last)
        );
        Ok(())
    }

    fn cluster_command(&self, verb: &str) -> Command {
        let mut command = Command::new(self.root.join("scripts/cluster.sh"));
        command
            .arg(verb)
            .env("CLUSTER_DIR", &self.cluster_dir)
            .env("RATELIMITER_BIN", &self.bin)
            .env("REDIS_ADMIN_PASSWORD", &self.password)
            .stdin(Stdio::null());
        command
    }

    fn cluster_down(&mut self) {
        if !(self.own_cluster && self.cluster_up) {
            return;
        }
        self.note_command(&format!(
            "CLUSTER_DIR={} scripts/cluster.sh down",
            self.rel(&self.cluster_dir)
        ));
        let log = self.out.join("cluster-down.log");
        let ok = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|file| {
                let mut command = self.cluster_command("down");
                command.stdout(file.try_clone()?).stderr(file).status()
            })
            .is_ok_and(|status| status.success());
        if !ok {
            warn!("scripts/cluster.sh down failed; see {}", self.rel(&log));
        }
        self.cluster_up = false;
    }

    fn find_processes(&mut self) -> Result<()> {
        let pids = self.cluster_dir.join("pids");
        let mut groups = Groups {
            app: recorded_pids(&pids, |name| name.starts_with("app-")),
            sentinels: recorded_pids(&pids, |name| name.starts_with("sentinel-")),
            upstream: recorded_pids(&pids, |name| name == "demo-upstream"),
            ..Groups::default()
        };
        if let Some(proxy) = &self.proxy {
            groups.proxy.push(proxy.pid());
            groups.proxy.extend(procfs::children_of(proxy.pid()));
        }
        let nginx_master = recorded_pids(&pids, |name| name == "nginx");
        for &master in &nginx_master {
            groups.nginx.push(master);
            groups.nginx.extend(procfs::children_of(master));
        }
        self.master = None;
        self.masters.clear();
        let redis_cluster = !recorded_pids(&pids, |n| n.starts_with("redis-cluster-")).is_empty();
        let (ports, prefix): (&[u16], &str) = if redis_cluster {
            (&CLUSTER_PORTS, "redis-cluster-")
        } else {
            (&DATA_PORTS, "redis-")
        };
        for &port in ports {
            let node = Node::new(port, Some(&self.password));
            let name = format!("{prefix}{port}");
            let node_pids = recorded_pids(&pids, |n| n == name);
            if node.role().is_ok_and(|role| role == "master") {
                groups.master.extend(node_pids);
                if redis_cluster {
                    self.masters.push(node);
                } else {
                    self.master = Some(node);
                }
            } else {
                groups.replicas.extend(node_pids);
            }
        }
        let masters_expected = if redis_cluster { 3 } else { 1 };
        if groups.app.len() != 2
            || groups.nginx.len() < 2
            || groups.master.len() != masters_expected
        {
            bail!(
                "cannot find the cluster's processes in {} (instances: {}, nginx: {}, master: {})",
                self.rel(&pids),
                groups.app.len(),
                groups.nginx.len(),
                groups.master.len()
            );
        }
        let list = |pids: &[u32]| {
            pids.iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        };
        let master_ports: Vec<String> = self
            .master
            .iter()
            .chain(&self.masters)
            .map(|node| format!(":{}", node.port))
            .collect();
        say!(
            "processes: instances {}; nginx {}; master(s) {} {}; replicas {}; sentinels {}",
            list(&groups.app),
            list(&groups.nginx),
            master_ports.join(","),
            list(&groups.master),
            list(&groups.replicas),
            list(&groups.sentinels)
        );
        if !groups.upstream.is_empty() || !groups.proxy.is_empty() {
            say!(
                "processes: demo upstream {}; the bench's nginx {}",
                list(&groups.upstream),
                list(&groups.proxy)
            );
        }
        self.groups = groups;
        Ok(())
    }

    // --- the embedded-store instance ------------------------------------------------

    /// One instance with the embedded store (no Redis: the decision runs inline, on the
    /// event loop), on a free port: what a decision costs without the Redis round trip.
    fn memory_instance_up(&mut self, vars: &[(&str, String)]) -> Result<()> {
        let log = self.out.join("memory-instance.log");
        let assignments: Vec<String> = vars.iter().map(|(k, v)| format!("{k}={v}")).collect();
        self.note_command(&format!(
            "env -i HOST={LOOPBACK} PORT=0 INSTANCE_NAME=bench-memory {} {} &",
            assignments.join(" "),
            self.bin.display()
        ));
        let mut command = Command::new(&self.bin);
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("HOST", LOOPBACK)
            .env("PORT", "0")
            .env("INSTANCE_NAME", "bench-memory")
            .envs(vars.iter().map(|(k, v)| (*k, v.as_str())));
        let mut instance = Started::spawn(&self.records, "bench-memory", &mut command, &log)?;
        let port = wait_for_instance(&mut instance, &log, Duration::from_secs(15))
            .with_context(|| format!("the embedded-store instance; see {}", self.rel(&log)))?;
        say!(
            "phase memory-store: one instance with the embedded store (pid {}) on port {port}",
            instance.pid()
        );
        self.groups = Groups {
            app: vec![instance.pid()],
            ..Groups::default()
        };
        self.master = None;
        self.masters.clear();
        self.direct_port = port;
        self.memory_instance = Some(instance);
        Ok(())
    }

    fn memory_instance_down(&mut self) {
        if let Some(mut instance) = self.memory_instance.take() {
            instance.stop(Duration::from_secs(10));
        }
        self.direct_port = APP_PORTS[0];
    }

    // --- measurements ---------------------------------------------------------------

    /// Short unrecorded runs, so that pools, connections and caches are warm.
    fn warm_up(&self, urls: &[(u16, &str)]) {
        say!("warming up (2 s per target, not recorded)");
        for (port, path) in urls {
            let _ = Command::new("wrk")
                .args([
                    "-t1",
                    "-c16",
                    "-d2s",
                    &format!("http://{LOOPBACK}:{port}{path}"),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    /// Every round measures each target, in order on odd rounds and in reverse on even
    /// ones, so that drift hits pairs of figures alike.
    fn run_rounds(&mut self, phase: &str, list: &[Target]) -> Result<()> {
        for round in 1..=self.options.rounds {
            say!("phase {phase}, round {round} of {}", self.options.rounds);
            let ordered: Vec<&Target> = if round % 2 == 1 {
                list.iter().collect()
            } else {
                list.iter().rev().collect()
            };
            for target in ordered {
                self.measure(phase, round, target)?;
            }
        }
        Ok(())
    }

    /// Waits, at most --quiet-wait seconds, until the machine (the idle topology included)
    /// is at most --quiet-max % busy over half a second.
    fn wait_quiet(&self) -> Result<()> {
        if self.options.quiet_wait == 0 {
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs(self.options.quiet_wait.into());
        loop {
            let a = MachineTicks::read()?;
            sleep(Duration::from_millis(500));
            let busy = a.busy_percent_until(&MachineTicks::read()?).trunc();
            if busy <= f64::from(self.options.quiet_max) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                say!(
                    "  the machine is still {busy}% busy after waiting {}s; measuring anyway",
                    self.options.quiet_wait
                );
                return Ok(());
            }
            sleep(Duration::from_secs(1));
        }
    }

    /// One row. A measurement during which other processes used more than --quiet-max %
    /// of the machine is taken again (at most RETAKES times); the quietest one is kept.
    fn measure(&mut self, phase: &str, round: u32, target: &Target) -> Result<()> {
        let mut best: Option<Row> = None;
        for attempt in 0..=RETAKES {
            self.wait_quiet()?;
            let row = self.measure_once(phase, round, target)?;
            let others = row.others_percent;
            if best.as_ref().is_none_or(|b| others < b.others_percent) {
                best = Some(row);
            }
            if others <= f64::from(self.options.quiet_max) {
                break;
            }
            if attempt < RETAKES {
                self.retaken += 1;
                say!("  other processes used {others}% of the machine meanwhile; measuring again");
            } else {
                self.still_busy += 1;
            }
        }
        let row = best.expect("at least one attempt");
        let mut line = serde_json::to_string(&row)?;
        line.push('\n');
        append(&self.out.join("results.jsonl"), &line)?;
        self.rows.push(row);
        Ok(())
    }

    fn snapshot_before(&self) -> Snapshot {
        Snapshot {
            redis: self.redis_counters(),
            app: self.groups.app_detail(),
            machine: MachineTicks::read().unwrap_or_default(),
            groups: self.groups.ticks(),
        }
    }

    fn snapshot_after(&self) -> Snapshot {
        let groups = self.groups.ticks();
        let app = self.groups.app_detail();
        let machine = MachineTicks::read().unwrap_or_default();
        Snapshot {
            groups,
            app,
            machine,
            redis: self.redis_counters(),
        }
    }

    fn redis_counters(&self) -> ScriptCounters {
        self.master
            .iter()
            .chain(&self.masters)
            .filter_map(|node| node.command_stats().ok())
            .fold(ScriptCounters::default(), |sum, stats| {
                sum.plus(&stats.script_counters())
            })
    }

    /// The access log of the Nginx a way in goes through (the cluster's serves 8000 and
    /// the gateway).
    fn access_log(&self, via: Via) -> PathBuf {
        match via {
            Via::Proxy => self.proxy_dir().join("logs/access.log"),
            _ => self.cluster_dir.join("nginx/logs/access.log"),
        }
    }

    /// What instance 8001 (or the embedded-store one) counted for `path`.
    fn app_counts(&self, path: &str) -> StatusCounts {
        http::get(self.direct_port, "/metrics", Duration::from_secs(5))
            .map(|response| prom::requests_by_status(&response.body, path))
            .unwrap_or_default()
    }

    fn measure_once(&mut self, phase: &str, round: u32, target: &Target) -> Result<Row> {
        let port = match target.via {
            Via::Nginx => NGINX_PORT,
            Via::Direct => self.direct_port,
            Via::Gateway => GATEWAY_PORT,
            Via::Proxy => self.proxy_port,
        };
        let url = format!("http://{LOOPBACK}:{port}{}", target.path);
        let name = format!(
            "{phase}-r{round}-{}-{}-{}-c{}",
            target.tool,
            target.via,
            target.path.replace('/', "_"),
            target.connections
        );
        let out = self.out.join(format!("{name}.txt"));
        let json = self.out.join(format!("{name}.json"));
        let duration = format!("{}s", self.options.duration);
        let mut argv: Vec<String> = match target.tool {
            Tool::WrkKeys => vec![
                "wrk".into(),
                format!("-t{}", self.options.threads),
                format!("-c{}", target.connections),
                format!("-d{duration}"),
                "--latency".into(),
                "-s".into(),
                KEYS_SCRIPT.into(),
                url,
                "--".into(),
                CLUSTER_KEYS.to_string(),
            ],
            Tool::Wrk => vec![
                "wrk".into(),
                format!("-t{}", self.options.threads),
                format!("-c{}", target.connections),
                format!("-d{duration}"),
                "--latency".into(),
                "-s".into(),
                LUA_REPORT.into(),
                url,
            ],
            Tool::Loadtest => vec![
                self.loadtest.display().to_string(),
                "--url".into(),
                url,
                "--connections".into(),
                target.connections.to_string(),
                "--duration".into(),
                duration,
                "--sources".into(),
                MIXED_SOURCES.into(),
                "--max-requests".into(),
                "100000000".into(),
                "--json".into(),
            ],
        };
        if target.tool == Tool::Loadtest {
            self.note_command(&format!("{} run/bench/NAME.json", argv.join(" ")));
            argv.push(json.display().to_string());
        } else {
            self.note_command(&argv.join(" "));
        }

        let access_log = self.access_log(target.via);
        let log_offset = fs::metadata(&access_log).map_or(0, |m| m.len());
        let counts_before = (target.via == Via::Direct).then(|| self.app_counts(target.path));
        let upstream_counted = matches!(target.via, Via::Gateway | Via::Proxy);
        let upstream_before = if upstream_counted {
            self.upstream_count(target.path)?
        } else {
            0
        };
        let before = self.snapshot_before();
        let (status, load_generator_ticks) = spawn::run_counted(
            &self.records,
            &target.tool.to_string(),
            Command::new(&argv[0])
                .args(&argv[1..])
                .current_dir(&self.root),
            &out,
        )?;
        let after = self.snapshot_after();
        let upstream = if upstream_counted {
            self.upstream_count(target.path)?
                .saturating_sub(upstream_before)
        } else {
            0
        };
        if !status.success() {
            eprintln!("{}", tail(&out, 5));
            bail!("the load generator failed ({status}): {}", argv.join(" "));
        }

        let mut closed = 0;
        let traffic = match target.tool {
            Tool::Wrk | Tool::WrkKeys => {
                let output = fs::read_to_string(&out)?;
                let report = WrkReport::from_output(&output)
                    .with_context(|| format!("in {}", self.rel(&out)))?;
                let (ok, denied, other) = if target.via != Via::Direct {
                    let counts = self.access_log_counts(&access_log, log_offset)?;
                    closed = counts.closed;
                    (counts.ok, counts.denied, counts.other)
                } else {
                    let delta = counts_before
                        .unwrap_or_default()
                        .delta_until(&self.app_counts(target.path));
                    if delta.total() == 0 {
                        // METRICS=off: the instance counted nothing, so wrk's own count
                        // stands in (no 429 is expected there; any status >= 400 is "other").
                        (
                            report.requests.saturating_sub(report.errors.status),
                            0,
                            report.errors.status,
                        )
                    } else {
                        (delta.ok, delta.denied, delta.other)
                    }
                };
                Traffic {
                    requests: report.requests,
                    seconds: report.seconds(),
                    p50_ms: report.latency_us.p50 / 1e3,
                    p99_ms: report.latency_us.p99 / 1e3,
                    max_ms: report.latency_us.max / 1e3,
                    ok,
                    denied,
                    other: other + report.errors.socket(),
                    upstream,
                }
            }
            Tool::Loadtest => {
                let summary = LoadtestSummary::parse(
                    &fs::read_to_string(&json)
                        .with_context(|| format!("cannot read {}", self.rel(&json)))?,
                )
                .with_context(|| format!("in {}", self.rel(&json)))?;
                let latency = summary.latency_ms.unwrap_or(crate::loadgen::Latency {
                    p50: 0.0,
                    p99: 0.0,
                    max: 0.0,
                });
                Traffic {
                    requests: summary.requests.answered,
                    seconds: summary.elapsed_s,
                    p50_ms: latency.p50,
                    p99_ms: latency.p99,
                    max_ms: latency.max,
                    ok: summary.classes.admitted,
                    denied: summary.classes.rejected,
                    other: summary.not_decided(),
                    upstream: 0,
                }
            }
        };
        let label = Label {
            phase,
            round,
            target,
        };
        let row = Row::compute(
            &label,
            &traffic,
            &before,
            &after,
            load_generator_ticks,
            self.hz,
        );
        say!("  {}", row.progress_line());
        if upstream_counted {
            let what = format!("through {} (port {port})", target.via);
            match check_admitted(row.ok, row.denied, row.other, closed, row.upstream) {
                Ok(None) => {}
                Ok(Some(odd)) => warn!("  {what}: {odd}"),
                Err(wrong) => bail!("{what}: {wrong}"),
            }
        }
        if closed > 0 {
            // A 499 is Nginx logging a request that the load generator abandoned when its
            // time was up.
            say!(
                "  ({closed} requests abandoned by the load generator at its end: Nginx logged 499)"
            );
        }
        Ok(row)
    }

    /// Statuses of the access log's lines after byte `offset`.
    fn access_log_counts(&self, log: &Path, offset: u64) -> Result<AccessCounts> {
        let mut counts = AccessCounts::default();
        let Ok(mut file) = File::open(log) else {
            return Ok(counts);
        };
        file.seek(SeekFrom::Start(offset))?;
        for line in BufReader::new(file).lines() {
            counts.add_line(&line?);
        }
        Ok(counts)
    }

    // --- the Lua script alone -------------------------------------------------------

    fn run_script_alone(&mut self) -> Result<()> {
        let master = self.master.clone().context("no Redis master found")?;
        let lua = fs::read_to_string(self.root.join("src/bucket/token_bucket.lua"))?;
        let sha = master.script_load(&lua)?;
        let expected = sha1_smol::Sha1::from(&lua).digest().to_string();
        if sha != expected {
            bail!("SCRIPT LOAD answered '{sha}', not the SHA-1 of src/bucket/token_bucket.lua");
        }
        // A script that only returns what the real one returns: the floor of any EVALSHA
        // with these arguments on this machine (argument tables, the call, the reply).
        let floor = master.script_load("return {1, 0}")?;
        let reference = master.script_load(&fs::read_to_string(
            self.root.join("scripts/bench/reference_token_bucket.lua"),
        )?)?;
        let replication = master.info("replication").unwrap_or_default();
        say!(
            "redis-benchmark: src/bucket/token_bucket.lua is {sha}; replicas attached: {}",
            info_field(&replication, "connected_slaves").unwrap_or("?")
        );
        let random = format!("{BENCH_KEY_PREFIX}:__rand_int__");
        // The shipped policy, 10 per 60 s, in the script's units (src/bucket/limit.rs): a
        // token is TIME_WINDOW × 10^6 / g units and the refill RATE_LIMIT / g units per µs,
        // g = gcd(RATE_LIMIT, TIME_WINDOW × 10^6) = 10; capacity = BURST tokens. ARGV: now
        // ('' = Redis's clock), then per key (one policy's hash) its number of limits and
        // per limit its two fields, capacity, refill, cost and group. Random keys of a
        // burst of 10 are admitted (two calls per key on average).
        const SHIPPED: [&str; 6] = ["m:tokens", "m:ts", "60000000", "1", "6000000", "0"];
        // 15 per hour, the second limit of a two-limit policy: g = 15.
        const HOURLY: [&str; 6] = ["h:tokens", "h:ts", "3600000000", "1", "240000000", "0"];
        let one = ["", "1"];
        let two = ["", "2"];
        let one_limit: Vec<&str> = one.iter().chain(&SHIPPED).copied().collect();
        let two_limits: Vec<&str> = two.iter().chain(&SHIPPED).chain(&HOURLY).copied().collect();
        self.script_alone(&master, "allow-heavy", &sha, &[&random], &one_limit)?;
        let random_two = format!("{BENCH_KEY_PREFIX}:two:__rand_int__");
        self.script_alone(
            &master,
            "allow-heavy, two limits",
            &sha,
            &[&random_two],
            &two_limits,
        )?;
        // One client coming back again and again under the allow policy of the HTTP phases
        // (10^9 per 1 s): after its first call its key is extended, so a call writes only
        // the hash.
        // 10^9 per second: g = 10^6, one unit a token, 1,000 units per µs.
        const SECOND: [&str; 6] = ["s:tokens", "s:ts", "1000000000", "1000", "1", "0"];
        const ALSO: [&str; 6] = ["a:tokens", "a:ts", "1000000000", "1000", "1", "0"];
        let returning = format!("{BENCH_KEY_PREFIX}:returning");
        let returning_too = format!("{BENCH_KEY_PREFIX}:returning:two");
        let allow_one: Vec<&str> = one.iter().chain(&SECOND).copied().collect();
        let allow_two: Vec<&str> = two.iter().chain(&SECOND).chain(&ALSO).copied().collect();
        self.script_alone(&master, "returning", &sha, &[&returning], &allow_one)?;
        self.script_alone(
            &master,
            "returning, two limits",
            &sha,
            &[&returning_too],
            &allow_two,
        )?;
        // One key with a burst of 1 and a refill of one token per 60 s: denied after its
        // first call.
        let denied = format!("{BENCH_KEY_PREFIX}:denied");
        self.script_alone(
            &master,
            "deny-heavy",
            &sha,
            &[&denied],
            &[
                "", "1", "d:tokens", "d:ts", "60000000", "1", "60000000", "0",
            ],
        )?;
        self.script_alone(
            &master,
            "floor (return {1, 0})",
            &floor,
            &[&random],
            &one_limit,
        )?;
        // The same random keys and policy (10 tokens, 10 per 60 s) for the reference script.
        self.script_alone(
            &master,
            "reference",
            &reference,
            &[&format!("{BENCH_KEY_PREFIX}:ref:__rand_int__")],
            &["10", "0.16666667", "1790000000"],
        )?;
        master.del(&[&denied, &returning, &returning_too])?;
        Ok(())
    }

    fn script_alone(
        &mut self,
        master: &Node,
        name: &str,
        sha: &str,
        keys: &[&str],
        args: &[&str],
    ) -> Result<()> {
        let port = master.port.to_string();
        let argv = |password: &str| -> Vec<String> {
            let mut argv: Vec<String> = [
                "redis-benchmark",
                "-h",
                LOOPBACK,
                "-p",
                &port,
                "-a",
                password,
                "-n",
                "200000",
                "-r",
                "100000",
                "--csv",
                "EVALSHA",
                sha,
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
            argv.push(keys.len().to_string());
            argv.extend(keys.iter().map(|s| (*s).to_owned()));
            argv.extend(args.iter().map(|s| (*s).to_owned()));
            argv
        };
        self.note_command(&argv("PASSWORD").join(" "));
        let argv = argv(&self.password);
        let out = self.out.join(format!("redis-benchmark-{name}.txt"));
        let before = master.command_stats()?;
        let t0 = ticks_of(&self.groups.master);
        let (status, client_ticks) = spawn::run_counted(
            &self.records,
            "redis-benchmark",
            Command::new(&argv[0]).args(&argv[1..]),
            &out,
        )?;
        let t1 = ticks_of(&self.groups.master);
        let after = master.command_stats()?;
        if !status.success() {
            bail!("redis-benchmark failed: {}", tail(&out, 3));
        }
        let calls_per_second = script::benchmark_rps(&fs::read_to_string(&out)?)
            .with_context(|| format!("in {}", self.rel(&out)))?;
        let row = ScriptRow::compute(
            &ScriptRun {
                name,
                before: &before,
                after: &after,
                master_ticks: t1.saturating_sub(t0),
                client_ticks,
                calls_per_second,
            },
            self.hz,
        );
        say!("  {}", row.progress_line());
        let mut line = serde_json::to_string(&row)?;
        line.push('\n');
        append(&self.out.join("scripts.jsonl"), &line)?;
        self.scripts.push(row);
        Ok(())
    }
}

/// Waits until an instance started with PORT=0 says its port and answers /ready.
pub fn wait_for_instance(instance: &mut Started, log: &Path, within: Duration) -> Result<u16> {
    let deadline = Instant::now() + within;
    loop {
        if !instance.running() {
            bail!("it exited: {}", tail(log, 5));
        }
        if let Some(port) = listening_port(&fs::read_to_string(log).unwrap_or_default())
            && http::ready(port)
        {
            return Ok(port);
        }
        if Instant::now() >= deadline {
            bail!("it is not ready after {} s", within.as_secs());
        }
        sleep(Duration::from_millis(200));
    }
}

/// The port of the instance's "listening on port N" log line.
pub fn listening_port(log: &str) -> Option<u16> {
    log.lines().find_map(|line| {
        let rest = &line[line.find("listening on port ")? + "listening on port ".len()..];
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    })
}

fn append(path: &Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_log_lines_are_counted_by_status() {
        let mut counts = AccessCounts::default();
        for line in [
            r#"127.0.0.1 - - [27/Nov/2026:11:49:00 +0000] "GET /limited_endpoint HTTP/1.1" 200 361 "-" "-""#,
            r#"127.0.0.1 - - [27/Nov/2026:11:49:00 +0000] "GET /limited_endpoint HTTP/1.1" 429 245 "-" "-""#,
            r#"127.0.0.1 - - [27/Nov/2026:11:49:00 +0000] "GET / HTTP/1.1" 499 0 "-" "-""#,
            r#"127.0.0.1 - - [27/Nov/2026:11:49:00 +0000] "GET / HTTP/1.1" 502 157 "-" "-""#,
        ] {
            counts.add_line(line);
        }
        assert_eq!(
            counts,
            AccessCounts {
                ok: 1,
                denied: 1,
                other: 1,
                closed: 1
            }
        );
    }

    #[test]
    fn the_port_is_read_from_the_instances_log() {
        let log = "[2026-11-27T11:49:00Z INFO  ratelimiter] starting: ...\n\
                   [2026-11-27T11:49:00Z INFO  ratelimiter] listening on port 41234\n";
        assert_eq!(listening_port(log), Some(41234));
        assert_eq!(listening_port("starting\n"), None);
    }

    #[test]
    fn phases_are_chosen_by_name_and_run_in_the_usual_order() {
        let all = parse_phases("all").unwrap();
        assert!(all.is_all());
        assert_eq!(all.names(), PHASES.join(","));
        let some = parse_phases("gateway, allow,two-limits,allow").unwrap();
        assert_eq!(some.names(), "allow,two-limits,gateway");
        assert!(!some.is_all());
        assert!(some.has("gateway") && !some.has("mixed"));
        assert_eq!(
            parse_phases(&PHASES.join(",")).unwrap(),
            all,
            "naming every phase is all of them"
        );
    }

    #[test]
    fn unknown_or_no_phases_are_refused() {
        let error = parse_phases("allow,gatway").unwrap_err();
        assert!(
            error.starts_with("no phase 'gatway'; the phases: allow,"),
            "{error}"
        );
        assert!(parse_phases("").is_err());
        assert!(parse_phases(" , ").is_err());
        assert!(parse_phases("all,allow").is_err(), "all stands alone");
    }

    #[test]
    fn the_gateway_phase_compares_the_gateway_with_nginx_straight_to_the_upstream() {
        let list = gateway_targets();
        assert_eq!(list.len(), 2);
        assert_eq!(
            (list[0].via, list[0].path, list[0].connections),
            (Via::Gateway, "/api/items", 64)
        );
        assert_eq!(
            (list[1].via, list[1].path, list[1].connections),
            (Via::Proxy, "/api/items", 64)
        );
    }

    #[test]
    fn the_benchs_nginx_has_the_gateways_keepalive_settings() {
        let config = proxy_config(Path::new("/tmp/x"), 8090);
        assert_eq!(
            report::keepalive_line("proxy", &config),
            "- `proxy`: `keepalive 64;` (met)"
        );
        assert!(config.contains("listen 127.0.0.1:8090;"), "{config}");
        assert!(config.contains("server 127.0.0.1:8081;"), "{config}");
        assert!(config.contains("pid /tmp/x/nginx.pid;"), "{config}");
        assert!(config.contains("daemon off;"), "{config}");
        assert!(!config.contains("auth_request"), "{config}");
    }

    #[test]
    fn gateway_answers_must_be_admitted_and_counted() {
        assert_eq!(check_admitted(1000, 0, 0, 3, 1002), Ok(None));
        assert!(check_admitted(0, 0, 5, 0, 0).is_err());
        assert!(
            check_admitted(1000, 1, 0, 0, 1000)
                .unwrap_err()
                .contains("429")
        );
        assert!(
            check_admitted(1000, 0, 0, 0, 999)
                .unwrap_err()
                .contains("fewer")
        );
        let odd = check_admitted(1000, 0, 2, 0, 1010).unwrap().unwrap();
        assert!(odd.starts_with("2 answers other than 200/429"), "{odd}");
        assert!(odd.contains("counted 1010 requests, more than"), "{odd}");
    }

    #[test]
    fn each_phase_measures_both_paths_per_way_in_and_connection_count() {
        let list = targets(Tool::Wrk, &[Via::Nginx, Via::Direct], &[16, 64]);
        assert_eq!(list.len(), 8);
        assert_eq!(
            (list[0].via, list[0].path, list[0].connections),
            (Via::Nginx, LIMITED, 16)
        );
        assert_eq!(
            (list[3].via, list[3].path, list[3].connections),
            (Via::Direct, ROOT_PATH, 16)
        );
        assert_eq!(list[7].connections, 64);
    }
}
