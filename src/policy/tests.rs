//! The policy module's specification: one file of tests, from the file's syntax to which
//! rule charges what.

use std::net::{IpAddr, Ipv4Addr};

use proptest::prelude::*;

use super::*;

const EXAMPLE: &str = include_str!("../../config/policies.example.toml");

/// Headers as a test writes them: lower-case names, raw values.
#[derive(Default, Clone)]
struct Headers(Vec<(&'static str, Vec<u8>)>);

impl HeaderLookup for Headers {
    fn header(&self, lowercase_name: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|(name, _)| *name == lowercase_name)
            .map(|(_, value)| value.as_slice())
    }
}

#[derive(Clone)]
struct Request {
    method: &'static str,
    path: String,
    host: Option<String>,
    headers: Headers,
    client: ClientKey,
}

fn client() -> ClientKey {
    ClientKey::V4(Ipv4Addr::new(203, 0, 113, 9))
}

fn request(method: &'static str, path: &str) -> Request {
    Request {
        method,
        path: path.to_string(),
        host: None,
        headers: Headers::default(),
        client: client(),
    }
}

impl Request {
    fn header(mut self, name: &'static str, value: impl Into<Vec<u8>>) -> Self {
        self.headers.0.push((name, value.into()));
        self
    }

    fn host(mut self, host: &str) -> Self {
        self.host = Some(host.to_string());
        self
    }

    fn from(mut self, client: ClientKey) -> Self {
        self.client = client;
        self
    }

    fn view(&self) -> RequestView<'_> {
        RequestView {
            method: self.method,
            path: &self.path,
            host: self.host.as_deref(),
            headers: &self.headers,
            client: self.client,
        }
    }
}

fn policies(text: &str) -> PolicySet {
    PolicySet::parse(text, "test.toml").unwrap_or_else(|error| panic!("{error}"))
}

fn problems(text: &str) -> Vec<String> {
    match PolicySet::parse(text, "test.toml") {
        Err(error) => error.problems,
        Ok(_) => panic!("should be refused:\n{text}"),
    }
}

/// The one problem of `text`, which must start with `test.toml:<line>: `.
fn problem_on_line(text: &str, line: usize) -> String {
    let found = problems(text);
    assert_eq!(found.len(), 1, "{found:#?}");
    let prefix = format!("test.toml:{line}: ");
    assert!(found[0].starts_with(&prefix), "{found:#?}");
    found[0][prefix.len()..].to_string()
}

fn applied(set: &PolicySet, request: &Request) -> Vec<String> {
    set.evaluate(&request.view())
        .unwrap()
        .iter()
        .map(|found| found.policy.name.to_string())
        .collect()
}

fn key_of(set: &PolicySet, request: &Request) -> String {
    let found = set.evaluate(&request.view()).unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    found[0].key.clone()
}

fn one_policy(body: &str) -> String {
    format!("[[policy]]\nname = \"p\"\n{body}\n")
}

const MINUTE: &str = "limits = [{ name = \"minute\", rate = 10, per = \"1m\" }]";

// ---- the file ----

#[test]
fn the_example_file_parses_with_every_kind_of_rule_it_shows() {
    let set = PolicySet::parse(EXAMPLE, "policies.example.toml").unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = set.policies().iter().map(|p| &*p.name).collect();
    assert_eq!(names, ["login", "api", "reports-ceiling", "uploads-trial"]);
    let modes: Vec<Mode> = set.policies().iter().map(|p| p.mode).collect();
    assert_eq!(
        modes,
        [Mode::Enforce, Mode::Enforce, Mode::Enforce, Mode::Shadow]
    );
    let login = &set.policies()[0];
    assert_eq!(login.limits().len(), 1);
    assert_eq!(
        login.limits()[0].spec,
        LimitSpec {
            rate: 5,
            window_s: 60,
            burst: 5
        }
    );
    let api = &set.policies()[1];
    let windows: Vec<u64> = api.limits().iter().map(|l| l.spec.window_s).collect();
    assert_eq!(windows, [60, 86_400]);
    assert_eq!(api.max_cost(), 10);
}

#[test]
fn the_example_file_limits_logins_per_client() {
    let set = policies(EXAMPLE);
    let login = request("POST", "/login");
    assert_eq!(applied(&set, &login), ["login"]);
    assert_eq!(key_of(&set, &login), "ip=203.0.113.9");
    assert!(applied(&set, &request("GET", "/login")).is_empty());
}

#[test]
fn the_example_file_gives_listed_api_keys_the_higher_plan() {
    let set = policies(EXAMPLE);
    let plan = |key: &str| {
        let request = request("GET", "/api/v1/users").header("x-api-key", key);
        let found = set.evaluate(&request.view()).unwrap();
        found[0].limits[0].spec.rate
    };
    assert_eq!(plan("key-123"), 1000);
    assert_eq!(plan("key-456"), 1000);
    assert_eq!(plan("key-789"), 100);
}

#[test]
fn a_policy_name_outside_the_charset_is_named_with_its_line() {
    let text = format!("\n[[policy]]\nname = \"Login\"\n{MINUTE}\n");
    let message = problem_on_line(&text, 3);
    assert!(
        message.contains(
            "policy \"Login\": name \"Login\" must be 1 to 32 characters of a-z, 0-9, _ and -"
        ),
        "{message}"
    );
    let long = format!("[[policy]]\nname = \"{}\"\n{MINUTE}\n", "a".repeat(33));
    assert!(problem_on_line(&long, 2).contains("must be 1 to 32"));
}

#[test]
fn a_duplicate_policy_name_names_the_first_one() {
    let text = format!("{}{}", one_policy(MINUTE), one_policy(MINUTE));
    let message = problem_on_line(&text, 5);
    assert!(
        message.contains("policy \"p\": the name is already taken by the policy on line 2"),
        "{message}"
    );
}

