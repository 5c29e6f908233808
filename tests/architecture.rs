//! The shape the crate docs promise (`src/lib.rs`, `docs/ARCHITECTURE.md`), checked on the
//! source text: no module imports one that imports it back, only the HTTP front knows the
//! HTTP framework and only the gRPC front the gRPC one, and the fronts decide nothing
//! themselves (they reach the store and the bucket arithmetic only through the limiter).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every module of the library, by its path.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read src/").flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                found.push(path);
            }
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    files
        .into_iter()
        .filter(|path| !path.ends_with("main.rs") && !path.ends_with("lib.rs"))
        .map(|path| {
            let relative = path.strip_prefix(&src).unwrap().with_extension("");
            let mut parts: Vec<String> = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|last| last == "mod") {
                parts.pop();
            }
            let text = std::fs::read_to_string(&path).unwrap();
            (parts.join("::"), text)
        })
        .collect()
}

/// The code of a file without comments, without the text of its string and character
/// literals (a `"redis://"` is not a comment, and a `"actix"` is not an import), and
/// without its unit tests, which may reach anywhere.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or(text);
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let at = |i: usize, s: &str| {
        s.chars()
            .enumerate()
            .all(|(k, c)| chars.get(i + k) == Some(&c))
    };
    while i < chars.len() {
        let c = chars[i];
        let after_word = i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_');
        if at(i, "//") {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if at(i, "/*") {
            let mut depth = 0;
            while i < chars.len() {
                if at(i, "/*") {
                    depth += 1;
                    i += 2;
                } else if at(i, "*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == 'r' && !after_word && (at(i + 1, "\"") || at(i + 1, "#")) {
            let hashes = chars[i + 1..].iter().take_while(|&&c| c == '#').count();
            if chars.get(i + 1 + hashes) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            let close: String = std::iter::once('"')
                .chain("#".repeat(hashes).chars())
                .collect();
            i += 2 + hashes;
            while i < chars.len() && !at(i, &close) {
                i += 1;
            }
            i += close.len();
            out.push_str("\"\"");
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == '\'' && (chars.get(i + 1) == Some(&'\\') || chars.get(i + 2) == Some(&'\''))
        {
            // A character literal; a lone quote is a lifetime and stays.
            i += 1;
            while i < chars.len() && chars[i] != '\'' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("' '");
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// The modules `module`'s code refers to, as `crate::` or `super::` paths resolve.
fn references(module: &str, code: &str, known: &BTreeSet<String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let parent: Vec<&str> = {
        let mut parts: Vec<&str> = module.split("::").collect();
        parts.pop();
        parts
    };
    let words: Vec<&str> = code
        .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("crate::") || w.starts_with("super::"))
        .collect();
    for word in words {
        let mut path: Vec<&str> = if let Some(rest) = word.strip_prefix("crate::") {
            rest.split("::").collect()
        } else {
            let mut base = parent.clone();
            let mut rest = word;
            while let Some(next) = rest.strip_prefix("super::") {
                rest = next;
                if rest.starts_with("super::") {
                    base.pop();
                }
            }
            base.extend(rest.split("::"));
            base
        };
        path.retain(|p| !p.is_empty());
        // The longest prefix that is a module is what the path reaches into.
        while !path.is_empty() {
            let candidate = path.join("::");
            if known.contains(&candidate) {
                if candidate != module {
                    found.insert(candidate);
                }
                break;
            }
            path.pop();
        }
    }
    found
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let modules = modules();
    let known: BTreeSet<String> = modules.keys().cloned().collect();
    let graph: BTreeMap<&str, BTreeSet<String>> = modules
        .iter()
        .map(|(name, text)| (name.as_str(), references(name, &code(text), &known)))
        .collect();
    assert!(
        graph["limiter::decider"].contains("store"),
        "the reference finder must see the decider's imports: {graph:?}"
    );
    // Depth-first search for a back edge; the cycle is the path that closes it.
    fn visit<'a>(
        node: &'a str,
        graph: &'a BTreeMap<&'a str, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<&'a str>> {
        if let Some(start) = path.iter().position(|n| *n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node);
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node);
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node);
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, &graph, &mut Vec::new(), &mut done) {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn every_scanned_file_keeps_its_code_after_comments_and_literals_are_cut() {
    for (name, text) in modules() {
        let code = code(&text);
        assert!(
            code.split_whitespace().next().is_some(),
            "src/{}: nothing left to scan once comments and literals are cut",
            name.replace("::", "/")
        );
        // A cut that ran to the end of the file would lose the last item.
        let last_item = text
            .split("#[cfg(test)]")
            .next()
            .unwrap_or(&text)
            .lines()
            .rev()
            .find(|line| {
                line.trim_start().starts_with("pub ") || line.trim_start().starts_with("fn ")
            });
        if let Some(line) = last_item {
            let head: String = line.trim_start().chars().take(12).collect();
            assert!(
                code.contains(&head),
                "src/{}: the cut lost {line:?}",
                name.replace("::", "/")
            );
        }
    }
}

#[test]
fn a_string_holding_two_slashes_is_not_a_comment() {
    let code = code("let url = \"redis://host\"; use crate::store::Store;\n");
    assert!(code.contains("crate::store::Store"), "{code}");
    let code = code_of_raw();
    assert!(code.contains("crate::bucket"), "{code}");
}

fn code_of_raw() -> String {
    code(
        "let a = r#\"// \"quoted\" \"#; let c = '\"'; fn f<'a>(x: &'a str) {} use crate::bucket;\n",
    )
}

#[test]
fn only_the_http_front_knows_the_http_framework() {
    for (name, text) in modules() {
        if name == "http" || name.starts_with("http::") {
            continue;
        }
        assert!(
            !code(&text).contains("actix"),
            "src/{} uses actix; only src/http/ may",
            name.replace("::", "/")
        );
    }
}

#[test]
fn only_the_grpc_front_knows_the_grpc_framework_and_envoys_types() {
    for (name, text) in modules() {
        if name == "grpc" || name.starts_with("grpc::") {
            continue;
        }
        let code = code(&text);
        for framework in ["tonic", "envoy_types", "prost"] {
            assert!(
                !code.contains(framework),
                "src/{} uses {framework}; only src/grpc/ may",
                name.replace("::", "/")
            );
        }
    }
}

#[test]
fn the_fronts_reach_the_store_and_the_buckets_only_through_the_limiter() {
    let modules = modules();
    let known: BTreeSet<String> = modules.keys().cloned().collect();
    for (name, text) in &modules {
        let front = ["http", "grpc"]
            .iter()
            .any(|front| name == front || name.starts_with(&format!("{front}::")));
        if !front {
            continue;
        }
        let reaches = references(name, &code(text), &known);
        let forbidden: Vec<&String> = reaches
            .iter()
            .filter(|module| {
                module.starts_with("store")
                    || module.starts_with("bucket")
                    // Listing the policy file is the one front job that reads the rules.
                    || (module.starts_with("policy") && name != "http::policies")
            })
            .collect();
        assert!(
            forbidden.is_empty(),
            "src/{} reaches {forbidden:?}; it must go through crate::limiter",
            name.replace("::", "/")
        );
    }
}
