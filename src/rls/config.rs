//! envoyproxy/ratelimit's YAML configuration in, a [`RuleSet`] out, or every problem
//! found, each as `file:line: message`.
//!
//! A file is loaded as a tree whose every node knows where it starts (scalars kept as
//! written, so `value: 1.10` is the text `1.10`), then read mapping by mapping, field by
//! field: an unknown field, a value of the wrong type or a value that does not validate is
//! reported on its own, so that one mistake hides no other.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use saphyr::{MarkedYaml, ScalarStyle, YamlData, YamlLoader};
use saphyr_parser::Parser;
use thiserror::Error;

use super::{Choices, Domain, Level, Node, Rule, RuleLimit, RuleSet, StatedLimit, Unit};
use crate::policy::{HashKey, is_plain_part, push_hashed_part};

/// One problem of a file, where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: Arc<str>,
    /// 1-based.
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.message)
    }
}

/// Why a configuration was refused.
#[derive(Debug, Error)]
pub enum RlsConfigError {
    #[error("{path}: cannot read: {source}")]
    Unreadable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: the folder holds no .yaml or .yml file")]
    NoFiles { path: String },
    /// Every problem of every file, top to bottom, file by file.
    #[error("{}", .problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid { problems: Vec<Problem> },
}

const ROOT_FIELDS: &[&str] = &["domain", "descriptors"];
const DESCRIPTOR_FIELDS: &[&str] = &[
    "key",
    "value",
    "rate_limit",
    "descriptors",
    "shadow_mode",
    "quota_mode",
    "detailed_metric",
    "value_to_metric",
    "share_threshold",
    "metadata",
];
const RATE_LIMIT_FIELDS: &[&str] = &["requests_per_unit", "unit", "unlimited", "name", "replaces"];
const REPLACES_FIELDS: &[&str] = &["name"];

/// Flags of envoyproxy/ratelimit's format this service does not follow, and why; `false`
/// is accepted, since it asks for nothing.
const UNSUPPORTED_FLAGS: &[(&str, &str)] = &[
    ("quota_mode", "quota mode is not supported"),
    (
        "detailed_metric",
        "per-value metrics are not kept (labels stay bounded); name the rule for a series of its own",
    ),
    (
        "value_to_metric",
        "descriptor values never become metric labels; name the rule for a series of its own",
    ),
    (
        "share_threshold",
        "every value a prefix matches has a bucket of its own; sharing one is not supported",
    ),
];

/// The files `path` names, as (name, text): the file itself, or the `*.yaml` and `*.yml`
/// files of a folder (not its subfolders nor hidden files), in name order.
pub(super) fn read_files(path: &Path) -> Result<Vec<(String, String)>, RlsConfigError> {
    let unreadable = |source| RlsConfigError::Unreadable {
        path: path.display().to_string(),
        source,
    };
    let metadata = std::fs::metadata(path).map_err(unreadable)?;
    let paths = if metadata.is_dir() {
        let mut paths = Vec::new();
        for entry in std::fs::read_dir(path).map_err(unreadable)? {
            let entry = entry.map_err(unreadable)?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
            // Hidden entries are editors' and Kubernetes' (`..data`), never a domain.
            if yaml && !name.starts_with('.') && entry.path().is_file() {
                paths.push(entry.path());
            }
        }
        paths.sort();
        if paths.is_empty() {
            return Err(RlsConfigError::NoFiles {
                path: path.display().to_string(),
            });
        }
        paths
    } else {
        vec![path.to_path_buf()]
    };
    let mut files = Vec::with_capacity(paths.len());
    for path in &paths {
        let text = std::fs::read_to_string(path).map_err(|source| RlsConfigError::Unreadable {
            path: path.display().to_string(),
            source,
        })?;
        files.push((path.display().to_string(), text));
    }
    Ok(files)
}

