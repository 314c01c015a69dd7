//! Migrations against the real PostgreSQL started by `dev/up`: the baseline and the incremental
//! migrations build the same schema, upgrades keep what the schema holds, checksums refuse an
//! edited migration, and the inbox migrates on its own.

use outbox::migrate::{BASELINE_VERSION, MIGRATIONS, SCHEMA_VERSION};
use outbox::{Error, Inbox, Message, SchemaName};
use outbox_test_support::TestOutbox;
use sqlx::PgPool;

/// Everything a migration can make in `schema`, one line per fact, with the schema's name
/// replaced by `{schema}` so that two schemas compare: relations with their options, columns
/// with type, nullability, default, identity and collation (in column order, dropped ones left
/// out), sequences, constraints, indexes, functions, triggers and comments.
async fn catalog(pool: &PgPool, schema: &SchemaName) -> Vec<String> {
    const QUERIES: &[&str] = &[
        "SELECT format('relation %s: kind %s, persistence %s, options %s, owner %s, acl %s',
                       c.relname, c.relkind, c.relpersistence, c.reloptions, c.relowner::regrole,
                       c.relacl)
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = $1 ORDER BY c.relname",
        "SELECT format('column %s.%s: %s, not null %s, default %s, identity %s, generated %s, collation %s',
                       c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                       pg_get_expr(d.adbin, d.adrelid), a.attidentity, a.attgenerated,
                       (SELECT collname FROM pg_collation WHERE oid = a.attcollation))
           FROM pg_attribute a
           JOIN pg_class c ON c.oid = a.attrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
           LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
          WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
            AND a.attnum > 0 AND NOT a.attisdropped
          ORDER BY c.relname, a.attnum",
        "SELECT format('sequence %s: %s, start %s, increment %s, min %s, max %s, cache %s, cycle %s',
                       c.relname, format_type(s.seqtypid, NULL), s.seqstart, s.seqincrement,
                       s.seqmin, s.seqmax, s.seqcache, s.seqcycle)
           FROM pg_sequence s
           JOIN pg_class c ON c.oid = s.seqrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = $1 ORDER BY c.relname",
        "SELECT format('constraint %s on %s: %s, deferrable %s, validated %s',
                       con.conname, c.relname, pg_get_constraintdef(con.oid), con.condeferrable,
                       con.convalidated)
           FROM pg_constraint con
           JOIN pg_class c ON c.oid = con.conrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = $1 ORDER BY c.relname, con.conname",
        "SELECT format('domain %s over %s, not null %s: constraint %s %s',
                       t.typname, format_type(t.typbasetype, t.typtypmod), t.typnotnull,
                       con.conname, pg_get_constraintdef(con.oid))
           FROM pg_type t
           JOIN pg_namespace n ON n.oid = t.typnamespace
           LEFT JOIN pg_constraint con ON con.contypid = t.oid
          WHERE n.nspname = $1 AND t.typtype = 'd' ORDER BY t.typname, con.conname",
        "SELECT format('index %s: %s', c.relname, pg_get_indexdef(i.indexrelid))
           FROM pg_index i
           JOIN pg_class c ON c.oid = i.indexrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = $1 ORDER BY c.relname",
        "SELECT format('function %s(%s): %s', p.proname, pg_get_function_identity_arguments(p.oid),
                       pg_get_functiondef(p.oid))
           FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
          WHERE n.nspname = $1
          ORDER BY p.proname, pg_get_function_identity_arguments(p.oid)",
        "SELECT format('trigger %s on %s: %s, enabled %s',
                       t.tgname, c.relname, pg_get_triggerdef(t.oid), t.tgenabled)
           FROM pg_trigger t
           JOIN pg_class c ON c.oid = t.tgrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = $1 AND NOT t.tgisinternal ORDER BY c.relname, t.tgname",
        "SELECT format('comment on %s: %s', pg_describe_object(d.classoid, d.objoid, d.objsubid),
                       d.description)
           FROM pg_description d
          WHERE (d.classoid = 'pg_class'::regclass AND d.objoid IN (
                    SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname = $1))
             OR (d.classoid = 'pg_proc'::regclass AND d.objoid IN (
                    SELECT p.oid FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                     WHERE n.nspname = $1))
             OR (d.classoid = 'pg_constraint'::regclass AND d.objoid IN (
                    SELECT con.oid FROM pg_constraint con
                      JOIN pg_namespace n ON n.oid = con.connamespace WHERE n.nspname = $1))
             OR (d.classoid = 'pg_trigger'::regclass AND d.objoid IN (
                    SELECT t.oid FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
                      JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1))
             OR (d.classoid = 'pg_namespace'::regclass AND d.objoid = (
                    SELECT oid FROM pg_namespace WHERE nspname = $1))
          ORDER BY 1",
    ];
    let mut lines = Vec::new();
    for query in QUERIES {
        let rows: Vec<String> = sqlx::query_scalar(query)
            .bind(schema.as_str())
            .fetch_all(pool)
            .await
            .unwrap_or_else(|e| panic!("{e}: {query}"));
        lines.extend(
            rows.into_iter()
                .map(|line| line.replace(schema.as_str(), "{schema}")),
        );
    }
    lines
}

