//! Hash slots: which slot each of a request's charges lies in ([`by_slot`]), and what a
//! node says about the slots: whether every one is served (`CLUSTER INFO`, [`coverage`])
//! and which nodes are their masters (`CLUSTER SLOTS`, [`slot_masters`]).

use redis::Value;
use redis::cluster_routing::Slot;

use crate::store::{KeyedCharge, StoreError, Unavailable};

/// Every slot of a Redis Cluster.
const SLOTS: u64 = 16_384;

/// The charges of each hash slot a request touches (indices into `charges`, in order),
/// slots in the order they first appear. Every charge of one key is in one slot, so the
/// limits of one policy stay together, in their order.
pub fn by_slot(charges: &[KeyedCharge]) -> Vec<Vec<usize>> {
    let mut slots: Vec<(Slot, Vec<usize>)> = Vec::new();
    for (i, keyed) in charges.iter().enumerate() {
        let slot = Slot::for_key(keyed.key.as_bytes());
        match slots.iter_mut().find(|(s, _)| *s == slot) {
            Some((_, share)) => share.push(i),
            None => slots.push((slot, vec![i])),
        }
    }
    slots.into_iter().map(|(_, share)| share).collect()
}

/// A field of a `CLUSTER INFO` answer.
fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.trim().strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// How many slots `CLUSTER INFO` says a master that answers serves (0 when it does not say).
pub fn slots_served(info: &str) -> u64 {
    info_field(info, "cluster_slots_ok")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Whether `CLUSTER INFO` says every slot has a master that answers.
pub fn coverage(info: &str) -> Result<(), StoreError> {
    let state = info_field(info, "cluster_state").unwrap_or("unknown");
    let ok = slots_served(info);
    if state == "ok" && ok == SLOTS {
        return Ok(());
    }
    Err(StoreError::unavailable(Unavailable::ClusterDown(format!(
        "cluster_state:{state}, {ok} of {SLOTS} slots served"
    ))))
}

/// The masters in a `CLUSTER SLOTS` answer, as `host:port`, sorted.
pub fn slot_masters(slots: &Value) -> Vec<String> {
    let text = |value: &Value| match value {
        Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(text) => Some(text.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    };
    let mut masters: Vec<String> = match slots {
        Value::Array(ranges) => ranges
            .iter()
            .filter_map(|range| match range {
                Value::Array(parts) => match parts.get(2) {
                    Some(Value::Array(node)) if node.len() >= 2 => {
                        Some(format!("{}:{}", text(&node[0])?, text(&node[1])?))
                    }
                    _ => None,
                },
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    masters.sort();
    masters.dedup();
    masters
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bucket::Group;

    fn charge(key: &str, field: &str, burst: u64, group: Group) -> KeyedCharge {
        KeyedCharge::hourly(key, field, burst, group)
    }

    #[test]
    fn the_slot_of_a_key_is_crc16_of_its_hash_tag_as_the_cluster_specification_says() {
        // The specification's test vector: CRC16("123456789") = 0x31C3.
        assert_eq!(Slot::for_key("123456789"), Slot::new(0x31C3).unwrap());
        assert_eq!(Slot::for_key("{123456789}.a"), Slot::new(0x31C3).unwrap());
        assert_eq!(
            Slot::for_key("{user1000}.following"),
            Slot::for_key("{user1000}.followers")
        );
        assert_eq!(Slot::for_key("foo{bar}{zap}"), Slot::for_key("bar"));
        assert_eq!(Slot::for_key("foo{{bar}}zap"), Slot::for_key("{bar"));
        // An empty tag does not count: the whole key is hashed.
        assert_ne!(Slot::for_key("a{}{123456789}"), Slot::new(0x31C3).unwrap());
    }

    #[test]
    fn every_policy_keyed_by_one_client_lands_in_one_slot() {
        let charges = [
            charge("rl:login:{ip=192.0.2.1}", "minute", 5, Group::Enforced),
            charge("rl:login:{ip=192.0.2.1}", "day", 50, Group::Enforced),
            charge("rl:api:{ip=192.0.2.1}", "minute", 5, Group::Enforced),
            charge("rl:trial:{ip=192.0.2.1}", "hour", 5, Group::Shadow(1)),
        ];
        assert_eq!(by_slot(&charges), vec![vec![0, 1, 2, 3]]);
    }

    #[test]
    fn charges_in_several_slots_are_grouped_in_order_of_first_appearance() {
        let (a, b) = ("rl:p:{ip=192.0.2.1}", "rl:q:{key=abc}");
        assert_ne!(Slot::for_key(a), Slot::for_key(b));
        let charges = [
            charge(b, "x", 1, Group::Enforced),
            charge(a, "y", 1, Group::Enforced),
            charge(b, "z", 1, Group::Enforced),
        ];
        assert_eq!(by_slot(&charges), vec![vec![0, 2], vec![1]]);
    }

    #[test]
    fn ready_means_every_slot_is_served() {
        let healthy = "cluster_state:ok\r\ncluster_slots_assigned:16384\r\ncluster_slots_ok:16384\r\ncluster_slots_pfail:0\r\n";
        assert!(coverage(healthy).is_ok());
        let failed = "cluster_state:fail\r\ncluster_slots_assigned:16384\r\ncluster_slots_ok:10923\r\ncluster_slots_fail:5461\r\n";
        let reason = coverage(failed).unwrap_err().to_string();
        assert!(
            reason.contains("cluster_state:fail, 10923 of 16384"),
            "{reason}"
        );
        let partial = "cluster_state:ok\r\ncluster_slots_ok:16000\r\n";
        assert!(coverage(partial).is_err());
        assert_eq!(coverage("").unwrap_err().kind(), "clusterdown");
    }

    #[test]
    fn the_masters_are_read_from_cluster_slots() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let slots = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("127.0.0.1", 7001),
                node("127.0.0.1", 7004),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(10922),
                node("127.0.0.1", 7000),
            ]),
            Value::Array(vec![
                Value::Int(10923),
                Value::Int(11000),
                node("127.0.0.1", 7000),
            ]),
        ]);
        assert_eq!(
            slot_masters(&slots),
            vec!["127.0.0.1:7000", "127.0.0.1:7001"]
        );
    }
}
