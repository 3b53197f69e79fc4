//! What one durable commit costs on this machine, measured beside the runs that are compared to
//! it (issue 15, target 2: a stored publish's latency against the plain broker's plus two durable
//! commits). A durable commit is at least a loopback round trip to PostgreSQL and an fdatasync of
//! the disk its WAL is on; a one-row INSERT that commits is the whole of it, as PostgreSQL does it.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Instant;

use integration_tests::TestDb;

use crate::median;

const ROUND_TRIPS: usize = 2000;
const SYNCS: usize = 300;
const COMMITS: usize = 500;

/// Medians in microseconds.
pub struct DurableCommit {
    /// A prepared `SELECT 1` on an open connection.
    pub select_1: f64,
    /// An 8 kB write and `fdatasync` in PostgreSQL's data directory (as `pg_test_fsync`'s
    /// fdatasync line); `None` where this process may not write there.
    pub fdatasync: Option<f64>,
    /// A one-row INSERT in its own transaction, committed durably.
    pub insert: f64,
}

impl DurableCommit {
    /// A round trip and an fdatasync: the least a durable commit costs (the INSERT's time where
    /// the data directory cannot be written to).
    pub fn floor(&self) -> f64 {
        self.fdatasync.map_or(self.insert, |sync| self.select_1 + sync)
    }

    pub async fn measure(db: &TestDb) -> DurableCommit {
        let client = db.client().await;
        let select = client.prepare("SELECT 1").await.unwrap();
        // Warmed up: the first round trips after a quiet spell also wake the cores from idle.
        for _ in 0..ROUND_TRIPS / 4 {
            client.query_one(&select, &[]).await.unwrap();
        }
        let mut round_trips = Vec::with_capacity(ROUND_TRIPS);
        for _ in 0..ROUND_TRIPS {
            let started = Instant::now();
            client.query_one(&select, &[]).await.unwrap();
            round_trips.push(started.elapsed().as_secs_f64() * 1e6);
        }
        client.batch_execute("CREATE TABLE IF NOT EXISTS bench_commit (n int)").await.unwrap();
        let insert = client.prepare("INSERT INTO bench_commit VALUES ($1)").await.unwrap();
        let mut commits = Vec::with_capacity(COMMITS);
        for n in 0..COMMITS as i32 {
            let started = Instant::now();
            client.execute(&insert, &[&n]).await.unwrap();
            commits.push(started.elapsed().as_secs_f64() * 1e6);
        }
        let directory: String = client.query_one("SHOW data_directory", &[]).await.unwrap().get(0);
        DurableCommit {
            select_1: median(round_trips),
            fdatasync: fdatasync(PathBuf::from(directory).join("bench_fdatasync.tmp")),
            insert: median(commits),
        }
    }
}

fn fdatasync(path: PathBuf) -> Option<f64> {
    let file = OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).ok()?;
    let block = [0x5au8; 8192];
    let mut syncs = Vec::with_capacity(SYNCS);
    for _ in 0..SYNCS {
        let started = Instant::now();
        file.write_all_at(&block, 0).ok()?;
        file.sync_data().ok()?;
        syncs.push(started.elapsed().as_secs_f64() * 1e6);
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    Some(median(syncs))
}
