//! The decision room: given a request's view (method, path, host, headers, client), an
//! explicit policy, key and cost, or a rate-limit service request's descriptors, decide
//! it. Every front (the HTTP routes, the gateway's `/v1/check`, the decision API, the gRPC
//! service) hands a view in and renders the [`Verdict`] it gets back;
//! nothing outside this module turns policies into charges, numbers shadow groups or
//! builds bucket keys, so no front needs to know how buckets are kept.
//!
//! - [`Limiter`]: the policies in force, the key prefix and the [`Decider`]; each request
//!   goes policies → [`Charges`] → decider → [`Verdict`].
//! - [`decider`]: the deny cache, the store and `FAIL_MODE`, and the metrics of a decision.
//! - [`deny_cache`]: denials Redis gave, answered here until they expire.
//! - [`descriptors`]: a rate-limit service request (Envoy's descriptors, resolved by
//!   [`crate::rls`]) → [`Charges`] → decider → a [`DescriptorVerdict`].
//! - [`verdict`]: what a decision says, for the fronts to render.

pub mod decider;
pub mod deny_cache;
pub mod descriptors;
pub mod verdict;

use std::sync::Arc;

use arc_swap::ArcSwap;
use thiserror::Error;

pub use decider::{Buckets, Decider, DeciderSettings, FailMode, InstanceCount};
pub use descriptors::{DescriptorOutcome, DescriptorVerdict};
pub use verdict::{Bucket, LimitName, LimitVerdict, Source, Verdict};
// The figures a verdict carries, for the fronts that render it.
pub use crate::bucket::{Level, Limit};
// What a front hands in: a request's view, and the refusals it may get back.
pub use crate::policy::{HeaderLookup, LookupError, Mode, Rejection, RequestView};

use crate::bucket::{Charge, Group};
use crate::policy::{Applied, PolicySet};
// Why a descriptor named by the decision API cannot be decided, as the fronts report it.
pub use crate::rls::KeyError;
use crate::rls::RuleSet;
use crate::store::KeyedCharge;
// Why the store could not decide or reset, as the fronts report it.
pub use crate::store::StoreError;

/// The buckets one request draws on, per limit that applies: its name (for the verdict)
/// and its bucket in the store, in the same order.
pub struct Charges<'a> {
    names: Vec<LimitName<'a>>,
    buckets: Vec<KeyedCharge>,
}

impl<'a> Charges<'a> {
    /// Room for `count` charges.
    fn with_capacity(count: usize) -> Self {
        Charges {
            names: Vec::with_capacity(count),
            buckets: Vec::with_capacity(count),
        }
    }

    /// One more bucket, under the limit `name`; the verdict lists it in this order.
    fn push(&mut self, name: LimitName<'a>, bucket: KeyedCharge) {
        self.names.push(name);
        self.buckets.push(bucket);
    }

    /// Every limit of each applied policy: the enforced policies pay together, each shadow
    /// policy on its own (its group). Each policy's hash key is built once.
    fn of(applied: &[Applied<'a>], key_prefix: &str) -> Self {
        let count = applied.iter().map(|a| a.limits.len()).sum();
        let mut charges = Charges::with_capacity(count);
        let mut shadow_policies = 0;
        for applied in applied {
            let group = match applied.policy.mode {
                Mode::Enforce => Group::Enforced,
                Mode::Shadow => {
                    shadow_policies += 1;
                    Group::Shadow(shadow_policies)
                }
            };
            let key: Arc<str> = applied.policy.bucket_key(&applied.key, key_prefix).into();
            for limit in applied.limits {
                let name = LimitName {
                    policy: &applied.policy.name,
                    limit: &limit.name,
                };
                let bucket = KeyedCharge {
                    key: key.clone(),
                    field: limit.field.clone(),
                    charge: Charge {
                        limit: limit.limit,
                        cost: applied.cost,
                        group,
                    },
                };
                charges.push(name, bucket);
            }
        }
        charges
    }
}

/// A verdict on a key the caller named (the decision API), with what that API reports
/// beside it.
pub struct KeyVerdict<'p> {
    pub verdict: Verdict<'p>,
    /// The policy's name, or `rls:<domain>` for a rate-limit service rule.
    pub policy: &'p str,
    /// A shadow policy or rule decides and counts, and never refuses.
    pub mode: Mode,
    /// Where the policy's buckets for this key are: its hash in the store.
    pub bucket: Arc<str>,
    pub cost: u64,
}

