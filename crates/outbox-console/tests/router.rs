//! The console's router against a real PostgreSQL (dev/up), each test in a schema of its own:
//! what it refuses, and that nothing from the database reaches a page unescaped.

use axum::body::Body;
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::Router;
use outbox::admin::Admin;
use outbox_console::{Console, Token};
use outbox_test_support::TestOutbox;
use tower::ServiceExt as _;

const TOKEN: &str = "test-token-0123456789";

fn console(outbox: &TestOutbox, writes: bool) -> Router {
    let console =
        Console::new(outbox.pool.clone(), Admin::new(&outbox.schema)).hosts(["console.test"]);
    let console = match writes {
        true => console.writes(Token::new(TOKEN).unwrap()),
        false => console,
    };
    outbox_console::router(console)
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

async fn send(app: &Router, request: Request<Body>) -> Reply {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), 10 << 20)
        .await
        .unwrap();
    Reply {
        status,
        headers,
        body: String::from_utf8(bytes.to_vec()).expect("pages are UTF-8"),
    }
}

fn get(uri: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut request = Request::get(uri);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(Body::empty()).unwrap()
}

fn post(uri: &str, form: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut request = Request::post(uri)
        .header(header::HOST, "console.test")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(Body::from(form.to_owned())).unwrap()
}

/// A dead letter with sequence `id`, inserted as the relay would have moved it.
async fn dead_letter(outbox: &TestOutbox, id: i64) {
    sqlx::query(&format!(
        "INSERT INTO {}.dead_letter (id, topic, key, payload, created_at, attempts, error)
         VALUES ($1, 'orders', 'k', 'payload', now(), 3, 'Message size too large')",
        outbox.schema
    ))
    .bind(id)
    .execute(&outbox.pool)
    .await
    .unwrap();
}

async fn count(outbox: &TestOutbox, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {}.{table}", outbox.schema))
        .fetch_one(&outbox.pool)
        .await
        .unwrap()
}

/// Logs in; returns the session cookie (`name=value`) and the session's CSRF token, read from
/// a confirmation page as a browser would.
async fn log_in(app: &Router) -> (String, String) {
    let login = send(app, post("/login", &format!("token={TOKEN}"), &[])).await;
    assert_eq!(login.status, StatusCode::SEE_OTHER, "{}", login.body);
    let set_cookie = login.headers[header::SET_COOKIE].to_str().unwrap();
    assert!(
        set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"),
        "{set_cookie}"
    );
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    let page = send(
        app,
        get(
            "/dead-letters/confirm?action=retry&id=all",
            &[("cookie", &cookie)],
        ),
    )
    .await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    let csrf = page
        .body
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the confirmation form carries a CSRF token")
        .to_owned();
    (cookie, csrf)
}

#[tokio::test]
async fn read_only_console_refuses_every_write_and_shows_no_action() {
    let outbox = TestOutbox::new().await;
    dead_letter(&outbox, 7).await;
    let app = console(&outbox, false);

    let page = send(&app, get("/dead-letters", &[])).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.body.contains("Message size too large"),
        "{}",
        page.body
    );
    for action in ["Retry", "Drop", "Log in"] {
        assert!(!page.body.contains(action), "{action}: {}", page.body);
    }
    let bearer = format!("Bearer {TOKEN}");
    for (uri, form) in [
        ("/dead-letters/retry", "id=7&confirm=yes"),
        ("/dead-letters/drop", "id=all&confirm=yes"),
        ("/republish", "confirm=yes"),
        ("/login", &format!("token={TOKEN}")),
    ] {
        let reply = send(&app, post(uri, form, &[("authorization", &bearer)])).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{uri}: {}", reply.body);
    }
    let confirm = send(&app, get("/dead-letters/confirm?action=drop&id=7", &[])).await;
    assert_eq!(confirm.status, StatusCode::FORBIDDEN);
    assert_eq!(count(&outbox, "dead_letter").await, 1);
    outbox.drop_schema().await;
}

