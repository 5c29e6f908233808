//! What a report says about where it ran: the machine, the software, the checkout, the time.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    pub cores: usize,
    pub model: String,
    pub kernel: String,
    pub memory_mib: u64,
}

impl Machine {
    pub fn read() -> Self {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Self {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            model: cpuinfo
                .lines()
                .find_map(|l| {
                    Some(
                        l.strip_prefix("model name")?
                            .split_once(':')?
                            .1
                            .trim()
                            .to_owned(),
                    )
                })
                .unwrap_or_else(|| "unknown CPU".into()),
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .map_or_else(|_| "unknown".into(), |t| t.trim().to_owned()),
            memory_mib: crate::procfs::status_field(&meminfo, "MemTotal").unwrap_or(0) / 1024,
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "{} cores, {}, kernel {}, {} MiB RAM",
            self.cores, self.model, self.kernel, self.memory_mib
        )
    }
}

/// The load average over 1, 5 and 15 minutes.
pub fn load_average() -> String {
    let text = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The first line a command printed (stdout, else stderr); empty when it cannot run.
fn first_line(program: &str, args: &[&str]) -> String {
    let Ok(out) = Command::new(program).args(args).output() else {
        return String::new();
    };
    let text = [out.stdout, out.stderr].concat();
    String::from_utf8_lossy(&text)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// "nginx/1.22.1; Redis server v=7.0.15; wrk debian/4.1.0-3+b2".
pub fn software() -> String {
    let nginx = first_line("nginx", &["-v"]).replace("nginx version: ", "");
    let redis: Vec<String> = first_line("redis-server", &["--version"])
        .split_whitespace()
        .take(3)
        .map(str::to_owned)
        .collect();
    let wrk = first_line("wrk", &["--version"])
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    format!("{nginx}; {}; {wrk}", redis.join(" "))
}

/// "1d10a0c (its subject)": the commit the checkout is at.
pub fn commit() -> String {
    first_line("git", &["log", "-1", "--format=%h (%s)"])
}

/// How a report names the service binary it measured: `given` (RATELIMITER_BIN), or
/// `built` from this working tree and run as `copy`.
pub fn service_note(given: Option<&Path>, built: &str, copy: &str) -> String {
    if let Some(binary) = given {
        return format!(
            "RATELIMITER_BIN={}; this checkout is at commit {}",
            binary.display(),
            commit()
        );
    }
    let status = Command::new("git")
        .args([
            "status",
            "--porcelain",
            "--",
            "src",
            "config",
            "Cargo.toml",
            "Cargo.lock",
        ])
        .output();
    let changes = status.map_or(0, |out| {
        String::from_utf8_lossy(&out.stdout).lines().count()
    });
    let changes = match changes {
        0 => String::new(),
        n => format!(", with {n} uncommitted change(s) under src/, config/ or Cargo.*"),
    };
    format!(
        "{built} built from this working tree at commit {}{changes}, run as a copy, {copy}",
        commit()
    )
}

/// "2026-11-27 11:49 UTC".
pub fn utc_minute(time: SystemTime) -> String {
    let text = humantime::format_rfc3339_seconds(time).to_string();
    format!("{} {} UTC", &text[..10], &text[11..16])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn times_are_written_to_the_minute_in_utc() {
        assert_eq!(
            utc_minute(UNIX_EPOCH + Duration::from_secs(1_795_780_170)),
            "2026-11-27 11:49 UTC"
        );
        assert_eq!(
            utc_minute(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29 00:00 UTC"
        );
    }

    #[test]
    fn the_machine_is_described_from_proc() {
        let machine = Machine::read();
        assert!(machine.cores >= 1 && machine.memory_mib > 0, "{machine:?}");
    }
}