#[test]
fn a_duplicate_limit_name_within_a_policy_is_refused() {
    let text = one_policy(
        "limits = [\n  { name = \"minute\", rate = 10, per = \"1m\" },\n  { name = \"minute\", rate = 100, per = \"1h\" },\n]",
    );
    let message = problem_on_line(&text, 5);
    assert!(
        message.contains("limit \"minute\": the name is already taken by the limit on line 4"),
        "{message}"
    );
}

#[test]
fn a_bad_limit_name_is_named_with_the_policy() {
    let text = one_policy("limits = [{ name = \"per minute\", rate = 10, per = \"1m\" }]");
    let message = problem_on_line(&text, 3);
    assert!(
        message.starts_with("policy \"p\", limit \"per minute\": name"),
        "{message}"
    );
}

#[test]
fn an_unknown_field_is_named_with_its_line() {
    let text = one_policy(&format!("{MINUTE}\nlimtis = []"));
    let message = problem_on_line(&text, 4);
    assert!(
        message.contains("policy \"p\": unknown field `limtis`"),
        "{message}"
    );
}

#[test]
fn an_unknown_field_inside_match_or_a_limit_is_named_with_its_line() {
    let in_match = one_policy(&format!("match = {{ paths = \"/x\" }}\n{MINUTE}"));
    assert!(problem_on_line(&in_match, 3).contains("unknown field `paths`"));
    let in_limit =
        one_policy("limits = [\n  { name = \"m\", rate = 10, per = \"1m\", brust = 5 },\n]");
    assert!(problem_on_line(&in_limit, 4).contains("unknown field `brust`"));
}

#[test]
fn an_unknown_top_level_field_is_refused() {
    let text = format!("version = 2\n{}", one_policy(MINUTE));
    assert!(problem_on_line(&text, 1).contains("unknown field `version`"));
}

#[test]
fn a_file_without_policies_is_refused() {
    assert!(problem_on_line("", 1).contains("no [[policy]] entries"));
    assert!(problem_on_line("# nothing yet\n", 1).contains("no [[policy]] entries"));
}

#[test]
fn a_syntax_error_is_reported_with_its_line() {
    let text = format!("{}rate = \n", one_policy(MINUTE));
    let found = problems(&text);
    assert!(
        found[0].starts_with("test.toml:4: string values must be quoted"),
        "{found:#?}"
    );
}

#[test]
fn a_bad_duration_names_the_policy_the_limit_and_the_line() {
    let text = one_policy("limits = [\n  { name = \"m\", rate = 10, per = \"1 fortnight\" },\n]");
    let message = problem_on_line(&text, 4);
    assert!(
        message.starts_with("policy \"p\", limit \"m\": per: \"1 fortnight\" is not a duration"),
        "{message}"
    );
}

#[test]
fn a_sub_second_duration_is_refused() {
    for per in ["500ms", "1500ms", "0s"] {
        let text = one_policy(&format!(
            "limits = [{{ name = \"m\", rate = 10, per = \"{per}\" }}]"
        ));
        let message = problem_on_line(&text, 3);
        assert!(
            message.contains("is not a whole number of seconds"),
            "{per}: {message}"
        );
    }
}

#[test]
fn human_durations_are_read_in_whole_seconds() {
    for (per, seconds) in [
        ("1s", 1),
        ("10m", 600),
        ("1h", 3600),
        ("1d", 86_400),
        ("30d", 2_592_000),
    ] {
        let set = policies(&one_policy(&format!(
            "limits = [{{ name = \"m\", rate = 1, per = \"{per}\" }}]"
        )));
        assert_eq!(
            set.policies()[0].limits()[0].spec.window_s,
            seconds,
            "{per}"
        );
    }
}

#[test]
fn rates_from_one_per_thirty_days_to_a_billion_per_second_are_kept_exactly() {
    let text = one_policy(
        "limits = [\n  { name = \"slow\", rate = 1, per = \"30d\" },\n  { name = \"fast\", rate = 1000000000, per = \"1s\" },\n]",
    );
    let set = policies(&text);
    let specs: Vec<LimitSpec> = set.policies()[0].limits().iter().map(|l| l.spec).collect();
    assert_eq!(
        specs,
        [
            LimitSpec {
                rate: 1,
                window_s: 2_592_000,
                burst: 1
            },
            LimitSpec {
                rate: 1_000_000_000,
                window_s: 1,
                burst: 1_000_000_000
            }
        ]
    );
}

#[test]
fn a_limit_that_cannot_be_counted_exactly_is_refused_not_rounded() {
    let spec = LimitSpec {
        rate: 1,
        window_s: 30 * 86_400,
        burst: 1_000_000_000,
    };
    assert!(
        Limit::parse(spec).is_err(),
        "the case must be one Limit refuses"
    );
    let text = one_policy(
        "limits = [\n  { name = \"hoard\", rate = 1, per = \"30d\", burst = 1000000000 },\n]",
    );
    let message = problem_on_line(&text, 4);
    assert!(
        message.starts_with("policy \"p\", limit \"hoard\": 1 per 30d with a burst of 1000000000 cannot be counted exactly"),
        "{message}"
    );
}

#[test]
fn a_zero_rate_or_burst_is_refused() {
    let text = one_policy("limits = [{ name = \"m\", rate = 0, per = \"1m\" }]");
    assert!(problem_on_line(&text, 3).contains("the rate must be at least 1"));
    let text = one_policy("limits = [{ name = \"m\", rate = 5, per = \"1m\", burst = 0 }]");
    assert!(problem_on_line(&text, 3).contains("the burst must be at least 1"));
}

