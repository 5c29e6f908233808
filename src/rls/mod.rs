//! The rules of Envoy's rate-limit service, read from envoyproxy/ratelimit's own YAML
//! format: which rule a request's descriptor matches, the limit that rule states, and the
//! key of the descriptor's bucket. One job, the rule model and its matching; reading the
//! files is [`config`]'s.
//!
//! Pure, like [`crate::policy`]: a [`RuleSet`] is parsed once and then only answers
//! questions about the [`RlsRequest`] views it is handed. It reads no clock and no
//! network; the limiter decides ([`crate::limiter::Limiter::decide_descriptors`]), and
//! the gRPC front turns protocol messages into views and verdicts into answers.
//!
//! - `config.rs`: the YAML files, every problem reported as `file:line: message`.
//!
//! # The format
//!
//! One domain per file; [`RuleSet::load`] reads one file or a folder of them (its `*.yaml`
//! and `*.yml` files, not its subfolders nor hidden files). Two files with one domain are
//! an error naming both.
//!
//! ```yaml
//! domain: edge                      # required, unique across the files
//! descriptors:
//!   - key: remote_address           # required
//!     rate_limit:
//!       unit: minute                # second, minute, hour, day, week, month (30 days), year (365 days)
//!       requests_per_unit: 100      # 1 to 4294967295
//!   - key: api_key
//!     value: premium-*              # a trailing * matches every value with that prefix
//!     shadow_mode: true             # decided and counted, never refusing
//!     rate_limit: { name: premium, unit: second, requests_per_unit: 50 }
//!   - key: path
//!     value: /health                # no rate_limit: never limited
//!   - key: tenant
//!     descriptors:                  # a descriptor of several entries: tenant, then user
//!       - key: user
//!         rate_limit:
//!           unit: hour
//!           requests_per_unit: 1000
//!           replaces: [{ name: premium }]  # a request this matches is not charged to "premium"
//!   - key: internal
//!     rate_limit: { unlimited: true }
//! ```
//!
//! A request's descriptor is a list of entries (key, value). Each entry is looked up among
//! the rules of its level, the first at the top: the rule with exactly that key and value,
//! else the rule with that key whose value is the longest prefix of it (`premium-*`), else
//! the rule with that key and no value. The next entry is looked up among the found rule's
//! nested `descriptors`, and the descriptor has the limit of the rule its last entry
//! found; when an entry finds nothing, or the descriptor ends above or below a rule with a
//! `rate_limit`, it has none. There is no backtracking: a less specific rule is never
//! tried because a more specific one led nowhere.
//!
//! Refused at load, with file and line, rather than half-followed: unknown fields,
//! `quota_mode`, `detailed_metric`, `value_to_metric` and `share_threshold` set to true
//! (metric labels here stay bounded: name a rule to get a series of its own), `metadata`,
//! a `*` anywhere but at the end of a value, `requests_per_unit: 0`, `shadow_mode` on a
//! descriptor without a `rate_limit`, YAML tags, and a second document in one file.
//!
//! # Where it differs from envoyproxy/ratelimit
//!
//! - A limit is a token bucket of `requests_per_unit` tokens, refilled evenly over the
//!   unit (burst = `requests_per_unit`), not a counter reset at fixed window boundaries:
//!   no twice-the-limit burst across a boundary. `duration_until_reset` is the time until
//!   the bucket is full again.
//! - The descriptors of one request are decided all or nothing: when one is over its
//!   limit, none of the others is charged.
//! - Among prefix rules, the longest prefix wins (envoyproxy/ratelimit takes the first in
//!   file order).
//! - `hits_addend` above a limit's `requests_per_unit` is over the limit, and charges
//!   nothing.
//! - `is_negative_hits` gives the hits back to the descriptor's bucket, never past full,
//!   whatever the request's other descriptors decide (`bucket::refund` with an unknown
//!   time of payment says what that keeps true).

mod config;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use thiserror::Error;

use crate::bucket::{Limit, LimitError, LimitSpec};
use crate::policy::{HashKey, NamedLimit, is_plain_part, push_hashed_part, push_part};

pub use config::{Problem, RlsConfigError};

/// The most descriptors one request may carry.
pub const MAX_DESCRIPTORS: usize = 64;
/// The most entries one descriptor may carry.
pub const MAX_ENTRIES: usize = 32;
/// The longest key or value of an entry, in bytes. A value longer than a key can hold
/// plainly is hashed into it, so this bounds the work a request can ask for.
pub const MAX_ENTRY_BYTES: usize = 4096;

