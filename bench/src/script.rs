//! The Lua script alone: `redis-benchmark` runs EVALSHA of each case on the master (its
//! replicas attached), and what Redis counted meanwhile is split per script call into the
//! commands the script runs and the rest. Rows go to run/bench/scripts.jsonl.

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::measure::round_to;
use crate::node::{CommandStats, Node};
use crate::process::{Records, run_counted, tail, ticks_of};
use crate::{LOOPBACK, append_json, say};

/// Each case, one a line: its name | the script (`project`: src/bucket/token_bucket.lua;
/// `floor`: one that only returns what the real one returns, the floor of any EVALSHA
/// with these arguments on this machine; `reference`: scripts/bench/reference_token_bucket.lua,
/// a textbook bucket over two string keys) | its key after ratelimit:bench: | ARGV.
///
/// ARGV: now ('' = Redis's clock), the number of limits, then per limit its two fields,
/// capacity, refill, cost and group in the script's units (src/bucket/limit.rs). The
/// shipped policy, 10 per 60 s: a token is 6,000,000 units, the refill 1 unit per µs, so
/// random keys of a burst of 10 are admitted. 15 per hour is the second limit of a
/// two-limit policy. 10^9 per second (the HTTP phases' allow policy): one unit a token,
/// 1,000 per µs, so a returning client's call writes only the hash. Deny-heavy: a burst
/// of 1 and one token per 60 s, denied after its first call. The reference runs the same
/// random keys and policy (10 tokens, 10 per 60 s).
const CASES: &str = "\
allow-heavy | project | __rand_int__ | '' 1 m:tokens m:ts 60000000 1 6000000 0
allow-heavy, two limits | project | two:__rand_int__ | '' 2 m:tokens m:ts 60000000 1 6000000 0 h:tokens h:ts 3600000000 1 240000000 0
returning | project | returning | '' 1 s:tokens s:ts 1000000000 1000 1 0
returning, two limits | project | returning:two | '' 2 s:tokens s:ts 1000000000 1000 1 0 a:tokens a:ts 1000000000 1000 1 0
deny-heavy | project | denied | '' 1 d:tokens d:ts 60000000 1 60000000 0
floor (return {1, 0}) | floor | __rand_int__ | '' 1 m:tokens m:ts 60000000 1 6000000 0
reference | reference | ref:__rand_int__ | 10 0.16666667 1790000000";
const KEY_PREFIX: &str = "ratelimit:bench:";
/// The commands the scripts run; their `usec` is not the script engine's.
const INNER: [&str; 6] = ["time", "hmget", "hset", "pexpire", "get", "setex"];

/// One row of the script table, kept at the precision it prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScriptRow {
    pub name: String,
    pub calls: u64,
    /// `usec` ÷ `calls` of EVALSHA: the commands the script runs included.
    pub usec_per_call: f64,
    /// `usec` of each command the script runs, per script call.
    pub time: f64,
    pub hmget: f64,
    pub hset: f64,
    pub pexpire: f64,
    /// The rest of `usec_per_call`: the Lua call, its argument tables, the arithmetic, the reply.
    pub engine: f64,
    /// The master's CPU from `/proc`, and redis-benchmark's own, µs per call.
    pub master_cpu: f64,
    pub client_cpu: f64,
    pub calls_per_second: f64,
}

impl ScriptRow {
    pub fn compute(
        name: &str,
        delta: &CommandStats,
        ticks: (u64, u64),
        calls_per_second: f64,
        hz: u64,
    ) -> Self {
        let (calls, usec) = delta.get("evalsha");
        let q = calls.max(1) as f64;
        let per_call = |name: &str| round_to(delta.get(name).1 as f64 / q, 2);
        let cpu = |ticks: u64| round_to(ticks as f64 * 1e6 / hz as f64 / q, 1);
        let inner: u64 = INNER.iter().map(|name| delta.get(name).1).sum();
        Self {
            name: name.to_owned(),
            calls,
            usec_per_call: per_call("evalsha"),
            time: per_call("time"),
            hmget: per_call("hmget"),
            hset: per_call("hset"),
            pexpire: per_call("pexpire"),
            engine: round_to((usec as f64 - inner as f64) / q, 2),
            master_cpu: cpu(ticks.0),
            client_cpu: cpu(ticks.1),
            calls_per_second: round_to(calls_per_second, 0),
        }
    }
}

