//! The shape of the code, held (issue 12): the neutral core names no server and no backend, and
//! no module imports one that imports it back. Read from the sources, so a regression fails here
//! rather than in a review.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src");

/// The modules of the flow that must not know which servers they run on.
const NEUTRAL: &[&str] = &[
    "event",
    "lane",
    "dead_letter",
    "caps",
    "sensors",
    "alerts",
    "codec",
    "seam",
    "intake",
    "worker",
    "status",
    "dlq",
    "metrics",
];

/// What naming a backend looks like.
const BACKEND_WORDS: &[&str] = &[
    "crate::servers",
    "crate::embedded",
    "redis::",
    "tokio_postgres",
    "rusqlite",
];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without comments and without its tests.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("read");
    let text = match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => &text[..],
    };
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `servers/queue.rs` → `servers::queue`; `worker/mod.rs` → `worker`.
fn module(path: &Path) -> String {
    let rel = path.strip_prefix(SRC).expect("under src");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts.join("::")
}

/// The module paths `text` names after `prefix` (`crate::a::b`, `super::c`).
fn named<'a>(text: &'a str, prefix: &'a str) -> impl Iterator<Item = Vec<&'a str>> + 'a {
    text.match_indices(prefix).map(move |(i, _)| {
        let rest = &text[i + prefix.len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_' || c == ':' || c.is_ascii_digit()))
            .unwrap_or(rest.len());
        rest[..end].split("::").filter(|s| !s.is_empty()).collect()
    })
}

#[test]
fn the_neutral_core_names_no_server_and_no_backend() {
    let mut files = Vec::new();
    sources(Path::new(SRC), &mut files);
    let mut found = Vec::new();
    for file in &files {
        let m = module(file);
        let top = m.split("::").next().unwrap_or_default();
        if !NEUTRAL.contains(&top) {
            continue;
        }
        let text = code(file);
        for word in BACKEND_WORDS {
            if text.contains(word) {
                found.push(format!("{m} names {word}"));
            }
        }
    }
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let mut files = Vec::new();
    sources(Path::new(SRC), &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| module(f)).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let me = module(file);
        if me == "lib" || me.starts_with("bin") {
            continue;
        }
        let text = code(file);
        let parent: Vec<&str> = {
            let mut p: Vec<&str> = me.split("::").collect();
            p.pop();
            p
        };
        let mut targets = Vec::new();
        for path in named(&text, "crate::") {
            // The longest prefix that is a module.
            if let Some(m) = (1..=path.len())
                .rev()
                .map(|k| path[..k].join("::"))
                .find(|m| modules.contains(m))
            {
                targets.push(m);
            }
        }
        for path in named(&text, "super::") {
            if let Some(first) = path.first() {
                let mut p = parent.clone();
                p.push(first);
                targets.push(p.join("::"));
            }
        }
        for t in targets {
            // A module's own children and ancestors are its parts, not its neighbours.
            if t != me
                && modules.contains(&t)
                && !me.starts_with(&format!("{t}::"))
                && !t.starts_with(&format!("{me}::"))
            {
                edges.entry(me.clone()).or_default().insert(t);
            }
        }
    }
    // Any cycle shows as a path back to where it started.
    let mut cycles = Vec::new();
    for start in edges.keys() {
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        let mut seen = BTreeSet::new();
        while let Some((node, path)) = stack.pop() {
            for next in edges.get(&node).into_iter().flatten() {
                if next == start {
                    cycles.push(path.join(" → ") + " → " + start);
                } else if seen.insert(next.clone()) {
                    let mut p = path.clone();
                    p.push(next.clone());
                    stack.push((next.clone(), p));
                }
            }
        }
    }
    assert!(cycles.is_empty(), "{cycles:#?}");
}
