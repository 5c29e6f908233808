//! `/v1/check`, every method: the decision Nginx's `auth_request` asks for about the
//! request it holds. The gateway's config (`nginx/nginx.conf.template`) sends the original
//! request's headers with three more, `X-Original-Method`, `X-Original-URI` (Nginx's raw
//! `$request_uri`) and `X-Original-Host` (else `Host` is used), and sets the forwarding
//! headers as the public server does, so the client is derived exactly as for any other
//! route (trusted proxies only).
//!
//! `auth_request` lets a request through on any 2xx and refuses it on 401 or 403; any
//! other status is an error that Nginx answers 500. So each outcome maps onto one of those,
//! and carries what Nginx needs to build the client's answer:
//!
//! | outcome | status | the client gets |
//! |---|---|---|
//! | admitted | 204 | the upstream's answer, with the quota headers added |
//! | quota exceeded | 403 | 429 |
//! | cannot be judged (a policy refuses the request's shape, an undecodable path, a missing header) | 401 | 400 |
//! | store down, `FAIL_MODE=closed` | 401 | 503 |
//!
//! Every answer carries the quota headers, `X-RateLimit-Source` and `Retry-After` as
//! `/limited_endpoint` would. A refusal also carries `X-RateLimit-Status` (the client's
//! status) and `X-RateLimit-Problem` (the client's `application/problem+json` body, in
//! ASCII); it has no body of its own, so the connection Nginx keeps to the instance is
//! never left with unread bytes.

use std::borrow::Cow;
use std::fmt::Write as _;

use actix_web::http::header::{HOST, HeaderMap, HeaderName, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::{HttpRequest, HttpResponse, web};
use percent_encoding::percent_decode;
use thiserror::Error;

use super::reply::{Ending, Reply};
use super::routes::{AppState, Target, decide};

/// The original request's method.
pub const X_ORIGINAL_METHOD: HeaderName = HeaderName::from_static("x-original-method");
/// The original request's target as received: path and query, percent-encoded.
pub const X_ORIGINAL_URI: HeaderName = HeaderName::from_static("x-original-uri");
/// The host the original request was sent to.
pub const X_ORIGINAL_HOST: HeaderName = HeaderName::from_static("x-original-host");
/// On a refusal: the status the client gets.
pub const X_RATELIMIT_STATUS: HeaderName = HeaderName::from_static("x-ratelimit-status");
/// On a refusal: the client's problem body.
pub const X_RATELIMIT_PROBLEM: HeaderName = HeaderName::from_static("x-ratelimit-problem");

/// Why the original request cannot be read from the headers. The message names the
/// header and never repeats its value.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum OriginalError {
    #[error("the {0} header is missing")]
    Missing(&'static str),
    #[error("the X-Original-Method header is not an HTTP method")]
    BadMethod,
    #[error("the X-Original-URI header is not a path: it must start with \"/\"")]
    NotAPath,
    #[error("the X-Original-URI header's path is not UTF-8 once percent-decoded")]
    NotUtf8,
}

/// The request Nginx asks about, as the policies see it.
#[derive(Debug, PartialEq, Eq)]
pub struct Original<'a> {
    pub method: &'a str,
    /// Percent-decoded, without query or fragment.
    pub path: Cow<'a, str>,
    pub host: Option<&'a str>,
}

impl<'a> Original<'a> {
    /// Reads the original request from the headers of a `/v1/check` request.
    pub fn from_headers(headers: &'a HeaderMap) -> Result<Self, OriginalError> {
        let method = headers
            .get(X_ORIGINAL_METHOD)
            .ok_or(OriginalError::Missing("X-Original-Method"))?
            .to_str()
            .ok()
            .filter(|method| Method::from_bytes(method.as_bytes()).is_ok())
            .ok_or(OriginalError::BadMethod)?;
        let uri = headers
            .get(X_ORIGINAL_URI)
            .ok_or(OriginalError::Missing("X-Original-URI"))?;
        let host = headers
            .get(X_ORIGINAL_HOST)
            .or_else(|| headers.get(HOST))
            .and_then(|host| host.to_str().ok());
        Ok(Original {
            method,
            path: decoded_path(uri.as_bytes())?,
            host,
        })
    }
}

/// The path of a request target as a client sent it (`$request_uri`): up to the query,
/// percent-decoded. Nginx has already refused malformed escapes, and passes bytes above
/// 0x7f as they came; both are read as UTF-8, and what is not UTF-8 is refused rather
/// than guessed at. An encoded `/` (`%2F`) becomes a separator, so a path cannot step
/// around a rule by encoding one.
fn decoded_path(target: &[u8]) -> Result<Cow<'_, str>, OriginalError> {
    let end = target
        .iter()
        .position(|&byte| byte == b'?' || byte == b'#')
        .unwrap_or(target.len());
    let raw = &target[..end];
    if raw.first() != Some(&b'/') {
        return Err(OriginalError::NotAPath);
    }
    percent_decode(raw)
        .decode_utf8()
        .map_err(|_| OriginalError::NotUtf8)
}

/// `/v1/check`, every method.
pub async fn check(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let reply = match Original::from_headers(req.headers()) {
        Ok(original) => {
            let target = Target {
                method: original.method,
                path: &original.path,
                host: original.host,
            };
            decide(&req, &state, target).await
        }
        Err(error) => Reply::refused(&error.to_string()),
    };
    answer(reply)
}

