//! The Lua script alone: `redis-benchmark` runs EVALSHA of each case on the master (its
//! replicas attached), and what Redis counted meanwhile is split per script call into the
//! commands the script runs and the rest. Rows go to run/bench/scripts.jsonl.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

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

/// One row of the script table, at the precision it prints: `usec_per_call` of EVALSHA
/// (the commands the script runs included), the `usec` of each command it runs per script
/// call, "engine" (the rest: the Lua call, its argument tables, the arithmetic, the
/// reply), the master's CPU from `/proc` and redis-benchmark's own per call, and calls/s.
pub fn row(
    name: &str,
    delta: &CommandStats,
    (master, client): (u64, u64),
    secs: f64,
    hz: u64,
) -> Value {
    let (calls, usec) = delta.get("evalsha");
    let q = calls.max(1) as f64;
    let per_call = |name: &str| round_to(delta.get(name).1 as f64 / q, 2);
    let cpu = |ticks: u64| round_to(ticks as f64 * 1e6 / hz as f64 / q, 1);
    let inner: u64 = INNER.iter().map(|name| delta.get(name).1).sum();
    let engine = round_to((usec as f64 - inner as f64) / q, 2);
    let rate = (calls as f64 / secs.max(1e-3)).round() as u64;
    json!({
        "name": name, "calls": calls, "usec_per_call": per_call("evalsha"), "time": per_call("time"),
        "hmget": per_call("hmget"), "hset": per_call("hset"), "pexpire": per_call("pexpire"), "engine": engine,
        "master_cpu": cpu(master), "client_cpu": cpu(client), "calls_per_second": rate,
    })
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
    let slaves = master.info_field("replication", "connected_slaves");
    let slaves = slaves.unwrap_or_default();
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
        let shown = argv("PASSWORD").replace("''", "\"\"");
        commands.push(format!("redis-benchmark {shown}"));
        let log = out.join(format!("redis-benchmark-{name}.txt"));
        let (before, t0, started) = (master.command_stats()?, ticks_of(pids), Instant::now());
        let mut benchmark = Command::new("redis-benchmark");
        let argv = argv(master.password.as_deref().unwrap_or_default());
        // '' is an empty argument: Redis's own clock.
        benchmark.args(argv.split(' ').map(|w| if w == "''" { "" } else { w }));
        let (status, client_ticks) = run_counted(records, "redis-benchmark", &mut benchmark, &log)?;
        let secs = started.elapsed().as_secs_f64();
        let master_ticks = ticks_of(pids).saturating_sub(t0);
        let delta = master.command_stats()?.since(&before);
        if !status.success() {
            bail!("redis-benchmark failed: {}", tail(&log, 3));
        }
        let row = row(name, &delta, (master_ticks, client_ticks), secs, hz);
        let [calls, usec, engine, cpu, rate] = [
            "calls",
            "usec_per_call",
            "engine",
            "master_cpu",
            "calls_per_second",
        ]
        .map(|k| crate::report::text(&row[k]));
        say!(
            "  {name}: {calls} calls, usec_per_call {usec} (engine {engine}), master CPU {cpu} µs/call, {rate} calls/s"
        );
        append_json(&out.join("scripts.jsonl"), &row)?;
    }
    let keys = ["denied", "returning", "returning:two"].map(|k| format!("{KEY_PREFIX}{k}"));
    master.query::<u64>(redis::cmd("DEL").arg(&keys))?;
    Ok(commands)
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
        let row = row("allow-heavy", &delta, (272, 124), 3.097, 100);
        let figures = ["calls", "usec_per_call", "hmget", "engine"].map(|k| &row[k]);
        assert_eq!(figures, [200_000.0, 7.11, 0.98, 5.13]);
        let figures = ["master_cpu", "client_cpu", "calls_per_second"].map(|k| &row[k]);
        assert_eq!(figures, [13.6, 6.2, 64579.0]);
    }
}
