//! Connection poolers between the service and PostgreSQL (PgBouncer).
//!
//! A pooler in **session** mode gives each client a server connection from connect to close:
//! everything works as on a direct connection. A pooler in **transaction** mode (PgBouncer's
//! `pool_mode = transaction`) hands each transaction to any of its server connections, and a
//! server connection passes from client to client. Session state does not follow the client:
//! prepared statements, session settings, LISTEN.
//!
//! sqlx caches every statement as a named prepared statement (`sqlx_s_1`, `sqlx_s_2`, ... on
//! each connection). Through a pooler in transaction mode a client's cached statement is then
//! missing, or taken by another client's statement of the same name: most writes fail
//! ([`crate::Error::TransactionPooler`]), and some run **another client's statement** with
//! the writer's parameters (measured through PgBouncer 1.18: an insert that ran against a
//! table of another schema). Hence:
//!
//! - writers set [`crate::OutboxConfig::transaction_pooling`] (and the service sends its own
//!   statements unnamed, with sqlx's `.persistent(false)`), and may call
//!   [`crate::Outbox::check_connection`] at startup, which fails when the pool goes through
//!   such a pooler and the setting is off;
//! - the relay needs sessions of its own, so connect it directly or through a pool in session
//!   mode (with PgBouncer's default `server_reset_query = DISCARD ALL`, which clears a session's
//!   statements and settings before the next client gets its server connection); it refuses a
//!   pooler in transaction mode ([`transaction_pooled`]). The check needs two connections
//!   beyond the relay's own eight.

use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection as _, Executor as _, PgConnection, Row as _};

/// Whether connections made with `options` share server sessions between transactions: a
/// pooler in transaction mode. (In statement mode a transaction fails: that is an error here.)
///
/// Two connections, A and B: A asks for its backend's pid, B asks for its own inside a
/// transaction (which pins B's server connection), A asks again. A direct connection
/// or a session-mode pool keeps each on a backend of its own: A's pid never changes and is
/// never B's, so `true` is certain. A pooler in transaction mode gives B the server connection
/// A just released (PgBouncer reuses the most recent one), or moves A; it is missed when other
/// clients keep taking that server connection in between, hence three rounds, or when A and B
/// land on different poolers behind a load balancer (then too, the check can miss). Only
/// simple-protocol queries: nothing prepared, nothing left on a server connection. Gives up
/// after ten seconds (a pooler whose pool is exhausted queues the connections).
pub async fn transaction_pooled(options: &PgConnectOptions) -> Result<bool, sqlx::Error> {
    const LIMIT: Duration = Duration::from_secs(10);
    match tokio::time::timeout(LIMIT, probe(options)).await {
        Ok(result) => result,
        Err(_) => Err(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the check for a pooler in transaction mode got no connection within 10 s",
        ))),
    }
}

async fn probe(options: &PgConnectOptions) -> Result<bool, sqlx::Error> {
    async fn pid(conn: &mut PgConnection) -> Result<i32, sqlx::Error> {
        conn.fetch_one("SELECT pg_backend_pid()").await?.try_get(0)
    }
    // Two connections for all rounds: each new one costs an authentication (SCRAM's key
    // derivation), and the relay checks before its first session while messages wait.
    let mut a = PgConnection::connect_with(options).await?;
    let mut b = PgConnection::connect_with(options).await?;
    let mut shared = false;
    for _ in 0..3 {
        let first = pid(&mut a).await?;
        b.execute("BEGIN").await?;
        let other = pid(&mut b).await?;
        let again = pid(&mut a).await?;
        b.execute("ROLLBACK").await?;
        if other == first || again != first {
            shared = true;
            break;
        }
    }
    a.close().await?;
    b.close().await?;
    Ok(shared)
}
