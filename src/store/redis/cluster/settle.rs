//! A request decided over several hash slots, joined into one answer: each slot's call was
//! all or nothing for its own buckets; the request is admitted by the admission rule over
//! all of them, and what a slot paid that one master deciding everything would not have is
//! given back. Pure: the store sends the calls and the refunds.

use redis::{ErrorKind, RedisError};

use crate::bucket::{Group, Level, Taken};
use crate::store::{KeyedCharge, StoreError};

/// What one slot's script call answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotAnswer {
    /// Which of the request's charges the call decided, in the order it sent them.
    pub charges: Vec<usize>,
    /// A time on the master's clock (µs) no later than the payment.
    pub paid_at_us: u64,
    /// The script's answer: `had`, `units` per charge.
    pub answer: Vec<u64>,
}

impl SlotAnswer {
    fn had(&self, at: usize) -> bool {
        self.answer[2 * at] == 1
    }
}

/// Which of `slot`'s charges its call paid (the script's own rule): all of them had the
/// tokens for the call's enforced charges, and a shadow charge's group had them all in
/// the call.
pub fn paid_in_call(charges: &[KeyedCharge], slot: &SlotAnswer) -> Vec<bool> {
    let group_had = |group: Group| {
        slot.charges
            .iter()
            .enumerate()
            .filter(|(_, i)| charges[**i].charge.group == group)
            .all(|(at, _)| slot.had(at))
    };
    let admitted = group_had(Group::Enforced);
    slot.charges
        .iter()
        .map(|&i| admitted && group_had(charges[i].charge.group))
        .collect()
}

/// A request decided over several slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    pub outcome: Taken,
    /// Per slot answer, per charge it sent: whether to give its payment back.
    pub refunds: Vec<Vec<bool>>,
}

