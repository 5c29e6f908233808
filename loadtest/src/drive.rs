//! The clients (HTTP, or gRPC calling `ShouldRateLimit`), the two dispatchers and the
//! live progress line.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::header::HeaderMap;
use reqwest::{Client, Url};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tonic::transport::{Channel, Endpoint};

use loadtest::summary::{LATE_AFTER, Protocol, StoppedBy, Summary};

use crate::cli::{CLIENT_PLACEHOLDER, Config, Mode, RlsCall, Target};
use crate::schedule::{self, Rate};
use crate::stats::{Class, Outcome, RunInfo, Sample, Status, Tally};
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// Whether to go on: a first Ctrl-C stops sending, a second abandons what is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Sending,
    Draining,
    Abandon,
}

/// What the dispatcher tells the summary.
#[derive(Default)]
struct Dispatch {
    dispatched: u64,
    late: u64,
    missed: u64,
    max_lag_ns: u64,
    last_send_ns: u64,
    stopped_by: StoppedBy,
}

/// One client as the service sees it: its connections, and for gRPC the call it makes.
enum Caller {
    Http(Client),
    Rls(Box<RlsCaller>),
}

/// A gRPC client and the call it makes every time.
struct RlsCaller {
    client: RateLimitServiceClient<Channel>,
    request: RateLimitRequest,
}

/// Everything a request needs, shared by all requests.
struct Shared {
    url: Url,
    headers: HeaderMap,
    clients: Vec<Caller>,
    start: Instant,
    samples: mpsc::UnboundedSender<Sample>,
    /// Requests sent so far; the progress line reads it too.
    dispatched: Arc<AtomicU64>,
}

