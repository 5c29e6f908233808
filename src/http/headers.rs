//! The quota headers of a limited route, as pure functions of a verdict.
//!
//! Draft: draft-ietf-httpapi-ratelimit-headers-10 (`RateLimit-Policy`, `RateLimit`).
//! Legacy: the widely deployed `X-RateLimit-Limit`, `-Remaining`, `-Reset` (in seconds).

use actix_web::http::header::{HeaderName, HeaderValue};

use crate::decision::Verdict;

/// How a limited response describes the client's quota (`RATELIMIT_HEADERS`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, strum::EnumString, strum::IntoStaticStr, strum::VariantNames,
)]
#[strum(serialize_all = "lowercase", ascii_case_insensitive)]
pub enum HeaderMode {
    /// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers-10).
    Draft,
    /// `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset`.
    Legacy,
    Both,
    None,
}

impl HeaderMode {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// The one policy this service enforces, as headers and problem bodies name it.
pub const POLICY_NAME: &str = "default";

/// Whole seconds, rounded up: a client told to wait `n` seconds never comes back early.
pub fn ceil_secs(micros: u64) -> u64 {
    micros.div_ceil(1_000_000)
}

/// Whole milliseconds, rounded up.
pub fn ceil_millis(micros: u64) -> u64 {
    micros.div_ceil(1_000)
}

/// `Retry-After` for a denial: at least one second, and never before a token exists.
pub fn retry_after_secs(retry_after_us: u64) -> u64 {
    ceil_secs(retry_after_us).max(1)
}

/// The headers a limited response carries in `mode`, besides `Retry-After`. Names are
/// lower case, as HTTP/1.1 sends them here and HTTP/2 requires.
pub fn quota_headers(mode: HeaderMode, verdict: &Verdict) -> Vec<(HeaderName, HeaderValue)> {
    let draft = matches!(mode, HeaderMode::Draft | HeaderMode::Both);
    let legacy = matches!(mode, HeaderMode::Legacy | HeaderMode::Both);
    let limit = verdict.limit();
    let mut headers = Vec::with_capacity(5);
    if draft {
        headers.push((
            RATELIMIT_POLICY,
            formatted(format_args!(
                "\"{POLICY_NAME}\";q={};w={}",
                limit.capacity(),
                limit.window_secs()
            )),
        ));
    }
    if legacy {
        headers.push((X_RATELIMIT_LIMIT, HeaderValue::from(limit.capacity())));
    }
    if let Verdict::Decided { decision, .. } = verdict {
        if draft {
            headers.push((
                RATELIMIT,
                formatted(format_args!(
                    "\"{POLICY_NAME}\";r={};t={}",
                    decision.remaining,
                    ceil_secs(decision.next_token_us)
                )),
            ));
        }
        if legacy {
            headers.push((X_RATELIMIT_REMAINING, HeaderValue::from(decision.remaining)));
            headers.push((
                X_RATELIMIT_RESET,
                HeaderValue::from(ceil_secs(decision.full_after_us)),
            ));
        }
    }
    headers
}

/// Which part of the system decided (`decision::Source`); on every limited response.
pub const X_RATELIMIT_SOURCE: HeaderName = HeaderName::from_static("x-ratelimit-source");
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// A header value from text that is printable ASCII by construction (a quoted token and
/// numbers), so it cannot be rejected.
fn formatted(text: std::fmt::Arguments<'_>) -> HeaderValue {
    HeaderValue::try_from(text.to_string()).expect("printable ASCII is a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bucket::{Decision, Limit, LimitSpec};
    use crate::decision::Bucket;

    fn as_text(headers: Vec<(HeaderName, HeaderValue)>) -> Vec<(String, String)> {
        headers
            .into_iter()
            .map(|(name, value)| (name.to_string(), value.to_str().unwrap().to_string()))
            .collect()
    }

    fn text(name: &str, value: &str) -> (String, String) {
        (name.to_string(), value.to_string())
    }

    fn verdict(decision: Option<Decision>) -> Verdict {
        let limit = Limit::parse(LimitSpec {
            rate: 10,
            window_s: 60,
            burst: 10,
        })
        .unwrap();
        match decision {
            Some(decision) => Verdict::Decided {
                bucket: Bucket::Shared,
                limit,
                decision,
            },
            None => Verdict::Open { limit },
        }
    }

    fn denial() -> Decision {
        Decision {
            allowed: false,
            remaining: 0,
            next_token_us: 5_000_001,
            full_after_us: 59_000_000,
        }
    }

    #[test]
    fn draft_headers_name_the_policy_quota_and_window() {
        let headers = as_text(quota_headers(HeaderMode::Draft, &verdict(Some(denial()))));
        assert_eq!(
            headers,
            vec![
                text("ratelimit-policy", "\"default\";q=10;w=60"),
                text("ratelimit", "\"default\";r=0;t=6"),
            ]
        );
    }

    #[test]
    fn legacy_headers_replace_the_draft_ones() {
        let headers = as_text(quota_headers(HeaderMode::Legacy, &verdict(Some(denial()))));
        assert_eq!(
            headers,
            vec![
                text("x-ratelimit-limit", "10"),
                text("x-ratelimit-remaining", "0"),
                text("x-ratelimit-reset", "59"),
            ]
        );
    }

    #[test]
    fn both_and_none_modes_do_what_they_say() {
        assert_eq!(
            quota_headers(HeaderMode::Both, &verdict(Some(denial()))).len(),
            5
        );
        assert!(quota_headers(HeaderMode::None, &verdict(Some(denial()))).is_empty());
    }

    #[test]
    fn without_a_bucket_only_the_policy_is_stated() {
        let headers = quota_headers(HeaderMode::Draft, &verdict(None));
        assert_eq!(headers.len(), 1);
        assert_eq!(headers[0].0, "ratelimit-policy");
    }

    #[test]
    fn retry_after_is_rounded_up_and_at_least_one_second() {
        assert_eq!(retry_after_secs(0), 1);
        assert_eq!(retry_after_secs(1), 1);
        assert_eq!(retry_after_secs(6_000_000), 6);
        assert_eq!(retry_after_secs(6_000_001), 7);
        assert_eq!(ceil_millis(1_001), 2);
    }
}
