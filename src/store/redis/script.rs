//! The bucket scripts as Redis commands, and what the bucket script answers.
//!
//! Every store in Redis sends the same two scripts: `token_bucket.lua` decides
//! ([`decide_cmd`]; several requests in one call, [`decide_batch_cmd`]), `refund.lua`
//! gives back what a Cluster slot paid for a request that another slot refused, or hits a
//! caller gives back ([`refund_cmd`]). Both name their buckets alike: one key per run of consecutive charges
//! on one hash, then per run its length and per bucket its two fields and its limit. So one
//! builder writes both, straight into one command buffer: a `ScriptInvocation` would
//! allocate each argument separately first, on every decision.

use redis::{Cmd, ErrorKind, FromRedisValue, RedisError, Value};

use crate::bucket::{self, Group, Level, Paid, REFUND_LUA, TOKEN_BUCKET_LUA, Taken};
use crate::store::{KeyedCharge, StoreError};

/// How a command names its script.
#[derive(Clone, Copy)]
pub enum ScriptCall<'a> {
    /// `EVALSHA` with the hash of this script, which must be the one the command runs:
    /// what every call sends first.
    Sha(&'a redis::Script),
    /// `EVAL` with its text, for a node that answered `NOSCRIPT`: it runs the script and
    /// keeps it, in the one command that the Cluster client routes by key.
    Text,
}

/// Which of the two scripts a command runs, with what only that one takes.
#[derive(Clone, Copy)]
enum BucketScript {
    Decide,
    /// When the payment was made, as far as the caller knows.
    Refund {
        paid: Paid,
    },
}

/// `token_bucket.lua` over `charges`; `now_us` is the clock to decide on, or `None` for
/// Redis's own (only the parity tests pass one).
pub fn decide_cmd(script: ScriptCall<'_>, charges: &[KeyedCharge], now_us: Option<u64>) -> Cmd {
    bucket_script_cmd(BucketScript::Decide, script, charges, now_us)
}

/// `refund.lua` over `charges`, whose payments were made when `paid` says; `now_us` as
/// [`decide_cmd`] takes it.
pub fn refund_cmd(
    script: ScriptCall<'_>,
    charges: &[KeyedCharge],
    paid: Paid,
    now_us: Option<u64>,
) -> Cmd {
    bucket_script_cmd(BucketScript::Refund { paid }, script, charges, now_us)
}

/// The one writer of both scripts' arguments: the layout is said once, here, and in the
/// headers of the two scripts that read it. Consecutive charges on one key (the limits of
/// one policy) are one hash.
fn bucket_script_cmd(
    which: BucketScript,
    script: ScriptCall<'_>,
    charges: &[KeyedCharge],
    now_us: Option<u64>,
) -> Cmd {
    let mut cmd = Cmd::with_capacity(5 + 8 * charges.len(), 64 + 128 * charges.len());
    match (script, which) {
        (ScriptCall::Sha(script), _) => cmd.arg("EVALSHA").arg(script.get_hash()),
        (ScriptCall::Text, BucketScript::Decide) => cmd.arg("EVAL").arg(TOKEN_BUCKET_LUA),
        (ScriptCall::Text, BucketScript::Refund { .. }) => cmd.arg("EVAL").arg(REFUND_LUA),
    };
    cmd.arg(hashes(charges).count());
    for run in hashes(charges) {
        cmd.arg(&*run[0].key);
    }
    clock(&mut cmd, now_us);
    match which {
        BucketScript::Refund {
            paid: Paid::NoEarlierThan(paid_at_us),
        } => cmd.arg(paid_at_us),
        BucketScript::Refund {
            paid: Paid::Unknown,
        } => cmd.arg(""),
        BucketScript::Decide => &mut cmd,
    };
    buckets(&mut cmd, which, charges);
    cmd
}

