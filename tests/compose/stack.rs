//! A [`Stack`] is one Compose project of `docker/compose.yaml`, brought up with this run's
//! own passwords (written by `scripts/compose-secrets.sh`, as users get theirs) and
//! settings, its host ports chosen by Docker, its containers found by their Compose
//! labels. It goes with `down -v` on `Drop`, after the state at a failure is printed, or
//! on Ctrl-C; only one stack runs at a time (two shared cores).

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, Once, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::process::{docker, docker_ok, repo, run, text, try_run, wait_bounded};

/// The images `scripts/docker-images.sh` builds: the base (Redis, Sentinel, Nginx, curl)
/// stands in for the registry images of `docker/compose.yaml`, and runs the clients.
pub const BASE_IMAGE: &str = "ratelimiter-base:bookworm";
pub const APP_IMAGE: &str = "ratelimiter:local";
pub const PROMETHEUS_IMAGE: &str = "ratelimiter-prometheus:local";

/// The passwords `docker/compose.yaml` requires, none of which has a default.
pub const PASSWORDS: [&str; 6] = [
    "REDIS_PASSWORD",
    "REDIS_ADMIN_PASSWORD",
    "REDIS_REPLICA_PASSWORD",
    "SENTINEL_AUTH_PASSWORD",
    "SENTINEL_PASSWORD",
    "SENTINEL_SERVICE_PASSWORD",
];

/// The label every client container of a project carries, so that `Drop` finds them.
const CLIENT_LABEL: &str = "ratelimiter-e2e";

/// Builds the images once per run with `scripts/docker-images.sh` (no registry is
/// needed), unless COMPOSE_IMAGES says otherwise: `keep` uses them as they are, `no-cargo`
/// builds the app image from the release binaries as they are.
pub fn prepare_images() {
    static PREPARED: OnceLock<()> = OnceLock::new();
    PREPARED.get_or_init(|| {
        let choice = std::env::var("COMPOSE_IMAGES").unwrap_or_default();
        let mut script = Command::new(repo().join("scripts/docker-images.sh"));
        match choice.as_str() {
            "keep" => {}
            "no-cargo" => {
                script.arg("--no-cargo");
            }
            "" | "build" => {}
            other => {
                panic!("COMPOSE_IMAGES is build (the default), no-cargo or keep, got {other:?}")
            }
        }
        if choice != "keep" {
            // Its progress shows as it goes: a first build takes minutes.
            let mut child = script
                .stdin(Stdio::null())
                .spawn()
                .expect("run scripts/docker-images.sh");
            let status = wait_bounded(&mut child, Duration::from_secs(45 * 60))
                .unwrap_or_else(|e| panic!("scripts/docker-images.sh {e}"));
            assert!(
                status.success(),
                "scripts/docker-images.sh failed: {status}"
            );
        }
        for image in [BASE_IMAGE, APP_IMAGE, PROMETHEUS_IMAGE] {
            assert!(
                docker(&["image", "inspect", image]).status.success(),
                "image {image} is missing: run scripts/docker-images.sh"
            );
        }
    });
}

/// The `docker-compose` (or `docker compose`) command line of one project, with the
/// environment it reads and nothing else of this process's: the user's shell settings
/// and `docker/.env` never reach the run.
#[derive(Clone)]
pub struct Compose {
    pub project: String,
    env_file: PathBuf,
    profiles: Vec<String>,
    vars: Vec<(String, String)>,
}

impl Compose {
    pub fn new(project: &str, env_file: &Path, profiles: &[&str], vars: &[(&str, String)]) -> Self {
        Compose {
            project: project.to_string(),
            env_file: env_file.to_path_buf(),
            profiles: profiles.iter().map(|p| p.to_string()).collect(),
            vars: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        }
    }

    pub fn command(&self) -> Command {
        static PROGRAM: OnceLock<Vec<&str>> = OnceLock::new();
        let program = PROGRAM.get_or_init(|| {
            let v2 = try_run(
                Command::new("docker").args(["compose", "version"]),
                Duration::from_secs(30),
            );
            if v2.is_ok_and(|out| out.status.success()) {
                vec!["docker", "compose"]
            } else {
                vec!["docker-compose"]
            }
        });
        let mut command = Command::new(program[0]);
        command.args(&program[1..]);
        command.env_clear();
        for (key, value) in std::env::vars() {
            if ["PATH", "HOME", "TMPDIR"].contains(&key.as_str()) || key.starts_with("DOCKER_") {
                command.env(key, value);
            }
        }
        command.envs(self.vars.iter().cloned());
        command
            .arg("--project-name")
            .arg(&self.project)
            .arg("--file")
            .arg(repo().join("docker/compose.yaml"))
            .arg("--env-file")
            .arg(&self.env_file);
        for profile in &self.profiles {
            command.args(["--profile", profile]);
        }
        command
    }

