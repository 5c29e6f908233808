//! Redis as the benchmark asks it: `INFO` (commandstats parsed into counters), `ROLE`,
//! `SCRIPT LOAD`, `DBSIZE`, a sentinel's master. Every call opens its own short-lived
//! connection with a timeout, so a node that restarted, or is gone, costs one failed call.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use redis::IntoConnectionInfo;

use crate::LOOPBACK;

const TIMEOUT: Duration = Duration::from_secs(5);

/// A data node or sentinel on loopback, and the password of its default user.
#[derive(Debug, Clone)]
pub struct Node {
    pub port: u16,
    pub password: Option<String>,
}

impl Node {
    pub fn new(port: u16, password: Option<&str>) -> Self {
        Self {
            port,
            password: password.map(str::to_owned),
        }
    }

    fn query<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> Result<T> {
        let info = redis::ConnectionAddr::Tcp(LOOPBACK.into(), self.port).into_connection_info()?;
        // No CLIENT SETINFO on connect: the benchmark counts the commands Redis sees.
        let mut settings = info.redis_settings().clone().set_skip_set_lib_name();
        if let Some(password) = &self.password {
            settings = settings.set_password(password);
        }
        let client = redis::Client::open(info.set_redis_settings(settings))?;
        let mut connection = client.get_connection_with_timeout(TIMEOUT)?;
        connection.set_read_timeout(Some(TIMEOUT))?;
        command
            .query(&mut connection)
            .with_context(|| format!("Redis on port {}", self.port))
    }

    pub fn info(&self, section: &str) -> Result<String> {
        self.query(redis::cmd("INFO").arg(section))
    }

    /// A field of an `INFO` section (`role`, `connected_slaves`, ...).
    pub fn info_field(&self, section: &str, name: &str) -> Option<String> {
        info_field(&self.info(section).ok()?, name).map(str::to_owned)
    }

    pub fn command_stats(&self) -> Result<CommandStats> {
        Ok(CommandStats::parse(&self.info("commandstats")?))
    }

    pub fn is_master(&self) -> bool {
        self.info_field("replication", "role").as_deref() == Some("master")
    }

    pub fn script_load(&self, script: &str) -> Result<String> {
        self.query(redis::cmd("SCRIPT").arg("LOAD").arg(script))
    }

    pub fn dbsize(&self) -> Option<u64> {
        self.query(&redis::cmd("DBSIZE")).ok()
    }

    pub fn ping(&self) -> bool {
        self.query::<String>(&redis::cmd("PING"))
            .is_ok_and(|reply| reply == "PONG")
    }

    pub fn del(&self, keys: &[&str]) -> Result<u64> {
        self.query(redis::cmd("DEL").arg(keys))
    }

    /// A sentinel's `SENTINEL GET-MASTER-ADDR-BY-NAME`: the master's port.
    pub fn sentinel_master_port(&self, master_name: &str) -> Option<u16> {
        let reply: Vec<String> = self
            .query(
                redis::cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg(master_name),
            )
            .ok()?;
        reply.get(1)?.parse().ok()
    }
}

/// A field of an `INFO` reply.
pub fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.trim_end().strip_prefix(name)?.strip_prefix(':'))
}

/// One `cmdstat_NAME:calls=N,usec=N,...` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CommandStat {
    pub calls: u64,
    pub usec: u64,
}

/// `INFO commandstats`, by command name (lower case, without `cmdstat_`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CommandStats(pub BTreeMap<String, CommandStat>);

impl CommandStats {
    pub fn parse(info: &str) -> Self {
        let mut stats = BTreeMap::new();
        for line in info.lines() {
            let Some((name, fields)) = line
                .trim()
                .strip_prefix("cmdstat_")
                .and_then(|r| r.split_once(':'))
            else {
                continue;
            };
            let field = |key: &str| {
                fields
                    .split(',')
                    .find_map(|f| f.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
                    .unwrap_or(0)
            };
            stats.insert(
                name.to_owned(),
                CommandStat {
                    calls: field("calls"),
                    usec: field("usec"),
                },
            );
        }
        Self(stats)
    }

    pub fn get(&self, name: &str) -> CommandStat {
        self.0.get(name).copied().unwrap_or_default()
    }

    /// What happened between `self` and `later`, command by command.
    pub fn delta_until(&self, later: &Self) -> Self {
        let delta = |(name, after): (&String, &CommandStat)| {
            let before = self.get(name);
            let stat = CommandStat {
                calls: after.calls.saturating_sub(before.calls),
                usec: after.usec.saturating_sub(before.usec),
            };
            (name.clone(), stat)
        };
        Self(later.0.iter().map(delta).collect())
    }

    /// The script calls (EVALSHA, and EVAL, the fallback on NOSCRIPT) and every command.
    pub fn script_counters(&self) -> ScriptCounters {
        let (evalsha, eval) = (self.get("evalsha"), self.get("eval"));
        ScriptCounters {
            script_calls: evalsha.calls + eval.calls,
            script_usec: evalsha.usec + eval.usec,
            all_calls: self.0.values().map(|stat| stat.calls).sum(),
        }
    }
}

/// Script calls, their time and every command of one or more masters (Cluster mode's
/// three counted as one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ScriptCounters {
    pub script_calls: u64,
    pub script_usec: u64,
    pub all_calls: u64,
}

impl ScriptCounters {
    pub fn sum(masters: &[Node]) -> Self {
        let all: Vec<Self> = masters
            .iter()
            .filter_map(|m| Some(m.command_stats().ok()?.script_counters()))
            .collect();
        Self {
            script_calls: all.iter().map(|c| c.script_calls).sum(),
            script_usec: all.iter().map(|c| c.script_usec).sum(),
            all_calls: all.iter().map(|c| c.all_calls).sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "# Commandstats\r\n\
        cmdstat_evalsha:calls=1000,usec=6200,usec_per_call=6.20,rejected_calls=0\r\n\
        cmdstat_eval:calls=2,usec=40,usec_per_call=20.00\r\n\
        cmdstat_info:calls=5,usec=100,usec_per_call=20.00\r\n";

    #[test]
    fn commandstats_are_parsed_by_command_and_scripts_add_eval_to_evalsha() {
        let stats = CommandStats::parse(INFO);
        assert_eq!(
            stats.get("evalsha"),
            CommandStat {
                calls: 1000,
                usec: 6200
            }
        );
        assert_eq!(stats.get("pexpire"), CommandStat::default());
        let counters = stats.script_counters();
        assert_eq!(
            counters,
            ScriptCounters {
                script_calls: 1002,
                script_usec: 6240,
                all_calls: 1007
            }
        );
    }

    #[test]
    fn a_delta_counts_commands_first_seen_later_from_zero() {
        let before = CommandStats::parse("cmdstat_evalsha:calls=10,usec=50\n");
        let after =
            CommandStats::parse("cmdstat_evalsha:calls=15,usec=80\ncmdstat_del:calls=1,usec=3\n");
        let delta = before.delta_until(&after);
        assert_eq!(delta.get("evalsha"), CommandStat { calls: 5, usec: 30 });
        assert_eq!(delta.get("del"), CommandStat { calls: 1, usec: 3 });
    }

    #[test]
    fn info_fields_are_found_by_name() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:2\r\n";
        assert_eq!(info_field(info, "connected_slaves"), Some("2"));
        assert_eq!(info_field(info, "master_host"), None);
    }
}
