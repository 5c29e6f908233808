//! The policy a client is held to, and the bounds on what it may be admitted.
//!
//! A token bucket of capacity `C` refilled at `r` tokens per second that starts full
//! admits at most `floor(C + r × t)` requests over `t` seconds. The service decides
//! each request somewhere between its send and its answer, so over a client's run the
//! first decision lies in `[first send, first answer]` and the last in
//! `[last send, last answer]`: `t` is at most `last answer − first send` (the upper
//! bound) and at least `last send − first answer` (the lower bound).
//!
//! The lower bound holds only for a client that kept its bucket from filling up and
//! was refused at the end (its last answer a 429): its bucket then held less than one
//! token, so it had been admitted more than `C + r × t − 1` requests, that is at least
//! `floor(C + r × t)`. A bucket not fresh at the start (the same addresses used within
//! a window before) shows up as admissions short of the lower bound.

use serde::{Deserialize, Serialize};

/// One policy of a `RateLimit-Policy` header: `"default";q=10;w=60`.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderPolicy {
    pub name: String,
    pub quota: u64,
    pub window_s: Option<f64>,
}

/// Parses a `RateLimit-Policy` field value: a list of policies, each a name (a quoted
/// string or a token) with parameters; `q` (quota) is required, `w` (window seconds)
/// optional, others are ignored.
pub fn parse_header(value: &str) -> Result<Vec<HeaderPolicy>, String> {
    let mut policies = Vec::new();
    for member in split_outside_quotes(value, ',') {
        let mut parts = split_outside_quotes(member, ';').into_iter();
        let name = parts.next().unwrap_or_default().trim();
        let name = match name.strip_prefix('"') {
            Some(rest) => rest
                .strip_suffix('"')
                .ok_or_else(|| format!("{value:?}: unterminated policy name"))?,
            None => name,
        };
        if name.is_empty() {
            return Err(format!("{value:?}: a policy has no name"));
        }
        let (mut quota, mut window_s) = (None, None);
        for parameter in parts {
            let (key, raw) = parameter.split_once('=').unwrap_or((parameter, "?1"));
            match key.trim() {
                "q" => {
                    quota = Some(
                        raw.trim()
                            .parse::<u64>()
                            .map_err(|_| format!("{value:?}: q={raw} is not a whole number"))?,
                    )
                }
                "w" => {
                    let w: f64 = raw
                        .trim()
                        .parse()
                        .map_err(|_| format!("{value:?}: w={raw} is not a number"))?;
                    if !(w.is_finite() && w > 0.0) {
                        return Err(format!("{value:?}: w={raw} must be more than zero"));
                    }
                    window_s = Some(w);
                }
                _ => {}
            }
        }
        let quota = quota.ok_or_else(|| format!("{value:?}: policy {name:?} has no q"))?;
        policies.push(HeaderPolicy {
            name: name.to_owned(),
            quota,
            window_s,
        });
    }
    if policies.is_empty() {
        return Err(format!("{value:?}: no policy"));
    }
    Ok(policies)
}