pub(super) fn parse(files: &[(&str, &str)], hash_key: HashKey) -> Result<RuleSet, RlsConfigError> {
    let mut problems = Vec::new();
    let mut domains: HashMap<Arc<str>, Domain> = HashMap::new();
    let mut first_line: HashMap<Arc<str>, usize> = HashMap::new();
    let mut version = blake3::Hasher::new();
    for (name, text) in files {
        version.update(&(name.len() as u64).to_le_bytes());
        version.update(name.as_bytes());
        version.update(&(text.len() as u64).to_le_bytes());
        version.update(text.as_bytes());
        let mut reader = Reader {
            file: Arc::from(*name),
            problems: Vec::new(),
        };
        let domain = reader.read_file(text, &hash_key);
        if let Some((domain, line)) = domain {
            match domains.get(&domain.name) {
                Some(earlier) => reader.at(
                    line,
                    format!(
                        "domain {:?} is also the domain of {}:{}; one domain has one file",
                        domain.name, earlier.file, first_line[&domain.name]
                    ),
                ),
                None => {
                    first_line.insert(domain.name.clone(), line);
                    domains.insert(domain.name.clone(), domain);
                }
            }
        }
        reader.problems.sort_by_key(|problem| problem.line);
        problems.extend(reader.problems);
    }
    if !problems.is_empty() {
        return Err(RlsConfigError::Invalid { problems });
    }
    let digest = version.finalize().to_hex();
    Ok(RuleSet {
        domains,
        version: digest[..16].to_string(),
        hash_key,
    })
}

/// One entry of a descriptor's path as written: its key, and its value if it has one
/// (`premium-*` included).
#[derive(Debug, Clone)]
struct Entry {
    key: String,
    value: Option<String>,
}

impl Entry {
    /// `key`, or `key=value`.
    fn written(&self) -> String {
        match &self.value {
            Some(value) => format!("{}={value}", self.key),
            None => self.key.clone(),
        }
    }
}

/// Reads one file, collecting its problems.
struct Reader {
    file: Arc<str>,
    problems: Vec<Problem>,
}

/// A mapping's fields, each with the line of its key; duplicates and unknown names
/// already reported.
struct Fields<'n, 'i> {
    fields: Vec<(&'n str, usize, &'n MarkedYaml<'i>)>,
    /// Where the mapping starts, for a field it lacks.
    line: usize,
}

impl<'n, 'i> Fields<'n, 'i> {
    fn get(&self, name: &str) -> Option<(usize, &'n MarkedYaml<'i>)> {
        self.fields
            .iter()
            .find(|(field, _, value)| *field == name && !is_null(value))
            .map(|(_, line, value)| (*line, *value))
    }
}

fn line_of(node: &MarkedYaml<'_>) -> usize {
    node.span.start.line().max(1)
}

/// `~`, `null`, or nothing at all.
fn is_null(node: &MarkedYaml<'_>) -> bool {
    match &node.data {
        YamlData::Representation(text, ScalarStyle::Plain, None) => {
            matches!(&**text, "" | "~" | "null" | "Null" | "NULL")
        }
        YamlData::BadValue => true,
        _ => false,
    }
}

impl Reader {
    fn at(&mut self, line: usize, message: impl Into<String>) {
        self.problems.push(Problem {
            file: self.file.clone(),
            line,
            message: message.into(),
        });
    }

    /// The file's domain and the line of its `domain` field.
    fn read_file(&mut self, text: &str, hash_key: &HashKey) -> Option<(Domain, usize)> {
        let mut parser = Parser::new_from_str(text);
        let mut loader: YamlLoader<'_, MarkedYaml<'_>> = YamlLoader::default();
        loader.early_parse(false);
        let loaded = parser.load(&mut loader, true);
        if let Some(error) = loaded.err().or_else(|| loader.error().cloned()) {
            self.at(
                error.marker().line().max(1),
                format!("not valid YAML: {}", error.info()),
            );
            return None;
        }
        let documents = loader.into_documents();
        let Some(root) = documents.first().filter(|root| !is_null(root)) else {
            self.at(
                1,
                "the file is empty: it needs a domain and its descriptors",
            );
            return None;
        };
        if let Some(second) = documents.get(1) {
            self.at(
                line_of(second),
                "a second YAML document: one file holds one domain",
            );
        }
        let fields = self.fields(root, ROOT_FIELDS, "the file")?;
        let domain = self.required_text(&fields, "domain", "every file names its domain");
        let mut root_level = Level::default();
        if let Some((line, node)) = fields.get("descriptors") {
            root_level = self.level(line, node, &[]);
        }
        let (name, line) = domain?;
        let name: Arc<str> = Arc::from(name);
        let mut key_part = String::new();
        if is_plain_part(&name) {
            key_part.push_str(&name);
        } else {
            push_hashed_part(&mut key_part, "", &[name.as_bytes()], hash_key);
        }
        let domain = Domain {
            label: Arc::from(format!("rls:{name}")),
            override_label: Arc::from("override"),
            name,
            file: self.file.clone(),
            key_part,
            root: root_level,
        };
        Some((domain, line))
    }

