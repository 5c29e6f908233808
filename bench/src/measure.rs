//! One measurement: what ran, and what each process group spent per answered request,
//! kept at the precision the tables print as one JSON line of run/bench/results.jsonl.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::cluster::Groups;
use crate::phases::Target;
use crate::process::{MachineTicks, ticks_of};

/// The process groups whose CPU is counted, as the records name them.
pub const GROUPS: &str = "app nginx master replicas sentinels upstream proxy";

/// The counters read right before and right after a load generator ran.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub ticks: BTreeMap<&'static str, u64>,
    pub machine: MachineTicks,
    /// The script's calls and usec on the masters.
    pub redis: (u64, u64),
}

impl Snapshot {
    pub fn take(groups: &Groups, redis: (u64, u64)) -> Self {
        let ticks = groups
            .iter()
            .map(|(name, pids)| (*name, ticks_of(pids)))
            .collect();
        let machine = MachineTicks::read();
        Self {
            ticks,
            machine,
            redis,
        }
    }
}

/// What the load generator reported: requests, seconds, p50/p99/max ms, the 200s, the
/// 429s and the rest (other statuses and requests that got no answer), and the requests
/// the demo upstream counted for the path (gateway phase).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Traffic {
    pub requests: u64,
    pub seconds: f64,
    pub latency_ms: [f64; 3],
    pub statuses: [u64; 3],
    pub upstream: u64,
}

/// `x` rounded to `decimals` places, as the tables print it, so medians print alike.
pub fn round_to(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (x * scale).round() / scale
}

/// One record: what happened between two snapshots, divided by the answered requests.
/// `generator_ticks` is what the load generator itself used; `hz` is CLK_TCK.
pub fn compute(
    (phase, round): (&str, u32),
    target: &Target,
    traffic: &Traffic,
    (before, after): (&Snapshot, &Snapshot),
    generator_ticks: u64,
    hz: u64,
) -> Value {
    let (n, [ok, denied, other]) = (traffic.requests, traffic.statuses);
    let [p50_ms, p99_ms, max_ms] = traffic.latency_ms.map(|ms| round_to(ms, 2));
    let q = n.max(1) as f64;
    let cpu = |ticks: u64| round_to(ticks as f64 * 1e6 / hz as f64 / q, 1);
    let delta = |name: &str| {
        let ticks = |s: &Snapshot| s.ticks.get(name).copied().unwrap_or(0);
        ticks(after).saturating_sub(ticks(before))
    };
    let mut cpu_of: BTreeMap<&str, f64> = GROUPS.split(' ').map(|g| (g, cpu(delta(g)))).collect();
    cpu_of.insert("load_generator", cpu(generator_ticks));
    let accounted = GROUPS.split(' ').map(delta).sum::<u64>() + generator_ticks;
    let all = after.machine.all.saturating_sub(before.machine.all);
    let busy = after.machine.busy.saturating_sub(before.machine.busy);
    // CPU every process outside the topology and the load generator used, in % of the machine.
    let others = 100.0 * busy.saturating_sub(accounted) as f64 / all.max(1) as f64;
    let calls = after.redis.0.saturating_sub(before.redis.0) as f64;
    let usec = after.redis.1.saturating_sub(before.redis.1) as f64;
    // Without script calls of its own (a stray one is not the path's), no figure.
    let usec_per_call = (calls / q >= 0.01).then(|| round_to(usec / calls, 2));
    let per_second = if traffic.seconds > 0.0 {
        n as f64 / traffic.seconds
    } else {
        0.0
    };
    json!({
        "phase": phase, "round": round, "tool": target.tool, "via": target.via, "path": target.path,
        "connections": target.connections, "requests": n, "seconds": round_to(traffic.seconds, 2),
        "per_second": round_to(per_second, 0), "admitted_per_second": round_to(per_second * ok.min(n) as f64 / q, 0),
        "p50_ms": p50_ms, "p99_ms": p99_ms, "max_ms": max_ms,
        "ok": ok, "denied": denied, "other": other, "upstream": traffic.upstream,
        "cpu": cpu_of, "others_percent": round_to(others, 1), "machine_us_per_request": cpu(busy),
        "script_calls_per_request": round_to(calls / q, 3), "usec_per_script_call": usec_per_call,
    })
}

