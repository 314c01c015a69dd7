//! Retention cleanup: deletes processed rows older than the retention, in bounded batches so
//! that no statement holds many row locks or runs long. The leader runs it periodically; the
//! `outbox cleanup` command runs it on demand.

use std::sync::Arc;
use std::time::Duration;

use outbox::admin::Admin;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::lease::Term;
use crate::metrics as m;

/// Deletes processed rows older than `retention`, `batch_size` per statement (at least one),
/// until none are left; calls `progress` with the running total after each batch. Returns the
/// total.
pub async fn run_once(
    pool: &PgPool,
    admin: &Admin,
    retention: Duration,
    batch_size: usize,
    mut progress: impl FnMut(u64),
) -> Result<u64, outbox::Error> {
    // A batch of 0 would delete nothing and never finish.
    let batch_size = batch_size.clamp(1, i64::MAX as usize);
    let mut total = 0;
    loop {
        // A transaction per batch: the same behind a pooler in transaction mode.
        let mut tx = pool.begin().await?;
        let deleted = admin.cleanup(&mut tx, retention, batch_size as i64).await?;
        tx.commit().await?;
        total += deleted;
        progress(total);
        if deleted < batch_size as u64 {
            m::cleanup(total);
            return Ok(total);
        }
    }
}

pub(crate) async fn run_periodically(
    pool: PgPool,
    admin: Arc<Admin>,
    term: watch::Receiver<Option<Term>>,
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
        let leader = term
            .borrow()
            .as_ref()
            .is_some_and(|t| t.valid_for(Duration::ZERO));
        if !leader {
            continue;
        }
        match run_once(&pool, &admin, retention, batch_size, |_| {}).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "retention cleanup removed processed messages"),
            Err(error) => {
                tracing::warn!(%error, "retention cleanup failed; retrying next interval")
            }
        }
    }
}
