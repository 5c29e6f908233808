//! `grpc.health.v1`: `SERVING` only while the store can decide, as `/ready` answers 200.
//!
//! Each `Check` asks the store then, rather than a status kept by a poller, so a probe
//! never reads a stale answer; `Watch` asks every [`WATCH_EVERY`] and sends each change.
//! The service names answered are the server as a whole (`""`) and
//! [`RATE_LIMIT_SERVICE`]; any other is `NOT_FOUND` (for `Watch`, `SERVICE_UNKNOWN`).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt as _};
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::limiter::Limiter;

/// The rate-limit service's full name, as health checks name it.
pub const RATE_LIMIT_SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";

/// How often a `Watch` asks the store.
const WATCH_EVERY: Duration = Duration::from_secs(1);

pub(super) struct Health {
    limiter: Arc<Limiter>,
}

impl Health {
    pub(super) fn new(limiter: Arc<Limiter>) -> Self {
        Self { limiter }
    }
}

fn known(service: &str) -> bool {
    service.is_empty() || service == RATE_LIMIT_SERVICE
}

async fn status(limiter: &Limiter) -> ServingStatus {
    match limiter.check_ready().await {
        Ok(()) => ServingStatus::Serving,
        Err(_) => ServingStatus::NotServing,
    }
}

fn response(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse {
        status: status as i32,
    }
}

type Updates = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl tonic_health::pb::health_server::Health for Health {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let service = &request.get_ref().service;
        if !known(service) {
            return Err(Status::not_found("no such service here"));
        }
        Ok(Response::new(response(status(&self.limiter).await)))
    }

    type WatchStream = Updates;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        if !known(&request.get_ref().service) {
            let unknown = futures_util::stream::iter([Ok(response(ServingStatus::ServiceUnknown))])
                .chain(futures_util::stream::pending());
            return Ok(Response::new(Box::pin(unknown)));
        }
        let limiter = self.limiter.clone();
        let updates = futures_util::stream::unfold(None, move |last| {
            let limiter = limiter.clone();
            async move {
                loop {
                    let now = status(&limiter).await;
                    if last != Some(now) {
                        return Some((Ok(response(now)), Some(now)));
                    }
                    tokio::time::sleep(WATCH_EVERY).await;
                }
            }
        });
        Ok(Response::new(Box::pin(updates)))
    }
}
