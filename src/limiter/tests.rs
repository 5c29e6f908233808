//! The [`Decider`] against a scripted store: what it answers when the store denies, fails
//! or is not asked at all (the deny cache), under each `FAIL_MODE`, and what it records.
//! The store's answers are real bucket arithmetic (an inner [`MemoryStore`]); only its
//! failures are scripted, so no test depends on a Redis being there.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{
    Bucket, Buckets, Charges, Decider, DeciderSettings, FailMode, LimitName, LimitVerdict, Source,
    Verdict,
};
use crate::bucket::{Charge, Group, Level, Limit, Taken};
use crate::metrics::Metrics;
use crate::store::memory::MemoryStore;
use crate::store::{KeyedCharge, Store, StoreError, StoreFuture, Unavailable};

/// A store whose failures the test scripts: each `take` answers the next scripted
/// failure, or, once the script is spent, from its own in-process buckets. It counts the
/// calls, so a test can say whether the store was asked.
#[derive(Default)]
struct ScriptedStore {
    buckets: MemoryStore,
    /// The failures the next `take` calls answer, in order.
    failures: Mutex<VecDeque<StoreError>>,
    takes: AtomicUsize,
}

impl ScriptedStore {
    /// The next `times` calls of `take` fail with `error()`.
    fn fail_next(&self, times: usize, error: impl Fn() -> StoreError) {
        let mut failures = self.failures.lock().unwrap();
        failures.extend((0..times).map(|_| error()));
    }

    /// How many times `take` has been called.
    fn takes(&self) -> usize {
        self.takes.load(Ordering::SeqCst)
    }

    /// How many scripted failures are still waiting for a `take` to answer them.
    fn failures_pending(&self) -> usize {
        self.failures.lock().unwrap().len()
    }
}

impl Store for ScriptedStore {
    fn take<'a>(&'a self, charges: &'a [KeyedCharge]) -> StoreFuture<'a, Taken> {
        self.takes.fetch_add(1, Ordering::SeqCst);
        let reply = match self.failures.lock().unwrap().pop_front() {
            Some(error) => Err(error),
            None => Ok(self.buckets.take_all_now(charges)),
        };
        Box::pin(std::future::ready(reply))
    }

    fn reset<'a>(&'a self, buckets: &'a [KeyedCharge]) -> StoreFuture<'a, ()> {
        self.buckets.remove(buckets);
        Box::pin(std::future::ready(Ok(())))
    }

    fn give_back<'a>(&'a self, charges: &'a [KeyedCharge]) -> StoreFuture<'a, Vec<Level>> {
        Box::pin(std::future::ready(Ok(self.buckets.give_back_now(charges))))
    }

    fn check_ready(&self) -> StoreFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }
}

fn timeout() -> StoreError {
    StoreError::Timeout {
        after_ms: 50,
        source: None,
    }
}

fn no_replicas() -> StoreError {
    StoreError::unavailable(Unavailable::NoReplicas)
}

/// One limit of one policy as a request draws on it; the test owns the names the
/// verdict borrows.
struct Rule {
    policy: Arc<str>,
    limit: Arc<str>,
    charge: Charge,
}

impl Rule {
    fn enforced(policy: &str, name: &str, limit: Limit) -> Self {
        Self {
            policy: policy.into(),
            limit: name.into(),
            charge: Charge::one(limit),
        }
    }

    fn shadow(policy: &str, name: &str, limit: Limit) -> Self {
        Self {
            charge: Charge {
                group: Group::Shadow(1),
                ..Charge::one(limit)
            },
            ..Self::enforced(policy, name, limit)
        }
    }

    fn name(&self) -> LimitName<'_> {
        LimitName {
            policy: &self.policy,
            limit: &self.limit,
        }
    }

    /// Its bucket: one hash per policy, one field per limit.
    fn bucket(&self) -> KeyedCharge {
        KeyedCharge {
            key: format!("test:{}", self.policy).into(),
            field: self.limit.to_string().into(),
            charge: self.charge,
        }
    }
}

fn charges(rules: &[Rule]) -> Charges<'_> {
    Charges {
        names: rules.iter().map(Rule::name).collect(),
        buckets: rules.iter().map(Rule::bucket).collect(),
    }
}

