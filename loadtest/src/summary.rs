//! The [`Summary`] of a run: what is printed for a person, saved as JSON, and checked.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::policy::{Bucket, Verdict};
use crate::stats::{ErrorCount, Second};

/// What the run was, from the dispatcher's side.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub url: String,
    pub mode: String,
    pub mode_is_rate: bool,
    pub sources: String,
    pub stopped_by: &'static str,
    pub planned_duration_s: f64,
    /// When the last request went out, in ns after the start.
    pub dispatch_ns: u64,
    pub dispatched: u64,
    pub late: u64,
    pub missed: u64,
    pub max_lag_ns: u64,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub url: String,
    pub mode: String,
    /// Whether requests were offered on a clock, so lateness means something.
    pub mode_is_rate: bool,
    pub sources: String,
    pub clients_count: usize,
    pub stopped_by: &'static str,
    pub planned_duration_s: f64,
    pub elapsed_s: f64,
    pub requests: Requests,
    pub classes: Classes,
    pub status: BTreeMap<String, u64>,
    pub error_kinds: BTreeMap<String, ErrorCount>,
    pub by_instance: BTreeMap<String, u64>,
    pub by_decision_source: BTreeMap<String, u64>,
    pub latency_ms: Option<Latency>,
    pub policy: Option<Bucket>,
    pub policy_header: Option<String>,
    pub policy_problem: Option<String>,
    pub admission: Option<Admission>,
    pub clients: Vec<ClientRow>,
    pub timeline: Vec<Second>,
}

#[derive(Debug, Serialize)]
pub struct Requests {
    pub dispatched: u64,
    pub answered: u64,
    pub errors: u64,
    /// Sent but neither answered nor failed: abandoned by a second interrupt.
    pub unanswered: u64,
    /// Sent more than [`crate::drive::LATE_AFTER`] behind their scheduled time.
    pub late: u64,
    /// Due but skipped because --max-in-flight requests were outstanding.
    pub missed: u64,
    pub max_lag_ms: f64,
    pub achieved_per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct Classes {
    pub admitted: u64,
    pub rejected: u64,
    pub server_errors: u64,
    pub other: u64,
    pub errors: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

#[derive(Debug, Serialize)]
pub struct Admission {
    /// Clients with at least one answer.
    pub clients: usize,
    pub admitted_min: u64,
    pub admitted_max: u64,
    /// The range of the clients' upper bounds `C + r × t`.
    pub bound_min: f64,
    pub bound_max: f64,
    /// Clients whose last answer was a 429: those held to the lower bound too.
    pub refused_last: usize,
    pub over: usize,
    pub short: usize,
}

#[derive(Debug, Serialize)]
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
        let r = &self.requests;
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
                crate::drive::LATE_AFTER.as_millis(),
                r.missed,
                r.max_lag_ms
            );
        }
        let c = &self.classes;
        let _ = writeln!(
            out,
            "outcome      admitted 200: {} · rejected 429: {} · 5xx: {} · other: {} · errors: {}",
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
        match &self.latency_ms {
            Some(l) => {
                let _ = writeln!(
                    out,
                    "latency      p50 {:.2} ms · p90 {:.2} ms · p99 {:.2} ms · max {:.2} ms ({} answers)",
                    l.p50, l.p90, l.p99, l.max, l.count
                );
            }
            None => {
                let _ = writeln!(out, "latency      no answers");
            }
        }
        match &self.policy {
            Some(p) => {
                let _ = writeln!(
                    out,
                    "policy       burst C = {}, refill r = {:.4}/s ({} per {} s), from the {}",
                    p.capacity, p.refill_per_s, p.quota, p.window_s, p.origin
                );
            }
            None => {
                let why = self.policy_problem.as_deref().unwrap_or("unknown");
                let _ = writeln!(out, "policy       {why}");
            }
        }
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
        }
        let header_only = self
            .policy
            .as_ref()
            .is_some_and(|p| p.origin == "RateLimit-Policy header");
        if header_only && self.admission.as_ref().is_some_and(|a| a.over > 0) {
            let _ = writeln!(
                out,
                "note         the header's q is the burst; when BURST differs from RATE_LIMIT, pass --limit RATE_LIMIT for the refill"
            );
        }
        if self.admission.as_ref().is_some_and(|a| a.short > 0) {
            let _ = writeln!(
                out,
                "note         a short client's bucket was likely not full at the start: were these addresses used within the last window?"
            );
        }
        let shown: Vec<&ClientRow> = self
            .clients
            .iter()
            .filter(|c| all_clients || matches!(c.verdict, Some(Verdict::Over | Verdict::Short)))
            .collect();
        let limit = if all_clients { usize::MAX } else { 20 };
        if !shown.is_empty() {
            let _ = writeln!(
                out,
                "\n{:<16} {:>8} {:>8} {:>8} {:>6} {:>6} {:>9} {:>9} {:>9}  verdict",
                "client", "sent", "200", "429", "other", "errors", "span s", "low", "high"
            );
            for row in shown.iter().take(limit) {
                let _ = writeln!(
                    out,
                    "{:<16} {:>8} {:>8} {:>8} {:>6} {:>6} {:>9} {:>9} {:>9}  {}",
                    row.address,
                    row.sent,
                    row.admitted,
                    row.rejected,
                    row.other,
                    row.errors,
                    optional(row.span_s, 2),
                    optional(row.bound_low, 2),
                    optional(row.bound_high, 2),
                    match row.verdict {
                        Some(Verdict::Over) => "OVER",
                        Some(Verdict::Short) => "short",
                        Some(Verdict::Within) => "ok",
                        None => "-",
                    }
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
        out
    }
}

fn optional(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".into(), |v| format!("{v:.decimals$}"))
}

fn join_counts<K: std::fmt::Display>(counts: &BTreeMap<K, u64>) -> String {
    if counts.is_empty() {
        return "-".into();
    }
    counts
        .iter()
        .map(|(key, count)| format!("{key}: {count}"))
        .collect::<Vec<_>>()
        .join(" · ")
}
