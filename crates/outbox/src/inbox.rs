//! The inbox: effectively-once processing for consumers whose effects live in this database.
//!
//! Kafka delivers at least once: a relay may publish a message twice, and a consumer may see a
//! record again after a crash or rebalance. A consumer that, **in one database transaction**,
//! records the message's (`x-source`, `x-sequence`) with [`Inbox::try_record`], applies its
//! effects only if the message is new, and commits *before* committing the Kafka offset,
//! applies every message exactly once: a redelivery finds the inbox row and is skipped; a crash
//! before the commit leaves neither the row nor the effects, and the uncommitted offset brings
//! the message back. Two consumers racing on one message serialize on the inbox's primary key,
//! and the second sees it as already recorded.
//!
//! This holds for effects in the same database only. Effects elsewhere (an e-mail, another
//! service) need their own idempotency.

use std::sync::Arc;

use sqlx::{PgPool, Postgres, Transaction};

use crate::error::Error;
use crate::migrate::MigrationReport;
use crate::schema::SchemaName;
use crate::writer::Sequence;

/// Records processed messages, in the table `inbox` of an outbox schema.
#[derive(Debug, Clone)]
pub struct Inbox {
    schema: SchemaName,
    record: Arc<str>,
    /// See [`Inbox::transaction_pooling`].
    persistent: bool,
}

// Waits on a concurrent insert of the same key until that transaction ends, so two consumers
// racing on one message cannot both see it as new.
const RECORD: &str = "INSERT INTO {schema}.inbox (source, sequence) VALUES ($1, $2)
 ON CONFLICT DO NOTHING";

impl Inbox {
    /// An inbox in `schema`; create it with [`Inbox::migrate`].
    pub fn new(schema: SchemaName) -> Self {
        Inbox {
            record: RECORD.replace("{schema}", schema.as_str()).into(),
            schema,
            persistent: true,
        }
    }

    /// For consumers that reach PostgreSQL through a pooler in transaction mode: the inbox's
    /// statement is sent unnamed, as with [`crate::OutboxConfig::transaction_pooling`].
    pub fn transaction_pooling(mut self, enabled: bool) -> Self {
        self.persistent = !enabled;
        self
    }

    /// Creates or upgrades the schema that holds the inbox, so that a service that only
    /// consumes sets up its inbox without an [`crate::Outbox`]. The inbox is part of the outbox
    /// schema: this runs the same migrations as [`crate::Outbox::migrate`] (idempotent, safe to
    /// run from many instances at once, and against an outbox migrating the same schema), so
    /// the schema also gets the outbox's tables, unused until something writes to them.
    pub async fn migrate(&self, pool: &PgPool) -> Result<MigrationReport, Error> {
        crate::migrate::run(&self.schema, pool).await
    }

    /// Records the message as processed within `tx`; returns `true` if it is new, `false` if it
    /// was processed before (skip it). Blocks while another transaction holds the same message,
    /// then answers according to whether that one committed.
    pub async fn try_record(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        source: &str,
        sequence: Sequence,
    ) -> Result<bool, Error> {
        let result = sqlx::query(&self.record)
            .bind(source)
            .bind(sequence)
            .persistent(self.persistent)
            .execute(&mut **tx)
            .await?;
        Ok(result.rows_affected() == 1)
    }
}