fn buckets(rules: &[Rule]) -> Vec<KeyedCharge> {
    rules.iter().map(Rule::bucket).collect()
}

/// A decider on a [`ScriptedStore`], with the handles a test looks at.
struct Harness {
    store: Arc<ScriptedStore>,
    metrics: Metrics,
    decider: Decider,
}

impl Harness {
    fn new(fail_mode: FailMode) -> Self {
        Self::with(fail_mode, 1, 1024)
    }

    fn with(fail_mode: FailMode, instances: u64, deny_cache_size: usize) -> Self {
        let store = Arc::new(ScriptedStore::default());
        let metrics = Metrics::new(true);
        let decider = Decider::new(DeciderSettings {
            buckets: Buckets::Shared(store.clone()),
            fail_mode,
            instances: Arc::new(move || instances),
            deny_cache_size,
            fallback: MemoryStore::new(1024),
            metrics: metrics.clone(),
        });
        Self {
            store,
            metrics,
            decider,
        }
    }

    async fn decide<'r>(&self, rules: &'r [Rule]) -> Verdict<'r> {
        self.decider.decide(charges(rules)).await
    }

    /// The value of one series (name and labels, as rendered); `None` when it is absent,
    /// so a renamed or disabled metric cannot read as 0.
    fn series(&self, series: &str) -> Option<f64> {
        self.metrics
            .render()
            .lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }
}

#[tokio::test]
async fn a_request_that_no_limit_applies_to_is_unlimited_and_the_store_is_not_asked() {
    let harness = Harness::new(FailMode::Closed);

    let verdict = harness.decide(&[]).await;

    assert_eq!(verdict, Verdict::Unlimited);
    assert_eq!(harness.store.takes(), 0);
}

#[tokio::test]
async fn under_fail_mode_local_a_store_failure_admits_only_this_instances_share_of_the_burst() {
    let harness = Harness::with(FailMode::Local, 2, 1024);
    harness.store.fail_next(6, timeout);
    let rules = [Rule::enforced(
        "api",
        "minute",
        Limit::per(10, 60, 10).unwrap(),
    )];

    let mut admitted = Vec::new();
    for _ in 0..6 {
        admitted.push(harness.decide(&rules).await.allowed());
    }

    assert_eq!(admitted, [true, true, true, true, true, false]);
}

#[tokio::test]
async fn under_fail_mode_local_a_store_failure_is_decided_by_the_local_bucket_under_the_share() {
    let harness = Harness::with(FailMode::Local, 2, 1024);
    harness.store.fail_next(1, timeout);
    let whole = Limit::per(10, 60, 10).unwrap();
    let rules = [Rule::enforced("api", "minute", whole)];

    let verdict = harness.decide(&rules).await;

    let Verdict::Decided { bucket, limits, .. } = &verdict else {
        panic!("the local fallback decides: {verdict:?}");
    };
    assert_eq!(*bucket, Bucket::Local);
    assert_eq!(verdict.source(), Some(Source::Local));
    assert_eq!(limits[0].limit, whole.share_of(2));
    assert_eq!(limits[0].level.map(|level| level.remaining), Some(4));
}

#[tokio::test]
async fn under_fail_mode_open_a_store_failure_admits_with_every_limit_listed_and_no_level() {
    let harness = Harness::new(FailMode::Open);
    harness.store.fail_next(1, timeout);
    let (minute, day) = (
        Limit::per(10, 60, 10).unwrap(),
        Limit::per(1000, 86_400, 1000).unwrap(),
    );
    let rules = [
        Rule::enforced("api", "minute", minute),
        Rule::shadow("trial", "day", day),
    ];

    let verdict = harness.decide(&rules).await;

    let expected = Verdict::Open {
        limits: vec![
            LimitVerdict {
                name: rules[0].name(),
                limit: minute,
                enforced: true,
                level: None,
            },
            LimitVerdict {
                name: rules[1].name(),
                limit: day,
                enforced: false,
                level: None,
            },
        ],
    };
    assert_eq!(verdict, expected);
    assert!(verdict.allowed());
    assert_eq!(verdict.source(), Some(Source::Open));
}