#[tokio::test]
async fn writes_without_the_token_or_with_a_wrong_one_are_refused() {
    let outbox = TestOutbox::new().await;
    dead_letter(&outbox, 7).await;
    let app = console(&outbox, true);

    let form = "id=7&confirm=yes";
    let anonymous = send(&app, post("/dead-letters/retry", form, &[])).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    for wrong in ["Bearer test-token-012345678", "Bearer ", "Basic dGVzdA=="] {
        let reply = send(
            &app,
            post("/dead-letters/retry", form, &[("authorization", wrong)]),
        )
        .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{wrong}");
    }
    let wrong_login = send(&app, post("/login", "token=guess-guess-guess-guess", &[])).await;
    assert_eq!(wrong_login.status, StatusCode::UNAUTHORIZED);
    assert!(wrong_login.headers.get(header::SET_COOKIE).is_none());
    assert_eq!(
        count(&outbox, "dead_letter").await,
        1,
        "nothing was retried"
    );

    let bearer = format!("Bearer {TOKEN}");
    let unconfirmed = send(
        &app,
        post("/dead-letters/retry", "id=7", &[("authorization", &bearer)]),
    )
    .await;
    assert_eq!(unconfirmed.status, StatusCode::BAD_REQUEST);
    let retried = send(
        &app,
        post("/dead-letters/retry", form, &[("authorization", &bearer)]),
    )
    .await;
    assert_eq!(retried.status, StatusCode::OK, "{}", retried.body);
    assert!(
        retried.body.contains("Requeued 1 dead letter"),
        "{}",
        retried.body
    );
    assert_eq!(count(&outbox, "dead_letter").await, 0);
    assert_eq!(count(&outbox, "message").await, 1);
    outbox.drop_schema().await;
}

#[tokio::test]
async fn session_writes_need_the_sessions_csrf_token_and_this_sites_origin() {
    let outbox = TestOutbox::new().await;
    dead_letter(&outbox, 7).await;
    let app = console(&outbox, true);
    let (cookie, csrf) = log_in(&app).await;
    let (_, other_csrf) = log_in(&app).await;
    assert_ne!(csrf, other_csrf, "each session has its own CSRF token");

    let session = [("cookie", cookie.as_str())];
    for form in [
        "id=7&confirm=yes".to_owned(),
        "id=7&confirm=yes&csrf=".to_owned(),
        format!("id=7&confirm=yes&csrf={other_csrf}"),
    ] {
        let reply = send(&app, post("/dead-letters/drop", &form, &session)).await;
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{form}: {}",
            reply.body
        );
        assert!(reply.body.contains("CSRF"), "{}", reply.body);
    }
    let form = format!("id=7&confirm=yes&csrf={csrf}");
    for other_site in [
        [
            ("origin", "http://evil.test"),
            ("sec-fetch-site", "same-origin"),
        ],
        [
            ("origin", "http://console.test"),
            ("sec-fetch-site", "cross-site"),
        ],
    ] {
        let headers = [session[0], other_site[0], other_site[1]];
        let reply = send(&app, post("/dead-letters/drop", &form, &headers)).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{other_site:?}");
    }
    let cross_site_login = send(
        &app,
        post(
            "/login",
            &format!("token={TOKEN}"),
            &[("origin", "http://evil.test")],
        ),
    )
    .await;
    assert_eq!(cross_site_login.status, StatusCode::FORBIDDEN);
    assert_eq!(
        count(&outbox, "dead_letter").await,
        1,
        "nothing was dropped"
    );

    let same_site = [
        session[0],
        ("origin", "http://console.test"),
        ("sec-fetch-site", "same-origin"),
    ];
    let dropped = send(&app, post("/dead-letters/drop", &form, &same_site)).await;
    assert_eq!(dropped.status, StatusCode::OK, "{}", dropped.body);
    assert!(
        dropped.body.contains("Dropped 1 dead letter"),
        "{}",
        dropped.body
    );
    assert_eq!(count(&outbox, "dead_letter").await, 0);

    let logout = send(&app, post("/logout", &format!("csrf={csrf}"), &session)).await;
    assert_eq!(logout.status, StatusCode::SEE_OTHER);
    let after = send(&app, post("/dead-letters/drop", &form, &session)).await;
    assert_eq!(after.status, StatusCode::UNAUTHORIZED, "the session ended");
    outbox.drop_schema().await;
}

