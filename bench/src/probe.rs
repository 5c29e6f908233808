//! What the processes under test answer: a GET on loopback, an instance's `/metrics`,
//! Nginx's access log, wrk's JSON line (scripts/bench/report.lua); and an instance started
//! alone on a port of its choosing.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::LOOPBACK;
use crate::process::{Records, Started, tail, wait_until};

/// GET `path` from `LOOPBACK:port` within 5 s.
pub fn get(port: u16, path: &str) -> Result<minreq::Response> {
    let url = format!("http://{LOOPBACK}:{port}{path}");
    let sent = minreq::get(&url).with_timeout(5).send();
    sent.with_context(|| format!("GET {url}"))
}

pub fn status(port: u16, path: &str) -> Option<i32> {
    get(port, path).ok().map(|r| r.status_code)
}

pub fn json(port: u16, path: &str) -> Result<serde_json::Value> {
    let body = get(port, path)?;
    serde_json::from_str(body.as_str()?).with_context(|| format!("GET {path} on {port}: not JSON"))
}

pub fn port_open(port: u16) -> bool {
    let address = (std::net::Ipv4Addr::LOCALHOST, port).into();
    std::net::TcpStream::connect_timeout(&address, Duration::from_millis(500)).is_ok()
}

/// Starts the service binary `bin` with only PATH, HOME and `settings` (`NAME=value`
/// words) on a port of its choosing (PORT=0), and waits until it logs that port and
/// answers /ready.
pub fn start_instance(
    records: &Records,
    name: &str,
    bin: &Path,
    settings: &str,
    log: &Path,
) -> Result<(Started, u16)> {
    let mut command = Command::new(bin);
    let path = std::env::var_os("PATH").unwrap_or_default();
    command.env_clear().env("PATH", path).env("HOME", "/");
    let settings = format!("RUST_LOG=info HOST={LOOPBACK} PORT=0 {settings}");
    let command = command.envs(crate::env_pairs(&settings));
    let mut instance = Started::spawn(records, name, command, log)?;
    let mut port = None;
    let what = "the instance logs its port and answers /ready";
    wait_until(what, Duration::from_secs(15), || {
        port = listening_port(&std::fs::read_to_string(log).unwrap_or_default());
        !instance.running() || port.is_some_and(|p| status(p, "/ready") == Some(200))
    })?;
    let port = port.filter(|_| instance.running());
    let port = port.with_context(|| format!("it exited: {}", tail(log, 5)))?;
    Ok((instance, port))
}

/// The port of the instance's "listening on port N" log line.
fn listening_port(log: &str) -> Option<u16> {
    let rest = log.split("listening on port ").nth(1)?;
    let digits = rest.split(|c: char| !c.is_ascii_digit()).next()?;
    digits.parse().ok()
}

/// Responses by status: 200, 429, anything else, and 499 (a client, the load generator
/// at its end, closed the connection first), as Nginx's log or an instance counted them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    pub ok: u64,
    pub denied: u64,
    pub other: u64,
    pub closed: u64,
}

impl Counts {
    fn add(&mut self, status: &str, n: u64) {
        *match status {
            "200" => &mut self.ok,
            "429" => &mut self.denied,
            "499" => &mut self.closed,
            _ => &mut self.other,
        } += n;
    }

    pub fn total(&self) -> u64 {
        self.ok + self.denied + self.other
    }

    pub fn minus(&self, earlier: &Self) -> Self {
        Self {
            ok: self.ok.saturating_sub(earlier.ok),
            denied: self.denied.saturating_sub(earlier.denied),
            other: self.other.saturating_sub(earlier.other),
            closed: self.closed.saturating_sub(earlier.closed),
        }
    }

    /// What `ratelimit_http_requests_total{route, status}` of an instance's /metrics
    /// says about `route`.
    pub fn from_metrics(metrics: &str, route: &str) -> Self {
        let mut counts = Self::default();
        let route = format!("route=\"{route}\"");
        let name = "ratelimit_http_requests_total{";
        let series = metrics.lines().filter(|l| l.starts_with(name));
        for (labels, value) in series.filter_map(|line| line.rsplit_once(' ')) {
            let labels: Vec<&str> = labels.split(['{', ',', '}']).collect();
            if labels.contains(&route.as_str()) {
                let status = labels
                    .iter()
                    .find_map(|l| l.strip_prefix("status=\"")?.strip_suffix('"'));
                let n = value.parse::<f64>().unwrap_or(0.0) as u64;
                counts.add(status.unwrap_or("?"), n);
            }
        }
        counts
    }

    /// What an instance on `port` counted for `route`; an error when its /metrics does
    /// not answer, so that a count of nothing is never a read that failed.
    pub fn of_instance(port: u16, route: &str) -> Result<Self> {
        Ok(Self::from_metrics(get(port, "/metrics")?.as_str()?, route))
    }

