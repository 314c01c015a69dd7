//! The operator console: server-rendered pages over [`outbox::admin::Admin`], as an axum
//! [`Router`] that the `outbox` daemon serves on `--console-addr` and a service embedding the
//! relay can mount (also nested, e.g. under `/outbox`):
//!
//! ```no_run
//! # async fn example(pool: sqlx::PgPool, relay: outbox_kafka_relay::RelayHandle) -> Result<(), Box<dyn std::error::Error>> {
//! use outbox::admin::Admin;
//! use outbox_console::{Console, Token};
//!
//! let console = Console::new(pool, Admin::new(&outbox::SchemaName::default_schema()))
//!     .health(relay.health())
//!     .writes(Token::new(std::env::var("OUTBOX_CONSOLE_TOKEN")?)?); // omit: read-only
//! let app = axum::Router::new().nest("/outbox", outbox_console::router(console));
//! # Ok(()) }
//! ```
//!
//! Pages: the overview (backlog, a publish-rate and lag chart, leases, relay sessions, the
//! relay's health), blocked keys, dead letters with a payload preview, and republishing; the
//! dead-letter actions and republishing ask for confirmation on a page of their own.
//!
//! # Security
//!
//! - **Reading** needs no login, like `/metrics`: serve the console on a private address. Pages
//!   show payload previews.
//! - **Only this console's host**: a request whose `Host` is a name other than `localhost` or
//!   one given to [`Console::hosts`] is refused, so a page of another site whose name was
//!   rebound to the console's address (DNS rebinding) reads nothing; and another site's page
//!   may link to the console but not embed or fetch its pages (`Sec-Fetch-*`).
//! - **Writes are off** unless [`Console::writes`] gave a token: then every write route answers
//!   403 and no page shows an action.
//! - **Who may write**: a request with `Authorization: Bearer <token>` (scripts), or a browser
//!   session opened by posting the token to the login form. The session id is 32 random bytes
//!   in an `HttpOnly; SameSite=Strict` cookie, kept server-side (in memory, 8 hours). Tokens
//!   are compared by digest without early exit and are never logged nor shown
//!   (`Debug` of [`Token`] is masked).
//! - **Cross-site requests cannot write**: writes are POST only; a session's write must carry
//!   the session's CSRF token (a random synchronizer token rendered into its forms, which
//!   another site cannot read), and a request whose `Sec-Fetch-Site` or `Origin` says it comes
//!   from another site is refused before anything else, login included. A bearer token is never
//!   sent by a browser on its own, so it needs no CSRF token; other `Authorization` schemes (an
//!   authenticating proxy's) are left to the session.
//! - **A republish** does what its preview counted, or is previewed again, and runs to its end
//!   in a task of its own, logged before and after, whether or not the browser waits.
//! - **Output cannot inject**: every value from the database or the request goes through the
//!   escape functions of `html` (markup, quotes, control and bidirectional characters); binary
//!   keys and payloads show as hex, payloads cut to [`PREVIEW_BYTES`] by the database. Pages
//!   are sent with a Content-Security-Policy that allows no script at all and no framing.
//! - **Every write is logged** (tracing, `info`): who (the session's digest label or "bearer
//!   token", and the peer address when the server records it), what, and how many.
//! - **Bad input** is a 400 page naming what was typed; request data is never unwrapped.

mod auth;
mod html;

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Display;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Form, FromRequestParts, NestedPath, Path, Query, Request, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use outbox::admin::{Admin, RepublishFilter};
use outbox_kafka_relay::Health;
use sqlx::{PgPool, Postgres, Transaction};

pub use auth::{ShortToken, Token, MIN_TOKEN_CHARS};
use html::{text, Layout};

/// Payload and header bytes a preview shows at most; the database cuts them.
pub const PREVIEW_BYTES: i32 = 4096;
/// Rows a listing shows at most.
const LIST_LIMIT: i64 = 100;
/// The chart: this many intervals of this length, up to now.
const CHART_INTERVALS: u32 = 30;
const CHART_INTERVAL: Duration = Duration::from_secs(10);
/// Every statement of a page or action is bounded: a console must not hold locks for long.
const STATEMENT_TIMEOUT: &str = "SET LOCAL statement_timeout = '30s'";
/// Messages republished per transaction.
const REPUBLISH_BATCH: i64 = 10_000;

/// What the console shows and may do. See the crate docs.
#[derive(Debug)]
pub struct Console {
    pool: PgPool,
    admin: Admin,
    health: Option<Arc<Health>>,
    token: Option<Token>,
    hosts: Vec<String>,
}