    pub fn run(&self, args: &[&str], limit: Duration) -> Result<Output, String> {
        try_run(self.command().args(args), limit)
    }

    fn containers(&self) -> Vec<String> {
        let label = format!("label=com.docker.compose.project={}", self.project);
        let ids = docker_ok(&["ps", "--all", "--quiet", "--filter", &label]);
        ids.split_whitespace().map(str::to_string).collect()
    }

    /// The clients this run started, then everything of the project, volumes included.
    fn down(&self) {
        let label = format!("label={CLIENT_LABEL}={}", self.project);
        if let Ok(out) = try_run(
            Command::new("docker").args(["ps", "--all", "--quiet", "--filter", &label]),
            Duration::from_secs(30),
        ) {
            let ids = String::from_utf8_lossy(&out.stdout).into_owned();
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let _ = try_run(
                    Command::new("docker").args(["rm", "--force"]).args(&ids),
                    Duration::from_secs(60),
                );
            }
        }
        let started = Instant::now();
        let args = ["down", "--volumes", "--remove-orphans", "--timeout", "5"];
        match self.run(&args, Duration::from_secs(180)) {
            Ok(out) if out.status.success() => {
                eprintln!(
                    "compose: {} down -v in {:.1}s",
                    self.project,
                    started.elapsed().as_secs_f64()
                )
            }
            Ok(out) => eprintln!("compose: {} down -v failed: {}", self.project, text(&out)),
            Err(e) => eprintln!("compose: {} down -v: {e}", self.project),
        }
    }
}

/// The projects up now, for the Ctrl-C handler.
static LIVE: Mutex<Vec<Compose>> = Mutex::new(Vec::new());

/// On SIGINT or SIGTERM, takes down every project up now, then exits (a test killed by a
/// signal runs no `Drop`).
fn take_down_on_signals() {
    static WATCH: Once = Once::new();
    WATCH.call_once(|| {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
            .expect("watch SIGINT and SIGTERM");
        thread::spawn(move || {
            if let Some(signal) = signals.forever().next() {
                let live = LIVE.lock().map(|live| live.clone()).unwrap_or_default();
                for compose in live {
                    compose.down();
                }
                std::process::exit(128 + signal);
            }
        });
    });
}

/// One stack at a time: each keeps both cores busy.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What a stack is made of.
pub struct Spec {
    pub project: &'static str,
    pub profiles: &'static [&'static str],
    /// The services `up` names (with what they depend on); none: every service of the
    /// profiles and of no profile.
    pub services: &'static [&'static str],
    /// The project's /24s, NET_PREFIX, BACKEND_NET_PREFIX, CLUSTER_NET_PREFIX and
    /// CLUSTER_BACKEND_NET_PREFIX: its own, so that two projects never claim one subnet
    /// (Compose makes every network of the file, whichever services start).
    pub net_prefixes: [&'static str; 4],
    /// The service's settings (RATE_LIMIT, TIME_WINDOW, ...), as Compose passes them on.
    pub settings: &'static [(&'static str, &'static str)],
    /// `docker exec` commands (service, command) whose answers explain a failure.
    pub on_failure: &'static [(&'static str, &'static [&'static str])],
}

/// `project`, after COMPOSE_PROJECT_NAME and a dash when that is set: a second run on the
/// same Docker host then neither finds this run's containers nor takes them down.
pub fn project_name(project: &str) -> String {
    match std::env::var("COMPOSE_PROJECT_NAME") {
        Ok(prefix) if !prefix.is_empty() => format!("{prefix}-{project}"),
        _ => project.to_string(),
    }
}

/// A Compose project up; down with its volumes on `Drop`.
pub struct Stack {
    pub compose: Compose,
    pub passwords: HashMap<String, String>,
    on_failure: &'static [(&'static str, &'static [&'static str])],
    ids: RefCell<HashMap<String, String>>,
    next_client: RefCell<u8>,
    _dir: TempDir,
    _one: tokio::sync::MutexGuard<'static, ()>,
}

