//! What decides a request's charges, whatever front asked: the deny cache when it already
//! knows the answer is no, else the store (all or nothing, in one operation), else the
//! configured failure policy ([`FailMode`]). It also keeps the degraded state (logged once
//! each way, exported as a gauge) and the per-limit metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::Charges;
use super::deny_cache::DenyCache;
use super::verdict::{Bucket, LimitName, LimitVerdict, Source, Verdict};
use crate::bucket::{Charge, Group, Level, Taken};
use crate::metrics::Metrics;
use crate::store::memory::MemoryStore;
use crate::store::{KeyedCharge, Store, StoreError, StoreFuture};

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
    pub async fn reset(&self, buckets: &[KeyedCharge]) -> Result<(), StoreError> {
        match &self.buckets {
            Buckets::Local(store) => store.remove(buckets),
            Buckets::Shared(store) => {
                store.reset(buckets).await?;
                self.fallback.remove(buckets);
            }
        }
        if let Some(denials) = &self.denials {
            denials.clear();
        }
        Ok(())
    }

    /// Gives each charge's cost back to its bucket: hits a caller returns
    /// (`is_negative_hits`; see [`Store::give_back`]), never past full, refusing nothing.
    /// While the store cannot be reached, `FAIL_MODE=local` gives them back to this
    /// instance's share, which is what decides meanwhile; with `open` or `closed` they are
    /// lost, which can only lower what is admitted later. Answers each bucket's level
    /// after it, `None` where none could be asked. Denials cached before stay until they
    /// expire: a denial answered a little longer never admits more.
    pub async fn give_back(&self, charges: &[KeyedCharge]) -> Vec<Option<Level>> {
        let asked = |levels: Vec<Level>| levels.into_iter().map(Some).collect();
        if charges.is_empty() {
            return Vec::new();
        }
        let store = match &self.buckets {
            Buckets::Local(store) => {
                self.metrics.give_back("local");
                return asked(store.give_back_now(charges));
            }
            Buckets::Shared(store) => store,
        };
        match self.ask(store.give_back(charges)).await {
            Some(levels) => {
                self.metrics.give_back("redis");
                asked(levels)
            }
            None => match self.fail_mode {
                FailMode::Local => {
                    self.metrics.give_back("local");
                    asked(self.fallback.give_back_now(&self.shares(charges)))
                }
                FailMode::Open | FailMode::Closed => {
                    self.metrics.give_back("lost");
                    vec![None; charges.len()]
                }
            },
        }
    }

    /// `charges` against this instance's share of each limit (the local fallback's).
    fn shares(&self, charges: &[KeyedCharge]) -> Vec<KeyedCharge> {
        let instances = (self.instances)();
        charges
            .iter()
            .map(|keyed| KeyedCharge {
                key: keyed.key.clone(),
                field: keyed.field.clone(),
                charge: Charge {
                    limit: keyed.charge.limit.share_of(instances),
                    ..keyed.charge
                },
            })
            .collect()
    }

    /// Decides a request that draws on `charges`, all or nothing.
    pub async fn decide<'a>(&self, charges: Charges<'a>) -> Verdict<'a> {
        if charges.buckets.is_empty() {
            return Verdict::Unlimited;
        }
        let Charges {
            names,
            buckets: keyed,
        } = charges;
        let verdict = match &self.buckets {
            Buckets::Local(store) => {
                let started = Instant::now();
                let taken = store.take_all_now(&keyed);
                self.metrics.store_call(started.elapsed());
                decided(Bucket::Local, &names, &keyed, taken)
            }
            Buckets::Shared(store) => self.decide_shared(store.as_ref(), &names, &keyed).await,
        };
        self.metrics.decision(
            verdict.allowed(),
            verdict.source().map_or("none", Source::as_str),
        );
        if let Verdict::Decided { limits, .. } = &verdict {
            for limit in limits {
                let allowed = !limit.lacked();
                self.metrics.limit_decision(
                    limit.name.policy,
                    limit.name.limit,
                    !limit.enforced,
                    allowed,
                );
                if !limit.enforced && !allowed {
                    self.shadow_log.note(limit.name.policy);
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
            let taken = Taken {
                admitted: false,
                levels,
            };
            return decided(Bucket::Shared, names, charges, taken);
        }
        match self.ask(store.take(charges)).await {
            Some(taken) => {
                if let Some((denials, fingerprint, asked_at_us)) = asked {
                    denials.remember_at(fingerprint, asked_at_us, charges, &taken);
                }
                decided(Bucket::Shared, names, charges, taken)
            }
            None => self.fall_back(names, charges),
        }
    }

    /// Awaits a call to the shared store, timed; an answer ends a degraded spell, an error
    /// is counted and starts one (the caller then follows `FAIL_MODE`).
    async fn ask<T>(&self, call: StoreFuture<'_, T>) -> Option<T> {
        let started = Instant::now();
        let result = call.await;
        self.metrics.store_call(started.elapsed());
        match result {
            Ok(answer) => {
                self.note_recovered();
                Some(answer)
            }
            Err(error) => {
                self.metrics.store_error(error.kind());
                self.note_degraded(&error);
                None
            }
        }
    }

    fn fall_back<'a>(&self, names: &[LimitName<'a>], charges: &[KeyedCharge]) -> Verdict<'a> {
        let unasked = || {
            names
                .iter()
                .zip(charges)
                .map(|(name, keyed)| limit_verdict(*name, &keyed.charge, None))
                .collect()
        };
        match self.fail_mode {
            FailMode::Local => {
                let shares = self.shares(charges);
                let taken = self.fallback.take_all_now(&shares);
                decided(Bucket::Local, names, &shares, taken)
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

fn limit_verdict<'a>(
    name: LimitName<'a>,
    charge: &Charge,
    level: Option<crate::bucket::Level>,
) -> LimitVerdict<'a> {
    LimitVerdict {
        name,
        limit: charge.limit,
        enforced: charge.group == Group::Enforced,
        level,
    }
}

fn decided<'a>(
    bucket: Bucket,
    names: &[LimitName<'a>],
    charges: &[KeyedCharge],
    taken: Taken,
) -> Verdict<'a> {
    let limits = names
        .iter()
        .zip(charges)
        .zip(taken.levels)
        .map(|((name, keyed), level)| limit_verdict(*name, &keyed.charge, Some(level)))
        .collect();
    Verdict::Decided {
        bucket,
        admitted: taken.admitted,
        limits,
    }
}
