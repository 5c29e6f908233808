//! The settings' specification: defaults, every refusal and its message, the layering, and
//! that the README table and `config/default.toml` follow the declarations.

use super::*;
use crate::bucket::Limit;
use crate::store::redis::ConnectionMode;
use secrecy::ExposeSecret;

fn load(vars: &[(&str, &str)]) -> Result<Settings, SettingsError> {
    Settings::load_from(
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

fn problems(vars: &[(&str, &str)]) -> String {
    match load(vars) {
        Err(err) => err.to_string(),
        Ok(_) => panic!("{vars:?} should be rejected"),
    }
}

/// How the settings reach every data node, in a mode with Redis.
fn access(settings: &Settings) -> &NodeAccess {
    match &settings.store {
        StoreSettings::Redis { master, .. } | StoreSettings::Sentinel { master, .. } => {
            &master.access
        }
        StoreSettings::Cluster { access, .. } => access,
        StoreSettings::Memory => panic!("no Redis in memory mode"),
    }
}

/// The one limit of the default policy the settings built.
fn default_limit(settings: &Settings) -> Limit {
    settings.policies.policies()[0].limits()[0].limit
}

#[test]
fn the_defaults_are_ten_per_minute_in_memory() {
    let settings = load(&[]).unwrap();
    assert_eq!(default_limit(&settings), Limit::per(10, 60, 10).unwrap());
    assert!(matches!(settings.store, StoreSettings::Memory));
    assert_eq!(settings.port, Some(8000));
    assert_eq!(settings.fail_mode, FailMode::Local);
    assert_eq!(settings.headers, HeaderMode::Draft);
}

#[test]
fn environment_variables_override_the_defaults() {
    let settings = load(&[("RATE_LIMIT", "20"), ("TIME_WINDOW", "30"), ("BURST", "40")]).unwrap();
    assert_eq!(default_limit(&settings), Limit::per(20, 30, 40).unwrap());
}

#[test]
fn a_config_file_sits_between_defaults_and_environment() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("custom.toml");
    std::fs::write(&path, "rate_limit = 7\nport = 9000\n").unwrap();
    let path = path.to_str().unwrap();
    let settings = load(&[("CONFIG_FILE", path), ("PORT", "9100")]).unwrap();
    assert_eq!(default_limit(&settings).capacity(), 7);
    assert_eq!(settings.port, Some(9100));
}

#[test]
fn every_bad_value_is_named_with_what_it_got() {
    let message = problems(&[
        ("RATE_LIMIT", "abc"),
        ("TIME_WINDOW", "-1"),
        ("TRUSTED_PROXIES", "10.0.0.0/33"),
        ("RATELIMIT_HEADERS", "fancy"),
    ]);
    assert!(
        message.contains("RATE_LIMIT: expected a whole number from 1 to 1000000000, got \"abc\""),
        "{message}"
    );
    assert!(
        message.contains("TIME_WINDOW: expected a whole number from 1 to 31536000, got \"-1\""),
        "{message}"
    );
    assert!(
        message.contains(
            "TRUSTED_PROXIES: expected comma-separated IP addresses or CIDRs, got \"10.0.0.0/33\""
        ),
        "{message}"
    );
    assert!(
        message.contains(
            "RATELIMIT_HEADERS: expected one of draft, legacy, both, none, got \"fancy\""
        ),
        "{message}"
    );
    assert_eq!(message.lines().count(), 4, "{message}");
}

#[test]
fn a_zero_rate_is_rejected() {
    assert!(
        problems(&[("RATE_LIMIT", "0")]).contains("RATE_LIMIT: expected a whole number from 1")
    );
}

#[test]
fn a_limit_too_large_for_exact_arithmetic_names_the_three_settings() {
    let message = problems(&[
        ("RATE_LIMIT", "7"),
        ("TIME_WINDOW", "31536000"),
        ("BURST", "1000000"),
    ]);
    assert!(
        message.starts_with("RATE_LIMIT, TIME_WINDOW, BURST: burst × window is too large"),
        "{message}"
    );
}

#[test]
fn a_missing_config_file_is_named() {
    assert!(
        problems(&[("CONFIG_FILE", "/nonexistent.toml")]).contains("CONFIG_FILE: no such file")
    );
}

#[test]
fn redis_url_and_sentinel_hosts_exclude_each_other() {
    let message = problems(&[
        ("REDIS_URL", "redis://127.0.0.1:6379"),
        ("SENTINEL_HOSTS", "127.0.0.1:26379"),
    ]);
    assert!(message.contains("not both"), "{message}");
}

#[test]
fn sentinel_hosts_are_parsed_with_the_master_name() {
    let settings = load(&[
        ("SENTINEL_HOSTS", "s1:26379, 127.0.0.1:26380"),
        ("REDIS_MASTER", "mymaster"),
    ])
    .unwrap();
    let StoreSettings::Sentinel {
        hosts, master_name, ..
    } = settings.store
    else {
        panic!("not sentinel mode");
    };
    assert_eq!(
        hosts,
        vec![("s1".to_string(), 26379), ("127.0.0.1".to_string(), 26380)]
    );
    assert_eq!(master_name, "mymaster");
    assert!(problems(&[("SENTINEL_HOSTS", "s1")]).contains("SENTINEL_HOSTS: expected host:port"));
}

#[test]
fn the_sentinels_are_logged_in_to_as_the_configured_user_which_needs_a_password() {
    let settings = load(&[
        ("SENTINEL_HOSTS", "s1:26379"),
        ("SENTINEL_USERNAME", "ratelimiter"),
        ("SENTINEL_PASSWORD", "swordfish"),
    ])
    .unwrap();
    let StoreSettings::Sentinel {
        sentinel_access, ..
    } = settings.store
    else {
        panic!("not sentinel mode");
    };
    assert_eq!(sentinel_access.username.as_deref(), Some("ratelimiter"));
    let password = sentinel_access.password.as_ref().map(|p| p.expose_secret());
    assert_eq!(password, Some("swordfish"));
    let message = problems(&[
        ("SENTINEL_HOSTS", "s1:26379"),
        ("SENTINEL_USERNAME", "ratelimiter"),
    ]);
    assert!(
        message.contains("SENTINEL_USERNAME: a sentinel's ACL user logs in with a password"),
        "{message}"
    );
}

#[test]
fn data_nodes_limit_the_masters_a_sentinel_may_name_and_need_sentinels() {
    let settings = load(&[
        ("SENTINEL_HOSTS", "s1:26379"),
        ("REDIS_DATA_NODES", "redis-master:6379, 10.0.0.2:6380"),
    ])
    .unwrap();
    let StoreSettings::Sentinel { data_nodes, .. } = settings.store else {
        panic!("not sentinel mode");
    };
    assert_eq!(
        data_nodes,
        Some(vec![
            ("redis-master".to_string(), 6379),
            ("10.0.0.2".to_string(), 6380)
        ])
    );
    let message = problems(&[
        ("REDIS_URL", "redis://127.0.0.1:6379"),
        ("REDIS_DATA_NODES", "127.0.0.1:6379"),
    ]);
    assert!(
        message.contains("REDIS_DATA_NODES: applies only with SENTINEL_HOSTS"),
        "{message}"
    );
    let message = problems(&[
        ("SENTINEL_HOSTS", "s1:26379"),
        ("REDIS_DATA_NODES", "redis-master"),
    ]);
    assert!(
        message.contains("REDIS_DATA_NODES: expected host:port"),
        "{message}"
    );
}

#[test]
fn passwords_never_reach_the_logged_configuration() {
    let settings = load(&[
        ("REDIS_URL", "redis://:s3cret@127.0.0.1:6379"),
        ("REDIS_PASSWORD", "hunter2"),
        ("SENTINEL_PASSWORD", "swordfish"),
        ("ADMIN_TOKEN", "open-sesame"),
    ])
    .unwrap();
    let logged = settings.to_string();
    for secret in ["s3cret", "hunter2", "swordfish", "open-sesame"] {
        assert!(!logged.contains(secret), "{logged}");
    }
    assert!(
        logged.contains("REDIS_URL=redis://:***@127.0.0.1:6379"),
        "{logged}"
    );
    assert!(logged.contains("REDIS_PASSWORD=***"), "{logged}");
    assert!(logged.contains("ADMIN_TOKEN=***"), "{logged}");
}

#[test]
fn an_empty_admin_token_is_no_token() {
    assert!(load(&[]).unwrap().admin_token.is_none());
    assert!(load(&[("ADMIN_TOKEN", "")]).unwrap().admin_token.is_none());
    let settings = load(&[("ADMIN_TOKEN", "open-sesame")]).unwrap();
    let token = settings.admin_token.as_ref().map(|t| t.expose_secret());
    assert_eq!(token, Some("open-sesame"));
}

#[test]
fn a_secret_cannot_be_printed_by_accident() {
    let settings = load(&[
        ("REDIS_URL", "redis://:s3cret@127.0.0.1:6379"),
        ("REDIS_PASSWORD", "hunter2"),
    ])
    .unwrap();
    let debugged = format!("{:?}", access(&settings).password);
    assert!(!debugged.contains("hunter2"), "{debugged}");
    let debugged = format!("{:?}", settings.store);
    assert!(
        !debugged.contains("hunter2") && !debugged.contains("s3cret"),
        "{debugged}"
    );
}

#[test]
fn every_form_of_url_credentials_is_masked() {
    assert_eq!(
        mask_url("redis://secret@host:6379"),
        "redis://***@host:6379"
    );
    assert_eq!(
        mask_url("redis://user:secret@host:6379/0"),
        "redis://user:***@host:6379/0"
    );
    assert_eq!(mask_url("redis://:secret@host"), "redis://:***@host");
    assert_eq!(
        mask_url("redis+unix:///run/redis.sock?db=1&pass=secret"),
        "redis+unix:///run/redis.sock?db=1&pass=***"
    );
    assert_eq!(mask_url("redis://host:6379"), "redis://host:6379");
    assert_eq!(mask_url("redis://a@b:secret@host"), "redis://a@b:***@host");
    assert!(!mask_url("redis://p@ss@host").contains("ss"));
}

#[test]
fn a_bad_redis_url_is_named_without_its_password() {
    let message = problems(&[("REDIS_URL", "http://user:hunter2@host")]);
    assert!(message.starts_with("REDIS_URL: expected"), "{message}");
    assert!(!message.contains("hunter2"), "{message}");
}

#[test]
fn trusted_proxies_accept_addresses_and_networks() {
    let settings = load(&[("TRUSTED_PROXIES", "127.0.0.2, 10.0.0.0/8,::1")]).unwrap();
    let nets: Vec<String> = settings
        .identity
        .trusted_proxies()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(nets, vec!["127.0.0.2/32", "10.0.0.0/8", "::1/128"]);
}

#[test]
fn trusted_proxies_that_trust_everything_need_a_second_setting() {
    for everything in ["0.0.0.0/0", "10.0.0.1, ::/0", "0.0.0.0/0,::/0"] {
        let message = problems(&[("TRUSTED_PROXIES", everything)]);
        assert!(
            message.starts_with("TRUSTED_PROXIES: ")
                && message.contains("TRUSTED_PROXIES_ALLOW_ALL=on"),
            "{everything}: {message}"
        );
    }
    let settings = load(&[
        ("TRUSTED_PROXIES", "0.0.0.0/0"),
        ("TRUSTED_PROXIES_ALLOW_ALL", "on"),
    ])
    .unwrap();
    assert_eq!(settings.identity.trusted_proxies().len(), 1);
    assert!(load(&[("TRUSTED_PROXIES", "0.0.0.0/1")]).is_ok());
}

#[test]
fn unrelated_environment_variables_are_ignored() {
    assert!(load(&[("PATH", "/usr/bin"), ("HOME", "x")]).is_ok());
}

#[test]
fn an_empty_value_means_the_preset() {
    let settings = load(&[("PORT", ""), ("FAIL_MODE", " ")]).unwrap();
    assert_eq!(settings.port, Some(8000));
    assert_eq!(settings.fail_mode, FailMode::Local);
}

#[test]
fn every_word_setting_accepts_each_of_its_words_in_any_case() {
    for setting in declared::LAYERED {
        let Expect::Word(words) = setting.expects else {
            continue;
        };
        for word in words {
            let upper = word.to_ascii_uppercase();
            assert!(
                load(&[(setting.name, &upper)]).is_ok(),
                "{}={upper}",
                setting.name
            );
        }
    }
}

/// `config/default.toml` is the base layer; it must say exactly what the declarations do.
#[test]
fn the_default_file_holds_every_declared_setting_with_its_preset() {
    let file = Config::builder()
        .add_source(File::from_str(DEFAULTS, FileFormat::Toml))
        .build()
        .unwrap();
    let mut keys: Vec<String> = file
        .clone()
        .try_deserialize::<HashMap<String, config::Value>>()
        .unwrap()
        .into_keys()
        .map(|key| key.to_ascii_lowercase())
        .collect();
    keys.sort();
    let mut declared_keys: Vec<String> = declared::LAYERED
        .iter()
        .map(|s| s.key.to_string())
        .collect();
    declared_keys.sort();
    assert_eq!(keys, declared_keys, "config/default.toml's keys");
    for setting in declared::LAYERED {
        let in_file = file.get_string(setting.key).unwrap();
        let preset = match setting.preset {
            Preset::Value(value) => value,
            Preset::Unset(_) => "",
        };
        assert_eq!(
            in_file, preset,
            "config/default.toml: {} = {in_file:?}, but it is declared as {preset:?}",
            setting.key
        );
    }
}

/// The README's table of variables is rendered from the declarations; on a mismatch the
/// message is the table to paste.
#[test]
fn the_readme_documents_every_variable_as_declared() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let start = readme
        .find("| variable | default | meaning |")
        .expect("README.md has a table of variables");
    let table: String = readme[start..]
        .lines()
        .take_while(|line| line.starts_with('|'))
        .map(|line| format!("{line}\n"))
        .collect();
    let expected = declared::readme_table();
    assert!(
        table == expected,
        "README.md's table of variables differs from src/settings/declared.rs; it should read:\n{expected}"
    );
}

