//! `switchyard validate`: every problem of every file, then one verdict.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::{self, ConfigError};
use crate::runtime::{self, PluginErrors};

pub async fn validate(paths: &[PathBuf], offline: bool) -> ExitCode {
    let mut failed = 0usize;
    for path in paths {
        let shown = path.display().to_string();
        let loaded = match config::load(path) {
            Ok(l) => l,
            Err(e @ ConfigError::Invalid { .. }) => {
                eprintln!("{e}\n");
                failed += 1;
                continue;
            }
            Err(e) => {
                eprintln!("error: {e}\n");
                failed += 1;
                continue;
            }
        };
        for w in &loaded.warnings {
            eprint!("{}", w.render(&shown, &loaded.text));
        }
        let pipeline = loaded.pipeline;
        if !offline {
            match runtime::load_plugins(&pipeline).await {
                Ok(plugins) => {
                    for w in &plugins.warnings {
                        eprintln!("{w} ({shown})");
                    }
                }
                Err(e) => {
                    match e.downcast_ref::<PluginErrors>() {
                        Some(errors) => {
                            for line in &errors.0 {
                                eprintln!("{line}\n  --> {shown}");
                            }
                        }
                        None => eprintln!("error: {e:#}\n  --> {shown}"),
                    }
                    eprintln!();
                    failed += 1;
                    continue;
                }
            }
        }
        let types: std::collections::BTreeSet<&str> = pipeline
            .plugins
            .iter()
            .flat_map(|p| p.subscriptions().map(|(t, _)| t.as_str()))
            .collect();
        println!(
            "ok: {shown}: pipeline `{}`, {} plugin{}, {} routed message type{}{}",
            pipeline.name,
            pipeline.plugins.len(),
            if pipeline.plugins.len() == 1 { "" } else { "s" },
            types.len(),
            if types.len() == 1 { "" } else { "s" },
            if offline { " (plugins not loaded)" } else { "" }
        );
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "{failed} of {} pipeline file{} failed validation",
            paths.len(),
            if paths.len() == 1 { "" } else { "s" }
        );
        ExitCode::FAILURE
    }
}
