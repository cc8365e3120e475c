//! Builds the example plugins written in Python, JavaScript and C, with the
//! tools each language's guide in docs/guides/ uses, installing the ones a
//! fresh machine lacks into the user's cache directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Result, root, run};

/// componentize-py, from PyPI.
const COMPONENTIZE_PY: &str = "0.25.1";
/// wit-bindgen's C generator, from crates.io.
const WIT_BINDGEN: &str = "0.61.1";
/// wasm-tools (`component new`), from crates.io.
const WASM_TOOLS: &str = "1.258.0";

/// The plugins, each built into `dist/`. `path` is the `PATH` the
/// JavaScript tools run with (one where a new enough Node.js comes first), if not the
/// inherited one.
pub fn build(
    dist: &Path,
    target_dir: &Path,
    path: Option<std::ffi::OsString>,
) -> Result<Vec<PathBuf>> {
    let wit = plugin_wit_with_wasi(target_dir, &wasi_wit()?)?;
    let mut built = vec![python(dist, &wit)?];
    built.extend(javascript(dist, &wit, path)?);
    built.push(c(dist, target_dir)?);
    Ok(built)
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Where tools installed from crates.io go (`SWITCHYARD_TOOLS`).
fn tools_dir() -> PathBuf {
    std::env::var_os("SWITCHYARD_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cache").join("switchyard-tools"))
}

/// The Python environment holding componentize-py (`SWITCHYARD_VENV`).
pub fn venv() -> PathBuf {
    std::env::var_os("SWITCHYARD_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cache").join("switchyard-venv"))
}

/// The first line a command prints for `--version`, if it runs.
fn version_of(program: &Path) -> Option<String> {
    let out = Command::new(program).arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The WIT of WASI 0.2 (`wasi:http`, `wasi:cli`, ... in its `deps/`): the
/// one the host implements, as the host's `wasmtime-wasi-http` dependency
/// ships it.
fn wasi_wit() -> Result<PathBuf> {
    let meta = crate::cargo_metadata(true)?;
    let manifest = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "wasmtime-wasi-http")
        .and_then(|p| p["manifest_path"].as_str())
        .ok_or("cargo metadata lists no wasmtime-wasi-http (the host's WASI HTTP)")?;
    let wit = Path::new(manifest)
        .parent()
        .map(|d| d.join("wit"))
        .filter(|d| d.join("deps").is_dir())
        .ok_or_else(|| format!("no wit/deps beside {manifest}"))?;
    Ok(wit)
}

fn python(dist: &Path, wit: &Path) -> Result<PathBuf> {
    let venv = venv();
    let componentize = venv.join("bin").join("componentize-py");
    let wanted = format!("componentize-py {COMPONENTIZE_PY}");
    if version_of(&componentize).as_deref() != Some(wanted.as_str()) {
        if !venv.join("bin").join("pip").exists() {
            eprintln!("xtask: creating a Python environment in {}", venv.display());
            run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
        }
        eprintln!("xtask: installing {wanted} from PyPI");
        run(Command::new(venv.join("bin").join("pip"))
            .args(["install", "--quiet"])
            .arg(format!("componentize-py=={COMPONENTIZE_PY}")))?;
    }
    let out = dist.join("notices.wasm");
    eprintln!("xtask: building plugins/notices (Python) with {wanted}");
    run(Command::new(&componentize)
        .current_dir(root().join("plugins").join("notices"))
        // notices calls a mail API over HTTP.
        .arg("--wit-path")
        .arg(wit)
        .args(["--world", "plugin-http", "componentize", "app"])
        .arg("--output")
        .arg(&out))?;
    Ok(out)
}