/// The line printed as each measurement ends.
pub fn progress_line(r: &Value) -> String {
    let text = |k: &str| crate::report::text(&r[k]);
    let [phase, round, tool, via, path] = ["phase", "round", "tool", "via", "path"].map(text);
    let [c, ok, denied, other] = ["connections", "ok", "denied", "other"].map(text);
    let number = |v: &Value| v.as_f64().unwrap_or(0.0);
    let [rate, p99, others] = ["per_second", "p99_ms", "others_percent"].map(|k| number(&r[k]));
    let cpu = |g: &str| number(&r["cpu"][g]);
    let (app, nginx, redis) = (cpu("app"), cpu("nginx") + cpu("proxy"), cpu("master"));
    format!(
        "{phase} r{round} {tool} {via} {path} c{c}: {rate:.0} req/s, p99 {p99:.2} ms, 200:{ok} 429:{denied} other:{other}; \
         µs/req app {app:.1} nginx {nginx:.1} redis {redis:.1}; others {others:.0}%"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phases::{Tool, Via};

    /// Counters where `ticks` name each group's, and the script ran 6 µs a call.
    fn snapshot(ticks: &[(&'static str, u64)], busy: u64, all: u64, calls: u64) -> Snapshot {
        let (ticks, machine) = (ticks.iter().copied().collect(), MachineTicks { busy, all });
        let redis = (calls, calls * 6);
        Snapshot {
            ticks,
            machine,
            redis,
        }
    }

    #[test]
    fn cpu_is_divided_by_the_answered_requests_and_others_never_go_below_zero() {
        let target = Target {
            tool: Tool::Wrk,
            via: Via::Nginx,
            path: "/limited_endpoint",
            connections: 64,
        };
        // 100 000 requests in 5 s; the instances used 160 ticks (1.6 s at 100 Hz). The
        // machine: 1000 ticks, 550 busy; the groups and wrk (60) account for 490.
        let (latency_ms, statuses) = ([1.234, 0.0, 0.0], [50_000, 0, 0]);
        let traffic = Traffic {
            requests: 100_000,
            seconds: 5.0,
            latency_ms,
            statuses,
            upstream: 0,
        };
        let groups = [
            ("app", 160),
            ("nginx", 150),
            ("master", 90),
            ("replicas", 30),
        ];
        let before = snapshot(&[], 0, 0, 0);
        let after = snapshot(&groups, 550, 1000, 100_000);
        let row = compute(("allow", 1), &target, &traffic, (&before, &after), 60, 100);
        let figures = [
            "per_second",
            "admitted_per_second",
            "p50_ms",
            "others_percent",
        ];
        assert_eq!(figures.map(|k| &row[k]), [20_000.0, 10_000.0, 1.23, 6.0]);
        let cpu = ["app", "nginx", "master", "load_generator"].map(|g| &row["cpu"][g]);
        assert_eq!(cpu, [16.0, 15.0, 9.0, 6.0]);
        let named = ["usec_per_script_call", "tool", "via"].map(|k| &row[k]);
        assert_eq!(named, [&json!(6.0), &json!("wrk"), &json!("nginx")]);
        let (idle, none) = (snapshot(&[("app", 10)], 5, 100, 0), Traffic::default());
        let idle = compute(("flood", 2), &target, &none, (&before, &idle), 0, 100);
        let figures = (&idle["others_percent"], &idle["usec_per_script_call"]);
        assert_eq!(figures, (&json!(0.0), &Value::Null));
    }
}
