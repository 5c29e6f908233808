//! `scripts/memory.sh`: one instance per case, a million identities through it, its
//! resident memory before, during, right after and past the refill time; with Redis, the
//! keys until they are gone. See the script's header for the method.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};

use crate::machine::{self, Machine};
use crate::procfs::memory_kib;
use crate::prom::{self, StatusCounts};
use crate::record;
use crate::redis_info::Node;
use crate::spawn::{Records, Started};
use crate::throughput::wait_for_instance;
use crate::{LOOPBACK, http, say, warn};

const DEFAULT_CASES: &str = "memory:10/60/10 memory:1/60/1 redis:1/2/1";
const DEFAULT_IDENTITIES: u64 = 1_000_000;
/// Every REPEAT_EVERY-th identity asks twice in a row.
const REPEAT_EVERY: u64 = 10;
const CONNECTIONS: u32 = 64;
const THREADS: u64 = 2;
const LIMIT_MIB: u64 = 64;
const DOC: &str = "docs/BENCHMARKS.md";

#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Distinct identities per case (IPv4s of 10.0.0.0/8).
    #[arg(long, default_value_t = DEFAULT_IDENTITIES, value_parser = clap::value_parser!(u64).range(1000..=16_000_000))]
    identities: u64,
    /// Space-separated STORE:RATE_LIMIT/TIME_WINDOW/BURST, STORE being memory or redis.
    #[arg(long, default_value = DEFAULT_CASES, value_parser = parse_cases)]
    cases: Cases,
    /// Bound on the traffic of one case, in seconds.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(10..=600))]
    max_secs: u64,
    /// Also write the results into docs/BENCHMARKS.md.
    #[arg(long)]
    record: bool,
    /// Where the cases' redis-servers keep their folders (the wrapper makes and removes it).
    #[arg(long)]
    work_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    Memory,
    Redis,
}

/// One case: a store and a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Case {
    pub store: Store,
    pub rate: u64,
    pub window: u64,
    pub burst: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cases(pub Vec<Case>);

impl FromStr for Case {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "a case is STORE:RATE_LIMIT/TIME_WINDOW/BURST with STORE memory or redis, got '{text}'"
            )
        };
        let (store, policy) = text.split_once(':').ok_or_else(bad)?;
        let store = match store {
            "memory" => Store::Memory,
            "redis" => Store::Redis,
            _ => return Err(bad()),
        };
        let numbers: Vec<u64> = policy
            .split('/')
            .map(|n| n.parse().map_err(|_| bad()))
            .collect::<Result<_, _>>()?;
        let [rate, window, burst] = numbers[..] else {
            return Err(bad());
        };
        if rate == 0 || window == 0 || burst == 0 {
            return Err(bad());
        }
        Ok(Self {
            store,
            rate,
            window,
            burst,
        })
    }
}

fn parse_cases(text: &str) -> Result<Cases, String> {
    let cases: Vec<Case> = text
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    if cases.is_empty() {
        return Err("no case given".into());
    }
    Ok(Cases(cases))
}

impl Case {
    fn name(&self) -> String {
        let store = match self.store {
            Store::Memory => "memory",
            Store::Redis => "redis",
        };
        format!("{store}-{}-{}-{}", self.rate, self.window, self.burst)
    }

    /// Seconds until every bucket is full again, plus two; at most 120.
    pub fn settle_secs(&self) -> u64 {
        (self.window * self.burst / self.rate + 2).min(120)
    }
}

