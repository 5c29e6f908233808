//! The `match` section of a policy, compiled once so that checking a request against it
//! allocates nothing: methods become bits, host patterns are lowercased, path patterns
//! are split into segments. The request is prepared once ([`Prepared`]) and then compared
//! with every policy.

use std::cell::Cell;

use super::{HeaderLookup, RequestView};

/// Path segments a request may have before its prepared form spills to the heap.
const INLINE_SEGMENTS: usize = 16;

/// Header names of `match` conditions whose values a request remembers once looked up,
/// so that many policies testing one header cost one lookup. A file naming more headers
/// than this looks the others up each time.
pub(super) const HEADER_SLOTS: usize = 8;

/// The methods that get a bit of their own; any other is compared by name.
const STANDARD_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
];

/// Every condition of one `match` section; an empty one matches every request.
#[derive(Debug, Default)]
pub(super) struct Matcher {
    /// `None`: any method.
    pub(super) methods: Option<MethodSet>,
    /// Empty: any host.
    pub(super) hosts: Vec<HostPattern>,
    /// Empty: any path.
    pub(super) paths: Vec<PathPattern>,
    pub(super) header: Option<HeaderCondition>,
}

impl Matcher {
    /// These methods on this one path, nothing else.
    pub(super) fn route(methods: &[&str], path: &str) -> Self {
        Matcher {
            methods: Some(MethodSet::parse(methods).expect("a valid list of methods")),
            paths: vec![PathPattern::parse(path).expect("a valid path")],
            ..Matcher::default()
        }
    }

    /// Cheapest conditions first: a bit test, then segment compares, then the host, and
    /// the header (a call into the framework's header map) last.
    pub(super) fn matches(&self, request: &Prepared<'_>) -> bool {
        if let Some(methods) = &self.methods
            && !methods.contains(request)
        {
            return false;
        }
        if !self.paths.is_empty()
            && !self
                .paths
                .iter()
                .any(|pattern| pattern.matches(request.segments()))
        {
            return false;
        }
        if !self.hosts.is_empty() {
            let Some(host) = request.host else {
                return false;
            };
            if !self.hosts.iter().any(|pattern| pattern.matches(host)) {
                return false;
            }
        }
        self.header
            .as_ref()
            .is_none_or(|condition| condition.matches(request))
    }
}

/// A request, prepared once for comparing with every policy.
pub(super) struct Prepared<'a> {
    method: &'a str,
    /// The method's bit in [`STANDARD_METHODS`], or 0 for any other method.
    method_bit: u16,
    /// Without port or trailing dot; `None` when absent or empty.
    host: Option<&'a str>,
    segments: Segments<'a>,
    headers: &'a dyn HeaderLookup,
    /// Bit `i` set: `header_values[i]` holds the value of the header in slot `i`.
    looked_up: Cell<u8>,
    header_values: [Cell<Option<&'a [u8]>>; HEADER_SLOTS],
}

impl<'a> Prepared<'a> {
    pub(super) fn new(request: &RequestView<'a>) -> Self {
        Prepared {
            method: request.method,
            method_bit: standard_bit(request.method),
            host: request
                .host
                .map(host_without_port)
                .filter(|h| !h.is_empty()),
            segments: Segments::of(request.path),
            headers: request.headers,
            looked_up: Cell::new(0),
            header_values: Default::default(),
        }
    }

    /// The first value of header `name`, remembered in `slot` when it has one.
    fn header(&self, name: &str, slot: Option<u8>) -> Option<&'a [u8]> {
        let Some(slot) = slot.map(usize::from).filter(|&s| s < HEADER_SLOTS) else {
            return self.headers.header(name);
        };
        let bit = 1 << slot;
        if self.looked_up.get() & bit == 0 {
            self.header_values[slot].set(self.headers.header(name));
            self.looked_up.set(self.looked_up.get() | bit);
        }
        self.header_values[slot].get()
    }

    pub(super) fn segments(&self) -> &[&'a str] {
        self.segments.as_slice()
    }

    pub(super) fn host(&self) -> Option<&'a str> {
        self.host
    }
}

/// A path's segments, normalised: empty and `.` segments dropped, `..` removing the
/// segment before it (never above the root). Upstreams resolve paths this way, so a rule
/// on `/login` must also hold for `//login/` and `/x/../login`.
pub(super) struct Segments<'a> {
    inline: [&'a str; INLINE_SEGMENTS],
    len: usize,
    /// Every segment, once there are more than `inline` holds: only unusually deep paths
    /// allocate.
    spilled: Option<Vec<&'a str>>,
}

