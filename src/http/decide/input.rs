//! What a caller of the decision and bucket API asks, read from a `/v1/decide` body or a
//! bucket route's path and query. Every refusal names the field it is about and never
//! repeats a value given: a key may be an API key.

use actix_web::web;
use serde_json::{Map, Value};
use thiserror::Error;

/// The largest `/v1/decide` body read; a larger one is a 413. A decision needs a few
/// hundred bytes at most (a key part is at most 256).
pub const MAX_BODY_BYTES: usize = 8 * 1024;

/// The fields of a `/v1/decide` body, in the order messages list them.
const FIELDS: [&str; 3] = ["policy", "key", "cost"];

/// What a `/v1/decide` body asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asked {
    pub policy: String,
    /// The raw values of the key's parts; `None` when absent (or `null`).
    pub key: Option<Vec<String>>,
    /// Tokens to take; 1 when absent (or `null`), 0 to only read.
    pub cost: u64,
}

/// Why a body or query says nothing that can be decided. Each message starts with the
/// field it is about, and never repeats a value given (a key may be an API key).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum InputError {
    #[error("body: not JSON ({0})")]
    NotJson(String),
    #[error(
        "body: expected a JSON object such as {{\"policy\": \"api\", \"key\": \"user-42\", \"cost\": 1}}, got {0}"
    )]
    NotAnObject(&'static str),
    #[error("body: unknown field {}; the fields are policy, key and cost", shown(.0))]
    UnknownField(Option<String>),
    #[error("policy: required: the name of a policy (GET /v1/policies lists them)")]
    MissingPolicy,
    #[error("policy: expected a string, got {0}")]
    PolicyNotText(&'static str),
    #[error("key: expected a string, or a list of strings for a composite key, got {0}")]
    KeyNotText(&'static str),
    #[error("key: entry {entry} of the list must be a string, got {found}")]
    KeyEntryNotText { entry: usize, found: &'static str },
    #[error("cost: expected a whole number of tokens, got {0}")]
    CostNotNumber(&'static str),
    #[error("cost: must not be negative")]
    CostNegative,
    #[error("cost: must be a whole number, written without a fraction or an exponent")]
    CostNotWhole,
    #[error("cost: is larger than any bucket can hold")]
    CostTooLarge,
    #[error("query: not a query string of key=<value> pairs")]
    BadQuery,
    #[error("query: unknown parameter {}; the only one is key, once per part of the key", shown(.0))]
    UnknownParameter(Option<String>),
    #[error("query: the key is in the path already; give no query")]
    KeyTwice,
    #[error(
        "key: entry {entry} must be written key=value: a descriptor's entry, as rls:<domain> takes them"
    )]
    EntryNotPair { entry: usize },
}

/// The prefix that names a rate-limit service domain where a policy goes.
pub const RLS_PREFIX: &str = "rls:";

/// What a decision or bucket request names: a policy and its key, or a descriptor of a
/// rate-limit service domain (`rls:<domain>`, its key the descriptor's entries in order,
/// each `key=value`, split at the first `=`). Policy names never hold a `:`, so the two
/// never meet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Named<'a> {
    Policy {
        name: &'a str,
        key: Option<&'a [String]>,
    },
    Descriptor {
        domain: &'a str,
        entries: Vec<(&'a str, &'a str)>,
    },
}

impl<'a> Named<'a> {
    pub fn read(policy: &'a str, key: Option<&'a [String]>) -> Result<Self, InputError> {
        let Some(domain) = policy.strip_prefix(RLS_PREFIX) else {
            return Ok(Named::Policy { name: policy, key });
        };
        let entries = key
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(index, entry)| {
                entry
                    .split_once('=')
                    .ok_or(InputError::EntryNotPair { entry: index + 1 })
            })
            .collect::<Result<_, _>>()?;
        Ok(Named::Descriptor { domain, entries })
    }
}

/// A name from the input, quoted when it reads like a field name, else described: the
/// message must not carry arbitrary text back.
fn shown(name: &Option<String>) -> String {
    match name {
        Some(name) => format!("{name:?}"),
        None => "(not shown: not a plain name)".to_string(),
    }
}