#[test]
fn a_burst_below_the_largest_cost_is_refused() {
    let fixed = one_policy("cost = 5\nlimits = [{ name = \"m\", rate = 3, per = \"1m\" }]");
    let message = problem_on_line(&fixed, 4);
    assert!(
        message.contains("limit \"m\": a burst of 3 is less than the largest cost of a request, 5"),
        "{message}"
    );
    let from_header = one_policy(
        "cost = { header = \"x-cost\", max = 100 }\nlimits = [{ name = \"m\", rate = 10, per = \"1m\", burst = 50 }]",
    );
    assert!(problem_on_line(&from_header, 4).contains("a burst of 50 is less than"));
}

#[test]
fn a_burst_below_the_largest_cost_is_refused_in_an_override_too() {
    let text = one_policy(
        "key = [\"header:x-api-key\"]\ncost = 5\nlimits = [{ name = \"m\", rate = 10, per = \"1m\" }]\n[[policy.override]]\nkeys = [\"k\"]\nlimits = [{ name = \"m\", rate = 1, per = \"1m\" }]",
    );
    let message = problem_on_line(&text, 8);
    assert!(
        message.starts_with("policy \"p\", override on line 6, limit \"m\": a burst of 1"),
        "{message}"
    );
}

#[test]
fn a_policy_without_limits_is_refused() {
    assert!(
        problem_on_line(&one_policy("limits = []"), 3)
            .contains("limits: at least one limit is needed")
    );
    assert!(problem_on_line(&one_policy(""), 1).contains("missing field `limits`"));
}

#[test]
fn a_cost_must_be_at_least_one_token() {
    assert!(
        problem_on_line(&one_policy(&format!("cost = 0\n{MINUTE}")), 3)
            .contains("cost: 0 must be at least 1 token")
    );
    assert!(
        problem_on_line(
            &one_policy(&format!(
                "cost = {{ header = \"x-cost\", max = 0 }}\n{MINUTE}"
            )),
            3
        )
        .contains("max must be at least 1")
    );
    assert!(
        problem_on_line(&one_policy(&format!("cost = \"one\"\n{MINUTE}")), 3)
            .contains("a whole number of tokens")
    );
}

#[test]
fn an_unknown_mode_or_on_missing_is_named() {
    assert!(
        problem_on_line(&one_policy(&format!("mode = \"dry-run\"\n{MINUTE}")), 3)
            .contains("unknown variant `dry-run`")
    );
    assert!(
        problem_on_line(
            &one_policy(&format!("on_missing = \"ignore\"\n{MINUTE}")),
            3
        )
        .contains("unknown variant `ignore`")
    );
}

#[test]
fn a_bad_key_part_is_named() {
    let message = problem_on_line(&one_policy(&format!("key = [\"cookie\"]\n{MINUTE}")), 3);
    assert!(
        message.contains("\"cookie\" is not a key part"),
        "{message}"
    );
    let message = problem_on_line(
        &one_policy(&format!("key = [\"global\", \"path\"]\n{MINUTE}")),
        3,
    );
    assert!(message.contains("cannot be combined"), "{message}");
    let message = problem_on_line(
        &one_policy(&format!("key = [\"path\", \"path\"]\n{MINUTE}")),
        3,
    );
    assert!(message.contains("given twice"), "{message}");
}

#[test]
fn a_bad_match_is_named_with_its_line() {
    let message = problem_on_line(
        &one_policy(&format!("match = {{ path = \"/files/*.png\" }}\n{MINUTE}")),
        3,
    );
    assert!(
        message.starts_with("policy \"p\": match.path: \"/files/*.png\""),
        "{message}"
    );
    let message = problem_on_line(
        &one_policy(&format!("match = {{ methods = [] }}\n{MINUTE}")),
        3,
    );
    assert!(
        message.contains("match.methods: an empty list"),
        "{message}"
    );
    let message = problem_on_line(
        &one_policy(&format!(
            "match = {{ host = \"api.example.com:443\" }}\n{MINUTE}"
        )),
        3,
    );
    assert!(message.contains("match.host"), "{message}");
}

#[test]
fn every_problem_is_reported_not_only_the_first() {
    let text = format!(
        "[[policy]]\nname = \"A\"\nlimits = [{{ name = \"m\", rate = 1, per = \"1ms\" }}]\n\n[[policy]]\nname = \"b\"\nbogus = 1\n{MINUTE}\n\n[[policy]]\nname = \"c\"\ncost = 0\nlimits = []\n"
    );
    let found = problems(&text);
    let lines: Vec<&str> = found
        .iter()
        .map(|p| p.split(": ").next().unwrap())
        .collect();
    assert_eq!(
        lines,
        [
            "test.toml:2",
            "test.toml:3",
            "test.toml:7",
            "test.toml:12",
            "test.toml:13"
        ],
        "{found:#?}"
    );
}

#[test]
fn an_override_key_with_the_wrong_number_of_parts_is_refused_without_repeating_it() {
    let text = one_policy(&format!(
        "key = [\"header:x-api-key\", \"method\"]\n{MINUTE}\n[[policy.override]]\nkeys = [\"secret-key-1\"]\n{MINUTE}"
    ));
    let message = problem_on_line(&text, 6);
    assert!(
        message.contains("keys: entry 1: 1 values given, but the key has 2 parts"),
        "{message}"
    );
    assert!(!message.contains("secret-key-1"), "{message}");
}

#[test]
fn an_override_key_given_twice_is_refused_without_repeating_it() {
    let text = one_policy(&format!(
        "key = [\"header:x-api-key\"]\n{MINUTE}\n[[policy.override]]\nkeys = [\"secret-key-1\"]\n{MINUTE}\n[[policy.override]]\nkeys = [\"secret-key-1\"]\n{MINUTE}"
    ));
    let message = problem_on_line(&text, 9);
    assert!(
        message.contains("already given to another override"),
        "{message}"
    );
    assert!(!message.contains("secret-key-1"), "{message}");
}

