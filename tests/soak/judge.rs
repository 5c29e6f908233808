//! The soak's verdict, pure: what each minute's clients were allowed (the load
//! generator's own bound, `loadtest::policy`, plus each failover's allowance), whether
//! memory and descriptors stayed flat after warm-up, and the report that states both.

use loadtest::policy::Bucket;
use loadtest::summary::Summary;
use serde_json::{Value, json};

use bench::report::table;

/// The instances of scripts/cluster.sh: the `n` of the local fallback's shares.
pub const INSTANCES: u64 = 2;
/// Growth allowed between the first samples after warm-up and the last, in percent.
pub const FLAT_PERCENT: f64 = 5.0;
/// The shortest stretch between the samples compared that is worth a verdict.
pub const MIN_JUDGED_S: f64 = 30.0;
/// How many samples stand for "the first after warm-up" and "the last": their median,
/// so that one passing connection (Nginx opens more to an instance for a moment when a
/// request is slow, and closes them after its 4 s keep-alive) is not taken for growth.
pub const MEDIAN_OF: usize = 6;

/// One limit per client address on `/limited_endpoint`; the reload swaps one for the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub label: &'static str,
    pub per_minute: u64,
    pub burst: u64,
}

pub const POLICIES: [Policy; 2] = [
    Policy {
        label: "A",
        per_minute: 12,
        burst: 6,
    },
    Policy {
        label: "B",
        per_minute: 30,
        burst: 10,
    },
];

impl Policy {
    pub fn toml(&self) -> String {
        format!(
            "# Written by scripts/soak.sh (policy {}); rewritten for its reload.\n[[policy]]\nname = \"soak\"\n\
             match = {{ path = \"/limited_endpoint\" }}\nkey = [\"client_ip\"]\n\
             limits = [{{ name = \"minute\", rate = {}, per = \"1m\", burst = {} }}]\n",
            self.label, self.per_minute, self.burst
        )
    }

    pub fn describe(&self) -> String {
        format!(
            "{}: {}/min, burst {}",
            self.label, self.per_minute, self.burst
        )
    }
}

/// One master kill, and how the topology came back.
#[derive(Debug, Clone, PartialEq)]
pub struct Failover {
    pub old_port: u16,
    pub new_port: u16,
    /// Kill → every sentinel names the new master and it takes writes.
    pub promoted_s: f64,
    /// Kill → both instances answer a probe with a Redis decision: an upper bound on how
    /// long the fallback decided.
    pub fallback_s: f64,
    /// The killed node's restart → it is a linked replica of the new master.
    pub rejoined_s: f64,
}

/// One minute of load: the load generator's summary, and the bucket it judged by (the
/// flags the soak gave it: C + r·t comes from `loadtest::policy`).
#[derive(Debug, Clone)]
pub struct Minute {
    pub index: u64,
    /// When its load generator started and ended, in seconds of the soak.
    pub load_s: (f64, f64),
    pub policy: Policy,
    pub bucket: Bucket,
    pub summary: Summary,
    pub failovers: Vec<Failover>,
    pub reload_s: Option<f64>,
}

/// The worst client of a minute (address, admitted, bound), and how many were over.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Verdict {
    pub worst: (String, u64, u64),
    pub over: u64,
}

impl Minute {
    /// Each client against `floor(C + r × t)` over its span plus the failovers'
    /// allowance; the one closest to (or furthest over) its bound.
    pub fn verdict(&self) -> Verdict {
        let failovers = self.failovers.iter();
        let allowance: u64 = failovers
            .map(|f| self.bucket.failover_allowance(INSTANCES, f.fallback_s))
            .sum();
        let (mut verdict, mut worst_margin) = (Verdict::default(), i64::MAX);
        for client in &self.summary.clients {
            let bound = self.bucket.bound(client.span_s.unwrap_or(0.0)) + allowance;
            let margin = bound as i64 - client.admitted as i64;
            verdict.over += u64::from(margin < 0);
            if margin < worst_margin {
                worst_margin = margin;
                verdict.worst = (client.address.clone(), client.admitted, bound);
            }
        }
        verdict
    }

    /// Decisions not taken by Redis (the local fallback).
    pub fn fallback_decisions(&self) -> u64 {
        let sources = self.summary.by_decision_source.iter();
        sources
            .filter(|(source, _)| *source != "redis")
            .map(|(_, n)| n)
            .sum()
    }
}

