//! Policies: which requests a rule applies to, which bucket a request is charged to, the
//! limits of that bucket and what the request costs.
//!
//! Pure: a [`PolicySet`] is parsed once from the text of a policy file and then only
//! answers questions about the [`RequestView`] it is handed. It reads no clock, no file,
//! no network; deciding against the buckets is the caller's business.
//!
//! - `file.rs`: the TOML format, every problem reported as `file:line: message`.
//! - `matching.rs`: the compiled `match` section, checked without allocating.
//! - `key.rs`: the bucket key of a request, header values hashed, and its cost.
//!
//! [`PolicySet::evaluate`] answers for a request; [`PolicySet::applied_for`] for a policy
//! named by a caller that gives the raw values of the key (the decision API), encoded the
//! same way, so both reach the same buckets.
//!
//! # The policy file
//!
//! `config/policies.example.toml` is a complete example; this is the reference.
//!
//! ```toml
//! [[policy]]
//! name = "api"                          # 1–32 of a-z 0-9 _ - ; unique
//! mode = "enforce"                      # or "shadow"; default "enforce"
//! match = { path = "/api/**", methods = ["GET", "POST"], host = "api.example.com" }
//! key = ["header:x-api-key"]            # default ["client_ip"]
//! on_missing = "client_ip"              # or "skip", "deny"; default "client_ip"
//! cost = { header = "x-cost", max = 10 } # or a whole number; default 1
//! limits = [
//!     { name = "minute", rate = 100, per = "1m" },             # burst defaults to rate
//!     { name = "day", rate = 10000, per = "1d", burst = 500 },
//! ]
//!
//! [[policy.override]]                   # other limits for some key values
//! keys = ["key-123", "key-456"]
//! limits = [{ name = "minute", rate = 1000, per = "1m" }]
//! ```
//!
//! Unknown fields are errors, so a misspelt field cannot silently mean its default.
//!
//! ## `match`: which requests
//! Every condition given must hold; a policy without `match` applies to every request.
//! - `path`: a pattern or a list of them (any may match). Patterns are whole segments:
//!   `/login` is that path only, `*` is exactly one segment (`/users/*/avatar`), and a
//!   final `/**` is zero or more (`/api/**` is `/api` and everything under it: it is how
//!   a prefix is written, so `/api` never covers `/apix`). A `*` inside a segment is an
//!   error. Both sides are compared as normalised segments: empty and `.` segments are
//!   dropped and `..` removes the one before, so `/login/`, `//login` and `/a/../login`
//!   are `/login` (a client cannot step around a rule by spelling the path another way).
//!   Paths are case-sensitive.
//! - `methods`: a list, in any case. `HEAD` is not implied by `GET`.
//! - `host`: a name or a list of them, in any case, without port; `*.example.com`
//!   matches every subdomain of `example.com` but not `example.com` itself.
//! - `header = { name = "x-tier" }`: the header is present; with `value = "gold"`, its
//!   first value is exactly that.
//!
//! ## `key`: which bucket
//! A list of parts, in order: `client_ip` (the client as [`crate::identity`] derived
//! it), `header:<name>`, `path` (normalised as above), `method`, `host`; or `global`
//! alone: one bucket for every request the policy applies to. Header values are never
//! kept: each is replaced by a keyed BLAKE3 hash ([`HashKey`]), so an API key is never
//! in a Redis key or a log line. A header value longer than [`MAX_HEADER_BYTES`] is
//! refused (400), and an empty one counts as absent.
//!
//! A header part (or `host`) can be missing; `on_missing` says what then happens:
//! `"client_ip"` (the default: the client's address stands in for the part, so leaving
//! the header out never escapes the limit), `"skip"` (the policy does not apply) or
//! `"deny"` (400).
//!
//! ## `limits`: how much
//! One or more `{ name, rate, per, burst }`: `rate` tokens every `per`, a human duration
//! in whole seconds (`1s`, `10m`, `1h`, `1d`, `30d`), buckets of `burst` tokens (default
//! `rate`). Each is built exactly by [`Limit::parse`]; one that cannot be is refused,
//! never rounded. Names are unique within a policy (or override) and read like policy
//! names. A request is admitted only when every limit admits it.
//!
//! ## `cost`: how many tokens a request takes
//! A whole number (default 1), or `{ header = "x-cost", max = 100 }`: the header's value,
//! a whole number from 1 to `max`; a request without the header costs 1, and any other
//! value is refused (400). Every burst must hold at least the largest cost, or the file
//! is refused: a request that could never pass is a configuration error.
//!
//! ## `[[policy.override]]`: other limits for some keys
//! `keys` lists raw key values (the API key itself, not its hash) and `limits` replaces
//! the policy's limits for requests with those keys; overrides are validated like the
//! policy's own limits. With a one-part key, each entry is a string; with a composite key,
//! each entry is a list with one value per part, in the key's order (`["key-1", "GET"]`).
//! A `client_ip` value is an IPv4 address or an IPv6 prefix as the service keys it
//! (`2001:db8::/64`, with `IPV6_PREFIX_LEN`'s length). A request whose key part was
//! replaced by `on_missing = "client_ip"` never matches an override on that part.
//! Policies keyed `global` have no overrides.
//!
//! ## `mode`
//! `"shadow"` policies are evaluated like the others, so that their decisions can be
//! reported, but they must never refuse a request: where an enforced policy would answer
//! 400 (a missing key under `deny`, an over-long header, a bad cost), a shadow policy is
//! left out of the result instead.

