//! The composition root: turns the settings into the store, its discovery, the decider and
//! the metrics handle, binds the listeners, and wires the routes and the gRPC front.
//!
//! The gRPC front (`GRPC_PORT`) runs on a multi-thread tokio runtime of its own, on its
//! own thread, rather than on actix's: actix gives each HTTP worker a single-threaded
//! runtime and keeps the main one for itself, so tonic there would serve every Envoy call
//! on one thread. A decision is a `Send` future over a shared [`Limiter`], so both fronts
//! decide through one deny cache, one fallback and one store; a worker of either runtime
//! keeps its own multiplexed Redis connection.

use std::net::TcpListener;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use arc_swap::ArcSwap;
use secrecy::{ExposeSecret, SecretString};
use thiserror::Error;

use crate::grpc::RlsService;
use crate::http::admin_auth::AdminAuth;
use crate::http::routes::AppState;
use crate::http::socket::{SocketError, SocketFile};
use crate::http::{Listeners, ServeSettings, Server, ServerHandle};
use crate::limiter::{
    Buckets, Decider, DeciderSettings, InstanceCount, Limiter, Source, StoreError,
};
use crate::metrics::{Metrics, Watched};
use crate::policy::PolicySet;
use crate::reload::{Observe, Reloaded, WatchSettings, Watcher, read_text};
use crate::rls::RuleSet;
use crate::settings::{
    MasterSettings, NodeAccess, PolicySource, RlsSource, Settings, StoreSettings,
};
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
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("REDIS_CLUSTER_NODES is not usable: {0}")]
    ClusterNodes(String),
    #[error("cannot start the {0} thread: {1}")]
    Thread(&'static str, std::io::Error),
    #[error("cannot start the HTTP server: {0}")]
    Server(std::io::Error),
    #[error("cannot start the gRPC server: {0}")]
    Grpc(std::io::Error),
}

/// A built service: listening, not yet serving.
pub struct Application {
    /// `None` with `PORT=off`.
    port: Option<u16>,
    /// Removed once the server has stopped; `None` without `UNIX_SOCKET`.
    socket: Option<SocketFile>,
    server: Server,
    /// Envoy's rate-limit service; `None` without `GRPC_PORT`.
    grpc: Option<GrpcFront>,
    follower: StoreFollower,
    /// Keeps the policies current while the service runs; `None` without a policy file.
    watcher: Option<Watcher>,
    /// Keeps the rate-limit service's rules current; `None` without `RLS_CONFIG`.
    rules_watcher: Option<Watcher>,
}

impl Application {
    /// Builds the service. With Redis configured it waits for discovery's first round
    /// (done on discovery's own thread), so a service whose Redis is up starts ready.
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        let tcp = settings
            .port
            .map(|port| bind(&settings, port))
            .transpose()?;
        let port = match &tcp {
            Some(tcp) => Some(tcp.local_addr().map_err(StartupError::Server)?.port()),
            None => None,
        };
        let (unix, socket) = match &settings.unix_socket {
            Some(socket) => {
                let (listener, file) = crate::http::socket::bind(socket)?;
                (Some(listener), Some(file))
            }
            None => (None, None),
        };
        let grpc_listener = match settings.grpc_port {
            Some(grpc_port) => Some(bind(&settings, grpc_port)?),
            None => None,
        };

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
        metrics.version(Watched::Policies, settings.policies.version());
        let watcher = watch_policies(&settings, &policies, &metrics)?;
        let rules = Arc::new(ArcSwap::new(settings.rules.clone()));
        let rules_watcher = watch_rules(&settings, &rules, &metrics)?;
        let limiter = Arc::new(Limiter::new(
            policies,
            rules,
            settings.key_prefix.clone(),
            decider,
        ));
        let grpc = match grpc_listener {
            Some(listener) => Some(GrpcFront::start(
                listener,
                limiter.clone(),
                metrics.clone(),
                &settings,
            )?),
            None => None,
        };
        let state = AppState::new(
            settings.instance_name.clone(),
            limiter,
            settings.identity.clone(),
            settings.headers,
            metrics.clone(),
        );
        let admin = AdminAuth::new(settings.admin_token.as_ref(), settings.identity.clone());
        let server = crate::http::serve(
            Listeners { tcp, unix },
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
            socket,
            server,
            grpc,
            follower,
            watcher,
            rules_watcher,
        })
    }

    /// The port actually bound (useful with `PORT=0`); `None` with `PORT=off`.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// The socket served on; `None` without `UNIX_SOCKET`.
    pub fn unix_socket(&self) -> Option<&std::path::Path> {
        self.socket.as_ref().map(SocketFile::path)
    }

    /// The gRPC port actually bound (useful with `GRPC_PORT=0`); `None` without one.
    pub fn grpc_port(&self) -> Option<u16> {
        self.grpc.as_ref().map(|grpc| grpc.port)
    }

    /// Stops the server from another task or thread.
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Serves until stopped (SIGTERM, SIGINT or [`ServerHandle::stop`]), letting in-flight
    /// requests and calls finish, then stops discovery. SIGTERM and SIGINT stop both
    /// servers at once; a stop through the handle stops the gRPC server once the HTTP one
    /// has finished.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let result = self.server.await;
        if let Some(grpc) = self.grpc {
            grpc.stop();
            // Joining waits for the calls in flight (at most SHUTDOWN_TIMEOUT_S); keep it
            // off the event loop.
            let _ = tokio::task::spawn_blocking(move || grpc.join()).await;
        }
        drop(self.socket);
        drop(self.watcher);
        drop(self.rules_watcher);
        self.follower.stop().await;
        result
    }
}

