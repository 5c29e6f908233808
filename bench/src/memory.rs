//! `scripts/memory.sh`: one instance per case, a million identities through it, its
//! resident memory before, during, right after and past the refill time; with Redis, the
//! keys until they are gone. Each case is one JSON line of run/memory/results.jsonl, and
//! the table is rendered from those lines (`report::table`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::machine::{self, Machine};
use crate::node::Node;
use crate::phases::LIMITED;
use crate::probe::{Counts, start_instance};
use crate::process::{Records, Started, memory_kib, wait_until};
use crate::report::table;
use crate::{LOOPBACK, append_json, say, warn};

const DEFAULT_CASES: &str = "memory:10/60/10 memory:1/60/1 redis:1/2/1";
/// Every REPEAT_EVERY-th identity asks twice in a row; wrk runs THREADS threads.
const REPEAT_EVERY: u64 = 10;
const THREADS: u64 = 2;
const LIMIT_MIB: f64 = 64.0;

#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Distinct identities per case (IPv4s of 10.0.0.0/8).
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1000..=16_000_000))]
    identities: u64,
    /// Space-separated STORE:RATE_LIMIT/TIME_WINDOW/BURST, STORE being memory or redis.
    #[arg(long, default_value = DEFAULT_CASES, value_parser = |t: &str| parse_cases(t).map(Cases))]
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

#[derive(Debug, Clone)]
pub struct Cases(Vec<Case>);

/// One case, `STORE:RATE_LIMIT/TIME_WINDOW/BURST`: Redis or the embedded store, and a
/// policy of positive numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Case {
    pub spec: String,
    pub redis: bool,
    pub rate: u64,
    pub window: u64,
    pub burst: u64,
}

fn parse_cases(text: &str) -> Result<Vec<Case>, String> {
    let case = |spec: &str| {
        let (store, policy) = spec.split_once(':')?;
        let numbers = policy.split('/').map(|n| n.parse().ok().filter(|n| *n > 0));
        let [rate, window, burst] = numbers.collect::<Option<Vec<u64>>>()?[..] else {
            return None;
        };
        let redis = ["memory", "redis"].iter().position(|s| *s == store)? == 1;
        Some(Case {
            spec: spec.into(),
            redis,
            rate,
            window,
            burst,
        })
    };
    let cases: Vec<Case> = text.split_whitespace().map(|spec| case(spec).ok_or(spec)).collect::<Result<_, _>>().map_err(|spec| {
        format!("a case is STORE:RATE_LIMIT/TIME_WINDOW/BURST with STORE memory or redis, got '{spec}'")
    })?;
    if cases.is_empty() {
        return Err("no case given".into());
    }
    Ok(cases)
}

impl Case {
    /// Seconds until every bucket is full again, plus two; at most 120.
    pub fn settle_secs(&self) -> u64 {
        (self.window * self.burst / self.rate + 2).min(120)
    }
}

/// Requests scripts/bench/xff.lua sends for `identities` over `threads`: each thread
/// takes an equal share, and every `every`-th identity of a share asks twice.
pub fn planned_requests(identities: u64, threads: u64, every: u64) -> u64 {
    let per_thread = identities.div_ceil(threads);
    let share = |i: u64| identities.saturating_sub(i * per_thread).min(per_thread);
    let repeats = |i: u64| share(i).checked_div(every).unwrap_or(0);
    (0..threads).map(|i| share(i) + repeats(i)).sum()
}

fn mib(kib: u64) -> f64 {
    crate::measure::round_to(kib as f64 / 1024.0, 1)
}

const COLUMNS: &str = "\
store | store | key
policy (RATE_LIMIT/TIME_WINDOW, BURST) | policy | key
identities | identities | sum
requests | requests | sum
429 | denied | sum
req/s | per_second | median 0
VmRSS before MiB | rss_before_mib | median 1
peak during | rss_peak_mib | median 1
right after | rss_after_mib | median 1
after refill | rss_settled_mib | median 1
VmHWM MiB | hwm_mib | median 1
< 64 MiB | verdict | key
Redis keys before | keys.before | median 0
peak | keys.peak | median 0
after | keys.after | median 0
s until back | keys.secs_until_back | median 0
";

