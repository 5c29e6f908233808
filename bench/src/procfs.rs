//! What the kernel says about processes and the machine (`/proc`), as typed values.
//! Reading a process that is gone yields `None` or 0, never an error: processes come and
//! go while a benchmark runs.

use std::fs;

use anyhow::{Context, Result, bail};

/// The fields of `/proc/PID/stat` this program uses (proc(5) numbers them from 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    /// Field 3: `R`, `S`, `Z`, ...
    pub state: char,
    pub ppid: u32,
    /// Fields 14 and 15: CPU time of the whole thread group, in clock ticks.
    pub utime: u64,
    pub stime: u64,
    /// Fields 16 and 17: CPU time of the children it has waited for.
    pub children: u64,
    pub threads: u64,
    /// Field 22: clock ticks after boot; with the pid it names one process.
    pub start_time: u64,
}

impl ProcStat {
    /// Parses one `stat` line. The command name (field 2) may hold spaces and
    /// parentheses, so the fields are counted from its last `)`.
    pub fn parse(line: &str) -> Result<Self> {
        let close = line.rfind(')').context("no command name in a stat line")?;
        let fields: Vec<&str> = line[close + 1..].split_whitespace().collect();
        if fields.len() < 20 {
            bail!("a stat line with {} fields after the name", fields.len());
        }
        let n = |i: usize| -> Result<u64> {
            fields[i]
                .parse()
                .with_context(|| format!("stat field {}: {:?}", i + 3, fields[i]))
        };
        Ok(Self {
            state: fields[0].chars().next().unwrap_or('?'),
            ppid: u32::try_from(n(1)?)?,
            utime: n(11)?,
            stime: n(12)?,
            children: n(13)? + n(14)?,
            threads: n(17)?,
            start_time: n(19)?,
        })
    }

    pub fn read(pid: &str) -> Option<Self> {
        Self::parse(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?).ok()
    }

    pub fn of(pid: u32) -> Option<Self> {
        Self::read(&pid.to_string())
    }
}

/// CPU ticks (utime + stime) of the thread groups of `pids`; a vanished pid counts 0.
pub fn ticks_of(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|&pid| ProcStat::of(pid))
        .map(|s| s.utime + s.stime)
        .sum()
}

/// CPU ticks of the children this process has reaped so far.
pub fn children_ticks() -> u64 {
    ProcStat::read("self").map_or(0, |s| s.children)
}

/// The start time of a live (not zombie) process, to tell it from a reused pid.
pub fn start_time_of(pid: u32) -> Option<u64> {
    ProcStat::of(pid)
        .filter(|s| s.state != 'Z')
        .map(|s| s.start_time)
}

/// The pids whose parent is `ppid`.
pub fn children_of(ppid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut children: Vec<u32> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| ProcStat::of(pid).is_some_and(|s| s.ppid == ppid))
        .collect();
    children.sort_unstable();
    children
}

/// The machine's "busy" and "all" ticks, from the first line of `/proc/stat`.
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
    pub fn parse(proc_stat: &str) -> Result<Self> {
        let line = proc_stat.lines().next().unwrap_or_default();
        let values: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        let [user, nice, system, idle, iowait, irq, softirq, steal] = values[..] else {
            bail!("/proc/stat's cpu line has fewer than 8 fields: {line:?}");
        };
        let busy = user + nice + system + irq + softirq;
        Ok(Self {
            busy,
            all: busy + idle + iowait + steal,
        })
    }

    pub fn read() -> Self {
        fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|text| Self::parse(&text).ok())
            .unwrap_or_default()
    }

    /// The share of the machine that was busy between `self` and `later`, in percent.
    pub fn busy_percent_until(&self, later: &Self) -> f64 {
        let all = later.all.saturating_sub(self.all).max(1);
        100.0 * later.busy.saturating_sub(self.busy) as f64 / all as f64
    }
}

/// A `Name:   value kB` field of a `/proc` status-like file.
pub fn status_field(status: &str, name: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// VmRSS (resident now) and VmHWM (the peak) of PID, in KiB; 0 for a vanished process.
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name| status_field(&status, name).unwrap_or(0);
    (field("VmRSS"), field("VmHWM"))
}

/// Open descriptors of PID; `None` for a process that is gone.
pub fn open_fds(pid: u32) -> Option<u64> {
    Some(fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// Context switches (voluntary + involuntary) of the threads of PID alive now.
pub fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    let statuses =
        tasks.filter_map(|task| fs::read_to_string(task.ok()?.path().join("status")).ok());
    statuses
        .flat_map(|s| {
            ["voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"].map(|n| status_field(&s, n))
        })
        .flatten()
        .sum()
}

/// The kernel's clock ticks per second (USER_HZ), as `getconf CLK_TCK` says.
pub fn clock_ticks_per_second() -> Result<u64> {
    let output = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.trim()
        .parse()
        .ok()
        .filter(|&hz| hz > 0)
        .with_context(|| format!("getconf CLK_TCK printed {text:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_is_read_past_a_name_with_spaces_and_parentheses() {
        let line = "4242 (nginx: worker (x)) S 4200 4200 4200 0 -1 4194624 1033 0 0 0 1500 700 30 40 20 0 12 0 987654 1 2";
        let stat = ProcStat::parse(line).unwrap();
        assert_eq!(
            (stat.state, stat.ppid, stat.utime, stat.stime),
            ('S', 4200, 1500, 700)
        );
        assert_eq!(
            (stat.children, stat.threads, stat.start_time),
            (70, 12, 987654)
        );
        assert!(ProcStat::parse("1 (init) S 0 1").is_err());
    }

    #[test]
    fn busy_ticks_count_irq_and_softirq_but_not_idle_iowait_or_steal() {
        let ticks = MachineTicks::parse("cpu  100 5 50 1000 7 3 2 9 0 0\ncpu0 1 2\n").unwrap();
        assert_eq!(
            ticks,
            MachineTicks {
                busy: 160,
                all: 1176
            }
        );
        let later = MachineTicks {
            busy: 210,
            all: 1376,
        };
        assert_eq!(ticks.busy_percent_until(&later), 25.0);
    }

    #[test]
    fn status_fields_are_read_and_this_process_can_read_itself() {
        let status = "Name:\tratelimiter\nVmHWM:\t   13700 kB\nVmRSS:\t   13400 kB\n";
        assert_eq!(status_field(status, "VmRSS"), Some(13400));
        assert_eq!(status_field(status, "VmSwap"), None);
        let me = std::process::id();
        assert!(memory_kib(me).0 > 0 && open_fds(me).is_some());
        assert!(start_time_of(me).is_some() && context_switches(me) > 0);
    }
}