/// The `schema_version` rows: version and checksum.
async fn versions(outbox: &TestOutbox) -> Vec<(i32, Option<String>)> {
    sqlx::query_as(&format!(
        "SELECT version, checksum FROM {}.schema_version ORDER BY version",
        outbox.schema
    ))
    .fetch_all(&outbox.pool)
    .await
    .unwrap()
}

fn checksum_of(version: i32) -> Option<String> {
    MIGRATIONS
        .iter()
        .find(|m| m.version == version)
        .map(|m| m.checksum())
}

#[tokio::test]
async fn a_new_schema_is_created_from_the_baseline_at_the_current_version() {
    let outbox = TestOutbox::unmigrated().await;
    let report = outbox.outbox.migrate(&outbox.pool).await.unwrap();
    assert_eq!(report.previous_version, 0);
    assert_eq!(report.applied, [BASELINE_VERSION], "{report}");
    assert_eq!(report.current_version(), SCHEMA_VERSION);
    assert_eq!(
        report.to_string(),
        format!(
            "schema {} created at version {}",
            outbox.schema, SCHEMA_VERSION
        )
    );
    assert_eq!(
        versions(&outbox).await,
        [(BASELINE_VERSION, checksum_of(BASELINE_VERSION))],
        "one row, with the checksum of the migration of the baseline's version"
    );
    let again = outbox.outbox.migrate(&outbox.pool).await.unwrap();
    assert!(again.applied.is_empty(), "{again}");
    outbox.drop_schema().await;
}

/// From every earlier version, the incremental migrations lead to the schema the baseline
/// creates, and record a checksum for every migration.
#[tokio::test]
async fn the_baseline_builds_the_schema_the_migrations_build() {
    let baseline = TestOutbox::new().await;
    let expected = catalog(&baseline.pool, &baseline.schema).await;
    assert!(
        expected
            .iter()
            .any(|line| line.starts_with("function enqueue_all(")),
        "the catalog reads functions: {expected:#?}"
    );
    for version in 1..SCHEMA_VERSION {
        let upgraded = TestOutbox::at_version(version).await;
        let report = upgraded.outbox.migrate(&upgraded.pool).await.unwrap();
        assert_eq!(report.previous_version, version);
        assert_eq!(
            report.applied,
            (version + 1..=SCHEMA_VERSION).collect::<Vec<_>>()
        );
        assert_eq!(
            catalog(&upgraded.pool, &upgraded.schema).await,
            expected,
            "the schema upgraded from version {version} differs from the baseline's"
        );
        let recorded = versions(&upgraded).await;
        let all: Vec<_> = (1..=SCHEMA_VERSION).map(|v| (v, checksum_of(v))).collect();
        assert_eq!(recorded, all, "every migration carries its checksum");
        upgraded.drop_schema().await;
    }
    baseline.drop_schema().await;
}

/// Since migration 0005 every row of `message` is pending (published rows move to `published`),
/// yet the claim, the backlog and the held-key lookups still filtered on `processed_at IS NULL`:
/// a raw INSERT that set it stored a message that no relay would publish and no status counted.
#[tokio::test]
async fn a_writer_cannot_hide_a_message_from_the_relay_with_processed_at() {
    let outbox = TestOutbox::new().await;
    let refused = sqlx::query(&format!(
        "INSERT INTO {}.message (topic, payload, processed_at) VALUES ('t', 'x', now())",
        outbox.schema
    ))
    .execute(&outbox.pool)
    .await
    .expect_err("message.processed_at is gone");
    assert_eq!(
        refused
            .as_database_error()
            .and_then(|e| e.code())
            .as_deref(),
        Some("42703"),
        "undefined column: {refused}"
    );
    outbox.drop_schema().await;
}

/// A relay built before version 5 marks published messages with `processed_at` instead of
/// moving them; the upgrade that drops the column moves what it marked to `published` (it was
/// published) and keeps the rest pending.
#[tokio::test]
async fn the_upgrade_moves_messages_marked_processed_to_published() {
    let outbox = TestOutbox::at_version(13).await;
    let ids: Vec<i64> = sqlx::query_scalar(&format!(
        "INSERT INTO {}.message (topic, payload, processed_at)
         VALUES ('t', 'published by an old relay', now() - interval '1 hour'), ('t', 'pending', NULL)
         RETURNING id",
        outbox.schema
    ))
    .fetch_all(&outbox.pool)
    .await
    .unwrap();
    outbox.outbox.migrate(&outbox.pool).await.unwrap();

    let pending: Vec<i64> =
        sqlx::query_scalar(&format!("SELECT id FROM {}.message", outbox.schema))
            .fetch_all(&outbox.pool)
            .await
            .unwrap();
    assert_eq!(pending, [ids[1]]);
    let (id, payload, processed_an_hour_ago): (i64, Vec<u8>, bool) = sqlx::query_as(&format!(
        "SELECT id, payload, processed_at < now() - interval '59 minutes' FROM {}.published",
        outbox.schema
    ))
    .fetch_one(&outbox.pool)
    .await
    .unwrap();
    assert_eq!(
        (id, payload.as_slice(), processed_an_hour_ago),
        (ids[0], &b"published by an old relay"[..], true)
    );
    outbox.drop_schema().await;
}

