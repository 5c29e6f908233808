//! JSON bodies for the answers that are not a route's own: problems (RFC 9457), unknown
//! paths and wrong methods.

use actix_web::http::StatusCode;
use actix_web::http::header::HeaderValue;
use actix_web::{HttpRequest, HttpResponse};
use serde_json::json;

/// The problem type a quota denial carries (IANA HTTP problem types registry).
pub const QUOTA_EXCEEDED: &str = "https://iana.org/assignments/http-problem-types#quota-exceeded";

/// `Content-Type` of a problem body (RFC 9457), ready to send: a 429 is a hot path.
pub const PROBLEM_JSON: HeaderValue = HeaderValue::from_static("application/problem+json");

/// The body of a 429. Written by hand because it is on the flood path; the test of the
/// contract parses it back as JSON.
pub fn quota_exceeded_body(policy_name: &str, retry_after_ms: u64) -> String {
    format!(
        r#"{{"type":"{QUOTA_EXCEEDED}","title":"Too Many Requests","status":429,"violated-policies":["{policy_name}"],"retry_after_ms":{retry_after_ms}}}"#
    )
}

/// 404 for any path this service does not serve.
pub async fn not_found() -> HttpResponse {
    HttpResponse::NotFound().json(json!({"status": 404, "error": "Not Found"}))
}

/// 405 for a known path with a method it does not accept.
pub async fn method_not_allowed(_req: HttpRequest) -> HttpResponse {
    HttpResponse::build(StatusCode::METHOD_NOT_ALLOWED)
        .insert_header(("Allow", HeaderValue::from_static("GET, HEAD")))
        .json(json!({"status": 405, "error": "Method Not Allowed"}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quota_body_is_the_problem_json_the_contract_names() {
        let body: serde_json::Value =
            serde_json::from_str(&quota_exceeded_body("default", 5896)).unwrap();
        assert_eq!(
            body,
            json!({
                "type": QUOTA_EXCEEDED,
                "title": "Too Many Requests",
                "status": 429,
                "violated-policies": ["default"],
                "retry_after_ms": 5896,
            })
        );
    }
}