impl Console {
    /// A read-only console of the outbox `admin` addresses, on `pool`.
    pub fn new(pool: PgPool, admin: Admin) -> Self {
        Console {
            pool,
            admin,
            health: None,
            token: None,
            hosts: Vec::new(),
        }
    }

    /// The names (with or without a port) the console is reached by, besides addresses and
    /// `localhost`: requests for any other `Host` are refused (a page of another site whose
    /// name was rebound to the console's address would otherwise read it).
    pub fn hosts(mut self, hosts: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.hosts = hosts.into_iter().map(Into::into).collect();
        self
    }

    /// Shows this relay's health report on the overview.
    pub fn health(mut self, health: Arc<Health>) -> Self {
        self.health = Some(health);
        self
    }

    /// Enables write actions (dead-letter retry and drop, republish) for holders of `token`.
    pub fn writes(mut self, token: Token) -> Self {
        self.token = Some(token);
        self
    }
}

struct Shared {
    pool: PgPool,
    admin: Admin,
    health: Option<Arc<Health>>,
    writes: Option<Writes>,
    hosts: Vec<String>,
}

struct Writes {
    token: Token,
    sessions: auth::Sessions,
}

/// The console's routes. Serve it with `into_make_service_with_connect_info::<SocketAddr>()` to
/// have peer addresses in the write log.
pub fn router(console: Console) -> Router {
    let shared = Arc::new(Shared {
        pool: console.pool,
        admin: console.admin,
        health: console.health,
        writes: console.token.map(|token| Writes {
            token,
            sessions: auth::Sessions::default(),
        }),
        hosts: console.hosts,
    });
    Router::new()
        .route("/", get(overview))
        .route("/blocked", get(blocked))
        .route("/dead-letters", get(dead_letters))
        .route("/dead-letters/confirm", get(confirm_dead_letters))
        .route("/dead-letters/{action}", post(act_on_dead_letters))
        .route("/republish", get(republish_preview).post(republish))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .layer(middleware::from_fn_with_state(shared.clone(), guard))
        .with_state(shared)
}

/// Before every route: the request is for this console's host (see `auth::foreign_host`), and a
/// read is not another site's embedding or fetch (see `auth::cross_site_read`; writes are
/// checked in [`Ctx::authorize`]).
async fn guard(
    ctx: Ctx,
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    let refused = auth::foreign_host(request.headers(), &shared.hosts).or_else(|| {
        (request.method() == Method::GET)
            .then(|| auth::cross_site_read(request.headers()))
            .flatten()
    });
    match refused {
        Some(why) => {
            tracing::warn!(peer = %ctx.peer(), %why, "console: refused a request");
            let message = text(&format!("Refused: {why}."));
            ctx.fail(StatusCode::FORBIDDEN, &message).into_response()
        }
        None => next.run(request).await,
    }
}

type Reply = Result<Response, Refusal>;

/// An error page, boxed: a `Response` is large, and every fallible step returns one.
struct Refusal(Box<Response>);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        *self.0
    }
}

type Fields = HashMap<String, String>;

/// What every handler needs from the request.
struct Ctx {
    base: String,
    peer: Option<SocketAddr>,
    headers: HeaderMap,
    writes: bool,
    session: Option<auth::Session>,
}

impl FromRequestParts<Arc<Shared>> for Ctx {
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        shared: &Arc<Shared>,
    ) -> Result<Self, Infallible> {
        let base = parts.extensions.get::<NestedPath>().map(|p| p.as_str());
        let writes = shared.writes.as_ref();
        Ok(Ctx {
            base: base.unwrap_or("").trim_end_matches('/').to_owned(),
            peer: parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0),
            writes: writes.is_some(),
            session: writes.and_then(|w| w.sessions.find(&parts.headers)),
            headers: parts.headers.clone(),
        })
    }
}

const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";

