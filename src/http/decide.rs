//! The decision API, for applications on the internal side that name the policy and the
//! key themselves, and the bucket API beside it:
//!
//! - `POST /v1/decide` with `{"policy": "api", "key": "user-42", "cost": 1}`: decides as a
//!   request with that key would be decided, and says so per limit.
//! - `GET /v1/buckets/{policy}/{key}`: the same answer at cost 0, a read that spends and
//!   writes nothing. `DELETE` on it resets the key's buckets (every limit full again).
//!   `{key}` is a one-part key's value, percent-encoded as one path segment; a composite
//!   key is given as `/v1/buckets/{policy}?key=<part 1>&key=<part 2>` (form-encoded, so
//!   `+` is a space and `%2B` a plus), and a policy keyed `global` as
//!   `/v1/buckets/{policy}` alone.
//!
//! Deciding goes through [`Limiter::decide_key`](crate::limiter::Limiter::decide_key), so
//! the deny cache, `FAIL_MODE` and the metrics behave as for requests. [`AdminAuth`] says who
//! may call. Every refusal is a problem body whose detail starts with the field it is
//! about, and no input is a 500.

use actix_web::http::StatusCode;
use actix_web::http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use serde::Serialize;
use serde_json::{Map, Value};
use thiserror::Error;

use super::admin_auth::{AdminAuth, AdminRefusal};
use super::headers::{
    X_RATELIMIT_SOURCE, ceil_millis, item_name, quota_headers, reset_secs, retry_after_secs,
};
use super::problem::Problem;
use super::routes::AppState;
use crate::limiter::{KeyVerdict, LimitVerdict, ResetError, StoreError, Verdict};
use crate::policy::{LookupError, Mode};

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

