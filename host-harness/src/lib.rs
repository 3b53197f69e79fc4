//! A wasmtime host for `broker:extension` guests: loads a guest, gives it SQL over named
//! PostgreSQL pools, and calls its broker hooks. The `harness` command replays broker events
//! through it ([`replay`]); a real broker embeds [`Host`] the same way.

pub mod bindings;
pub mod command;
pub mod config;
pub mod engine;
pub mod host;
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

pub use engine::{ExtensionModule, Hook, Instance, Runtime};
pub use host::Host;
