//! The web console at `/ui`, served by the admin listener: what a running
//! host does (overview, plugins), what failed (dead letters: groups,
//! records, replay, resolve, edit and send again), what happened to a
//! message (its journey, from the journal) and where each business process
//! is (sagas: instances, stuck ones, each step's changes), and what flows
//! where (topology).
//!
//! Pages are HTML rendered on the server ([`maud`] escapes every value);
//! the one script and the style sheet are compiled into the binary, so the
//! console works with no network beyond the listener.
//!
//! Every page needs a session: the login form takes the admin token
//! (`[admin] token_env`) and sets an `HttpOnly`, `SameSite=Strict` cookie.
//! Without a configured token the console is closed. Every form carries the
//! session's CSRF token, and a request whose `Origin` is not the
//! listener's is refused. Responses carry a Content-Security-Policy that
//! allows only the console's own script and style sheet.

mod journey;
mod letters;
mod pages;
mod sagas;
mod topology;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use maud::{DOCTYPE, Markup, html};

use crate::supervisor::Supervisor;

/// How long a session lasts after its login.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at once; the oldest goes when a login would pass it.
const MAX_SESSIONS: usize = 64;
/// The largest form the console reads (an edited payload included).
pub const MAX_FORM_BYTES: usize = 1 << 20;
/// The cookie that holds the session id.
const COOKIE: &str = "switchyard_session";
/// How often the overview's rates take a sample, and how many they keep
/// (one hour).
const SAMPLE_EVERY: Duration = Duration::from_secs(60);
const SAMPLES: usize = 61;

/// The policy every console response carries: nothing inline, nothing from
/// elsewhere.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const STYLE: &str = include_str!("console.css");
const SCRIPT: &str = include_str!("console.js");

/// The counters the overview shows, per route.
const RATE_METRICS: [&str; 4] = [
    "switchyard.messages.handled",
    "switchyard.messages.failed",
    "switchyard.messages.dead_lettered",
    "switchyard.messages.in_flight",
];

/// How long a wrong token is answered after; wrong tokens are answered
/// one at a time (see [`Guesses`]).
pub const WRONG_TOKEN_PAUSE: Duration = Duration::from_millis(400);

/// The wrong tokens given to one listener (the admin API's bearer token,
/// the console's sign-in). Each is answered after [`WRONG_TOKEN_PAUSE`],
/// one at a time, so guessing goes no faster than one try per pause
/// however many connections ask at once; the right token never waits.
/// Every wrong token waits its turn, however many wait: an answer that
/// came sooner would tell a guesser the token was wrong. The queue is as
/// long as the listener's connections (`admin::MAX_CONNECTIONS`) at most.
pub struct Guesses {
    gate: tokio::sync::Mutex<()>,
}

impl Guesses {
    pub fn new() -> Arc<Self> {
        Arc::new(Guesses {
            gate: tokio::sync::Mutex::new(()),
        })
    }

    /// Holds a wrong token's answer back for its turn and its pause. A
    /// client that hangs up leaves the queue: its request's future, and
    /// with it its turn, is dropped.
    pub async fn wrong(&self) {
        let _turn = self.gate.lock().await;
        tokio::time::sleep(WRONG_TOKEN_PAUSE).await;
    }
}

/// The console of one running host.
pub struct Console {
    inner: Arc<Inner>,
}

struct Inner {
    control: Arc<Supervisor>,
    journal: Option<Arc<dyn crate::journal::Store>>,
    token: Option<String>,
    /// The pipeline's name.
    name: String,
    sessions: Mutex<HashMap<String, Session>>,
    samples: Arc<Mutex<VecDeque<Sample>>>,
    started: Instant,
    /// Wrong tokens, counted with the admin API's on the same listener.
    guesses: Arc<Guesses>,
    /// The fleet as the host's follower last read it, with `[fleet]`.
    fleet: Option<tokio::sync::watch::Receiver<Option<crate::fleet::FleetView>>>,
}

#[derive(Clone)]
struct Session {
    csrf: String,
    expires: Instant,
    /// What the last action did, shown once on the next page.
    flash: Option<String>,
}

struct Sample {
    at: Instant,
    totals: BTreeMap<(String, String), f64>,
}

type Shared = Arc<Inner>;

