//! The relay's claim, run and explained on a live database: for finding out why claims are slow
//! (a snapshot held for hours, a backlog without statistics) without copying the statement.
//! The benchmark records both.
//!
//! A claim is fenced, so it runs under a lease term: the current holder's, read from the lease
//! row, when the lease is held (a claim without a floor candidate only reads, so borrowing the
//! term changes nothing), or a term taken for the purpose and released at once when it is free.

use std::time::{Duration, Instant};

use outbox::SchemaName;
use sqlx::PgConnection;

use crate::postgres::{Fence, LeaseState, Skip, Statements};

/// One claim, timed.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClaimRun {
    /// How long the statement took, round trip included.
    pub elapsed: Duration,
    /// Messages it returned.
    pub rows: usize,
}

/// One claim, timed, and PostgreSQL's `EXPLAIN (ANALYZE, BUFFERS)` of the same statement.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClaimExplain {
    /// The claim itself.
    pub run: ClaimRun,
    /// The plan's lines, or why EXPLAIN failed.
    pub plan: Result<Vec<String>, String>,
    /// The statement's text.
    pub sql: String,
}

/// Runs the claim of lease `lease` on `schema` once, for up to `limit` messages.
pub async fn time_claim(
    conn: &mut PgConnection,
    schema: &SchemaName,
    lease: &str,
    limit: usize,
) -> Result<ClaimRun, sqlx::Error> {
    let statements = Statements::new(schema);
    let term = Term::find_or_take(conn, &statements, lease).await?;
    let result = run(conn, &statements, &term.fence, limit).await;
    term.end(conn, &statements).await?;
    result
}

/// Runs the claim of lease `lease` on `schema` once, for up to `limit` messages, then EXPLAINs
/// it with the same parameters.
pub async fn explain_claim(
    conn: &mut PgConnection,
    schema: &SchemaName,
    lease: &str,
    limit: usize,
) -> Result<ClaimExplain, sqlx::Error> {
    let statements = Statements::new(schema);
    let term = Term::find_or_take(conn, &statements, lease).await?;
    let result = match run(conn, &statements, &term.fence, limit).await {
        Ok(run) => Ok(ClaimExplain {
            run,
            plan: statements
                .explain_claim(conn, limit as i64, &term.fence)
                .await
                .map_err(|e| e.to_string()),
            sql: statements.claim_sql().to_owned(),
        }),
        Err(error) => Err(error),
    };
    term.end(conn, &statements).await?;
    result
}

async fn run(
    conn: &mut PgConnection,
    statements: &Statements,
    fence: &Fence,
    limit: usize,
) -> Result<ClaimRun, sqlx::Error> {
    let started = Instant::now();
    let claimed = statements
        .claim(
            conn,
            limit as i64,
            i64::MAX,
            &Skip::default(),
            Default::default(),
            fence,
        )
        .await?;
    Ok(ClaimRun {
        elapsed: started.elapsed(),
        rows: claimed.messages.len(),
    })
}

/// The term a diagnostic claim runs under: borrowed from the holder, or taken for it.
struct Term {
    fence: Fence,
    taken: bool,
}

impl Term {
    async fn find_or_take(
        conn: &mut PgConnection,
        statements: &Statements,
        lease: &str,
    ) -> Result<Term, sqlx::Error> {
        if let Some(fence) = statements.current_term(conn, lease).await? {
            return Ok(Term {
                fence,
                taken: false,
            });
        }
        let holder = "outbox-diagnostics";
        match statements
            .lease_acquire(conn, lease, holder, Duration::from_secs(30))
            .await?
        {
            LeaseState::Held { token, .. } => Ok(Term {
                fence: Fence {
                    lease: lease.to_owned(),
                    holder: holder.to_owned(),
                    token,
                },
                taken: true,
            }),
            // Taken meanwhile, or a lease of another name is held: no term to claim under.
            _ => statements
                .current_term(conn, lease)
                .await?
                .map(|fence| Term {
                    fence,
                    taken: false,
                })
                .ok_or(sqlx::Error::RowNotFound),
        }
    }

    async fn end(
        self,
        conn: &mut PgConnection,
        statements: &Statements,
    ) -> Result<(), sqlx::Error> {
        if self.taken {
            statements.lease_release(conn, &self.fence).await?;
        }
        Ok(())
    }
}
