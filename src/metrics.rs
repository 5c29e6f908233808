//! Prometheus metrics, served at `GET /metrics`: one process-wide registry, named to
//! Prometheus conventions under the `ratelimit_` prefix, never labelled per client.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::rate_limiter::Source;
use crate::store::StoreError;

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

struct Metrics {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    store_duration: Histogram,
    store_errors: Family<KindLabels, Counter>,
    master_changes: Counter,
    current_master: Family<AddrLabels, Gauge>,
    fallback_active: Gauge,
    http_requests: Family<RouteStatusLabels, Counter>,
    http_duration: Family<RouteLabels, Histogram>,
}

fn latency_histogram() -> Histogram {
    // 50 µs to about 1.6 s: a decision is sub-millisecond, a timeout is REDIS_TIMEOUT_MS.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
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
    Metrics {
        registry,
        decisions,
        store_duration,
        store_errors,
        master_changes,
        current_master,
        fallback_active,
        http_requests,
        http_duration,
    }
});

/// `METRICS=off` turns recording off, so the benchmark can price it.
static ENABLED: AtomicBool = AtomicBool::new(true);

pub fn set_enabled(enabled: bool) {
    ENABLED.store(enabled, Ordering::Relaxed);
}

fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

pub fn decision(allowed: bool, source: Source) {
    if !enabled() {
        return;
    }
    let decision = if allowed { "allowed" } else { "limited" };
    METRICS
        .decisions
        .get_or_create(&DecisionLabels {
            decision,
            source: source.as_str(),
        })
        .inc();
}

pub fn store_call(elapsed: Duration) {
    if !enabled() {
        return;
    }
    METRICS.store_duration.observe(elapsed.as_secs_f64());
}

pub fn store_error(error: &StoreError) {
    if !enabled() {
        return;
    }
    METRICS
        .store_errors
        .get_or_create(&KindLabels { kind: error.kind() })
        .inc();
}

pub fn master_changed(addr: &str) {
    METRICS.master_changes.inc();
    METRICS.current_master.clear();
    METRICS
        .current_master
        .get_or_create(&AddrLabels {
            addr: addr.to_string(),
        })
        .set(1);
}

pub fn fallback_active(active: bool) {
    METRICS.fallback_active.set(i64::from(active));
}

pub fn http_request(route: &'static str, status: u16, elapsed: Duration) {
    if !enabled() {
        return;
    }
    METRICS
        .http_requests
        .get_or_create(&RouteStatusLabels { route, status })
        .inc();
    METRICS
        .http_duration
        .get_or_create(&RouteLabels { route })
        .observe(elapsed.as_secs_f64());
}

/// The registry in the Prometheus text format.
pub fn render() -> String {
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &METRICS.registry);
    text
}
