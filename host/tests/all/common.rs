//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use switchyard::config::{Grants, Limits, PluginName};
use switchyard::envelope::{Envelope, Kind};
use switchyard::plugin::{LoadedPlugin, PluginEngine, Sandbox};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ has a parent")
        .to_owned()
}

/// A compiled plugin from `dist/plugins/`.
pub fn wasm(name: &str) -> PathBuf {
    let path = workspace_root()
        .join("dist")
        .join("plugins")
        .join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask build-plugins` (or `cargo xtask test`) first",
        path.display()
    );
    path
}

/// One engine for the whole test binary, with its own compile cache.
pub fn engine() -> &'static PluginEngine {
    static ENGINE: OnceLock<PluginEngine> = OnceLock::new();
    ENGINE.get_or_init(|| PluginEngine::new(Some(cache_dir())).expect("engine"))
}

pub fn cache_dir() -> PathBuf {
    std::env::temp_dir().join("switchyard-test-cache")
}

pub fn sandbox(name: &str, limits: Limits, grants: Grants) -> Sandbox {
    Sandbox {
        name: PluginName::try_from(name).expect("valid name"),
        limits,
        grants,
    }
}

pub fn load(name: &str) -> LoadedPlugin {
    load_with(name, Limits::default(), Grants::default())
}

pub fn load_with(name: &str, limits: Limits, grants: Grants) -> LoadedPlugin {
    engine()
        .load(&wasm(name), sandbox(name, limits, grants))
        .unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

pub fn message(kind: Kind, message_type: &str, payload: serde_json::Value) -> Envelope {
    Envelope::new(
        message_type,
        kind,
        serde_json::to_vec(&payload).expect("json"),
        "application/json",
    )
}

pub fn misbehave(action: &str) -> Envelope {
    message(
        Kind::Command,
        "Misbehave",
        serde_json::json!({ "action": action }),
    )
}

/// Writes a pipeline file into `dir`, with `{dist}` replaced by the plugin
/// directory, and returns its path.
pub fn write_pipeline(dir: &Path, name: &str, toml: &str) -> PathBuf {
    let dist = workspace_root().join("dist").join("plugins");
    let text = toml
        .replace("{dist}", &dist.display().to_string())
        .replace("{cache}", &cache_dir().display().to_string());
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("write pipeline");
    path
}

/// The switchyard binary built for this test run.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_switchyard"))
}

/// Every dead letter of a pipeline, oldest failure first.
pub async fn dead_letters(
    pipeline: &switchyard::config::Pipeline,
) -> Vec<switchyard::dlq::DeadLetter> {
    let store = switchyard::dlq::open(&pipeline.dead_letters, &pipeline.name)
        .await
        .expect("dead-letter store");
    let mut all = store
        .list(&switchyard::dlq::Filter::default())
        .await
        .expect("list dead letters");
    all.reverse();
    all
}
