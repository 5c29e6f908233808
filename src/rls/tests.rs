//! The YAML format, rule matching and a request's resolution.

use super::*;

const EDGE: &str = "\
domain: edge
descriptors:
  - key: remote_address
    rate_limit:
      unit: minute
      requests_per_unit: 100
  - key: api_key
    value: premium-*
    shadow_mode: true
    rate_limit: { name: premium, unit: second, requests_per_unit: 50 }
  - key: api_key
    value: premium-gold-*
    rate_limit: { name: gold, unit: second, requests_per_unit: 500 }
  - key: api_key
    value: premium-gold-vip
    rate_limit: { unit: hour, requests_per_unit: 7 }
  - key: api_key
    rate_limit: { unit: day, requests_per_unit: 10 }
  - key: path
    value: /health
  - key: tenant
    descriptors:
      - key: user
        rate_limit:
          unit: week
          requests_per_unit: 1000
          replaces:
            - name: premium
  - key: internal
    rate_limit: { unlimited: true }
";

fn rules(files: &[(&str, &str)]) -> RuleSet {
    RuleSet::parse(files, HashKey::default()).unwrap_or_else(|err| panic!("{err}"))
}

fn edge() -> RuleSet {
    rules(&[("edge.yaml", EDGE)])
}

/// Every problem of `text`, as `file:line: message`.
fn problems(text: &str) -> Vec<String> {
    match RuleSet::parse(&[("bad.yaml", text)], HashKey::default()) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(RlsConfigError::Invalid { problems }) => {
            problems.iter().map(ToString::to_string).collect()
        }
        Err(other) => panic!("{other}"),
    }
}

fn descriptor<'a>(entries: &[(&'a str, &'a str)]) -> DescriptorView<'a> {
    DescriptorView {
        entries: entries.to_vec(),
        ..DescriptorView::default()
    }
}

fn request<'a>(domain: &'a str, descriptors: Vec<DescriptorView<'a>>) -> RlsRequest<'a> {
    RlsRequest {
        domain,
        descriptors,
        hits_addend: 0,
    }
}

/// What `set` makes of a request in `domain` of `descriptors`, a request of a valid shape.
fn resolved<'s>(
    set: &'s RuleSet,
    domain: &str,
    descriptors: Vec<DescriptorView<'_>>,
) -> Resolution<'s> {
    set.resolve(&request(domain, descriptors)).unwrap()
}

/// What `set` makes of a request in domain `edge` of one descriptor of `entries`.
fn resolve_one<'s>(set: &'s RuleSet, entries: &[(&str, &str)]) -> Resolution<'s> {
    resolved(set, "edge", vec![descriptor(entries)])
}

/// The rule one descriptor of `entries` resolves to: its label, or what it came to.
fn matched(set: &RuleSet, entries: &[(&str, &str)]) -> String {
    match &resolve_one(set, entries).descriptors[0] {
        Resolved::Unmatched(why) => format!("({})", why.as_str()),
        Resolved::Unlimited(rule) => format!("unlimited {}", rule.label),
        Resolved::Charged(charged) => match &charged.source {
            LimitSource::Rule(rule) => rule.label.to_string(),
            LimitSource::Override(_) => "(override)".to_string(),
        },
    }
}

fn charged<'r>(resolved: &'r Resolved<'r>) -> &'r Charged<'r> {
    match resolved {
        Resolved::Charged(charged) => charged,
        other => panic!("not charged: {other:?}"),
    }
}