/// One look at one process (Nginx's workers: all of them, summed, under the master's pid);
/// each is a line of out/samples.jsonl.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Sample {
    pub at_s: f64,
    /// Its name in the pids file, and its pid.
    pub process: (String, u32),
    /// VmRSS in KiB, and open descriptors.
    pub usage: (u64, u64),
    /// A data node's role, and whether its replication backlog is full. Its descriptors
    /// follow its role (a master holds the instances' and its replicas' connections), so
    /// only samples of one role compare; its memory grows with every write until the
    /// backlog is full (`repl-backlog-size`), by design.
    pub node: Option<(String, bool)>,
}

/// A process's memory and descriptors from its first samples after warm-up to its last.
#[derive(Debug, Clone, PartialEq)]
pub struct Flatness {
    pub from_s: f64,
    pub to_s: f64,
    pub rss_kib: (u64, u64),
    pub fds: (u64, u64),
}

pub fn growth_percent((first, last): (u64, u64)) -> f64 {
    match first {
        0 if last == 0 => 0.0,
        0 => f64::INFINITY,
        _ => 100.0 * (last as f64 - first as f64) / first as f64,
    }
}

impl Flatness {
    pub fn flat(&self) -> bool {
        growth_percent(self.rss_kib) < FLAT_PERCENT && growth_percent(self.fds) < FLAT_PERCENT
    }
}

/// The warm-up: `at_least` seconds, or a quarter of the run when that is longer. Memory
/// settles where the first hard minutes leave it (allocators keep what the busiest
/// moment asked for), which comes later in a longer run; a leak goes on growing.
pub fn warmup_secs(at_least: u64, minutes: u64) -> u64 {
    at_least.max(minutes * 60 / 4)
}

/// Per process (name and pid, in the order first seen): its warm-up ends `warmup_s`
/// after its first sample, and for a data node not before its backlog is full; of a data
/// node only the samples in the role it ended in count, and only those `under_load`.
/// Compared are the median of the first [`MEDIAN_OF`] judged samples and of the last
/// ones (fewer when there are fewer); `None` when they span less than [`MIN_JUDGED_S`].
pub fn flatness(
    samples: &[Sample],
    warmup_s: f64,
    under_load: impl Fn(f64) -> bool,
) -> Vec<((String, u32), Option<Flatness>)> {
    let mut order: Vec<&(String, u32)> = Vec::new();
    for s in samples {
        if !order.contains(&&s.process) {
            order.push(&s.process);
        }
    }
    let lower_median = |part: &[&Sample], value: fn(&(u64, u64)) -> u64| {
        let mut values: Vec<u64> = part.iter().map(|s| value(&s.usage)).collect();
        values.sort_unstable();
        values[(values.len() - 1) / 2]
    };
    let role = |s: &Sample| s.node.as_ref().map(|node| node.0.clone());
    let judge = |process: &(String, u32)| {
        let own: Vec<&Sample> = samples.iter().filter(|s| s.process == *process).collect();
        let (warm, last_role) = (own.first()?.at_s + warmup_s, role(own.last()?));
        let judged = own
            .into_iter()
            .filter(|s| under_load(s.at_s) && role(s) == last_role);
        let filling = |s: &Sample| s.node.as_ref().is_some_and(|node| !node.1);
        let judged: Vec<&Sample> = judged.skip_while(|s| s.at_s < warm || filling(s)).collect();
        let (first, last) = (judged.first()?, judged.last()?);
        if last.at_s - first.at_s < MIN_JUDGED_S {
            return None;
        }
        let k = (judged.len() / 2).clamp(1, MEDIAN_OF);
        let (head, tail) = (&judged[..k], &judged[judged.len() - k..]);
        let compare = |value| (lower_median(head, value), lower_median(tail, value));
        let (rss_kib, fds) = (compare(|u| u.0), compare(|u| u.1));
        Some(Flatness {
            from_s: first.at_s,
            to_s: last.at_s,
            rss_kib,
            fds,
        })
    };
    order
        .into_iter()
        .map(|process| (process.clone(), judge(process)))
        .collect()
}

/// Everything the soak saw.
pub struct Report {
    pub minutes: Vec<Minute>,
    pub samples: Vec<Sample>,
    pub warmup_s: f64,
    /// The report's first line: the soak's length, start, offered rate, machine and load.
    pub heading: String,
}