/// The unit of time a limit counts `requests_per_unit` over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    Second,
    Minute,
    Hour,
    Day,
    Week,
    /// 30 days, as envoyproxy/ratelimit counts it.
    Month,
    /// 365 days, as envoyproxy/ratelimit counts it.
    Year,
}

impl Unit {
    pub const ALL: [Unit; 7] = [
        Unit::Second,
        Unit::Minute,
        Unit::Hour,
        Unit::Day,
        Unit::Week,
        Unit::Month,
        Unit::Year,
    ];

    pub fn seconds(self) -> u64 {
        const DAY: u64 = 86_400;
        match self {
            Unit::Second => 1,
            Unit::Minute => 60,
            Unit::Hour => 3_600,
            Unit::Day => DAY,
            Unit::Week => 7 * DAY,
            Unit::Month => 30 * DAY,
            Unit::Year => 365 * DAY,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Second => "second",
            Unit::Minute => "minute",
            Unit::Hour => "hour",
            Unit::Day => "day",
            Unit::Week => "week",
            Unit::Month => "month",
            Unit::Year => "year",
        }
    }

    /// A unit as the YAML names it, in any case.
    pub fn parse(name: &str) -> Option<Unit> {
        Unit::ALL
            .into_iter()
            .find(|unit| unit.as_str().eq_ignore_ascii_case(name))
    }
}

/// A limit as a rule (or a request's override) states it, and the bucket that enforces it.
#[derive(Debug, Clone)]
pub struct StatedLimit {
    pub requests_per_unit: u32,
    pub unit: Unit,
    /// `requests_per_unit` tokens refilled over the unit; its field in the descriptor's
    /// hash is named by those numbers, so changed numbers start a fresh bucket.
    pub bucket: NamedLimit,
}

impl StatedLimit {
    /// `kind` names the field: `rule` for a configured limit, `override` for a request's.
    fn new(kind: &str, requests_per_unit: u32, unit: Unit) -> Result<Self, LimitError> {
        let rate = u64::from(requests_per_unit);
        let spec = LimitSpec {
            rate,
            window_s: unit.seconds(),
            burst: rate,
        };
        Ok(Self {
            requests_per_unit,
            unit,
            bucket: NamedLimit::new(kind, spec, Limit::parse(spec)?),
        })
    }
}

/// What a rule does to the descriptors it matches.
#[derive(Debug, Clone)]
pub enum RuleLimit {
    /// `unlimited: true`: never limited, nothing counted.
    Unlimited,
    Limited(StatedLimit),
}

/// A descriptor of the YAML that has a `rate_limit`.
#[derive(Debug)]
pub struct Rule {
    /// `rate_limit.name`, as a response's `current_limit` states it; empty when unnamed.
    pub name: Arc<str>,
    /// What metrics call it: its name, or the keys of its path (`tenant.user`) when it has
    /// none. Never a request's value, so label sets stay bounded by the files.
    pub label: Arc<str>,
    /// The entries a descriptor matches it by, from the top, as written: `key` or
    /// `key=value` (`key=prefix*` for a prefix).
    pub descriptor: Vec<String>,
    pub limit: RuleLimit,
    /// `shadow_mode`: decided and counted, never refusing.
    pub shadow: bool,
    /// `rate_limit.replaces`: named rules a request matching this one is not charged to.
    pub replaces: Vec<Arc<str>>,
    /// Where it is written: `file:line`.
    pub file: Arc<str>,
    pub line: usize,
}

/// The rules of one level of a domain, by entry key.
#[derive(Debug, Default)]
struct Level {
    by_key: HashMap<Box<str>, Choices>,
}

/// The rules of one level that share a key.
#[derive(Debug, Default)]
struct Choices {
    exact: HashMap<Box<str>, Node>,
    /// `value: prefix*`, the longest prefix first.
    prefixes: Vec<(Box<str>, Node)>,
    /// The rule with no value.
    any: Option<Box<Node>>,
}

#[derive(Debug, Default)]
struct Node {
    rule: Option<Rule>,
    children: Level,
}

impl Level {
    /// The most specific node for `key` = `value` (see the module docs).
    fn find(&self, key: &str, value: &str) -> Option<&Node> {
        let choices = self.by_key.get(key)?;
        choices
            .exact
            .get(value)
            .or_else(|| {
                choices
                    .prefixes
                    .iter()
                    .find(|(prefix, _)| value.starts_with(&**prefix))
                    .map(|(_, node)| node)
            })
            .or(choices.any.as_deref())
    }

