//! Where buckets live: one trait with one atomic operation, and its implementations.
//!
//! - [`memory::MemoryStore`]: in this process; the embedded default and the fallback.
//! - [`redis::RedisStore`]: shared by every instance, on the master that the [`sentinel`]
//!   resolver keeps current.

pub mod memory;
pub mod redis;
pub mod sentinel;

use std::future::Future;
use std::pin::Pin;

use thiserror::Error;

use crate::identity::ClientKey;
use crate::limiter::{Decision, Policy};

/// Why a store could not decide. A denial is not an error: it is a [`Decision`].
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("timed out after {0} ms")]
    Timeout(u64),
    #[error("no connection: {0}")]
    Connection(String),
    #[error("the node is a read-only replica (READONLY)")]
    ReadOnly,
    #[error("the master has too few replicas to accept writes (NOREPLICAS)")]
    NoReplicas,
    #[error("the node is loading its data set (LOADING)")]
    Loading,
    #[error("no usable Redis master: {0}")]
    NoMaster(String),
    #[error("the script is missing (NOSCRIPT) even after reloading it")]
    NoScript,
    #[error("unexpected answer: {0}")]
    Other(String),
}

impl StoreError {
    /// A stable, low-cardinality name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Timeout(_) => "timeout",
            StoreError::Connection(_) | StoreError::NoMaster(_) => "connection",
            StoreError::ReadOnly => "readonly",
            StoreError::NoReplicas => "noreplicas",
            StoreError::Loading => "loading",
            StoreError::NoScript => "noscript",
            StoreError::Other(_) => "other",
        }
    }

    /// Whether the node we talk to may no longer be the master, so discovery should run now.
    pub fn suggests_master_change(&self) -> bool {
        !matches!(self, StoreError::Other(_) | StoreError::NoScript)
    }
}

/// What a store call returns: it may wait on the network.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + 'a>>;

/// A place that keeps token buckets and can take a token from one atomically.
pub trait Store: Send + Sync + 'static {
    /// Takes one token from `key`'s bucket under `policy`, as one atomic step.
    fn take(&self, key: ClientKey, policy: Policy) -> StoreFuture<'_, Decision>;

    /// Whether the store can decide right now, for `/ready`.
    fn check_ready(&self) -> StoreFuture<'_, ()>;
}
