//! The workspace's layout rules, checked on its sources so they stay true:
//!
//! 1. Inside every crate, no module imports (directly or through others) a module
//!    that imports it back. A parent may use its child modules; a child never uses
//!    what its parent defines (shared items live in a sibling instead).
//! 2. No source file in `bridge/src` or `pipeline/src` is longer than about 500 lines.
//! 3. Every `lib.rs` opens with `//!` docs that name each of its modules.
//! 4. The crate table in `docs/architecture.md` lists each crate's Argus
//!    dependencies as its `Cargo.toml` declares them.
//!
//! A module's imports are the module paths it names outside comments, string
//! literals and its inline `#[cfg(test)] mod tests`: `crate::a::b`, `super::x`,
//! `self::x`, and `child::x` for a `mod child;` it declares.
// A test that cannot read the tree must fail loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use regex::Regex;

/// The crates of the workspace (and their `src/`).
const CRATES: &[&str] = &[
    "schema",
    "pipeline",
    "bridge",
    "ingest-http",
    "pki",
    "loadtest",
    "testkit",
];
/// Longest source file allowed in `bridge/src` and `pipeline/src`.
const MAX_LINES: usize = 520;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

type Module = Vec<String>;

/// `a/b.rs` and `a/b/mod.rs` are `a::b`; `lib.rs` is the crate root (`[]`).
fn module_of(rel: &Path) -> Module {
    let mut parts: Vec<String> = rel
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") || parts == ["lib"] {
        parts.pop();
    }
    parts
}

/// The code without comments, string literals and the inline test module.
fn code_of(source: &str) -> String {
    let tests = Regex::new(r"(?s)#\[cfg\(test\)\]\s*mod tests\s*\{.*").unwrap();
    let comments = Regex::new(r"//[^\n]*").unwrap();
    let strings = Regex::new(r#""(\\.|[^"\\])*""#).unwrap();
    let s = tests.replace(source, "");
    let s = comments.replace_all(&s, "");
    strings.replace_all(&s, "\"\"").into_owned()
}

/// Module -> the modules it imports, for one crate's `src/`.
fn import_graph(src: &Path) -> BTreeMap<Module, BTreeSet<Module>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let has_lib = src.join("lib.rs").exists();
    let mut code = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(src).unwrap().to_path_buf();
        // A binary beside a library is its own crate.
        if has_lib && (rel == Path::new("main.rs") || rel.starts_with("bin")) {
            continue;
        }
        let module = if rel == Path::new("main.rs") {
            Vec::new()
        } else {
            module_of(&rel)
        };
        code.insert(module, code_of(&std::fs::read_to_string(&f).unwrap()));
    }
    let child_decl = Regex::new(r"(?m)^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;").unwrap();
    let path = Regex::new(r"\b\w+(?:::\w+)+").unwrap();
    let group = Regex::new(r"\b(crate|super)((?:::\w+)*)::\{([^}]*)\}").unwrap();
    let word = Regex::new(r"\w+").unwrap();
    // The longest prefix of `p` that is a module of this crate.
    let resolve = |p: &[String]| -> Option<Module> {
        (0..=p.len())
            .rev()
            .map(|i| p[..i].to_vec())
            .find(|m| code.contains_key(m))
    };
    let mut graph = BTreeMap::new();
    for (module, text) in &code {
        let children: BTreeSet<&str> = child_decl
            .captures_iter(text)
            .map(|c| c.get(1).unwrap().as_str())
            .collect();
        let absolute = |segs: &[&str]| -> Option<Vec<String>> {
            let own = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            match segs.first().copied()? {
                "crate" => Some(own(&segs[1..])),
                "self" => Some([module.clone(), own(&segs[1..])].concat()),
                "super" => {
                    let ups = segs.iter().take_while(|s| **s == "super").count();
                    let base = module[..module.len().saturating_sub(ups)].to_vec();
                    Some([base, own(&segs[ups..])].concat())
                }
                first if children.contains(first) => Some([module.clone(), own(segs)].concat()),
                _ => None,
            }
        };
        let mut imports = BTreeSet::new();
        for m in path.find_iter(text) {
            let segs: Vec<&str> = m.as_str().split("::").collect();
            if let Some(target) = absolute(&segs).and_then(|p| resolve(&p)) {
                imports.insert(target);
            }
        }
        for c in group.captures_iter(text) {
            let prefix: Vec<&str> = std::iter::once(c.get(1).unwrap().as_str())
                .chain(
                    c.get(2)
                        .unwrap()
                        .as_str()
                        .split("::")
                        .filter(|s| !s.is_empty()),
                )
                .collect();
            for name in word.find_iter(c.get(3).unwrap().as_str()) {
                let segs: Vec<&str> = prefix.iter().copied().chain([name.as_str()]).collect();
                if let Some(target) = absolute(&segs).and_then(|p| resolve(&p)) {
                    imports.insert(target);
                }
            }
        }
        imports.remove(module);
        graph.insert(module.clone(), imports);
    }
    graph
}

