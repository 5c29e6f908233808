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
//! - `rls:<domain>` in place of a policy names a descriptor of a rate-limit service domain
//!   (`RLS_CONFIG`); the key is its entries in order, each `key=value`:
//!   `{"policy": "rls:edge", "key": ["tenant=acme", "user=bob"]}`,
//!   `/v1/buckets/rls:edge/remote_address=203.0.113.9`. It is decided under the rule it
//!   matches, as a `ShouldRateLimit` carrying that descriptor alone would be, and reset
//!   with every bucket of those entries.
//!
//! Deciding goes through [`Limiter::decide_key`](crate::limiter::Limiter::decide_key), so
//! the deny cache, `FAIL_MODE` and the metrics behave as for requests. [`AdminAuth`] says who
//! may call. Every refusal is a problem body whose detail starts with the field it is
//! about, and no input is a 500.

use actix_web::http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use actix_web::http::{Method, StatusCode};
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use serde::{Deserialize, Serialize};
use thiserror::Error;

mod input;

pub use input::{Asked, InputError, MAX_BODY_BYTES, Named, RLS_PREFIX, bucket_key};

use super::admin_auth::{AdminAuth, AdminRefusal};
use super::headers::{
    X_RATELIMIT_SOURCE, ceil_millis, item_name, quota_headers, reset_secs, retry_after_secs,
};
use super::problem::Problem;
use super::routes::AppState;
use crate::limiter::{
    KeyError, KeyVerdict, LimitVerdict, LookupError, Mode, ResetError, StoreError, Verdict,
};

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
    #[error(transparent)]
    Descriptor(#[from] KeyError),
    #[error("the rate-limit store cannot reset these buckets now ({0}); nothing was reset")]
    Store(#[from] StoreError),
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Refused(refusal) => refusal.status_code(),
            ApiError::NotJson => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unreadable
            | ApiError::Input(_)
            | ApiError::Lookup(_)
            | ApiError::Descriptor(_) => StatusCode::BAD_REQUEST,
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
    decide_named(&state, &asked.policy, asked.key.as_deref(), asked.cost).await
}

/// Decides what `policy` and `key` name at `cost` (0 only reads), and renders it.
async fn decide_named(
    state: &AppState,
    policy: &str,
    key: Option<&[String]>,
    cost: u64,
) -> Result<HttpResponse, ApiError> {
    match Named::read(policy, key)? {
        Named::Policy { name, key } => {
            let policies = state.limiter.policies();
            let decided = state.limiter.decide_key(&policies, name, key, cost).await?;
            Ok(respond(state, &decided))
        }
        Named::Descriptor { domain, entries } => {
            let rules = state.limiter.rules();
            let decided = state
                .limiter
                .decide_descriptor_key(&rules, domain, &entries, cost)
                .await?;
            Ok(respond(state, &decided))
        }
    }
}

/// The path of the bucket API: `/v1/buckets/{policy}`, with `/{key}` for a one-part key
/// (a composite or `global` key comes in the query instead).
#[derive(Debug, Deserialize)]
pub struct BucketPath {
    policy: String,
    key: Option<String>,
}

impl BucketPath {
    /// The policy and the key, once the caller may use the bucket API.
    fn read(
        self,
        req: &HttpRequest,
        auth: &AdminAuth,
    ) -> Result<(String, Option<Vec<String>>), ApiError> {
        auth.check(req)?;
        let key = bucket_key(self.key, req.query_string())?;
        Ok((self.policy, key))
    }
}

/// `/v1/buckets/{policy}/{key}` (or `?key=…`), for a caller that may use the bucket API:
/// `GET` and `HEAD` answer the decision at cost 0, `DELETE` resets the buckets.
pub async fn bucket(
    req: HttpRequest,
    path: web::Path<BucketPath>,
    state: web::Data<AppState>,
    auth: web::Data<AdminAuth>,
) -> Result<HttpResponse, ApiError> {
    let (policy, key) = path.into_inner().read(&req, &auth)?;
    if req.method() == Method::DELETE {
        reset_bucket(&state, &policy, key.as_deref()).await
    } else {
        decide_named(&state, &policy, key.as_deref(), 0).await
    }
}

/// Deletes the policy's hash for the key: every limit full again. 204 once the store
/// has done it; 503 when it cannot, never a silent success.
async fn reset_bucket(
    state: &AppState,
    policy: &str,
    key: Option<&[String]>,
) -> Result<HttpResponse, ApiError> {
    let reset = match Named::read(policy, key)? {
        Named::Policy { name, key } => {
            let policies = state.limiter.policies();
            state.limiter.reset(&policies, name, key).await
        }
        Named::Descriptor { domain, entries } => {
            let rules = state.limiter.rules();
            state
                .limiter
                .reset_descriptor(&rules, domain, &entries)
                .await
        }
    };
    let bucket = match reset {
        Ok(bucket) => bucket,
        Err(ResetError::Lookup(error)) => return Err(error.into()),
        Err(ResetError::Descriptor(error)) => return Err(error.into()),
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
            policy: decided.policy,
            mode: match decided.mode {
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
