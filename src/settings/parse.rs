//! How one setting's text becomes its typed value, and what a refusal says: what the
//! setting expects, and the part of the value at fault. The parsers know nothing of other
//! settings; the rules between settings live beside the types they build. This module
//! imports nothing else of `settings`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;
use redis::{ConnectionInfo, IntoConnectionInfo};
use secrecy::SecretString;

/// What a setting accepts: what the README and a problem message say of it, and whether
/// its value may be printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Whole {
        min: u64,
        max: u64,
    },
    /// One of these words, in any case.
    Word(&'static [&'static str]),
    /// on/off, true/false, 1/0.
    Switch,
    /// Text its parser checks in its own way.
    Text,
    /// Text that is never printed: logged as `***`.
    Secret,
    /// A URL whose credentials are never printed.
    Url,
}

/// How a setting's text becomes its value, given what the setting accepts; `Err` says why
/// not.
pub type Parse<T> = fn(&Expect, &str) -> Result<T, Refused>;

/// A node's address as written: a host name or IP, and a port.
pub type HostPort = (String, u16);

/// `REDIS_CLIENT`, as written; with `REDIS_POOL_SIZE` it makes a
/// [`crate::store::redis::ConnectionMode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::EnumString, strum::VariantNames)]
#[strum(serialize_all = "lowercase", ascii_case_insensitive)]
pub enum RedisClient {
    Multiplexed,
    Pool,
}

/// Why a value does not fit its setting.
#[derive(Debug)]
pub struct Refused {
    /// Completes "expected …".
    pub expected: String,
    /// The part of the value at fault, when it is not the whole value (one entry of a list).
    pub part: Option<String>,
}

impl Refused {
    fn expected(expected: impl Into<String>) -> Self {
        Self {
            expected: expected.into(),
            part: None,
        }
    }

    fn at(mut self, part: &str) -> Self {
        self.part = Some(part.to_string());
        self
    }
}

/// A whole number within the [`Expect::Whole`] bounds.
pub fn whole<T: TryFrom<u64>>(expects: &Expect, text: &str) -> Result<T, Refused> {
    let &Expect::Whole { min, max } = expects else {
        unreachable!("{expects:?} is not a whole number")
    };
    text.parse::<u64>()
        .ok()
        .filter(|value| (min..=max).contains(value))
        .and_then(|value| T::try_from(value).ok())
        .ok_or_else(|| Refused::expected(format!("a whole number from {min} to {max}")))
}

/// [`whole`] milliseconds.
pub fn millis(expects: &Expect, text: &str) -> Result<Duration, Refused> {
    whole(expects, text).map(Duration::from_millis)
}

/// [`whole`] seconds.
pub fn seconds(expects: &Expect, text: &str) -> Result<Duration, Refused> {
    whole(expects, text).map(Duration::from_secs)
}

/// One of the [`Expect::Word`]s, in any case.
pub fn word<T: FromStr>(expects: &Expect, text: &str) -> Result<T, Refused> {
    let Expect::Word(words) = expects else {
        unreachable!("{expects:?} is not a word")
    };
    text.parse::<T>()
        .map_err(|_| Refused::expected(format!("one of {}", words.join(", "))))
}

pub fn switch(_: &Expect, text: &str) -> Result<bool, Refused> {
    match text.to_ascii_lowercase().as_str() {
        "on" | "true" | "1" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        _ => Err(Refused::expected("one of on, off, true, false, 1, 0")),
    }
}

/// Any text.
pub fn text(_: &Expect, text: &str) -> Result<String, Refused> {
    Ok(text.to_string())
}

pub fn secret(_: &Expect, text: &str) -> Result<SecretString, Refused> {
    Ok(SecretString::from(text))
}

pub fn path(_: &Expect, text: &str) -> Result<PathBuf, Refused> {
    Ok(PathBuf::from(text))
}

/// The most bytes of a Unix socket's path: `sun_path` holds 108 with the final NUL.
const SOCKET_PATH_MAX: usize = 107;

/// A path a Unix socket can be bound at: Linux refuses a longer one only at bind time, with
/// a message that names neither the setting nor the limit.
pub fn socket_path(_: &Expect, text: &str) -> Result<PathBuf, Refused> {
    if text.len() > SOCKET_PATH_MAX || text.contains('\0') {
        return Err(Refused::expected(format!(
            "a file path of at most {SOCKET_PATH_MAX} bytes (the longest a Unix socket's can be)"
        )));
    }
    Ok(PathBuf::from(text))
}