/// Modules that reach themselves through their imports, as `a -> b -> a` chains.
fn cycles(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<String> {
    let name = |m: &Module| {
        if m.is_empty() {
            "<crate root>".to_string()
        } else {
            m.join("::")
        }
    };
    let mut found = Vec::new();
    for start in graph.keys() {
        // Depth-first search for a path from `start` back to itself.
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        let mut seen = BTreeSet::new();
        while let Some((at, trail)) = stack.pop() {
            for next in &graph[&at] {
                if next == start {
                    let chain: Vec<String> = trail.iter().chain([start]).map(name).collect();
                    found.push(chain.join(" -> "));
                } else if seen.insert(next.clone()) {
                    let mut t = trail.clone();
                    t.push(next.clone());
                    stack.push((next.clone(), t));
                }
            }
        }
    }
    found
}

#[test]
fn no_module_imports_a_module_that_imports_it_back() {
    let mut all = Vec::new();
    for krate in CRATES {
        let graph = import_graph(&workspace().join(krate).join("src"));
        assert!(
            graph.len() > 1 || *krate == "testkit",
            "{krate}: no modules found"
        );
        for c in cycles(&graph) {
            all.push(format!("{krate}: {c}"));
        }
    }
    assert!(all.is_empty(), "import cycles:\n{}", all.join("\n"));
}

#[test]
fn the_checker_sees_a_cycle() {
    // The rule above must be able to fail: a parent that uses its child while the
    // child uses the parent's item is a cycle.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::write(src.join("lib.rs"), "pub mod a;\n").unwrap();
    std::fs::create_dir(src.join("a")).unwrap();
    std::fs::write(
        src.join("a/mod.rs"),
        "mod b;\npub struct Shared;\npub use b::run;\n",
    )
    .unwrap();
    std::fs::write(src.join("a/b.rs"), "use super::Shared;\npub fn run() {}\n").unwrap();
    let found = cycles(&import_graph(src));
    assert!(found.iter().any(|c| c == "a -> a::b -> a"), "{found:?}");
    // ... and a child that only uses a sibling is not.
    std::fs::write(src.join("a/mod.rs"), "mod b;\nmod c;\npub use b::run;\n").unwrap();
    std::fs::write(src.join("a/c.rs"), "pub struct Shared;\n").unwrap();
    std::fs::write(
        src.join("a/b.rs"),
        "use super::c::Shared;\npub fn run() {}\n",
    )
    .unwrap();
    assert!(cycles(&import_graph(src)).is_empty());
}

#[test]
fn source_files_stay_small_in_bridge_and_pipeline() {
    let mut long = Vec::new();
    for krate in ["bridge", "pipeline"] {
        let mut files = Vec::new();
        rust_files(&workspace().join(krate).join("src"), &mut files);
        for f in files {
            let lines = std::fs::read_to_string(&f).unwrap().lines().count();
            if lines > MAX_LINES {
                long.push(format!("{} ({lines} lines)", f.display()));
            }
        }
    }
    assert!(
        long.is_empty(),
        "split these along their seams (at most {MAX_LINES} lines):\n{}",
        long.join("\n")
    );
}

#[test]
fn every_lib_rs_names_its_modules_in_its_docs() {
    let decl = Regex::new(r"(?m)^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;").unwrap();
    let mut missing = Vec::new();
    for krate in CRATES {
        let path = workspace().join(krate).join("src/lib.rs");
        let text = std::fs::read_to_string(&path).unwrap();
        let docs: String = text
            .lines()
            .take_while(|l| l.starts_with("//!") || l.trim().is_empty())
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            !docs.trim().is_empty(),
            "{krate}/src/lib.rs has no //! docs"
        );
        for m in decl.captures_iter(&text) {
            let name = m.get(1).unwrap().as_str();
            if !docs.contains(&format!("`{name}`")) {
                missing.push(format!("{krate}: `{name}`"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "modules the crate docs do not name:\n{}",
        missing.join("\n")
    );
}

/// `(normal, dev)` dependencies on other Argus crates, from one `Cargo.toml`.
fn argus_deps(manifest: &Path) -> (BTreeSet<String>, BTreeSet<String>) {
    let dep = Regex::new(r"^(argus-[a-z-]+)\s*(?:\.workspace\s*=|=)").unwrap();
    let (mut normal, mut dev) = (BTreeSet::new(), BTreeSet::new());
    let mut section = String::new();
    for line in std::fs::read_to_string(manifest).unwrap().lines() {
        let line = line.trim();
        if line.starts_with('[') {
            section = line.to_string();
        } else if let Some(c) = dep.captures(line) {
            let name = c[1].to_string();
            match section.as_str() {
                "[dependencies]" => normal.insert(name),
                "[dev-dependencies]" => dev.insert(name),
                _ => false,
            };
        }
    }
    (normal, dev)
}

#[test]
fn the_crate_table_in_the_architecture_doc_matches_the_manifests() {
    let doc = std::fs::read_to_string(workspace().join("docs/architecture.md")).unwrap();
    let row = Regex::new(r"(?m)^\| `(argus-[a-z-]+)`[^|]* \| ([^|]*) \|$").unwrap();
    let name = Regex::new(r"`(argus-[a-z-]+)`").unwrap();
    let mut rows = BTreeMap::new();
    for c in row.captures_iter(&doc) {
        let cell = &c[2];
        let (normal, dev) = cell.split_once("[dev:").unwrap_or((cell, ""));
        let names = |s: &str| -> BTreeSet<String> {
            name.captures_iter(s).map(|n| n[1].to_string()).collect()
        };
        rows.insert(c[1].to_string(), (names(normal), names(dev)));
    }
    let crates: Vec<(String, &str)> = CRATES
        .iter()
        .map(|c| (format!("argus-{c}"), *c))
        .chain([("argus-fuzz".to_string(), "fuzz")])
        .collect();
    for (krate, dir) in crates {
        let actual = argus_deps(&workspace().join(dir).join("Cargo.toml"));
        let documented = rows
            .get(&krate)
            .unwrap_or_else(|| panic!("docs/architecture.md has no row for {krate}"));
        assert_eq!(
            documented, &actual,
            "docs/architecture.md's row for {krate} (normal, dev) differs from {dir}/Cargo.toml"
        );
    }
}
