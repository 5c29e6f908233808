//! One measurement of `scripts/bench.sh`: what it ran, and what each process group spent
//! per answered request. Rows are kept at the precision the tables print (see
//! [`crate::stats::round_to`]) and saved as JSON lines in `run/bench/results.jsonl`.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::procfs::MachineTicks;
use crate::redis_info::ScriptCounters;
use crate::stats::round_to;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tool {
    Wrk,
    Loadtest,
    /// wrk with scripts/bench/keys.lua: a key of its own in every request's X-Bench-Key.
    #[serde(rename = "wrk-keys")]
    WrkKeys,
}

/// Through Nginx (8000), straight to one instance, through the gateway (8080: Nginx asks
/// an instance, then proxies to the demo upstream), or through the bench's own Nginx
/// proxying straight to the demo upstream (no check).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    Nginx,
    Direct,
    Gateway,
    Proxy,
}

impl fmt::Display for Tool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Wrk => "wrk",
            Self::Loadtest => "loadtest",
            Self::WrkKeys => "wrk-keys",
        })
    }
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Nginx => "nginx",
            Self::Direct => "direct",
            Self::Gateway => "gateway",
            Self::Proxy => "proxy",
        })
    }
}

/// What one measurement targets: a load generator, a way in, a path, a connection count.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub tool: Tool,
    pub via: Via,
    pub path: &'static str,
    pub connections: u32,
}

/// CPU per answered request of each process group, in µs.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct GroupCpu {
    pub app: f64,
    pub nginx: f64,
    pub master: f64,
    pub replicas: f64,
    pub sentinels: f64,
    pub load_generator: f64,
    /// The demo upstream behind the gateway (gateway phase only).
    #[serde(default)]
    pub upstream: f64,
    /// The bench's own Nginx proxying straight to the demo upstream (gateway phase only).
    #[serde(default)]
    pub proxy: f64,
}

/// CPU ticks of each process group at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GroupTicks {
    pub app: u64,
    pub nginx: u64,
    pub master: u64,
    pub replicas: u64,
    pub sentinels: u64,
    pub upstream: u64,
    pub proxy: u64,
}

impl GroupTicks {
    fn delta_until(&self, later: &Self) -> Self {
        Self {
            app: later.app.saturating_sub(self.app),
            nginx: later.nginx.saturating_sub(self.nginx),
            master: later.master.saturating_sub(self.master),
            replicas: later.replicas.saturating_sub(self.replicas),
            sentinels: later.sentinels.saturating_sub(self.sentinels),
            upstream: later.upstream.saturating_sub(self.upstream),
            proxy: later.proxy.saturating_sub(self.proxy),
        }
    }

    fn total(&self) -> u64 {
        self.app
            + self.nginx
            + self.master
            + self.replicas
            + self.sentinels
            + self.upstream
            + self.proxy
    }
}

/// The instances' user and system ticks, their threads' context switches and thread count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AppDetail {
    pub user: u64,
    pub system: u64,
    pub switches: u64,
    pub threads: u64,
}

/// The counters read right before and right after a load generator ran.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Snapshot {
    pub groups: GroupTicks,
    pub machine: MachineTicks,
    pub redis: ScriptCounters,
    pub app: AppDetail,
}

/// What the load generator reported, and the responses by status.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Traffic {
    pub requests: u64,
    pub seconds: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub ok: u64,
    pub denied: u64,
    /// Statuses other than 200 and 429, and requests that got no answer.
    pub other: u64,
    /// Requests the demo upstream counted for the path (gateway phase only).
    pub upstream: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub phase: String,
    pub round: u32,
    pub tool: Tool,
    pub via: Via,
    pub path: String,
    pub connections: u32,
    pub requests: u64,
    pub seconds: f64,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub ok: u64,
    pub denied: u64,
    pub other: u64,
    /// Requests the demo upstream counted for the path (gateway phase; 0 elsewhere).
    #[serde(default)]
    pub upstream: u64,
    pub cpu: GroupCpu,
    /// CPU that every process outside the topology and the load generator used, in % of
    /// the machine.
    pub others_percent: f64,
    pub script_calls_per_request: f64,
    /// `usec` ÷ `calls` of the script calls; 0 without calls.
    pub usec_per_script_call: f64,
    pub commands_per_request: f64,
    pub app_user: f64,
    pub app_system: f64,
    pub switches_per_request: f64,
    /// The instances' threads at the end.
    pub threads: u64,
}