/// Joins the slots' answers into one decision, with the rule of `bucket::take_all`: the
/// request is admitted when every enforced bucket had the tokens, and a shadow group pays
/// when the request is admitted and its buckets all had them. A charge that its slot
/// paid but this rule would not have is given back; its decision reports the bucket as
/// it is without the payment, as a single master would have.
pub fn settle(charges: &[KeyedCharge], answers: &[SlotAnswer]) -> Result<Settled, StoreError> {
    let mut had = vec![None; charges.len()];
    let mut units = vec![0; charges.len()];
    for slot in answers {
        if slot.answer.len() != 2 * slot.charges.len() {
            return Err(StoreError::Other {
                source: RedisError::from((
                    ErrorKind::Parse,
                    "the bucket script answered the wrong number of values",
                    format!("{} for {} buckets", slot.answer.len(), slot.charges.len()),
                )),
            });
        }
        for (at, &i) in slot.charges.iter().enumerate() {
            had[i] = Some(slot.had(at));
            units[i] = slot.answer[2 * at + 1];
        }
    }
    let Some(had) = had.into_iter().collect::<Option<Vec<bool>>>() else {
        return Err(StoreError::Other {
            source: RedisError::from((ErrorKind::Client, "a charge was decided by no slot")),
        });
    };
    let group_had = |group: Group| {
        charges
            .iter()
            .zip(&had)
            .filter(|(keyed, _)| keyed.charge.group == group)
            .all(|(_, had)| *had)
    };
    let admitted = group_had(Group::Enforced);
    let pays: Vec<bool> = charges
        .iter()
        .map(|keyed| admitted && group_had(keyed.charge.group))
        .collect();
    let mut refunds = Vec::with_capacity(answers.len());
    for slot in answers {
        let paid = paid_in_call(charges, slot);
        let refund: Vec<bool> = slot
            .charges
            .iter()
            .zip(paid)
            .map(|(&i, paid)| paid && !pays[i])
            .collect();
        for (&i, refunded) in slot.charges.iter().zip(&refund) {
            if *refunded {
                let charge = &charges[i].charge;
                units[i] = (units[i] + charge.limit.units_of(charge.cost))
                    .min(charge.limit.capacity_units());
            }
        }
        refunds.push(refund);
    }
    let levels = charges
        .iter()
        .zip(had.iter().zip(&units))
        .map(|(keyed, (had, units))| {
            let charge = &keyed.charge;
            Level::from_units(&charge.limit, *had, *units, charge.cost)
        })
        .collect();
    Ok(Settled {
        outcome: Taken { admitted, levels },
        refunds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bucket::{Charge, Limit, LimitSpec};

    fn limit(burst: u64) -> Limit {
        Limit::parse(LimitSpec {
            rate: 1,
            window_s: 3600,
            burst,
        })
        .unwrap()
    }

    fn charge(key: &str, field: &str, burst: u64, group: Group) -> KeyedCharge {
        KeyedCharge {
            key: key.into(),
            field: field.into(),
            charge: Charge {
                group,
                ..Charge::one(limit(burst))
            },
        }
    }

    /// An answer of `call` (one slot's charges): per charge, whether it had the tokens; the
    /// units as the script reports them (paid or not, by the script's rule).
    fn answer(charges: &[KeyedCharge], call: &[usize], had: &[bool]) -> SlotAnswer {
        let mut slot = SlotAnswer {
            charges: call.to_vec(),
            paid_at_us: 7,
            answer: had.iter().flat_map(|h| [u64::from(*h), 0]).collect(),
        };
        let paid = paid_in_call(charges, &slot);
        for (at, &i) in call.iter().enumerate() {
            let limit = charges[i].charge.limit;
            let held = if had[at] { limit.capacity_units() } else { 0 };
            let cost = if paid[at] { limit.units_of(1) } else { 0 };
            slot.answer[2 * at + 1] = held - cost;
        }
        slot
    }

    #[test]
    fn a_denial_in_one_slot_gives_back_what_the_other_slot_paid() {
        let charges = [
            charge("a:{1}", "minute", 10, Group::Enforced),
            charge("b:{2}", "day", 1, Group::Enforced),
        ];
        let answers = [
            answer(&charges, &[0], &[true]),
            answer(&charges, &[1], &[false]),
        ];
        let settled = settle(&charges, &answers).unwrap();
        assert!(!settled.outcome.admitted);
        assert_eq!(settled.refunds, vec![vec![true], vec![false]]);
        // As a single master would have reported it: had the token, still holds all ten.
        let minute = settled.outcome.levels[0];
        assert!(minute.allowed);
        assert_eq!(minute.remaining, 10);
        assert!(!settled.outcome.levels[1].allowed);
    }

    #[test]
    fn an_admitted_request_gives_nothing_back() {
        let charges = [
            charge("a:{1}", "minute", 10, Group::Enforced),
            charge("b:{2}", "day", 3, Group::Enforced),
        ];
        let answers = [
            answer(&charges, &[0], &[true]),
            answer(&charges, &[1], &[true]),
        ];
        let settled = settle(&charges, &answers).unwrap();
        assert!(settled.outcome.admitted);
        assert_eq!(settled.refunds, vec![vec![false], vec![false]]);
        assert_eq!(settled.outcome.levels[0].remaining, 9);
        assert_eq!(settled.outcome.levels[1].remaining, 2);
    }

    #[test]
    fn a_shadow_bucket_without_tokens_never_causes_a_refund_of_an_enforced_one() {
        let charges = [
            charge("a:{1}", "minute", 10, Group::Enforced),
            charge("trial:{2}", "hour", 1, Group::Shadow(1)),
        ];
        let answers = [
            answer(&charges, &[0], &[true]),
            answer(&charges, &[1], &[false]),
        ];
        let settled = settle(&charges, &answers).unwrap();
        assert!(settled.outcome.admitted);
        assert_eq!(settled.refunds, vec![vec![false], vec![false]]);
    }

    #[test]
    fn a_shadow_group_paid_for_a_request_denied_elsewhere_is_given_back() {
        let charges = [
            charge("a:{1}", "minute", 1, Group::Enforced),
            charge("trial:{2}", "hour", 5, Group::Shadow(1)),
        ];
        let answers = [
            answer(&charges, &[0], &[false]),
            answer(&charges, &[1], &[true]),
        ];
        let settled = settle(&charges, &answers).unwrap();
        assert!(!settled.outcome.admitted);
        assert_eq!(settled.refunds, vec![vec![false], vec![true]]);
        assert_eq!(settled.outcome.levels[1].remaining, 5);
    }

    #[test]
    fn a_shadow_group_split_over_slots_pays_only_if_all_of_it_had_the_tokens() {
        let charges = [
            charge("a:{1}", "minute", 5, Group::Enforced),
            charge("t:{1}", "x", 5, Group::Shadow(1)),
            charge("t:{2}", "y", 5, Group::Shadow(1)),
        ];
        let answers = [
            answer(&charges, &[0, 1], &[true, true]),
            answer(&charges, &[2], &[false]),
        ];
        let settled = settle(&charges, &answers).unwrap();
        assert!(settled.outcome.admitted);
        assert_eq!(settled.refunds, vec![vec![false, true], vec![false]]);
    }

    #[test]
    fn an_answer_of_the_wrong_length_is_an_error_not_a_decision() {
        let charges = [charge("a:{1}", "m", 1, Group::Enforced)];
        let broken = SlotAnswer {
            charges: vec![0],
            paid_at_us: 0,
            answer: vec![1],
        };
        assert!(settle(&charges, &[broken]).is_err());
    }
}
