//! Where buckets live: one trait (the atomic take, a reset, hits given back) and its
//! implementations.
//!
//! - [`memory::MemoryStore`]: in this process; the embedded default and the fallback.
//! - [`redis::RedisStore`]: shared by every instance, on the master that
//!   [`redis::discovery`] keeps current.
//! - [`redis::cluster::ClusterStore`]: shared by every instance, on the masters of a
//!   Redis Cluster, each slot on its own.

pub mod memory;
pub mod redis;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use thiserror::Error;

use crate::bucket::{Charge, Level, Taken};

/// The failure beneath a [`StoreError`], kept as its source for logs. Boxed, so that what
/// the decision layer reads depends on no store's client.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a store could not decide, sorted by what the decision layer does about it. A
/// denial is not an error: it is a [`Level`](crate::bucket::Level). The store's own
/// error, where there is one, is kept as the source for logs.
#[derive(Debug, Error)]
pub enum StoreError {
    /// No answer in time: the node may be paused, overloaded or gone.
    #[error("timed out after {after_ms} ms")]
    Timeout {
        after_ms: u64,
        #[source]
        source: Option<Cause>,
    },
    /// No usable master can be reached now.
    #[error("{cause}")]
    Unavailable {
        cause: Unavailable,
        #[source]
        source: Option<Cause>,
    },
    /// The node answered as a replica (`READONLY`): it is no longer the master.
    #[error("the node is a read-only replica (READONLY)")]
    MasterChanged {
        #[source]
        source: Cause,
    },
    /// A bucket key holds something that is not a bucket: another type (`WRONGTYPE`), or
    /// a field that is not a number. Someone else writes under the key prefix; the
    /// decision is left to `FAIL_MODE`, like any other failure of the store.
    #[error(
        "a bucket key holds a value that is not a bucket (another program writes under KEY_PREFIX?): {source}"
    )]
    ForeignValue {
        #[source]
        source: Cause,
    },
    /// The node does not have the script a command named by its hash (`NOSCRIPT`). The
    /// stores answer that themselves, by giving the node the script and asking again, so
    /// this one got past them (the script was flushed again in between, say); it is
    /// counted apart (kind `noscript`) so that a decision failed for it shows.
    #[error("unexpected answer: {source}")]
    ScriptMissing {
        #[source]
        source: Cause,
    },
    /// An answer the store did not expect; retrying elsewhere would not help.
    #[error("unexpected answer: {source}")]
    Other {
        #[source]
        source: Cause,
    },
}

/// Why no usable master can be reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unavailable {
    /// Refused, reset or not connectable.
    NoConnection(String),
    /// The master has too few replicas to accept writes (`min-replicas-to-write`).
    NoReplicas,
    /// The node is still loading its data set.
    Loading,
    /// Discovery has no confirmed master, for this reason.
    NoMaster(String),
    /// Redis Cluster cannot serve the slot now (`CLUSTERDOWN`, `TRYAGAIN`, redirections
    /// that did not settle in time, slots no master covers).
    ClusterDown(String),
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unavailable::NoConnection(detail) => write!(f, "no connection: {detail}"),
            Unavailable::NoReplicas => {
                f.write_str("the master has too few replicas to accept writes (NOREPLICAS)")
            }
            Unavailable::Loading => f.write_str("the node is loading its data set (LOADING)"),
            Unavailable::NoMaster(reason) => write!(f, "no usable Redis master: {reason}"),
            Unavailable::ClusterDown(reason) => {
                write!(f, "Redis Cluster cannot serve the slot: {reason}")
            }
        }
    }
}

impl StoreError {
    pub fn unavailable(cause: Unavailable) -> Self {
        StoreError::Unavailable {
            cause,
            source: None,
        }
    }

    /// Every name [`StoreError::kind`] gives.
    pub const KINDS: &[&'static str] = &[
        "timeout",
        "connection",
        "noreplicas",
        "loading",
        "clusterdown",
        "readonly",
        "wrongtype",
        "noscript",
        "other",
    ];

    /// A stable, low-cardinality name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Timeout { .. } => "timeout",
            StoreError::Unavailable { cause, .. } => match cause {
                Unavailable::NoConnection(_) | Unavailable::NoMaster(_) => "connection",
                Unavailable::NoReplicas => "noreplicas",
                Unavailable::Loading => "loading",
                Unavailable::ClusterDown(_) => "clusterdown",
            },
            StoreError::MasterChanged { .. } => "readonly",
            StoreError::ForeignValue { .. } => "wrongtype",
            StoreError::ScriptMissing { .. } => "noscript",
            StoreError::Other { .. } => "other",
        }
    }

    /// Whether the node we talk to may no longer be the master, so discovery should run now.
    pub fn suggests_master_change(&self) -> bool {
        !matches!(
            self,
            StoreError::Other { .. }
                | StoreError::ScriptMissing { .. }
                | StoreError::ForeignValue { .. }
        )
    }
}

/// What a store call returns: it may wait on the network. `Send`, so that a front on a
/// work-stealing runtime (the gRPC server) can await a decision.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// One bucket a request draws on, by its name in the store: the buckets of one policy's
/// limits for one key share a `key` (one Redis hash, one Cluster slot) and each has its
/// own `field` there.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyedCharge {
    /// Shared by every limit of one policy for one key, and built once per request.
    pub key: Arc<str>,
    /// The limit's own, built when the policies load.
    pub field: Arc<str>,
    pub charge: Charge,
}

#[cfg(test)]
impl KeyedCharge {
    /// One unit from a bucket of `burst` that refills a token an hour, in `group`.
    pub fn hourly(key: &str, field: &str, burst: u64, group: crate::bucket::Group) -> Self {
        Self {
            key: key.into(),
            field: field.into(),
            charge: Charge {
                group,
                ..Charge::one(crate::bucket::Limit::per(1, 3600, burst).unwrap())
            },
        }
    }
}

/// A place that keeps token buckets and can decide a request over several of them
/// atomically.
pub trait Store: Send + Sync + 'static {
    /// Decides `charges` as one atomic step, all or nothing (see `bucket::take_all`).
    fn take<'a>(&'a self, charges: &'a [KeyedCharge]) -> StoreFuture<'a, Taken>;

    /// Makes the buckets of `buckets` full again (their charges are not looked at): each
    /// named hash is deleted as a whole, so every bucket in it is full, the fields of
    /// limits no longer in force included. Goes to the same node as [`Store::take`], so
    /// it fails the same way (and a failure is an error, never a silent success).
    fn reset<'a>(&'a self, buckets: &'a [KeyedCharge]) -> StoreFuture<'a, ()>;

    /// Gives each charge's cost back to its bucket, at a time the caller does not say
    /// (`bucket::refund` with `Paid::Unknown`): never past full, refusing nothing. Answers
    /// each bucket's level after it, in order. A failure may leave some buckets given back
    /// and others not; either way no bucket holds more than it would have.
    fn give_back<'a>(&'a self, charges: &'a [KeyedCharge]) -> StoreFuture<'a, Vec<Level>>;

    /// Whether the store can decide right now, for `/ready`.
    fn check_ready(&self) -> StoreFuture<'_, ()>;
}
