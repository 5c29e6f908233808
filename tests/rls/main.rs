//! The rate-limit service over gRPC, asked by a real tonic client, deciding in a real
//! `redis-server` started per test:
//!
//! - here, `grpc::serve` on port 0 over a limiter built by hand: what `ShouldRateLimit`
//!   answers;
//! - `service`: the whole service (`Application::build`, or the binary) with `GRPC_PORT`
//!   and `RLS_CONFIG`: its reloads, its stop, and the HTTP API beside it;
//! - `cost`: an ignored measurement of what a decision costs the instances and Redis
//!   through each front.

mod cost;
mod service;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use ratelimiter::grpc::RlsService;
use ratelimiter::limiter::{Buckets, Decider, DeciderSettings, FailMode, Limiter};
use ratelimiter::metrics::Metrics;
use ratelimiter::policy::{HashKey, PolicySet};
use ratelimiter::rls::RuleSet;
use ratelimiter::store::memory::MemoryStore;
use ratelimiter::store::redis::{
    ConnectionMode, ConnectionSettings, Master, MasterSlot, RedisStore,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use testkit::{RedisProcess, descriptor, rls_request, statuses, unique_prefix};

const RULES: &str = "\
domain: edge
descriptors:
  - key: user
    rate_limit: { name: per-user, unit: minute, requests_per_unit: 3 }
  - key: org
    rate_limit: { unit: hour, requests_per_unit: 10 }
";

/// The gRPC server over a limiter deciding in `redis`, stopped on drop.
struct TestRls {
    client: RateLimitServiceClient<Channel>,
    health: HealthClient<Channel>,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
}

impl TestRls {
    /// A Redis of its own, and an instance on it that fails closed.
    async fn on_a_fresh_redis(test: &str) -> (RedisProcess, Self) {
        let redis = RedisProcess::server(None, &[]);
        let rls = Self::start(&redis, test, FailMode::Closed).await;
        (redis, rls)
    }

    async fn start(redis: &RedisProcess, test: &str, fail_mode: FailMode) -> Self {
        Self::start_with_prefix(redis, unique_prefix(test), fail_mode).await
    }

    /// An instance whose buckets are under `prefix`: two with one prefix share them.
    async fn start_with_prefix(redis: &RedisProcess, prefix: String, fail_mode: FailMode) -> Self {
        let info = redis::IntoConnectionInfo::into_connection_info(redis.url().as_str()).unwrap();
        let timeout = Duration::from_millis(500);
        let slot = Arc::new(MasterSlot::default());
        let connections = ConnectionSettings {
            mode: ConnectionMode::Multiplexed { batch_max: 32 },
            timeout,
        };
        slot.install(Arc::new(Master::open(info, connections).unwrap()));
        let metrics = Metrics::new(true);
        let decider = Decider::new(DeciderSettings {
            buckets: Buckets::Shared(Arc::new(RedisStore::new(slot, timeout))),
            fail_mode,
            instances: Arc::new(|| 1),
            deny_cache_size: 0,
            fallback: MemoryStore::new(1_000),
            metrics: metrics.clone(),
        });
        let policies = PolicySet::single(ratelimiter::bucket::LimitSpec {
            rate: 1,
            window_s: 1,
            burst: 1,
        })
        .unwrap();
        let rules = RuleSet::parse(&[("edge.yaml", RULES)], HashKey::default()).unwrap();
        let limiter = Arc::new(Limiter::new(
            Arc::new(ArcSwap::from_pointee(policies)),
            Arc::new(ArcSwap::from_pointee(rules)),
            prefix,
            decider,
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel();
        let server = tokio::spawn(async move {
            let service = RlsService::new(limiter, metrics, None);
            ratelimiter::grpc::serve(listener, service, async {
                let _ = stopped.await;
            })
            .await
            .expect("the gRPC server runs");
        });
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect to the gRPC server");
        Self {
            client: RateLimitServiceClient::new(channel.clone()),
            health: HealthClient::new(channel),
            shutdown: Some(stop),
            server: Some(server),
        }
    }

    async fn ask(&mut self, request: RateLimitRequest) -> Result<RateLimitResponse, tonic::Status> {
        self.client
            .should_rate_limit(request)
            .await
            .map(tonic::Response::into_inner)
    }

    /// `ShouldRateLimit` in domain `edge` of `descriptors`, which must be answered.
    async fn decide(&mut self, descriptors: Vec<RateLimitDescriptor>) -> RateLimitResponse {
        self.answer(request("edge", descriptors)).await
    }

    /// The answer to `request`, which must not be refused.
    async fn answer(&mut self, request: RateLimitRequest) -> RateLimitResponse {
        self.ask(request).await.unwrap()
    }

    /// Why `request` is refused, which it must be.
    async fn refusal(&mut self, request: RateLimitRequest) -> tonic::Status {
        self.ask(request).await.unwrap_err()
    }

    async fn stop(mut self) {
        if let Some(stop) = self.shutdown.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        }
    }
}

impl Drop for TestRls {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

/// The overall code of `response`, and each descriptor's code and tokens left.
fn answer(response: &RateLimitResponse) -> (Code, Vec<(Code, u32)>) {
    (response.overall_code(), statuses(response))
}

/// A request in `domain` of one descriptor of `entries`.
fn one(domain: &str, entries: &[(&str, &str)]) -> RateLimitRequest {
    request(domain, vec![descriptor(entries)])
}

fn request(domain: &str, descriptors: Vec<RateLimitDescriptor>) -> RateLimitRequest {
    rls_request(domain, descriptors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_descriptor_is_admitted_exactly_its_limit_then_over_limit() {
    let (_redis, mut rls) = TestRls::on_a_fresh_redis("exact").await;
    for remaining in [2, 1, 0] {
        let response = rls.decide(vec![descriptor(&[("user", "ann")])]).await;
        assert_eq!(answer(&response), (Code::Ok, vec![(Code::Ok, remaining)]));
        let status = &response.statuses[0];
        let limit = status.current_limit.as_ref().unwrap();
        assert_eq!(
            (limit.name.as_str(), limit.requests_per_unit, limit.unit()),
            ("per-user", 3, Unit::Minute)
        );
        let reset = status.duration_until_reset.unwrap();
        assert!(
            reset.seconds > 0 && reset.seconds <= 60,
            "until full: {reset:?}"
        );
    }
    let response = rls.decide(vec![descriptor(&[("user", "ann")])]).await;
    assert_eq!(
        answer(&response),
        (Code::OverLimit, vec![(Code::OverLimit, 0)])
    );
    rls.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_descriptor_over_its_limit_spends_nothing_of_the_others_in_its_request() {
    let (_redis, mut rls) = TestRls::on_a_fresh_redis("all-or-nothing").await;
    let mut many = descriptor(&[("user", "bob")]);
    many.hits_addend = Some(envoy_types::pb::google::protobuf::UInt64Value { value: 3 });
    let spent = rls.decide(vec![many]).await;
    assert_eq!(spent.overall_code(), Code::Ok);
    for _ in 0..3 {
        let refused = rls
            .decide(vec![
                descriptor(&[("org", "acme")]),
                descriptor(&[("user", "bob")]),
            ])
            .await;
        assert_eq!(refused.overall_code(), Code::OverLimit);
        assert_eq!(
            statuses(&refused),
            [(Code::Ok, 10), (Code::OverLimit, 0)],
            "the org descriptor had its hit, and was not charged it"
        );
    }
    let alone = rls.decide(vec![descriptor(&[("org", "acme")])]).await;
    assert_eq!(statuses(&alone), [(Code::Ok, 9)]);
    rls.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_beyond_a_limits_capacity_are_over_limit_not_an_error() {
    let (_redis, mut rls) = TestRls::on_a_fresh_redis("beyond").await;
    let mut asked = one("edge", &[("user", "cid")]);
    asked.hits_addend = 4;
    let response = rls.answer(asked).await;
    assert_eq!(
        answer(&response),
        (Code::OverLimit, vec![(Code::OverLimit, 3)])
    );
    rls.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_domain_or_descriptor_is_ok_with_no_limit() {
    let (_redis, mut rls) = TestRls::on_a_fresh_redis("unknown").await;
    let response = rls.answer(one("elsewhere", &[("user", "ann")])).await;
    assert_eq!(response.overall_code(), Code::Ok);
    assert_eq!(response.statuses.len(), 1);
    assert_eq!(response.statuses[0].code(), Code::Ok);
    assert_eq!(response.statuses[0].current_limit, None);
    let response = rls
        .decide(vec![
            descriptor(&[("colour", "red")]),
            descriptor(&[("user", "ann")]),
        ])
        .await;
    assert_eq!(response.overall_code(), Code::Ok);
    assert_eq!(response.statuses[0].current_limit, None);
    assert!(response.statuses[1].current_limit.is_some());
    rls.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_domain_or_descriptors_is_an_invalid_argument() {
    let (_redis, mut rls) = TestRls::on_a_fresh_redis("invalid").await;
    let empty_domain = rls.refusal(one("", &[("user", "ann")])).await;
    assert_eq!(empty_domain.code(), tonic::Code::InvalidArgument);
    assert!(
        empty_domain.message().contains("domain"),
        "{empty_domain:?}"
    );
    let no_descriptors = rls.refusal(request("edge", vec![])).await;
    assert_eq!(no_descriptors.code(), tonic::Code::InvalidArgument);
    rls.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_refused_with_a_status_and_the_server_carries_on() {
    let (_redis, mut rls) = TestRls::on_a_fresh_redis("oversized").await;
    let thousands = request("edge", vec![descriptor(&[("user", "x")]); 2_000]);
    let refused = rls.refusal(thousands).await;
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    let huge = "v".repeat(100 * 1024);
    let refused = rls.refusal(one("edge", &[("user", &huge)])).await;
    assert_ne!(refused.code(), tonic::Code::Ok, "{refused:?}");
    let fine = rls.decide(vec![descriptor(&[("user", "ann")])]).await;
    assert_eq!(fine.overall_code(), Code::Ok);
    rls.stop().await;
}

/// A descriptor giving `hits` back (`is_negative_hits`).
fn given_back(entries: &[(&str, &str)], hits: u64) -> RateLimitDescriptor {
    RateLimitDescriptor {
        is_negative_hits: true,
        hits_addend: Some(envoy_types::pb::google::protobuf::UInt64Value { value: hits }),
        ..descriptor(entries)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_given_back_return_to_the_bucket_in_redis_never_past_its_limit() {
    let (_redis, mut rls) = TestRls::on_a_fresh_redis("given-back").await;
    let ask_one = || one("edge", &[("user", "joe")]);
    for _ in 0..3 {
        assert_eq!(rls.answer(ask_one()).await.overall_code(), Code::Ok);
    }
    assert_eq!(rls.answer(ask_one()).await.overall_code(), Code::OverLimit);
    let given = rls.decide(vec![given_back(&[("user", "joe")], 2)]).await;
    assert_eq!(answer(&given), (Code::Ok, vec![(Code::Ok, 2)]));
    assert_eq!(
        given.statuses[0].current_limit.as_ref().unwrap().name,
        "per-user"
    );
    for code in [Code::Ok, Code::Ok, Code::OverLimit] {
        assert_eq!(rls.answer(ask_one()).await.overall_code(), code);
    }
    let too_many = rls
        .decide(vec![given_back(&[("user", "joe")], 1_000)])
        .await;
    assert_eq!(statuses(&too_many), [(Code::Ok, 3)], "full, and no more");
    for code in [Code::Ok, Code::Ok, Code::Ok, Code::OverLimit] {
        assert_eq!(rls.answer(ask_one()).await.overall_code(), code);
    }
    rls.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_serving_only_while_redis_can_decide_and_closed_refuses_meanwhile() {
    let mut redis = RedisProcess::server(None, &[]);
    let mut rls = TestRls::start(&redis, "health", FailMode::Closed).await;
    let check = |service: &str| HealthCheckRequest {
        service: service.to_string(),
    };
    let status = rls.health.check(check("")).await.unwrap().into_inner();
    assert_eq!(status.status(), ServingStatus::Serving);
    let named = rls
        .health
        .check(check(ratelimiter::grpc::RATE_LIMIT_SERVICE))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(named.status(), ServingStatus::Serving);
    let unknown = rls.health.check(check("other")).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    redis.kill();
    let status = rls.health.check(check("")).await.unwrap().into_inner();
    assert_eq!(status.status(), ServingStatus::NotServing);
    let refused = rls.refusal(one("edge", &[("user", "ann")])).await;
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    rls.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_answers_ok_while_redis_cannot_decide() {
    let mut redis = RedisProcess::server(None, &[]);
    let mut rls = TestRls::start(&redis, "open", FailMode::Open).await;
    redis.kill();
    for _ in 0..5 {
        let response = rls.decide(vec![descriptor(&[("user", "ann")])]).await;
        assert_eq!(response.overall_code(), Code::Ok);
    }
    rls.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_to_two_instances_sharing_redis_admit_exactly_the_limit() {
    let redis = RedisProcess::server(None, &[]);
    let prefix = unique_prefix("shared");
    let first = TestRls::start_with_prefix(&redis, prefix.clone(), FailMode::Closed).await;
    let second = TestRls::start_with_prefix(&redis, prefix, FailMode::Closed).await;
    let calls = (0..40).map(|i| {
        let mut client = if i % 2 == 0 {
            first.client.clone()
        } else {
            second.client.clone()
        };
        tokio::spawn(async move {
            client
                .should_rate_limit(one("edge", &[("user", "zoe")]))
                .await
                .expect("an answer")
                .into_inner()
                .overall_code()
        })
    });
    let mut admitted = 0;
    for call in calls.collect::<Vec<_>>() {
        if call.await.unwrap() == Code::Ok {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 3, "the limit is 3 a minute");
    first.stop().await;
    second.stop().await;
}
