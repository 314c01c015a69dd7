//! Retention cleanup: the leader deletes processed rows older than the retention, in bounded
//! batches so that no statement holds many row locks or runs long.

use std::sync::Arc;
use std::time::Duration;

use outbox::postgres::Statements;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::lease::Term;

/// Deletes processed rows older than `retention`, `batch_size` at a time, while `term` holds.
/// Returns how many rows were deleted.
pub(crate) async fn run_once(
    pool: &PgPool,
    statements: &Statements,
    term: &Term,
    retention: Duration,
    batch_size: usize,
) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    loop {
        if !term.valid_for(Duration::ZERO) {
            return Ok(total);
        }
        let mut conn = pool.acquire().await?;
        let deleted = statements
            .cleanup(&mut conn, retention, batch_size as i64, &term.fence)
            .await?;
        total += deleted;
        if deleted < batch_size as u64 {
            return Ok(total);
        }
    }
}

pub(crate) async fn run_periodically(
    pool: PgPool,
    statements: Arc<Statements>,
    mut term: watch::Receiver<Option<Term>>,
    retention: Duration,
    interval: Duration,
    batch_size: usize,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let current = term.borrow_and_update().clone();
        let Some(current) = current else { continue };
        match run_once(&pool, &statements, &current, retention, batch_size).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "retention cleanup removed processed messages"),
            Err(error) => {
                tracing::warn!(%error, "retention cleanup failed; retrying next interval")
            }
        }
    }
}