#[tokio::test]
async fn hostile_topics_keys_errors_and_payloads_come_out_escaped() {
    let outbox = TestOutbox::new().await;
    let schema = &outbox.schema;
    // Any SQL writer can store these (dead_letter and relay_lease have no topic rule).
    let script = "<script>alert(1)</script>\"'><img src=x onerror=alert(2)>\x1b[2J\u{202e}";
    sqlx::query(&format!(
        "INSERT INTO {schema}.dead_letter (id, topic, key, payload, headers, created_at, attempts, error)
         VALUES (1, $1, convert_to($1, 'UTF8'), convert_to($1, 'UTF8'), jsonb_build_array($1::text), now(), 1, $1),
                (2, 'binary', '\\xff3c7363726970743e'::bytea, '\\x00fe3c7363726970743e'::bytea, NULL, now(), 1, 'x')"
    ))
    .bind(script)
    .execute(&outbox.pool)
    .await
    .unwrap();
    for insert in [
        "INSERT INTO {schema}.message (topic, key, payload, attempts, last_error, retry_at)
         VALUES ('t', convert_to($1, 'UTF8'), 'x', 2, $1, now() + interval '1 hour')",
        "INSERT INTO {schema}.relay_lease (name, holder, token, acquired_at, renewed_at, expires_at)
         VALUES ($1, $1, 1, now(), now(), now() + interval '1 minute')",
    ] {
        sqlx::query(&insert.replace("{schema}", schema.as_str()))
            .bind(script)
            .execute(&outbox.pool)
            .await
            .unwrap();
    }
    let app = console(&outbox, true);
    let (cookie, _) = log_in(&app).await;

    for uri in [
        "/",
        "/blocked",
        "/dead-letters",
        "/dead-letters/confirm?action=retry&id=1",
        "/dead-letters/confirm?action=drop&id=1",
    ] {
        let page = send(&app, get(uri, &[("cookie", &cookie)])).await;
        assert_eq!(page.status, StatusCode::OK, "{uri}: {}", page.body);
        let lower = page.body.to_lowercase();
        assert!(
            !lower.contains("<script") && !lower.contains("<img"),
            "{uri}: {}",
            page.body
        );
        assert!(
            !page.body.contains(['\x1b', '\u{202e}']),
            "{uri}: {}",
            page.body
        );
        assert!(
            page.body.contains("&lt;script&gt;alert(1)"),
            "{uri}: {}",
            page.body
        );
        let csp = page.headers[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap();
        assert!(csp.contains("default-src 'none'"), "{csp}");
    }
    let letters = send(&app, get("/dead-letters", &[])).await.body;
    assert!(
        letters.contains("hex ff 3c 73"),
        "binary key as hex: {letters}"
    );
    assert!(
        letters.contains("hex 00 fe 3c"),
        "binary payload as hex: {letters}"
    );
    outbox.drop_schema().await;
}

#[tokio::test]
async fn payload_previews_are_cut_by_the_database() {
    let outbox = TestOutbox::new().await;
    sqlx::query(&format!(
        "INSERT INTO {}.dead_letter (id, topic, payload, created_at, attempts, error)
         VALUES (1, 't', convert_to(repeat('a', 100000), 'UTF8'), now(), 1, 'too large')",
        outbox.schema
    ))
    .execute(&outbox.pool)
    .await
    .unwrap();
    let page = send(&console(&outbox, false), get("/dead-letters", &[])).await;
    assert!(
        page.body.contains("(first 4096 of 100000 bytes)"),
        "{}",
        page.body
    );
    assert!(page.body.len() < 20_000, "{} bytes", page.body.len());
    outbox.drop_schema().await;
}

/// Keys and errors are cut by the database too: any SQL writer can store a key or an error of
/// megabytes, which the listings, and every page and `outbox status` built on them, read whole.
#[tokio::test]
async fn huge_keys_and_errors_are_cut_by_the_database() {
    use outbox::admin::{SHOWN_ERROR_CHARS, SHOWN_KEY_BYTES};
    let outbox = TestOutbox::new().await;
    let schema = &outbox.schema;
    for insert in [
        "INSERT INTO {schema}.message (topic, key, payload, attempts, last_error, retry_at)
         VALUES ('t', convert_to(repeat('k', 5000000), 'UTF8'), 'x', 2, repeat('é', 2000000),
                 now() + interval '1 hour')",
        "INSERT INTO {schema}.dead_letter (id, topic, key, payload, created_at, attempts, error)
         VALUES (1, 't', convert_to(repeat('k', 5000000), 'UTF8'), 'x', now(), 1,
                 repeat('é', 2000000)),
                (2, 't', convert_to(repeat('k', 1024), 'UTF8'), 'x', now(), 1, repeat('e', 4096))",
    ] {
        sqlx::query(&insert.replace("{schema}", schema.as_str()))
            .execute(&outbox.pool)
            .await
            .unwrap();
    }
    let admin = Admin::new(schema);
    let mut conn = outbox.pool.acquire().await.unwrap();
    let held = admin.held_keys(&mut conn, 10).await.unwrap();
    let cut_error = "é".repeat(SHOWN_ERROR_CHARS) + "…";
    assert_eq!(held[0].key.as_ref().unwrap().len(), SHOWN_KEY_BYTES);
    assert!(held[0].key_cut);
    assert_eq!(held[0].last_error.as_deref(), Some(cut_error.as_str()));
    let failure = admin.activity(&mut conn).await.unwrap().oldest_failure;
    assert_eq!(failure.unwrap().error, cut_error);
    let letters = admin.dead_letters(&mut conn, 10).await.unwrap();
    assert_eq!(letters[0].key.as_ref().unwrap().len(), SHOWN_KEY_BYTES);
    assert!(letters[0].key_cut);
    assert_eq!(letters[0].error, cut_error);
    // Exactly at the limits: whole, not flagged.
    assert_eq!(letters[1].key.as_ref().unwrap().len(), SHOWN_KEY_BYTES);
    assert!(!letters[1].key_cut);
    assert_eq!(letters[1].error, "e".repeat(SHOWN_ERROR_CHARS));
    drop(conn);

    let app = console(&outbox, false);
    for uri in ["/", "/blocked", "/dead-letters"] {
        let page = send(&app, get(uri, &[])).await;
        assert_eq!(page.status, StatusCode::OK, "{uri}");
        assert!(
            page.body.len() < 100_000,
            "{uri}: {} bytes",
            page.body.len()
        );
    }
    let blocked = send(&app, get("/blocked", &[])).await.body;
    assert!(blocked.contains("(cut)"), "{blocked}");
    outbox.drop_schema().await;
}
#[tokio::test]
async fn bad_input_is_a_400_naming_what_was_typed() {
    let outbox = TestOutbox::new().await;
    let app = console(&outbox, true);
    let bearer = format!("Bearer {TOKEN}");
    for (request, shown) in [
        (
            get("/republish?preview=1&from_id=12%3Cb%3E", &[]),
            "from_id: &quot;12&lt;b&gt;&quot; is not a sequence number",
        ),
        (
            get("/republish?preview=1&since=last+tuesday", &[]),
            "since: &quot;last tuesday&quot; is not a timestamp",
        ),
        (
            get("/republish?preview=1&topic=or%00ders", &[]),
            "topic: text with a NUL character",
        ),
        (
            post(
                "/dead-letters/retry",
                "id=seven&confirm=yes",
                &[("authorization", &bearer)],
            ),
            "id: &quot;seven&quot; is not a sequence number",
        ),
        (
            post(
                "/dead-letters/explode",
                "id=1&confirm=yes",
                &[("authorization", &bearer)],
            ),
            "unknown action &quot;explode&quot;",
        ),
        (
            get(
                "/dead-letters/confirm?action=retry&id=99999999999999999999",
                &[],
            ),
            "is not a sequence number",
        ),
    ] {
        let uri = request.uri().to_string();
        let reply = send(&app, request).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{uri}: {}",
            reply.body
        );
        assert!(reply.body.contains(shown), "{uri}: {}", reply.body);
    }
    outbox.drop_schema().await;
}