/// Per (metric, route): the total now, and its growth since the oldest
/// sample.
type Rates = BTreeMap<(String, String), (f64, f64)>;

impl Console {
    /// The console of the host `control` runs; `journal` is where message
    /// journeys are read, `token` what a login must give, `guesses` the
    /// listener's wrong tokens (`admin::Admin::guesses`), `fleet` what the
    /// fleet's follower last read (with `[fleet]`).
    pub async fn new(
        control: Arc<Supervisor>,
        journal: Option<Arc<dyn crate::journal::Store>>,
        token: Option<String>,
        guesses: Arc<Guesses>,
        fleet: Option<tokio::sync::watch::Receiver<Option<crate::fleet::FleetView>>>,
    ) -> Self {
        let name = control.pipeline().await.name;
        let samples = Arc::new(Mutex::new(VecDeque::with_capacity(SAMPLES)));
        let inner = Arc::new(Inner {
            control,
            journal,
            token,
            name,
            sessions: Mutex::new(HashMap::new()),
            samples: samples.clone(),
            started: Instant::now(),
            guesses,
            fleet,
        });
        inner.take_sample();
        tokio::spawn(sample_every(Arc::downgrade(&inner)));
        Console { inner }
    }

    /// The console's routes, all under `/ui`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/ui", get(pages::overview))
            .route("/ui/", get(pages::overview))
            .route("/ui/live/overview", get(pages::overview_live))
            .route("/ui/login", get(login_form).post(login))
            .route("/ui/logout", post(logout))
            .route("/ui/plugins", get(pages::plugins))
            .route("/ui/plugins/{name}/rollback", post(pages::rollback))
            .route("/ui/dead-letters", get(letters::index))
            .route("/ui/dead-letters/replay", post(letters::replay_group))
            .route("/ui/dead-letters/{id}", get(letters::record))
            .route("/ui/dead-letters/{id}/replay", post(letters::replay_one))
            .route("/ui/dead-letters/{id}/resolve", post(letters::resolve))
            .route("/ui/dead-letters/{id}/edit", post(letters::edit))
            .route("/ui/messages", get(journey::search))
            .route("/ui/sagas", get(sagas::index))
            .route("/ui/topology", get(topology::page))
            .route("/ui/sagas/{plugin}/{id}", get(sagas::instance))
            .route("/ui/assets/console.css", get(style))
            .route("/ui/assets/console.js", get(script))
            .route("/ui/{*rest}", get(not_found).post(not_found))
            .with_state(self.inner.clone())
    }
}