/// What a measurement is, apart from its figures.
#[derive(Debug, Clone)]
pub struct Label<'a> {
    pub phase: &'a str,
    pub round: u32,
    pub target: &'a Target,
}

impl Row {
    /// Divides what happened between two snapshots by the answered requests.
    /// `load_generator_ticks` is what the load generator itself used; `hz` is CLK_TCK.
    pub fn compute(
        label: &Label<'_>,
        traffic: &Traffic,
        before: &Snapshot,
        after: &Snapshot,
        load_generator_ticks: u64,
        hz: u64,
    ) -> Self {
        let n = traffic.requests;
        let q = n.max(1) as f64;
        let per = 1e6 / hz as f64 / q;
        let groups = before.groups.delta_until(&after.groups);
        let busy = after.machine.busy.saturating_sub(before.machine.busy) as f64;
        let all = after.machine.all.saturating_sub(before.machine.all) as f64;
        let accounted = (groups.total() + load_generator_ticks) as f64;
        let others = if all > 0.0 {
            (100.0 * (busy - accounted) / all).max(0.0)
        } else {
            0.0
        };
        let redis = before.redis.delta_until(&after.redis);
        let cpu = |ticks: u64| round_to(ticks as f64 * per, 1);
        Self {
            phase: label.phase.to_owned(),
            round: label.round,
            tool: label.target.tool,
            via: label.target.via,
            path: label.target.path.to_owned(),
            connections: label.target.connections,
            requests: n,
            seconds: round_to(traffic.seconds, 2),
            per_second: round_to(
                if traffic.seconds > 0.0 {
                    n as f64 / traffic.seconds
                } else {
                    0.0
                },
                0,
            ),
            p50_ms: round_to(traffic.p50_ms, 2),
            p99_ms: round_to(traffic.p99_ms, 2),
            max_ms: round_to(traffic.max_ms, 2),
            ok: traffic.ok,
            denied: traffic.denied,
            other: traffic.other,
            upstream: traffic.upstream,
            cpu: GroupCpu {
                app: cpu(groups.app),
                nginx: cpu(groups.nginx),
                master: cpu(groups.master),
                replicas: cpu(groups.replicas),
                sentinels: cpu(groups.sentinels),
                load_generator: cpu(load_generator_ticks),
                upstream: cpu(groups.upstream),
                proxy: cpu(groups.proxy),
            },
            others_percent: round_to(others, 1),
            script_calls_per_request: round_to(redis.script_calls as f64 / q, 3),
            usec_per_script_call: round_to(
                if redis.script_calls > 0 {
                    redis.script_usec as f64 / redis.script_calls as f64
                } else {
                    0.0
                },
                2,
            ),
            commands_per_request: round_to(redis.all_calls as f64 / q, 3),
            app_user: cpu(after.app.user.saturating_sub(before.app.user)),
            app_system: cpu(after.app.system.saturating_sub(before.app.system)),
            switches_per_request: round_to(
                after.app.switches.saturating_sub(before.app.switches) as f64 / q,
                2,
            ),
            threads: after.app.threads,
        }
    }

