//! The `switchyard` command line.

pub mod dlq;
mod fleet;
mod inspect;
mod messages;
mod new;
mod remote;
mod sagas;
mod state;
pub(crate) mod test;
mod validate;
pub mod why;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{ArgGroup, Args, Parser, Subcommand};

use crate::config::{self, parse_duration};
use crate::runtime::{self, RunMode};

/// Switchyard routes messages through sandboxed WebAssembly plugins.
#[derive(Debug, Parser)]
#[command(
    name = "switchyard",
    version,
    about,
    long_about = "Switchyard routes messages from a broker through sandboxed WebAssembly \
component plugins, and adds what event-driven systems keep rebuilding by hand: commands kept \
apart from events, outbox semantics, resource limits, and failures you can find again.",
    after_help = "Examples:
  switchyard validate pipelines/orders.toml
  switchyard send PlaceOrder -p pipelines/orders.toml --data '{\"order_id\":\"A-1\",\"customer\":\"ada\",\"items\":[]}'
  switchyard run pipelines/orders.toml
  switchyard dlq list -p pipelines/orders.toml --group
  switchyard topology pipelines/orders.toml

Logging: set RUST_LOG (e.g. RUST_LOG=debug, RUST_LOG=plugin=warn,info);
--log-format json writes one JSON object a line."
)]
pub struct Cli {
    /// How log lines are written on stderr: text, or one JSON object a
    /// line (with trace_id and span_id on a traced message's lines).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "SWITCHYARD_LOG_FORMAT"
    )]
    pub log_format: crate::telemetry::logging::Format,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a pipeline: consume its queues and call its plugins.
    #[command(after_help = "Examples:
  switchyard run pipelines/orders.toml
  switchyard run pipelines/orders.toml --drain     # stop once every queue is empty
  switchyard run pipelines/orders.toml --trace-stdout
  switchyard run pipelines/orders.toml --watch     # reload changed plugins and pipeline edits
  OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 switchyard run pipelines/orders.toml

Stop with Ctrl-C (SIGINT) or SIGTERM: messages in flight are finished and settled first.
With [admin] token_env set, new plugin versions can be deployed to the running host
(`switchyard deploy`).")]
    Run {
        /// The pipeline TOML file.
        pipeline: PathBuf,
        /// Exit once every queue is empty instead of waiting for more messages.
        #[arg(long)]
        drain: bool,
        /// Watch the pipeline file and its plugins' .wasm files; apply changes
        /// without stopping (same as `[host] watch = true`).
        #[arg(long)]
        watch: bool,
        /// Print each trace as a tree on stdout when it completes (instead of
        /// any other trace export), to follow flows locally.
        #[arg(long)]
        trace_stdout: bool,
    },

    /// Check pipeline files and their plugins; print every problem at once.
    #[command(after_help = "Examples:
  switchyard validate pipelines/orders.toml
  switchyard validate --offline pipelines/*.toml   # the TOML only, without loading plugins

Exits with status 1 if any file has an error.")]
    Validate {
        /// Pipeline TOML files.
        #[arg(required = true)]
        pipelines: Vec<PathBuf>,
        /// Check the TOML only; do not load the plugins' .wasm files.
        #[arg(long)]
        offline: bool,
    },

    /// Send a command to its one handler.
    #[command(after_help = "Examples:
  switchyard send PlaceOrder -p pipelines/orders.toml --data '{\"order_id\":\"A-1\",\"customer\":\"ada\",\"items\":[{\"sku\":\"book\",\"quantity\":1,\"unit_price_cents\":1200}]}'
  switchyard send PlaceOrder -p pipelines/orders.toml --data-file order.json --wait-reply 10s
  switchyard send PlaceOrder -p pipelines/orders.toml --lines orders.jsonl   # one command per line

The command is stored in the pipeline's embedded store, whether or not a host is running;
a running host picks it up within its poll interval.")]
    Send(MessageArgs),

    /// Publish an event to every plugin that consumes it.
    #[command(after_help = "Examples:
  switchyard publish OrderPlaced -p pipelines/orders.toml --data '{\"order_id\":\"A-1\",\"customer\":\"ada\",\"items\":[],\"total_cents\":0}'
  seq 1 1000 | sed 's/.*/{\"n\":&}/' | switchyard publish Tick -p tests/tick.toml --lines -")]
    Publish(MessageArgs),

    /// Look at plugin components, and at what a running host runs.
    #[command(subcommand)]
    Plugins(PluginsCommand),

    /// Deploy a new version of a plugin to a running host, or a plugin or a
    /// whole pipeline file to every host of a pipeline, without stopping them.
    #[command(after_help = "Examples:
  export SWITCHYARD_ADMIN_TOKEN=...        # the value of the host's [admin] token_env variable
  switchyard deploy dist/plugins/payments.wasm --plugin payments
  switchyard deploy payments.wasm --plugin payments --host http://127.0.0.1:9464
  switchyard deploy payments.wasm --plugin payments -p pipelines/shop.toml --wait 30s   # every host ([fleet])
  switchyard deploy payments.wasm --plugin payments -p pipelines/shop.toml --canary 1 --watch 5m
  switchyard deploy -p pipelines/shop.toml --dry-run     # the pipeline file and its plugins: what would change
  switchyard deploy -p pipelines/shop.toml --wait 30s    # ... deployed to every host
  switchyard deploy -p pipelines/shop.toml --status      # how the last deploys are rolling out