impl Stack {
    pub async fn up(spec: Spec) -> Stack {
        prepare_images();
        let waited = Instant::now();
        let one = ONE_AT_A_TIME.lock().await;
        if waited.elapsed() > Duration::from_secs(1) {
            let waited = waited.elapsed().as_secs_f64();
            eprintln!(
                "compose: {} waited {waited:.1}s for the other stack to go",
                spec.project
            );
        }
        take_down_on_signals();
        let dir = tempfile::tempdir().expect("a temporary folder");
        let env_file = dir.path().join("secrets.env");
        let secrets = run(
            Command::new(repo().join("scripts/compose-secrets.sh")).arg(&env_file),
            Duration::from_secs(30),
        );
        assert!(
            secrets.status.success(),
            "scripts/compose-secrets.sh: {}",
            text(&secrets)
        );
        let passwords = read_env_file(&env_file);

        let [net, backend_net, cluster_net, cluster_backend_net] = spec.net_prefixes;
        let mut vars: Vec<(&str, String)> = vec![
            ("APP_IMAGE", APP_IMAGE.into()),
            ("REDIS_IMAGE", BASE_IMAGE.into()),
            ("NGINX_IMAGE", BASE_IMAGE.into()),
            ("PROMETHEUS_IMAGE", PROMETHEUS_IMAGE.into()),
            ("PUBLISH_ADDRESS", "127.0.0.1".into()),
            ("NET_PREFIX", net.into()),
            ("BACKEND_NET_PREFIX", backend_net.into()),
            ("CLUSTER_NET_PREFIX", cluster_net.into()),
            ("CLUSTER_BACKEND_NET_PREFIX", cluster_backend_net.into()),
        ];
        // Host ports: Docker picks free ones (see `Stack::port`).
        for port in [
            "NGINX_PORT",
            "NGINX_HTTP_PORT",
            "APP_1_PORT",
            "APP_2_PORT",
            "GATEWAY_PORT",
            "UPSTREAM_COUNT_PORT",
            "CLUSTER_NGINX_PORT",
            "CLUSTER_APP_1_PORT",
            "CLUSTER_APP_2_PORT",
            "APP_1_GRPC_PORT",
            "APP_2_GRPC_PORT",
            "CLUSTER_APP_1_GRPC_PORT",
            "CLUSTER_APP_2_GRPC_PORT",
            "PROMETHEUS_PORT",
        ] {
            vars.push((port, "0".into()));
        }
        vars.extend(spec.settings.iter().map(|(k, v)| (*k, v.to_string())));
        let project = project_name(spec.project);
        let compose = Compose::new(&project, &env_file, spec.profiles, &vars);
        let stack = Stack {
            compose,
            passwords,
            on_failure: spec.on_failure,
            ids: RefCell::default(),
            next_client: RefCell::new(100),
            _dir: dir,
            _one: one,
        };
        if !stack.compose.containers().is_empty() {
            eprintln!(
                "compose: {} has containers of an earlier run; removing them",
                spec.project
            );
            stack.compose.down();
        }
        LIVE.lock().unwrap().push(stack.compose.clone());
        let started = Instant::now();
        let mut args = vec!["up", "--detach", "--no-build"];
        args.extend(spec.services);
        let up = stack
            .compose
            .run(&args, Duration::from_secs(300))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(up.status.success(), "compose up failed: {}", text(&up));
        eprintln!(
            "compose: {} up in {:.1}s",
            spec.project,
            started.elapsed().as_secs_f64()
        );
        stack
    }

    /// The id of `service`'s container.
    pub fn id(&self, service: &str) -> String {
        if let Some(id) = self.ids.borrow().get(service) {
            return id.clone();
        }
        let project = format!("label=com.docker.compose.project={}", self.compose.project);
        let label = format!("label=com.docker.compose.service={service}");
        let ids = docker_ok(&[
            "ps", "--all", "--quiet", "--filter", &project, "--filter", &label,
        ]);
        let id = ids
            .lines()
            .next()
            .unwrap_or_else(|| panic!("no container for {service}"))
            .to_string();
        self.ids
            .borrow_mut()
            .insert(service.to_string(), id.clone());
        id
    }

    pub fn containers(&self) -> Vec<String> {
        self.compose.containers()
    }

    /// `docker exec` in `service`'s container: what it printed, whatever its exit status.
    pub fn exec(&self, service: &str, command: &[&str]) -> String {
        let id = self.id(service);
        text(&run(
            Command::new("docker").arg("exec").arg(&id).args(command),
            Duration::from_secs(30),
        ))
    }

    /// `docker exec` of `command` succeeds in `service`'s container.
    pub fn exec_succeeds(&self, service: &str, command: &[&str]) -> bool {
        let id = self.id(service);
        let output = run(
            Command::new("docker").arg("exec").arg(&id).args(command),
            Duration::from_secs(30),
        );
        output.status.success()
    }

    /// `docker inspect --format FORMAT` of `service`'s container.
    pub fn inspect(&self, service: &str, format: &str) -> String {
        docker_ok(&["inspect", "--format", format, &self.id(service)])
    }

