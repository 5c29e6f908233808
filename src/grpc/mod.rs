//! The gRPC front: Envoy's rate-limit service (`envoy.service.ratelimit.v3`
//! `RateLimitService/ShouldRateLimit`) and the standard health service
//! (`grpc.health.v1`), on a listener of their own beside the HTTP one.
//!
//! Like the HTTP front it only translates: a request becomes a protocol-neutral
//! [`RlsRequest`](crate::rls::RlsRequest), the limiter decides it under the rules in
//! force ([`Limiter::decide_descriptors`]), and the verdict becomes the response. Nothing
//! here knows actix, buckets or the store.
//!
//! - `service.rs`: `ShouldRateLimit`, request in, response or gRPC status out.
//! - `health.rs`: `grpc.health.v1`, `SERVING` only while the store can decide.
//!
//! Bounded by construction: a message over [`MAX_MESSAGE_BYTES`] is refused by the
//! decoder before it is read whole, a connection carries at most
//! [`MAX_STREAMS_PER_CONNECTION`] calls at once, and the caps of [`crate::rls`]
//! (descriptors, entries, entry length) are refused with `INVALID_ARGUMENT` before any
//! bucket is asked.

mod health;
mod service;

use std::future::Future;

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::pb::health_server::HealthServer;

pub use health::RATE_LIMIT_SERVICE;
pub use service::RlsService;

/// The largest `ShouldRateLimit` message taken, in bytes. Envoy's are a few hundred bytes;
/// this leaves room for the most descriptors and entries [`crate::rls`] accepts with
/// ordinary values, and bounds what one call can make the server hold.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Calls in flight on one connection at most: Envoy multiplexes its calls on a few
/// connections, and this with [`MAX_MESSAGE_BYTES`] bounds what one connection can make
/// the server hold.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// Why the gRPC server stopped other than by its shutdown signal.
#[derive(Debug, Error)]
pub enum GrpcError {
    #[error("the gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Serves `ShouldRateLimit` (under the rules the limiter holds at each call) and
/// `grpc.health.v1` on `listener` until `shutdown` completes; calls in flight then finish.
/// The listener is the caller's, so port 0 works in tests.
pub async fn serve(
    listener: TcpListener,
    service: RlsService,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), GrpcError> {
    let health = health::Health::new(service.limiter());
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .add_service(
            RateLimitServiceServer::new(service).max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(HealthServer::new(health).max_decoding_message_size(MAX_MESSAGE_BYTES))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}
