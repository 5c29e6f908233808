//! `ShouldRateLimit`: a `RateLimitRequest` in, a `RateLimitResponse` or a gRPC status out.
//!
//! The answer follows envoyproxy/ratelimit's: `overall_code` is `OVER_LIMIT` when an
//! enforced descriptor lacked its hits; one status per descriptor, in order, with its own
//! code, its `current_limit` (rule name, `requests_per_unit`, unit), what is left of it
//! and when its bucket is full again; a descriptor no limit applies to (unknown domain, no
//! rule, a replaced rule) is `OK` with no `current_limit`, an `unlimited` one `OK` with
//! `limit_remaining` at its maximum. A descriptor that gives hits back
//! (`is_negative_hits`) is `OK`, with what its bucket holds after them. A store that
//! cannot decide follows `FAIL_MODE`: `local` decides from this instance's share, `open`
//! answers `OK`, `closed` answers the status `UNAVAILABLE`. With `RLS_RESPONSE_HEADERS`,
//! `response_headers_to_add` carries the quota headers an HTTP client would get.

use std::sync::Arc;

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit as ResponseUnit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::envoy::r#type::v3::RateLimitUnit;
use envoy_types::pb::google::protobuf::Duration;
use tonic::{Request, Response, Status};

use envoy_types::pb::envoy::config::core::v3::HeaderValue;

use crate::limiter::{DescriptorOutcome, DescriptorVerdict, Level, Limiter, Verdict};
use crate::metrics::Metrics;
use crate::quota_headers::{HeaderMode, quota_headers};
use crate::rls::{Charged, DescriptorView, LimitOverride, Refusal, RlsRequest, Unit};

/// The rate-limit service, over the limiter every front shares (and the rules it holds:
/// a reload swaps them between calls).
pub struct RlsService {
    limiter: Arc<Limiter>,
    metrics: Metrics,
    /// `RLS_RESPONSE_HEADERS`: the quota headers each answer carries for Envoy to add.
    headers: Option<HeaderMode>,
}

impl RlsService {
    /// The service over `limiter`; its metrics' label sets are declared here.
    pub fn new(limiter: Arc<Limiter>, metrics: Metrics, headers: Option<HeaderMode>) -> Self {
        let unmatched = crate::rls::Unmatched::ALL.map(crate::rls::Unmatched::as_str);
        metrics.declare_rls(&unmatched, CODES);
        Self {
            limiter,
            metrics,
            headers,
        }
    }

    pub fn limiter(&self) -> Arc<Limiter> {
        self.limiter.clone()
    }

    async fn answer(&self, message: &RateLimitRequest) -> Result<RateLimitResponse, Status> {
        let request = view_of(message);
        // The verdict borrows the rules' names: this snapshot outlives it.
        let rules = self.limiter.rules();
        let decided = self
            .limiter
            .decide_descriptors(&rules, &request)
            .await
            .map_err(|refusal| status_of(&refusal))?;
        if let Verdict::Closed { .. } = decided.verdict {
            return Err(Status::unavailable(
                "the store cannot decide now, and FAIL_MODE=closed refuses meanwhile",
            ));
        }
        for outcome in &decided.descriptors {
            if let DescriptorOutcome::Unmatched(why) = outcome {
                self.metrics.rls_unmatched(why.as_str());
            }
        }
        let mut response = response_of(&decided);
        if let Some(mode) = self.headers {
            response.response_headers_to_add = quota_headers(mode, &decided.verdict)
                .into_iter()
                .map(|(key, value)| HeaderValue {
                    key: key.to_string(),
                    value,
                    ..HeaderValue::default()
                })
                .collect();
        }
        Ok(response)
    }
}

#[tonic::async_trait]
impl RateLimitService for RlsService {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let answer = self.answer(request.get_ref()).await;
        let code = match &answer {
            Ok(response) if response.overall_code == Code::OverLimit as i32 => "OVER_LIMIT",
            Ok(_) => "OK",
            Err(status) => code_name(status.code()),
        };
        self.metrics.grpc_request(code);
        answer.map(Response::new)
    }
}

/// The request as the rules read it; nothing is copied but the entries' list.
fn view_of(message: &RateLimitRequest) -> RlsRequest<'_> {
    let descriptors = message
        .descriptors
        .iter()
        .map(|descriptor| DescriptorView {
            entries: descriptor
                .entries
                .iter()
                .map(|entry| (entry.key.as_str(), entry.value.as_str()))
                .collect(),
            limit: descriptor.limit.map(|limit| LimitOverride {
                requests_per_unit: limit.requests_per_unit,
                unit: RateLimitUnit::try_from(limit.unit).ok().and_then(unit_of),
            }),
            hits_addend: descriptor.hits_addend.map(|hits| hits.value),
            negative_hits: descriptor.is_negative_hits,
        })
        .collect();
    RlsRequest {
        domain: &message.domain,
        descriptors,
        hits_addend: message.hits_addend,
    }
}