/// Everything these routes answer besides a decision.
#[derive(Debug, Error)]
pub enum ApiError {
    #[error(transparent)]
    Refused(#[from] AdminRefusal),
    #[error("Content-Type: expected application/json")]
    NotJson,
    #[error("body: larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
    #[error("body: could not be read")]
    Unreadable,
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Lookup(#[from] LookupError),
    #[error("the rate-limit store cannot reset these buckets now ({0}); nothing was reset")]
    Store(#[from] StoreError),
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Refused(refusal) => refusal.status_code(),
            ApiError::NotJson => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unreadable | ApiError::Input(_) | ApiError::Lookup(_) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        match self {
            ApiError::Refused(refusal) => return refusal.error_response(),
            ApiError::Store(_) => {
                response.insert_header((RETRY_AFTER, HeaderValue::from_static("1")));
            }
            _ => {}
        }
        Problem::new(self.status_code())
            .detail(&self.to_string())
            .respond(response)
    }
}

/// `application/json`, with parameters (`; charset=utf-8`) or without; anything else,
/// or none, is a 415.
fn is_json(req: &HttpRequest) -> bool {
    req.headers()
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

/// `POST /v1/decide`.
pub async fn decide(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    auth: web::Data<AdminAuth>,
) -> Result<HttpResponse, ApiError> {
    auth.check(&req)?;
    if !is_json(&req) {
        return Err(ApiError::NotJson);
    }
    let body = payload
        .to_bytes_limited(MAX_BODY_BYTES)
        .await
        .map_err(|_| ApiError::TooLarge)?
        .map_err(|_| ApiError::Unreadable)?;
    let asked = Asked::parse(&body)?;
    let policies = state.limiter.policies();
    let decided = state
        .limiter
        .decide_key(&policies, &asked.policy, asked.key.as_deref(), asked.cost)
        .await?;
    Ok(respond(&state, &decided))
}

/// `GET /v1/buckets/{policy}?key=…` (composite and `global` keys).
pub async fn show_bucket(
    req: HttpRequest,
    policy: web::Path<String>,
    state: web::Data<AppState>,
    auth: web::Data<AdminAuth>,
) -> Result<HttpResponse, ApiError> {
    show(&req, &policy, None, &state, &auth).await
}

/// `GET /v1/buckets/{policy}/{key}`.
pub async fn show_bucket_of(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
    auth: web::Data<AdminAuth>,
) -> Result<HttpResponse, ApiError> {
    let (policy, key) = path.into_inner();
    show(&req, &policy, Some(key), &state, &auth).await
}

/// `DELETE /v1/buckets/{policy}?key=…`.
pub async fn reset_bucket(
    req: HttpRequest,
    policy: web::Path<String>,
    state: web::Data<AppState>,
    auth: web::Data<AdminAuth>,
) -> Result<HttpResponse, ApiError> {
    reset(&req, &policy, None, &state, &auth).await
}

/// `DELETE /v1/buckets/{policy}/{key}`.
pub async fn reset_bucket_of(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
    auth: web::Data<AdminAuth>,
) -> Result<HttpResponse, ApiError> {
    let (policy, key) = path.into_inner();
    reset(&req, &policy, Some(key), &state, &auth).await
}

async fn show(
    req: &HttpRequest,
    policy: &str,
    path_key: Option<String>,
    state: &AppState,
    auth: &AdminAuth,
) -> Result<HttpResponse, ApiError> {
    auth.check(req)?;
    let key = bucket_key(path_key, req.query_string())?;
    let policies = state.limiter.policies();
    let decided = state
        .limiter
        .decide_key(&policies, policy, key.as_deref(), 0)
        .await?;
    Ok(respond(state, &decided))
}

/// Deletes the policy's hash for the key: every limit full again. 204 once the store
/// has done it; 503 when it cannot, never a silent success.
async fn reset(
    req: &HttpRequest,
    policy: &str,
    path_key: Option<String>,
    state: &AppState,
    auth: &AdminAuth,
) -> Result<HttpResponse, ApiError> {
    auth.check(req)?;
    let key = bucket_key(path_key, req.query_string())?;
    let policies = state.limiter.policies();
    let bucket = match state.limiter.reset(&policies, policy, key.as_deref()).await {
        Ok(bucket) => bucket,
        Err(ResetError::Lookup(error)) => return Err(error.into()),
        Err(ResetError::Store(error)) => return Err(error.into()),
    };
    log::info!("reset the buckets of policy {policy} at {bucket}");
    Ok(HttpResponse::NoContent().finish())
}

/// The verdict on a named key: 200 whether allowed or not (the call succeeded; `allowed`
/// is its answer), with the quota headers a limited route sends.
fn respond(state: &AppState, decided: &KeyVerdict<'_>) -> HttpResponse {
    let verdict = &decided.verdict;
    let mut response = HttpResponse::Ok();
    if let Some(source) = verdict.source() {
        response.insert_header((
            X_RATELIMIT_SOURCE,
            HeaderValue::from_static(source.as_str()),
        ));
    }
    for header in quota_headers(state.headers, verdict) {
        response.insert_header(header);
    }
    response
        .insert_header((CACHE_CONTROL, HeaderValue::from_static("no-store")))
        .json(DecisionBody::new(decided))
}

/// The body of a decision: the verdict, and per limit its quota and state, in the
/// numbers the `RateLimit` headers use.
#[derive(Debug, Serialize)]
pub struct DecisionBody<'a> {
    pub allowed: bool,
    /// `redis`, `local`, `open` or `closed`, as `X-RateLimit-Source` says it.
    pub source: Option<&'static str>,
    pub policy: &'a str,
    pub mode: &'static str,
    /// The Redis key of the policy's hash for this key.
    pub bucket: &'a str,
    pub cost: u64,
    /// For a denial, what a 429 would say: `Retry-After` (whole seconds, at least 1) and
    /// `retry_after_ms`; 0 when allowed.
    pub retry_after: u64,
    pub retry_after_ms: u64,
    pub limits: Vec<LimitBody>,
}

/// One limit in a [`DecisionBody`]. Its state is `null` when no bucket was asked
/// (`FAIL_MODE=open` or `closed` while the store cannot decide).
#[derive(Debug, Serialize)]
pub struct LimitBody {
    /// `<policy>-<limit>`, as in the headers.
    pub name: String,
    /// The burst: what `RateLimit-Policy` says as `q`.
    pub quota: u64,
    /// Seconds, `w`.
    pub window: u64,
    /// Whether this limit had the tokens.
    pub allowed: Option<bool>,
    /// Whole tokens left, `r`.
    pub remaining: Option<u64>,
    /// Seconds until more quota, `t`.
    pub reset: Option<u64>,
    /// For a limit that lacked the tokens, until it has them; 0 otherwise.
    pub retry_after: Option<u64>,
    pub retry_after_ms: Option<u64>,
}

impl<'a> DecisionBody<'a> {
    pub fn new(decided: &'a KeyVerdict<'_>) -> Self {
        let verdict = &decided.verdict;
        let (retry_after, retry_after_ms) = match verdict {
            Verdict::Decided {
                admitted: false, ..
            } => {
                let us = verdict.retry_after_us();
                (retry_after_secs(us), ceil_millis(us).max(1))
            }
            // As `/limited_endpoint`'s 503 says: `Retry-After: 1`.
            Verdict::Closed { .. } => (1, 1_000),
            _ => (0, 0),
        };
        let limits = verdict.limits().iter().map(LimitBody::new).collect();
        Self {
            allowed: verdict.allowed(),
            source: verdict.source().map(|source| source.as_str()),
            policy: &decided.policy.name,
            mode: match decided.policy.mode {
                Mode::Enforce => "enforce",
                Mode::Shadow => "shadow",
            },
            bucket: &decided.bucket,
            cost: decided.cost,
            retry_after,
            retry_after_ms,
            limits,
        }
    }
}

impl LimitBody {
    fn new(applied: &LimitVerdict<'_>) -> Self {
        let mut name = String::new();
        item_name(&applied.name, &mut name);
        let quota = Self {
            name,
            quota: applied.limit.capacity(),
            window: applied.limit.window_secs(),
            allowed: None,
            remaining: None,
            reset: None,
            retry_after: None,
            retry_after_ms: None,
        };
        let Some(level) = &applied.level else {
            return quota;
        };
        let (retry_after, retry_after_ms) = if level.allowed {
            (0, 0)
        } else {
            (
                retry_after_secs(level.retry_after_us),
                ceil_millis(level.retry_after_us).max(1),
            )
        };
        Self {
            allowed: Some(level.allowed),
            remaining: Some(level.remaining),
            reset: Some(reset_secs(level)),
            retry_after: Some(retry_after),
            retry_after_ms: Some(retry_after_ms),
            ..quota
        }
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