fn respond(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CACHE_CONTROL, "no-store"),
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        // Not `no-referrer`: with it, browsers send `Origin: null` on the console's own
        // forms, which the cross-site check must refuse.
        (header::REFERRER_POLICY, "same-origin"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

impl Ctx {
    fn layout(&self) -> Layout<'_> {
        Layout {
            base: &self.base,
            writes: self.writes,
            csrf: self.session.as_ref().map(|s| s.csrf.as_str()),
        }
    }

    /// A page; `title` and `body` are HTML.
    fn page(&self, title: &str, body: &str) -> Response {
        respond(StatusCode::OK, self.layout().page(title, body))
    }

    /// An error page; `message` is HTML.
    fn fail(&self, status: StatusCode, message: &str) -> Refusal {
        let title = status.canonical_reason().unwrap_or("Error");
        let body = format!("<p class=\"bad\">{message}</p>");
        let mut response = respond(status, self.layout().page(title, &body));
        if status == StatusCode::UNAUTHORIZED {
            let challenge = HeaderValue::from_static("Bearer");
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, challenge);
        }
        Refusal(Box::new(response))
    }

    fn bad_input(&self, message: &str) -> Refusal {
        self.fail(StatusCode::BAD_REQUEST, &text(message))
    }

    fn database(&self, error: impl Display) -> Refusal {
        tracing::warn!(%error, "console: a database statement failed");
        let message = text(&format!("database error: {error}"));
        self.fail(StatusCode::INTERNAL_SERVER_ERROR, &message)
    }

    fn peer(&self) -> String {
        self.peer
            .map_or_else(|| "an unrecorded peer".into(), |p| p.to_string())
    }

    fn href(&self, path: &str) -> String {
        text(&self.layout().href(path))
    }

    /// Who sends this write, for the log; refuses it unless writes are enabled, it comes from
    /// this site, and it has the token or a session with that session's CSRF token.
    fn authorize(&self, shared: &Shared, fields: &Fields) -> Result<String, Refusal> {
        let Some(writes) = &shared.writes else {
            return Err(self.fail(
                StatusCode::FORBIDDEN,
                "Write actions are disabled: this console is read-only (console.write).",
            ));
        };
        if let Some(why) = auth::cross_site(&self.headers) {
            tracing::warn!(peer = %self.peer(), %why, "console: refused a cross-site write");
            let message = text(&format!(
                "Refused: the request comes from another site ({why})."
            ));
            return Err(self.fail(StatusCode::FORBIDDEN, &message));
        }
        if let Some(given) = auth::bearer(&self.headers) {
            if writes.token.matches(given) {
                return Ok(format!("bearer token from {}", self.peer()));
            }
            tracing::warn!(peer = %self.peer(), "console: refused a wrong bearer token");
            return Err(self.fail(StatusCode::UNAUTHORIZED, "Wrong token."));
        }
        let Some(session) = &self.session else {
            let login = format!(
                "Log in first: <a href=\"{}\">log in</a> with the console token.",
                self.href("/login")
            );
            return Err(self.fail(StatusCode::UNAUTHORIZED, &login));
        };
        let csrf = fields.get("csrf").map_or("", String::as_str);
        if !auth::same(session.csrf.as_bytes(), csrf.as_bytes()) {
            tracing::warn!(peer = %self.peer(), session = %session.label, "console: refused a write without its CSRF token");
            return Err(self.fail(
                StatusCode::FORBIDDEN,
                "The form's CSRF token is missing or wrong: reload the page and try again.",
            ));
        }
        Ok(format!("session {} from {}", session.label, self.peer()))
    }
}

async fn begin(shared: &Shared, ctx: &Ctx) -> Result<Transaction<'static, Postgres>, Refusal> {
    let mut tx = shared.pool.begin().await.map_err(|e| ctx.database(e))?;
    sqlx::query(STATEMENT_TIMEOUT)
        .execute(&mut *tx)
        .await
        .map_err(|e| ctx.database(e))?;
    Ok(tx)
}

