//! Flags, and their validation into one [`Config`] before anything is sent.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use reqwest::Url;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use crate::schedule::Rate;
use crate::sources::{self, Sources};
use loadtest::policy::PolicyFlags;

pub const DEFAULT_URL: &str = "http://127.0.0.1:8000/limited_endpoint";
/// The first instance's gRPC port in the native topology (`scripts/ports.env`).
pub const DEFAULT_GRPC_URL: &str = "http://127.0.0.1:8051";
/// Descriptors one `ShouldRateLimit` call may carry here: Envoy sends a few per request.
pub const MAX_DESCRIPTORS: usize = 8;
/// What `{client}` in a descriptor's value becomes: the client's source address.
pub const CLIENT_PLACEHOLDER: &str = "{client}";
pub const DEFAULT_SOURCES: &str = "127.0.0.10-127.0.0.250";
/// The longest run accepted: a load test is a measurement, not a soak.
pub const MAX_DURATION: Duration = Duration::from_secs(600);
pub const MAX_REQUESTS: u64 = 100_000_000;
pub const MAX_CONNECTIONS: u32 = 4096;
/// Offered rate when neither `--rate` nor `--connections` is given.
const DEFAULT_RATE: &str = "200";

const EXAMPLES: &str = "\
Examples:
  loadtest                                        200 req/s for 10 s from 241 clients
  loadtest --rate 1000 --duration 30s --plot load.png --json load.json
  loadtest --connections 64 --duration 5s         flat out over 64 connections
  loadtest --sources 127.0.0.10-20 --rate 50 --check
  loadtest --url http://127.0.0.1:18000/limited_endpoint --limit 10 --window 60
  loadtest --domain edge --descriptor 'remote_address={client}'
                                                  ShouldRateLimit on 127.0.0.1:8051, a
                                                  descriptor per client
  loadtest --domain edge --descriptor 'remote_address={client}' \
           --descriptor 'generic_key=login' --connections 32 --duration 5s

Exit codes: 0 done; 1 the run failed (cannot connect, write a file...);
2 bad flags; 3 --check found a client outside its bound; 130 interrupted
(the summary still covers what was sent).";

/// Drives an HTTP endpoint, or Envoy's rate-limit service (`ShouldRateLimit`), on this
/// machine from many client addresses and reports what the rate limiter admitted.
#[derive(Debug, Parser)]
#[command(name = "loadtest", version, after_help = EXAMPLES)]
pub struct Cli {
    /// URL to request (default http://127.0.0.1:8000/limited_endpoint), or with --domain
    /// the gRPC port to call (default http://127.0.0.1:8051); its host must be this
    /// machine (a loopback address).
    #[arg(long)]
    url: Option<String>,

    /// Call `ShouldRateLimit` of this domain instead of sending GET requests; what each
    /// call carries is given by --descriptor.
    #[arg(long, requires = "descriptors")]
    domain: Option<String>,

    /// With --domain: one descriptor of each call, its entries as "key=value,key=value";
    /// repeatable (in order, at most 8). `{client}` in a value becomes the client's source
    /// address, so each client has a bucket of its own.
    #[arg(long = "descriptor", value_name = "KEY=VALUE,...", value_parser = parse_descriptor, requires = "domain")]
    descriptors: Vec<Vec<(String, String)>>,

    /// Client source addresses: comma-separated addresses, ranges (127.0.0.10-127.0.0.250
    /// or 127.0.0.10-250) or CIDR blocks (127.0.1.0/24); loopback only. Each address is
    /// one client with its own keep-alive connections.
    #[arg(long, default_value = DEFAULT_SOURCES, value_parser = sources::parse)]
    sources: Sources,

    /// Offered rate in requests per second, kept on a clock whatever the server does
    /// (open model). Requests go to the sources in turn. The default mode, at 200/s.
    #[arg(long, value_parser = Rate::parse, conflicts_with = "connections")]
    rate: Option<Rate>,

    /// Flat out instead: this many connections, each sending its next request as soon
    /// as the previous one is answered (closed model).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_CONNECTIONS)))]
    connections: Option<u32>,

    /// How long to send: 10, 10s, 500ms or 2m; at most 10 minutes.
    #[arg(long, default_value = "10s", value_parser = parse_run_duration)]
    duration: Duration,

