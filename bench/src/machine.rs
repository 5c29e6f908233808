//! What a report says about where it ran: the machine, the software, the checkout, the
//! time. The parsing is pure; the readers around it ask `/proc` and the tools themselves.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

/// The machine line of a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    pub cores: usize,
    pub model: String,
    pub kernel: String,
    pub memory_mib: u64,
}

impl Machine {
    pub fn read() -> Self {
        Self {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            model: cpu_model(&fs::read_to_string("/proc/cpuinfo").unwrap_or_default())
                .unwrap_or_else(|| "unknown CPU".into()),
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|text| text.trim().to_owned())
                .unwrap_or_else(|_| "unknown".into()),
            memory_mib: memory_total_mib(&fs::read_to_string("/proc/meminfo").unwrap_or_default())
                .unwrap_or(0),
        }
    }
}

/// The first `model name` of `/proc/cpuinfo`.
pub fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "model name").then(|| value.trim().to_owned())
    })
}

/// `MemTotal` of `/proc/meminfo`, in whole MiB.
pub fn memory_total_mib(meminfo: &str) -> Option<u64> {
    crate::procfs::status_kib(meminfo, "MemTotal").map(|kib| kib / 1024)
}

/// The load average over 1, 5 and 15 minutes, as `/proc/loadavg` has it.
pub fn load_average() -> String {
    let text = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Everything a command printed, stdout then stderr; empty when it cannot run.
fn output_of(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|out| {
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            text
        })
        .unwrap_or_default()
}

/// "nginx/1.22.1" out of `nginx -v`.
pub fn nginx_version(output: &str) -> String {
    let line = output.lines().next().unwrap_or_default().trim();
    line.strip_prefix("nginx version: ")
        .unwrap_or(line)
        .to_owned()
}

/// "Redis server v=7.0.15" out of `redis-server --version`.
pub fn redis_version(output: &str) -> String {
    output
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// "wrk debian/4.1.0-3+b2" out of `wrk --version`.
pub fn wrk_version(output: &str) -> String {
    let version = output
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .unwrap_or("unknown");
    format!("wrk {version}")
}

/// "nginx/1.22.1; Redis server v=7.0.15; wrk debian/4.1.0-3+b2".
pub fn software() -> String {
    format!(
        "{}; {}; {}",
        nginx_version(&output_of("nginx", &["-v"])),
        redis_version(&output_of("redis-server", &["--version"])),
        wrk_version(&output_of("wrk", &["--version"]))
    )
}

/// "1d10a0c (its subject)": the commit the checkout is at.
pub fn commit() -> String {
    output_of("git", &["log", "-1", "--format=%h (%s)"])
        .trim()
        .to_owned()
}

/// Uncommitted changes to what the service is built from.
pub fn service_changes() -> usize {
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
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default();
    status.lines().count()
}

/// How a report names the service binary it measured.
pub fn service_note(binary: &Path, given: bool, copy: &str) -> String {
    if given {
        return format!(
            "RATELIMITER_BIN={}; this checkout is at commit {}",
            binary.display(),
            commit()
        );
    }
    let changes = match service_changes() {
        0 => String::new(),
        n => format!(", with {n} uncommitted change(s) under src/, config/ or Cargo.*"),
    };
    format!(
        "{} built from this working tree at commit {}{changes}, run as a copy, {copy}",
        binary.display(),
        commit()
    )
}

/// "2026-11-27 11:49 UTC".
pub fn utc_minute(time: SystemTime) -> String {
    let seconds = time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let days = (seconds / 86_400) as i64;
    let minute_of_day = seconds % 86_400 / 60;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        minute_of_day / 60,
        minute_of_day % 60
    )
}

/// The proleptic Gregorian date of a count of days since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn times_are_written_to_the_minute_in_utc() {
        assert_eq!(utc_minute(UNIX_EPOCH), "1970-01-01 00:00 UTC");
        // 2026-11-27 11:49:30 UTC
        let time = UNIX_EPOCH + Duration::from_secs(1_795_780_170);
        assert_eq!(utc_minute(time), "2026-11-27 11:49 UTC");
        // A leap day.
        let time = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(utc_minute(time), "2000-02-29 00:00 UTC");
    }

    #[test]
    fn the_machine_is_described_from_proc() {
        let cpuinfo = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n\nprocessor\t: 1\nmodel name\t: Intel(R) Xeon(R) Processor\n";
        assert_eq!(
            cpu_model(cpuinfo).as_deref(),
            Some("Intel(R) Xeon(R) Processor")
        );
        assert_eq!(
            memory_total_mib("MemTotal:       24683720 kB\nMemFree: 1 kB\n"),
            Some(24105)
        );
    }

    #[test]
    fn tool_versions_are_cut_to_their_names() {
        assert_eq!(
            nginx_version("nginx version: nginx/1.22.1\n"),
            "nginx/1.22.1"
        );
        assert_eq!(
            redis_version("Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64\n"),
            "Redis server v=7.0.15"
        );
        assert_eq!(
            wrk_version(
                "wrk debian/4.1.0-3+b2 [epoll] Copyright (C) 2012 Will Glozer\nUsage: ...\n"
            ),
            "wrk debian/4.1.0-3+b2"
        );
    }
}
