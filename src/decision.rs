//! What decides a limited request over all the limits that apply to it: the deny cache
//! when it already knows the answer is no, else the store (all or nothing, in one
//! operation), else the configured failure policy ([`FailMode`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::bucket::{Charge, Group, Level, Limit, Taken};
use crate::deny_cache::DenyCache;
use crate::metrics::Metrics;
use crate::store::memory::MemoryStore;
use crate::store::{KeyedCharge, Store, StoreError};

/// What to do when Redis cannot decide (`FAIL_MODE`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, strum::EnumString, strum::IntoStaticStr, strum::VariantNames,
)]
#[strum(serialize_all = "lowercase", ascii_case_insensitive)]
pub enum FailMode {
    /// Decide in this process with this instance's share of the limits.
    Local,
    /// Admit everything.
    Open,
    /// Answer 503.
    Closed,
}

impl FailMode {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Which part of the system decided, as `X-RateLimit-Source` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The shared store.
    Redis,
    /// This process: the embedded store, or the fallback while Redis cannot decide.
    Local,
    /// Redis could not decide and `FAIL_MODE=open` admitted the request.
    Open,
    /// Redis could not decide and `FAIL_MODE=closed` refused the request.
    Closed,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Redis => "redis",
            Source::Local => "local",
            Source::Open => "open",
            Source::Closed => "closed",
        }
    }
}

/// Which bucket answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    /// The shared store (Redis), directly or through its cached denial.
    Shared,
    /// This process's memory: the embedded store, or the fallback's share.
    Local,
}

/// Which limit of which policy, as headers, bodies and metrics name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitName<'a> {
    pub policy: &'a str,
    pub limit: &'a str,
}

/// One bucket a request draws on: a limit of a policy, for this request's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitCharge<'a> {
    pub name: LimitName<'a>,
    /// Where the bucket is in the store: the policy's hash for this key, and the limit's
    /// field in it.
    pub key: String,
    pub field: String,
    pub charge: Charge,
}

/// One limit's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Judged<'a> {
    pub name: LimitName<'a>,
    /// The limit it was judged under: the configured one, or its share in the fallback.
    pub limit: Limit,
    pub group: Group,
    pub decision: Level,
}

/// A limit that applied when no bucket could be asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unasked<'a> {
    pub name: LimitName<'a>,
    pub limit: Limit,
    pub group: Group,
}

