//! The crate's shape, checked from its sources: no import cycle among its modules, nothing
//! imports from the crate root (`lib.rs` only declares and re-exports), and the pure core
//! (`src/mutate/`) uses nothing that talks to the API server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// Every module of `src/` (by path, `""` for the crate root) and its source file.
fn modules(dir: &Path, src: &Path, out: &mut BTreeMap<String, PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            modules(&path, src, out);
            continue;
        }
        let rel = path.strip_prefix(src).unwrap().with_extension("");
        let mut segs: Vec<String> = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
        match segs.last().map(String::as_str) {
            Some("main") => continue,
            Some("mod") => drop(segs.pop()),
            Some("lib") if segs.len() == 1 => segs.clear(),
            _ => {}
        }
        out.insert(segs.join("::"), path);
    }
}

/// The source without its test module(s) and `//` comments.
fn code(text: &str) -> String {
    let body = match text.find("\n#[cfg(test)]\n") {
        Some(i) if text[i..].lines().take(4).any(|l| l.starts_with("mod ")) => &text[..i],
        _ => text,
    };
    body.lines()
        .map(|l| l.find("//").map_or(l, |i| &l[..i]))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `a::{b, c::{d, e}}` → `a::b`, `a::c::d`, `a::c::e`.
fn expand(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        let path = tree.split(" as ").next().unwrap_or(tree).trim();
        return vec![path.to_owned()];
    };
    let (prefix, inner) = (&tree[..open], &tree[open + 1..tree.rfind('}').unwrap()]);
    let (mut parts, mut depth, mut cur) = (Vec::new(), 0, String::new());
    for c in inner.chars() {
        match c {
            ',' if depth == 0 => parts.push(std::mem::take(&mut cur)),
            '{' => (depth += 1, cur.push(c)).1,
            '}' => (depth -= 1, cur.push(c)).1,
            _ => cur.push(c),
        }
    }
    parts.push(cur);
    parts
        .iter()
        .filter(|p| !p.trim().is_empty())
        .flat_map(|p| expand(&format!("{prefix}{}", p.trim())))
        .collect()
}

/// The modules `module` refers to: its `use` trees and inline `crate::` paths, each resolved
/// to the deepest module that exists.
fn imports(module: &str, text: &str, mods: &BTreeMap<String, PathBuf>) -> BTreeSet<String> {
    let here: Vec<&str> = module.split("::").filter(|s| !s.is_empty()).collect();
    let mut paths = Vec::new();
    let (mut rest, mut outside) = (text, String::new());
    while let Some(i) = rest.find("use ") {
        let boundary = i == 0 || !rest.as_bytes()[i - 1].is_ascii_alphanumeric();
        let Some(end) = rest[i..].find(';') else { break };
        outside.push_str(&rest[..i]);
        if !boundary {
            outside.push_str(&rest[i..i + end]);
        } else {
            for p in expand(&rest[i + 4..i + end]) {
                let segs: Vec<&str> = p.split("::").collect();
                let full: Vec<&str> = match segs[0] {
                    "crate" => segs[1..].to_vec(),
                    "super" => here[..here.len().saturating_sub(1)]
                        .iter()
                        .chain(&segs[1..])
                        .copied()
                        .collect(),
                    "self" => here.iter().chain(&segs[1..]).copied().collect(),
                    child if mods.contains_key(&[here.as_slice(), &[child]].concat().join("::")) => {
                        here.iter().chain(&segs).copied().collect()
                    }
                    _ => continue,
                };
                paths.push(full.join("::"));
            }
        }
        rest = &rest[i + end..];
    }
    outside.push_str(rest);
    for (i, _) in outside.match_indices("crate::") {
        let tail = &outside[i + 7..];
        let len = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        let path = tail[..len].trim_end_matches(':');
        if !path.is_empty() {
            paths.push(path.to_owned());
        }
    }
    paths
        .iter()
        .filter_map(|p| {
            let segs: Vec<&str> = p.split("::").filter(|s| *s != "self").collect();
            (0..=segs.len())
                .rev()
                .map(|n| segs[..n].join("::"))
                .find(|m| mods.contains_key(m))
        })
        .filter(|m| m != module)
        .collect()
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut mods = BTreeMap::new();
    modules(&src, &src, &mut mods);
    mods.iter()
        .filter(|(m, _)| !m.is_empty())
        .map(|(m, f)| {
            (
                m.clone(),
                imports(m, &code(&std::fs::read_to_string(f).unwrap()), &mods),
            )
        })
        .collect()
}

#[test]
fn imports_run_downwards_without_cycles() {
    let graph = graph();
    assert!(graph.len() > 30, "{graph:?}");
    let upward: Vec<&String> = graph
        .iter()
        .filter(|(_, e)| e.contains(""))
        .map(|(m, _)| m)
        .collect();
    assert!(upward.is_empty(), "modules that import from lib.rs: {upward:?}");
    // Depth-first search; a module met again while on the stack closes a cycle.
    fn visit<'g>(
        m: &'g str,
        graph: &'g BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<&'g str>,
        done: &mut BTreeSet<&'g str>,
    ) {
        if let Some(at) = stack.iter().position(|s| *s == m) {
            panic!("import cycle: {} -> {m}", stack[at..].join(" -> "));
        }
        if !done.insert(m) {
            return;
        }
        stack.push(m);
        for next in graph.get(m).into_iter().flatten() {
            visit(next, graph, stack, done);
        }
        stack.pop();
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        visit(m, &graph, &mut Vec::new(), &mut done);
    }
}

#[test]
fn the_pure_core_talks_to_no_api() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/mutate");
    let mut files = BTreeMap::new();
    modules(&dir, &dir, &mut files);
    assert!(files.len() >= 6, "{files:?}");
    for file in files.values() {
        let text = code(&std::fs::read_to_string(file).unwrap());
        for word in ["Api", "Client", "crate::kube"] {
            let found = text.match_indices(word).any(|(i, _)| {
                let before = text[..i].chars().next_back();
                let after = text[i + word.len()..].chars().next();
                !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
                    && !after.is_some_and(|c| c.is_alphanumeric() || c == '_')
            });
            assert!(!found, "{} uses {word}", file.display());
        }
    }
}
