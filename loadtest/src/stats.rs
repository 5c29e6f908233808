//! What the answers add up to: samples folded into a [`Tally`], then into a [`Summary`].

use std::collections::BTreeMap;
use std::net::IpAddr;

use hdrhistogram::Histogram;
use loadtest::policy::{self, Bucket, PolicyFlags, Verdict};
use loadtest::summary::{
    Admission, Classes, ClientRow, ErrorCount, Latency, Protocol, Requests, Second, StoppedBy,
    Summary,
};

/// What the run was, from the dispatcher's side.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub url: String,
    pub mode: String,
    pub mode_is_rate: bool,
    pub sources: String,
    pub stopped_by: StoppedBy,
    pub planned_duration_s: f64,
    /// When the last request went out, in ns after the start.
    pub dispatch_ns: u64,
    pub dispatched: u64,
    pub late: u64,
    pub missed: u64,
    pub max_lag_ns: u64,
}

const NS_PER_S: u64 = 1_000_000_000;
/// Latencies are recorded in µs, up to an hour, to three significant figures.
const LATENCY_MAX_US: u64 = 3_600_000_000;

/// One request's fate.
#[derive(Debug, Clone)]
pub struct Sample {
    pub client: usize,
    /// ns after the start when the request went out, and when its answer was read.
    pub sent_ns: u64,
    pub done_ns: u64,
    pub outcome: Outcome,
}

/// How the summary counts an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Admitted,
    Rejected,
    ServerError,
    Other,
}

/// What an answer said: its class, and the label it is listed under (an HTTP status, or
/// a gRPC code's name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub class: Class,
    pub label: String,
}

impl Status {
    pub fn http(code: u16) -> Self {
        let class = match code {
            200 => Class::Admitted,
            429 => Class::Rejected,
            500..=599 => Class::ServerError,
            _ => Class::Other,
        };
        Self {
            class,
            label: code.to_string(),
        }
    }
}

#[derive(Debug, Clone)]
pub enum Outcome {
    Answered {
        status: Status,
        instance: Option<String>,
        decided_by: Option<String>,
        policy: Option<String>,
    },
    Failed {
        kind: &'static str,
        message: String,
    },
}

/// One client's answers, kept to derive its admission bounds.
#[derive(Debug, Clone, Default)]
struct ClientTally {
    sent: u64,
    admitted: u64,
    refused: u64,
    other: u64,
    errors: u64,
    /// (sent, answered) of the earliest-sent answered request.
    first: Option<(u64, u64)>,
    /// (sent, whether it was refused) of the latest-sent answered request.
    last: Option<(u64, bool)>,
    last_done_ns: u64,
}

/// Everything the collector learns, folded in one sample at a time.
pub struct Tally {
    protocol: Protocol,
    pub answered: u64,
    pub admitted: u64,
    pub rejected: u64,
    pub server_errors: u64,
    pub errors: u64,
    status: BTreeMap<String, u64>,
    error_kinds: BTreeMap<&'static str, ErrorCount>,
    instances: BTreeMap<String, u64>,
    deciders: BTreeMap<String, u64>,
    policies: BTreeMap<String, u64>,
    latency: Histogram<u64>,
    clients: Vec<ClientTally>,
    timeline: Vec<Second>,
    last_done_ns: u64,
}

/// The count of answers of `class` in the second `slot`.
fn count_of(slot: &mut Second, class: Class) -> &mut u64 {
    match class {
        Class::Admitted => &mut slot.admitted,
        Class::Rejected => &mut slot.rejected,
        Class::ServerError => &mut slot.server_errors,
        Class::Other => &mut slot.other,
    }
}

impl Tally {
    pub fn new(clients: usize, protocol: Protocol) -> Result<Self, hdrhistogram::CreationError> {
        Ok(Self {
            protocol,
            answered: 0,
            admitted: 0,
            rejected: 0,
            server_errors: 0,
            errors: 0,
            status: BTreeMap::new(),
            error_kinds: BTreeMap::new(),
            instances: BTreeMap::new(),
            deciders: BTreeMap::new(),
            policies: BTreeMap::new(),
            latency: Histogram::new_with_bounds(1, LATENCY_MAX_US, 3)?,
            clients: vec![ClientTally::default(); clients],
            timeline: Vec::new(),
            last_done_ns: 0,
        })
    }