async fn overview(State(shared): State<Arc<Shared>>, ctx: Ctx) -> Reply {
    let mut tx = begin(&shared, &ctx).await?;
    let admin = &shared.admin;
    let db = |e| ctx.database(e);
    let backlog = admin.backlog(&mut tx).await.map_err(db)?;
    let activity = admin.activity(&mut tx).await.map_err(db)?;
    let leases = admin.leases(&mut tx).await.map_err(db)?;
    let relays = admin.relay_sessions(&mut tx).await.map_err(db)?;
    let history = admin
        .publish_history(&mut tx, CHART_INTERVALS, CHART_INTERVAL)
        .await
        .map_err(db)?;
    drop(tx);

    let age = |d: Option<Duration>| d.map_or_else(|| "-".into(), html::duration);
    let mut body = format!(
        "<dl><dt>Pending</dt><dd id=\"pending\">{}</dd>\
         <dt>Oldest pending</dt><dd>{}</dd>\
         <dt>Held (waiting for a retry)</dt><dd>{}</dd>\
         <dt>Failing messages</dt><dd>{} (<a href=\"{}\">blocked keys</a>)</dd>\
         <dt>Dead letters</dt><dd>{} (<a href=\"{}\">list</a>)</dd>\
         <dt>Last publish</dt><dd>{}</dd></dl>",
        backlog.pending,
        age(backlog.oldest_age),
        backlog.held,
        activity.failing,
        ctx.href("/blocked"),
        backlog.dead_letters,
        ctx.href("/dead-letters"),
        activity.since_last_publish.map_or_else(
            || "- (none kept)".into(),
            |d| format!("{} ago", html::duration(d))
        ),
    );
    let _ = write!(
        body,
        "<h2>Published, last {}</h2>{}",
        html::duration(CHART_INTERVAL * CHART_INTERVALS),
        html::chart(&history, CHART_INTERVAL)
    );
    if history.iter().all(|i| i.published == 0) {
        body.push_str(
            "<p class=\"muted\">Nothing completed in this window, or completion = \"delete\" \
             (which keeps no history to chart).</p>",
        );
    }
    body.push_str("<h2>Leases</h2>");
    if leases.is_empty() {
        body.push_str("<p>No relay has taken a lease yet.</p>");
    } else {
        body.push_str("<table><tr><th>Lease</th><th>Holder</th><th>Token</th><th>State</th></tr>");
        for lease in &leases {
            let state = if lease.expires_in_ms > 0 {
                format!("held, expires in {} ms", lease.expires_in_ms)
            } else {
                "free".into()
            };
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{state}</td></tr>",
                text(&lease.name),
                text(&lease.holder),
                lease.token
            );
        }
        body.push_str("</table>");
    }
    body.push_str("<h2>Relays seen</h2><p class=\"muted\">Sessions named outbox-relay on this database (relays of every schema), by client address.</p>");
    if relays.is_empty() {
        body.push_str("<p>None.</p>");
    } else {
        body.push_str("<table><tr><th>Client</th><th>Sessions</th><th>Connected for</th></tr>");
        for relay in &relays {
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                text(&relay.address),
                relay.sessions,
                relay.connected.map_or_else(|| "-".into(), html::duration)
            );
        }
        body.push_str("</table>");
    }
    body.push_str("<h2>This relay's health</h2>");
    match &shared.health {
        None => body.push_str("<p class=\"muted\">Not attached to a relay.</p>"),
        Some(health) => {
            let report = health.report();
            let yes = |ok: bool| {
                if ok {
                    "<span class=\"ok\">yes</span>"
                } else {
                    "<span class=\"bad\">no</span>"
                }
            };
            let _ = write!(
                body,
                "<dl><dt>Ready</dt><dd id=\"ready\">{}</dd><dt>Leader</dt><dd>{}</dd>\
                 <dt>Database reachable</dt><dd>{}</dd><dt>Kafka reachable</dt><dd>{}</dd></dl>",
                yes(report.ready),
                yes(report.leader),
                yes(report.database_ok),
                yes(report.kafka_ok)
            );
            let problems: Vec<String> = report
                .reasons
                .iter()
                .cloned()
                .chain(report.kafka_problems.iter().map(ToString::to_string))
                .collect();
            if !problems.is_empty() {
                body.push_str("<ul class=\"bad\">");
                for problem in problems {
                    let _ = write!(body, "<li>{}</li>", text(&problem));
                }
                body.push_str("</ul>");
            }
        }
    }
    Ok(ctx.page("Overview", &body))
}

async fn blocked(State(shared): State<Arc<Shared>>, ctx: Ctx) -> Reply {
    let mut tx = begin(&shared, &ctx).await?;
    let held = shared
        .admin
        .held_keys(&mut tx, LIST_LIMIT)
        .await
        .map_err(|e| ctx.database(e))?;
    drop(tx);
    let mut body = String::from(
        "<p>Keys whose oldest pending message failed: it and every later message of the key wait \
         for its next attempt: a failure that may pass (a missing topic, a broker down), or any \
         failure under poison policy \"block\".</p>",
    );
    if held.is_empty() {
        body.push_str("<p id=\"none\">No blocked keys.</p>");
    } else {
        body.push_str(
            "<table id=\"blocked\"><tr><th>Topic</th><th>Key</th><th>Head sequence</th>\
             <th>Attempts</th><th>Failed messages</th><th>Last error</th><th>Next attempt</th></tr>",
        );
        for key in &held {
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                text(&key.topic),
                html::key(key.key.as_deref(), key.key_cut),
                key.head,
                key.attempts,
                key.failed_messages,
                text(key.last_error.as_deref().unwrap_or("-")),
                match key.retry_in {
                    Some(d) if d.is_zero() => "due".into(),
                    Some(d) => format!("in {}", html::duration(d)),
                    None => "-".into(),
                }
            );
        }
        body.push_str("</table>");
        if held.len() as i64 == LIST_LIMIT {
            let _ = write!(body, "<p>The first {LIST_LIMIT} shown.</p>");
        }
    }
    Ok(ctx.page("Blocked keys", &body))
}