/// Samples the counters every [`SAMPLE_EVERY`] while the console lives.
async fn sample_every(inner: Weak<Inner>) {
    let mut every = tokio::time::interval(SAMPLE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        every.tick().await;
        match inner.upgrade() {
            Some(i) => i.take_sample(),
            None => return,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Inner {
    fn take_sample(&self) {
        let totals = self
            .control
            .services()
            .telemetry
            .metrics
            .totals(&RATE_METRICS, "plugin");
        let mut samples = lock(&self.samples);
        if samples.len() >= SAMPLES {
            samples.pop_front();
        }
        samples.push_back(Sample {
            at: Instant::now(),
            totals,
        });
    }

    /// Per route: (metric, now, since the oldest sample), and how long ago
    /// that sample was taken.
    fn rates(&self) -> (Rates, Duration) {
        let now = self
            .control
            .services()
            .telemetry
            .metrics
            .totals(&RATE_METRICS, "plugin");
        let samples = lock(&self.samples);
        let (then, age) = samples.front().map_or((None, Duration::ZERO), |s| {
            (Some(&s.totals), s.at.elapsed())
        });
        let rates = now
            .into_iter()
            .map(|(key, value)| {
                let before = then.and_then(|t| t.get(&key)).copied().unwrap_or(0.0);
                (key, (value, (value - before).max(0.0)))
            })
            .collect();
        (rates, age)
    }

    /// The session the request's cookie names, if it is valid; its flash
    /// message is taken (a page shows it once).
    fn session(&self, headers: &HeaderMap) -> Option<(String, Session)> {
        self.session_with(headers, true)
    }

    /// The session, leaving its flash message for the next page (for the
    /// parts of a page that refresh themselves).
    fn peek_session(&self, headers: &HeaderMap) -> Option<(String, Session)> {
        self.session_with(headers, false)
    }

    fn session_with(&self, headers: &HeaderMap, take_flash: bool) -> Option<(String, Session)> {
        let id = cookie(headers, COOKIE)?;
        let mut sessions = lock(&self.sessions);
        let session = sessions.get_mut(&id)?;
        if session.expires <= Instant::now() {
            sessions.remove(&id);
            return None;
        }
        let shown = session.clone();
        if take_flash {
            session.flash = None;
        }
        Some((id, shown))
    }

    fn flash(&self, id: &str, message: String) {
        if let Some(s) = lock(&self.sessions).get_mut(id) {
            s.flash = Some(message);
        }
    }

    /// The end of an action: `message` for the page's next view, and a
    /// redirect to `to` (so a reload does not repeat the action).
    fn flash_and_go(&self, page: &Page, message: String, to: &str) -> Response {
        self.flash(&page.id, message);
        redirect(to)
    }

    fn new_session(&self) -> Option<String> {
        let id = random_token();
        let csrf = random_token();
        if id.is_empty() || csrf.is_empty() {
            return None;
        }
        let mut sessions = lock(&self.sessions);
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
        {
            sessions.remove(&oldest);
        }
        sessions.insert(
            id.clone(),
            Session {
                csrf,
                expires: now + SESSION_TTL,
                flash: None,
            },
        );
        Some(id)
    }

    fn pipeline_name(&self) -> &str {
        &self.name
    }
}

/// 256 bits from the operating system's generator, in hex.
fn random_token() -> String {
    let mut bytes = [0u8; 32];
    if let Err(e) = getrandom::fill(&mut bytes) {
        // No session may have a guessable id: without the system's
        // generator, sign-ins fail rather than fall back to a weak one.
        tracing::error!(error = %e, "Console: the system's random generator failed");
        return String::new();
    }
    hex::encode(bytes)
}

/// The value of cookie `name` in the request.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// A page of the signed-in console, or the way to the login form.
struct Page {
    id: String,
    session: Session,
}

/// The request's session, or a redirect to the login form that comes back
/// to `here`.
fn signed_in(inner: &Inner, headers: &HeaderMap, here: &str) -> Result<Page, Response> {
    match inner.session(headers) {
        Some((id, session)) => Ok(Page { id, session }),
        None => {
            let next: String = form_urlencoded::byte_serialize(here.as_bytes()).collect();
            Err(redirect(&format!("/ui/login?next={next}")))
        }
    }
}

/// A part of a page that refreshes itself: signed in, or refused with 401
/// (the script keeps what it showed).
fn signed_in_fragment(inner: &Inner, headers: &HeaderMap) -> Result<(), Response> {
    match inner.peek_session(headers) {
        Some(_) => Ok(()),
        None => Err(refuse(StatusCode::UNAUTHORIZED, "Your session ended.")),
    }
}

/// A changing request: signed in, from the console's own origin, with the
/// session's CSRF token in its form. The form is read only after the
/// session is known.
async fn signed_in_form(
    inner: &Inner,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Page, HashMap<String, String>), Response> {
    same_origin(headers)?;
    let Some((id, session)) = inner.session(headers) else {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            "You are not signed in (or your session ended): nothing was changed.",
        ));
    };
    let form = read_form(body, MAX_FORM_BYTES).await?;
    let given = form.get("csrf").map_or("", String::as_str);
    if !crate::text::constant_time_eq(given.as_bytes(), session.csrf.as_bytes()) {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            "This form did not come from this console (its CSRF token is missing or wrong): nothing was changed.",
        ));
    }
    Ok((Page { id, session }, form))
}

/// Refuses a request whose `Origin` (or, without one, `Referer`) is
/// another site's. A request with neither (a command-line client) passes:
/// the session cookie and CSRF token still apply.
fn same_origin(headers: &HeaderMap) -> Result<(), Response> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let from = headers
        .get(header::ORIGIN)
        .or_else(|| headers.get(header::REFERER))
        .and_then(|h| h.to_str().ok());
    match from {
        None => Ok(()),
        Some(o) => {
            let rest = o
                .strip_prefix("http://")
                .or_else(|| o.strip_prefix("https://"))
                .unwrap_or("");
            let authority = rest.split('/').next().unwrap_or("");
            if !host.is_empty() && authority == host {
                Ok(())
            } else {
                Err(refuse(
                    StatusCode::FORBIDDEN,
                    "This request came from another site: nothing was changed.",
                ))
            }
        }
    }
}

