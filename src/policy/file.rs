//! The policy file: TOML in, validated [`Policy`] values out, or every problem found,
//! each as `file:line: message`. One job, reading the file; it is long because every field
//! of every table has its own check and its own message.
//!
//! The document is parsed once into spanned values and then read table by table, field
//! by field: an unknown field, a value of the wrong type or a value that does not
//! validate is reported on its own, so that one mistake hides no other, and one run
//! lists every problem of the file.
//! Messages name the policy, the field and the limit, and never repeat an override's
//! key values: those may be API keys.

use std::collections::HashMap;

use serde::de::{self, DeserializeOwned, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use thiserror::Error;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use super::key::{Cost, HashKey, KeySpec, OnMissing, Overrides};
use super::matching::{
    HEADER_SLOTS, HeaderCondition, HostPattern, Matcher, MethodSet, PathPattern, header_name,
};
use super::{Mode, NamedLimit, Policy};
use crate::bucket::{Limit, LimitSpec};

/// Longest policy or limit name: it goes into headers, metric labels and Redis keys.
const MAX_NAME_BYTES: usize = 32;

/// Why a policy file was refused: every problem found, each `file:line: message`.
#[derive(Debug, Error)]
#[error("{}", .problems.join("\n"))]
pub struct PolicyFileError {
    pub problems: Vec<String>,
}

/// A string, or a list of strings.
struct OneOrMany(Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OneOrManyVisitor;
        impl<'de> Visitor<'de> for OneOrManyVisitor {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, one: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![one.to_string()]))
            }
            fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<OneOrMany, S::Error> {
                let mut many = Vec::new();
                while let Some(item) = seq.next_element::<String>()? {
                    many.push(item);
                }
                Ok(OneOrMany(many))
            }
        }
        deserializer.deserialize_any(OneOrManyVisitor)
    }
}

const POLICY_FIELDS: &[&str] = &[
    "name",
    "mode",
    "match",
    "key",
    "on_missing",
    "cost",
    "limits",
    "override",
];
const MATCH_FIELDS: &[&str] = &["path", "methods", "host", "header"];
const HEADER_MATCH_FIELDS: &[&str] = &["name", "value"];
const COST_FIELDS: &[&str] = &["header", "max"];
const LIMIT_FIELDS: &[&str] = &["name", "rate", "per", "burst"];
const OVERRIDE_FIELDS: &[&str] = &["keys", "limits"];

type Value<'i> = Spanned<DeValue<'i>>;

/// Parses every policy of `text`, or reports every problem found.
pub(super) fn parse(
    text: &str,
    file_name: &str,
    hash_key: &HashKey,
) -> Result<Vec<Policy>, PolicyFileError> {
    let mut reader = Reader {
        text,
        file_name,
        problems: Vec::new(),
        header_slots: Vec::new(),
    };
    let policies = read_document(text, hash_key, &mut reader);
    if reader.problems.is_empty() {
        return Ok(policies);
    }
    // Found table by table, reported top to bottom.
    reader.problems.sort_by_key(|(line, _)| *line);
    Err(PolicyFileError {
        problems: reader
            .problems
            .into_iter()
            .map(|(_, problem)| problem)
            .collect(),
    })
}

/// Reads the document's tables field by field, so that each field's problem is reported
/// on its own, and collects every problem as `file:line: message`.
struct Reader<'t> {
    text: &'t str,
    file_name: &'t str,
    /// Each problem with its line, `file:line: message`.
    problems: Vec<(usize, String)>,
    /// The header names of `match` conditions given a slot so far, in slot order.
    header_slots: Vec<Box<str>>,
}

/// One table of the file, with what its messages say it is.
struct Fields<'v, 'i> {
    table: &'v DeTable<'i>,
    /// Where the table starts, for a field it lacks.
    at: usize,
    /// `policy "api"`, `policy "api", limit "day"`.
    label: String,
    /// The table's place in its policy, `match` or `cost`; empty for the policy itself.
    section: &'static str,
}

impl Fields<'_, '_> {
    fn field_name(&self, name: &str) -> String {
        if self.section.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.section)
        }
    }
}

