//! The topology's ports, from `scripts/ports.env`: the one definition scripts/cluster.sh
//! sources too, so the bench and the cluster it measures never disagree.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};

/// Every port of the native topology, shifted by its CLUSTER_PORT_OFFSET.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ports {
    pub nginx: u16,
    pub apps: Vec<u16>,
    pub data: Vec<u16>,
    pub sentinels: Vec<u16>,
    /// Cluster mode's nodes (each with its bus on port + 10000).
    pub cluster: Vec<u16>,
    pub gateway: u16,
    pub upstream: u16,
    pub upstream_count: u16,
}

impl Ports {
    pub fn read(root: &Path, offset: u16) -> Result<Self> {
        let path = root.join("scripts/ports.env");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&text, offset).with_context(|| format!("in {}", path.display()))
    }

    pub fn parse(text: &str, offset: u16) -> Result<Self> {
        let lines = text
            .lines()
            .filter(|line| !line.trim_start().starts_with('#'));
        let pairs = lines.filter_map(|line| line.split_once('='));
        let values: BTreeMap<&str, &str> = pairs
            .map(|(name, value)| (name, value.trim_matches('"')))
            .collect();
        let list = |name: &str| -> Result<Vec<u16>> {
            let words = values.get(name).with_context(|| format!("no {name}"))?;
            words
                .split_whitespace()
                .map(|word| Ok(word.parse::<u16>()? + offset))
                .collect::<Result<_>>()
                .with_context(|| format!("{name}={words}: not ports"))
        };
        let one = |name: &str| -> Result<u16> { Ok(list(name)?[0]) };
        Ok(Self {
            nginx: one("NGINX_PORT")?,
            apps: list("APP_PORTS")?,
            data: list("DATA_PORTS")?,
            sentinels: list("SENTINEL_PORTS")?,
            cluster: list("CLUSTER_PORTS")?,
            gateway: one("GATEWAY_PORT")?,
            upstream: one("UPSTREAM_PORT")?,
            upstream_count: one("UPSTREAM_COUNT_PORT")?,
        })
    }

    /// Every port a cluster of this mode takes, Cluster mode's buses included.
    pub fn all(&self, redis_cluster: bool, gateway: bool) -> Vec<u16> {
        let mut ports = vec![self.nginx, self.gateway];
        ports.extend(&self.apps);
        if redis_cluster {
            ports.extend(self.cluster.iter().flat_map(|&p| [p, p + 10_000]));
        } else {
            ports.extend(self.data.iter().chain(&self.sentinels));
        }
        if gateway {
            ports.extend([self.upstream, self.upstream_count]);
        }
        ports
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_ports_file_is_read_and_shifted_by_the_offset_and_a_broken_one_is_an_error() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let ports = Ports::read(&root, 0).unwrap();
        assert_eq!(
            (ports.nginx, &ports.apps[..], ports.data[0]),
            (8000, &[8001, 8002][..], 6379)
        );
        let shifted = Ports::read(&root, 1000).unwrap();
        assert_eq!(
            (shifted.nginx, shifted.sentinels[0], shifted.cluster.len()),
            (9000, 27379, 6)
        );
        assert!(shifted.all(true, false).contains(&18000));
        let text = std::fs::read_to_string(root.join("scripts/ports.env")).unwrap();
        assert!(Ports::parse(&text.replace("8001", "x"), 0).is_err());
        assert!(Ports::parse("NGINX_PORT=8000\n", 0).is_err());
    }
}