/// A checksum that differs from this build's copy of its migration (as after editing a
/// migration that had run) is refused with an error naming the migration, before anything
/// changes; so is a missing one.
#[tokio::test]
async fn an_edited_migration_is_refused_and_nothing_changes() {
    let created = TestOutbox::new().await;
    let upgraded = TestOutbox::at_version(12).await;
    upgraded.outbox.migrate(&upgraded.pool).await.unwrap();
    for (outbox, version, checksum, file) in [
        (
            &created,
            BASELINE_VERSION,
            Some("edited"),
            MIGRATIONS[BASELINE_VERSION as usize - 1].file,
        ),
        (&upgraded, 3, Some("edited"), "0003_poison.sql"),
        (&upgraded, 13, None, "0013_cheaper_enqueue.sql"),
    ] {
        sqlx::query(&format!(
            "UPDATE {}.schema_version SET checksum = $2 WHERE version = $1",
            outbox.schema
        ))
        .bind(version)
        .bind(checksum)
        .execute(&outbox.pool)
        .await
        .unwrap();
        let before = (
            catalog(&outbox.pool, &outbox.schema).await,
            versions(outbox).await,
        );

        let error = outbox.outbox.migrate(&outbox.pool).await.unwrap_err();
        let Error::MigrationChanged {
            version: refused,
            file: named,
            ref recorded,
            ref embedded,
            ..
        } = error
        else {
            panic!("expected MigrationChanged, got {error}");
        };
        assert_eq!((refused, named), (version, file), "{error}");
        assert_eq!(recorded.as_deref(), checksum);
        assert_eq!(Some(embedded.clone()), checksum_of(version));
        let message = error.to_string();
        assert!(
            message.contains(&format!("migration {version} ({file})"))
                && message.contains(outbox.schema.as_str()),
            "{message}"
        );
        assert_eq!(
            (
                catalog(&outbox.pool, &outbox.schema).await,
                versions(outbox).await
            ),
            before,
            "nothing changed"
        );

        // As if the migration's released text were restored.
        sqlx::query(&format!(
            "UPDATE {}.schema_version SET checksum = $2 WHERE version = $1",
            outbox.schema
        ))
        .bind(version)
        .bind(checksum_of(version))
        .execute(&outbox.pool)
        .await
        .unwrap();
        outbox.outbox.migrate(&outbox.pool).await.unwrap();
    }
    created.drop_schema().await;
    upgraded.drop_schema().await;
}

#[tokio::test]
async fn a_consumer_migrates_its_inbox_without_an_outbox() {
    let outbox = TestOutbox::unmigrated().await;
    let inbox = Inbox::new(outbox.schema.clone());
    let report = inbox.migrate(&outbox.pool).await.unwrap();
    assert_eq!(
        (report.previous_version, report.current_version()),
        (0, SCHEMA_VERSION),
        "{report}"
    );
    for expected in [true, false] {
        let mut tx = outbox.pool.begin().await.unwrap();
        assert_eq!(
            inbox.try_record(&mut tx, "source", 1).await.unwrap(),
            expected
        );
        tx.commit().await.unwrap();
    }
    let again = inbox.migrate(&outbox.pool).await.unwrap();
    assert!(again.applied.is_empty(), "{again}");
    outbox.drop_schema().await;
}

/// An inbox and an outbox migrating one new schema at once (a service's consumer and writer
/// starting together) take turns: the schema is created once, and both succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbox_and_an_outbox_migrating_one_schema_at_once_take_turns() {
    let outbox = TestOutbox::unmigrated().await;
    let inbox = Inbox::new(outbox.schema.clone());
    let (by_inbox, by_outbox) = tokio::join!(
        inbox.migrate(&outbox.pool),
        outbox.outbox.migrate(&outbox.pool)
    );
    let mut applied = [by_inbox.unwrap().applied, by_outbox.unwrap().applied];
    applied.sort();
    assert_eq!(applied, [vec![], vec![BASELINE_VERSION]]);
    outbox.commit_each([Message::new("t", b"x".to_vec())]).await;
    assert_eq!(outbox.pending().await, 1);
    outbox.drop_schema().await;
}
