//! The broker's own counters, beside the extensions' metrics on `/metrics`: what came in, what
//! went out, what was refused. (What is per extension, its backlog pages, held messages and
//! pending acks, its `Extension` counts.)

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct BrokerStats {
    /// PUBLISH packets from clients that reached the extensions.
    pub received: AtomicU64,
    /// Messages delivered to clients (live and backlog).
    pub delivered: AtomicU64,
    /// Publishes refused because an extension could not store them (fail-closed).
    pub refused: AtomicU64,
}

impl BrokerStats {
    pub fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn read(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