    /// The container's health (`healthy`, `starting`, ...; `none` without a healthcheck).
    pub fn health(&self, service: &str) -> String {
        self.inspect(
            service,
            "{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}",
        )
    }

    /// The networks `service`'s container is on.
    pub fn networks(&self, service: &str) -> Vec<String> {
        let names = self.inspect(
            service,
            "{{range $name, $_ := .NetworkSettings.Networks}}{{$name}} {{end}}",
        );
        names.split_whitespace().map(str::to_string).collect()
    }

    /// `from` reaches none of `targets` (service, port): it shares no network with any,
    /// resolves none of their names, and cannot connect to any address they have.
    pub fn assert_unreachable_from(&self, from: &str, targets: &[(&str, u16)]) {
        let from_networks = self.networks(from);
        // Every lookup and connection at once, in one exec: a dropped connection only ends
        // at its timeout. Each one that succeeds says so.
        let mut probes = String::new();
        for &(service, port) in targets {
            let shared: Vec<String> = self
                .networks(service)
                .into_iter()
                .filter(|network| from_networks.contains(network))
                .collect();
            assert!(shared.is_empty(), "{service} shares {shared:?} with {from}");
            probes += &format!("getent hosts {service} >/dev/null && echo resolves {service} & ");
            let addresses = self.inspect(
                service,
                "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
            );
            let addresses: Vec<&str> = addresses.split_whitespace().collect();
            assert!(!addresses.is_empty(), "{service} has no address");
            for address in addresses {
                let connect = format!("exec 3<>/dev/tcp/{address}/{port}");
                probes += &format!(
                    "timeout 3 bash -c '{connect}' 2>/dev/null && echo connects to {service} at {address}:{port} & "
                );
            }
        }
        let reached = self.exec(from, &["bash", "-c", &format!("{probes}wait")]);
        assert!(reached.trim().is_empty(), "the {from} container: {reached}");
    }

    /// The host port Docker published `service`'s container port on.
    pub fn port(&self, service: &str, container_port: u16) -> u16 {
        let published = docker_ok(&["port", &self.id(service), &format!("{container_port}/tcp")]);
        published
            .lines()
            .find_map(|line| line.rsplit_once(':')?.1.parse().ok())
            .unwrap_or_else(|| panic!("{service}:{container_port} is not published: {published:?}"))
    }

    pub fn kill(&self, service: &str) {
        docker_ok(&["kill", &self.id(service)]);
    }

    pub fn start(&self, service: &str) {
        docker_ok(&["start", &self.id(service)]);
    }

    /// The next client address of `prefix`'s /24, from .100 up: the lower half, which
    /// Docker does not hand out (`docker/compose.yaml`'s ip_range).
    pub fn new_client(&self, prefix: &str) -> String {
        let mut next = self.next_client.borrow_mut();
        *next += 1;
        format!("{prefix}.{}", *next - 1)
    }

    /// `docker run` arguments of a client container at `address` on `network`, removed
    /// with the project.
    pub fn client_args(&self, network: &str, address: &str) -> Vec<String> {
        let last = address.rsplit('.').next().unwrap_or(address);
        [
            "--name",
            &format!("{}-client-{last}", self.compose.project),
            "--label",
            &format!("{CLIENT_LABEL}={}", self.compose.project),
            "--network",
            network,
            "--ip",
            address,
        ]
        .map(str::to_string)
        .to_vec()
    }

    /// What the stack looked like at a failure: its containers, the answers of the
    /// spec's diagnostic commands, the end of every log.
    fn print_state(&self) {
        eprintln!("--- {} at the failure", self.compose.project);
        if let Ok(ps) = self.compose.run(&["ps"], Duration::from_secs(30)) {
            eprintln!("{}", text(&ps));
        }
        for (service, command) in self.on_failure {
            let mut exec = vec!["exec", "-T", service];
            exec.extend(*command);
            let answer = self.compose.run(&exec, Duration::from_secs(10));
            let answer = answer.map(|o| text(&o)).unwrap_or_else(|e| e);
            eprintln!("{service}$ {}\n{answer}", command.join(" "));
        }
        // The services' own messages: the instances' access log would drown them.
        let logs = ["logs", "--no-color", "--tail", "40"];
        if let Ok(logs) = self.compose.run(&logs, Duration::from_secs(60)) {
            for line in text(&logs).lines() {
                if !line.contains("middleware::logger") {
                    eprintln!("{line}");
                }
            }
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if thread::panicking() {
            self.print_state();
        }
        self.compose.down();
        if let Ok(mut live) = LIVE.lock() {
            live.retain(|c| c.project != self.compose.project);
        }
    }
}

/// NAME=VALUE lines.
pub fn read_env_file(path: &Path) -> HashMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