mod file;
mod key;
mod matching;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use thiserror::Error;

use crate::bucket::{Limit, LimitError, LimitSpec};
use crate::identity::ClientKey;

pub use file::PolicyFileError;
pub use key::{HashKey, MAX_HEADER_BYTES, is_plain_part, push_hashed_part, push_part};

use key::{Cost, KeySpec, Overrides};
use matching::{Matcher, Prepared};

/// Every policy of one file, in file order, ready to evaluate requests.
pub struct PolicySet {
    policies: Vec<Policy>,
    /// Names the file's text, so that instances (and logs) can tell which rules decided.
    version: String,
    /// Hashes header-derived key parts. It must be the same on every instance, or the same
    /// request would be charged to different buckets depending on which one it reached.
    hash_key: HashKey,
}

/// One `[[policy]]` entry.
#[derive(Debug)]
pub struct Policy {
    /// Shared, not copied, by every metric series and verdict that names it.
    pub name: Arc<str>,
    pub mode: Mode,
    matcher: Matcher,
    key: KeySpec,
    limits: Vec<NamedLimit>,
    cost: Cost,
    overrides: Overrides,
}

/// Whether a policy's denials are enforced or only reported.
#[derive(Clone, Copy, PartialEq, Eq, Debug, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Enforce,
    Shadow,
}

/// A limit of a policy: its name (in headers, metrics and Redis keys), the numbers as the
/// file states them, and the validated limit built from them.
#[derive(Clone, Debug)]
pub struct NamedLimit {
    pub name: Arc<str>,
    pub spec: LimitSpec,
    pub limit: Limit,
    /// Its bucket's field in the policy's hash ([`Policy::bucket_field`]): it depends on
    /// the limit alone, so it is written once, when the policies load, not per request.
    pub field: Arc<str>,
}

impl NamedLimit {
    pub fn new(name: &str, spec: LimitSpec, limit: Limit) -> Self {
        let mut named = Self {
            name: Arc::from(name),
            spec,
            limit,
            field: Arc::from(""),
        };
        named.field = Policy::bucket_field(&named).into();
        named
    }
}

/// What a policy may look at in a request. The caller derives `client` (trusted proxies
/// only) and decodes `path`; nothing here is believed beyond what it says.
pub struct RequestView<'a> {
    /// `GET`, `POST`, ….
    pub method: &'a str,
    /// The decoded path, without the query.
    pub path: &'a str,
    /// The `Host` header; a port is ignored.
    pub host: Option<&'a str>,
    pub headers: &'a dyn HeaderLookup,
    pub client: ClientKey,
}

/// A request's headers, as the HTTP framework holds them.
pub trait HeaderLookup {
    /// The first value of the header `lowercase_name`, as raw bytes (which need not be
    /// UTF-8).
    fn header(&self, lowercase_name: &str) -> Option<&[u8]>;
}

/// A policy that applies to a request, with what it charges.
#[derive(Debug)]
pub struct Applied<'a> {
    pub policy: &'a Policy,
    /// The bucket key of this policy for this request: its parts encoded unambiguously,
    /// header values hashed. [`Policy::bucket_key`] turns it into the Redis key.
    pub key: String,
    /// The policy's limits, or an override's for this key.
    pub limits: &'a [NamedLimit],
    /// Tokens this request costs under this policy.
    pub cost: u64,
}

