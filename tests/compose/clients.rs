//! Clients of a stack and what they saw. A client that needs an address of its own is a
//! container at a fixed address on the stack's network running curl (each request's
//! `--write-out` line is a [`Reply`]); one on this host goes through a published port.
//! [`Stream`] is a steady stream of requests while a node is killed or cut off.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use testkit::header;

use crate::process::{docker, docker_ok, run, text};
use crate::stack::{BASE_IMAGE, Stack};

/// What curl writes after each request: `STATUS|INSTANCE|SOURCE` (`000` when it failed).
const WRITE_OUT: &str = "%{http_code}|%header{x-instance}|%header{x-ratelimit-source}\n";

/// One answer, as a client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    /// The instance that answered (`X-Instance`); empty when the upstream did.
    pub instance: String,
    /// Who decided (`X-RateLimit-Source`): `redis`, `local`, `gateway-closed`, ...
    pub source: String,
}

impl Reply {
    pub async fn of(response: reqwest::Response) -> Reply {
        Reply {
            status: response.status().as_u16(),
            instance: header(&response, "x-instance"),
            source: header(&response, "x-ratelimit-source"),
        }
    }
}

/// The replies in curl's `--write-out` lines.
pub fn parse(lines: &str) -> Vec<Reply> {
    lines
        .lines()
        .filter_map(|line| {
            let mut fields = line.trim().splitn(3, '|');
            let status = fields.next()?.parse().ok()?;
            Some(Reply {
                status,
                instance: fields.next().unwrap_or("").to_string(),
                source: fields.next().unwrap_or("").to_string(),
            })
        })
        .collect()
}

/// `count` requests in a row to `url` from a new container at `address` on `network`,
/// each with `extra` curl arguments (headers).
pub fn requests_from(
    stack: &Stack,
    network: &str,
    address: &str,
    count: usize,
    url: &str,
    extra: &[&str],
) -> Vec<Reply> {
    let mut command = Command::new("docker");
    command
        .args(["run", "--rm"])
        .args(stack.client_args(network, address));
    command.args([BASE_IMAGE, "curl", "-s", "--max-time", "5", "-w", WRITE_OUT]);
    command.args(extra);
    for _ in 0..count {
        command.args(["-o", "/dev/null", url]);
    }
    let output = run(&mut command, Duration::from_secs(60 + 5 * count as u64));
    let replies = parse(&String::from_utf8_lossy(&output.stdout));
    assert_eq!(replies.len(), count, "client {address}: {}", text(&output));
    replies
}

/// One `curl -s ARGS` from a new container at `address` on `network`: what it printed.
pub fn curl_from(stack: &Stack, network: &str, address: &str, args: &[&str]) -> String {
    let mut command = Command::new("docker");
    command
        .args(["run", "--rm"])
        .args(stack.client_args(network, address));
    command
        .args([BASE_IMAGE, "curl", "-s", "--max-time", "10"])
        .args(args);
    text(&run(&mut command, Duration::from_secs(60)))
}

/// The statuses, for messages.
pub fn statuses(replies: &[Reply]) -> String {
    let all: Vec<String> = replies.iter().map(|r| r.status.to_string()).collect();
    all.join(" ")
}

/// `limit` 200s then 429s, every one decided by Redis, answered by each of `instances`.
pub fn assert_exact(who: &str, replies: &[Reply], limit: usize, instances: &[&str]) {
    let admitted = replies.iter().take_while(|r| r.status == 200).count();
    assert!(
        admitted == limit && replies[limit..].iter().all(|r| r.status == 429),
        "{who}: expected {limit} × 200 then 429s, got {}",
        statuses(replies)
    );
    assert!(
        replies.iter().all(|r| r.source == "redis"),
        "{who}: not every decision by Redis: {replies:?}"
    );
    let answered: BTreeSet<&str> = replies.iter().map(|r| r.instance.as_str()).collect();
    let expected: BTreeSet<&str> = instances.iter().copied().collect();
    assert_eq!(answered, expected, "{who}: answered by {answered:?}");
    eprintln!(
        "  ok: {who}: {limit} × 200 then {} × 429, decided by Redis, answered by {}",
        replies.len() - limit,
        instances.join(" and ")
    );
}

