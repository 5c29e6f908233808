//! The report of `scripts/bench.sh`, rendered from the run's JSON alone (run/bench/:
//! `run.json`, `results.jsonl`): every table by one function, [`table`], from a list of
//! columns; the goals from a list of figures ([`GOALS`]); and `--record`, which writes the
//! result into docs/BENCHMARKS.md.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::machine::Machine;

/// Everything about the run that is not a measurement (run/bench/run.json).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunInfo {
    pub started: String,
    pub machine: Machine,
    pub software: String,
    pub service: String,
    /// The load average before and after.
    pub load: (String, String),
    pub rounds: u32,
    pub duration_s: u32,
    pub threads: u32,
    pub elapsed_s: u64,
    pub quiet_max: u32,
    /// Measurements taken again, and kept although others still used the machine.
    pub retaken: (u32, u32),
    /// `NAME=value` of the instance settings passed through beyond each phase's policy.
    pub instance_settings: Vec<String>,
    pub invocation: String,
    pub commands: Vec<String>,
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    (n > 0).then(|| (sorted[(n - 1) / 2] + sorted[n / 2]) / 2.0)
}

fn field<'a>(record: &'a Value, name: &str) -> &'a Value {
    name.split('.').fold(record, |value, key| &value[key])
}

/// A value as a cell shows it: a string without its quotes.
pub fn text(value: &Value) -> String {
    value.as_str().map_or(value.to_string(), str::to_owned)
}

/// A Markdown table of `records`: one row per distinct key, each other cell made from
/// the records of that key. The one function every table of the reports goes through.
///
/// `columns`, one a line: its header | the record's field (`cpu.app` reaches into `cpu`)
/// | how the cell is made: `key` (the rows are the distinct keys, in the order first
/// seen), `median D` (over the rounds, D decimals; `-` when there is none), `max D`, `sum`.
pub fn table(records: &[Value], columns: &str) -> String {
    let columns: Vec<[&str; 3]> = columns
        .lines()
        .map(|line| [0, 1, 2].map(|i| line.split(" | ").nth(i).unwrap_or_default().trim()))
        .collect();
    let headers: Vec<&str> = columns.iter().map(|c| c[0]).collect();
    let mut out = format!("| {} |\n|", headers.join(" | "));
    for [_, _, cell] in &columns {
        out.push_str(if *cell == "key" { "---|" } else { "--:|" });
    }
    out.push('\n');
    let key = |r: &Value| -> Vec<String> {
        let keys = columns.iter().filter(|c| c[2] == "key");
        keys.map(|c| text(field(r, c[1]))).collect()
    };
    let mut keys: Vec<Vec<String>> = Vec::new();
    for record in records {
        if !keys.contains(&key(record)) {
            keys.push(key(record));
        }
    }
    for k in keys {
        let rows: Vec<&Value> = records.iter().filter(|r| key(r) == k).collect();
        let cells = columns.iter().map(|&[_, name, cell]| {
            let values = rows.iter().filter_map(|r| field(r, name).as_f64());
            let values: Vec<f64> = values.collect();
            let (how, decimals) = cell.split_once(' ').unwrap_or((cell, "0"));
            let d: usize = decimals.parse().unwrap_or(0);
            let fixed = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:.d$}"));
            match how {
                "key" => text(field(rows[0], name)),
                "median" => fixed(median(&values)),
                "max" => fixed(values.iter().copied().reduce(f64::max)),
                _ => format!("{}", values.iter().sum::<f64>()),
            }
        });
        let _ = writeln!(out, "| {} |", cells.collect::<Vec<_>>().join(" | "));
    }
    out
}

