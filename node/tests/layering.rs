//! The layering of `node/src` (ARCHITECTURE.md, "Layers"): the modules import
//! each other without a cycle, and `state` — the persisted and replicated
//! formats — imports nothing above it. Read from the sources' `crate::` paths.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every source file of `node/src`.
fn source_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![src()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            match path.is_dir() {
                true => stack.push(path),
                false => files.push(path),
            }
        }
    }
    files
}

/// The top-level module each file of `node/src` belongs to, and the
/// top-level modules it names through `crate::`.
fn module_imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = src();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in source_files() {
        let rel = path.strip_prefix(&src).unwrap();
        let first = rel.components().next().unwrap().as_os_str().to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let deps = graph.entry(module.clone()).or_default();
        for name in crate_paths(&text) {
            if name != module {
                deps.insert(name);
            }
        }
    }
    graph
}

/// The first segment of every `crate::` path in `text`, including those of
/// `use crate::{a, b::c}` groups. Comments are skipped.
fn crate_paths(text: &str) -> Vec<String> {
    let code: Vec<&str> = text
        .lines()
        .map(str::trim_start)
        .filter(|l| !l.starts_with("//"))
        .collect();
    let code = code.join("\n");
    let mut out = Vec::new();
    {
        let mut rest = code.as_str();
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for item in group[..end].split(',') {
                    let seg = item.trim().split("::").next().unwrap_or("");
                    if !seg.is_empty() {
                        out.push(seg.to_string());
                    }
                }
                continue;
            }
            let seg: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !seg.is_empty() {
                out.push(seg);
            }
        }
    }
    out
}

/// A cycle through `graph`, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut cycle = path[i..].to_vec();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for next in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

#[test]
fn the_modules_of_node_src_import_each_other_without_a_cycle() {
    let graph = module_imports();
    assert!(graph.len() > 10, "read the sources: {graph:?}");
    assert_eq!(find_cycle(&graph), None, "{graph:#?}");
}

#[test]
fn the_stored_formats_depend_on_nothing_above_them() {
    let graph = module_imports();
    let allowed: BTreeSet<String> = ["clock", "names"].map(String::from).into();
    for leaf in ["state", "clock", "names"] {
        let deps = &graph[leaf];
        assert!(deps.is_subset(&allowed), "{leaf} imports {deps:?}");
    }
}

#[test]
fn the_checks_see_imports_and_cycles() {
    let paths = crate_paths(
        "use crate::{a, b::c};\n// crate::d\nlet x = crate::e::f();\nuse crate::{\n    g,\n    h,\n};",
    );
    assert_eq!(paths, ["a", "b", "e", "g", "h"]);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.entry("x".into()).or_default().insert("y".into());
    g.entry("y".into()).or_default().insert("x".into());
    assert_eq!(find_cycle(&g), Some(vec!["x".into(), "y".into(), "x".into()]));
}

/// Every error a client sees is built by `node/src/error.rs` (typed, with a
/// stable reason): no other file constructs a `tonic::Status` itself.
#[test]
fn every_status_is_built_in_the_error_module() {
    let mut found = Vec::new();
    for path in source_files().into_iter().filter(|p| !p.ends_with("error.rs")) {
        let text = std::fs::read_to_string(&path).unwrap();
        for (i, line) in text.lines().enumerate() {
            if let Some(at) = line.find("Status::") {
                let after = &line[at + "Status::".len()..];
                let ctor: String = after
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if !ctor.is_empty() && after[ctor.len()..].starts_with('(') {
                    found.push(format!("{}:{}: {}", path.display(), i + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "statuses built outside node/src/error.rs:\n{}",
        found.join("\n")
    );
}
