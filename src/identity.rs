//! Who a request counts against: the client's address, derived defensively.
//!
//! Forwarded headers are believed only when the peer is a trusted proxy, and only up to
//! the first hop that is not itself trusted. Anything that does not parse as an address is
//! never a key: the request stays on the nearest address that is known, so a client can
//! neither pick its own bucket nor mint new ones.
//!
//! A peer is a TCP address, trusted when `TRUSTED_PROXIES` lists it, or a process on this
//! host connected through `UNIX_SOCKET` ([`Peer::LocalSocket`]): the Nginx beside the
//! instance, trusted as a proxy because only who may open the socket file can be that
//! peer (`UNIX_SOCKET_MODE` and the folder's permissions are its trust list). Its nearest
//! known address is this host's loopback address, so a socket caller that forwards
//! nothing, or forwards no usable hop, counts as a caller on this host, as a TCP caller
//! from loopback would.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

/// The bucket a request is charged to. IPv4 clients (including IPv4-mapped IPv6) are keyed
/// by address; other IPv6 clients by their prefix, so one host cannot rotate through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    V4(std::net::Ipv4Addr),
    V6Prefix { network: Ipv6Addr, prefix_len: u8 },
}

impl ClientKey {
    pub fn from_addr(addr: IpAddr, ipv6_prefix_len: u8) -> Self {
        match addr {
            IpAddr::V4(v4) => ClientKey::V4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey::V4(v4),
                None => {
                    let prefix_len = ipv6_prefix_len.min(128);
                    let mask = u128::MAX
                        .checked_shl(128 - u32::from(prefix_len))
                        .unwrap_or(0);
                    ClientKey::V6Prefix {
                        network: Ipv6Addr::from(u128::from(v6) & mask),
                        prefix_len,
                    }
                }
            },
        }
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientKey::V4(v4) => write!(f, "{v4}"),
            ClientKey::V6Prefix {
                network,
                prefix_len,
            } => write!(f, "{network}/{prefix_len}"),
        }
    }
}

/// The other end of a request's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// A TCP peer: a proxy only when `TRUSTED_PROXIES` lists it.
    Tcp(IpAddr),
    /// A process on this host, through `UNIX_SOCKET`: always a trusted proxy, at
    /// [`LOCAL_HOST`].
    LocalSocket,
}

/// Where a [`Peer::LocalSocket`] is: this host.
pub const LOCAL_HOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Where a request came from, as far as the limiter is willing to believe.
#[derive(Debug, Clone)]
pub struct IdentityRules {
    trusted_proxies: Vec<IpNet>,
    ipv6_prefix_len: u8,
}

/// The forwarding headers of one request, as raw bytes: invalid UTF-8 must not be an error.
#[derive(Debug, Default)]
pub struct ForwardedHeaders<'a> {
    /// Every `X-Forwarded-For` header, in the order received.
    pub forwarded_for: Vec<&'a [u8]>,
    pub real_ip: Option<&'a [u8]>,
}

impl IdentityRules {
    pub fn new(trusted_proxies: Vec<IpNet>, ipv6_prefix_len: u8) -> Self {
        Self {
            trusted_proxies,
            ipv6_prefix_len,
        }
    }

    /// The proxies whose forwarding headers are believed.
    pub fn trusted_proxies(&self) -> &[IpNet] {
        &self.trusted_proxies
    }

    /// Whether `addr` is one of the proxies whose forwarding headers are believed.
    pub fn is_trusted(&self, addr: IpAddr) -> bool {
        let addr = canonical(addr);
        self.trusted_proxies.iter().any(|net| net.contains(&addr))
    }

    /// Whether `peer`'s forwarding headers are believed.
    pub fn is_trusted_peer(&self, peer: Peer) -> bool {
        match peer {
            Peer::Tcp(addr) => self.is_trusted(addr),
            Peer::LocalSocket => true,
        }
    }

    /// The key for a request whose peer is `peer`.
    pub fn client_key(&self, peer: Peer, headers: &ForwardedHeaders<'_>) -> ClientKey {
        ClientKey::from_addr(self.client_addr(peer, headers), self.ipv6_prefix_len)
    }

    /// Walks the proxy chain from the nearest hop outwards, believing each hop only while
    /// the previous one is trusted.
    pub fn client_addr(&self, peer: Peer, headers: &ForwardedHeaders<'_>) -> IpAddr {
        let mut nearest = match peer {
            Peer::Tcp(addr) => canonical(addr),
            Peer::LocalSocket => LOCAL_HOST,
        };
        if !self.is_trusted_peer(peer) {
            return nearest;
        }
        if headers.forwarded_for.is_empty() {
            return headers
                .real_ip
                .and_then(parse_hop)
                .map(canonical)
                .unwrap_or(nearest);
        }
        let hops = headers
            .forwarded_for
            .iter()
            .rev()
            .flat_map(|header| header.rsplit(|&byte| byte == b','));
        for hop in hops {
            let Some(addr) = parse_hop(hop) else {
                return nearest;
            };
            nearest = canonical(addr);
            if !self.is_trusted(nearest) {
                return nearest;
            }
        }
        nearest
    }
}