    fn rules<'s>(&'s self, out: &mut Vec<&'s Rule>) {
        for choices in self.by_key.values() {
            let nodes = choices
                .exact
                .values()
                .chain(choices.prefixes.iter().map(|(_, node)| node))
                .chain(choices.any.as_deref());
            for node in nodes {
                out.extend(node.rule.as_ref());
                node.children.rules(out);
            }
        }
    }
}

/// One `domain` and its rules.
#[derive(Debug)]
pub struct Domain {
    pub name: Arc<str>,
    /// The file it was read from.
    pub file: Arc<str>,
    /// `rls:<domain>`: the policy half of the names its limits go by in verdicts and
    /// metrics, apart from the HTTP policies' names.
    pub label: Arc<str>,
    /// The name a request's `limit` override goes by in verdicts and metrics.
    pub override_label: Arc<str>,
    /// The domain as written into bucket keys: itself when plain, else its hash.
    key_part: String,
    root: Level,
}

impl Domain {
    /// Where the buckets of a descriptor whose entries are encoded as `entries` live: one
    /// hash, `<key_prefix>:rls:<domain>:{<entries>}`, with a field per limit
    /// ([`NamedLimit::field`]). The braces are a Redis Cluster hash tag, as in
    /// [`crate::policy::Policy::bucket_key`].
    pub fn bucket_key(&self, entries: &str, key_prefix: &str) -> String {
        format!("{key_prefix}:rls:{}:{{{entries}}}", self.key_part)
    }

    /// Every rule of the domain, in no particular order.
    pub fn rules(&self) -> Vec<&Rule> {
        let mut rules = Vec::new();
        self.root.rules(&mut rules);
        rules
    }
}

/// Every domain of the configuration, ready to resolve requests.
#[derive(Debug)]
pub struct RuleSet {
    domains: HashMap<Arc<str>, Domain>,
    /// 16 hex digits of a hash of every file's name and text.
    version: String,
    /// Hashes long or unusual descriptor values in bucket keys; the same on every instance.
    hash_key: HashKey,
}

/// A request's limit override for one descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitOverride {
    pub requests_per_unit: u32,
    /// `None` when the request names a unit this service does not know.
    pub unit: Option<Unit>,
}

/// One descriptor of a request, as the front read it.
#[derive(Debug, Clone, Default)]
pub struct DescriptorView<'a> {
    /// (key, value), in order.
    pub entries: Vec<(&'a str, &'a str)>,
    /// A limit for this request only, instead of the rules'.
    pub limit: Option<LimitOverride>,
    /// This descriptor's hits, when the request sets them (0 only reads).
    pub hits_addend: Option<u64>,
    /// The hits are given back rather than taken (`is_negative_hits`).
    pub negative_hits: bool,
}

/// A rate-limit request, as the front read it.
#[derive(Debug, Clone, Default)]
pub struct RlsRequest<'a> {
    pub domain: &'a str,
    pub descriptors: Vec<DescriptorView<'a>>,
    /// The hits of every descriptor that sets none; 0 means 1.
    pub hits_addend: u32,
}

/// Why a request cannot be decided; no bucket was asked.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Refusal {
    #[error("domain: must not be empty")]
    EmptyDomain,
    #[error("descriptors: at least one is needed")]
    NoDescriptors,
    #[error("descriptors: {count} given, at most {max} are taken")]
    TooManyDescriptors { count: usize, max: usize },
    #[error("descriptors[{index}]: {count} entries, at most {max} are taken")]
    TooManyEntries {
        index: usize,
        count: usize,
        max: usize,
    },
    #[error("descriptors[{index}]: an entry's key or value is longer than {max} bytes")]
    EntryTooLong { index: usize, max: usize },
    #[error(
        "descriptors[{index}].limit: needs requests_per_unit of at least 1 and a unit (second to year): {problem}"
    )]
    BadOverride { index: usize, problem: String },
}