    /// The statuses of an access log's lines (combined format: the status follows the
    /// request's closing quote) after byte `offset`.
    pub fn from_access_log(log: &Path, offset: u64) -> Result<Self> {
        let mut counts = Self::default();
        let Ok(mut file) = File::open(log) else {
            return Ok(counts);
        };
        file.seek(SeekFrom::Start(offset))?;
        for line in BufReader::new(file).lines() {
            let line = line?;
            let status = line
                .split('"')
                .nth(2)
                .and_then(|rest| rest.split_whitespace().next());
            counts.add(status.unwrap_or("?"), 1);
        }
        Ok(counts)
    }
}

/// wrk's summary, as scripts/bench/report.lua prints it: one line of JSON after wrk's own.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct WrkReport {
    pub requests: u64,
    pub duration_us: u64,
    /// `p50`, `p99` and `max`.
    pub latency_us: BTreeMap<String, f64>,
    /// `connect`, `read`, `write` and `timeout` errors, and `status`: responses of status
    /// 400 or more.
    pub errors: BTreeMap<String, u64>,
}

impl WrkReport {
    /// The report in wrk's output: its last line that is a JSON object.
    pub fn from_output(output: &str) -> Result<Self> {
        let line = output.lines().rev().find(|l| l.starts_with('{'));
        let line = line.context("no JSON line from scripts/bench/report.lua in wrk's output")?;
        serde_json::from_str(line).with_context(|| format!("cannot read wrk's report {line:?}"))
    }

    /// p50, p99 and max, in ms.
    pub fn latency_ms(&self) -> [f64; 3] {
        ["p50", "p99", "max"].map(|p| self.latency_us.get(p).copied().unwrap_or(0.0) / 1e3)
    }

    /// Responses of status 400 or more.
    pub fn status_errors(&self) -> u64 {
        self.errors.get("status").copied().unwrap_or(0)
    }

    /// Connect, read, write and timeout errors: requests that got no answer.
    pub fn socket_errors(&self) -> u64 {
        self.errors.values().sum::<u64>() - self.status_errors()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_status_from_metrics_and_from_an_access_log() {
        let metrics = "# TYPE ratelimit_http_requests_total counter\n\
            ratelimit_http_requests_total{route=\"/limited_endpoint\",status=\"200\"} 120\n\
            ratelimit_http_requests_total{route=\"/limited_endpoint\",status=\"429\"} 30\n\
            ratelimit_http_requests_total{route=\"/limited_endpoint\",status=\"503\"} 2\n\
            ratelimit_http_requests_total{route=\"/\",status=\"200\"} 999\n";
        let counts = |c: Counts| [c.ok, c.denied, c.other, c.closed];
        let limited = Counts::from_metrics(metrics, "/limited_endpoint");
        assert_eq!(counts(limited), [120, 30, 2, 0]);
        assert_eq!(Counts::from_metrics(metrics, "/").total(), 999);
        let path = std::env::temp_dir().join(format!("bench-access-{}.log", std::process::id()));
        let line = |status| {
            format!(
                "127.0.0.1 - - [27/Nov/2026:11:49:00 +0000] \"GET / HTTP/1.1\" {status} 0 \"-\" \"-\"\n"
            )
        };
        std::fs::write(&path, ["200", "429", "499", "502"].map(line).concat()).unwrap();
        let all = Counts::from_access_log(&path, 0).unwrap();
        let after_first = Counts::from_access_log(&path, line("200").len() as u64).unwrap();
        assert_eq!(counts(all), [1, 1, 1, 1]);
        assert_eq!(counts(all.minus(&after_first)), [1, 0, 0, 0]);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn wrks_report_line_and_the_instances_port_are_found_in_their_output() {
        let output = "Running 5s test @ http://127.0.0.1:8000/\nRequests/sec:  40167.20\n\
            {\"requests\": 200836, \"duration_us\": 5000012, \"latency_us\": {\"p50\": 1470, \"p99\": 3120, \"max\": 11340}, \"errors\": {\"connect\": 0, \"read\": 1, \"write\": 0, \"timeout\": 2, \"status\": 7}}\n";
        let report = WrkReport::from_output(output).unwrap();
        let errors = (report.socket_errors(), report.status_errors());
        assert_eq!((report.requests, errors), (200_836, (3, 7)));
        assert_eq!(report.latency_ms(), [1.47, 3.12, 11.34]);
        assert!(WrkReport::from_output("unable to connect\n").is_err());
        let log = "[.. INFO ratelimiter] starting\n[.. INFO ratelimiter] listening on port 41234\n";
        assert_eq!(listening_port(log), Some(41234));
        assert_eq!(listening_port("starting\n"), None);
    }
}
