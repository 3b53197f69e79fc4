//! The one place that runs `bindgen!` over `wit/`: the generated types and traits of the
//! `broker:extension` contract, host side. Everything else imports them from here.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "extension",
    // Host functions may trap (a bad resource handle); every call is async so that SQL never
    // blocks the broker's runtime.
    imports: { default: async | trappable },
    exports: { default: async },
    with: {
        "broker:extension/sql.transaction": crate::sql::Transaction,
    },
});

pub use broker::extension::sql::{DatabaseError, Error as SqlError, RowSet, Value};
pub use broker::extension::types::{Client, Message, Property, PropertyValue, Subscription};
pub use exports::broker::extension::hooks::{ConfigError, FetchPage, HookError, PublishOutcome, Rules, Skipped};

/// Operator-facing text of an error (the generated `Display` is the `Debug` form).
pub trait Describe {
    fn describe(&self) -> String;
}

impl Describe for SqlError {
    fn describe(&self) -> String {
        match self {
            SqlError::NoSuchPool(pool) => format!("no pool named {pool}"),
            SqlError::Connection(m) => format!("database connection: {m}"),
            SqlError::Database(e) => {
                let detail = e.detail.as_ref().map(|d| format!(" ({d})")).unwrap_or_default();
                format!("database error {}: {}{detail}", e.code, e.message)
            }
            SqlError::InvalidParameter(m) => format!("invalid parameter: {m}"),
            SqlError::UnsupportedType(m) => format!("unsupported type: {m}"),
            SqlError::TooLarge(m) => format!("result too large: {m}"),
        }
    }
}

impl Describe for HookError {
    fn describe(&self) -> String {
        match self {
            HookError::Sql((rule, e)) => format!("{rule}: {}", e.describe()),
            HookError::Invalid(m) => m.clone(),
        }
    }
}
