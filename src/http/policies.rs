//! `GET /v1/policies` (the active set and its version, and the rate-limit service's rules
//! beside it) and `GET /v1/explain` (which
//! policies a given request would meet, and the key each would charge). Neither is
//! limited, and neither spends a token.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::problem::Problem;
use super::routes::{AppState, Headers, client_key};
use crate::policy::{Mode, NamedLimit, RequestView};
use crate::rls::{Domain, Rule, RuleLimit, RuleSet};

#[derive(Serialize)]
struct LimitView<'a> {
    name: &'a str,
    rate: u64,
    per_s: u64,
    burst: u64,
}

impl<'a> From<&'a NamedLimit> for LimitView<'a> {
    fn from(limit: &'a NamedLimit) -> Self {
        Self {
            name: &limit.name,
            rate: limit.spec.rate,
            per_s: limit.spec.window_s,
            burst: limit.spec.burst,
        }
    }
}

fn mode(mode: Mode) -> &'static str {
    match mode {
        Mode::Enforce => "enforce",
        Mode::Shadow => "shadow",
    }
}

/// One rule of the rate-limit service, as `/v1/policies` lists it.
fn rule_view(rule: &Rule) -> serde_json::Value {
    let limit = match &rule.limit {
        RuleLimit::Unlimited => serde_json::Value::Null,
        RuleLimit::Limited(limit) => json!({
            "requests_per_unit": limit.requests_per_unit,
            "unit": limit.unit.as_str(),
        }),
    };
    json!({
        "name": rule.name,
        "label": rule.label,
        "descriptor": rule.descriptor,
        "limit": limit,
        "unlimited": matches!(rule.limit, RuleLimit::Unlimited),
        "shadow": rule.shadow,
        "replaces": rule.replaces,
        "line": rule.line,
    })
}

/// The rate-limit service's rules in force: each domain (by name) with its rules (in file
/// order), and `policy`, the name the decision API takes for them.
fn rls_view(rules: &RuleSet) -> serde_json::Value {
    let mut domains: Vec<&Domain> = rules.domains().collect();
    domains.sort_by(|a, b| a.name.cmp(&b.name));
    let domains: Vec<_> = domains
        .into_iter()
        .map(|domain| {
            let mut listed = domain.rules();
            listed.sort_by_key(|rule| rule.line);
            json!({
                "domain": domain.name,
                "policy": domain.label,
                "file": domain.file,
                "rules": listed.into_iter().map(rule_view).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({"version": rules.version(), "domains": domains})
}

/// `GET /v1/policies`: the policies, and beside them (`rls`) the rate-limit service's
/// rules.
pub async fn list(state: web::Data<AppState>) -> HttpResponse {
    let rules = rls_view(&state.limiter.rules());
    let set = state.limiter.policies();
    let policies: Vec<_> = set
        .policies()
        .iter()
        .map(|policy| {
            json!({
                "name": policy.name,
                "mode": mode(policy.mode),
                "max_cost": policy.max_cost(),
                "limits": policy.limits().iter().map(LimitView::from).collect::<Vec<_>>(),
            })
        })
        .collect();
    HttpResponse::Ok().json(json!({"version": set.version(), "policies": policies, "rls": rules}))
}

/// The request `/v1/explain` describes; its headers are the explain request's own.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Explained {
    method: String,
    path: String,
    host: Option<String>,
}

/// `GET /v1/explain?method=POST&path=/login[&host=api.example.com]`: the policies that
/// request would meet, sent with this request's headers from this request's client. Key
/// parts from headers are shown hashed, as the buckets hold them.
pub async fn explain(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let explained = match web::Query::<Explained>::from_query(req.query_string()) {
        Ok(query) => query.into_inner(),
        Err(err) => {
            let detail =
                format!("query: {err}; expected method=<METHOD>&path=<PATH>[&host=<HOST>]");
            return Problem::new(StatusCode::BAD_REQUEST)
                .detail(&detail)
                .response();
        }
    };
    let Some(client) = client_key(&req, &state.identity) else {
        return Problem::new(StatusCode::BAD_REQUEST)
            .detail("the client address is unknown")
            .response();
    };
    let set = state.limiter.policies();
    let headers = Headers(req.headers());
    let view = RequestView {
        method: &explained.method,
        path: &explained.path,
        host: explained.host.as_deref(),
        headers: &headers,
        client,
    };
    let request = json!({
        "method": explained.method,
        "path": explained.path,
        "host": explained.host,
        "client": client.to_string(),
    });
    let applied = match state.limiter.explain(&set, &view) {
        Ok(applied) => applied,
        Err(rejection) => {
            return HttpResponse::Ok().json(json!({
                "version": set.version(),
                "request": request,
                "refused": rejection.to_string(),
            }));
        }
    };
    let policies: Vec<_> = applied
        .iter()
        .map(|(applied, bucket)| {
            let limits: Vec<_> = applied
                .limits
                .iter()
                .map(|limit| {
                    json!({
                        "limit": LimitView::from(limit),
                        "bucket": {"key": bucket, "field": limit.field},
                    })
                })
                .collect();
            json!({
                "name": applied.policy.name,
                "mode": mode(applied.policy.mode),
                "key": applied.key,
                "cost": applied.cost,
                "limits": limits,
            })
        })
        .collect();
    HttpResponse::Ok().json(json!({
        "version": set.version(),
        "request": request,
        "policies": policies,
    }))
}
