//! Reading a pipeline file: [`load`] reads it and hands its text to
//! [`parse`], and [`ConfigError`] says why it cannot be used.

use std::path::{Path, PathBuf};

use super::diagnostic::{Diagnostic, Diagnostics};
use super::model::Pipeline;
use super::parse::parse;

/// Why a pipeline file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read pipeline {}: {error}", .path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The file's text with every diagnostic found in it, rendered against
    /// that text.
    #[error("{}", render_invalid(path, text, diagnostics))]
    Invalid {
        path: PathBuf,
        text: String,
        diagnostics: Diagnostics,
    },
}

fn render_invalid(path: &Path, text: &str, diagnostics: &Diagnostics) -> String {
    let shown = path.display().to_string();
    let mut out = String::new();
    for d in diagnostics.iter() {
        out.push_str(&d.render(&shown, text));
        out.push('\n');
    }
    let n = diagnostics.error_count();
    out.push_str(&format!(
        "pipeline {shown} has {n} error{}",
        if n == 1 { "" } else { "s" }
    ));
    out
}

/// A parsed pipeline with its warnings.
#[derive(Debug)]
pub struct Loaded {
    pub pipeline: Pipeline,
    pub warnings: Vec<Diagnostic>,
    /// The file's text, to render warnings against.
    pub text: String,
}

/// Reads and validates a pipeline file.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.to_owned(),
        error,
    })?;
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let (pipeline, diagnostics) = parse(&text, &absolute);
    match pipeline {
        Some(pipeline) if !diagnostics.has_errors() => Ok(Loaded {
            pipeline,
            warnings: diagnostics.into_vec(),
            text,
        }),
        _ => Err(ConfigError::Invalid {
            path: path.to_owned(),
            text,
            diagnostics,
        }),
    }
}
