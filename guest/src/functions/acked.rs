//! on_message_acked: move the subscriber's read positions forward to the acked message.

use crate::bindings::broker::extension::sql::{self, Value};
use crate::db;
use crate::functions::Builtin;
use crate::hookpoint::Hookpoint;
use crate::rules::Function;

/// `on_message_acked`: move a subscriber's read position to an acked message.
pub const ON_MESSAGE_ACKED: Builtin =
    Builtin { name: "on_message_acked", hookpoint: Hookpoint::MessageAcked, function: || Function::MessageAcked };

/// The positions the host named move to the message, but only forward: an old ack arriving
/// after a newer one changes nothing. No other position of the client moves: whether an ack may
/// move a position depends on what was delivered through that subscription, which only the host
/// knows (a filter the client is not subscribed to, or one whose backlog is still going out,
/// must stay where it is). The filters go as one JSON array: `sql` values have no array type.
const ADVANCE: &str = "UPDATE mqtt_acked SET mid = $2, updated = now() \
                       WHERE clientid = $1 AND mid < $2 \
                         AND topic IN (SELECT jsonb_array_elements_text($3::text::jsonb))";

/// Moves the positions of `filters` to `stored_id`; returns how many moved.
pub fn advance(pool: &str, clientid: &str, stored_id: i64, filters: &[String]) -> Result<u64, sql::Error> {
    if filters.is_empty() {
        return Ok(0);
    }
    let filters = serde_json::to_string(filters).unwrap_or_default();
    sql::execute(pool, ADVANCE, &[db::text(clientid), Value::Int64(stored_id), Value::Text(filters)])
}
