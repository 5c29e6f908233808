//! The quota headers of a limited route, as pure functions of a verdict.
//!
//! Draft: draft-ietf-httpapi-ratelimit-headers-10 (`RateLimit-Policy`, `RateLimit`).
//! Legacy: the widely deployed `X-RateLimit-Limit`, `-Remaining`, `-Reset` (in seconds).

use crate::config::HeaderMode;
use crate::rate_limiter::Verdict;

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

/// The headers a limited response carries in `mode`, besides `Retry-After`.
pub fn quota_headers(mode: HeaderMode, verdict: &Verdict) -> Vec<(&'static str, String)> {
    let draft = matches!(mode, HeaderMode::Draft | HeaderMode::Both);
    let legacy = matches!(mode, HeaderMode::Legacy | HeaderMode::Both);
    let policy = &verdict.policy;
    let mut headers = Vec::with_capacity(5);
    if draft {
        headers.push((
            "RateLimit-Policy",
            format!(
                "\"{POLICY_NAME}\";q={};w={}",
                policy.capacity(),
                policy.window_secs()
            ),
        ));
    }
    if legacy {
        headers.push(("X-RateLimit-Limit", policy.capacity().to_string()));
    }
    if let Some(decision) = &verdict.decision {
        if draft {
            headers.push((
                "RateLimit",
                format!(
                    "\"{POLICY_NAME}\";r={};t={}",
                    decision.remaining,
                    ceil_secs(decision.next_token_us)
                ),
            ));
        }
        if legacy {
            headers.push(("X-RateLimit-Remaining", decision.remaining.to_string()));
            headers.push((
                "X-RateLimit-Reset",
                ceil_secs(decision.full_after_us).to_string(),
            ));
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::{Decision, Policy};
    use crate::rate_limiter::Source;

    fn verdict(decision: Option<Decision>) -> Verdict {
        Verdict {
            source: Source::Redis,
            policy: Policy::parse(10, 60, 10).unwrap(),
            decision,
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
        let headers = quota_headers(HeaderMode::Draft, &verdict(Some(denial())));
        assert_eq!(
            headers,
            vec![
                ("RateLimit-Policy", "\"default\";q=10;w=60".to_string()),
                ("RateLimit", "\"default\";r=0;t=6".to_string()),
            ]
        );
    }

    #[test]
    fn legacy_headers_replace_the_draft_ones() {
        let headers = quota_headers(HeaderMode::Legacy, &verdict(Some(denial())));
        assert_eq!(
            headers,
            vec![
                ("X-RateLimit-Limit", "10".to_string()),
                ("X-RateLimit-Remaining", "0".to_string()),
                ("X-RateLimit-Reset", "59".to_string()),
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
        assert_eq!(headers[0].0, "RateLimit-Policy");
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