    /// Stop sending after this many requests, whichever comes first with --duration.
    /// With --rate this counts scheduled sends, missed ones included.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..=MAX_REQUESTS))]
    max_requests: u64,

    /// Give up on one request after this long (it then counts as an error).
    #[arg(long, default_value = "5s", value_parser = parse_timeout)]
    timeout: Duration,

    /// With --rate: at most this many requests in flight; a send due while the cap is
    /// reached is skipped and counted as missed.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_in_flight: u64,

    /// Tokens a client earns per --window (RATE_LIMIT); sets the refill rate, and the
    /// burst when neither --burst nor the header gives one. Overrides the header.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    limit: Option<u64>,

    /// The window of --limit (TIME_WINDOW), e.g. 60 or 60s. Overrides the header's w.
    #[arg(long, value_parser = parse_window)]
    window: Option<Duration>,

    /// Burst capacity (BURST). Overrides the header's q.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    burst: Option<u64>,

    /// Extra request header, "Name: value"; repeatable.
    #[arg(long = "header", short = 'H', value_name = "NAME: VALUE", value_parser = parse_header)]
    headers: Vec<(HeaderName, HeaderValue)>,

    /// Also write the summary, with every client and second, as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,

    /// Draw admitted and rejected responses per second as a PNG picture in FILE.
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,

    /// TrueType font for the plot's text (default: DejaVu Sans or Liberation Sans from
    /// the usual system folders).
    #[arg(long, value_name = "FILE")]
    font: Option<PathBuf>,

    /// Print every client, not only those outside their bound.
    #[arg(long)]
    clients: bool,

    /// Exit with 3 unless the policy is known and every client's admissions are within
    /// its bound (see the summary's "admitted" line).
    #[arg(long)]
    check: bool,
}

/// What each request is.
#[derive(Debug, Clone)]
pub enum Target {
    /// A GET of the URL with these extra headers.
    Http { headers: HeaderMap },
    /// `ShouldRateLimit` at the URL's host and port.
    Rls(RlsCall),
}

/// One `ShouldRateLimit` call, before `{client}` is filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RlsCall {
    pub domain: String,
    /// Each descriptor's entries, in order.
    pub descriptors: Vec<Vec<(String, String)>>,
}

/// How requests are offered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Rate(Rate),
    Connections(u32),
}

/// A validated run: every field is usable as it is.
#[derive(Debug)]
pub struct Config {
    pub url: Url,
    /// Where the URL's host is pinned, so every client reaches the same address family
    /// as its source address (a v4 source is silently not bound for a v6 destination).
    pub pinned: Option<(String, SocketAddr)>,
    pub sources: Sources,
    pub mode: Mode,
    pub duration: Duration,
    pub max_requests: u64,
    pub timeout: Duration,
    pub max_in_flight: u64,
    pub policy_flags: PolicyFlags,
    pub target: Target,
    pub json: Option<PathBuf>,
    pub plot: Option<PathBuf>,
    pub font: Option<PathBuf>,
    pub show_clients: bool,
    pub check: bool,
}

impl Cli {
    /// Checks what clap cannot check flag by flag: the target and the source family.
    pub fn into_config(self) -> Result<Config, String> {
        let default_url = match self.domain {
            Some(_) => DEFAULT_GRPC_URL,
            None => DEFAULT_URL,
        };
        let text = self.url.as_deref().unwrap_or(default_url);
        let url = Url::parse(text).map_err(|e| format!("--url {text:?}: {e}"))?;
        if url.scheme() != "http" {
            return Err(format!("--url {url}: only http:// is supported"));
        }
        let family_v4 = self.sources.is_ipv4();
        let pinned = pin_target(&url, family_v4)?;
        let mode = match (self.rate, self.connections) {
            (_, Some(connections)) => Mode::Connections(connections),
            (Some(rate), None) => Mode::Rate(rate),
            (None, None) => Mode::Rate(Rate::parse(DEFAULT_RATE)?),
        };
        let target = match self.domain {
            Some(domain) => {
                if !self.headers.is_empty() {
                    return Err("--header applies to HTTP requests, not with --domain".into());
                }
                if domain.is_empty() {
                    return Err("--domain: an empty domain is refused by the service".into());
                }
                if self.descriptors.len() > MAX_DESCRIPTORS {
                    return Err(format!(
                        "--descriptor given {} times; at most {MAX_DESCRIPTORS}",
                        self.descriptors.len()
                    ));
                }
                Target::Rls(RlsCall {
                    domain,
                    descriptors: self.descriptors,
                })
            }
            None => {
                let mut headers = HeaderMap::new();
                for (name, value) in self.headers {
                    headers.append(name, value);
                }
                Target::Http { headers }
            }
        };
        Ok(Config {
            url,
            pinned,
            sources: self.sources,
            mode,
            duration: self.duration,
            max_requests: self.max_requests,
            timeout: self.timeout,
            max_in_flight: self.max_in_flight,
            policy_flags: PolicyFlags {
                limit: self.limit,
                window_s: self.window.map(|w| w.as_secs_f64()),
                burst: self.burst,
            },
            target,
            json: self.json,
            plot: self.plot,
            font: self.font,
            show_clients: self.clients,
            check: self.check,
        })
    }
}