/// Why a descriptor named by its domain and entries (the decision and bucket API) has no
/// bucket to decide. The messages start with the field of that API they are about, and
/// never repeat an entry: a value may be an API key.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// `name` is kept only when it reads like a plain name.
    #[error("policy: {}; GET /v1/policies lists the rate-limit domains", unknown_domain(.name))]
    UnknownDomain { name: Option<String> },
    #[error("key: the descriptor's entries are needed, as a list of \"key=value\" strings")]
    NoEntries,
    #[error("key: {count} entries, at most {max} are taken")]
    TooManyEntries { count: usize, max: usize },
    #[error("key: an entry's key or value is longer than {max} bytes")]
    EntryTooLong { max: usize },
    #[error("key: no rule of domain {domain:?} with a rate_limit matches these entries")]
    NoRule { domain: String },
    #[error(
        "key: these entries match rule {rule:?} of domain {domain:?}, which is unlimited: it has no bucket"
    )]
    Unlimited { domain: String, rule: String },
    #[error(
        "cost: {cost} is more than {max}, the requests_per_unit of rule {rule:?} of domain {domain:?}, so it could never be admitted"
    )]
    CostTooLarge {
        domain: String,
        rule: String,
        cost: u64,
        max: u64,
    },
}

fn unknown_domain(name: &Option<String>) -> String {
    match name {
        Some(name) => format!("no rate-limit domain is named {name:?}"),
        None => "no rate-limit domain has that name".to_string(),
    }
}

/// Why a descriptor has no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmatched {
    /// The request's domain is not configured.
    UnknownDomain,
    /// No rule with a `rate_limit` matches the descriptor.
    NoRule,
    /// Its rule is named in the `replaces` of another descriptor's rule.
    Replaced,
}

impl Unmatched {
    pub const ALL: [Unmatched; 3] = [
        Unmatched::UnknownDomain,
        Unmatched::NoRule,
        Unmatched::Replaced,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Unmatched::UnknownDomain => "unknown_domain",
            Unmatched::NoRule => "no_rule",
            Unmatched::Replaced => "replaced",
        }
    }
}

/// Where a descriptor's limit comes from.
#[derive(Debug, Clone)]
pub enum LimitSource<'r> {
    Rule(&'r Rule),
    /// The request's own `limit`: not shadow, unnamed, replacing nothing.
    Override(StatedLimit),
}

/// A descriptor with a limit: what to charge, and where.
#[derive(Debug, Clone)]
pub struct Charged<'r> {
    pub source: LimitSource<'r>,
    /// The descriptor's entries encoded for its bucket key ([`Domain::bucket_key`]).
    pub entries: String,
    /// Tokens this request takes (0 only reads), or gives back.
    pub cost: u64,
    /// `is_negative_hits`: `cost` is given back to the bucket, never past full; the
    /// descriptor takes no part in the request's admission.
    pub gives_back: bool,
}

impl Charged<'_> {
    pub fn limit(&self) -> &StatedLimit {
        match &self.source {
            LimitSource::Rule(Rule {
                limit: RuleLimit::Limited(limit),
                ..
            }) => limit,
            LimitSource::Override(limit) => limit,
            LimitSource::Rule(_) => unreachable!("only a limited rule charges"),
        }
    }

    /// The name a response's `current_limit` carries: the rule's, empty for an override.
    pub fn name(&self) -> &str {
        match &self.source {
            LimitSource::Rule(rule) => &rule.name,
            LimitSource::Override(_) => "",
        }
    }

    pub fn shadow(&self) -> bool {
        matches!(&self.source, LimitSource::Rule(rule) if rule.shadow)
    }

    /// Whether the cost is more than the bucket can ever hold: over the limit at once.
    pub fn exceeds_capacity(&self) -> bool {
        self.cost > self.limit().bucket.limit.capacity()
    }
}

/// What one descriptor of a request comes to.
#[derive(Debug, Clone)]
pub enum Resolved<'r> {
    Unmatched(Unmatched),
    /// An `unlimited` rule.
    Unlimited(&'r Rule),
    Charged(Charged<'r>),
}

/// A request resolved against the rules: its domain, and per descriptor, in order, what it
/// comes to.
#[derive(Debug)]
pub struct Resolution<'r> {
    /// `None` for a domain that is not configured.
    pub domain: Option<&'r Domain>,
    pub descriptors: Vec<Resolved<'r>>,
}

impl RuleSet {
    /// Reads `path`: one YAML file, or every `*.yaml` and `*.yml` file of a folder.
    pub fn load(path: &std::path::Path, hash_key: HashKey) -> Result<RuleSet, RlsConfigError> {
        let files = Self::read_files(path)?;
        let files: Vec<(&str, &str)> = files
            .iter()
            .map(|(name, text)| (name.as_str(), text.as_str()))
            .collect();
        Self::parse(&files, hash_key)
    }