#[test]
fn every_field_of_a_rule_is_read() {
    let set = edge();
    let domain = set.domain("edge").unwrap();
    assert_eq!(&*domain.file, "edge.yaml");
    assert_eq!(&*domain.label, "rls:edge");
    let mut rules = domain.rules();
    rules.sort_by_key(|rule| rule.line);
    let premium = rules.iter().find(|rule| &*rule.name == "premium").unwrap();
    assert!(premium.shadow);
    assert_eq!(premium.line, 10);
    assert_eq!(&*premium.file, "edge.yaml");
    let RuleLimit::Limited(limit) = &premium.limit else {
        panic!("premium is limited");
    };
    assert_eq!((limit.requests_per_unit, limit.unit), (50, Unit::Second));
    assert_eq!(limit.bucket.limit.capacity(), 50);
    assert_eq!(&*limit.bucket.field, "rule:50-1-50");
    let user = rules
        .iter()
        .find(|rule| &*rule.label == "tenant.user")
        .unwrap();
    assert_eq!(&*user.name, "", "an unnamed rule states no name");
    assert_eq!(user.replaces, vec![Arc::from("premium")]);
    let RuleLimit::Limited(weekly) = &user.limit else {
        panic!("user is limited");
    };
    assert_eq!(weekly.bucket.limit.window_secs(), 7 * 86_400);
    let internal = rules
        .iter()
        .find(|rule| &*rule.label == "internal")
        .unwrap();
    assert!(matches!(internal.limit, RuleLimit::Unlimited));
    assert_eq!(rules.len(), 7);
}

#[test]
fn a_rule_lists_the_entries_that_lead_to_it_as_written() {
    let set = edge();
    let mut rules = set.domain("edge").unwrap().rules();
    rules.sort_by_key(|rule| rule.line);
    let paths: Vec<Vec<String>> = rules.iter().map(|rule| rule.descriptor.clone()).collect();
    assert_eq!(
        paths,
        [
            vec!["remote_address"],
            vec!["api_key=premium-*"],
            vec!["api_key=premium-gold-*"],
            vec!["api_key=premium-gold-vip"],
            vec!["api_key"],
            vec!["tenant", "user"],
            vec!["internal"],
        ]
        .map(|path| path.into_iter().map(String::from).collect::<Vec<_>>())
    );
}

#[test]
fn the_empty_set_knows_no_domain_and_answers_every_descriptor_unmatched() {
    let set = RuleSet::empty(HashKey::default());
    assert_eq!(set.domains().count(), 0);
    let resolution = resolve_one(&set, &[("remote_address", "a")]);
    assert!(resolution.domain.is_none());
    assert!(matches!(
        resolution.descriptors[0],
        Resolved::Unmatched(Unmatched::UnknownDomain)
    ));
}

#[test]
fn every_unit_of_envoys_format_is_read_in_any_case() {
    for (unit, seconds) in [
        ("second", 1),
        ("MINUTE", 60),
        ("Hour", 3_600),
        ("day", 86_400),
        ("week", 604_800),
        ("month", 2_592_000),
        ("year", 31_536_000),
    ] {
        let text = format!(
            "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {{ unit: {unit}, requests_per_unit: 1 }}\n"
        );
        let set = rules(&[("d.yaml", &text)]);
        let rule = set.domain("d").unwrap().rules()[0];
        let RuleLimit::Limited(limit) = &rule.limit else {
            panic!("limited");
        };
        assert_eq!(limit.unit.seconds(), seconds, "{unit}");
    }
}

/// `key=value` entries, separated by commas.
fn entries(text: &str) -> Vec<(&str, &str)> {
    text.split(',')
        .filter(|entry| !entry.is_empty())
        .map(|entry| entry.split_once('=').expect("key=value"))
        .collect()
}

#[test]
fn a_descriptor_matches_its_most_specific_rule_at_its_full_depth_or_none() {
    let set = edge();
    for (descriptor, rule) in [
        // An exact value beats a prefix, a longer prefix a shorter one, a prefix the key alone.
        ("api_key=premium-gold-vip", "api_key"),
        ("api_key=premium-gold-1", "gold"),
        ("api_key=premium-x", "premium"),
        ("api_key=basic", "api_key"),
        // A value without a rule, or whose rule has no rate limit, is never limited.
        ("path=/health", "(no_rule)"),
        ("path=/other", "(no_rule)"),
        ("internal=x", "unlimited internal"),
        // Several entries match only at their rule's full depth.
        ("tenant=a,user=b", "tenant.user"),
        ("tenant=a", "(no_rule)"),
        ("tenant=a,user=b,more=c", "(no_rule)"),
        ("remote_address=10.0.0.1,user=b", "(no_rule)"),
        ("", "(no_rule)"),
    ] {
        assert_eq!(matched(&set, &entries(descriptor)), rule, "{descriptor:?}");
    }
}