/// The report of a run: its conditions (`run`: started, service, elapsed_s, identities,
/// commands), the table of its cases, the commands.
pub fn render(run: &Value, results: &[Value]) -> String {
    let [started, service] = ["started", "service"].map(|k| run[k].as_str().unwrap_or("?"));
    let commands = run["commands"].as_array().into_iter().flatten();
    let commands: Vec<&str> = commands.filter_map(Value::as_str).collect();
    format!(
        "## Memory: run of {started}\n\n- Service: {service}\n- Machine: {}; whole run {} s\n\
         - {} distinct identities per case (IPv4s from 10.0.0.0/8 in X-Forwarded-For from the trusted 127.0.0.1); every {REPEAT_EVERY}th asks twice in a row, so a burst of 1 denies it; wrk {THREADS} threads, 64 connections; deny cache at its default size (100000)\n\
         - Goal: VmHWM (the peak resident memory the kernel saw) under {LIMIT_MIB} MiB; Redis keys back to what they were before the traffic (the instance's own announcement) within the refill time\n\n\
         {}\nCommands (`PORT` is a free port chosen at run time):\n\n```sh\n{}\n```\n",
        Machine::read().describe(),
        run["elapsed_s"],
        run["identities"],
        table(results, COLUMNS),
        commands.join("\n")
    )
}

pub fn run(o: Options) -> Result<()> {
    let (started, started_at) = (Instant::now(), SystemTime::now());
    let root = std::env::current_dir()?;
    let out = root.join("run/memory");
    fs::create_dir_all(&out)?;
    for stale in ["pids", "results.jsonl"] {
        let _ = fs::remove_file(out.join(stale));
    }
    let records = Records(out.join("pids"));
    let (bin, service) = machine::service_binary(&root, &out)?;
    let specs: Vec<&str> = o.cases.0.iter().map(|c| c.spec.as_str()).collect();
    let mut invocation = String::from("scripts/memory.sh");
    if specs.join(" ") != DEFAULT_CASES {
        invocation += &format!(" --cases \"{}\"", specs.join(" "));
    }
    if o.identities != 1_000_000 {
        invocation += &format!(" --identities {}", o.identities);
    }
    let mut commands = vec![invocation];
    say!("load average now: {}", machine::load_average());
    for case in &o.cases.0 {
        let result = run_case(&o, case, &bin, &out, &records, &mut commands)?;
        append_json(&out.join("results.jsonl"), &result)?;
    }
    let root = format!("{}/", root.display());
    let commands: Vec<String> = commands.iter().map(|c| c.replace(&root, "")).collect();
    let (elapsed_s, started) = (started.elapsed().as_secs(), machine::utc_minute(started_at));
    let run = json!({"started": started, "service": service, "elapsed_s": elapsed_s, "identities": o.identities, "commands": commands});
    fs::write(out.join("run.json"), run.to_string())?;
    let results = crate::report::read_jsonl(&out.join("results.jsonl"))?;
    say!("done in {elapsed_s}s; logs in run/memory");
    let (root, record) = (std::env::current_dir()?, o.record.then_some("memory.sh"));
    crate::report::publish(&root, &out, &render(&run, &results), record)
}

/// A redis-server of the case's own on a free port, in a folder of `work_dir`, once it
/// answers PING.
fn own_redis(
    work_dir: &Path,
    out: &Path,
    records: &Records,
    name: &str,
) -> Result<(Started, Node)> {
    let port = std::net::TcpListener::bind((LOOPBACK, 0))?
        .local_addr()?
        .port();
    let dir = work_dir.join(format!("redis-{name}"));
    fs::create_dir_all(&dir)?;
    let args = format!("--port {port} --bind {LOOPBACK} --appendonly no --save");
    let mut command = Command::new("redis-server");
    command.args(args.split(' ')).arg("").arg("--dir").arg(&dir);
    let log = out.join(format!("redis-{name}.log"));
    let server = Started::spawn(records, &format!("redis-{name}"), &mut command, &log)?;
    let (node, ping) = (Node::new(port, None), redis::cmd("PING"));
    let what = format!("redis-server on {port} answers PING");
    let pong = || node.query::<String>(&ping).is_ok();
    wait_until(&what, Duration::from_secs(10), pong)?;
    let (pid, dir) = (server.pid(), dir.display());
    say!("  started redis-server (pid {pid}) on port {port} in {dir}");
    Ok((server, node))
}