    /// The files [`RuleSet::load`] reads at `path`, as (name, text), in name order: what a
    /// reload compares to see a change, and then parses.
    pub fn read_files(path: &std::path::Path) -> Result<Vec<(String, String)>, RlsConfigError> {
        config::read_files(path)
    }

    /// No domain at all: every request is unmatched, so every answer is `OK`.
    pub fn empty(hash_key: HashKey) -> RuleSet {
        config::parse(&[], hash_key).expect("no file has no problem")
    }

    /// Parses files given as (name, text), one domain each.
    pub fn parse(files: &[(&str, &str)], hash_key: HashKey) -> Result<RuleSet, RlsConfigError> {
        config::parse(files, hash_key)
    }

    /// 16 hex digits of a hash of the files' names and texts.
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn domain(&self, name: &str) -> Option<&Domain> {
        self.domains.get(name)
    }

    /// Every domain, in no particular order.
    pub fn domains(&self) -> impl Iterator<Item = &Domain> {
        self.domains.values()
    }

    /// What each descriptor of `request` comes to, or why the request cannot be decided.
    /// Refusals about the request's shape come before any look-up, so an unknown domain
    /// is refused for them too.
    pub fn resolve(&self, request: &RlsRequest<'_>) -> Result<Resolution<'_>, Refusal> {
        check_shape(request)?;
        let Some(domain) = self.domains.get(request.domain) else {
            return Ok(Resolution {
                domain: None,
                descriptors: vec![
                    Resolved::Unmatched(Unmatched::UnknownDomain);
                    request.descriptors.len()
                ],
            });
        };
        let mut descriptors = Vec::with_capacity(request.descriptors.len());
        for (index, descriptor) in request.descriptors.iter().enumerate() {
            descriptors.push(self.resolve_one(domain, index, descriptor, request.hits_addend)?);
        }
        drop_replaced(&mut descriptors);
        Ok(Resolution {
            domain: Some(domain),
            descriptors,
        })
    }

    fn resolve_one<'r>(
        &'r self,
        domain: &'r Domain,
        index: usize,
        descriptor: &DescriptorView<'_>,
        request_hits: u32,
    ) -> Result<Resolved<'r>, Refusal> {
        let cost = descriptor
            .hits_addend
            .unwrap_or(u64::from(request_hits.max(1)));
        let source = match descriptor.limit {
            Some(limit) => {
                let bad = |problem: String| Refusal::BadOverride { index, problem };
                let unit = limit.unit.ok_or_else(|| bad("unknown unit".to_string()))?;
                let stated = StatedLimit::new("override", limit.requests_per_unit, unit)
                    .map_err(|err| bad(err.to_string()))?;
                LimitSource::Override(stated)
            }
            None => match find(domain, &descriptor.entries) {
                None => return Ok(Resolved::Unmatched(Unmatched::NoRule)),
                Some(rule) => match rule.limit {
                    RuleLimit::Unlimited => return Ok(Resolved::Unlimited(rule)),
                    RuleLimit::Limited(_) => LimitSource::Rule(rule),
                },
            },
        };
        Ok(Resolved::Charged(Charged {
            source,
            entries: self.encode_entries(&descriptor.entries),
            cost,
            gives_back: descriptor.negative_hits,
        }))
    }

    /// The entries as one key: `key=value` parts joined by `|`, a long or unusual value
    /// hashed (`key#…`), and an entry whose key is itself unusual hashed whole (`#…`).
    /// None of these contains `|`, `{` or `}`, and the tag before `=` or `#` is the plain
    /// key or nothing, so two different lists of entries give two different keys.
    fn encode_entries(&self, entries: &[(&str, &str)]) -> String {
        let mut key = String::with_capacity(32 * entries.len());
        for (index, (name, value)) in entries.iter().enumerate() {
            if index > 0 {
                key.push('|');
            }
            if !name.is_empty() && is_plain_part(name) {
                push_part(&mut key, name, value, &self.hash_key);
            } else {
                let length = (name.len() as u64).to_le_bytes();
                let pieces = [&length[..], name.as_bytes(), value.as_bytes()];
                push_hashed_part(&mut key, "", &pieces, &self.hash_key);
            }
        }
        key
    }
}

