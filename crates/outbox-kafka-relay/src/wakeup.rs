//! Wake-ups: LISTEN on the schema's channel, so a commit that inserted messages wakes the
//! relay at once, and standbys learn of a released lease. Notifications are lost while the
//! listening connection is down, so the pipeline also polls (`poll_interval`), and every
//! reconnect counts as a wake-up.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Where notifications are forwarded. `Notify` keeps one permit, so a notification that arrives
/// while the pipeline is busy is not lost.
#[derive(Default)]
pub(crate) struct Wakeups {
    pub(crate) messages: Notify,
    pub(crate) lease_released: Arc<Notify>,
}

pub(crate) async fn listen(
    pool: PgPool,
    channel: String,
    wakeups: Arc<Wakeups>,
    cancel: CancellationToken,
) {
    let mut listener: Option<PgListener> = None;
    while !cancel.is_cancelled() {
        let active = match listener.as_mut() {
            Some(active) => active,
            None => match connect(&pool, &channel).await {
                Ok(new) => {
                    // Anything may have been committed while we were not listening.
                    wakeups.messages.notify_one();
                    listener.insert(new)
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot LISTEN for new messages; relying on polling");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            },
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            received = active.try_recv() => match received {
                Ok(Some(notification)) if notification.payload() == "lease-released" => {
                    wakeups.lease_released.notify_one();
                }
                Ok(Some(_)) => wakeups.messages.notify_one(),
                // The connection was lost; sqlx reconnects on the next call.
                Ok(None) => wakeups.messages.notify_one(),
                Err(error) => {
                    tracing::warn!(%error, "LISTEN connection failed; reconnecting");
                    listener = None;
                }
            },
        }
    }
}

async fn connect(pool: &PgPool, channel: &str) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(channel).await?;
    Ok(listener)
}