/// `token_bucket.lua` over several requests in one call, each decided in turn as
/// [`decide_cmd`] would decide it alone: every request's hashes, in order, then per
/// request its number of hashes and of arguments, and the arguments `decide_cmd` gives it.
pub fn decide_batch_cmd<R: AsRef<[KeyedCharge]>>(
    script: ScriptCall<'_>,
    requests: &[R],
    now_us: Option<u64>,
) -> Cmd {
    let charges: usize = requests.iter().map(|r| r.as_ref().len()).sum();
    let mut cmd = Cmd::with_capacity(6 + 3 * requests.len() + 8 * charges, 64 + 128 * charges);
    match script {
        ScriptCall::Sha(script) => cmd.arg("EVALSHA").arg(script.get_hash()),
        ScriptCall::Text => cmd.arg("EVAL").arg(TOKEN_BUCKET_LUA),
    };
    let keys = |request: &R| hashes(request.as_ref()).count();
    cmd.arg(requests.iter().map(keys).sum::<usize>());
    for request in requests {
        for run in hashes(request.as_ref()) {
            cmd.arg(&*run[0].key);
        }
    }
    clock(&mut cmd, now_us);
    cmd.arg("batch").arg(requests.len());
    for request in requests {
        let charges = request.as_ref();
        // Per hash its m, and six per bucket.
        cmd.arg(keys(request))
            .arg(keys(request) + 6 * charges.len());
        buckets(&mut cmd, BucketScript::Decide, charges);
    }
    cmd
}

/// `cmd`, a call by hash of the script whose text is `script` ([`decide_cmd`],
/// [`decide_batch_cmd`] or [`refund_cmd`]), as the same call by that text
/// ([`ScriptCall::Text`]): for a node that answered `NOSCRIPT`.
pub fn by_text(cmd: &Cmd, script: &str) -> Cmd {
    let mut text = Cmd::new();
    text.arg("EVAL").arg(script);
    for arg in cmd.args_iter().skip(2) {
        if let redis::Arg::Simple(bytes) = arg {
            text.arg(bytes);
        }
    }
    text
}

/// Whether `cmd` calls `script` by its hash.
pub fn calls(cmd: &Cmd, script: &redis::Script) -> bool {
    matches!(cmd.args_iter().nth(1), Some(redis::Arg::Simple(hash)) if hash == script.get_hash().as_bytes())
}

/// `charges` by hash: runs of consecutive charges on one key.
fn hashes(charges: &[KeyedCharge]) -> impl Iterator<Item = &[KeyedCharge]> {
    charges.chunk_by(|a, b| a.key == b.key)
}

/// The clock to decide on, or '' for Redis's own.
fn clock(cmd: &mut Cmd, now_us: Option<u64>) {
    match now_us {
        Some(now_us) => cmd.arg(now_us),
        None => cmd.arg(""),
    };
}

/// Per hash of `charges`: its number of buckets, and per bucket its two fields, its limit
/// and (deciding) its group.
fn buckets(cmd: &mut Cmd, which: BucketScript, charges: &[KeyedCharge]) {
    let mut field = String::with_capacity(64);
    for run in hashes(charges) {
        cmd.arg(run.len());
        for keyed in run {
            let charge = &keyed.charge;
            for suffix in [":tokens", ":ts"] {
                field.clear();
                field.push_str(&keyed.field);
                field.push_str(suffix);
                cmd.arg(field.as_str());
            }
            cmd.arg(charge.limit.capacity_units())
                .arg(charge.limit.refill_units_per_us())
                .arg(charge.limit.units_of(charge.cost));
            if let BucketScript::Decide = which {
                cmd.arg(match charge.group {
                    Group::Enforced => 0,
                    Group::Shadow(n) => n,
                });
            }
        }
    }
}

/// `refund.lua`'s answer over `charges` (the units each bucket holds after it) as each
/// bucket's level.
pub(crate) fn levels_after_refund(
    charges: &[KeyedCharge],
    units: &[u64],
) -> Result<Vec<Level>, StoreError> {
    if units.len() != charges.len() {
        return Err(StoreError::Other {
            source: Box::new(RedisError::from((
                ErrorKind::Parse,
                "the refund script answered the wrong number of values",
                format!("{} for {} buckets", units.len(), charges.len()),
            ))),
        });
    }
    Ok(charges
        .iter()
        .zip(units)
        .map(|(keyed, &units)| Level::from_units(&keyed.charge.limit, true, units, 0))
        .collect())
}

/// The bucket script's answer for `buckets` charges, read as one `(had, units)` per
/// charge, in order: whether its bucket had the tokens, and the units it holds after the
/// call (paid or not, by the script's rule).
pub(crate) fn answered(
    answer: &[u64],
    buckets: usize,
) -> Result<impl Iterator<Item = (bool, u64)> + '_, StoreError> {
    if answer.len() != 2 * buckets {
        return Err(StoreError::Other {
            source: Box::new(RedisError::from((
                ErrorKind::Parse,
                "the bucket script answered the wrong number of values",
                format!("{} for {} buckets", answer.len(), buckets),
            ))),
        });
    }
    Ok(answer.chunks_exact(2).map(|pair| (pair[0] == 1, pair[1])))
}