#[test]
fn redis_cluster_nodes_select_cluster_mode() {
    let settings = load(&[("REDIS_CLUSTER_NODES", "10.0.0.1:7000, [::1]:7001")]).unwrap();
    let StoreSettings::Cluster { nodes, .. } = settings.store else {
        panic!("not cluster mode");
    };
    assert_eq!(
        nodes,
        vec![("10.0.0.1".to_string(), 7000), ("::1".to_string(), 7001)]
    );
    assert!(
        problems(&[("REDIS_CLUSTER_NODES", "n1:7000,n2")])
            .contains("REDIS_CLUSTER_NODES: expected host:port,host:port,..., got \"n1:7000,n2\"")
    );
}

#[test]
fn redis_cluster_nodes_exclude_redis_url_and_sentinel_hosts_naming_the_conflict() {
    let with_url = problems(&[
        ("REDIS_CLUSTER_NODES", "127.0.0.1:7000"),
        ("REDIS_URL", "redis://127.0.0.1:6379"),
    ]);
    assert!(
        with_url.starts_with("REDIS_CLUSTER_NODES and REDIS_URL are both set"),
        "{with_url}"
    );
    let with_both = problems(&[
        ("REDIS_CLUSTER_NODES", "127.0.0.1:7000"),
        ("REDIS_URL", "redis://127.0.0.1:6379"),
        ("SENTINEL_HOSTS", "127.0.0.1:26379"),
    ]);
    assert!(
        with_both.starts_with("REDIS_CLUSTER_NODES and REDIS_URL and SENTINEL_HOSTS are both set"),
        "{with_both}"
    );
    assert_eq!(with_both.lines().count(), 1, "{with_both}");
}

