//! `switchyard validate` fixtures: every `ui/invalid/*.toml` must produce
//! exactly the diagnostics in the `.err` file beside it. Run with
//! `BLESS=1` to rewrite the `.err` files after an intended change.

use std::path::{Path, PathBuf};

use switchyard::config;

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui/invalid");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

fn render(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let (pipeline, diags) = config::parse(&text, path);
    assert!(
        pipeline.is_none(),
        "{} parsed without errors",
        path.display()
    );
    let shown = format!("ui/invalid/{}", path.file_name().unwrap().to_string_lossy());
    diags
        .iter()
        .map(|d| d.render(&shown, &text))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn invalid_pipelines_report_every_error_with_its_place() {
    let files = fixtures();
    assert!(files.len() >= 10, "only {} fixtures", files.len());
    let bless = std::env::var_os("BLESS").is_some();
    let mut mismatches = Vec::new();
    for toml in files {
        let actual = render(&toml);
        let expected_path = toml.with_extension("err");
        if bless {
            std::fs::write(&expected_path, &actual).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|_| panic!("{} is missing; run with BLESS=1", expected_path.display()));
        if actual != expected {
            mismatches.push(format!(
                "--- {}\n{expected}\n+++ actual\n{actual}",
                expected_path.display()
            ));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn the_example_pipelines_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let loaded = config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                loaded.warnings.is_empty(),
                "{}: {:?}",
                path.display(),
                loaded.warnings
            );
            n += 1;
        }
    }
    assert!(n >= 1);
}

#[test]
fn a_valid_pipeline_resolves_defaults_and_paths() {
    let text = r#"
        [defaults]
        memory = "16 MiB"
        [plugins.a]
        wasm = "a.wasm"
        commands = ["DoIt"]
        timeout = "250ms"
        [plugins.b]
        wasm = "/abs/b.wasm"
        events = ["Done"]
        memory = 33554432
        [plugins.b.grants]
        env = { MODE = "test" }
        dirs = [{ host = "data", guest = "/data", writable = true }]
        network = ["127.0.0.1:6379"]
        clock = true
    "#;
    let (pipeline, diags) = config::parse(text, Path::new("/srv/p/shop.toml"));
    assert!(!diags.has_errors(), "{diags:?}");
    let p = pipeline.unwrap();
    assert_eq!(p.name, "shop");
    assert_eq!(
        p.embedded().unwrap().path,
        Path::new("/srv/p/.switchyard/shop.db")
    );
    let a = p.plugin("a").unwrap();
    assert_eq!(a.wasm, Path::new("/srv/p/a.wasm"));
    assert_eq!(a.limits.memory, 16 << 20);
    assert_eq!(a.limits.timeout, std::time::Duration::from_millis(250));
    let b = p.plugin("b").unwrap();
    assert_eq!(b.wasm, Path::new("/abs/b.wasm"));
    assert_eq!(b.limits.memory, 32 << 20);
    assert_eq!(b.grants.env, vec![("MODE".to_owned(), "test".to_owned())]);
    assert_eq!(b.grants.dirs[0].host, Path::new("/srv/p/data"));
    assert!(b.grants.dirs[0].writable && b.grants.clock);
    assert_eq!(b.grants.network, vec!["127.0.0.1:6379".parse().unwrap()]);
    assert_eq!(p.kind_of("DoIt"), Some(switchyard::envelope::Kind::Command));
    assert_eq!(p.subscribers("Done").len(), 1);
}
