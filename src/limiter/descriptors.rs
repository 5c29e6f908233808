//! A rate-limit service request (Envoy's `ShouldRateLimit`, as [`crate::rls`] resolved
//! it) decided: every descriptor with a limit is one bucket, in one hash of its own, and
//! all of them are decided together, all or nothing, in one store operation.
//!
//! The enforced descriptors pay together ([`Group::Enforced`]); each shadow descriptor is a
//! group of its own, paying only when the request is admitted. A descriptor whose hits are
//! more than its bucket can ever hold lacks them ([`Decider`] sees to it), so its request
//! is over the limit and nothing is charged.
//!
//! A descriptor with `is_negative_hits` takes no part in that decision: once the others
//! are decided, its hits are given back to its bucket, never past full
//! ([`Decider::give_back`]), whatever the others came to.
//!
//! [`Decider`]: super::Decider
//! [`Decider::give_back`]: super::Decider::give_back

use super::verdict::{LimitName, LimitVerdict, Verdict};
use super::{Charges, KeyVerdict, Limiter, ResetError};
use crate::bucket::Level;
use crate::bucket::{Charge, Group};
use crate::policy::Mode;
use crate::rls::{
    Charged, Domain, KeyError, LimitSource, Refusal, Resolved, RlsRequest, RuleSet, Unmatched,
};
use crate::store::KeyedCharge;

/// What one descriptor of a request came to.
#[derive(Debug, Clone)]
pub enum DescriptorOutcome<'r> {
    /// Nothing limits it, and nothing was counted.
    Unmatched(Unmatched),
    /// An `unlimited` rule matched it.
    Unlimited,
    /// It was decided: `charged` says under which limit and at what cost, and its part in
    /// the verdict is `verdict.limits()[limit]`.
    Limited { charged: Charged<'r>, limit: usize },
    /// Its hits were given back (`is_negative_hits`): `level` is its bucket after them,
    /// `None` when no bucket could be asked.
    GivenBack {
        charged: Charged<'r>,
        level: Option<Level>,
    },
}

/// A verdict on a rate-limit service request, with what each descriptor came to, in the
/// request's order.
#[derive(Debug)]
pub struct DescriptorVerdict<'r> {
    /// [`Verdict::Unlimited`] when no descriptor has a limit.
    pub verdict: Verdict<'r>,
    pub descriptors: Vec<DescriptorOutcome<'r>>,
}

