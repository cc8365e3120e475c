//! Loading plugins: clear errors for files that are not plugins, and for
//! plugins whose declaration disagrees with the pipeline.

use std::path::Path;

use switchyard::config::{self, Grants, Limits};
use switchyard::runtime::{self, PluginErrors};

use crate::common::{engine, sandbox, wasm, write_pipeline};

fn load_error(path: &Path) -> String {
    match engine().load(
        path,
        sandbox("broken", Limits::default(), Grants::default()),
    ) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

fn file_with(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn a_missing_file_is_named() {
    let e = load_error(Path::new("/nonexistent/plugin.wasm"));
    assert!(
        e.starts_with("/nonexistent/plugin.wasm: no such file"),
        "{e}"
    );
}

#[test]
fn a_file_that_is_not_wasm_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let e = load_error(&file_with(dir.path(), "text.wasm", b"hello, I am text"));
    assert!(e.contains("text.wasm: not a WebAssembly file"), "{e}");
}

#[test]
fn a_core_module_is_refused_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let e = load_error(&file_with(dir.path(), "core.wasm", b"\0asm\x01\0\0\0"));
    assert!(
        e.contains("core WebAssembly module, not a component"),
        "{e}"
    );
    assert!(e.contains("wasm32-wasip2"), "{e}");
}

#[test]
fn a_component_of_another_world_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // The smallest valid component: the preamble alone, exporting nothing.
    let e = load_error(&file_with(dir.path(), "empty.wasm", b"\0asm\x0d\0\x01\0"));
    assert!(
        e.contains("does not export `switchyard:plugin/handler@0.2.2` (it exports nothing)"),
        "{e}"
    );
}

#[test]
fn a_plugin_built_against_another_contract_version_is_told_so() {
    let dir = tempfile::tempdir().unwrap();
    // A component exporting an (empty) instance under the 0.1.0 name.
    let name = b"switchyard:plugin/handler@0.1.0";
    let mut bytes = b"\0asm\x0d\0\x01\0".to_vec();
    // Instance section: one instance made of no exports.
    bytes.extend_from_slice(&[0x05, 0x03, 0x01, 0x01, 0x00]);
    // Export section: that instance, under `name`.
    let entry_len = 1 + 1 + name.len() + 3;
    bytes.extend_from_slice(&[0x0b, (1 + entry_len) as u8, 0x01, 0x00, name.len() as u8]);
    bytes.extend_from_slice(name);
    bytes.extend_from_slice(&[0x05, 0x00, 0x00]);
    let e = load_error(&file_with(dir.path(), "old.wasm", &bytes));
    assert!(
        e.contains("built against contract switchyard:plugin@0.1.0, but this host speaks switchyard:plugin@0.2.2"),
        "{e}"
    );
}

#[test]
fn a_plugin_built_for_contract_0_2_0_still_loads_and_runs() {
    let plugin = crate::common::load("legacy");
    assert!(!plugin.uses_state());
    let mut instance = plugin.instantiate().unwrap();
    let mut ping = crate::common::message(
        switchyard::envelope::Kind::Event,
        "Ping",
        serde_json::json!({"n": 1}),
    );
    let outputs = instance.handle(&mut ping).unwrap();
    match outputs.as_slice() {
        [switchyard::plugin::Output::Event(pong)] => {
            assert_eq!(pong.message_type, "Pong");
            assert_eq!(pong.payload, br#"{"n":1}"#);
        }
        other => panic!("expected one Pong, got {other:?}"),
    }
    // Built with the SDK against 0.2.1, a plugin imports the state interface.
    assert!(crate::common::load("counter").uses_state());
}

#[test]
fn a_truncated_component_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(wasm("orders")).unwrap();
    let e = load_error(&file_with(
        dir.path(),
        "cut.wasm",
        &bytes[..bytes.len() / 2],
    ));
    assert!(
        e.contains("cut.wasm: not a valid WebAssembly component"),
        "{e}"
    );
}

async fn plugin_errors(toml: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let path = write_pipeline(dir.path(), "p", toml);
    let loaded = config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    match runtime::load_plugins(&loaded.pipeline).await {
        Ok(_) => panic!("plugins loaded"),
        Err(e) => e.downcast::<PluginErrors>().expect("plugin errors").0,
    }
}

#[tokio::test]
async fn describe_must_agree_with_the_pipeline() {
    let errors = plugin_errors(
        r#"
        [host]
        cache_dir = "{cache}"
        [plugins.orders]
        wasm = "{dist}/orders.wasm"
        commands = ["PlaceOrders"]
        [plugins.payments]
        wasm = "{dist}/payments.wasm"
        events = ["ChargePayment"]
        "#,
    )
    .await;
    let all = errors.join("\n");
    assert!(
        all.contains("plugin `orders`: the pipeline routes command `PlaceOrders` to it, but its describe() does not list `PlaceOrders` (it handles command PlaceOrder, command CancelOrder)"),
        "{all}"
    );
    assert!(
        all.contains("plugin `payments`: the pipeline lists `ChargePayment` under `events`, but the plugin handles it as a command"),
        "{all}"
    );
}

#[tokio::test]
async fn a_sent_command_needs_a_handler_in_the_pipeline() {
    let errors = plugin_errors(
        r#"
        [host]
        cache_dir = "{cache}"
        [plugins.orders]
        wasm = "{dist}/orders.wasm"
        commands = ["PlaceOrder"]
        "#,
    )
    .await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("it sends command `ChargePayment`, but no plugin in the pipeline handles `ChargePayment`"),
        "{errors:?}"
    );
}

#[tokio::test]
async fn every_broken_plugin_is_reported_at_once() {
    let errors = plugin_errors(
        r#"
        [host]
        cache_dir = "{cache}"
        [plugins.first]
        wasm = "{dist}/does-not-exist.wasm"
        commands = ["A"]
        [plugins.second]
        wasm = "{dist}/also-missing.wasm"
        events = ["B"]
        "#,
    )
    .await;
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].contains("plugin `first`")
            && errors[0].contains("does-not-exist.wasm: no such file")
    );
    assert!(
        errors[1].contains("plugin `second`")
            && errors[1].contains("also-missing.wasm: no such file")
    );
}

#[test]
fn compiled_components_are_cached_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let first = switchyard::plugin::PluginEngine::new(Some(dir.path().to_owned())).unwrap();
    first
        .load(
            &wasm("echo"),
            sandbox("echo", Limits::default(), Grants::default()),
        )
        .unwrap();
    let entries: Vec<_> = std::fs::read_dir(dir.path().join("components"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert!(
        entries[0].with_extension("sha256").exists(),
        "a checksum is stored beside the entry"
    );

    // A corrupt entry (even one of the right length) is recompiled, not fatal.
    let mut bytes = std::fs::read(&entries[0]).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&entries[0], &bytes).unwrap();
    let second = switchyard::plugin::PluginEngine::new(Some(dir.path().to_owned())).unwrap();
    let echo = second
        .load(
            &wasm("echo"),
            sandbox("echo", Limits::default(), Grants::default()),
        )
        .unwrap();
    assert_eq!(echo.info().name, "echo");
    let rewritten = std::fs::read(&entries[0]).unwrap();
    assert_ne!(rewritten[middle], bytes[middle], "entry rewritten");
}
