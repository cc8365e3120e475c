//! `switchyard new`: a project of each language, made in an empty
//! directory, builds with the commands its README gives, passes its
//! contract tests, and answers a command in a running host.
//!
//! The builds use the tools `cargo xtask build-plugins` installs for the
//! example plugins (componentize-py, wit-bindgen, wasm-tools) and the
//! machine's cargo, npm and clang.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;

use crate::common::{bin, stop, workspace_root};

/// One project build at a time: each is a whole toolchain's work, and the
/// other tests run beside them on the same cores.
static BUILDS: Mutex<()> = Mutex::new(());

fn one_build_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    BUILDS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from)
}

/// Where `cargo xtask` installs crates.io tools (`SWITCHYARD_TOOLS`).
fn tool(name: &str) -> PathBuf {
    std::env::var_os("SWITCHYARD_TOOLS")
        .map_or_else(|| home().join(".cache/switchyard-tools"), PathBuf::from)
        .join("bin")
        .join(name)
}

/// The componentize-py `cargo xtask` installs (`SWITCHYARD_VENV`).
fn componentize_py() -> PathBuf {
    std::env::var_os("SWITCHYARD_VENV")
        .map_or_else(|| home().join(".cache/switchyard-venv"), PathBuf::from)
        .join("bin/componentize-py")
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a command, failing the test with its output if it fails.
fn ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed:\n{}", text(&out));
    out
}

fn switchyard(dir: &Path) -> Command {
    let mut c = Command::new(bin());
    c.current_dir(dir);
    c
}

/// `switchyard new plugin hello --lang LANG` in an empty directory; the
/// project's directory.
fn new_plugin(lang: &str, dir: &Path) -> PathBuf {
    let out = ok(switchyard(dir).args(["new", "plugin", "hello", "--lang", lang]));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("switchyard test"), "{said}");
    assert!(said.contains("switchyard run pipeline.toml"), "{said}");
    let project = dir.join("hello");
    for file in [
        "README.md",
        "pipeline.toml",
        "tests/contract.toml",
        ".gitignore",
    ] {
        assert!(project.join(file).is_file(), "{lang}: no {file}");
    }
    project
}