/// plugins/fraud, and the test plugin tests/plugins/fetcher, with the
/// ComponentizeJS that plugins/fraud's lock file names.
fn javascript(dist: &Path, wit: &Path, path: Option<std::ffi::OsString>) -> Result<Vec<PathBuf>> {
    let dir = root().join("plugins").join("fraud");
    // Node.js from the given PATH when there is one.
    let tool = |program: &str| {
        let mut c = Command::new(program);
        if let Some(p) = &path {
            c.env("PATH", p);
            let found = std::env::split_paths(p)
                .map(|d| d.join(program))
                .find(|f| f.exists());
            if let Some(f) = found {
                c = Command::new(f);
                c.env("PATH", p);
            }
        }
        c
    };
    let node = tool("node")
        .args(["-p", "process.versions.node"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let version = node.as_deref().and_then(|v| {
        let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
        Some((parts.next()??, parts.next()??))
    });
    if !crate::setup::node_will_do(version) {
        return Err(format!(
            "plugins/fraud (JavaScript) needs Node.js 20.19, or 22.12 or newer, with npm; found {} (`cargo xtask setup` installs one when the system has none)",
            node.as_deref().unwrap_or("no node")
        ));
    }
    let componentize = dir
        .join("node_modules")
        .join(".bin")
        .join("componentize-js");
    // npm records what it installed in node_modules/.package-lock.json;
    // a lock file changed since then is installed again.
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let installed = modified(&dir.join("node_modules").join(".package-lock.json"));
    let locked = modified(&dir.join("package-lock.json"));
    if !componentize.exists() || installed.is_none() || locked > installed {
        eprintln!("xtask: installing plugins/fraud's npm packages (npm ci)");
        run(tool("npm")
            .current_dir(&dir)
            .args(["ci", "--no-audit", "--no-fund"]))?;
    }
    // Both call out with fetch(), which the engine implements over
    // `wasi:http`; neither serves HTTP (`fetch-event`).
    let componentize_js = |source: &Path, out: &Path| {
        let mut c = Command::new(&componentize);
        if let Some(p) = &path {
            c.env("PATH", p);
        }
        c.current_dir(&dir)
            .arg(source)
            .arg("--wit")
            .arg(wit)
            .args(["--world-name", "plugin-with-environment"])
            .args(["--disable", "fetch-event", "--out"])
            .arg(out);
        run(&mut c)
    };
    let fraud = dist.join("fraud.wasm");
    eprintln!("xtask: building plugins/fraud (JavaScript) with componentize-js");
    componentize_js(Path::new("fraud.js"), &fraud)?;
    let fetcher = dist.join("fetcher.wasm");
    eprintln!("xtask: building tests/plugins/fetcher (JavaScript) with componentize-js");
    componentize_js(&root().join("tests/plugins/fetcher/fetcher.js"), &fetcher)?;
    Ok(vec![fraud, fetcher])
}

/// The plugin's WIT package with two more worlds, and WASI's packages as
/// its dependencies, for the tools that take one WIT directory: a world
/// that also imports `wasi:http/outgoing-handler` (a Python plugin that
/// calls out: componentize-py generates bindings only for the world's
/// imports), and one that also imports `wasi:cli/environment` (the
/// JavaScript engine gives no `process.env`). Written under the target
/// directory on every build; `wit/` itself stays free of WASI, so the Rust
/// SDK and the C bindings need nothing else.
fn plugin_wit_with_wasi(target_dir: &Path, wasi: &Path) -> Result<PathBuf> {
    let wit = target_dir.join("plugin-wit-wasi");
    let deps = wit.join("deps");
    let io = |e: std::io::Error| format!("cannot write {}: {e}", wit.display());
    if wit.exists() {
        std::fs::remove_dir_all(&wit).map_err(io)?;
    }
    std::fs::create_dir_all(&deps).map_err(io)?;
    std::fs::copy(
        root().join("wit").join("plugin.wit"),
        wit.join("plugin.wit"),
    )
    .map_err(io)?;
    // The version the WIT says, e.g. `package wasi:http@0.2.12;`.
    let http = wasi.join("deps").join("http.wit");
    let text = std::fs::read_to_string(&http)
        .map_err(|e| format!("cannot read {}: {e}", http.display()))?;
    let version = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("package wasi:http@"))
        .map(|v| v.trim_end_matches(';').trim().to_owned())
        .ok_or_else(|| format!("{} names no `package wasi:http@...`", http.display()))?;
    std::fs::write(
        wit.join("wasi-worlds.wit"),
        format!(
            "/// The plugin, calling out over HTTP.\n\
             world plugin-http {{\n    include plugin;\n    import wasi:http/outgoing-handler@{version};\n}}\n\n\
             /// The plugin, reading the environment the pipeline gives it.\n\
             world plugin-with-environment {{\n    include plugin;\n    import wasi:cli/environment@{version};\n}}\n"
        ),
    )
    .map_err(io)?;
    let from = wasi.join("deps");
    let entries =
        std::fs::read_dir(&from).map_err(|e| format!("cannot read {}: {e}", from.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().ends_with(".wit") {
            std::fs::copy(entry.path(), deps.join(&name)).map_err(io)?;
        }
    }
    Ok(wit)
}

/// Installs a crates.io tool into the tools directory unless it is there at
/// this version.
fn cargo_tool(package: &str, version: &str, bin: &str, features: &str) -> Result<PathBuf> {
    install_tool(package, version, bin, Some(features))
}

/// A crates.io tool with its default features, installed like [`cargo_tool`].
pub fn cargo_tool_any(package: &str, version: &str, bin: &str) -> Result<PathBuf> {
    install_tool(package, version, bin, None)
}

fn install_tool(
    package: &str,
    version: &str,
    bin: &str,
    features: Option<&str>,
) -> Result<PathBuf> {
    let root_dir = tools_dir();
    let path = root_dir.join("bin").join(bin);
    let installed = version_of(&path).is_some_and(|v| v.split_whitespace().any(|w| w == version));
    if !installed {
        eprintln!(
            "xtask: installing {package} {version} into {} (once; a few minutes)",
            root_dir.display()
        );
        let mut install = crate::cargo();
        install
            .env_remove("CARGO_TARGET_DIR")
            .args(["install", "--locked", "--quiet", "--root"])
            .arg(&root_dir)
            .arg(format!("{package}@{version}"));
        if let Some(f) = features {
            install.args(["--no-default-features", "--features", f]);
        }
        run(&mut install)?;
    }
    Ok(path)
}

fn require(program: &str, why: &str) -> Result<()> {
    let found = Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        Ok(())
    } else {
        Err(format!(
            "{program} is missing ({why}); on Debian or Ubuntu: \
             apt-get install clang lld wasi-libc libclang-rt-dev-wasm32 \
             (on Debian 12: libclang-rt-14-dev-wasm32)"
        ))
    }
}

fn c(dist: &Path, target_dir: &Path) -> Result<PathBuf> {
    require("clang", "it compiles plugins/receipts (C)")?;
    require("wasm-ld", "clang links WebAssembly with it")?;
    let wit_bindgen = cargo_tool("wit-bindgen-cli", WIT_BINDGEN, "wit-bindgen", "c")?;
    let wasm_tools = cargo_tool("wasm-tools", WASM_TOOLS, "wasm-tools", "component")?;

    let work = target_dir.join("receipts-c");
    let bindings = work.join("bindings");
    std::fs::create_dir_all(&bindings)
        .map_err(|e| format!("cannot create {}: {e}", bindings.display()))?;
    // The WASI preview 1 adapter of the wasmtime the host embeds.
    let adapter = work.join("wasi_snapshot_preview1.reactor.wasm");
    std::fs::write(
        &adapter,
        wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
    )
    .map_err(|e| format!("cannot write {}: {e}", adapter.display()))?;

    eprintln!("xtask: building plugins/receipts (C) with clang, wit-bindgen and wasm-tools");
    run(Command::new(&wit_bindgen)
        .args(["c", "--world", "plugin", "--out-dir"])
        .arg(&bindings)
        .arg(root().join("wit")))?;
    let core = work.join("receipts.core.wasm");
    run(Command::new("clang")
        .current_dir(root().join("plugins").join("receipts"))
        .args([
            "--target=wasm32-wasi",
            "-mexec-model=reactor",
            "-O2",
            "-Wall",
            "-Wextra",
            "-I",
        ])
        .arg(&bindings)
        .arg("receipts.c")
        .arg(bindings.join("plugin.c"))
        .arg(bindings.join("plugin_component_type.o"))
        .arg("-o")
        .arg(&core))?;
    let out = dist.join("receipts.wasm");
    run(Command::new(&wasm_tools)
        .args(["component", "new"])
        .arg(&core)
        .arg("--adapt")
        .arg(format!("wasi_snapshot_preview1={}", adapter.display()))
        .arg("-o")
        .arg(&out))?;
    Ok(out)
}