/// Permission bits in octal, as `chmod` takes them (`660`, `0660`).
pub fn file_mode(_: &Expect, text: &str) -> Result<u32, Refused> {
    u32::from_str_radix(text, 8)
        .ok()
        .filter(|mode| *mode <= 0o777)
        .ok_or_else(|| Refused::expected("permission bits in octal, such as 660"))
}

/// A port, or `off`: nothing listens on TCP.
pub fn port_or_off(expects: &Expect, text: &str) -> Result<Option<u16>, Refused> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    whole(expects, text)
        .map(Some)
        .map_err(|refused| Refused::expected(format!("{}, or off", refused.expected)))
}

/// A `redis://` URL, as the client will use it; `rediss://` and Unix sockets are not
/// supported.
pub fn redis_url(_: &Expect, text: &str) -> Result<ConnectionInfo, Refused> {
    text.starts_with("redis://")
        .then(|| text.into_connection_info().ok())
        .flatten()
        .ok_or_else(|| Refused::expected("a URL such as redis://:password@host:6379"))
}

/// `host:port,host:port,…`; an IPv6 host may be bracketed (`[::1]:7000`).
pub fn host_ports(_: &Expect, text: &str) -> Result<Vec<HostPort>, Refused> {
    text.split(',')
        .map(|entry| host_port(entry.trim()))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| Refused::expected("host:port,host:port,..."))
}

fn host_port(entry: &str) -> Option<HostPort> {
    let (host, port) = entry.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some((host.to_string(), port.parse().ok().filter(|p| *p > 0)?))
}

/// Comma-separated addresses or networks; an address is a network of one. Empty entries
/// are skipped.
pub fn ip_nets(_: &Expect, text: &str) -> Result<Vec<IpNet>, Refused> {
    text.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            entry
                .parse::<IpNet>()
                .ok()
                .or_else(|| entry.parse::<IpAddr>().ok().map(IpNet::from))
                .map(|net| net.trunc())
                .ok_or_else(|| Refused::expected("comma-separated IP addresses or CIDRs").at(entry))
        })
        .collect()
}

pub fn listen_addr(_: &Expect, text: &str) -> Result<IpAddr, Refused> {
    text.parse()
        .map_err(|_| Refused::expected("an IP address to listen on, such as 0.0.0.0 or ::"))
}

/// Printable ASCII without spaces: fit for a header value and a log field.
pub fn printable(_: &Expect, text: &str) -> Result<String, Refused> {
    if text.is_empty() || !is_printable(text) {
        return Err(Refused::expected("printable ASCII without spaces"));
    }
    Ok(text.to_string())
}

/// A name Redis accepts in an ACL rule; saying so here beats a WRONGPASS at the first call.
pub fn redis_user(_: &Expect, text: &str) -> Result<String, Refused> {
    if !is_printable(text) {
        return Err(Refused::expected(
            "a Redis user name: printable ASCII without spaces",
        ));
    }
    Ok(text.to_string())
}

fn is_printable(text: &str) -> bool {
    text.bytes().all(|b| (0x21..0x7f).contains(&b))
}

/// A bucket key prefix: no spaces or control characters, which would split or garble a key
/// in `redis-cli` and the logs.
pub fn key_prefix(_: &Expect, text: &str) -> Result<String, Refused> {
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Refused::expected("no spaces or control characters"));
    }
    Ok(text.to_string())
}

/// `url` with its credentials masked, fit for logs and error messages: a password
/// (`user:secret@`), a lone user part (`secret@`, which Redis takes as a password when it
/// has no ACL users) and `password=`/`pass=` query parameters all become `***`.
pub fn mask_url(url: &str) -> String {
    let (rest, query) = match url.split_once('?') {
        Some((rest, query)) => (rest, Some(query)),
        None => (url, None),
    };
    let mut masked = match (rest.find("://"), rest.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &rest[scheme_end + 3..at];
            let shown = match credentials.split_once(':') {
                Some((user, _)) => format!("{user}:***"),
                None => "***".to_string(),
            };
            format!("{}{shown}{}", &rest[..scheme_end + 3], &rest[at..])
        }
        _ => rest.to_string(),
    };
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((name, _))
                    if name.eq_ignore_ascii_case("password")
                        || name.eq_ignore_ascii_case("pass") =>
                {
                    format!("{name}=***")
                }
                _ => param.to_string(),
            })
            .collect();
        masked.push('?');
        masked.push_str(&params.join("&"));
    }
    masked
}
