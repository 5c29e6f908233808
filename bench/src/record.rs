//! `--record`: one program's block of docs/BENCHMARKS.md replaced by its latest report,
//! the prose around the blocks left as it is.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

/// `doc` with the lines between `<!-- NAME:begin -->` and `<!-- NAME:end -->` replaced by
/// `body`; a missing block is appended first.
pub fn replace_block(doc: &str, name: &str, body: &str) -> String {
    let begin = format!("<!-- {name}:begin -->");
    let end = format!("<!-- {name}:end -->");
    let mut doc = doc.to_owned();
    if !doc.lines().any(|line| line == begin) {
        if !doc.is_empty() && !doc.ends_with('\n') {
            doc.push('\n');
        }
        doc.push_str(&format!("\n{begin}\n{end}\n"));
    }
    let mut out = String::with_capacity(doc.len() + body.len());
    let mut inside = false;
    for line in doc.lines() {
        if line == begin {
            out.push_str(line);
            out.push('\n');
            for body_line in body.lines() {
                out.push_str(body_line);
                out.push('\n');
            }
            inside = true;
            continue;
        }
        if line == end {
            inside = false;
        }
        if !inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Writes `body` into NAME's block of the document at `path` (made if missing).
pub fn record(path: &Path, name: &str, body: &str) -> Result<()> {
    let doc = match fs::read_to_string(path) {
        Ok(doc) => doc,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => "# Benchmarks\n".into(),
        Err(error) => return Err(error).with_context(|| format!("cannot read {}", path.display())),
    };
    fs::write(path, replace_block(&doc, name, body))
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_is_replaced_and_the_prose_around_it_kept() {
        let doc = "# Benchmarks\n\nprose\n\n<!-- bench.sh:begin -->\nold\nlines\n<!-- bench.sh:end -->\n\nmore prose\n";
        let updated = replace_block(doc, "bench.sh", "## Run\n\nnew\n");
        assert_eq!(
            updated,
            "# Benchmarks\n\nprose\n\n<!-- bench.sh:begin -->\n## Run\n\nnew\n<!-- bench.sh:end -->\n\nmore prose\n"
        );
    }

    #[test]
    fn only_the_named_block_changes() {
        let doc = "<!-- bench.sh:begin -->\na\n<!-- bench.sh:end -->\n<!-- memory.sh:begin -->\nb\n<!-- memory.sh:end -->\n";
        let updated = replace_block(doc, "memory.sh", "c\n");
        assert_eq!(
            updated,
            "<!-- bench.sh:begin -->\na\n<!-- bench.sh:end -->\n<!-- memory.sh:begin -->\nc\n<!-- memory.sh:end -->\n"
        );
    }

    #[test]
    fn a_missing_block_is_appended() {
        let updated = replace_block("# Benchmarks\n", "memory.sh", "body\n");
        assert_eq!(
            updated,
            "# Benchmarks\n\n<!-- memory.sh:begin -->\nbody\n<!-- memory.sh:end -->\n"
        );
    }
}
