//! Store path: messages/s stored through the guest's `message-publish`, against the same SQL
//! issued natively (recorded from the guest, replayed without wasm, the two taking turns), a
//! native multi-row INSERT and COPY BINARY of the same rows (the physical limit), with
//! synchronous_commit on and off; and where a guest call's time goes around its statement.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::pin_mut;
use host_harness::bindings::{Configuration, Message, PublishOutcome};
use host_harness::config::RulesFile;
use host_harness::metrics::Metrics;
use host_harness::postgres::PgBackend;
use integration_tests::{TestDb, guest_module, offline_rules};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};

use crate::cpu::{Figure, Stopwatch, Tally};
use crate::median;
use crate::recording::{self, Recording};

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
    let (mut cpu_rows, mut split_rows) = (Vec::new(), Vec::new());
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
            let mut splits = Vec::new();
            for _ in 0..runs {
                let all = messages(total);
                admin.batch_execute("TRUNCATE mqtt_msg").await?;
                let (guest, native, split) = guest_and_native(&rules, &admin, &all, batch).await?;
                splits.extend(split.per_call());
                figures[0].push(guest);
                figures[1].push(native);
                admin.batch_execute("TRUNCATE mqtt_msg").await?;
                figures[2].push(multi_row_insert(&db, &all, batch).await?);
                admin.batch_execute("TRUNCATE mqtt_msg").await?;
                figures[3].push(copy_binary(&db, &all, batch).await?);
            }
            let [guest, native, multi, copy] = figures.each_ref().map(|f| median(f.iter().map(|f| f.rate).collect()));
            // The guest and its native replay were measured in turns: the ratio is the median of
            // each run's own.
            let guest_to_native = median(figures[0].iter().zip(&figures[1]).map(|(g, n)| g.rate / n.rate).collect());
            println!(
                "| {synchronous_commit} | {batch} | {guest:.0} | {native:.0} | {:.0} % | {multi:.0} | {copy:.0} | {:.0} % |",
                100.0 * guest_to_native,
                100.0 * guest / multi
            );
            let [guest, native, multi, copy] =
                figures.each_ref().map(|f| median(f.iter().map(|f| f.postgres_us).collect()));
            cpu_rows.push(format!(
                "| {synchronous_commit} | {batch} | {guest:.1} | {native:.1} | {multi:.1} | {copy:.1} |"
            ));
            if !splits.is_empty() {
                let [before, database, after] = [0, 1, 2].map(|i| median(splits.iter().map(|s| s[i]).collect()));
                let native_call = median(figures[1].iter().map(|f| 1e6 * batch as f64 / f.rate).collect());
                split_rows.push(format!(
                    "| {synchronous_commit} | {batch} | {before:.1} | {database:.1} | {after:.1} | {native_call:.1} |"
                ));
            }
        }
    }
    // Every PostgreSQL process counts (backends, WAL writer, ...): the server's whole cost.
    println!("\nPostgreSQL CPU per message in the same runs (medians), microseconds");
    println!("| synchronous_commit | batch | guest | same SQL native | multi-row INSERT | COPY BINARY |");
    println!("|---|---|---|---|---|---|");
    for row in cpu_rows {
        println!("{row}");
    }
    println!("\nA guest publish call in the same runs (medians), microseconds per call");
    println!(
        "| synchronous_commit | batch | guest, before its statement | guest, in the database call | guest, after the answer | native, the same call |"
    );
    println!("|---|---|---|---|---|---|");
    for row in split_rows {
        println!("{row}");
    }
    one_bad_message(runs).await
}

/// What one failing message costs its batch-mates: batches of 100 that all store, against
/// batches of 100 of which one fails a rule (an audit of each payload into a text column, given a
/// payload that is not UTF-8), which the guest then retries message by message so that the 99
/// others are stored as if they had come alone. Both take turns on one host, durably.
async fn one_bad_message(runs: usize) -> anyhow::Result<()> {
    const BATCH: usize = 100;
    const BATCHES: usize = 50;
    let audit = "backend.pgsql.hook.message.publish.2 = {\"topic\": \"#\", \"action\": \
                 {\"sql\": [\"insert into audit (payload) values (${payload})\"]}, \"pool\": \"pool1\"}";
    let db = TestDb::create("bench_store_one_bad").await;
    let admin = db.client().await;
    admin.batch_execute("CREATE TABLE audit (payload text)").await?;
    let host = db.host(&format!("{}\n{audit}\n", db.rules(&offline_rules("")))).await;
    let good = messages(BATCH);
    let mut one_bad = messages(BATCH);
    one_bad[BATCH / 2].payload = vec![0xff, 0xfe];
    let (mut all_good, mut with_bad) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        for (batch, rates) in [(&good, &mut all_good), (&one_bad, &mut with_bad)] {
            let started = Instant::now();
            for _ in 0..BATCHES {
                let outcomes = host.call(async |i| i.message_publish(batch).await).await?;
                let failed = outcomes.iter().filter(|o| matches!(o, PublishOutcome::Failed(_))).count();
                anyhow::ensure!(failed == usize::from(batch[BATCH / 2].payload.len() == 2), "{failed} failed");
            }
            rates.push(crate::per_second(BATCH * BATCHES, started.elapsed()));
        }
    }
    let (all_good, with_bad) = (median(all_good), median(with_bad));
    println!("\n## one failing message in a batch of {BATCH} (two rules, synchronous_commit on): messages/s");
    println!("| all store | one fails, 99 store | one fails / all store |");
    println!("|---|---|---|");
    println!("| {all_good:.0} | {with_bad:.0} | {:.0} % |", 100.0 * with_bad / all_good);
    Ok(())
}

