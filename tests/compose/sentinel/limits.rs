//! Exact limits through Nginx from both instances, and X-Forwarded-For believed from
//! Nginx only.

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use testkit::RlsClient;
use tonic_health::pb::health_check_response::ServingStatus;

use super::{INSTANCES, Topology};
use crate::RATE_LIMIT;
use crate::answers_200;
use crate::clients::{Reply, assert_exact, requests_from, statuses};

impl Topology {
    pub async fn a_client_gets_exactly_its_limit_from_both_instances(&self) {
        let mut replies = Vec::new();
        for _ in 0..RATE_LIMIT + 2 {
            let sent = self
                .http
                .get(self.url(self.nginx, "/limited_endpoint"))
                .send()
                .await;
            replies.push(Reply::of(sent.expect("a request through Nginx")).await);
        }
        assert_exact("a client on this host", &replies, RATE_LIMIT, &INSTANCES);

        let (client, replies) = self.new_client_through_nginx();

        assert_exact(
            &format!("client {client}, its own bucket"),
            &replies,
            RATE_LIMIT,
            &INSTANCES,
        );
        let http_port = self.stack.port("nginx", 80);
        assert!(
            answers_200(&self.http, &self.url(http_port, "/health")).await,
            "Nginx does not answer /health on its port 80"
        );
        eprintln!("  ok: Nginx answers on port 80 too");
    }

    /// Envoy's rate-limit service on both instances' published gRPC ports: serving, and the
    /// example rules' login limit (5 a minute per address) shared exactly between them.
    pub async fn the_rate_limit_service_is_exact_across_both_instances(&self) {
        let mut instances = Vec::new();
        for instance in INSTANCES {
            let mut client = RlsClient::connect(self.stack.port(instance, 8051)).await;
            assert_eq!(client.serving().await, ServingStatus::Serving, "{instance}");
            instances.push(client);
        }
        let entries = [("generic_key", "login"), ("remote_address", "203.0.113.77")];
        let mut codes = Vec::new();
        for call in 0..7 {
            codes.push(instances[call % 2].code_of("edge", &entries).await);
        }
        let expected = [[Code::Ok; 5].as_slice(), &[Code::OverLimit; 2]].concat();
        assert_eq!(codes, expected, "alternating between {INSTANCES:?}");
        eprintln!("  ok: gRPC: 5 of 7 login calls admitted across both instances");
    }

    pub fn x_forwarded_for_is_believed_from_nginx_only(&self) {
        let direct = "http://app-1:8000/limited_endpoint";
        let claim = ["-H", "X-Forwarded-For: 198.51.100.7"];
        let spoofer = self.new_client();
        let replies = requests_from(
            &self.stack,
            &self.front,
            &spoofer,
            RATE_LIMIT + 1,
            direct,
            &claim,
        );
        assert_eq!(
            replies.last().map(|r| r.status),
            Some(429),
            "client {spoofer} did not exhaust its bucket"
        );

        let other = self.new_client();
        let replies = requests_from(&self.stack, &self.front, &other, 1, direct, &claim);
        assert_eq!(
            statuses(&replies),
            "200",
            "client {other}, claiming the same address directly: believed"
        );
        eprintln!(
            "  ok: an instance ignores X-Forwarded-For from clients: two claiming one address keep their own buckets"
        );

        let other = self.new_client();
        let claim = format!("X-Forwarded-For: {spoofer}");
        let url = "http://nginx:8000/limited_endpoint";
        let replies = requests_from(&self.stack, &self.front, &other, 1, url, &["-H", &claim]);
        assert_eq!(
            statuses(&replies),
            "200",
            "client {other}, claiming to be {spoofer} through Nginx: passed on"
        );
        eprintln!(
            "  ok: through Nginx, a client claiming to be the exhausted {spoofer} keeps its own bucket"
        );
    }
}