    pub fn add(&mut self, sample: Sample) {
        self.last_done_ns = self.last_done_ns.max(sample.done_ns);
        let second = usize::try_from(sample.done_ns / NS_PER_S).unwrap_or(usize::MAX);
        if second < 100_000 && self.timeline.len() <= second {
            self.timeline.resize_with(second + 1, Second::default);
        }
        let mut default_second = Second::default();
        let slot = self.timeline.get_mut(second).unwrap_or(&mut default_second);
        let mut default_client = ClientTally::default();
        let client = self
            .clients
            .get_mut(sample.client)
            .unwrap_or(&mut default_client);
        client.sent += 1;
        match sample.outcome {
            Outcome::Failed { kind, message } => {
                self.errors += 1;
                client.errors += 1;
                slot.errors += 1;
                self.error_kinds
                    .entry(kind)
                    .or_insert(ErrorCount {
                        count: 0,
                        example: message,
                    })
                    .count += 1;
            }
            Outcome::Answered {
                status,
                instance,
                decided_by,
                policy,
            } => {
                self.answered += 1;
                *self.status.entry(status.label).or_default() += 1;
                *self
                    .instances
                    .entry(instance.unwrap_or_else(|| "(none)".into()))
                    .or_default() += 1;
                *self
                    .deciders
                    .entry(decided_by.unwrap_or_else(|| "(none)".into()))
                    .or_default() += 1;
                if let Some(policy) = policy {
                    *self.policies.entry(policy).or_default() += 1;
                }
                let latency_us = sample.done_ns.saturating_sub(sample.sent_ns) / 1000;
                self.latency.saturating_record(latency_us.max(1));
                // The run's totals and the client's rows have no column for every class;
                // the timeline has.
                match status.class {
                    Class::Admitted => {
                        self.admitted += 1;
                        client.admitted += 1;
                    }
                    Class::Rejected => {
                        self.rejected += 1;
                        client.refused += 1;
                    }
                    Class::ServerError => {
                        self.server_errors += 1;
                        client.other += 1;
                    }
                    Class::Other => client.other += 1,
                }
                *count_of(slot, status.class) += 1;
                if client.first.is_none_or(|(sent, _)| sample.sent_ns < sent) {
                    client.first = Some((sample.sent_ns, sample.done_ns));
                }
                if client.last.is_none_or(|(sent, _)| sample.sent_ns >= sent) {
                    client.last = Some((sample.sent_ns, status.class == Class::Rejected));
                }
                client.last_done_ns = client.last_done_ns.max(sample.done_ns);
            }
        }
    }

    /// The most frequent `RateLimit-Policy` value, parsed.
    fn observed_policy(&self) -> Option<(String, Result<policy::HeaderPolicy, String>)> {
        let (value, _) = self.policies.iter().max_by_key(|(_, count)| **count)?;
        let parsed = policy::parse_header(value).map(|mut all| all.remove(0));
        Some((value.clone(), parsed))
    }

