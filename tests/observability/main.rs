//! What operators look at, checked for real: the shipped Grafana dashboard and Prometheus
//! rules (`observability/`) against a real Prometheus scraping real instances while load
//! runs. Two instances follow a Sentinel group and one a Redis Cluster (the slot coverage
//! exists only there), all three with a policy file and `RLS_CONFIG`, so that every
//! family the dashboard reads has series. `promtool test rules` (scripts/test.sh) checks
//! when each alert fires; this checks that every expression finds what it names, and that
//! the gauges the alerts compare read what the instances are (ready, every slot served).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::{
    Origin, PolicyFile, PrometheusProcess, Record, RedisCluster, RlsClient, RlsFiles,
    SENTINEL_PASSWORD, SERVICE_PASSWORD, SERVICE_USER, SentinelCluster, TestApp, Traffic, client,
    repo_path, unique_prefix,
};

/// Two a second per client on `/limited_endpoint`, which the traffic (ten a second per
/// client) exceeds: some decisions are refusals.
const POLICIES: &str = r#"
[[policy]]
name = "per-client"
match = { path = "/limited_endpoint" }
key = ["client_ip"]
limits = [{ name = "second", rate = 2, per = "1s" }]
"#;

const RLS_RULES: &str = "
domain: edge
descriptors:
  - key: remote_address
    rate_limit:
      name: per-address
      unit: second
      requests_per_unit: 5
";

/// How long an expression may take to have series: scrapes and rule evaluations are a
/// second apart, and a recording rule that reads another one needs a round more.
const SERIES_WITHIN: Duration = Duration::from_secs(60);

/// The dashboard's variables, as Grafana would fill them with every job selected and a
/// time range of five minutes.
const VARIABLES: [(&str, &str); 3] = [
    ("$__rate_interval", "1m"),
    ("$__range", "5m"),
    ("$job", ".+"),
];

/// The instances, what they run on, and the files they read.
struct Stage {
    _sentinels: SentinelCluster,
    _redis_cluster: RedisCluster,
    /// Two instances in Sentinel mode, then one in Cluster mode.
    apps: Vec<TestApp>,
    _policies: PolicyFile,
    _rules: RlsFiles,
}

impl Stage {
    fn start(test: &str) -> Self {
        let sentinels = SentinelCluster::start(5000);
        let redis_cluster = RedisCluster::start(5000);
        let policies = PolicyFile::new(POLICIES);
        let rules = RlsFiles::new("edge.yaml", RLS_RULES);
        let prefix = unique_prefix(test);
        let common = |name: &str| {
            vec![
                ("REDIS_USERNAME", SERVICE_USER.to_string()),
                ("REDIS_PASSWORD", SERVICE_PASSWORD.to_string()),
                ("TRUSTED_PROXIES", "127.0.0.1".to_string()),
                ("KEY_PREFIX", prefix.clone()),
                ("POLICY_FILE", policies.path()),
                ("RLS_CONFIG", rules.folder()),
                ("GRPC_PORT", "0".to_string()),
                ("INSTANCE_NAME", name.to_string()),
            ]
        };
        let sentinel_mode = |name: &str| {
            let mut vars = common(name);
            vars.push(("SENTINEL_HOSTS", sentinels.sentinel_hosts()));
            vars.push(("SENTINEL_PASSWORD", SENTINEL_PASSWORD.to_string()));
            TestApp::spawn_with(&vars)
        };
        let mut cluster_vars = common("cluster-app");
        cluster_vars.push(("REDIS_CLUSTER_NODES", redis_cluster.seeds()));
        let apps = vec![
            sentinel_mode("app-1"),
            sentinel_mode("app-2"),
            TestApp::spawn_with(&cluster_vars),
        ];
        Self {
            _sentinels: sentinels,
            _redis_cluster: redis_cluster,
            apps,
            _policies: policies,
            _rules: rules,
        }
    }

    fn targets(&self) -> Vec<String> {
        self.apps
            .iter()
            .map(|app| format!("127.0.0.1:{}", app.port))
            .collect()
    }

    /// Ten clients, each a request every 100 ms, over every instance.
    fn traffic(&self) -> Traffic {
        let urls: Vec<String> = self
            .apps
            .iter()
            .map(|app| app.at("/limited_endpoint"))
            .collect();
        let clients = (0..10).map(|id| (id, Origin::Forwarded(format!("10.9.0.{}", id + 1))));
        Traffic::start(&urls, clients, Duration::from_millis(100))
    }