#[test]
fn cluster_mode_refuses_the_pool_client_and_a_prefix_with_a_hash_tag() {
    let message = problems(&[
        ("REDIS_CLUSTER_NODES", "127.0.0.1:7000"),
        ("REDIS_CLIENT", "pool"),
        ("KEY_PREFIX", "rl{x}"),
    ]);
    assert!(
        message.contains("REDIS_CLIENT: pool does not apply with REDIS_CLUSTER_NODES"),
        "{message}"
    );
    assert!(
        message.contains("KEY_PREFIX: expected no braces with REDIS_CLUSTER_NODES"),
        "{message}"
    );
    assert!(load(&[("REDIS_CLIENT", "pool"), ("KEY_PREFIX", "rl{x}")]).is_ok());
}

#[test]
fn a_redis_username_is_the_user_every_data_node_is_logged_in_to_as() {
    let url = ("REDIS_URL", "redis://127.0.0.1:6379");
    assert_eq!(access(&load(&[url]).unwrap()).username, None);
    let settings = load(&[url, ("REDIS_USERNAME", "ratelimiter")]).unwrap();
    assert_eq!(access(&settings).username.as_deref(), Some("ratelimiter"));
    assert!(
        problems(&[("REDIS_USERNAME", "rate limiter")]).contains("REDIS_USERNAME: expected"),
        "a name with a space is refused, naming the variable"
    );
}

