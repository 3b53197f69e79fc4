//! on_message_acked: move the subscriber's read positions forward to the acked message; for a
//! shared subscription, record the ack in its group's position and move the group's mark over
//! what is acked without a gap.

use crate::bindings::broker::extension::sql::{self, Value};
use crate::db;
use crate::functions::Builtin;
use crate::functions::fetch::{self, Cursor};
use crate::hookpoint::Hookpoint;
use crate::rules::{Function, OfflineOpts};
use crate::topic;

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

/// A group's ack: the id joins those acked above the group's mark (once). Returns the mark.
const GROUP_ACKED: &str = "UPDATE mqtt_acked SET acked = array_append(coalesce(acked, '{}'), $3), updated = now() \
                           WHERE clientid = $1 AND topic = $2 AND mid < $3 AND NOT ($3 = ANY (coalesce(acked, '{}'))) \
                           RETURNING mid";

/// The mark moves to the highest acked id below the first message of the filter nobody acked
/// ($3), and what it passed leaves `acked`. Only forward, whatever another member's ack did
/// meanwhile (the row's latest version is the one updated).
const GROUP_MARK: &str = "UPDATE mqtt_acked a SET mid = n.mark, \
                            acked = ARRAY(SELECT x FROM unnest(a.acked) x WHERE x > n.mark ORDER BY x), updated = now() \
                          FROM (SELECT max(x) AS mark FROM mqtt_acked g, unnest(g.acked) x \
                                WHERE g.clientid = $1 AND g.topic = $2 AND x < $3) n \
                          WHERE a.clientid = $1 AND a.topic = $2 AND n.mark > a.mid";

/// Moves the positions of `filters` to `stored_id`; returns how many moved. `opts` gives the
/// fetch options that serve a shared subscription (what its fetch passes over is no gap).
pub fn advance(
    pool: &str,
    clientid: &str,
    stored_id: i64,
    filters: &[String],
    opts: impl Fn(&str) -> OfflineOpts,
) -> Result<u64, sql::Error> {
    let (shared, own): (Vec<&String>, Vec<&String>) = filters.iter().partition(|f| topic::shared(f).is_some());
    let mut moved = 0;
    for filter in shared {
        moved += group_acked(pool, &opts(filter), filter, stored_id)?;
    }
    if own.is_empty() || fetch::reserved(clientid) {
        return Ok(moved);
    }
    let filters = serde_json::to_string(&own).unwrap_or_default();
    Ok(moved + sql::execute(pool, ADVANCE, &[db::text(clientid), Value::Int64(stored_id), Value::Text(filters)])?)
}

/// Records a member's ack of `stored_id` in the group of `subscription` (`$share/<group>/<filter>`).
fn group_acked(pool: &str, opts: &OfflineOpts, subscription: &str, stored_id: i64) -> Result<u64, sql::Error> {
    let reader = fetch::reader("", subscription);
    let (owner, filter) = (db::text(&reader.owner), db::text(reader.filter));
    let recorded = sql::query(pool, GROUP_ACKED, &[owner.clone(), filter.clone(), Value::Int64(stored_id)])?;
    let Some(row) = recorded.rows.first() else { return Ok(0) };
    let mark = Cursor::after(db::int64(row, 0)?);
    let gap = fetch::next_id(pool, opts, subscription, &mark)?.unwrap_or(i64::MAX);
    sql::execute(pool, GROUP_MARK, &[owner, filter, Value::Int64(gap)]).map(|_| 1)
}
