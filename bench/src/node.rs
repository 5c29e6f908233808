//! Redis as the benchmark asks it: `INFO` (commandstats read into counters), its role, a
//! sentinel's master, any other command. Every call opens its own short-lived connection
//! with a timeout, so a node that restarted, or is gone, costs one failed call.

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
        let password = password.map(str::to_owned);
        Self { port, password }
    }

    pub fn query<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> Result<T> {
        let info = redis::ConnectionAddr::Tcp(LOOPBACK.into(), self.port).into_connection_info()?;
        // No CLIENT SETINFO on connect: the benchmark counts the commands Redis sees.
        let mut settings = info.redis_settings().clone().set_skip_set_lib_name();
        if let Some(password) = &self.password {
            settings = settings.set_password(password);
        }
        let client = redis::Client::open(info.set_redis_settings(settings))?;
        let mut connection = client.get_connection_with_timeout(TIMEOUT)?;
        connection.set_read_timeout(Some(TIMEOUT))?;
        let answer = command.query(&mut connection);
        answer.with_context(|| format!("Redis on port {}", self.port))
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

    /// A sentinel's `SENTINEL GET-MASTER-ADDR-BY-NAME`: the master's port.
    pub fn sentinel_master_port(&self, master_name: &str) -> Option<u16> {
        let command = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(master_name)
            .clone();
        let reply: Vec<String> = self.query(&command).ok()?;
        reply.get(1)?.parse().ok()
    }
}

/// A field of an `INFO` reply.
pub fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.trim_end().strip_prefix(name)?.strip_prefix(':'))
}

/// `INFO commandstats`: calls and usec by command name (lower case, without `cmdstat_`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CommandStats(pub BTreeMap<String, (u64, u64)>);

impl CommandStats {
    pub fn parse(info: &str) -> Self {
        let stat = |line: &str| {
            let (name, fields) = line.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let field = |key: &str| {
                let mut values = fields.split(',');
                values.find_map(|f| f.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
            };
            let counters = (field("calls").unwrap_or(0), field("usec").unwrap_or(0));
            Some((name.to_owned(), counters))
        };
        Self(info.lines().filter_map(stat).collect())
    }

    /// Calls and usec of a command.
    pub fn get(&self, name: &str) -> (u64, u64) {
        self.0.get(name).copied().unwrap_or_default()
    }

    /// Calls and usec of the script: EVALSHA, and EVAL, the fallback on NOSCRIPT.
    pub fn scripts(&self) -> (u64, u64) {
        let ((evalsha, evalsha_usec), (eval, eval_usec)) = (self.get("evalsha"), self.get("eval"));
        (evalsha + eval, evalsha_usec + eval_usec)
    }
}

/// The script's calls and usec on `masters` together (Cluster mode's three count as one);
/// an error when a master does not answer, so that no call counted is never a failed read.
pub fn script_calls(masters: &[Node]) -> Result<(u64, u64)> {
    let (mut calls, mut usec) = (0, 0);
    for master in masters {
        let (c, u) = master.command_stats()?.scripts();
        (calls, usec) = (calls + c, usec + u);
    }
    Ok((calls, usec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commandstats_are_read_by_command_and_the_script_adds_eval_to_evalsha() {
        let stats = CommandStats::parse(
            "# Commandstats\r\ncmdstat_evalsha:calls=1010,usec=6250,usec_per_call=6.20,rejected_calls=0\r\n\
             cmdstat_eval:calls=2,usec=40,usec_per_call=20.00\r\ncmdstat_info:calls=5,usec=100\r\n",
        );
        let counters = [stats.get("evalsha"), stats.get("info"), stats.get("del")];
        assert_eq!(counters, [(1010, 6250), (5, 100), (0, 0)]);
        assert_eq!(stats.scripts(), (1012, 6290));
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:2\r\n";
        let fields = [
            info_field(info, "connected_slaves"),
            info_field(info, "master_host"),
        ];
        assert_eq!(fields, [Some("2"), None]);
    }
}
