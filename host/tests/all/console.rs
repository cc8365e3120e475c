//! The web console at `/ui`: over plain HTTP for its guards (no session,
//! a forged form, another site's request, a wrong token: nothing changes;
//! payloads and headers are escaped), on the embedded transport, RabbitMQ
//! with its stores in PostgreSQL, and Kafka; and in a real headless
//! Chromium driven over WebDriver, as an operator would use it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use switchyard::config::{self, Pipeline};
use switchyard::dlq::{DeadLetter, Status};
use switchyard::envelope::{Envelope, Kind};
use switchyard::runtime::{RunMode, RunOptions};

use crate::common::{Running, dead_letters, eventually, message, write_pipeline};
use crate::dead_letters::{ORDERS, Scratch, order, postgres_url, reserve, stock};

const TOKEN: &str = "console-test-token";

/// A payload and a header that would run script if the console did not
/// escape them.
const XSS_PAYLOAD: &str = "<script>window.__xss = 1; document.title = 'pwned'</script>";
const XSS_HEADER: &str = "<img src=x onerror=\"window.__xss = 2\">";

fn free_addr() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// An order the orders plugin refuses (its id is a number), carrying
/// markup in its payload and a header.
fn hostile_order() -> Envelope {
    let mut m = message(
        Kind::Command,
        "PlaceOrder",
        json!({"order_id": 42, "note": XSS_PAYLOAD}),
    );
    m.headers.push(("x-note".into(), XSS_HEADER.into()));
    m
}

async fn start(p: &Pipeline, token: Option<&str>) -> (Running, String) {
    let addr = free_addr();
    let host = Running::start(
        p,
        RunOptions {
            admin: Some(addr),
            admin_token: token.map(str::to_owned),
            ..RunOptions::quiet(RunMode::Serve)
        },
    )
    .await;
    (host, format!("http://{addr}"))
}

async fn enqueue(p: &Pipeline, messages: Vec<Envelope>) {
    let transport = switchyard::runtime::open(p).await.unwrap();
    transport.enqueue(messages).await.unwrap();
}

async fn dead_of(p: &Pipeline, n: usize) -> Vec<DeadLetter> {
    eventually("the dead letters", Duration::from_secs(30), || async {
        dead_letters(p).await.len() >= n
    })
    .await;
    dead_letters(p).await
}

struct Answer {
    status: u16,
    location: Option<String>,
    cookie: Option<String>,
    csp: Option<String>,
    body: String,
}

/// A plain HTTP client that follows no redirects.
struct Http {
    base: String,
    client: reqwest::Client,
}