fn split_outside_quotes(text: &str, separator: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (at, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == separator && !quoted => {
                parts.push(&text[start..at]);
                start = at + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

/// What the flags say about the policy; each overrides the header.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PolicyFlags {
    /// RATE_LIMIT: tokens earned per window.
    pub limit: Option<u64>,
    /// TIME_WINDOW in seconds.
    pub window_s: Option<f64>,
    /// BURST: the bucket's capacity.
    pub burst: Option<u64>,
}

/// The bucket each client is held to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    pub capacity: u64,
    /// Tokens earned per window (RATE_LIMIT).
    pub quota: u64,
    pub window_s: f64,
    pub refill_per_s: f64,
    /// Where the figures came from, for the reader of the summary.
    pub origin: String,
}

impl Bucket {
    /// The most a fresh bucket admits over `span_s` seconds, before rounding down.
    pub fn allowance(&self, span_s: f64) -> f64 {
        self.capacity as f64 + self.refill_per_s * span_s.max(0.0)
    }

    /// The most a fresh bucket admits over `span_s` seconds: `floor(C + r × t)`.
    pub fn bound(&self, span_s: f64) -> u64 {
        whole(self.allowance(span_s))
    }

    /// What one failover may add to a client's bound (docs/RELIABILITY.md, "Measured"):
    /// while the local fallback decides for `fallback_s`, each of the `instances` gives
    /// the client a share of its own, `max(1, floor(C / n))` tokens refilled at `r / n`,
    /// charged to no shared bucket.
    pub fn failover_allowance(&self, instances: u64, fallback_s: f64) -> u64 {
        let share = (self.capacity / instances).max(1);
        let refill = (self.refill_per_s * fallback_s / instances as f64).floor() as u64;
        instances * (share + refill)
    }
}

/// Combines the header (burst `q`, window `w`, and `q` per `w` as the refill unless
/// `--limit` says otherwise) with the flags, which win.
pub fn resolve(header: Option<&HeaderPolicy>, flags: &PolicyFlags) -> Result<Bucket, String> {
    resolve_announced(header, "RateLimit-Policy header", flags)
}

/// [`resolve`], the policy announced by `announced_by` (a `RateLimit-Policy` header, or
/// the limit a `ShouldRateLimit` answer states, written as such a header).
pub fn resolve_announced(
    header: Option<&HeaderPolicy>,
    announced_by: &str,
    flags: &PolicyFlags,
) -> Result<Bucket, String> {
    let from_header = header.map(|h| h.quota);
    let capacity = flags.burst.or(from_header).or(flags.limit);
    let quota = flags.limit.or(from_header).or(flags.burst);
    let window_s = flags.window_s.or(header.and_then(|h| h.window_s));
    let (Some(capacity), Some(quota), Some(window_s)) = (capacity, quota, window_s) else {
        return Err(format!(
            "unknown: no {announced_by} with q and w was seen; pass --limit and --window (and --burst)"
        ));
    };
    let used_flags = flags.limit.is_some() || flags.burst.is_some() || flags.window_s.is_some();
    let origin = match (header, used_flags) {
        (Some(_), false) => announced_by.to_string(),
        (Some(_), true) => format!("{announced_by} and flags"),
        (None, _) => "flags".to_string(),
    };
    Ok(Bucket {
        capacity,
        quota,
        window_s,
        refill_per_s: quota as f64 / window_s,
        origin,
    })
}

/// How one client's admissions compare with its bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Admitted more than any fresh bucket could have: the limiter let too much through.
    Over,
    /// Refused at the end yet admitted more than one less than the lower bound.
    Short,
    Within,
}

/// Rounding slack for the floating-point bounds: far below one request.
const EPSILON: f64 = 1e-6;

/// `floor(x)`, keeping a bound that is a whole number from being lost to rounding.
fn whole(x: f64) -> u64 {
    (x + EPSILON).floor() as u64
}