#[test]
fn an_unnamed_exact_rule_is_told_apart_from_the_key_alone_by_its_limit() {
    let set = edge();
    let resolution = resolve_one(&set, &[("api_key", "premium-gold-vip")]);
    assert_eq!(charged(&resolution.descriptors[0]).limit().unit, Unit::Hour);
}

#[test]
fn a_more_specific_rule_that_leads_nowhere_is_not_backtracked() {
    let text = "\
domain: edge
descriptors:
  - key: a
    value: one
    descriptors:
      - key: b
        value: x
        rate_limit: { unit: second, requests_per_unit: 1 }
  - key: a
    descriptors:
      - key: b
        rate_limit: { unit: second, requests_per_unit: 2 }
";
    let set = rules(&[("edge.yaml", text)]);
    assert_eq!(matched(&set, &[("a", "one"), ("b", "x")]), "a.b");
    assert_eq!(matched(&set, &[("a", "one"), ("b", "y")]), "(no_rule)");
    assert_eq!(matched(&set, &[("a", "two"), ("b", "y")]), "a.b");
}

#[test]
fn a_rule_named_in_another_matched_rules_replaces_is_not_charged() {
    let set = edge();
    let resolution = resolved(
        &set,
        "edge",
        vec![
            descriptor(&[("api_key", "premium-1")]),
            descriptor(&[("tenant", "t"), ("user", "u")]),
        ],
    );
    assert!(matches!(
        resolution.descriptors[0],
        Resolved::Unmatched(Unmatched::Replaced)
    ));
    assert!(matches!(resolution.descriptors[1], Resolved::Charged(_)));
}

#[test]
fn an_unknown_domain_leaves_every_descriptor_unmatched() {
    let set = edge();
    let unknown = vec![descriptor(&[("remote_address", "a")]); 2];
    let resolution = resolved(&set, "nowhere", unknown);
    assert!(resolution.domain.is_none());
    assert_eq!(resolution.descriptors.len(), 2);
    assert!(
        resolution
            .descriptors
            .iter()
            .all(|r| matches!(r, Resolved::Unmatched(Unmatched::UnknownDomain)))
    );
}

#[test]
fn hits_come_from_the_descriptor_else_the_request_where_0_means_1() {
    let set = edge();
    let one = descriptor(&[("remote_address", "a")]);
    let own = DescriptorView {
        hits_addend: Some(0),
        ..one.clone()
    };
    let mut asked = request("edge", vec![one.clone(), own]);
    let resolution = set.resolve(&asked).unwrap();
    assert_eq!(charged(&resolution.descriptors[0]).cost, 1);
    assert_eq!(charged(&resolution.descriptors[1]).cost, 0, "0 only reads");
    asked.hits_addend = 5;
    let resolution = set.resolve(&asked).unwrap();
    assert_eq!(charged(&resolution.descriptors[0]).cost, 5);
    assert_eq!(charged(&resolution.descriptors[1]).cost, 0);
}

#[test]
fn hits_above_the_capacity_are_marked_so() {
    let set = edge();
    let many = DescriptorView {
        hits_addend: Some(101),
        ..descriptor(&[("remote_address", "a")])
    };
    let resolution = set.resolve(&request("edge", vec![many])).unwrap();
    assert!(charged(&resolution.descriptors[0]).exceeds_capacity());
}

