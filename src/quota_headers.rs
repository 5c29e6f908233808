//! The quota headers of a verdict as text, for every front: an HTTP response carries them
//! (`http::headers`), and a `ShouldRateLimit` answer may ask Envoy to add them to its
//! response (`RLS_RESPONSE_HEADERS`).
//!
//! Draft: draft-ietf-httpapi-ratelimit-headers-11 (`RateLimit-Policy`, `RateLimit`).
//! Legacy: the widely deployed `X-RateLimit-Limit`, `-Remaining`, `-Reset` (in seconds).

use std::fmt::Write as _;

use crate::limiter::{LimitName, LimitVerdict, Verdict};

/// How a limited response describes the client's quota (`RATELIMIT_HEADERS`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, strum::EnumString, strum::IntoStaticStr, strum::VariantNames,
)]
#[strum(serialize_all = "lowercase", ascii_case_insensitive)]
pub enum HeaderMode {
    /// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers-11).
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

/// The name a limit goes by in headers and problem bodies: `<policy>-<limit>`, or just
/// the policy's name when its limit is named after it (the default policy's one limit,
/// `default`).
pub fn item_name(name: &LimitName<'_>, out: &mut String) {
    out.push_str(name.policy);
    if name.limit != name.policy {
        out.push('-');
        out.push_str(name.limit);
    }
}

/// Appends one member of a structured-field list, `"<name>"<parameters>`, to `list`.
fn push_member(list: &mut String, name: &LimitName<'_>, parameters: std::fmt::Arguments<'_>) {
    if !list.is_empty() {
        list.push_str(", ");
    }
    list.push('"');
    item_name(name, list);
    list.push('"');
    let _ = list.write_fmt(parameters);
}

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

/// Seconds until one limit has more quota, as `RateLimit`'s `t` says it: until the next
/// whole token for a limit that had the tokens, until it has enough for the request for
/// one that lacked them.
pub fn reset_secs(decision: &crate::limiter::Level) -> u64 {
    let until_more = if decision.allowed {
        decision.next_token_us
    } else {
        decision.retry_after_us
    };
    ceil_secs(until_more)
}

/// The headers a limited response carries in `mode`, besides `Retry-After`, as names and
/// values. Names are lower case, as HTTP/1.1 sends them here and HTTP/2 requires; values
/// are printable ASCII (names of `[a-z0-9_-]` and numbers).
///
/// Draft (draft-ietf-httpapi-ratelimit-headers-11): `RateLimit-Policy` lists every
/// enforced limit that applied (`"name";q=<burst>;w=<window s>`), and `RateLimit` each one's
/// state (`"name";r=<remaining>;t=<s until more quota>`, where for a limit that lacked
/// tokens "more" means enough for this request). `qu` is left out: every quota here is
/// counted in the registry's default unit, requests (a header-set cost counts as that
/// many requests); `pk` is left out because the partition is the client itself.
/// Legacy: `X-RateLimit-*` of the most restrictive limit, the one with the fewest tokens
/// left (or the smallest burst when no bucket was asked).
pub fn quota_headers(mode: HeaderMode, verdict: &Verdict) -> Vec<(&'static str, String)> {
    let draft = matches!(mode, HeaderMode::Draft | HeaderMode::Both);
    let legacy = matches!(mode, HeaderMode::Legacy | HeaderMode::Both);
    // Shadow limits never show.
    let stated: Vec<&LimitVerdict> = verdict.limits().iter().filter(|l| l.enforced).collect();
    let mut headers = Vec::with_capacity(5);
    if stated.is_empty() {
        return headers;
    }
    if draft {
        let mut policy = String::with_capacity(32 * stated.len());
        let mut state = String::with_capacity(32 * stated.len());
        for item in &stated {
            push_member(
                &mut policy,
                &item.name,
                format_args!(
                    ";q={};w={}",
                    item.limit.capacity(),
                    item.limit.window_secs()
                ),
            );
            if let Some(decision) = &item.level {
                push_member(
                    &mut state,
                    &item.name,
                    format_args!(";r={};t={}", decision.remaining, reset_secs(decision)),
                );
            }
        }
        headers.push((RATELIMIT_POLICY, policy));
        if !state.is_empty() {
            headers.push((RATELIMIT, state));
        }
    }
    if legacy {
        let strictest = stated
            .iter()
            .min_by_key(|item| {
                item.level.map_or((item.limit.capacity(), 0), |d| {
                    (d.remaining, u64::MAX - d.full_after_us)
                })
            })
            .unwrap_or_else(|| unreachable!("stated is not empty"));
        headers.push((X_RATELIMIT_LIMIT, strictest.limit.capacity().to_string()));
        if let Some(decision) = &strictest.level {
            headers.push((X_RATELIMIT_REMAINING, decision.remaining.to_string()));
            headers.push((
                X_RATELIMIT_RESET,
                ceil_secs(decision.full_after_us).to_string(),
            ));
        }
    }
    headers
}

const RATELIMIT_POLICY: &str = "ratelimit-policy";
const RATELIMIT: &str = "ratelimit";
const X_RATELIMIT_LIMIT: &str = "x-ratelimit-limit";
const X_RATELIMIT_REMAINING: &str = "x-ratelimit-remaining";
const X_RATELIMIT_RESET: &str = "x-ratelimit-reset";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::{Bucket, Level, Limit};