/// The reply in the statuses `auth_request` understands.
fn answer(reply: Reply) -> HttpResponse {
    let status = match &reply.ending {
        Ending::Admitted => StatusCode::NO_CONTENT,
        Ending::Limited(_) => StatusCode::FORBIDDEN,
        Ending::Unavailable(_) | Ending::Refused(_) => StatusCode::UNAUTHORIZED,
    };
    let mut response = HttpResponse::build(status);
    for header in reply.headers {
        response.insert_header(header);
    }
    let client_status = reply.ending.status();
    match reply.ending {
        Ending::Admitted => {}
        Ending::Limited(problem) | Ending::Unavailable(problem) | Ending::Refused(problem) => {
            response.insert_header((
                X_RATELIMIT_STATUS,
                HeaderValue::from(client_status.as_u16()),
            ));
            response.insert_header((X_RATELIMIT_PROBLEM, header_value(&problem)));
        }
    }
    response.finish()
}

/// A problem body as a header value. JSON means the same with every character outside
/// printable ASCII escaped (such characters can only be inside its strings: the bodies
/// have no whitespace between tokens), and what remains is a valid header value.
fn header_value(problem: &str) -> HeaderValue {
    let printable = |c: char| c.is_ascii() && !c.is_ascii_control();
    if problem.chars().all(printable) {
        return HeaderValue::from_str(problem).expect("printable ASCII is a valid header value");
    }
    let mut escaped = String::with_capacity(problem.len() + 16);
    for c in problem.chars() {
        if printable(c) {
            escaped.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                let _ = write!(escaped, "\\u{unit:04x}");
            }
        }
    }
    HeaderValue::from_str(&escaped).expect("printable ASCII is a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &[u8])]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(
                HeaderName::from_static(name),
                HeaderValue::from_bytes(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn the_path_is_decoded_and_the_query_dropped() {
        assert_eq!(decoded_path(b"/api/items?page=2").unwrap(), "/api/items");
        assert_eq!(
            decoded_path(b"/limited%5Fendpoint").unwrap(),
            "/limited_endpoint"
        );
        assert_eq!(decoded_path(b"/caf%C3%A9#top").unwrap(), "/café");
        assert_eq!(decoded_path("/café".as_bytes()).unwrap(), "/café");
    }

    #[test]
    fn an_encoded_slash_becomes_a_separator() {
        assert_eq!(decoded_path(b"/api%2Fitems").unwrap(), "/api/items");
    }

    #[test]
    fn a_path_that_is_not_utf8_once_decoded_is_refused() {
        assert_eq!(decoded_path(b"/api/%FF"), Err(OriginalError::NotUtf8));
        assert_eq!(decoded_path(b"/\xff"), Err(OriginalError::NotUtf8));
    }

    #[test]
    fn a_target_that_is_not_a_path_is_refused() {
        assert_eq!(decoded_path(b"*"), Err(OriginalError::NotAPath));
        assert_eq!(decoded_path(b""), Err(OriginalError::NotAPath));
        assert_eq!(decoded_path(b"?a=1"), Err(OriginalError::NotAPath));
    }

    #[test]
    fn a_missing_header_is_named() {
        let error = Original::from_headers(&headers(&[("x-original-uri", b"/")])).unwrap_err();
        assert_eq!(error.to_string(), "the X-Original-Method header is missing");
        let error = Original::from_headers(&headers(&[("x-original-method", b"GET")])).unwrap_err();
        assert_eq!(error.to_string(), "the X-Original-URI header is missing");
    }

    #[test]
    fn the_host_falls_back_to_the_host_header() {
        let map = headers(&[
            ("x-original-method", b"POST"),
            ("x-original-uri", b"/login"),
            ("host", b"api.example.com"),
        ]);
        let original = Original::from_headers(&map).unwrap();
        assert_eq!(
            original,
            Original {
                method: "POST",
                path: Cow::Borrowed("/login"),
                host: Some("api.example.com"),
            }
        );
        let map = headers(&[
            ("x-original-method", b"GET"),
            ("x-original-uri", b"/"),
            ("x-original-host", b"gateway.example.com"),
            ("host", b"instances"),
        ]);
        assert_eq!(
            Original::from_headers(&map).unwrap().host,
            Some("gateway.example.com")
        );
    }

    #[test]
    fn a_method_that_is_not_a_token_is_refused() {
        let map = headers(&[("x-original-method", b"GE T"), ("x-original-uri", b"/")]);
        assert_eq!(Original::from_headers(&map), Err(OriginalError::BadMethod));
    }

    #[test]
    fn a_problem_outside_ascii_is_escaped_into_a_header_and_stays_the_same_json() {
        let problem = "{\"detail\":\"café ☕ 𝄞 \u{7f}\"}";
        let value = header_value(problem);
        let text = value.to_str().unwrap();
        assert!(text.is_ascii(), "{text}");
        let back: serde_json::Value = serde_json::from_str(text).unwrap();
        let original: serde_json::Value = serde_json::from_str(problem).unwrap();
        assert_eq!(back, original);
    }
}
