//! The [`Summary`] of a run: printed for a person, saved as JSON (`--json`), checked
//! (`--check`), and read back by the benchmark driver (bench/) with this same type.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::policy::{Bucket, Verdict};

/// A send this far behind its scheduled time counts as late. Timers tick by the
/// millisecond, so anything tighter would flag ordinary jitter.
pub const LATE_AFTER: Duration = Duration::from_millis(5);

/// Why sending stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StoppedBy {
    #[default]
    Duration,
    MaxRequests,
    Interrupt,
}

impl fmt::Display for StoppedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Duration => "duration",
            Self::MaxRequests => "max-requests",
            Self::Interrupt => "interrupt",
        })
    }
}

/// What the run asked for: the names its answers are counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// HTTP requests: 200 admitted, 429 refused.
    #[default]
    Http,
    /// `ShouldRateLimit` calls: `OK` admitted, `OVER_LIMIT` refused.
    Grpc,
}

impl Protocol {
    /// What an admitted, a refused and a server-failed answer are called.
    pub fn answer_names(self) -> [&'static str; 3] {
        match self {
            Protocol::Http => ["200", "429", "5xx"],
            Protocol::Grpc => ["OK", "OVER_LIMIT", "error status"],
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    pub url: String,
    /// Summaries saved before gRPC runs existed are HTTP runs.
    #[serde(default)]
    pub protocol: Protocol,
    pub mode: String,
    /// Whether requests were offered on a clock, so lateness means something.
    pub mode_is_rate: bool,
    pub sources: String,
    pub clients_count: usize,
    pub stopped_by: StoppedBy,
    pub planned_duration_s: f64,
    pub elapsed_s: f64,
    pub requests: Requests,
    pub classes: Classes,
    pub status: BTreeMap<String, u64>,
    pub error_kinds: BTreeMap<String, ErrorCount>,
    pub by_instance: BTreeMap<String, u64>,
    pub by_decision_source: BTreeMap<String, u64>,
    /// `None` when nothing was answered.
    pub latency_ms: Option<Latency>,
    pub policy: Option<Bucket>,
    pub policy_header: Option<String>,
    pub policy_problem: Option<String>,
    pub admission: Option<Admission>,
    pub clients: Vec<ClientRow>,
    pub timeline: Vec<Second>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Requests {
    pub dispatched: u64,
    pub answered: u64,
    pub errors: u64,
    /// Sent but neither answered nor failed: abandoned by a second interrupt.
    pub unanswered: u64,
    /// Sent more than [`LATE_AFTER`] behind their scheduled time.
    pub late: u64,
    /// Due but skipped because --max-in-flight requests were outstanding.
    pub missed: u64,
    pub max_lag_ms: f64,
    pub achieved_per_s: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Classes {
    pub admitted: u64,
    pub rejected: u64,
    pub server_errors: u64,
    pub other: u64,
    pub errors: u64,
}

impl Classes {
    /// Everything neither admitted nor refused (a 200 or a 429; `OK` or `OVER_LIMIT`):
    /// server errors, other statuses, failed requests.
    pub fn not_decided(&self) -> u64 {
        self.server_errors + self.other + self.errors
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

/// Errors of one kind, with the first one's text to go by.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorCount {
    pub count: u64,
    pub example: String,
}

/// Answers by the second they arrived in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Second {
    pub second: u64,
    pub admitted: u64,
    pub rejected: u64,
    pub server_errors: u64,
    pub other: u64,
    pub errors: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Admission {
    /// Clients with at least one answer.
    pub clients: usize,
    pub admitted_min: u64,
    pub admitted_max: u64,
    /// The range of the clients' upper bounds `C + r × t`.
    pub bound_min: f64,
    pub bound_max: f64,
    /// Clients whose last answer was a refusal: those held to the lower bound too.
    pub refused_last: usize,
    pub over: usize,
    pub short: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientRow {
    pub address: String,
    pub sent: u64,
    pub admitted: u64,
    pub rejected: u64,
    pub other: u64,
    pub errors: u64,
    /// From the first send to the last answer, in seconds.
    pub span_s: Option<f64>,
    pub bound_low: Option<f64>,
    pub bound_high: Option<f64>,
    pub refused_last: bool,
    pub verdict: Option<Verdict>,
}

impl Summary {
    /// Whether `--check` passes: a known policy, answers, and every client in bounds.
    pub fn check(&self) -> Result<(), String> {
        let Some(admission) = &self.admission else {
            return Err(match &self.policy_problem {
                Some(why) => format!("no admission check: policy {why}"),
                None => "no admission check: no client was answered".into(),
            });
        };
        if admission.over > 0 || admission.short > 0 {
            return Err(format!(
                "{} clients over their bound, {} short of it",
                admission.over, admission.short
            ));
        }
        Ok(())
    }

    /// The summary as text, for a person.
    pub fn render(&self, all_clients: bool) -> String {
        let mut out = String::new();
        let (r, c) = (&self.requests, &self.classes);
        let _ = writeln!(
            out,
            "loadtest: {} · {} · {}",
            self.url, self.sources, self.mode
        );
        let _ = writeln!(
            out,
            "stopped by {} after {:.2} s (planned {:.2} s)",
            self.stopped_by, self.elapsed_s, self.planned_duration_s
        );
        let _ = writeln!(
            out,
            "requests     {} sent · {} answered · {} errors · {} unanswered · {:.1} answered/s",
            r.dispatched, r.answered, r.errors, r.unanswered, r.achieved_per_s
        );
        if self.mode_is_rate {
            let _ = writeln!(
                out,
                "schedule     {} late (> {} ms behind) · {} missed (in-flight cap) · max lag {:.1} ms",
                r.late,
                LATE_AFTER.as_millis(),
                r.missed,
                r.max_lag_ms
            );
        }
        let [admitted, rejected, failed] = self.protocol.answer_names();
        let _ = writeln!(
            out,
            "outcome      admitted {admitted}: {} · rejected {rejected}: {} · {failed}: {} · other: {} · errors: {}",
            c.admitted, c.rejected, c.server_errors, c.other, c.errors
        );
        let _ = writeln!(out, "status       {}", join_counts(&self.status));
        for (kind, count) in &self.error_kinds {
            let _ = writeln!(
                out,
                "error        {kind}: {} (first: {})",
                count.count, count.example
            );
        }
        let _ = writeln!(out, "by instance  {}", join_counts(&self.by_instance));
        let _ = writeln!(
            out,
            "decided by   {}",
            join_counts(&self.by_decision_source)
        );
        let _ = match &self.latency_ms {
            Some(l) => writeln!(
                out,
                "latency      p50 {:.2} ms · p90 {:.2} ms · p99 {:.2} ms · max {:.2} ms ({} answers)",
                l.p50, l.p90, l.p99, l.max, l.count
            ),
            None => writeln!(out, "latency      no answers"),
        };
        let _ = match &self.policy {
            Some(p) => writeln!(
                out,
                "policy       burst C = {}, refill r = {:.4}/s ({} per {} s), from the {}",
                p.capacity, p.refill_per_s, p.quota, p.window_s, p.origin
            ),
            None => writeln!(
                out,
                "policy       {}",
                self.policy_problem.as_deref().unwrap_or("unknown")
            ),
        };
        if let (Some(_), Some(problem)) = (&self.policy, &self.policy_problem) {
            let _ = writeln!(out, "policy note  {problem}");
        }
        if let Some(a) = &self.admission {
            let _ = writeln!(
                out,
                "admitted     per client {}–{} against C + r·t = {:.2}–{:.2} · over the bound: {} of {} · short by more than 1: {} of {} refused at the end",
                a.admitted_min,
                a.admitted_max,
                a.bound_min,
                a.bound_max,
                a.over,
                a.clients,
                a.short,
                a.refused_last
            );
            let header_only = self
                .policy
                .as_ref()
                .is_some_and(|p| p.origin == "RateLimit-Policy header");
            if header_only && a.over > 0 {
                out.push_str("note         the header's q is the burst; when BURST differs from RATE_LIMIT, pass --limit RATE_LIMIT for the refill\n");
            }
            if a.short > 0 {
                out.push_str("note         a short client's bucket was likely not full at the start: were these addresses used within the last window?\n");
            }
        }
        self.render_clients(all_clients, &mut out);
        out
    }

    /// Every client with `all`, else those outside their bounds (twenty at most).
    fn render_clients(&self, all: bool, out: &mut String) {
        let shown: Vec<&ClientRow> = self
            .clients
            .iter()
            .filter(|c| all || matches!(c.verdict, Some(Verdict::Over | Verdict::Short)))
            .collect();
        if shown.is_empty() {
            return;
        }
        let limit = if all { usize::MAX } else { 20 };
        let [admitted, rejected, _] = self.protocol.answer_names();
        let _ = writeln!(
            out,
            "\n{:<16} {:>8} {:>8} {:>10} {:>6} {:>6} {:>9} {:>9} {:>9}  verdict",
            "client", "sent", admitted, rejected, "other", "errors", "span s", "low", "high"
        );
        let optional = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:.2}"));
        for row in shown.iter().take(limit) {
            let verdict = match row.verdict {
                Some(Verdict::Over) => "OVER",
                Some(Verdict::Short) => "short",
                Some(Verdict::Within) => "ok",
                None => "-",
            };
            let _ = writeln!(
                out,
                "{:<16} {:>8} {:>8} {:>10} {:>6} {:>6} {:>9} {:>9} {:>9}  {verdict}",
                row.address,
                row.sent,
                row.admitted,
                row.rejected,
                row.other,
                row.errors,
                optional(row.span_s),
                optional(row.bound_low),
                optional(row.bound_high),
            );
        }
        if shown.len() > limit {
            let _ = writeln!(
                out,
                "… and {} more (--clients lists all, --json saves all)",
                shown.len() - limit
            );
        }
    }
}

fn join_counts<K: fmt::Display>(counts: &BTreeMap<K, u64>) -> String {
    if counts.is_empty() {
        return "-".into();
    }
    let parts: Vec<String> = counts
        .iter()
        .map(|(key, count)| format!("{key}: {count}"))
        .collect();
    parts.join(" · ")
}
