//! The bucket key of a request, what the request costs, and the limits an override gives
//! some keys: one job, what a matched request is charged, and the encoding that keeps two
//! different keys from ever sharing a bucket.
//!
//! A key is its parts in the policy's order, joined by `|`. Each part is `tag=value` when
//! the value is short and made only of [plain](is_plain) characters, and `tag#hash`
//! otherwise; header values are always hashed. No plain value can contain `|`, `=` or
//! `#`, so a key splits back into exactly the parts it was made of, and two different
//! tuples of parts give two different keys (unless two values' 128-bit hashes collide).
//! No key contains `{` or `}` either, so it cannot break out of the hash tag
//! [`Policy::bucket_key`](super::Policy::bucket_key) puts it in.
//!
//! | part | encoded |
//! |---|---|
//! | `client_ip` | `ip=203.0.113.9`, `ip=2001:db8::/64` |
//! | `header:<name>` | `h#<32 hex digits>` |
//! | `path` | `path=/api/v1/users`, normalised |
//! | `method` | `m=GET` |
//! | `host` | `host=api.example.com` |
//! | `global` | `global`, the whole key |

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};

use serde::Deserialize;

use super::matching::{Prepared, Segments, header_name, host_without_port, is_token};
use super::{HeaderLookup, NamedLimit, Rejection, RequestView};
use crate::identity::ClientKey;

/// The longest header value a key or a cost is taken from. A longer one is refused (400):
/// it is no API key, and hashing megabytes per request is work a client should not be
/// able to ask for.
pub const MAX_HEADER_BYTES: usize = 256;

/// The longest path, method or host written into a key as it is; a longer one is hashed,
/// so that no request makes a long Redis key.
const MAX_PLAIN_BYTES: usize = 128;

/// Hash bytes kept in a key: 128 bits, so that a collision between two clients' values is
/// not a practical concern (about 2^64 distinct values before one is likely).
const HASH_BYTES: usize = 16;

/// What the hash key is derived under, so that it can serve no other purpose.
const HASH_CONTEXT: &str = "ratelimiter 2026-12 policy key parts";

/// The whole key of a policy keyed `global`.
const GLOBAL: &str = "global";

/// The key of the keyed hash that replaces header values in bucket keys.
///
/// Every instance must use the same one, or one client's requests would land in
/// different buckets depending on the instance they reached. [`HashKey::default`] is
/// derived from nothing, and so is public: its hashes keep a long random API key out of
/// Redis and the logs, but anyone who can read the keys can still test a guess of a short
/// or predictable value. [`HashKey::from_secret`], fed the same secret on every instance,
/// makes the hashes unguessable too.
#[derive(Clone)]
pub struct HashKey([u8; 32]);

impl HashKey {
    /// Derives the hash key from a secret of any length.
    pub fn from_secret(secret: &[u8]) -> Self {
        HashKey(blake3::derive_key(HASH_CONTEXT, secret))
    }
}

impl Default for HashKey {
    fn default() -> Self {
        Self::from_secret(b"")
    }
}

impl std::fmt::Debug for HashKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HashKey(***)")
    }
}

/// What a policy's key is made of.
#[derive(Debug)]
pub(super) enum KeySpec {
    /// One bucket for every request the policy applies to.
    Global,
    Parts {
        parts: Vec<KeyPart>,
        on_missing: OnMissing,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum KeyPart {
    ClientIp,
    /// Lower case.
    Header(Box<str>),
    Path,
    Method,
    Host,
}

/// What a policy does with a request that lacks a part of its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum OnMissing {
    /// The policy does not apply to the request.
    Skip,
    /// The request is refused (400).
    Deny,
    /// The client's address stands in for the missing part.
    ClientIp,
}

/// A header value, as far as a key or a cost can use it.
enum HeaderValue<'a> {
    Present(&'a [u8]),
    /// Absent, or empty.
    Absent,
    TooLong,
}

fn header_value<'h>(headers: &'h dyn HeaderLookup, name: &str) -> HeaderValue<'h> {
    match headers.header(name).map(trim_whitespace) {
        None | Some([]) => HeaderValue::Absent,
        Some(value) if value.len() > MAX_HEADER_BYTES => HeaderValue::TooLong,
        Some(value) => HeaderValue::Present(value),
    }
}