#[tokio::test]
async fn republish_previews_the_count_then_moves_the_matching_messages() {
    let outbox = TestOutbox::new().await;
    sqlx::query(&format!(
        "INSERT INTO {}.published (id, topic, key, payload, created_at, processed_at, attempts)
         SELECT n, 'orders', convert_to('k' || (n % 2), 'UTF8'), 'p', now(), now(), 1
           FROM generate_series(1, 6) AS n",
        outbox.schema
    ))
    .execute(&outbox.pool)
    .await
    .unwrap();
    let app = console(&outbox, true);
    let preview = send(&app, get("/republish?preview=1&key=k1&to_id=5", &[])).await;
    assert!(
        preview.body.contains("3 published messages match"),
        "{}",
        preview.body
    );
    let overview = send(&app, get("/", &[])).await;
    assert!(
        overview.body.contains("max 6"),
        "the chart counts them: {}",
        overview.body
    );

    let bearer = format!("Bearer {TOKEN}");
    // Confirmed for another count than the filter matches now: previewed again, nothing moved.
    let stale = send(
        &app,
        post(
            "/republish",
            "key=k1&to_id=5&from_id=&confirm=yes&expected=2",
            &[("authorization", &bearer)],
        ),
    )
    .await;
    assert_eq!(stale.status, StatusCode::CONFLICT, "{}", stale.body);
    assert!(
        stale.body.contains("3 published messages match now"),
        "{}",
        stale.body
    );
    assert_eq!(count(&outbox, "message").await, 0);
    let done = send(
        &app,
        post(
            "/republish",
            "key=k1&to_id=5&from_id=&confirm=yes&expected=3",
            &[("authorization", &bearer)],
        ),
    )
    .await;
    assert!(done.body.contains("Marked 3 messages"), "{}", done.body);
    let ids: Vec<i64> = sqlx::query_scalar(&format!(
        "SELECT id FROM {}.message ORDER BY id",
        outbox.schema
    ))
    .fetch_all(&outbox.pool)
    .await
    .unwrap();
    assert_eq!(ids, [1, 3, 5]);
    outbox.drop_schema().await;
}