impl Reader<'_> {
    fn at(&mut self, offset: usize, message: impl std::fmt::Display) {
        let line = self.line(offset);
        self.problems
            .push((line, format!("{}:{line}: {message}", self.file_name)));
    }

    fn line(&self, offset: usize) -> usize {
        let before = &self.text.as_bytes()[..offset.min(self.text.len())];
        before.iter().filter(|&&byte| byte == b'\n').count() + 1
    }

    fn count(&self) -> usize {
        self.problems.len()
    }

    /// The slot a request remembers header `name` in, while slots last.
    fn header_slot(&mut self, name: &str) -> Option<u8> {
        let slot = match self.header_slots.iter().position(|known| **known == *name) {
            Some(slot) => slot,
            None if self.header_slots.len() < HEADER_SLOTS => {
                self.header_slots.push(name.into());
                self.header_slots.len() - 1
            }
            None => return None,
        };
        u8::try_from(slot).ok()
    }

    /// `value` as a table of `known` fields (any other reported), or `None` (reported)
    /// when it is no table.
    fn fields<'v, 'i>(
        &mut self,
        value: &'v Value<'i>,
        label: String,
        section: &'static str,
        known: &[&str],
    ) -> Option<Fields<'v, 'i>> {
        let Some(table) = value.get_ref().as_table() else {
            let what = in_section(section, |section| format!(" {section}:"));
            self.at(
                value.span().start,
                format!(
                    "{label}:{what} expected a table, got {}",
                    value.get_ref().type_str()
                ),
            );
            return None;
        };
        let fields = Fields {
            table,
            at: value.span().start,
            label,
            section,
        };
        for name in table.keys() {
            if !known.contains(&name.get_ref().as_ref()) {
                let expected: Vec<String> = known.iter().map(|k| format!("`{k}`")).collect();
                let within = in_section(section, |section| format!(" in {section}"));
                self.at(
                    name.span().start,
                    format!(
                        "{}: unknown field `{}`{within}, expected one of {}",
                        fields.label,
                        name.get_ref(),
                        expected.join(", ")
                    ),
                );
            }
        }
        Some(fields)
    }

    /// The field `name` decoded as a `T`; `None` when it is absent, or when it is no `T`
    /// (reported).
    fn optional<T: DeserializeOwned>(
        &mut self,
        fields: &Fields<'_, '_>,
        name: &str,
    ) -> Option<Spanned<T>> {
        let value = fields.table.get(name)?;
        let label = format!("{}: {}", fields.label, fields.field_name(name));
        self.decode(value, &label)
    }

    /// The field `name` decoded as a `T`; `None` (reported) when it is absent or no `T`.
    fn required<T: DeserializeOwned>(
        &mut self,
        fields: &Fields<'_, '_>,
        name: &str,
    ) -> Option<Spanned<T>> {
        if !fields.table.contains_key(name) {
            self.missing(fields, name);
            return None;
        }
        self.optional(fields, name)
    }

    fn missing(&mut self, fields: &Fields<'_, '_>, name: &str) {
        let message = format!(
            "{}: missing field `{}`",
            fields.label,
            fields.field_name(name)
        );
        self.at(fields.at, message);
    }

    fn decode<T: DeserializeOwned>(
        &mut self,
        value: &Value<'_>,
        label: &str,
    ) -> Option<Spanned<T>> {
        match T::deserialize(ValueDeserializer::from(value.clone())) {
            Ok(decoded) => Some(Spanned::new(value.span(), decoded)),
            Err(error) => {
                let at = error.span().map_or(value.span().start, |span| span.start);
                self.at(at, format!("{label}: {}", error.message()));
                None
            }
        }
    }

    /// The field `name` as a list of values, each with its span; `None` when it is
    /// absent, or no list (reported).
    fn list<'v, 'i>(
        &mut self,
        fields: &Fields<'v, 'i>,
        name: &str,
    ) -> Option<(usize, &'v [Value<'i>])> {
        let value = fields.table.get(name)?;
        match value.get_ref().as_array() {
            Some(items) => Some((value.span().start, items)),
            None => {
                let message = format!(
                    "{}: {}: expected a list, got {}",
                    fields.label,
                    fields.field_name(name),
                    value.get_ref().type_str()
                );
                self.at(value.span().start, message);
                None
            }
        }
    }
}

/// The `name` of a table, before it is validated, to name the table in messages.
fn peek_name<'v>(value: &'v DeValue<'_>) -> Option<&'v str> {
    value.as_table()?.get("name")?.get_ref().as_str()
}

