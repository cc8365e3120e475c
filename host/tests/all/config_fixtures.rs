//! `switchyard validate` fixtures: every `ui/invalid/*.toml` must produce
//! exactly the diagnostics in the `.err` file beside it. Run with
//! `BLESS=1` to rewrite the `.err` files after an intended change.

use std::path::{Path, PathBuf};

use switchyard::config;

fn fixtures() -> Vec<PathBuf> {
    toml_files("tests/ui/invalid")
}

/// The `.toml` files of a directory of this package, in name order.
fn toml_files(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
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

/// The files of `ui/valid/`: together they hold every table the reader
/// knows, which makes them the source of the pipeline file's JSON Schema.
fn valid_fixtures() -> Vec<PathBuf> {
    toml_files("tests/ui/valid")
}

/// The published schema, where the example pipelines point taplo.
fn published_schema() -> PathBuf {
    crate::common::workspace_root().join("schemas/pipeline.schema.json")
}

fn as_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap();
    toml_edit::de::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_valid_fixtures_are_valid_pipelines() {
    let files = valid_fixtures();
    assert!(files.len() >= 3, "only {} fixtures", files.len());
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let (pipeline, diags) = config::parse(&text, &path);
        let shown: Vec<String> = diags
            .iter()
            .map(|d| d.render(&path.display().to_string(), &text))
            .collect();
        assert!(pipeline.is_some(), "{}", shown.join("\n"));
    }
}

/// The schema is generated from what the reader asks of the valid
/// fixtures; the published copy must be that. `BLESS=1` rewrites it.
#[test]
fn the_published_schema_is_the_one_the_reader_gives() {
    let texts: Vec<String> = valid_fixtures()
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    let docs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let schema = config::schema::generate(&docs).unwrap_or_else(|e| panic!("{e}"));
    let generated = format!("{}\n", serde_json::to_string_pretty(&schema).unwrap());
    let path = published_schema();
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let published = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        published == generated,
        "{} is not what the reader gives; run `BLESS=1 cargo test -p switchyard --test all config_fixtures` and commit it",
        path.display()
    );
}

fn validator() -> jsonschema::Validator {
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(published_schema()).unwrap()).unwrap();
    jsonschema::validator_for(&schema).unwrap()
}

/// Every pipeline the project ships or writes passes the schema: the
/// valid fixtures, the examples, and what `switchyard new` writes.
#[test]
fn every_valid_pipeline_passes_the_schema() {
    let validator = validator();
    let made = tempfile::tempdir().unwrap();
    let new = |args: &[&str]| {
        let out = std::process::Command::new(crate::common::bin())
            .current_dir(made.path())
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    };
    new(&["new", "pipeline", "shop"]);
    new(&["new", "plugin", "hello", "--lang", "c"]);
    let mut files = valid_fixtures();
    let examples = crate::common::workspace_root().join("pipelines");
    for entry in std::fs::read_dir(examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            files.push(path);
        }
    }
    files.push(made.path().join("shop.toml"));
    files.push(made.path().join("hello/pipeline.toml"));
    for path in &files {
        let errors: Vec<String> = validator
            .iter_errors(&as_json(path))
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{}: {errors:?}", path.display());
    }
}

/// The invalid fixtures whose mistake a schema can say (an unknown key, a
/// wrong type, a missing `wasm`) fail it; the others (values, ranges,
/// rules across plugins) are `switchyard validate`'s alone.
#[test]
fn invalid_fixtures_the_schema_can_express_fail_it() {
    let validator = validator();
    let mut failed = Vec::new();
    let mut passed = Vec::new();
    for path in fixtures() {
        let text = std::fs::read_to_string(&path).unwrap();
        let Ok(doc) = toml_edit::de::from_str::<serde_json::Value>(&text) else {
            continue; // not TOML at all
        };
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let errors: Vec<String> = validator
            .iter_errors(&doc)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        if errors.is_empty() {
            passed.push(name);
        } else {
            eprintln!("{name}: {errors:?}");
            failed.push(name);
        }
    }
    assert_eq!(failed, EXPRESSIBLE, "passed the schema: {passed:?}");
}

const EXPRESSIBLE: &[&str] = &[
    "bad-amqp",
    "bad-dead-letters",
    "bad-grants",
    "bad-kafka",
    "bad-limits",
    "bad-retry",
    "bad-schemas",
    "bad-telemetry",
    "bad-transport",
    "invalid-message-type",
    "invalid-plugin-name",
    "many-mistakes",
    "missing-wasm",
    "no-plugins",
    "plugin-not-a-table",
    "unknown-key",
    "wrong-type",
];

/// Every key the section parsers ask for by name is in the published
/// schema: a key read only on a path no valid fixture takes would
/// otherwise be missing from it, and editors would flag it as unknown.
#[test]
fn every_key_the_parsers_name_is_in_the_schema() {
    fn property_names(v: &serde_json::Value, out: &mut std::collections::BTreeSet<String>) {
        match v {
            serde_json::Value::Object(o) => {
                if let Some(serde_json::Value::Object(props)) = o.get("properties") {
                    out.extend(props.keys().cloned());
                }
                o.values().for_each(|v| property_names(v, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| property_names(v, out)),
            _ => {}
        }
    }
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(published_schema()).unwrap()).unwrap();
    let mut known = std::collections::BTreeSet::new();
    property_names(&schema, &mut known);
    let getters = [
        "string(",
        "required_string(",
        "bool(",
        "count(",
        "count_in(",
        "number(",
        "string_or_int(",
        "strings(",
        "strings_matching(",
        "table(",
        "tables(",
        "choice(",
        "require(",
        "duration(",
        "env_name(",
    ];
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/config/parse");
    let mut missing = Vec::new();
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for getter in getters {
            for (i, _) in text.match_indices(&format!(".{getter}")) {
                // The first string literal among the call's arguments.
                let args = &text[i + getter.len() + 1..];
                let end = args.find(')').unwrap_or(args.len());
                let Some(open) = args[..end].find('"') else {
                    continue;
                };
                let key: String = args[open + 1..].chars().take_while(|c| *c != '"').collect();
                if key.is_empty() || !key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                    continue;
                }
                seen += 1;
                if !known.contains(&key) {
                    missing.push(format!("{}: `{key}`", path.display()));
                }
            }
        }
    }
    assert!(
        seen > 50,
        "found only {seen} keys; is the scan still right?"
    );
    assert!(missing.is_empty(), "keys the schema lacks: {missing:?}");
}