#[test]
fn a_global_policy_cannot_have_overrides() {
    let text = one_policy(&format!(
        "key = [\"global\"]\n{MINUTE}\n[[policy.override]]\nkeys = [\"x\"]\n{MINUTE}"
    ));
    assert!(problem_on_line(&text, 6).contains("no overrides"));
}

#[test]
fn the_version_follows_the_text() {
    let a = policies(&one_policy(MINUTE));
    let b = policies(&one_policy(MINUTE));
    let c = policies(&format!("# changed\n{}", one_policy(MINUTE)));
    assert_eq!(a.version(), b.version());
    assert_ne!(a.version(), c.version());
    assert_eq!(a.version().len(), 16);
    assert!(a.version().bytes().all(|b| b.is_ascii_hexdigit()));
}

// ---- matching ----

fn matching(condition: &str) -> PolicySet {
    policies(&one_policy(&format!("match = {condition}\n{MINUTE}")))
}

fn matches(set: &PolicySet, request: &Request) -> bool {
    !applied(set, request).is_empty()
}

#[test]
fn an_exact_path_matches_only_itself_however_it_is_spelt() {
    let set = matching("{ path = \"/login\" }");
    for path in ["/login", "/login/", "//login", "/x/../login", "/./login"] {
        assert!(matches(&set, &request("GET", path)), "{path}");
    }
    for path in ["/login/x", "/Login", "/logins", "/", "/x/login"] {
        assert!(!matches(&set, &request("GET", path)), "{path}");
    }
}

#[test]
fn a_double_star_matches_the_prefix_and_everything_below_it() {
    let set = matching("{ path = \"/api/**\" }");
    for path in ["/api", "/api/", "/api/v1", "/api/v1/users/42"] {
        assert!(matches(&set, &request("GET", path)), "{path}");
    }
    for path in ["/apix", "/", "/v1/api", "/ap"] {
        assert!(!matches(&set, &request("GET", path)), "{path}");
    }
    assert!(matches(
        &matching("{ path = \"/**\" }"),
        &request("GET", "/")
    ));
}

#[test]
fn a_star_matches_exactly_one_segment() {
    let set = matching("{ path = \"/users/*/avatar\" }");
    assert!(matches(&set, &request("GET", "/users/42/avatar")));
    assert!(!matches(&set, &request("GET", "/users/avatar")));
    assert!(!matches(&set, &request("GET", "/users/1/2/avatar")));
    assert!(!matches(&set, &request("GET", "/users/42/avatar/big")));
}

#[test]
fn any_of_several_paths_may_match() {
    let set = matching("{ path = [\"/a\", \"/b/**\"] }");
    assert!(matches(&set, &request("GET", "/a")));
    assert!(matches(&set, &request("GET", "/b/c")));
    assert!(!matches(&set, &request("GET", "/c")));
}

#[test]
fn methods_match_in_any_case_and_head_is_not_implied() {
    let set = matching("{ methods = [\"get\", \"Purge\"] }");
    assert!(matches(&set, &request("GET", "/")));
    assert!(matches(&set, &request("get", "/")));
    assert!(matches(&set, &request("PURGE", "/")));
    assert!(!matches(&set, &request("HEAD", "/")));
    assert!(!matches(&set, &request("POST", "/")));
    assert!(!matches(&set, &request("PURGEALL", "/")));
}

#[test]
fn a_host_matches_in_any_case_without_its_port() {
    let set = matching("{ host = \"API.example.com\" }");
    assert!(matches(&set, &request("GET", "/").host("api.example.com")));
    assert!(matches(
        &set,
        &request("GET", "/").host("Api.Example.com:8443")
    ));
    assert!(matches(&set, &request("GET", "/").host("api.example.com.")));
    assert!(!matches(&set, &request("GET", "/").host("www.example.com")));
    assert!(!matches(&set, &request("GET", "/")));
}

#[test]
fn a_star_host_matches_subdomains_but_not_the_domain() {
    let set = matching("{ host = \"*.example.com\" }");
    assert!(matches(&set, &request("GET", "/").host("a.example.com")));
    assert!(matches(&set, &request("GET", "/").host("a.b.EXAMPLE.com")));
    assert!(!matches(&set, &request("GET", "/").host("example.com")));
    assert!(!matches(&set, &request("GET", "/").host("badexample.com")));
}

#[test]
fn a_header_condition_checks_presence_or_the_exact_value() {
    let present = matching("{ header = { name = \"X-Tier\" } }");
    assert!(matches(
        &present,
        &request("GET", "/").header("x-tier", "anything")
    ));
    assert!(!matches(&present, &request("GET", "/")));
    let valued = matching("{ header = { name = \"x-tier\", value = \"gold\" } }");
    assert!(matches(
        &valued,
        &request("GET", "/").header("x-tier", "gold")
    ));
    assert!(!matches(
        &valued,
        &request("GET", "/").header("x-tier", "Gold")
    ));
    assert!(!matches(
        &valued,
        &request("GET", "/").header("x-tier", "gold ")
    ));
    assert!(!matches(&valued, &request("GET", "/")));
}

#[test]
fn each_policy_sees_its_own_header_however_many_headers_the_file_tests() {
    let text: String = (0..12)
        .flat_map(|i| {
            [
                format!("[[policy]]\nname = \"gold{i}\"\nmatch = {{ header = {{ name = \"x-h{i}\", value = \"gold\" }} }}\n{MINUTE}\n"),
                format!("[[policy]]\nname = \"any{i}\"\nmatch = {{ header = {{ name = \"x-h{i}\" }} }}\n{MINUTE}\n"),
            ]
        })
        .collect();
    let set = policies(&text);
    for i in 0..12 {
        let name: &'static str = Box::leak(format!("x-h{i}").into_boxed_str());
        let gold = request("GET", "/").header(name, "gold");
        assert_eq!(
            applied(&set, &gold),
            [format!("gold{i}"), format!("any{i}")]
        );
        let silver = request("GET", "/").header(name, "silver");
        assert_eq!(applied(&set, &silver), [format!("any{i}")]);
    }
}

