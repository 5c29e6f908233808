//! Prometheus metrics, served at `GET /metrics`: a [`Metrics`] handle built at start and
//! passed to whatever records, named to Prometheus conventions under the `ratelimit_`
//! prefix, never labelled per client. It knows nothing of the modules that record: they
//! pass their labels in, so no import runs back from here. One job; it is long because
//! each family has its registration, its help text and its recording method.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: &'static str,
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AddrLabels {
    addr: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatusLabels {
    route: &'static str,
    status: u16,
}

/// Bounded by the policy file: policies × limits × modes × outcomes, never by key. The
/// names are the policy set's own `Arc`s: finding a series costs no allocation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    policy: Arc<str>,
    limit: Arc<str>,
    mode: &'static str,
    decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyVersionLabels {
    version: String,
}

/// Where a count kept outside the registry is read, once the composition root says.
type Reading = Arc<OnceLock<fn() -> u64>>;

/// A counter whose value lives elsewhere (the log writer counts the lines it drops, and
/// the logger is the process's, not this handle's): read at every scrape, 0 until a
/// reading is given.
#[derive(Debug)]
struct ReadCounter {
    name: &'static str,
    help: &'static str,
    reading: Reading,
}

/// `ratelimit_cluster_slots_served`: exported only once Cluster mode has measured it, so
/// that in Sentinel mode no series claims a coverage that means nothing there (an alert on
/// it would fire for no cluster at all).
#[derive(Debug, Default)]
struct SlotsServed {
    /// Negative until the first measurement.
    slots: Arc<AtomicI64>,
}

impl Collector for SlotsServed {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let slots = self.slots.load(Ordering::Relaxed);
        if slots < 0 {
            return Ok(());
        }
        let gauge = ConstGauge::new(slots);
        let metric = encoder.encode_descriptor(
            "cluster_slots_served",
            "Hash slots of the Redis Cluster served by a master that answers (CLUSTER INFO cluster_slots_ok; 16384 is all), or 0 while no node answers",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric)
    }
}

impl Collector for ReadCounter {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counter = ConstCounter::new(self.reading.get().map_or(0, |read| read()));
        let metric =
            encoder.encode_descriptor(self.name, self.help, None, counter.metric_type())?;
        counter.encode(metric)
    }
}

struct Recorder {
    registry: Registry,
    log_lines_dropped: Reading,
    decisions: Family<DecisionLabels, Counter>,
    limit_decisions: Family<LimitLabels, Counter>,
    policy_reloads: Family<ResultLabels, Counter>,
    policy_version: Family<PolicyVersionLabels, Gauge>,
    store_duration: Histogram,
    store_errors: Family<KindLabels, Counter>,
    master_changes: Counter,
    current_master: Family<AddrLabels, Gauge>,
    fallback_active: Gauge,
    ready: Gauge,
    cluster_slots_served: Arc<AtomicI64>,
    cluster_refunds: Family<ResultLabels, Counter>,
    http_requests: Family<RouteStatusLabels, Counter>,
    http_duration: Family<RouteLabels, Histogram>,
    rls_unmatched: Family<ReasonLabels, Counter>,
    grpc_requests: Family<CodeLabels, Counter>,
    rls_reloads: Family<ResultLabels, Counter>,
    rls_version: Family<PolicyVersionLabels, Gauge>,
    give_backs: Family<ResultLabels, Counter>,
}

