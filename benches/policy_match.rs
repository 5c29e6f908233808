//! What evaluating one request against 100 policies costs: the budget is 1 µs.
//!
//! `cargo bench --bench policy_match` measures with criterion (`-- --quick` for a short
//! run); `cargo test --all-targets` runs each case once, as a check that it works.
//!
//! The 100 policies mix exact, prefix and glob paths, methods, hosts and header values,
//! as a real file would. In the first case three of them apply to the request (one
//! keyed by a hashed API key, one global, one per client address), so it includes
//! building three keys; in the second none does, which is matching alone.

use std::hint::black_box;
use std::net::Ipv4Addr;

use criterion::{Criterion, criterion_group, criterion_main};
use ratelimiter::identity::ClientKey;
use ratelimiter::policy::{HeaderLookup, PolicySet, RequestView};

/// Headers the way a framework's map answers: a short scan.
struct Headers(Vec<(&'static str, &'static [u8])>);

impl HeaderLookup for Headers {
    fn header(&self, lowercase_name: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|(name, _)| *name == lowercase_name)
            .map(|(_, value)| *value)
    }
}

/// 97 policies that do not apply to the measured request, then three that do: keyed by
/// a hashed API key with two limits and an override, global, and per client address.
/// With `last_three_apply` false, those three are moved to another path, so that nothing
/// applies and the figure is matching alone.
fn policy_file(last_three_apply: bool) -> String {
    let minute = "limits = [{ name = \"minute\", rate = 100, per = \"1m\" }]";
    let mut text = String::new();
    for i in 0..97 {
        let matching = match i % 6 {
            0 => format!("{{ path = \"/svc{i}/login\", methods = [\"POST\"] }}"),
            1 => format!("{{ path = \"/svc{i}/**\" }}"),
            2 => format!("{{ path = \"/api/v{i}/*/items\", methods = [\"GET\", \"HEAD\"] }}"),
            3 => format!("{{ path = \"/api/**\", host = \"svc{i}.example.com\" }}"),
            4 => format!(
                "{{ path = \"/api/**\", header = {{ name = \"x-tenant\", value = \"t{i}\" }} }}"
            ),
            _ => format!("{{ path = [\"/a{i}\", \"/b{i}/*\"], methods = [\"PUT\", \"DELETE\"] }}"),
        };
        text.push_str(&format!(
            "[[policy]]\nname = \"p{i}\"\nmatch = {matching}\n{minute}\n\n"
        ));
    }
    let prefix = if last_three_apply {
        "/api"
    } else {
        "/internal"
    };
    text.push_str(&format!(
        r#"[[policy]]
name = "api"
match = {{ path = "{prefix}/**", host = "*.example.com" }}
key = ["header:x-api-key"]
limits = [
    {{ name = "minute", rate = 100, per = "1m" }},
    {{ name = "day", rate = 10000, per = "1d" }},
]
[[policy.override]]
keys = ["key-123"]
limits = [{{ name = "minute", rate = 1000, per = "1m" }}]

[[policy]]
name = "api-ceiling"
match = {{ path = "{prefix}/**" }}
key = ["global"]
limits = [{{ name = "second", rate = 5000, per = "1s" }}]

[[policy]]
name = "per-client"
match = {{ path = "{}" }}
limits = [{{ name = "minute", rate = 600, per = "1m" }}]
"#,
        if last_three_apply {
            "/**"
        } else {
            "/internal/**"
        }
    ));
    text
}

fn policy_match(c: &mut Criterion) {
    let parse = |text: String| {
        let set = PolicySet::parse(&text, "bench.toml").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(set.policies().len(), 100);
        set
    };
    let headers = Headers(vec![
        (
            "user-agent",
            b"Mozilla/5.0 (X11; Linux x86_64) Firefox/140.0",
        ),
        ("accept", b"application/json"),
        ("x-request-id", b"6f1c2a0e-55d3-4b8e-9a61-0d2f6a7f3e11"),
        ("x-api-key", b"key-9f86d081884c7d659a2feaa0c55ad015"),
        ("x-tenant", b"acme"),
    ]);
    let request = RequestView {
        method: "GET",
        path: "/api/v1/users/42",
        host: Some("api.example.com"),
        headers: &headers,
        client: ClientKey::V4(Ipv4Addr::new(203, 0, 113, 9)),
    };
    let mut group = c.benchmark_group("policy_match");
    for (what, applying, set) in [
        ("matching, keys and costs", 3, parse(policy_file(true))),
        ("matching alone", 0, parse(policy_file(false))),
    ] {
        let applied = set.evaluate(&request).expect("the request is not refused");
        assert_eq!(applied.len(), applying, "{what}");
        group.bench_function(what, |b| {
            b.iter(|| black_box(set.evaluate(black_box(&request)).ok()))
        });
    }
    group.finish();
}

criterion_group!(benches, policy_match);
criterion_main!(benches);