impl<'r> DescriptorVerdict<'r> {
    /// The part in the verdict of a descriptor that was decided.
    pub fn limit_of(&self, outcome: &DescriptorOutcome<'r>) -> Option<&LimitVerdict<'r>> {
        match outcome {
            DescriptorOutcome::Limited { limit, .. } => self.verdict.limits().get(*limit),
            _ => None,
        }
    }
}

impl Limiter {
    /// Decides `request` under `rules`: every descriptor with a limit, all or nothing, in
    /// one store operation (through the deny cache and `FAIL_MODE`, as every request);
    /// or why it cannot be decided, with no bucket asked.
    pub async fn decide_descriptors<'r>(
        &self,
        rules: &'r RuleSet,
        request: &RlsRequest<'_>,
    ) -> Result<DescriptorVerdict<'r>, Refusal> {
        let resolution = rules.resolve(request)?;
        let Some(domain) = resolution.domain else {
            let unmatched = |resolved| match resolved {
                Resolved::Unmatched(why) => why,
                _ => Unmatched::UnknownDomain,
            };
            return Ok(DescriptorVerdict {
                verdict: Verdict::Unlimited,
                descriptors: (resolution.descriptors.into_iter())
                    .map(|resolved| DescriptorOutcome::Unmatched(unmatched(resolved)))
                    .collect(),
            });
        };
        let mut charges = Charges::with_capacity(resolution.descriptors.len());
        let mut descriptors = Vec::with_capacity(resolution.descriptors.len());
        // The buckets hits are given back to, and their descriptors' places.
        let mut given_back: Vec<(usize, KeyedCharge)> = Vec::new();
        let mut shadow_groups = 0;
        for resolved in resolution.descriptors {
            let charged = match resolved {
                Resolved::Unmatched(why) => {
                    descriptors.push(DescriptorOutcome::Unmatched(why));
                    continue;
                }
                Resolved::Unlimited(_) => {
                    descriptors.push(DescriptorOutcome::Unlimited);
                    continue;
                }
                Resolved::Charged(charged) if charged.gives_back => {
                    let (_, mut bucket) = self.charge_of(domain, &charged, Group::Enforced);
                    // More than a full bucket comes to a full bucket.
                    let capacity = bucket.charge.limit.capacity();
                    bucket.charge.cost = bucket.charge.cost.min(capacity);
                    given_back.push((descriptors.len(), bucket));
                    descriptors.push(DescriptorOutcome::GivenBack {
                        charged,
                        level: None,
                    });
                    continue;
                }
                Resolved::Charged(charged) => charged,
            };
            let group = if charged.shadow() {
                shadow_groups += 1;
                Group::Shadow(shadow_groups)
            } else {
                Group::Enforced
            };
            let (name, bucket) = self.charge_of(domain, &charged, group);
            let index = charges.buckets.len();
            charges.push(name, bucket);
            descriptors.push(DescriptorOutcome::Limited {
                charged,
                limit: index,
            });
        }
        let verdict = self.decider.decide(charges).await;
        if !given_back.is_empty() {
            let buckets: Vec<KeyedCharge> = given_back.iter().map(|(_, b)| b.clone()).collect();
            let levels = self.decider.give_back(&buckets).await;
            for ((at, _), after) in given_back.iter().zip(levels) {
                if let DescriptorOutcome::GivenBack { level, .. } = &mut descriptors[*at] {
                    *level = after;
                }
            }
        }
        Ok(DescriptorVerdict {
            verdict,
            descriptors,
        })
    }

    /// Decides the descriptor of `entries` in `domain` at `cost` (0 only reads), as a
    /// request carrying it alone would be decided: the same bucket, the deny cache,
    /// `FAIL_MODE`. The decision API's `rls:<domain>`.
    pub async fn decide_descriptor_key<'r>(
        &self,
        rules: &'r RuleSet,
        domain: &str,
        entries: &[(&str, &str)],
        cost: u64,
    ) -> Result<KeyVerdict<'r>, KeyError> {
        let (domain, charged) = rules.charged_for(domain, entries, cost)?;
        let group = if charged.shadow() {
            Group::Shadow(1)
        } else {
            Group::Enforced
        };
        let (name, bucket) = self.charge_of(domain, &charged, group);
        let key = bucket.key.clone();
        let mut charges = Charges::with_capacity(1);
        charges.push(name, bucket);
        Ok(KeyVerdict {
            verdict: self.decider.decide(charges).await,
            policy: &domain.label,
            mode: if charged.shadow() {
                Mode::Shadow
            } else {
                Mode::Enforce
            },
            bucket: key,
            cost,
        })
    }

    /// Makes every bucket of the descriptor of `entries` in `domain` full again (see
    /// [`Decider::reset`](super::Decider::reset)): in Redis its whole hash, request
    /// overrides' buckets included; answers the hash.
    pub async fn reset_descriptor(
        &self,
        rules: &RuleSet,
        domain: &str,
        entries: &[(&str, &str)],
    ) -> Result<String, ResetError> {
        let (domain, charged) = rules.charged_for(domain, entries, 0)?;
        let (_, bucket) = self.charge_of(domain, &charged, Group::Enforced);
        let key = bucket.key.to_string();
        self.decider.reset(std::slice::from_ref(&bucket)).await?;
        Ok(key)
    }

    /// A descriptor's bucket in the store, and the name its limit goes by.
    fn charge_of<'r>(
        &self,
        domain: &'r Domain,
        charged: &Charged<'r>,
        group: Group,
    ) -> (LimitName<'r>, KeyedCharge) {
        let limit = match &charged.source {
            LimitSource::Rule(rule) => &rule.label,
            LimitSource::Override(_) => &domain.override_label,
        };
        let stated = charged.limit();
        let bucket = KeyedCharge {
            key: domain.bucket_key(&charged.entries, &self.key_prefix).into(),
            field: stated.bucket.field.clone(),
            charge: Charge {
                limit: stated.bucket.limit,
                cost: charged.cost,
                group,
            },
        };
        let name = LimitName {
            policy: &domain.label,
            limit,
        };
        (name, bucket)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arc_swap::ArcSwap;

    use super::*;
    use crate::bucket::{LimitSpec, Taken};
    use crate::limiter::{Buckets, Decider, DeciderSettings, FailMode, Source};
    use crate::metrics::Metrics;
    use crate::policy::{HashKey, PolicySet};
    use crate::rls::{DescriptorView, LimitOverride, Unit};
    use crate::store::memory::MemoryStore;
    use crate::store::{Store, StoreError, StoreFuture, Unavailable};

    const RULES: &str = "\
domain: edge
descriptors:
  - key: user
    rate_limit: { name: per-user, unit: minute, requests_per_unit: 3 }
  - key: org
    rate_limit: { unit: minute, requests_per_unit: 10 }
  - key: trial
    shadow_mode: true
    rate_limit: { unit: minute, requests_per_unit: 1 }
";

    fn rules() -> RuleSet {
        RuleSet::parse(&[("edge.yaml", RULES)], HashKey::default()).unwrap()
    }

    fn limiter_on(buckets: Buckets, fail_mode: FailMode) -> Limiter {
        let policies = PolicySet::single(LimitSpec {
            rate: 1,
            window_s: 1,
            burst: 1,
        })
        .unwrap();
        let decider = Decider::new(DeciderSettings {
            buckets,
            fail_mode,
            instances: Arc::new(|| 1),
            deny_cache_size: 0,
            fallback: MemoryStore::new(1_000),
            metrics: Metrics::off(),
        });
        Limiter::new(
            Arc::new(ArcSwap::from_pointee(policies)),
            Arc::new(ArcSwap::from_pointee(rules())),
            "t".to_string(),
            decider,
        )
    }

    fn limiter() -> Limiter {
        limiter_on(
            Buckets::Local(Arc::new(MemoryStore::new(1_000))),
            FailMode::Local,
        )
    }

    fn one<'a>(key: &'a str, value: &'a str) -> DescriptorView<'a> {
        DescriptorView {
            entries: vec![(key, value)],
            ..DescriptorView::default()
        }
    }

    fn request(descriptors: Vec<DescriptorView<'_>>) -> RlsRequest<'_> {
        RlsRequest {
            domain: "edge",
            descriptors,
            hits_addend: 0,
        }
    }

    /// What `limiter` decides for a request of `descriptors` in domain `edge`.
    async fn decide<'r>(
        limiter: &Limiter,
        rules: &'r RuleSet,
        descriptors: Vec<DescriptorView<'_>>,
    ) -> DescriptorVerdict<'r> {
        limiter
            .decide_descriptors(rules, &request(descriptors))
            .await
            .unwrap()
    }

    /// Spends the three tokens a minute of `user`, each request admitted.
    async fn spend_the_users_three(limiter: &Limiter, rules: &RuleSet, user: &str) {
        for spent in 1..=3 {
            let decided = decide(limiter, rules, vec![one("user", user)]).await;
            assert!(decided.verdict.allowed(), "{user}: token {spent}");
        }
    }

    /// Whether each decided descriptor had its tokens, and what it has left.
    fn levels(decided: &DescriptorVerdict<'_>) -> Vec<Option<(bool, u64)>> {
        decided
            .descriptors
            .iter()
            .map(|outcome| {
                decided
                    .limit_of(outcome)
                    .and_then(|limit| limit.level)
                    .map(|level| (level.allowed, level.remaining))
            })
            .collect()
    }

    #[tokio::test]
    async fn a_descriptor_is_admitted_exactly_its_limit() {
        let (limiter, rules) = (limiter(), rules());
        for remaining in [2, 1, 0] {
            let decided = decide(&limiter, &rules, vec![one("user", "ann")]).await;
            assert!(decided.verdict.allowed());
            assert_eq!(levels(&decided), [Some((true, remaining))]);
        }
        let decided = decide(&limiter, &rules, vec![one("user", "ann")]).await;
        assert!(!decided.verdict.allowed());
        assert_eq!(levels(&decided), [Some((false, 0))]);
    }

    #[tokio::test]
    async fn a_descriptor_over_its_limit_spends_nothing_of_the_others() {
        let (limiter, rules) = (limiter(), rules());
        spend_the_users_three(&limiter, &rules, "bob").await;
        for _ in 0..5 {
            let decided = decide(
                &limiter,
                &rules,
                vec![one("org", "acme"), one("user", "bob")],
            )
            .await;
            assert!(!decided.verdict.allowed());
            assert_eq!(levels(&decided), [Some((true, 10)), Some((false, 0))]);
        }
    }

    #[tokio::test]
    async fn hits_beyond_a_buckets_capacity_are_over_the_limit_and_spend_nothing() {
        let (limiter, rules) = (limiter(), rules());
        let mut many = one("user", "cat");
        many.hits_addend = Some(4);
        let decided = decide(&limiter, &rules, vec![one("org", "acme"), many]).await;
        assert!(!decided.verdict.allowed());
        assert_eq!(levels(&decided), [Some((true, 10)), Some((false, 3))]);
        // Exactly the capacity is fine.
        let mut all = one("user", "cat");
        all.hits_addend = Some(3);
        let decided = decide(&limiter, &rules, vec![all]).await;
        assert_eq!(levels(&decided), [Some((true, 0))]);
    }

    #[tokio::test]
    async fn a_shadow_descriptor_never_refuses_and_pays_on_its_own() {
        let (limiter, rules) = (limiter(), rules());
        for admitted in [true, false, false] {
            let decided = decide(&limiter, &rules, vec![one("trial", "t"), one("org", "o")]).await;
            assert!(decided.verdict.allowed());
            let trial = decided.limit_of(&decided.descriptors[0]).unwrap();
            assert!(!trial.enforced);
            assert_eq!(!trial.lacked(), admitted);
        }
    }

    #[tokio::test]
    async fn an_unknown_domain_decides_nothing() {
        let (limiter, rules) = (limiter(), rules());
        let mut asked = request(vec![one("user", "ann")]);
        asked.domain = "elsewhere";
        let decided = limiter.decide_descriptors(&rules, &asked).await.unwrap();
        assert_eq!(decided.verdict, Verdict::Unlimited);
        assert!(matches!(
            decided.descriptors[0],
            DescriptorOutcome::Unmatched(Unmatched::UnknownDomain)
        ));
    }

    #[tokio::test]
    async fn an_override_has_a_bucket_of_its_own_beside_the_rules() {
        let (limiter, rules) = (limiter(), rules());
        let mut overridden = one("user", "dan");
        overridden.limit = Some(LimitOverride {
            requests_per_unit: 1,
            unit: Some(Unit::Hour),
        });
        for allowed in [true, false] {
            let decided = decide(&limiter, &rules, vec![overridden.clone()]).await;
            assert_eq!(decided.verdict.allowed(), allowed);
        }
        let decided = decide(&limiter, &rules, vec![one("user", "dan")]).await;
        assert_eq!(levels(&decided), [Some((true, 2))]);
    }

    #[tokio::test]
    async fn a_named_descriptor_is_read_without_spending_decided_and_reset_in_its_bucket() {
        let (limiter, rules) = (limiter(), rules());
        let entries = [("user", "fay")];
        let read = limiter
            .decide_descriptor_key(&rules, "edge", &entries, 0)
            .await
            .unwrap();
        assert_eq!(read.verdict.limits()[0].level.unwrap().remaining, 3);
        assert_eq!(read.policy, "rls:edge");
        assert_eq!(&**read.verdict.limits()[0].name.limit, "per-user");
        // The bucket a ShouldRateLimit with this descriptor spends.
        let spent = decide(&limiter, &rules, vec![one("user", "fay")]).await;
        assert_eq!(levels(&spent), [Some((true, 2))]);
        let named = limiter
            .decide_descriptor_key(&rules, "edge", &entries, 2)
            .await
            .unwrap();
        assert!(named.verdict.allowed());
        assert_eq!(named.verdict.limits()[0].level.unwrap().remaining, 0);
        let bucket = limiter
            .reset_descriptor(&rules, "edge", &entries)
            .await
            .unwrap();
        assert_eq!(bucket, &*read.bucket);
        let after = limiter
            .decide_descriptor_key(&rules, "edge", &entries, 0)
            .await
            .unwrap();
        assert_eq!(after.verdict.limits()[0].level.unwrap().remaining, 3);
    }

    #[tokio::test]
    async fn a_named_descriptor_without_a_bucket_or_at_a_cost_it_never_holds_is_refused() {
        let (limiter, rules) = (limiter(), rules());
        let refused = async |domain: &str, entries: &[(&str, &str)], cost: u64| match limiter
            .decide_descriptor_key(&rules, domain, entries, cost)
            .await
        {
            Err(error) => error.to_string(),
            Ok(_) => panic!("{domain} {entries:?} was decided"),
        };
        let user_a: &[(&str, &str)] = &[("user", "a")];
        for (domain, entries, refusal) in [
            (
                "nowhere",
                user_a,
                "policy: no rate-limit domain is named \"nowhere\"",
            ),
            ("<b>", user_a, "policy: no rate-limit domain has that name"),
            ("edge", &[], "key: the descriptor's entries"),
            (
                "edge",
                &[("colour", "secret-value")],
                "key: no rule of domain \"edge\"",
            ),
        ] {
            let message = refused(domain, entries, 1).await;
            assert!(
                message.starts_with(refusal),
                "{domain} {entries:?}: {message}"
            );
        }
        let too_much = refused("edge", &[("user", "secret-value")], 4).await;
        assert!(too_much.starts_with("cost: 4 is more than 3"), "{too_much}");
        assert!(!too_much.contains("secret-value"));
    }

    /// A store that is never there.
    struct Down;

    impl Store for Down {
        fn take<'a>(&'a self, _: &'a [KeyedCharge]) -> StoreFuture<'a, Taken> {
            Box::pin(async { Err(down()) })
        }
        fn reset<'a>(&'a self, _: &'a [KeyedCharge]) -> StoreFuture<'a, ()> {
            Box::pin(async { Err(down()) })
        }
        fn give_back<'a>(&'a self, _: &'a [KeyedCharge]) -> StoreFuture<'a, Vec<Level>> {
            Box::pin(async { Err(down()) })
        }
        fn check_ready(&self) -> StoreFuture<'_, ()> {
            Box::pin(async { Err(down()) })
        }
    }

    fn down() -> StoreError {
        StoreError::unavailable(Unavailable::NoConnection("test".to_string()))
    }

    fn given_back<'a>(key: &'a str, value: &'a str, hits: u64) -> DescriptorView<'a> {
        DescriptorView {
            hits_addend: Some(hits),
            negative_hits: true,
            ..one(key, value)
        }
    }

    #[tokio::test]
    async fn hits_given_back_fill_the_bucket_again_never_past_full_and_refuse_nothing() {
        let (limiter, rules) = (limiter(), rules());
        spend_the_users_three(&limiter, &rules, "gus").await;
        let given = decide(&limiter, &rules, vec![given_back("user", "gus", 2)]).await;
        assert!(given.verdict.allowed());
        let DescriptorOutcome::GivenBack { level, .. } = &given.descriptors[0] else {
            panic!("not given back: {:?}", given.descriptors[0]);
        };
        assert_eq!(level.unwrap().remaining, 2);
        let too_many = decide(&limiter, &rules, vec![given_back("user", "gus", 1_000)]).await;
        let DescriptorOutcome::GivenBack { level, .. } = &too_many.descriptors[0] else {
            panic!("not given back");
        };
        assert_eq!(level.unwrap().remaining, 3, "full, and no more");
        for admitted in [true, true, true, false] {
            let decided = decide(&limiter, &rules, vec![one("user", "gus")]).await;
            assert_eq!(decided.verdict.allowed(), admitted);
        }
    }

    #[tokio::test]
    async fn hits_are_given_back_whatever_the_requests_other_descriptors_decide() {
        let (limiter, rules) = (limiter(), rules());
        spend_the_users_three(&limiter, &rules, "hal").await;
        let decided = decide(
            &limiter,
            &rules,
            vec![one("user", "hal"), given_back("org", "acme", 1)],
        )
        .await;
        assert!(!decided.verdict.allowed(), "the user has nothing left");
        // The org was never charged: nothing to give back, and it stays full.
        let DescriptorOutcome::GivenBack { level, .. } = &decided.descriptors[1] else {
            panic!("not given back");
        };
        assert_eq!(level.unwrap().remaining, 10);
        let refill = decide(
            &limiter,
            &rules,
            vec![given_back("user", "hal", 1), one("org", "acme")],
        )
        .await;
        assert!(refill.verdict.allowed(), "the org had room");
        let user = decide(&limiter, &rules, vec![one("user", "hal")]).await;
        assert!(user.verdict.allowed(), "the user's hit came back");
    }

    #[tokio::test]
    async fn while_the_store_is_down_hits_go_back_to_the_local_share_or_are_lost() {
        let rules = rules();
        for (mode, asked) in [
            (FailMode::Local, true),
            (FailMode::Open, false),
            (FailMode::Closed, false),
        ] {
            let limiter = limiter_on(Buckets::Shared(Arc::new(Down)), mode);
            let decided = decide(&limiter, &rules, vec![given_back("user", "ivy", 1)]).await;
            let DescriptorOutcome::GivenBack { level, .. } = &decided.descriptors[0] else {
                panic!("not given back");
            };
            assert_eq!(level.is_some(), asked, "{mode:?}");
            assert!(decided.verdict.allowed(), "{mode:?}");
        }
    }

    #[tokio::test]
    async fn a_store_that_cannot_decide_leaves_it_to_fail_mode() {
        let rules = rules();
        for (mode, allowed, source) in [
            (FailMode::Open, true, Source::Open),
            (FailMode::Closed, false, Source::Closed),
            (FailMode::Local, true, Source::Local),
        ] {
            let limiter = limiter_on(Buckets::Shared(Arc::new(Down)), mode);
            let decided = decide(&limiter, &rules, vec![one("user", "eve")]).await;
            assert_eq!(decided.verdict.allowed(), allowed, "{mode:?}");
            assert_eq!(decided.verdict.source(), Some(source), "{mode:?}");
        }
    }
}
