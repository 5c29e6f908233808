//! Redis, as the benchmark asks it: `INFO commandstats` parsed into counters, `ROLE`,
//! `SCRIPT LOAD`, `DBSIZE`. Every call opens its own short-lived connection with a
//! timeout, so a node that restarted between phases, or is gone, costs one failed call.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use redis::IntoConnectionInfo;

use crate::LOOPBACK;

const TIMEOUT: Duration = Duration::from_secs(5);

/// A data node: its port and the password of its default (operators') user.
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

    fn connection(&self) -> Result<redis::Connection> {
        let info = redis::ConnectionAddr::Tcp(LOOPBACK.into(), self.port)
            .into_connection_info()
            .context("bad Redis address")?;
        // No CLIENT SETINFO on connect: the benchmark counts the commands Redis sees.
        let mut settings = info.redis_settings().clone().set_skip_set_lib_name();
        if let Some(password) = &self.password {
            settings = settings.set_password(password);
        }
        let info = info.set_redis_settings(settings);
        let client = redis::Client::open(info).context("bad Redis address")?;
        let connection = client
            .get_connection_with_timeout(TIMEOUT)
            .with_context(|| format!("cannot reach Redis on port {}", self.port))?;
        connection.set_read_timeout(Some(TIMEOUT))?;
        connection.set_write_timeout(Some(TIMEOUT))?;
        Ok(connection)
    }

    fn query<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> Result<T> {
        let mut connection = self.connection()?;
        command
            .query(&mut connection)
            .with_context(|| format!("Redis on port {}", self.port))
    }

    pub fn info(&self, section: &str) -> Result<String> {
        self.query(redis::cmd("INFO").arg(section))
    }

    pub fn command_stats(&self) -> Result<CommandStats> {
        Ok(CommandStats::parse(&self.info("commandstats")?))
    }

    /// `master`, `slave` or `sentinel`.
    pub fn role(&self) -> Result<String> {
        let reply: Vec<redis::Value> = self.query(&redis::cmd("ROLE"))?;
        match reply.first() {
            Some(redis::Value::BulkString(bytes)) => Ok(String::from_utf8_lossy(bytes).into()),
            Some(redis::Value::SimpleString(text)) => Ok(text.clone()),
            other => bail!("ROLE answered {other:?}"),
        }
    }

    pub fn script_load(&self, script: &str) -> Result<String> {
        self.query(redis::cmd("SCRIPT").arg("LOAD").arg(script))
    }

    pub fn dbsize(&self) -> Result<u64> {
        self.query(&redis::cmd("DBSIZE"))
    }

    pub fn ping(&self) -> bool {
        self.query::<String>(&redis::cmd("PING"))
            .is_ok_and(|reply| reply == "PONG")
    }

    /// A sentinel's `SENTINEL GET-MASTER-ADDR-BY-NAME`: the master's port (every node of
    /// the topology is on loopback).
    pub fn sentinel_master_port(&self, master_name: &str) -> Result<u16> {
        let reply: Vec<String> = self.query(
            redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(master_name),
        )?;
        let port = reply
            .get(1)
            .with_context(|| format!("sentinel on port {} named no master", self.port))?;
        port.parse()
            .with_context(|| format!("sentinel on port {} named port {port:?}", self.port))
    }

    pub fn del(&self, keys: &[&str]) -> Result<u64> {
        self.query(redis::cmd("DEL").arg(keys))
    }
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
                .and_then(|rest| rest.split_once(':'))
            else {
                continue;
            };
            let mut stat = CommandStat::default();
            for field in fields.split(',') {
                match field.split_once('=') {
                    Some(("calls", value)) => stat.calls = value.parse().unwrap_or(0),
                    Some(("usec", value)) => stat.usec = value.parse().unwrap_or(0),
                    _ => {}
                }
            }
            stats.insert(name.to_owned(), stat);
        }
        Self(stats)
    }

    pub fn get(&self, name: &str) -> CommandStat {
        self.0.get(name).copied().unwrap_or_default()
    }

    /// What happened between `self` and `later`, command by command.
    pub fn delta_until(&self, later: &Self) -> Self {
        Self(
            later
                .0
                .iter()
                .map(|(name, after)| {
                    let before = self.get(name);
                    let delta = CommandStat {
                        calls: after.calls.saturating_sub(before.calls),
                        usec: after.usec.saturating_sub(before.usec),
                    };
                    (name.clone(), delta)
                })
                .collect(),
        )
    }

    /// The script calls (EVALSHA, and EVAL, the fallback on NOSCRIPT) and every command.
    pub fn script_counters(&self) -> ScriptCounters {
        let evalsha = self.get("evalsha");
        let eval = self.get("eval");
        ScriptCounters {
            script_calls: evalsha.calls + eval.calls,
            script_usec: evalsha.usec + eval.usec,
            all_calls: self.0.values().map(|stat| stat.calls).sum(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ScriptCounters {
    pub script_calls: u64,
    pub script_usec: u64,
    pub all_calls: u64,
}

impl ScriptCounters {
    /// Both counted together: the masters of a Redis Cluster as one.
    pub fn plus(&self, other: &Self) -> Self {
        Self {
            script_calls: self.script_calls + other.script_calls,
            script_usec: self.script_usec + other.script_usec,
            all_calls: self.all_calls + other.all_calls,
        }
    }

    pub fn delta_until(&self, later: &Self) -> Self {
        Self {
            script_calls: later.script_calls.saturating_sub(self.script_calls),
            script_usec: later.script_usec.saturating_sub(self.script_usec),
            all_calls: later.all_calls.saturating_sub(self.all_calls),
        }
    }
}

/// A field of an `INFO` section (`connected_slaves`, `role`, ...).
pub fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.trim_end().strip_prefix(name)?.strip_prefix(':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "# Commandstats\r\n\
        cmdstat_evalsha:calls=1000,usec=6200,usec_per_call=6.20,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_eval:calls=2,usec=40,usec_per_call=20.00,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_hmget:calls=1002,usec=300,usec_per_call=0.30,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_info:calls=5,usec=100,usec_per_call=20.00,rejected_calls=0,failed_calls=0\r\n";

    #[test]
    fn commandstats_are_parsed_by_command() {
        let stats = CommandStats::parse(INFO);
        assert_eq!(
            stats.get("evalsha"),
            CommandStat {
                calls: 1000,
                usec: 6200
            }
        );
        assert_eq!(stats.get("hmget").usec, 300);
        assert_eq!(stats.get("pexpire"), CommandStat::default());
    }

    #[test]
    fn script_counters_add_eval_to_evalsha_and_count_every_command() {
        let counters = CommandStats::parse(INFO).script_counters();
        assert_eq!(
            counters,
            ScriptCounters {
                script_calls: 1002,
                script_usec: 6240,
                all_calls: 2009
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
        assert_eq!(info_field(info, "role"), Some("master"));
        assert_eq!(info_field(info, "master_host"), None);
    }
}