#[test]
fn every_condition_of_a_match_must_hold() {
    let set = matching("{ path = \"/login\", methods = [\"POST\"], host = \"example.com\" }");
    let login = request("POST", "/login").host("example.com");
    assert!(matches(&set, &login));
    assert!(!matches(
        &set,
        &request("GET", "/login").host("example.com")
    ));
    assert!(!matches(&set, &request("POST", "/login").host("other.com")));
    assert!(!matches(
        &set,
        &request("POST", "/logout").host("example.com")
    ));
}

#[test]
fn a_policy_without_match_applies_to_every_request() {
    let set = policies(&one_policy(MINUTE));
    for (method, path) in [("GET", "/"), ("POST", "/login"), ("DELETE", "/a/b/c")] {
        assert!(matches(&set, &request(method, path)), "{method} {path}");
    }
}

#[test]
fn applicable_policies_come_in_file_order() {
    let text = format!(
        "[[policy]]\nname = \"second\"\nmatch = {{ path = \"/a\" }}\n{MINUTE}\n[[policy]]\nname = \"first\"\n{MINUTE}\n[[policy]]\nname = \"other\"\nmatch = {{ path = \"/b\" }}\n{MINUTE}\n"
    );
    let set = policies(&text);
    assert_eq!(applied(&set, &request("GET", "/a")), ["second", "first"]);
    assert_eq!(applied(&set, &request("GET", "/b")), ["first", "other"]);
}

// ---- keys ----

fn keyed(key: &str, on_missing: Option<&str>) -> PolicySet {
    let on_missing = on_missing.map_or(String::new(), |m| format!("on_missing = \"{m}\"\n"));
    policies(&one_policy(&format!("key = {key}\n{on_missing}{MINUTE}")))
}

#[test]
fn a_header_key_is_hashed_and_never_written_as_sent() {
    let set = keyed("[\"header:x-api-key\"]", None);
    let key = key_of(&set, &request("GET", "/").header("x-api-key", "key-123"));
    assert!(key.starts_with("h#"), "{key}");
    assert_eq!(key.len(), 2 + 32);
    assert!(!key.contains("key-123"));
    let other = key_of(&set, &request("GET", "/").header("x-api-key", "key-124"));
    assert_ne!(key, other);
    let again = key_of(&set, &request("GET", "/").header("x-api-key", "key-123"));
    assert_eq!(key, again);
}

#[test]
fn the_hash_key_changes_every_header_derived_key() {
    let text = one_policy(&format!("key = [\"header:x-api-key\"]\n{MINUTE}"));
    let default = PolicySet::parse(&text, "t").unwrap();
    let secret = PolicySet::parse_with_hash_key(&text, "t", HashKey::from_secret(b"s")).unwrap();
    let request = request("GET", "/").header("x-api-key", "key-123");
    assert_ne!(key_of(&default, &request), key_of(&secret, &request));
}

#[test]
fn an_absent_header_under_skip_leaves_the_policy_out() {
    let set = keyed("[\"header:x-api-key\"]", Some("skip"));
    assert!(
        set.evaluate(&request("GET", "/").view())
            .unwrap()
            .is_empty()
    );
}

#[test]
fn an_absent_header_under_deny_is_refused_naming_the_policy_and_the_header() {
    let set = keyed("[\"header:x-api-key\"]", Some("deny"));
    let rejection = set.evaluate(&request("GET", "/").view()).unwrap_err();
    assert_eq!(
        rejection,
        Rejection::MissingKeyPart {
            policy: "p".to_string(),
            header: "x-api-key".to_string()
        }
    );
    assert_eq!(
        rejection.to_string(),
        "policy \"p\" needs the x-api-key header, which the request lacks"
    );
}

#[test]
fn an_absent_header_under_client_ip_is_keyed_by_the_client() {
    for on_missing in [Some("client_ip"), None] {
        let set = keyed("[\"header:x-api-key\"]", on_missing);
        assert_eq!(key_of(&set, &request("GET", "/")), "ip=203.0.113.9");
    }
}

#[test]
fn an_empty_header_counts_as_absent() {
    let set = keyed("[\"header:x-api-key\"]", Some("skip"));
    let request = request("GET", "/").header("x-api-key", "  ");
    assert!(set.evaluate(&request.view()).unwrap().is_empty());
}

#[test]
fn an_over_long_header_is_refused_without_repeating_it() {
    let set = keyed("[\"header:x-api-key\"]", Some("skip"));
    let long = "s".repeat(MAX_HEADER_BYTES + 1);
    let rejection = set
        .evaluate(&request("GET", "/").header("x-api-key", long.clone()).view())
        .unwrap_err();
    assert!(
        matches!(rejection, Rejection::HeaderTooLong { .. }),
        "{rejection:?}"
    );
    let message = rejection.to_string();
    assert!(
        message.contains("policy \"p\"") && message.contains("x-api-key"),
        "{message}"
    );
    assert!(!message.contains("sss"), "{message}");
    let longest = "s".repeat(MAX_HEADER_BYTES);
    assert!(
        set.evaluate(&request("GET", "/").header("x-api-key", longest).view())
            .is_ok()
    );
}

#[test]
fn a_non_utf8_header_value_is_a_key_like_any_other() {
    let set = keyed("[\"header:x-api-key\"]", None);
    let a = key_of(
        &set,
        &request("GET", "/").header("x-api-key", b"\xff\xfe\x01".to_vec()),
    );
    let b = key_of(
        &set,
        &request("GET", "/").header("x-api-key", b"\xff\xfe\x02".to_vec()),
    );
    assert!(a.starts_with("h#"));
    assert_ne!(a, b);
}

