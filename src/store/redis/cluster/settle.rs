//! A request decided over several hash slots, joined into one answer: each slot's call was
//! all or nothing for its own buckets; the request is admitted by the admission rule over
//! all of them, and what a slot paid that one master deciding everything would not have is
//! given back. Pure: the store sends the calls and the refunds.

use redis::{ErrorKind, RedisError};

use crate::bucket::{self, Level, Taken};
use crate::store::redis::script::answered;
use crate::store::{KeyedCharge, StoreError};

/// What one slot's script call answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotReply {
    /// Which of the request's charges the call decided, in the order it sent them.
    pub charges: Vec<usize>,
    /// A time on the master's clock (µs) no later than the payment.
    pub paid_at_us: u64,
    /// The script's answer: `had`, `units` per charge.
    pub answer: Vec<u64>,
}

impl SlotReply {
    /// Whether the bucket of the call's `at`th charge had the tokens. A reply too short to
    /// say reads as "it had not", so nothing is given back for it: that can only lower a
    /// limit, and a malformed reply never panics a worker.
    fn had(&self, at: usize) -> bool {
        self.answer.get(2 * at) == Some(&1)
    }
}

/// Per slot reply, per charge its call sent: whether to give that charge's payment back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refunds(pub Vec<Vec<bool>>);

/// Which of `reply`'s charges its call paid: the script applies [`bucket::settle`] to the
/// charges of its own call, as if they were the whole request.
pub fn paid_in_call(charges: &[KeyedCharge], reply: &SlotReply) -> Vec<bool> {
    bucket::settle(
        &reply.charges,
        |&i| charges[i].charge.group,
        |at| reply.had(at),
    )
    .pays
}