#[tokio::test]
async fn under_fail_mode_closed_a_store_failure_refuses_the_request() {
    let harness = Harness::new(FailMode::Closed);
    harness.store.fail_next(1, timeout);
    let rules = [Rule::enforced(
        "api",
        "minute",
        Limit::per(10, 60, 10).unwrap(),
    )];

    let verdict = harness.decide(&rules).await;

    assert!(
        matches!(&verdict, Verdict::Closed { limits } if limits.len() == 1 && limits[0].level.is_none()),
        "{verdict:?}"
    );
    assert!(!verdict.allowed());
    assert_eq!(verdict.source(), Some(Source::Closed));
}

#[tokio::test]
async fn the_first_store_failure_turns_the_fallback_gauge_on() {
    let harness = Harness::new(FailMode::Open);
    harness.store.fail_next(1, timeout);
    let rules = [Rule::enforced(
        "api",
        "minute",
        Limit::per(10, 60, 10).unwrap(),
    )];
    assert_eq!(harness.series("ratelimit_fallback_active"), Some(0.0));

    harness.decide(&rules).await;

    assert_eq!(harness.series("ratelimit_fallback_active"), Some(1.0));
}

#[tokio::test]
async fn a_store_success_after_a_failure_turns_the_fallback_gauge_off() {
    let harness = Harness::new(FailMode::Open);
    harness.store.fail_next(1, timeout);
    let rules = [Rule::enforced(
        "api",
        "minute",
        Limit::per(10, 60, 10).unwrap(),
    )];
    harness.decide(&rules).await;
    assert_eq!(harness.series("ratelimit_fallback_active"), Some(1.0));

    let verdict = harness.decide(&rules).await;

    assert_eq!(verdict.source(), Some(Source::Redis));
    assert_eq!(harness.series("ratelimit_fallback_active"), Some(0.0));
}