#[test]
fn a_composite_key_joins_its_parts_in_order() {
    let set = keyed("[\"client_ip\", \"method\", \"path\", \"host\"]", None);
    let request = request("get", "/api//v1/").host("API.example.com:443");
    assert_eq!(
        key_of(&set, &request),
        "ip=203.0.113.9|m=GET|path=/api/v1|host=api.example.com"
    );
}

#[test]
fn an_ipv6_client_is_keyed_by_its_prefix() {
    let set = keyed("[\"client_ip\"]", None);
    let v6 = ClientKey::from_addr("2001:db8:1:2::7".parse::<IpAddr>().unwrap(), 64);
    assert_eq!(
        key_of(&set, &request("GET", "/").from(v6)),
        "ip=2001:db8:1:2::/64"
    );
}

#[test]
fn a_missing_host_follows_on_missing() {
    let set = keyed("[\"host\"]", Some("deny"));
    let rejection = set.evaluate(&request("GET", "/").view()).unwrap_err();
    assert!(
        rejection.to_string().contains("the host header"),
        "{rejection}"
    );
    let set = keyed("[\"host\"]", None);
    assert_eq!(key_of(&set, &request("GET", "/")), "ip=203.0.113.9");
}

#[test]
fn a_global_key_is_one_bucket_for_everyone() {
    let set = keyed("[\"global\"]", None);
    let a = key_of(&set, &request("GET", "/a"));
    let b = key_of(
        &set,
        &request("POST", "/b").from(ClientKey::V4(Ipv4Addr::LOCALHOST)),
    );
    assert_eq!(a, "global");
    assert_eq!(a, b);
}

/// A request as parts of a composite key see it.
#[derive(Debug, Clone)]
struct Parts {
    header: Option<Vec<u8>>,
    path: String,
    method: &'static str,
    host: String,
    client: [u8; 4],
}

fn parts() -> impl Strategy<Value = Parts> {
    (
        proptest::option::of(proptest::collection::vec(1u8..=255, 1..12)),
        "(/[a-c|={}#]{1,3}){0,3}",
        prop_oneof![Just("GET"), Just("get"), Just("POST"), Just("PUT")],
        "[a-cA-C|={}#]{1,6}",
        prop_oneof![Just([10, 0, 0, 1]), Just([10, 0, 0, 2])],
    )
        .prop_map(|(header, path, method, host, client)| Parts {
            header,
            path,
            method,
            host,
            client,
        })
}

impl Parts {
    fn request(&self) -> Request {
        let mut request = request(self.method, &self.path)
            .host(&self.host)
            .from(ClientKey::V4(Ipv4Addr::from(self.client)));
        if let Some(header) = &self.header {
            request = request.header("x-api-key", header.clone());
        }
        request
    }

    /// What the key is meant to distinguish: a header as sent (blank is absent, and then
    /// the client stands in), the path's segments, the method and host in any case.
    fn meaning(&self) -> (Option<Vec<u8>>, Vec<String>, String, String, [u8; 4]) {
        let header = self
            .header
            .as_ref()
            .map(|h| h.trim_ascii().to_vec())
            .filter(|h| !h.is_empty());
        let segments = self
            .path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        (
            header,
            segments,
            self.method.to_ascii_uppercase(),
            self.host.to_ascii_lowercase(),
            self.client,
        )
    }
}

proptest! {
    /// Two requests share a bucket exactly when every part of the key means the same.
    #[test]
    fn two_different_part_tuples_never_give_the_same_key(a in parts(), b in parts()) {
        let set = keyed("[\"header:x-api-key\", \"path\", \"method\", \"host\", \"client_ip\"]", None);
        let key_a = key_of(&set, &a.request());
        let key_b = key_of(&set, &b.request());
        prop_assert_eq!(key_a == key_b, a.meaning() == b.meaning(), "{} / {}", key_a, key_b);
        prop_assert!(!key_a.contains(['{', '}']), "{}", key_a);
    }

    /// Whatever a client sends, evaluation answers and never panics.
    #[test]
    fn any_request_is_answered(
        path in "\\PC{0,80}",
        method in "[A-Za-z]{0,8}",
        host in proptest::option::of("\\PC{0,40}"),
        header in proptest::collection::vec(any::<u8>(), 0..300),
        cost in proptest::collection::vec(any::<u8>(), 0..8),
    ) {
        let set = policies(EXAMPLE);
        let mut request = Request {
            method: Box::leak(method.into_boxed_str()),
            path,
            host,
            headers: Headers::default(),
            client: client(),
        };
        request = request.header("x-api-key", header).header("x-cost", cost);
        let _ = set.evaluate(&request.view());
    }
}

// ---- overrides ----

fn with_override(key: &str, keys: &str) -> PolicySet {
    policies(&one_policy(&format!(
        "key = {key}\n{MINUTE}\n[[policy.override]]\nkeys = {keys}\nlimits = [{{ name = \"minute\", rate = 1000, per = \"1m\" }}]"
    )))
}

fn rate_for(set: &PolicySet, request: &Request) -> u64 {
    set.evaluate(&request.view()).unwrap()[0].limits[0]
        .spec
        .rate
}

#[test]
fn an_override_applies_to_the_listed_keys_only() {
    let set = with_override("[\"header:x-api-key\"]", "[\"key-123\", \" key-456 \"]");
    let with = |key: &str| request("GET", "/").header("x-api-key", key);
    assert_eq!(rate_for(&set, &with("key-123")), 1000);
    assert_eq!(rate_for(&set, &with("key-456")), 1000);
    assert_eq!(rate_for(&set, &with("key-789")), 10);
    assert_eq!(
        rate_for(&set, &request("GET", "/")),
        10,
        "the client standing in"
    );
}

