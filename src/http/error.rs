//! JSON bodies for the answers that are not a route's own: problems (RFC 9457), unknown
//! paths and wrong methods.

use actix_web::http::StatusCode;
use actix_web::http::header::{ContentType, HeaderValue};
use actix_web::{HttpRequest, HttpResponse};
use serde_json::json;

/// The problem type a quota denial carries (IANA HTTP problem types registry).
pub const QUOTA_EXCEEDED: &str = "https://iana.org/assignments/http-problem-types#quota-exceeded";

pub fn problem_json() -> ContentType {
    ContentType(mime_problem())
}

fn mime_problem() -> actix_web::mime::Mime {
    "application/problem+json"
        .parse()
        .unwrap_or(actix_web::mime::APPLICATION_JSON)
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
