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
//! - [`socket`]: the Unix socket beside (or instead of) the TCP port (`UNIX_SOCKET`), and
//!   which requests came through it.

pub mod admin_auth;
pub mod check;
pub mod decide;
pub mod headers;
pub mod policies;
pub mod problem;
pub mod reply;
pub mod routes;
pub mod socket;

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{Service, ServiceResponse};
use actix_web::middleware::{Condition, DefaultHeaders, Logger};
use actix_web::{App, HttpServer, guard, web};

use crate::metrics::Metrics;
use admin_auth::AdminAuth;
use routes::AppState;

/// The running server, and what stops it from elsewhere.
pub use actix_web::dev::{Server, ServerHandle};

/// What the server listens on: at least one of the two.
pub struct Listeners {
    pub tcp: Option<TcpListener>,
    pub unix: Option<UnixListener>,
}

/// How the HTTP server runs, beside what it serves.
pub struct ServeSettings {
    /// `ACCESS_LOG`: one line per request.
    pub access_log: bool,
    /// How long in-flight requests may take after SIGTERM/SIGINT.
    pub shutdown_timeout: Duration,
    /// Worker threads; `None` is one per CPU.
    pub workers: Option<usize>,
}

/// Serves every route on `listeners`: each answer carries `X-Instance` and is counted in
/// the metrics by its route.
pub fn serve(
    listeners: Listeners,
    state: AppState,
    admin: AdminAuth,
    settings: ServeSettings,
) -> std::io::Result<Server> {
    let instance = state.instance.clone();
    let metrics = state.metrics.clone();
    let (state, admin) = (web::Data::new(state), web::Data::new(admin));
    let access_log = settings.access_log;
    let mut server = HttpServer::new(move || {
        let metrics = metrics.clone();
        App::new()
            .app_data(state.clone())
            .app_data(admin.clone())
            .wrap(Condition::new(
                access_log,
                Logger::new("%a \"%r\" %s %b %Dms"),
            ))
            .wrap(DefaultHeaders::new().add(("X-Instance", instance.clone())))
            .wrap_fn(move |req, service| {
                let started = Instant::now();
                let response = service.call(req);
                let metrics = metrics.clone();
                async move { Ok(record(&metrics, started, response.await?)) }
            })
            .configure(configure)
    })
    .on_connect(socket::mark_connection)
    .shutdown_timeout(settings.shutdown_timeout.as_secs());
    if let Some(workers) = settings.workers {
        server = server.workers(workers);
    }
    if let Some(tcp) = listeners.tcp {
        server = server.listen(tcp)?;
    }
    if let Some(unix) = listeners.unix {
        server = server.listen_uds(unix)?;
    }
    Ok(server.run())
}

/// A route's name in metrics: attached to its resource, so the label is the route actix
/// matched (`/limited%5Fendpoint` counts as `/limited_endpoint`), from this one table.
#[derive(Debug, Clone, Copy)]
struct RouteLabel(&'static str);

/// Every route. Anything else is a 404; a known path with another method a 405.
pub fn configure(config: &mut web::ServiceConfig) {
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
        .service(endpoint("/", get_or_head().to(routes::index)))
        .service(endpoint("/health", get_or_head().to(routes::health)))
        .service(endpoint("/ready", get_or_head().to(routes::ready)))
        .service(endpoint("/metrics", get_or_head().to(routes::metrics)))
        .service(endpoint(
            "/limited_endpoint",
            get_or_head().to(routes::limited_endpoint),
        ))
        .service(endpoint("/v1/policies", get_or_head().to(policies::list)))
        .service(endpoint("/v1/explain", get_or_head().to(policies::explain)))
        .service(
            web::resource("/v1/decide")
                .app_data(RouteLabel("/v1/decide"))
                .route(web::post().to(decide::decide))
                .default_service(web::to(|| problem::not_allowed("POST"))),
        )
        .service(buckets("/v1/buckets/{policy}"))
        .service(buckets("/v1/buckets/{policy}/{key}"))
        .default_service(web::to(problem::not_found));
}

fn get_or_head() -> actix_web::Route {
    web::route().guard(guard::Any(guard::Get()).or(guard::Head()))
}

/// The bucket API at `path`; `{key}` may be absent from it (composite and `global` keys).
fn buckets(path: &'static str) -> actix_web::Resource {
    web::resource(path)
        .app_data(RouteLabel(path))
        .route(get_or_head().to(decide::bucket))
        .route(web::delete().to(decide::bucket))
        .default_service(web::to(|| problem::not_allowed("GET, HEAD, DELETE")))
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
