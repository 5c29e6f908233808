//! A distributed HTTP rate limiter: Actix-web instances that share token buckets in Redis,
//! kept available by Redis Sentinel.
//!
//! # Layout
//! - [`config`]: settings from `config/default.toml`, `CONFIG_FILE` and the environment,
//!   parsed once into validated types.
//! - [`limiter`]: the algorithm. [`limiter::Policy`] (validated capacity and rate) and the
//!   pure token-bucket arithmetic, which takes the time as a parameter; its Lua mirror.
//! - [`identity`]: which bucket a request is charged to; trusted proxies only.
//! - [`store`]: where buckets live. One trait, one atomic operation: in memory, or in
//!   Redis on the master that the Sentinel resolver thread keeps current (through a
//!   multiplexed connection per worker thread, or an r2d2 pool).
//! - [`rate_limiter`]: asks the store (unless [`deny_cache`] already knows the answer is
//!   no) and applies `FAIL_MODE` when the store cannot decide.
//! - [`http`]: routes, quota headers, JSON errors.
//! - [`metrics`]: the Prometheus registry behind `/metrics`.
//! - [`startup`]: the composition root, [`startup::Application`].

pub mod config;
pub mod deny_cache;
pub mod http;
pub mod identity;
pub mod limiter;
pub mod metrics;
pub mod rate_limiter;
pub mod startup;
pub mod store;
pub mod telemetry;
