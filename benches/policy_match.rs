//! What evaluating one request against 100 policies costs: the budget is 1 µs.
//!
//! `cargo bench --bench policy_match` measures. Run any other way (`cargo test
//! --all-targets` runs it without `--bench`), it only checks that it works, in a handful
//! of iterations.
//!
//! The 100 policies mix exact, prefix and glob paths, methods, hosts and header values,
//! as a real file would. In the first figure three of them apply to the request (one
//! keyed by a hashed API key, one global, one per client address), so it includes
//! building three keys; in the second none does, which is matching alone.

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::Instant;

use ratelimiter::identity::ClientKey;
use ratelimiter::policy::{HeaderLookup, PolicySet, RequestView};

const BUDGET_NS: f64 = 1_000.0;

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

/// Mean nanoseconds per `evaluate` over `iterations`, and how many policies applied.
fn measure(set: &PolicySet, request: &RequestView<'_>, iterations: u32) -> (f64, usize) {
    let applied = set
        .evaluate(request)
        .expect("the request is not refused")
        .len();
    let start = Instant::now();
    for _ in 0..iterations {
        black_box(set.evaluate(black_box(request)).ok());
    }
    (
        start.elapsed().as_nanos() as f64 / f64::from(iterations),
        applied,
    )
}

/// The median of `rounds` measurements, so that one interrupted round does not count.
fn median_of(rounds: usize, mut measure_once: impl FnMut() -> f64) -> f64 {
    let mut figures: Vec<f64> = (0..rounds).map(|_| measure_once()).collect();
    figures.sort_by(f64::total_cmp);
    figures[figures.len() / 2]
}

fn main() {
    let measuring = std::env::args().any(|arg| arg == "--bench");
    let (rounds, iterations) = if measuring { (7, 200_000) } else { (1, 10) };

    let parse = |text: String| {
        let set = PolicySet::parse(&text, "bench.toml").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(set.policies().len(), 100);
        set
    };
    let three_apply = parse(policy_file(true));
    let none_apply = parse(policy_file(false));
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
    let cases = [
        ("matching, keys and costs", &three_apply),
        ("matching alone", &none_apply),
    ];

    println!(
        "policy_match: GET {} against 100 policies, median of {rounds} rounds of {iterations} evaluations{}",
        request.path,
        if measuring {
            ""
        } else {
            " (a smoke run: `cargo bench --bench policy_match` measures)"
        }
    );
    for (what, set) in cases {
        if measuring {
            // Warm caches and the branch predictor before anything counts.
            measure(set, &request, iterations);
        }
        let mut applied = 0;
        let ns = median_of(rounds, || {
            let (ns, count) = measure(set, &request, iterations);
            applied = count;
            ns
        });
        let verdict = if !measuring {
            "not a measurement"
        } else if ns <= BUDGET_NS {
            "within the 1000 ns budget"
        } else {
            "OVER the 1000 ns budget"
        };
        println!("  {what} ({applied} apply): {ns:.0} ns per evaluation, {verdict}");
    }
}