fn read_document(text: &str, hash_key: &HashKey, reader: &mut Reader<'_>) -> Vec<Policy> {
    let (root, syntax_errors) = DeTable::parse_recoverable(text);
    if !syntax_errors.is_empty() {
        for error in syntax_errors {
            let offset = error.span().map_or(0, |span| span.start);
            reader.at(offset, error.message().trim());
        }
        return Vec::new();
    }
    let mut entries = None;
    for (name, value) in root.get_ref() {
        if name.get_ref() == "policy" {
            entries = Some(value);
        } else {
            reader.at(
                name.span().start,
                format!(
                    "unknown field `{}`: a policy file holds only [[policy]] entries",
                    name.get_ref()
                ),
            );
        }
    }
    let Some(entries) = entries else {
        reader.at(0, "no [[policy]] entries: a policy file needs at least one");
        return Vec::new();
    };
    let Some(entries) = entries.get_ref().as_array() else {
        reader.at(
            entries.span().start,
            "policy: expected [[policy]] entries, got a single table",
        );
        return Vec::new();
    };
    let mut names = HashMap::new();
    let mut policies = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        let label = match peek_name(entry.get_ref()) {
            Some(name) => format!("policy {name:?}"),
            None => format!("policy #{}", index + 1),
        };
        if let Some(policy) = read_policy(entry, label, hash_key, &mut names, reader) {
            policies.push(policy);
        }
    }
    policies
}

/// One `[[policy]]`, or `None` when any of its problems was reported.
fn read_policy(
    entry: &Value<'_>,
    label: String,
    hash_key: &HashKey,
    names: &mut HashMap<String, usize>,
    reader: &mut Reader<'_>,
) -> Option<Policy> {
    let before = reader.count();
    let fields = reader.fields(entry, label, "", POLICY_FIELDS)?;
    let label = fields.label.clone();
    let name = reader.required::<String>(&fields, "name");
    if let Some(name) = &name {
        let at = name.span().start;
        if let Err(message) = check_name(name.get_ref()) {
            reader.at(at, format!("{label}: {message}"));
        }
        if let Some(first) = names.get(name.get_ref()) {
            reader.at(
                at,
                format!("{label}: the name is already taken by the policy on line {first}"),
            );
        } else {
            names.insert(name.get_ref().clone(), reader.line(at));
        }
    }
    let mode = reader
        .optional::<Mode>(&fields, "mode")
        .map_or(Mode::Enforce, Spanned::into_inner);
    let matcher = match fields.table.get("match") {
        Some(value) => read_match(value, &label, reader),
        None => Matcher::default(),
    };
    let on_missing = reader
        .optional::<OnMissing>(&fields, "on_missing")
        .map_or(OnMissing::ClientIp, Spanned::into_inner);
    let key = match reader.optional::<OneOrMany>(&fields, "key") {
        None => KeySpec::client_ip(),
        Some(parts) => KeySpec::parse(&parts.get_ref().0, on_missing).unwrap_or_else(|message| {
            reader.at(parts.span().start, format!("{label}: {message}"));
            KeySpec::client_ip()
        }),
    };
    let cost = match fields.table.get("cost") {
        Some(value) => read_cost(value, &label, reader).unwrap_or(Cost::Fixed(1)),
        None => Cost::Fixed(1),
    };
    let limits = match reader.list(&fields, "limits") {
        Some(list) => read_limits(list, &label, cost.max(), reader),
        None => {
            if !fields.table.contains_key("limits") {
                reader.missing(&fields, "limits");
            }
            Vec::new()
        }
    };
    let mut overrides = Overrides::default();
    for entry in reader
        .list(&fields, "override")
        .map_or(&[][..], |(_, list)| list)
    {
        read_override(
            entry,
            &label,
            &key,
            cost.max(),
            hash_key,
            &mut overrides,
            reader,
        );
    }
    let name = name?.into_inner();
    (reader.count() == before).then_some(Policy {
        name: name.into(),
        mode,
        matcher,
        key,
        limits,
        cost,
        overrides,
    })
}

/// Whether `name` is made as a policy's or a limit's name must be.
pub(super) fn is_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// `words` about `section`, or nothing at the top level, whose section is "".
fn in_section(section: &str, words: impl FnOnce(&str) -> String) -> String {
    if section.is_empty() {
        String::new()
    } else {
        words(section)
    }
}

fn check_name(name: &str) -> Result<(), String> {
    if is_name(name) {
        Ok(())
    } else {
        Err(format!(
            "name {name:?} must be 1 to {MAX_NAME_BYTES} characters of a-z, 0-9, _ and -"
        ))
    }
}

