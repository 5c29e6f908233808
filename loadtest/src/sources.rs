//! Client source addresses: one client per address, loopback only.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;

/// More clients than this would only exhaust file descriptors.
pub const MAX_SOURCES: usize = 65_536;

/// A non-empty list of distinct loopback addresses of one family, in the given order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sources(Vec<IpAddr>);

impl Sources {
    pub fn addresses(&self) -> &[IpAddr] {
        &self.0
    }

    pub fn is_ipv4(&self) -> bool {
        self.0.first().is_some_and(IpAddr::is_ipv4)
    }
}

impl fmt::Display for Sources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [] => write!(f, "no clients"),
            [one] => write!(f, "1 client ({one})"),
            [first, .., last] => write!(f, "{} clients ({first} … {last})", self.0.len()),
        }
    }
}

/// Parses `127.0.0.5`, `127.0.0.10-127.0.0.250`, `127.0.0.10-250`, `127.0.1.0/24` and
/// comma-separated lists of those. Duplicates are dropped, the order is kept.
pub fn parse(spec: &str) -> Result<Sources, String> {
    let mut seen = HashSet::new();
    let mut addresses = Vec::new();
    for item in spec.split(',').map(str::trim) {
        if item.is_empty() {
            return Err(format!("{spec:?}: empty item in the list"));
        }
        for ip in parse_item(item)? {
            if !ip.is_loopback() {
                return Err(format!(
                    "{ip} is not a loopback address (use 127.0.0.0/8 or ::1)"
                ));
            }
            if seen.insert(ip) {
                addresses.push(ip);
            }
            if addresses.len() > MAX_SOURCES {
                return Err(format!("{spec:?}: more than {MAX_SOURCES} addresses"));
            }
        }
    }
    let Some(first) = addresses.first() else {
        return Err(format!("{spec:?}: no address"));
    };
    if addresses.iter().any(|ip| ip.is_ipv4() != first.is_ipv4()) {
        return Err(format!("{spec:?}: mixes IPv4 and IPv6 addresses"));
    }
    Ok(Sources(addresses))
}

fn parse_item(item: &str) -> Result<Vec<IpAddr>, String> {
    if item.contains('/') {
        let net: IpNet = item
            .parse()
            .map_err(|_| format!("{item:?} is not a CIDR block"))?;
        if net.prefix_len() + 16 < net.max_prefix_len() {
            return Err(format!("{item:?}: more than {MAX_SOURCES} addresses"));
        }
        return Ok(net.hosts().collect());
    }
    if let Some((from, to)) = item.split_once('-') {
        let from: Ipv4Addr = from
            .trim()
            .parse()
            .map_err(|_| format!("{item:?}: {from:?} is not an IPv4 address"))?;
        let to = to.trim();
        let to: Ipv4Addr = match to.parse::<u8>() {
            Ok(last) => {
                let [a, b, c, _] = from.octets();
                Ipv4Addr::new(a, b, c, last)
            }
            Err(_) => to
                .parse()
                .map_err(|_| format!("{item:?}: {to:?} is neither an address nor 0-255"))?,
        };
        let (low, high) = (u32::from(from), u32::from(to));
        if low > high {
            return Err(format!("{item:?}: the range runs backwards"));
        }
        if (high - low) as usize >= MAX_SOURCES {
            return Err(format!("{item:?}: more than {MAX_SOURCES} addresses"));
        }
        return Ok((low..=high)
            .map(|n| IpAddr::V4(Ipv4Addr::from(n)))
            .collect());
    }
    item.parse()
        .map(|ip| vec![ip])
        .map_err(|_| format!("{item:?} is not an address, range or CIDR block"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(sources: &Sources) -> Vec<String> {
        sources
            .addresses()
            .iter()
            .map(|ip| ip.to_string())
            .collect()
    }

    #[test]
    fn the_default_range_holds_241_clients() {
        let sources = parse("127.0.0.10-127.0.0.250").unwrap();
        assert_eq!(sources.addresses().len(), 241);
        assert_eq!(sources.addresses()[0].to_string(), "127.0.0.10");
        assert_eq!(sources.addresses()[240].to_string(), "127.0.0.250");
    }

    #[test]
    fn a_short_range_ends_on_the_last_octet() {
        assert_eq!(
            ips(&parse("127.0.0.10-12").unwrap()),
            ["127.0.0.10", "127.0.0.11", "127.0.0.12"]
        );
    }

    #[test]
    fn a_range_may_cross_an_octet_boundary() {
        assert_eq!(
            ips(&parse("127.0.0.255-127.0.1.1").unwrap()),
            ["127.0.0.255", "127.0.1.0", "127.0.1.1"]
        );
    }

    #[test]
    fn lists_keep_their_order_and_drop_duplicates() {
        assert_eq!(
            ips(&parse("127.0.0.3, 127.0.0.1-2,127.0.0.3").unwrap()),
            ["127.0.0.3", "127.0.0.1", "127.0.0.2"]
        );
    }

    #[test]
    fn a_cidr_block_gives_its_hosts() {
        assert_eq!(parse("127.0.1.0/24").unwrap().addresses().len(), 254);
        assert!(parse("127.0.0.0/8").is_err(), "too many addresses");
    }

    #[test]
    fn addresses_off_loopback_and_malformed_items_are_refused() {
        assert!(parse("10.0.0.1").unwrap_err().contains("loopback"));
        assert!(parse("127.0.0.20-10").unwrap_err().contains("backwards"));
        assert!(parse("127.0.0.1-300").is_err());
        assert!(parse("127.0.0.1,,127.0.0.2").is_err());
        assert!(parse("").is_err());
        assert!(parse("127.0.0.1,::1").unwrap_err().contains("mixes"));
    }

    #[test]
    fn the_ipv6_loopback_is_one_client() {
        let sources = parse("::1").unwrap();
        assert!(!sources.is_ipv4());
        assert_eq!(sources.to_string(), "1 client (::1)");
    }
}
