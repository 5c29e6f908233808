//! Buckets in Redis: the bucket script decides each request atomically, on the one
//! master that [`discovery`] keeps current ([`RedisStore`]), or on the masters of a Redis
//! Cluster, slot by slot ([`cluster::ClusterStore`]).
//!
//! - [`single`]: [`RedisStore`], the store on one master: the one query path, a
//!   multiplexed connection per worker thread or a pool.
//! - [`batch`]: the queue that sends the decisions waiting on one connection as one call.
//! - [`script`]: the bucket scripts as commands (decide, refund), and what the bucket
//!   script answers, as a [`Taken`](crate::bucket::Taken).
//! - [`error`]: what a Redis failure means: a [`StoreError`](crate::store::StoreError) of
//!   which kind.
//! - [`node`]: connections to one node, every step bounded by a timeout.
//! - [`master`]: the current master, its generation and its connections.
//! - [`discovery`]: the resolver thread that finds and confirms the master (Sentinel, or a
//!   fixed `REDIS_URL`).
//! - [`registry`]: the instances that share the limits, for the local fallback.
//! - [`cluster`]: the same script on the masters of a Redis Cluster, slot by slot: its
//!   store, how a request over several slots is settled, the slot map, and its watch.

pub mod batch;
pub mod cluster;
pub mod discovery;
pub mod error;
pub mod master;
pub mod node;
pub mod registry;
pub mod script;
pub mod single;

pub use error::classify;
pub use master::{ConnectionMode, ConnectionSettings, Connections, Master, MasterSlot};
pub use node::{Login, connect, node_info, with_login};
pub use single::RedisStore;