pub async fn run(config: Config) -> anyhow::Result<ExitCode> {
    let clients = config
        .sources
        .addresses()
        .iter()
        .map(|ip| match &config.target {
            Target::Http { .. } => build_client(*ip, &config).map(Caller::Http),
            Target::Rls(call) => build_rls_caller(*ip, call, &config),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (headers, protocol) = match &config.target {
        Target::Http { headers } => (headers.clone(), Protocol::Http),
        Target::Rls(_) => (HeaderMap::new(), Protocol::Grpc),
    };
    let (samples, mut received) = mpsc::unbounded_channel();
    let mut tally =
        Tally::new(clients.len(), protocol).context("cannot set up the latency histogram")?;
    let start = Instant::now();
    let dispatched = Arc::new(AtomicU64::new(0));
    let shared = Arc::new(Shared {
        url: config.url.clone(),
        headers,
        clients,
        start,
        samples,
        dispatched: Arc::clone(&dispatched),
    });
    let (phase_tx, phase) = watch::channel(Phase::Sending);
    let bar = progress_bar(config.duration);
    tokio::spawn(watch_interrupts(phase_tx, bar.clone()));

    let dispatcher = {
        let shared = Arc::clone(&shared);
        let phase = phase.clone();
        let (mode, duration, max_requests, max_in_flight) = (
            config.mode,
            config.duration,
            config.max_requests,
            config.max_in_flight,
        );
        tokio::spawn(async move {
            match mode {
                Mode::Rate(rate) => {
                    at_rate(shared, rate, duration, max_requests, max_in_flight, phase).await
                }
                Mode::Connections(n) => {
                    flat_out(shared, n as usize, duration, max_requests, phase).await
                }
            }
        })
    };
    // The channel closes once the dispatcher and every request it started are done.
    drop(shared);

    collect(
        &mut received,
        &mut tally,
        &bar,
        start,
        config.duration,
        &dispatched,
        protocol,
    )
    .await;
    bar.finish_and_clear();
    let dispatch = dispatcher.await.context("the dispatcher failed")?;

    let run = RunInfo {
        url: match &config.target {
            Target::Http { .. } => config.url.to_string(),
            Target::Rls(call) => format!(
                "ShouldRateLimit at {}, domain {}, {} descriptor(s)",
                config.url,
                call.domain,
                call.descriptors.len()
            ),
        },
        mode: match config.mode {
            Mode::Rate(rate) => format!("{rate} offered for {:?}", config.duration),
            Mode::Connections(n) => {
                format!("flat out on {n} connections for {:?}", config.duration)
            }
        },
        mode_is_rate: matches!(config.mode, Mode::Rate(_)),
        sources: config.sources.to_string(),
        stopped_by: dispatch.stopped_by,
        planned_duration_s: config.duration.as_secs_f64(),
        dispatch_ns: dispatch.last_send_ns,
        dispatched: dispatch.dispatched,
        late: dispatch.late,
        missed: dispatch.missed,
        max_lag_ns: dispatch.max_lag_ns,
    };
    let summary = tally.summarize(run, config.sources.addresses(), &config.policy_flags);
    report(&summary, &config)
}

/// The conventional status of a program stopped by SIGINT.
const INTERRUPTED: u8 = 130;

/// Prints the summary, writes the files asked for, and turns `--check` into the exit code.
fn report(summary: &Summary, config: &Config) -> anyhow::Result<ExitCode> {
    print!("{}", summary.render(config.show_clients));
    if let Some(path) = &config.json {
        let file = std::fs::File::create(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        serde_json::to_writer_pretty(std::io::BufWriter::new(file), summary)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("summary written to {}", path.display());
    }
    if let Some(path) = &config.plot {
        let title = format!(
            "Admitted and rejected per second · {} · {}",
            summary.sources, summary.mode
        );
        crate::plot::draw(path, &summary.timeline, &title, config.font.as_deref())?;
        println!("plot drawn in {}", path.display());
    }
    if config.check {
        if let Err(why) = summary.check() {
            eprintln!("loadtest: check failed: {why}");
            return Ok(ExitCode::from(3));
        }
        println!("check passed: every client within its bound");
    }
    if summary.stopped_by == StoppedBy::Interrupt {
        return Ok(ExitCode::from(INTERRUPTED));
    }
    Ok(ExitCode::SUCCESS)
}

/// Folds samples into the tally until the last request is done, refreshing the progress
/// line meanwhile: time elapsed, what was sent, what came back, and the answers per
/// second over about the last second.
async fn collect(
    received: &mut mpsc::UnboundedReceiver<Sample>,
    tally: &mut Tally,
    bar: &ProgressBar,
    start: Instant,
    duration: Duration,
    dispatched: &AtomicU64,
    protocol: Protocol,
) {
    let [admitted, rejected, failed] = protocol.answer_names();
    let mut ticker = tokio::time::interval(PROGRESS_EVERY);
    let mut recent: VecDeque<(Instant, u64)> = VecDeque::new();
    loop {
        tokio::select! {
            sample = received.recv() => match sample {
                Some(sample) => tally.add(sample),
                None => return,
            },
            _ = ticker.tick() => {
                let now = Instant::now();
                let done = tally.answered + tally.errors;
                recent.push_back((now, done));
                while recent.len() > 2 && now.duration_since(recent[0].0) > Duration::from_secs(1) {
                    recent.pop_front();
                }
                let per_s = match recent.front() {
                    Some((then, before)) if now > *then => {
                        (done - before) as f64 / now.duration_since(*then).as_secs_f64()
                    }
                    _ => 0.0,
                };
                bar.set_position(start.elapsed().min(duration).as_millis() as u64);
                bar.set_message(format!(
                    "sent {} · {admitted}: {} · {rejected}: {} · {failed}: {} · errors: {} · {:.0}/s",
                    dispatched.load(Ordering::Relaxed),
                    tally.admitted, tally.rejected, tally.server_errors, tally.errors, per_s
                ));
            }
        }
    }
}

fn progress_bar(duration: Duration) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(duration.as_millis() as u64),
        ProgressDrawTarget::stderr_with_hz(5),
    );
    if let Ok(style) = ProgressStyle::with_template("{elapsed:>4} [{bar:24.cyan/blue}] {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// One keep-alive pool bound to one source address: one client as the service sees it.
fn build_client(source: IpAddr, config: &Config) -> anyhow::Result<Client> {
    let mut builder = Client::builder()
        .local_address(source)
        .timeout(config.timeout)
        .connect_timeout(config.timeout.min(Duration::from_secs(2)))
        .pool_idle_timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy();
    if let Some((host, addr)) = &config.pinned {
        builder = builder.resolve(host, *addr);
    }
    builder
        .build()
        .with_context(|| format!("cannot build the HTTP client for {source}"))
}

/// One HTTP/2 connection from `source` to the gRPC port, and the call it makes with
/// `{client}` filled in. The connection is made at the first call, so one that fails
/// counts as that call's error, as for HTTP.
fn build_rls_caller(source: IpAddr, call: &RlsCall, config: &Config) -> anyhow::Result<Caller> {
    let target = match &config.pinned {
        Some((_, addr)) => format!("http://{addr}"),
        None => config.url.to_string(),
    };
    let endpoint = Endpoint::from_shared(target.clone())
        .with_context(|| format!("--url {target}: not a gRPC endpoint"))?
        .local_address(Some(source))
        .timeout(config.timeout)
        .connect_timeout(config.timeout.min(Duration::from_secs(2)))
        .tcp_nodelay(true);
    let client_address = source.to_string();
    let descriptors = call
        .descriptors
        .iter()
        .map(|entries| RateLimitDescriptor {
            entries: entries
                .iter()
                .map(|(key, value)| Entry {
                    key: key.clone(),
                    value: value.replace(CLIENT_PLACEHOLDER, &client_address),
                })
                .collect(),
            ..RateLimitDescriptor::default()
        })
        .collect();
    Ok(Caller::Rls(Box::new(RlsCaller {
        client: RateLimitServiceClient::new(endpoint.connect_lazy()),
        request: RateLimitRequest {
            domain: call.domain.clone(),
            descriptors,
            hits_addend: 0,
        },
    })))
}

/// Holds the phase's sender for the whole run, so that waiting for a change never
/// returns at once because the sender is gone.
async fn watch_interrupts(phase: watch::Sender<Phase>, bar: ProgressBar) {
    if tokio::signal::ctrl_c().await.is_ok() {
        bar.suspend(|| {
            eprintln!(
                "loadtest: interrupted; waiting for the answers in flight (Ctrl-C again abandons them)"
            )
        });
        phase.send_replace(Phase::Draining);
        if tokio::signal::ctrl_c().await.is_ok() {
            phase.send_replace(Phase::Abandon);
        }
    }
    std::future::pending::<()>().await;
}

fn since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

async fn request(shared: &Shared, client: usize) -> Sample {
    let sent_ns = since(shared.start);
    let outcome = match shared.clients.get(client) {
        Some(Caller::Http(http)) => exchange(http, &shared.url, &shared.headers).await,
        Some(Caller::Rls(rls)) => ask(rls.client.clone(), rls.request.clone()).await,
        None => Outcome::Failed {
            kind: "internal",
            message: format!("no client {client}"),
        },
    };
    Sample {
        client,
        sent_ns,
        done_ns: since(shared.start),
        outcome,
    }
}

async fn exchange(http: &Client, url: &Url, headers: &HeaderMap) -> Outcome {
    let response = match http.get(url.clone()).headers(headers.clone()).send().await {
        Ok(response) => response,
        Err(error) => return failure(&error),
    };
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let status = response.status().as_u16();
    let instance = header("x-instance");
    let decided_by = header("x-ratelimit-source");
    let policy = header("ratelimit-policy");
    // Reading the body to its end lets the connection go back to the pool.
    if let Err(error) = response.bytes().await {
        return failure(&error);
    }
    Outcome::Answered {
        status: Status::http(status),
        instance,
        decided_by,
        policy,
    }
}

/// One `ShouldRateLimit` call. A status the server sent is an answer (`UNAVAILABLE` is
/// what `FAIL_MODE=closed` answers); one the client made up because the call never got
/// there or timed out, which carries its cause, is an error.
async fn ask(mut rls: RateLimitServiceClient<Channel>, request: RateLimitRequest) -> Outcome {
    let response = match rls.should_rate_limit(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            let label = code_name(status.code());
            if std::error::Error::source(&status).is_some() {
                let kind = if status.code() == tonic::Code::Cancelled {
                    "timeout"
                } else {
                    "transport"
                };
                return Outcome::Failed {
                    kind,
                    message: format!("{label}: {}", status.message()),
                };
            }
            let class = match status.code() {
                tonic::Code::InvalidArgument => Class::Other,
                _ => Class::ServerError,
            };
            return Outcome::Answered {
                status: Status { class, label },
                instance: None,
                decided_by: None,
                policy: None,
            };
        }
    };
    let (class, label) = match response.overall_code() {
        Code::Ok => (Class::Admitted, "OK"),
        Code::OverLimit => (Class::Rejected, "OVER_LIMIT"),
        Code::Unknown => (Class::Other, "UNKNOWN"),
    };
    Outcome::Answered {
        status: Status {
            class,
            label: label.into(),
        },
        instance: None,
        decided_by: None,
        policy: stated_limit(&response),
    }
}

/// The limit the first limited descriptor's status states, written as a `RateLimit-Policy`
/// header (`"name";q=requests_per_unit;w=unit in seconds`): the bucket each client is held
/// to, unless flags say otherwise.
fn stated_limit(response: &RateLimitResponse) -> Option<String> {
    let limit = response
        .statuses
        .iter()
        .find_map(|status| status.current_limit.as_ref())?;
    let unit_s: u64 = match limit.unit() {
        Unit::Unknown => return None,
        Unit::Second => 1,
        Unit::Minute => 60,
        Unit::Hour => 3600,
        Unit::Day => 86_400,
        Unit::Week => 7 * 86_400,
        Unit::Month => 30 * 86_400,
        Unit::Year => 365 * 86_400,
    };
    // A rule without a name states none; the header form needs one.
    let name = match limit.name.as_str() {
        "" => "current_limit".to_string(),
        name => name.replace('"', "'"),
    };
    Some(format!(
        "\"{name}\";q={};w={unit_s}",
        limit.requests_per_unit
    ))
}

/// A gRPC code as the protocol names it: `UNAVAILABLE`, `INVALID_ARGUMENT`.
fn code_name(code: tonic::Code) -> String {
    let mut name = String::new();
    for (i, letter) in format!("{code:?}").chars().enumerate() {
        if letter.is_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(letter.to_ascii_uppercase());
    }
    name
}

fn failure(error: &reqwest::Error) -> Outcome {
    let kind = if error.is_timeout() {
        "timeout"
    } else if error.is_connect() {
        "connect"
    } else if error.is_body() || error.is_decode() {
        "body"
    } else if error.is_request() {
        "request"
    } else {
        "other"
    };
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    Outcome::Failed { kind, message }
}

/// The open model: send `i` is due at `i / rate` whatever the answers do; sends go to
/// the sources in turn, each in its own task.
async fn at_rate(
    shared: Arc<Shared>,
    rate: Rate,
    duration: Duration,
    max_requests: u64,
    max_in_flight: u64,
    mut phase: watch::Receiver<Phase>,
) -> Dispatch {
    let on_the_clock = rate.planned(duration.as_nanos());
    let planned = on_the_clock.min(max_requests);
    let sources = shared.clients.len().max(1) as u64;
    let mut in_flight = JoinSet::new();
    let mut result = Dispatch {
        stopped_by: if planned < on_the_clock {
            StoppedBy::MaxRequests
        } else {
            StoppedBy::Duration
        },
        ..Dispatch::default()
    };
    let mut next: u64 = 0;
    while next < planned {
        if *phase.borrow() != Phase::Sending {
            result.stopped_by = StoppedBy::Interrupt;
            break;
        }
        while in_flight.try_join_next().is_some() {}
        let elapsed = shared.start.elapsed().as_nanos();
        let due = rate.due_by(elapsed).min(planned);
        while next < due {
            let lag =
                u64::try_from(elapsed.saturating_sub(rate.offset_ns(next))).unwrap_or(u64::MAX);
            result.max_lag_ns = result.max_lag_ns.max(lag);
            if lag > LATE_AFTER.as_nanos() as u64 {
                result.late += 1;
            }
            if in_flight.len() as u64 >= max_in_flight {
                result.missed += 1;
            } else {
                let client = (next % sources) as usize;
                let shared = Arc::clone(&shared);
                shared.dispatched.fetch_add(1, Ordering::Relaxed);
                result.dispatched += 1;
                in_flight.spawn(async move {
                    let sample = request(&shared, client).await;
                    let _ = shared.samples.send(sample);
                });
            }
            next += 1;
        }
        result.last_send_ns = since(shared.start);
        if next >= planned {
            break;
        }
        let wake = shared.start
            + Duration::from_nanos(u64::try_from(rate.offset_ns(next)).unwrap_or(u64::MAX));
        tokio::select! {
            _ = tokio::time::sleep_until(wake.into()) => {}
            _ = phase.changed() => {}
        }
    }
    drain(in_flight, phase).await;
    result
}

/// The closed model: each connection sends its next request once the last is answered.
async fn flat_out(
    shared: Arc<Shared>,
    connections: usize,
    duration: Duration,
    max_requests: u64,
    phase: watch::Receiver<Phase>,
) -> Dispatch {
    let sources = shared.clients.len();
    let mut workers = JoinSet::new();
    for worker in 0..connections {
        let mine = schedule::worker_sources(worker, connections, sources);
        let shared = Arc::clone(&shared);
        let phase = phase.clone();
        workers.spawn(async move {
            let mut last_send_ns = 0;
            for client in mine.iter().copied().cycle() {
                if *phase.borrow() != Phase::Sending || shared.start.elapsed() >= duration {
                    break;
                }
                if shared.dispatched.fetch_add(1, Ordering::Relaxed) >= max_requests {
                    shared.dispatched.fetch_sub(1, Ordering::Relaxed);
                    break;
                }
                last_send_ns = since(shared.start);
                let sample = request(&shared, client).await;
                let _ = shared.samples.send(sample);
            }
            last_send_ns
        });
    }
    let mut result = Dispatch::default();
    let mut phase_now = phase.clone();
    loop {
        tokio::select! {
            joined = workers.join_next() => match joined {
                Some(Ok(last)) => result.last_send_ns = result.last_send_ns.max(last),
                Some(Err(_)) => {}
                None => break,
            },
            Ok(()) = phase_now.changed() => {
                if *phase_now.borrow() == Phase::Abandon {
                    workers.abort_all();
                }
            }
        }
    }
    result.dispatched = shared.dispatched.load(Ordering::Relaxed);
    result.stopped_by = if *phase.borrow() != Phase::Sending {
        StoppedBy::Interrupt
    } else if result.dispatched >= max_requests {
        StoppedBy::MaxRequests
    } else {
        StoppedBy::Duration
    };
    result
}

/// Waits for the requests in flight, each bounded by --timeout, unless told to abandon them.
async fn drain(mut in_flight: JoinSet<()>, mut phase: watch::Receiver<Phase>) {
    loop {
        if *phase.borrow() == Phase::Abandon {
            in_flight.abort_all();
            return;
        }
        tokio::select! {
            joined = in_flight.join_next() => if joined.is_none() { return },
            Ok(()) = phase.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
        DescriptorStatus, RateLimit,
    };

    #[test]
    fn grpc_codes_are_named_as_the_protocol_names_them() {
        assert_eq!(code_name(tonic::Code::Unavailable), "UNAVAILABLE");
        assert_eq!(code_name(tonic::Code::InvalidArgument), "INVALID_ARGUMENT");
    }

    #[test]
    fn the_first_stated_limit_becomes_the_policy_each_client_is_held_to() {
        let limited = DescriptorStatus {
            current_limit: Some(RateLimit {
                name: "per-user".into(),
                requests_per_unit: 10,
                unit: Unit::Minute as i32,
            }),
            ..DescriptorStatus::default()
        };
        let response = RateLimitResponse {
            statuses: vec![DescriptorStatus::default(), limited],
            ..RateLimitResponse::default()
        };
        let stated = stated_limit(&response).unwrap();
        assert_eq!(stated, "\"per-user\";q=10;w=60");
        let parsed = loadtest::policy::parse_header(&stated).unwrap();
        assert_eq!((parsed[0].quota, parsed[0].window_s), (10, Some(60.0)));
        assert_eq!(stated_limit(&RateLimitResponse::default()), None);
        let mut unnamed = response.clone();
        if let Some(limit) = unnamed.statuses[1].current_limit.as_mut() {
            limit.name.clear();
        }
        let stated = stated_limit(&unnamed).unwrap();
        assert!(loadtest::policy::parse_header(&stated).is_ok(), "{stated}");
    }
}