async fn dead_letters(State(shared): State<Arc<Shared>>, ctx: Ctx) -> Reply {
    let mut tx = begin(&shared, &ctx).await?;
    let db = |e| ctx.database(e);
    let letters = shared
        .admin
        .dead_letter_previews(&mut tx, None, LIST_LIMIT, PREVIEW_BYTES)
        .await
        .map_err(db)?;
    let total = shared
        .admin
        .backlog(&mut tx)
        .await
        .map_err(db)?
        .dead_letters;
    drop(tx);
    let act = ctx.session.is_some();
    let action = |action: &str, id: &str, label: &str| {
        format!(
            "<a href=\"{}?action={action}&amp;id={id}\">{label}</a>",
            ctx.href("/dead-letters/confirm")
        )
    };
    let mut body = format!("<p>{total} dead letters (messages Kafka refused for good, under poison policy \"dead-letter\").</p>");
    if letters.is_empty() {
        return Ok(ctx.page("Dead letters", &body));
    }
    if act {
        let _ = write!(
            body,
            "<p>{} · {}</p>",
            action("retry", "all", "Retry all"),
            action("drop", "all", "Drop all")
        );
    } else if ctx.writes {
        let _ = write!(
            body,
            "<p><a href=\"{}\">Log in</a> to retry or drop.</p>",
            ctx.href("/login")
        );
    }
    body.push_str(
        "<table id=\"dead-letters\"><tr><th>Sequence</th><th>Topic</th><th>Key</th><th>Attempts</th>\
         <th>Error</th><th>Dead for</th><th>Payload</th><th>Headers</th>",
    );
    body.push_str(if act {
        "<th>Actions</th></tr>"
    } else {
        "</tr>"
    });
    for preview in &letters {
        let letter = &preview.letter;
        let _ = write!(
            body,
            "<tr id=\"letter-{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>",
            letter.id,
            letter.id,
            text(&letter.topic),
            html::key(letter.key.as_deref(), letter.key_cut),
            letter.attempts,
            text(&letter.error),
            html::duration(letter.age),
            html::payload(preview.payload.as_deref(), preview.payload_size),
            preview
                .headers
                .as_deref()
                .map_or_else(|| "-".into(), |h| format!("<pre>{}</pre>", text(h))),
        );
        if act {
            let id = letter.id.to_string();
            let _ = write!(
                body,
                "<td>{} {}</td>",
                action("retry", &id, "Retry"),
                action("drop", &id, "Drop")
            );
        }
        body.push_str("</tr>");
    }
    body.push_str("</table>");
    if letters.len() as i64 == LIST_LIMIT {
        let _ = write!(body, "<p>The first {LIST_LIMIT} shown.</p>");
    }
    Ok(ctx.page("Dead letters", &body))
}

/// `retry` or `drop`, and one id or all: from a confirmation link or form.
fn dead_letter_action<'a>(
    ctx: &Ctx,
    action: &'a str,
    id: Option<&String>,
) -> Result<(&'a str, Option<i64>), Refusal> {
    if action != "retry" && action != "drop" {
        return Err(ctx.bad_input(&format!("unknown action {action:?}: retry or drop")));
    }
    let id = match id.map(|id| id.trim()) {
        None | Some("") => {
            return Err(ctx.bad_input("which dead letter? id is missing (a sequence, or \"all\")"))
        }
        Some("all") => None,
        Some(id) => Some(id.parse::<i64>().map_err(|_| {
            ctx.bad_input(&format!("id: {id:?} is not a sequence number (or \"all\")"))
        })?),
    };
    Ok((action, id))
}