    /// Folds the tally into the summary that is printed and saved.
    pub fn summarize(&self, run: RunInfo, sources: &[IpAddr], flags: &PolicyFlags) -> Summary {
        let observed = self.observed_policy();
        let header = observed
            .as_ref()
            .and_then(|(_, parsed)| parsed.as_ref().ok());
        let announced_by = match self.protocol {
            Protocol::Http => "RateLimit-Policy header",
            Protocol::Grpc => "current_limit of ShouldRateLimit's answers",
        };
        let bucket = policy::resolve_announced(header, announced_by, flags);
        let policy_header = observed.as_ref().map(|(value, _)| value.clone());
        let mut policy_problem = match (&observed, &bucket) {
            (Some((_, Err(why))), _) => Some(format!("unreadable header: {why}")),
            (_, Err(why)) => Some(why.clone()),
            _ => None,
        };
        if self.policies.len() > 1 {
            let seen: Vec<String> = self
                .policies
                .iter()
                .map(|(value, count)| format!("{value} ×{count}"))
                .collect();
            policy_problem = Some(format!(
                "several policies were announced: {}",
                seen.join(", ")
            ));
        }
        let bucket = bucket.ok();
        let clients: Vec<ClientRow> = self
            .clients
            .iter()
            .zip(sources)
            .map(|(tally, address)| client_row(tally, *address, bucket.as_ref()))
            .collect();
        let admission = bucket.as_ref().and_then(|_| admission(&clients));
        let elapsed_s = self.last_done_ns.max(run.dispatch_ns) as f64 / NS_PER_S as f64;
        let dispatch_s = run.dispatch_ns as f64 / NS_PER_S as f64;
        Summary {
            url: run.url,
            protocol: self.protocol,
            mode: run.mode,
            mode_is_rate: run.mode_is_rate,
            clients_count: sources.len(),
            sources: run.sources,
            stopped_by: run.stopped_by,
            planned_duration_s: run.planned_duration_s,
            elapsed_s,
            requests: Requests {
                dispatched: run.dispatched,
                answered: self.answered,
                errors: self.errors,
                unanswered: run.dispatched.saturating_sub(self.answered + self.errors),
                late: run.late,
                missed: run.missed,
                max_lag_ms: run.max_lag_ns as f64 / 1e6,
                achieved_per_s: if dispatch_s > 0.0 {
                    self.answered as f64 / dispatch_s
                } else {
                    0.0
                },
            },
            classes: Classes {
                admitted: self.admitted,
                rejected: self.rejected,
                server_errors: self.server_errors,
                other: self.answered - self.admitted - self.rejected - self.server_errors,
                errors: self.errors,
            },
            status: self
                .status
                .iter()
                .map(|(label, count)| (label.clone(), *count))
                .collect(),
            error_kinds: self
                .error_kinds
                .iter()
                .map(|(kind, count)| ((*kind).to_owned(), count.clone()))
                .collect(),
            by_instance: self.instances.clone(),
            by_decision_source: self.deciders.clone(),
            latency_ms: latency(&self.latency),
            policy: bucket,
            policy_header,
            policy_problem,
            admission,
            clients,
            timeline: self
                .timeline
                .iter()
                .enumerate()
                .map(|(second, slot)| Second {
                    second: second as u64,
                    ..*slot
                })
                .collect(),
        }
    }
}

fn client_row(tally: &ClientTally, address: IpAddr, bucket: Option<&Bucket>) -> ClientRow {
    let (mut span_s, mut low, mut high, mut verdict) = (None, None, None, None);
    if let (Some((first_sent, first_done)), Some((last_sent, refused_last))) =
        (tally.first, tally.last)
    {
        let longest = tally.last_done_ns.saturating_sub(first_sent) as f64 / NS_PER_S as f64;
        let shortest = last_sent.saturating_sub(first_done) as f64 / NS_PER_S as f64;
        span_s = Some(longest);
        if let Some(bucket) = bucket {
            let (l, h) = (bucket.allowance(shortest), bucket.allowance(longest));
            low = Some(l);
            high = Some(h);
            verdict = Some(policy::judge(tally.admitted, l, h, refused_last));
        }
    }
    ClientRow {
        address: address.to_string(),
        sent: tally.sent,
        admitted: tally.admitted,
        rejected: tally.refused,
        other: tally.other,
        errors: tally.errors,
        span_s,
        bound_low: low,
        bound_high: high,
        refused_last: tally.last.is_some_and(|(_, refused)| refused),
        verdict,
    }
}

fn admission(clients: &[ClientRow]) -> Option<Admission> {
    let judged: Vec<&ClientRow> = clients.iter().filter(|c| c.verdict.is_some()).collect();
    let admitted = judged.iter().map(|c| c.admitted);
    let highs = judged.iter().filter_map(|c| c.bound_high);
    Some(Admission {
        clients: judged.len(),
        admitted_min: admitted.clone().min()?,
        admitted_max: admitted.max()?,
        bound_min: highs.clone().fold(f64::INFINITY, f64::min),
        bound_max: highs.fold(f64::NEG_INFINITY, f64::max),
        refused_last: judged.iter().filter(|c| c.refused_last).count(),
        over: judged
            .iter()
            .filter(|c| c.verdict == Some(Verdict::Over))
            .count(),
        short: judged
            .iter()
            .filter(|c| c.verdict == Some(Verdict::Short))
            .count(),
    })
}

