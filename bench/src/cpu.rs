//! CPU time of the processes in a run, from `/proc/<pid>/stat`: where the machine's two cores go
//! when the broker is the bottleneck or the database is.

use std::time::Duration;

/// User plus system CPU time of one process so far (all its threads); zero if it is gone.
pub fn process(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces: utime and
    // stime are fields 14 and 15 of the line, so 12 and 13 after the name.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    Duration::from_secs_f64((ticks(11) + ticks(12)) as f64 / clock_ticks_per_second())
}

/// CPU time of every PostgreSQL server process on the machine (postmaster, backends, writers).
/// A backend that exits during a measurement takes its time with it; the broker's pool keeps
/// its connections for the whole run.
pub fn postgres() -> Duration {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Duration::ZERO };
    entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "postgres"))
        .map(|pid| process(&pid))
        .sum()
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf reads a constant of the system and has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// CPU time of the bench's clients, the servers (a broker; a proxy and the broker behind it)
/// and PostgreSQL at one moment.
pub struct Sample {
    clients: Duration,
    servers: Vec<(u32, Duration)>,
    postgres: Duration,
}

impl Sample {
    pub fn take(servers: &[u32]) -> Sample {
        Sample {
            clients: process("self"),
            servers: servers.iter().map(|pid| (*pid, process(&pid.to_string()))).collect(),
            postgres: postgres(),
        }
    }

    /// Microseconds of CPU per message between `self` and a later sample: the clients, each
    /// server in order, PostgreSQL.
    pub fn per_message_until(&self, later: &Sample, messages: usize) -> Vec<f64> {
        let servers = self.servers.iter().zip(&later.servers).map(|((_, a), (_, b))| micros_per(*a, *b, messages));
        std::iter::once(micros_per(self.clients, later.clients, messages))
            .chain(servers)
            .chain([micros_per(self.postgres, later.postgres, messages)])
            .collect()
    }
}

/// Microseconds of CPU per item between two readings of a counter.
fn micros_per(before: Duration, after: Duration, items: usize) -> f64 {
    after.saturating_sub(before).as_secs_f64() * 1e6 / items as f64
}

/// Times a stretch of work: its wall time, and the CPU time PostgreSQL spent meanwhile.
pub struct Stopwatch {
    started: std::time::Instant,
    postgres: Duration,
}

/// What a [`Stopwatch`] or a [`Tally`] measured.
#[derive(Clone, Copy)]
pub struct Figure {
    /// Items per second.
    pub rate: f64,
    /// Microseconds of PostgreSQL CPU per item.
    pub postgres_us: f64,
}

impl Stopwatch {
    pub fn start() -> Stopwatch {
        // Reading /proc takes a while: before the clock starts, not inside the stretch.
        let postgres = postgres();
        Stopwatch { started: std::time::Instant::now(), postgres }
    }

    /// The stretch as a figure of its own, `items` done in it.
    pub fn stop(&self, items: usize) -> Figure {
        let mut tally = Tally::default();
        tally.add(self, items);
        tally.figure()
    }
}

/// Time and PostgreSQL CPU summed over several stretches of work: for two ways of doing the same
/// work measured in turns, so that whatever drifts during a run (the disk's flush times, other
/// processes) falls on both alike.
#[derive(Default)]
pub struct Tally {
    elapsed: Duration,
    postgres: Duration,
    items: usize,
}

impl Tally {
    /// Runs `work` (which handles `items` items) and adds what it took.
    pub async fn time<T>(&mut self, items: usize, work: impl Future<Output = T>) -> T {
        let stopwatch = Stopwatch::start();
        let output = work.await;
        self.add(&stopwatch, items);
        output
    }

    /// Adds the stretch `stopwatch` has timed until now.
    fn add(&mut self, stopwatch: &Stopwatch, items: usize) {
        self.elapsed += stopwatch.started.elapsed();
        self.postgres += postgres().saturating_sub(stopwatch.postgres);
        self.items += items;
    }

    pub fn figure(&self) -> Figure {
        Figure {
            rate: crate::per_second(self.items, self.elapsed),
            postgres_us: micros_per(Duration::ZERO, self.postgres, self.items),
        }
    }
}