/// The largest sign-in form read.
const MAX_LOGIN_FORM_BYTES: usize = 4096;

async fn read_form(body: Body, limit: usize) -> Result<HashMap<String, String>, Response> {
    let bytes = match tokio::time::timeout(
        Duration::from_secs(if limit > MAX_LOGIN_FORM_BYTES { 30 } else { 5 }),
        axum::body::to_bytes(body, limit),
    )
    .await
    {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => {
            return Err(refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("The form is larger than {limit} bytes: nothing was changed."),
            ));
        }
        Err(_) => {
            return Err(refuse(
                StatusCode::REQUEST_TIMEOUT,
                "The form did not arrive in time: nothing was changed.",
            ));
        }
    };
    Ok(form_urlencoded::parse(&bytes).into_owned().collect())
}

/// The headers every console response carries.
fn guarded(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

fn html_response(status: StatusCode, markup: Markup) -> Response {
    guarded(
        (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            markup.into_string(),
        )
            .into_response(),
    )
}

fn redirect(to: &str) -> Response {
    guarded(
        (
            StatusCode::SEE_OTHER,
            [(header::LOCATION, to.to_owned())],
            String::new(),
        )
            .into_response(),
    )
}

/// A page that says why nothing was done, with a way back.
fn refuse(status: StatusCode, why: &str) -> Response {
    html_response(
        status,
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    title { "Switchyard console" }
                    link rel="stylesheet" href="/ui/assets/console.css";
                }
                body {
                    main.narrow {
                        h1 { "Switchyard" }
                        p.error role="alert" { (why) }
                        p { a href="/ui" { "Back to the console" } }
                    }
                }
            }
        },
    )
}

/// The frame of every signed-in page.
fn layout(inner: &Inner, page: &Page, title: &str, nav: &str, body: Markup) -> Markup {
    let pipeline = inner.pipeline_name();
    let links = [
        ("overview", "/ui", "Overview"),
        ("dead-letters", "/ui/dead-letters", "Dead letters"),
        ("messages", "/ui/messages", "Messages"),
        ("sagas", "/ui/sagas", "Sagas"),
        ("topology", "/ui/topology", "Topology"),
        ("plugins", "/ui/plugins", "Plugins"),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · " (pipeline) " · Switchyard" }
                link rel="stylesheet" href="/ui/assets/console.css";
                script src="/ui/assets/console.js" defer {}
            }
            body {
                header.top {
                    span.brand { "Switchyard" }
                    span.pipeline { (pipeline) }
                    nav {
                        @for (key, href, label) in links {
                            @if key == nav {
                                a.current href=(href) aria-current="page" { (label) }
                            } @else {
                                a href=(href) { (label) }
                            }
                        }
                    }
                    form.logout method="post" action="/ui/logout" {
                        input type="hidden" name="csrf" value=(page.session.csrf);
                        button type="submit" { "Sign out" }
                    }
                }
                main {
                    @if let Some(f) = &page.session.flash {
                        p.flash role="status" { (f) }
                    }
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

async fn login_form(
    State(inner): State<Shared>,
    axum::extract::Query(q): axum::extract::Query<HashMap<String, String>>,
) -> Response {
    let next = q.get("next").map_or("/ui", String::as_str);
    login_page(&inner, StatusCode::OK, safe_next(next), None)
}

/// Where a login may lead: a console page, never another site.
fn safe_next(next: &str) -> &str {
    let inside = next == "/ui" || next.starts_with("/ui/") || next.starts_with("/ui?");
    if inside && !next.contains('\\') && !next.contains("//") {
        next
    } else {
        "/ui"
    }
}

fn login_page(inner: &Inner, status: StatusCode, next: &str, error: Option<&str>) -> Response {
    let closed = inner.token.is_none();
    html_response(
        if closed {
            StatusCode::FORBIDDEN
        } else {
            status
        },
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    title { "Sign in · Switchyard" }
                    link rel="stylesheet" href="/ui/assets/console.css";
                }
                body {
                    main.narrow {
                        h1 { "Switchyard" }
                        p { "Pipeline " strong { (inner.pipeline_name()) } }
                        @if closed {
                            p.error role="alert" {
                                "The console is closed: this host has no admin token. Set "
                                code { "[admin] token_env" }
                                " in the pipeline and that variable in the host's environment."
                            }
                        } @else {
                            @if let Some(e) = error {
                                p.error role="alert" { (e) }
                            }
                            form method="post" action="/ui/login" {
                                input type="hidden" name="next" value=(next);
                                label for="token" { "Admin token" }
                                input #token type="password" name="token" autocomplete="current-password" required autofocus;
                                button type="submit" { "Sign in" }
                            }
                        }
                    }
                }
            }
        },
    )
}

