//! What a report says about where it ran and what it measured: the machine, the software,
//! the service binary and the commit, the time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use anyhow::{Context, Result};
use procfs::{CpuInfo, Current, LoadAverage, Meminfo};
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
        let model = CpuInfo::current()
            .ok()
            .and_then(|c| Some(c.model_name(0)?.to_owned()));
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease");
        Self {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            model: model.unwrap_or_else(|| "unknown CPU".into()),
            kernel: kernel.map_or_else(|_| "unknown".into(), |t| t.trim().to_owned()),
            memory_mib: Meminfo::current().map_or(0, |m| m.mem_total >> 20),
        }
    }

    pub fn describe(&self) -> String {
        let Self {
            cores,
            model,
            kernel,
            memory_mib,
        } = self;
        format!("{cores} cores, {model}, kernel {kernel}, {memory_mib} MiB RAM")
    }
}

/// The load average over 1, 5 and 15 minutes.
pub fn load_average() -> String {
    let load = LoadAverage::current();
    load.map_or_else(
        |_| "?".into(),
        |l| format!("{:.2} {:.2} {:.2}", l.one, l.five, l.fifteen),
    )
}

/// The first `words` words of the first line a command printed (stdout, else stderr);
/// empty when it cannot run.
fn first_line(argv: &[&str], words: usize) -> String {
    let Ok(out) = Command::new(argv[0]).args(&argv[1..]).output() else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&[out.stdout, out.stderr].concat()).into_owned();
    let line = text.lines().next().unwrap_or_default().split_whitespace();
    line.take(words).collect::<Vec<_>>().join(" ")
}

/// "nginx/1.22.1; Redis server v=7.0.15; wrk debian/4.1.0-3+b2".
pub fn software() -> String {
    let nginx = first_line(&["nginx", "-v"], 3).replace("nginx version: ", "");
    let redis = first_line(&["redis-server", "--version"], 3);
    format!("{nginx}; {redis}; {}", first_line(&["wrk", "--version"], 2))
}

/// "1d10a0c (its subject)": the commit the checkout is at.
pub fn commit() -> String {
    first_line(&["git", "log", "-1", "--format=%h (%s)"], usize::MAX)
}

/// The service binary every case of a run starts, and how the report names it:
/// RATELIMITER_BIN, or a copy in `out` of the release build of the working tree, so that
/// a rebuild while the run goes on cannot mix two versions into one run.
pub fn service_binary(root: &Path, out: &Path) -> Result<(PathBuf, String)> {
    if let Some(binary) = std::env::var_os("RATELIMITER_BIN").map(PathBuf::from) {
        let (shown, commit) = (binary.display(), commit());
        let note = format!("RATELIMITER_BIN={shown}; this checkout is at commit {commit}");
        return Ok((binary, note));
    }
    let built = crate::release_binary(root, "ratelimiter");
    let copy = out.join("ratelimiter");
    let copied = std::fs::copy(&built, &copy);
    copied.with_context(|| format!("cannot copy {} (is it built?)", built.display()))?;
    let paths = "status --porcelain -- src config Cargo.toml Cargo.lock".split(' ');
    let changes = Command::new("git").args(paths).output();
    let changes = changes.map_or(0, |out| out.stdout.iter().filter(|&&b| b == b'\n').count());
    let changes = match changes {
        0 => String::new(),
        n => format!(", with {n} uncommitted change(s) under src/, config/ or Cargo.*"),
    };
    let rel = |path: &Path| format!("{}", path.strip_prefix(root).unwrap_or(path).display());
    let (built_at, run_as, commit) = (rel(&built), rel(&copy), commit());
    let note = format!(
        "{built_at} built from this working tree at commit {commit}{changes}, run as a copy, {run_as}"
    );
    Ok((copy, note))
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
    fn times_are_written_to_the_minute_in_utc_and_the_machine_is_read_from_proc() {
        let at = |secs| utc_minute(UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(at(1_795_780_170), "2026-11-27 11:49 UTC");
        assert_eq!(at(951_782_400), "2000-02-29 00:00 UTC");
        let machine = Machine::read();
        assert!(machine.cores >= 1 && machine.memory_mib > 0, "{machine:?}");
        assert!(commit().contains(" ("), "{}", commit());
    }
}