fn latency_histogram() -> Histogram {
    // 50 µs to about 1.6 s: a decision is sub-millisecond, a timeout is REDIS_TIMEOUT_MS.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// A file the service watches and reloads, each with its own reload and version series.
#[derive(Debug, Clone, Copy)]
pub enum Watched {
    /// `POLICY_FILE`: `ratelimit_policy_reloads_total`, `ratelimit_policy_version_info`.
    Policies,
    /// `RLS_CONFIG`: `ratelimit_rls_reloads_total`, `ratelimit_rls_version_info`.
    Rules,
}

impl Recorder {
    fn watched(
        &self,
        watched: Watched,
    ) -> (
        &Family<ResultLabels, Counter>,
        &Family<PolicyVersionLabels, Gauge>,
    ) {
        match watched {
            Watched::Policies => (&self.policy_reloads, &self.policy_version),
            Watched::Rules => (&self.rls_reloads, &self.rls_version),
        }
    }

    fn new() -> Self {
        let mut registry = Registry::with_prefix("ratelimit");
        let decisions = Family::default();
        registry.register(
            "decisions",
            "Rate-limit decisions by outcome and by what decided",
            decisions.clone(),
        );
        let store_duration = latency_histogram();
        registry.register(
            "store_request_duration_seconds",
            "Time of the store call behind each decision",
            store_duration.clone(),
        );
        let store_errors = Family::default();
        registry.register(
            "store_errors",
            "Store calls that could not decide, by cause",
            store_errors.clone(),
        );
        let master_changes = Counter::default();
        registry.register(
            "sentinel_master_changes",
            "Times a new Redis master was put in use",
            master_changes.clone(),
        );
        let current_master = Family::default();
        registry.register(
            "current_master_info",
            "The Redis master in use (value 1)",
            current_master.clone(),
        );
        let fallback_active = Gauge::default();
        registry.register(
            "fallback_active",
            "1 while Redis cannot decide and FAIL_MODE applies",
            fallback_active.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 when the store could decide at the last readiness check (GET /ready, and every scrape of /metrics)",
            ready.clone(),
        );
        let slots_served = SlotsServed::default();
        let cluster_slots_served = Arc::clone(&slots_served.slots);
        cluster_slots_served.store(-1, Ordering::Relaxed);
        registry.register_collector(Box::new(slots_served));
        let cluster_refunds = Family::default();
        registry.register(
            "cluster_refunds",
            "Payments given back in Redis Cluster mode because another hash slot refused the request, by result",
            cluster_refunds.clone(),
        );
        let build_info = Family::<VersionLabels, Gauge>::default();
        build_info
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "The running version (value 1)", build_info);
        let http_requests = Family::default();
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            http_requests.clone(),
        );
        let http_duration = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by route",
            http_duration.clone(),
        );
        let limit_decisions = Family::default();
        registry.register(
            "limit_decisions",
            "What each limit of each policy decided (mode: enforce or shadow; a shadow limit's limited is a would-be denial)",
            limit_decisions.clone(),
        );
        let policy_reloads = Family::default();
        registry.register(
            "policy_reloads",
            "Policy file reloads by result",
            policy_reloads.clone(),
        );
        let policy_version = Family::default();
        registry.register(
            "policy_version_info",
            "The active policy set's version, a hash of its file (value 1)",
            policy_version.clone(),
        );
        let rls_unmatched = Family::default();
        registry.register(
            "rls_unmatched_descriptors",
            "Rate-limit service descriptors answered OK with no limit, by reason (unknown_domain, no_rule, replaced)",
            rls_unmatched.clone(),
        );
        let grpc_requests = Family::default();
        registry.register(
            "grpc_requests",
            "ShouldRateLimit calls by answer: OK, OVER_LIMIT, or the gRPC status of a refusal",
            grpc_requests.clone(),
        );
        let rls_reloads = Family::default();
        registry.register(
            "rls_reloads",
            "RLS_CONFIG reloads by result (the rate-limit service's rules)",
            rls_reloads.clone(),
        );
        let rls_version = Family::default();
        registry.register(
            "rls_version_info",
            "The active rate-limit service rules' version, a hash of their files (value 1)",
            rls_version.clone(),
        );
        let give_backs = Family::default();
        registry.register(
            "give_backs",
            "Calls that gave hits back (is_negative_hits), by where: redis, local (this instance's share), lost (the store could not be reached)",
            give_backs.clone(),
        );
        let log_lines_dropped = Reading::default();
        registry.register_collector(Box::new(ReadCounter {
            name: "log_lines_dropped",
            help: "Log lines dropped because the queue to the stderr writer was full (LOG_QUEUE_LINES)",
            reading: Arc::clone(&log_lines_dropped),
        }));
        Self {
            registry,
            log_lines_dropped,
            decisions,
            limit_decisions,
            policy_reloads,
            policy_version,
            store_duration,
            store_errors,
            master_changes,
            current_master,
            fallback_active,
            ready,
            cluster_slots_served,
            cluster_refunds,
            http_requests,
            http_duration,
            rls_unmatched,
            grpc_requests,
            rls_reloads,
            rls_version,
            give_backs,
        }
    }
}

/// What the service records. Cloning shares the same registry. Two handles built
/// separately (two limiters in one process, two tests) never see each other's figures.
#[derive(Clone)]
pub struct Metrics {
    /// `None` with `METRICS=off`: every call returns at once, so the benchmark can price
    /// recording.
    recorder: Option<Arc<Recorder>>,
}

impl Metrics {
    pub fn new(enabled: bool) -> Self {
        Self {
            recorder: enabled.then(|| Arc::new(Recorder::new())),
        }
    }

    /// Adds one to the series of `labels` in the counter family `family` names, when
    /// metrics are on.
    fn count<L: Clone + std::hash::Hash + Eq>(
        &self,
        family: impl FnOnce(&Recorder) -> &Family<L, Counter>,
        labels: &L,
    ) {
        if let Some(recorder) = &self.recorder {
            family(recorder).get_or_create(labels).inc();
        }
    }

