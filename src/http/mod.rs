//! The HTTP edge: the route table, the quota headers, and the one problem shape of every
//! error answer.
//!
//! - [`routes`]: the handlers and the state they share; each decision is the limiter's.
//! - [`reply`]: a verdict as statuses, headers and problem bodies.
//! - [`headers`]: `RateLimit`/`RateLimit-Policy` and the legacy `X-RateLimit-*`.
//! - [`problem`]: `application/problem+json` for every error answer.
//! - [`policies`]: `/v1/policies` and `/v1/explain`, what the policies are and would do.
//! - [`decide`]: the decision API for applications, `POST /v1/decide` (a policy and a
//!   key named by the caller, decided as a request with that key would be), and the
//!   bucket API, `GET` (a read: spends and writes nothing) and `DELETE` (a reset) of
//!   `/v1/buckets/{policy}/{key}` (a one-part key) or `/v1/buckets/{policy}?key=…&key=…`
//!   (a composite key, one `key` per part in order; no `key` for a policy keyed
//!   `global`).
//! - [`admin_auth`]: who may call those three: the `ADMIN_TOKEN` bearer token when it is
//!   set, else local callers only (a loopback peer, not forwarded for another client).
//! - [`check`]: `/v1/check`, the decision Nginx's `auth_request` asks for (the gateway).

pub mod admin_auth;
pub mod check;
pub mod decide;
pub mod headers;
pub mod policies;
pub mod problem;
pub mod reply;
pub mod routes;

use std::time::Instant;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::ServiceResponse;
use actix_web::{guard, web};

use crate::metrics::Metrics;

/// A route's name in metrics: attached to its resource, so the label is the route actix
/// matched (`/limited%5Fendpoint` counts as `/limited_endpoint`), from this one table.
#[derive(Debug, Clone, Copy)]
struct RouteLabel(&'static str);

/// Every route. Anything else is a 404; a known path with another method a 405.
pub fn configure(config: &mut web::ServiceConfig) {
    let get = || web::route().guard(guard::Any(guard::Get()).or(guard::Head()));
    let endpoint = |path: &'static str, handler: actix_web::Route| {
        web::resource(path)
            .app_data(RouteLabel(path))
            .route(handler)
            .default_service(web::to(problem::method_not_allowed))
    };
    config
        // First: the gateway asks about every request, and routes are tried in order; the
        // patterns with segments below are regexes that a static path need not run.
        .service(endpoint("/v1/check", web::route().to(check::check)))
        .service(endpoint("/", get().to(routes::index)))
        .service(endpoint("/health", get().to(routes::health)))
        .service(endpoint("/ready", get().to(routes::ready)))
        .service(endpoint("/metrics", get().to(routes::metrics)))
        .service(endpoint(
            "/limited_endpoint",
            get().to(routes::limited_endpoint),
        ))
        .service(endpoint("/v1/policies", get().to(policies::list)))
        .service(endpoint("/v1/explain", get().to(policies::explain)))
        .service(
            web::resource("/v1/decide")
                .app_data(RouteLabel("/v1/decide"))
                .route(web::post().to(decide::decide))
                .default_service(web::to(|| problem::not_allowed("POST"))),
        )
        .service(
            web::resource("/v1/buckets/{policy}")
                .app_data(RouteLabel("/v1/buckets/{policy}"))
                .route(get().to(decide::show_bucket))
                .route(web::delete().to(decide::reset_bucket))
                .default_service(web::to(|| problem::not_allowed("GET, HEAD, DELETE"))),
        )
        .service(
            web::resource("/v1/buckets/{policy}/{key}")
                .app_data(RouteLabel("/v1/buckets/{policy}/{key}"))
                .route(get().to(decide::show_bucket_of))
                .route(web::delete().to(decide::reset_bucket_of))
                .default_service(web::to(|| problem::not_allowed("GET, HEAD, DELETE"))),
        )
        .default_service(web::to(problem::not_found));
}

/// Counts a finished request by the route it matched and its status, and times it from
/// `started`.
pub fn record<B: MessageBody + 'static>(
    metrics: &Metrics,
    started: Instant,
    response: ServiceResponse<B>,
) -> ServiceResponse<BoxBody> {
    let route = response
        .request()
        .app_data::<RouteLabel>()
        .map_or("other", |label| label.0);
    metrics.http_request(route, response.status().as_u16(), started.elapsed());
    response.map_into_boxed_body()
}
