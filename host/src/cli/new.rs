//! `switchyard new`: a plugin project to start from, in Rust, Python,
//! JavaScript or C, or a commented pipeline file.
//!
//! The templates live in the repository's `templates/` and are compiled
//! into the binary. Every plugin project gets the same contract tests and
//! pipeline file, whatever its language: a handler of the `Greet` command
//! (it replies and publishes `Greeted`) and consumer of the `Greeted`
//! event.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use clap::{Subcommand, ValueEnum};

use crate::config::PluginName;

#[derive(Debug, Subcommand)]
pub enum NewCommand {
    /// Write a plugin project: a handler of a command and an event, its
    /// contract tests, a pipeline that runs it, its build and a README.
    #[command(after_help = "Examples:
  switchyard new plugin hello --lang python
  switchyard new plugin billing --lang rust --sdk ../switchyard/plugin-sdk
  switchyard new plugin fraud --lang javascript --dir services/

The project goes into DIR/NAME, which must not exist or be empty. Its README says how
to build it, run its contract tests and send it a command in a running host.
Rust projects depend on the SDK of a Switchyard checkout (it is not on crates.io
yet): --sdk, or SWITCHYARD_SDK, or the checkout this binary was built from.")]
    Plugin {
        /// The plugin's name: lowercase letters, digits, `-` and `_`,
        /// starting with a letter.
        name: String,
        /// The language of the handler.
        #[arg(long, value_enum)]
        lang: Lang,
        /// Where the project directory is made.
        #[arg(long, value_name = "DIR", default_value = ".")]
        dir: PathBuf,
        /// Rust: the `plugin-sdk` directory of a Switchyard checkout.
        #[arg(long, value_name = "PATH", env = "SWITCHYARD_SDK")]
        sdk: Option<PathBuf>,
    },

    /// Write a pipeline file with every section, explained, and the
    /// defaults shown.
    #[command(after_help = "Examples:
  switchyard new pipeline orders               # ./orders.toml
  switchyard new pipeline orders --dir pipelines/

An existing file is never overwritten.")]
    Pipeline {
        /// The pipeline's name, which names the file (NAME.toml).
        name: String,
        /// Where the file is written.
        #[arg(long, value_name = "DIR", default_value = ".")]
        dir: PathBuf,
    },
}

/// The languages a plugin project can be written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Lang {
    Rust,
    Python,
    Javascript,
    C,
}

/// A file of a template: its path in the project and its text.
struct File {
    path: String,
    text: String,
    executable: bool,
}

const PIPELINE: &str = include_str!("../../../templates/pipeline.toml");
const PLUGIN_PIPELINE: &str = include_str!("../../../templates/plugin/common/pipeline.toml");
const CONTRACT: &str = include_str!("../../../templates/plugin/common/contract.toml");

const RUST_CARGO: &str = include_str!("../../../templates/plugin/rust/Cargo.toml");
const RUST_LIB: &str = include_str!("../../../templates/plugin/rust/src/lib.rs");
const RUST_README: &str = include_str!("../../../templates/plugin/rust/README.md");
const PYTHON_APP: &str = include_str!("../../../templates/plugin/python/app.py");
const PYTHON_BUILD: &str = include_str!("../../../templates/plugin/python/build.sh");
const PYTHON_README: &str = include_str!("../../../templates/plugin/python/README.md");
const JS_PACKAGE: &str = include_str!("../../../templates/plugin/javascript/package.json");
const JS_PLUGIN: &str = include_str!("../../../templates/plugin/javascript/plugin.js");
const JS_README: &str = include_str!("../../../templates/plugin/javascript/README.md");
const C_PLUGIN: &str = include_str!("../../../templates/plugin/c/plugin.c");
const C_MAKEFILE: &str = include_str!("../../../templates/plugin/c/Makefile");
const C_README: &str = include_str!("../../../templates/plugin/c/README.md");

/// The WASI preview 1 adapter a C project links into its component.
const C_ADAPTER: &str = "wasi_snapshot_preview1.reactor.wasm";