/// Judges `admitted` against `floor(low)` and `floor(high)` (see the module docs);
/// `refused_last` says whether the client's last answer was a 429.
pub fn judge(admitted: u64, low: f64, high: f64, refused_last: bool) -> Verdict {
    if admitted > whole(high) {
        Verdict::Over
    } else if refused_last && admitted + 1 < whole(low) {
        Verdict::Short
    } else {
        Verdict::Within
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(value: &str) -> HeaderPolicy {
        parse_header(value).unwrap().remove(0)
    }

    #[test]
    fn the_services_policy_header_gives_burst_and_window() {
        assert_eq!(
            header("\"default\";q=10;w=60"),
            HeaderPolicy {
                name: "default".into(),
                quota: 10,
                window_s: Some(60.0)
            }
        );
    }

    #[test]
    fn spaces_tokens_unknown_parameters_and_several_policies_are_understood() {
        let policies =
            parse_header(" burst ; q=5 ; qu=\"requests\" ; w=1, \"day\";q=1000;w=86400").unwrap();
        assert_eq!(policies.len(), 2);
        assert_eq!(policies[0].name, "burst");
        assert_eq!(policies[0].quota, 5);
        assert_eq!(policies[1].window_s, Some(86_400.0));
    }

    #[test]
    fn a_quoted_name_may_hold_separators() {
        assert_eq!(header("\"a;b,c\";q=3").name, "a;b,c");
    }

    #[test]
    fn malformed_policy_headers_are_refused() {
        for (refused, why) in [
            ("\"default\";w=60", "no q"),
            ("\"default\";q=ten", "q not a number"),
            ("\"default\";q=10;w=0", "a zero window"),
            ("\"default;q=10", "an unclosed quote"),
            (";q=1", "no name"),
        ] {
            assert!(parse_header(refused).is_err(), "{refused}: {why}");
        }
    }

    #[test]
    fn the_header_alone_refills_q_per_w() {
        let bucket = resolve(
            Some(&header("\"default\";q=10;w=60")),
            &PolicyFlags::default(),
        )
        .unwrap();
        assert_eq!(bucket.capacity, 10);
        assert!((bucket.refill_per_s - 10.0 / 60.0).abs() < 1e-12);
        assert!((bucket.allowance(10.0) - (10.0 + 10.0 / 6.0)).abs() < 1e-9);
    }

    #[test]
    fn a_burst_apart_from_the_limit_refills_at_the_limit() {
        // BURST=20, RATE_LIMIT=10, TIME_WINDOW=60: the header shows the burst as q.
        let flags = PolicyFlags {
            limit: Some(10),
            ..PolicyFlags::default()
        };
        let bucket = resolve(Some(&header("\"default\";q=20;w=60")), &flags).unwrap();
        assert_eq!(bucket.capacity, 20);
        assert!((bucket.refill_per_s - 10.0 / 60.0).abs() < 1e-12);
        assert_eq!(bucket.origin, "RateLimit-Policy header and flags");
    }

    #[test]
    fn flags_alone_suffice_and_without_a_window_the_policy_is_unknown() {
        let flags = PolicyFlags {
            limit: Some(10),
            window_s: Some(60.0),
            burst: None,
        };
        let bucket = resolve(None, &flags).unwrap();
        assert_eq!((bucket.capacity, bucket.quota), (10, 10));
        let no_window = PolicyFlags {
            window_s: None,
            ..flags
        };
        assert!(resolve(None, &no_window).is_err());
        assert!(resolve(Some(&header("x;q=3")), &PolicyFlags::default()).is_err());
    }

    #[test]
    fn a_client_is_over_above_its_upper_bound_and_short_only_if_refused_at_the_end() {
        // C=10, r=1/6 per s, 10 s: at least 11.5 and at most floor(11.67) = 11.
        let (low, high) = (11.5, 11.67);
        for (case, admitted, refused_last, verdict) in [
            ("more than the upper bound is over", 12, true, Verdict::Over),
            ("the upper bound is within", 11, true, Verdict::Within),
            ("refused, short by more than one", 9, true, Verdict::Short),
            (
                "refused, short by one is tolerated",
                10,
                true,
                Verdict::Within,
            ),
            (
                "never refused at the end is never short",
                3,
                false,
                Verdict::Within,
            ),
        ] {
            assert_eq!(judge(admitted, low, high, refused_last), verdict, "{case}");
        }
    }

    #[test]
    fn a_bound_that_is_a_whole_number_is_not_lost_to_rounding() {
        let bucket = Bucket {
            capacity: 10,
            quota: 1,
            window_s: 0.1,
            refill_per_s: 1.0 / 0.1,
            origin: String::new(),
        };
        let high = bucket.allowance(0.3);
        assert_eq!(judge(13, high, high, true), Verdict::Within);
    }

    fn soak_policy() -> Bucket {
        // scripts/soak.sh's first policy: 12 per minute, burst 6.
        resolve(
            None,
            &PolicyFlags {
                limit: Some(12),
                window_s: Some(60.0),
                burst: Some(6),
            },
        )
        .unwrap()
    }

    #[test]
    fn a_client_may_have_its_burst_and_the_refill_of_its_span() {
        // 6 + 0.2 × 59.9 = 17.98
        assert_eq!(soak_policy().bound(59.9), 17);
        assert_eq!(soak_policy().bound(60.0), 18);
    }

    #[test]
    fn a_failover_allows_each_instance_a_share_and_its_refill() {
        let bucket = soak_policy();
        // Shares of floor(6 / 2) = 3; 0.2 × 5 / 2 = 0.5 refills nothing more.
        assert_eq!(bucket.failover_allowance(2, 5.0), 6);
        // 0.2 × 12 / 2 = 1.2: one more token per instance.
        assert_eq!(bucket.failover_allowance(2, 12.0), 8);
        // A burst smaller than the instances still gives each one token.
        let tiny = resolve(
            None,
            &PolicyFlags {
                limit: Some(1),
                window_s: Some(60.0),
                burst: Some(1),
            },
        )
        .unwrap();
        assert_eq!(tiny.failover_allowance(2, 1.0), 2);
    }
}