/// IPv4-mapped IPv6 is the IPv4 client it maps.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        IpAddr::V4(_) => addr,
    }
}

/// One hop of a forwarding header: an address, optionally with a port (`1.2.3.4:80`,
/// `[::1]:80`). Anything else is not an address.
fn parse_hop(raw: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(raw).ok()?.trim();
    if text.len() > 64 {
        return None;
    }
    text.parse::<IpAddr>()
        .ok()
        .or_else(|| text.parse::<SocketAddr>().ok().map(|socket| socket.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn tcp(text: &str) -> Peer {
        Peer::Tcp(ip(text))
    }

    fn rules(trusted: &[&str]) -> IdentityRules {
        let nets = trusted
            .iter()
            .map(|t| t.parse().unwrap_or_else(|_| IpNet::from(ip(t))))
            .collect();
        IdentityRules::new(nets, 64)
    }

    fn xff(values: &[&'static str]) -> ForwardedHeaders<'static> {
        ForwardedHeaders {
            forwarded_for: values.iter().map(|v| v.as_bytes()).collect(),
            real_ip: None,
        }
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
        let rules = rules(&["10.0.0.1"]);
        let addr = rules.client_addr(tcp("192.0.2.7"), &xff(&["203.0.113.9"]));
        assert_eq!(addr, ip("192.0.2.7"));
    }

    #[test]
    fn with_no_trusted_proxies_forwarded_headers_are_ignored() {
        let rules = rules(&[]);
        let headers = ForwardedHeaders {
            forwarded_for: vec![b"203.0.113.9"],
            real_ip: Some(b"203.0.113.10"),
        };
        assert_eq!(
            rules.client_addr(tcp("127.0.0.1"), &headers),
            ip("127.0.0.1")
        );
    }

    #[test]
    fn a_trusted_proxy_is_believed_for_the_rightmost_untrusted_hop() {
        let rules = rules(&["10.0.0.0/8"]);
        let headers = xff(&["198.51.100.1, 203.0.113.9, 10.1.1.1"]);
        assert_eq!(
            rules.client_addr(tcp("10.0.0.1"), &headers),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn a_spoofed_leftmost_entry_is_not_believed() {
        let rules = rules(&["10.0.0.1"]);
        let headers = xff(&["1.1.1.1, 203.0.113.9"]);
        assert_eq!(
            rules.client_addr(tcp("10.0.0.1"), &headers),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn repeated_headers_are_joined_in_order() {
        let rules = rules(&["10.0.0.0/8"]);
        let headers = xff(&["203.0.113.9", "10.2.2.2"]);
        assert_eq!(
            rules.client_addr(tcp("10.0.0.1"), &headers),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn a_malformed_hop_keys_on_the_nearest_known_address() {
        let rules = rules(&["10.0.0.0/8"]);
        let headers = xff(&["203.0.113.9, not-an-ip, 10.2.2.2"]);
        assert_eq!(rules.client_addr(tcp("10.0.0.1"), &headers), ip("10.2.2.2"));
        let empty_hop = xff(&["203.0.113.9,,"]);
        assert_eq!(
            rules.client_addr(tcp("10.0.0.1"), &empty_hop),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn invalid_utf8_is_not_an_address() {
        let rules = rules(&["10.0.0.1"]);
        let headers = ForwardedHeaders {
            forwarded_for: vec![b"\xff\xfe203.0.113.9"],
            real_ip: None,
        };
        assert_eq!(rules.client_addr(tcp("10.0.0.1"), &headers), ip("10.0.0.1"));
    }

    #[test]
    fn x_real_ip_is_used_only_without_x_forwarded_for() {
        let rules = rules(&["10.0.0.1"]);
        let real_ip_only = ForwardedHeaders {
            forwarded_for: vec![],
            real_ip: Some(b"203.0.113.5"),
        };
        assert_eq!(
            rules.client_addr(tcp("10.0.0.1"), &real_ip_only),
            ip("203.0.113.5")
        );
        let both = ForwardedHeaders {
            forwarded_for: vec![b"203.0.113.9"],
            real_ip: Some(b"203.0.113.5"),
        };
        assert_eq!(rules.client_addr(tcp("10.0.0.1"), &both), ip("203.0.113.9"));
    }

    #[test]
    fn hops_with_ports_are_addresses() {
        let rules = rules(&["10.0.0.1"]);
        let headers = xff(&["[2001:db8::1]:443"]);
        assert_eq!(
            rules.client_addr(tcp("10.0.0.1"), &headers),
            ip("2001:db8::1")
        );
        let v4 = xff(&["203.0.113.9:8080"]);
        assert_eq!(rules.client_addr(tcp("10.0.0.1"), &v4), ip("203.0.113.9"));
    }

    #[test]
    fn a_socket_peer_is_believed_for_the_client_it_forwards_without_any_trusted_proxies() {
        let rules = rules(&[]);
        let headers = xff(&["1.1.1.1, 203.0.113.9"]);
        assert_eq!(
            rules.client_addr(Peer::LocalSocket, &headers),
            ip("203.0.113.9")
        );
        let real_ip_only = ForwardedHeaders {
            forwarded_for: vec![],
            real_ip: Some(b"203.0.113.5"),
        };
        assert_eq!(
            rules.client_addr(Peer::LocalSocket, &real_ip_only),
            ip("203.0.113.5")
        );
    }

    #[test]
    fn behind_a_socket_peer_only_trusted_hops_are_walked_through() {
        let rules = rules(&["10.0.0.0/8"]);
        let headers = xff(&["198.51.100.1, 203.0.113.9, 10.1.1.1"]);
        assert_eq!(
            rules.client_addr(Peer::LocalSocket, &headers),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn a_socket_peer_that_names_no_usable_client_is_this_host() {
        let rules = rules(&[]);
        assert_eq!(rules.client_addr(Peer::LocalSocket, &xff(&[])), LOCAL_HOST);
        assert_eq!(
            rules.client_addr(Peer::LocalSocket, &xff(&["not-an-ip"])),
            LOCAL_HOST
        );
        assert!(rules.is_trusted_peer(Peer::LocalSocket));
        assert!(!rules.is_trusted_peer(tcp("127.0.0.1")));
    }

    #[test]
    fn an_ipv4_mapped_peer_is_the_ipv4_client() {
        let key = ClientKey::from_addr(ip("::ffff:192.0.2.7"), 64);
        assert_eq!(key, ClientKey::from_addr(ip("192.0.2.7"), 64));
        assert_eq!(key.to_string(), "192.0.2.7");
    }

    #[test]
    fn a_mapped_trusted_proxy_is_trusted() {
        let rules = rules(&["10.0.0.1"]);
        let headers = xff(&["203.0.113.9"]);
        assert_eq!(
            rules.client_addr(tcp("::ffff:10.0.0.1"), &headers),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn ipv6_clients_share_a_bucket_per_prefix() {
        let a = ClientKey::from_addr(ip("2001:db8:1:2:aaaa::1"), 64);
        let b = ClientKey::from_addr(ip("2001:db8:1:2:bbbb::2"), 64);
        let other = ClientKey::from_addr(ip("2001:db8:1:3::1"), 64);
        assert_eq!(a, b);
        assert_ne!(a, other);
        assert_eq!(a.to_string(), "2001:db8:1:2::/64");
        let whole = ClientKey::from_addr(ip("2001:db8::1"), 128);
        assert_eq!(whole.to_string(), "2001:db8::1/128");
        assert_eq!(
            ClientKey::from_addr(ip("2001:db8::1"), 0).to_string(),
            "::/0"
        );
    }

    proptest! {
        /// Whatever a client sends directly, it is keyed on its own address.
        #[test]
        fn a_direct_client_can_never_choose_its_identity(
            peer in any::<[u8; 4]>(),
            forwarded in proptest::collection::vec(any::<Vec<u8>>(), 0..4),
            real_ip in proptest::option::of(any::<Vec<u8>>()),
        ) {
            let rules = rules(&["10.0.0.0/8"]);
            let peer = IpAddr::from(peer);
            prop_assume!(!rules.is_trusted(peer));
            let headers = ForwardedHeaders {
                forwarded_for: forwarded.iter().map(Vec::as_slice).collect(),
                real_ip: real_ip.as_deref(),
            };
            prop_assert_eq!(rules.client_addr(Peer::Tcp(peer), &headers), peer);
        }

        /// Through a trusted proxy, the key is always the peer or an address the headers name.
        #[test]
        fn a_forwarded_key_is_always_a_named_address(
            forwarded in proptest::collection::vec("[0-9a-f.:, ]{0,40}", 0..4),
        ) {
            let rules = rules(&["10.0.0.1"]);
            let headers = ForwardedHeaders {
                forwarded_for: forwarded.iter().map(|s| s.as_bytes()).collect(),
                real_ip: None,
            };
            let addr = rules.client_addr(tcp("10.0.0.1"), &headers);
            let named = addr == ip("10.0.0.1")
                || forwarded.iter().any(|h| h.split(',').any(|hop| parse_hop(hop.as_bytes()).map(canonical) == Some(addr)));
            prop_assert!(named);
        }
    }
}
