//! The shape the crate docs promise (`src/lib.rs`, `docs/ARCHITECTURE.md`), checked on the
//! source text: no module imports one that imports it back, and the stores know nothing
//! of the HTTP framework.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every module of the library (`src/bin` is the load generator's), by its path.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read src/").flatten() {
            let path = entry.path();
            if path.is_dir() {
                if !path.ends_with("bin") {
                    walk(&path, found);
                }
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

/// The code of a file without comments and without its unit tests, which may reach
/// anywhere.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or(text);
    text.lines()
        .map(|line| line.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
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
        graph["decision"].contains("store"),
        "the reference finder must see decision's imports: {graph:?}"
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
fn the_stores_know_nothing_of_the_http_framework() {
    for (name, text) in modules() {
        if name.starts_with("store") || name.starts_with("bucket") || name == "decision" {
            assert!(
                !code(&text).contains("actix"),
                "src/{} uses actix",
                name.replace("::", "/")
            );
        }
    }
}