#[test]
fn every_setting_is_named_in_toml_as_in_the_environment_in_lower_case() {
    for setting in declared::all() {
        assert_eq!(setting.key, setting.name.to_ascii_lowercase());
    }
}

#[test]
fn a_redis_url_is_parsed_once_into_the_address_the_store_connects_to() {
    let settings = load(&[("REDIS_URL", "redis://:s3cret@10.0.0.1:6380/2")]).unwrap();
    let StoreSettings::Redis { url, .. } = &settings.store else {
        panic!("not one Redis server");
    };
    assert_eq!(
        url.addr(),
        &redis::ConnectionAddr::Tcp("10.0.0.1".to_string(), 6380)
    );
    assert_eq!(url.redis_settings().db(), 2);
}

#[test]
fn only_the_pool_client_has_a_pool_size_and_only_the_multiplexed_one_a_batch_cap() {
    let url = ("REDIS_URL", "redis://127.0.0.1:6379");
    let connections = |vars: &[(&str, &str)]| match load(vars).unwrap().store {
        StoreSettings::Redis { master, .. } | StoreSettings::Sentinel { master, .. } => {
            master.connections
        }
        _ => panic!("not a mode with one master"),
    };
    assert_eq!(
        connections(&[url]),
        ConnectionMode::Multiplexed { batch_max: 32 }
    );
    assert_eq!(
        connections(&[url, ("REDIS_BATCH_MAX", "1")]),
        ConnectionMode::Multiplexed { batch_max: 1 }
    );
    assert_eq!(
        connections(&[url, ("REDIS_CLIENT", "pool"), ("REDIS_BATCH_MAX", "8")]),
        ConnectionMode::Pool { size: 16 }
    );
    assert_eq!(
        connections(&[
            ("SENTINEL_HOSTS", "s1:26379"),
            ("REDIS_CLIENT", "pool"),
            ("REDIS_POOL_SIZE", "4")
        ]),
        ConnectionMode::Pool { size: 4 }
    );
}

