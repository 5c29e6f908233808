//! The processes this program starts: each is recorded in a pids file ("NAME PID START
//! LOG" lines, the format of scripts/cluster.sh and scripts/lib.sh), so that the wrapper
//! script stops whatever is left should this program be killed, and each is stopped by
//! its pid, by its [`Started`] guard, when it is no longer needed.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::procfs::{children_ticks, start_time_of};

/// One line of a pids file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub name: String,
    pub pid: u32,
    pub start: Option<u64>,
}

impl Record {
    pub fn parse(line: &str) -> Option<Self> {
        let mut words = line.split_whitespace();
        let name = words.next()?.to_owned();
        let pid = words.next()?.parse().ok()?;
        Some(Self {
            name,
            pid,
            start: words.next().and_then(|w| w.parse().ok()),
        })
    }

    /// The recorded process itself, not a later one that reuses its pid.
    pub fn running(&self) -> bool {
        self.start.is_some() && start_time_of(self.pid) == self.start
    }
}

/// A pids file.
#[derive(Debug, Clone)]
pub struct Records(pub PathBuf);

impl Records {
    /// The running processes recorded here, in the order they were recorded.
    pub fn running(&self) -> Vec<Record> {
        let text = fs::read_to_string(&self.0).unwrap_or_default();
        text.lines()
            .filter_map(Record::parse)
            .filter(Record::running)
            .collect()
    }

    /// The pids of the running processes whose names `matches` accepts.
    pub fn pids(&self, matches: impl Fn(&str) -> bool) -> Vec<u32> {
        self.running()
            .into_iter()
            .filter(|r| matches(&r.name))
            .map(|r| r.pid)
            .collect()
    }

    /// Starts `command` in the background, its output appended to `log`, and records it.
    pub fn spawn(&self, name: &str, command: &mut Command, log: &Path) -> Result<Child> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {name} ({command:?})"))?;
        let start = start_time_of(child.id()).map_or_else(String::new, |t| t.to_string());
        let mut file = OpenOptions::new().create(true).append(true).open(&self.0)?;
        writeln!(file, "{name} {} {start} {}", child.id(), log.display())?;
        Ok(child)
    }
}

/// A process this program started and will stop, at the latest when dropped.
#[derive(Debug)]
pub struct Started(Child);

impl Started {
    pub fn spawn(records: &Records, name: &str, command: &mut Command, log: &Path) -> Result<Self> {
        records.spawn(name, command, log).map(Self)
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    pub fn running(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }

    pub fn wait(&mut self) -> Result<ExitStatus> {
        Ok(self.0.wait()?)
    }

    /// SIGTERM, then SIGKILL if it still runs after 10 s; reaps it.
    pub fn stop(&mut self) {
        if !self.running() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.running() && Instant::now() < deadline {
            sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `command` to its end (recorded while it runs), its output appended to `log`;
/// returns how it ended and the CPU ticks it used.
pub fn run_counted(
    records: &Records,
    name: &str,
    command: &mut Command,
    log: &Path,
) -> Result<(ExitStatus, u64)> {
    let before = children_ticks();
    let status = Started::spawn(records, name, command, log)?.wait()?;
    Ok((status, children_ticks().saturating_sub(before)))
}

/// Runs `command` to its end, its output in `log` (made anew).
pub fn run_logged(command: &mut Command, log: &Path) -> Result<ExitStatus> {
    let file = File::create(log)?;
    Ok(command
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()?)
}

/// The last `n` lines of a file, for an error message.
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Polls `done` every 100 ms until it holds, for at most `within`.
pub fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + within;
    while !done() {
        if Instant::now() >= deadline {
            anyhow::bail!("not the case after {} s: {what}", within.as_secs());
        }
        sleep(Duration::from_millis(100));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_line_names_a_process_and_its_start() {
        let record = Record::parse("app-1 4242 987654 run/cluster/app-1/app.log").unwrap();
        assert_eq!(
            (record.name.as_str(), record.pid, record.start),
            ("app-1", 4242, Some(987_654))
        );
        assert_eq!(Record::parse("nginx 17 ").unwrap().start, None);
        assert_eq!(Record::parse("broken"), None);
    }

    #[test]
    fn a_child_is_recorded_counted_and_reaped_and_a_reused_pid_is_not_it() {
        let dir = std::env::temp_dir().join(format!("bench-spawn-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let records = Records(dir.join("pids"));
        let log = dir.join("out.log");
        let (status, _) = run_counted(
            &records,
            "echo",
            Command::new("sh").args(["-c", "echo hello"]),
            &log,
        )
        .unwrap();
        assert!(status.success());
        assert_eq!(tail(&log, 1), "hello");
        assert!(
            fs::read_to_string(dir.join("pids"))
                .unwrap()
                .starts_with("echo ")
        );
        assert!(records.running().is_empty(), "it ended");
        let me = Record {
            name: "me".into(),
            pid: std::process::id(),
            start: start_time_of(std::process::id()),
        };
        assert!(me.running());
        assert!(
            !Record {
                start: me.start.map(|s| s + 1),
                ..me
            }
            .running()
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