async fn login(State(inner): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    if let Err(r) = same_origin(&headers) {
        return r;
    }
    let Some(expected) = &inner.token else {
        return login_page(&inner, StatusCode::FORBIDDEN, "/ui", None);
    };
    let form = match read_form(body, MAX_LOGIN_FORM_BYTES).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let next = safe_next(form.get("next").map_or("/ui", String::as_str)).to_owned();
    let given = form.get("token").map_or("", String::as_str);
    if !crate::text::constant_time_eq(given.as_bytes(), expected.as_bytes()) {
        // Guessing costs time, one guess at a time on this listener.
        inner.guesses.wrong().await;
        tracing::warn!("Console: a sign-in with a wrong token");
        return login_page(
            &inner,
            StatusCode::UNAUTHORIZED,
            &next,
            Some("That is not this host's admin token."),
        );
    }
    let Some(id) = inner.new_session() else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "The host cannot make a session id (its random generator failed): see its log.",
        );
    };
    let mut response = redirect(&next);
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{COOKIE}={id}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={}",
        SESSION_TTL.as_secs()
    )) {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}

async fn logout(State(inner): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    let (page, _) = match signed_in_form(&inner, &headers, body).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    lock(&inner.sessions).remove(&page.id);
    let mut response = redirect("/ui/login");
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "switchyard_session=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    response
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    guarded(
        (
            [
                (header::CONTENT_TYPE, content_type),
                (header::CACHE_CONTROL, "max-age=300"),
            ],
            body,
        )
            .into_response(),
    )
}

async fn not_found() -> Response {
    refuse(StatusCode::NOT_FOUND, "There is no such page.")
}

/// A time as RFC 3339 to the second, in UTC.
fn when(ms: u64) -> String {
    match std::time::UNIX_EPOCH.checked_add(Duration::from_millis(ms)) {
        Some(t) if ms < 253_402_300_800_000 => humantime::format_rfc3339_seconds(t).to_string(),
        _ => format!("{ms} ms"),
    }
}

/// How long ago `ms` was, in a few words.
fn ago(ms: u64) -> String {
    let now = crate::envelope::now_ms();
    let secs = now.saturating_sub(ms) / 1000;
    match secs {
        0..60 => format!("{secs} s ago"),
        60..3600 => format!("{} min ago", secs / 60),
        3600..86_400 => format!("{} h ago", secs / 3600),
        _ => format!("{} d ago", secs / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_leads_only_to_console_pages() {
        assert_eq!(safe_next("/ui/dead-letters/abc"), "/ui/dead-letters/abc");
        assert_eq!(safe_next("/ui?x=1"), "/ui?x=1");
        assert_eq!(safe_next("https://evil.example/"), "/ui");
        assert_eq!(safe_next("//evil.example/ui"), "/ui");
        assert_eq!(safe_next("/ui//evil.example"), "/ui");
        assert_eq!(safe_next("/ui\\@evil"), "/ui");
        assert_eq!(safe_next("/uix"), "/ui");
    }

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; switchyard_session=abc; b=2"),
        );
        assert_eq!(cookie(&h, COOKIE).as_deref(), Some("abc"));
        assert_eq!(cookie(&h, "c"), None);
    }

    #[test]
    fn requests_from_other_sites_are_refused() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:9090"));
        assert!(same_origin(&h).is_ok());
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:9090"),
        );
        assert!(same_origin(&h).is_ok());
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert!(same_origin(&h).is_err());
        h.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(same_origin(&h).is_err());
    }
}
