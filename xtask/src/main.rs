//! Project tasks, run with `cargo xtask <task>`:
//!
//! - `build-plugins`: build every plugin component into `dist/plugins/`: the
//!   Rust ones for `wasm32-wasip2`, and the examples in Python, JavaScript
//!   and C with their languages' tools (installed on first use).
//! - `demo`: build the plugins and the host, then run the example order
//!   pipeline and send it a few commands.
//! - `setup`: what the tests need on the machine (system packages, Node.js,
//!   a Python with pika and cloudevents, the local RabbitMQ and PostgreSQL started).
//! - `test [ARGS]`: `setup`, build the plugins, then `cargo test --workspace
//!   [ARGS]`.
//! - `fuzz [--dev] [--seconds N] [TARGET...]`: run the fuzz targets in `fuzz/`
//!   (every one by default) for N seconds each (default 60), from their
//!   committed corpus; cargo-fuzz is installed on first use.
//! - `chaos [--full]`: the chaos suite (`host/tests/chaos`), short or with
//!   10 runs of 20,000 messages per scenario.
//! - `ci`: formatting, clippy (host and wasm targets), then `test`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Duration;

mod fuzz;
mod gateway;
mod languages;
mod setup;

type Result<T> = std::result::Result<T, String>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("build-plugins") => setup::prepare()
            .and_then(|env| build_plugins_with(env.path()))
            .map(|_| ()),
        Some("setup") => setup::prepare().map(drop),
        Some("build-rust-plugins") => build_rust_plugins().map(|_| ()),
        Some("demo") => demo(),
        Some("test") => test(&args[1..]),
        Some("ci") => ci(),
        Some("fuzz") => fuzz::run(&args[1..]),
        Some("chaos") => chaos(args.get(1).map(String::as_str) == Some("--full")),
        _ => {
            eprintln!(
                "usage: cargo xtask <setup | build-plugins | build-rust-plugins | demo | test [CARGO TEST ARGS] | chaos [--full] | fuzz [--dev] [--seconds N] [TARGET...] | ci>"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root. `cargo run` sets CARGO_MANIFEST_DIR at run time; it
/// is preferred over the compile-time value so that a binary built from
/// another checkout sharing the target directory still acts on this one.
fn root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .parent()
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed with {status}"))
    }
}

struct Metadata {
    target_dir: PathBuf,
    /// (package, library name) of every plugin crate.
    plugins: Vec<(String, String)>,
}

