//! The service under test: in this process on its own thread (`TestApp`), or as the real
//! binary in a child process, where it can be given signals and its exit code read.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ratelimiter::settings::Settings;
use ratelimiter::startup::Application;

use crate::PolicyFile;

/// The service, on its own thread and actix system, on a free port.
pub struct TestApp {
    pub port: u16,
    /// The rate-limit service's port, with `GRPC_PORT` among the settings.
    pub grpc_port: Option<u16>,
    pub url: String,
    handle: actix_web::dev::ServerHandle,
    thread: Option<JoinHandle<()>>,
}

impl TestApp {
    /// Starts the service with the defaults overridden by `vars` (environment names).
    pub fn spawn(vars: &[(&str, &str)]) -> Self {
        Self::start(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    /// `spawn`, for values built at run time.
    pub fn spawn_with(vars: &[(&str, String)]) -> Self {
        Self::start(vars.iter().map(|(k, v)| (k.to_string(), v.clone())))
    }

    fn start(vars: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut env: HashMap<String, String> = [
            ("HOST", "127.0.0.1"),
            ("PORT", "0"),
            ("WORKERS", "2"),
            ("INSTANCE_NAME", "test"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        env.extend(vars);
        let settings =
            Settings::load_from(env).unwrap_or_else(|err| panic!("test settings: {err}"));
        let (sender, receiver) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            actix_rt::System::new().block_on(async move {
                let app = Application::build(settings)
                    .await
                    .expect("the service starts");
                sender
                    .send((
                        app.port().expect("a TestApp serves on TCP (PORT=0)"),
                        app.grpc_port(),
                        app.handle(),
                    ))
                    .expect("report the port");
                app.run_until_stopped().await.expect("the service runs");
            });
        });
        let (port, grpc_port, handle) = receiver
            .recv_timeout(Duration::from_secs(30))
            .expect("the service started");
        Self {
            port,
            grpc_port,
            url: format!("http://127.0.0.1:{port}"),
            handle,
            thread: Some(thread),
        }
    }

    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// `GET path` from a client of its own on 127.0.0.1; a transport error fails the test.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        crate::client()
            .get(self.at(path))
            .send()
            .await
            .unwrap_or_else(|err| panic!("GET {path}: {err}"))
    }

    /// `GET path` and its body as JSON; a body that is not JSON fails the test.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        let response = self.get(path).await;
        let status = response.status();
        response
            .json()
            .await
            .unwrap_or_else(|err| panic!("GET {path} ({status}): not JSON: {err}"))
    }

    /// The rate-limit service's port; panics without `GRPC_PORT`.
    pub fn grpc(&self) -> u16 {
        self.grpc_port
            .expect("the service was started with GRPC_PORT")
    }

    /// The service with `policies` in a policy file of its own, which lives as long as
    /// the first of the pair.
    pub fn spawn_with_policies(policies: &str) -> (PolicyFile, Self) {
        let file = PolicyFile::new(policies);
        let app = Self::spawn_with(&[("POLICY_FILE", file.path())]);
        (file, app)
    }

    /// Graceful stop; waits for in-flight requests.
    pub async fn stop(mut self) {
        self.handle.stop(true).await;
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let handle = self.handle.clone();
        stop_servers_from_drop(self.thread.take(), move || handle.stop(false));
    }
}

/// The service's binary listening on `127.0.0.1:port`, with `vars` (environment names) on
/// top; `vars` may override `HOST` and `PORT` too.
pub fn service_command(port: u16, vars: &[(&str, &str)]) -> Command {
    let mut command = Command::new(service_binary());
    command
        .env("HOST", "127.0.0.1")
        .env("PORT", port.to_string());
    for (name, value) in vars {
        command.env(name, value);
    }
    command
}

/// The `ratelimiter` binary cargo built beside the running test: a test binary lies in
/// `target/<profile>/deps/`, the package's binaries one folder up (cargo builds them
/// before it runs an integration test). `CARGO_BIN_EXE_ratelimiter` names it only while
/// a test of the root package itself compiles, not this crate.
fn service_binary() -> PathBuf {
    let test = std::env::current_exe().expect("the test binary's path");
    let binary = test
        .parent()
        .and_then(Path::parent)
        .map(|profile| profile.join(format!("ratelimiter{}", std::env::consts::EXE_SUFFIX)))
        .expect("the test binary lies in target/<profile>/deps/");
    assert!(
        binary.is_file(),
        "no service binary at {} (cargo builds it for the root package's tests)",
        binary.display()
    );
    binary
}

/// A server the tests started as a child process, stopped with [`terminate`] once, on
/// `stop` or on `Drop`; when a test panics, the last lines of its log are printed first,
/// since they often say why.
pub(crate) struct Daemon {
    name: &'static str,
    child: Child,
    log: PathBuf,
    stopped: bool,
}

impl Daemon {
    pub(crate) fn new(name: &'static str, child: Child, log: PathBuf) -> Self {
        Self {
            name,
            child,
            log,
            stopped: false,
        }
    }

    pub(crate) fn log_tail(&self) -> String {
        crate::machine::log_tail(&self.log)
    }

    pub(crate) fn stop(&mut self) {
        if !std::mem::replace(&mut self.stopped, true) {
            terminate(&mut self.child, self.name);
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of {}'s log, {} ---\n{}",
                self.name,
                self.log.display(),
                self.log_tail()
            );
        }
        self.stop();
    }
}

/// Stops servers from a `Drop`, which may run inside or outside a runtime, so never
/// awaits there: `stop` runs on a runtime and a thread of its own; then `thread`, the one
/// the servers ran on, is joined.
pub(crate) fn stop_servers_from_drop<F, S>(thread: Option<JoinHandle<()>>, stop: S)
where
    S: FnOnce() -> F + Send + 'static,
    F: Future<Output = ()>,
{
    let Some(thread) = thread else {
        return;
    };
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        if let Ok(runtime) = runtime {
            runtime.block_on(stop());
        }
    })
    .join()
    .ok();
    let _ = thread.join();
}

/// SIGTERM to `child`, then at most 10 s for it to exit before it is killed.
pub(crate) fn terminate(child: &mut Child, name: &str) {
    crate::machine::send_signal(child.id(), "TERM");
    if wait_for_exit(child, Duration::from_secs(10)).is_none() {
        eprintln!("{name} ignored SIGTERM for 10 s and was killed");
    }
}

/// Waits at most `limit` for `child` to exit; a child still running then is killed, and
/// the answer is `None`.
pub fn wait_for_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("poll the child") {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
