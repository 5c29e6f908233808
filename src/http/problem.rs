//! The one shape of every error answer: `application/problem+json` (RFC 9457).
//!
//! 400, 401, 403, 404, 405, 413, 415, 429 and 503 all come from [`Problem`], so a client
//! parses one shape. The
//! body is written by hand because a 429 is on the flood path; the tests parse it back as
//! JSON.

use std::fmt::Write;

use actix_web::http::StatusCode;
use actix_web::http::header::{CONTENT_TYPE, HeaderValue};
use actix_web::{HttpResponse, HttpResponseBuilder};

/// The problem type a quota denial carries (IANA HTTP problem types registry).
pub const QUOTA_EXCEEDED: &str = "https://iana.org/assignments/http-problem-types#quota-exceeded";

/// `Content-Type` of a problem body, ready to send.
pub const PROBLEM_JSON: HeaderValue = HeaderValue::from_static("application/problem+json");

/// One error answer.
#[derive(Debug, Clone, Copy)]
pub struct Problem<'a> {
    pub status: StatusCode,
    /// What went wrong for this request, for people; never a secret or a client's input.
    pub detail: Option<&'a str>,
    /// Set for a 429: the quota-exceeded problem type and its members.
    pub quota: Option<QuotaExceeded<'a>>,
}

/// The members of a quota-exceeded problem.
#[derive(Debug, Clone, Copy)]
pub struct QuotaExceeded<'a> {
    pub violated_policies: &'a [&'a str],
    pub retry_after_ms: u64,
}

impl<'a> Problem<'a> {
    pub fn new(status: StatusCode) -> Self {
        Self {
            status,
            detail: None,
            quota: None,
        }
    }

    pub fn detail(self, detail: &'a str) -> Self {
        Self {
            detail: Some(detail),
            ..self
        }
    }

    pub fn quota_exceeded(violated_policies: &'a [&'a str], retry_after_ms: u64) -> Self {
        Self {
            quota: Some(QuotaExceeded {
                violated_policies,
                retry_after_ms,
            }),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS)
        }
    }

    pub fn body(&self) -> String {
        let problem_type = if self.quota.is_some() {
            QUOTA_EXCEEDED
        } else {
            "about:blank"
        };
        let title = self.status.canonical_reason().unwrap_or("Error");
        let mut body = String::with_capacity(192);
        // Writing into a String cannot fail.
        let _ = write!(
            body,
            r#"{{"type":"{problem_type}","title":"{title}","status":{}"#,
            self.status.as_u16()
        );
        if let Some(detail) = self.detail {
            let _ = write!(body, r#","detail":{}"#, json_string(detail));
        }
        if let Some(quota) = self.quota {
            body.push_str(r#","violated-policies":["#);
            for (i, name) in quota.violated_policies.iter().enumerate() {
                if i > 0 {
                    body.push(',');
                }
                body.push_str(&json_string(name));
            }
            let _ = write!(body, r#"],"retry_after_ms":{}"#, quota.retry_after_ms);
        }
        body.push('}');
        body
    }

    /// Finishes `response` (which may already carry headers) as this problem.
    pub fn respond(&self, mut response: HttpResponseBuilder) -> HttpResponse {
        response
            .status(self.status)
            .insert_header((CONTENT_TYPE, PROBLEM_JSON))
            .body(self.body())
    }

    pub fn response(&self) -> HttpResponse {
        self.respond(HttpResponse::build(self.status))
    }
}

fn json_string(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

/// 404 for any path this service does not serve.
pub async fn not_found() -> HttpResponse {
    Problem::new(StatusCode::NOT_FOUND).response()
}

/// 405 for a path that answers only the methods `allow` lists (`"POST"`,
/// `"GET, HEAD, DELETE"`).
pub async fn not_allowed(allow: &'static str) -> HttpResponse {
    let mut response = HttpResponse::build(StatusCode::METHOD_NOT_ALLOWED);
    response.insert_header(("Allow", HeaderValue::from_static(allow)));
    Problem::new(StatusCode::METHOD_NOT_ALLOWED)
        .detail(&format!("this path answers {allow}"))
        .respond(response)
}

/// 405 for a known path with a method it does not accept.
pub async fn method_not_allowed() -> HttpResponse {
    let mut response = HttpResponse::build(StatusCode::METHOD_NOT_ALLOWED);
    response.insert_header(("Allow", HeaderValue::from_static("GET, HEAD")));
    Problem::new(StatusCode::METHOD_NOT_ALLOWED)
        .detail("this path answers GET and HEAD")
        .respond(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parsed(problem: Problem<'_>) -> serde_json::Value {
        serde_json::from_str(&problem.body()).expect("a problem body is JSON")
    }

    #[test]
    fn the_quota_body_is_the_problem_json_the_contract_names() {
        assert_eq!(
            parsed(Problem::quota_exceeded(&["default"], 5896)),
            json!({
                "type": QUOTA_EXCEEDED,
                "title": "Too Many Requests",
                "status": 429,
                "violated-policies": ["default"],
                "retry_after_ms": 5896,
            })
        );
    }

    #[test]
    fn every_other_problem_is_about_blank_with_its_status_title_and_detail() {
        assert_eq!(
            parsed(Problem::new(StatusCode::SERVICE_UNAVAILABLE).detail("a \"quoted\" cause")),
            json!({
                "type": "about:blank",
                "title": "Service Unavailable",
                "status": 503,
                "detail": "a \"quoted\" cause",
            })
        );
        assert_eq!(
            parsed(Problem::new(StatusCode::NOT_FOUND)),
            json!({"type": "about:blank", "title": "Not Found", "status": 404})
        );
    }

    #[test]
    fn several_violated_policies_are_listed_in_order() {
        let body = parsed(Problem::quota_exceeded(&["minute", "day"], 1));
        assert_eq!(body["violated-policies"], json!(["minute", "day"]));
    }
}