impl Http {
    fn new(base: &str) -> Self {
        Http {
            base: base.to_owned(),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Answer {
        let r = req.send().await.unwrap();
        let header = |n: &str| {
            r.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let location = header("location");
        let cookie = header("set-cookie");
        let csp = header("content-security-policy");
        let status = r.status().as_u16();
        Answer {
            status,
            location,
            cookie,
            csp,
            body: r.text().await.unwrap(),
        }
    }

    async fn get(&self, path: &str, session: Option<&str>) -> Answer {
        let mut req = self.client.get(format!("{}{path}", self.base));
        if let Some(s) = session {
            req = req.header("cookie", format!("switchyard_session={s}"));
        }
        self.send(req).await
    }

    async fn post(
        &self,
        path: &str,
        session: Option<&str>,
        form: &[(&str, &str)],
        origin: Option<&str>,
    ) -> Answer {
        let body: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let mut req = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
        if let Some(s) = session {
            req = req.header("cookie", format!("switchyard_session={s}"));
        }
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        self.send(req).await
    }

    /// Signs in; returns the session id and the CSRF token of its forms.
    async fn sign_in(&self) -> (String, String) {
        let a = self
            .post(
                "/ui/login",
                None,
                &[("token", TOKEN), ("next", "/ui")],
                None,
            )
            .await;
        assert_eq!(a.status, 303, "{}", a.body);
        let cookie = a.cookie.expect("a session cookie");
        assert!(cookie.contains("HttpOnly"), "{cookie}");
        assert!(cookie.contains("SameSite=Strict"), "{cookie}");
        let session = cookie
            .split(';')
            .next()
            .and_then(|c| c.strip_prefix("switchyard_session="))
            .unwrap()
            .to_owned();
        let page = self.get("/ui", Some(&session)).await;
        assert_eq!(page.status, 200, "{}", page.body);
        let csrf = page
            .body
            .split("name=\"csrf\" value=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .expect("a CSRF token in the page")
            .to_owned();
        (session, csrf)
    }
}

async fn status_of(p: &Pipeline, id: &str) -> Status {
    let store = switchyard::dlq::open(&p.dead_letters, &p.name)
        .await
        .unwrap();
    store.get(id).await.unwrap().unwrap().status
}

/// What every transport must show: without a session, a forged form or
/// from another site nothing changes; markup from a message is shown, not
/// run; a signed-in operator resolves a record, and edits and sends again
/// a malformed order, which is then handled and has a journey.
async fn guards_and_actions(p: &Pipeline) {
    enqueue(p, vec![hostile_order(), order("C-1", 1200)]).await;
    let (host, base) = start(p, Some(TOKEN)).await;
    let letters = dead_of(p, 1).await;
    let record = letters
        .iter()
        .find(|d| d.message.message_type == "PlaceOrder")
        .expect("the malformed order's record");
    let path = format!("/ui/dead-letters/{}", record.id);
    let http = Http::new(&base);

    // Ready: every route runs; the transport (on RabbitMQ, a channel opened
    // on a connection of the probe's own) and the stores answer.
    let ready = http.get("/readyz", None).await;
    assert_eq!((ready.status, ready.body.as_str()), (200, "ready\n"));

    // No session: pages lead to the login form, actions change nothing.
    let a = http.get(&path, None).await;
    assert_eq!(a.status, 303);
    assert!(
        a.location
            .as_deref()
            .is_some_and(|l| l.starts_with("/ui/login?next=%2Fui%2Fdead-letters%2F")),
        "{:?}",
        a.location
    );
    let a = http
        .post(&format!("{path}/resolve"), None, &[("note", "x")], None)
        .await;
    assert_eq!(a.status, 401, "{}", a.body);
    let a = http
        .post(&format!("{path}/replay"), Some("forged-session"), &[], None)
        .await;
    assert_eq!(a.status, 401, "{}", a.body);
    // A wrong token signs nobody in.
    let a = http
        .post("/ui/login", None, &[("token", "guess")], None)
        .await;
    assert_eq!(a.status, 401);
    assert!(a.cookie.is_none());
    assert!(
        a.body.contains("not this host&#39;s admin token")
            || a.body.contains("not this host's admin token"),
        "{}",
        a.body
    );

    let (session, csrf) = http.sign_in().await;
    // Signed in, but the form's CSRF token is missing or wrong.
    let a = http
        .post(
            &format!("{path}/resolve"),
            Some(&session),
            &[("note", "x")],
            None,
        )
        .await;
    assert_eq!(a.status, 403, "{}", a.body);
    let a = http
        .post(
            &format!("{path}/resolve"),
            Some(&session),
            &[("csrf", "0000"), ("note", "x")],
            None,
        )
        .await;
    assert_eq!(a.status, 403, "{}", a.body);
    // The right token, sent from another site.
    let a = http
        .post(
            &format!("{path}/resolve"),
            Some(&session),
            &[("csrf", &csrf), ("note", "x")],
            Some("http://evil.example"),
        )
        .await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert_eq!(status_of(p, &record.id).await, Status::Dead);

    // The record's page: every response is guarded, markup is escaped.
    let page = http.get(&path, Some(&session)).await;
    assert_eq!(page.status, 200, "{}", page.body);
    let csp = page.csp.expect("a Content-Security-Policy");
    assert!(
        csp.contains("script-src 'self'") && csp.contains("default-src 'none'"),
        "{csp}"
    );
    assert!(
        page.body.contains("&lt;script&gt;window.__xss = 1"),
        "{}",
        page.body
    );
    assert!(!page.body.contains("<script>window"), "{}", page.body);
    assert!(
        page.body.contains("&lt;img src=x onerror="),
        "{}",
        page.body
    );
    assert!(!page.body.contains("<img"), "{}", page.body);

    // Edit and send again: a payload that breaks JSON is refused and the
    // record stays dead; a good one is sent as a new message.
    let a = http
        .post(
            &format!("{path}/edit"),
            Some(&session),
            &[("csrf", &csrf), ("payload", "{not json")],
            None,
        )
        .await;
    assert_eq!(a.status, 303);
    // The overview refreshing itself in another tab does not take the
    // message meant for this page.
    assert_eq!(
        http.get("/ui/live/overview", Some(&session)).await.status,
        200
    );
    let shown = http.get(&path, Some(&session)).await;
    assert!(
        shown.body.contains("Not sent: the new payload is not JSON"),
        "{}",
        shown.body
    );
    assert_eq!(status_of(p, &record.id).await, Status::Dead);
    let fixed = json!({"order_id": "C-2", "customer": "ada",
        "items": [{"sku": "lamp", "quantity": 1, "unit_price_cents": 900}]})
    .to_string();
    let a = http
        .post(
            &format!("{path}/edit"),
            Some(&session),
            &[("csrf", &csrf), ("payload", &fixed)],
            None,
        )
        .await;
    assert_eq!(a.status, 303);
    let shown = http.get(&path, Some(&session)).await;
    let new_id = shown
        .body
        .split("Sent as a new message ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .unwrap_or_else(|| panic!("{}", shown.body))
        .to_owned();
    assert_eq!(status_of(p, &record.id).await, Status::Resolved);

    // The new message is handled, and its journey says so and names the
    // message it replaced as its cause.
    eventually(
        "the edited order's journey",
        Duration::from_secs(30),
        || {
            let http = &http;
            let session = &session;
            let new_id = &new_id;
            async move {
                let j = http
                    .get(&format!("/ui/messages?q={new_id}"), Some(session))
                    .await;
                j.body.contains("handled by orders@") && j.body.contains("ChargePayment")
            }
        },
    )
    .await;
    let j = http
        .get(&format!("/ui/messages?q={new_id}"), Some(&session))
        .await;
    assert!(j.body.contains(&record.message.id), "{}", j.body);
    // Found by the span attribute the orders plugin sets: one flow, told.
    let by_attr = http
        .get("/ui/messages?q=order.id%3DC-2", Some(&session))
        .await;
    assert!(
        by_attr.body.contains("The one flow in which a plugin set")
            && by_attr.body.contains(&new_id)
            && by_attr.body.contains("handled by orders@"),
        "{}",
        by_attr.body
    );
    let none = http
        .get("/ui/messages?q=order.id%3DNO-SUCH", Some(&session))
        .await;
    assert!(none.body.contains("No plugin set"), "{}", none.body);

    // A form without a payload sends nothing.
    let a = http
        .post(
            &format!("{path}/edit"),
            Some(&session),
            &[("csrf", &csrf)],
            None,
        )
        .await;
    assert_eq!(a.status, 400, "{}", a.body);

    // The topology: every route, and who handles what.
    let t = http.get("/ui/topology", Some(&session)).await;
    assert_eq!(t.status, 200, "{}", t.body);
    for node in [
        "orders",
        "payments",
        "PlaceOrder",
        "ChargePayment",
        "OrderPlaced",
    ] {
        assert!(
            t.body.contains(&format!("data-node=\"{node}\"")),
            "{node}: {}",
            t.body
        );
    }
    let charge = t
        .body
        .split("data-type=\"ChargePayment\"")
        .nth(1)
        .and_then(|r| r.split("</tr>").next())
        .unwrap_or_else(|| panic!("{}", t.body));
    assert!(
        charge.contains("orders") && charge.contains("payments"),
        "{charge}"
    );
    // A page the console does not have, and a path that is not the
    // console's: the admin listener's own answer.
    let a = http.get("/ui/no-such-page", Some(&session)).await;
    assert_eq!(a.status, 404);
    assert!(a.body.contains("There is no such page"), "{}", a.body);
    let a = http.get("/no-such-endpoint", None).await;
    assert_eq!(a.status, 404);
    assert!(!a.body.contains("<html"), "{}", a.body);

    // The overview and the plugins page render for this transport.
    let o = http.get("/ui/live/overview", Some(&session)).await;
    assert!(o.body.contains("data-route=\"orders\""), "{}", o.body);
    let pl = http.get("/ui/plugins", Some(&session)).await;
    assert!(pl.body.contains("data-plugin=\"payments\""), "{}", pl.body);

    // Signed out, the session opens nothing.
    let a = http
        .post("/ui/logout", Some(&session), &[("csrf", &csrf)], None)
        .await;
    assert_eq!(a.status, 303);
    assert_eq!(http.get("/ui", Some(&session)).await.status, 303);
    host.stop().await;
}

fn embedded(dir: &Path) -> Pipeline {
    let path = write_pipeline(
        dir,
        "console",
        &format!("[host]\ncache_dir = \"{{cache}}\"\n{ORDERS}"),
    );
    config::load(&path)
        .unwrap_or_else(|e| panic!("{e}"))
        .pipeline
}

#[tokio::test(flavor = "multi_thread")]
async fn embedded_console_guards_escapes_and_acts() {
    let dir = tempfile::tempdir().unwrap();
    guards_and_actions(&embedded(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_console_with_stores_in_postgresql() {
    let _shared = crate::amqp::BROKER_IN_USE.read().await;
    let dir = tempfile::tempdir().unwrap();
    let scratch = Scratch::new();
    let (_, p) = crate::amqp::pipeline(
        dir.path(),
        &format!(
            "[journal]\nurl = \"{url}\"\nschema = \"{s}\"\n[dead_letters]\nurl = \"{url}\"\nschema = \"{s}\"\n{ORDERS}",
            url = postgres_url(),
            s = scratch.schema
        ),
    );
    guards_and_actions(&p).await;
    crate::amqp::clean_up(&p).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_console_with_its_journal_file() {
    let dir = tempfile::tempdir().unwrap();
    let (_, p) = crate::kafka::pipeline(dir.path(), ORDERS);
    guards_and_actions(&p).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_token_the_console_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let p = embedded(dir.path());
    let (host, base) = start(&p, None).await;
    let http = Http::new(&base);
    let a = http.get("/ui/login", None).await;
    assert_eq!(a.status, 403);
    assert!(a.body.contains("The console is closed"), "{}", a.body);
    let a = http.post("/ui/login", None, &[("token", "")], None).await;
    assert_eq!(a.status, 403);
    assert!(a.cookie.is_none());
    host.stop().await;
}

/// A client that is not ours (Python's standard library) at and past
/// every limit of the console's forms, queries and paths: the message at
/// the id limit is found, what is past a limit changes nothing, and the
/// note past its limit is clipped and escaped.
#[tokio::test(flavor = "multi_thread")]
async fn a_foreign_client_at_every_limit_changes_only_what_it_should() {
    let dir = tempfile::tempdir().unwrap();
    let p = embedded(dir.path());
    let mut poison = hostile_order();
    poison.id = format!("{}{}", "L", "9".repeat(switchyard::limits::MAX_ID - 1));
    enqueue(&p, vec![poison.clone()]).await;
    let (host, base) = start(&p, Some(TOKEN)).await;
    let record = dead_of(&p, 1).await.remove(0);
    assert_eq!(record.message.id, poison.id);

    let script = crate::common::workspace_root()
        .join("tests")
        .join("interop")
        .join("console_limits.py");
    let base_url = base.clone();
    let (record_id, message_id) = (record.id.clone(), poison.id.clone());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(script)
            .args([&base_url, TOKEN, &record_id, &message_id])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim() == "ok",
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = dead_letters(&p)
        .await
        .into_iter()
        .find(|d| d.id == record.id)
        .expect("the record");
    assert_eq!(after.status, Status::Resolved);
    let note = after.note.unwrap_or_default();
    assert!(note.starts_with("<b>nnn"), "{note}");
    assert!(note.len() <= 500 + " …[truncated]".len(), "{}", note.len());
    host.stop().await;
}

/// Wrong tokens, to the console's sign-in and the admin API at once, are
/// answered one at a time with a pause each (none sooner, which would tell
/// a guesser the token was wrong), and the right token is not held up
/// behind them.
#[tokio::test(flavor = "multi_thread")]
async fn guesses_at_the_token_go_one_at_a_time_and_never_hold_up_the_right_one() {
    const GUESSES: u32 = 10;
    let dir = tempfile::tempdir().unwrap();
    let p = embedded(dir.path());
    let (host, base) = start(&p, Some(TOKEN)).await;
    let started = std::time::Instant::now();
    let mut guesses = Vec::new();
    for i in 0..GUESSES {
        let base = base.clone();
        guesses.push(tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap();
            let r = if i % 2 == 0 {
                client
                    .post(format!("{base}/ui/login"))
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(format!("token=guess-{i}"))
                    .send()
                    .await
            } else {
                client
                    .post(format!("{base}/plugins/orders/rollback"))
                    .bearer_auth(format!("guess-{i}"))
                    .send()
                    .await
            };
            (r.unwrap().status().as_u16(), started.elapsed())
        }));
    }
    // The right token, while the guesses wait their turns.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let http = Http::new(&base);
    let (session, _) = http.sign_in().await;
    let signed_in_at = started.elapsed();
    assert_eq!(http.get("/ui", Some(&session)).await.status, 200);

    let mut answered = Vec::new();
    for g in guesses {
        answered.push(g.await.unwrap());
    }
    assert!(answered.iter().all(|(s, _)| *s == 401), "{answered:?}");
    // One at a time: the last came no sooner than a pause per guess.
    let mut times: Vec<Duration> = answered.iter().map(|(_, at)| *at).collect();
    times.sort();
    assert!(
        times[times.len() - 1] >= switchyard::console::WRONG_TOKEN_PAUSE * GUESSES,
        "{times:?}"
    );
    assert!(
        signed_in_at < times[times.len() - 1],
        "the right token waited behind the guesses: {signed_in_at:?} vs {times:?}"
    );
    host.stop().await;
}

// ---------------------------------------------------------------------
// In a real browser.

/// A chromedriver on a free port, stopped when dropped.
struct Driver {
    child: std::process::Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chromedriver() -> Driver {
    let exe = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
    let port = free_addr().port();
    let child = std::process::Command::new(&exe)
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start {exe} ({e}): `cargo xtask setup` installs chromium and chromium-driver")
        });
    Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    }
}

async fn browser(driver: &Driver, profile: &Path) -> Client {
    let mut caps = serde_json::Map::new();
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                format!("--user-data-dir={}", profile.display()),
            ]
        }),
    );
    let mut last = None;
    // chromedriver takes a moment to listen.
    for _ in 0..50 {
        match ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps.clone())
            .connect(&driver.url)
            .await
        {
            Ok(c) => return c,
            Err(e) => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    panic!("cannot open a Chromium session: {last:?}");
}

/// Where the screenshots go: `docs/console/` when `SCREENSHOTS=1`, else a
/// scratch directory.
fn shots(scratch: &Path) -> PathBuf {
    if std::env::var_os("SCREENSHOTS").is_some() {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/console")
    } else {
        scratch.to_owned()
    }
}

/// Takes a screenshot. For the documentation's screenshots, the paths of
/// the machine the test ran on (its checkout and temporary directory) are
/// first written as an installed host's would be.
async fn shoot(c: &Client, (dir, scratch): (&Path, &Path), name: &str) {
    if std::env::var_os("SCREENSHOTS").is_some() {
        let checkout = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .display()
            .to_string();
        let temp = scratch.display().to_string();
        c.execute(
            "const [pairs] = arguments;
             const walk = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
             for (let n = walk.nextNode(); n; n = walk.nextNode()) {
               for (const [from, to] of pairs) { n.nodeValue = n.nodeValue.split(from).join(to); }
             }",
            vec![json!([
                [format!("{checkout}/dist/plugins"), "/srv/shop/plugins"],
                [temp, "/srv/shop/pipelines"]
            ])],
        )
        .await
        .unwrap();
    }
    let png = c.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

/// Types `token` into the sign-in form the browser shows and sends it.
async fn sign_in_as(c: &Client, token: &str) {
    c.find(Locator::Css("#token"))
        .await
        .unwrap()
        .send_keys(token)
        .await
        .unwrap();
    follow(c, "main form button[type=submit]").await;
}

async fn text(c: &Client, css: &str) -> String {
    c.wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"))
        .text()
        .await
        .unwrap()
}

async fn click(c: &Client, css: &str) {
    c.wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"))
        .click()
        .await
        .unwrap();
}

/// Clicks what leads to another page, and waits until that page has
/// loaded (so that nothing is read from the page before it).
async fn follow(c: &Client, css: &str) {
    c.execute("window.__before = true;", vec![]).await.unwrap();
    click(c, css).await;
    for _ in 0..200 {
        let loaded = c
            .execute(
                "return window.__before === undefined && document.readyState === 'complete';",
                vec![],
            )
            .await;
        if matches!(loaded, Ok(serde_json::Value::Bool(true))) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("clicking {css} loaded no new page");
}

/// An operator's session: sign in, see the routes, find the failure
/// groups, open a trapped reservation, replay it after the fix and see it
/// handled; open the malformed order and see its markup shown, not run;
/// edit it and send it again, then follow its journey.
#[tokio::test(flavor = "multi_thread")]
async fn an_operator_finds_replays_and_follows_a_message_in_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_pipeline(
        dir.path(),
        "shop",
        &format!(
            "[host]\ncache_dir = \"{{cache}}\"\n{ORDERS}\n{}",
            stock("stock")
        ),
    );
    let p = config::load(&path)
        .unwrap_or_else(|e| panic!("{e}"))
        .pipeline;
    enqueue(
        &p,
        vec![hostile_order(), order("B-1", 1500), reserve(11), reserve(2)],
    )
    .await;
    let (host, base) = start(&p, Some(TOKEN)).await;
    let letters = dead_of(&p, 2).await;
    let trapped = letters
        .iter()
        .find(|d| d.route == "stock")
        .expect("the trapped reservation");
    let shots = shots(dir.path());
    let driver = chromedriver();
    let profile = tempfile::tempdir().unwrap();
    let c = browser(&driver, profile.path()).await;

    // Any page leads to the login form first.
    c.goto(&format!("{base}/ui/dead-letters")).await.unwrap();
    c.wait()
        .at_most(Duration::from_secs(10))
        .for_url(
            &format!("{base}/ui/login?next=%2Fui%2Fdead-letters")
                .parse()
                .unwrap(),
        )
        .await
        .unwrap();
    sign_in_as(&c, "not the token").await;
    assert!(
        text(&c, "p.error")
            .await
            .contains("not this host's admin token")
    );
    sign_in_as(&c, TOKEN).await;
    let groups = text(&c, "table.groups").await;
    assert!(
        groups.contains("stock") && groups.contains("orders"),
        "{groups}"
    );
    shoot(&c, (&shots, dir.path()), "dead-letters").await;

    // The overview lists the routes.
    follow(&c, "header nav a[href='/ui']").await;
    let routes = text(&c, "table.routes").await;
    for r in ["orders", "payments", "inventory", "notifications", "stock"] {
        assert!(routes.contains(r), "{routes}");
    }
    shoot(&c, (&shots, dir.path()), "overview").await;

    // The fix: the stock plugin's fixed build, loaded into the running host.
    let fixed = std::fs::read_to_string(&path)
        .unwrap()
        .replace("/stock.wasm", "/stock_fixed.wasm");
    std::fs::write(&path, fixed).unwrap();
    host.control.reload_from_disk().await.unwrap();

    // Find the trap's group, open its record, replay it.
    follow(&c, "header nav a[href='/ui/dead-letters']").await;
    follow(
        &c,
        &format!("tr[data-fingerprint='{}'] td.cause a", trapped.fingerprint),
    )
    .await;
    follow(&c, &format!("tr[data-record='{}'] a", trapped.id)).await;
    assert!(text(&c, "section.error").await.contains("trap"));
    follow(&c, "#replay").await;
    assert_eq!(text(&c, "p.flash").await, "1 replayed.");
    // Handled by the fixed plugin: the record says so after a reload.
    let mut handled = false;
    for _ in 0..100 {
        c.refresh().await.unwrap();
        if text(&c, "p.lead span.status").await == "handled" {
            handled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(handled, "the replayed record was marked handled");

    // The malformed order: its markup is shown as text and never runs.
    let order = letters
        .iter()
        .find(|d| d.route == "orders")
        .expect("the malformed order");
    c.goto(&format!("{base}/ui/dead-letters/{}", order.id))
        .await
        .unwrap();
    assert!(text(&c, "#payload").await.contains(XSS_PAYLOAD));
    assert!(text(&c, "section.headers").await.contains(XSS_HEADER));
    let ran = c
        .execute(
            "return [window.__xss === undefined, document.title];",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(ran[0], json!(true), "script from a payload ran: {ran}");
    assert!(!ran[1].as_str().unwrap_or("").contains("pwned"), "{ran}");
    shoot(&c, (&shots, dir.path()), "dead-letter").await;

    // Edit and send again.
    click(&c, "section.payload details summary").await;
    let edited = c.find(Locator::Css("#edited")).await.unwrap();
    edited.clear().await.unwrap();
    edited
        .send_keys(
            &json!({"order_id": "B-2", "customer": "ada",
                "items": [{"sku": "lamp", "quantity": 1, "unit_price_cents": 700}]})
            .to_string(),
        )
        .await
        .unwrap();
    follow(&c, "#send-edited").await;
    let flash = text(&c, "p.flash").await;
    let new_id = flash
        .strip_prefix("Sent as a new message ")
        .and_then(|r| r.split(';').next())
        .unwrap_or_else(|| panic!("{flash}"))
        .to_owned();

    // Its journey, from the search box.
    let mut journey = String::new();
    for _ in 0..100 {
        follow(&c, "header nav a[href='/ui/messages']").await;
        c.find(Locator::Css("#q"))
            .await
            .unwrap()
            .send_keys(&new_id)
            .await
            .unwrap();
        follow(&c, "form.search button").await;
        journey = text(&c, "main").await;
        if journey.contains("ChargePayment") && journey.contains("handled by orders@") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(journey.contains("handled by orders@"), "{journey}");
    assert!(
        journey.contains(&order.message.id),
        "the original is its cause: {journey}"
    );
    shoot(&c, (&shots, dir.path()), "journey").await;

    follow(&c, "header nav a[href='/ui/topology']").await;
    assert!(
        text(&c, "table.types").await.contains("Reserve"),
        "the topology lists the stock route's command"
    );
    let drawn = c
        .execute(
            "return document.querySelectorAll('svg.topology g.node').length;",
            vec![],
        )
        .await
        .unwrap();
    assert!(drawn.as_u64().unwrap_or(0) >= 10, "nodes drawn: {drawn}");
    shoot(&c, (&shots, dir.path()), "topology").await;

    follow(&c, "header nav a[href='/ui/plugins']").await;
    assert!(
        text(&c, "section[data-plugin='stock']")
            .await
            .contains("stock")
    );
    shoot(&c, (&shots, dir.path()), "plugins").await;

    c.close().await.unwrap();
    host.stop().await;
}

/// The sagas pages: instances by status, stuck ones, one instance's state
/// and each step's changes against the state before it; the overview's
/// counts.
#[tokio::test(flavor = "multi_thread")]
async fn the_sagas_pages_show_instances_stuck_ones_and_each_steps_changes() {
    use crate::sagas::{add, ledger, open};
    let dir = tempfile::tempdir().unwrap();
    let path = write_pipeline(
        dir.path(),
        "ledgers",
        &format!(
            "[host]\ncache_dir = \"{{cache}}\"\n{}",
            ledger("dead-letter")
        ),
    );
    let p = config::load(&path)
        .unwrap_or_else(|e| panic!("{e}"))
        .pipeline;
    let reject = message(Kind::Event, "Reject", json!({ "id": "L-2" }));
    let third_step = add("L-1", 3);
    enqueue(
        &p,
        vec![
            open("L-1"),
            add("L-1", 2),
            third_step.clone(),
            open("L-2"),
            reject,
            open("L/3 <b>"),
        ],
    )
    .await;
    let (host, base) = start(&p, Some(TOKEN)).await;
    dead_of(&p, 1).await;
    let http = Http::new(&base);
    let (session, _) = http.sign_in().await;
    let s = Some(session.as_str());
    let instances = |body: &str| -> Vec<String> {
        body.split("data-instance=\"")
            .skip(1)
            .filter_map(|r| r.split('"').next())
            .map(str::to_owned)
            .collect()
    };

    // Every open instance; the failed one alone; running ones gone quiet.
    let mut open_ones = Vec::new();
    for _ in 0..100 {
        open_ones = instances(&http.get("/ui/sagas", s).await.body);
        if open_ones.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    open_ones.sort();
    assert_eq!(
        open_ones,
        ["L-1", "L-2", "L/3 &lt;b&gt;"],
        "markup in a key is escaped"
    );
    let failed = http.get("/ui/sagas?status=failed", s).await;
    assert_eq!(instances(&failed.body), ["L-2"], "{}", failed.body);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let stuck = http.get("/ui/sagas?stuck=10ms", s).await;
    let mut quiet = instances(&stuck.body);
    quiet.sort();
    assert_eq!(quiet, ["L-1", "L/3 &lt;b&gt;"], "{}", stuck.body);
    assert_eq!(http.get("/ui/sagas?stuck=soon", s).await.status, 400);

    // One instance: its state, and each step against the one before.
    let one = http.get("/ui/sagas/ledger/L-1", s).await;
    assert_eq!(one.status, 200, "{}", one.body);
    assert!(one.body.contains("data-version=\"3\""), "{}", one.body);
    let third = one.body.split("data-version=\"3\"").nth(1).unwrap();
    assert!(
        third.contains("<del>2</del>") && third.contains("<ins>5</ins>"),
        "the third step took the total from 2 to 5: {third}"
    );
    assert!(
        stuck
            .body
            .contains("href=\"/ui/sagas/ledger/L%2F3%20%3Cb%3E\""),
        "{}",
        stuck.body
    );
    let odd = http.get("/ui/sagas/ledger/L%2F3%20%3Cb%3E", s).await;
    assert_eq!(
        odd.status, 200,
        "an id with a slash and markup: {}",
        odd.body
    );
    assert!(!odd.body.contains("<b>"), "{}", odd.body);
    let none = http.get("/ui/sagas/ledger/L-404", s).await;
    assert_eq!(none.status, 404);
    // The message's journey shows the step it drove, linked to its
    // instance.
    let journey = http
        .get(&format!("/ui/messages?q={}", third_step.id), s)
        .await;
    assert!(
        journey
            .body
            .contains("href=\"/ui/sagas/ledger/L-1\">step 3 of saga ledger&#39;s instance L-1")
            || journey
                .body
                .contains("href=\"/ui/sagas/ledger/L-1\">step 3 of saga ledger's instance L-1"),
        "{}",
        journey.body
    );

    // The overview counts them.
    let o = http.get("/ui/live/overview", s).await;
    let row = o
        .body
        .split("data-saga=\"ledger\"")
        .nth(1)
        .and_then(|r| r.split("</tr>").next())
        .unwrap_or_else(|| panic!("{}", o.body));
    let cells: Vec<&str> = row
        .split("class=\"num")
        .skip(1)
        .filter_map(|c| c.split('>').nth(if c.contains("<a") { 2 } else { 1 }))
        .filter_map(|c| c.split('<').next())
        .collect();
    assert_eq!(
        cells,
        ["2", "0", "1"],
        "running, stuck (15 min), failed: {row}"
    );

    // In the browser: the instance's third step shows the total's change.
    let driver = chromedriver();
    let profile = tempfile::tempdir().unwrap();
    let c = browser(&driver, profile.path()).await;
    c.goto(&format!(
        "{base}/ui/login?next=%2Fui%2Fsagas%2Fledger%2FL-1"
    ))
    .await
    .unwrap();
    sign_in_as(&c, TOKEN).await;
    let third = text(&c, "li.step[data-version='3'] table.diff").await;
    assert!(
        third.contains("total") && third.contains('2') && third.contains('5'),
        "{third}"
    );
    shoot(&c, (&shots(dir.path()), dir.path()), "saga").await;
    c.close().await.unwrap();
    host.stop().await;
}

/// The plugins page, once `done` holds for it (at most 30 s).
async fn plugins_page_until(http: &Http, session: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let page = http.get("/ui/plugins", Some(session)).await.body;
        if done(&page) || std::time::Instant::now() > deadline {
            return page;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// With `[fleet]`, the plugins page shows how the fleet's last deploy of
/// each plugin rolls out: its number and state, and how many live hosts
/// run it, as the host's follower last read them.
#[tokio::test(flavor = "multi_thread")]
async fn the_plugins_page_shows_the_fleets_rollout() {
    let _shared = crate::amqp::BROKER_IN_USE.read().await;
    let schema = crate::state::schema();
    let (_dirs, paths, p) = crate::fleet::copies(&crate::amqp::RABBITMQ, 1, &schema, "200ms", "");
    let (host, base) = start(&p, Some(TOKEN)).await;
    let http = Http::new(&base);
    let (session, _) = http.sign_in().await;
    let before = http.get("/ui/plugins", Some(&session)).await.body;
    let deployed = crate::fleet::deploy_tally(&paths[0], "tally_v2", &["--wait", "30s"]);
    let page = plugins_page_until(&http, &session, |page| {
        page.contains("1 of 1 live host(s) run what it wants")
    })
    .await;
    // Then the pipeline file itself: its own rollout, above the routes.
    let file = std::process::Command::new(crate::common::bin())
        .args(["deploy", "-p"])
        .arg(&paths[0])
        .args(["--wait", "30s"])
        .output()
        .unwrap();
    let with_file = plugins_page_until(&http, &session, |page| {
        page.matches("1 of 1 live host(s) run what it wants")
            .count()
            == 2
    })
    .await;
    host.stop().await;
    crate::sagas::drop_schema(&schema).await;
    crate::amqp::clean_up(&p).await;
    assert!(
        file.status.success(),
        "{}{}",
        String::from_utf8_lossy(&file.stdout),
        String::from_utf8_lossy(&file.stderr)
    );
    assert!(
        with_file.contains(r#"data-rollout="(pipeline file)""#),
        "{with_file}"
    );
    assert_eq!(
        with_file
            .matches("1 of 1 live host(s) run what it wants")
            .count(),
        2,
        "{with_file}"
    );
    assert!(
        deployed.status.success(),
        "{}{}",
        String::from_utf8_lossy(&deployed.stdout),
        String::from_utf8_lossy(&deployed.stderr)
    );
    assert!(
        before.contains("nothing deployed to the fleet") || before.contains("has not read it yet"),
        "{before}"
    );
    assert!(page.contains(r#"data-rollout="tally""#), "{page}");
    assert!(page.contains(r#"data-state="deployed""#), "{page}");
    assert!(page.contains("deploy #1 of 2.0.0"), "{page}");
    assert!(
        page.contains("1 of 1 live host(s) run what it wants"),
        "{page}"
    );
}