/// `cargo metadata` of the workspace; with `deps`, of every package it
/// depends on too.
fn cargo_metadata(deps: bool) -> Result<serde_json::Value> {
    let mut c = cargo();
    c.args(["metadata", "--locked", "--format-version", "1"]);
    if !deps {
        c.arg("--no-deps");
    }
    let out = c
        .output()
        .map_err(|e| format!("cannot run cargo metadata: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("cargo metadata printed bad JSON: {e}"))
}

fn metadata() -> Result<Metadata> {
    let v = cargo_metadata(false)?;
    let target_dir = v["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .ok_or("cargo metadata has no target_directory")?;
    let root = root();
    let mut plugins = Vec::new();
    for p in v["packages"].as_array().into_iter().flatten() {
        let manifest = PathBuf::from(p["manifest_path"].as_str().unwrap_or_default());
        let rel = manifest.strip_prefix(&root).unwrap_or(&manifest);
        if !(rel.starts_with("plugins") || rel.starts_with("tests/plugins")) {
            continue;
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            let is_cdylib = t["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "cdylib"));
            if is_cdylib {
                plugins.push((
                    p["name"].as_str().unwrap_or_default().to_owned(),
                    t["name"].as_str().unwrap_or_default().replace('-', "_"),
                ));
            }
        }
    }
    plugins.sort();
    Ok(Metadata {
        target_dir,
        plugins,
    })
}

/// Plugins also built with extra features, under another name:
/// (package, library name, features, output name).
const VARIANTS: [(&str, &str, &str, &str); 6] = [
    ("test-plugin-stock", "stock", "fixed", "stock_fixed"),
    ("test-plugin-tally", "tally", "v2", "tally_v2"),
    ("test-plugin-tally", "tally", "trap-on-start", "tally_trap"),
    ("test-plugin-tally", "tally", "ballast", "tally_ballast"),
    ("test-plugin-tally", "tally", "fails", "tally_fails"),
    ("test-plugin-echo", "echo", "v2", "echo_v2"),
];

/// Builds every plugin, in every language, into `dist/plugins/NAME.wasm`,
/// the JavaScript one with Node.js from `path` when given.
fn build_plugins_with(path: Option<std::ffi::OsString>) -> Result<Vec<PathBuf>> {
    let mut built = build_rust_plugins()?;
    let dist = root().join("dist").join("plugins");
    built.extend(languages::build(&dist, &metadata()?.target_dir, path)?);
    Ok(built)
}

/// Whether rustup has the plugins' target for the pinned toolchain; adds
/// it if not (a toolchain installed before rust-toolchain.toml named the
/// target does not get it by itself).
fn ensure_wasm_target() -> Result<()> {
    let Ok(out) = Command::new("rustup")
        .current_dir(root())
        .args(["target", "list", "--installed"])
        .output()
    else {
        // No rustup: the toolchain is managed some other way.
        return Ok(());
    };
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|t| t.trim() == "wasm32-wasip2")
    {
        return Ok(());
    }
    eprintln!("xtask: adding the wasm32-wasip2 target (rustup target add wasm32-wasip2)");
    run(Command::new("rustup")
        .current_dir(root())
        .args(["target", "add", "wasm32-wasip2"]))
}

/// Builds the Rust plugins and copies them to `dist/plugins/NAME.wasm`.
fn build_rust_plugins() -> Result<Vec<PathBuf>> {
    ensure_wasm_target()?;
    let meta = metadata()?;
    let dist = root().join("dist").join("plugins");
    std::fs::create_dir_all(&dist).map_err(|e| format!("cannot create {}: {e}", dist.display()))?;
    let built_dir = meta.target_dir.join("wasm32-wasip2").join("plugin");
    // Variants first: the plain build below then leaves the default
    // artifact in place.
    for (package, lib, features, name) in VARIANTS {
        run(cargo().args([
            "build",
            "--target",
            "wasm32-wasip2",
            "--profile",
            "plugin",
            "--package",
            package,
            "--features",
            features,
        ]))?;
        let from = built_dir.join(format!("{lib}.wasm"));
        let to = dist.join(format!("{name}.wasm"));
        std::fs::copy(&from, &to)
            .map_err(|e| format!("cannot copy {} to {}: {e}", from.display(), to.display()))?;
    }
    let mut cmd = cargo();
    cmd.args(["build", "--target", "wasm32-wasip2", "--profile", "plugin"]);
    for (package, _) in &meta.plugins {
        cmd.args(["--package", package]);
    }
    eprintln!(
        "xtask: building {} plugin components for wasm32-wasip2",
        meta.plugins.len()
    );
    run(&mut cmd)?;
    let dist = root().join("dist").join("plugins");
    std::fs::create_dir_all(&dist).map_err(|e| format!("cannot create {}: {e}", dist.display()))?;
    let mut out = Vec::new();
    for (_, lib) in &meta.plugins {
        let built = meta
            .target_dir
            .join("wasm32-wasip2")
            .join("plugin")
            .join(format!("{lib}.wasm"));
        let dest = dist.join(format!("{lib}.wasm"));
        std::fs::copy(&built, &dest)
            .map_err(|e| format!("cannot copy {} to {}: {e}", built.display(), dest.display()))?;
        out.push(dest);
    }
    eprintln!("xtask: plugins are in {}", dist.display());
    Ok(out)
}

fn test(extra: &[String]) -> Result<()> {
    let env = setup::prepare()?;
    build_plugins_with(env.path())?;
    let mut cmd = cargo();
    cmd.env("SWITCHYARD_PYTHON", &env.python);
    // `switchyard new`'s JavaScript project is built with npm by the tests.
    if let Some(path) = env.path() {
        cmd.env("PATH", path);
    }
    run(cmd.args(["test", "--workspace"]).args(extra))
}

/// The chaos suite, one scenario at a time, with what each saw printed.
fn chaos(full: bool) -> Result<()> {
    let env = setup::prepare()?;
    build_plugins_with(env.path())?;
    let mut cmd = cargo();
    if full {
        cmd.env("CHAOS_RUNS", "10").env("CHAOS_MESSAGES", "20000");
    }
    run(cmd.args([
        "test",
        "--package",
        "switchyard",
        "--test",
        "chaos",
        "--",
        "--ignored",
        "--test-threads=1",
        "--nocapture",
    ]))
}

fn ci() -> Result<()> {
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    let meta = metadata()?;
    let mut wasm_clippy = cargo();
    wasm_clippy.args([
        "clippy",
        "--target",
        "wasm32-wasip2",
        "--package",
        "switchyard-sdk",
    ]);
    for (package, _) in &meta.plugins {
        wasm_clippy.args(["--package", package]);
    }
    run(wasm_clippy.args(["--", "-D", "warnings"]))?;
    test(&[])
}

fn switchyard(bin: &Path) -> Command {
    let mut c = Command::new(bin);
    c.current_dir(root());
    c
}

fn demo() -> Result<()> {
    setup::host_build()?;
    build_rust_plugins()?;
    run(cargo().args(["build", "--package", "switchyard"]))?;
    let bin = metadata()?.target_dir.join("debug").join("switchyard");
    let pipeline = "pipelines/orders.toml";

    // The demo owns this store: start from empty so the output is the same
    // every time.
    let store = root().join("pipelines").join(".switchyard");
    for suffix in ["", "-wal", "-shm", ".lock"] {
        let _ = std::fs::remove_file(store.join(format!("orders.db{suffix}")));
    }

    say("validate the pipeline and its plugins");
    run(switchyard(&bin).args(["validate", pipeline]))?;

    say(&format!(
        "start a stand-in payment gateway on http://{}: the payments plugin charges through it over HTTP",
        gateway::ADDRESS
    ));
    gateway::start()?;

    say("start the host (embedded transport, durable on disk)");
    let mut host = switchyard(&bin)
        .args(["run", pipeline])
        .env("GATEWAY_URL", format!("http://{}", gateway::ADDRESS))
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the host: {e}"))?;
    let result = demo_traffic(&bin, pipeline);
    stop(&mut host);
    result?;
    say(
        "the host finished its messages in flight and stopped; what failed for good is in the dead-letter store",
    );
    run(switchyard(&bin).args(["dlq", "list", "-p", pipeline]))?;
    let listed = switchyard(&bin)
        .args(["dlq", "list", "-p", pipeline, "--json"])
        .output()
        .map_err(|e| format!("cannot run dlq list: {e}"))?;
    let first = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .next()
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .and_then(|v| v["id"].as_str().map(str::to_owned));
    if let Some(id) = &first {
        say("show one dead letter");
        run(switchyard(&bin).args(["dlq", "show", "-p", pipeline, id]))?;
    }
    say("the fulfilment saga: one instance per order");
    run(switchyard(&bin).args(["sagas", "list", "-p", pipeline]))?;
    say("the order no carrier takes: shipping failed for good, so the saga undid it");
    run(switchyard(&bin).args(["sagas", "show", "-p", pipeline, "fulfilment", "A-1004"]))?;
    // The payment of A-1002, found in its flow (sent with a correlation id
    // of our own).
    let flow = switchyard(&bin)
        .args([
            "why",
            "--correlation",
            "order-A-1002",
            "--json",
            "-p",
            pipeline,
        ])
        .output()
        .map_err(|e| format!("cannot run why: {e}"))?;
    let payment = serde_json::from_slice::<serde_json::Value>(&flow.stdout)
        .ok()
        .and_then(|v| {
            v["messages"].as_array()?.iter().find_map(|m| {
                (m["message_type"] == "ChargePayment")
                    .then(|| m["id"].as_str().map(str::to_owned))?
            })
        })
        .ok_or("the journal has no ChargePayment in flow order-A-1002")?;
    say("what happened to the payment that timed out: switchyard why");
    run(switchyard(&bin).args(["why", &payment, "-p", pipeline]))?;
    let malformed = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message_type"] == "PlaceOrder")
        .and_then(|v| v["id"].as_str().map(str::to_owned));
    if let Some(id) = &malformed {
        say("and to the malformed order, from its dead-letter record");
        run(switchyard(&bin).args(["why", id, "-p", pipeline]))?;
    }
    Ok(())
}

fn demo_traffic(bin: &Path, pipeline: &str) -> Result<()> {
    // `switchyard send PlaceOrder` with this payload, and these arguments.
    let place = |data: &str, extra: &[&str]| {
        run(switchyard(bin)
            .args(["send", "PlaceOrder", "-p", pipeline])
            .args(extra)
            .args(["--data", data]))
    };
    std::thread::sleep(Duration::from_millis(500));
    say("send PlaceOrder and wait for the orders plugin's reply");
    place(
        r#"{"order_id":"A-1001","customer":"ada","items":[{"sku":"book","quantity":2,"unit_price_cents":1250},{"sku":"pen","quantity":1,"unit_price_cents":300}]}"#,
        &["--wait-reply", "10s"],
    )?;
    say(
        "send an order whose payment gateway times out twice (transient failures: retried, then handled)",
    );
    place(
        r#"{"order_id":"A-1002","customer":"grace","items":[{"sku":"lamp","quantity":1,"unit_price_cents":4513}]}"#,
        &["--correlation-id", "order-A-1002"],
    )?;
    say("send a malformed order (poison: a permanent failure)");
    place(r#"{"order_id":42}"#, &[])?;
    say(
        "send an order of 150 lamps, more than a parcel takes (shipping fails for good; the fulfilment saga refunds, releases and cancels)",
    );
    place(
        r#"{"order_id":"A-1004","customer":"alan","items":[{"sku":"lamp","quantity":150,"unit_price_cents":4500}]}"#,
        &[],
    )?;
    // Long enough for the retried payment of A-1002 (about a second) and
    // the saga steps after it.
    std::thread::sleep(Duration::from_millis(3000));
    Ok(())
}

/// Stops the host the way an operator would: SIGINT, then wait.
fn stop(host: &mut Child) {
    #[cfg(unix)]
    {
        let _ = Command::new("kill")
            .args(["-INT", &host.id().to_string()])
            .status();
    }
    #[cfg(not(unix))]
    {
        let _ = host.kill();
    }
    let _ = host.wait();
}

fn say(what: &str) {
    eprintln!("\n\x1b[1m== {what}\x1b[0m");
}
