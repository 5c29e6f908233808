//! One measurement: what ran, and what each process group spent per answered request.
//! A [`Measurement`] is kept at the precision the tables print and saved as one JSON line
//! of run/bench/results.jsonl.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use loadtest::summary::Summary;

use crate::phases::{Target, Tool, Via};
use crate::probe::{Counts, WrkReport};
use crate::process::{MachineTicks, cpu_detail, ticks_of};

/// The process groups whose CPU is counted, as the records name them.
pub const GROUPS: &str = "app nginx master replicas sentinels upstream proxy";

/// The pids of each group (of [`GROUPS`]); the instances are `app`.
pub type Groups = BTreeMap<&'static str, Vec<u32>>;

/// The counters read right before and right after a load generator ran.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub ticks: BTreeMap<&'static str, u64>,
    pub machine: MachineTicks,
    /// The script's calls and usec on the masters.
    pub redis: (u64, u64),
    /// The instances' user and system ticks, context switches and threads.
    pub app: [u64; 4],
}

impl Snapshot {
    pub fn take(groups: &Groups, redis: (u64, u64)) -> Self {
        let ticks = groups
            .iter()
            .map(|(name, pids)| (*name, ticks_of(pids)))
            .collect();
        let mut app = [0; 4];
        for &pid in groups.get("app").into_iter().flatten() {
            app.iter_mut()
                .zip(cpu_detail(pid))
                .for_each(|(sum, value)| *sum += value);
        }
        Self {
            ticks,
            machine: MachineTicks::read(),
            redis,
            app,
        }
    }
}

/// What the load generator reported, and the responses by status.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Traffic {
    pub requests: u64,
    pub seconds: f64,
    /// p50, p99 and max.
    pub latency_ms: [f64; 3],
    /// 200s, 429s, and the rest: other statuses and requests that got no answer.
    pub statuses: [u64; 3],
    /// Requests the demo upstream counted for the path (gateway phase).
    pub upstream: u64,
}

impl Traffic {
    fn new(requests: u64, seconds: f64, latency_ms: [f64; 3], statuses: [u64; 3]) -> Self {
        Self {
            requests,
            seconds,
            latency_ms,
            statuses,
            upstream: 0,
        }
    }

    pub fn of_summary(summary: &Summary) -> Self {
        let latency_ms = summary
            .latency_ms
            .map_or([0.0; 3], |l| [l.p50, l.p99, l.max]);
        let c = &summary.classes;
        let statuses = [c.admitted, c.rejected, c.not_decided()];
        Self::new(
            summary.requests.answered,
            summary.elapsed_s,
            latency_ms,
            statuses,
        )
    }

