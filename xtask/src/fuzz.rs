//! `cargo xtask fuzz [--dev] [--seconds N] [TARGET...]`: the fuzz targets
//! in `fuzz/`, each for a while, from its corpus in `fuzz/corpus/<target>`
//! (new finds are added there). `--dev` builds them unoptimized, which a
//! short run (CI) gains from.
//!
//! The targets build with the pinned toolchain (`RUSTC_BOOTSTRAP` lets it
//! take the coverage flags cargo-fuzz passes) and without a sanitizer: the
//! host forbids unsafe code, so what fuzzing looks for is a panic, a hang
//! or runaway memory on input, which libFuzzer reports by itself.

use std::process::Command;

use crate::{Result, metadata, root};

/// cargo-fuzz, from crates.io.
const CARGO_FUZZ: &str = "0.13.2";

/// Every target, in the order they run.
pub const TARGETS: [&str; 5] = [
    "pipeline_toml",
    "amqp_properties",
    "kafka_record",
    "cloudevents_attributes",
    "dlq_filter",
];

pub fn run(args: &[String]) -> Result<()> {
    let mut seconds = 60u64;
    let mut dev = false;
    let mut targets: Vec<String> = Vec::new();
    let mut rest = args.iter();
    while let Some(a) = rest.next() {
        if a == "--dev" {
            dev = true;
        } else if a == "--seconds" {
            seconds = rest
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or("--seconds takes a number")?;
        } else if TARGETS.contains(&a.as_str()) {
            targets.push(a.clone());
        } else {
            return Err(format!(
                "unknown fuzz target `{a}`; the targets are {}",
                TARGETS.join(", ")
            ));
        }
    }
    if targets.is_empty() {
        targets = TARGETS.iter().map(|t| (*t).to_owned()).collect();
    }
    let cargo_fuzz = crate::languages::cargo_tool_any("cargo-fuzz", CARGO_FUZZ, "cargo-fuzz")?;
    let target_dir = metadata()?.target_dir.join("fuzz");
    let fuzz_dir = root().join("fuzz");
    for t in &targets {
        let corpus = fuzz_dir.join("corpus").join(t);
        std::fs::create_dir_all(&corpus)
            .map_err(|e| format!("cannot create {}: {e}", corpus.display()))?;
        eprintln!("xtask: fuzzing {t} for {seconds} s");
        let mut cmd = Command::new(&cargo_fuzz);
        cmd.current_dir(&fuzz_dir)
            .env("CARGO_TARGET_DIR", &target_dir)
            .env("RUSTC_BOOTSTRAP", "1")
            .args(["fuzz", "run", "--sanitizer", "none"]);
        if dev {
            // Unoptimized: a cold build takes a fraction of the time, which
            // a short run (CI) gains from.
            cmd.arg("--dev");
        }
        crate::run(
            cmd.arg(t)
                .arg(&corpus)
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                .arg("-rss_limit_mb=2048")
                // Up to the largest limits the decoders enforce (64 KiB of
                // headers, 256 KiB of history), and beyond.
                .arg("-max_len=300000")
                .arg("-timeout=10")
                .arg("-print_final_stats=1"),
        )?;
    }
    Ok(())
}
