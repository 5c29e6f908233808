//! The processes the benchmark starts itself: each is recorded in a pids file ("NAME PID
//! START LOG" lines, the format of scripts/cluster.sh and scripts/lib.sh), so that the
//! wrapper script stops whatever is left should this program be killed, and each is
//! stopped by its pid, by its [`Started`] guard, when it is no longer needed.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::procfs::{ProcStat, start_time_of};

/// A pids file.
#[derive(Debug, Clone)]
pub struct Records {
    path: PathBuf,
}

impl Records {
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    fn add(&self, name: &str, pid: u32, log: &Path) -> Result<()> {
        let start = start_time_of(pid).map_or_else(String::new, |t| t.to_string());
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        writeln!(file, "{name} {pid} {start} {}", log.display())?;
        Ok(())
    }
}

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
        let start = words.next().and_then(|word| word.parse().ok());
        Some(Self { name, pid, start })
    }

    /// The recorded process itself, not a later one that reuses its pid.
    pub fn running(&self) -> bool {
        self.start.is_some() && start_time_of(self.pid) == self.start
    }
}

/// The running processes recorded in `pids_file` whose names `matches` accepts.
pub fn recorded_pids(pids_file: &Path, matches: impl Fn(&str) -> bool) -> Vec<u32> {
    let text = std::fs::read_to_string(pids_file).unwrap_or_default();
    text.lines()
        .filter_map(Record::parse)
        .filter(|record| matches(&record.name) && record.running())
        .map(|record| record.pid)
        .collect()
}

/// Output of a child: appended to a log file, stdout and stderr alike.
fn log_file(log: &Path) -> Result<(File, File)> {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let err = out.try_clone()?;
    Ok((out, err))
}

/// Starts `command` in the background and records it, without owning it: it outlives
/// this program, and whoever stops the pids file's processes stops it (a data node of
/// scripts/cluster.sh restarted in place, which `scripts/cluster.sh down` stops).
pub fn spawn_recorded(
    records: &Records,
    name: &str,
    command: &mut Command,
    log: &Path,
) -> Result<u32> {
    let (out, err) = log_file(log)?;
    let child = command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("cannot start {name} ({command:?})"))?;
    records.add(name, child.id(), log)?;
    Ok(child.id())
}

/// A process this program started and will stop.
#[derive(Debug)]
pub struct Started {
    pub name: String,
    child: Child,
}

impl Started {
    pub fn spawn(records: &Records, name: &str, command: &mut Command, log: &Path) -> Result<Self> {
        let (out, err) = log_file(log)?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {name} ({command:?})"))?;
        records.add(name, child.id(), log)?;
        Ok(Self {
            name: name.to_owned(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then SIGKILL if it still runs after `grace`; reaps it.
    pub fn stop(&mut self, grace: Duration) {
        if !self.running() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + grace;
        while self.running() && Instant::now() < deadline {
            sleep(Duration::from_millis(100));
        }
        if self.running() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }

    /// Waits for its end; the CPU ticks it used are counted in this process's children
    /// times once it is reaped (see [`children_ticks`]).
    pub fn wait(&mut self) -> Result<ExitStatus> {
        self.child
            .wait()
            .with_context(|| format!("waiting for {}", self.name))
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

/// CPU ticks of the children this process has reaped so far.
pub fn children_ticks() -> Result<u64> {
    Ok(ProcStat::read_self()?.children_ticks())
}

/// Runs `command` to its end (it is recorded while it runs), its output appended to
/// `log`; returns how it ended and the CPU ticks it used.
pub fn run_counted(
    records: &Records,
    name: &str,
    command: &mut Command,
    log: &Path,
) -> Result<(ExitStatus, u64)> {
    let before = children_ticks()?;
    let mut started = Started::spawn(records, name, command, log)?;
    let status = started.wait()?;
    let used = children_ticks()?.saturating_sub(before);
    Ok((status, used))
}

/// The last `n` lines of a file, for an error message.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_line_names_a_process_and_its_start() {
        assert_eq!(
            Record::parse("app-1 4242 987654 run/cluster/app-1/app.log"),
            Some(Record {
                name: "app-1".into(),
                pid: 4242,
                start: Some(987_654),
            })
        );
        assert_eq!(
            Record::parse("nginx 17 "),
            Some(Record {
                name: "nginx".into(),
                pid: 17,
                start: None
            })
        );
        assert_eq!(Record::parse("broken"), None);
    }

    #[test]
    fn a_record_of_this_process_is_running_and_a_wrong_start_is_not() {
        let me = std::process::id();
        let start = start_time_of(me);
        let record = Record {
            name: "me".into(),
            pid: me,
            start,
        };
        assert!(record.running());
        let reused = Record {
            name: "me".into(),
            pid: me,
            start: start.map(|s| s + 1),
        };
        assert!(!reused.running());
    }

    #[test]
    fn a_child_is_recorded_counted_and_reaped() {
        let dir = std::env::temp_dir().join(format!("bench-spawn-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let records = Records::new(dir.join("pids"));
        let log = dir.join("out.log");
        let (status, _ticks) = run_counted(
            &records,
            "echo",
            Command::new("sh").args(["-c", "echo hello"]),
            &log,
        )
        .unwrap();
        assert!(status.success());
        assert_eq!(tail(&log, 1), "hello");
        let pids = std::fs::read_to_string(dir.join("pids")).unwrap();
        assert!(pids.starts_with("echo "), "{pids}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