/// What the bucket script's answer says about `charges`, all decided in one call.
pub(crate) fn taken_from(charges: &[KeyedCharge], answer: &[u64]) -> Result<Taken, StoreError> {
    let levels: Vec<Level> = charges
        .iter()
        .zip(answered(answer, charges.len())?)
        .map(|(keyed, (had, units))| {
            let charge = &keyed.charge;
            Level::from_units(&charge.limit, had, units, charge.cost)
        })
        .collect();
    let admitted =
        bucket::settle(charges, |keyed| keyed.charge.group, |i| levels[i].allowed).admitted;
    Ok(Taken { admitted, levels })
}

/// A batch's answer ([`decide_batch_cmd`] over `requests` requests), one per request in
/// order: the values a lone call would have answered (`taken_from` reads them), or the
/// error that request alone met. The whole is an error only when it cannot be read.
pub fn batch_answers(
    answer: Value,
    requests: usize,
) -> Result<Vec<Result<Vec<u64>, RedisError>>, RedisError> {
    let answers = match answer {
        Value::ServerError(error) => return Err(error.into()),
        Value::Array(answers) if answers.len() == requests => answers,
        other => {
            return Err(RedisError::from((
                ErrorKind::Parse,
                "the bucket script answered a batch with the wrong shape",
                format!("{other:?} for {requests} requests"),
            )));
        }
    };
    Ok(answers
        .into_iter()
        .map(|answer| match answer {
            Value::ServerError(error) => Err(error.into()),
            values => Vec::<u64>::from_redis_value(values).map_err(RedisError::from),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bucket::{Charge, Limit};

    fn charge(key: &str, field: &str, group: Group) -> KeyedCharge {
        KeyedCharge {
            key: key.into(),
            field: field.into(),
            charge: Charge {
                group,
                ..Charge::one(Limit::per(10, 60, 20).unwrap())
            },
        }
    }

    /// Two limits of one policy on hash `a`, one of another on hash `b`.
    fn charges() -> [KeyedCharge; 3] {
        [
            charge("a", "m", Group::Enforced),
            charge("a", "d", Group::Shadow(2)),
            charge("b", "m", Group::Enforced),
        ]
    }

    /// How [`charges`] follow its hash count: each bucket of `a` with its group, then
    /// `b`'s count, its bucket and group.
    fn charges_spelled() -> Vec<String> {
        let mut words = bucket("m");
        words.push("0".into());
        words.extend(bucket("d"));
        words.extend(["2", "1"].map(String::from));
        words.extend(bucket("m"));
        words.push("0".into());
        words
    }

    fn words(cmd: &Cmd) -> Vec<String> {
        cmd.args_iter()
            .map(|arg| match arg {
                redis::Arg::Simple(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                _ => "<not an argument>".into(),
            })
            .collect()
    }

    /// A bucket's fields and limit, as both scripts read them.
    fn bucket(field: &str) -> Vec<String> {
        let limit = Limit::per(10, 60, 20).unwrap();
        vec![
            format!("{field}:tokens"),
            format!("{field}:ts"),
            limit.capacity_units().to_string(),
            limit.refill_units_per_us().to_string(),
            limit.units_of(1).to_string(),
        ]
    }

    #[test]
    fn a_decision_names_each_hash_once_and_each_bucket_with_its_group() {
        let words = words(&decide_cmd(ScriptCall::Text, &charges(), Some(7)));
        let mut expected: Vec<String> = ["EVAL", TOKEN_BUCKET_LUA, "2", "a", "b", "7", "2"]
            .map(String::from)
            .into();
        expected.extend(charges_spelled());
        assert_eq!(words, expected);
    }

    #[test]
    fn a_batch_names_every_requests_hashes_then_each_requests_counts_and_buckets() {
        let (both, alone) = (charges(), [charge("a", "m", Group::Enforced)]);
        let requests: [&[KeyedCharge]; 2] = [&both, &alone];
        let words = words(&decide_batch_cmd(ScriptCall::Text, &requests, None));
        let mut expected: Vec<String> = ["EVAL", TOKEN_BUCKET_LUA, "3", "a", "b", "a", ""]
            .map(String::from)
            .into();
        expected.extend(["batch", "2", "2", "20", "2"].map(String::from));
        expected.extend(charges_spelled());
        expected.extend(["1", "7", "1"].map(String::from));
        expected.extend(bucket("m"));
        expected.push("0".into());
        assert_eq!(words, expected);
    }

    #[test]
    fn a_call_by_hash_becomes_the_same_call_by_text() {
        let script = redis::Script::new(TOKEN_BUCKET_LUA);
        let requests = [charges().to_vec(), charges()[..1].to_vec()];
        assert_eq!(
            words(&by_text(
                &decide_batch_cmd(ScriptCall::Sha(&script), &requests, None),
                TOKEN_BUCKET_LUA
            )),
            words(&decide_batch_cmd(ScriptCall::Text, &requests, None))
        );
        assert_eq!(
            words(&by_text(
                &decide_cmd(ScriptCall::Sha(&script), &charges(), None),
                TOKEN_BUCKET_LUA
            )),
            words(&decide_cmd(ScriptCall::Text, &charges(), None))
        );
    }

    #[test]
    fn a_refund_by_hash_is_told_from_a_decision_and_resent_by_its_own_text() {
        let (decide, refund) = (
            redis::Script::new(TOKEN_BUCKET_LUA),
            redis::Script::new(REFUND_LUA),
        );
        let by_hash = refund_cmd(ScriptCall::Sha(&refund), &charges(), Paid::Unknown, None);
        assert!(calls(&by_hash, &refund));
        assert!(!calls(&by_hash, &decide));
        assert_eq!(
            words(&by_text(&by_hash, REFUND_LUA)),
            words(&refund_cmd(
                ScriptCall::Text,
                &charges(),
                Paid::Unknown,
                None
            ))
        );
    }

    #[test]
    fn a_batch_answer_is_read_per_request_and_an_error_in_it_is_that_requests_alone() {
        // As Redis writes it: two answers, and an error between them.
        let answer = redis::parse_redis_value(
            b"*3\r\n*2\r\n:1\r\n:9\r\n-WRONGTYPE Operation\r\n*2\r\n:0\r\n:0\r\n",
        )
        .unwrap();
        let answers = batch_answers(answer, 3).unwrap();
        assert_eq!(answers[0].as_ref().unwrap(), &[1, 9]);
        assert!(answers[1].is_err());
        assert_eq!(answers[2].as_ref().unwrap(), &[0, 0]);
        let short = redis::parse_redis_value(b"*1\r\n*2\r\n:1\r\n:9\r\n").unwrap();
        assert!(
            batch_answers(short, 3).is_err(),
            "too few answers is no answer"
        );
    }

    #[test]
    fn a_refund_names_its_buckets_as_the_decision_did_after_the_time_of_the_payment() {
        let words = words(&refund_cmd(
            ScriptCall::Text,
            &charges(),
            Paid::NoEarlierThan(5),
            None,
        ));
        let mut expected: Vec<String> = ["EVAL", REFUND_LUA, "2", "a", "b", "", "5", "2"]
            .map(String::from)
            .into();
        expected.extend(bucket("m"));
        expected.extend(bucket("d"));
        expected.push("1".into());
        expected.extend(bucket("m"));
        assert_eq!(words, expected);
    }

    #[test]
    fn hits_given_back_at_an_unknown_time_send_no_time_of_payment() {
        let words = words(&refund_cmd(
            ScriptCall::Text,
            &charges(),
            Paid::Unknown,
            None,
        ));
        assert_eq!(words[2..8], ["2", "a", "b", "", "", "2"]);
    }

    #[test]
    fn a_command_by_hash_names_the_script_by_its_hash() {
        let script = redis::Script::new(REFUND_LUA);
        let words = words(&refund_cmd(
            ScriptCall::Sha(&script),
            &charges(),
            Paid::Unknown,
            None,
        ));
        assert_eq!(words[..2], ["EVALSHA", script.get_hash()]);
    }

    #[test]
    fn an_answer_of_the_wrong_length_is_an_error_not_a_decision() {
        let charges = charges();
        assert!(taken_from(&charges, &[1, 0, 1, 0]).is_err());
        let taken = taken_from(&charges, &[1, 0, 0, 0, 1, 0]).unwrap();
        assert!(
            taken.admitted,
            "a shadow bucket without tokens denies nothing"
        );
        assert!(!taken.levels[1].allowed);
    }
}