#[test]
fn a_conflict_between_settings_is_reported_beside_a_bad_value() {
    let message = problems(&[
        ("PORT", "http"),
        ("REDIS_CLUSTER_NODES", "127.0.0.1:7000"),
        ("REDIS_CLIENT", "pool"),
    ]);
    assert!(message.contains("PORT: expected"), "{message}");
    assert!(
        message.contains("REDIS_CLIENT: pool does not apply with REDIS_CLUSTER_NODES"),
        "{message}"
    );
    assert_eq!(message.lines().count(), 2, "{message}");
}

#[test]
fn a_malformed_value_still_counts_as_given_when_modes_conflict() {
    let message = problems(&[
        ("REDIS_URL", "http://host"),
        ("SENTINEL_HOSTS", "127.0.0.1:26379"),
    ]);
    assert!(message.contains("REDIS_URL: expected"), "{message}");
    assert!(message.contains("not both"), "{message}");
}

#[test]
fn a_rule_does_not_judge_a_value_that_was_refused_on_its_own() {
    let message = problems(&[
        ("TRUSTED_PROXIES", "0.0.0.0/0"),
        ("TRUSTED_PROXIES_ALLOW_ALL", "maybe"),
    ]);
    assert!(
        message.starts_with("TRUSTED_PROXIES_ALLOW_ALL: expected one of on, off"),
        "{message}"
    );
    assert_eq!(message.lines().count(), 1, "{message}");
}

#[test]
fn the_policy_file_is_read_once_and_reloads_parse_it_the_same_way() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policies.toml");
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/policies.example.toml"
    ))
    .unwrap();
    std::fs::write(&path, &text).unwrap();
    let settings = load(&[
        ("POLICY_FILE", path.to_str().unwrap()),
        ("POLICY_POLL_MS", "250"),
        ("POLICY_KEY_SECRET", "shared"),
    ])
    .unwrap();
    let PolicySource::File { file, text: read } = &settings.policy_source else {
        panic!("no policy file");
    };
    assert_eq!(read, &text);
    assert_eq!(file.poll, Duration::from_millis(250));
    let reparsed = file.parse(read).unwrap();
    assert_eq!(reparsed.version(), settings.policies.version());
}

#[test]
fn the_grpc_front_is_off_unless_a_port_is_given() {
    let settings = load(&[]).unwrap();
    assert_eq!(settings.grpc_port, None);
    assert!(matches!(settings.rls_source, RlsSource::Empty));
    assert_eq!(settings.rules.domains().count(), 0);
    assert_eq!(
        load(&[("GRPC_PORT", "8051")]).unwrap().grpc_port,
        Some(8051)
    );
    assert_eq!(load(&[("GRPC_PORT", "0")]).unwrap().grpc_port, Some(0));
}

