//! Steady traffic while a test breaks something: many clients, each sending a request at
//! a fixed interval until told to stop, and a [`Record`] of what each request met. Every
//! client stops by itself after [`Traffic::LIMIT`] or [`Traffic::MOST`] requests, so a
//! test that fails before it stops the traffic leaves nothing running.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Client;

use crate::http::{client, client_from, header};

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

/// One answered (or failed) request.
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

/// Clients sending until [`Traffic::stop`].
pub struct Traffic {
    records: Arc<Mutex<Vec<Record>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    /// How long a client sends at most, whatever happens.
    pub const LIMIT: Duration = Duration::from_secs(60);
    /// How many requests a client sends at most.
    pub const MOST: usize = 5_000;

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
        let records = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let shared = client();
        let tasks = clients
            .into_iter()
            .map(|(id, origin)| {
                let sender = Sender {
                    id,
                    http: match origin {
                        Origin::Source(address) => client_from(address),
                        Origin::Forwarded(_) => shared.clone(),
                    },
                    forwarded: match origin {
                        Origin::Forwarded(address) => Some(address),
                        Origin::Source(_) => None,
                    },
                    urls: urls.to_vec(),
                };
                let (records, stop) = (records.clone(), stop.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    sender.run(every, &stop, &records).await;
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
    pub async fn stop(self) -> Vec<Record> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
        self.records.lock().unwrap().clone()
    }
}

/// One client of the traffic.
struct Sender {
    id: usize,
    http: Client,
    /// What it sends as `X-Forwarded-For`, if it is told apart that way.
    forwarded: Option<String>,
    urls: Vec<String>,
}

impl Sender {
    async fn run(self, every: Duration, stop: &AtomicBool, records: &Mutex<Vec<Record>>) {
        let deadline = Instant::now() + Traffic::LIMIT;
        for n in (self.id..).take(Traffic::MOST) {
            if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                break;
            }
            let mut request = self.http.get(&self.urls[n % self.urls.len()]);
            if let Some(address) = &self.forwarded {
                request = request.header("X-Forwarded-For", address);
            }
            let sent = Instant::now();
            let (status, source, instance) = match request.send().await {
                Ok(response) => (
                    response.status().as_u16(),
                    header(&response, "X-RateLimit-Source"),
                    header(&response, "X-Instance"),
                ),
                Err(_) => (0, String::new(), String::new()),
            };
            records.lock().unwrap().push(Record {
                client: self.id,
                sent,
                latency: sent.elapsed(),
                status,
                source,
                instance,
            });
            tokio::time::sleep(every.saturating_sub(sent.elapsed())).await;
        }
    }
}
