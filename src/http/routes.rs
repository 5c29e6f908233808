//! The endpoints and the state they share.

use std::sync::Arc;

use actix_web::http::header::{
    CACHE_CONTROL, CONTENT_TYPE, ContentType, HOST, HeaderMap, HeaderValue,
};
use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::json;

use super::headers::HeaderMode;
use super::problem::PROBLEM_JSON;
use super::reply::{Ending, Reply};
use crate::identity::{ClientKey, ForwardedHeaders, IdentityRules};
use crate::limiter::{HeaderLookup, Limiter, RequestView};
use crate::metrics::Metrics;

pub struct AppState {
    pub instance: String,
    /// Shared with the gRPC front, so both decide through one deny cache and fallback.
    pub limiter: Arc<Limiter>,
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
        limiter: Arc<Limiter>,
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
            limiter,
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
    let checked = state.limiter.check_ready().await;
    state.metrics.ready(checked.is_ok());
    match checked {
        Ok(()) => HttpResponse::Ok().json(json!({"status": "ready"})),
        Err(reason) => HttpResponse::ServiceUnavailable()
            .json(json!({"status": "unavailable", "reason": reason.to_string()})),
    }
}

/// `GET /metrics`: Prometheus text format. Readiness is checked first (one store round
/// trip, bounded by `REDIS_TIMEOUT_MS`), so `ratelimit_ready` is as fresh as the scrape
/// even where nothing probes `/ready`.
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let ready = state.limiter.check_ready().await.is_ok();
    state.metrics.ready(ready);
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
    let reply = decide(&req, &state, target).await;
    let mut response = HttpResponse::build(reply.ending.status());
    for header in reply.headers {
        response.insert_header(header);
    }
    match reply.ending {
        Ending::Admitted => response
            .insert_header((CACHE_CONTROL, HeaderValue::from_static("no-store")))
            .content_type(ContentType::json())
            .body(state.admitted_body.clone()),
        Ending::Limited(problem) | Ending::Unavailable(problem) | Ending::Refused(problem) => {
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

/// Decides `target` under the policies in force, as the limiter's view of it: the client
/// from the peer and, through trusted proxies only, the forwarding headers.
pub async fn decide(req: &HttpRequest, state: &AppState, target: Target<'_>) -> Reply {
    let Some(client) = client_key(req, &state.identity) else {
        return Reply::refused("the client address is unknown");
    };
    let headers = Headers(req.headers());
    let view = RequestView {
        method: target.method,
        path: target.path,
        host: target.host,
        headers: &headers,
        client,
    };
    let policies = state.limiter.policies();
    match state.limiter.decide_request(&policies, &view).await {
        Ok(verdict) => Reply::of(&verdict, state.headers),
        Err(rejection) => Reply::refused(&rejection.to_string()),
    }
}

/// A request's headers as the policies read them.
pub struct Headers<'a>(pub &'a HeaderMap);

impl HeaderLookup for Headers<'_> {
    fn header(&self, lowercase_name: &str) -> Option<&[u8]> {
        self.0.get(lowercase_name).map(|value| value.as_bytes())
    }
}

/// The bucket this request is charged to, from its peer and, through trusted proxies
/// only (the socket's peer among them), its forwarding headers.
pub fn client_key(req: &HttpRequest, rules: &IdentityRules) -> Option<ClientKey> {
    let peer = super::socket::peer(req)?;
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
