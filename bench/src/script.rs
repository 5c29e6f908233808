//! The Lua script alone: one `redis-benchmark` run of EVALSHA, and what Redis counted
//! during it, per script call.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::redis_info::CommandStats;
use crate::stats::round_to;

/// The commands the scripts run; their `usec` is not the script engine's.
const INNER_COMMANDS: [&str; 6] = ["time", "hmget", "hset", "pexpire", "get", "setex"];

/// One row of the script table. Kept at the precision it prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScriptRow {
    pub name: String,
    pub calls: u64,
    /// `usec` ÷ `calls` of EVALSHA: the commands the script runs included.
    pub usec_per_call: f64,
    /// The master's CPU from `/proc`, µs per call.
    pub master_cpu: f64,
    pub calls_per_second: f64,
    /// `usec` of each command the script runs, per script call.
    pub time: f64,
    pub hmget: f64,
    pub hset: f64,
    pub pexpire: f64,
    /// The rest of `usec_per_call`: the Lua call, its argument tables, the arithmetic, the reply.
    pub engine: f64,
    /// redis-benchmark's own CPU, µs per call.
    pub client_cpu: f64,
}

/// What one run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct ScriptRun<'a> {
    pub name: &'a str,
    pub before: &'a CommandStats,
    pub after: &'a CommandStats,
    pub master_ticks: u64,
    pub client_ticks: u64,
    pub calls_per_second: f64,
}

impl ScriptRow {
    pub fn compute(run: &ScriptRun<'_>, hz: u64) -> Self {
        let delta = run.before.delta_until(run.after);
        let evalsha = delta.get("evalsha");
        let q = evalsha.calls.max(1) as f64;
        let per_call = |usec: u64| round_to(usec as f64 / q, 2);
        let cpu = |ticks: u64| round_to(ticks as f64 * 1e6 / hz as f64 / q, 1);
        let inner: u64 = INNER_COMMANDS.iter().map(|name| delta.get(name).usec).sum();
        Self {
            name: run.name.to_owned(),
            calls: evalsha.calls,
            usec_per_call: per_call(evalsha.usec),
            master_cpu: cpu(run.master_ticks),
            calls_per_second: round_to(run.calls_per_second, 0),
            time: per_call(delta.get("time").usec),
            hmget: per_call(delta.get("hmget").usec),
            hset: per_call(delta.get("hset").usec),
            pexpire: per_call(delta.get("pexpire").usec),
            engine: round_to((evalsha.usec as f64 - inner as f64) / q, 2),
            client_cpu: cpu(run.client_ticks),
        }
    }

    /// The table row of the report.
    pub fn markdown(&self) -> String {
        format!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} | {:.0} |",
            self.name,
            self.calls,
            self.usec_per_call,
            self.time,
            self.hmget,
            self.hset,
            self.pexpire,
            self.engine,
            self.master_cpu,
            self.client_cpu,
            self.calls_per_second
        )
    }

    pub fn progress_line(&self) -> String {
        format!(
            "{}: {} calls, usec_per_call {:.2} (TIME {:.2}, HMGET {:.2}, HSET {:.2}, PEXPIRE {:.2}, the rest {:.2}), \
             master CPU {:.1} µs/call, client {:.1} µs/call, {:.0} calls/s",
            self.name,
            self.calls,
            self.usec_per_call,
            self.time,
            self.hmget,
            self.hset,
            self.pexpire,
            self.engine,
            self.master_cpu,
            self.client_cpu,
            self.calls_per_second
        )
    }
}

/// The `rps` of the last test in `redis-benchmark --csv` output.
pub fn benchmark_rps(csv: &str) -> Result<f64> {
    let mut lines = csv.lines().filter(|line| line.starts_with('"'));
    let header = csv_fields(
        lines
            .next()
            .context("redis-benchmark printed no CSV header")?,
    );
    let column = header
        .iter()
        .position(|name| name == "rps")
        .context("redis-benchmark's CSV has no rps column")?;
    let Some(last) = lines.next_back() else {
        bail!("redis-benchmark printed no result (did the script run? see its output)");
    };
    let fields = csv_fields(last);
    let rps = fields
        .get(column)
        .with_context(|| format!("a CSV line without an rps field: {last:?}"))?;
    rps.parse()
        .with_context(|| format!("redis-benchmark's rps {rps:?} is not a number"))
}

/// Fields of one CSV line whose fields are quoted (and hold no quotes).
fn csv_fields(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => fields.push(std::mem::take(&mut field)),
            _ => field.push(c),
        }
    }
    fields.push(field);
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_script_call_is_split_into_its_commands_and_the_engine() {
        // 200 000 calls; EVALSHA 1 422 000 µs of which TIME 20 000, HMGET 196 000, HSET
        // 104 000 and PEXPIRE 76 000: the engine is the remaining 1 026 000.
        let before =
            CommandStats::parse("cmdstat_evalsha:calls=6,usec=42\ncmdstat_info:calls=3,usec=9\n");
        let after = CommandStats::parse(
            "cmdstat_evalsha:calls=200006,usec=1422042\ncmdstat_time:calls=200000,usec=20000\n\
             cmdstat_hmget:calls=200000,usec=196000\ncmdstat_hset:calls=100000,usec=104000\n\
             cmdstat_pexpire:calls=100000,usec=76000\ncmdstat_info:calls=4,usec=12\n",
        );
        let run = ScriptRun {
            name: "allow-heavy",
            before: &before,
            after: &after,
            master_ticks: 272,
            client_ticks: 124,
            calls_per_second: 64579.2,
        };
        let row = ScriptRow::compute(&run, 100);
        assert_eq!(row.calls, 200_000);
        assert_eq!(row.usec_per_call, 7.11);
        assert_eq!(row.hmget, 0.98);
        assert_eq!(row.engine, 5.13);
        assert_eq!(row.master_cpu, 13.6);
        assert_eq!(row.client_cpu, 6.2);
        assert_eq!(
            row.markdown(),
            "| allow-heavy | 200000 | 7.11 | 0.10 | 0.98 | 0.52 | 0.38 | 5.13 | 13.6 | 6.2 | 64579 |"
        );
    }

    #[test]
    fn the_rate_is_read_from_the_csv_output() {
        let csv = "\"test\",\"rps\",\"avg_latency_ms\"\n\"EVALSHA abc 1 k:__rand_int__ 1,2\",\"17391.30\",\"2.199\"\n";
        assert_eq!(benchmark_rps(csv).unwrap(), 17391.3);
    }

    #[test]
    fn csv_output_without_a_result_is_an_error() {
        let csv = "Error from server: NOSCRIPT No matching script.\n\"test\",\"rps\"\n";
        assert!(benchmark_rps(csv).is_err());
        assert!(benchmark_rps("").is_err());
    }
}
