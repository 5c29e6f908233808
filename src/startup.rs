//! The composition root: turns the settings into the store, its discovery, the decider and
//! the metrics handle, binds the listener, and wires the routes.

use std::net::TcpListener;
use std::sync::Arc;

use arc_swap::ArcSwap;
use secrecy::ExposeSecret;
use thiserror::Error;

use crate::http::admin_auth::AdminAuth;
use crate::http::routes::AppState;
use crate::http::{ServeSettings, Server, ServerHandle};
use crate::limiter::{
    Buckets, Decider, DeciderSettings, InstanceCount, Limiter, Source, StoreError,
};
use crate::metrics::Metrics;
use crate::policy::PolicySet;
use crate::reload::{WatchSettings, Watcher, read_text};
use crate::settings::{MasterSettings, NodeAccess, PolicySource, Settings, StoreSettings};
use crate::store::memory::MemoryStore;
use crate::store::redis::cluster::{ClusterSettings, ClusterStore, ClusterWatch};
use crate::store::redis::discovery::{DataNodes, Discovery, Resolver, ResolverSettings};
use crate::store::redis::registry::InstanceRegistry;
use crate::store::redis::{
    ConnectionSettings, Login, MasterSlot, RedisStore, node_info, with_login,
};

#[derive(Debug, Error)]
pub enum StartupError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("REDIS_CLUSTER_NODES is not usable: {0}")]
    ClusterNodes(String),
    #[error("cannot start the {0} thread: {1}")]
    Thread(&'static str, std::io::Error),
    #[error("cannot start the HTTP server: {0}")]
    Server(std::io::Error),
}

/// A built service: listening, not yet serving.
pub struct Application {
    port: u16,
    server: Server,
    follower: StoreFollower,
    /// Keeps the policies current while the service runs; `None` without a policy file.
    watcher: Option<Watcher>,
}

impl Application {
    /// Builds the service. With Redis configured it waits for discovery's first round
    /// (done on discovery's own thread), so a service whose Redis is up starts ready.
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        let addr = (settings.host, settings.port);
        let listener = TcpListener::bind(addr).map_err(|source| StartupError::Bind {
            addr: format!("{}:{}", settings.host, settings.port),
            source,
        })?;
        let port = listener.local_addr().map_err(StartupError::Server)?.port();