/// What happens to one request. Each variant carries exactly what its answer needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// No policy applies: admitted, nothing counted.
    Unlimited,
    /// Buckets decided: admitted when every enforced limit had the tokens.
    Decided {
        bucket: Bucket,
        admitted: bool,
        limits: Vec<Judged<'a>>,
    },
    /// No store could decide and `FAIL_MODE=open` admitted the request.
    Open { limits: Vec<Unasked<'a>> },
    /// No store could decide and `FAIL_MODE=closed` refused it.
    Closed { limits: Vec<Unasked<'a>> },
}

impl Verdict<'_> {
    pub fn allowed(&self) -> bool {
        match self {
            Verdict::Unlimited | Verdict::Open { .. } => true,
            Verdict::Decided { admitted, .. } => *admitted,
            Verdict::Closed { .. } => false,
        }
    }

    /// What decided, for `X-RateLimit-Source`; `None` when nothing had to.
    pub fn source(&self) -> Option<Source> {
        match self {
            Verdict::Unlimited => None,
            Verdict::Decided {
                bucket: Bucket::Shared,
                ..
            } => Some(Source::Redis),
            Verdict::Decided {
                bucket: Bucket::Local,
                ..
            } => Some(Source::Local),
            Verdict::Open { .. } => Some(Source::Open),
            Verdict::Closed { .. } => Some(Source::Closed),
        }
    }

    /// For a denial: when every enforced limit that lacked tokens has them again.
    pub fn retry_after_us(&self) -> u64 {
        match self {
            Verdict::Decided {
                admitted: false,
                limits,
                ..
            } => limits
                .iter()
                .filter(|judged| judged.group == Group::Enforced)
                .map(|judged| judged.decision.retry_after_us)
                .max()
                .unwrap_or(0),
            _ => 0,
        }
    }

    /// The enforced limits that lacked tokens, in order (the problem body's
    /// `violated-policies`).
    pub fn violated(&self) -> Vec<LimitName<'_>> {
        match self {
            Verdict::Decided { limits, .. } => limits
                .iter()
                .filter(|judged| judged.group == Group::Enforced && !judged.decision.allowed)
                .map(|judged| judged.name)
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// Tells how many instances share the limits while Redis is away.
pub type InstanceCount = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Where buckets live, and whether other instances share them.
pub enum Buckets {
    /// Redis (or any store every instance sees): denials may be cached, and failures fall
    /// back to `FAIL_MODE`.
    Shared(Arc<dyn Store>),
    /// This process only (no Redis configured): the store cannot fail.
    Local(Arc<MemoryStore>),
}

/// What a [`Decider`] is built from.
pub struct DeciderSettings {
    pub buckets: Buckets,
    pub fail_mode: FailMode,
    /// The divisor of the local fallback's share.
    pub instances: InstanceCount,
    /// `DENY_CACHE_SIZE`; 0 turns the cache off.
    pub deny_cache_size: usize,
    /// Where the local fallback keeps its buckets.
    pub fallback: MemoryStore,
    pub metrics: Metrics,
}

/// Would-be denials of shadow policies, logged at most once per [`ShadowLog::EVERY`] as
/// counts per policy: a shadow rule that would deny at full rate must not flood the log.
#[derive(Default)]
struct ShadowLog {
    pending: std::sync::Mutex<ShadowCounts>,
}

#[derive(Default)]
struct ShadowCounts {
    since: Option<Instant>,
    by_policy: Vec<(String, u64)>,
}

impl ShadowLog {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(10);

    fn note(&self, policy: &str) {
        let Ok(mut pending) = self.pending.lock() else {
            return;
        };
        let since = *pending.since.get_or_insert_with(Instant::now);
        match pending
            .by_policy
            .iter_mut()
            .find(|(name, _)| name == policy)
        {
            Some((_, count)) => *count += 1,
            None => pending.by_policy.push((policy.to_string(), 1)),
        }
        if since.elapsed() >= Self::EVERY {
            for (name, count) in pending.by_policy.drain(..) {
                log::info!(
                    "shadow policy {name} would have denied {count} requests in the last {} s",
                    since.elapsed().as_secs()
                );
            }
            pending.since = None;
        }
    }
}

pub struct Decider {
    buckets: Buckets,
    shadow_log: ShadowLog,
    fail_mode: FailMode,
    fallback: MemoryStore,
    instances: InstanceCount,
    /// True while Redis cannot decide, so the change is logged once each way.
    degraded: AtomicBool,
    /// Denials Redis gave, answered here until they expire; only for shared buckets.
    denials: Option<DenyCache>,
    metrics: Metrics,
}

impl Decider {
    pub fn new(settings: DeciderSettings) -> Self {
        let denials = match settings.buckets {
            Buckets::Shared(_) => DenyCache::new(settings.deny_cache_size),
            Buckets::Local(_) => None,
        };
        Self {
            buckets: settings.buckets,
            shadow_log: ShadowLog::default(),
            fail_mode: settings.fail_mode,
            fallback: settings.fallback,
            instances: settings.instances,
            degraded: AtomicBool::new(false),
            denials,
            metrics: settings.metrics,
        }
    }

    /// Whether the store can decide right now, for `/ready`.
    pub async fn check_ready(&self) -> Result<(), StoreError> {
        match &self.buckets {
            Buckets::Shared(store) => store.check_ready().await,
            Buckets::Local(_) => Ok(()),
        }
    }

    /// Makes the buckets of `charges` full again: in the store (the whole hash of each
    /// key), in the local fallback's share, and in this instance's deny cache, which is
    /// cleared entirely. Other instances keep answering a denial they cached until its
    /// retry-after passes. Fails, changing nothing here, when the store cannot be reached.
    pub async fn reset(&self, charges: &[LimitCharge<'_>]) -> Result<(), StoreError> {
        let keyed: Vec<KeyedCharge> = charges
            .iter()
            .map(|c| KeyedCharge {
                key: c.key.clone(),
                field: c.field.clone(),
                charge: c.charge,
            })
            .collect();
        match &self.buckets {
            Buckets::Local(store) => store.remove(&keyed),
            Buckets::Shared(store) => {
                store.reset(&keyed).await?;
                self.fallback.remove(&keyed);
            }
        }
        if let Some(denials) = &self.denials {
            denials.clear();
        }
        Ok(())
    }

    /// Decides a request that draws on `charges`, all or nothing.
    pub async fn decide<'a>(&self, charges: Vec<LimitCharge<'a>>) -> Verdict<'a> {
        if charges.is_empty() {
            return Verdict::Unlimited;
        }
        let (names, keyed): (Vec<LimitName<'a>>, Vec<KeyedCharge>) = charges
            .into_iter()
            .map(|c| {
                (
                    c.name,
                    KeyedCharge {
                        key: c.key,
                        field: c.field,
                        charge: c.charge,
                    },
                )
            })
            .unzip();
        let verdict = match &self.buckets {
            Buckets::Local(store) => {
                let started = Instant::now();
                let outcome = store.take_all_now(&keyed);
                self.metrics.store_call(started.elapsed());
                judged(Bucket::Local, &names, &keyed, outcome)
            }
            Buckets::Shared(store) => self.decide_shared(store.as_ref(), &names, &keyed).await,
        };
        self.metrics.decision(
            verdict.allowed(),
            verdict.source().map_or("none", Source::as_str),
        );
        if let Verdict::Decided { limits, .. } = &verdict {
            for judged in limits {
                let shadow = judged.group != Group::Enforced;
                self.metrics.limit_decision(
                    judged.name.policy,
                    judged.name.limit,
                    shadow,
                    judged.decision.allowed,
                );
                if shadow && !judged.decision.allowed {
                    self.shadow_log.note(judged.name.policy);
                }
            }
        }
        verdict
    }

    async fn decide_shared<'a>(
        &self,
        store: &dyn Store,
        names: &[LimitName<'a>],
        charges: &[KeyedCharge],
    ) -> Verdict<'a> {
        let asked = self
            .denials
            .as_ref()
            .map(|denials| (denials, denials.fingerprint(charges), denials.now_us()));
        if let Some((denials, fingerprint, now_us)) = asked
            && let Some(levels) = denials.lookup_at(fingerprint, now_us)
        {
            let outcome = Taken {
                admitted: false,
                levels,
            };
            return judged(Bucket::Shared, names, charges, outcome);
        }
        let started = Instant::now();
        let result = store.take(charges).await;
        self.metrics.store_call(started.elapsed());
        match result {
            Ok(outcome) => {
                self.note_recovered();
                if let Some((denials, fingerprint, asked_at_us)) = asked {
                    denials.remember_at(fingerprint, asked_at_us, charges, &outcome);
                }
                judged(Bucket::Shared, names, charges, outcome)
            }
            Err(error) => {
                self.metrics.store_error(error.kind());
                self.note_degraded(&error);
                self.fall_back(names, charges)
            }
        }
    }

    fn fall_back<'a>(&self, names: &[LimitName<'a>], charges: &[KeyedCharge]) -> Verdict<'a> {
        let unasked = || {
            names
                .iter()
                .zip(charges)
                .map(|(name, keyed)| Unasked {
                    name: *name,
                    limit: keyed.charge.limit,
                    group: keyed.charge.group,
                })
                .collect()
        };
        match self.fail_mode {
            FailMode::Local => {
                let instances = (self.instances)();
                let shares: Vec<KeyedCharge> = charges
                    .iter()
                    .map(|keyed| KeyedCharge {
                        key: keyed.key.clone(),
                        field: keyed.field.clone(),
                        charge: Charge {
                            limit: keyed.charge.limit.share_of(instances),
                            ..keyed.charge
                        },
                    })
                    .collect();
                let outcome = self.fallback.take_all_now(&shares);
                judged(Bucket::Local, names, &shares, outcome)
            }
            FailMode::Open => Verdict::Open { limits: unasked() },
            FailMode::Closed => Verdict::Closed { limits: unasked() },
        }
    }

    fn note_degraded(&self, error: &StoreError) {
        if !self.degraded.swap(true, Ordering::AcqRel) {
            self.metrics.fallback_active(true);
            log::warn!(
                "Redis cannot decide ({error}); deciding with FAIL_MODE={} until it can",
                self.fail_mode.as_str()
            );
        }
    }

    fn note_recovered(&self) {
        if self.degraded.load(Ordering::Relaxed) && self.degraded.swap(false, Ordering::AcqRel) {
            self.metrics.fallback_active(false);
            log::info!("Redis decides again");
        }
    }
}

fn judged<'a>(
    bucket: Bucket,
    names: &[LimitName<'a>],
    charges: &[KeyedCharge],
    outcome: Taken,
) -> Verdict<'a> {
    let limits = names
        .iter()
        .zip(charges)
        .zip(outcome.levels)
        .map(|((name, keyed), decision)| Judged {
            name: *name,
            limit: keyed.charge.limit,
            group: keyed.charge.group,
            decision,
        })
        .collect();
    Verdict::Decided {
        bucket,
        admitted: outcome.admitted,
        limits,
    }
}