    fn as_text(headers: Vec<(&str, String)>) -> Vec<(String, String)> {
        headers
            .into_iter()
            .map(|(name, value)| (name.to_string(), value))
            .collect()
    }

    fn text(name: &str, value: &str) -> (String, String) {
        (name.to_string(), value.to_string())
    }

    /// A name as a loaded policy set holds it; leaked, as the set would outlive the test.
    fn name(policy: &str, limit: &str) -> LimitName<'static> {
        let leak = |text: &str| &*Box::leak(Box::new(std::sync::Arc::<str>::from(text)));
        LimitName {
            policy: leak(policy),
            limit: leak(limit),
        }
    }

    fn verdict(decision: Option<Level>) -> Verdict<'static> {
        let limit = Limit::per(10, 60, 10).unwrap();
        match decision {
            Some(decision) => Verdict::Decided {
                bucket: Bucket::Shared,
                admitted: decision.allowed,
                limits: vec![LimitVerdict {
                    name: name("default", "default"),
                    limit,
                    enforced: true,
                    level: Some(decision),
                }],
            },
            None => Verdict::Open {
                limits: vec![LimitVerdict {
                    name: name("default", "default"),
                    limit,
                    enforced: true,
                    level: None,
                }],
            },
        }
    }

    fn denial() -> Level {
        Level {
            allowed: false,
            remaining: 0,
            next_token_us: 5_000_001,
            full_after_us: 59_000_000,
            retry_after_us: 5_000_001,
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
    fn every_enforced_limit_is_listed_and_shadow_ones_never() {
        let judged = |policy, limit_name, rate, window_s, remaining, enforced| LimitVerdict {
            name: name(policy, limit_name),
            limit: Limit::per(rate, window_s, rate).unwrap(),
            enforced,
            level: Some(Level {
                allowed: true,
                remaining,
                next_token_us: 1_000_000,
                full_after_us: 9_000_000,
                retry_after_us: 0,
            }),
        };
        let verdict = Verdict::Decided {
            bucket: Bucket::Shared,
            admitted: true,
            limits: vec![
                judged("api", "minute", 100, 60, 42, true),
                judged("api", "day", 10_000, 86_400, 9_958, true),
                judged("trial", "minute", 5, 60, 0, false),
            ],
        };
        assert_eq!(
            as_text(quota_headers(HeaderMode::Draft, &verdict)),
            vec![
                text(
                    "ratelimit-policy",
                    "\"api-minute\";q=100;w=60, \"api-day\";q=10000;w=86400"
                ),
                text(
                    "ratelimit",
                    "\"api-minute\";r=42;t=1, \"api-day\";r=9958;t=1"
                ),
            ]
        );
        // Legacy describes the most restrictive: the minute limit, with 42 left.
        assert_eq!(
            as_text(quota_headers(HeaderMode::Legacy, &verdict))[0],
            text("x-ratelimit-limit", "100")
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
        assert!(quota_headers(HeaderMode::Both, &Verdict::Unlimited).is_empty());
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