/// `name` if it is plain enough to repeat in a message.
fn plain(name: &str) -> Option<String> {
    let plain = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    plain.then(|| name.to_string())
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

impl Asked {
    /// Reads a `/v1/decide` body. Every field is read by hand from the JSON value, so
    /// every problem names its field.
    pub fn parse(body: &[u8]) -> Result<Self, InputError> {
        let value: Value =
            serde_json::from_slice(body).map_err(|err| InputError::NotJson(err.to_string()))?;
        let Value::Object(fields) = value else {
            return Err(InputError::NotAnObject(kind(&value)));
        };
        if let Some(unknown) = fields.keys().find(|name| !FIELDS.contains(&name.as_str())) {
            return Err(InputError::UnknownField(plain(unknown)));
        }
        Ok(Asked {
            policy: policy(&fields)?,
            key: key(&fields)?,
            cost: cost(&fields)?,
        })
    }
}

fn policy(fields: &Map<String, Value>) -> Result<String, InputError> {
    match fields.get("policy") {
        None => Err(InputError::MissingPolicy),
        Some(Value::String(name)) => Ok(name.clone()),
        Some(other) => Err(InputError::PolicyNotText(kind(other))),
    }
}

fn key(fields: &Map<String, Value>) -> Result<Option<Vec<String>>, InputError> {
    match fields.get("key") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(value)) => Ok(Some(vec![value.clone()])),
        Some(Value::Array(values)) => values
            .iter()
            .enumerate()
            .map(|(index, value)| match value {
                Value::String(value) => Ok(value.clone()),
                other => Err(InputError::KeyEntryNotText {
                    entry: index + 1,
                    found: kind(other),
                }),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(other) => Err(InputError::KeyNotText(kind(other))),
    }
}

fn cost(fields: &Map<String, Value>) -> Result<u64, InputError> {
    let number = match fields.get("cost") {
        None | Some(Value::Null) => return Ok(1),
        Some(Value::Number(number)) => number,
        Some(other) => return Err(InputError::CostNotNumber(kind(other))),
    };
    if let Some(cost) = number.as_u64() {
        return Ok(cost);
    }
    if number.is_i64() {
        return Err(InputError::CostNegative);
    }
    // A float: written with a fraction or an exponent, or a whole number beyond u64.
    match number.as_f64() {
        Some(f) if f < 0.0 => Err(InputError::CostNegative),
        Some(f) if f.fract() == 0.0 && f >= u64::MAX as f64 => Err(InputError::CostTooLarge),
        _ => Err(InputError::CostNotWhole),
    }
}

/// The raw key a bucket route names: `{key}` in the path (one part), or `key=` in the
/// query, once per part in order (a composite key), or neither (a policy keyed `global`).
pub fn bucket_key(
    path_key: Option<String>,
    query: &str,
) -> Result<Option<Vec<String>>, InputError> {
    let pairs = web::Query::<Vec<(String, String)>>::from_query(query)
        .map_err(|_| InputError::BadQuery)?
        .into_inner();
    if let Some((unknown, _)) = pairs.iter().find(|(name, _)| name != "key") {
        return Err(InputError::UnknownParameter(plain(unknown)));
    }
    match (path_key, pairs.is_empty()) {
        (Some(_), false) => Err(InputError::KeyTwice),
        (Some(key), true) => Ok(Some(vec![key])),
        (None, true) => Ok(None),
        (None, false) => Ok(Some(pairs.into_iter().map(|(_, value)| value).collect())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asked(body: &str) -> Result<Asked, String> {
        Asked::parse(body.as_bytes()).map_err(|error| error.to_string())
    }

    fn refused(body: &str) -> String {
        match asked(body) {
            Err(message) => message,
            Ok(asked) => panic!("{body} should be refused, got {asked:?}"),
        }
    }

    #[test]
    fn a_body_names_a_policy_a_key_and_a_cost() {
        assert_eq!(
            asked(r#"{"policy": "api", "key": "user-42", "cost": 3}"#),
            Ok(Asked {
                policy: "api".into(),
                key: Some(vec!["user-42".into()]),
                cost: 3,
            })
        );
        assert_eq!(
            asked(r#"{"policy": "pair", "key": ["k", "GET"], "cost": 0}"#),
            Ok(Asked {
                policy: "pair".into(),
                key: Some(vec!["k".into(), "GET".into()]),
                cost: 0,
            })
        );
    }

    #[test]
    fn the_key_may_be_left_out_and_the_cost_defaults_to_one() {
        let expected = Ok(Asked {
            policy: "ceiling".into(),
            key: None,
            cost: 1,
        });
        assert_eq!(asked(r#"{"policy": "ceiling"}"#), expected);
        assert_eq!(
            asked(r#"{"policy": "ceiling", "key": null, "cost": null}"#),
            expected
        );
    }

    #[test]
    fn every_bad_body_is_refused_naming_its_field() {
        let cases = [
            ("not json", "body: not JSON"),
            ("", "body: not JSON"),
            (r#"[1, 2]"#, "body: expected a JSON object"),
            (r#""api""#, "body: expected a JSON object"),
            (
                r#"{"policy": "api", "extra": 1}"#,
                "body: unknown field \"extra\"",
            ),
            (r#"{"key": "k"}"#, "policy: required"),
            (
                r#"{"policy": 7}"#,
                "policy: expected a string, got a number",
            ),
            (
                r#"{"policy": "api", "cost": -1}"#,
                "cost: must not be negative",
            ),
            (
                r#"{"policy": "api", "cost": -1.5}"#,
                "cost: must not be negative",
            ),
            (
                r#"{"policy": "api", "cost": 1.5}"#,
                "cost: must be a whole number",
            ),
            (
                r#"{"policy": "api", "cost": 1.0}"#,
                "cost: must be a whole number",
            ),
            (
                r#"{"policy": "api", "cost": 1e3}"#,
                "cost: must be a whole number",
            ),
            (
                r#"{"policy": "api", "cost": "1"}"#,
                "cost: expected a whole number of tokens, got a string",
            ),
            (
                r#"{"policy": "api", "cost": true}"#,
                "cost: expected a whole number of tokens, got a boolean",
            ),
            (
                r#"{"policy": "api", "cost": 100000000000000000000000}"#,
                "cost: is larger than any bucket",
            ),
            (
                r#"{"policy": "api", "key": 42}"#,
                "key: expected a string, or a list of strings",
            ),
            (
                r#"{"policy": "api", "key": {"a": "b"}}"#,
                "key: expected a string, or a list of strings for a composite key, got an object",
            ),
            (
                r#"{"policy": "api", "key": ["a", 2]}"#,
                "key: entry 2 of the list must be a string, got a number",
            ),
        ];
        for (body, expected) in cases {
            let message = refused(body);
            assert!(message.starts_with(expected), "{body}: {message}");
        }
    }

    #[test]
    fn an_unknown_field_is_repeated_only_when_it_reads_like_a_name() {
        let message = refused(r#"{"policy": "api", "<img src=x>": 1}"#);
        assert!(
            message.starts_with("body: unknown field (not shown"),
            "{message}"
        );
        assert!(!message.contains("img"), "{message}");
    }

    #[test]
    fn rls_and_a_domain_name_a_descriptor_whose_entries_split_at_the_first_equals_sign() {
        let key = vec!["tenant=acme".to_string(), "q=a=b".to_string()];
        assert_eq!(
            Named::read("rls:edge", Some(&key)),
            Ok(Named::Descriptor {
                domain: "edge",
                entries: vec![("tenant", "acme"), ("q", "a=b")],
            })
        );
        assert_eq!(
            Named::read("api", Some(&key)),
            Ok(Named::Policy {
                name: "api",
                key: Some(&key[..]),
            })
        );
        let bare = vec!["tenant=acme".to_string(), "user".to_string()];
        assert_eq!(
            Named::read("rls:edge", Some(&bare)),
            Err(InputError::EntryNotPair { entry: 2 })
        );
        assert_eq!(
            Named::read("rls:edge", None),
            Ok(Named::Descriptor {
                domain: "edge",
                entries: vec![],
            })
        );
    }

    #[test]
    fn a_bucket_key_comes_from_the_path_or_from_the_query_in_order() {
        assert_eq!(
            bucket_key(Some("user-42".into()), ""),
            Ok(Some(vec!["user-42".into()]))
        );
        assert_eq!(
            bucket_key(None, "key=k&key=GET"),
            Ok(Some(vec!["k".into(), "GET".into()]))
        );
        assert_eq!(
            bucket_key(None, "key=a%2Bb%2Fc"),
            Ok(Some(vec!["a+b/c".into()]))
        );
        assert_eq!(bucket_key(None, ""), Ok(None));
        assert_eq!(
            bucket_key(Some("k".into()), "key=k"),
            Err(InputError::KeyTwice)
        );
        assert_eq!(
            bucket_key(None, "cost=1"),
            Err(InputError::UnknownParameter(Some("cost".into())))
        );
    }
}
