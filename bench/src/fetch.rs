//! Fetch path: how long a subscriber's first page of 500 offline messages takes when the table
//! holds 10^4 to 10^7 rows of 10^5 topics (an index range scan stays flat; a table scan would
//! grow), and how fast a 10^5-message backlog drains page by page.

use std::time::Instant;

use host_harness::Host;
use host_harness::bindings::{Client, Subscription};
use integration_tests::{TestDb, offline_rules};

use crate::{median, per_second};

const HOT: &str = "fleet/hot";
const HOT_ROWS: i32 = 600;
/// Filler topics: 10^5 (a prime, so that the subscriber's rows do not fall on one filler topic).
const TOPICS: i32 = 99_991;

pub async fn run(runs: usize) -> anyhow::Result<()> {
    let db = TestDb::create("bench_fetch").await;
    let host = db.host(&db.rules(&offline_rules(r#"{"max_returned_count": 500, "first_fetch": "earliest"}"#))).await;
    let admin = db.client().await;

    println!("\n## fetch path: first page of 500 ({HOT_ROWS} unread on the topic, spread through the table)");
    println!("| rows in mqtt_msg | first page, median ms | vs 10^4 |");
    println!("|---|---|---|");
    let mut base = None;
    for rows in [10_000i32, 100_000, 1_000_000, 10_000_000] {
        let filled = Instant::now();
        // Filler on 10^5 topics, and the subscriber's topic every rows/600th row.
        admin
            .execute(
                "INSERT INTO mqtt_msg (msgid, sender, topic, qos, payload) \
                 SELECT 'm' || g, 'bench', CASE WHEN g % ($1 / $2) = 0 THEN $3 ELSE 'fleet/' || (g % $4) END, 1, '\\x00' \
                 FROM generate_series(1, $1) g",
                &[&rows, &HOT_ROWS, &HOT, &TOPICS],
            )
            .await?;
        admin.batch_execute("VACUUM ANALYZE mqtt_msg").await?;
        eprintln!("fetch: {rows} rows written in {:.1} s", filled.elapsed().as_secs_f64());
        let ms = first_page_ms(&host, &format!("{rows}"), runs).await?;
        let base_ms = *base.get_or_insert(ms);
        println!("| {rows} | {ms:.2} | {:.2}x |", ms / base_ms);
        admin.batch_execute("TRUNCATE mqtt_msg; TRUNCATE mqtt_acked").await?;
    }

    // With a retention, the table is some six partitions (schema/schema.sql, mqtt_msg_upkeep), and
    // a fetch reads the index of each: the same 10^6 rows in one table, then spread over a
    // minute's partitions of 10 s (those of a 40 s retention).
    println!("\n## fetch path: first page of 500, 10^6 rows in one table and in partitions");
    println!("| layout | partitions holding rows | first page, median ms | vs one table |");
    println!("|---|---|---|---|");
    let mut one_table = None;
    for partitioned in [false, true] {
        if partitioned {
            admin
                .batch_execute(
                    "SELECT mqtt_msg_upkeep('40 seconds', now() - interval '1 minute'); \
                     SELECT mqtt_msg_upkeep('40 seconds', now() - interval '30 seconds')",
                )
                .await?;
        }
        admin
            .execute(
                "INSERT INTO mqtt_msg (msgid, sender, topic, qos, payload, arrived) \
                 SELECT 'm' || g, 'bench', CASE WHEN g % ($1 / $2) = 0 THEN $3 ELSE 'fleet/' || (g % $4) END, 1, '\\x00', \
                        now() - interval '1 minute' + g * interval '1 minute' / $1 \
                 FROM generate_series(1, $1) g",
                &[&1_000_000i32, &HOT_ROWS, &HOT, &TOPICS],
            )
            .await?;
        admin.batch_execute("VACUUM ANALYZE mqtt_msg").await?;
        let holding: i64 = admin.query_one("SELECT count(DISTINCT tableoid) FROM mqtt_msg", &[]).await?.get(0);
        let ms = first_page_ms(&host, &format!("layout-{partitioned}"), runs).await?;
        let base_ms = *one_table.get_or_insert(ms);
        let layout = if partitioned { "partitions" } else { "one table (no retention)" };
        println!("| {layout} | {holding} | {ms:.2} | {:.2}x |", ms / base_ms);
        admin.batch_execute("TRUNCATE mqtt_msg; TRUNCATE mqtt_acked").await?;
    }

    println!("\n## fetch path: a backlog of 100 000 drained in pages of 500, each page's last message acked");
    let mut rates = Vec::new();
    for run in 0..runs {
        admin
            .batch_execute(
                "TRUNCATE mqtt_msg; INSERT INTO mqtt_msg (msgid, sender, topic, qos, payload) \
                 SELECT 'm' || g, 'bench', 'drain/x', 1, '\\x00' FROM generate_series(1, 100000) g; ANALYZE mqtt_msg",
            )
            .await?;
        rates.push(drain(&host, &format!("drainer-{run}")).await?);
    }
    println!("| messages/s (median) |\n|---|\n| {:.0} |", median(rates));
    Ok(())
}

/// The median time of a first subscription's first page of 500 on the hot topic (20 x `runs`
/// subscribers, each new).
async fn first_page_ms(host: &Host, tag: &str, runs: usize) -> anyhow::Result<f64> {
    let mut times = Vec::new();
    for i in 0..(20 * runs) {
        let client = Client { clientid: format!("reader-{tag}-{i}"), username: None, peerhost: None };
        let subscription = Subscription { filter: HOT.into(), qos: 1 };
        let started = Instant::now();
        let page = host
            .call(async |i| i.session_subscribed(&client, &subscription).await)
            .await?
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(page.messages.len(), 500);
    }
    Ok(median(times))
}

async fn drain(host: &Host, clientid: &str) -> anyhow::Result<f64> {
    let client = Client { clientid: clientid.into(), username: None, peerhost: None };
    let subscription = Subscription { filter: "drain/x".into(), qos: 1 };
    let started = Instant::now();
    let mut delivered = 0;
    let mut page = host
        .call(async |i| i.session_subscribed(&client, &subscription).await)
        .await?
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    loop {
        delivered += page.messages.len();
        if let Some(last) = page.messages.last() {
            host.call(async |i| i.message_acked(&client, last, std::slice::from_ref(&subscription.filter)).await)
                .await?
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        }
        let Some(cursor) = page.next.take() else { break };
        page = host
            .call(async |i| i.session_fetch_next(&client, &subscription, &cursor).await)
            .await?
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    assert_eq!(delivered, 100_000);
    Ok(per_second(delivered, started.elapsed()))
}