#[test]
fn a_limit_override_applies_with_a_bucket_of_its_own_numbers() {
    let set = edge();
    let overridden = DescriptorView {
        limit: Some(LimitOverride {
            requests_per_unit: 3,
            unit: Some(Unit::Minute),
        }),
        // Even where no rule matches, as envoyproxy/ratelimit does.
        ..descriptor(&[("unconfigured", "x")])
    };
    let resolution = set.resolve(&request("edge", vec![overridden])).unwrap();
    let charged = charged(&resolution.descriptors[0]);
    assert_eq!(charged.name(), "");
    assert!(!charged.shadow());
    assert_eq!(&*charged.limit().bucket.field, "override:3-60-3");
    let bad = DescriptorView {
        limit: Some(LimitOverride {
            requests_per_unit: 0,
            unit: Some(Unit::Minute),
        }),
        ..descriptor(&[("remote_address", "x")])
    };
    assert!(matches!(
        set.resolve(&request("edge", vec![bad])),
        Err(Refusal::BadOverride { index: 0, .. })
    ));
}

#[test]
fn bucket_keys_keep_plain_values_and_hash_the_others() {
    let set = edge();
    let domain = set.domain("edge").unwrap();
    let long = "v".repeat(300);
    let resolution = set
        .resolve(&request(
            "edge",
            vec![
                descriptor(&[("tenant", "acme"), ("user", "ann")]),
                descriptor(&[("tenant", "a|b"), ("user", &long)]),
            ],
        ))
        .unwrap();
    let plain = charged(&resolution.descriptors[0]);
    assert_eq!(
        domain.bucket_key(&plain.entries, "rl"),
        "rl:rls:edge:{tenant=acme|user=ann}"
    );
    let hashed = &charged(&resolution.descriptors[1]).entries;
    let parts: Vec<&str> = hashed.split('|').collect();
    assert_eq!(parts.len(), 2, "{hashed}");
    assert!(parts[0].starts_with("tenant#") && parts[1].starts_with("user#"));
    assert!(!hashed.contains(['{', '}']));
}

#[test]
fn two_different_lists_of_entries_never_share_a_key() {
    let set = edge();
    let keys: Vec<String> = [
        vec![("a", "b|c")],
        vec![("a", "b"), ("c", "")],
        vec![("a=b", "c")],
        vec![("a", "b=c")],
        vec![("a", "")],
        vec![("", "a")],
        vec![("a", "B")],
    ]
    .iter()
    .map(|entries| set.encode_entries(entries))
    .collect();
    let distinct: HashSet<&String> = keys.iter().collect();
    assert_eq!(distinct.len(), keys.len(), "{keys:?}");
}

#[test]
fn a_domain_that_is_not_plain_is_hashed_into_its_keys() {
    let set = rules(&[(
        "d.yaml",
        "domain: \"a{b}\"\ndescriptors:\n  - key: k\n    rate_limit: { unit: second, requests_per_unit: 1 }\n",
    )]);
    let key = set.domain("a{b}").unwrap().bucket_key("k=v", "rl");
    assert!(key.starts_with("rl:rls:#"), "{key}");
    assert_eq!(key.matches('{').count(), 1, "{key}");
}

#[test]
fn the_shape_of_a_request_is_checked_before_its_domain() {
    let set = edge();
    let one = || vec![descriptor(&[("remote_address", "a")])];
    assert_eq!(
        set.resolve(&request("", one())).unwrap_err(),
        Refusal::EmptyDomain
    );
    assert_eq!(
        set.resolve(&request("nowhere", vec![])).unwrap_err(),
        Refusal::NoDescriptors
    );
    let many = vec![descriptor(&[("remote_address", "a")]); MAX_DESCRIPTORS + 1];
    assert!(matches!(
        set.resolve(&request("nowhere", many)),
        Err(Refusal::TooManyDescriptors { .. })
    ));
    let entries = vec![("k", "v"); MAX_ENTRIES + 1];
    assert!(matches!(
        set.resolve(&request("edge", vec![descriptor(&entries)])),
        Err(Refusal::TooManyEntries { index: 0, .. })
    ));
    let huge = "x".repeat(MAX_ENTRY_BYTES + 1);
    assert!(matches!(
        set.resolve(&request("edge", vec![descriptor(&[("k", &huge)])])),
        Err(Refusal::EntryTooLong { index: 0, .. })
    ));
}

