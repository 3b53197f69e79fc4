//! The built-in functions, one module each (retained messages share one), each holding its own
//! SQL and declaring its functions ([`Builtin`]): name, hookpoint and default options. The tables
//! are those of `schema/schema.sql`.

use crate::hookpoint::Hookpoint;
use crate::rules::Function;

pub mod acked;
pub mod client;
pub mod fetch;
pub mod housekeeping;
pub mod publish;
pub mod retain;
pub mod rows;

/// A built-in function as a rule names it: `{"action": {"function": name}}` on `hookpoint`.
pub struct Builtin {
    pub name: &'static str,
    /// The one hookpoint it runs on.
    pub hookpoint: Hookpoint,
    /// The function with its default options (a rule's options are applied to it).
    pub function: fn() -> Function,
}

/// Every built-in function, as each module declares it.
pub const ALL: [Builtin; 10] = [
    client::ON_CLIENT_CONNECTED,
    client::ON_SUBSCRIBE_LOOKUP,
    client::ON_CLIENT_DISCONNECTED,
    fetch::ON_MESSAGE_FETCH,
    retain::ON_RETAIN_LOOKUP,
    publish::ON_MESSAGE_PUBLISH,
    publish::ON_MESSAGE_STORE,
    retain::ON_MESSAGE_RETAIN,
    retain::ON_RETAIN_DELETE,
    acked::ON_MESSAGE_ACKED,
];
