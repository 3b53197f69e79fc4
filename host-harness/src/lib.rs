//! A wasmtime host for `broker:extension` guests: loads a guest, gives it SQL over named
//! PostgreSQL pools, and calls its broker hooks. The `harness` command replays broker events
//! through it ([`replay`]); a real broker embeds [`Host`] the same way:
//!
//! ```no_run
//! use host_harness::bindings::Client;
//! use host_harness::host::{Host, Sources};
//! use host_harness::Runtime;
//!
//! # async fn embed() -> anyhow::Result<()> {
//! let runtime = Runtime::new()?;
//! let sources = Sources { module: "guest.wasm".into(), rules: "rules.conf".into() };
//! let host = Host::load(&runtime, &sources, "node1@example").await?;
//! host.migrate().await?;
//! // A client connected: its hook, in one instance of the guest. The outer error is a trap (the
//! // instance was replaced), the inner one a failed rule.
//! let client = Client { clientid: "c1".into(), username: None, peerhost: None };
//! let subscriptions = host.call(async |instance| instance.client_connected(&client).await).await??;
//! # let _ = subscriptions;
//! # Ok(())
//! # }
//! ```
//!
//! What else an adapter calls, event by event, and the delivery protocol it drives
//! ([`protocol`]): README, "Implementing a host".

pub mod adapter;
pub mod bindings;
pub mod command;
pub mod config;
pub mod engine;
pub mod host;
pub mod http;
pub mod interest;
mod log;
pub mod metrics;
pub mod postgres;
pub mod protocol;
pub mod reload;
pub mod replay;
pub mod sandbox;
pub mod schema;
pub mod sql;
mod state;
pub mod wire;

pub use engine::{ExtensionModule, Hook, Instance, Runtime};
pub use host::Host;
