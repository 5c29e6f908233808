//! How one setting's text becomes its typed value, and how a value that does not fit is
//! reported: one line naming the variable, what it expects and what it got (credentials
//! masked). The parsers know nothing of other settings; the rules between settings live
//! beside the types they build.

use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;
use redis::{ConnectionInfo, IntoConnectionInfo};
use secrecy::SecretString;

use super::declared::{Expect, Preset, Setting};
use super::{HostPort, SettingsError, mask_url};

/// How a setting's text becomes its value; `Err` says what it expects.
pub type Parse<T> = fn(&Setting, &str) -> Result<T, Refused>;

/// Why a value does not fit its setting.
#[derive(Debug)]
pub struct Refused {
    /// Completes "expected …".
    expected: String,
    /// The part of the value at fault, when it is not the whole value (one entry of a list).
    part: Option<String>,
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

/// Every problem found in one load, in the order found, so that one restart fixes them all.
#[derive(Default)]
pub struct Problems {
    lines: Vec<String>,
    /// Settings whose own value was refused; they hold their preset from then on.
    refused: Vec<&'static str>,
}

impl Problems {
    /// The value of a setting with a preset: its text if given, else the preset. A value that
    /// does not parse is reported and replaced by the preset, so that the rules between
    /// settings still run (see [`Problems::add_unless_refused`]).
    pub fn parse_or_preset<T>(
        &mut self,
        setting: &'static Setting,
        given: Option<&str>,
        parse: Parse<T>,
    ) -> T {
        let Preset::Value(preset) = setting.preset else {
            unreachable!("{} is declared without a preset value", setting.name)
        };
        let text = given.unwrap_or(preset);
        parse(setting, text).unwrap_or_else(|refused| {
            self.refuse(setting, refused, text);
            // `config/default.toml` holds every preset and is parsed on every load, so a
            // preset that did not parse would fail every test.
            parse(setting, preset)
                .unwrap_or_else(|_| panic!("{}'s preset {preset:?} parses", setting.name))
        })
    }

    /// The value of a setting without a preset: `None` when not given, or when its text was
    /// refused (and reported).
    pub fn parse_if_given<T>(
        &mut self,
        setting: &'static Setting,
        given: Option<&str>,
        parse: Parse<T>,
    ) -> Option<T> {
        let text = given?;
        parse(setting, text)
            .map_err(|refused| self.refuse(setting, refused, text))
            .ok()
    }

    fn refuse(&mut self, setting: &'static Setting, refused: Refused, text: &str) {
        let got = refused.part.as_deref().unwrap_or(text);
        let shown = match setting.expects {
            Expect::Secret => "***".to_string(),
            Expect::Url => mask_url(got),
            _ => got.to_string(),
        };
        self.lines.push(format!(
            "{}: expected {}, got {shown:?}",
            setting.name, refused.expected
        ));
        self.refused.push(setting.name);
    }

    /// A problem about which settings are given together; it holds whatever their values.
    pub fn add(&mut self, line: String) {
        self.lines.push(line);
    }

    /// A problem a rule found in the values of `settings`. Left out when one of them was
    /// refused on its own: the rule then judged its preset, not what was given.
    pub fn add_unless_refused(&mut self, settings: &[&Setting], line: String) {
        if !settings.iter().any(|s| self.refused.contains(&s.name)) {
            self.lines.push(line);
        }
    }

    pub fn extend(&mut self, lines: impl IntoIterator<Item = String>) {
        self.lines.extend(lines);
    }

    /// `value` when nothing was reported; every rule that gives `None` reports why.
    pub fn finish<T>(self, value: Option<T>) -> Result<T, SettingsError> {
        match value {
            Some(value) if self.lines.is_empty() => Ok(value),
            _ => Err(SettingsError::Invalid(self.lines)),
        }
    }
}

/// A whole number within the setting's [`Expect::Whole`] bounds.
pub fn whole<T: TryFrom<u64>>(setting: &Setting, text: &str) -> Result<T, Refused> {
    let Expect::Whole { min, max } = setting.expects else {
        unreachable!("{} is not declared as a whole number", setting.name)
    };
    text.parse::<u64>()
        .ok()
        .filter(|value| (min..=max).contains(value))
        .and_then(|value| T::try_from(value).ok())
        .ok_or_else(|| Refused::expected(format!("a whole number from {min} to {max}")))
}

/// [`whole`] milliseconds.
pub fn millis(setting: &Setting, text: &str) -> Result<Duration, Refused> {
    whole(setting, text).map(Duration::from_millis)
}

/// [`whole`] seconds.
pub fn seconds(setting: &Setting, text: &str) -> Result<Duration, Refused> {
    whole(setting, text).map(Duration::from_secs)
}

/// One of the setting's [`Expect::Word`]s, in any case.
pub fn word<T: FromStr>(setting: &Setting, text: &str) -> Result<T, Refused> {
    let Expect::Word(words) = setting.expects else {
        unreachable!("{} is not declared as a word", setting.name)
    };
    text.parse::<T>()
        .map_err(|_| Refused::expected(format!("one of {}", words.join(", "))))
}

pub fn switch(_: &Setting, text: &str) -> Result<bool, Refused> {
    match text.to_ascii_lowercase().as_str() {
        "on" | "true" | "1" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        _ => Err(Refused::expected("one of on, off, true, false, 1, 0")),
    }
}

/// Any text.
pub fn text(_: &Setting, text: &str) -> Result<String, Refused> {
    Ok(text.to_string())
}

pub fn secret(_: &Setting, text: &str) -> Result<SecretString, Refused> {
    Ok(SecretString::from(text))
}

pub fn path(_: &Setting, text: &str) -> Result<PathBuf, Refused> {
    Ok(PathBuf::from(text))
}

/// A `redis://` URL, as the client will use it; `rediss://` and Unix sockets are not
/// supported.
pub fn redis_url(_: &Setting, text: &str) -> Result<ConnectionInfo, Refused> {
    text.starts_with("redis://")
        .then(|| text.into_connection_info().ok())
        .flatten()
        .ok_or_else(|| Refused::expected("a URL such as redis://:password@host:6379"))
}

/// `host:port,host:port,…`; an IPv6 host may be bracketed (`[::1]:7000`).
pub fn host_ports(_: &Setting, text: &str) -> Result<Vec<HostPort>, Refused> {
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
pub fn ip_nets(_: &Setting, text: &str) -> Result<Vec<IpNet>, Refused> {
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

pub fn listen_addr(_: &Setting, text: &str) -> Result<IpAddr, Refused> {
    text.parse()
        .map_err(|_| Refused::expected("an IP address to listen on, such as 0.0.0.0 or ::"))
}

/// Printable ASCII without spaces: fit for a header value and a log field.
pub fn printable(_: &Setting, text: &str) -> Result<String, Refused> {
    if text.is_empty() || !is_printable(text) {
        return Err(Refused::expected("printable ASCII without spaces"));
    }
    Ok(text.to_string())
}

/// A name Redis accepts in an ACL rule; saying so here beats a WRONGPASS at the first call.
pub fn redis_user(_: &Setting, text: &str) -> Result<String, Refused> {
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
pub fn key_prefix(_: &Setting, text: &str) -> Result<String, Refused> {
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Refused::expected("no spaces or control characters"));
    }
    Ok(text.to_string())
}
