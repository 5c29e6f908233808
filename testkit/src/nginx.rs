//! Nginx as shipped: `nginx/nginx.conf.template` rendered by `scripts/render-config.sh`,
//! with the placeholders the native topology gives it, on free ports, in a temporary
//! folder: to instances on TCP from `proxy_bind 127.0.0.2` (so the instances must trust
//! that address), or to their Unix sockets (`unix:PATH`), which bind to no address.
//! Stopped on `Drop`, after printing the end of its error log when the test failed.

use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::app::Daemon;
use crate::machine::{free_port, render, require, wait_until};

/// The address Nginx reaches the instances from; the instances must trust it
/// (`TRUSTED_PROXIES`), and no test client may use it.
pub const PROXY_ADDR: &str = "127.0.0.2";

/// What the template's placeholders become, besides ports and paths.
pub struct NginxSettings {
    /// The two instances, `host:port`, or both `unix:PATH`.
    pub instances: [String; 2],
    /// The application behind the gateway, `host:port`.
    pub upstream: String,
    /// `GATEWAY_FAIL_MODE`.
    pub fail_mode: &'static str,
}

pub struct NginxProcess {
    /// The public server.
    pub port: u16,
    /// The gateway server.
    pub gateway_port: u16,
    /// Declared before `dir`, so that it stops, and its log is read, before the folder goes.
    process: Daemon,
    /// Held for its `Drop`: the configuration, data and logs live as long as the process.
    _dir: tempfile::TempDir,
}

impl NginxProcess {
    pub fn start(settings: &NginxSettings) -> Self {
        require("nginx", "nginx-light");
        let dir = tempfile::tempdir().expect("temporary folder");
        let (port, gateway_port) = (free_port(), free_port());
        let root = dir.path();
        for folder in ["logs", "temp"] {
            std::fs::create_dir(root.join(folder)).expect("nginx folders");
        }
        let config = root.join("nginx.conf");
        let error_log = root.join("logs/error.log");
        let (port_text, gateway_text) = (
            format!("listen 127.0.0.1:{port};"),
            format!("listen 127.0.0.1:{gateway_port};"),
        );
        let path = |relative: &str| root.join(relative).display().to_string();
        // A connection to a Unix socket cannot be bound to an IP address.
        let proxy_bind = if settings.instances[0].starts_with("unix:") {
            "off"
        } else {
            PROXY_ADDR
        };
        render(
            "nginx/nginx.conf.template",
            &config,
            &[
                ("PID_FILE", &path("nginx.pid")),
                ("ERROR_LOG", &path("logs/error.log")),
                ("ACCESS_LOG", &path("logs/access.log")),
                ("TEMP_DIR", &path("temp")),
                ("LISTEN", &port_text),
                ("APP_1", &settings.instances[0]),
                ("APP_2", &settings.instances[1]),
                ("PROXY_BIND", proxy_bind),
                ("GATEWAY_LISTEN", &gateway_text),
                ("GATEWAY_UPSTREAM", &settings.upstream),
                ("GATEWAY_FAIL_MODE", settings.fail_mode),
            ],
        );
        let args = |command: &mut Command| {
            // Started by root, Nginx runs its workers as `nobody`, who may not open the
            // instances' sockets (mode 660, in a folder of mode 700); run by anyone else,
            // the workers are that user, the sockets' owner, as in the native topology.
            if running_as_root() {
                command.arg("-g").arg("user root;");
            }
            command
                .arg("-e")
                .arg(&error_log)
                .arg("-p")
                .arg(format!("{}/", root.display()))
                .arg("-c")
                .arg(&config);
        };
        let mut test = Command::new("nginx");
        test.arg("-t").arg("-q");
        args(&mut test);
        let tested = test.output().expect("run nginx -t");
        assert!(
            tested.status.success(),
            "nginx rejects the rendered template: {}",
            String::from_utf8_lossy(&tested.stderr)
        );
        let mut command = Command::new("nginx");
        args(&mut command);
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        let nginx = Self {
            port,
            gateway_port,
            process: Daemon::new("nginx", child, dir.path().join("logs/error.log")),
            _dir: dir,
        };
        wait_until("nginx listening", Duration::from_secs(10), || {
            [port, gateway_port]
                .iter()
                .all(|port| TcpStream::connect(("127.0.0.1", *port)).is_ok())
        });
        nginx
    }

    /// `path` on the public server.
    pub fn public(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// `path` on the gateway.
    pub fn gateway(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.gateway_port)
    }

    pub fn error_log_tail(&self) -> String {
        self.process.log_tail()
    }

    /// Fast shutdown (SIGTERM): the master stops its workers, then exits.
    pub fn stop(&mut self) {
        self.process.stop();
    }
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|meta| meta.uid() == 0)
}
