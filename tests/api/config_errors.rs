//! Bad configuration stops the binary with exit code 2 and one line per problem.

use std::time::Duration;

use testkit::{service_command, wait_for_exit};

fn run_with(vars: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut child = service_command(0, vars)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the binary");
    // Bad configuration must stop the process at once; a hang fails the test.
    if wait_for_exit(&mut child, Duration::from_secs(10)).is_none() {
        panic!("the binary did not exit with {vars:?}");
    }
    let output = child.wait_with_output().expect("collect output");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_non_numeric_rate_limit_exits_2_naming_the_variable_and_value() {
    let (code, stderr) = run_with(&[("RATE_LIMIT", "abc")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("RATE_LIMIT: expected a whole number from 1 to 1000000000, got \"abc\""),
        "{stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
}

#[test]
fn a_zero_rate_limit_exits_2() {
    let (code, stderr) = run_with(&[("RATE_LIMIT", "0")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("RATE_LIMIT") && stderr.contains("\"0\""),
        "{stderr}"
    );
}

#[test]
fn a_negative_time_window_exits_2() {
    let (code, stderr) = run_with(&[("TIME_WINDOW", "-1")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("TIME_WINDOW: expected a whole number from 1 to 31536000, got \"-1\""),
        "{stderr}"
    );
}

#[test]
fn an_unparsable_cidr_exits_2() {
    let (code, stderr) = run_with(&[("TRUSTED_PROXIES", "10.0.0.0/8, 300.1.1.1/8")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "TRUSTED_PROXIES: expected comma-separated IP addresses or CIDRs, got \"300.1.1.1/8\""
        ),
        "{stderr}"
    );
}

#[test]
fn an_unknown_header_mode_exits_2() {
    let (code, stderr) = run_with(&[("RATELIMIT_HEADERS", "rfc")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr
            .contains("RATELIMIT_HEADERS: expected one of draft, legacy, both, none, got \"rfc\""),
        "{stderr}"
    );
}

#[test]
fn several_problems_are_reported_together_one_per_line() {
    let (code, stderr) = run_with(&[
        ("RATE_LIMIT", "x"),
        ("PORT", "99999"),
        ("FAIL_MODE", "maybe"),
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    for expected in [
        "RATE_LIMIT: ",
        "PORT: expected a whole number from 0 to 65535, or off, got \"99999\"",
        "FAIL_MODE: expected one of local, open, closed, got \"maybe\"",
    ] {
        assert_eq!(
            stderr
                .lines()
                .filter(|line| line.starts_with(expected))
                .count(),
            1,
            "{expected} in {stderr}"
        );
    }
}

#[test]
fn a_port_in_use_exits_1_with_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let (code, stderr) = run_with(&[("PORT", &port)]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{stderr}"
    );
}

#[test]
fn redis_cluster_nodes_beside_sentinel_hosts_exits_2_naming_both() {
    let (code, stderr) = run_with(&[
        ("REDIS_CLUSTER_NODES", "127.0.0.1:7000,127.0.0.1:7001"),
        ("SENTINEL_HOSTS", "127.0.0.1:26379"),
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("REDIS_CLUSTER_NODES and SENTINEL_HOSTS are both set"),
        "{stderr}"
    );
}

#[test]
fn an_invalid_rls_config_exits_2_with_each_problem_and_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edge.yaml");
    std::fs::write(
        &path,
        "domain: edge\ndescriptors:\n  - key: user\n    rate_limit: { unit: fortnight, requests_per_unit: 1 }\n  - key: org\n    rate_limit: { unit: second, requests_per_unit: 0 }\n",
    )
    .unwrap();
    let path = path.display().to_string();
    let (code, stderr) = run_with(&[("RLS_CONFIG", &path), ("GRPC_PORT", "0")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{path}:4: rate_limit.unit: \"fortnight\" is not one of"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{path}:6: rate_limit.requests_per_unit: 0")),
        "{stderr}"
    );
}

#[test]
fn rls_config_without_grpc_port_exits_2_naming_both() {
    let example = testkit::repo_path("config/rls.example.yaml");
    let (code, stderr) = run_with(&[("RLS_CONFIG", example.to_str().unwrap())]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("RLS_CONFIG: applies only with GRPC_PORT"),
        "{stderr}"
    );
}

#[test]
fn an_rls_config_that_cannot_be_read_exits_2_naming_it() {
    let (code, stderr) = run_with(&[("RLS_CONFIG", "/nonexistent/rls"), ("GRPC_PORT", "0")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("RLS_CONFIG: /nonexistent/rls: cannot read"),
        "{stderr}"
    );
}

#[test]
fn a_grpc_port_in_use_exits_1_with_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let (code, stderr) = run_with(&[("GRPC_PORT", &port)]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{stderr}"
    );
}