        let metrics = Metrics::new(settings.metrics);
        metrics.read_log_lines_dropped(crate::telemetry::dropped_lines);
        metrics.declare(StoreError::KINDS, &Source::ALL.map(Source::as_str));
        let BuiltStore {
            buckets,
            instances,
            follower,
        } = build_buckets(&settings, &metrics).await?;
        let decider = Decider::new(DeciderSettings {
            buckets,
            fail_mode: settings.fail_mode,
            instances,
            deny_cache_size: settings.deny_cache_size,
            fallback: MemoryStore::new(settings.memory_store_max_buckets),
            metrics: metrics.clone(),
        });
        let policies = Arc::new(ArcSwap::new(settings.policies.clone()));
        metrics.policy_version(settings.policies.version());
        let watcher = watch_policies(&settings, &policies, &metrics)?;
        let state = AppState::new(
            settings.instance_name.clone(),
            Arc::new(Limiter::new(
                policies,
                Arc::new(ArcSwap::new(settings.rules.clone())),
                settings.key_prefix.clone(),
                decider,
            )),
            settings.identity.clone(),
            settings.headers,
            metrics.clone(),
        );
        let admin = AdminAuth::new(settings.admin_token.as_ref(), settings.identity.clone());
        let server = crate::http::serve(
            listener,
            state,
            admin,
            ServeSettings {
                access_log: settings.access_log,
                shutdown_timeout: settings.shutdown_timeout,
                workers: settings.workers,
            },
        )
        .map_err(StartupError::Server)?;
        Ok(Self {
            port,
            server,
            follower,
            watcher,
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
    /// requests finish, then stops discovery.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let result = self.server.await;
        drop(self.watcher);
        self.follower.stop().await;
        result
    }
}

/// Starts watching `POLICY_FILE`, when there is one: a valid change replaces `active`. The
/// text parsed at start is the watcher's baseline, so the file is not parsed again until
/// it changes.
fn watch_policies(
    settings: &Settings,
    active: &Arc<ArcSwap<PolicySet>>,
    metrics: &Metrics,
) -> Result<Option<Watcher>, StartupError> {
    let PolicySource::File { file, text } = &settings.policy_source else {
        return Ok(None);
    };
    let parser = file.clone();
    let observed = metrics.clone();
    let watcher = Watcher::start(
        WatchSettings {
            name: "policies",
            path: file.path.clone(),
            poll: file.poll,
            read: read_text(file.path.clone()),
            parse: Box::new(move |text: &String| parser.parse(text)),
            observe: Box::new(move |result, set: Option<&PolicySet>| {
                observed.policy_reload(result.as_str());
                if let Some(set) = set {
                    observed.policy_version(set.version());
                    log::info!("policies {} are active", set.version());
                }
            }),
        },
        active.clone(),
        text.clone(),
    )
    .map_err(|err| StartupError::Thread("policies-reload", err))?;
    Ok(Some(watcher))
}

/// What keeps the store current while the service runs.
enum StoreFollower {
    /// Buckets in this process.
    Nothing,
    /// `REDIS_URL` or `SENTINEL_HOSTS`: finds, confirms and installs the master.
    Resolver(Resolver),
    /// Cluster mode: announces this instance and follows the masters.
    ClusterWatch(ClusterWatch),
}

impl StoreFollower {
    async fn stop(self) {
        match self {
            StoreFollower::Nothing => {}
            StoreFollower::ClusterWatch(watch) => watch.stop(),
            StoreFollower::Resolver(resolver) => {
                // Joining may wait out one Redis timeout; keep it off the event loop.
                let _ = tokio::task::spawn_blocking(move || resolver.stop()).await;
            }
        }
    }
}

/// The store the decider uses, how many instances share the limits, and what follows the
/// store.
struct BuiltStore {
    buckets: Buckets,
    instances: InstanceCount,
    follower: StoreFollower,
}

async fn build_buckets(settings: &Settings, metrics: &Metrics) -> Result<BuiltStore, StartupError> {
    let fixed_instances = settings.fallback_instances;
    let registry = |every| {
        Arc::new(InstanceRegistry::new(
            &settings.key_prefix,
            &settings.instance_name,
            every,
        ))
    };
    let (discovery, master) = match &settings.store {
        StoreSettings::Memory => {
            log::warn!(
                "no REDIS_URL or SENTINEL_HOSTS: buckets are kept in this process, so limits are per instance, not distributed"
            );
            let store = MemoryStore::new(settings.memory_store_max_buckets);
            return Ok(BuiltStore {
                buckets: Buckets::Local(Arc::new(store)),
                instances: Arc::new(move || fixed_instances.unwrap_or(1)),
                follower: StoreFollower::Nothing,
            });
        }
        StoreSettings::Cluster { nodes, access } => {
            let login = login(access);
            let cluster = ClusterSettings {
                nodes: nodes
                    .iter()
                    .map(|(host, port)| node_info(host, *port, &login))
                    .collect(),
                timeout: access.timeout,
            };
            let registry = registry(crate::store::redis::cluster::WATCH_EVERY);
            return build_cluster(&cluster, registry, metrics, fixed_instances).await;
        }
        StoreSettings::Redis { url, master } => (
            Discovery::Fixed(with_login(url.clone(), &login(&master.access))),
            master,
        ),
        StoreSettings::Sentinel {
            hosts,
            master_name,
            sentinel_password,
            data_nodes,
            master,
        } => {
            let sentinel_login =
                Login::password(sentinel_password.as_ref().map(|p| p.expose_secret()));
            let discovery = Discovery::Sentinels {
                sentinels: hosts
                    .iter()
                    .map(|(host, port)| node_info(host, *port, &sentinel_login))
                    .collect(),
                master_name: master_name.clone(),
                node_login: login(&master.access),
                data_nodes: data_nodes.clone().map(DataNodes::new),
            };
            (discovery, master)
        }
    };
    let MasterSettings {
        access,
        connections,
        poll,
    } = master;
    let slot = Arc::new(MasterSlot::default());
    let registry = registry(*poll);
    let (resolver, first_round) = Resolver::start(
        ResolverSettings {
            discovery,
            connections: ConnectionSettings {
                mode: *connections,
                timeout: access.timeout,
            },
            poll: *poll,
            registry: registry.clone(),
            metrics: metrics.clone(),
        },
        slot.clone(),
    )
    .map_err(|err| StartupError::Thread("discovery", err))?;
    // The round is bounded by the Redis timeouts; a resolver that died early only means
    // starting unready, which discovery's next round mends.
    let _ = first_round.await;
    let store = RedisStore::new(slot, access.timeout);
    Ok(BuiltStore {
        buckets: Buckets::Shared(Arc::new(store)),
        instances: Arc::new(move || fixed_instances.unwrap_or_else(|| registry.live())),
        follower: StoreFollower::Resolver(resolver),
    })
}

/// How the store logs in to a data node.
fn login(access: &NodeAccess) -> Login {
    Login {
        username: access.username.clone(),
        password: access
            .password
            .as_ref()
            .map(|p| p.expose_secret().to_string()),
    }
}

/// The Cluster store, and its watch announcing this instance in `registry`. Waits for the
/// watch's first round (bounded by the Redis timeouts), so the instance count is known.
async fn build_cluster(
    settings: &ClusterSettings,
    registry: Arc<InstanceRegistry>,
    metrics: &Metrics,
    fixed_instances: Option<u64>,
) -> Result<BuiltStore, StartupError> {
    let store = ClusterStore::new(settings, metrics.clone())
        .map_err(|err| StartupError::ClusterNodes(err.to_string()))?;
    let (watch, first_round) = store.watch(registry.clone());
    let _ = first_round.await;
    Ok(BuiltStore {
        buckets: Buckets::Shared(Arc::new(store)),
        instances: Arc::new(move || fixed_instances.unwrap_or_else(|| registry.live())),
        follower: StoreFollower::ClusterWatch(watch),
    })
}