fn run_case(
    o: &Options,
    case: &Case,
    bin: &Path,
    out: &Path,
    records: &Records,
    commands: &mut Vec<String>,
) -> Result<Value> {
    let (name, identities) = (case.spec.replace([':', '/'], "-"), o.identities);
    let (spec, rate, window, burst) = (&case.spec, case.rate, case.window, case.burst);
    say!(
        "case {spec}: RATE_LIMIT={rate} TIME_WINDOW={window} BURST={burst}, {identities} identities"
    );
    let redis = case
        .redis
        .then(|| own_redis(&o.work_dir, out, records, &name));
    let redis = redis.transpose()?;
    // Only what this case sets reaches the instance.
    let log = out.join(format!("{name}.log"));
    let _ = fs::remove_file(&log);
    let mut settings =
        format!("RATE_LIMIT={rate} TIME_WINDOW={window} BURST={burst} TRUSTED_PROXIES={LOOPBACK}");
    let mut shown = format!("{settings} HOST={LOOPBACK} PORT=0");
    if let Some((_, node)) = &redis {
        settings += &format!(" REDIS_URL=redis://{LOOPBACK}:{}", node.port);
        shown += &format!(" REDIS_URL=redis://{LOOPBACK}:PORT");
    }
    let settings = format!("{settings} INSTANCE_NAME=memory-{name}");
    let started = start_instance(records, &format!("memory-{name}"), bin, &settings, &log);
    let (instance, port) = started.with_context(|| format!("see {}", log.display()))?;
    let app = instance.pid();
    say!("  started the instance (pid {app}) on port {port}");

    let (before, _) = memory_kib(app);
    let (node, dbsize) = (redis.as_ref().map(|(_, node)| node), redis::cmd("DBSIZE"));
    let keys = || node.and_then(|node| node.query::<u64>(&dbsize).ok());
    let keys_before = keys().unwrap_or(0);
    let planned = planned_requests(identities, THREADS, REPEAT_EVERY);
    let url = format!("http://{LOOPBACK}:{port}{LIMITED}");
    let args = format!(
        "-t{THREADS} -c64 -d{}s -s scripts/bench/xff.lua {url} -- {identities} {THREADS} {REPEAT_EVERY}",
        o.max_secs
    );
    commands.push(format!("{shown} {} &", bin.display()));
    let any_port = format!("http://{LOOPBACK}:PORT{LIMITED}");
    commands.push(format!("wrk {}", args.replace(&url, &any_port)));
    say!("  + wrk {args}  (stopped once {planned} requests are answered)");
    let started = Instant::now();
    let (wrk_name, wrk_log) = (format!("wrk-{name}"), out.join(format!("wrk-{name}.txt")));
    let mut wrk = Command::new("wrk");
    let mut wrk = Started::spawn(records, &wrk_name, wrk.args(args.split(' ')), &wrk_log)?;
    let (mut peak, mut keys_peak) = (before, None::<u64>);
    while wrk.running() {
        sleep(Duration::from_secs(1));
        let ((rss, _), now) = (memory_kib(app), keys());
        let n = Counts::of_instance(port, LIMITED).map_or(0, |c| c.total());
        (peak, keys_peak) = (peak.max(rss), keys_peak.max(now));
        let (secs, rss) = (started.elapsed().as_secs(), mib(rss));
        if secs.is_multiple_of(10) {
            say!("  {secs}s: {n} of {planned} answered, VmRSS {rss} MiB, Redis keys {now:?}");
        }
        if n >= planned {
            break;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    wrk.stop();
    sleep(Duration::from_millis(500));
    let (counts, (after, _)) = (Counts::of_instance(port, LIMITED)?, memory_kib(app));
    peak = peak.max(after);
    if counts.total() < planned {
        let (answered, secs) = (counts.total(), o.max_secs);
        warn!("only {answered} of {planned} requests were answered within {secs}s");
    }
    // After the refill time every bucket is full again: nothing needs to be remembered.
    let (settle, t0) = (Duration::from_secs(case.settle_secs()), Instant::now());
    let mut keys_json = Value::Null;
    if redis.is_some() {
        let gone = || keys().is_some_and(|k| k <= keys_before);
        let within = settle + Duration::from_secs(30);
        let _ = wait_until("the bucket keys are gone", within, gone);
        let back = t0.elapsed().as_secs();
        keys_json = json!({"before": keys_before, "peak": keys_peak, "after": keys(), "secs_until_back": back});
    }
    let secs = settle.as_secs();
    say!("  waiting past the refill time ({secs} s); Redis keys: {keys_json}");
    sleep(settle.saturating_sub(t0.elapsed()));
    let (settled, hwm) = memory_kib(app);
    let [before, peak, after, settled, hwm] = [before, peak, after, settled, hwm].map(mib);
    say!(
        "  VmRSS MiB: {before} before, peak {peak} during (VmHWM {hwm}), {after} right after, {settled} after the refill time"
    );
    Ok(json!({
        "store": if case.redis { "redis" } else { "memory" }, "policy": format!("{rate}/{window} s, burst {burst}"),
        "identities": identities, "requests": counts.total(), "denied": counts.denied,
        "per_second": (counts.total() as f64 / seconds.max(0.001)).round(),
        "rss_before_mib": before, "rss_peak_mib": peak, "rss_after_mib": after, "rss_settled_mib": settled, "hwm_mib": hwm,
        "verdict": if hwm < LIMIT_MIB { "met" } else { "MISSED" }, "keys": keys_json,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases_are_parsed_from_their_spec_and_requests_count_each_repeated_identity_twice() {
        let cases = parse_cases(DEFAULT_CASES).unwrap();
        let c = &cases[2];
        let case = (c.spec.as_str(), c.redis, [c.rate, c.window, c.burst]);
        assert_eq!(case, ("redis:1/2/1", true, [1, 2, 1]));
        for bad in ["disk:1/2/3", "memory:1/2", "memory:0/60/1", ""] {
            assert!(parse_cases(bad).is_err(), "{bad}");
        }
        let long = parse_cases("memory:1/3600/10").unwrap()[0].settle_secs();
        assert_eq!((cases[1].settle_secs(), long), (62, 120));
        assert_eq!(planned_requests(1_000_000, 2, 10), 1_100_000);
        // 1 005 over 2 threads: 503 and 502, with 50 repeats each.
        assert_eq!(planned_requests(1005, 2, 10), 553 + 552);
        assert_eq!(planned_requests(1000, 3, 0), 1000);
    }

    #[test]
    fn the_table_gives_mib_keys_and_the_verdict_from_the_records() {
        let redis = json!({"store": "redis", "policy": "1/2 s, burst 1", "identities": 1000000, "requests": 1100000, "denied": 100000,
            "per_second": 52381.0, "rss_before_mib": 5.6, "rss_peak_mib": 13.4, "rss_after_mib": 13.4, "rss_settled_mib": 13.4,
            "hwm_mib": 13.4, "verdict": "met", "keys": {"before": 1, "peak": 154218, "after": 1, "secs_until_back": 2}});
        let memory = json!({"store": "memory", "policy": "10/60 s, burst 10", "hwm_mib": 70.0, "verdict": "MISSED", "keys": null});
        let run = json!({"started": "now", "commands": ["scripts/memory.sh"]});
        let text = render(&run, &[redis, memory]);
        let row = "| redis | 1/2 s, burst 1 | 1000000 | 1100000 | 100000 | 52381 | 5.6 | 13.4 | 13.4 | 13.4 | 13.4 | met | 1 | 154218 | 1 | 2 |";
        assert!(text.contains(row), "{text}");
        assert!(text.contains("| 70.0 | MISSED | - | - | - | - |"), "{text}");
        assert!(text.ends_with("```sh\nscripts/memory.sh\n```\n"), "{text}");
    }
}
