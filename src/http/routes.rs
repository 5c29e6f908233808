//! The endpoints and the state they share.

use std::net::IpAddr;

use actix_web::http::StatusCode;
use actix_web::http::header::{CACHE_CONTROL, CONTENT_TYPE, ContentType, HeaderValue, RETRY_AFTER};
use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse, HttpResponseBuilder, web};
use serde_json::json;

use super::error::{PROBLEM_JSON, quota_exceeded_body};
use super::headers::{
    POLICY_NAME, X_RATELIMIT_SOURCE, ceil_millis, quota_headers, retry_after_secs,
};
use crate::config::HeaderMode;
use crate::identity::{ClientKey, ForwardedHeaders, IdentityRules};
use crate::rate_limiter::{RateLimiter, Source, Verdict};

pub struct AppState {
    pub instance: String,
    pub limiter: RateLimiter,
    pub identity: IdentityRules,
    pub headers: HeaderMode,
    /// The bodies that never change, rendered once: they are on the hot path.
    index_body: Bytes,
    admitted_body: Bytes,
}

impl AppState {
    pub fn new(
        instance: String,
        limiter: RateLimiter,
        identity: IdentityRules,
        headers: HeaderMode,
    ) -> Self {
        let render = |message: &str| {
            Bytes::from(json!({"message": message, "instance": instance}).to_string())
        };
        Self {
            index_body: render("Hello World"),
            admitted_body: render("This is a limited endpoint"),
            instance,
            limiter,
            identity,
            headers,
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
    let checked = state.limiter.store().check_ready().await;
    match checked {
        Ok(()) => HttpResponse::Ok().json(json!({"status": "ready"})),
        Err(reason) => HttpResponse::ServiceUnavailable()
            .json(json!({"status": "unavailable", "reason": reason.to_string()})),
    }
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(crate::metrics::render())
}

/// `GET /limited_endpoint`: one token per request.
pub async fn limited_endpoint(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let Some(key) = client_key(&req, &state.identity) else {
        return HttpResponse::BadRequest()
            .json(json!({"status": 400, "error": "the client address is unknown"}));
    };
    let verdict = state.limiter.check(key).await;
    crate::metrics::decision(verdict.allowed(), verdict.source);
    let mut response = if verdict.source == Source::Closed {
        unavailable()
    } else if verdict.allowed() {
        let mut ok = HttpResponse::Ok();
        ok.insert_header((CACHE_CONTROL, HeaderValue::from_static("no-store")));
        ok
    } else {
        too_many(&verdict)
    };
    response.insert_header((
        X_RATELIMIT_SOURCE,
        HeaderValue::from_static(verdict.source.as_str()),
    ));
    for header in quota_headers(state.headers, &verdict) {
        response.insert_header(header);
    }
    match verdict.source {
        Source::Closed => response.json(json!({
            "type": "about:blank",
            "title": "Service Unavailable",
            "status": 503,
            "detail": "the rate-limit store cannot decide and FAIL_MODE=closed",
        })),
        _ if verdict.allowed() => response
            .content_type(ContentType::json())
            .body(state.admitted_body.clone()),
        _ => {
            let retry_after_us = verdict.decision.map_or(0, |d| d.retry_after_us());
            response.body(quota_exceeded_body(
                POLICY_NAME,
                ceil_millis(retry_after_us).max(1),
            ))
        }
    }
}

fn too_many(verdict: &Verdict) -> HttpResponseBuilder {
    let retry_after_us = verdict.decision.map_or(0, |d| d.retry_after_us());
    let mut response = HttpResponse::TooManyRequests();
    response
        .insert_header((CONTENT_TYPE, PROBLEM_JSON))
        .insert_header((RETRY_AFTER, retry_after_secs(retry_after_us)));
    response
}

fn unavailable() -> HttpResponseBuilder {
    let mut response = HttpResponse::build(StatusCode::SERVICE_UNAVAILABLE);
    response
        .insert_header((CONTENT_TYPE, PROBLEM_JSON))
        .insert_header((RETRY_AFTER, HeaderValue::from_static("1")));
    response
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
