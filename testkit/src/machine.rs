//! What tests need of this machine: free ports, key prefixes no other test uses, waiting
//! on a condition, signals, a process's CPU time, the tools a suite needs, and the
//! repository's files.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A port nobody listens on right now, with its Redis Cluster bus port (+10000) free too.
/// Chosen below the kernel's ephemeral range (32768 and up here, and by default), from
/// 10000 to 22767: a port the kernel hands out (a `PORT=0` bind, an outgoing connection)
/// never lands there, so only another test's choice of the same port could take it before
/// it is bound.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    let seed = std::process::id() ^ now.map_or(0, |since| since.subsec_nanos());
    let start = seed.wrapping_mul(2_654_435_761) % 12_768;
    for step in 0..12_768 {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed) * 7 + step) % 12_768;
        let port = 10_000 + offset as u16;
        let free = |port: u16| TcpListener::bind(("127.0.0.1", port)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
    panic!("no free port from 10000 to 22767 on 127.0.0.1")
}

/// A key prefix no other test uses, so tests never share buckets and never need a flush.
/// It starts with `t`: the instances' Redis user may touch `t*:*` (see `redis_node`).
pub fn unique_prefix(test: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "t{}-{}-{test}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `ready` every 20 ms until it holds or `limit` passes.
pub fn wait_until(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `kill -SIGNAL pid`; panics if `kill` fails.
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

/// Panics, naming the Debian package to install, unless `binary` is on the PATH.
pub fn require(binary: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {binary}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    assert!(
        found,
        "{binary} is not installed: run `apt-get install -y {package}` (or `bash .ci/run`, which installs it)"
    );
}

/// A path of the repository (the root package), e.g. `repo_path("nginx/nginx.conf.template")`.
pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit/ lies in the repository")
        .join(relative)
}

/// `script TEMPLATE COPY` of `scripts/render-config.sh`, with `vars` as its placeholders'
/// values: the one way the shipped topologies make a server's config.
pub(crate) fn render(template: &str, copy: &Path, vars: &[(&str, &str)]) {
    let mut command = Command::new("bash");
    command
        .arg(repo_path("scripts/render-config.sh"))
        .arg(repo_path(template))
        .arg(copy)
        .stdout(Stdio::null());
    for (name, value) in vars {
        command.env(name, value);
    }
    let rendered = command.output().expect("run scripts/render-config.sh");
    assert!(
        rendered.status.success(),
        "scripts/render-config.sh {template}: {}",
        String::from_utf8_lossy(&rendered.stderr)
    );
}

/// The last 30 lines of the log at `path`; empty when there is none.
pub(crate) fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// CPU time (user + system) process `pid` has used so far, in µs: what the measurements
/// divide by the decisions they drove.
pub fn cpu_us(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let per_second: u64 = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100);
    ticks * 1_000_000 / per_second
}