fn trim_whitespace(value: &[u8]) -> &[u8] {
    value.trim_ascii()
}

impl KeySpec {
    /// The default key: the client's address.
    pub(super) fn client_ip() -> Self {
        KeySpec::Parts {
            parts: vec![KeyPart::ClientIp],
            on_missing: OnMissing::ClientIp,
        }
    }

    /// Parses the `key` list of a policy.
    pub(super) fn parse(parts: &[String], on_missing: OnMissing) -> Result<Self, String> {
        if parts.is_empty() {
            return Err(
                "key: an empty list; leave `key` out to key by client_ip, or say \"global\""
                    .to_string(),
            );
        }
        if parts.iter().any(|part| part == GLOBAL) {
            return if parts.len() == 1 {
                Ok(KeySpec::Global)
            } else {
                Err("key: \"global\" is one bucket for everyone and cannot be combined with other parts".to_string())
            };
        }
        let mut parsed = Vec::with_capacity(parts.len());
        for part in parts {
            let key_part = match part.as_str() {
                "client_ip" => KeyPart::ClientIp,
                "path" => KeyPart::Path,
                "method" => KeyPart::Method,
                "host" => KeyPart::Host,
                other => match other.strip_prefix("header:") {
                    Some(name) => {
                        KeyPart::Header(header_name(name).map_err(|e| format!("key: {e}"))?)
                    }
                    None => {
                        return Err(format!(
                            "key: {other:?} is not a key part; expected client_ip, header:<name>, path, method, host or global"
                        ));
                    }
                },
            };
            if parsed.contains(&key_part) {
                return Err(format!("key: {part:?} is given twice"));
            }
            parsed.push(key_part);
        }
        Ok(KeySpec::Parts {
            parts: parsed,
            on_missing,
        })
    }

    /// How many raw values a key of this policy is made of: 0 for `global`.
    pub(super) fn part_count(&self) -> usize {
        match self {
            KeySpec::Global => 0,
            KeySpec::Parts { parts, .. } => parts.len(),
        }
    }

    /// The parts as a policy file names them: `header:x-api-key, method`.
    pub(super) fn describe(&self) -> String {
        let KeySpec::Parts { parts, .. } = self else {
            return GLOBAL.to_string();
        };
        let names: Vec<String> = parts
            .iter()
            .map(|part| match part {
                KeyPart::ClientIp => "client_ip".to_string(),
                KeyPart::Header(name) => format!("header:{name}"),
                KeyPart::Path => "path".to_string(),
                KeyPart::Method => "method".to_string(),
                KeyPart::Host => "host".to_string(),
            })
            .collect();
        names.join(", ")
    }

    /// The key of a policy keyed `global`.
    pub(super) fn global() -> String {
        GLOBAL.to_string()
    }

    /// The key of `request`; `None` when a part is missing and the policy then skips.
    pub(super) fn build(
        &self,
        policy: &str,
        request: &RequestView<'_>,
        prepared: &Prepared<'_>,
        hash_key: &HashKey,
    ) -> Result<Option<String>, Rejection> {
        let (parts, on_missing) = match self {
            KeySpec::Global => return Ok(Some(GLOBAL.to_string())),
            KeySpec::Parts { parts, on_missing } => (parts, *on_missing),
        };
        let mut key = String::with_capacity(48);
        for (index, part) in parts.iter().enumerate() {
            if index > 0 {
                key.push('|');
            }
            let missing = match part {
                KeyPart::ClientIp => {
                    push_client(&mut key, request.client);
                    continue;
                }
                KeyPart::Path => {
                    push_path(&mut key, prepared.segments(), hash_key);
                    continue;
                }
                KeyPart::Method => {
                    push_plain(&mut key, "m", request.method, Case::Upper, hash_key);
                    continue;
                }
                KeyPart::Host => match prepared.host() {
                    Some(host) => {
                        push_plain(&mut key, "host", host, Case::Lower, hash_key);
                        continue;
                    }
                    None => "host",
                },
                KeyPart::Header(name) => match header_value(request.headers, name) {
                    HeaderValue::Present(value) => {
                        push_hashed(&mut key, "h", &[value], hash_key);
                        continue;
                    }
                    HeaderValue::TooLong => {
                        return Err(Rejection::HeaderTooLong {
                            policy: policy.to_string(),
                            header: name.to_string(),
                            max: MAX_HEADER_BYTES,
                        });
                    }
                    HeaderValue::Absent => name,
                },
            };
            match on_missing {
                OnMissing::Skip => return Ok(None),
                OnMissing::Deny => {
                    return Err(Rejection::MissingKeyPart {
                        policy: policy.to_string(),
                        header: missing.to_string(),
                    });
                }
                OnMissing::ClientIp => push_client(&mut key, request.client),
            }
        }
        Ok(Some(key))
    }

