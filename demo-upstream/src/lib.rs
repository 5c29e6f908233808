//! A stand-in for the API the gateway guards: it answers every path, with every method,
//! `200 {"upstream": "demo-upstream", ...}`, and counts each request that reached it, in
//! total, by path and by client.
//!
//! The counts are on a listener of their own (`GET /__upstream/count`, and `GET /health`
//! for health checks), so that nothing sent through the gateway can read them or be
//! mistaken for them: the gateway reaches only the counted listener.
//!
//! The client is `X-Real-IP`, which the gateway sets to the address it saw (the address
//! the limiter keyed), else the TCP peer.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::sync::Mutex;

use actix_web::dev::{Server, ServerHandle};
use actix_web::http::StatusCode;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use serde::Serialize;
use serde_json::json;

/// Distinct paths (and clients) counted one by one; beyond that they are counted together
/// under [`OTHERS`], so a load test over random paths cannot grow the counts without bound.
pub const MAX_KEYS: usize = 10_000;
/// Where paths and clients beyond [`MAX_KEYS`] are counted.
pub const OTHERS: &str = "(others)";

/// What reached the upstream.
#[derive(Debug, Default, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Counts {
    pub total: u64,
    pub paths: BTreeMap<String, u64>,
    pub clients: BTreeMap<String, u64>,
}

impl Counts {
    /// Counts one request; answers how many have reached `path` so far.
    fn note(&mut self, path: &str, client: &str) -> u64 {
        self.total += 1;
        bump(&mut self.clients, client);
        bump(&mut self.paths, path)
    }

    /// Requests that reached `path`.
    pub fn path(&self, path: &str) -> u64 {
        self.paths.get(path).copied().unwrap_or(0)
    }

    /// Requests from `client`.
    pub fn client(&self, client: &str) -> u64 {
        self.clients.get(client).copied().unwrap_or(0)
    }
}

fn bump(counts: &mut BTreeMap<String, u64>, key: &str) -> u64 {
    let key = if counts.len() < MAX_KEYS || counts.contains_key(key) {
        key
    } else {
        OTHERS
    };
    let count = counts.entry(key.to_string()).or_insert(0);
    *count += 1;
    *count
}

/// The counts every worker of both listeners shares. A plain mutex: each request holds it
/// for a few map operations and never across an await.
#[derive(Default)]
struct Shared {
    counts: Mutex<Counts>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Every path of the counted listener.
async fn answer(req: HttpRequest, shared: web::Data<Shared>) -> HttpResponse {
    let client = req
        .headers()
        .get("x-real-ip")
        .and_then(|value| value.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.peer_addr().map(|peer| peer.ip().to_string()))
        .unwrap_or_default();
    let path = req.path();
    let count = shared.lock().note(path, &client);
    HttpResponse::Ok().json(json!({
        "upstream": "demo-upstream",
        "method": req.method().as_str(),
        "path": path,
        "count": count,
    }))
}

/// `GET /__upstream/count` of the count listener.
async fn counts(shared: web::Data<Shared>) -> HttpResponse {
    let counts = shared.lock().clone();
    HttpResponse::Ok().json(counts)
}

async fn health() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

async fn not_found() -> HttpResponse {
    HttpResponse::build(StatusCode::NOT_FOUND).json(json!({"status": 404}))
}

/// The two servers, listening, not yet serving.
pub struct DemoUpstream {
    app: Server,
    counts: Server,
}

impl DemoUpstream {
    /// Serves the counted answers on `app` and the counts on `counts`, each with `workers`
    /// threads.
    pub fn listen(app: TcpListener, counts: TcpListener, workers: usize) -> std::io::Result<Self> {
        let shared = web::Data::new(Shared::default());
        let answers = shared.clone();
        let app = HttpServer::new(move || {
            App::new()
                .app_data(answers.clone())
                .default_service(web::to(answer))
        })
        .workers(workers)
        .listen(app)?
        .run();
        let counts = HttpServer::new(move || {
            App::new()
                .app_data(shared.clone())
                .route("/__upstream/count", web::get().to(self::counts))
                .route("/health", web::get().to(health))
                .default_service(web::to(not_found))
        })
        .workers(1)
        .listen(counts)?
        .run();
        Ok(Self { app, counts })
    }

    /// Stops both servers from another thread or task.
    pub fn handles(&self) -> [ServerHandle; 2] {
        [self.app.handle(), self.counts.handle()]
    }

    /// Serves until stopped (SIGTERM, SIGINT, or the handles).
    pub async fn run(self) -> std::io::Result<()> {
        let counts = actix_rt::spawn(self.counts);
        let served = self.app.await;
        let counted = counts.await.unwrap_or(Ok(()));
        served.and(counted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_request_counts_in_total_by_path_and_by_client() {
        let mut counts = Counts::default();
        assert_eq!(counts.note("/a", "127.0.0.9"), 1);
        assert_eq!(counts.note("/a", "127.0.0.8"), 2);
        assert_eq!(counts.note("/b", "127.0.0.9"), 1);
        assert_eq!(counts.total, 3);
        assert_eq!(counts.path("/a"), 2);
        assert_eq!(counts.client("127.0.0.9"), 2);
        assert_eq!(counts.path("/never"), 0);
    }

    #[test]
    fn beyond_max_keys_new_paths_are_counted_together() {
        let mut counts = Counts::default();
        for i in 0..MAX_KEYS {
            counts.note(&format!("/{i}"), "c");
        }
        counts.note("/one-more", "c");
        counts.note("/another", "c");
        counts.note("/0", "c");
        assert_eq!(counts.paths.len(), MAX_KEYS + 1);
        assert_eq!(counts.path(OTHERS), 2);
        assert_eq!(counts.path("/0"), 2);
    }
}