/// p50/p90/p99/max of the recorded latencies, in ms; `None` when nothing was answered.
pub fn latency(histogram: &Histogram<u64>) -> Option<Latency> {
    if histogram.is_empty() {
        return None;
    }
    let ms = |us: u64| us as f64 / 1000.0;
    Some(Latency {
        count: histogram.len(),
        p50: ms(histogram.value_at_quantile(0.50)),
        p90: ms(histogram.value_at_quantile(0.90)),
        p99: ms(histogram.value_at_quantile(0.99)),
        max: ms(histogram.max()),
        mean: histogram.mean() / 1000.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = NS_PER_S;
    const POLICY: &str = "\"default\";q=10;w=60";

    fn answered(client: usize, sent_ns: u64, done_ns: u64, status: u16) -> Sample {
        Sample {
            client,
            sent_ns,
            done_ns,
            outcome: Outcome::Answered {
                status: Status::http(status),
                instance: Some(
                    if sent_ns.is_multiple_of(2) {
                        "app-1"
                    } else {
                        "app-2"
                    }
                    .into(),
                ),
                decided_by: Some("redis".into()),
                policy: Some(POLICY.into()),
            },
        }
    }

    fn run(dispatched: u64) -> RunInfo {
        RunInfo {
            url: "http://127.0.0.1:8000/".into(),
            mode: "10 req/s".into(),
            mode_is_rate: true,
            sources: "2 clients".into(),
            stopped_by: StoppedBy::Duration,
            planned_duration_s: 10.0,
            dispatch_ns: 10 * S,
            dispatched,
            late: 0,
            missed: 0,
            max_lag_ns: 0,
        }
    }

    fn two_sources() -> Vec<IpAddr> {
        vec!["127.0.0.10".parse().unwrap(), "127.0.0.11".parse().unwrap()]
    }

    /// The summary of a 12-request run in which client 0 sends one request a second and
    /// is admitted the first `admitted`, then refused; each answer takes 1 ms. Client 1
    /// sends nothing.
    fn client_zero_summary(admitted: u64) -> Summary {
        const TOTAL: u64 = 12;
        let mut tally = Tally::new(2, Protocol::Http).unwrap();
        for i in 0..TOTAL {
            let status = if i < admitted { 200 } else { 429 };
            tally.add(answered(0, i * S, i * S + 1_000_000, status));
        }
        tally.summarize(run(TOTAL), &two_sources(), &PolicyFlags::default())
    }

    #[test]
    fn percentiles_come_from_the_recorded_latencies() {
        let mut histogram = Histogram::new_with_bounds(1, LATENCY_MAX_US, 3).unwrap();
        for us in 1..=1000 {
            histogram.record(us * 100).unwrap();
        }
        let figures = latency(&histogram).unwrap();
        assert!((figures.p50 - 50.0).abs() < 0.1, "{figures:?}");
        assert!((figures.p90 - 90.0).abs() < 0.1, "{figures:?}");
        assert!((figures.p99 - 99.0).abs() < 0.1, "{figures:?}");
        assert!((figures.max - 100.0).abs() < 0.1, "{figures:?}");
        assert_eq!(figures.count, 1000);
        assert!(latency(&Histogram::new(3).unwrap()).is_none());
    }

    #[test]
    fn answers_are_counted_by_status_instance_source_and_second() {
        let mut tally = Tally::new(2, Protocol::Http).unwrap();
        tally.add(answered(0, 0, 2_000_000, 200));
        tally.add(answered(1, 1, 1_500_000_000, 429));
        tally.add(answered(1, 2, 1_600_000_000, 503));
        tally.add(Sample {
            client: 1,
            sent_ns: 3,
            done_ns: 5 * S,
            outcome: Outcome::Failed {
                kind: "timeout",
                message: "timed out".into(),
            },
        });
        let summary = tally.summarize(run(4), &two_sources(), &PolicyFlags::default());
        assert_eq!(summary.status["200"], 1);
        assert_eq!(summary.status["429"], 1);
        assert_eq!(summary.classes.server_errors, 1);
        assert_eq!(summary.classes.errors, 1);
        assert_eq!(summary.by_instance["app-1"], 2);
        assert_eq!(summary.by_instance["app-2"], 1);
        assert_eq!(summary.by_decision_source["redis"], 3);
        assert_eq!(summary.error_kinds["timeout"].count, 1);
        assert_eq!(summary.requests.unanswered, 0);
        assert_eq!(summary.timeline.len(), 6);
        assert_eq!(
            (summary.timeline[0].admitted, summary.timeline[1].rejected),
            (1, 1)
        );
        assert_eq!(summary.timeline[1].server_errors, 1);
        assert_eq!(summary.timeline[5].errors, 1);
        assert_eq!(summary.clients[1].sent, 3);
    }

    #[test]
    fn a_client_admitted_exactly_its_allowance_is_within() {
        // C=10, r=1/6 per s, active 11 s: floor(10 + 11/6) = 11.
        let summary = client_zero_summary(11);
        let row = &summary.clients[0];
        assert_eq!(row.verdict, Some(Verdict::Within));
        assert!(row.refused_last);
        assert!((row.bound_high.unwrap() - (10.0 + 11.001 / 6.0)).abs() < 1e-9);
        assert!((row.bound_low.unwrap() - (10.0 + 10.999 / 6.0)).abs() < 1e-9);
        let admission = summary.admission.as_ref().unwrap();
        assert_eq!(
            (admission.clients, admission.over, admission.short),
            (1, 0, 0)
        );
        assert!(summary.check().is_ok());
    }

    #[test]
    fn a_client_admitted_beyond_its_allowance_fails_the_check() {
        // Twelve admitted within 11 s, where floor(10 + 11/6) = 11 is the most.
        let summary = client_zero_summary(12);
        assert_eq!(summary.clients[0].verdict, Some(Verdict::Over));
        assert_eq!(summary.admission.as_ref().unwrap().over, 1);
        assert!(summary.check().is_err());
        assert!(summary.render(false).contains("OVER"));
    }

    #[test]
    fn a_refused_client_admitted_more_than_one_too_few_is_short() {
        let summary = client_zero_summary(9);
        assert_eq!(summary.clients[0].verdict, Some(Verdict::Short));
        assert!(summary.check().is_err());
    }

    #[test]
    fn a_refused_client_one_short_is_tolerated() {
        let summary = client_zero_summary(10);
        assert_eq!(summary.clients[0].verdict, Some(Verdict::Within));
    }

    #[test]
    fn without_a_policy_there_is_no_admission_check() {
        let mut tally = Tally::new(1, Protocol::Http).unwrap();
        tally.add(Sample {
            client: 0,
            sent_ns: 0,
            done_ns: 1,
            outcome: Outcome::Answered {
                status: Status::http(200),
                instance: None,
                decided_by: None,
                policy: None,
            },
        });
        let summary = tally.summarize(run(1), &two_sources()[..1], &PolicyFlags::default());
        assert!(summary.admission.is_none());
        assert_eq!(summary.by_instance["(none)"], 1);
        assert!(summary.check().unwrap_err().contains("--limit"));
    }

    #[test]
    fn the_summary_serializes_to_json_with_every_client_and_second() {
        let summary = client_zero_summary(11);
        let json: serde_json::Value = serde_json::to_value(&summary).unwrap();
        assert_eq!(json["clients"].as_array().unwrap().len(), 2);
        assert_eq!(json["clients"][0]["verdict"], "within");
        assert_eq!(json["clients"][1]["verdict"], serde_json::Value::Null);
        assert_eq!(json["policy"]["capacity"], 10);
        assert_eq!(json["timeline"][11]["rejected"], 1);
        assert_eq!(json["status"]["429"], 1);
        assert_eq!(json["admission"]["admitted_max"], 11);
    }

    #[test]
    fn grpc_answers_are_counted_under_their_codes_and_held_to_the_stated_limit() {
        let mut tally = Tally::new(1, Protocol::Grpc).unwrap();
        let grpc = |class, label: &str| Status {
            class,
            label: label.into(),
        };
        for (i, status) in [
            grpc(Class::Admitted, "OK"),
            grpc(Class::Rejected, "OVER_LIMIT"),
            grpc(Class::ServerError, "UNAVAILABLE"),
        ]
        .into_iter()
        .enumerate()
        {
            tally.add(Sample {
                client: 0,
                sent_ns: i as u64,
                done_ns: i as u64 + 1,
                outcome: Outcome::Answered {
                    status,
                    instance: None,
                    decided_by: None,
                    policy: Some(POLICY.into()),
                },
            });
        }
        let summary = tally.summarize(run(3), &two_sources()[..1], &PolicyFlags::default());
        assert_eq!(summary.status["OVER_LIMIT"], 1);
        assert_eq!(summary.classes.server_errors, 1);
        let text = summary.render(true);
        assert!(
            text.contains("admitted OK: 1 · rejected OVER_LIMIT: 1 · error status: 1"),
            "{text}"
        );
        let origin = &summary.policy.as_ref().unwrap().origin;
        assert!(origin.starts_with("current_limit"), "{origin}");
    }
}
