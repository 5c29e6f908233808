//! A distributed HTTP rate limiter: Actix-web instances that share token buckets in Redis,
//! kept available by Redis Sentinel.
//!
//! # Layout
//! `docs/ARCHITECTURE.md` draws how a request and a failover travel through these.
//! - [`settings`]: every setting declared once ([`settings::declared`]); layered from
//!   `config/default.toml`, `CONFIG_FILE` and the environment into the domain's types.
//! - [`bucket`]: the token bucket as pure arithmetic on a validated [`bucket::Limit`],
//!   time passed in; `token_bucket.lua`, its Redis mirror; [`bucket::refund`] and
//!   `refund.lua`, for payments another hash slot undid.
//! - [`identity`]: which client a request counts against; trusted proxies only.
//! - [`policy`]: the rules of a policy file: which requests each applies to, the bucket
//!   key it charges them to, its limits and their cost; pure, parsed once.
//! - [`decision`]: what decides a request: the [`deny_cache`], the store, and `FAIL_MODE`
//!   when the store cannot; its answer is a [`decision::Verdict`].
//! - [`store`]: where buckets live, behind one trait: in this process
//!   ([`store::memory`]) or in Redis ([`store::redis`]: the store on one master, the bucket
//!   scripts as commands, connections to a node, the current master, discovery, the
//!   instance registry; [`store::redis::cluster`] for a Redis Cluster).
//! - [`http`]: the route table, handlers (the gateway's `/v1/check` among them), quota
//!   headers and the one problem+json shape.
//! - [`metrics`]: the handle behind `/metrics`, built at start and passed to what records.
//! - [`reload`]: keeps the policy file's parsed set current (SIGHUP, file changes).
//! - [`telemetry`]: log format, and the thread that alone writes the logs to stderr.
//! - [`startup`]: the composition root, [`startup::Application`].
//!
//! Dependencies point one way: `startup` → `settings` → `http` → `decision` → `store` →
//! `bucket`; `policy` uses `bucket` and `identity`; `metrics` and `identity` import nothing
//! of the others'.

pub mod bucket;
pub mod decision;
pub mod deny_cache;
pub mod http;
pub mod identity;
pub mod metrics;
pub mod policy;
pub mod reload;
pub mod settings;
pub mod startup;
pub mod store;
pub mod telemetry;