/// Joins the slots' replies into one answer, by [`bucket::settle`] over all the charges,
/// as one master deciding them in one step would have. A charge that its slot paid but
/// the rule would not have is given back (see [`Refunds`]); its level reports the bucket
/// as it is without the payment, as that master would have.
pub fn settle_slots(
    charges: &[KeyedCharge],
    replies: &[SlotReply],
) -> Result<(Taken, Refunds), StoreError> {
    let mut had = vec![None; charges.len()];
    let mut units = vec![0; charges.len()];
    for reply in replies {
        let pairs = answered(&reply.answer, reply.charges.len())?;
        for (&i, (had_tokens, held)) in reply.charges.iter().zip(pairs) {
            had[i] = Some(had_tokens);
            units[i] = held;
        }
    }
    let Some(had) = had.into_iter().collect::<Option<Vec<bool>>>() else {
        return Err(StoreError::Other {
            source: Box::new(RedisError::from((
                ErrorKind::Client,
                "a charge was decided by no slot",
            ))),
        });
    };
    let settlement = bucket::settle(charges, |keyed| keyed.charge.group, |i| had[i]);
    let mut refunds = Vec::with_capacity(replies.len());
    for reply in replies {
        let paid = paid_in_call(charges, reply);
        let refund: Vec<bool> = reply
            .charges
            .iter()
            .zip(paid)
            .map(|(&i, paid)| paid && !settlement.pays[i])
            .collect();
        for (&i, refunded) in reply.charges.iter().zip(&refund) {
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
    let taken = Taken {
        admitted: settlement.admitted,
        levels,
    };
    Ok((taken, Refunds(refunds)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bucket::Group;

    fn charge(key: &str, field: &str, burst: u64, group: Group) -> KeyedCharge {
        KeyedCharge::hourly(key, field, burst, group)
    }

    /// A reply to `call` (one slot's charges): per charge, whether it had the tokens; the
    /// units as the script reports them (paid or not, by the script's rule).
    fn reply(charges: &[KeyedCharge], call: &[usize], had: &[bool]) -> SlotReply {
        let mut slot = SlotReply {
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
        let replies = [
            reply(&charges, &[0], &[true]),
            reply(&charges, &[1], &[false]),
        ];
        let (taken, refunds) = settle_slots(&charges, &replies).unwrap();
        assert!(!taken.admitted);
        assert_eq!(refunds, Refunds(vec![vec![true], vec![false]]));
        // As a single master would have reported it: had the token, still holds all ten.
        let minute = taken.levels[0];
        assert!(minute.allowed);
        assert_eq!(minute.remaining, 10);
        assert!(!taken.levels[1].allowed);
    }

    #[test]
    fn an_admitted_request_gives_nothing_back() {
        let charges = [
            charge("a:{1}", "minute", 10, Group::Enforced),
            charge("b:{2}", "day", 3, Group::Enforced),
        ];
        let replies = [
            reply(&charges, &[0], &[true]),
            reply(&charges, &[1], &[true]),
        ];
        let (taken, refunds) = settle_slots(&charges, &replies).unwrap();
        assert!(taken.admitted);
        assert_eq!(refunds, Refunds(vec![vec![false], vec![false]]));
        assert_eq!(taken.levels[0].remaining, 9);
        assert_eq!(taken.levels[1].remaining, 2);
    }

    #[test]
    fn a_shadow_bucket_without_tokens_never_causes_a_refund_of_an_enforced_one() {
        let charges = [
            charge("a:{1}", "minute", 10, Group::Enforced),
            charge("trial:{2}", "hour", 1, Group::Shadow(1)),
        ];
        let replies = [
            reply(&charges, &[0], &[true]),
            reply(&charges, &[1], &[false]),
        ];
        let (taken, refunds) = settle_slots(&charges, &replies).unwrap();
        assert!(taken.admitted);
        assert_eq!(refunds, Refunds(vec![vec![false], vec![false]]));
    }

    #[test]
    fn a_shadow_group_paid_for_a_request_denied_elsewhere_is_given_back() {
        let charges = [
            charge("a:{1}", "minute", 1, Group::Enforced),
            charge("trial:{2}", "hour", 5, Group::Shadow(1)),
        ];
        let replies = [
            reply(&charges, &[0], &[false]),
            reply(&charges, &[1], &[true]),
        ];
        let (taken, refunds) = settle_slots(&charges, &replies).unwrap();
        assert!(!taken.admitted);
        assert_eq!(refunds, Refunds(vec![vec![false], vec![true]]));
        assert_eq!(taken.levels[1].remaining, 5);
    }

    #[test]
    fn a_shadow_group_split_over_slots_pays_only_if_all_of_it_had_the_tokens() {
        let charges = [
            charge("a:{1}", "minute", 5, Group::Enforced),
            charge("t:{1}", "x", 5, Group::Shadow(1)),
            charge("t:{2}", "y", 5, Group::Shadow(1)),
        ];
        let replies = [
            reply(&charges, &[0, 1], &[true, true]),
            reply(&charges, &[2], &[false]),
        ];
        let (taken, refunds) = settle_slots(&charges, &replies).unwrap();
        assert!(taken.admitted);
        assert_eq!(refunds, Refunds(vec![vec![false, true], vec![false]]));
    }

    #[test]
    fn an_answer_of_the_wrong_length_is_an_error_not_a_decision() {
        let charges = [charge("a:{1}", "m", 1, Group::Enforced)];
        let broken = SlotReply {
            charges: vec![0],
            paid_at_us: 0,
            answer: vec![1],
        };
        assert!(settle_slots(&charges, &[broken]).is_err());
    }

    #[test]
    fn a_reply_too_short_to_read_pays_nothing_and_never_panics() {
        let charges = [
            charge("a:{1}", "m", 1, Group::Enforced),
            charge("a:{1}", "d", 1, Group::Enforced),
        ];
        let short = SlotReply {
            charges: vec![0, 1],
            paid_at_us: 0,
            answer: vec![1, 0],
        };
        assert_eq!(paid_in_call(&charges, &short), vec![false, false]);
    }
}
