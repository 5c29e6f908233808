//! Envoy's side of the rate-limit service: a real tonic client with timeouts, the messages
//! it sends, and rule files in temporary folders.

use std::time::Duration;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A channel to the gRPC port `port` on loopback; every call times out after `timeout`.
pub async fn rls_channel(port: u16, timeout: Duration) -> Channel {
    Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(timeout)
        .connect()
        .await
        .unwrap_or_else(|err| panic!("connect to the gRPC port {port}: {err}"))
}

/// The rate-limit service and the health service on one channel.
#[derive(Clone)]
pub struct RlsClient {
    pub rls: RateLimitServiceClient<Channel>,
    pub health: HealthClient<Channel>,
}

impl RlsClient {
    pub async fn connect(port: u16) -> Self {
        let channel = rls_channel(port, Duration::from_secs(5)).await;
        Self {
            rls: RateLimitServiceClient::new(channel.clone()),
            health: HealthClient::new(channel),
        }
    }

    pub async fn ask(
        &mut self,
        request: RateLimitRequest,
    ) -> Result<RateLimitResponse, tonic::Status> {
        self.rls
            .should_rate_limit(request)
            .await
            .map(tonic::Response::into_inner)
    }

    /// `ShouldRateLimit` of one descriptor of `entries` in `domain`: its overall code.
    pub async fn code_of(&mut self, domain: &str, entries: &[(&str, &str)]) -> Code {
        self.ask(rls_request(domain, vec![descriptor(entries)]))
            .await
            .unwrap_or_else(|status| panic!("{entries:?}: {status:?}"))
            .overall_code()
    }

    /// The health of the server as a whole (`""`).
    pub async fn serving(&mut self) -> ServingStatus {
        self.health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("a health answer")
            .into_inner()
            .status()
    }
}

pub fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(key, value)| Entry {
                key: key.to_string(),
                value: value.to_string(),
            })
            .collect(),
        ..RateLimitDescriptor::default()
    }
}

pub fn rls_request(domain: &str, descriptors: Vec<RateLimitDescriptor>) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.to_string(),
        descriptors,
        hits_addend: 0,
    }
}

/// Each status as (code, limit_remaining).
pub fn statuses(response: &RateLimitResponse) -> Vec<(Code, u32)> {
    response
        .statuses
        .iter()
        .map(|status| (status.code(), status.limit_remaining))
        .collect()
}

/// An `RLS_CONFIG` folder of rule files, kept as long as the value lives.
pub struct RlsFiles {
    dir: tempfile::TempDir,
}

impl RlsFiles {
    /// A folder holding `name` with `text`.
    pub fn new(name: &str, text: &str) -> Self {
        let files = Self {
            dir: tempfile::tempdir().expect("temporary folder"),
        };
        files.write(name, text);
        files
    }

    /// The folder, as `RLS_CONFIG` takes it.
    pub fn folder(&self) -> String {
        self.dir.path().display().to_string()
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// Writes `name` the way editors do: a new file renamed over the old. The staged file
    /// is hidden, so the folder never shows it as a rule file.
    pub fn write(&self, name: &str, text: &str) {
        let staged = self.dir.path().join(format!(".{name}.new"));
        std::fs::write(&staged, text).expect("write a rule file");
        std::fs::rename(&staged, self.path(name)).expect("rename the rule file into place");
    }
}
