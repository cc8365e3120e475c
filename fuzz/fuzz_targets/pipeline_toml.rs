//! The pipeline reader: any text is a pipeline or a list of diagnostics,
//! each rendered against the text, and never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let path = std::path::Path::new("/fuzz/pipeline.toml");
    let (pipeline, diagnostics) = switchyard::config::parse(text, path);
    for d in diagnostics.iter() {
        let _ = d.render("pipeline.toml", text);
    }
    if let Some(p) = pipeline {
        assert!(!diagnostics.has_errors(), "a pipeline with errors: {p:?}");
    }
});