async fn confirm_dead_letters(
    State(shared): State<Arc<Shared>>,
    ctx: Ctx,
    Query(query): Query<Fields>,
) -> Reply {
    let action = query.get("action").map_or("", String::as_str);
    let (action, id) = dead_letter_action(&ctx, action, query.get("id"))?;
    if !ctx.writes {
        return Err(ctx.fail(
            StatusCode::FORBIDDEN,
            "Write actions are disabled: this console is read-only (console.write).",
        ));
    }
    if ctx.session.is_none() {
        let login = format!("<a href=\"{}\">Log in</a> first.", ctx.href("/login"));
        return Err(ctx.fail(StatusCode::UNAUTHORIZED, &login));
    }
    let mut tx = begin(&shared, &ctx).await?;
    let db = |e| ctx.database(e);
    let what = match id {
        Some(id) => {
            let found = shared
                .admin
                .dead_letter_previews(&mut tx, Some(id), 1, PREVIEW_BYTES)
                .await
                .map_err(db)?;
            let Some(preview) = found.first() else {
                return Err(ctx.fail(StatusCode::NOT_FOUND, &format!("No dead letter {id}.")));
            };
            format!(
                "dead letter {id} (topic {}, key {}, error {})<br>{}",
                text(&preview.letter.topic),
                html::key(preview.letter.key.as_deref(), preview.letter.key_cut),
                text(&preview.letter.error),
                html::payload(preview.payload.as_deref(), preview.payload_size)
            )
        }
        None => format!(
            "all {} dead letters",
            shared
                .admin
                .backlog(&mut tx)
                .await
                .map_err(db)?
                .dead_letters
        ),
    };
    drop(tx);
    let (verb, effect) = match action {
        "retry" => ("Retry", "put back into the outbox with the original sequence, to be published again (fix the cause first)"),
        _ => ("Drop", "deleted for good"),
    };
    let body = format!(
        "<p>{what}</p><p>will be {effect}.</p>\
         <form method=\"post\" action=\"{}\" class=\"danger\">{}\
         <input type=\"hidden\" name=\"id\" value=\"{}\">\
         <p><input type=\"checkbox\" name=\"confirm\" value=\"yes\" id=\"confirm\" required> \
         <label for=\"confirm\">I confirm</label></p><button id=\"do\">{verb}</button></form>",
        ctx.href(&format!("/dead-letters/{action}")),
        ctx.layout().csrf_field(),
        id.map_or_else(|| "all".into(), |id| id.to_string()),
    );
    Ok(ctx.page(&format!("{verb} dead letters?"), &body))
}

fn confirmed(ctx: &Ctx, fields: &Fields) -> Result<(), Refusal> {
    match fields.get("confirm").map(String::as_str) {
        Some("yes") => Ok(()),
        _ => Err(ctx.bad_input("not confirmed: tick the confirmation box (confirm=yes)")),
    }
}

async fn act_on_dead_letters(
    State(shared): State<Arc<Shared>>,
    Path(action): Path<String>,
    ctx: Ctx,
    Form(fields): Form<Fields>,
) -> Reply {
    let who = ctx.authorize(&shared, &fields)?;
    let (action, id) = dead_letter_action(&ctx, &action, fields.get("id"))?;
    confirmed(&ctx, &fields)?;
    let mut tx = begin(&shared, &ctx).await?;
    let db = |e| ctx.database(e);
    let target = id.map_or_else(|| "all".into(), |id| id.to_string());
    let message = if action == "retry" {
        let requeued = shared
            .admin
            .requeue_dead_letters(&mut tx, id)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(|e| ctx.database(e))?;
        tracing::info!(%who, action = "retry dead letters", %target, count = requeued.len(), sequences = ?requeued, "console write");
        format!("Requeued {} dead letter(s) with their original sequences; the relay publishes them next.", requeued.len())
    } else {
        let dropped = shared
            .admin
            .drop_dead_letters(&mut tx, id)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(|e| ctx.database(e))?;
        tracing::info!(%who, action = "drop dead letters", %target, count = dropped, "console write");
        format!("Dropped {dropped} dead letter(s).")
    };
    let body = format!(
        "<p id=\"result\">{message}</p><p><a href=\"{}\">Back to the dead letters</a></p>",
        ctx.href("/dead-letters")
    );
    Ok(ctx.page("Done", &body))
}

const FILTER_FIELDS: [(&str, &str); 6] = [
    ("from_id", "From sequence"),
    ("to_id", "To sequence"),
    ("topic", "Topic"),
    ("key", "Key (UTF-8)"),
    ("since", "Created since"),
    ("until", "Created until"),
];

/// The filter the fields describe, and how many published messages it matches now.
async fn republish_matches(
    shared: &Shared,
    ctx: &Ctx,
    fields: &Fields,
) -> Result<(RepublishFilter, i64), Refusal> {
    let mut tx = begin(shared, ctx).await?;
    let filter = republish_filter(ctx, &shared.admin, &mut tx, fields).await?;
    let count = shared
        .admin
        .republish_count(&mut tx, &filter)
        .await
        .map_err(|e| ctx.database(e))?;
    Ok((filter, count))
}