#[tokio::test]
async fn each_store_failure_is_counted_by_its_kind() {
    let harness = Harness::new(FailMode::Open);
    harness.store.fail_next(2, timeout);
    harness.store.fail_next(1, no_replicas);
    let rules = [Rule::enforced(
        "api",
        "minute",
        Limit::per(10, 60, 10).unwrap(),
    )];

    for _ in 0..3 {
        harness.decide(&rules).await;
    }

    assert_eq!(
        harness.series(r#"ratelimit_store_errors_total{kind="timeout"}"#),
        Some(2.0)
    );
    assert_eq!(
        harness.series(r#"ratelimit_store_errors_total{kind="noreplicas"}"#),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_denial_from_the_store_is_answered_again_without_asking_the_store() {
    let harness = Harness::new(FailMode::Closed);
    let rules = [Rule::enforced(
        "api",
        "minute",
        Limit::per(1, 60, 1).unwrap(),
    )];
    harness.decide(&rules).await;
    let denied = harness.decide(&rules).await;
    assert!(!denied.allowed());
    let asked = harness.store.takes();

    let again = harness.decide(&rules).await;

    assert!(!again.allowed());
    assert_eq!(again.source(), Some(Source::Redis));
    assert_eq!(harness.store.takes(), asked);
}

#[tokio::test]
async fn a_cached_denial_ends_at_its_retry_after_and_the_store_is_asked_again() {
    let harness = Harness::new(FailMode::Closed);
    // A token every 50 ms: the denial is cached for at most that long.
    let rules = [Rule::enforced(
        "api",
        "second",
        Limit::per(20, 1, 1).unwrap(),
    )];
    harness.decide(&rules).await;
    let denied = harness.decide(&rules).await;
    assert!(!denied.allowed());
    let asked = harness.store.takes();

    tokio::time::sleep(Duration::from_micros(denied.retry_after_us())).await;
    let after = harness.decide(&rules).await;

    assert_eq!(harness.store.takes(), asked + 1);
    assert!(after.allowed());
}

#[tokio::test]
async fn with_a_deny_cache_size_of_zero_every_request_asks_the_store() {
    let harness = Harness::with(FailMode::Closed, 1, 0);
    let rules = [Rule::enforced(
        "api",
        "minute",
        Limit::per(1, 60, 1).unwrap(),
    )];

    let mut allowed = Vec::new();
    for _ in 0..3 {
        allowed.push(harness.decide(&rules).await.allowed());
    }

    assert_eq!(allowed, [true, false, false]);
    assert_eq!(harness.store.takes(), 3);
}

// The cache is looked up before the store is asked, so while a denial is cached the
// failure is never seen: the request is denied from the cache even under FAIL_MODE=open,
// and the decider does not enter its degraded mode.
#[tokio::test]
async fn while_a_denial_is_cached_a_failing_store_is_not_asked_and_the_cached_denial_stands() {
    let harness = Harness::new(FailMode::Open);
    let rules = [Rule::enforced(
        "api",
        "minute",
        Limit::per(1, 60, 1).unwrap(),
    )];
    harness.decide(&rules).await;
    assert!(!harness.decide(&rules).await.allowed());
    let asked = harness.store.takes();
    harness.store.fail_next(1, timeout);

    let verdict = harness.decide(&rules).await;

    assert!(
        matches!(
            verdict,
            Verdict::Decided {
                bucket: Bucket::Shared,
                admitted: false,
                ..
            }
        ),
        "{verdict:?}"
    );
    assert_eq!(harness.store.takes(), asked);
    assert_eq!(harness.store.failures_pending(), 1);
    assert_eq!(harness.series("ratelimit_fallback_active"), Some(0.0));
}

#[tokio::test]
async fn a_reset_clears_the_deny_cache_so_the_next_request_asks_the_store() {
    let harness = Harness::new(FailMode::Closed);
    let rules = [Rule::enforced(
        "api",
        "minute",
        Limit::per(1, 60, 1).unwrap(),
    )];
    harness.decide(&rules).await;
    assert!(!harness.decide(&rules).await.allowed());
    let asked = harness.store.takes();

    harness.decider.reset(&buckets(&rules)).await.unwrap();
    let verdict = harness.decide(&rules).await;

    assert_eq!(harness.store.takes(), asked + 1);
    assert!(verdict.allowed());
}

/// An ample enforced limit, and a shadow limit of one token that the first request
/// spends.
fn enforced_and_thin_shadow() -> [Rule; 2] {
    [
        Rule::enforced("api", "minute", Limit::per(100, 60, 100).unwrap()),
        Rule::shadow("trial", "minute", Limit::per(1, 60, 1).unwrap()),
    ]
}

#[tokio::test]
async fn a_shadow_limit_lacking_tokens_never_refuses_the_request() {
    let harness = Harness::new(FailMode::Closed);
    let rules = enforced_and_thin_shadow();
    harness.decide(&rules).await;

    let verdict = harness.decide(&rules).await;

    assert!(verdict.allowed(), "{verdict:?}");
    assert_eq!(verdict.violated().count(), 0);
}

#[tokio::test]
async fn a_shadow_limit_lacking_tokens_is_reported_unenforced_with_a_level_that_lacked() {
    let harness = Harness::new(FailMode::Closed);
    let rules = enforced_and_thin_shadow();
    harness.decide(&rules).await;

    let verdict = harness.decide(&rules).await;

    let shadow = verdict.limits()[1];
    assert_eq!(shadow.name, rules[1].name());
    assert!(!shadow.enforced);
    assert_eq!(shadow.level.map(|level| level.allowed), Some(false));
}

#[tokio::test]
async fn a_shadow_limit_lacking_tokens_is_counted_as_limited_in_shadow_mode() {
    let harness = Harness::new(FailMode::Closed);
    let rules = enforced_and_thin_shadow();
    harness.decide(&rules).await;

    harness.decide(&rules).await;

    let series = |decision: &str| {
        harness.series(&format!(
            r#"ratelimit_limit_decisions_total{{policy="trial",limit="minute",mode="shadow",decision="{decision}"}}"#
        ))
    };
    assert_eq!(series("allowed"), Some(1.0));
    assert_eq!(series("limited"), Some(1.0));
}

#[tokio::test]
async fn an_enforced_denial_leaves_the_shadow_bucket_unpaid() {
    let harness = Harness::new(FailMode::Closed);
    let rules = [
        Rule::enforced("api", "minute", Limit::per(1, 60, 1).unwrap()),
        Rule::shadow("trial", "minute", Limit::per(3, 60, 3).unwrap()),
    ];
    harness.decide(&rules).await;

    let denied = harness.decide(&rules).await;

    assert!(!denied.allowed());
    let shadow = denied.limits()[1].level.unwrap();
    assert!(shadow.allowed, "the shadow bucket had the token");
    assert_eq!(shadow.remaining, 2, "and did not pay it");
}