const MINUTES: &str = "\
minute | minute | key
policy | policy | key
answered | answered | sum
200 | admitted | sum
429 | rejected | sum
5xx | server_errors | sum
failed | failed | sum
p99 / max ms | latency | key
not Redis | fallback | sum
worst client: admitted / bound | worst | key
events | events | key
";
const FLATNESS: &str = "\
process | name | key
pid | pid | key
judged over | over | key
VmRSS KiB | rss | key
growth | rss_growth | key
open fds | fds | key
growth | fds_growth | key
flat | flat | key
";
const CHECKS: &str = "\
check | check | key
result | result | key
";

impl Report {
    /// Is a sample at `at_s` one of steady load: at least 5 s into a minute's load
    /// generator run, and at least 1 s before it ended?
    fn under_load(&self, at_s: f64) -> bool {
        let mut loads = self.minutes.iter().map(|m| m.load_s);
        loads.any(|(from, to)| at_s >= from + 5.0 && at_s <= to - 1.0)
    }

    /// The report, and how many of its checks failed. The tables' rows are made once,
    /// and the checks are summed from those rows.
    pub fn judge(&self) -> (String, usize) {
        let minutes: Vec<Value> = self.minutes.iter().map(Minute::row).collect();
        let judged = flatness(&self.samples, self.warmup_s, |at_s| self.under_load(at_s));
        let processes: Vec<Value> = judged.into_iter().map(process_row).collect();
        let sum = |key: &str| minutes.iter().filter_map(|r| r[key].as_u64()).sum::<u64>();
        // Fallback decisions in minutes without a kill: a Redis call that failed on its own
        // (a timeout on a busy machine). Reported; the bound, allowing nothing for them,
        // is the check.
        let calm = minutes.iter().filter(|r| r["kills"] == 0);
        let stray: u64 = calm.filter_map(|r| r["fallback"].as_u64()).sum();
        let not_flat = processes.iter().filter(|p| p["flat"] == "NO").count() as u64;
        let check = |check: String, found: u64, what: &str| {
            let verdict = if found > 0 { "FAILED" } else { "ok" };
            json!({"check": check, "result": format!("{verdict} ({found}{what})")})
        };
        let (answered, kills) = (sum("answered"), sum("kills"));
        let checks = [
            check(
                format!("no 5xx ({answered} answers)"),
                sum("server_errors"),
                "",
            ),
            check(FAILED_CHECK.into(), sum("failed"), ""),
            check(
                format!(
                    "every client of every minute within C + r·t + the failover allowance ({kills} failover(s))"
                ),
                sum("over"),
                " over",
            ),
            json!({"check": STRAY_CHECK, "result": stray.to_string()}),
            check(
                format!("VmRSS and open fds of every judged process grew < {FLAT_PERCENT} %"),
                not_flat,
                " not flat",
            ),
        ];
        let failed = checks.iter().filter(|c| {
            c["result"]
                .as_str()
                .is_some_and(|r| r.starts_with("FAILED"))
        });
        let text = format!(
            "{}\n\n{}\n\
             Memory and descriptors under load, first samples after warm-up ({} s after the process's first sample; for a data node, not before its replication backlog is full) → last samples, the median of {MEDIAN_OF} each:\n\n{}\n{}",
            self.heading,
            table(&minutes, MINUTES),
            self.warmup_s,
            table(&processes, FLATNESS),
            table(&checks, CHECKS)
        );
        (text, failed.count())
    }
}

const FAILED_CHECK: &str = "no failed request (timeouts, connection errors, other statuses)";
const STRAY_CHECK: &str = "decisions by the fallback in minutes without a kill (reported: the bound above still holds them)";

impl Minute {
    /// Its row of the minutes' table, with what the checks add up: clients over their
    /// bound and kills.
    fn row(&self) -> Value {
        let (v, c, summary) = (self.verdict(), &self.summary.classes, &self.summary);
        let reload = self
            .reload_s
            .iter()
            .map(|took| format!("policy reload before it ({took:.1} s)"));
        let kills = self.failovers.iter().map(|f| format!(
            "kill -9 of master {} → {}: promoted {:.1} s, fallback ≤ {:.1} s (+{} per client), restarted node linked in {:.1} s",
            f.old_port, f.new_port, f.promoted_s, f.fallback_s, self.bucket.failover_allowance(INSTANCES, f.fallback_s), f.rejoined_s
        ));
        let events: Vec<String> = reload.chain(kills).collect();
        let over = if v.over > 0 {
            format!(" ({} over)", v.over)
        } else {
            String::new()
        };
        let latency = summary
            .latency_ms
            .map(|l| format!("{:.1} / {:.0}", l.p99, l.max));
        json!({
            "minute": self.index + 1, "policy": self.policy.describe(), "answered": summary.requests.answered,
            "admitted": c.admitted, "rejected": c.rejected, "server_errors": c.server_errors, "failed": c.errors + c.other,
            "latency": latency.unwrap_or_else(|| "—".into()), "fallback": self.fallback_decisions(),
            "worst": format!("{} / {}{over}", v.worst.1, v.worst.2), "over": v.over, "kills": self.failovers.len(),
            "events": if events.is_empty() { "—".into() } else { events.join("; ") },
        })
    }
}

