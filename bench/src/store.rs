//! Store path: messages/s stored through the guest's `message-publish`, against the same SQL
//! issued natively (recorded from the guest, replayed without wasm), a native multi-row INSERT
//! and COPY BINARY of the same rows (the physical limit), with synchronous_commit on and off.

use std::sync::Arc;
use std::time::SystemTime;

use futures::pin_mut;
use host_harness::bindings::{Message, Rules};
use host_harness::config::RulesFile;
use host_harness::metrics::Metrics;
use host_harness::postgres::PgBackend;
use integration_tests::{TestDb, guest_module, offline_rules};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};

use crate::recording::{self, Recording};
use crate::cpu::{Figure, Stopwatch};
use crate::median;

const BATCHES: [usize; 4] = [1, 10, 100, 1000];
const PAYLOAD: [u8; 100] = [7; 100];

fn messages(count: usize) -> Vec<Message> {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as i64;
    (0..count)
        .map(|i| Message {
            id: None,
            msgid: format!("m{i}"),
            sender: "bench".into(),
            topic: format!("bench/{}", i % 100),
            payload: PAYLOAD.to_vec(),
            qos: 1,
            retain: false,
            timestamp: now,
            properties: vec![],
        })
        .collect()
}

pub async fn run(runs: usize) -> anyhow::Result<()> {
    println!("\n## store path: messages/s (100-byte payloads, 100 topics)");
    println!(
        "| synchronous_commit | batch | guest | same SQL native | guest/native | multi-row INSERT | COPY BINARY | guest/multi-row |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut cpu_rows = Vec::new();
    for synchronous_commit in ["on", "off"] {
        let db = TestDb::create(&format!("bench_store_{synchronous_commit}")).await;
        let rules = db.rules(&offline_rules(""));
        db.host(&rules).await; // applies the schema
        let admin = db.client().await;
        admin
            .batch_execute(&format!("ALTER DATABASE {} SET synchronous_commit = {synchronous_commit}", db.name))
            .await?;
        for batch in BATCHES {
            let total = if batch == 1 { 5_000 } else { 20_000 };
            let mut figures: [Vec<Figure>; 4] = Default::default();
            for run in 0..runs {
                let all = messages(total);
                admin.batch_execute("TRUNCATE mqtt_msg").await?;
                let (guest, units) = through_guest(&rules, &admin, &all, batch).await?;
                admin.batch_execute("TRUNCATE mqtt_msg").await?;
                let native = native_same_sql(&rules, &admin, &units, total).await?;
                // Every other run, the guest again after the native replay: no side gains from going first.
                let guest = if run % 2 == 1 {
                    admin.batch_execute("TRUNCATE mqtt_msg").await?;
                    through_guest(&rules, &admin, &all, batch).await?.0
                } else {
                    guest
                };
                figures[0].push(guest);
                figures[1].push(native);
                admin.batch_execute("TRUNCATE mqtt_msg").await?;
                figures[2].push(multi_row_insert(&db, &all, batch).await?);
                admin.batch_execute("TRUNCATE mqtt_msg").await?;
                figures[3].push(copy_binary(&db, &all, batch).await?);
            }
            let [guest, native, multi, copy] = figures.each_ref().map(|f| median(f.iter().map(|f| f.rate).collect()));
            println!(
                "| {synchronous_commit} | {batch} | {guest:.0} | {native:.0} | {:.0} % | {multi:.0} | {copy:.0} | {:.0} % |",
                100.0 * guest / native,
                100.0 * guest / multi
            );
            let [guest, native, multi, copy] =
                figures.each_ref().map(|f| median(f.iter().map(|f| f.postgres_us).collect()));
            cpu_rows.push(format!(
                "| {synchronous_commit} | {batch} | {guest:.1} | {native:.1} | {multi:.1} | {copy:.1} |"
            ));
        }
    }
    // Every PostgreSQL process counts (backends, WAL writer, ...): the server's whole cost.
    println!("\nPostgreSQL CPU per message in the same runs (medians), microseconds");
    println!("| synchronous_commit | batch | guest | same SQL native | multi-row INSERT | COPY BINARY |");
    println!("|---|---|---|---|---|---|");
    for row in cpu_rows {
        println!("{row}");
    }
    Ok(())
}

/// Stores `all` through the guest in batches; returns the timing and what the guest sent
/// (recorded in a first, untimed pass).
async fn through_guest(
    rules: &str,
    admin: &tokio_postgres::Client,
    all: &[Message],
    batch: usize,
) -> anyhow::Result<(Figure, Vec<recording::Unit>)> {
    let file = RulesFile::parse(rules)?;
    let backend = Arc::new(PgBackend::new(&file.pools, None)?);
    let recording = Recording::new(backend.clone());
    let (units, on) = (recording.units.clone(), recording.on.clone());
    let mut instance = guest_module().instantiate(Arc::new(recording), Arc::new(Metrics::default())).await?;
    let guest_rules =
        Rules { source: "bench".into(), text: file.guest_text, pools: backend.pool_names(), node: "bench".into() };
    instance.configure(&guest_rules).await?.map_err(|e| anyhow::anyhow!("{e:?}"))?;
    // Untimed: what the guest sends, for the native replay (it also opens the connection and
    // prepares the statements).
    for chunk in all.chunks(batch) {
        instance.message_publish(chunk).await?;
    }
    on.store(false, std::sync::atomic::Ordering::Relaxed);
    admin.batch_execute("TRUNCATE mqtt_msg").await?;
    let stopwatch = Stopwatch::start();
    for chunk in all.chunks(batch) {
        instance.message_publish(chunk).await?;
    }
    let rate = stopwatch.stop(all.len());
    let recorded = units.lock().unwrap().clone();
    Ok((rate, recorded))
}

/// Replays the guest's recorded statements straight through the host's PostgreSQL backend,
/// once untimed (connection, prepared statements) and once timed.
async fn native_same_sql(
    rules: &str,
    admin: &tokio_postgres::Client,
    units: &[recording::Unit],
    messages: usize,
) -> anyhow::Result<Figure> {
    let file = RulesFile::parse(rules)?;
    let backend = PgBackend::new(&file.pools, None)?;
    recording::replay(&backend, "pool1", units).await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
    admin.batch_execute("TRUNCATE mqtt_msg").await?;
    let stopwatch = Stopwatch::start();
    recording::replay(&backend, "pool1", units).await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(stopwatch.stop(messages))
}

const COLUMNS: &str = "msgid, sender, topic, qos, retain, payload, arrived";

/// One multi-row INSERT per batch, each its own transaction: the best plain SQL can do.
async fn multi_row_insert(db: &TestDb, all: &[Message], batch: usize) -> anyhow::Result<Figure> {
    let client = db.client().await;
    let arrived = SystemTime::now();
    let stopwatch = Stopwatch::start();
    for chunk in all.chunks(batch) {
        let rows: Vec<String> = (0..chunk.len())
            .map(|r| {
                format!(
                    "(${}, ${}, ${}, ${}, ${}, ${}, ${})",
                    7 * r + 1,
                    7 * r + 2,
                    7 * r + 3,
                    7 * r + 4,
                    7 * r + 5,
                    7 * r + 6,
                    7 * r + 7
                )
            })
            .collect();
        let statement = format!("INSERT INTO mqtt_msg ({COLUMNS}) VALUES {}", rows.join(", "));
        let qos: Vec<i16> = chunk.iter().map(|m| i16::from(m.qos)).collect();
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(chunk.len() * 7);
        for (m, qos) in chunk.iter().zip(&qos) {
            params.extend([&m.msgid as &(dyn ToSql + Sync), &m.sender, &m.topic, qos, &m.retain, &m.payload, &arrived]);
        }
        client.execute(&statement, &params).await?;
    }
    Ok(stopwatch.stop(all.len()))
}

/// COPY BINARY, one COPY per batch: the physical limit.
async fn copy_binary(db: &TestDb, all: &[Message], batch: usize) -> anyhow::Result<Figure> {
    let client = db.client().await;
    let arrived = SystemTime::now();
    let types = [Type::TEXT, Type::TEXT, Type::TEXT, Type::INT2, Type::BOOL, Type::BYTEA, Type::TIMESTAMPTZ];
    let stopwatch = Stopwatch::start();
    for chunk in all.chunks(batch) {
        let sink = client.copy_in(&format!("COPY mqtt_msg ({COLUMNS}) FROM STDIN BINARY")).await?;
        let writer = BinaryCopyInWriter::new(sink, &types);
        pin_mut!(writer);
        for m in chunk {
            let qos = i16::from(m.qos);
            writer.as_mut().write(&[&m.msgid, &m.sender, &m.topic, &qos, &m.retain, &m.payload, &arrived]).await?;
        }
        writer.finish().await?;
    }
    Ok(stopwatch.stop(all.len()))
}
