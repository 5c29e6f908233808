//! The endpoints and the state they share.

use std::net::IpAddr;

use actix_web::http::StatusCode;
use actix_web::http::header::{
    CACHE_CONTROL, CONTENT_TYPE, ContentType, HeaderName, HeaderValue, RETRY_AFTER,
};
use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::json;

use super::headers::{
    HeaderMode, X_RATELIMIT_SOURCE, ceil_millis, item_name, quota_headers, retry_after_secs,
};
use super::problem::{PROBLEM_JSON, Problem};
use std::sync::Arc;

use actix_web::http::header::{HOST, HeaderMap};
use arc_swap::ArcSwap;

use crate::bucket::{Charge, Group};
use crate::decision::{Decider, LimitCharge, LimitName, Verdict};
use crate::identity::{ClientKey, ForwardedHeaders, IdentityRules};
use crate::metrics::Metrics;
use crate::policy::{Applied, HeaderLookup, Mode, Policy, PolicySet, RequestView};

pub struct AppState {
    pub instance: String,
    /// The policies in force; a reload swaps them between requests.
    pub policies: Arc<ArcSwap<PolicySet>>,
    pub key_prefix: String,
    pub decider: Decider,
    pub identity: IdentityRules,
    pub headers: HeaderMode,
    pub metrics: Metrics,
    /// The bodies that never change, rendered once: they are on the hot path.
    index_body: Bytes,
    admitted_body: Bytes,
}

impl AppState {
    pub fn new(
        instance: String,
        policies: Arc<ArcSwap<PolicySet>>,
        key_prefix: String,
        decider: Decider,
        identity: IdentityRules,
        headers: HeaderMode,
        metrics: Metrics,
    ) -> Self {
        let render = |message: &str| {
            Bytes::from(json!({"message": message, "instance": instance}).to_string())
        };
        Self {
            index_body: render("Hello World"),
            admitted_body: render("This is a limited endpoint"),
            instance,
            policies,
            key_prefix,
            decider,
            identity,
            headers,
            metrics,
        }
    }
}

/// `GET /`: not limited.
pub async fn index(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(ContentType::json())
        .body(state.index_body.clone())
}

/// `GET /health`: liveness. Touches no store.
pub async fn health() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// `GET /ready`: whether the store can decide right now.
pub async fn ready(state: web::Data<AppState>) -> HttpResponse {
    match state.decider.check_ready().await {
        Ok(()) => HttpResponse::Ok().json(json!({"status": "ready"})),
        Err(reason) => HttpResponse::ServiceUnavailable()
            .json(json!({"status": "unavailable", "reason": reason.to_string()})),
    }
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
}

/// `GET /limited_endpoint`: every policy that applies decides, all or nothing.
pub async fn limited_endpoint(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let target = Target {
        method: req.method().as_str(),
        path: req.match_info().as_str(),
        host: req.headers().get(HOST).and_then(|host| host.to_str().ok()),
    };
    let judgement = judge(&req, &state, target).await;
    let mut response = HttpResponse::build(judgement.outcome.status());
    for header in judgement.headers {
        response.insert_header(header);
    }
    match judgement.outcome {
        Outcome::Admitted => response
            .insert_header((CACHE_CONTROL, HeaderValue::from_static("no-store")))
            .content_type(ContentType::json())
            .body(state.admitted_body.clone()),
        Outcome::Limited(problem) | Outcome::Unavailable(problem) | Outcome::Refused(problem) => {
            response
                .insert_header((CONTENT_TYPE, PROBLEM_JSON))
                .body(problem)
        }
    }
}

/// The request a decision is about: the one being served (`/limited_endpoint`), or the
/// one Nginx holds while it asks (`/v1/check`). Its headers and its client are those of
/// the request being served, which for `/v1/check` are the original's, as Nginx forwards
/// them.
pub struct Target<'a> {
    pub method: &'a str,
    /// Percent-decoded, without the query.
    pub path: &'a str,
    /// The host it was sent to; a port is ignored.
    pub host: Option<&'a str>,
}

/// What the limiter says about one request: the headers that describe the decision, and
/// how the request ends. Every route that decides answers from one of these, so a client
/// sees the same headers and problem bodies whichever route decided.
pub struct Judgement {
    /// `X-RateLimit-Source`, the quota headers (`RATELIMIT_HEADERS`), and `Retry-After`
    /// on a 429 or 503.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub outcome: Outcome,
}

/// How a request ends; the problem body of a refusal is rendered once, here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every enforced limit had the tokens, or none applied, or `FAIL_MODE=open`.
    Admitted,
    /// 429: an enforced limit lacked tokens.
    Limited(String),
    /// 503: the store cannot decide and `FAIL_MODE=closed`.
    Unavailable(String),
    /// 400: the request cannot be judged (a policy refuses its shape, or its client is
    /// unknown); no bucket was asked.
    Refused(String),
}