#[tokio::test]
async fn links_follow_where_the_console_is_nested() {
    let outbox = TestOutbox::new().await;
    let app = Router::new().nest("/ops/outbox", console(&outbox, true));
    let page = send(&app, get("/ops/outbox/blocked", &[])).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.body.contains("href=\"/ops/outbox/dead-letters\"")
            && page.body.contains("href=\"/ops/outbox/login\""),
        "{}",
        page.body
    );
    let login = send(
        &app,
        post("/ops/outbox/login", &format!("token={TOKEN}"), &[]),
    )
    .await;
    let cookie = login.headers[header::SET_COOKIE].to_str().unwrap();
    assert!(cookie.contains("Path=/ops/outbox;"), "{cookie}");
    outbox.drop_schema().await;
}

/// An authenticating proxy's own credentials (Basic, sent by the browser on every request) are
/// not a wrong console token: the session decides.
#[tokio::test]
async fn a_proxys_basic_credentials_leave_the_session_to_decide() {
    let outbox = TestOutbox::new().await;
    dead_letter(&outbox, 7).await;
    let app = console(&outbox, true);
    let (cookie, csrf) = log_in(&app).await;
    let headers = [
        ("cookie", cookie.as_str()),
        ("authorization", "Basic b3BlcmF0b3I6cGFzc3dvcmQ="),
        ("origin", "http://console.test"),
    ];
    let form = format!("id=7&confirm=yes&csrf={csrf}");
    let dropped = send(&app, post("/dead-letters/drop", &form, &headers)).await;
    assert_eq!(dropped.status, StatusCode::OK, "{}", dropped.body);
    assert_eq!(count(&outbox, "dead_letter").await, 0);
    outbox.drop_schema().await;
}