The host compiles the component, checks its describe() against the pipeline and
instantiates it before anything changes; a version that fails is refused and the
running one keeps serving. Deployed versions are kept across restarts; undo with
`switchyard plugins rollback NAME`.

With -p, the build is checked against the pipeline here and recorded in the pipeline's
[fleet] database; every host of the pipeline takes it within its poll interval, and a
host that starts later starts on it. See `switchyard fleet status`. With --canary N, N hosts
run it first while the others keep the version the fleet runs; the command waits for the
verdict and exits 1 if the fleet rolled it back.

With -p and no component, the pipeline file itself is deployed, with the builds its plugins
name: it is validated and every plugin loaded and checked as `switchyard validate` does, and
refused whole if anything is wrong. Running hosts apply it as they would an edit of their own
file; its plugins, their routes, grants, limits and retries are what changes. The other
sections ([transport], [state], [admin], [host]...) stay each host's own, and a deploy that
changes them from the deployed file the hosts run is refused, naming them.
Undo a deploy with `switchyard fleet rollback`.")]
    #[command(group(ArgGroup::new("what").args(["file", "status"])))]
    Deploy {
        /// The component (.wasm) file; without it, -p deploys the pipeline
        /// file itself.
        #[arg(requires = "plugin")]
        file: Option<PathBuf>,
        /// The plugin (as named in the pipeline) it replaces.
        #[arg(long, requires = "file")]
        plugin: Option<String>,
        /// With --pipeline: show how the fleet's last deploys are rolling
        /// out (exit status 1 while a live host has not taken them).
        #[arg(long, requires = "pipeline", conflicts_with_all = ["wait", "canary", "dry_run"])]
        status: bool,
        /// With --pipeline: check and show what the deploy would change,
        /// and record nothing.
        #[arg(long, requires = "pipeline")]
        dry_run: bool,
        /// Deploy to every host of this pipeline (it needs a [fleet]
        /// section) instead of one host.
        #[arg(short, long)]
        pipeline: Option<PathBuf>,
        /// With --pipeline: wait until every live host runs it, up to this
        /// long (e.g. 30s); exits 1 if they do not.
        #[arg(long, value_parser = humantime::parse_duration, requires = "pipeline")]
        wait: Option<std::time::Duration>,
        /// With --pipeline: try it on this many hosts first; the rest of
        /// the fleet follows once the --watch window passes without the
        /// canary failing more than the others (by --margin), and the
        /// fleet rolls it back by itself otherwise.
        #[arg(long, requires = "pipeline")]
        canary: Option<usize>,
        /// How long the canary is watched.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5m", requires = "canary")]
        watch: std::time::Duration,
        /// How much higher the canary's share of failed attempts may be
        /// than the other hosts' (0.05: five points).
        #[arg(long, default_value_t = 0.05, requires = "canary")]
        margin: f64,
        /// The attempts the canary must have made before it is judged.
        #[arg(long, default_value_t = 20, requires = "canary")]
        min_attempts: u64,
        #[command(flatten)]
        host: remote::HostArgs,
        #[command(flatten)]
        token: remote::TokenArgs,
    },

    /// The hosts of a pipeline deployed to as a fleet ([fleet]): what each
    /// runs, and the deploy history.
    #[command(subcommand)]
    Fleet(fleet::FleetCommand),

    /// Run contract tests against a plugin component, in the real sandbox,
    /// without a broker.
    #[command(after_help = "Examples:
  switchyard test dist/plugins/orders.wasm plugins/orders/tests/contract.toml
  switchyard test dist/plugins/orders.wasm plugins/orders/tests/*.toml --junit orders.xml
  switchyard test dist/plugins/tally.wasm tally.toml -p pipeline.toml --plugin tally   # its limits and grants

A test file holds [[case]]s: an input message and what must come of it.

  [[case]]
  name = \"an empty order is refused\"
  input = { type = \"PlaceOrder\", json = { order_id = \"A-1\", customer = \"ada\", items = [] } }
  expect = { error = \"permanent\", error_code = \"empty-order\" }

  [[case]]
  name = \"an order is accepted\"
  input = { type = \"PlaceOrder\", json = { order_id = \"A-2\", customer = \"ada\", items = [{ sku = \"book\", quantity = 1, unit_price_cents = 1200 }] } }
  [case.expect]
  published = [{ type = \"OrderPlaced\", json = { order_id = \"A-2\", total_cents = 1200 }, match = \"subset\" }]
  sent = [{ type = \"ChargePayment\", json = { order_id = \"A-2\", customer = \"ada\", amount_cents = 1200 } }]
  reply = { json = { order_id = \"A-2\", total_cents = 1200 } }

Outputs not listed fail the case. Exits with status 1 if any case fails.")]
    Test {
        /// The component (.wasm) under test.
        wasm: PathBuf,
        /// Test files (TOML).
        #[arg(required = true)]
        tests: Vec<PathBuf>,
        /// Also write the results as JUnit XML, for CI systems.
        #[arg(long, value_name = "FILE")]
        junit: Option<PathBuf>,
        /// Run the plugin with the limits and grants of its entry in this
        /// pipeline, and check its outputs against the pipeline's [schemas].
        #[arg(short, long, requires = "plugin")]
        pipeline: Option<PathBuf>,
        /// The plugin's name in --pipeline.
        #[arg(long, requires = "pipeline")]
        plugin: Option<String>,
    },

    /// Inspect, replay and close dead letters: messages the host gave up on.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),

    /// Tell what happened to a message: where it came from, what each
    /// plugin did with it, what it caused, and where it is now.
    #[command(after_help = "Examples:
  switchyard why 0193a4c2-7f1e-7b3c-9a2d-5e8f0a1b2c3d -p pipelines/orders.toml
  switchyard why 0193a4c2 -p pipelines/orders.toml          # a unique prefix of the id
  switchyard why 01a222c2-be70 -p pipelines/orders.toml     # a dead-letter record's id
  switchyard why --correlation order-A-1 -p pipelines/orders.toml --json
  switchyard why --attribute order.id=A-1001 -p pipelines/orders.toml   # a span attribute a plugin set

Reads the pipeline's journal ([journal], on by default) and its dead-letter store.
The message ids are in the host's log lines, in dead letters (`switchyard dlq show`)
and in traces (messaging.message.id).")]
    Why(why::WhyArgs),

    /// Look at what plugins keep in their state.
    #[command(subcommand)]
    State(state::StateCommand),

    /// Look at saga instances: their state, status and every step.
    #[command(subcommand)]
    Sagas(sagas::SagasCommand),

    /// Print the shell completion script for bash, zsh, fish, elvish or
    /// PowerShell.
    #[command(after_help = "Examples:
  source <(switchyard completions bash)                          # this bash session
  switchyard completions bash > ~/.local/share/bash-completion/completions/switchyard
  switchyard completions zsh > \"${fpath[1]}/_switchyard\"
  switchyard completions fish > ~/.config/fish/completions/switchyard.fish")]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },

    /// Print the man page (roff), or write one page per command into a
    /// directory.
    #[command(after_help = "Examples:
  switchyard man | man -l -                  # read it now
  switchyard man --dir /usr/local/share/man/man1   # switchyard.1, switchyard-dlq-replay.1, ...")]
    Man {
        /// Write switchyard.1 and a page for every subcommand here instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },

    /// Start a plugin project (Rust, Python, JavaScript or C) or a pipeline
    /// file from a template.
    #[command(subcommand)]
    New(new::NewCommand),

    /// Print who sends, handles, publishes and consumes each message type, as
    /// a Mermaid flowchart.
    #[command(after_help = "Examples:
  switchyard topology pipelines/orders.toml > orders.mmd
  switchyard topology --offline pipelines/orders.toml   # from the TOML only

Without --offline the plugins are loaded, so their declared outputs appear too.")]
    Topology {
        /// The pipeline TOML file.
        pipeline: PathBuf,
        /// Use the TOML only; outputs declared by the plugins are left out.
        #[arg(long)]
        offline: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum PluginsCommand {
    /// Print what a component declares in describe(), and what it imports.
    #[command(after_help = "Examples:
  switchyard plugins inspect dist/plugins/orders.wasm
  switchyard plugins inspect --json dist/plugins/orders.wasm")]
    Inspect {
        /// The component (.wasm) file.
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },

    /// Print the plugin contract (WIT) this host implements, to generate
    /// bindings from in any language.
    #[command(after_help = "Examples:
  mkdir -p wit && switchyard plugins wit > wit/plugin.wit
  componentize-py -d wit -w plugin componentize app -o plugin.wasm")]
    Wit,

    /// Show what each route of a running host runs: version, digest, source,
    /// since when.
    #[command(after_help = "Examples:
  switchyard plugins list
  switchyard plugins list --host http://127.0.0.1:9464 --json")]
    List {
        #[command(flatten)]
        host: remote::HostArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },

    /// Return a plugin of a running host to the version before its last deploy.
    #[command(after_help = "Examples:
  switchyard plugins rollback payments

Rolling back the only deployed version returns the plugin to its pipeline file.")]
    Rollback {
        /// The plugin, as named in the pipeline.
        plugin: String,
        #[command(flatten)]
        host: remote::HostArgs,
        #[command(flatten)]
        token: remote::TokenArgs,
    },
}

/// Options shared by `send` and `publish`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("body").required(true).args(["data", "data_file", "lines"])))]
pub struct MessageArgs {
    /// The message type, e.g. PlaceOrder.
    pub message_type: String,
    /// The pipeline TOML file whose store receives the message.
    #[arg(short, long, env = "SWITCHYARD_PIPELINE")]
    pub pipeline: PathBuf,
    /// The payload, inline.
    #[arg(long)]
    pub data: Option<String>,
    /// Read the payload from a file (`-` for stdin).
    #[arg(long, value_name = "PATH")]
    pub data_file: Option<PathBuf>,
    /// Read one payload per line from a file (`-` for stdin); each line becomes a message.
    #[arg(long, value_name = "PATH")]
    pub lines: Option<PathBuf>,
    /// Media type of the payload. JSON payloads are checked before sending.
    #[arg(long, default_value = "application/json")]
    pub content_type: String,
    /// A header to attach, as NAME=VALUE. Repeatable.
    #[arg(long = "header", short = 'H', value_name = "NAME=VALUE")]
    pub headers: Vec<String>,
    /// Correlation id of the flow this message belongs to.
    #[arg(long)]
    pub correlation_id: Option<String>,
    /// Wait this long for the handler's reply and print it (send only).
    #[arg(long, visible_alias = "wait", value_name = "DURATION", value_parser = parse_wait, num_args = 0..=1, default_missing_value = "30s")]
    pub wait_reply: Option<Duration>,
}

/// Writes `bytes` to stdout; a reader that stops early (`| head`) is not
/// an error.
fn print_bytes(bytes: &[u8]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context("cannot write to stdout"))
        }
        _ => Ok(()),
    }
}

/// The man page on stdout, or every command's page written into `dir`.
fn man(dir: Option<&std::path::Path>) -> Result<ExitCode> {
    // No `help` subcommand: its page would be one more to write and it
    // says what --help says.
    let cmd = <Cli as clap::CommandFactory>::command().disable_help_subcommand(true);
    match dir {
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut page)?;
            print_bytes(&page)?;
        }
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(cmd, dir)
                .with_context(|| format!("cannot write the man pages into {}", dir.display()))?;
            eprintln!("man pages written to {}", dir.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_wait(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

/// Runs a parsed command line and maps the outcome to an exit status.
pub fn main(cli: Cli) -> ExitCode {
    let default_log = match cli.command {
        Command::Run { .. } => "info",
        _ => "warn",
    };
    if !matches!(cli.command, Command::Run { .. }) {
        crate::telemetry::logging::init(default_log, cli.log_format);
    }
    match execute(cli) {
        Ok(code) => code,
        Err(e) => {
            // These render their own `error:` lines, with places.
            let self_rendered = e
                .downcast_ref::<config::ConfigError>()
                .is_some_and(|c| matches!(c, config::ConfigError::Invalid { .. }))
                || e.downcast_ref::<runtime::PluginErrors>().is_some();
            if self_rendered {
                eprintln!("{e}");
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

fn execute(cli: Cli) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let log_format = cli.log_format;
    rt.block_on(async move {
        match cli.command {
            Command::Run {
                pipeline,
                drain,
                watch,
                trace_stdout,
            } => run(pipeline, drain, watch, trace_stdout, log_format)
                .await
                .map(|()| ExitCode::SUCCESS),
            Command::Deploy {
                pipeline: Some(pipeline),
                status: true,
                ..
            } => fleet::rollout(&pipeline).await,
            Command::Deploy {
                file,
                plugin,
                pipeline: Some(pipeline),
                wait,
                canary,
                watch,
                margin,
                min_attempts,
                dry_run,
                ..
            } => {
                let canary = canary.map(|hosts| crate::fleet::Canary {
                    hosts,
                    watch,
                    margin,
                    min_attempts,
                });
                match (file, plugin) {
                    (Some(file), Some(plugin)) => {
                        fleet::deploy(&file, &plugin, &pipeline, wait, canary, dry_run).await
                    }
                    _ if canary.is_some() => anyhow::bail!(
                        "--canary tries one plugin's build: give the component and --plugin"
                    ),
                    _ => fleet::deploy_pipeline(&pipeline, wait, dry_run).await,
                }
            }
            Command::Deploy {
                file: Some(file),
                plugin: Some(plugin),
                pipeline: None,
                host,
                token,
                dry_run: false,
                ..
            } => remote::deploy(&file, &plugin, &host, &token)
                .await
                .map(|()| ExitCode::SUCCESS),
            Command::Deploy { .. } => anyhow::bail!(
                "give a component and --plugin to deploy to one host, or -p PIPELINE to deploy to a fleet ([fleet]); see `switchyard deploy --help`"
            ),
            Command::Fleet(command) => fleet::run(command).await,
            Command::Plugins(PluginsCommand::List { host, json }) => {
                remote::list(&host, json).await.map(|()| ExitCode::SUCCESS)
            }
            Command::Plugins(PluginsCommand::Rollback {
                plugin,
                host,
                token,
            }) => remote::rollback(&plugin, &host, &token)
                .await
                .map(|()| ExitCode::SUCCESS),
            Command::Validate { pipelines, offline } => {
                Ok(validate::validate(&pipelines, offline).await)
            }
            Command::Send(args) => messages::send(args, crate::envelope::Kind::Command).await,
            Command::Publish(args) => messages::send(args, crate::envelope::Kind::Event).await,
            Command::Plugins(PluginsCommand::Inspect { file, json }) => {
                inspect::inspect(&file, json)
                    .await
                    .map(|()| ExitCode::SUCCESS)
            }
            Command::Plugins(PluginsCommand::Wit) => {
                print_bytes(crate::plugin::WIT.as_bytes())?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Dlq(command) => dlq::run(command).await,
            Command::Completions { shell } => {
                let mut cmd = <Cli as clap::CommandFactory>::command();
                let mut script = Vec::new();
                clap_complete::generate(shell, &mut cmd, "switchyard", &mut script);
                print_bytes(&script)?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Man { dir } => man(dir.as_deref()),
            Command::New(command) => new::run(command),
            Command::State(command) => state::run(command).await,
            Command::Sagas(command) => sagas::run(command).await,
            Command::Why(args) => why::run(args).await,
            Command::Test {
                wasm,
                tests,
                junit,
                pipeline,
                plugin,
            } => {
                let (limits, grants, schemas) = match (pipeline, plugin) {
                    (Some(path), Some(name)) => {
                        let pipeline = load_pipeline(&path)?;
                        let spec = pipeline.plugin(&name).with_context(|| {
                            format!("{} has no plugin `{name}`", path.display())
                        })?;
                        let schemas = crate::schemas::Schemas::load(&pipeline)?;
                        (spec.limits.clone(), spec.grants.clone(), schemas)
                    }
                    _ => Default::default(),
                };
                let passed = test::run(
                    &wasm,
                    &tests,
                    junit.as_deref(),
                    limits,
                    grants,
                    std::sync::Arc::new(schemas),
                )
                .await?;
                Ok(if passed {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            Command::Topology { pipeline, offline } => inspect::topology(&pipeline, offline)
                .await
                .map(|()| ExitCode::SUCCESS),
        }
    })
}

/// Loads a pipeline file, printing its warnings; errors carry every diagnostic.
pub(crate) fn load_pipeline(path: &std::path::Path) -> Result<config::Pipeline> {
    load_pipeline_and_text(path).map(|(p, _)| p)
}

/// [`load_pipeline`], with the text it read.
pub(crate) fn load_pipeline_and_text(path: &std::path::Path) -> Result<(config::Pipeline, String)> {
    let loaded = config::load(path)?;
    let shown = path.display().to_string();
    for w in &loaded.warnings {
        eprint!("{}", w.render(&shown, &loaded.text));
    }
    Ok((loaded.pipeline, loaded.text))
}

async fn run(
    path: PathBuf,
    drain: bool,
    watch: bool,
    trace_stdout: bool,
    log_format: crate::telemetry::logging::Format,
) -> Result<()> {
    let mut pipeline = load_pipeline(&path)?;
    let admin_token = match &pipeline.admin_token_env {
        Some(var) => match std::env::var(var) {
            Ok(t) if !t.is_empty() => Some(t),
            _ => anyhow::bail!(
                "{}: [admin] token_env names {var}, which is not set in this environment (set it to the token deploys must present)",
                path.display()
            ),
        },
        None => None,
    };
    let mut settings = pipeline.telemetry.resolve(&pipeline.name)?;
    if trace_stdout {
        settings.traces = crate::config::TraceExport::Stdout;
    }
    let telemetry = crate::telemetry::Telemetry::start(&settings)?;
    crate::telemetry::logging::init_with("info", log_format, telemetry.sdk_tracer());
    if telemetry.tracing() {
        tracing::info!(export = ?settings.traces, service = %settings.service_name, "Tracing on");
    }
    let own = pipeline.clone();
    if let Some(fleet) = &pipeline.fleet {
        // Start on the versions deployed to the fleet; without the
        // database, on the ones this host last had.
        let prepare = async {
            crate::fleet::Fleet::connect(fleet, &pipeline.name)
                .await?
                .prepare(&pipeline)
                .await
        };
        let prepared = tokio::time::timeout(std::time::Duration::from_secs(30), prepare)
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the database did not answer within 30s")));
        match prepared {
            Ok(crate::fleet::Prepared {
                pipeline: Some((_, deployed)),
                ..
            }) => pipeline = deployed,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "Fleet: cannot read the versions deployed to the fleet; starting on the ones this host has");
            }
        }
    }
    let deployed = runtime::deployed_versions(&pipeline)?;
    let plugins = match runtime::load_plugins_from(&pipeline, &deployed).await {
        Ok(p) => p,
        // What the fleet's file needs does not load here: the host's own
        // file is better than no host.
        Err(e) if pipeline != own => {
            tracing::error!(error = %format!("{e:#}"), "Fleet: cannot start on the pipeline file deployed to the fleet; starting on this host's own");
            pipeline = own;
            let deployed = runtime::deployed_versions(&pipeline)?;
            runtime::load_plugins_from(&pipeline, &deployed).await?
        }
        Err(e) => return Err(e),
    };
    let mode = if drain {
        RunMode::Drain
    } else {
        RunMode::Serve
    };
    let options = runtime::RunOptions {
        mode,
        telemetry: telemetry.clone(),
        admin: pipeline.admin,
        admin_token,
        watch: watch || pipeline.watch,
        on_started: None,
        transport: None,
    };
    let result = runtime::run_with(&pipeline, plugins, options, shutdown_signal()).await;
    // Flushing spans can block on the network: not on the async runtime.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    result
}

/// Completes on the first Ctrl-C or SIGTERM; a second one exits at once
/// (unsettled messages are redelivered on the next start).
async fn shutdown_signal() {
    signal().await;
    tokio::spawn(async {
        signal().await;
        eprintln!(
            "second signal: exiting now; messages in flight will be handled again on the next start"
        );
        std::process::exit(130);
    });
}

async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
