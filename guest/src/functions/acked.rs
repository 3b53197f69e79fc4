//! on_message_acked: move the subscriber's read position forward to the acked message.

use crate::bindings::broker::extension::sql::{self, Value};
use crate::db;

/// Every position of the client whose filter matches the message's topic moves to the message,
/// but only forward: an old ack arriving after a newer one changes nothing.
const ADVANCE: &str = "UPDATE mqtt_acked a SET mid = m.id, updated = now() \
                       FROM mqtt_msg m \
                       WHERE m.id = $2 AND a.clientid = $1 AND m.topic ~ a.topic_re AND a.mid < m.id";

pub fn advance(pool: &str, clientid: &str, stored_id: i64) -> Result<(), sql::Error> {
    sql::execute(pool, ADVANCE, &[db::text(clientid), Value::Int64(stored_id)])?;
    Ok(())
}