impl<'a> Segments<'a> {
    pub(super) fn of(path: &'a str) -> Self {
        let mut segments = Segments {
            inline: [""; INLINE_SEGMENTS],
            len: 0,
            spilled: None,
        };
        for segment in path.split('/') {
            match segment {
                "" | "." => {}
                ".." => segments.pop(),
                _ => segments.push(segment),
            }
        }
        segments
    }

    fn push(&mut self, segment: &'a str) {
        if let Some(spilled) = &mut self.spilled {
            spilled.push(segment);
        } else if self.len < INLINE_SEGMENTS {
            self.inline[self.len] = segment;
            self.len += 1;
        } else {
            let mut spilled = self.inline.to_vec();
            spilled.push(segment);
            self.spilled = Some(spilled);
        }
    }

    fn pop(&mut self) {
        match &mut self.spilled {
            Some(spilled) => {
                spilled.pop();
            }
            None => self.len = self.len.saturating_sub(1),
        }
    }

    pub(super) fn as_slice(&self) -> &[&'a str] {
        match &self.spilled {
            Some(spilled) => spilled,
            None => &self.inline[..self.len],
        }
    }
}

/// Methods as bits for the standard ones, names for the rest.
#[derive(Debug)]
pub(super) struct MethodSet {
    standard: u16,
    /// Upper case.
    other: Vec<Box<str>>,
}

impl MethodSet {
    pub(super) fn parse<S: AsRef<str>>(methods: &[S]) -> Result<Self, String> {
        if methods.is_empty() {
            return Err("methods: an empty list matches no request; leave `methods` out to match every method".to_string());
        }
        let mut set = MethodSet {
            standard: 0,
            other: Vec::new(),
        };
        for method in methods {
            let method = method.as_ref();
            if !is_token(method) {
                return Err(format!("methods: {method:?} is not an HTTP method"));
            }
            match standard_bit(method) {
                0 => set.other.push(method.to_ascii_uppercase().into()),
                bit => set.standard |= bit,
            }
        }
        Ok(set)
    }

    fn contains(&self, request: &Prepared<'_>) -> bool {
        if request.method_bit != 0 {
            self.standard & request.method_bit != 0
        } else {
            self.other
                .iter()
                .any(|method| method.eq_ignore_ascii_case(request.method))
        }
    }
}

fn standard_bit(method: &str) -> u16 {
    STANDARD_METHODS
        .iter()
        .position(|standard| standard.eq_ignore_ascii_case(method))
        .map_or(0, |index| 1 << index)
}

/// A host name, or every subdomain of one.
#[derive(Debug)]
pub(super) enum HostPattern {
    /// Lower case.
    Exact(Box<str>),
    /// Lower case, with its leading dot: `.example.com`.
    Subdomains(Box<str>),
}

impl HostPattern {
    pub(super) fn parse(text: &str) -> Result<Self, String> {
        let lower = text.to_ascii_lowercase();
        let name = lower.strip_suffix('.').unwrap_or(&lower);
        let (name, subdomains) = match name.strip_prefix("*.") {
            Some(rest) => (rest, true),
            None => (name, false),
        };
        let bracketed = name.starts_with('[') && name.ends_with(']');
        let valid = !name.is_empty()
            && name.bytes().all(|b| {
                b.is_ascii_alphanumeric()
                    || b == b'-'
                    || b == b'.'
                    || (bracketed && b":[]".contains(&b))
            });
        if !valid {
            return Err(format!(
                "host: {text:?} is not a host name (no port; `*.` only as a prefix)"
            ));
        }
        Ok(if subdomains {
            HostPattern::Subdomains(format!(".{name}").into())
        } else {
            HostPattern::Exact(name.into())
        })
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(name) => host.eq_ignore_ascii_case(name),
            HostPattern::Subdomains(suffix) => {
                host.len() > suffix.len()
                    && host.as_bytes()[host.len() - suffix.len()..]
                        .eq_ignore_ascii_case(suffix.as_bytes())
            }
        }
    }
}

/// `example.com:8080` → `example.com`, `[::1]:80` → `[::1]`; a trailing dot dropped.
pub(super) fn host_without_port(host: &str) -> &str {
    let host = host.trim();
    let bare = if host.starts_with('[') {
        host.find(']').map_or(host, |end| &host[..=end])
    } else {
        match host.split_once(':') {
            Some((name, port)) if !port.contains(':') => name,
            _ => host,
        }
    };
    bare.strip_suffix('.').unwrap_or(bare)
}

/// Whole segments; a final `**` stands for any number of further ones.
#[derive(Debug)]
pub(super) struct PathPattern {
    segments: Vec<Segment>,
    /// Ends in `**`: the path may go on below the segments.
    rest: bool,
}

