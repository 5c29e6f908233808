//! What the kernel says about processes and the machine: `/proc/PID/stat`, `/proc/stat`,
//! `/proc/PID/status`, parsed into typed values. Reading a process that is gone yields
//! `None`, never an error: processes come and go while a benchmark runs.

use std::fs;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The fields of `/proc/PID/stat` this program uses (proc(5) numbers them from 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    /// Field 3: `R`, `S`, `Z`, ...
    pub state: char,
    /// Field 4.
    pub ppid: u32,
    /// Fields 14 and 15: CPU time of the whole thread group, in clock ticks.
    pub utime: u64,
    pub stime: u64,
    /// Fields 16 and 17: CPU time of the children it has waited for, in clock ticks.
    pub cutime: u64,
    pub cstime: u64,
    /// Field 20.
    pub threads: u64,
    /// Field 22: clock ticks after boot; with the pid it names one process.
    pub start_time: u64,
}

impl ProcStat {
    /// Parses one `stat` line. The command name (field 2) may hold spaces and
    /// parentheses, so the fields are counted from its last `)`.
    pub fn parse(line: &str) -> Result<Self> {
        let close = line
            .rfind(')')
            .with_context(|| format!("no command name in a stat line: {line:?}"))?;
        let fields: Vec<&str> = line[close + 1..].split_whitespace().collect();
        if fields.len() < 20 {
            bail!(
                "a stat line with {} fields after the name: {line:?}",
                fields.len()
            );
        }
        let number = |index: usize| -> Result<u64> {
            fields[index]
                .parse()
                .with_context(|| format!("field {} of a stat line: {:?}", index + 3, fields[index]))
        };
        Ok(Self {
            state: fields[0].chars().next().unwrap_or('?'),
            ppid: u32::try_from(number(1)?)?,
            utime: number(11)?,
            stime: number(12)?,
            cutime: number(13)?,
            cstime: number(14)?,
            threads: number(17)?,
            start_time: number(19)?,
        })
    }

    pub fn read(pid: u32) -> Option<Self> {
        let line = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        Self::parse(&line).ok()
    }

    pub fn read_self() -> Result<Self> {
        let line = fs::read_to_string("/proc/self/stat").context("cannot read /proc/self/stat")?;
        Self::parse(&line)
    }

    /// utime + stime.
    pub fn ticks(&self) -> u64 {
        self.utime + self.stime
    }

    /// cutime + cstime: what the children this process waited for used.
    pub fn children_ticks(&self) -> u64 {
        self.cutime + self.cstime
    }
}

/// CPU ticks (utime + stime) of the whole thread groups of `pids`; a vanished pid counts 0.
pub fn ticks_of(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|&pid| ProcStat::read(pid))
        .map(|stat| stat.ticks())
        .sum()
}

/// The start time of a live (not zombie) process, to tell a recorded process from a
/// reused pid.
pub fn start_time_of(pid: u32) -> Option<u64> {
    ProcStat::read(pid)
        .filter(|stat| stat.state != 'Z')
        .map(|stat| stat.start_time)
}

/// The pids whose parent is `ppid`.
pub fn children_of(ppid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut children: Vec<u32> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| ProcStat::read(pid).is_some_and(|stat| stat.ppid == ppid))
        .collect();
    children.sort_unstable();
    children
}

/// The machine's "busy" and "all" ticks, from the first line of `/proc/stat`.
///
/// With tick-based accounting (no `IRQ_TIME_ACCOUNTING`) a tick spent in irq or softirq
/// work, such as loopback TCP, is also charged to the process it interrupted, so busy
/// counts it: busy minus the processes' ticks is what every other process (and interrupt
/// work on an idle CPU) used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MachineTicks {
    pub busy: u64,
    pub all: u64,
}

impl MachineTicks {
    pub fn parse(proc_stat: &str) -> Result<Self> {
        let line = proc_stat.lines().next().unwrap_or_default();
        let mut words = line.split_whitespace();
        if words.next() != Some("cpu") {
            bail!("/proc/stat does not start with the cpu line: {line:?}");
        }
        let values: Vec<u64> = words
            .take(8)
            .map(|word| {
                word.parse()
                    .with_context(|| format!("/proc/stat: {word:?}"))
            })
            .collect::<Result<_>>()?;
        let [user, nice, system, idle, iowait, irq, softirq, steal] = values[..] else {
            bail!("/proc/stat's cpu line has fewer than 8 fields: {line:?}");
        };
        Ok(Self {
            busy: user + nice + system + irq + softirq,
            all: user + nice + system + idle + iowait + irq + softirq + steal,
        })
    }