/// The filter the fields describe; empty fields match everything.
async fn republish_filter(
    ctx: &Ctx,
    admin: &Admin,
    tx: &mut Transaction<'static, Postgres>,
    fields: &Fields,
) -> Result<RepublishFilter, Refusal> {
    // PostgreSQL's text cannot hold NUL: refused here, not by the database.
    if let Some((name, _)) = fields.iter().find(|(_, v)| v.contains('\0')) {
        return Err(ctx.bad_input(&format!("{name}: text with a NUL character")));
    }
    let field = |name: &str| fields.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());
    let id = |name: &str| {
        field(name)
            .map(|v| {
                v.parse::<i64>()
                    .map_err(|_| ctx.bad_input(&format!("{name}: {v:?} is not a sequence number")))
            })
            .transpose()
    };
    let mut filter = RepublishFilter::all()
        .ids(id("from_id")?, id("to_id")?)
        .created(
            field("since").map(Into::into),
            field("until").map(Into::into),
        );
    if let Some((name, value)) = admin
        .unreadable_time(tx, &filter)
        .await
        .map_err(|e| ctx.database(e))?
    {
        return Err(ctx.bad_input(&format!(
            "{name}: {value:?} is not a timestamp (e.g. 2026-11-28T10:00:00Z)"
        )));
    }
    if let Some(key) = field("key") {
        filter = filter.key(key);
    }
    if let Some(topic) = field("topic") {
        filter = filter.topic(topic);
    }
    Ok(filter)
}

fn filter_inputs(fields: &Fields, kind: &str) -> String {
    let mut out = String::new();
    for (name, label) in FILTER_FIELDS {
        let value = text(fields.get(name).map_or("", String::as_str));
        if kind == "hidden" {
            let _ = write!(
                out,
                "<input type=\"hidden\" name=\"{name}\" value=\"{value}\">"
            );
        } else {
            let _ = write!(
                out,
                "<p><label for=\"{name}\">{label}</label> <input name=\"{name}\" id=\"{name}\" value=\"{value}\"></p>"
            );
        }
    }
    out
}

async fn republish_preview(
    State(shared): State<Arc<Shared>>,
    ctx: Ctx,
    Query(fields): Query<Fields>,
) -> Reply {
    let mut body = format!(
        "<p>Publish already processed messages again, with their original sequences (needs \
         completion = \"keep\"). Empty fields match everything; times are PostgreSQL timestamps.</p>\
         <form method=\"get\" action=\"{}\">{}<input type=\"hidden\" name=\"preview\" value=\"1\">\
         <button id=\"preview\">Preview</button></form>",
        ctx.href("/republish"),
        filter_inputs(&fields, "text")
    );
    if fields.contains_key("preview") {
        let (_, count) = republish_matches(&shared, &ctx, &fields).await?;
        let _ = write!(
            body,
            "<h2>Preview</h2><p id=\"count\">{count} published messages match.</p>"
        );
        if count > 0 && ctx.session.is_some() {
            let _ = write!(
                body,
                "<form method=\"post\" action=\"{}\" class=\"danger\">{}{}\
                 <input type=\"hidden\" name=\"expected\" value=\"{count}\">\
                 <p><input type=\"checkbox\" name=\"confirm\" value=\"yes\" id=\"confirm\" required> \
                 <label for=\"confirm\">I confirm</label></p><button id=\"do\">Republish {count} messages</button></form>",
                ctx.href("/republish"),
                ctx.layout().csrf_field(),
                filter_inputs(&fields, "hidden")
            );
        } else if count > 0 && ctx.writes {
            let _ = write!(
                body,
                "<p><a href=\"{}\">Log in</a> to republish.</p>",
                ctx.href("/login")
            );
        }
    }
    Ok(ctx.page("Republish", &body))
}

async fn republish(
    State(shared): State<Arc<Shared>>,
    ctx: Ctx,
    Form(fields): Form<Fields>,
) -> Reply {
    let who = ctx.authorize(&shared, &fields)?;
    confirmed(&ctx, &fields)?;
    let (filter, count) = republish_matches(&shared, &ctx, &fields).await?;
    // What was confirmed is the preview's count: a filter that matches another number now (new
    // messages in a time window left open, say) is previewed again.
    let expected = fields.get("expected").map_or("", |v| v.trim());
    if expected != count.to_string() {
        let message = format!(
            "{count} published messages match now, not the {} previewed: <a href=\"{}\">preview again</a>.",
            text(expected),
            ctx.href("/republish")
        );
        return Err(ctx.fail(StatusCode::CONFLICT, &message));
    }
    tracing::info!(%who, action = "republish", filter = ?filter, count, "console write: republishing");
    // In a task of its own, without the pages' statement timeout: a browser that goes away (or
    // a proxy's timeout) does not stop it halfway, and its end is logged either way.
    let (pool, admin) = (shared.pool.clone(), shared.admin.clone());
    let task = tokio::spawn(async move {
        let mut done = 0;
        let result = match pool.acquire().await {
            Ok(mut conn) => {
                admin
                    .republish(&mut conn, &filter, REPUBLISH_BATCH, |d| done = d)
                    .await
            }
            Err(error) => Err(error.into()),
        };
        match &result {
            Ok(done) => {
                tracing::info!(%who, action = "republish", count = done, "console write: republished")
            }
            Err(error) => {
                tracing::warn!(%who, action = "republish", count = done, %error, "console write: republish failed; the messages counted were republished")
            }
        }
        result
    });
    let done = match task.await {
        Ok(result) => result.map_err(|e| ctx.database(e))?,
        Err(error) => return Err(ctx.database(error)),
    };
    let body = format!(
        "<p id=\"result\">Marked {done} messages for publishing again (original sequences kept); the relay sends them next.</p>"
    );
    Ok(ctx.page("Done", &body))
}

