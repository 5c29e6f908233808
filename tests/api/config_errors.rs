//! Bad configuration stops the binary with exit code 2 and one line per problem.

use std::time::Duration;

use testkit::{RlsFiles, service_command, wait_for_exit};

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

/// Runs the binary with `vars`, which it must refuse at start: exit code 2, and a
/// message rather than a panic. What it wrote to stderr.
fn refused(vars: &[(&str, &str)]) -> String {
    let (code, stderr) = run_with(vars);
    assert_eq!(code, Some(2), "{vars:?}: {stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{vars:?}: {stderr}"
    );
    stderr
}

#[test]
fn several_problems_are_reported_together_one_per_line() {
    let stderr = refused(&[
        ("RATE_LIMIT", "x"),
        ("PORT", "99999"),
        ("FAIL_MODE", "maybe"),
    ]);
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
    for setting in ["PORT", "GRPC_PORT"] {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port().to_string();
        let (code, stderr) = run_with(&[(setting, &port)]);
        assert_eq!(code, Some(1), "{setting}: {stderr}");
        assert!(
            stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")),
            "{setting}: {stderr}"
        );
    }
}

#[test]
fn an_invalid_rls_config_exits_2_with_each_problem_and_its_line() {
    let files = RlsFiles::new(
        "edge.yaml",
        "domain: edge\ndescriptors:\n  - key: user\n    rate_limit: { unit: fortnight, requests_per_unit: 1 }\n  - key: org\n    rate_limit: { unit: second, requests_per_unit: 0 }\n",
    );
    let path = files.path("edge.yaml");
    let stderr = refused(&[("RLS_CONFIG", &path), ("GRPC_PORT", "0")]);
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
fn a_refused_setting_exits_2_naming_the_variable_and_why() {
    let example = testkit::repo_path("config/rls.example.yaml");
    let example = example.to_str().unwrap();
    let cases: [(&[(&str, &str)], &str); 8] = [
        (
            &[("RATE_LIMIT", "abc")],
            "RATE_LIMIT: expected a whole number from 1 to 1000000000, got \"abc\"",
        ),
        (
            &[("RATE_LIMIT", "0")],
            "RATE_LIMIT: expected a whole number from 1 to 1000000000, got \"0\"",
        ),
        (
            &[("TIME_WINDOW", "-1")],
            "TIME_WINDOW: expected a whole number from 1 to 31536000, got \"-1\"",
        ),
        (
            &[("TRUSTED_PROXIES", "10.0.0.0/8, 300.1.1.1/8")],
            "TRUSTED_PROXIES: expected comma-separated IP addresses or CIDRs, got \"300.1.1.1/8\"",
        ),
        (
            &[("RATELIMIT_HEADERS", "rfc")],
            "RATELIMIT_HEADERS: expected one of draft, legacy, both, none, got \"rfc\"",
        ),
        (
            &[
                ("REDIS_CLUSTER_NODES", "127.0.0.1:7000,127.0.0.1:7001"),
                ("SENTINEL_HOSTS", "127.0.0.1:26379"),
            ],
            "REDIS_CLUSTER_NODES and SENTINEL_HOSTS are both set",
        ),
        (
            &[("RLS_CONFIG", example)],
            "RLS_CONFIG: applies only with GRPC_PORT",
        ),
        (
            &[("RLS_CONFIG", "/nonexistent/rls"), ("GRPC_PORT", "0")],
            "RLS_CONFIG: /nonexistent/rls: cannot read",
        ),
    ];
    for (vars, says) in cases {
        let stderr = refused(vars);
        assert!(stderr.contains(says), "{vars:?}: {stderr}");
    }
}