    /// wrk's figures, and the statuses counted elsewhere (wrk only counts >= 400).
    pub fn of_wrk(report: &WrkReport, counts: &Counts) -> Self {
        let latency = &report.latency_us;
        let latency_ms = [latency.p50, latency.p99, latency.max].map(|us| us / 1e3);
        let statuses = [
            counts.ok,
            counts.denied,
            counts.other + report.socket_errors(),
        ];
        Self::new(
            report.requests,
            report.duration_us as f64 / 1e6,
            latency_ms,
            statuses,
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    pub phase: String,
    pub round: u32,
    pub tool: Tool,
    pub via: Via,
    pub path: String,
    pub connections: u32,
    pub requests: u64,
    pub seconds: f64,
    pub per_second: f64,
    /// Requests per second answered 200.
    pub admitted_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub ok: u64,
    pub denied: u64,
    pub other: u64,
    pub upstream: u64,
    /// µs of CPU per answered request of each group, and of the load generator.
    pub cpu: BTreeMap<String, f64>,
    /// CPU that every process outside the topology and the load generator used, in % of
    /// the machine.
    pub others_percent: f64,
    pub script_calls_per_request: f64,
    /// `usec` ÷ `calls` of the script calls; `None` without calls.
    pub usec_per_script_call: Option<f64>,
    pub app_user: f64,
    pub app_system: f64,
    pub switches_per_request: f64,
    /// The instances' threads at the end.
    pub threads: u64,
}

/// `x` rounded to `decimals` places, as the tables print it, so medians print alike.
pub fn round_to(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (x * scale).round() / scale
}

impl Measurement {
    /// Divides what happened between two snapshots by the answered requests.
    /// `generator_ticks` is what the load generator itself used; `hz` is CLK_TCK.
    pub fn compute(
        (phase, round): (&str, u32),
        target: &Target,
        traffic: &Traffic,
        before: &Snapshot,
        after: &Snapshot,
        generator_ticks: u64,
        hz: u64,
    ) -> Self {
        let (n, [ok, denied, other]) = (traffic.requests, traffic.statuses);
        let [p50_ms, p99_ms, max_ms] = traffic.latency_ms.map(|ms| round_to(ms, 2));
        let q = n.max(1) as f64;
        let cpu = |ticks: u64| round_to(ticks as f64 * 1e6 / hz as f64 / q, 1);
        let delta = |name: &str| {
            let ticks = |s: &Snapshot| s.ticks.get(name).copied().unwrap_or(0);
            ticks(after).saturating_sub(ticks(before))
        };
        let groups = GROUPS.split(' ');
        let mut cpu_of: BTreeMap<String, f64> = groups.map(|g| (g.into(), cpu(delta(g)))).collect();
        cpu_of.insert("load_generator".into(), cpu(generator_ticks));
        let accounted = GROUPS.split(' ').map(delta).sum::<u64>() + generator_ticks;
        let all = after.machine.all.saturating_sub(before.machine.all);
        let busy = after.machine.busy.saturating_sub(before.machine.busy);
        let others = 100.0 * busy.saturating_sub(accounted) as f64 / all.max(1) as f64;
        let calls = after.redis.0.saturating_sub(before.redis.0) as f64;
        let usec = after.redis.1.saturating_sub(before.redis.1) as f64;
        let per_second = (traffic.seconds > 0.0).then(|| n as f64 / traffic.seconds);
        let per_second = per_second.unwrap_or(0.0);
        let app = |i: usize| after.app[i].saturating_sub(before.app[i]);
        Self {
            phase: phase.to_owned(),
            round,
            tool: target.tool,
            via: target.via,
            path: target.path.to_owned(),
            connections: target.connections,
            requests: n,
            seconds: round_to(traffic.seconds, 2),
            per_second: round_to(per_second, 0),
            admitted_per_second: round_to(per_second * ok.min(n) as f64 / q, 0),
            p50_ms,
            p99_ms,
            max_ms,
            ok,
            denied,
            other,
            upstream: traffic.upstream,
            cpu: cpu_of,
            others_percent: round_to(others, 1),
            script_calls_per_request: round_to(calls / q, 3),
            // Without script calls of its own (a stray one is not the path's), no figure.
            usec_per_script_call: (calls / q >= 0.01).then(|| round_to(usec / calls, 2)),
            app_user: cpu(app(0)),
            app_system: cpu(app(1)),
            switches_per_request: round_to(app(2) as f64 / q, 2),
            threads: after.app[3],
        }
    }

    /// The line printed as each measurement ends.
    pub fn progress_line(&self) -> String {
        let (phase, round, tool, via, path) =
            (&self.phase, self.round, self.tool, self.via, &self.path);
        let (connections, per_second, p99_ms) = (self.connections, self.per_second, self.p99_ms);
        let (ok, denied, other, others) = (self.ok, self.denied, self.other, self.others_percent);
        let cpu = |g: &str| self.cpu.get(g).copied().unwrap_or(0.0);
        let (app, nginx, redis) = (cpu("app"), cpu("nginx") + cpu("proxy"), cpu("master"));
        format!(
            "{phase} r{round} {tool:?} {via:?} {path} c{connections}: {per_second:.0} req/s, p99 {p99_ms:.2} ms, \
             200:{ok} 429:{denied} other:{other}; µs/req app {app:.1} nginx {nginx:.1} redis {redis:.1}; others {others:.0}%"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(ticks: &[(&'static str, u64)], busy: u64, all: u64, script_calls: u64) -> Snapshot {
        let app = ticks.iter().find(|(g, _)| *g == "app").map_or(0, |t| t.1);
        let redis = (script_calls, script_calls * 6);
        let (ticks, machine) = (ticks.iter().copied().collect(), MachineTicks { busy, all });
        Snapshot {
            ticks,
            machine,
            redis,
            app: [app / 2, app / 2, 0, 12],
        }
    }

    const TARGET: Target = Target {
        tool: Tool::Wrk,
        via: Via::Nginx,
        path: "/limited_endpoint",
        connections: 64,
    };

    #[test]
    fn cpu_is_divided_by_the_answered_requests_and_others_never_go_below_zero() {
        // 100 000 requests in 5 s; the instances used 160 ticks (1.6 s at 100 Hz). The
        // machine: 1000 ticks, 550 busy; the groups and wrk (60) account for 490.
        let (requests, seconds, latency_ms) = (100_000, 5.0, [1.234, 0.0, 0.0]);
        let statuses = [50_000, 0, 0];
        let traffic = Traffic {
            requests,
            seconds,
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
        let (before, after) = (
            snapshot(&[], 0, 0, 0),
            snapshot(&groups, 550, 1000, 100_000),
        );
        let row = Measurement::compute(("allow", 1), &TARGET, &traffic, &before, &after, 60, 100);
        let figures = [
            row.per_second,
            row.admitted_per_second,
            row.p50_ms,
            row.others_percent,
        ];
        assert_eq!(figures, [20_000.0, 10_000.0, 1.23, 6.0]);
        let cpu = ["app", "nginx", "master", "load_generator"].map(|g| row.cpu[g]);
        assert_eq!(cpu, [16.0, 15.0, 9.0, 6.0]);
        assert_eq!(
            (row.usec_per_script_call, row.app_user, row.threads),
            (Some(6.0), 8.0, 12)
        );
        let idle = Measurement::compute(
            ("mixed", 2),
            &TARGET,
            &Traffic::default(),
            &before,
            &snapshot(&[("app", 10)], 5, 100, 0),
            0,
            100,
        );
        assert_eq!(
            (
                idle.others_percent,
                idle.cpu["app"],
                idle.usec_per_script_call
            ),
            (0.0, 100_000.0, None)
        );
        let json = serde_json::to_string(&idle).unwrap();
        assert!(
            json.contains("\"tool\":\"wrk\"") && json.contains("\"via\":\"nginx\""),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Measurement>(&json).unwrap(), idle);
    }
}
