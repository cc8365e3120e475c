//! `switchyard plugins inspect` and `switchyard topology`.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context as _, Result};
use serde_json::json;

use crate::config::{Limits, PluginName, format_size};
use crate::envelope::Kind;
use crate::plugin::{ComponentCache, PluginEngine, Sandbox};
use crate::runtime;

pub async fn inspect(file: &Path, as_json: bool) -> Result<()> {
    let file = file.to_owned();
    let (plugin, imports) = tokio::task::spawn_blocking(move || -> Result<_> {
        let engine = PluginEngine::new(ComponentCache::default_dir())?;
        let sandbox = Sandbox {
            name: PluginName::try_from("inspect").map_err(anyhow::Error::msg)?,
            limits: Limits::default(),
            grants: Default::default(),
        };
        let plugin = engine.load(&file, sandbox)?;
        let imports = plugin.imports(engine.engine());
        Ok((plugin, imports))
    })
    .await
    .context("inspect task failed")??;
    let info = plugin.info();
    if as_json {
        let v = json!({
            "name": info.name,
            "version": info.version,
            "file": plugin.path(),
            "size": plugin.size(),
            "digest": plugin.digest(),
            "handles": info.handles.iter().map(|(t, k)| json!({"type": t, "kind": k.as_str()})).collect::<Vec<_>>(),
            "publishes": info.publishes,
            "sends": info.sends,
            "imports": imports,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let mut out = String::new();
    let _ = writeln!(out, "plugin     {} {}", info.name, info.version);
    let _ = writeln!(
        out,
        "file       {} ({})",
        plugin.path().display(),
        format_size(plugin.size() as u64)
    );
    let _ = writeln!(out, "digest     {}", plugin.digest());
    for (t, k) in &info.handles {
        let _ = writeln!(out, "handles    {k} {t}");
    }
    for t in &info.publishes {
        let _ = writeln!(out, "publishes  event {t}");
    }
    for t in &info.sends {
        let _ = writeln!(out, "sends      command {t}");
    }
    for i in &imports {
        let _ = writeln!(out, "imports    {i}");
    }
    print!("{out}");
    Ok(())
}

/// A Mermaid-safe node id.
fn node(prefix: &str, name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("{prefix}_{cleaned}")
}

pub async fn topology(path: &Path, offline: bool) -> Result<()> {
    let pipeline = super::load_pipeline(path)?;
    let plugins = if offline {
        None
    } else {
        Some(runtime::load_plugins(&pipeline).await?)
    };
    let mut out = String::new();
    let _ = writeln!(out, "%% Pipeline `{}` ({})", pipeline.name, path.display());
    if offline {
        let _ = writeln!(
            out,
            "%% Offline: outputs declared by the plugins are not shown."
        );
    }
    let _ = writeln!(out, "flowchart LR");
    let mut types: BTreeSet<(String, Kind)> = BTreeSet::new();
    let mut edges = Vec::new();
    for p in &pipeline.plugins {
        let _ = writeln!(
            out,
            "    {}[\"{}\"]:::plugin",
            node("p", p.name.as_str()),
            p.name
        );
        for (t, k) in p.subscriptions() {
            types.insert((t.to_string(), k));
            let verb = if k == Kind::Command {
                "handles"
            } else {
                "consumes"
            };
            edges.push(format!(
                "    {} -->|{verb}| {}",
                node("t", t.as_str()),
                node("p", p.name.as_str())
            ));
        }
        if let Some(loaded) = plugins
            .as_ref()
            .and_then(|ps| ps.loaded.iter().find(|l| l.name() == &p.name))
        {
            for t in &loaded.info().publishes {
                types.insert((t.clone(), Kind::Event));
                edges.push(format!(
                    "    {} -.->|publishes| {}",
                    node("p", p.name.as_str()),
                    node("t", t)
                ));
            }
            for t in &loaded.info().sends {
                types.insert((t.clone(), Kind::Command));
                edges.push(format!(
                    "    {} -.->|sends| {}",
                    node("p", p.name.as_str()),
                    node("t", t)
                ));
            }
        }
    }
    for (t, k) in &types {
        match k {
            Kind::Command => {
                let _ = writeln!(out, "    {}[/\"{t}\"/]:::command", node("t", t));
            }
            Kind::Event => {
                let _ = writeln!(out, "    {}{{{{\"{t}\"}}}}:::event", node("t", t));
            }
        }
    }
    for e in edges {
        let _ = writeln!(out, "{e}");
    }
    let _ = writeln!(out, "    classDef plugin fill:#eef,stroke:#447");
    let _ = writeln!(out, "    classDef command fill:#fee,stroke:#a44");
    let _ = writeln!(out, "    classDef event fill:#efe,stroke:#4a4");
    print!("{out}");
    Ok(())
}