    /// The key a request would get whose parts have these raw values (an override's
    /// `keys` entry), or why no request can have them. The message never repeats a
    /// value: it may be an API key.
    pub(super) fn encode_raw(
        &self,
        values: &[String],
        hash_key: &HashKey,
    ) -> Result<String, String> {
        let KeySpec::Parts { parts, .. } = self else {
            return Err("a policy keyed \"global\" has one bucket and no overrides".to_string());
        };
        if values.len() != parts.len() {
            return Err(format!(
                "{} values given, but the key has {} parts",
                values.len(),
                parts.len()
            ));
        }
        let mut key = String::new();
        for (index, (part, value)) in parts.iter().zip(values).enumerate() {
            if index > 0 {
                key.push('|');
            }
            match part {
                KeyPart::ClientIp => push_client(&mut key, client_key(value)?),
                KeyPart::Header(_) => {
                    let value = trim_whitespace(value.as_bytes());
                    if value.is_empty() || value.len() > MAX_HEADER_BYTES {
                        return Err(format!(
                            "a header value must be 1 to {MAX_HEADER_BYTES} bytes"
                        ));
                    }
                    push_hashed(&mut key, "h", &[value], hash_key);
                }
                KeyPart::Path => {
                    if !value.starts_with('/') {
                        return Err("a path must start with /".to_string());
                    }
                    push_path(&mut key, Segments::of(value).as_slice(), hash_key);
                }
                KeyPart::Method => {
                    if !is_token(value) {
                        return Err("a method must be an HTTP method".to_string());
                    }
                    push_plain(&mut key, "m", value, Case::Upper, hash_key);
                }
                KeyPart::Host => {
                    let host = value.trim();
                    let host = host.strip_suffix('.').unwrap_or(host);
                    if host.is_empty() || host_without_port(host) != host {
                        return Err("a host must be a name without port".to_string());
                    }
                    push_plain(&mut key, "host", host, Case::Lower, hash_key);
                }
            }
        }
        Ok(key)
    }
}

/// A `client_ip` value of an override, as [`ClientKey`] would display it.
fn client_key(value: &str) -> Result<ClientKey, String> {
    let unusable =
        || "a client_ip is an IPv4 address or an IPv6 prefix such as 2001:db8::/64".to_string();
    match value.split_once('/') {
        None => value
            .parse::<Ipv4Addr>()
            .map(ClientKey::V4)
            .map_err(|_| unusable()),
        Some((address, length)) => {
            let address: IpAddr = address.parse().map_err(|_| unusable())?;
            let length: u8 = length.parse().map_err(|_| unusable())?;
            if !address.is_ipv6() || length > 128 {
                return Err(unusable());
            }
            Ok(ClientKey::from_addr(address, length))
        }
    }
}

fn push_client(key: &mut String, client: ClientKey) {
    // Writing into a String cannot fail.
    let _ = write!(key, "ip={client}");
}

#[derive(Clone, Copy)]
enum Case {
    Upper,
    Lower,
    /// As given: the value is case-sensitive.
    Keep,
}

/// `tag=value` when `value` is short and plain, `tag#hash` otherwise.
fn push_plain(key: &mut String, tag: &str, value: &str, case: Case, hash_key: &HashKey) {
    if is_plain_part(value) {
        key.push_str(tag);
        key.push('=');
        key.extend(value.chars().map(|c| match case {
            Case::Upper => c.to_ascii_uppercase(),
            Case::Lower => c.to_ascii_lowercase(),
            Case::Keep => c,
        }));
    } else {
        let cased = match case {
            Case::Upper => value.to_ascii_uppercase(),
            Case::Lower => value.to_ascii_lowercase(),
            Case::Keep => value.to_string(),
        };
        push_hashed(key, tag, &[cased.as_bytes()], hash_key);
    }
}