/// Runs every case on `master` (whose processes are `pids`); returns the commands run.
pub fn run(
    master: &Node,
    pids: &[u32],
    root: &Path,
    out: &Path,
    records: &Records,
    hz: u64,
) -> Result<Vec<String>> {
    let load = |script: &str| master.query::<String>(redis::cmd("SCRIPT").arg("LOAD").arg(script));
    let lua = fs::read_to_string(root.join("src/bucket/token_bucket.lua"))?;
    let project = load(&lua)?;
    if project != sha1_smol::Sha1::from(&lua).digest().to_string() {
        bail!("SCRIPT LOAD answered '{project}', not the SHA-1 of src/bucket/token_bucket.lua");
    }
    let reference = fs::read_to_string(root.join("scripts/bench/reference_token_bucket.lua"))?;
    let shas = [
        ("project", project.clone()),
        ("floor", load("return {1, 0}")?),
        ("reference", load(&reference)?),
    ];
    let slaves = master
        .info_field("replication", "connected_slaves")
        .unwrap_or_default();
    say!("redis-benchmark: src/bucket/token_bucket.lua is {project}; replicas attached: {slaves}");
    let mut commands = Vec::new();
    for line in CASES.lines() {
        let [name, script, key, args] =
            [0, 1, 2, 3].map(|i| line.split(" | ").nth(i).unwrap_or_default());
        let sha = &shas
            .iter()
            .find(|(n, _)| *n == script)
            .context("a case's script")?
            .1;
        let port = master.port;
        let argv = |password: &str| {
            format!(
                "-h {LOOPBACK} -p {port} -a {password} -n 200000 -r 100000 --csv EVALSHA {sha} 1 {KEY_PREFIX}{key} {args}"
            )
        };
        commands.push(format!(
            "redis-benchmark {}",
            argv("PASSWORD").replace("''", "\"\"")
        ));
        let log = out.join(format!("redis-benchmark-{name}.txt"));
        let (before, t0) = (master.command_stats()?, ticks_of(pids));
        let mut benchmark = Command::new("redis-benchmark");
        let argv = argv(master.password.as_deref().unwrap_or_default());
        // '' is an empty argument: Redis's own clock.
        benchmark.args(argv.split(' ').map(|w| if w == "''" { "" } else { w }));
        let (status, client_ticks) = run_counted(records, "redis-benchmark", &mut benchmark, &log)?;
        let master_ticks = ticks_of(pids).saturating_sub(t0);
        let delta = master.command_stats()?.since(&before);
        if !status.success() {
            bail!("redis-benchmark failed: {}", tail(&log, 3));
        }
        let rps = benchmark_rps(&fs::read_to_string(&log)?)
            .with_context(|| format!("in {}", log.display()))?;
        let row = ScriptRow::compute(name, &delta, (master_ticks, client_ticks), rps, hz);
        let (calls, usec, engine, cpu, rps) = (
            row.calls,
            row.usec_per_call,
            row.engine,
            row.master_cpu,
            row.calls_per_second,
        );
        say!(
            "  {name}: {calls} calls, usec_per_call {usec:.2} (engine {engine:.2}), master CPU {cpu:.1} µs/call, {rps:.0} calls/s"
        );
        append_json(&out.join("scripts.jsonl"), &row)?;
    }
    let keys = ["denied", "returning", "returning:two"].map(|k| format!("{KEY_PREFIX}{k}"));
    master.query::<u64>(redis::cmd("DEL").arg(&keys))?;
    Ok(commands)
}

/// The `rps` of the last test in `redis-benchmark --csv` output (quoted fields).
pub fn benchmark_rps(csv: &str) -> Result<f64> {
    let mut lines = csv.lines().filter(|line| line.starts_with('"'));
    let fields = |line: &str| -> Vec<String> {
        line.split("\",\"")
            .map(|f| f.trim_matches('"').to_owned())
            .collect()
    };
    let header = fields(
        lines
            .next()
            .context("redis-benchmark printed no CSV header")?,
    );
    let column = header
        .iter()
        .position(|name| name == "rps")
        .context("redis-benchmark's CSV has no rps column")?;
    let last = lines
        .next_back()
        .context("redis-benchmark printed no result (did the script run? see its output)")?;
    let rps = fields(last)
        .get(column)
        .cloned()
        .with_context(|| format!("no rps field in {last:?}"))?;
    rps.parse()
        .with_context(|| format!("redis-benchmark's rps {rps:?} is not a number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_script_call_is_split_into_its_commands_and_the_engine() {
        // 200 000 calls; EVALSHA 1 422 000 µs of which TIME 20 000, HMGET 196 000, HSET
        // 104 000 and PEXPIRE 76 000: the engine is the remaining 1 026 000.
        let delta = CommandStats::parse(
            "cmdstat_evalsha:calls=200000,usec=1422000\ncmdstat_time:calls=200000,usec=20000\n\
             cmdstat_hmget:calls=200000,usec=196000\ncmdstat_hset:calls=100000,usec=104000\n\
             cmdstat_pexpire:calls=100000,usec=76000\n",
        );
        let row = ScriptRow::compute("allow-heavy", &delta, (272, 124), 64579.2, 100);
        assert_eq!(
            (row.calls, row.usec_per_call, row.hmget, row.engine),
            (200_000, 7.11, 0.98, 5.13)
        );
        assert_eq!(
            (row.master_cpu, row.client_cpu, row.calls_per_second),
            (13.6, 6.2, 64579.0)
        );
    }

    #[test]
    fn the_rate_is_read_from_the_csv_output_and_none_is_an_error() {
        let csv = "\"test\",\"rps\",\"avg_latency_ms\"\n\"EVALSHA abc 1 k:__rand_int__ 1,2\",\"17391.30\",\"2.199\"\n";
        assert_eq!(benchmark_rps(csv).unwrap(), 17391.3);
        assert!(benchmark_rps("Error: NOSCRIPT\n\"test\",\"rps\"\n").is_err());
        assert!(benchmark_rps("").is_err());
    }
}
