//! Retention under ingest: for three minutes (or `BENCH_RETENTION_SECONDS`), 10 000 messages a
//! second arrive (one multi-row INSERT per second, as fast as the broker's batches would write
//! them) while the host's housekeeping (`tick`, every 5 s and as many rounds as a broker's tick
//! allows, as the adapters' default `tick_seconds`) removes what is older than the store rule's
//! `retention` (10 s). Whether it keeps up shows in the rows left, and bloat in the size of the
//! table and its indexes over those minutes, with autovacuum as configured. Two layouts, one
//! after the other: partitions dropped whole (the schema's), and deletes alone in one table (as
//! before partitioning: the partition upkeep replaced by one that does nothing, so every row stays in
//! `mqtt_msg_default`).

use std::time::{Duration, Instant};

use integration_tests::TestDb;

const PER_SECOND: i32 = 10_000;
/// Seconds of ingest per layout, unless `BENCH_RETENTION_SECONDS` says otherwise.
const SECONDS: u64 = 180;
const RETENTION_SECS: u64 = 10;
/// `tick` calls in a row at most, per tick (the adapters' `TICK_ROUNDS`).
const TICK_ROUNDS: usize = 100;
/// The adapters' default `tick_seconds`.
const TICK_SECONDS: u64 = 5;

/// Rows, table bytes and index bytes of `mqtt_msg`'s partitions, and how many partitions.
async fn sizes(admin: &tokio_postgres::Client) -> anyhow::Result<(i64, i64, i64, i64)> {
    let row = admin
        .query_one(
            "SELECT (SELECT count(*) FROM mqtt_msg), sum(pg_table_size(relid))::bigint, \
                    sum(pg_indexes_size(relid))::bigint, count(*) FILTER (WHERE isleaf) \
             FROM pg_partition_tree('mqtt_msg')",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1), row.get(2), row.get(3)))
}

#[derive(Clone, Copy, PartialEq)]
enum Layout {
    Partitions,
    DeletesOnly,
}

pub async fn run() -> anyhow::Result<()> {
    let seconds = match std::env::var("BENCH_RETENTION_SECONDS") {
        Ok(text) => text.parse()?,
        Err(_) => SECONDS,
    };
    // `BENCH_RETENTION_LAYOUT=partitions` (or `deletes`) runs one layout, for long runs.
    let only = std::env::var("BENCH_RETENTION_LAYOUT").ok();
    for (layout, name) in [(Layout::Partitions, "partitions"), (Layout::DeletesOnly, "deletes")] {
        if only.as_deref().is_none_or(|only| only == name) {
            run_layout(layout, seconds).await?;
        }
    }
    Ok(())
}

async fn run_layout(layout: Layout, seconds: u64) -> anyhow::Result<()> {
    let db = TestDb::create("bench_retention").await;
    let rules = format!(
        "backend.pgsql.hook.message.publish.1 = {{\"topic\": \"#\", \"action\": {{\"function\": \"on_message_publish\"}}, \
         \"retention\": \"{RETENTION_SECS}s\", \"pool\": \"pool1\"}}"
    );
    let host = db.host(&db.rules(&rules)).await;
    let admin = db.client().await;
    let name = match layout {
        Layout::Partitions => "partitions dropped whole",
        Layout::DeletesOnly => "deletes alone, one table (as before partitioning)",
    };
    if layout == Layout::DeletesOnly {
        admin
            .batch_execute(
                "CREATE OR REPLACE FUNCTION mqtt_msg_upkeep(keep interval, at timestamptz DEFAULT now()) \
                 RETURNS integer LANGUAGE sql AS 'SELECT 0'",
            )
            .await?;
    }
    println!(
        "\n## retention, {name}: {PER_SECOND} messages/s for {seconds} s, retention {RETENTION_SECS} s, a tick every {TICK_SECONDS} s"
    );
    println!("| second | rows in mqtt_msg | partitions | table MiB | indexes MiB | deleted by the tick | tick ms |");
    println!("|---|---|---|---|---|---|---|");
    let mib = |bytes: i64| bytes as f64 / (1 << 20) as f64;
    let started = Instant::now();
    let mut worst_tick = Duration::ZERO;
    for second in 1..=seconds {
        admin
            .execute(
                "INSERT INTO mqtt_msg (msgid, sender, topic, qos, payload) \
                 SELECT 'm' || g, 'bench', 'fleet/' || (g % 1000), 1, '\\x0000000000000000' FROM generate_series(1, $1) g",
                &[&PER_SECOND],
            )
            .await?;
        let ticked = Instant::now();
        let mut deleted = 0;
        let rounds = if second % TICK_SECONDS == 0 { TICK_ROUNDS } else { 0 };
        for _ in 0..rounds {
            let round = host.call(async |i| i.tick().await).await?.map_err(|e| anyhow::anyhow!("{e:?}"))?;
            deleted += round;
            if round == 0 {
                break;
            }
        }
        let tick = ticked.elapsed();
        worst_tick = worst_tick.max(tick);
        if second % ((seconds / 180).max(1) * 20) == 0 {
            let (rows, table, indexes, partitions) = sizes(&admin).await?;
            println!(
                "| {second} | {rows} | {partitions} | {:.1} | {:.1} | {deleted} | {:.0} |",
                mib(table),
                mib(indexes),
                tick.as_secs_f64() * 1000.0
            );
        }
        let next = started + Duration::from_secs(second);
        tokio::time::sleep_until(next.into()).await;
    }
    println!(
        "\nslowest tick: {:.0} ms (each must end within {TICK_SECONDS} s to keep up)",
        worst_tick.as_secs_f64() * 1000.0
    );
    Ok(())
}
