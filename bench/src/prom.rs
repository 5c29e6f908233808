//! The instances' `/metrics` (Prometheus text format), read for the one family the
//! benchmark counts: `ratelimit_http_requests_total{route, status}`.

/// Responses by status class that an instance counted for one route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatusCounts {
    pub ok: u64,
    pub denied: u64,
    pub other: u64,
}

impl StatusCounts {
    pub fn total(&self) -> u64 {
        self.ok + self.denied + self.other
    }

    pub fn delta_until(&self, later: &Self) -> Self {
        Self {
            ok: later.ok.saturating_sub(self.ok),
            denied: later.denied.saturating_sub(self.denied),
            other: later.other.saturating_sub(self.other),
        }
    }
}

/// One sample line: `name{label="value",...} number`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    pub name: &'a str,
    pub labels: Vec<(&'a str, &'a str)>,
    pub value: f64,
}

impl<'a> Sample<'a> {
    /// A sample line; comments, blank lines and anything malformed are `None`. Label
    /// values are taken as they are (the routes and statuses hold no escapes).
    pub fn parse(line: &'a str) -> Option<Self> {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let (series, value) = line.rsplit_once(' ')?;
        let value = value.parse().ok()?;
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.strip_suffix('}')?),
            None => (series, ""),
        };
        let labels = labels
            .split(',')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (key, value) = pair.split_once('=')?;
                Some((
                    key.trim(),
                    value.trim().strip_prefix('"')?.strip_suffix('"')?,
                ))
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Self {
            name,
            labels,
            value,
        })
    }

    pub fn label(&self, key: &str) -> Option<&'a str> {
        self.labels.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }
}

/// What `ratelimit_http_requests_total` says about `route`: 200, 429, anything else.
pub fn requests_by_status(metrics: &str, route: &str) -> StatusCounts {
    let mut counts = StatusCounts::default();
    for sample in metrics.lines().filter_map(Sample::parse) {
        if sample.name != "ratelimit_http_requests_total" || sample.label("route") != Some(route) {
            continue;
        }
        let n = sample.value as u64;
        match sample.label("status") {
            Some("200") => counts.ok += n,
            Some("429") => counts.denied += n,
            _ => counts.other += n,
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = "\
# HELP ratelimit_http_requests_total HTTP requests by route and status.
# TYPE ratelimit_http_requests_total counter
ratelimit_http_requests_total{route=\"/limited_endpoint\",status=\"200\"} 120
ratelimit_http_requests_total{route=\"/limited_endpoint\",status=\"429\"} 30
ratelimit_http_requests_total{route=\"/limited_endpoint\",status=\"503\"} 2
ratelimit_http_requests_total{route=\"/\",status=\"200\"} 999
ratelimit_http_request_duration_seconds_count{route=\"/limited_endpoint\"} 152
# EOF
";

    #[test]
    fn requests_are_counted_by_status_for_one_route() {
        assert_eq!(
            requests_by_status(METRICS, "/limited_endpoint"),
            StatusCounts {
                ok: 120,
                denied: 30,
                other: 2
            }
        );
        assert_eq!(requests_by_status(METRICS, "/").total(), 999);
        assert_eq!(requests_by_status("", "/").total(), 0);
    }

    #[test]
    fn a_sample_line_is_split_into_name_labels_and_value() {
        let sample = Sample::parse("up{job=\"x\",instance=\"y\"} 1").unwrap();
        assert_eq!(sample.name, "up");
        assert_eq!(sample.label("instance"), Some("y"));
        assert_eq!(sample.value, 1.0);
        assert_eq!(Sample::parse("plain 2.5").unwrap().labels, vec![]);
        assert_eq!(Sample::parse("# TYPE up gauge"), None);
        assert_eq!(Sample::parse("broken{a=\"b\" 1"), None);
    }
}
