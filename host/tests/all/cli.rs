//! The `switchyard` binary, end to end.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::common::{bin, wasm, workspace_root, write_pipeline};

fn switchyard(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The example order pipeline, with its store in `dir`.
fn orders_pipeline(dir: &Path) -> String {
    write_pipeline(
        dir,
        "orders",
        r#"
        [host]
        cache_dir = "{cache}"
        [transport]
        path = "orders.db"
        poll_interval = "20ms"
        [plugins.orders]
        wasm = "{dist}/orders.wasm"
        commands = ["PlaceOrder"]
        [plugins.payments]
        wasm = "{dist}/payments.wasm"
        commands = ["ChargePayment"]
        [plugins.inventory]
        wasm = "{dist}/inventory.wasm"
        events = ["OrderPlaced"]
        [plugins.notifications]
        wasm = "{dist}/notifications.wasm"
        events = ["OrderPlaced", "PaymentCaptured"]
        "#,
    )
    .display()
    .to_string()
}

const ORDER: &str = r#"{"order_id":"A-1","customer":"ada","items":[{"sku":"book","quantity":2,"unit_price_cents":1250}]}"#;

#[test]
fn validate_reports_file_line_and_column_and_fails() {
    let fixture = workspace_root().join("host/tests/ui/invalid/many-mistakes.toml");
    let o = switchyard(&["validate", "--offline", fixture.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("many-mistakes.toml:8:1"), "{err}");
    assert!(err.contains("did you mean `timeout`?"), "{err}");
    assert!(
        err.contains("command `PlaceOrder` has two handlers: plugins `orders` and `billing`"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn validate_accepts_the_example_pipeline_with_its_plugins() {
    let dir = tempfile::tempdir().unwrap();
    let o = switchyard(&["validate", &orders_pipeline(dir.path())]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("pipeline `orders`, 4 plugins, 4 routed message types"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn validate_names_a_missing_pipeline_file() {
    let o = switchyard(&["validate", "/nonexistent/p.toml"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("cannot read pipeline /nonexistent/p.toml"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn send_then_drain_shows_the_whole_flow() {
    let dir = tempfile::tempdir().unwrap();
    let p = orders_pipeline(dir.path());
    let o = switchyard(&["send", "PlaceOrder", "-p", &p, "--data", ORDER]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("sent command PlaceOrder"),
        "{}",
        stderr(&o)
    );

    let o = switchyard(&["run", "--drain", &p]);
    assert!(o.status.success(), "{}", stderr(&o));
    let log = stderr(&o);
    for (plugin, handled) in [
        ("orders", "PlaceOrder"),
        ("inventory", "OrderPlaced"),
        ("notifications", "OrderPlaced"),
        ("payments", "ChargePayment"),
        ("notifications", "PaymentCaptured"),
    ] {
        assert!(
            log.lines().any(|l| l.contains("Handled")
                && l.contains(&format!("plugin={plugin}"))
                && l.contains(&format!("message.type={handled}"))),
            "{plugin} did not handle {handled}:\n{log}"
        );
    }
    assert!(log.contains("Drained: every queue is empty"), "{log}");
}

#[test]
fn send_waits_for_the_reply_of_a_running_host() {
    let dir = tempfile::tempdir().unwrap();
    let p = orders_pipeline(dir.path());
    let mut host = Command::new(bin())
        .args(["run", &p])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let o = switchyard(&[
        "send",
        "PlaceOrder",
        "-p",
        &p,
        "--data",
        ORDER,
        "--wait-reply",
        "20s",
    ]);
    host.kill().unwrap();
    host.wait().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let reply: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        reply,
        serde_json::json!({"order_id": "A-1", "total_cents": 2500})
    );
}

#[test]
fn a_second_host_on_the_same_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = orders_pipeline(dir.path());
    let mut first = Command::new(bin())
        .args(["run", &p])
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Give the first host time to take the lock.
    let mut refused = None;
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(100));
        let o = switchyard(&["run", "--drain", &p]);
        if !o.status.success() {
            refused = Some(stderr(&o));
            break;
        }
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let err = refused.expect("the second host was never refused");
    assert!(
        err.contains("another switchyard host") && err.contains("is already consuming"),
        "{err}"
    );
}

#[test]
fn send_and_publish_check_the_kind_and_the_payload() {
    let dir = tempfile::tempdir().unwrap();
    let p = orders_pipeline(dir.path());
    let o = switchyard(&["send", "OrderPlaced", "-p", &p, "--data", "{}"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o)
            .contains("`OrderPlaced` is an event in pipeline `orders`; use `switchyard publish`"),
        "{}",
        stderr(&o)
    );

    let o = switchyard(&["publish", "Nope", "-p", &p, "--data", "{}"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no plugin in pipeline `orders` consumes event `Nope`; its events are `OrderPlaced` and `PaymentCaptured`"), "{}", stderr(&o));

    let o = switchyard(&["send", "PlaceOrder", "-p", &p, "--data", "{not json"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("--data is not valid JSON"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn publish_reads_one_message_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = orders_pipeline(dir.path());
    let lines = dir.path().join("events.jsonl");
    std::fs::write(
        &lines,
        "{\"order_id\":\"L-1\",\"customer\":\"a\",\"items\":[],\"total_cents\":1}\n\n{\"order_id\":\"L-2\",\"customer\":\"b\",\"items\":[],\"total_cents\":2}\n",
    )
    .unwrap();
    let o = switchyard(&[
        "publish",
        "OrderPlaced",
        "-p",
        &p,
        "--lines",
        lines.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o)
            .contains("published 2 events OrderPlaced → inventory, notifications (4 deliveries)"),
        "{}",
        stderr(&o)
    );

    std::fs::write(&lines, "{}\n{oops\n").unwrap();
    let o = switchyard(&[
        "publish",
        "OrderPlaced",
        "-p",
        &p,
        "--lines",
        lines.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("line 2 of"), "{}", stderr(&o));
}

#[test]
fn plugins_inspect_prints_the_declaration() {
    let o = switchyard(&["plugins", "inspect", wasm("orders").to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("plugin     orders 1.0.0"), "{out}");
    assert!(out.contains("handles    command PlaceOrder"), "{out}");
    assert!(out.contains("publishes  event OrderPlaced"), "{out}");
    assert!(out.contains("sends      command ChargePayment"), "{out}");
    assert!(
        out.contains("imports    switchyard:plugin/host@0.2.2"),
        "{out}"
    );

    let o = switchyard(&[
        "plugins",
        "inspect",
        "--json",
        wasm("orders").to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v["handles"][0],
        serde_json::json!({"type": "PlaceOrder", "kind": "command"})
    );
}

#[test]
fn plugins_inspect_refuses_a_non_component_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("core.wasm");
    std::fs::write(&f, b"\0asm\x01\0\0\0").unwrap();
    let o = switchyard(&["plugins", "inspect", f.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("core.wasm: this is a core WebAssembly module, not a component"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn topology_prints_mermaid_with_declared_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let p = orders_pipeline(dir.path());
    let o = switchyard(&["topology", &p]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("flowchart LR"), "{out}");
    assert!(out.contains("t_PlaceOrder -->|handles| p_orders"), "{out}");
    assert!(
        out.contains("p_orders -.->|publishes| t_OrderPlaced"),
        "{out}"
    );
    assert!(
        out.contains("p_orders -.->|sends| t_ChargePayment"),
        "{out}"
    );
    assert!(
        out.contains("t_OrderPlaced -->|consumes| p_inventory"),
        "{out}"
    );
    assert!(
        out.contains("t_OrderPlaced{{\"OrderPlaced\"}}:::event"),
        "{out}"
    );

    let o = switchyard(&["topology", "--offline", &p]);
    assert!(o.status.success());
    assert!(!stdout(&o).contains("publishes"), "{}", stdout(&o));
}

#[test]
fn help_shows_examples() {
    for cmd in [
        &["--help"][..],
        &["run", "--help"],
        &["send", "--help"],
        &["validate", "--help"],
    ] {
        let o = switchyard(cmd);
        assert!(o.status.success());
        assert!(stdout(&o).contains("Examples:"), "{cmd:?}: {}", stdout(&o));
    }
}

#[test]
fn dlq_commands_find_show_export_and_close_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let p = orders_pipeline(dir.path());
    let o = switchyard(&[
        "send",
        "PlaceOrder",
        "-p",
        &p,
        "--data",
        r#"{"order_id":42}"#,
        "-H",
        "x-tenant=acme",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = switchyard(&["run", "--drain", &p]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("Dead-lettered"), "{}", stderr(&o));

    let o = switchyard(&["dlq", "list", "-p", &p]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("ID "), "{out}");
    assert!(
        out.contains("PlaceOrder") && out.contains("permanent") && out.contains("dead"),
        "{out}"
    );

    let o = switchyard(&["dlq", "list", "-p", &p, "--json"]);
    let row: serde_json::Value = serde_json::from_str(stdout(&o).lines().next().unwrap()).unwrap();
    let id = row["id"].as_str().unwrap().to_owned();
    assert_eq!(row["attempts"], 1);

    let o = switchyard(&["dlq", "list", "-p", &p, "--group"]);
    assert!(
        stdout(&o).contains(row["fingerprint"].as_str().unwrap()),
        "{}",
        stdout(&o)
    );

    let o = switchyard(&["dlq", "show", "-p", &p, &id[..30]]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for expected in [
        "error      permanent [malformed-payload]",
        "x-tenant: acme",
        "\"order_id\": 42",
        "→ dead-letter  (orders@1.0.0)",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }

    let export = dir.path().join("audit.jsonl");
    let o = switchyard(&[
        "dlq",
        "export",
        "-p",
        &p,
        "--output",
        export.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let line = std::fs::read_to_string(&export).unwrap();
    let record: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(
        record["message"]["payload"]["json"],
        serde_json::json!({"order_id": 42})
    );
    assert_eq!(record["error"]["kind"], "permanent");

    let o = switchyard(&["dlq", "replay", "-p", &p, &id, "--dry-run"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("would replay 1 dead letter"),
        "{}",
        stderr(&o)
    );

    let o = switchyard(&["dlq", "replay", "-p", &p]);
    assert_eq!(o.status.code(), Some(1), "a replay must name its records");
    assert!(
        stderr(&o).contains("give ids, or --group FINGERPRINT, or --all"),
        "{}",
        stderr(&o)
    );

    let o = switchyard(&[
        "dlq",
        "resolve",
        "-p",
        &p,
        &id,
        "--note",
        "re-entered by hand",
    ]);
    assert!(
        stderr(&o).contains("resolved 1 dead letter"),
        "{}",
        stderr(&o)
    );
    let o = switchyard(&["dlq", "list", "-p", &p, "--status", "resolved", "--json"]);
    assert_eq!(stdout(&o).lines().count(), 1);
    let o = switchyard(&["dlq", "delete", "-p", &p, "--all", "--status", "resolved"]);
    assert!(
        stderr(&o).contains("deleted 1 dead letter"),
        "{}",
        stderr(&o)
    );
    let o = switchyard(&["dlq", "list", "-p", &p]);
    assert!(stderr(&o).contains("no dead letters"), "{}", stderr(&o));

    let o = switchyard(&["dlq", "show", "-p", &p, "nope"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no dead letter with id `nope`"),
        "{}",
        stderr(&o)
    );
}

/// Whether `python3` can parse the file as XML, and the number of
/// `<testcase>` and `<failure>` elements in it.
fn junit_counts(path: &Path) -> (usize, usize) {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys, xml.etree.ElementTree as E; r = E.parse(sys.argv[1]).getroot(); \
             assert r.tag == 'testsuites'; \
             print(len(r.findall('./testsuite/testcase')), len(r.findall('./testsuite/testcase/failure')))",
        ])
        .arg(path)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "not valid JUnit XML: {}",
        stderr(&out)
    );
    let text = stdout(&out);
    let mut n = text.split_whitespace().map(|w| w.parse::<usize>().unwrap());
    (n.next().unwrap(), n.next().unwrap())
}

#[test]
fn the_example_plugins_pass_their_contract_tests() {
    let dir = tempfile::tempdir().unwrap();
    for (plugin, cases) in [
        ("orders", 5),
        ("payments", 9),
        ("inventory", 2),
        ("notifications", 3),
        ("shipping", 3),
        ("fulfilment", 11),
        // JavaScript, C and Python.
        ("fraud", 14),
        ("receipts", 8),
        ("notices", 13),
    ] {
        let tests = workspace_root()
            .join("plugins")
            .join(plugin)
            .join("tests")
            .join("contract.toml");
        let junit = dir.path().join(format!("{plugin}.xml"));
        // Payments calls its gateway, fraud its risk service and notices
        // its mail service: the example pipelines grant them.
        let pipeline = match plugin {
            "payments" => "orders.toml",
            _ => "polyglot.toml",
        };
        let pipeline = workspace_root().join("pipelines").join(pipeline);
        let granted = ["-p", pipeline.to_str().unwrap(), "--plugin", plugin];
        let out = switchyard(
            &[
                &[
                    "test",
                    wasm(plugin).to_str().unwrap(),
                    tests.to_str().unwrap(),
                    "--junit",
                    junit.to_str().unwrap(),
                ][..],
                if ["payments", "fraud", "notices"].contains(&plugin) {
                    &granted[..]
                } else {
                    &[]
                },
            ]
            .concat(),
        );
        let text = stdout(&out);
        assert!(out.status.success(), "{plugin}: {text}{}", stderr(&out));
        assert!(
            text.contains(&format!("{cases} passed, 0 failed")),
            "{text}"
        );
        assert_eq!(junit_counts(&junit), (cases, 0), "{plugin}");
    }
}

#[test]
fn saga_cases_find_their_instance_as_a_pipeline_would() {
    let tests = workspace_root()
        .join("tests")
        .join("plugins")
        .join("ledger")
        .join("tests")
        .join("contract.toml");
    let out = switchyard(&[
        "test",
        wasm("ledger").to_str().unwrap(),
        tests.to_str().unwrap(),
    ]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    assert!(text.contains("12 passed, 0 failed"), "{text}");

    // A wrong expectation of the instance fails and says what it became.
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wrong.toml");
    std::fs::write(
        &wrong,
        r#"
[saga]
starts = ["Open"]
instance_key = "$.id"

[[case]]
name = "closing is expected to leave it running"
input = { type = "Close", json = { id = "L-1" } }
saga = { instance = "L-1" }
[case.expect]
published = [{ type = "Closed", json = { id = "L-1", total = 0, steps = 2 } }]
saga = "running"

[[case]]
name = "a missing instance is ignored by default"
input = { type = "Add", json = { id = "L-2", n = 1 } }
[case.expect]
saga = "ignored"

[[case]]
name = "a saga file's state needs its instance"
input = { type = "Add", json = { id = "L-2", n = 1 } }
state = { total = 1 }
"#,
    )
    .unwrap();
    let out = switchyard(&[
        "test",
        wasm("ledger").to_str().unwrap(),
        wrong.to_str().unwrap(),
    ]);
    let text = stdout(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("1 passed, 2 failed"), "{text}");
    assert!(
        text.contains("saga: expected running, got completed"),
        "{text}"
    );
    assert!(text.contains("needs [case.saga]"), "{text}");
}

#[test]
fn cases_give_state_before_and_expect_the_whole_state_after() {
    let tests = workspace_root()
        .join("tests")
        .join("plugins")
        .join("counter")
        .join("tests")
        .join("contract.toml");
    let out = switchyard(&[
        "test",
        wasm("counter").to_str().unwrap(),
        tests.to_str().unwrap(),
    ]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    assert!(text.contains("4 passed, 0 failed"), "{text}");

    // A wrong expectation fails and says which key differs and how.
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wrong.toml");
    std::fs::write(
        &wrong,
        r#"
[[case]]
name = "wrong"
input = { type = "Count", id = "m-2", json = { key = "a" } }
state = { "count:a" = 1, "extra" = true }
[case.expect]
published = [{ type = "Counted", json = { key = "a", count = 2 } }]
state = { "count:a" = 3, "last:a" = "m-2" }
"#,
    )
    .unwrap();
    let out = switchyard(&[
        "test",
        wasm("counter").to_str().unwrap(),
        wrong.to_str().unwrap(),
    ]);
    let text = stdout(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(r#"state "count:a": expected 3, got 2"#),
        "{text}"
    );
    assert!(
        text.contains(r#"state "extra": not expected, but set to true"#),
        "{text}"
    );
}

#[test]
fn a_case_can_take_the_network_away() {
    // The rogue plugin's `connect` opens a TCP connection: an outbound
    // call. The pipeline grants it this listener.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pipeline = write_pipeline(
        dir.path(),
        "net",
        &format!(
            r#"
[plugins.rogue]
wasm = "{}"
commands = ["Misbehave", "Sent"]
events = ["Poke"]
[plugins.rogue.grants]
network = ["{addr}"]
"#,
            wasm("rogue").display()
        ),
    );
    let tests = dir.path().join("cases.toml");
    std::fs::write(
        &tests,
        format!(
            r#"
[[case]]
name = "the upstream answers"
input = {{ type = "Misbehave", json = {{ action = "connect", to = "{addr}" }} }}
expect = {{ reply = {{ json = {{ connected = "{addr}" }} }} }}

[[case]]
name = "the upstream cannot be reached: transient"
input = {{ type = "Misbehave", json = {{ action = "connect", to = "{addr}" }} }}
host = {{ network = "down" }}
expect = {{ error = "transient", error_code = "upstream-unreachable" }}

[[case]]
name = "a mistake in the host behaviour is reported"
input = {{ type = "Misbehave", json = {{ action = "ok" }} }}
host = {{ clock = "yesterday" }}
"#
        ),
    )
    .unwrap();
    let out = switchyard(&[
        "test",
        wasm("rogue").to_str().unwrap(),
        tests.to_str().unwrap(),
        "-p",
        pipeline.to_str().unwrap(),
        "--plugin",
        "rogue",
    ]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}{}", stderr(&out));
    let passed = |name: &str| {
        text.lines()
            .any(|l| l.trim_start().starts_with("ok ") && l.ends_with(name))
    };
    assert!(passed("cases.toml :: the upstream answers"), "{text}");
    assert!(
        passed("cases.toml :: the upstream cannot be reached: transient"),
        "{text}"
    );
    assert!(
        text.contains(
            "bad host behaviour: host.clock \"yesterday\" is not a UTC time in RFC 3339 form"
        ),
        "{text}"
    );
    assert!(text.contains("2 passed, 1 failed"), "{text}");
}

#[test]
fn a_wrong_expectation_fails_with_a_readable_diff() {
    let dir = tempfile::tempdir().unwrap();
    let tests = dir.path().join("wrong.toml");
    std::fs::write(
        &tests,
        r#"
[[case]]
name = "right"
input = { type = "ChargePayment", json = { order_id = "A-1", customer = "ada", amount_cents = 2400 } }
expect = { published = [{ type = "PaymentCaptured", json = { order_id = "A-1", amount_cents = 2400 } }] }

[[case]]
name = "wrong amount <and> a character XML must escape"
input = { type = "ChargePayment", json = { order_id = "A-1", customer = "ada", amount_cents = 2400 } }
expect = { published = [{ type = "PaymentCaptured", json = { order_id = "A-1", amount_cents = 2500 } }] }

[[case]]
name = "expects a failure that does not happen"
input = { type = "ChargePayment", json = { order_id = "A-1", customer = "ada", amount_cents = 2400 } }
expect = { error = "transient" }

[[case]]
name = "forgets an output"
input = { type = "ChargePayment", json = { order_id = "A-1", customer = "ada", amount_cents = 2400 } }
"#,
    )
    .unwrap();
    let junit = dir.path().join("junit.xml");
    let out = switchyard(&[
        "test",
        wasm("payments").to_str().unwrap(),
        tests.to_str().unwrap(),
        "--junit",
        junit.to_str().unwrap(),
    ]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("ok    "), "{text}");
    assert!(
        text.contains("published event #1: payload differs")
            && text.contains("$.amount_cents: expected 2500, got 2400"),
        "{text}"
    );
    assert!(
        text.contains(
            "expected a transient failure; the handler succeeded with event PaymentCaptured"
        ),
        "{text}"
    );
    assert!(
        text.contains("expected 0 published events, got 1: [PaymentCaptured]"),
        "{text}"
    );
    assert!(text.contains("1 passed, 3 failed"), "{text}");
    assert_eq!(junit_counts(&junit), (4, 3));

    // A test file with a mistake is an error naming the file.
    std::fs::write(&tests, "[[case]]\nname = \"x\"\ninput = { typo = 1 }\n").unwrap();
    let out = switchyard(&[
        "test",
        wasm("payments").to_str().unwrap(),
        tests.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("wrong.toml") && stderr(&out).contains("typo"),
        "{}",
        stderr(&out)
    );
}

/// The bash completion script, loaded into a real bash, completes
/// commands, subcommands and options.
#[test]
fn bash_completes_commands_subcommands_and_options() {
    let out = switchyard(&["completions", "bash"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("switchyard.bash");
    std::fs::write(&script, &out.stdout).unwrap();
    let complete = |words: &[&str]| -> String {
        // As bash calls a completion function: the words so far, the one
        // being completed last, and the command name, the current word
        // and the one before it as arguments.
        let line = format!(
            "source '{}'; COMP_WORDS=({}); COMP_CWORD={}; _switchyard switchyard '{}' '{}'; echo \"${{COMPREPLY[*]}}\"",
            script.display(),
            words.join(" "),
            words.len() - 1,
            words[words.len() - 1],
            words[words.len() - 2]
        );
        let o = Command::new("bash").args(["-c", &line]).output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o).trim().to_owned()
    };
    assert_eq!(complete(&["switchyard", "dl"]), "dlq");
    assert_eq!(complete(&["switchyard", "dlq", "re"]), "replay resolve");
    assert_eq!(complete(&["switchyard", "why", "--co"]), "--correlation");
    assert_eq!(complete(&["switchyard", "completions", "fi"]), "fish");
}

/// Every shell gets a script that names the commands; a shell that is
/// not one of them is refused with the ones there are.
#[test]
fn completions_for_every_shell_and_a_clear_refusal() {
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let out = switchyard(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let script = stdout(&out);
        for command in ["dlq", "why", "sagas", "replay"] {
            assert!(script.contains(command), "{shell} lacks {command}");
        }
    }
    let out = switchyard(&["completions", "tcsh"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("possible values: bash"),
        "{}",
        stderr(&out)
    );
}

/// The man page renders with man, names every command, and `--dir`
/// writes a page for each subcommand.
#[test]
fn the_man_pages_render_and_cover_every_command() {
    let render = |page: &[u8]| -> String {
        let mut child = Command::new("man")
            .args(["-l", "-"])
            .env("MANWIDTH", "100")
            .env("MANPAGER", "cat")
            .env("PAGER", "cat")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("man (cargo xtask setup installs man-db)");
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), page).unwrap();
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    let out = switchyard(&["man"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = render(&out.stdout);
    assert!(text.contains("switchyard - "), "{text}");
    for command in ["run", "send", "dlq", "why", "sagas", "completions"] {
        assert!(
            text.contains(&format!("\n       switchyard-{command}(1)\n")),
            "{command} in {text}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let out = switchyard(&["man", "--dir", &dir.path().display().to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let replay = std::fs::read(dir.path().join("switchyard-dlq-replay.1")).unwrap();
    let text = render(&replay);
    assert!(text.contains("--group"), "{text}");
    let pages = std::fs::read_dir(dir.path()).unwrap().count();
    assert!(pages >= 25, "{pages} pages");
}

/// With `--log-format json` every line on stderr is one JSON object, and
/// the lines of a traced flow carry its trace id; the environment can ask
/// for it too, and a format that does not exist is refused.
#[test]
fn the_log_is_one_json_object_a_line_with_trace_ids() {
    let dir = tempfile::tempdir().unwrap();
    let p = orders_pipeline(dir.path());
    let o = switchyard(&[
        "send",
        "PlaceOrder",
        "-p",
        &p,
        "--data",
        ORDER,
        "--log-format",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = Command::new(bin())
        .args(["run", "--drain", "--trace-stdout", &p])
        .env("RUST_LOG", "info")
        .env("SWITCHYARD_LOG_FORMAT", "json")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let log = stderr(&o);
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(lines.len() >= 5, "{log}");
    for l in &lines {
        for field in ["timestamp", "level", "message", "target"] {
            assert!(l.get(field).is_some(), "{field} in {l}");
        }
    }
    let handled: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["message"] == "Handled").collect();
    assert!(handled.len() >= 5, "{log}");
    let trace = handled[0]["trace_id"].as_str().unwrap();
    assert_eq!(trace.len(), 32, "{trace}");
    assert!(
        handled
            .iter()
            .all(|l| l["trace_id"] == trace && l["span_id"].is_string()),
        "one flow, one trace: {log}"
    );
    assert!(
        handled
            .iter()
            .any(|l| l["plugin"] == "payments" && l["message.type"] == "ChargePayment")
    );

    let o = switchyard(&["validate", "--offline", &p, "--log-format", "yaml"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("possible values: text, json"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_case_answers_http_from_its_stubs_and_fails_on_a_request_none_answers() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = write_pipeline(
        dir.path(),
        "http",
        &format!(
            r#"
[plugins.caller]
wasm = "{}"
commands = ["Call"]
[plugins.caller.grants]
http = ["https://gateway.example.com"]
"#,
            wasm("caller").display()
        ),
    );
    let tests = dir.path().join("cases.toml");
    std::fs::write(
        &tests,
        r#"
[[case]]
name = "the gateway answers"
input = { type = "Call", json = { method = "POST", url = "https://gateway.example.com/charges", body = "order A-1001" } }
expect = { reply = { json = { status = 201, length = 17, body = '{"approved":true}' }, match = "subset" } }
[[case.http]]
method = "POST"
url = "https://gateway.example.com/charges"
body_contains = "A-1001"
status = 201
json = { approved = true }

[[case]]
name = "a request nobody stubbed"
input = { type = "Call", json = { url = "https://gateway.example.com/refunds" } }
expect = { error = "permanent" }

[[case]]
name = "the network is down"
input = { type = "Call", json = { url = "https://gateway.example.com/charges" } }
host = { network = "down" }
expect = { error = "transient", error_code = "http-connect" }

[[case]]
name = "outside the grant"
input = { type = "Call", json = { url = "https://evil.example.net/" } }
expect = { error = "permanent", error_code = "http-denied" }
"#,
    )
    .unwrap();
    let out = switchyard(&[
        "test",
        wasm("caller").to_str().unwrap(),
        tests.to_str().unwrap(),
        "-p",
        pipeline.to_str().unwrap(),
        "--plugin",
        "caller",
    ]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}{}", stderr(&out));
    assert!(text.contains("3 passed, 1 failed"), "{text}");
    assert!(
        text.contains(
            "the plugin sent HTTP requests no [[case.http]] stub answers: GET https://gateway.example.com/refunds"
        ),
        "{text}"
    );
}