impl RuleSet {
    /// The descriptor of `entries` in `domain`, charged `cost` (0 only reads), as a request
    /// carrying it alone would be charged under its rule; or why it has no bucket. The
    /// decision and bucket API name a descriptor this way; a request's `limit` override
    /// cannot be named, as it is not in the rules.
    pub fn charged_for(
        &self,
        domain: &str,
        entries: &[(&str, &str)],
        cost: u64,
    ) -> Result<(&Domain, Charged<'_>), KeyError> {
        let Some(found) = self.domains.get(domain) else {
            let plain = !domain.is_empty()
                && domain.len() <= 64
                && domain
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
            return Err(KeyError::UnknownDomain {
                name: plain.then(|| domain.to_string()),
            });
        };
        if entries.is_empty() {
            return Err(KeyError::NoEntries);
        }
        if entries.len() > MAX_ENTRIES {
            return Err(KeyError::TooManyEntries {
                count: entries.len(),
                max: MAX_ENTRIES,
            });
        }
        if entries
            .iter()
            .any(|(key, value)| key.len() > MAX_ENTRY_BYTES || value.len() > MAX_ENTRY_BYTES)
        {
            return Err(KeyError::EntryTooLong {
                max: MAX_ENTRY_BYTES,
            });
        }
        let domain_name = || found.name.to_string();
        let rule = find(found, entries).ok_or_else(|| KeyError::NoRule {
            domain: domain_name(),
        })?;
        let RuleLimit::Limited(limit) = &rule.limit else {
            return Err(KeyError::Unlimited {
                domain: domain_name(),
                rule: rule.label.to_string(),
            });
        };
        let max = limit.bucket.limit.capacity();
        if cost > max {
            return Err(KeyError::CostTooLarge {
                domain: domain_name(),
                rule: rule.label.to_string(),
                cost,
                max,
            });
        }
        let charged = Charged {
            source: LimitSource::Rule(rule),
            entries: self.encode_entries(entries),
            cost,
            gives_back: false,
        };
        Ok((found, charged))
    }
}

/// The rule that `entries` match, walking down one level per entry (see the module docs).
fn find<'r>(domain: &'r Domain, entries: &[(&str, &str)]) -> Option<&'r Rule> {
    let mut level = &domain.root;
    let mut found = None;
    for (key, value) in entries {
        let node = level.find(key, value)?;
        found = Some(node);
        level = &node.children;
    }
    found?.rule.as_ref()
}

fn check_shape(request: &RlsRequest<'_>) -> Result<(), Refusal> {
    if request.domain.is_empty() {
        return Err(Refusal::EmptyDomain);
    }
    let count = request.descriptors.len();
    if count == 0 {
        return Err(Refusal::NoDescriptors);
    }
    if count > MAX_DESCRIPTORS {
        return Err(Refusal::TooManyDescriptors {
            count,
            max: MAX_DESCRIPTORS,
        });
    }
    for (index, descriptor) in request.descriptors.iter().enumerate() {
        let count = descriptor.entries.len();
        if count > MAX_ENTRIES {
            return Err(Refusal::TooManyEntries {
                index,
                count,
                max: MAX_ENTRIES,
            });
        }
        let too_long = descriptor
            .entries
            .iter()
            .any(|(key, value)| key.len() > MAX_ENTRY_BYTES || value.len() > MAX_ENTRY_BYTES);
        if too_long {
            return Err(Refusal::EntryTooLong {
                index,
                max: MAX_ENTRY_BYTES,
            });
        }
    }
    Ok(())
}

/// A rule named in the `replaces` of a rule another descriptor of the request matched
/// (limited or unlimited) does not apply to this request.
fn drop_replaced<'r>(descriptors: &mut [Resolved<'r>]) {
    let replaced: HashSet<&'r str> = descriptors
        .iter()
        .filter_map(|resolved| match resolved {
            Resolved::Unlimited(rule) => Some(*rule),
            Resolved::Charged(Charged {
                source: LimitSource::Rule(rule),
                ..
            }) => Some(*rule),
            _ => None,
        })
        .flat_map(|rule| rule.replaces.iter().map(|name| &**name))
        .collect();
    if replaced.is_empty() {
        return;
    }
    for resolved in descriptors.iter_mut() {
        if let Resolved::Charged(Charged {
            source: LimitSource::Rule(rule),
            ..
        }) = resolved
            && !rule.name.is_empty()
            && replaced.contains(&*rule.name)
        {
            *resolved = Resolved::Unmatched(Unmatched::Replaced);
        }
    }
}