    /// The line printed as each measurement ends.
    pub fn progress_line(&self) -> String {
        format!(
            "{:<13} r{} {:<8} {:<6} {:<17} c{:<3} {:>8.0} req/s  p50 {:>6.2}  p99 {:>6.2}  max {:>7.2} ms  \
             200:{} 429:{} other:{}  app {:.1} µs/req  nginx {:.1}  redis {:.1}  gen {:.1}  others {:.0}%  \
             script calls/req {:.3}  app user/sys {:.1}/{:.1}  cs/req {:.2}  threads {}",
            self.phase,
            self.round,
            self.tool.to_string(),
            self.via.to_string(),
            self.path,
            self.connections,
            self.per_second,
            self.p50_ms,
            self.p99_ms,
            self.max_ms,
            self.ok,
            self.denied,
            self.other,
            self.cpu.app,
            self.cpu.nginx,
            self.cpu.master,
            self.cpu.load_generator,
            self.others_percent,
            self.script_calls_per_request,
            self.app_user,
            self.app_system,
            self.switches_per_request,
            self.threads
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(groups: GroupTicks, busy: u64, all: u64, script_calls: u64) -> Snapshot {
        Snapshot {
            groups,
            machine: MachineTicks { busy, all },
            redis: ScriptCounters {
                script_calls,
                script_usec: script_calls * 6,
                all_calls: script_calls + 1,
            },
            app: AppDetail {
                user: groups.app / 2,
                system: groups.app / 2,
                switches: 0,
                threads: 12,
            },
        }
    }

    #[test]
    fn cpu_is_divided_by_the_answered_requests() {
        // Arrange: 100 000 requests in 5 s; the instances used 160 ticks (1.6 s at 100 Hz).
        let target = Target {
            tool: Tool::Wrk,
            via: Via::Nginx,
            path: "/limited_endpoint",
            connections: 64,
        };
        let label = Label {
            phase: "allow",
            round: 1,
            target: &target,
        };
        let traffic = Traffic {
            requests: 100_000,
            seconds: 5.0,
            p50_ms: 1.234,
            p99_ms: 3.0,
            max_ms: 9.0,
            ok: 100_000,
            denied: 0,
            other: 0,
            upstream: 0,
        };
        let before = snapshot(GroupTicks::default(), 0, 0, 0);
        let groups = GroupTicks {
            app: 160,
            nginx: 150,
            master: 90,
            replicas: 30,
            sentinels: 0,
            ..GroupTicks::default()
        };
        // The machine: 1000 ticks in all, 550 busy; the groups and wrk (60) account for
        // 490, so others used 60 of 1000.
        let after = snapshot(groups, 550, 1000, 100_000);

        // Act
        let row = Row::compute(&label, &traffic, &before, &after, 60, 100);

        // Assert
        assert_eq!(row.per_second, 20_000.0);
        assert_eq!(row.p50_ms, 1.23);
        assert_eq!(row.cpu.app, 16.0);
        assert_eq!(row.cpu.nginx, 15.0);
        assert_eq!(row.cpu.master, 9.0);
        assert_eq!(row.cpu.load_generator, 6.0);
        assert_eq!(row.others_percent, 6.0);
        assert_eq!(row.script_calls_per_request, 1.0);
        assert_eq!(row.usec_per_script_call, 6.0);
        assert_eq!(row.app_user, 8.0);
        assert_eq!(row.threads, 12);
    }

    #[test]
    fn others_never_go_below_zero_and_no_requests_divide_by_one() {
        let target = Target {
            tool: Tool::Loadtest,
            via: Via::Direct,
            path: "/",
            connections: 16,
        };
        let label = Label {
            phase: "mixed",
            round: 2,
            target: &target,
        };
        let before = snapshot(GroupTicks::default(), 0, 0, 0);
        let after = snapshot(
            GroupTicks {
                app: 10,
                ..Default::default()
            },
            5,
            100,
            0,
        );
        let row = Row::compute(&label, &Traffic::default(), &before, &after, 0, 100);
        assert_eq!(row.others_percent, 0.0);
        assert_eq!(row.cpu.app, 100_000.0);
        assert_eq!(row.usec_per_script_call, 0.0);
        assert_eq!(row.per_second, 0.0);
    }

    #[test]
    fn rows_survive_a_round_trip_through_json() {
        let target = Target {
            tool: Tool::Wrk,
            via: Via::Direct,
            path: "/",
            connections: 16,
        };
        let label = Label {
            phase: "allow",
            round: 1,
            target: &target,
        };
        let row = Row::compute(
            &label,
            &Traffic::default(),
            &Snapshot::default(),
            &Snapshot::default(),
            0,
            100,
        );
        let json = serde_json::to_string(&row).unwrap();
        assert!(json.contains("\"tool\":\"wrk\""), "{json}");
        assert_eq!(serde_json::from_str::<Row>(&json).unwrap(), row);
    }
}