fn read_match(value: &Value<'_>, label: &str, reader: &mut Reader<'_>) -> Matcher {
    let mut matcher = Matcher::default();
    let Some(fields) = reader.fields(value, label.to_string(), "match", MATCH_FIELDS) else {
        return matcher;
    };
    matcher.paths = read_patterns(&fields, "path", PathPattern::parse, label, reader);
    if let Some(methods) = reader.optional::<Vec<String>>(&fields, "methods") {
        match MethodSet::parse(methods.get_ref()) {
            Ok(set) => matcher.methods = Some(set),
            Err(message) => reader.at(methods.span().start, format!("{label}: match.{message}")),
        }
    }
    matcher.hosts = read_patterns(&fields, "host", HostPattern::parse, label, reader);
    if let Some(header) = fields.table.get("header") {
        matcher.header = read_header_match(header, label, reader);
    }
    matcher
}

/// The patterns of a `match` field that takes one or a list (`path`, `host`): each one
/// that `parse` refuses, and an empty list, is a problem on the field's line.
fn read_patterns<P>(
    fields: &Fields<'_, '_>,
    field: &str,
    parse: fn(&str) -> Result<P, String>,
    label: &str,
    reader: &mut Reader<'_>,
) -> Vec<P> {
    let Some(texts) = reader.optional::<OneOrMany>(fields, field) else {
        return Vec::new();
    };
    let at = texts.span().start;
    if texts.get_ref().0.is_empty() {
        reader.at(
            at,
            format!("{label}: match.{field}: an empty list matches no request"),
        );
    }
    let mut patterns = Vec::new();
    for text in &texts.get_ref().0 {
        match parse(text) {
            Ok(pattern) => patterns.push(pattern),
            Err(message) => reader.at(at, format!("{label}: match.{message}")),
        }
    }
    patterns
}

fn read_header_match(
    value: &Value<'_>,
    label: &str,
    reader: &mut Reader<'_>,
) -> Option<HeaderCondition> {
    let fields = reader.fields(
        value,
        label.to_string(),
        "match.header",
        HEADER_MATCH_FIELDS,
    )?;
    let name = reader.required::<String>(&fields, "name");
    let wanted = reader.optional::<String>(&fields, "value");
    let name = name?;
    match header_name(name.get_ref()) {
        Ok(lower) => Some(HeaderCondition {
            slot: reader.header_slot(&lower),
            name: lower,
            value: wanted.map(|value| value.into_inner().into_bytes().into()),
        }),
        Err(message) => {
            reader.at(
                name.span().start,
                format!("{label}: match.header.name: {message}"),
            );
            None
        }
    }
}

/// `cost = 3` or `cost = { header = "x-cost", max = 100 }`.
fn read_cost(value: &Value<'_>, label: &str, reader: &mut Reader<'_>) -> Option<Cost> {
    let at = value.span().start;
    if value.get_ref().is_table() {
        let fields = reader.fields(value, label.to_string(), "cost", COST_FIELDS)?;
        let header = reader.required::<String>(&fields, "header");
        let max = reader.required::<u64>(&fields, "max");
        let (header, max) = (header?, max?);
        let name = match header_name(header.get_ref()) {
            Ok(name) => name,
            Err(message) => {
                reader.at(
                    header.span().start,
                    format!("{label}: cost.header: {message}"),
                );
                return None;
            }
        };
        if *max.get_ref() == 0 {
            reader.at(
                max.span().start,
                format!("{label}: cost.max must be at least 1 token"),
            );
            return None;
        }
        return Some(Cost::Header {
            name,
            max: max.into_inner(),
        });
    }
    if !value.get_ref().is_integer() {
        reader.at(
            at,
            format!("{label}: cost: expected a whole number of tokens or {{ header = \"<name>\", max = <tokens> }}"),
        );
        return None;
    }
    let cost = reader
        .decode::<i64>(value, &format!("{label}: cost"))?
        .into_inner();
    if cost < 1 {
        reader.at(
            at,
            format!("{label}: cost: {cost} must be at least 1 token"),
        );
        return None;
    }
    Some(Cost::Fixed(cost as u64))
}

