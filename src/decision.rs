//! What decides a limited request: the deny cache when it already knows the answer is
//! no, else the store, else the configured failure policy ([`FailMode`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::bucket::{Decision, Limit};
use crate::deny_cache::DenyCache;
use crate::identity::ClientKey;
use crate::metrics::Metrics;
use crate::store::memory::MemoryStore;
use crate::store::{Store, StoreError};

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

/// What happens to one request. Each variant carries exactly what its answer needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A bucket decided, under `limit` (a share of the configured one in the fallback).
    Decided {
        bucket: Bucket,
        limit: Limit,
        decision: Decision,
    },
    /// No store could decide and `FAIL_MODE=open` admitted the request.
    Open { limit: Limit },
    /// No store could decide and `FAIL_MODE=closed` refused it.
    Closed { limit: Limit },
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        match self {
            Verdict::Decided { decision, .. } => decision.allowed,
            Verdict::Open { .. } => true,
            Verdict::Closed { .. } => false,
        }
    }

    pub fn source(&self) -> Source {
        match self {
            Verdict::Decided {
                bucket: Bucket::Shared,
                ..
            } => Source::Redis,
            Verdict::Decided {
                bucket: Bucket::Local,
                ..
            } => Source::Local,
            Verdict::Open { .. } => Source::Open,
            Verdict::Closed { .. } => Source::Closed,
        }
    }

    /// The limit the request was judged under.
    pub fn limit(&self) -> &Limit {
        match self {
            Verdict::Decided { limit, .. }
            | Verdict::Open { limit }
            | Verdict::Closed { limit } => limit,
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
    pub limit: Limit,
    pub fail_mode: FailMode,
    /// The divisor of the local fallback's share.
    pub instances: InstanceCount,
    /// `DENY_CACHE_SIZE`; 0 turns the cache off.
    pub deny_cache_size: usize,
    /// Where the local fallback keeps its buckets.
    pub fallback: MemoryStore,
    pub metrics: Metrics,
}

pub struct Decider {
    buckets: Buckets,
    limit: Limit,
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
            limit: settings.limit,
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

    /// Takes a token for `key`.
    pub async fn decide(&self, key: ClientKey) -> Verdict {
        let verdict = match &self.buckets {
            Buckets::Local(store) => {
                let started = Instant::now();
                let decision = store.take_now(&key, &self.limit);
                self.metrics.store_call(started.elapsed());
                Verdict::Decided {
                    bucket: Bucket::Local,
                    limit: self.limit,
                    decision,
                }
            }
            Buckets::Shared(store) => self.decide_shared(store.as_ref(), key).await,
        };
        self.metrics
            .decision(verdict.allowed(), verdict.source().as_str());
        verdict
    }

    async fn decide_shared(&self, store: &dyn Store, key: ClientKey) -> Verdict {
        let asked_at_us = self.denials.as_ref().map(DenyCache::now_us);
        if let (Some(denials), Some(now_us)) = (&self.denials, asked_at_us)
            && let Some(decision) = denials.lookup_at(&key, now_us)
        {
            return self.shared(decision);
        }
        let started = Instant::now();
        let result = store.take(key, self.limit).await;
        self.metrics.store_call(started.elapsed());
        match result {
            Ok(decision) => {
                self.note_recovered();
                if let (Some(denials), Some(asked_at_us)) = (&self.denials, asked_at_us) {
                    denials.remember_at(&key, asked_at_us, &decision);
                }
                self.shared(decision)
            }
            Err(error) => {
                self.metrics.store_error(error.kind());
                self.note_degraded(&error);
                self.fall_back(&key)
            }
        }
    }

    fn shared(&self, decision: Decision) -> Verdict {
        Verdict::Decided {
            bucket: Bucket::Shared,
            limit: self.limit,
            decision,
        }
    }

    fn fall_back(&self, key: &ClientKey) -> Verdict {
        match self.fail_mode {
            FailMode::Local => {
                let limit = self.limit.share_of((self.instances)());
                Verdict::Decided {
                    bucket: Bucket::Local,
                    limit,
                    decision: self.fallback.take_now(key, &limit),
                }
            }
            FailMode::Open => Verdict::Open { limit: self.limit },
            FailMode::Closed => Verdict::Closed { limit: self.limit },
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
