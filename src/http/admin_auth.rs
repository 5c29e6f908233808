//! Who may use the decision and bucket API (`/v1/decide`, `/v1/buckets/…`), which names
//! any key and can empty or reset any bucket.
//!
//! - With `ADMIN_TOKEN` set, every caller must send `Authorization: Bearer <token>`,
//!   local or not; a missing or wrong token is a 401 with `WWW-Authenticate: Bearer`.
//! - Without it, only local callers are served, and others get a 403. A caller is local
//!   when its peer is on this host (a loopback TCP address, or a process on `UNIX_SOCKET`)
//!   and nothing says the request was forwarded for someone else: it carries no
//!   `X-Forwarded-For`, `X-Real-IP` or `Forwarded`, or its peer is a trusted proxy
//!   (`TRUSTED_PROXIES`, or the socket) and [`IdentityRules`] trace those headers back to
//!   a loopback client. So a request that Nginx on 127.0.0.2, or on the socket, forwards
//!   for 203.0.113.7 is not local, and neither is one that an untrusted proxy on the same
//!   host forwards: its headers are not believed to say who the client is, but they do
//!   say that the client is someone else, and refusing costs a local caller nothing.

use actix_web::http::StatusCode;
use actix_web::http::header::{AUTHORIZATION, HeaderValue, WWW_AUTHENTICATE};
use actix_web::{HttpRequest, HttpResponse, ResponseError};
use secrecy::{ExposeSecret, SecretString};
use thiserror::Error;

use super::problem::Problem;
use crate::identity::{ForwardedHeaders, IdentityRules, Peer};

/// The rule in force, built once at start.
pub struct AdminAuth {
    /// The BLAKE3 hash of `ADMIN_TOKEN`. A caller's token is hashed too and the hashes are
    /// compared (`blake3::Hash`'s equality is constant-time), so the time a comparison
    /// takes says nothing of the token, its length included, and the token itself is not
    /// kept here.
    token: Option<blake3::Hash>,
    identity: IdentityRules,
}

/// Why a caller is refused.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum AdminRefusal {
    #[error("Authorization: this API needs Authorization: Bearer <ADMIN_TOKEN>")]
    MissingToken,
    #[error("Authorization: the bearer token is not the one configured")]
    WrongToken,
    #[error(
        "this API answers local callers only while ADMIN_TOKEN is unset: call it on the instance's own port from its host, or set ADMIN_TOKEN"
    )]
    NotLocal,
}

impl ResponseError for AdminRefusal {
    fn status_code(&self) -> StatusCode {
        match self {
            AdminRefusal::MissingToken | AdminRefusal::WrongToken => StatusCode::UNAUTHORIZED,
            AdminRefusal::NotLocal => StatusCode::FORBIDDEN,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        // RFC 6750: the scheme, and why a token that was sent is refused.
        match self {
            AdminRefusal::MissingToken => {
                response.insert_header((
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"ratelimiter\""),
                ));
            }
            AdminRefusal::WrongToken => {
                response.insert_header((
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static(
                        "Bearer realm=\"ratelimiter\", error=\"invalid_token\"",
                    ),
                ));
            }
            AdminRefusal::NotLocal => {}
        }
        Problem::new(self.status_code())
            .detail(&self.to_string())
            .respond(response)
    }
}

/// What a request shows of who sent it.
#[derive(Debug, Default)]
struct Caller<'a> {
    peer: Option<Peer>,
    authorization: Option<&'a [u8]>,
    forwarded: ForwardedHeaders<'a>,
    /// An RFC 7239 `Forwarded` header is present (its contents are not read).
    forwarded_rfc7239: bool,
}

impl AdminAuth {
    pub fn new(token: Option<&SecretString>, identity: IdentityRules) -> Self {
        Self {
            token: token.map(|token| blake3::hash(token.expose_secret().as_bytes())),
            identity,
        }
    }

    /// Whether `req` may use the API.
    pub fn check(&self, req: &HttpRequest) -> Result<(), AdminRefusal> {
        let headers = req.headers();
        self.judge(&Caller {
            peer: super::socket::peer(req),
            authorization: headers.get(AUTHORIZATION).map(HeaderValue::as_bytes),
            forwarded: ForwardedHeaders {
                forwarded_for: headers
                    .get_all("x-forwarded-for")
                    .map(HeaderValue::as_bytes)
                    .collect(),
                real_ip: headers.get("x-real-ip").map(HeaderValue::as_bytes),
            },
            forwarded_rfc7239: headers.contains_key("forwarded"),
        })
    }

    fn judge(&self, caller: &Caller<'_>) -> Result<(), AdminRefusal> {
        match &self.token {
            Some(expected) => {
                let given = caller
                    .authorization
                    .and_then(bearer)
                    .ok_or(AdminRefusal::MissingToken)?;
                if blake3::hash(given) == *expected {
                    Ok(())
                } else {
                    Err(AdminRefusal::WrongToken)
                }
            }
            None if self.is_local(caller) => Ok(()),
            None => Err(AdminRefusal::NotLocal),
        }
    }

    fn is_local(&self, caller: &Caller<'_>) -> bool {
        let Some(peer) = caller.peer else {
            return false;
        };
        let on_this_host = match peer {
            Peer::Tcp(addr) => addr.to_canonical().is_loopback(),
            Peer::LocalSocket => true,
        };
        if !on_this_host {
            return false;
        }
        let forwarded = !caller.forwarded.forwarded_for.is_empty()
            || caller.forwarded.real_ip.is_some()
            || caller.forwarded_rfc7239;
        if !forwarded {
            return true;
        }
        !caller.forwarded_rfc7239
            && self.identity.is_trusted_peer(peer)
            && self
                .identity
                .client_addr(peer, &caller.forwarded)
                .is_loopback()
    }
}

