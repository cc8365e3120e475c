//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use switchyard::config::Pipeline;
use switchyard::config::{Grants, Limits, PluginName};
use switchyard::envelope::{Envelope, Kind};
use switchyard::plugin::{LoadedPlugin, PluginEngine, Sandbox};
use switchyard::runtime::{self, RunOptions};
use switchyard::supervisor::RouteInfo;
use tokio::sync::oneshot;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ has a parent")
        .to_owned()
}

/// A compiled plugin from `dist/plugins/`.
pub fn wasm(name: &str) -> PathBuf {
    let path = workspace_root()
        .join("dist")
        .join("plugins")
        .join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask build-plugins` (or `cargo xtask test`) first",
        path.display()
    );
    path
}

/// One engine for the whole test binary, with its own compile cache.
pub fn engine() -> &'static PluginEngine {
    static ENGINE: OnceLock<PluginEngine> = OnceLock::new();
    ENGINE.get_or_init(|| PluginEngine::new(Some(cache_dir())).expect("engine"))
}

pub fn cache_dir() -> PathBuf {
    std::env::temp_dir().join("switchyard-test-cache")
}

pub fn sandbox(name: &str, limits: Limits, grants: Grants) -> Sandbox {
    Sandbox {
        name: PluginName::try_from(name).expect("valid name"),
        limits,
        grants,
    }
}

pub fn load(name: &str) -> LoadedPlugin {
    load_with(name, Limits::default(), Grants::default())
}

pub fn load_with(name: &str, limits: Limits, grants: Grants) -> LoadedPlugin {
    engine()
        .load(&wasm(name), sandbox(name, limits, grants))
        .unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

pub fn message(kind: Kind, message_type: &str, payload: serde_json::Value) -> Envelope {
    Envelope::new(
        message_type,
        kind,
        serde_json::to_vec(&payload).expect("json"),
        "application/json",
    )
}

pub fn misbehave(action: &str) -> Envelope {
    message(
        Kind::Command,
        "Misbehave",
        serde_json::json!({ "action": action }),
    )
}

/// Writes a pipeline file into `dir`, with `{dist}` replaced by the plugin
/// directory, and returns its path.
pub fn write_pipeline(dir: &Path, name: &str, toml: &str) -> PathBuf {
    let dist = workspace_root().join("dist").join("plugins");
    let text = toml
        .replace("{dist}", &dist.display().to_string())
        .replace("{cache}", &cache_dir().display().to_string());
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("write pipeline");
    path
}

/// Writes an embedded pipeline (`[host]` with the test cache, then
/// `body`), queues `messages` and runs it until none is left.
pub async fn drain_embedded(
    dir: &Path,
    name: &str,
    body: &str,
    messages: Vec<Envelope>,
) -> (PathBuf, Pipeline) {
    use switchyard::transport::Transport as _;
    let path = write_pipeline(
        dir,
        name,
        &format!("[host]\ncache_dir = \"{{cache}}\"\n{body}"),
    );
    let pipeline = switchyard::config::load(&path).unwrap().pipeline;
    let transport = runtime::open_transport(&pipeline).unwrap();
    transport.enqueue(messages).await.unwrap();
    drop(transport);
    let plugins = runtime::load_plugins(&pipeline).await.unwrap();
    runtime::run(
        &pipeline,
        plugins,
        runtime::RunMode::Drain,
        std::future::pending(),
    )
    .await
    .unwrap();
    (path, pipeline)
}

/// The switchyard binary built for this test run.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_switchyard"))
}

/// The example pipeline, `pipelines/orders.toml`, with its `[transport]`
/// section replaced by `transport` and nothing else changed, written into
/// `dir`. Its plugin paths are made absolute so that it can live there, and
/// it compiles into the tests' cache.
pub fn example_pipeline(dir: &Path, transport: &str) -> PathBuf {
    let original = workspace_root().join("pipelines").join("orders.toml");
    let text = std::fs::read_to_string(&original).expect("pipelines/orders.toml");
    let start = text
        .find("\n[transport]\n")
        .expect("the example has a [transport] section");
    let end = text[start + 1..]
        .find("\n[")
        .map_or(text.len(), |i| start + 1 + i);
    let dist = workspace_root().join("dist").join("plugins");
    let text = format!(
        "{}\n{}\n{}\n[host]\ncache_dir = \"{}\"\n",
        &text[..start],
        transport.trim(),
        &text[end..],
        cache_dir().display()
    )
    .replace("../dist/plugins", &dist.display().to_string());
    let path = dir.join("orders.toml");
    std::fs::write(&path, text).expect("write pipeline");
    path
}

/// The rogue plugin with its dead letters copied to the broker; a message
/// it fails is tried twice (one immediate retry), then dead-lettered.
pub const ROGUE_WITH_BROKER_DEAD_LETTERS: &str = r#"
        [dead_letters]
        broker = true
        [plugins.rogue]
        wasm = "{dist}/rogue.wasm"
        commands = ["Misbehave", "Sent"]
        retry = { immediate = 1, delayed = 0 }
        "#;

/// Starts the transport and enqueues a command the rogue plugin always
/// fails, with a header of its own; returns it.
pub async fn enqueue_failing(transport: &dyn switchyard::transport::Transport) -> Envelope {
    transport.start_consuming().await.expect("start consuming");
    let mut failing = misbehave("fail-after-publish");
    failing.headers = vec![("tenant".into(), "acme".into())];
    transport
        .enqueue(vec![failing.clone()])
        .await
        .expect("enqueue");
    failing
}

/// Stops a host the way an operator does (SIGTERM: it finishes what it
/// holds, settles it and exits), killing it if it has not exited within
/// 30 seconds.
pub fn stop(mut host: std::process::Child) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &host.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = host.try_wait() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = host.kill();
    let _ = host.wait();
    panic!("the host did not stop within 30 s of SIGTERM");
}

/// Every dead letter of a pipeline, oldest failure first.
pub async fn dead_letters(
    pipeline: &switchyard::config::Pipeline,
) -> Vec<switchyard::dlq::DeadLetter> {
    let store = switchyard::dlq::open(&pipeline.dead_letters, &pipeline.name)
        .await
        .expect("dead-letter store");
    let mut all = store
        .list(&switchyard::dlq::Filter::default())
        .await
        .expect("list dead letters");
    all.reverse();
    all
}

/// A host running in this process.
pub struct Running {
    pub control: std::sync::Arc<switchyard::supervisor::Supervisor>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    pub async fn start(p: &Pipeline, mut options: RunOptions) -> Running {
        let deployed = runtime::deployed_versions(p).unwrap();
        let plugins = runtime::load_plugins_from(p, &deployed).await.unwrap();
        let (started, control) = oneshot::channel();
        options.on_started = Some(started);
        let (stop, stopped) = oneshot::channel::<()>();
        let pipeline = p.clone();
        let task = tokio::spawn(async move {
            runtime::run_with(&pipeline, plugins, options, async move {
                let _ = stopped.await;
            })
            .await
        });
        let control = control.await.expect("the host started");
        Running {
            control,
            stop,
            task,
        }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }

    pub async fn route(&self, plugin: &str) -> Option<RouteInfo> {
        self.control
            .list()
            .await
            .into_iter()
            .find(|r| r.plugin == plugin)
    }
}

/// Polls `check` until it holds, failing after `limit`.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The reasons of a refused change, one per line; fails on anything else.
pub fn refused<T: std::fmt::Debug>(
    result: Result<T, switchyard::supervisor::ChangeError>,
) -> String {
    match result {
        Err(switchyard::supervisor::ChangeError::Refused(reasons)) => reasons.join("\n"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The message ids a tally plugin wrote to `dir/tally.log` (empty if none).
pub fn tally_ids(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("tally.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| l.split(' ').next().unwrap_or_default().to_owned())
        .collect()
}

/// A test CA, and a certificate for `localhost` and 127.0.0.1 it signed.
pub struct TestCertificates {
    /// The CA's certificate, in PEM: what a client trusts.
    pub ca_pem: String,
    /// The server's certificate and private key, in PEM and in DER.
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: Vec<u8>,
    pub key_der: Vec<u8>,
}

pub fn test_certificates() -> TestCertificates {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Names of their own: a certificate whose issuer is its own subject
    // reads as self-signed to OpenSSL.
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Switchyard test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let cert = params.signed_by(&key, &ca).unwrap();
    TestCertificates {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        cert_der: cert.der().to_vec(),
        key_der: key.serialize_der(),
    }
}

/// The lines of a tally log: message id and version tag (`v1` when untagged).
pub fn tally_lines(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            let mut words = l.split(' ');
            let id = words.next().unwrap_or_default().to_owned();
            let tag = words
                .next()
                .filter(|w| w.starts_with('v'))
                .unwrap_or("v1")
                .to_owned();
            (id, tag)
        })
        .collect()
}
