//! SIGKILL at random points, run after run, on every transport.

use crate::brokers::{EMBEDDED, KAFKA, RABBITMQ};
use switchyard::state::Reader;

use crate::reliability::{Broker, sigkill_run, sigkill_run_with};

async fn runs_of(broker: &Broker) {
    let _one = crate::one_at_a_time().await;
    let (runs, messages) = (crate::runs(), crate::messages());
    let mut duplicates = Vec::new();
    let mut seconds = Vec::new();
    for _ in 0..runs {
        let (pipeline, run) = sigkill_run(broker, messages).await;
        crate::brokers::clean_up_amqp(&pipeline).await;
        duplicates.push(run.duplicates);
        seconds.push(run.took.as_secs());
    }
    crate::report(
        "SIGKILL x3 per run",
        broker.name,
        &format!(
            "{runs} runs x {messages} messages: 0 lost; duplicates per run {duplicates:?} (max {}); seconds per run {seconds:?}",
            duplicates.iter().max().copied().unwrap_or(0)
        ),
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "the chaos suite stops services and mounts a disk: cargo xtask chaos"]
async fn sigkill_on_the_embedded_transport() {
    runs_of(&EMBEDDED).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "the chaos suite stops services and mounts a disk: cargo xtask chaos"]
async fn sigkill_on_rabbitmq() {
    runs_of(&RABBITMQ).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "the chaos suite stops services and mounts a disk: cargo xtask chaos"]
async fn sigkill_on_kafka() {
    runs_of(&KAFKA).await;
}

/// The counter plugin beside tally: it adds one to its state per `Tick`.
const COUNTER: &str = r#"
        [plugins.counter]
        wasm = "{dist}/counter.wasm"
        events = ["Tick"]
        retry = { delayed = 0 }
"#;

/// The counter as an exactly-once plugin whose state is in PostgreSQL
/// (`schema`), for the broker transports.
fn exactly_once_counter(schema: &str) -> String {
    format!(
        "{COUNTER}        exactly_once = true\n[state]\nurl = \"postgres://postgres@127.0.0.1:5432/test\"\nschema = \"{schema}\"\n"
    )
}

/// The counter's `ticks` in a PostgreSQL state store, then the schema
/// dropped.
fn postgres_ticks(p: &switchyard::config::Pipeline) -> String {
    let switchyard::config::StoreConfig::Postgres { url, schema } = &p.state.store else {
        panic!("not a PostgreSQL state store");
    };
    let url = url.resolve("state").unwrap();
    let (schema, pipeline) = (schema.clone(), p.name.clone());
    tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(async move {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(connection);
            let ticks: Option<String> = client
                .query_opt(
                    &format!("SELECT convert_from(value, 'UTF8') FROM {schema}.plugin_state WHERE pipeline = $1 AND plugin = 'counter' AND key = 'ticks'"),
                    &[&pipeline],
                )
                .await
                .unwrap()
                .map(|r| r.get(0));
            client
                .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
                .await
                .unwrap();
            ticks.unwrap_or_default()
        })
    })
}

/// An exactly-once counter on a broker, its state in PostgreSQL: after
/// three SIGKILLs and a drain, the counter equals the number of messages.
async fn exactly_once_runs(broker: &Broker) {
    let _one = crate::one_at_a_time().await;
    let (runs, messages) = (crate::runs(), crate::messages());
    let mut duplicates = Vec::new();
    for _ in 0..runs {
        let schema = format!(
            "chaos_{}",
            &switchyard::envelope::new_id().replace('-', "")[..12]
        );
        let (pipeline, run) =
            sigkill_run_with(broker, messages, &exactly_once_counter(&schema), |p| {
                assert_eq!(
                    postgres_ticks(p),
                    messages.to_string(),
                    "the counter is not the number of messages"
                );
            })
            .await;
        crate::brokers::clean_up_amqp(&pipeline).await;
        duplicates.push(run.duplicates);
    }
    crate::report(
        "SIGKILL x3 per run, exactly-once state in PostgreSQL",
        broker.name,
        &format!(
            "{runs} runs x {messages} messages: counter = {messages} every run; tally beside it handled {duplicates:?} twice"
        ),
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "the chaos suite stops services and mounts a disk: cargo xtask chaos"]
async fn sigkill_with_exactly_once_state_on_rabbitmq() {
    exactly_once_runs(&RABBITMQ).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "the chaos suite stops services and mounts a disk: cargo xtask chaos"]
async fn sigkill_with_exactly_once_state_on_kafka() {
    exactly_once_runs(&KAFKA).await;
}

/// The state a plugin writes commits with the message's outcome: after
/// three SIGKILLs and a drain, the counter equals the number of messages
/// exactly, though the tally route beside it shows messages handled twice.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "the chaos suite stops services and mounts a disk: cargo xtask chaos"]
async fn sigkill_with_state_on_the_embedded_transport() {
    let _one = crate::one_at_a_time().await;
    let (runs, messages) = (crate::runs(), crate::messages());
    let mut duplicates = Vec::new();
    for _ in 0..runs {
        let (_, run) = sigkill_run_with(&EMBEDDED, messages, COUNTER, |p| {
            let switchyard::config::TransportConfig::Embedded(e) = &p.transport else {
                panic!("not embedded");
            };
            let state = switchyard::state::sqlite::SqliteState::reader(&e.path);
            let ticks = state.get("counter", "ticks").unwrap().unwrap_or_default();
            assert_eq!(
                String::from_utf8_lossy(&ticks),
                messages.to_string(),
                "the counter is not the number of messages"
            );
        })
        .await;
        duplicates.push(run.duplicates);
    }
    crate::report(
        "SIGKILL x3 per run, state",
        "embedded",
        &format!(
            "{runs} runs x {messages} messages: counter = {messages} every run; tally beside it handled {duplicates:?} twice"
        ),
    );
}