    pub fn read() -> Result<Self> {
        Self::parse(&fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?)
    }

    /// The share of the machine that was busy between `self` and `later`, in percent.
    pub fn busy_percent_until(&self, later: &Self) -> f64 {
        let all = later.all.saturating_sub(self.all);
        if all == 0 {
            return 0.0;
        }
        100.0 * later.busy.saturating_sub(self.busy) as f64 / all as f64
    }
}

/// A `Name:   value kB` field of `/proc/PID/status`, in KiB.
pub fn status_kib(status: &str, name: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// VmRSS (resident now) and VmHWM (the peak) of PID, in KiB; 0 for a vanished process.
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    (
        status_kib(&status, "VmRSS").unwrap_or(0),
        status_kib(&status, "VmHWM").unwrap_or(0),
    )
}

/// Voluntary + involuntary context switches in one task's `status`.
pub fn context_switches_in(status: &str) -> u64 {
    ["voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"]
        .iter()
        .filter_map(|name| status_kib(status, name))
        .sum()
}

/// Context switches of the threads of PID alive now (a thread that ended takes its
/// switches with it).
pub fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|task| fs::read_to_string(task.ok()?.path().join("status")).ok())
        .map(|status| context_switches_in(&status))
        .sum()
}

/// The kernel's clock ticks per second (USER_HZ), as `getconf CLK_TCK` says.
pub fn clock_ticks_per_second() -> Result<u64> {
    let output = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .context("cannot run getconf CLK_TCK")?;
    let text = String::from_utf8_lossy(&output.stdout);
    let hz: u64 = text
        .trim()
        .parse()
        .with_context(|| format!("getconf CLK_TCK printed {text:?}"))?;
    if hz == 0 {
        bail!("getconf CLK_TCK printed 0");
    }
    Ok(hz)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NGINX_WORKER: &str = "4242 (nginx: worker (x)) S 4200 4200 4200 0 -1 4194624 \
        1033 0 0 0 1500 700 30 40 20 0 12 0 987654 123456789 2345 18446744073709551615 \
        1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";

    #[test]
    fn a_stat_line_is_read_past_a_name_with_spaces_and_parentheses() {
        let stat = ProcStat::parse(NGINX_WORKER).unwrap();
        assert_eq!(
            stat,
            ProcStat {
                state: 'S',
                ppid: 4200,
                utime: 1500,
                stime: 700,
                cutime: 30,
                cstime: 40,
                threads: 12,
                start_time: 987654,
            }
        );
        assert_eq!(stat.ticks(), 2200);
        assert_eq!(stat.children_ticks(), 70);
    }

    #[test]
    fn a_truncated_stat_line_is_an_error() {
        assert!(ProcStat::parse("1 (init) S 0 1").is_err());
        assert!(ProcStat::parse("no name at all").is_err());
    }

    #[test]
    fn busy_ticks_count_irq_and_softirq_but_not_idle_iowait_or_steal() {
        let ticks =
            MachineTicks::parse("cpu  100 5 50 1000 7 3 2 9 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
                .unwrap();
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
    fn status_fields_are_read_in_kib() {
        let status = "Name:\tratelimiter\nVmHWM:\t   13700 kB\nVmRSS:\t   13400 kB\n\
            voluntary_ctxt_switches:\t120\nnonvoluntary_ctxt_switches:\t7\n";
        assert_eq!(status_kib(status, "VmRSS"), Some(13400));
        assert_eq!(status_kib(status, "VmHWM"), Some(13700));
        assert_eq!(status_kib(status, "VmSwap"), None);
        assert_eq!(context_switches_in(status), 127);
    }

    #[test]
    fn this_process_can_read_itself() {
        let stat = ProcStat::read_self().unwrap();
        assert!(stat.threads >= 1);
        assert_eq!(start_time_of(std::process::id()), Some(stat.start_time));
    }
}