/// A page of another site whose name was rebound to the console's address reaches it with its
/// own name as `Host`: refused, reads included. Another site may link to a page, not fetch it.
#[tokio::test]
async fn pages_answer_only_their_own_host_and_other_sites_links() {
    let outbox = TestOutbox::new().await;
    dead_letter(&outbox, 7).await;
    let app = console(&outbox, false);
    for host in [
        "127.0.0.1:9091",
        "[::1]:9091",
        "localhost:9091",
        "console.test",
    ] {
        let page = send(&app, get("/dead-letters", &[("host", host)])).await;
        assert_eq!(page.status, StatusCode::OK, "{host}");
    }
    let rebound = send(
        &app,
        get("/dead-letters", &[("host", "attacker.example:9091")]),
    )
    .await;
    assert_eq!(rebound.status, StatusCode::FORBIDDEN);
    assert!(
        !rebound.body.contains("Message size too large"),
        "{}",
        rebound.body
    );
    let fetched = get(
        "/republish?preview=1",
        &[
            ("sec-fetch-site", "cross-site"),
            ("sec-fetch-mode", "no-cors"),
        ],
    );
    assert_eq!(send(&app, fetched).await.status, StatusCode::FORBIDDEN);
    let linked = get(
        "/dead-letters",
        &[
            ("sec-fetch-site", "cross-site"),
            ("sec-fetch-mode", "navigate"),
        ],
    );
    assert_eq!(send(&app, linked).await.status, StatusCode::OK);
    outbox.drop_schema().await;
}

/// Rows written by hand with times PostgreSQL cannot subtract (`infinity`) still show.
#[tokio::test]
async fn infinite_times_written_by_hand_do_not_break_a_page() {
    let outbox = TestOutbox::new().await;
    sqlx::raw_sql(&format!(
        "INSERT INTO {0}.message (topic, key, payload, attempts, last_error, retry_at)
         VALUES ('orders', 'k', 'p', 1, 'failed', 'infinity');
         INSERT INTO {0}.dead_letter (id, topic, key, payload, created_at, attempts, error, dead_at)
         VALUES (9, 'orders', 'k', 'p', now(), 3, 'refused', '-infinity')",
        outbox.schema
    ))
    .execute(&outbox.pool)
    .await
    .unwrap();
    let app = console(&outbox, false);
    for page in ["/blocked", "/dead-letters", "/"] {
        let reply = send(&app, get(page, &[])).await;
        assert_eq!(reply.status, StatusCode::OK, "{page}: {}", reply.body);
    }
    outbox.drop_schema().await;
}

/// A new login ends the browser's previous session; behind a TLS-terminating proxy the cookie is
/// for HTTPS only.
#[tokio::test]
async fn a_new_login_ends_the_previous_session_and_https_cookies_are_secure() {
    let outbox = TestOutbox::new().await;
    dead_letter(&outbox, 7).await;
    let app = console(&outbox, true);
    let (cookie, csrf) = log_in(&app).await;
    let again = send(
        &app,
        post(
            "/login",
            &format!("token={TOKEN}"),
            &[("cookie", cookie.as_str()), ("x-forwarded-proto", "https")],
        ),
    )
    .await;
    assert_eq!(again.status, StatusCode::SEE_OTHER, "{}", again.body);
    let set_cookie = again.headers[header::SET_COOKIE].to_str().unwrap();
    assert!(set_cookie.contains("; Secure"), "{set_cookie}");
    let form = format!("id=7&confirm=yes&csrf={csrf}");
    let old = send(
        &app,
        post("/dead-letters/drop", &form, &[("cookie", cookie.as_str())]),
    )
    .await;
    assert_eq!(
        old.status,
        StatusCode::UNAUTHORIZED,
        "the old session ended"
    );
    assert_eq!(count(&outbox, "dead_letter").await, 1);
    outbox.drop_schema().await;
}