#[test]
fn an_override_on_a_composite_key_needs_every_part() {
    let set = with_override(
        "[\"header:x-api-key\", \"method\"]",
        "[[\"key-123\", \"post\"]]",
    );
    let post = request("POST", "/").header("x-api-key", "key-123");
    let get = request("GET", "/").header("x-api-key", "key-123");
    assert_eq!(rate_for(&set, &post), 1000);
    assert_eq!(rate_for(&set, &get), 10);
}

#[test]
fn an_override_can_name_clients_by_address_or_prefix() {
    let set = with_override("[\"client_ip\"]", "[\"10.0.0.5\", \"2001:db8:1:2::/64\"]");
    let internal = request("GET", "/").from(ClientKey::V4(Ipv4Addr::new(10, 0, 0, 5)));
    assert_eq!(rate_for(&set, &internal), 1000);
    let v6 = ClientKey::from_addr("2001:db8:1:2::99".parse::<IpAddr>().unwrap(), 64);
    assert_eq!(rate_for(&set, &request("GET", "/").from(v6)), 1000);
    assert_eq!(rate_for(&set, &request("GET", "/")), 10);
}

// ---- cost ----

fn costed(cost: &str) -> PolicySet {
    policies(&one_policy(&format!(
        "cost = {cost}\nlimits = [{{ name = \"m\", rate = 100, per = \"1m\" }}]"
    )))
}

fn cost_of(set: &PolicySet, request: &Request) -> Result<u64, Rejection> {
    set.evaluate(&request.view()).map(|found| found[0].cost)
}

#[test]
fn a_fixed_cost_is_charged_to_every_request() {
    assert_eq!(cost_of(&costed("3"), &request("GET", "/")), Ok(3));
    assert_eq!(
        cost_of(&policies(&one_policy(MINUTE)), &request("GET", "/")),
        Ok(1)
    );
}

#[test]
fn a_cost_header_is_charged_up_to_its_maximum_and_absent_means_one() {
    let set = costed("{ header = \"X-Cost\", max = 100 }");
    assert_eq!(cost_of(&set, &request("GET", "/")), Ok(1));
    assert_eq!(
        cost_of(&set, &request("GET", "/").header("x-cost", "7")),
        Ok(7)
    );
    assert_eq!(
        cost_of(&set, &request("GET", "/").header("x-cost", "100")),
        Ok(100)
    );
}

#[test]
fn a_cost_header_above_its_maximum_or_not_a_whole_number_is_refused() {
    let set = costed("{ header = \"x-cost\", max = 100 }");
    for bad in [
        "101",
        "0",
        "-1",
        "abc",
        "1.5",
        "",
        "1e2",
        "99999999999999999999999",
    ] {
        let rejection = cost_of(&set, &request("GET", "/").header("x-cost", bad)).unwrap_err();
        assert_eq!(
            rejection.to_string(),
            "policy \"p\": the x-cost header must be a whole number from 1 to 100",
            "{bad:?}"
        );
    }
}

// ---- mode ----

#[test]
fn a_shadow_policy_never_refuses_a_request() {
    let text = format!(
        "[[policy]]\nname = \"trial\"\nmode = \"shadow\"\nkey = [\"header:x-api-key\"]\non_missing = \"deny\"\n{MINUTE}\n[[policy]]\nname = \"enforced\"\n{MINUTE}\n"
    );
    let set = policies(&text);
    assert_eq!(applied(&set, &request("GET", "/")), ["enforced"]);
    let keyed = request("GET", "/").header("x-api-key", "k");
    assert_eq!(applied(&set, &keyed), ["trial", "enforced"]);
}

// ---- bucket keys ----

#[test]
fn a_bucket_key_names_prefix_and_policy_around_a_hash_tag_and_a_field_each_limit() {
    let set = policies(EXAMPLE);
    let request = request("GET", "/api/x").header("x-api-key", "key-789");
    let found = set.evaluate(&request.view()).unwrap();
    let api = &found[0];
    assert_eq!(
        api.policy.bucket_key(&api.key, "ratelimit"),
        format!("ratelimit:api:{{{}}}", api.key)
    );
    let fields: Vec<String> = api.limits.iter().map(Policy::bucket_field).collect();
    assert_eq!(fields, vec!["minute:100-60-100", "day:10000-86400-1000"]);
}

#[test]
fn an_overridden_limit_of_the_same_name_gets_its_own_buckets() {
    let set = policies(EXAMPLE);
    let plan = request("GET", "/api/x").header("x-api-key", "key-123");
    let found = set.evaluate(&plan.view()).unwrap();
    let field = Policy::bucket_field(&found[0].limits[0]);
    assert_eq!(field, "minute:1000-60-1000");
}

// ---- no policy file ----

#[test]
fn single_limits_get_and_head_of_the_limited_endpoint_by_client() {
    let spec = LimitSpec {
        rate: 10,
        window_s: 60,
        burst: 20,
    };
    let set = PolicySet::single(spec).unwrap();
    assert_eq!(set.version(), "default");
    assert_eq!(set.policies().len(), 1);
    let policy = &set.policies()[0];
    assert_eq!(&*policy.name, "default");
    assert_eq!(policy.mode, Mode::Enforce);
    assert_eq!(policy.limits().len(), 1);
    assert_eq!(&*policy.limits()[0].name, "default");
    assert_eq!(policy.limits()[0].spec, spec);
    for method in ["GET", "HEAD"] {
        let found = set
            .evaluate(&request(method, "/limited_endpoint").view())
            .unwrap();
        assert_eq!(found.len(), 1, "{method}");
        assert_eq!(found[0].key, format!("ip={}", client()));
        assert_eq!(found[0].cost, 1);
    }
    assert!(applied(&set, &request("POST", "/limited_endpoint")).is_empty());
    assert!(applied(&set, &request("GET", "/other")).is_empty());
    assert!(applied(&set, &request("GET", "/limited_endpoint/x")).is_empty());
}