#[derive(Debug)]
enum Segment {
    Literal(Box<str>),
    /// `*`: exactly one segment, whatever it is.
    Any,
}

impl PathPattern {
    pub(super) fn parse(text: &str) -> Result<Self, String> {
        if !text.starts_with('/') {
            return Err(format!("path: {text:?} must start with /"));
        }
        let parts: Vec<&str> = text.split('/').filter(|part| !part.is_empty()).collect();
        let mut pattern = PathPattern {
            segments: Vec::with_capacity(parts.len()),
            rest: false,
        };
        for (index, part) in parts.iter().enumerate() {
            let segment = match *part {
                "**" if index + 1 == parts.len() => {
                    pattern.rest = true;
                    continue;
                }
                "**" => return Err(format!("path: {text:?}: `**` may only end a pattern")),
                "*" => Segment::Any,
                "." | ".." => {
                    return Err(format!(
                        "path: {text:?}: `.` and `..` are not allowed; write the path they lead to"
                    ));
                }
                literal if literal.contains('*') => {
                    return Err(format!(
                        "path: {text:?}: `*` stands for a whole segment, not part of one"
                    ));
                }
                literal => Segment::Literal(literal.into()),
            };
            pattern.segments.push(segment);
        }
        Ok(pattern)
    }

    fn matches(&self, path: &[&str]) -> bool {
        let length_fits = if self.rest {
            path.len() >= self.segments.len()
        } else {
            path.len() == self.segments.len()
        };
        length_fits
            && self
                .segments
                .iter()
                .zip(path)
                .all(|(segment, given)| match segment {
                    Segment::Any => true,
                    Segment::Literal(literal) => **literal == **given,
                })
    }
}

/// A header's presence, or its first value.
#[derive(Debug)]
pub(super) struct HeaderCondition {
    /// Lower case.
    pub(super) name: Box<str>,
    /// `None`: present with any value.
    pub(super) value: Option<Box<[u8]>>,
    /// Where a request remembers this header's value ([`HEADER_SLOTS`]), shared by every
    /// condition on the same header.
    pub(super) slot: Option<u8>,
}

impl HeaderCondition {
    fn matches(&self, request: &Prepared<'_>) -> bool {
        match (request.header(&self.name, self.slot), &self.value) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(given), Some(wanted)) => given == &**wanted,
        }
    }
}

/// A header name as the file gives it, lowercased, or why it is not one.
pub(super) fn header_name(text: &str) -> Result<Box<str>, String> {
    if is_token(text) {
        Ok(text.to_ascii_lowercase().into())
    } else {
        Err(format!("{text:?} is not a header name"))
    }
}

/// An RFC 9110 token: what methods and header names are made of.
pub(super) fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segments(path: &str) -> Vec<&str> {
        Segments::of(path).as_slice().to_vec()
    }

    #[test]
    fn empty_and_dot_segments_vanish_and_dot_dot_climbs() {
        assert_eq!(segments("/login"), ["login"]);
        assert_eq!(segments("//login/"), ["login"]);
        assert_eq!(segments("/a/./b/../login"), ["a", "login"]);
        assert_eq!(segments("/../../login"), ["login"]);
        assert!(segments("/").is_empty());
    }

    #[test]
    fn a_deep_path_spills_to_the_heap_with_nothing_lost() {
        let path: String = (0..40).map(|i| format!("/s{i}")).collect();
        let got = segments(&path);
        assert_eq!(got.len(), 40);
        assert_eq!(got[0], "s0");
        assert_eq!(got[39], "s39");
        let climbed = format!("{path}/../..");
        assert_eq!(segments(&climbed).len(), 38);
    }

    #[test]
    fn a_star_inside_a_segment_or_an_inner_double_star_is_refused() {
        for refused in ["/files/*.png", "/a/**/b", "api", "/a/../b"] {
            assert!(PathPattern::parse(refused).is_err(), "{refused}");
        }
    }

    #[test]
    fn a_port_and_a_trailing_dot_are_not_part_of_the_host() {
        assert_eq!(host_without_port("example.com:8080"), "example.com");
        assert_eq!(host_without_port("example.com."), "example.com");
        assert_eq!(host_without_port("[::1]:80"), "[::1]");
        assert_eq!(host_without_port("example.com"), "example.com");
    }

    #[test]
    fn a_host_pattern_with_a_port_or_an_inner_star_is_refused() {
        for refused in ["example.com:80", "a.*.com", ""] {
            assert!(HostPattern::parse(refused).is_err(), "{refused:?}");
        }
        assert!(HostPattern::parse("*.Example.COM").is_ok());
    }
}