/// Resolves the URL's host to one loopback address of the sources' family. An IP
/// literal needs no pinning; a name is pinned so the connector cannot pick another.
fn pin_target(url: &Url, family_v4: bool) -> Result<Option<(String, SocketAddr)>, String> {
    let family = if family_v4 { "IPv4" } else { "IPv6" };
    let port = url.port_or_known_default().unwrap_or(80);
    let host = url
        .host_str()
        .ok_or_else(|| format!("--url {url}: no host"))?;
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = literal.parse::<IpAddr>() {
        return check_target(url, ip, family_v4).map(|_| None);
    }
    let found: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("--url {url}: cannot resolve {host}: {e}"))?
        .collect();
    let chosen = found
        .iter()
        .copied()
        .find(|a| a.is_ipv4() == family_v4)
        .ok_or_else(|| {
            format!("--url {url}: {host} has no {family} address, as the sources are")
        })?;
    check_target(url, chosen.ip(), family_v4)?;
    Ok(Some((host.to_owned(), chosen)))
}

fn check_target(url: &Url, ip: IpAddr, family_v4: bool) -> Result<(), String> {
    if !ip.is_loopback() {
        return Err(format!(
            "--url {url}: {ip} is not a loopback address; this tool only drives a service on this machine"
        ));
    }
    if ip.is_ipv4() != family_v4 {
        return Err(format!(
            "--url {url}: the sources are {} but the target is not; use one address family",
            if family_v4 { "IPv4" } else { "IPv6" }
        ));
    }
    Ok(())
}