/// Whether `text` is written into a key as it is: short, and only plain characters
/// (printable ASCII, never `|`, `=`, `#`, `{` or `}`).
pub fn is_plain_part(text: &str) -> bool {
    text.len() <= MAX_PLAIN_BYTES && text.bytes().all(is_plain)
}

/// Writes a case-sensitive part of another front's key (the RLS descriptors) the way this
/// module writes its own: `tag=value` when `value` is [plain](is_plain_part), `tag#hash`
/// otherwise. `tag` must be plain itself, so that the key splits back into its parts.
pub fn push_part(key: &mut String, tag: &str, value: &str, hash_key: &HashKey) {
    debug_assert!(tag.is_empty() || is_plain_part(tag));
    push_plain(key, tag, value, Case::Keep, hash_key);
}

/// Writes `tag#` and the keyed hash of the concatenated `pieces`, for a part that cannot
/// be written as it is. The caller makes the concatenation unambiguous (by length
/// prefixes, say) when it joins several values.
pub fn push_hashed_part(key: &mut String, tag: &str, pieces: &[&[u8]], hash_key: &HashKey) {
    push_hashed(key, tag, pieces, hash_key);
}

/// The normalised path, `/` for the root, as [`push_plain`] would write it.
fn push_path(key: &mut String, segments: &[&str], hash_key: &HashKey) {
    let length: usize = segments.iter().map(|s| s.len() + 1).sum::<usize>().max(1);
    let plain = length <= MAX_PLAIN_BYTES && segments.iter().all(|s| s.bytes().all(is_plain));
    if plain {
        key.push_str("path=");
        if segments.is_empty() {
            key.push('/');
        }
        for segment in segments {
            key.push('/');
            key.push_str(segment);
        }
    } else {
        let pieces: Vec<&[u8]> = segments
            .iter()
            .flat_map(|s| [b"/".as_slice(), s.as_bytes()])
            .collect();
        let pieces = if pieces.is_empty() {
            vec![b"/".as_slice()]
        } else {
            pieces
        };
        push_hashed(key, "path", &pieces, hash_key);
    }
}

/// `tag#` and the first [`HASH_BYTES`] of the keyed hash of the concatenated `pieces`.
fn push_hashed(key: &mut String, tag: &str, pieces: &[&[u8]], hash_key: &HashKey) {
    let mut hasher = blake3::Hasher::new_keyed(&hash_key.0);
    for piece in pieces {
        hasher.update(piece);
    }
    let hash = hasher.finalize();
    key.push_str(tag);
    key.push('#');
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for byte in &hash.as_bytes()[..HASH_BYTES] {
        key.push(char::from(HEX[usize::from(byte >> 4)]));
        key.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
}

/// Characters a value may keep in a key: printable ASCII but the ones that separate parts
/// (`|`), tags (`=`, `#`), a Redis Cluster hash tag (`{`, `}`), and quoting characters
/// that would make a key awkward to read in a log.
fn is_plain(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"-._~/:@!$&'()*+,;%[]".contains(&byte)
}

/// Tokens a request costs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Cost {
    Fixed(u64),
    /// The value of the header `name` (lower case), from 1 to `max`; 1 when absent.
    Header {
        name: Box<str>,
        max: u64,
    },
}

impl Cost {
    pub(super) fn max(&self) -> u64 {
        match self {
            Cost::Fixed(cost) => *cost,
            Cost::Header { max, .. } => *max,
        }
    }

    pub(super) fn of(&self, policy: &str, headers: &dyn HeaderLookup) -> Result<u64, Rejection> {
        let (name, max) = match self {
            Cost::Fixed(cost) => return Ok(*cost),
            Cost::Header { name, max } => (name, *max),
        };
        let Some(raw) = headers.header(name) else {
            return Ok(1);
        };
        whole_number(raw)
            .filter(|cost| (1..=max).contains(cost))
            .ok_or_else(|| Rejection::BadCost {
                policy: policy.to_string(),
                header: name.to_string(),
                max,
            })
    }
}