const MEDIANS: &str = "\
phase | phase | key
load | tool | key
via | via | key
path | path | key
conns | connections | key
req/s | per_second | median 0
p50 ms | p50_ms | median 2
p99 ms | p99_ms | median 2
max ms | max_ms | max 2
200 | ok | sum
429 | denied | sum
other | other | sum
app µs/req | cpu.app | median 1
Nginx µs/req | cpu.nginx | median 1
bench's Nginx µs/req | cpu.proxy | median 1
Redis master µs/req | cpu.master | median 1
replicas µs/req | cpu.replicas | median 1
sentinels µs/req | cpu.sentinels | median 1
demo upstream µs/req | cpu.upstream | median 1
load gen µs/req | cpu.load_generator | median 1
other processes % | others_percent | median 0
script calls/req | script_calls_per_request | median 3
Redis µs/call | usec_per_script_call | median 2
";
/// The goals of the performance issue and the figures that explain them, one a line:
/// what | figure | goal (`>= X`, `<= X` or `-`). A figure's parts are separated by `;`:
/// `median`, `max` or `sum`, a field and a target (`phase:via:path:connections`) of
/// results.jsonl (`sum` without a target: every measurement); `ratio` and `less`, a
/// field and two targets: the ratios paired round by round (their median and range) and
/// the difference of the medians.
pub const GOALS: &str = "\
2. `/limited_endpoint` ÷ `/` req/s, allow policy, Nginx, 64 connections | ratio; per_second; allow:nginx:/limited_endpoint:64; allow:nginx:/:64 | >= 0.6
2. the same at 16 connections | ratio; per_second; allow:nginx:/limited_endpoint:16; allow:nginx:/:16 | -
2. responses other than 200/429 in every measurement of the run | sum; other | <= 0
2. p99 ms of the worst round, allow, Nginx, 64 connections | max; p99_ms; allow:nginx:/limited_endpoint:64 | <= 10
3. app CPU µs per decision, allow, Nginx, 64 connections | median; cpu.app; allow:nginx:/limited_endpoint:64 | <= 18
3. what the decision adds to a `/` request | less; cpu.app; allow:nginx:/limited_endpoint:64; allow:nginx:/:64 | -
3. app CPU µs per decision with `REDIS_CLIENT=pool` | median; cpu.app; allow-pool:nginx:/limited_endpoint:64 | <= 18
3. app CPU µs per decision without Redis (embedded store, directly) | median; cpu.app; memory-store:direct:/limited_endpoint:64 | -
3. app CPU µs per decision with `METRICS=off` | median; cpu.app; metrics-off:nginx:/limited_endpoint:64 | -
4. Redis µs per script call under HTTP load (allow, Nginx, 64 connections) | median; usec_per_script_call; allow:nginx:/limited_endpoint:64 | -
5. `/limited_endpoint` ÷ `/` req/s, one client flooding through Nginx, deny cache on | ratio; per_second; flood:nginx:/limited_endpoint:64; flood:nginx:/:64 | >= 0.9
5. script calls per request while flooding | median; script_calls_per_request; flood:nginx:/limited_endpoint:64 | -
5. the ratio with `DENY_CACHE_SIZE=0` | ratio; per_second; flood-nocache:nginx:/limited_endpoint:64; flood-nocache:nginx:/:64 | -
7. `/limited_endpoint` ÷ `/` req/s under the two-limit policy | ratio; per_second; two-limits:nginx:/limited_endpoint:64; two-limits:nginx:/:64 | -
8. admitted req/s through the gateway ÷ through Nginx straight to the upstream | ratio; admitted_per_second; gateway:gateway:/api/items:64; gateway:proxy:/api/items:64 | >= 0.5
8. requests the demo upstream counted through the gateway | sum; upstream; gateway:gateway:/api/items:64 | -
8. admitted req/s through the gateway ÷ through the in-Nginx Lua limiter (`PEER_LUA`) | ratio; admitted_per_second; gateway:gateway:/api/items:64; gateway:peer:/api/items:64 | >= 1.5
8. p99 ms through the gateway less through the Lua limiter | less; p99_ms; gateway:gateway:/api/items:64; gateway:peer:/api/items:64 | <= 0
8. machine CPU µs per request through the gateway (every process, the load generator too) | median; machine_us_per_request; gateway:gateway:/api/items:64 | -
8. the same through the Lua limiter | median; machine_us_per_request; gateway:peer:/api/items:64 | -
8. the same straight to the upstream | median; machine_us_per_request; gateway:proxy:/api/items:64 | -
";

