//! Steady traffic while a test breaks something: many clients, each sending a request at
//! a fixed interval until told to stop, and a record of what each request met: a
//! [`Record`] for HTTP requests, a [`Call`] for `ShouldRateLimit` calls. Every client
//! stops by itself after [`Traffic::LIMIT`] or [`Traffic::MOST`] requests, so a test that
//! fails before it stops the traffic leaves nothing running.

use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;

use crate::http::{client, client_from, header};
use crate::rls::{RlsClient, descriptor, rls_request};

/// How the instances tell one client of the traffic from the others.
#[derive(Debug, Clone)]
pub enum Origin {
    /// `X-Forwarded-For: <address>`, as a proxy forwards it: the instances must trust the
    /// sender (`TRUSTED_PROXIES=127.0.0.1`), and the requests go to them directly.
    Forwarded(String),
    /// Its own source address on loopback (any of 127.0.0.0/8), as a client in front of
    /// Nginx is told apart.
    Source(IpAddr),
}

/// One answered (or failed) HTTP request.
#[derive(Debug, Clone)]
pub struct Record {
    /// The number the client was given.
    pub client: usize,
    pub sent: Instant,
    pub latency: Duration,
    /// 0 when the request failed without an HTTP answer.
    pub status: u16,
    /// `X-RateLimit-Source`; empty when absent.
    pub source: String,
    /// `X-Instance`: which instance answered; empty when absent.
    pub instance: String,
}

impl Record {
    pub fn answered(&self) -> Instant {
        self.sent + self.latency
    }
}

/// One `ShouldRateLimit` call and its answer.
#[derive(Debug, Clone)]
pub struct Call {
    /// The number the client was given.
    pub client: usize,
    pub sent: Instant,
    pub latency: Duration,
    /// The overall code, or the gRPC status code of a call that failed.
    pub answer: Result<Code, tonic::Code>,
}

impl Call {
    pub fn answered(&self) -> Instant {
        self.sent + self.latency
    }
}

/// Clients sending until [`Traffic::stop`]; each request leaves an `R`.
pub struct Traffic<R = Record> {
    records: Arc<Mutex<Vec<R>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic<Record> {
    /// Each of `clients`, a number and how it is told apart, sends a GET every `every`
    /// (less the time its answer took) to `urls` in turn, the first to the one its number
    /// picks, so that the clients spread over them.
    pub fn start(
        urls: &[String],
        clients: impl IntoIterator<Item = (usize, Origin)>,
        every: Duration,
    ) -> Self {
        Self::start_after(Duration::ZERO, urls, clients, every)
    }

    /// [`Traffic::start`], the first requests `delay` from now.
    pub fn start_after(
        delay: Duration,
        urls: &[String],
        clients: impl IntoIterator<Item = (usize, Origin)>,
        every: Duration,
    ) -> Self {
        assert!(!urls.is_empty(), "traffic needs somewhere to go");
        let shared = client();
        let senders = clients.into_iter().map(|(id, origin)| {
            let http = match &origin {
                Origin::Source(address) => client_from(*address),
                Origin::Forwarded(_) => shared.clone(),
            };
            let forwarded = match origin {
                Origin::Forwarded(address) => Some(address),
                Origin::Source(_) => None,
            };
            let urls = urls.to_vec();
            let ask = move |n: usize| {
                let mut request = http.get(&urls[n % urls.len()]);
                if let Some(address) = &forwarded {
                    request = request.header("X-Forwarded-For", address);
                }
                async move {
                    let sent = Instant::now();
                    let (status, source, instance) = match request.send().await {
                        Ok(response) => (
                            response.status().as_u16(),
                            header(&response, "X-RateLimit-Source"),
                            header(&response, "X-Instance"),
                        ),
                        Err(_) => (0, String::new(), String::new()),
                    };
                    Record {
                        client: id,
                        sent,
                        latency: sent.elapsed(),
                        status,
                        source,
                        instance,
                    }
                }
            };
            (id, ask)
        });
        Self::spawn(delay, every, senders)
    }
}

impl Traffic<Call> {
    /// Each of `clients`, a number and the entries of the one descriptor it asks about in
    /// `domain`, calls `ShouldRateLimit` every `every` (less the time its answer took) on
    /// `instances` in turn, the first on the one its number picks.
    pub fn calls(
        instances: &[RlsClient],
        domain: &str,
        clients: impl IntoIterator<Item = (usize, Vec<(String, String)>)>,
        every: Duration,
    ) -> Self {
        assert!(!instances.is_empty(), "traffic needs somewhere to go");
        let senders = clients.into_iter().map(|(id, entries)| {
            let instances = instances.to_vec();
            let domain = domain.to_string();
            let ask = move |n: usize| {
                let mut instance = instances[n % instances.len()].clone();
                let pairs: Vec<(&str, &str)> = entries
                    .iter()
                    .map(|(key, value)| (key.as_str(), value.as_str()))
                    .collect();
                let request = rls_request(&domain, vec![descriptor(&pairs)]);
                async move {
                    let sent = Instant::now();
                    let answer = instance
                        .ask(request)
                        .await
                        .map(|response| response.overall_code())
                        .map_err(|status| status.code());
                    Call {
                        client: id,
                        sent,
                        latency: sent.elapsed(),
                        answer,
                    }
                }
            };
            (id, ask)
        });
        Self::spawn(Duration::ZERO, every, senders)
    }
}

impl<R: Clone + Send + 'static> Traffic<R> {
    /// How long a client sends at most, whatever happens.
    pub const LIMIT: Duration = Duration::from_secs(60);
    /// How many requests a client sends at most.
    pub const MOST: usize = 5_000;

    /// Starts each client: its number, and what sends its `n`th request (`n` counting
    /// from its number) and records the answer.
    fn spawn<F, Fut>(
        delay: Duration,
        every: Duration,
        senders: impl IntoIterator<Item = (usize, F)>,
    ) -> Self
    where
        F: FnMut(usize) -> Fut + Send + 'static,
        Fut: Future<Output = R> + Send,
    {
        let records = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = senders
            .into_iter()
            .map(|(id, mut ask)| {
                let (records, stop) = (records.clone(), stop.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let deadline = Instant::now() + Self::LIMIT;
                    for n in (id..).take(Self::MOST) {
                        if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                            break;
                        }
                        let started = Instant::now();
                        let record = ask(n).await;
                        records.lock().unwrap().push(record);
                        tokio::time::sleep(every.saturating_sub(started.elapsed())).await;
                    }
                })
            })
            .collect();
        Self {
            records,
            stop,
            tasks,
        }
    }

    /// How many requests have had their answer so far.
    pub fn answered_so_far(&self) -> usize {
        self.records.lock().unwrap().len()
    }

    /// Stops every client, waits for its last answer, and returns every request's record.
    pub async fn stop(self) -> Vec<R> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
        self.records.lock().unwrap().clone()
    }
}