/// The built project: its contract tests pass, its pipeline validates, and
/// a host running it answers `Greet` with the greeting.
fn contract_and_reply(project: &Path, wasm: &str) {
    let out = ok(switchyard(project).args(["test", wasm, "tests/contract.toml"]));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("4 passed, 0 failed"), "{said}");
    ok(switchyard(project).args(["validate", "pipeline.toml"]));

    /// Killed if the test fails before it stops it.
    struct Host(Option<std::process::Child>);
    impl Drop for Host {
        fn drop(&mut self) {
            if let Some(mut c) = self.0.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let mut host = Host(Some(
        switchyard(project)
            .args(["run", "pipeline.toml"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ));
    let out = ok(switchyard(project).args([
        "send",
        "Greet",
        "-p",
        "pipeline.toml",
        "--data",
        r#"{"name":"ada"}"#,
        "--wait-reply",
        "60s",
    ]));
    if let Some(h) = host.0.take() {
        stop(h);
    }
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("reply is not JSON ({e}):\n{}", text(&out)));
    assert_eq!(reply, serde_json::json!({ "greeting": "Hello, ada!" }));
}

#[test]
fn a_python_project_builds_passes_its_contract_and_answers() {
    let _build = one_build_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let project = new_plugin("python", dir.path());
    assert!(project.join("wit/plugin.wit").is_file());
    // build.sh installs componentize-py into .venv/ unless told where one is.
    ok(Command::new("./build.sh")
        .current_dir(&project)
        .env("COMPONENTIZE_PY", componentize_py()));
    contract_and_reply(&project, "hello.wasm");
}

#[test]
fn a_rust_project_builds_passes_its_contract_and_answers() {
    let _build = one_build_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let project = new_plugin("rust", dir.path());
    // The SDK of this checkout, by absolute path.
    let manifest = std::fs::read_to_string(project.join("Cargo.toml")).unwrap();
    let sdk = workspace_root().join("plugin-sdk").canonicalize().unwrap();
    assert!(
        manifest.contains(&format!("path = \"{}\"", sdk.display())),
        "{manifest}"
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // The project builds where its README says, whatever target directory
    // this test run uses.
    ok(Command::new(&cargo)
        .current_dir(&project)
        .env_remove("CARGO_TARGET_DIR")
        .args(["build", "--target", "wasm32-wasip2", "--release", "--quiet"]));
    ok(Command::new(&cargo)
        .current_dir(&project)
        .env_remove("CARGO_TARGET_DIR")
        .args(["test", "--quiet"]));
    contract_and_reply(&project, "target/wasm32-wasip2/release/hello.wasm");
}

#[test]
fn a_javascript_project_builds_passes_its_contract_and_answers() {
    let _build = one_build_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let project = new_plugin("javascript", dir.path());
    assert!(project.join("hello.js").is_file());
    ok(Command::new("npm").current_dir(&project).args([
        "install",
        "--no-audit",
        "--no-fund",
        "--loglevel=error",
    ]));
    ok(Command::new("npm")
        .current_dir(&project)
        .args(["run", "build", "--silent"]));
    contract_and_reply(&project, "hello.wasm");
}

#[test]
fn a_c_project_builds_passes_its_contract_and_answers() {
    let _build = one_build_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let project = new_plugin("c", dir.path());
    assert!(
        project
            .join("wasi_snapshot_preview1.reactor.wasm")
            .is_file()
    );
    ok(Command::new("make")
        .current_dir(&project)
        .arg("--quiet")
        .args([
            format!("WIT_BINDGEN={}", tool("wit-bindgen").display()),
            format!("WASM_TOOLS={}", tool("wasm-tools").display()),
        ]));
    contract_and_reply(&project, "hello.wasm");
}

#[test]
fn a_new_pipeline_file_validates_once_its_plugin_is_built() {
    let _build = one_build_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let out = ok(switchyard(dir.path()).args(["new", "pipeline", "shop"]));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("shop.toml"),
        "{}",
        text(&out)
    );
    let file = dir.path().join("shop.toml");
    let written = std::fs::read_to_string(&file).unwrap();
    assert!(written.contains("name = \"shop\""), "{written}");
    // Valid TOML and a valid pipeline, short only of the plugin's component.
    ok(switchyard(dir.path()).args(["validate", "--offline", "shop.toml"]));
    refused(
        dir.path(),
        &["validate", "shop.toml"],
        "greeter/greeter.wasm: no such file",
    );
    // The Python project `new plugin greeter` makes is the plugin it names.
    let project = {
        ok(switchyard(dir.path()).args(["new", "plugin", "greeter", "--lang", "python"]));
        dir.path().join("greeter")
    };
    ok(Command::new("./build.sh")
        .current_dir(&project)
        .env("COMPONENTIZE_PY", componentize_py()));
    ok(switchyard(dir.path()).args(["validate", "shop.toml"]));
    // Never overwritten.
    refused(dir.path(), &["new", "pipeline", "shop"], "already exists");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), written);
}

/// Runs `switchyard ARGS` in `dir`, which must fail saying `why`.
fn refused(dir: &Path, args: &[&str], why: &str) {
    let out = switchyard(dir).args(args).output().unwrap();
    assert!(!out.status.success(), "{args:?} succeeded:\n{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(why),
        "{args:?} did not say {why:?}:\n{}",
        text(&out)
    );
}

#[test]
fn new_refuses_a_bad_name_a_full_directory_and_a_missing_sdk() {
    let dir = tempfile::tempdir().unwrap();
    let at = dir.path();
    refused(
        at,
        &["new", "plugin", "Hello World", "--lang", "python"],
        "lowercase letter",
    );
    refused(at, &["new", "pipeline", "../up"], "lowercase letter");
    assert_eq!(std::fs::read_dir(at).unwrap().count(), 0);

    std::fs::create_dir(at.join("taken")).unwrap();
    std::fs::write(at.join("taken/notes.txt"), "mine").unwrap();
    refused(
        at,
        &["new", "plugin", "taken", "--lang", "c"],
        "not an empty directory",
    );
    assert_eq!(std::fs::read_dir(at.join("taken")).unwrap().count(), 1);

    let nowhere = at.join("nowhere");
    let nowhere = nowhere.to_str().unwrap();
    refused(
        at,
        &["new", "plugin", "rusty", "--lang", "rust", "--sdk", nowhere],
        "--sdk PATH",
    );
    assert!(!at.join("rusty").exists());
}
