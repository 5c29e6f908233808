//! The endpoints and the state they share.

use std::net::IpAddr;

use actix_web::http::StatusCode;
use actix_web::http::header::{CACHE_CONTROL, ContentType, HeaderValue, RETRY_AFTER};
use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::json;

use super::headers::{
    HeaderMode, X_RATELIMIT_SOURCE, ceil_millis, item_name, quota_headers, retry_after_secs,
};
use super::problem::Problem;
use crate::bucket::{Charge, Limit};
use crate::decision::{Decider, LimitCharge, LimitName, Verdict};
use crate::identity::{ClientKey, ForwardedHeaders, IdentityRules};
use crate::metrics::Metrics;

/// The one policy of a service without a policy file: `RATE_LIMIT` per `TIME_WINDOW`
/// (burst `BURST`) per client IP on `/limited_endpoint`.
pub struct DefaultPolicy {
    pub limit: Limit,
    pub key_prefix: String,
}

const DEFAULT: LimitName<'static> = LimitName {
    policy: "default",
    limit: "default",
};

impl DefaultPolicy {
    fn charges(&self, client: &ClientKey) -> Vec<LimitCharge<'static>> {
        let limit = &self.limit;
        vec![LimitCharge {
            name: DEFAULT,
            key: format!(
                "{}:default:default:{}-{}-{}:{{{client}}}",
                self.key_prefix,
                limit.rate_limit(),
                limit.window_secs(),
                limit.capacity()
            ),
            charge: Charge::one(*limit),
        }]
    }
}

pub struct AppState {
    pub instance: String,
    pub policy: DefaultPolicy,
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
        policy: DefaultPolicy,
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
            policy,
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

/// `GET /limited_endpoint`: one token per request.
pub async fn limited_endpoint(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let Some(key) = client_key(&req, &state.identity) else {
        return Problem::new(StatusCode::BAD_REQUEST)
            .detail("the client address is unknown")
            .response();
    };
    let verdict = state.decider.decide(state.policy.charges(&key)).await;
    let mut response = HttpResponse::build(StatusCode::OK);
    if let Some(source) = verdict.source() {
        response.insert_header((
            X_RATELIMIT_SOURCE,
            HeaderValue::from_static(source.as_str()),
        ));
    }
    for header in quota_headers(state.headers, &verdict) {
        response.insert_header(header);
    }
    match verdict {
        Verdict::Decided {
            admitted: false, ..
        } => {
            let retry_after_us = verdict.retry_after_us();
            response.insert_header((RETRY_AFTER, retry_after_secs(retry_after_us)));
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
            Problem::quota_exceeded(&violated, ceil_millis(retry_after_us).max(1)).respond(response)
        }
        Verdict::Unlimited | Verdict::Decided { .. } | Verdict::Open { .. } => response
            .insert_header((CACHE_CONTROL, HeaderValue::from_static("no-store")))
            .content_type(ContentType::json())
            .body(state.admitted_body.clone()),
        Verdict::Closed { .. } => {
            response.insert_header((RETRY_AFTER, HeaderValue::from_static("1")));
            Problem::new(StatusCode::SERVICE_UNAVAILABLE)
                .detail("the rate-limit store cannot decide and FAIL_MODE=closed")
                .respond(response)
        }
    }
}

/// The bucket this request is charged to, from its TCP peer and, through trusted
/// proxies only, its forwarding headers.
fn client_key(req: &HttpRequest, rules: &IdentityRules) -> Option<ClientKey> {
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