/// Plain decimal digits, nothing else (no sign, no exponent), that fit a u64.
fn whole_number(raw: &[u8]) -> Option<u64> {
    let digits = trim_whitespace(raw);
    if digits.is_empty() || digits.len() > 20 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Other limits for some keys of a policy.
#[derive(Debug, Default)]
pub(super) struct Overrides {
    /// From an encoded key (as [`KeySpec::build`] makes it) to its override in `limits`.
    /// Keys are compared encoded, so the raw values of header parts are not kept.
    by_key: HashMap<String, usize>,
    limits: Vec<Vec<NamedLimit>>,
}

impl Overrides {
    /// Adds one override's limits; returns its index for [`Overrides::insert_key`].
    pub(super) fn add(&mut self, limits: Vec<NamedLimit>) -> usize {
        self.limits.push(limits);
        self.limits.len() - 1
    }

    /// Gives `key` the limits of override `index`; returns the override that already had
    /// it, if one did.
    pub(super) fn insert_key(&mut self, key: String, index: usize) -> Option<usize> {
        match self.by_key.get(&key) {
            Some(&earlier) => Some(earlier),
            None => {
                self.by_key.insert(key, index);
                None
            }
        }
    }

    pub(super) fn limits_for(&self, key: &str) -> Option<&[NamedLimit]> {
        if self.by_key.is_empty() {
            return None;
        }
        self.by_key
            .get(key)
            .map(|&index| self.limits[index].as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hash_key() -> HashKey {
        HashKey::default()
    }

    #[test]
    fn a_cost_is_plain_digits_that_fit() {
        assert_eq!(whole_number(b"7"), Some(7));
        assert_eq!(whole_number(b" 12 "), Some(12));
        assert_eq!(whole_number(b"+5"), None);
        assert_eq!(whole_number(b"1e3"), None);
        assert_eq!(whole_number(b""), None);
        assert_eq!(whole_number(b"99999999999999999999"), None);
        assert_eq!(whole_number(b"\xff"), None);
    }

    #[test]
    fn a_long_or_unusual_path_is_hashed_and_never_leaves_the_hash_tag() {
        let mut key = String::new();
        push_path(&mut key, &["a{b}", "c"], &hash_key());
        assert!(key.starts_with("path#"), "{key}");
        assert!(!key.contains('{') && !key.contains('}'));
        let long = "x".repeat(200);
        let mut key = String::new();
        push_path(&mut key, &[&long], &hash_key());
        assert_eq!(key.len(), "path#".len() + 2 * HASH_BYTES);
    }

    #[test]
    fn the_root_path_is_a_slash() {
        let mut key = String::new();
        push_path(&mut key, &[], &hash_key());
        assert_eq!(key, "path=/");
    }

    #[test]
    fn a_hash_depends_on_the_hash_key() {
        let mut default = String::new();
        push_hashed(&mut default, "h", &[b"key-123"], &HashKey::default());
        let mut secret = String::new();
        push_hashed(
            &mut secret,
            "h",
            &[b"key-123"],
            &HashKey::from_secret(b"s3cret"),
        );
        assert_ne!(default, secret);
        assert!(!format!("{:?}", HashKey::from_secret(b"s3cret")).contains("s3cret"));
    }

    #[test]
    fn an_override_client_ip_is_written_as_the_service_keys_it() {
        assert_eq!(client_key("192.0.2.7").unwrap().to_string(), "192.0.2.7");
        assert_eq!(
            client_key("2001:db8:0:0::/64").unwrap().to_string(),
            "2001:db8::/64"
        );
        assert!(client_key("2001:db8::1").is_err());
        assert!(client_key("10.0.0.0/8").is_err());
        assert!(client_key("host.example").is_err());
    }

    proptest! {
        /// The encoding of a part never contains the separator, so keys split back into
        /// their parts; and a plain value is never mistaken for a hashed one.
        #[test]
        fn an_encoded_part_never_contains_a_separator_or_a_brace(
            value in "\\PC{0,200}",
            upper in any::<bool>(),
        ) {
            let mut key = String::new();
            let case = if upper { Case::Upper } else { Case::Lower };
            push_plain(&mut key, "m", &value, case, &hash_key());
            prop_assert!(!key.contains(['|', '{', '}']), "{}", key);
            prop_assert_eq!(key.matches(['=', '#']).count(), 1, "{}", key);
        }
    }
}
