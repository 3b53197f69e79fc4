//! on_client_connected, on_client_disconnected and on_subscribe_lookup: clients' online state in
//! `mqtt_client` and their stored subscriptions in `mqtt_sub`.

use crate::bindings::broker::extension::sql;
use crate::bindings::broker::extension::types::Subscription;
use crate::db;
use crate::functions::Builtin;
use crate::hookpoint::Hookpoint;
use crate::rules::Function;

/// `on_client_connected`: the client online in `mqtt_client`, with node and time.
pub const ON_CLIENT_CONNECTED: Builtin = Builtin {
    name: "on_client_connected",
    hookpoint: Hookpoint::ClientConnected,
    function: || Function::ClientConnected,
};
/// `on_subscribe_lookup`: the client's stored subscriptions (`mqtt_sub`), for the host to apply.
pub const ON_SUBSCRIBE_LOOKUP: Builtin = Builtin {
    name: "on_subscribe_lookup",
    hookpoint: Hookpoint::ClientConnected,
    function: || Function::SubscribeLookup,
};
/// `on_client_disconnected`: the client offline in `mqtt_client`, with time.
pub const ON_CLIENT_DISCONNECTED: Builtin = Builtin {
    name: "on_client_disconnected",
    hookpoint: Hookpoint::ClientDisconnected,
    function: || Function::ClientDisconnected,
};

const CONNECTED: &str = "INSERT INTO mqtt_client (clientid, state, node, online_at, offline_at) \
                         VALUES ($1, 1, $2, now(), NULL) \
                         ON CONFLICT (clientid) DO UPDATE SET state = 1, node = excluded.node, online_at = now(), offline_at = NULL";

const DISCONNECTED: &str = "INSERT INTO mqtt_client (clientid, state, node, offline_at) \
                            VALUES ($1, 0, $2, now()) \
                            ON CONFLICT (clientid) DO UPDATE SET state = 0, offline_at = now()";

const SUBSCRIPTIONS: &str = "SELECT topic, qos FROM mqtt_sub WHERE clientid = $1 ORDER BY topic";

pub fn connected(pool: &str, clientid: &str, node: &str) -> Result<(), sql::Error> {
    sql::execute(pool, CONNECTED, &[db::text(clientid), db::text(node)]).map(drop)
}

pub fn disconnected(pool: &str, clientid: &str, node: &str) -> Result<(), sql::Error> {
    sql::execute(pool, DISCONNECTED, &[db::text(clientid), db::text(node)]).map(drop)
}

/// The client's stored subscriptions; a row whose filter or QoS is invalid is skipped with a warning.
pub fn subscriptions(pool: &str, clientid: &str) -> Result<Vec<Subscription>, sql::Error> {
    let rows = sql::query(pool, SUBSCRIPTIONS, &[db::text(clientid)])?.rows;
    let mut subscriptions = Vec::with_capacity(rows.len());
    for row in rows {
        let filter = db::string(&row, 0)?;
        let qos = db::int64(&row, 1)?;
        match (crate::topic::validate_filter(&filter), u8::try_from(qos)) {
            (Ok(()), Ok(qos @ 0..=2)) => subscriptions.push(Subscription { filter, qos }),
            _ => crate::warn(&format!("mqtt_sub of {clientid}: skipping invalid subscription `{filter}` qos {qos}")),
        }
    }
    Ok(subscriptions)
}