#[test]
fn a_grpc_port_that_is_the_http_port_is_refused() {
    let message = problems(&[("PORT", "8050"), ("GRPC_PORT", "8050")]);
    assert_eq!(
        message,
        "GRPC_PORT: expected a port other than PORT's, got \"8050\" for both"
    );
    // Both 0: two different free ports.
    assert!(load(&[("PORT", "0"), ("GRPC_PORT", "0")]).is_ok());
}

#[test]
fn rls_config_needs_a_grpc_port() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/rls.example.yaml");
    let message = problems(&[("RLS_CONFIG", example)]);
    assert!(
        message.starts_with("RLS_CONFIG: applies only with GRPC_PORT"),
        "{message}"
    );
}

#[test]
fn the_rls_config_is_read_once_and_reloads_parse_it_the_same_way() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/rls.example.yaml");
    let settings = load(&[
        ("RLS_CONFIG", example),
        ("GRPC_PORT", "0"),
        ("POLICY_POLL_MS", "250"),
    ])
    .unwrap();
    let RlsSource::Config { config, files } = &settings.rls_source else {
        panic!("no rls config");
    };
    assert_eq!(files.len(), 1);
    assert_eq!(config.poll, Duration::from_millis(250));
    assert!(settings.rules.domain("edge").is_some());
    assert_eq!(&config.read().unwrap(), files);
    let reparsed = config.parse(files).unwrap();
    assert_eq!(reparsed.version(), settings.rules.version());
}

#[test]
fn every_problem_of_an_rls_config_is_reported_with_its_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "domain: edge\ndescriptors:\n  - key: a\n    rate_limit: { unit: fortnight, requests_per_unit: 1 }\n  - key: b\n    quota_mode: true\n",
    )
    .unwrap();
    let message = problems(&[("RLS_CONFIG", path.to_str().unwrap()), ("GRPC_PORT", "0")]);
    let file = path.display().to_string();
    let lines: Vec<&str> = message.lines().collect();
    assert_eq!(lines.len(), 2, "{message}");
    assert!(
        lines[0].starts_with(&format!("{file}:4: rate_limit.unit")),
        "{message}"
    );
    assert!(
        lines[1].starts_with(&format!("{file}:6: quota_mode")),
        "{message}"
    );
    let missing = problems(&[("RLS_CONFIG", "/nonexistent/rls"), ("GRPC_PORT", "0")]);
    assert!(
        missing.starts_with("RLS_CONFIG: /nonexistent/rls: cannot read"),
        "{missing}"
    );
}

#[test]
fn a_unix_socket_is_served_beside_the_port_or_alone() {
    let beside = load(&[("UNIX_SOCKET", "/run/ratelimiter/app-1.sock")]).unwrap();
    assert_eq!(beside.port, Some(8000));
    assert_eq!(
        beside.unix_socket,
        Some(UnixSocket {
            path: "/run/ratelimiter/app-1.sock".into(),
            mode: 0o660,
        })
    );
    let alone = load(&[
        ("UNIX_SOCKET", "/run/ratelimiter/app-1.sock"),
        ("UNIX_SOCKET_MODE", "0600"),
        ("PORT", "OFF"),
    ])
    .unwrap();
    assert_eq!(alone.port, None);
    assert_eq!(alone.unix_socket.map(|socket| socket.mode), Some(0o600));
}

#[test]
fn port_off_without_a_socket_is_refused_for_leaving_nothing_to_listen_on() {
    let message = problems(&[("PORT", "off")]);
    assert!(
        message.contains("PORT: off leaves nothing to listen on without UNIX_SOCKET"),
        "{message}"
    );
    let bad_port = problems(&[("PORT", "eighty")]);
    assert!(
        bad_port.contains("PORT: expected a whole number from 0 to 65535, or off, got \"eighty\""),
        "{bad_port}"
    );
}

#[test]
fn a_socket_path_too_long_to_bind_and_a_mode_that_is_not_octal_are_named() {
    let long = format!("/tmp/{}.sock", "s".repeat(110));
    let message = problems(&[("UNIX_SOCKET", &long), ("UNIX_SOCKET_MODE", "rw-rw----")]);
    assert!(
        message.contains("UNIX_SOCKET: expected a file path of at most 107 bytes"),
        "{message}"
    );
    assert!(
        message.contains(
            "UNIX_SOCKET_MODE: expected permission bits in octal, such as 660, got \"rw-rw----\""
        ),
        "{message}"
    );
    assert!(problems(&[("UNIX_SOCKET_MODE", "1777")]).contains("UNIX_SOCKET_MODE"));
}
