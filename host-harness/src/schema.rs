//! The project's schema (`schema/schema.sql`, the one place it is written) and its application.

use deadpool_postgres::Object;

pub const SCHEMA_SQL: &str = include_str!("../../schema/schema.sql");

/// The conversion of an EMQX 4 database; its `\ir schema.sql` line (for psql) stands for SCHEMA_SQL.
pub const FROM_EMQX4_SQL: &str = include_str!("../../schema/from-emqx4.sql");

/// Serializes concurrent migrations (two hosts starting at once would race on CREATE ... IF NOT EXISTS).
const MIGRATION_LOCK: i64 = 7_526_752_370_208_940_654;

/// Applies the schema to the pool's database. Idempotent.
pub async fn migrate(client: Object) -> anyhow::Result<()> {
    in_migration(client, SCHEMA_SQL).await
}

/// Converts the pool's EMQX 4 tables to the schema, keeping every row (schema/from-emqx4.sql).
pub async fn migrate_from_emqx4(client: Object) -> anyhow::Result<()> {
    in_migration(client, &FROM_EMQX4_SQL.replace("\\ir schema.sql", SCHEMA_SQL)).await
}

async fn in_migration(mut client: Object, sql: &str) -> anyhow::Result<()> {
    let transaction = client.transaction().await?;
    transaction.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
    transaction.batch_execute(sql).await?;
    transaction.commit().await?;
    Ok(())
}