/// Parses `10`, `10s`, `1.5s`, `500ms` or `2m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60.0)
    } else {
        (text, 1.0)
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (try 10, 10s, 500ms or 2m)"))?;
    let seconds = value * scale;
    if !seconds.is_finite() || seconds <= 0.0 {
        return Err(format!("{text:?} must be more than zero"));
    }
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

fn parse_run_duration(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration > MAX_DURATION {
        return Err(format!(
            "{text:?} is longer than the {} s a run may last",
            MAX_DURATION.as_secs()
        ));
    }
    Ok(duration)
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration > Duration::from_secs(60) {
        return Err(format!("{text:?} is longer than 60 s"));
    }
    Ok(duration)
}

fn parse_window(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration > Duration::from_secs(10 * 365 * 24 * 3600) {
        return Err(format!("{text:?} is longer than ten years"));
    }
    Ok(duration)
}

/// Parses `key=value,key=value`: a descriptor's entries, each split at its first `=`.
fn parse_descriptor(text: &str) -> Result<Vec<(String, String)>, String> {
    text.split(',')
        .map(|entry| {
            let (key, value) = entry
                .split_once('=')
                .ok_or_else(|| format!("{entry:?} in {text:?} is not key=value"))?;
            let key = key.trim();
            if key.is_empty() {
                return Err(format!("{entry:?} in {text:?} has no key"));
            }
            Ok((key.to_owned(), value.trim().to_owned()))
        })
        .collect()
}

fn parse_header(text: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (name, value) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?} is not \"Name: value\""))?;
    let name = HeaderName::try_from(name.trim())
        .map_err(|e| format!("{:?} is not a header name: {e}", name.trim()))?;
    let value = HeaderValue::try_from(value.trim())
        .map_err(|e| format!("{:?} is not a header value: {e}", value.trim()))?;
    Ok((name, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Result<Config, String> {
        let mut argv = vec!["loadtest"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .into_config()
    }

    #[test]
    fn durations_accept_plain_seconds_and_units() {
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        for refused in ["0", "-1s", "ten", "NaN"] {
            assert!(parse_duration(refused).is_err(), "{refused}");
        }
    }

    #[test]
    fn a_run_longer_than_ten_minutes_is_refused() {
        assert!(parse_run_duration("600s").is_ok());
        assert!(parse_run_duration("601s").is_err());
        assert!(config(&["--duration", "11m"]).is_err());
    }

    #[test]
    fn the_defaults_offer_200_per_second_from_241_clients_to_nginx() {
        let config = config(&[]).unwrap();
        assert_eq!(config.url.as_str(), DEFAULT_URL);
        assert_eq!(config.sources.addresses().len(), 241);
        assert_eq!(config.mode, Mode::Rate(Rate::parse("200").unwrap()));
        assert_eq!(config.duration, Duration::from_secs(10));
    }

    #[test]
    fn rate_and_connections_cannot_be_combined() {
        assert!(config(&["--rate", "10", "--connections", "4"]).is_err());
        assert_eq!(
            config(&["--connections", "4"]).unwrap().mode,
            Mode::Connections(4)
        );
    }

    #[test]
    fn a_target_off_this_machine_is_refused() {
        let error = config(&["--url", "http://192.0.2.1/"]).unwrap_err();
        assert!(error.contains("not a loopback"), "{error}");
        assert!(config(&["--url", "https://127.0.0.1/"]).is_err());
    }

    #[test]
    fn a_target_of_another_family_than_the_sources_is_refused() {
        let error = config(&["--url", "http://[::1]:8000/"]).unwrap_err();
        assert!(error.contains("address family"), "{error}");
        assert!(config(&["--url", "http://[::1]:8000/", "--sources", "::1"]).is_ok());
    }

    #[test]
    fn localhost_is_pinned_to_an_address_of_the_sources_family() {
        let config = config(&["--url", "http://localhost:8000/x"]).unwrap();
        let (host, addr) = config.pinned.unwrap();
        assert_eq!(host, "localhost");
        assert!(addr.ip().is_loopback() && addr.is_ipv4());
        assert_eq!(addr.port(), 8000);
    }

    #[test]
    fn extra_headers_are_parsed_as_name_and_value() {
        let config = config(&["-H", "X-Forwarded-For: 1.2.3.4"]).unwrap();
        let Target::Http { headers } = config.target else {
            panic!("an HTTP run: {:?}", config.target)
        };
        assert_eq!(headers["x-forwarded-for"], "1.2.3.4");
        assert!(parse_header("no colon").is_err());
    }

    #[test]
    fn a_domain_and_descriptors_call_the_rate_limit_service_on_its_default_port() {
        let config = config(&[
            "--domain",
            "edge",
            "--descriptor",
            "remote_address={client}",
            "--descriptor",
            "generic_key=login, path=/a=b",
        ])
        .unwrap();
        assert_eq!(config.url.as_str(), "http://127.0.0.1:8051/");
        let entry = |key: &str, value: &str| (key.to_owned(), value.to_owned());
        let Target::Rls(call) = config.target else {
            panic!("a gRPC run: {:?}", config.target)
        };
        assert_eq!(call.domain, "edge");
        assert_eq!(
            call.descriptors,
            [
                vec![entry("remote_address", "{client}")],
                vec![entry("generic_key", "login"), entry("path", "/a=b")]
            ]
        );
    }

    #[test]
    fn a_domain_needs_a_descriptor_and_descriptors_need_a_domain() {
        assert!(config(&["--domain", "edge"]).is_err());
        assert!(config(&["--descriptor", "k=v"]).is_err());
        assert!(config(&["--domain", "", "--descriptor", "k=v"]).is_err());
        assert!(config(&["--domain", "edge", "--descriptor", "no-equals"]).is_err());
        assert!(config(&["--domain", "edge", "--descriptor", "k=v", "-H", "A: b"]).is_err());
        let nine: Vec<&str> = ["--descriptor", "k=v"].repeat(9);
        let mut args = vec!["--domain", "edge"];
        args.extend(nine);
        assert!(config(&args).unwrap_err().contains("at most 8"));
    }
}