/// After a fault: clients, one after another (`attempt` makes one's requests), until one
/// is decided by Redis alone, which must then get exactly `limit` from each of `instances`.
/// An attempt the instances decided partly with FAIL_MODE (Redis or the sentinels did not
/// answer within the instances' timeout, as seen for seconds after a partition's failover
/// on a shared machine) proves nothing either way; after 30 s of those, the last one fails.
pub async fn assert_exact_once_redis_decides(
    who: &str,
    limit: usize,
    instances: &[&str],
    mut attempt: impl FnMut() -> (String, Vec<Reply>),
) {
    let started = Instant::now();
    loop {
        let (client, replies) = attempt();
        let fallback = replies.iter().filter(|r| r.source != "redis").count();
        if fallback == 0 || started.elapsed() > Duration::from_secs(30) {
            assert_exact(
                &format!("{who}, client {client}"),
                &replies,
                limit,
                instances,
            );
            return;
        }
        eprintln!(
            "   {who}, client {client}: {fallback} of {} decided without Redis; again with another client",
            replies.len()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// A steady stream of requests to `url`, 20 a second for at most two minutes, from a
/// container at a fixed address; curl writes its lines to stderr, which is not buffered,
/// so none is lost when the container is stopped.
pub struct Stream {
    container: String,
    started: Instant,
}

impl Stream {
    pub fn start(stack: &Stack, network: &str, address: &str, url: &str) -> Stream {
        let mut args = vec!["run".to_string(), "--detach".to_string()];
        args.extend(stack.client_args(network, address));
        let write_out = format!("%{{stderr}}{WRITE_OUT}");
        let glob = format!("{url}?n=[1-2400]");
        args.extend(
            [
                BASE_IMAGE,
                "curl",
                "-s",
                "--rate",
                "20/s",
                "--max-time",
                "3",
                "-o",
                "/dev/null",
            ]
            .map(str::to_string),
        );
        args.extend(["-w".to_string(), write_out, glob]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Stream {
            container: docker_ok(&args),
            started: Instant::now(),
        }
    }

    /// Stops the stream; every request must have been answered, none with a 5xx.
    pub fn assert_served(self) {
        let _ = docker(&["stop", "--time", "1", &self.container]);
        let logs = docker(&["logs", &self.container]);
        let _ = docker(&["rm", "--force", &self.container]);
        let replies = parse(&String::from_utf8_lossy(&logs.stderr));
        let seconds = self.started.elapsed().as_secs_f64();
        let mut counts = std::collections::BTreeMap::new();
        for reply in &replies {
            *counts
                .entry(format!("{}/{}", reply.status, reply.source))
                .or_insert(0) += 1;
        }
        assert!(
            replies.len() >= 20,
            "the stream made only {} requests in {seconds:.0} s: {}",
            replies.len(),
            text(&logs)
        );
        let bad = replies
            .iter()
            .filter(|r| !(200..500).contains(&r.status))
            .count();
        assert_eq!(
            bad,
            0,
            "{bad} of {} requests of the stream failed or got a 5xx: {counts:?}",
            replies.len()
        );
        eprintln!(
            "  ok: stream: {} requests in {seconds:.0} s, none failed, no 5xx ({counts:?})",
            replies.len()
        );
    }
}

#[test]
fn write_out_lines_become_replies_even_without_an_instance() {
    let replies = parse("200|app-1|redis\n429||redis\n000||\n");
    assert_eq!(
        replies,
        vec![
            Reply {
                status: 200,
                instance: "app-1".into(),
                source: "redis".into()
            },
            Reply {
                status: 429,
                instance: "".into(),
                source: "redis".into()
            },
            Reply {
                status: 0,
                instance: "".into(),
                source: "".into()
            },
        ]
    );
}