/// A listener on `HOST` and `port`.
fn bind(settings: &Settings, port: u16) -> Result<TcpListener, StartupError> {
    TcpListener::bind((settings.host, port)).map_err(|source| StartupError::Bind {
        addr: format!("{}:{port}", settings.host),
        source,
    })
}

/// The gRPC front: its server on a multi-thread runtime on a thread of its own, and a
/// thread that turns SIGTERM and SIGINT into its graceful stop (actix stops the HTTP
/// server on the same signals by itself). Dropped, it stops the server without waiting.
struct GrpcFront {
    port: u16,
    /// `true` stops the server: calls in flight may take `SHUTDOWN_TIMEOUT_S` more.
    stop: Arc<tokio::sync::watch::Sender<bool>>,
    /// Taken by [`GrpcFront::join`].
    server: Option<JoinHandle<()>>,
    signals: signal_hook::iterator::Handle,
}

impl GrpcFront {
    fn start(
        listener: TcpListener,
        limiter: Arc<Limiter>,
        metrics: Metrics,
        settings: &Settings,
    ) -> Result<Self, StartupError> {
        let port = listener.local_addr().map_err(StartupError::Grpc)?.port();
        listener.set_nonblocking(true).map_err(StartupError::Grpc)?;
        let workers = settings.workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("grpc-worker")
            .enable_all()
            .build()
            .map_err(StartupError::Grpc)?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let stop = Arc::new(stop);
        let on_signal = stop.clone();
        let stop_signals = [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT];
        // The first one stops the server; the thread has nothing more to do.
        let handle = crate::reload::on_signals(&stop_signals, "grpc-signals", move || {
            on_signal.send_replace(true);
            false
        })
        .map_err(|err| StartupError::Thread("grpc-signals", err))?;
        let mut front = Self {
            port,
            stop,
            server: None,
            signals: handle,
        };
        let drain = settings.shutdown_timeout;
        let service = RlsService::new(limiter, metrics, settings.rls_headers);
        let server = std::thread::Builder::new()
            .name("grpc".into())
            .spawn(move || serve_grpc(runtime, listener, service, stopped, drain))
            .map_err(|err| StartupError::Thread("grpc", err))?;
        front.server = Some(server);
        Ok(front)
    }

    fn stop(&self) {
        self.stop.send_replace(true);
        self.signals.close();
    }

    /// Waits for the server to stop (at most `SHUTDOWN_TIMEOUT_S` once stopped).
    fn join(mut self) {
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
    }
}