impl Outcome {
    /// The status the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            Outcome::Admitted => StatusCode::OK,
            Outcome::Limited(_) => StatusCode::TOO_MANY_REQUESTS,
            Outcome::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Outcome::Refused(_) => StatusCode::BAD_REQUEST,
        }
    }
}

impl Judgement {
    /// A 400 before any policy was asked; `detail` says why, never quoting the client.
    pub fn refused(detail: &str) -> Self {
        Judgement {
            headers: Vec::new(),
            outcome: Outcome::Refused(Problem::new(StatusCode::BAD_REQUEST).detail(detail).body()),
        }
    }
}

/// Decides `target` under the active policies and describes the verdict.
pub async fn judge(req: &HttpRequest, state: &AppState, target: Target<'_>) -> Judgement {
    let Some(client) = client_key(req, &state.identity) else {
        return Judgement::refused("the client address is unknown");
    };
    let policies = state.policies.load_full();
    let headers = Headers(req.headers());
    let view = RequestView {
        method: target.method,
        path: target.path,
        host: target.host,
        headers: &headers,
        client,
    };
    let applied = match policies.evaluate(&view) {
        Ok(applied) => applied,
        Err(rejection) => return Judgement::refused(&rejection.to_string()),
    };
    let verdict = state
        .decider
        .decide(charges(&applied, &state.key_prefix))
        .await;
    let mut headers = quota_headers(state.headers, &verdict);
    if let Some(source) = verdict.source() {
        headers.push((
            X_RATELIMIT_SOURCE,
            HeaderValue::from_static(source.as_str()),
        ));
    }
    let outcome = match verdict {
        Verdict::Decided {
            admitted: false, ..
        } => {
            let retry_after_us = verdict.retry_after_us();
            headers.push((
                RETRY_AFTER,
                HeaderValue::from(retry_after_secs(retry_after_us)),
            ));
            let violated: Vec<String> = verdict
                .violated()
                .iter()
                .map(|name| {
                    let mut text = String::new();
                    item_name(name, &mut text);
                    text
                })
                .collect();
            let violated: Vec<&str> = violated.iter().map(String::as_str).collect();
            Outcome::Limited(
                Problem::quota_exceeded(&violated, ceil_millis(retry_after_us).max(1)).body(),
            )
        }
        Verdict::Unlimited | Verdict::Decided { .. } | Verdict::Open { .. } => Outcome::Admitted,
        Verdict::Closed { .. } => {
            headers.push((RETRY_AFTER, HeaderValue::from_static("1")));
            Outcome::Unavailable(
                Problem::new(StatusCode::SERVICE_UNAVAILABLE)
                    .detail("the rate-limit store cannot decide and FAIL_MODE=closed")
                    .body(),
            )
        }
    };
    Judgement { headers, outcome }
}

/// The buckets the applied policies charge: every limit of each; the enforced policies
/// pay together, each shadow policy on its own.
pub fn charges<'a>(applied: &[Applied<'a>], key_prefix: &str) -> Vec<LimitCharge<'a>> {
    let mut charges = Vec::with_capacity(applied.iter().map(|a| a.limits.len()).sum());
    let mut shadow_policies = 0;
    for applied in applied {
        let group = match applied.policy.mode {
            Mode::Enforce => Group::Enforced,
            Mode::Shadow => {
                shadow_policies += 1;
                Group::Shadow(shadow_policies)
            }
        };
        let key = applied.policy.bucket_key(&applied.key, key_prefix);
        for limit in applied.limits {
            charges.push(LimitCharge {
                name: LimitName {
                    policy: &applied.policy.name,
                    limit: &limit.name,
                },
                key: key.clone(),
                field: Policy::bucket_field(limit),
                charge: Charge {
                    limit: limit.limit,
                    cost: applied.cost,
                    group,
                },
            });
        }
    }
    charges
}

/// A request's headers as the policies read them.
pub struct Headers<'a>(pub &'a HeaderMap);

impl HeaderLookup for Headers<'_> {
    fn header(&self, lowercase_name: &str) -> Option<&[u8]> {
        self.0.get(lowercase_name).map(|value| value.as_bytes())
    }
}

/// The bucket this request is charged to, from its TCP peer and, through trusted
/// proxies only, its forwarding headers.
pub fn client_key(req: &HttpRequest, rules: &IdentityRules) -> Option<ClientKey> {
    let peer: IpAddr = req.peer_addr()?.ip();
    let headers = req.headers();
    let forwarded = ForwardedHeaders {
        forwarded_for: headers
            .get_all("x-forwarded-for")
            .map(|value| value.as_bytes())
            .collect(),
        real_ip: headers.get("x-real-ip").map(|value| value.as_bytes()),
    };
    Some(rules.client_key(peer, &forwarded))
}