    /// A handle that records nothing.
    pub fn off() -> Self {
        Self::new(false)
    }

    /// One decision: `allowed` or not, and what decided (`redis`, `local`, `open`, `closed`).
    pub fn decision(&self, allowed: bool, source: &'static str) {
        let decision = if allowed { "allowed" } else { "limited" };
        self.count(
            |recorder| &recorder.decisions,
            &DecisionLabels { decision, source },
        );
    }

    /// One limit's part in a decision: whether it had the tokens, by policy, limit and mode.
    pub fn limit_decision(&self, policy: &Arc<str>, limit: &Arc<str>, shadow: bool, allowed: bool) {
        let Some(recorder) = &self.recorder else {
            return;
        };
        recorder
            .limit_decisions
            .get_or_create(&LimitLabels {
                policy: policy.clone(),
                limit: limit.clone(),
                mode: if shadow { "shadow" } else { "enforce" },
                decision: if allowed { "allowed" } else { "limited" },
            })
            .inc();
    }

    /// Where `ratelimit_log_lines_dropped_total` is read from at every scrape; the first
    /// reading given stays.
    pub fn read_log_lines_dropped(&self, read: fn() -> u64) {
        if let Some(recorder) = &self.recorder {
            let _ = recorder.log_lines_dropped.set(read);
        }
    }

    /// A reload attempt of a watched file (`applied`, `rejected`, `unreadable`).
    pub fn reload(&self, watched: Watched, result: &'static str) {
        if let Some(recorder) = &self.recorder {
            let (reloads, _) = recorder.watched(watched);
            reloads.get_or_create(&ResultLabels { result }).inc();
        }
    }

    /// The version of a watched file's set now active.
    pub fn version(&self, watched: Watched, version: &str) {
        if let Some(recorder) = &self.recorder {
            let (_, active) = recorder.watched(watched);
            active.clear();
            active
                .get_or_create(&PolicyVersionLabels {
                    version: version.to_string(),
                })
                .set(1);
        }
    }

    /// Hits given back, by where (`redis`, `local`, `lost`).
    pub fn give_back(&self, result: &'static str) {
        self.count(|recorder| &recorder.give_backs, &ResultLabels { result });
    }

    pub fn store_call(&self, elapsed: Duration) {
        if let Some(recorder) = &self.recorder {
            recorder.store_duration.observe(elapsed.as_secs_f64());
        }
    }

    /// A store call that could not decide, by its kind (`StoreError::kind`).
    /// Writes every series of the bounded label sets at 0 before anything is counted: an
    /// absent series is not 0 to Prometheus (`rate()` of nothing is nothing, an alert on it
    /// never fires), nor to a check that something "stays 0".
    pub fn declare(&self, store_error_kinds: &[&'static str], sources: &[&'static str]) {
        let Some(recorder) = &self.recorder else {
            return;
        };
        for &kind in store_error_kinds {
            drop(recorder.store_errors.get_or_create(&KindLabels { kind }));
        }
        for &source in sources {
            for decision in ["allowed", "limited"] {
                drop(
                    recorder
                        .decisions
                        .get_or_create(&DecisionLabels { decision, source }),
                );
            }
        }
    }

