//! The rate-limiting algorithm: a validated [`Policy`] and the pure token-bucket
//! arithmetic in [`bucket`], which never reads a clock.

pub mod bucket;
pub mod policy;

pub use bucket::{BucketState, Decision};
pub use policy::{Policy, PolicyError};

/// The Redis mirror of [`bucket::take`].
pub const TOKEN_BUCKET_LUA: &str = include_str!("token_bucket.lua");
