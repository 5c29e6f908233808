//! Who may talk to what: the sentinels and data nodes want a password, the instances'
//! users may read the master from a sentinel and touch only their keys in Redis, and Nginx
//! is on a network without Redis.

use super::{DATA_NODES, SENTINELS, Topology};

impl Topology {
    pub fn sentinels_refuse_unauthenticated_commands(&self) {
        for sentinel in SENTINELS {
            for command in [
                "sentinel monitor evil 192.0.2.1 6379 2",
                "sentinel get-master-addr-by-name redis-master",
                "ping",
            ] {
                let mut args = vec!["env", "-u", "REDISCLI_AUTH", "redis-cli", "-p", "26379"];
                args.extend(command.split(' '));
                let answer = self.stack.exec(sentinel, &args);
                assert!(
                    answer.contains("NOAUTH"),
                    "{sentinel} answered {command:?} without a password: {answer}"
                );
            }
            let masters = self.sentinel_cli(sentinel, &["sentinel", "masters"]);
            assert!(
                !masters.lines().any(|line| line == "evil"),
                "{sentinel} monitors the fake master"
            );
        }
        eprintln!(
            "  ok: every sentinel refuses SENTINEL MONITOR, GET-MASTER-ADDR-BY-NAME and PING without a password (NOAUTH)"
        );
    }

    /// `command` (words) run by redis-cli in `service`'s container as the instances'
    /// user `ratelimiter`, with the password `password` names, on `port`.
    fn cli_as_instances(&self, service: &str, port: &str, password: &str, command: &str) -> String {
        let auth = format!("REDISCLI_AUTH={}", self.stack.passwords[password]);
        let mut args = vec![
            "env",
            &auth,
            "redis-cli",
            "-p",
            port,
            "--user",
            "ratelimiter",
        ];
        args.extend(command.split(' '));
        self.stack.exec(service, &args)
    }

    pub fn the_instances_sentinel_user_cannot_reconfigure_a_sentinel(&self) {
        for sentinel in SENTINELS {
            let as_instances = |command: &str| {
                self.cli_as_instances(sentinel, "26379", "SENTINEL_SERVICE_PASSWORD", command)
            };
            let view = as_instances("sentinel master redis-master");
            assert!(
                view.lines().any(|line| line == "config-epoch"),
                "{sentinel} does not show the instances' user the master: {view}"
            );
            for command in [
                "sentinel monitor evil 192.0.2.1 6379 2",
                "sentinel set redis-master quorum 1",
                "sentinel failover redis-master",
                "sentinel remove redis-master",
            ] {
                let answer = as_instances(command);
                assert!(
                    answer.contains("NOPERM"),
                    "{sentinel} let the instances' user send {command:?}: {answer}"
                );
            }
        }
        eprintln!(
            "  ok: every sentinel shows the instances' user the master, and refuses it SENTINEL MONITOR, SET, FAILOVER and REMOVE (NOPERM)"
        );
    }

    pub fn the_instances_redis_user_touches_only_its_keys(&self) {
        let master = self.current_master();
        let as_instances =
            |command: &str| self.cli_as_instances(&master, "6379", "REDIS_PASSWORD", command);
        for command in [
            "flushall",
            "config set maxmemory 1",
            "replicaof 192.0.2.1 6379",
            "set elsewhere:x 1",
            "del elsewhere:x",
            "scan 0",
        ] {
            let answer = as_instances(command);
            assert!(
                answer.contains("NOPERM"),
                "the instances' user was not refused {command:?}: {answer}"
            );
        }
        assert_eq!(
            as_instances("ping").trim(),
            "PONG",
            "the instances' user cannot PING"
        );
        let anonymous = self.stack.exec(
            &master,
            &["env", "-u", "REDISCLI_AUTH", "redis-cli", "ping"],
        );
        assert!(
            anonymous.contains("NOAUTH"),
            "the master answers without a password: {anonymous}"
        );
        eprintln!(
            "  ok: the instances' user is refused FLUSHALL, CONFIG SET, REPLICAOF and keys outside ratelimit:"
        );
    }

    pub fn nginx_neither_resolves_nor_reaches_redis(&self) {
        let nodes = DATA_NODES.iter().map(|node| (*node, 6379));
        let sentinels = SENTINELS.iter().map(|sentinel| (*sentinel, 26379));
        let targets: Vec<(&str, u16)> = nodes.chain(sentinels).collect();
        self.stack.assert_unreachable_from("nginx", &targets);
        eprintln!("  ok: from the Nginx container no data node or sentinel resolves or connects");
    }
}