/// Why a request is refused before any bucket is asked (HTTP 400). The message names the
/// policy and the header, and never what the header held: it may be a secret, and it is
/// the client's own text.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Rejection {
    #[error("policy {policy:?} needs the {header} header, which the request lacks")]
    MissingKeyPart { policy: String, header: String },
    #[error("policy {policy:?}: the {header} header is longer than {max} bytes")]
    HeaderTooLong {
        policy: String,
        header: String,
        max: usize,
    },
    #[error("policy {policy:?}: the {header} header must be a whole number from 1 to {max}")]
    BadCost {
        policy: String,
        header: String,
        max: u64,
    },
}

/// Why a decision asked for by policy name and raw key (`/v1/decide`, `/v1/buckets`)
/// cannot be made (HTTP 400). Each message starts with the field it is about, and never
/// repeats a key value: it may be an API key.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LookupError {
    /// `name` is kept only when it reads like a policy name, so that the message never
    /// repeats arbitrary text.
    #[error("policy: {}; GET /v1/policies lists them", unknown_policy(.name))]
    UnknownPolicy { name: Option<String> },
    #[error("key: policy {policy:?} is keyed \"global\": it has one bucket and takes no key")]
    KeyNotTaken { policy: String },
    #[error("key: policy {policy:?} is keyed by {parts}, so a key is needed: {expected}")]
    KeyMissing {
        policy: String,
        parts: String,
        expected: String,
    },
    #[error("key: policy {policy:?} is keyed by {parts}: {problem}")]
    BadKey {
        policy: String,
        parts: String,
        problem: String,
    },
    #[error(
        "cost: {cost} is more than {max}, the smallest burst of policy {policy:?} for this key, so it could never be admitted"
    )]
    CostTooLarge { policy: String, cost: u64, max: u64 },
}

fn unknown_policy(name: &Option<String>) -> String {
    match name {
        Some(name) => format!("no active policy is named {name:?}"),
        None => "no active policy has that name".to_string(),
    }
}

/// The path the service limits when there is no policy file.
const DEFAULT_PATH: &str = "/limited_endpoint";

impl PolicySet {
    /// Parses and validates a whole file, header values hashed with the default
    /// [`HashKey`]; every problem is reported as `"<file_name>:<line>: <message>"`.
    pub fn parse(text: &str, file_name: &str) -> Result<PolicySet, PolicyFileError> {
        Self::parse_with_hash_key(text, file_name, HashKey::default())
    }

    /// [`PolicySet::parse`], hashing header values with `hash_key`; every instance that
    /// shares buckets must be given the same one.
    pub fn parse_with_hash_key(
        text: &str,
        file_name: &str,
        hash_key: HashKey,
    ) -> Result<PolicySet, PolicyFileError> {
        let policies = file::parse(text, file_name, &hash_key)?;
        let digest = blake3::hash(text.as_bytes()).to_hex();
        Ok(PolicySet {
            policies,
            version: digest[..16].to_string(),
            hash_key,
        })
    }

    /// What the service does with no policy file: one policy named `default` on GET and
    /// HEAD `/limited_endpoint`, keyed by the client's address, with one limit named
    /// `default`.
    pub fn single(limit: LimitSpec) -> Result<PolicySet, LimitError> {
        let default = NamedLimit::new("default", limit, Limit::parse(limit)?);
        let policy = Policy {
            name: Arc::from("default"),
            mode: Mode::Enforce,
            matcher: Matcher::route(&["GET", "HEAD"], DEFAULT_PATH),
            key: KeySpec::client_ip(),
            limits: vec![default],
            cost: Cost::Fixed(1),
            overrides: Overrides::default(),
        };
        Ok(PolicySet {
            policies: vec![policy],
            version: "default".to_string(),
            hash_key: HashKey::default(),
        })
    }