/// Why a reset did not happen.
#[derive(Debug, Error)]
pub enum ResetError {
    #[error(transparent)]
    Lookup(#[from] LookupError),
    #[error(transparent)]
    Descriptor(#[from] KeyError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Decides requests under the policies and the rate-limit service's rules in force.
pub struct Limiter {
    /// The policies in force; a reload swaps them between requests.
    policies: Arc<ArcSwap<PolicySet>>,
    /// The rate-limit service's rules in force; a reload swaps them between requests.
    rules: Arc<ArcSwap<RuleSet>>,
    key_prefix: String,
    decider: Decider,
}

impl Limiter {
    pub fn new(
        policies: Arc<ArcSwap<PolicySet>>,
        rules: Arc<ArcSwap<RuleSet>>,
        key_prefix: String,
        decider: Decider,
    ) -> Self {
        Self {
            policies,
            rules,
            key_prefix,
            decider,
        }
    }

    /// The policies in force now. A verdict borrows the names of the set it was decided
    /// under, so a front holds this snapshot until it has rendered the verdict; a reload
    /// meanwhile changes nothing for it.
    pub fn policies(&self) -> Arc<PolicySet> {
        self.policies.load_full()
    }

    /// The rate-limit service's rules in force now; held like [`Limiter::policies`].
    pub fn rules(&self) -> Arc<RuleSet> {
        self.rules.load_full()
    }

    /// Whether the store can decide right now, for `/ready`.
    pub async fn check_ready(&self) -> Result<(), StoreError> {
        self.decider.check_ready().await
    }

    /// Decides `request` under `policies`: every policy that applies, all or nothing; or
    /// why the request cannot be decided (a policy refuses its shape), with no bucket asked.
    pub async fn decide_request<'p>(
        &self,
        policies: &'p PolicySet,
        request: &RequestView<'_>,
    ) -> Result<Verdict<'p>, Rejection> {
        let applied = policies.evaluate(request)?;
        let charges = Charges::of(&applied, &self.key_prefix);
        Ok(self.decider.decide(charges).await)
    }

    /// Decides policy `policy` for the raw key `key` at `cost` (0 only reads), as a request
    /// with that key would be decided: the same buckets, the deny cache, `FAIL_MODE`.
    pub async fn decide_key<'p>(
        &self,
        policies: &'p PolicySet,
        policy: &str,
        key: Option<&[String]>,
        cost: u64,
    ) -> Result<KeyVerdict<'p>, LookupError> {
        let applied = policies.applied_for(policy, key, cost)?;
        let applied = std::slice::from_ref(&applied);
        let charges = Charges::of(applied, &self.key_prefix);
        let bucket = charges
            .buckets
            .first()
            .map(|keyed| keyed.key.clone())
            .unwrap_or_else(|| {
                applied[0]
                    .policy
                    .bucket_key(&applied[0].key, &self.key_prefix)
                    .into()
            });
        let policy = applied[0].policy;
        Ok(KeyVerdict {
            verdict: self.decider.decide(charges).await,
            policy: &policy.name,
            mode: policy.mode,
            bucket,
            cost,
        })
    }

    /// What `request` would be charged, without deciding: each policy that applies, with
    /// its hash in the store (each limit's field there is its [`NamedLimit::field`]).
    ///
    /// [`NamedLimit::field`]: crate::policy::NamedLimit::field
    pub fn explain<'p>(
        &self,
        policies: &'p PolicySet,
        request: &RequestView<'_>,
    ) -> Result<Vec<(Applied<'p>, String)>, Rejection> {
        Ok(policies
            .evaluate(request)?
            .into_iter()
            .map(|applied| {
                let bucket = applied.policy.bucket_key(&applied.key, &self.key_prefix);
                (applied, bucket)
            })
            .collect())
    }

    /// Makes every bucket of policy `policy` for the raw key `key` full again (see
    /// [`Decider::reset`]); answers the hash it deleted.
    pub async fn reset(
        &self,
        policies: &PolicySet,
        policy: &str,
        key: Option<&[String]>,
    ) -> Result<String, ResetError> {
        let applied = policies.applied_for(policy, key, 0)?;
        let bucket = applied.policy.bucket_key(&applied.key, &self.key_prefix);
        let charges = Charges::of(std::slice::from_ref(&applied), &self.key_prefix);
        self.decider.reset(&charges.buckets).await?;
        Ok(bucket)
    }
}

#[cfg(test)]
mod tests;