async fn login_form(ctx: Ctx) -> Reply {
    if !ctx.writes {
        return Err(ctx.fail(
            StatusCode::FORBIDDEN,
            "This console is read-only (console.write): there is nothing to log in to.",
        ));
    }
    Ok(ctx.page("Log in", &login_body(&ctx)))
}

fn login_body(ctx: &Ctx) -> String {
    format!(
        "<form method=\"post\" action=\"{}\"><p><label for=\"token\">Console token</label> \
         <input type=\"password\" name=\"token\" id=\"token\" autocomplete=\"current-password\" required></p>\
         <button id=\"login\">Log in</button></form>",
        ctx.href("/login")
    )
}

async fn login(State(shared): State<Arc<Shared>>, ctx: Ctx, Form(fields): Form<Fields>) -> Reply {
    let Some(writes) = &shared.writes else {
        return Err(ctx.fail(
            StatusCode::FORBIDDEN,
            "This console is read-only (console.write).",
        ));
    };
    // Login CSRF: another site must not log a browser into a session of its choosing.
    if let Some(why) = auth::cross_site(&ctx.headers) {
        return Err(ctx.fail(
            StatusCode::FORBIDDEN,
            &text(&format!(
                "Refused: the request comes from another site ({why})."
            )),
        ));
    }
    let given = fields.get("token").map_or("", String::as_str);
    if !writes.token.matches(given) {
        tracing::warn!(peer = %ctx.peer(), "console: refused a login with a wrong token");
        let body = format!("<p class=\"bad\">Wrong token.</p>{}", login_body(&ctx));
        let page = ctx.layout().page("Log in", &body);
        return Err(Refusal(Box::new(respond(StatusCode::UNAUTHORIZED, page))));
    }
    // The browser's previous session, if any, ends: one session per browser.
    writes.sessions.end(&ctx.headers);
    let (id, session) = writes.sessions.start();
    tracing::info!(peer = %ctx.peer(), session = %session.label, "console: logged in");
    let path = if ctx.base.is_empty() { "/" } else { &ctx.base };
    // Behind a proxy that terminates TLS, the cookie is for HTTPS only. (A client that sends the
    // header itself only makes its own cookie stricter.)
    let secure = match ctx.headers.get("x-forwarded-proto") {
        Some(proto) if proto.as_bytes().eq_ignore_ascii_case(b"https") => "; Secure",
        _ => "",
    };
    let cookie = format!(
        "{}={id}; Path={path}; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        auth::COOKIE_NAME,
        auth::SESSION_TTL.as_secs()
    );
    see_other(&ctx, cookie)
}

async fn logout(State(shared): State<Arc<Shared>>, ctx: Ctx, Form(fields): Form<Fields>) -> Reply {
    let who = ctx.authorize(&shared, &fields)?;
    if let Some(writes) = &shared.writes {
        writes.sessions.end(&ctx.headers);
    }
    tracing::info!(%who, "console: logged out");
    let path = if ctx.base.is_empty() { "/" } else { &ctx.base };
    see_other(
        &ctx,
        format!(
            "{}=; Path={path}; HttpOnly; SameSite=Strict; Max-Age=0",
            auth::COOKIE_NAME
        ),
    )
}

/// To the overview, setting `cookie`.
fn see_other(ctx: &Ctx, cookie: String) -> Reply {
    let mut response = StatusCode::SEE_OTHER.into_response();
    let headers = response.headers_mut();
    let location = ctx.layout().href("/");
    // The mount path comes from the router, the cookie's id is hex: both are header-safe.
    let value = |v: String| {
        HeaderValue::try_from(v)
            .map_err(|e| ctx.fail(StatusCode::INTERNAL_SERVER_ERROR, &text(&e.to_string())))
    };
    headers.insert(header::LOCATION, value(location)?);
    headers.insert(header::SET_COOKIE, value(cookie)?);
    Ok(response)
}