#[test]
fn single_refuses_a_limit_that_cannot_be_built() {
    let zero = LimitSpec {
        rate: 0,
        window_s: 60,
        burst: 1,
    };
    assert_eq!(PolicySet::single(zero).unwrap_err(), LimitError::ZeroRate);
}

// ---- a decision asked for by name ----

fn values(values: &[&str]) -> Vec<String> {
    values.iter().map(|v| v.to_string()).collect()
}

fn lookup_error(set: &PolicySet, name: &str, key: Option<&[&str]>, cost: u64) -> String {
    let key = key.map(values);
    match set.applied_for(name, key.as_deref(), cost) {
        Err(error) => error.to_string(),
        Ok(applied) => panic!("{name} {key:?} {cost} should be refused: {applied:?}"),
    }
}

#[test]
fn a_named_key_is_the_bucket_a_request_with_that_value_is_charged_to() {
    let set = keyed("[\"header:x-api-key\", \"method\"]", None);
    let request = request("post", "/").header("x-api-key", "  key-123 ");
    let named = set
        .applied_for("p", Some(&values(&["key-123", "POST"])), 1)
        .unwrap();
    assert_eq!(named.key, key_of(&set, &request));
    assert_eq!(named.cost, 1);
    let by_ip = keyed("[\"client_ip\"]", None);
    let named = by_ip
        .applied_for("p", Some(&values(&["203.0.113.9"])), 0)
        .unwrap();
    assert_eq!(named.key, key_of(&by_ip, &request));
    assert_eq!(named.cost, 0);
}

#[test]
fn a_named_key_with_an_override_gets_the_overrides_limits() {
    let set = policies(&one_policy(&format!(
        "key = [\"header:x-api-key\"]\n{MINUTE}\n[[policy.override]]\nkeys = [\"gold\"]\nlimits = [{{ name = \"minute\", rate = 100, per = \"1m\" }}]"
    )));
    let gold = set.applied_for("p", Some(&values(&["gold"])), 1).unwrap();
    assert_eq!(gold.limits[0].spec.rate, 100);
    let plain = set.applied_for("p", Some(&values(&["silver"])), 1).unwrap();
    assert_eq!(plain.limits[0].spec.rate, 10);
    // The override's burst is the one a cost is held to.
    assert!(set.applied_for("p", Some(&values(&["gold"])), 100).is_ok());
    let message = lookup_error(&set, "p", Some(&["silver"]), 100);
    assert!(
        message.starts_with("cost: 100 is more than 10, the smallest burst of policy \"p\""),
        "{message}"
    );
}

#[test]
fn a_global_policy_takes_no_key_and_a_keyed_one_needs_one() {
    let global = keyed("[\"global\"]", None);
    assert_eq!(global.applied_for("p", None, 1).unwrap().key, "global");
    let message = lookup_error(&global, "p", Some(&["x"]), 1);
    assert!(
        message.starts_with("key: ") && message.contains("takes no key"),
        "{message}"
    );
    let pair = keyed("[\"header:x-api-key\", \"method\"]", None);
    assert_eq!(
        lookup_error(&pair, "p", None, 1),
        "key: policy \"p\" is keyed by header:x-api-key, method, so a key is needed: a list of 2 strings, one per part in this order"
    );
    assert_eq!(
        lookup_error(&keyed("[\"path\"]", None), "p", None, 1),
        "key: policy \"p\" is keyed by path, so a key is needed: a string"
    );
}

#[test]
fn a_bad_named_key_is_refused_naming_the_field_and_never_repeating_the_value() {
    let pair = keyed("[\"header:x-api-key\", \"method\"]", None);
    let message = lookup_error(&pair, "p", Some(&["secret-key-1"]), 1);
    assert!(
        message
            .starts_with("key: policy \"p\" is keyed by header:x-api-key, method: 1 values given"),
        "{message}"
    );
    assert!(!message.contains("secret-key-1"));
    let by_ip = keyed("[\"client_ip\"]", None);
    let message = lookup_error(&by_ip, "p", Some(&["not-an-address"]), 1);
    assert!(
        message.starts_with("key: ") && message.contains("IPv4"),
        "{message}"
    );
    assert!(!message.contains("not-an-address"));
}

#[test]
fn an_unknown_policy_is_named_only_when_its_name_could_be_one() {
    let set = keyed("[\"global\"]", None);
    assert_eq!(
        lookup_error(&set, "nope", None, 1),
        "policy: no active policy is named \"nope\"; GET /v1/policies lists them"
    );
    let message = lookup_error(&set, "<script>", None, 1);
    assert!(
        message.starts_with("policy: no active policy has that name"),
        "{message}"
    );
    assert!(!message.contains("script"));
}

#[test]
fn a_cost_up_to_the_smallest_burst_is_accepted_and_zero_is_a_read() {
    let set = policies(&one_policy(
        "limits = [{ name = \"minute\", rate = 10, per = \"1m\" }, { name = \"day\", rate = 100, per = \"1d\", burst = 5 }]",
    ));
    let ip = values(&["192.0.2.1"]);
    assert_eq!(set.applied_for("p", Some(&ip), 0).unwrap().cost, 0);
    assert_eq!(set.applied_for("p", Some(&ip), 5).unwrap().cost, 5);
    assert!(lookup_error(&set, "p", Some(&["192.0.2.1"]), 6).starts_with("cost: 6 is more than 5"));
    assert!(lookup_error(&set, "p", Some(&["192.0.2.1"]), u64::MAX).starts_with("cost: "));
}
