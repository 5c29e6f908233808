//! The token bucket as pure arithmetic, and its Redis mirror.
//!
//! - [`Limit`]: a validated rate limit (burst, rate per window) in the integer units the
//!   arithmetic works in.
//! - [`take`] / [`refill`]: state in, time in, decision and new state out; no clock.
//! - [`TOKEN_BUCKET_LUA`]: the same arithmetic, line by line, run atomically in Redis
//!   on Redis's own clock. One parity table tests both (`tests/api/redis_store.rs`).

mod arithmetic;
mod limit;

pub use arithmetic::{BucketState, Charge, Decision, Group, Taken, refill, take, take_all};
pub use limit::{Limit, LimitError, LimitSpec, MAX_CAPACITY_UNITS};

/// The Redis mirror of [`take`].
pub const TOKEN_BUCKET_LUA: &str = include_str!("token_bucket.lua");
