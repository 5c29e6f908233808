//! The decision a limited route acts on: ask the store, and when it cannot decide, apply
//! the configured failure policy.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::FailMode;
use crate::deny_cache::DenyCache;
use crate::identity::ClientKey;
use crate::limiter::{Decision, Policy};
use crate::store::memory::MemoryStore;
use crate::store::{Store, StoreError};

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

/// What happens to one request.
#[derive(Debug, Clone, Copy)]
pub struct Verdict {
    pub source: Source,
    /// The policy the decision was made under (a share of it in the local fallback).
    pub policy: Policy,
    /// The bucket's answer; `None` when no bucket was consulted (open or closed).
    pub decision: Option<Decision>,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        match self.source {
            Source::Open => true,
            Source::Closed => false,
            Source::Redis | Source::Local => self.decision.is_some_and(|d| d.allowed),
        }
    }
}

/// Tells how many instances share the limits while Redis is away.
pub type InstanceCount = Arc<dyn Fn() -> u64 + Send + Sync>;

pub struct RateLimiter {
    store: Arc<dyn Store>,
    /// Whether `store` is shared (Redis) rather than this process's memory.
    shared: bool,
    policy: Policy,
    fail_mode: FailMode,
    fallback: MemoryStore,
    instances: InstanceCount,
    /// True while Redis cannot decide, so the change is logged once each way.
    degraded: AtomicBool,
    /// Denials Redis gave, answered here until they expire; only for a shared store.
    denials: Option<DenyCache>,
}

impl RateLimiter {
    pub fn new(
        store: Arc<dyn Store>,
        shared: bool,
        policy: Policy,
        fail_mode: FailMode,
        instances: InstanceCount,
        deny_cache_size: usize,
        fallback: MemoryStore,
    ) -> Self {
        Self {
            denials: if shared {
                DenyCache::new(deny_cache_size)
            } else {
                None
            },
            store,
            shared,
            policy,
            fail_mode,
            fallback,
            instances,
            degraded: AtomicBool::new(false),
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Takes a token for `key`: the deny cache answers when it already knows the answer is
    /// no, else the store decides, else `FAIL_MODE` does.
    pub async fn check(&self, key: ClientKey) -> Verdict {
        let asked_at_us = self.denials.as_ref().map(DenyCache::now_us);
        if let (Some(denials), Some(now_us)) = (&self.denials, asked_at_us)
            && let Some(decision) = denials.lookup_at(&key, now_us)
        {
            return Verdict {
                source: Source::Redis,
                policy: self.policy,
                decision: Some(decision),
            };
        }
        let started = std::time::Instant::now();
        let result = self.store.take(key, self.policy).await;
        crate::metrics::store_call(started.elapsed());
        match result {
            Ok(decision) => {
                self.note_recovered();
                if let (Some(denials), Some(asked_at_us)) = (&self.denials, asked_at_us) {
                    denials.remember_at(&key, asked_at_us, &decision);
                }
                let source = if self.shared {
                    Source::Redis
                } else {
                    Source::Local
                };
                Verdict {
                    source,
                    policy: self.policy,
                    decision: Some(decision),
                }
            }
            Err(error) => {
                crate::metrics::store_error(&error);
                self.note_degraded(&error);
                self.fall_back(&key)
            }
        }
    }

    fn fall_back(&self, key: &ClientKey) -> Verdict {
        match self.fail_mode {
            FailMode::Local => {
                let policy = self.policy.share_of((self.instances)());
                let decision = Some(self.fallback.take_now(key, &policy));
                Verdict {
                    source: Source::Local,
                    policy,
                    decision,
                }
            }
            FailMode::Open => Verdict {
                source: Source::Open,
                policy: self.policy,
                decision: None,
            },
            FailMode::Closed => Verdict {
                source: Source::Closed,
                policy: self.policy,
                decision: None,
            },
        }
    }

    fn note_degraded(&self, error: &StoreError) {
        if !self.degraded.swap(true, Ordering::AcqRel) {
            crate::metrics::fallback_active(true);
            log::warn!(
                "Redis cannot decide ({error}); deciding with FAIL_MODE={} until it can",
                self.fail_mode.as_str()
            );
        }
    }

    fn note_recovered(&self) {
        if self.degraded.load(Ordering::Relaxed) && self.degraded.swap(false, Ordering::AcqRel) {
            crate::metrics::fallback_active(false);
            log::info!("Redis decides again");
        }
    }
}