#[test]
fn hits_given_back_are_charged_to_the_descriptors_bucket_as_a_give_back() {
    let set = edge();
    let refund = |entries| DescriptorView {
        negative_hits: true,
        hits_addend: Some(3),
        ..descriptor(entries)
    };
    let resolution = set
        .resolve(&request(
            "edge",
            vec![
                refund(&[("remote_address", "a")]),
                descriptor(&[("remote_address", "a")]),
                refund(&[("path", "/health")]),
            ],
        ))
        .unwrap();
    let given = charged(&resolution.descriptors[0]);
    let taken = charged(&resolution.descriptors[1]);
    assert!(given.gives_back);
    assert!(!taken.gives_back);
    assert_eq!((given.cost, taken.cost), (3, 1));
    assert_eq!(given.entries, taken.entries, "the same bucket");
    // Nothing to give back to where nothing is counted.
    assert!(matches!(
        resolution.descriptors[2],
        Resolved::Unmatched(Unmatched::NoRule)
    ));
}

#[test]
fn unsupported_parts_of_the_format_are_refused_with_file_and_line() {
    let text = "\
domain: edge
descriptors:
  - key: a
    detailed_metric: true
    rate_limit: { unit: second, requests_per_unit: 1 }
  - key: b
    quota_mode: true
    value_to_metric: true
    share_threshold: true
    metadata: { x: 1 }
    rate_limit: { unit: second, requests_per_unit: 1 }
  - key: c
    value: a*b
    shadow_mode: true
  - key: d
    rate_limit: { unit: fortnight, requests_per_unit: 0, colour: red }
  - key: e
    rate_limit: { unlimited: true, unit: second }
";
    assert_eq!(
        problems(text),
        [
            "bad.yaml:4: detailed_metric: not supported: per-value metrics are not kept (labels stay bounded); name the rule for a series of its own",
            "bad.yaml:7: quota_mode: not supported: quota mode is not supported",
            "bad.yaml:8: value_to_metric: not supported: descriptor values never become metric labels; name the rule for a series of its own",
            "bad.yaml:9: share_threshold: not supported: every value a prefix matches has a bucket of its own; sharing one is not supported",
            "bad.yaml:10: metadata: not supported: responses carry no dynamic metadata",
            "bad.yaml:13: value \"a*b\": only a trailing * (every value with that prefix) is supported",
            "bad.yaml:14: shadow_mode: this descriptor has no rate_limit for it to apply to",
            "bad.yaml:16: rate_limit: unknown field \"colour\"; expected one of requests_per_unit, unit, unlimited, name, replaces",
            "bad.yaml:16: rate_limit.unit: \"fortnight\" is not one of second, minute, hour, day, week, month, year",
            "bad.yaml:16: rate_limit.requests_per_unit: 0 (refuse every request) is not supported; at least 1",
            "bad.yaml:18: rate_limit.unit: an unlimited rate_limit takes no unit",
        ]
    );
}

#[test]
fn structural_mistakes_are_reported_with_their_lines() {
    let text = "\
domain: edge
colour: blue
descriptors:
  - value: x
  - key: a
    value: v
    rate_limit: { unit: second, requests_per_unit: 1 }
  - key: a
    value: v
  - key: b
    rate_limit:
      name: own
      unit: second
      requests_per_unit: many
      replaces: [{ name: own }]
";
    assert_eq!(
        problems(text),
        [
            "bad.yaml:2: the file: unknown field \"colour\"; expected one of domain, descriptors",
            "bad.yaml:4: key: missing; every descriptor has one",
            "bad.yaml:8: descriptor key \"a\", value \"v\" is given twice at this level (first at line 5)",
            "bad.yaml:14: rate_limit.requests_per_unit: \"many\" is not a whole number from 0 to 4294967295",
            "bad.yaml:15: rate_limit.replaces: \"own\" is this rule's own name",
        ]
    );
}

