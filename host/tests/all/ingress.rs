//! `[ingress]`: HTTP requests become commands and events, and a command's
//! reply comes back as the response; driven by a client that is not ours
//! (Python's standard library) against the `switchyard` binary.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{bin, example_pipeline, stop, workspace_root};

const TOKEN: &str = "ingress-test-token";
const MAX_BODY: u64 = 4096;

pub(crate) fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// The example pipeline on the embedded transport with an ingress, and a
/// contract on PlaceOrder.
fn pipeline(dir: &Path, listen: SocketAddr) -> std::path::PathBuf {
    let path = example_pipeline(
        dir,
        "[transport]\nkind = \"embedded\"\npath = \"orders.db\"",
    );
    std::fs::write(
        dir.join("place-order.json"),
        r#"{"type": "object", "required": ["order_id", "customer", "items"]}"#,
    )
    .unwrap();
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&format!(
        "\n[ingress]\nlisten = \"{listen}\"\ntoken_env = \"INGRESS_TOKEN\"\nmax_body = {MAX_BODY}\n\n[schemas]\nPlaceOrder = \"place-order.json\"\n"
    ));
    std::fs::write(&path, text).unwrap();
    path
}

/// `switchyard run`, once its ingress takes connections.
pub(crate) fn run(path: &Path, listen: SocketAddr, token: Option<&str>) -> Child {
    let env: Vec<(&str, &str)> = token.map(|t| ("INGRESS_TOKEN", t)).into_iter().collect();
    run_with(path, listen, &env)
}