    /// 16 hex digits of a hash of the file's text; `default` for [`PolicySet::single`].
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// The policy `name` as it would apply to a request whose key parts have the raw
    /// values `key` (none for a policy keyed `global`), costing `cost`: the key encoded
    /// exactly as a request's would be (header parts hashed), so both share buckets, and
    /// the limits an override gives that key. A cost above the smallest burst of those
    /// limits is refused: no bucket could ever hold it. The policy's own `cost` rule is
    /// for requests; here the caller names the cost.
    pub fn applied_for(
        &self,
        name: &str,
        key: Option<&[String]>,
        cost: u64,
    ) -> Result<Applied<'_>, LookupError> {
        let Some(policy) = self.policies.iter().find(|policy| *policy.name == *name) else {
            return Err(LookupError::UnknownPolicy {
                name: file::is_name(name).then(|| name.to_string()),
            });
        };
        let parts = policy.key.part_count();
        let key = match (key, parts) {
            (None, 0) => key::KeySpec::global(),
            (Some(_), 0) => {
                return Err(LookupError::KeyNotTaken {
                    policy: policy.name.to_string(),
                });
            }
            (None, parts) => {
                let expected = if parts == 1 {
                    "a string".to_string()
                } else {
                    format!("a list of {parts} strings, one per part in this order")
                };
                return Err(LookupError::KeyMissing {
                    policy: policy.name.to_string(),
                    parts: policy.key.describe(),
                    expected,
                });
            }
            (Some(values), _) => {
                policy
                    .key
                    .encode_raw(values, &self.hash_key)
                    .map_err(|problem| LookupError::BadKey {
                        policy: policy.name.to_string(),
                        parts: policy.key.describe(),
                        problem,
                    })?
            }
        };
        let limits = policy.overrides.limits_for(&key).unwrap_or(&policy.limits);
        let max = limits
            .iter()
            .map(|limit| limit.limit.capacity())
            .min()
            .unwrap_or(0);
        if cost > max {
            return Err(LookupError::CostTooLarge {
                policy: policy.name.to_string(),
                cost,
                max,
            });
        }
        Ok(Applied {
            policy,
            key,
            limits,
            cost,
        })
    }

    /// The policies that apply to `request`, in file order, each with its key, limits and
    /// cost; or why the request is refused (HTTP 400). An empty list means no policy
    /// limits this request.
    pub fn evaluate(&self, request: &RequestView<'_>) -> Result<Vec<Applied<'_>>, Rejection> {
        let prepared = Prepared::new(request);
        let mut applied = Vec::new();
        for policy in &self.policies {
            if !policy.matcher.matches(&prepared) {
                continue;
            }
            match policy.apply(request, &prepared, &self.hash_key) {
                Ok(Some(found)) => applied.push(found),
                Ok(None) => {}
                Err(_) if policy.mode == Mode::Shadow => {}
                Err(rejection) => return Err(rejection),
            }
        }
        Ok(applied)
    }
}

impl Policy {
    /// Where this policy's buckets for the bucket key `key` live: one Redis hash,
    /// `<key_prefix>:<policy>:{<key>}`, holding every limit's bucket in fields of its own
    /// ([`Policy::bucket_field`]).
    ///
    /// The braces are a Redis Cluster hash tag: every limit of one policy for one key is
    /// in one slot (and one hash), so one script reads and writes them all at once.
    pub fn bucket_key(&self, key: &str, key_prefix: &str) -> String {
        format!("{key_prefix}:{}:{{{key}}}", self.name)
    }

    /// The name of `limit`'s bucket within the hash: `<limit>:<rate>-<window_s>-<burst>`.
    /// The numbers are in it so that a limit whose numbers change starts with a fresh
    /// bucket after a reload, while an unchanged one keeps its bucket.
    pub fn bucket_field(limit: &NamedLimit) -> String {
        let LimitSpec {
            rate,
            window_s,
            burst,
        } = limit.spec;
        format!("{}:{rate}-{window_s}-{burst}", limit.name)
    }

    /// The policy's own limits (an override's are in [`Applied::limits`]).
    pub fn limits(&self) -> &[NamedLimit] {
        &self.limits
    }

    /// The most tokens one request can cost under this policy.
    pub fn max_cost(&self) -> u64 {
        self.cost.max()
    }

    fn apply<'p>(
        &'p self,
        request: &RequestView<'_>,
        prepared: &Prepared<'_>,
        hash_key: &HashKey,
    ) -> Result<Option<Applied<'p>>, Rejection> {
        let Some(key) = self.key.build(&self.name, request, prepared, hash_key)? else {
            return Ok(None);
        };
        let cost = self.cost.of(&self.name, request.headers)?;
        let limits = self.overrides.limits_for(&key).unwrap_or(&self.limits);
        Ok(Some(Applied {
            policy: self,
            key,
            limits,
            cost,
        }))
    }
}

impl std::fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicySet")
            .field("version", &self.version)
            .field("policies", &self.policies)
            .finish_non_exhaustive()
    }
}