    /// The fields of `node`, a mapping, each name once and every name among `known`;
    /// `what` names the mapping in messages.
    fn fields<'n, 'i>(
        &mut self,
        node: &'n MarkedYaml<'i>,
        known: &[&str],
        what: &str,
    ) -> Option<Fields<'n, 'i>> {
        let line = line_of(node);
        let YamlData::Mapping(mapping) = &node.data else {
            self.at(line, format!("{what} must be a mapping of fields"));
            return None;
        };
        let mut fields: Vec<(&'n str, usize, &'n MarkedYaml<'i>)> = Vec::new();
        for (key, value) in mapping {
            let key_line = line_of(key);
            let YamlData::Representation(name, _, None) = &key.data else {
                self.at(key_line, format!("{what}: a field name must be plain text"));
                continue;
            };
            let name: &'n str = name;
            if !known.contains(&name) {
                self.at(
                    key_line,
                    format!(
                        "{what}: unknown field {name:?}; expected one of {}",
                        known.join(", ")
                    ),
                );
            } else if let Some((_, first, _)) = fields.iter().find(|(seen, _, _)| *seen == name) {
                self.at(
                    key_line,
                    format!("{what}: {name} is given twice (first at line {first})"),
                );
            } else {
                fields.push((name, key_line, value));
            }
        }
        Some(Fields { fields, line })
    }

    /// A scalar as its text.
    fn string(&mut self, line: usize, field: &str, node: &MarkedYaml<'_>) -> Option<String> {
        match &node.data {
            YamlData::Representation(text, _, None) => Some(text.to_string()),
            YamlData::Representation(_, _, Some(_)) | YamlData::Tagged(..) => {
                self.at(line, format!("{field}: YAML tags are not supported"));
                None
            }
            _ => {
                self.at(line, format!("{field}: must be text"));
                None
            }
        }
    }

    /// A field every mapping of its kind must have, as non-empty text, with its line;
    /// `why` says, when it is missing, why it may not be.
    fn required_text(
        &mut self,
        fields: &Fields<'_, '_>,
        field: &str,
        why: &str,
    ) -> Option<(String, usize)> {
        let Some((line, node)) = fields.get(field) else {
            self.at(fields.line, format!("{field}: missing; {why}"));
            return None;
        };
        let text = self.string(line, field, node)?;
        if text.is_empty() {
            self.at(line, format!("{field}: must not be empty"));
            return None;
        }
        Some((text, line))
    }

    fn boolean(&mut self, line: usize, field: &str, node: &MarkedYaml<'_>) -> Option<bool> {
        match self.string(line, field, node)?.as_str() {
            "true" | "True" | "TRUE" => Some(true),
            "false" | "False" | "FALSE" => Some(false),
            other => {
                self.at(line, format!("{field}: {other:?} is not true or false"));
                None
            }
        }
    }

    /// A whole number from 0 to `u32::MAX`, plain decimal digits.
    fn count(&mut self, line: usize, field: &str, node: &MarkedYaml<'_>) -> Option<u32> {
        let text = self.string(line, field, node)?;
        let number = (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
            .then(|| text.parse::<u32>().ok())
            .flatten();
        if number.is_none() {
            self.at(
                line,
                format!(
                    "{field}: {text:?} is not a whole number from 0 to {}",
                    u32::MAX
                ),
            );
        }
        number
    }

    /// A `descriptors` list: the rules of one level, below the entries `above` (key, and
    /// value as written).
    fn level(&mut self, line: usize, node: &MarkedYaml<'_>, above: &[Entry]) -> Level {
        let mut level = Level::default();
        let YamlData::Sequence(items) = &node.data else {
            self.at(line, "descriptors: must be a list of descriptors");
            return level;
        };
        // Where each (key, value) of this level was first written, for duplicates.
        let mut seen: HashMap<(String, Option<String>), usize> = HashMap::new();
        for item in items {
            let Some((key, value, node)) = self.descriptor(item, above) else {
                continue;
            };
            let item_line = line_of(item);
            let described = match &value {
                Some(value) => format!("key {key:?}, value {value:?}"),
                None => format!("key {key:?} without value"),
            };
            if let Some(first) = seen.get(&(key.clone(), value.clone())) {
                self.at(
                    item_line,
                    format!("descriptor {described} is given twice at this level (first at line {first})"),
                );
                continue;
            }
            seen.insert((key.clone(), value.clone()), item_line);
            let choices: &mut Choices = level.by_key.entry(key.into()).or_default();
            match value {
                None => choices.any = Some(Box::new(node)),
                Some(value) => match value.strip_suffix('*') {
                    Some(prefix) => {
                        choices.prefixes.push((prefix.into(), node));
                        choices
                            .prefixes
                            .sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
                    }
                    None => {
                        choices.exact.insert(value.into(), node);
                    }
                },
            }
        }
        level
    }

    /// One descriptor of a `descriptors` list: its key, its value (as written, `*`
    /// included) and its node.
    fn descriptor(
        &mut self,
        item: &MarkedYaml<'_>,
        above: &[Entry],
    ) -> Option<(String, Option<String>, Node)> {
        let fields = self.fields(item, DESCRIPTOR_FIELDS, "a descriptor")?;
        let key = self
            .required_text(&fields, "key", "every descriptor has one")
            .map(|(key, _)| key);
        // An empty value is no value, as envoyproxy/ratelimit reads it.
        let value = fields
            .get("value")
            .and_then(|(line, node)| Some((line, self.string(line, "value", node)?)))
            .filter(|(_, value)| !value.is_empty());
        if let Some((line, value)) = &value
            && value.trim_end_matches('*').contains('*')
        {
            self.at(
                *line,
                format!(
                    "value {value:?}: only a trailing * (every value with that prefix) is supported"
                ),
            );
        }
        for (flag, why) in UNSUPPORTED_FLAGS {
            if let Some((line, node)) = fields.get(flag)
                && self.boolean(line, flag, node) == Some(true)
            {
                self.at(line, format!("{flag}: not supported: {why}"));
            }
        }
        if let Some((line, _)) = fields.get("metadata") {
            self.at(
                line,
                "metadata: not supported: responses carry no dynamic metadata",
            );
        }
        let shadow = match fields.get("shadow_mode") {
            Some((line, node)) => self.boolean(line, "shadow_mode", node).map(|on| (line, on)),
            None => None,
        };
        let mut path = above.to_vec();
        path.push(Entry {
            key: key.clone().unwrap_or_default(),
            value: value.as_ref().map(|(_, value)| value.clone()),
        });
        let rule = match fields.get("rate_limit") {
            Some((line, node)) => {
                let shadow = shadow.is_some_and(|(_, on)| on);
                self.rule(line, node, &path, shadow)
            }
            None => {
                if let Some((line, true)) = shadow {
                    self.at(
                        line,
                        "shadow_mode: this descriptor has no rate_limit for it to apply to",
                    );
                }
                None
            }
        };
        let children = match fields.get("descriptors") {
            Some((line, node)) => self.level(line, node, &path),
            None => Level::default(),
        };
        Some((key?, value.map(|(_, value)| value), Node { rule, children }))
    }

    /// A `rate_limit` mapping, its descriptor's entries being `path`.
    fn rule(
        &mut self,
        line: usize,
        node: &MarkedYaml<'_>,
        path: &[Entry],
        shadow: bool,
    ) -> Option<Rule> {
        let fields = self.fields(node, RATE_LIMIT_FIELDS, "rate_limit")?;
        let name = match fields.get("name") {
            Some((line, node)) => self.string(line, "rate_limit.name", node)?,
            None => String::new(),
        };
        let unlimited = match fields.get("unlimited") {
            Some((line, node)) => self.boolean(line, "rate_limit.unlimited", node)?,
            None => false,
        };
        let unit = fields.get("unit");
        let requests = fields.get("requests_per_unit");
        let replaces = match fields.get("replaces") {
            Some((line, node)) => self.replaces(line, node, &name),
            None => Some(Vec::new()),
        };
        let limit = if unlimited {
            if let Some((line, _)) = unit {
                self.at(
                    line,
                    "rate_limit.unit: an unlimited rate_limit takes no unit",
                );
                return None;
            }
            if let Some((line, _)) = requests {
                self.at(
                    line,
                    "rate_limit.requests_per_unit: an unlimited rate_limit takes no requests_per_unit",
                );
                return None;
            }
            RuleLimit::Unlimited
        } else {
            let units = Unit::ALL.map(Unit::as_str).join(", ");
            let unit = match unit {
                None => {
                    self.at(
                        fields.line,
                        format!("rate_limit.unit: missing; one of {units}, or unlimited: true"),
                    );
                    None
                }
                Some((line, node)) => {
                    let text = self.string(line, "rate_limit.unit", node)?;
                    let unit = Unit::parse(&text);
                    if unit.is_none() {
                        self.at(
                            line,
                            format!("rate_limit.unit: {text:?} is not one of {units}"),
                        );
                    }
                    unit
                }
            };
            let requests = match requests {
                None => {
                    self.at(fields.line, "rate_limit.requests_per_unit: missing");
                    None
                }
                Some((line, node)) => {
                    match self.count(line, "rate_limit.requests_per_unit", node)? {
                        0 => {
                            self.at(
                            line,
                            "rate_limit.requests_per_unit: 0 (refuse every request) is not supported; at least 1",
                        );
                            None
                        }
                        requests => Some((line, requests)),
                    }
                }
            };
            let (unit, (requests_line, requests)) = (unit?, requests?);
            match StatedLimit::new("rule", requests, unit) {
                Ok(limit) => RuleLimit::Limited(limit),
                Err(err) => {
                    self.at(requests_line, format!("rate_limit: {err}"));
                    return None;
                }
            }
        };
        let replaces = replaces?;
        let label = if name.is_empty() {
            let keys: Vec<&str> = path.iter().map(|entry| entry.key.as_str()).collect();
            keys.join(".")
        } else {
            name.clone()
        };
        Some(Rule {
            label: Arc::from(label),
            descriptor: path.iter().map(Entry::written).collect(),
            name: Arc::from(name.as_str()),
            limit,
            shadow,
            replaces,
            file: self.file.clone(),
            line,
        })
    }

    fn replaces(&mut self, line: usize, node: &MarkedYaml<'_>, own: &str) -> Option<Vec<Arc<str>>> {
        let YamlData::Sequence(items) = &node.data else {
            self.at(
                line,
                "rate_limit.replaces: must be a list of { name: <rule name> }",
            );
            return None;
        };
        let mut names = Vec::with_capacity(items.len());
        for item in items {
            let fields = self.fields(item, REPLACES_FIELDS, "rate_limit.replaces")?;
            let Some((line, node)) = fields.get("name") else {
                self.at(fields.line, "rate_limit.replaces: an entry without a name");
                return None;
            };
            let name = self.string(line, "rate_limit.replaces.name", node)?;
            if name.is_empty() {
                self.at(line, "rate_limit.replaces: an entry without a name");
                return None;
            }
            if name == own {
                self.at(
                    line,
                    format!("rate_limit.replaces: {name:?} is this rule's own name"),
                );
                return None;
            }
            names.push(Arc::from(name));
        }
        Some(names)
    }
}
