//! The one way this program starts, stops and measures a process. Each one it starts is
//! recorded in a pids file ("NAME PID START LOG" lines, the format of scripts/lib.sh and
//! scripts/cluster.sh), so that the wrapper script stops whatever is left should this
//! program be killed, and is stopped by its pid through its [`Started`] guard. What the
//! kernel says about processes and the machine comes from `/proc` through the procfs
//! crate; a process that is gone reads as `None` or 0, never an error: processes come
//! and go while a benchmark runs.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use procfs::process::{Process, Stat};
use procfs::{CurrentSI, KernelStats};

fn stat(pid: u32) -> Option<Stat> {
    Process::new(i32::try_from(pid).ok()?).ok()?.stat().ok()
}

/// The start time of a live (not zombie) process, to tell it from a reused pid.
pub fn start_time_of(pid: u32) -> Option<u64> {
    stat(pid).filter(|s| s.state != 'Z').map(|s| s.starttime)
}

/// CPU ticks (utime + stime) of the thread groups of `pids`.
pub fn ticks_of(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|&p| stat(p))
        .map(|s| s.utime + s.stime)
        .sum()
}

/// The pids whose parent is `ppid`, sorted.
pub fn children_of(ppid: u32) -> Vec<u32> {
    let all = procfs::process::all_processes().into_iter().flatten();
    let stats = all.flatten().filter_map(|p| p.stat().ok());
    let children = stats.filter(|s| i64::from(s.ppid) == i64::from(ppid));
    let mut children: Vec<u32> = children.map(|s| s.pid as u32).collect();
    children.sort_unstable();
    children
}

/// VmRSS (resident now) and VmHWM (the peak) of PID, in KiB; 0 for a vanished process.
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let status = Process::new(pid as i32).and_then(|p| p.status()).ok();
    status.map_or((0, 0), |s| (s.vmrss.unwrap_or(0), s.vmhwm.unwrap_or(0)))
}

/// Open descriptors of PID; `None` for a process that is gone.
pub fn open_fds(pid: u32) -> Option<u64> {
    Some(Process::new(pid as i32).ok()?.fd_count().ok()? as u64)
}

/// The machine's "busy" and "all" ticks (`/proc/stat`'s first line).
///
/// With tick-based accounting (no `IRQ_TIME_ACCOUNTING`) a tick spent in irq or softirq
/// work, such as loopback TCP, is also charged to the process it interrupted, so busy
/// counts it: busy minus the processes' ticks is what every other process used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MachineTicks {
    pub busy: u64,
    pub all: u64,
}

impl MachineTicks {
    pub fn read() -> Self {
        let Ok(KernelStats { total: t, .. }) = KernelStats::current() else {
            return Self::default();
        };
        let busy = t.user + t.nice + t.system + t.irq.unwrap_or(0) + t.softirq.unwrap_or(0);
        let idle = t.idle + t.iowait.unwrap_or(0) + t.steal.unwrap_or(0);
        Self {
            busy,
            all: busy + idle,
        }
    }

    /// The share of the machine that was busy between `self` and `later`, in percent.
    pub fn busy_percent_until(&self, later: &Self) -> f64 {
        let all = later.all.saturating_sub(self.all).max(1);
        100.0 * later.busy.saturating_sub(self.busy) as f64 / all as f64
    }
}

/// A pids file.
#[derive(Debug, Clone)]
pub struct Records(pub PathBuf);

impl Records {
    /// The running processes recorded here (name, pid), in the order they were recorded;
    /// a line counts only while its pid has its recorded start time (not a reused pid).
    pub fn running(&self) -> Vec<(String, u32)> {
        let text = fs::read_to_string(&self.0).unwrap_or_default();
        let record = |line: &str| {
            let mut words = line.split_whitespace();
            let (name, pid) = (words.next()?, words.next()?.parse().ok()?);
            let start: Option<u64> = words.next().and_then(|w| w.parse().ok());
            (start.is_some() && start_time_of(pid) == start).then(|| (name.to_owned(), pid))
        };
        text.lines().filter_map(record).collect()
    }

    /// The pids of the running processes whose names `matches` accepts.
    pub fn pids(&self, matches: impl Fn(&str) -> bool) -> Vec<u32> {
        let running = self.running().into_iter();
        running.filter(|r| matches(&r.0)).map(|r| r.1).collect()
    }

    /// Starts `command` in the background, its output appended to `log`, and records it.
    pub fn spawn(&self, name: &str, command: &mut Command, log: &Path) -> Result<Child> {
        let out = OpenOptions::new().create(true).append(true).open(log);
        let out = out.with_context(|| format!("cannot open {}", log.display()))?;
        let command = command
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = command.spawn();
        let child = child.with_context(|| format!("cannot start {name} ({command:?})"))?;
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
        if self.running() && signal(self.pid(), "TERM") {
            let _ = wait_until("", Duration::from_secs(10), || !self.running());
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

/// Sends SIG`name` (TERM, KILL) to PID; whether it was sent.
pub fn signal(pid: u32, name: &str) -> bool {
    let kill = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status();
    kill.is_ok_and(|status| status.success())
}

/// Runs `command` to its end (recorded while it runs), its output appended to `log`;
/// returns how it ended and the CPU ticks it used (this process's reaped children's).
pub fn run_counted(
    records: &Records,
    name: &str,
    command: &mut Command,
    log: &Path,
) -> Result<(ExitStatus, u64)> {
    let reaped = || stat(std::process::id()).map_or(0, |s| s.cutime + s.cstime);
    let before = reaped();
    let status = Started::spawn(records, name, command, log)?.wait()?;
    Ok((status, u64::try_from(reaped() - before).unwrap_or(0)))
}

/// Runs `command` to its end, its output in `log` (made anew).
pub fn run_logged(command: &mut Command, log: &Path) -> Result<ExitStatus> {
    let file = File::create(log)?;
    let command = command
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    Ok(command.status()?)
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
    fn a_child_is_recorded_counted_and_reaped_and_a_reused_pid_is_not_it() {
        let dir = std::env::temp_dir().join(format!("bench-process-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let records = Records(dir.join("pids"));
        let (log, echo) = (dir.join("out.log"), ["-c", "echo hello"]);
        let (status, _) =
            run_counted(&records, "echo", Command::new("sh").args(echo), &log).unwrap();
        assert!(status.success() && tail(&log, 1) == "hello");
        let text = fs::read_to_string(&records.0).unwrap();
        assert!(
            text.starts_with("echo ") && records.running().is_empty(),
            "{text}"
        );
        let pid = std::process::id();
        let start = start_time_of(pid).unwrap();
        let lines = format!("me {pid} {start} x\nreused {pid} {} x\nbroken\n", start + 1);
        fs::write(&records.0, lines).unwrap();
        assert_eq!(records.running(), [("me".to_owned(), pid)]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn this_process_and_the_machine_can_be_read() {
        let me = std::process::id();
        assert!(memory_kib(me).0 > 0 && open_fds(me).is_some());
        let (before, later) = (MachineTicks::read(), MachineTicks { busy: 0, all: 0 });
        assert!(before.all > 0 && later.busy_percent_until(&before) <= 100.0);
    }
}
