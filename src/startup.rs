//! The composition root: builds the store and its resolver from the settings, binds the
//! listener, and wires the routes.

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{Server, ServerHandle, ServiceRequest, ServiceResponse};
use actix_web::middleware::{Condition, DefaultHeaders, Logger};
use actix_web::{App, HttpServer, guard, web};
use thiserror::Error;

use crate::config::{Settings, StoreSettings};
use crate::http::{error, routes};
use crate::rate_limiter::{InstanceCount, RateLimiter};
use crate::store::Store;
use crate::store::memory::MemoryStore;
use crate::store::redis::{MasterSlot, RedisStore, node_info, with_password};
use crate::store::sentinel::{Discovery, Resolver, ResolverSettings};

#[derive(Debug, Error)]
pub enum StartupError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("REDIS_URL is not usable: {0}")]
    RedisUrl(String),
    #[error("cannot start the HTTP server: {0}")]
    Server(std::io::Error),
}

/// A built service: listening, not yet serving.
pub struct Application {
    port: u16,
    server: Server,
    resolver: Option<Resolver>,
}

impl Application {
    pub fn build(settings: Settings) -> Result<Self, StartupError> {
        let addr = (settings.host, settings.port);
        let listener = TcpListener::bind(addr).map_err(|source| StartupError::Bind {
            addr: format!("{}:{}", settings.host, settings.port),
            source,
        })?;
        let port = listener.local_addr().map_err(StartupError::Server)?.port();

        crate::metrics::set_enabled(settings.metrics);
        let (store, shared, instances, resolver) = build_store(&settings)?;
        let limiter = RateLimiter::new(
            store,
            shared,
            settings.policy,
            settings.fail_mode,
            instances,
            settings.deny_cache_size,
            MemoryStore::new(settings.memory_store_max_buckets),
        );
        let state = web::Data::new(routes::AppState::new(
            settings.instance_name.clone(),
            limiter,
            settings.identity.clone(),
            settings.headers,
        ));
        let instance = settings.instance_name.clone();
        let access_log = settings.access_log;
        let mut server = HttpServer::new(move || {
            let get = || web::route().guard(guard::Any(guard::Get()).or(guard::Head()));
            let endpoint = |path: &str, handler| {
                web::resource(path)
                    .route(handler)
                    .default_service(web::to(error::method_not_allowed))
            };
            App::new()
                .app_data(state.clone())
                .wrap(Condition::new(
                    access_log,
                    Logger::new("%a \"%r\" %s %b %Dms"),
                ))
                .wrap(DefaultHeaders::new().add(("X-Instance", instance.clone())))
                .wrap_fn(|req: ServiceRequest, srv| {
                    let started = Instant::now();
                    let route = route_label(req.path());
                    let response = actix_web::dev::Service::call(srv, req);
                    async move {
                        let response: ServiceResponse<_> = response.await?;
                        crate::metrics::http_request(
                            route,
                            response.status().as_u16(),
                            started.elapsed(),
                        );
                        Ok::<_, actix_web::Error>(response.map_body(|_, body| body.boxed()))
                    }
                })
                .service(endpoint("/", get().to(routes::index)))
                .service(endpoint("/health", get().to(routes::health)))
                .service(endpoint("/ready", get().to(routes::ready)))
                .service(endpoint("/metrics", get().to(routes::metrics)))
                .service(endpoint(
                    "/limited_endpoint",
                    get().to(routes::limited_endpoint),
                ))
                .default_service(web::to(error::not_found))
        })
        .shutdown_timeout(settings.shutdown_timeout.as_secs());
        if let Some(workers) = settings.workers {
            server = server.workers(workers);
        }
        let server = server.listen(listener).map_err(StartupError::Server)?.run();
        Ok(Self {
            port,
            server,
            resolver,
        })
    }

    /// The port actually bound (useful with `PORT=0`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server from another task or thread.
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Serves until stopped (SIGTERM, SIGINT or [`ServerHandle::stop`]), letting in-flight
    /// requests finish, then stops the resolver.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let result = self.server.await;
        if let Some(resolver) = self.resolver {
            // Joining may wait out one Redis timeout; keep it off the event loop.
            let _ = web::block(move || resolver.stop()).await;
        }
        result
    }
}

/// Routes as metric labels: a fixed set, so no client can inflate the cardinality.
fn route_label(path: &str) -> &'static str {
    match path {
        "/" => "/",
        "/health" => "/health",
        "/ready" => "/ready",
        "/metrics" => "/metrics",
        "/limited_endpoint" => "/limited_endpoint",
        _ => "other",
    }
}

type BuiltStore = (Arc<dyn Store>, bool, InstanceCount, Option<Resolver>);

fn build_store(settings: &Settings) -> Result<BuiltStore, StartupError> {
    let fixed_instances = settings.fallback_instances;
    let discovery = match &settings.store {
        StoreSettings::Memory => {
            log::warn!(
                "no REDIS_URL or SENTINEL_HOSTS: buckets are kept in this process, so limits are per instance, not distributed"
            );
            let count: InstanceCount = Arc::new(move || fixed_instances.unwrap_or(1));
            let store = MemoryStore::new(settings.memory_store_max_buckets);
            return Ok((Arc::new(store), false, count, None));
        }
        StoreSettings::Redis { url } => {
            let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
                .map_err(|err| StartupError::RedisUrl(err.to_string()))?;
            Discovery::Fixed(with_password(info, settings.redis.password.as_deref()))
        }
        StoreSettings::Sentinel {
            hosts,
            master_name,
            sentinel_password,
        } => Discovery::Sentinels {
            sentinels: hosts
                .iter()
                .map(|(host, port)| node_info(host, *port, sentinel_password.as_deref()))
                .collect(),
            master_name: master_name.clone(),
            node_password: settings.redis.password.clone(),
        },
    };
    let slot = Arc::new(MasterSlot::default());
    let resolver = Resolver::start(
        ResolverSettings {
            discovery,
            mode: settings.redis.mode,
            pool_size: settings.redis.pool_size,
            timeout: settings.redis.timeout,
            poll: settings.redis.poll,
            instance_name: settings.instance_name.clone(),
            key_prefix: settings.redis.key_prefix.clone(),
        },
        slot.clone(),
    );
    let store = RedisStore::new(
        slot.clone(),
        settings.redis.mode,
        settings.redis.key_prefix.clone(),
        settings.redis.timeout,
    );
    let count: InstanceCount = Arc::new(move || {
        fixed_instances.unwrap_or_else(|| slot.live_instances.load(Ordering::Relaxed))
    });
    Ok((Arc::new(store), true, count, Some(resolver)))
}
