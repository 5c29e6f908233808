//! The token bucket as pure arithmetic, and its Redis mirror.
//!
//! - [`Limit`]: a validated rate limit (burst, rate per window) in the integer units the
//!   arithmetic works in.
//! - [`take`] / [`refill`]: state in, time in, decision and new state out; no clock.
//! - [`TOKEN_BUCKET_LUA`]: the same arithmetic, line by line, run atomically in Redis
//!   on Redis's own clock. One parity table tests both (`tests/api/redis_store.rs`).
//! - [`refund`] / [`REFUND_LUA`]: giving back a payment that another hash slot's denial
//!   undid (the Cluster store), never more than the bucket lost by it; or hits a caller
//!   gives back at a time it does not say (Envoy's `is_negative_hits`), never past full.

mod arithmetic;
mod limit;
mod refund;

pub use arithmetic::{
    BucketState, Charge, Group, Level, Settlement, Taken, Writes, refill, settle, take, take_all,
};
pub use limit::{Limit, LimitError, LimitSpec, MAX_CAPACITY_UNITS};
pub use refund::{Paid, Refunded, refund};

/// The Redis mirror of [`take`].
pub const TOKEN_BUCKET_LUA: &str = include_str!("token_bucket.lua");

/// The Redis mirror of [`refund`].
pub const REFUND_LUA: &str = include_str!("refund.lua");
