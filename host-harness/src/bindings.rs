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

/// The version of the contract in `wit/` that this host implements. A macro, so that it can go
/// into `concat!` (the harness's `--version`); a test checks it against `wit/`.
#[macro_export]
macro_rules! contract_version {
    () => {
        "0.4.0"
    };
}

/// Refuses a guest built for an incompatible version of the contract, naming both versions
/// (wasmtime would only say that an import has no implementation). Compatible as semver
/// has it for 0.x: the same minor version.
pub fn check_contract(engine: &wasmtime::Engine, component: &wasmtime::component::Component) -> anyhow::Result<()> {
    let ty = component.component_type();
    let names = ty.imports(engine).map(|(name, _)| name).chain(ty.exports(engine).map(|(name, _)| name));
    for name in names {
        let Some(interface) = name.strip_prefix("broker:extension/") else { continue };
        let version = interface.split_once('@').map_or("", |(_, version)| version);
        let minor = |v: &str| v.split('.').take(2).collect::<Vec<_>>().join(".");
        if minor(version) != minor(contract_version!()) {
            anyhow::bail!(
                "the extension was built for the contract broker:extension@{version} (`{name}`); \
                 this host implements broker:extension@{}: build it against this version's wit/",
                contract_version!()
            );
        }
    }
    Ok(())
}

pub use broker::extension::sql::{DatabaseError, Error as SqlError, RowSet, Value};
pub use broker::extension::types::{Client, Message, Property, PropertyValue, Subscription};
pub use exports::broker::extension::hooks::{
    ConfigError, Configuration, FetchPage, HookError, Hookpoint, Interest, PublishOutcome, RuleFailure, Skipped,
};

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
            HookError::Sql(RuleFailure { rule, error }) => format!("{rule}: {}", error.describe()),
            HookError::Invalid(m) => m.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_contract_version_is_the_one_in_wit() {
        let wit = include_str!("../../wit/hooks.wit");
        let package = format!("package broker:extension@{};", contract_version!());
        assert!(wit.lines().any(|line| line == package), "wit/hooks.wit does not declare `{package}`");
    }
}