/// The token of an `Authorization: Bearer <token>` value (the scheme in any case).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || token.first() != Some(&b' ') {
        return None;
    }
    let token = token.trim_ascii();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnet::IpNet;
    use std::net::IpAddr;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn auth(token: Option<&str>, trusted: &[&str]) -> AdminAuth {
        let trusted: Vec<IpNet> = trusted.iter().map(|net| net.parse().unwrap()).collect();
        let token = token.map(|token| SecretString::from(token.to_string()));
        AdminAuth::new(token.as_ref(), IdentityRules::new(trusted, 64))
    }

    fn from(peer: &str) -> Caller<'static> {
        Caller {
            peer: Some(Peer::Tcp(ip(peer))),
            ..Caller::default()
        }
    }

    fn forwarded_for(peer: &str, xff: &'static str) -> Caller<'static> {
        Caller {
            forwarded: ForwardedHeaders {
                forwarded_for: vec![xff.as_bytes()],
                real_ip: None,
            },
            ..from(peer)
        }
    }

    fn with_token(peer: &str, authorization: &'static str) -> Caller<'static> {
        Caller {
            authorization: Some(authorization.as_bytes()),
            ..from(peer)
        }
    }

    #[test]
    fn without_a_token_loopback_callers_are_served_and_others_refused() {
        let auth = auth(None, &[]);
        for local in ["127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"] {
            assert_eq!(auth.judge(&from(local)), Ok(()), "{local}");
        }
        for remote in ["192.0.2.7", "10.0.0.1", "2001:db8::1"] {
            assert_eq!(auth.judge(&from(remote)), Err(AdminRefusal::NotLocal));
        }
        assert_eq!(auth.judge(&Caller::default()), Err(AdminRefusal::NotLocal));
    }

    #[test]
    fn a_request_a_trusted_proxy_forwards_for_another_client_is_not_local() {
        let auth = auth(None, &["127.0.0.0/8"]);
        let through_nginx = forwarded_for("127.0.0.2", "203.0.113.7");
        assert_eq!(auth.judge(&through_nginx), Err(AdminRefusal::NotLocal));
        let local_through_nginx = forwarded_for("127.0.0.2", "127.0.0.1");
        assert_eq!(auth.judge(&local_through_nginx), Ok(()));
        let real_ip = Caller {
            forwarded: ForwardedHeaders {
                forwarded_for: vec![],
                real_ip: Some(b"203.0.113.7"),
            },
            ..from("127.0.0.2")
        };
        assert_eq!(auth.judge(&real_ip), Err(AdminRefusal::NotLocal));
    }

    #[test]
    fn a_request_forwarded_by_an_untrusted_local_proxy_is_not_local_either() {
        let auth = auth(None, &[]);
        let forwarded = forwarded_for("127.0.0.1", "203.0.113.7");
        assert_eq!(auth.judge(&forwarded), Err(AdminRefusal::NotLocal));
        let rfc7239 = Caller {
            forwarded_rfc7239: true,
            ..from("127.0.0.1")
        };
        assert_eq!(auth.judge(&rfc7239), Err(AdminRefusal::NotLocal));
    }

    /// A request on `UNIX_SOCKET` forwarding `xff`, or nothing.
    fn on_socket(xff: &[&'static str]) -> Caller<'static> {
        Caller {
            peer: Some(Peer::LocalSocket),
            forwarded: ForwardedHeaders {
                forwarded_for: xff.iter().map(|hop| hop.as_bytes()).collect(),
                real_ip: None,
            },
            ..Caller::default()
        }
    }

    #[test]
    fn a_socket_peer_is_local_unless_it_forwards_for_another_client() {
        let auth = auth(None, &[]);
        assert_eq!(auth.judge(&on_socket(&[])), Ok(()));
        assert_eq!(auth.judge(&on_socket(&["127.0.0.1"])), Ok(()));
        assert_eq!(
            auth.judge(&on_socket(&["203.0.113.7"])),
            Err(AdminRefusal::NotLocal)
        );
        let rfc7239 = Caller {
            forwarded_rfc7239: true,
            ..on_socket(&[])
        };
        assert_eq!(auth.judge(&rfc7239), Err(AdminRefusal::NotLocal));
    }

    #[test]
    fn with_a_token_only_the_token_counts() {
        let auth = auth(Some("open-sesame"), &[]);
        assert_eq!(
            auth.judge(&from("127.0.0.1")),
            Err(AdminRefusal::MissingToken)
        );
        assert_eq!(
            auth.judge(&with_token("127.0.0.1", "Bearer open-sesam")),
            Err(AdminRefusal::WrongToken)
        );
        assert_eq!(
            auth.judge(&with_token("127.0.0.1", "Bearer open-sesame!")),
            Err(AdminRefusal::WrongToken)
        );
        assert_eq!(
            auth.judge(&with_token("192.0.2.7", "Bearer open-sesame")),
            Ok(())
        );
        assert_eq!(
            auth.judge(&with_token("192.0.2.7", "bearer  open-sesame")),
            Ok(())
        );
        assert_eq!(
            auth.judge(&with_token("127.0.0.1", "Basic b3Blbi1zZXNhbWU=")),
            Err(AdminRefusal::MissingToken)
        );
    }

    #[test]
    fn a_bearer_value_is_the_scheme_a_space_and_a_token() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"BEARER abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Bearerabc"), None);
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"Bearer"), None);
        assert_eq!(bearer(b""), None);
    }
}
