//! Buckets in a Redis Cluster (`REDIS_CLUSTER_NODES`): the bucket script of the other
//! modes, run on the master that owns each bucket's hash slot, through the `redis` crate's
//! async cluster client (it keeps the slot map, follows `MOVED` and `ASK`, and reconnects).
//!
//! - [`store`]: [`ClusterStore`]: a cluster connection per worker thread, the take over one
//!   or several slots within one deadline, the decisions of one slot batched, and the
//!   refunds.
//! - [`settle`]: joins the replies of several slots into one answer, by the admission rule,
//!   and says which payments to give back; pure.
//! - [`slots`]: which hash slot each charge lies in, and what a node says of the slots
//!   (`CLUSTER INFO`: are all served; `CLUSTER SLOTS`: by which masters).
//! - [`watch`]: [`ClusterWatch`]: announces this instance and follows the masters, as
//!   [`discovery`](super::discovery) does in Sentinel mode.
//!
//! # One request, one or several slots
//! A policy's buckets for one key are one hash, `<prefix>:<policy>:{<key>}`, and every
//! policy keyed by the same value shares its hash tag, so nearly every request is one slot:
//! one script call, all or nothing, exactly as on a single master. A request whose keys lie
//! in several slots (a policy per client address beside one per API key) is decided on each
//! slot's master at once, each call all or nothing for its own buckets
//! ([`slots::by_slot`]). When every enforced bucket everywhere had the tokens, the request
//! is admitted; otherwise what the slots that paid took is given back ([`settle`],
//! `bucket/refund.lua`). A shadow group pays only if the request is admitted and all its
//! buckets had the tokens, so a shadow bucket is refunded when either fails, and a shadow
//! bucket never causes a refund of an enforced one: it never denies.
//!
//! What this guarantees, and what it costs (README, "Redis Cluster"): no limit ever admits
//! more than it allows, over any interval (`bucket::refund` proves it, refunds included);
//! but between a payment and its refund (one round trip) the bucket holds less, so a
//! request contending for it may be denied that one master, deciding all buckets in one
//! step, would have admitted. A refund that cannot be sent is lost the same way.

pub mod settle;
pub mod slots;
pub mod store;
pub mod watch;

pub use store::{ClusterSettings, ClusterStore};
pub use watch::{ClusterWatch, WATCH_EVERY};