/// The limits of a policy or of one of its overrides, each built exactly.
fn read_limits(
    (at, list): (usize, &[Value<'_>]),
    label: &str,
    max_cost: u64,
    reader: &mut Reader<'_>,
) -> Vec<NamedLimit> {
    if list.is_empty() {
        reader.at(at, format!("{label}: limits: at least one limit is needed"));
    }
    let mut lines = HashMap::new();
    list.iter()
        .enumerate()
        .filter_map(|(index, value)| read_limit(value, index, label, max_cost, &mut lines, reader))
        .collect()
}

/// One `{ name, rate, per, burst }`; `lines` holds the names seen so far in its list.
fn read_limit(
    value: &Value<'_>,
    index: usize,
    label: &str,
    max_cost: u64,
    lines: &mut HashMap<String, usize>,
    reader: &mut Reader<'_>,
) -> Option<NamedLimit> {
    let limit_label = match peek_name(value.get_ref()) {
        Some(name) => format!("{label}, limit {name:?}"),
        None => format!("{label}, limit #{}", index + 1),
    };
    let before = reader.count();
    let fields = reader.fields(value, limit_label.clone(), "", LIMIT_FIELDS)?;
    let name = reader.required::<String>(&fields, "name");
    let rate = reader.required::<u64>(&fields, "rate");
    let per = reader.required::<String>(&fields, "per");
    let burst = reader.optional::<u64>(&fields, "burst");
    let name = name?;
    if let Err(message) = check_name(name.get_ref()) {
        reader.at(name.span().start, format!("{limit_label}: {message}"));
    }
    if let Some(first) = lines.get(name.get_ref()) {
        reader.at(
            name.span().start,
            format!("{limit_label}: the name is already taken by the limit on line {first}"),
        );
    } else {
        lines.insert(name.get_ref().clone(), reader.line(value.span().start));
    }
    let (rate, per) = (rate?.into_inner(), per?);
    if reader.count() > before {
        return None;
    }
    let window_s = match parse_per(per.get_ref()) {
        Ok(window_s) => window_s,
        Err(message) => {
            reader.at(per.span().start, format!("{limit_label}: {message}"));
            return None;
        }
    };
    let burst = burst.map_or(rate, Spanned::into_inner);
    let spec = LimitSpec {
        rate,
        window_s,
        burst,
    };
    let at = value.span().start;
    match Limit::parse(spec) {
        Ok(_) if burst < max_cost => {
            reader.at(
                at,
                format!(
                    "{limit_label}: a burst of {burst} is less than the largest cost of a request, {max_cost}: such a request could never pass"
                ),
            );
            None
        }
        Ok(limit) => Some(NamedLimit::new(&name.into_inner(), spec, limit)),
        Err(error) => {
            reader.at(
                at,
                format!(
                    "{limit_label}: {rate} per {} with a burst of {burst} cannot be counted exactly: {error}",
                    per.get_ref()
                ),
            );
            None
        }
    }
}

/// `per` in whole seconds: `1s`, `10m`, `1h`, `1d`, `30d`.
fn parse_per(text: &str) -> Result<u64, String> {
    let duration = humantime::parse_duration(text).map_err(|error| {
        format!("per: {text:?} is not a duration ({error}); write e.g. 1s, 10m, 1h, 1d")
    })?;
    if duration.subsec_nanos() != 0 || duration.is_zero() {
        return Err(format!(
            "per: {text:?} is not a whole number of seconds, at least 1s"
        ));
    }
    Ok(duration.as_secs())
}

/// One `[[policy.override]]`: its limits, given to each of its keys.
fn read_override(
    value: &Value<'_>,
    label: &str,
    key: &KeySpec,
    max_cost: u64,
    hash_key: &HashKey,
    overrides: &mut Overrides,
    reader: &mut Reader<'_>,
) {
    let label = format!(
        "{label}, override on line {}",
        reader.line(value.span().start)
    );
    let Some(fields) = reader.fields(value, label.clone(), "", OVERRIDE_FIELDS) else {
        return;
    };
    let limits = match reader.list(&fields, "limits") {
        Some(list) => read_limits(list, &label, max_cost, reader),
        None => {
            if !fields.table.contains_key("limits") {
                reader.missing(&fields, "limits");
            }
            Vec::new()
        }
    };
    let index = overrides.add(limits);
    let Some((at, keys)) = reader.list(&fields, "keys") else {
        if !fields.table.contains_key("keys") {
            reader.missing(&fields, "keys");
        }
        return;
    };
    if keys.is_empty() {
        reader.at(at, format!("{label}: keys: at least one key is needed"));
    }
    for (position, item) in keys.iter().enumerate() {
        let entry_label = format!("{label}: keys: entry {}", position + 1);
        let Some(values) = reader.decode::<OneOrMany>(item, &entry_label) else {
            continue;
        };
        let at = values.span().start;
        match key.encode_raw(&values.get_ref().0, hash_key) {
            Ok(encoded) => match overrides.insert_key(encoded, index) {
                None => {}
                Some(earlier) if earlier == index => {
                    reader.at(at, format!("{entry_label} repeats an earlier entry"));
                }
                Some(_) => reader.at(
                    at,
                    format!("{entry_label} is already given to another override of this policy"),
                ),
            },
            Err(message) => reader.at(at, format!("{entry_label}: {message}")),
        }
    }
}
