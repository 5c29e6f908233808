//! A distributed HTTP rate limiter: Actix-web instances that share token buckets in Redis,
//! kept available by Redis Sentinel; also Envoy's rate-limit service over gRPC.
//!
//! # Layout
//! `docs/ARCHITECTURE.md` draws how a request and a failover travel through these. Each
//! room has one job:
//! - [`settings`]: every setting declared once ([`settings::declared`]); layered from
//!   `config/default.toml`, `CONFIG_FILE` and the environment into typed values, once.
//! - [`policy`]: the rules of a policy file: which requests each applies to, the key it
//!   charges them to, its limits and their cost; pure, parsed once.
//! - [`rls`]: the rules of Envoy's rate-limit service, in envoyproxy/ratelimit's own YAML:
//!   which rule a request's descriptor matches, the limit it states, the descriptor's
//!   bucket key; pure, parsed once.
//! - [`identity`]: which client a request counts against; trusted proxies only.
//! - [`limiter`]: the decision room, protocol-neutral: a request's view (or an explicit
//!   policy, key and cost, or a rate-limit service request's descriptors) in, a
//!   [`limiter::Verdict`] out, through the deny cache, the
//!   store and `FAIL_MODE` ([`limiter::Decider`]).
//! - [`bucket`]: the token bucket as pure arithmetic on a validated [`bucket::Limit`],
//!   time passed in, and the one admission rule ([`bucket::settle`]); `token_bucket.lua`
//!   and `refund.lua`, its Redis mirrors.
//! - [`store`]: where buckets live, behind one trait: in this process ([`store::memory`])
//!   or in Redis ([`store::redis`]: the store on one master found by Sentinel, the bucket
//!   scripts as commands, connections to a node, discovery, the instance registry;
//!   [`store::redis::cluster`] for a Redis Cluster).
//! - [`http`]: the HTTP front: it extracts a request's view, asks the limiter and renders
//!   the verdict (routes, the gateway's `/v1/check`, the decision API, the one
//!   problem+json shape). Only it knows actix.
//! - [`grpc`]: the gRPC front: Envoy's rate-limit service (`ShouldRateLimit`) and
//!   `grpc.health.v1`; it reads a request into [`rls`]' view, asks the limiter and renders
//!   the verdict. Only it knows tonic and Envoy's generated types.
//! - [`quota_headers`]: a verdict's `RateLimit`/`RateLimit-Policy` (or legacy) headers as
//!   text, which both fronts send.
//! - [`metrics`]: the handle behind `/metrics`, built at start and passed to what records.
//! - [`reload`]: keeps the policy file's and `RLS_CONFIG`'s parsed sets current (SIGHUP,
//!   file changes).
//! - [`telemetry`]: log format, and the thread that alone writes the logs to stderr.
//! - [`startup`]: the composition root, [`startup::Application`]: the HTTP server, and the
//!   gRPC front on a runtime of its own (`GRPC_PORT`), stopped together.
//!
//! One noun per layer, in the order a request meets them: a [`bucket::Charge`] (what a
//! request asks of one bucket; [`store::KeyedCharge`] with its place in the store) →
//! [`bucket::Taken`] (what the store did: admitted or not, a [`bucket::Level`] per
//! bucket) → [`limiter::Verdict`] (a [`limiter::LimitVerdict`] per limit, and what decided)
//! → the front's answer ([`http::reply::Reply`], the decision API's body, a
//! `RateLimitResponse`).
//!
//! Dependencies point one way (`tests/architecture.rs`): `startup` → `settings`, `http` and
//! `grpc` → `limiter` → `store` → `bucket`; `policy` uses `bucket` and `identity`; `rls` uses
//! `bucket` and `policy`'s key encoding; `metrics` and `identity` import nothing of the
//! others'.

pub mod bucket;
pub mod grpc;
pub mod http;
pub mod identity;
pub mod limiter;
pub mod metrics;
pub mod policy;
pub mod quota_headers;
pub mod reload;
pub mod rls;
pub mod settings;
pub mod startup;
pub mod store;
pub mod telemetry;