/// `switchyard run` with these environment variables (and no other token
/// variables), once its ingress takes connections.
fn run_with(path: &Path, listen: SocketAddr, env: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(bin());
    cmd.args(["run"])
        .arg(path)
        .env_remove("INGRESS_TOKEN")
        .env_remove("WEBHOOK_TOKEN")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut host = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(listen).is_err() {
        if let Ok(Some(status)) = host.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = host.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("the host exited ({status}) before its ingress listened:\n{err}");
        }
        assert!(Instant::now() < deadline, "the ingress never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    host
}

#[test]
fn a_foreign_client_sends_commands_and_events_at_every_limit() {
    let dir = tempfile::tempdir().unwrap();
    let listen = free_addr();
    let path = pipeline(dir.path(), listen);
    let host = run(&path, listen, Some(TOKEN));
    let ids = run_client(
        &path,
        host,
        "ingress_client.py",
        &[
            format!("http://{listen}"),
            TOKEN.into(),
            MAX_BODY.to_string(),
        ],
    );
    assert_eq!(ids.len(), 3, "{ids:?}");
}

/// Runs the Python client `script` of tests/interop against the host, and
/// stops the host. The client must end with "ok", and every message it
/// made durable under an id of its own (its "ids" line) must have been
/// handled by the host under that id. Gives those ids.
fn run_client(path: &Path, host: Child, script: &str, args: &[String]) -> Vec<String> {
    let python = std::env::var("SWITCHYARD_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(python)
        .arg(workspace_root().join("tests/interop").join(script))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let ids: Vec<String> = stdout
        .lines()
        .find_map(|l| l.strip_prefix("ids "))
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let handled = wait_for_handled(path, &ids);
    stop(host);
    assert!(
        out.status.success() && stdout.lines().last() == Some("ok"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(handled, "not every id was handled: {ids:?}");
    ids
}

/// Whether `switchyard why` finds each id handled by `orders`, within 30 s.
fn wait_for_handled(path: &Path, ids: &[String]) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    ids.iter().all(|id| {
        loop {
            let out = Command::new(bin())
                .args(["why", id, "-p"])
                .arg(path)
                .arg("--json")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            if out.status.success() && text.contains("\"handled\"") {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })
}

#[test]
fn an_ingress_without_its_token_does_not_start_and_one_off_loopback_needs_one() {
    let dir = tempfile::tempdir().unwrap();
    let listen = free_addr();
    let path = pipeline(dir.path(), listen);
    let out = Command::new(bin())
        .args(["run"])
        .arg(&path)
        .env_remove("INGRESS_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("INGRESS_TOKEN, which is not set"), "{err}");

    let open = dir.path().join("open.toml");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace(&format!("listen = \"{listen}\""), "listen = \"0.0.0.0:0\"")
        .replace("token_env = \"INGRESS_TOKEN\"\n", "");
    std::fs::write(&open, text).unwrap();
    let out = Command::new(bin())
        .args(["validate", "--offline"])
        .arg(&open)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("which other machines can reach, without a token"),
        "{said}"
    );
}

/// HTTPS with a certificate from the test CA, a token for every type and
/// another for the event OrderPlaced only, driven by the CloudEvents SDK
/// for Python in binary and structured mode.
#[test]
fn over_https_the_cloudevents_sdk_sends_in_both_modes_and_a_type_token_admits_its_type_only() {
    let dir = tempfile::tempdir().unwrap();
    let listen = free_addr();
    let path = pipeline(dir.path(), listen);
    let certs = crate::common::test_certificates();
    std::fs::write(dir.path().join("ca.pem"), &certs.ca_pem).unwrap();
    std::fs::write(dir.path().join("ingress.pem"), &certs.cert_pem).unwrap();
    std::fs::write(dir.path().join("ingress-key.pem"), &certs.key_pem).unwrap();
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "token_env = \"INGRESS_TOKEN\"\n",
        "token_env = \"INGRESS_TOKEN\"\ntls_cert = \"ingress.pem\"\ntls_key = \"ingress-key.pem\"\ntokens = { OrderPlaced = \"WEBHOOK_TOKEN\" }\n",
    );
    std::fs::write(&path, text).unwrap();

    // Without the event type's token in the environment the host does not
    // start, and says which variable is missing.
    let out = Command::new(bin())
        .args(["run"])
        .arg(&path)
        .env("INGRESS_TOKEN", TOKEN)
        .env_remove("WEBHOOK_TOKEN")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains(
                "tokens.OrderPlaced names the environment variable WEBHOOK_TOKEN, which is not set"
            ),
        "{err}"
    );

    let webhook = "webhook-token-for-order-placed";
    let host = run_with(
        &path,
        listen,
        &[("INGRESS_TOKEN", TOKEN), ("WEBHOOK_TOKEN", webhook)],
    );
    let ids = run_client(
        &path,
        host,
        "ingress_cloudevents.py",
        &[
            format!("https://localhost:{}", listen.port()),
            dir.path().join("ca.pem").display().to_string(),
            TOKEN.into(),
            webhook.into(),
        ],
    );
    assert_eq!(ids, ["sdk-binary-1", "sdk-structured-1", "sdk-binary-3"]);
}

/// A store that does not take the message within 10 s (another process
/// holds its write lock) is answered 503 with `Retry-After`; once the
/// store is free, the same request is accepted.
#[tokio::test(flavor = "multi_thread")]
async fn a_store_that_does_not_take_the_message_is_answered_503_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let listen = free_addr();
    let path = pipeline(dir.path(), listen);
    let host = tokio::task::spawn_blocking({
        let path = path.clone();
        move || run(&path, listen, Some(TOKEN))
    })
    .await
    .unwrap();
    let store = rusqlite::Connection::open(dir.path().join("orders.db")).unwrap();
    store.execute_batch("BEGIN IMMEDIATE").unwrap();
    let client = reqwest::Client::new();
    let post = || {
        client
            .post(format!("http://{listen}/events/OrderPlaced"))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(r#"{"order_id":"S-1","customer":"ada","items":[],"total_cents":0}"#)
            .send()
    };
    let busy = post().await.unwrap();
    let status = busy.status().as_u16();
    let retry_after = busy
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let said = busy.text().await.unwrap();
    store.execute_batch("ROLLBACK").unwrap();
    let free = post().await.unwrap();
    let free_status = free.status().as_u16();
    tokio::task::spawn_blocking(move || stop(host))
        .await
        .unwrap();
    assert_eq!(status, 503, "{said}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert!(said.contains("did not take it within 10 s"), "{said}");
    assert_eq!(free_status, 202);
}

/// A certificate and key that do not belong together, or a file that is
/// not there, stop the host with the file named.
#[test]
fn an_ingress_whose_certificate_cannot_be_used_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let listen = free_addr();
    let path = pipeline(dir.path(), listen);
    let one = crate::common::test_certificates();
    let other = crate::common::test_certificates();
    std::fs::write(dir.path().join("ingress.pem"), &one.cert_pem).unwrap();
    std::fs::write(dir.path().join("other-key.pem"), &other.key_pem).unwrap();
    let with = |cert: &str, key: &str| {
        let text = std::fs::read_to_string(&path).unwrap().replace(
            "token_env = \"INGRESS_TOKEN\"\n",
            &format!("token_env = \"INGRESS_TOKEN\"\ntls_cert = \"{cert}\"\ntls_key = \"{key}\"\n"),
        );
        let p = dir.path().join("tls.toml");
        std::fs::write(&p, text).unwrap();
        let out = Command::new(bin())
            .args(["run"])
            .arg(&p)
            .env("INGRESS_TOKEN", TOKEN)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = with("ingress.pem", "other-key.pem");
    assert!(
        err.contains("other-key.pem does not go with the certificate in")
            && err.contains("ingress.pem"),
        "{err}"
    );
    let err = with("missing.pem", "other-key.pem");
    assert!(err.contains("missing.pem ([ingress] tls_cert)"), "{err}");
    let err = with("ingress.pem", "ingress.pem");
    assert!(
        err.contains("cannot read a private key in") && err.contains("tls_key"),
        "{err}"
    );
}

/// On RabbitMQ the reply comes back through the broker to the ingress's
/// reply queue, and an event is confirmed by the broker before its 202.
#[tokio::test(flavor = "multi_thread")]
async fn on_rabbitmq_a_command_is_answered_and_an_event_accepted() {
    let _shared = crate::amqp::BROKER_IN_USE.read().await;
    let p = a_command_is_answered_and_an_event_accepted(crate::amqp::pipeline).await;
    crate::amqp::clean_up(&p).await;
}

/// The echo plugin behind an ingress on the pipeline `pipeline` writes:
/// 15 small events and one of 1,040,000 bytes posted at once. Gives the
/// small ones' statuses and the big one's.
pub async fn events_beside_an_oversized_one(
    pipeline: fn(&Path, &str) -> (std::path::PathBuf, switchyard::config::Pipeline),
) -> (Vec<u16>, u16) {
    let dir = tempfile::tempdir().unwrap();
    let listen = free_addr();
    let (path, _) = pipeline(
        dir.path(),
        &format!(
            "[ingress]\nlisten = \"{listen}\"\n[plugins.echo]\nwasm = \"{{dist}}/echo.wasm\"\ncommands = [\"Echo\"]\nevents = [\"Tick\"]\n"
        ),
    );
    let host = tokio::task::spawn_blocking(move || run(&path, listen, None))
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let post = |body: String| {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .post(format!("http://{listen}/events/Tick"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    let small: Vec<_> = (0..15).map(|n| post(format!(r#"{{"n":{n}}}"#))).collect();
    let big = post(format!(r#"{{"pad":"{}"}}"#, "x".repeat(1_040_000)));
    let mut statuses = Vec::new();
    for s in small {
        statuses.push(s.await.unwrap());
    }
    let big = big.await.unwrap();
    tokio::task::spawn_blocking(move || stop(host))
        .await
        .unwrap();
    (statuses, big)
}

/// The echo plugin behind an ingress on the pipeline `pipeline` writes: a
/// command's reply comes back as the response, an event is answered 202.
/// Gives the pipeline, for the broker's clean-up.
pub async fn a_command_is_answered_and_an_event_accepted(
    pipeline: fn(&Path, &str) -> (std::path::PathBuf, switchyard::config::Pipeline),
) -> switchyard::config::Pipeline {
    let dir = tempfile::tempdir().unwrap();
    let listen = free_addr();
    let (path, p) = pipeline(
        dir.path(),
        &format!(
            "[ingress]\nlisten = \"{listen}\"\n[plugins.echo]\nwasm = \"{{dist}}/echo.wasm\"\ncommands = [\"Echo\"]\nevents = [\"Tick\"]\n"
        ),
    );
    let host = tokio::task::spawn_blocking({
        let path = path.clone();
        move || run(&path, listen, None)
    })
    .await
    .unwrap();
    let client = reqwest::Client::new();
    let reply = client
        .post(format!("http://{listen}/commands/Echo"))
        .header("content-type", "application/json")
        .header("prefer", "wait=60")
        .body(r#"{"n":1}"#)
        .send()
        .await
        .unwrap();
    let status = reply.status();
    let body = reply.text().await.unwrap();
    let event = client
        .post(format!("http://{listen}/events/Tick"))
        .header("content-type", "application/json")
        .body(r#"{"n":2}"#)
        .send()
        .await
        .unwrap();
    let event_status = event.status();
    tokio::task::spawn_blocking(move || stop(host))
        .await
        .unwrap();
    assert_eq!((status.as_u16(), body.as_str()), (200, r#"{"n":1}"#));
    assert_eq!(event_status.as_u16(), 202);
    p
}

/// Two hosts of one pipeline on RabbitMQ with its state in PostgreSQL:
/// a request retried at the other host under the same id is known there,
/// answered `duplicate` and not sent again.
#[tokio::test(flavor = "multi_thread")]
async fn a_retry_at_another_host_is_known_there_when_the_state_is_shared() {
    let _shared = crate::amqp::BROKER_IN_USE.read().await;
    let schema = crate::state::schema();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (listen_a, listen_b) = (free_addr(), free_addr());
    let (path_a, p) = crate::amqp::pipeline(
        dir_a.path(),
        &format!(
            "[state]\nurl = \"postgres://postgres@127.0.0.1:5432/test\"\nschema = \"{schema}\"\n[ingress]\nlisten = \"{listen_a}\"\n[plugins.echo]\nwasm = \"{{dist}}/echo.wasm\"\ncommands = [\"Echo\"]\nevents = [\"Tick\"]\n"
        ),
    );
    // The same pipeline (name, exchange, store), its ingress elsewhere.
    let path_b = dir_b.path().join(path_a.file_name().unwrap());
    std::fs::write(
        &path_b,
        std::fs::read_to_string(&path_a)
            .unwrap()
            .replace(&listen_a.to_string(), &listen_b.to_string()),
    )
    .unwrap();
    let a = tokio::task::spawn_blocking(move || run(&path_a, listen_a, None))
        .await
        .unwrap();
    let b = tokio::task::spawn_blocking(move || run(&path_b, listen_b, None))
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let post = |listen: SocketAddr, key: &str| {
        client
            .post(format!("http://{listen}/events/Tick"))
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .body(r#"{"n":1}"#)
            .send()
    };
    let key = format!("k-{}", switchyard::envelope::new_id());
    let first = post(listen_a, &key).await.unwrap();
    let first_status = first.status().as_u16();
    let first: serde_json::Value = serde_json::from_str(&first.text().await.unwrap()).unwrap();
    let retry = post(listen_b, &key).await.unwrap();
    let retry_status = retry.status().as_u16();
    let retry: serde_json::Value = serde_json::from_str(&retry.text().await.unwrap()).unwrap();
    // Another id at the other host is sent as usual.
    let other = post(listen_b, &format!("{key}-2")).await.unwrap();
    let other: serde_json::Value = serde_json::from_str(&other.text().await.unwrap()).unwrap();
    tokio::task::spawn_blocking(move || {
        stop(a);
        stop(b);
    })
    .await
    .unwrap();
    let (client_pg, connection) = tokio_postgres::connect(
        "postgres://postgres@127.0.0.1:5432/test",
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let noted: i64 = client_pg
        .query_one(
            &format!("SELECT count(*) FROM {schema}.ingress_ids WHERE pipeline = $1"),
            &[&p.name],
        )
        .await
        .unwrap()
        .get(0);
    client_pg
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
    crate::amqp::clean_up(&p).await;
    assert_eq!(
        (first_status, first["status"].as_str()),
        (202, Some("accepted")),
        "{first}"
    );
    assert_eq!(
        (retry_status, retry["status"].as_str()),
        (202, Some("duplicate")),
        "{retry}"
    );
    assert_eq!(retry["id"], first["id"]);
    assert_eq!(other["status"], "accepted", "{other}");
    assert_eq!(noted, 2);
}