    /// `ShouldRateLimit` calls to every instance's rate-limit service, one every 50 ms,
    /// until `stop` or [`Traffic::LIMIT`].
    async fn rls_calls(&self, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
        let mut clients = Vec::new();
        for app in &self.apps {
            clients.push(RlsClient::connect(app.grpc()).await);
        }
        tokio::spawn(async move {
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Traffic::<Record>::LIMIT {
                for client in &mut clients {
                    client
                        .code_of("edge", &[("remote_address", "10.9.1.1")])
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    }
}

/// Every query of every panel of `observability/dashboard.json`, by panel title.
fn dashboard_queries() -> Vec<(String, String)> {
    let dashboard = dashboard();
    let mut queries = Vec::new();
    let mut panels: Vec<&Value> = dashboard["panels"].as_array().unwrap().iter().collect();
    while let Some(panel) = panels.pop() {
        if panel["type"] == "row" {
            panels.extend(panel["panels"].as_array().into_iter().flatten());
            continue;
        }
        let title = panel["title"].as_str().unwrap().to_string();
        let targets = panel["targets"].as_array().cloned().unwrap_or_default();
        assert!(!targets.is_empty(), "the panel {title:?} has no query");
        for target in targets {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("a query of the panel {title:?} has no expr: {target}"));
            queries.push((title.clone(), expr.to_string()));
        }
    }
    queries
}

fn dashboard() -> Value {
    let path = repo_path("observability/dashboard.json");
    let text = std::fs::read_to_string(&path).expect("observability/dashboard.json");
    serde_json::from_str(&text).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// `expr` with the dashboard's variables as Grafana fills them in.
fn filled_in(expr: &str) -> String {
    let mut filled = expr.to_string();
    for (variable, value) in VARIABLES {
        filled = filled.replace(variable, value);
    }
    let unknown = filled
        .match_indices('$')
        .any(|(at, _)| !filled[at + 1..].starts_with(|c: char| c.is_ascii_digit()));
    assert!(!unknown, "a variable the test does not fill in: {expr}");
    filled
}

/// `expr` with every comparison made a `bool` one: the series it compares, each 0 or 1,
/// instead of only those past the threshold. A healthy topology fires no alert, yet each
/// alert's series must exist, or the alert could never fire.
fn compared_as_bool(expr: &str) -> String {
    let mut out = String::new();
    let (mut braces, mut quoted) = (0, false);
    let mut chars = expr.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        match c {
            '"' => quoted = !quoted,
            '{' if !quoted => braces += 1,
            '}' if !quoted => braces -= 1,
            '>' | '<' | '=' | '!' if !quoted && braces == 0 => {
                if chars.peek() == Some(&'=') {
                    out.push(chars.next().unwrap());
                } else if c == '=' || c == '!' {
                    // A lone `=` or `!` is no comparison outside a selector.
                    continue;
                }
                out.push_str(" bool");
            }
            _ => {}
        }
    }
    out
}

/// Asks `expr` until it has series or [`SERIES_WITHIN`] passes from `since`.
async fn series_of(prometheus: &PrometheusProcess, expr: &str, since: Instant) -> Vec<Value> {
    loop {
        let series = prometheus
            .query(expr)
            .await
            .unwrap_or_else(|err| panic!("Prometheus rejects {expr}: {err}"));
        if !series.is_empty() || since.elapsed() > SERIES_WITHIN {
            return series;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_query_and_every_rule_expression_returns_series_while_load_runs() {
    let stage = Stage::start("observability");
    let prometheus = PrometheusProcess::start(&stage.targets());
    let traffic = stage.traffic();
    let stop_rls = Arc::new(AtomicBool::new(false));
    let rls = stage.rls_calls(stop_rls.clone()).await;
    let since = Instant::now();

    let mut empty = Vec::new();
    for (title, expr) in dashboard_queries() {
        let expr = filled_in(&expr);
        let found = series_of(&prometheus, &expr, since).await;
        println!(
            "FIGURES | panel {title:?} | {} series | {expr}",
            found.len()
        );
        if found.is_empty() {
            empty.push(format!("panel {title:?}: {expr}"));
        }
    }
    let rules = prometheus
        .rules()
        .await
        .expect("the rules Prometheus loaded");
    let alerts = rules.iter().filter(|rule| rule.kind == "alerting").count();
    assert!(
        alerts >= 8 && rules.len() > alerts,
        "Prometheus loaded {} rules, {alerts} of them alerts: {rules:?}",
        rules.len()
    );
    for rule in &rules {
        let expr = if rule.kind == "alerting" {
            compared_as_bool(&rule.query)
        } else {
            rule.query.clone()
        };
        let found = series_of(&prometheus, &expr, since).await;
        println!(
            "FIGURES | {} {} | {} series | {expr}",
            rule.kind,
            rule.name,
            found.len()
        );
        if found.is_empty() {
            empty.push(format!("{} {}: {expr}", rule.kind, rule.name));
        }
    }
    let rules = prometheus
        .rules()
        .await
        .expect("the rules Prometheus loaded");
    let failing: Vec<_> = rules
        .iter()
        .filter(|rule| rule.health != "ok" || !rule.last_error.is_empty())
        .collect();
    let targets = prometheus.targets().await.expect("the scrape targets");
    // What the alerts compare is what each instance is: ready, and every slot served.
    let values = |series: Vec<Value>| -> Vec<String> {
        series
            .iter()
            .map(|one| one["value"][1].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let ready = values(prometheus.query("ratelimit_ready").await.unwrap());
    let slots = values(
        prometheus
            .query("ratelimit_cluster_slots_served")
            .await
            .unwrap(),
    );

    stop_rls.store(true, Ordering::Relaxed);
    let _ = rls.await;
    let records = traffic.stop().await;
    assert!(
        records.iter().any(|record| record.status == 429),
        "the traffic met no refusal, so the refused share means little"
    );
    assert!(
        targets.iter().all(|(_, health)| health == "up"),
        "scrape targets: {targets:?}"
    );
    assert!(
        failing.is_empty(),
        "rules Prometheus could not evaluate: {failing:?}"
    );
    assert_eq!(ready, ["1", "1", "1"], "ratelimit_ready of each instance");
    assert_eq!(
        slots,
        ["16384"],
        "the Cluster-mode instance's slot coverage"
    );
    assert!(
        empty.is_empty(),
        "no series within {SERIES_WITHIN:?} for:\n{}",
        empty.join("\n")
    );
}

/// The names an expression or a rules file reads: metric names (`ratelimit_…`, `up`) and
/// recorded series (`level:metric:operations`); quoted text and comments are no names.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if line.trim_start().starts_with('#') {
            continue;
        }
        let unquoted: String = line.split('"').step_by(2).collect::<Vec<_>>().join(" ");
        for word in unquoted.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
            if word.starts_with("ratelimit_") || word.contains(':') && !word.ends_with(':') {
                names.insert(word.to_string());
            }
        }
    }
    names
}

/// The sample names of a `/metrics` text.
fn served_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_the_rules_name_is_one_the_instances_serve() {
    let stage = Stage::start("observability-names");
    let http = client();
    let mut served = BTreeSet::new();
    for app in &stage.apps {
        // A decision first: some families have series only once something is decided.
        http.get(app.at("/limited_endpoint")).send().await.unwrap();
        let text = testkit::metrics(&http, app).await;
        served.extend(served_names(&text));
    }
    let rules_text =
        std::fs::read_to_string(repo_path("observability/rules.yml")).expect("rules.yml");
    let recorded: BTreeSet<String> = rules_text
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- record:"))
        .map(|name| name.trim().to_string())
        .collect();
    assert!(!recorded.is_empty(), "rules.yml records nothing");

    let mut named = names_in(&rules_text);
    for (_, expr) in dashboard_queries() {
        named.extend(names_in(&expr));
    }
    for variable in dashboard()["templating"]["list"].as_array().unwrap() {
        named.extend(names_in(
            variable["definition"].as_str().unwrap_or_default(),
        ));
    }
    let unknown: Vec<&String> = named
        .iter()
        .filter(|name| !served.contains(*name) && !recorded.contains(*name))
        .collect();
    assert!(
        named.iter().any(|name| name.starts_with("ratelimit_")),
        "no metric name found in the dashboard or the rules: {named:?}"
    );
    assert!(
        unknown.is_empty(),
        "named in observability/ but neither served by /metrics nor recorded: {unknown:?}\nserved: {served:?}"
    );
}

#[test]
fn the_dashboard_asks_for_its_prometheus_data_source_and_every_query_uses_it() {
    let dashboard = dashboard();
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(
        variables.iter().any(|v| v["type"] == "datasource"
            && v["query"] == "prometheus"
            && v["name"] == "datasource"),
        "no Prometheus data-source variable named datasource: {variables:?}"
    );
    let text = serde_json::to_string(&dashboard["panels"]).unwrap();
    let uids: BTreeSet<&str> = text
        .match_indices("\"uid\":\"")
        .map(|(at, found)| {
            let rest = &text[at + found.len()..];
            &rest[..rest.find('"').unwrap()]
        })
        .collect();
    assert_eq!(
        uids,
        BTreeSet::from(["${datasource}"]),
        "panel data sources"
    );
}

#[test]
fn comparisons_become_bool_outside_selectors_and_strings() {
    assert_eq!(
        compared_as_bool(r#"up{job="a",x!="b"} == 0 and rate(x[5m]) > 3 * y"#),
        r#"up{job="a",x!="b"} == bool 0 and rate(x[5m]) > bool 3 * y"#
    );
    assert_eq!(compared_as_bool("a >= 1"), "a >= bool 1");
    assert_eq!(
        compared_as_bool(r#"label_replace(a, "d", "$1", "p", "x>(.*)")"#),
        r#"label_replace(a, "d", "$1", "p", "x>(.*)")"#
    );
}