/// An override's unit. The override's enum has no week (the response's has).
fn unit_of(unit: RateLimitUnit) -> Option<Unit> {
    Some(match unit {
        RateLimitUnit::Unknown => return None,
        RateLimitUnit::Second => Unit::Second,
        RateLimitUnit::Minute => Unit::Minute,
        RateLimitUnit::Hour => Unit::Hour,
        RateLimitUnit::Day => Unit::Day,
        RateLimitUnit::Month => Unit::Month,
        RateLimitUnit::Year => Unit::Year,
    })
}

fn response_unit(unit: Unit) -> ResponseUnit {
    match unit {
        Unit::Second => ResponseUnit::Second,
        Unit::Minute => ResponseUnit::Minute,
        Unit::Hour => ResponseUnit::Hour,
        Unit::Day => ResponseUnit::Day,
        Unit::Week => ResponseUnit::Week,
        Unit::Month => ResponseUnit::Month,
        Unit::Year => ResponseUnit::Year,
    }
}

fn status_of(refusal: &Refusal) -> Status {
    Status::invalid_argument(refusal.to_string())
}

fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::Unavailable => "UNAVAILABLE",
        _ => "OTHER",
    }
}

/// Every code [`RateLimitService::should_rate_limit`] counts a call under.
pub const CODES: &[&str] = &[
    "OK",
    "OVER_LIMIT",
    "INVALID_ARGUMENT",
    "UNAVAILABLE",
    "OTHER",
];

fn response_of(decided: &DescriptorVerdict<'_>) -> RateLimitResponse {
    let overall = if decided.verdict.allowed() {
        Code::Ok
    } else {
        Code::OverLimit
    };
    let statuses = decided
        .descriptors
        .iter()
        .map(|outcome| match outcome {
            DescriptorOutcome::Unmatched(_) => DescriptorStatus {
                code: Code::Ok as i32,
                ..DescriptorStatus::default()
            },
            DescriptorOutcome::Unlimited => DescriptorStatus {
                code: Code::Ok as i32,
                limit_remaining: u32::MAX,
                ..DescriptorStatus::default()
            },
            DescriptorOutcome::Limited { charged, .. } => {
                let part = decided.limit_of(outcome);
                let lacked = part.is_some_and(|part| part.enforced && part.lacked());
                let code = if lacked { Code::OverLimit } else { Code::Ok };
                limited_status(code, charged, part.and_then(|part| part.level))
            }
            DescriptorOutcome::GivenBack { charged, level } => {
                limited_status(Code::Ok, charged, *level)
            }
        })
        .collect();
    RateLimitResponse {
        overall_code: overall as i32,
        statuses,
        ..RateLimitResponse::default()
    }
}

/// The status of a descriptor with a limit: its rule's name and limit, and its bucket's
/// level when one was asked.
fn limited_status(code: Code, charged: &Charged<'_>, level: Option<Level>) -> DescriptorStatus {
    let stated = charged.limit();
    DescriptorStatus {
        code: code as i32,
        current_limit: Some(RateLimit {
            name: charged.name().to_string(),
            requests_per_unit: stated.requests_per_unit,
            unit: response_unit(stated.unit) as i32,
        }),
        limit_remaining: level.map_or(0, |level| {
            u32::try_from(level.remaining).unwrap_or(u32::MAX)
        }),
        duration_until_reset: level.map(|level| duration(level.full_after_us)),
        quota: None,
    }
}

fn duration(micros: u64) -> Duration {
    Duration {
        seconds: i64::try_from(micros / 1_000_000).unwrap_or(i64::MAX),
        nanos: ((micros % 1_000_000) * 1_000) as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duration_keeps_its_microseconds() {
        let d = duration(2_500_001);
        assert_eq!((d.seconds, d.nanos), (2, 500_001_000));
    }

    #[test]
    fn the_override_and_response_enums_number_units_alike() {
        assert_eq!(unit_of(RateLimitUnit::Unknown), None);
        for unit in Unit::ALL.into_iter().filter(|unit| *unit != Unit::Week) {
            let number = response_unit(unit) as i32;
            let back = RateLimitUnit::try_from(number).ok().and_then(unit_of);
            assert_eq!(back, Some(unit));
        }
        assert!(RateLimitUnit::try_from(response_unit(Unit::Week) as i32).is_err());
    }
}