/// Requests the wrk script (scripts/bench/xff.lua) sends for `identities` over `threads`:
/// each thread takes an equal share, and every `every`-th identity of a share asks twice.
pub fn planned_requests(identities: u64, threads: u64, every: u64) -> u64 {
    let per_thread = identities.div_ceil(threads);
    (0..threads)
        .map(|i| {
            let count = identities.saturating_sub(i * per_thread).min(per_thread);
            match count.checked_div(every) {
                Some(groups) => groups * (every + 1) + count % every,
                None => count,
            }
        })
        .sum()
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// What one case measured.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseResult {
    pub case: Case,
    pub identities: u64,
    pub answered: u64,
    pub denied: u64,
    pub seconds: f64,
    pub rss_before_kib: u64,
    pub rss_peak_kib: u64,
    pub rss_after_kib: u64,
    pub rss_settled_kib: u64,
    pub hwm_kib: u64,
    /// Redis keys before, at the peak, after, and the seconds until back (`None` without Redis).
    pub keys: Option<Keys>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keys {
    pub before: u64,
    pub peak: u64,
    pub after: u64,
    pub secs_until_back: u64,
}

impl CaseResult {
    pub fn markdown(&self) -> String {
        let c = &self.case;
        let store = match c.store {
            Store::Memory => "memory",
            Store::Redis => "redis",
        };
        let per_second = if self.seconds > 0.0 {
            self.answered as f64 / self.seconds
        } else {
            0.0
        };
        let verdict = if self.hwm_kib < LIMIT_MIB * 1024 {
            "met"
        } else {
            "MISSED"
        };
        let keys = self.keys.map_or_else(
            || ["-".to_owned(), "-".into(), "-".into(), "-".into()],
            |k| {
                [
                    k.before.to_string(),
                    k.peak.to_string(),
                    k.after.to_string(),
                    k.secs_until_back.to_string(),
                ]
            },
        );
        format!(
            "| {store} | {}/{} s, burst {} | {} | {} | {} | {per_second:.0} | {} | {} | {} | {} | **{}** | {verdict} | {} |",
            c.rate,
            c.window,
            c.burst,
            self.identities,
            self.answered,
            self.denied,
            mib(self.rss_before_kib),
            mib(self.rss_peak_kib),
            mib(self.rss_after_kib),
            mib(self.rss_settled_kib),
            mib(self.hwm_kib),
            keys.join(" | ")
        )
    }
}

/// Everything about the run that is not a measurement.
#[derive(Debug, Clone)]
pub struct MemoryRunInfo {
    pub started: String,
    pub service: String,
    pub machine: Machine,
    pub elapsed_s: u64,
    pub identities: u64,
    pub invocation: String,
    pub commands: Vec<String>,
}

pub fn render(info: &MemoryRunInfo, results: &[CaseResult]) -> String {
    let m = &info.machine;
    let mut out = String::new();
    let _ = writeln!(out, "## Memory: run of {}\n", info.started);
    let _ = writeln!(out, "- Service: {}", info.service);
    let _ = writeln!(
        out,
        "- Machine: {} cores, {}, kernel {}; whole run {} s",
        m.cores, m.model, m.kernel, info.elapsed_s
    );
    let _ = writeln!(
        out,
        "- {} distinct identities per case (IPv4s from 10.0.0.0/8 in X-Forwarded-For from the trusted 127.0.0.1); every {REPEAT_EVERY}th asks twice in a row, so a burst of 1 denies it; wrk {THREADS} threads, {CONNECTIONS} connections; deny cache at its default size (100000)",
        info.identities
    );
    let _ = writeln!(
        out,
        "- Goal: VmHWM (the peak resident memory the kernel saw) under {LIMIT_MIB} MiB; Redis keys back to what they were before the traffic (the instance's own announcement) within the refill time\n"
    );
    let _ = writeln!(
        out,
        "| store | policy (RATE_LIMIT/TIME_WINDOW, BURST) | identities | requests | 429 | req/s | VmRSS before MiB | peak during | right after | after refill | VmHWM MiB | < {LIMIT_MIB} MiB | Redis keys before | peak | after | s until back |"
    );
    out.push_str("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|--:|--:|--:|\n");
    for result in results {
        out.push_str(&result.markdown());
        out.push('\n');
    }
    out.push_str("\nCommands (`PORT` is a free port chosen at run time):\n\n```sh\n");
    let _ = writeln!(out, "{}", info.invocation);
    for command in &info.commands {
        let _ = writeln!(out, "{command}");
    }
    out.push_str("```\n");
    out
}

/// The command line a report quotes: the flags that differ from the defaults.
fn invocation(options: &Options, cases: &str) -> String {
    let mut text = String::from("scripts/memory.sh");
    if cases != DEFAULT_CASES {
        let _ = write!(text, " --cases \"{cases}\"");
    }
    if options.identities != DEFAULT_IDENTITIES {
        let _ = write!(text, " --identities {}", options.identities);
    }
    text
}

fn case_text(case: &Case) -> String {
    let store = match case.store {
        Store::Memory => "memory",
        Store::Redis => "redis",
    };
    format!("{store}:{}/{}/{}", case.rate, case.window, case.burst)
}

/// A port nothing listens on now: the kernel's choice for a listener, released at once.
fn free_port() -> Result<u16> {
    let listener =
        std::net::TcpListener::bind((LOOPBACK, 0)).context("no free port on loopback")?;
    Ok(listener.local_addr()?.port())
}

/// What the instance counted on /limited_endpoint.
fn served(port: u16) -> StatusCounts {
    http::get(port, "/metrics", Duration::from_secs(5))
        .map(|response| prom::requests_by_status(&response.body, "/limited_endpoint"))
        .unwrap_or_default()
}

struct MemoryBench {
    options: Options,
    root: PathBuf,
    out: PathBuf,
    bin: PathBuf,
    records: Records,
    commands: Vec<String>,
}

pub fn run(options: Options) -> Result<()> {
    let started = Instant::now();
    let started_at = SystemTime::now();
    let root = std::env::current_dir()?;
    let out = root.join("run/memory");
    fs::create_dir_all(&out)?;
    let pids = out.join("pids");
    let _ = fs::remove_file(&pids);
    let target_dir =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let rel = |path: &Path| {
        path.strip_prefix(&root)
            .unwrap_or(path)
            .display()
            .to_string()
    };
    let (bin, service) = match std::env::var_os("RATELIMITER_BIN") {
        Some(bin) => {
            let bin = PathBuf::from(bin);
            let service = machine::service_note(Path::new(&rel(&bin)), true, "");
            (bin, service)
        }
        None => {
            // Every case runs the same binary, even if the working tree is rebuilt meanwhile.
            let built = target_dir.join("release/ratelimiter");
            let copy = out.join("ratelimiter");
            fs::copy(&built, &copy)
                .with_context(|| format!("cannot copy {} (is it built?)", built.display()))?;
            let service = machine::service_note(Path::new(&rel(&built)), false, &rel(&copy));
            (copy, service)
        }
    };
    let cases_text = options
        .cases
        .0
        .iter()
        .map(case_text)
        .collect::<Vec<_>>()
        .join(" ");
    let mut bench = MemoryBench {
        options,
        root: root.clone(),
        out,
        bin,
        records: Records::new(pids),
        commands: Vec::new(),
    };
    say!("load average now: {}", machine::load_average());
    let mut results = Vec::new();
    for case in bench.options.cases.0.clone() {
        results.push(bench.run_case(&case)?);
    }
    let info = MemoryRunInfo {
        started: machine::utc_minute(started_at),
        service,
        machine: Machine::read(),
        elapsed_s: started.elapsed().as_secs(),
        identities: bench.options.identities,
        invocation: invocation(&bench.options, &cases_text),
        commands: bench.commands.clone(),
    };
    let report = render(&info, &results);
    fs::write(bench.out.join("report.md"), &report)?;
    println!("\n{report}");
    say!("done in {}s; logs in {}", info.elapsed_s, rel(&bench.out));
    if bench.options.record {
        record::record(&root.join(DOC), "memory.sh", &report)?;
        say!("recorded in {DOC}");
    }
    Ok(())
}

impl MemoryBench {
    fn rel(&self, path: &Path) -> String {
        path.strip_prefix(&self.root)
            .unwrap_or(path)
            .display()
            .to_string()
    }

    fn run_case(&mut self, case: &Case) -> Result<CaseResult> {
        let name = case.name();
        let identities = self.options.identities;
        say!(
            "case {}: {} store, RATE_LIMIT={} TIME_WINDOW={} BURST={}, {identities} identities",
            case_text(case),
            if case.store == Store::Redis {
                "redis"
            } else {
                "memory"
            },
            case.rate,
            case.window,
            case.burst
        );

        let mut redis: Option<(Started, Node)> = None;
        if case.store == Store::Redis {
            let port = free_port()?;
            let dir = self.options.work_dir.join(format!("redis-{name}"));
            fs::create_dir_all(&dir)?;
            let log = self.out.join(format!("redis-{name}.log"));
            let _ = fs::remove_file(&log);
            let server = Started::spawn(
                &self.records,
                &format!("redis-{name}"),
                Command::new("redis-server")
                    .args(["--port", &port.to_string(), "--bind", LOOPBACK, "--dir"])
                    .arg(&dir)
                    .args(["--save", "", "--appendonly", "no", "--daemonize", "no"]),
                &log,
            )?;
            let node = Node::new(port, None);
            let deadline = Instant::now() + Duration::from_secs(10);
            while !node.ping() {
                if Instant::now() >= deadline {
                    bail!(
                        "redis-server on port {port} did not answer PING; see {}",
                        self.rel(&log)
                    );
                }
                sleep(Duration::from_millis(100));
            }
            say!(
                "  started redis-server (pid {}) on port {port} in {}",
                server.pid(),
                dir.display()
            );
            redis = Some((server, node));
        }

        // Only what this case sets reaches the instance.
        let log = self.out.join(format!("{name}.log"));
        let _ = fs::remove_file(&log);
        let mut command = Command::new(&self.bin);
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env(
                "HOME",
                std::env::var_os("HOME").unwrap_or_else(|| "/".into()),
            )
            .env("RUST_LOG", "info")
            .env("HOST", LOOPBACK)
            .env("PORT", "0")
            .env("INSTANCE_NAME", format!("memory-{name}"))
            .env("TRUSTED_PROXIES", LOOPBACK)
            .env("RATE_LIMIT", case.rate.to_string())
            .env("TIME_WINDOW", case.window.to_string())
            .env("BURST", case.burst.to_string());
        if let Some((_, node)) = &redis {
            command.env("REDIS_URL", format!("redis://{LOOPBACK}:{}", node.port));
        }
        let mut instance =
            Started::spawn(&self.records, &format!("memory-{name}"), &mut command, &log)?;
        let port = wait_for_instance(&mut instance, &log, Duration::from_secs(15))
            .with_context(|| format!("the instance; see {}", self.rel(&log)))?;
        let app = instance.pid();
        say!(
            "  started the instance (pid {app}) on port {port}; log: {}",
            self.rel(&log)
        );

        let (before, _) = memory_kib(app);
        let keys_of = |node: &Node| node.dbsize().ok();
        let keys_before = redis
            .as_ref()
            .and_then(|(_, node)| keys_of(node))
            .unwrap_or(0);
        let planned = planned_requests(identities, THREADS, REPEAT_EVERY);
        let argv: Vec<String> = vec![
            "wrk".into(),
            format!("-t{THREADS}"),
            format!("-c{CONNECTIONS}"),
            format!("-d{}s", self.options.max_secs),
            "-s".into(),
            "scripts/bench/xff.lua".into(),
            format!("http://{LOOPBACK}:{port}/limited_endpoint"),
            "--".into(),
            identities.to_string(),
            THREADS.to_string(),
            REPEAT_EVERY.to_string(),
        ];
        let shown_redis = if redis.is_some() {
            format!("REDIS_URL=redis://{LOOPBACK}:PORT ")
        } else {
            String::new()
        };
        self.commands.push(format!(
            "RATE_LIMIT={} TIME_WINDOW={} BURST={} TRUSTED_PROXIES={LOOPBACK} HOST={LOOPBACK} PORT=0 {shown_redis}{} &",
            case.rate,
            case.window,
            case.burst,
            self.rel(&self.bin)
        ));
        let mut shown = argv.clone();
        shown[6] = format!("http://{LOOPBACK}:PORT/limited_endpoint");
        self.commands.push(shown.join(" "));
        say!(
            "  + {}  (stopped once {planned} requests are answered)",
            argv.join(" ")
        );

        let wrk_log = self.out.join(format!("wrk-{name}.txt"));
        let _ = fs::remove_file(&wrk_log);
        let started = Instant::now();
        let mut wrk = Started::spawn(
            &self.records,
            &format!("wrk-{name}"),
            Command::new(&argv[0])
                .args(&argv[1..])
                .current_dir(&self.root),
            &wrk_log,
        )?;
        let mut peak = before;
        let mut keys_peak: Option<u64> = None;
        let mut last_report = 0;
        while wrk.running() {
            sleep(Duration::from_secs(1));
            let (rss, _) = memory_kib(app);
            peak = peak.max(rss);
            let n = served(port).total();
            let keys = redis.as_ref().and_then(|(_, node)| keys_of(node));
            if let Some(keys) = keys {
                keys_peak = Some(keys_peak.map_or(keys, |p| p.max(keys)));
            }
            let now = started.elapsed().as_secs();
            if now / 10 > last_report {
                last_report = now / 10;
                let keys = keys.map_or_else(String::new, |k| format!(", Redis keys {k}"));
                say!(
                    "  {now}s: {n} of {planned} answered, VmRSS {} MiB{keys}",
                    mib(rss)
                );
            }
            if n >= planned {
                break;
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        wrk.stop(Duration::from_secs(10));
        sleep(Duration::from_millis(500));
        let counts = served(port);
        let (after, _) = memory_kib(app);
        peak = peak.max(after);
        if counts.total() < planned {
            warn!(
                "only {} of {planned} requests were answered within {}s",
                counts.total(),
                self.options.max_secs
            );
        }

        // After the refill time every bucket is full again: nothing needs to be remembered.
        let settle = case.settle_secs();
        let keys = match &redis {
            Some((_, node)) => {
                let t0 = Instant::now();
                let limit = t0 + Duration::from_secs(settle + 30);
                let mut keys_after = keys_of(node);
                while keys_after.is_some_and(|k| k > keys_before) && Instant::now() < limit {
                    sleep(Duration::from_millis(500));
                    keys_after = keys_of(node);
                }
                let gone = t0.elapsed().as_secs();
                let keys = Keys {
                    before: keys_before,
                    peak: keys_peak.unwrap_or(0),
                    after: keys_after.unwrap_or(0),
                    secs_until_back: gone,
                };
                say!(
                    "  Redis keys: {} before, peak {}, {} {gone}s after the traffic ended",
                    keys.before,
                    keys.peak,
                    keys.after
                );
                if settle > gone {
                    sleep(Duration::from_secs(settle - gone));
                }
                Some(keys)
            }
            None => {
                say!("  waiting {settle}s, past the refill time");
                sleep(Duration::from_secs(settle));
                None
            }
        };
        let (settled, hwm) = memory_kib(app);
        say!(
            "  VmRSS: {} MiB before, peak {} MiB during (VmHWM {}), {} right after, {} after the refill time",
            mib(before),
            mib(peak),
            mib(hwm),
            mib(after),
            mib(settled)
        );
        instance.stop(Duration::from_secs(10));
        if let Some((mut server, _)) = redis {
            server.stop(Duration::from_secs(10));
        }
        Ok(CaseResult {
            case: *case,
            identities,
            answered: counts.total(),
            denied: counts.denied,
            seconds,
            rss_before_kib: before,
            rss_peak_kib: peak,
            rss_after_kib: after,
            rss_settled_kib: settled,
            hwm_kib: hwm,
            keys,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases_are_parsed_from_their_spec() {
        let cases = parse_cases(DEFAULT_CASES).unwrap();
        assert_eq!(cases.0.len(), 3);
        assert_eq!(
            cases.0[2],
            Case {
                store: Store::Redis,
                rate: 1,
                window: 2,
                burst: 1
            }
        );
        assert!(parse_cases("disk:1/2/3").is_err());
        assert!(parse_cases("memory:1/2").is_err());
        assert!(parse_cases("memory:0/60/1").is_err());
        assert!(parse_cases("").is_err());
    }

    #[test]
    fn planned_requests_count_each_repeated_identity_twice() {
        // 1 000 000 identities over 2 threads, every 10th twice: 1 100 000 requests.
        assert_eq!(planned_requests(1_000_000, 2, 10), 1_100_000);
        // 1 005 over 2 threads: 503 and 502, with 50 repeats each.
        assert_eq!(planned_requests(1005, 2, 10), 553 + 552);
        assert_eq!(planned_requests(1000, 3, 0), 1000);
    }

    #[test]
    fn the_wait_past_the_refill_time_is_bounded() {
        let case: Case = "memory:1/60/1".parse().unwrap();
        assert_eq!(case.settle_secs(), 62);
        let slow: Case = "memory:1/3600/10".parse().unwrap();
        assert_eq!(slow.settle_secs(), 120);
    }

    #[test]
    fn a_row_gives_mib_and_the_verdict() {
        let result = CaseResult {
            case: "redis:1/2/1".parse().unwrap(),
            identities: 1_000_000,
            answered: 1_100_000,
            denied: 100_000,
            seconds: 21.0,
            rss_before_kib: 5734,
            rss_peak_kib: 13722,
            rss_after_kib: 13722,
            rss_settled_kib: 13722,
            hwm_kib: 13722,
            keys: Some(Keys {
                before: 1,
                peak: 154_218,
                after: 1,
                secs_until_back: 2,
            }),
        };
        assert_eq!(
            result.markdown(),
            "| redis | 1/2 s, burst 1 | 1000000 | 1100000 | 100000 | 52381 | 5.6 | 13.4 | 13.4 | 13.4 | **13.4** | met | 1 | 154218 | 1 | 2 |"
        );
        let memory = CaseResult {
            case: "memory:10/60/10".parse().unwrap(),
            hwm_kib: 70 * 1024,
            keys: None,
            ..result
        };
        assert!(
            memory
                .markdown()
                .ends_with("| **70.0** | MISSED | - | - | - | - |"),
            "{}",
            memory.markdown()
        );
    }

    #[test]
    fn the_quoted_command_names_only_flags_that_differ() {
        let options = Options {
            identities: 1000,
            cases: parse_cases("memory:1/60/1").unwrap(),
            max_secs: 10,
            record: false,
            work_dir: PathBuf::from("/tmp"),
        };
        assert_eq!(
            invocation(&options, "memory:1/60/1"),
            "scripts/memory.sh --cases \"memory:1/60/1\" --identities 1000"
        );
        let defaults = Options {
            identities: DEFAULT_IDENTITIES,
            ..options
        };
        assert_eq!(invocation(&defaults, DEFAULT_CASES), "scripts/memory.sh");
    }
}