    /// Writes the policy file's reload series at 0, one per result (see
    /// Writes a watched file's reload series at 0, one per result.
    pub fn declare_reloads(&self, watched: Watched, results: &[&'static str]) {
        if let Some(recorder) = &self.recorder {
            let (reloads, _) = recorder.watched(watched);
            for &result in results {
                drop(reloads.get_or_create(&ResultLabels { result }));
            }
        }
    }

    /// Writes the rate-limit service's series at 0 (see [`Metrics::declare`]).
    pub fn declare_rls(&self, unmatched_reasons: &[&'static str], codes: &[&'static str]) {
        let Some(recorder) = &self.recorder else {
            return;
        };
        for &reason in unmatched_reasons {
            drop(
                recorder
                    .rls_unmatched
                    .get_or_create(&ReasonLabels { reason }),
            );
        }
        for &code in codes {
            drop(recorder.grpc_requests.get_or_create(&CodeLabels { code }));
        }
    }

    /// A descriptor of a rate-limit service request that no limit applied to, by why
    /// (`rls::Unmatched::as_str`). Never by domain: a request names any domain it likes.
    pub fn rls_unmatched(&self, reason: &'static str) {
        self.count(|recorder| &recorder.rls_unmatched, &ReasonLabels { reason });
    }

    /// A `ShouldRateLimit` call, by its answer (`OK`, `OVER_LIMIT`) or its gRPC status.
    pub fn grpc_request(&self, code: &'static str) {
        self.count(|recorder| &recorder.grpc_requests, &CodeLabels { code });
    }

    pub fn store_error(&self, kind: &'static str) {
        self.count(|recorder| &recorder.store_errors, &KindLabels { kind });
    }

    pub fn master_changed(&self, addr: &str) {
        let Some(recorder) = &self.recorder else {
            return;
        };
        recorder.master_changes.inc();
        recorder.current_master.clear();
        recorder
            .current_master
            .get_or_create(&AddrLabels {
                addr: addr.to_string(),
            })
            .set(1);
    }

    /// The masters of a Redis Cluster now in use, `added` of them new since the last call.
    pub fn cluster_masters(&self, addrs: &[String], added: u64) {
        let Some(recorder) = &self.recorder else {
            return;
        };
        recorder.master_changes.inc_by(added);
        recorder.current_master.clear();
        for addr in addrs {
            recorder
                .current_master
                .get_or_create(&AddrLabels { addr: addr.clone() })
                .set(1);
        }
    }

    /// A refund in Redis Cluster mode: `given` when the script ran, else it failed.
    pub fn cluster_refund(&self, given: bool) {
        let result = if given { "given" } else { "failed" };
        self.count(
            |recorder| &recorder.cluster_refunds,
            &ResultLabels { result },
        );
    }

    pub fn fallback_active(&self, active: bool) {
        if let Some(recorder) = &self.recorder {
            recorder.fallback_active.set(i64::from(active));
        }
    }

    /// Whether the store could decide at a readiness check.
    pub fn ready(&self, ready: bool) {
        if let Some(recorder) = &self.recorder {
            recorder.ready.set(i64::from(ready));
        }
    }

    /// How many of a Redis Cluster's hash slots a master that answers serves now.
    pub fn cluster_slots_served(&self, slots: u64) {
        if let Some(recorder) = &self.recorder {
            let slots = i64::try_from(slots).unwrap_or(i64::MAX);
            recorder
                .cluster_slots_served
                .store(slots, Ordering::Relaxed);
        }
    }

    pub fn http_request(&self, route: &'static str, status: u16, elapsed: Duration) {
        let Some(recorder) = &self.recorder else {
            return;
        };
        recorder
            .http_requests
            .get_or_create(&RouteStatusLabels { route, status })
            .inc();
        recorder
            .http_duration
            .get_or_create(&RouteLabels { route })
            .observe(elapsed.as_secs_f64());
    }

    /// The registry in the Prometheus text format.
    pub fn render(&self) -> String {
        let Some(recorder) = &self.recorder else {
            return "# METRICS=off: nothing is recorded\n".to_string();
        };
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &recorder.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_log_lines_are_read_at_every_scrape() {
        let metrics = Metrics::new(true);
        assert!(
            metrics
                .render()
                .contains("\nratelimit_log_lines_dropped_total 0\n")
        );
        metrics.read_log_lines_dropped(|| 42);
        assert!(
            metrics
                .render()
                .contains("\nratelimit_log_lines_dropped_total 42\n"),
            "{}",
            metrics.render()
        );
    }

    #[test]
    fn two_handles_keep_their_own_figures() {
        let (first, second) = (Metrics::new(true), Metrics::new(true));
        first.fallback_active(true);
        first.decision(true, "redis");
        assert!(first.render().contains("ratelimit_fallback_active 1"));
        assert!(second.render().contains("ratelimit_fallback_active 0"));
        assert!(!second.render().contains("decision=\"allowed\""));
    }

    #[test]
    fn slot_coverage_is_absent_until_cluster_mode_measures_it() {
        let metrics = Metrics::new(true);
        assert!(!metrics.render().contains("ratelimit_cluster_slots_served"));
        metrics.cluster_slots_served(16_384);
        assert!(
            metrics
                .render()
                .contains("\nratelimit_cluster_slots_served 16384\n"),
            "{}",
            metrics.render()
        );
    }

    #[test]
    fn reload_results_are_declared_at_zero_before_any_reload() {
        let metrics = Metrics::new(true);
        metrics.declare_reloads(Watched::Policies, &["applied", "rejected"]);
        let text = metrics.render();
        assert!(
            text.contains("ratelimit_policy_reloads_total{result=\"rejected\"} 0\n"),
            "{text}"
        );
    }

    #[test]
    fn a_handle_that_is_off_records_nothing() {
        let off = Metrics::off();
        off.decision(true, "redis");
        off.master_changed("127.0.0.1:6379");
        assert!(!off.render().contains("ratelimit_"));
    }
}