impl Drop for GrpcFront {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs the gRPC server on `runtime` until `stopped` says so, then lets its calls finish
/// for at most `drain` (a health `Watch` never does by itself).
fn serve_grpc(
    runtime: tokio::runtime::Runtime,
    listener: TcpListener,
    service: RlsService,
    stopped: tokio::sync::watch::Receiver<bool>,
    drain: Duration,
) {
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(err) => {
                log::error!("the gRPC server cannot use its listener: {err}");
                return;
            }
        };
        let mut until_stopped = stopped.clone();
        let shutdown = async move {
            let _ = until_stopped.wait_for(|stop| *stop).await;
        };
        let mut drain_from = stopped;
        let drained = async move {
            let _ = drain_from.wait_for(|stop| *stop).await;
            tokio::time::sleep(drain).await;
        };
        tokio::select! {
            served = crate::grpc::serve(listener, service, shutdown) => {
                if let Err(err) = served {
                    log::error!("{err}");
                }
            }
            () = drained => {
                log::warn!(
                    "gRPC calls still open {} s after the stop (SHUTDOWN_TIMEOUT_S); closing them",
                    drain.as_secs()
                );
            }
        }
    });
    // A blocking Redis call still running is bounded by REDIS_TIMEOUT_MS.
    runtime.shutdown_timeout(Duration::from_secs(1));
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
    metrics.declare_reloads(Watched::Policies, &Reloaded::ALL.map(Reloaded::as_str));
    let parser = file.clone();
    let watcher = Watcher::start(
        WatchSettings {
            name: "policies",
            thread: "policy-reload",
            path: file.path.clone(),
            poll: file.poll,
            read: read_text(file.path.clone()),
            parse: Box::new(move |text: &String| parser.parse(text)),
            observe: report_reloads(metrics, Watched::Policies, "policies", PolicySet::version),
        },
        active.clone(),
        text.clone(),
    )
    .map_err(|err| StartupError::Thread("policy-reload", err))?;
    Ok(Some(watcher))
}

/// What a watcher reports after each reload attempt: counted by result, and the version
/// of the set it made active.
fn report_reloads<T: 'static>(
    metrics: &Metrics,
    watched: Watched,
    name: &'static str,
    version: fn(&T) -> &str,
) -> Observe<T> {
    let metrics = metrics.clone();
    Box::new(move |result, set: Option<&T>| {
        metrics.reload(watched, result.as_str());
        if let Some(set) = set {
            metrics.version(watched, version(set));
            log::info!("{name} {} are active", version(set));
        }
    })
}

/// Starts watching `RLS_CONFIG`, when there is one: a valid change of its files replaces
/// `active`. The files read at start are the watcher's baseline.
fn watch_rules(
    settings: &Settings,
    active: &Arc<ArcSwap<RuleSet>>,
    metrics: &Metrics,
) -> Result<Option<Watcher>, StartupError> {
    metrics.version(Watched::Rules, settings.rules.version());
    let RlsSource::Config { config, files } = &settings.rls_source else {
        if settings.grpc_port.is_some() {
            log::info!(
                "no RLS_CONFIG: every domain is unknown, so every ShouldRateLimit is answered OK"
            );
        }
        return Ok(None);
    };
    metrics.declare_reloads(Watched::Rules, &Reloaded::ALL.map(Reloaded::as_str));
    let (reader, parser) = (config.clone(), config.clone());
    let watcher = Watcher::start(
        WatchSettings {
            name: "rate-limit rules",
            thread: "rls-reload",
            path: config.path.clone(),
            poll: config.poll,
            read: Box::new(move || reader.read()),
            parse: Box::new(move |files: &Vec<(String, String)>| parser.parse(files)),
            observe: report_reloads(
                metrics,
                Watched::Rules,
                "rate-limit rules",
                RuleSet::version,
            ),
        },
        active.clone(),
        files.clone(),
    )
    .map_err(|err| StartupError::Thread("rls-reload", err))?;
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
        StoreSettings::Cluster {
            nodes,
            access,
            batch_max,
        } => {
            let login = login(access);
            let cluster = ClusterSettings {
                nodes: nodes
                    .iter()
                    .map(|(host, port)| node_info(host, *port, &login))
                    .collect(),
                timeout: access.timeout,
                batch_max: *batch_max,
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
            sentinel_access,
            data_nodes,
            master,
        } => {
            let sentinel_login = login_as(
                sentinel_access.username.as_ref(),
                sentinel_access.password.as_ref(),
            );
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
    login_as(access.username.as_ref(), access.password.as_ref())
}

fn login_as(username: Option<&String>, password: Option<&SecretString>) -> Login {
    Login {
        username: username.cloned(),
        password: password.map(|p| p.expose_secret().to_string()),
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