#[test]
fn a_file_without_a_domain_or_with_bad_yaml_is_refused() {
    assert_eq!(
        problems(""),
        ["bad.yaml:1: the file is empty: it needs a domain and its descriptors"]
    );
    assert_eq!(
        problems("descriptors: []\n"),
        ["bad.yaml:1: domain: missing; every file names its domain"]
    );
    let broken = problems("domain: edge\ndescriptors:\n  - key: [\n");
    assert_eq!(broken.len(), 1);
    assert!(broken[0].starts_with("bad.yaml:"), "{broken:?}");
    assert!(broken[0].contains("not valid YAML"), "{broken:?}");
    assert_eq!(
        problems("domain: a\n---\ndomain: b\n"),
        ["bad.yaml:3: a second YAML document: one file holds one domain"]
    );
    assert_eq!(
        problems("domain: !!str edge\n"),
        ["bad.yaml:1: domain: YAML tags are not supported"]
    );
}

#[test]
fn one_domain_in_two_files_names_both() {
    let one = "domain: edge\ndescriptors: []\n";
    let err = RuleSet::parse(&[("a.yaml", one), ("b.yaml", one)], HashKey::default())
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "b.yaml:1: domain \"edge\" is also the domain of a.yaml:1; one domain has one file"
    );
}

#[test]
fn a_folder_is_read_file_by_file_skipping_hidden_and_other_files() {
    let folder = tempfile::tempdir().unwrap();
    std::fs::write(folder.path().join("edge.yaml"), EDGE).unwrap();
    std::fs::write(
        folder.path().join("inner.yml"),
        "domain: inner\ndescriptors:\n  - key: k\n    rate_limit: { unit: second, requests_per_unit: 2 }\n",
    )
    .unwrap();
    std::fs::write(folder.path().join("README.md"), "not yaml").unwrap();
    std::fs::write(folder.path().join(".edge.yaml.swp"), "domain: [").unwrap();
    std::fs::create_dir(folder.path().join("sub.yaml")).unwrap();
    let set = RuleSet::load(folder.path(), HashKey::default()).unwrap();
    let mut names: Vec<&str> = set.domains().map(|d| &*d.name).collect();
    names.sort();
    assert_eq!(names, ["edge", "inner"]);
    assert!(set.domain("inner").unwrap().file.ends_with("inner.yml"));
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        RuleSet::load(empty.path(), HashKey::default()),
        Err(RlsConfigError::NoFiles { .. })
    ));
}

#[test]
fn a_problem_in_a_folder_names_its_file() {
    let folder = tempfile::tempdir().unwrap();
    std::fs::write(folder.path().join("a.yaml"), EDGE).unwrap();
    std::fs::write(folder.path().join("b.yaml"), "domain: b\ndescriptors: 3\n").unwrap();
    let err = RuleSet::load(folder.path(), HashKey::default())
        .unwrap_err()
        .to_string();
    let b = folder.path().join("b.yaml").display().to_string();
    assert_eq!(
        err,
        format!("{b}:2: descriptors: must be a list of descriptors")
    );
}

#[test]
fn scalars_are_read_as_written() {
    let set = rules(&[(
        "d.yaml",
        "domain: d\ndescriptors:\n  - key: version\n    value: 1.10\n    rate_limit: { unit: second, requests_per_unit: 1 }\n",
    )]);
    let resolution = set
        .resolve(&RlsRequest {
            domain: "d",
            descriptors: vec![descriptor(&[("version", "1.10")])],
            hits_addend: 0,
        })
        .unwrap();
    assert!(matches!(resolution.descriptors[0], Resolved::Charged(_)));
}

#[test]
fn the_version_changes_with_the_text() {
    let a = rules(&[("edge.yaml", EDGE)]);
    let b = rules(&[("edge.yaml", &EDGE.replace("100", "101"))]);
    assert_ne!(a.version(), b.version());
    assert_eq!(a.version().len(), 16);
}
