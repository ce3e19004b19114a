//! Golden scenario files (raft-rs datadriven style), shared by the sans-IO cores of the
//! filesystem crate (glocks, lock_dlm). Same format as lockd's `core/scenario.rs`:
//!
//! A file is a list of cases separated by blank lines; `#` lines are comments. A case is
//! one command line, a `----` line, and the expected output (one line per event,
//! possibly none). Run with `REWRITE=1` to rewrite the expected output from the actual
//! one, then read the diff: the files are the specification.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// Splits `cmd k=v k2=v2 flag` into the command and its arguments (a bare word maps to
/// the empty string).
pub(crate) fn parse_args(line: &str) -> (String, BTreeMap<String, String>) {
    let mut parts = line.split_whitespace();
    let cmd = parts.next().unwrap_or_default().to_string();
    let args = parts
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (p.to_string(), String::new()),
        })
        .collect();
    (cmd, args)
}

enum Item {
    Text(String),
    Case { line: usize, cmd: String, expected: Vec<String> },
}

fn parse(text: &str, path: &str) -> Vec<Item> {
    let lines: Vec<&str> = text.lines().collect();
    let mut items = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i];
        if l.trim().is_empty() || l.starts_with('#') {
            items.push(Item::Text(l.to_string()));
            i += 1;
            continue;
        }
        assert_eq!(lines.get(i + 1).copied(), Some("----"), "{path}:{}: expected ----", i + 2);
        let start = i;
        i += 2;
        let mut expected = Vec::new();
        while i < lines.len() && !lines[i].trim().is_empty() {
            expected.push(lines[i].to_string());
            i += 1;
        }
        items.push(Item::Case { line: start + 1, cmd: l.to_string(), expected });
    }
    items
}

/// Runs the scenario file `dir/file` through `exec` (one call per case, in order, with
/// the command line; it returns the output, lines separated by `\n`). Panics listing
/// every mismatch, or rewrites the file when `REWRITE` is set.
pub(crate) fn run_file(dir: &Path, file: &str, exec: &mut dyn FnMut(&str) -> String) {
    let path = dir.join(file);
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{shown}: {e}"));
    let mut failures = String::new();
    let mut rewritten = String::new();
    for item in parse(&text, &shown) {
        match item {
            Item::Text(t) => {
                rewritten.push_str(&t);
                rewritten.push('\n');
            }
            Item::Case { line, cmd, expected } => {
                let actual: Vec<String> = exec(&cmd).lines().map(str::to_string).collect();
                if actual != expected {
                    writeln!(
                        failures,
                        "{file}:{line}: {cmd}\n  expected:\n    {}\n  actual:\n    {}",
                        expected.join("\n    "),
                        actual.join("\n    ")
                    )
                    .unwrap();
                }
                rewritten.push_str(&cmd);
                rewritten.push_str("\n----\n");
                for l in &actual {
                    rewritten.push_str(l);
                    rewritten.push('\n');
                }
            }
        }
    }
    if std::env::var_os("REWRITE").is_some() {
        std::fs::write(&path, rewritten).unwrap();
        return;
    }
    assert!(failures.is_empty(), "scenario mismatches:\n{failures}");
}