pub fn run(command: NewCommand) -> Result<ExitCode> {
    match command {
        NewCommand::Plugin {
            name,
            lang,
            dir,
            sdk,
        } => plugin(&name, lang, &dir, sdk.as_deref()),
        NewCommand::Pipeline { name, dir } => pipeline(&name, &dir),
    }
}

/// The version of the plugin contract this binary speaks (`0.2.2`), which
/// JavaScript imports name.
fn wit_version() -> &'static str {
    crate::plugin::WIT
        .lines()
        .find_map(|l| l.trim().strip_prefix("package switchyard:plugin@"))
        .map_or("0.2.2", |v| v.trim_end_matches(';'))
}

/// `{{key}}` replaced by its value, for each pair.
fn render(template: &str, values: &[(&str, &str)]) -> String {
    values
        .iter()
        .fold(template.to_owned(), |text, (key, value)| {
            text.replace(&format!("{{{{{key}}}}}"), value)
        })
}

fn checked_name(name: &str, what: &str) -> Result<()> {
    PluginName::try_from(name).map_err(|e| {
        anyhow::anyhow!("{e} (a {what} name is a plugin name: lowercase letters, digits, `-` and `_`, starting with a letter)")
    })?;
    Ok(())
}

fn pipeline(name: &str, dir: &Path) -> Result<ExitCode> {
    checked_name(name, "pipeline")?;
    let path = dir.join(format!("{name}.toml"));
    if path.exists() {
        bail!("{} already exists; nothing was written", path.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    std::io::Write::write_all(&mut file, render(PIPELINE, &[("name", name)]).as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("Wrote {}.", path.display());
    println!(
        "Next: point [plugins.greeter] at a plugin (`switchyard new plugin greeter --lang rust|python|javascript|c` writes one), then\n  switchyard validate {}",
        path.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Where the Rust SDK is: `--sdk`/`SWITCHYARD_SDK`, or the checkout this
/// binary was built from if it is still there.
fn rust_sdk(given: Option<&Path>) -> Result<PathBuf> {
    let (path, source) = match given {
        Some(p) => (p.to_owned(), "--sdk (or SWITCHYARD_SDK)"),
        None => (
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugin-sdk"),
            "the Switchyard checkout this binary was built from",
        ),
    };
    if !path.join("Cargo.toml").is_file() {
        bail!(
            "no Rust SDK at {} ({source}): the SDK is not on crates.io yet, so a Rust plugin depends on the plugin-sdk directory of a Switchyard checkout; pass --sdk PATH/TO/switchyard/plugin-sdk",
            path.display()
        );
    }
    path.canonicalize()
        .with_context(|| format!("cannot resolve {}", path.display()))
}

/// A TOML basic string holding `s`.
fn toml_string(s: &str) -> String {
    toml_edit::Value::from(s).to_string().trim().to_owned()
}

fn plugin(name: &str, lang: Lang, dir: &Path, sdk: Option<&Path>) -> Result<ExitCode> {
    checked_name(name, "plugin")?;
    let root = dir.join(name);
    if root.exists() {
        let empty = std::fs::read_dir(&root)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty {
            bail!(
                "{} already exists and is not an empty directory; nothing was written",
                root.display()
            );
        }
    }
    let wasm = match lang {
        Lang::Rust => format!(
            "target/wasm32-wasip2/release/{}.wasm",
            name.replace('-', "_")
        ),
        _ => format!("{name}.wasm"),
    };
    let sdk = match lang {
        Lang::Rust => toml_string(&rust_sdk(sdk)?.to_string_lossy()),
        _ => String::new(),
    };
    let wit_version = wit_version();
    let values = [
        ("name", name),
        ("wasm", wasm.as_str()),
        ("sdk", sdk.as_str()),
        ("wit_version", wit_version),
    ];
    let file = |path: &str, template: &str| File {
        path: path.to_owned(),
        text: render(template, &values),
        executable: false,
    };
    let mut files = vec![
        file("pipeline.toml", PLUGIN_PIPELINE),
        file("tests/contract.toml", CONTRACT),
    ];
    let (ignored, build): (&str, &[&str]) = match lang {
        Lang::Rust => {
            files.push(file("Cargo.toml", RUST_CARGO));
            files.push(file("src/lib.rs", RUST_LIB));
            files.push(file("README.md", RUST_README));
            (
                "target/\n",
                &[
                    "rustup target add wasm32-wasip2",
                    "cargo build --target wasm32-wasip2 --release",
                ],
            )
        }
        Lang::Python => {
            files.push(file("app.py", PYTHON_APP));
            files.push(File {
                executable: true,
                ..file("build.sh", PYTHON_BUILD)
            });
            files.push(file("README.md", PYTHON_README));
            (".venv/\n__pycache__/\n*.wasm\n", &["./build.sh"])
        }
        Lang::Javascript => {
            files.push(file("package.json", JS_PACKAGE));
            files.push(file(&format!("{name}.js"), JS_PLUGIN));
            files.push(file("README.md", JS_README));
            ("node_modules/\n*.wasm\n", &["npm install", "npm run build"])
        }
        Lang::C => {
            files.push(file("plugin.c", C_PLUGIN));
            files.push(file("Makefile", C_MAKEFILE));
            files.push(file("README.md", C_README));
            (
                "build/\n/*.wasm\n!/wasi_snapshot_preview1.reactor.wasm\n",
                &["make"],
            )
        }
    };
    if lang != Lang::Rust {
        files.push(file("wit/plugin.wit", crate::plugin::WIT));
    }
    files.push(File {
        path: ".gitignore".into(),
        text: format!("{ignored}.switchyard/\n"),
        executable: false,
    });

    for f in &files {
        let path = root.join(&f.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, &f.text)
            .with_context(|| format!("cannot write {}", path.display()))?;
        if f.executable {
            make_executable(&path)?;
        }
    }
    if lang == Lang::C {
        let path = root.join(C_ADAPTER);
        std::fs::write(
            &path,
            wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
        )
        .with_context(|| format!("cannot write {}", path.display()))?;
    }

    let lang_name = match lang {
        Lang::Rust => "Rust",
        Lang::Python => "Python",
        Lang::Javascript => "JavaScript",
        Lang::C => "C",
    };
    println!(
        "Wrote the {lang_name} plugin project {} ({} files).",
        root.display(),
        files.len() + usize::from(lang == Lang::C)
    );
    println!("Build it, run its contract tests, and run it (README.md says more):");
    println!("  cd {}", root.display());
    for step in build {
        println!("  {step}");
    }
    println!("  switchyard test {wasm} tests/contract.toml");
    println!("  switchyard run pipeline.toml");
    println!(
        "  switchyard send Greet -p pipeline.toml --data '{{\"name\":\"ada\"}}' --wait-reply 10s   # from a second terminal"
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(unix)]
fn make_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot make {} executable", path.display()))
}

#[cfg(not(unix))]
fn make_executable(_: &Path) -> Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_placeholder_of_every_template_is_filled() {
        let values = [
            ("name", "hello"),
            ("wasm", "hello.wasm"),
            ("sdk", "\"sdk\""),
            ("wit_version", wit_version()),
        ];
        for template in [
            PIPELINE,
            PLUGIN_PIPELINE,
            CONTRACT,
            RUST_CARGO,
            RUST_LIB,
            RUST_README,
            PYTHON_APP,
            PYTHON_BUILD,
            PYTHON_README,
            JS_PACKAGE,
            JS_PLUGIN,
            JS_README,
            C_PLUGIN,
            C_MAKEFILE,
            C_README,
        ] {
            let text = render(template, &values);
            assert!(!text.contains("{{"), "a placeholder is left in\n{text}");
        }
    }

    #[test]
    fn the_wit_version_is_the_contract_s() {
        let v = wit_version();
        assert!(
            crate::plugin::WIT.contains(&format!("package switchyard:plugin@{v};")),
            "{v}"
        );
    }

    #[test]
    fn a_path_with_quotes_is_a_valid_toml_string() {
        let s = toml_string("C:\\a \"b\"");
        let doc: toml_edit::DocumentMut = format!("p = {s}").parse().unwrap();
        assert_eq!(doc["p"].as_str(), Some("C:\\a \"b\""));
    }
}
