//! The quota headers (`crate::quota_headers`) as actix header pairs, and the header that
//! says who decided.

use actix_web::http::header::{HeaderName, HeaderValue};

use crate::limiter::Verdict;
pub use crate::quota_headers::{HeaderMode, ceil_millis, item_name, reset_secs, retry_after_secs};

/// Which part of the system decided (`limiter::Source`); on every limited response.
pub const X_RATELIMIT_SOURCE: HeaderName = HeaderName::from_static("x-ratelimit-source");

/// [`crate::quota_headers::quota_headers`] for an HTTP response.
pub fn quota_headers(mode: HeaderMode, verdict: &Verdict) -> Vec<(HeaderName, HeaderValue)> {
    crate::quota_headers::quota_headers(mode, verdict)
        .into_iter()
        .map(|(name, text)| {
            let value =
                HeaderValue::try_from(text).expect("printable ASCII is a valid header value");
            (HeaderName::from_static(name), value)
        })
        .collect()
}
