//! A verdict as HTTP says it: the headers that describe the decision and how the request
//! ends. `/limited_endpoint` and the gateway's `/v1/check` both answer from a [`Reply`],
//! so a client sees the same headers and problem bodies whichever route decided.

use actix_web::http::StatusCode;
use actix_web::http::header::{HeaderName, HeaderValue, RETRY_AFTER};

use super::headers::{
    HeaderMode, X_RATELIMIT_SOURCE, ceil_millis, item_name, quota_headers, retry_after_secs,
};
use super::problem::Problem;
use crate::limiter::Verdict;

/// What the limiter's verdict on one request becomes over HTTP.
pub struct Reply {
    /// `X-RateLimit-Source`, the quota headers (`RATELIMIT_HEADERS`), and `Retry-After`
    /// on a 429 or 503.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub ending: Ending,
}

/// How a request ends; the problem body of a refusal is rendered once, here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// Every enforced limit had the tokens, or none applied, or `FAIL_MODE=open`.
    Admitted,
    /// 429: an enforced limit lacked tokens.
    Limited(String),
    /// 503: the store cannot decide and `FAIL_MODE=closed`.
    Unavailable(String),
    /// 400: the request cannot be decided (a policy refuses its shape, or its client is
    /// unknown); no bucket was asked.
    Refused(String),
}

impl Ending {
    /// The status the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            Ending::Admitted => StatusCode::OK,
            Ending::Limited(_) => StatusCode::TOO_MANY_REQUESTS,
            Ending::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Ending::Refused(_) => StatusCode::BAD_REQUEST,
        }
    }
}

impl Reply {
    /// A 400 before any policy was asked; `detail` says why, never quoting the client.
    pub fn refused(detail: &str) -> Self {
        Reply {
            headers: Vec::new(),
            ending: Ending::Refused(Problem::new(StatusCode::BAD_REQUEST).detail(detail).body()),
        }
    }

    /// The verdict in `mode`'s headers, and the problem body of a refusal.
    pub fn of(verdict: &Verdict<'_>, mode: HeaderMode) -> Self {
        let mut headers = quota_headers(mode, verdict);
        if let Some(source) = verdict.source() {
            headers.push((
                X_RATELIMIT_SOURCE,
                HeaderValue::from_static(source.as_str()),
            ));
        }
        let ending = match verdict {
            Verdict::Decided {
                admitted: false, ..
            } => {
                let retry_after_us = verdict.retry_after_us();
                headers.push((
                    RETRY_AFTER,
                    HeaderValue::from(retry_after_secs(retry_after_us)),
                ));
                let violated: Vec<String> = verdict
                    .violated()
                    .map(|name| {
                        let mut text = String::new();
                        item_name(&name, &mut text);
                        text
                    })
                    .collect();
                let violated: Vec<&str> = violated.iter().map(String::as_str).collect();
                Ending::Limited(
                    Problem::quota_exceeded(&violated, ceil_millis(retry_after_us).max(1)).body(),
                )
            }
            Verdict::Unlimited | Verdict::Decided { .. } | Verdict::Open { .. } => Ending::Admitted,
            Verdict::Closed { .. } => {
                headers.push((RETRY_AFTER, HeaderValue::from_static("1")));
                Ending::Unavailable(
                    Problem::new(StatusCode::SERVICE_UNAVAILABLE)
                        .detail("the rate-limit store cannot decide and FAIL_MODE=closed")
                        .body(),
                )
            }
        };
        Reply { headers, ending }
    }
}