/// Messages per turn when the guest and the native replay take turns: 20 turns each.
fn turn_size(total: usize, batch: usize) -> usize {
    (total / 20).max(batch) / batch * batch
}

/// Stores `all` through the guest in batches, and replays what the guest sent natively, the two
/// taking turns of [`turn_size`] messages (each turn's first alternating), so that whatever drifts
/// during the run falls on both alike. Returns (guest, native, where the guest's calls spent their time).
async fn guest_and_native(
    rules: &str,
    admin: &tokio_postgres::Client,
    all: &[Message],
    batch: usize,
) -> anyhow::Result<(Figure, Figure, Split)> {
    let file = RulesFile::parse(rules)?;
    let backend = Arc::new(PgBackend::new(&file.pools, None)?);
    let recording = Recording::new(backend.clone());
    let (units, on, last_statement) = (recording.units.clone(), recording.on.clone(), recording.last_statement.clone());
    let mut instance = guest_module().instantiate(Arc::new(recording), Arc::new(Metrics::default())).await?;
    let guest_rules = Configuration {
        source: "bench".into(),
        text: file.guest_text,
        pools: backend.pool_names(),
        node: "bench".into(),
    };
    instance.configure(&guest_rules).await?.map_err(|e| anyhow::anyhow!("{e:?}"))?;
    // The native replay goes through the guest's own backend, on the same connection: the round
    // trips of two connections differ by up to 15 µs, depending on which was opened first,
    // which would otherwise decide the comparison at batch 1.
    let native: &PgBackend = &backend;
    let turns: Vec<&[Message]> = all.chunks(turn_size(all.len(), batch)).collect();
    // Untimed: what the guest sends in each turn, for the native replay; this also opens the
    // connection and prepares the statements on it.
    let mut sent = Vec::with_capacity(turns.len());
    for turn in &turns {
        for chunk in turn.chunks(batch) {
            instance.message_publish(chunk).await?;
        }
        let units = std::mem::take(&mut *units.lock().unwrap());
        replay(native, &units).await?;
        sent.push(units);
    }
    on.store(false, std::sync::atomic::Ordering::Relaxed);
    admin.batch_execute("TRUNCATE mqtt_msg").await?;
    let (mut guest, mut replayed, mut split) = (Tally::default(), Tally::default(), Split::default());
    for (i, (turn, units)) in turns.iter().zip(&sent).enumerate() {
        for guest_turn in [i % 2 == 0, i % 2 == 1] {
            if guest_turn {
                guest
                    .time(turn.len(), async {
                        for chunk in turn.chunks(batch) {
                            let called = Instant::now();
                            instance.message_publish(chunk).await?;
                            split.add(called, last_statement.lock().unwrap().take(), Instant::now());
                        }
                        anyhow::Ok(())
                    })
                    .await?;
            } else {
                replayed.time(turn.len(), replay(native, units)).await?;
            }
        }
    }
    Ok((guest.figure(), replayed.figure(), split))
}

/// Where a guest's publish calls spent their time: before the statement went to the database, in
/// the database call, and after its answer came back; summed over the calls that made exactly one
/// statement outside a transaction (batches up to 512).
#[derive(Default)]
struct Split {
    before: Duration,
    database: Duration,
    after: Duration,
    calls: u32,
}

impl Split {
    fn add(&mut self, called: Instant, statement: Option<(Instant, Instant)>, returned: Instant) {
        if let Some((sent, answered)) = statement {
            self.before += sent - called;
            self.database += answered - sent;
            self.after += returned - answered;
            self.calls += 1;
        }
    }

    /// Microseconds per call: (before, database, after); `None` without a call to split.
    fn per_call(&self) -> Option<[f64; 3]> {
        (self.calls > 0)
            .then(|| [self.before, self.database, self.after].map(|d| d.as_secs_f64() * 1e6 / f64::from(self.calls)))
    }
}

async fn replay(backend: &PgBackend, units: &[recording::Unit]) -> anyhow::Result<()> {
    recording::replay(backend, "pool1", units).await.map_err(|e| anyhow::anyhow!("{e:?}"))
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
