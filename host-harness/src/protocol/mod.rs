//! The delivery protocol, broker-neutral: what every host adapter (the rmqtt broker today)
//! drives, so that no rule of it is written twice. One place each:
//!
//! - [`delivery`]: backlog before live, holding live messages behind a backlog, dedupe by stored
//!   id, the per-subscription ack gates, catching up after a lost message (a state machine
//!   without I/O, tested by scenarios).
//! - [`group_commit`]: publishes from all clients stored in batches; each message's outcome is
//!   its own; fail-closed.
//! - [`ack_writer`]: acks that passed the gate, written in the background and coalesced.
//! - [`exactly_once`]: a QoS 2 message resent after a reconnection is stored once.
//!
//! Two adapters drive it: the rmqtt broker (`broker/src/hooks.rs`: all of it) and the harness's
//! replay (`replay.rs`: dedupe by stored id and the ack gates; its events come one at a time, so
//! nothing is ever held, and it stores each publish alone).

pub mod ack_writer;
pub mod delivery;
pub mod exactly_once;
pub mod group_commit;
