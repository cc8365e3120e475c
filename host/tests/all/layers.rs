//! The host's modules depend on each other one way: from the command line
//! down to configuration, the envelope and the text helpers. This test
//! reads `host/src`, finds every `crate::<module>` path outside comments
//! and test modules, and fails on any cycle between top-level modules,
//! naming the lines that close it.
//!
//! Run it alone with `cargo test -p switchyard --test all layers -- --nocapture`
//! to print the graph. A second test holds the modules to the layers of
//! `host/src/lib.rs`'s module map.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// module → module it uses → where (file:line).
type Graph = BTreeMap<String, BTreeMap<String, Vec<String>>>;

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

/// Top-level modules of the library and the files each is made of.
fn modules(src: &Path) -> BTreeMap<String, Vec<PathBuf>> {
    let mut modules = BTreeMap::new();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            let mut files = Vec::new();
            rust_files(&path, &mut files);
            modules.insert(name, files);
        } else if path.extension().is_some_and(|e| e == "rs") && name != "lib" && name != "main" {
            modules.entry(name).or_insert_with(Vec::new).push(path);
        }
    }
    modules
}

/// The code of a file without its unit tests (a `#[cfg(test)]` item that
/// opens a `mod`, to the end of the file, as this code base writes them).
fn without_tests(text: &str) -> Vec<&str> {
    let lines: Vec<&str> = text.lines().collect();
    let end = (0..lines.len())
        .find(|&i| {
            lines[i].trim() == "#[cfg(test)]"
                && lines
                    .get(i + 1)
                    .is_some_and(|l| l.trim_start().starts_with("mod "))
        })
        .unwrap_or(lines.len());
    lines[..end].to_vec()
}

/// Module names a line reaches through `crate::`.
fn crate_paths(line: &str) -> Vec<String> {
    let code = match line.find("//") {
        Some(i) => &line[..i],
        None => line,
    };
    code.match_indices("crate::")
        .filter(|(i, _)| {
            // `switchyard::crate::` does not occur; `$crate::` in macros is
            // still this crate.
            *i == 0 || !code.as_bytes()[i - 1].is_ascii_alphanumeric()
        })
        .map(|(i, m)| {
            code[i + m.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

fn graph(src: &Path) -> Graph {
    let modules = modules(src);
    let mut graph = Graph::new();
    for (module, files) in &modules {
        let uses = graph.entry(module.clone()).or_default();
        for file in files {
            let text = std::fs::read_to_string(file).unwrap();
            for (n, line) in without_tests(&text).iter().enumerate() {
                for used in crate_paths(line) {
                    if &used != module && modules.contains_key(&used) {
                        let at = format!("{}:{}", file.strip_prefix(src).unwrap().display(), n + 1);
                        uses.entry(used).or_default().push(at);
                    }
                }
            }
        }
    }
    graph
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(graph: &Graph) -> Vec<BTreeSet<String>> {
    struct Walk<'a> {
        graph: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        found: Vec<BTreeSet<String>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, v: &'a str) {
            let i = self.index.len();
            self.index.insert(v, i);
            self.low.insert(v, i);
            self.stack.push(v);
            for w in self.graph[v].keys() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if self.stack.contains(&w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = BTreeSet::new();
                while let Some(w) = self.stack.pop() {
                    component.insert(w.to_owned());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    self.found.push(component);
                }
            }
        }
    }
    let mut walk = Walk {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !walk.index.contains_key(v.as_str()) {
            walk.visit(v);
        }
    }
    walk.found
}

/// The layers of `host/src/lib.rs`'s module map, from the top down. A
/// module may use modules of lower layers only.
const LAYERS: &[&[&str]] = &[
    &["cli"],
    &["testing"],
    &["runtime"],
    &["ingress"],
    &["admin"],
    &["console"],
    &["fleet"],
    &["supervisor"],
    &["dispatch"],
    &["crash_loop", "story"],
    &["dlq"],
    &["transport"],
    &["journal"],
    &["schemas"],
    &["plugin"],
    &["state"],
    &["pg"],
    &["telemetry"],
    &["limits"],
    &["config"],
    &["saga"],
    &["envelope"],
    &["recover"],
    &["text", "files", "json_diff", "pem"],
];

#[test]
fn host_modules_use_only_the_layers_below_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = graph(&src);
    let layer = |m: &str| LAYERS.iter().position(|l| l.contains(&m));
    let mut wrong = Vec::new();
    for (module, uses) in &graph {
        let Some(mine) = layer(module) else {
            wrong.push(format!("{module} is not in LAYERS (nor in lib.rs's map?)"));
            continue;
        };
        for (used, at) in uses {
            if layer(used).is_none_or(|theirs| theirs <= mine) {
                wrong.push(format!("{module} -> {used} at {}", at.join(", ")));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "uses that do not go down:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn host_modules_depend_on_each_other_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = graph(&src);
    for (module, uses) in &graph {
        let names: Vec<&str> = uses.keys().map(String::as_str).collect();
        println!("{module} -> {}", names.join(" "));
    }
    let found = cycles(&graph);
    let mut report = String::new();
    for component in &found {
        report.push_str(&format!("cycle among {component:?}:\n"));
        for a in component {
            for (b, at) in &graph[a] {
                if component.contains(b) {
                    report.push_str(&format!("  {a} -> {b} at {}\n", at.join(", ")));
                }
            }
        }
    }
    assert!(found.is_empty(), "{report}");
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    let mut graph = Graph::new();
    let edge = |g: &mut Graph, a: &str, b: &str| {
        g.entry(a.into())
            .or_default()
            .insert(b.into(), vec!["x.rs:1".into()]);
        g.entry(b.into()).or_default();
    };
    edge(&mut graph, "cli", "runtime");
    edge(&mut graph, "runtime", "dispatch");
    edge(&mut graph, "dispatch", "config");
    assert!(cycles(&graph).is_empty());
    edge(&mut graph, "config", "runtime");
    let found = cycles(&graph);
    assert_eq!(found.len(), 1);
    assert_eq!(
        found[0],
        ["config", "dispatch", "runtime"]
            .into_iter()
            .map(String::from)
            .collect()
    );
    assert_eq!(
        crate_paths("use crate::plugin::{A, B}; // crate::dlq"),
        ["plugin"]
    );
    assert!(crate_paths("/// [`crate::dlq`]").is_empty());
}