/// A process's row of the flatness table.
fn process_row(((name, pid), judged): ((String, u32), Option<Flatness>)) -> Value {
    let Some(f) = judged else {
        return json!({"name": name, "pid": pid, "over": "—", "rss": "—", "rss_growth": "—", "fds": "—", "fds_growth": "—",
            "flat": format!("not judged: no two samples {MIN_JUDGED_S} s apart after its warm-up")});
    };
    json!({
        "name": name, "pid": pid, "over": format!("{:.0}–{:.0} s", f.from_s, f.to_s),
        "rss": format!("{} → {}", f.rss_kib.0, f.rss_kib.1), "rss_growth": format!("{:+.1} %", growth_percent(f.rss_kib)),
        "fds": format!("{} → {}", f.fds.0, f.fds.1), "fds_growth": format!("{:+.1} %", growth_percent(f.fds)),
        "flat": if f.flat() { "yes" } else { "NO" },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use loadtest::summary::ClientRow;

    fn sample(at_s: f64, pid: u32, rss_kib: u64, fds: u64) -> Sample {
        let (process, usage) = (("p".into(), pid), (rss_kib, fds));
        Sample {
            at_s,
            process,
            usage,
            node: None,
        }
    }

    /// The verdict on each process of `samples`, all taken under load.
    fn judged(samples: &[Sample], warmup_s: f64) -> Vec<Option<Flatness>> {
        flatness(samples, warmup_s, |_| true)
            .into_iter()
            .map(|(_, f)| f)
            .collect()
    }

    /// A minute of two clients, admitted 25 and 26, with one failover of 12 s.
    fn minute() -> Minute {
        let client = |address: &str, admitted| {
            let row = json!({"address": address, "sent": 0, "admitted": admitted, "rejected": 0, "other": 0, "errors": 0,
                "span_s": 59.9, "bound_low": null, "bound_high": null, "refused_last": false, "verdict": null});
            serde_json::from_value::<ClientRow>(row).unwrap()
        };
        let clients = vec![client("127.0.0.10", 25), client("127.0.0.11", 26)];
        let by_decision_source = [("redis".into(), 10), ("local".into(), 3)].into();
        let summary = Summary {
            clients,
            by_decision_source,
            ..Summary::default()
        };
        let flags = json!({"capacity": 6, "quota": 12, "window_s": 60.0, "refill_per_s": 0.2, "origin": "flags"});
        let bucket: Bucket = serde_json::from_value(flags).unwrap();
        let (old_port, new_port, promoted_s, fallback_s, rejoined_s) = (7379, 7380, 3.0, 12.0, 2.0);
        let failovers = vec![Failover {
            old_port,
            new_port,
            promoted_s,
            fallback_s,
            rejoined_s,
        }];
        Minute {
            index: 0,
            load_s: (0.0, 60.0),
            policy: POLICIES[0],
            bucket,
            summary,
            failovers,
            reload_s: None,
        }
    }

    #[test]
    fn a_minute_holds_each_client_to_the_load_generators_bound_plus_the_failovers() {
        let mut minute = minute();
        // 6 + 0.2 × 59.9 = 17.98: 17, and a failover of 12 s adds 2 × (3 + 1) = 8.
        let worst = ("127.0.0.11".into(), 26, 25);
        assert_eq!(minute.verdict(), Verdict { worst, over: 1 });
        assert_eq!(minute.fallback_decisions(), 3);
        minute.failovers.clear();
        assert_eq!(minute.verdict().over, 2);
        let text = POLICIES[1].toml();
        let limit = text.contains("rate = 30, per = \"1m\", burst = 10");
        assert!(limit && text.contains("[\"client_ip\"]"), "{text}");
    }

    #[test]
    fn the_report_fails_a_client_over_its_bound_and_a_process_that_grew() {
        let steady = (0..12u32).map(|i| sample(5.0 * f64::from(i), 1, 8000, 20));
        let growing =
            (0..12u32).map(|i| sample(5.0 * f64::from(i), 2, 8000 + 100 * u64::from(i), 20));
        let samples: Vec<Sample> = steady.chain(growing).collect();
        let (heading, warmup_s) = ("Soak".into(), 0.0);
        let report = Report {
            minutes: vec![minute()],
            samples,
            warmup_s,
            heading,
        };
        let (text, failed) = report.judge();
        assert_eq!(failed, 2, "{text}");
        assert!(
            text.contains("| 26 / 25 (1 over) |") && text.contains("| FAILED (1 over) |"),
            "{text}"
        );
        assert!(
            text.contains("| 8300 → 8900 | +7.2 % |") && text.contains("| FAILED (1 not flat) |"),
            "{text}"
        );
        assert!(text.contains("| no 5xx (0 answers) | ok (0) |"), "{text}");
    }

    #[test]
    fn flatness_compares_the_first_samples_after_a_warm_up_of_a_minute_or_a_quarter_with_the_last()
    {
        let rss = [5000, 9000, 10_000, 10_400, 10_499];
        let samples: Vec<Sample> = rss
            .iter()
            .enumerate()
            .map(|(i, &r)| sample(30.0 * i as f64, 10, r, 40))
            .collect();
        let f = judged(&samples, 60.0)[0].clone().unwrap();
        assert_eq!(
            (f.from_s, f.to_s, f.rss_kib),
            (60.0, 120.0, (10_000, 10_499))
        );
        assert!(f.flat(), "{f:?}");
        let grown = [
            sample(0.0, 1, 10_000, 40),
            sample(60.0, 1, 10_000, 40),
            sample(90.0, 1, 10_000, 42),
        ];
        assert!(!judged(&grown, 60.0)[0].clone().unwrap().flat());
        assert_eq!((warmup_secs(60, 2), warmup_secs(60, 30)), (60, 450));
    }

    #[test]
    fn a_data_node_is_judged_in_the_role_it_ended_in_and_once_its_backlog_is_full() {
        let node = |at_s, fds, role: &str, full| Sample {
            node: Some((role.into(), full)),
            ..sample(at_s, 9, 18_000, fds)
        };
        let samples = [
            node(60.0, 17, "slave", true),
            node(90.0, 20, "master", false),
            node(120.0, 20, "master", true),
            node(150.0, 20, "master", true),
        ];
        let f = judged(&samples, 0.0)[0].clone().unwrap();
        assert_eq!((f.from_s, f.fds), (120.0, (20, 20)));
        let short = flatness(&samples, 0.0, |at_s| at_s < 130.0);
        assert!(short[0].1.is_none(), "too short a stretch under load");
    }

    #[test]
    fn one_passing_connection_at_the_end_is_not_growth_but_a_steady_climb_is() {
        let fds = |values: [u64; 12]| {
            let each = values.iter().enumerate();
            each.map(|(i, &n)| sample(60.0 + 5.0 * i as f64, 3, 7000, n))
                .collect::<Vec<_>>()
        };
        let spike = judged(&fds([24, 24, 25, 24, 24, 24, 24, 24, 24, 26, 24, 29]), 0.0);
        assert!(spike[0].clone().unwrap().flat());
        let climb = judged(&fds([24, 24, 24, 24, 24, 24, 26, 26, 26, 26, 26, 26]), 0.0);
        let climb = climb[0].clone().unwrap();
        assert_eq!(climb.fds, (24, 26));
        assert!(!climb.flat());
    }

    #[test]
    fn a_process_started_late_has_its_own_warm_up_and_may_be_too_young_to_judge() {
        let samples = [
            sample(0.0, 10, 8000, 12),
            sample(40.0, 20, 8000, 12),
            sample(90.0, 20, 8000, 12),
            sample(90.0, 10, 8000, 12),
            sample(120.0, 10, 8000, 12),
        ];
        let verdicts = judged(&samples, 60.0);
        assert!(
            verdicts[0].is_some() && verdicts[1].is_none(),
            "{verdicts:?}"
        );
        assert_eq!(
            [growth_percent((0, 0)), growth_percent((200, 210))],
            [0.0, 5.0]
        );
        assert!(growth_percent((0, 1)).is_infinite());
    }
}