fn fmt_g(x: f64) -> String {
    let text = format!("{x:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// A figure's value, and the range of its rounds for a ratio.
type Found = Option<(f64, Option<(f64, f64)>)>;

/// Everything the figures read: the measurements (results.jsonl).
pub struct Records(pub Vec<Value>);

impl Records {
    /// The records of a target, `phase:via:path:connections`.
    fn target(&self, spec: &str) -> Vec<&Value> {
        let parts: Vec<&str> = spec.split(':').collect();
        let is = |r: &&Value| {
            let key = [&r["phase"], &r["via"], &r["path"], &r["connections"]].map(text);
            key.iter().zip(&parts).all(|(have, want)| have == want)
        };
        self.0.iter().filter(is).collect()
    }

    fn values(&self, name: &str, spec: &str) -> Vec<f64> {
        let values = self.target(spec).into_iter();
        values.filter_map(|r| field(r, name).as_f64()).collect()
    }

    /// The value of one figure (see [`GOALS`]); `None` when it was not measured.
    pub fn figure(&self, spec: &str) -> Found {
        let parts: Vec<&str> = spec.split(';').map(str::trim).collect();
        let plain = |v: Option<f64>| v.map(|v| (v, None));
        let sum = |v: Vec<f64>| (!v.is_empty()).then(|| v.iter().sum());
        match parts[..] {
            ["median", f, t] => plain(median(&self.values(f, t))),
            ["max", f, t] => plain(self.values(f, t).into_iter().reduce(f64::max)),
            ["sum", f, t] => plain(sum(self.values(f, t))),
            ["sum", f] => plain(sum(self.0.iter().filter_map(|r| r[f].as_f64()).collect())),
            ["less", f, a, b] => {
                let (a, b) = (median(&self.values(f, a)), median(&self.values(f, b)));
                plain(a.zip(b).map(|(a, b)| a - b))
            }
            ["ratio", f, top, bottom] => {
                let tops = self.target(top);
                let ratio = |b: &&Value| {
                    let t = tops.iter().find(|t| t["round"] == b["round"])?;
                    Some(field(t, f).as_f64()? / field(b, f).as_f64().filter(|v| *v > 0.0)?)
                };
                let ratios: Vec<f64> = self.target(bottom).iter().filter_map(ratio).collect();
                let low = ratios.iter().copied().reduce(f64::min);
                let high = ratios.iter().copied().reduce(f64::max);
                median(&ratios).map(|m| (m, low.zip(high)))
            }
            _ => None,
        }
    }

    /// The goals table: each figure, its value, the goal and whether it is met.
    pub fn goals(&self) -> String {
        let mut out = String::from("| figure | value | goal | verdict |\n|---|--:|---|---|\n");
        for line in GOALS.lines() {
            let [what, figure, goal] = [0, 1, 2].map(|i| line.split(" | ").nth(i).unwrap_or("-"));
            let found = self.figure(figure);
            let value = match found {
                Some((v, Some((low, high)))) => format!("**{v:.2}** ({low:.2}–{high:.2})"),
                Some((v, None)) => format!("**{}**", fmt_g(v)),
                None => "-".into(),
            };
            let (op, target) = goal.split_once(' ').unwrap_or(("-", ""));
            let target: f64 = target.parse().unwrap_or(f64::NAN);
            let met = found.map(|(v, _)| if op == ">=" { v >= target } else { v <= target });
            let verdict = match (op, met) {
                ("-", _) => "",
                (_, None) => "not measured",
                (_, Some(true)) => "met",
                (_, Some(false)) => "MISSED",
            };
            let goal = goal.replace(">=", "≥").replace("<=", "≤");
            let _ = writeln!(out, "| {what} | {value} | {goal} | {verdict} |");
        }
        out
    }
}

pub fn read_jsonl(path: &Path) -> Result<Vec<Value>> {
    let text = fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|line| serde_json::from_str(line).with_context(|| format!("in {}", path.display())))
        .collect()
}

/// The whole report of the run in `dir`: the block `--record` writes.
pub fn render(dir: &Path) -> Result<String> {
    let info: RunInfo = serde_json::from_str(&fs::read_to_string(dir.join("run.json"))?)?;
    let records = Records(read_jsonl(&dir.join("results.jsonl"))?);
    let RunInfo {
        started,
        software,
        service,
        rounds,
        duration_s,
        threads,
        elapsed_s,
        quiet_max,
        ..
    } = &info;
    let ((before, after), (retaken, busy)) = (&info.load, info.retaken);
    let machine = info.machine.describe();
    let others = records
        .0
        .iter()
        .filter_map(|r| r["others_percent"].as_f64());
    let others: Vec<f64> = others.collect();
    let median_others = median(&others).map_or("-".into(), fmt_g);
    let highest = fmt_g(others.iter().copied().fold(0.0, f64::max));
    let settings = match info.instance_settings.join(" ") {
        none if none.is_empty() => "defaults".into(),
        some => some,
    };
    Ok(format!(
        "## Run of {started}\n\n- Machine: {machine}\n- Software: {software}\n- Service: {service}\n\
         - Load average before/after: {before} / {after}; the \"other processes\" column is the CPU every process outside the topology and the load generator used during each measurement, in % of all cores\n\
         - {rounds} rounds of {duration_s} s per measurement, wrk with {threads} thread(s); whole run {elapsed_s} s\n\
         - Measurements taken again because other processes used more than {quiet_max}% of the machine: {retaken}; kept although still above it: {busy}\n\
         - CPU used by processes outside the benchmark during the kept measurements: median {median_others}%, highest {highest}% of the machine\n\
         - Instance settings beyond each phase's policy: {settings}\n\n### Goals\n\n\
         {}\n\
         ### Medians over the rounds\n\nCPU columns are µs of CPU time (user + system, from `/proc/PID/stat`) per answered request; \"app\" is both instances together; \"bench's Nginx\" the ones the gateway phase starts in front of the demo upstream (straight to it, or running the in-Nginx Lua limiter of `PEER_LUA`). \"other\" counts statuses other than 200 and 429 plus socket errors. \"script calls/req\" is EVALSHA+EVAL seen by the master(s) per answered request; \"Redis µs/call\" their `usec` ÷ `calls` from `INFO commandstats`.\n\n{}\n\
         ### Commands\n\n`PORT` is a free port chosen at run time.\n\n```sh\n{}\n{}\n```\n",
        records.goals(),
        table(&records.0, MEDIANS),
        info.invocation,
        info.commands.join("\n"),
    ))
}

/// Writes a run's report to `out`/report.md and prints it; with `record`, also between
/// `<!-- NAME:begin -->` and `<!-- NAME:end -->` of docs/BENCHMARKS.md (the block appended
/// if missing), the prose around it left as it is.
pub fn publish(root: &Path, out: &Path, text: &str, record: Option<&str>) -> Result<()> {
    fs::write(out.join("report.md"), text)?;
    println!("\n{text}");
    let Some(name) = record else {
        return Ok(());
    };
    let path = root.join("docs/BENCHMARKS.md");
    let doc = fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n".into());
    let written = fs::write(&path, replace_block(&doc, name, text));
    written.with_context(|| format!("cannot write {}", path.display()))?;
    crate::say!("recorded in docs/BENCHMARKS.md");
    Ok(())
}

pub fn replace_block(doc: &str, name: &str, body: &str) -> String {
    let [begin, end] = ["begin", "end"].map(|edge| format!("<!-- {name}:{edge} -->"));
    let body = body.trim_end_matches('\n');
    let Some((before, rest)) = doc.split_once(&format!("{begin}\n")) else {
        let doc = doc.trim_end_matches('\n');
        return format!("{doc}\n\n{begin}\n{body}\n{end}\n");
    };
    let after = rest.split_once(&end).map_or("\n", |(_, after)| after);
    format!("{before}{begin}\n{body}\n{end}{after}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const L: &str = "/limited_endpoint";
    const R: &str = "/";

    fn row(round: u32, path: &str, per_second: f64, app: f64) -> Value {
        let usec = if path == L { json!(6.2) } else { Value::Null };
        json!({"phase": "allow", "round": round, "tool": "wrk", "via": "nginx", "path": path, "connections": 64,
               "per_second": per_second, "p99_ms": 3.0 + f64::from(round) / 10.0, "max_ms": 9.0,
               "ok": per_second * 5.0, "denied": 0, "other": 0, "cpu": {"app": app, "nginx": 14.8},
               "usec_per_script_call": usec})
    }

    /// Three rounds of the allow phase through Nginx: ratios 0.55, 0.56 and 0.58.
    fn allow() -> Records {
        Records(vec![
            row(1, L, 39050.0, 15.9),
            row(1, R, 71000.0, 8.7),
            row(2, R, 70000.0, 8.8),
            row(2, L, 39200.0, 15.8),
            row(3, L, 41180.0, 15.7),
            row(3, R, 71000.0, 8.6),
        ])
    }

    #[test]
    fn a_table_has_one_row_of_medians_per_key_in_the_order_first_seen() {
        let table = table(&allow().0, MEDIANS);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[0].starts_with("| phase | load | via | path | conns | req/s |"));
        assert!(lines[1].starts_with("|---|---|---|---|---|--:|"));
        let first = "| allow | wrk | nginx | /limited_endpoint | 64 | 39200 | - | 3.20 | 9.00 | 597150 | 0 | 0 | 15.8 | 14.8 | - |";
        assert!(lines[2].starts_with(first), "{}", lines[2]);
        let last = lines[3];
        assert!(last.ends_with("| - | - |"), "no script calls: {last}");
    }

    #[test]
    fn goals_read_the_figures_against_their_targets_and_a_ratio_pairs_the_rounds() {
        let figure = "ratio; per_second; allow:nginx:/limited_endpoint:64; allow:nginx:/:64";
        assert_eq!(allow().figure(&figure.replace("allow", "flood")), None);
        let goals = allow().goals();
        let line = |start: &str| {
            let found = goals.lines().find(|l| l.starts_with(&format!("| {start}")));
            found
                .unwrap_or_else(|| panic!("{start}: {goals}"))
                .to_owned()
        };
        assert!(line("2. `/limited").ends_with("| **0.56** (0.55–0.58) | ≥ 0.6 | MISSED |"));
        assert!(line("2. p99 ms").ends_with("| **3.3** | ≤ 10 | met |"));
        assert!(line("3. what the decision adds").ends_with("| **7.1** | - |  |"));
        let pool = line("3. app CPU µs per decision with `REDIS");
        assert!(pool.ends_with("| - | ≤ 18 | not measured |"));
        assert!(line("4. Redis µs per script call").ends_with("| **6.2** | - |  |"));
        assert_eq!(goals.lines().count(), GOALS.lines().count() + 2);
    }

    #[test]
    fn a_block_is_replaced_and_the_prose_around_it_kept_or_appended() {
        let doc = "# B\n\n<!-- bench.sh:begin -->\nold\n<!-- bench.sh:end -->\n\nmore\n<!-- memory.sh:begin -->\nb\n<!-- memory.sh:end -->\n";
        let updated = replace_block(doc, "bench.sh", "## Run\n\nnew\n");
        assert_eq!(updated, doc.replace("old\n", "## Run\n\nnew\n"));
        let appended = "# B\n\n<!-- x:begin -->\nbody\n<!-- x:end -->\n";
        assert_eq!(replace_block("# B\n", "x", "body\n"), appended);
    }
}
