//! The project's schema (`schema/schema.sql`, the one place it is written) and its application.

use deadpool_postgres::Pool;

pub const SCHEMA_SQL: &str = include_str!("../../schema/schema.sql");

/// Serializes concurrent migrations (two hosts starting at once would race on CREATE ... IF NOT EXISTS).
const MIGRATION_LOCK: i64 = 7_526_752_370_208_940_654;

/// Applies the schema to the pool's database. Idempotent.
pub async fn migrate(pool: &Pool) -> anyhow::Result<()> {
    let mut client = pool.get().await?;
    let transaction = client.transaction().await?;
    transaction.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
    transaction.batch_execute(SCHEMA_SQL).await?;
    transaction.commit().await?;
    Ok(())
}
