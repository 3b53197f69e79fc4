//! `tick`: deletes expired messages, and messages past a store rule's `retention`, in small
//! batches, each its own short transaction: no long locks, no long scans (both deletes walk an
//! index). With a retention, it also keeps `mqtt_msg`'s partitions (schema/schema.sql,
//! `mqtt_msg_upkeep`): whole partitions past it are dropped, so deleted rows do not leave the
//! table bigger than its live rows. With a fetch rule's `position_idle`, also read positions
//! nobody used for that long.

use std::cell::RefCell;

use crate::bindings::broker::extension::sql::{self, Value};
use crate::db;

/// Rows one statement deletes at most.
pub const BATCH: i64 = 1000;

// Rows are named by (id, arrived), the partitioned table's key: with the partition key, each
// row is looked up in its own partition rather than in every one.
const EXPIRED_MESSAGES: &str = "DELETE FROM mqtt_msg WHERE (id, arrived) IN \
                                (SELECT id, arrived FROM mqtt_msg WHERE expires_at <= now() ORDER BY expires_at LIMIT $1)";

const EXPIRED_RETAINED: &str = "DELETE FROM mqtt_retain WHERE topic IN \
                                (SELECT topic FROM mqtt_retain WHERE expires_at <= now() LIMIT $1)";

const TOO_OLD: &str = "DELETE FROM mqtt_msg WHERE (id, arrived) IN \
                       (SELECT id, arrived FROM mqtt_msg WHERE arrived < now() - $1::float8 * interval '1 second' \
                        ORDER BY arrived LIMIT $2)";

const PARTITION_UPKEEP: &str = "SELECT mqtt_msg_upkeep($1::float8 * interval '1 second')";

/// One batch of expired rows of the pool's tables; returns how many were deleted.
pub fn delete_expired(pool: &str) -> Result<u64, sql::Error> {
    let messages = sql::execute(pool, EXPIRED_MESSAGES, &[Value::Int64(BATCH)])?;
    let retained = sql::execute(pool, EXPIRED_RETAINED, &[Value::Int64(BATCH)])?;
    Ok(messages + retained)
}

/// One batch of messages older than `retention_secs`; returns how many were deleted.
pub fn delete_older_than(pool: &str, retention_secs: u64) -> Result<u64, sql::Error> {
    sql::execute(pool, TOO_OLD, &[Value::Float64(retention_secs as f64), Value::Int64(BATCH)])
}

/// Drops the pool's partitions past `retention_secs` (the shortest retention of the pool's store
/// rules: the DELETE above applies each to the whole table), creates the next ones; returns how
/// many it dropped.
pub fn keep_partitions(pool: &str, retention_secs: u64) -> Result<u64, sql::Error> {
    let result = sql::query(pool, PARTITION_UPKEEP, &[Value::Float64(retention_secs as f64)])?;
    let dropped = result.rows.first().map_or(Ok(0), |row| db::int64(row, 0))?;
    Ok(u64::try_from(dropped).unwrap_or(0))
}

/// Read positions a tick looks at, at most: a clock hand over `mqtt_acked`'s primary key, from
/// where the last tick stopped. Each tick is an index range scan of this many rows, whatever the
/// table's size; the hand goes round the whole table in (positions / this) ticks. (An index on
/// `updated` would find idle positions directly, but every ack updates `updated`: indexed, those
/// updates could no longer be HOT, and acks are the hot path.)
pub const POSITIONS_PER_TICK: i64 = 1000;

/// Deletes the idle positions among the next `$3` by key after ($1, $2); returns how many it
/// deleted, how many it looked at (fewer than `$3`: it reached the end, the hand starts over)
/// and the last key it looked at.
const IDLE_POSITIONS: &str = "WITH looked AS (SELECT clientid, topic, updated FROM mqtt_acked \
                                WHERE (clientid, topic) > ($1, $2) ORDER BY clientid, topic LIMIT $3), \
                              gone AS (DELETE FROM mqtt_acked a USING looked l \
                                WHERE a.clientid = l.clientid AND a.topic = l.topic \
                                  AND l.updated < now() - $4::float8 * interval '1 second' RETURNING 1) \
                              SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM looked), last.clientid, last.topic \
                              FROM (SELECT 1) one LEFT JOIN \
                                (SELECT clientid, topic FROM looked ORDER BY clientid DESC, topic DESC LIMIT 1) last ON true";

thread_local! {
    /// Where this instance's hand stopped, per pool. Lost with the instance: the hand starts
    /// over, which costs one more round, never a position.
    static HAND: RefCell<Vec<(String, (String, String))>> = const { RefCell::new(Vec::new()) };
}

/// One step of the hand over the pool's positions; returns how many idle ones it deleted.
pub fn delete_idle_positions(pool: &str, idle_secs: u64) -> Result<u64, sql::Error> {
    let from = HAND.with(|h| h.borrow().iter().find(|(p, _)| p == pool).map(|(_, key)| key.clone()));
    let (clientid, topic) = from.unwrap_or_default();
    let params =
        [db::text(&clientid), db::text(&topic), Value::Int64(POSITIONS_PER_TICK), Value::Float64(idle_secs as f64)];
    let result = sql::query(pool, IDLE_POSITIONS, &params)?;
    let row = result.rows.first().map_or(&[][..], |r| r);
    let deleted = db::int64(row, 0)?;
    let looked = db::int64(row, 1)?;
    let next = match (row.get(2), row.get(3)) {
        (Some(Value::Text(clientid)), Some(Value::Text(topic))) if looked == POSITIONS_PER_TICK => {
            Some((clientid.clone(), topic.clone()))
        }
        _ => None,
    };
    HAND.with(|h| {
        let mut hands = h.borrow_mut();
        hands.retain(|(p, _)| p != pool);
        if let Some(key) = next {
            hands.push((pool.to_owned(), key));
        }
    });
    Ok(u64::try_from(deleted).unwrap_or(0))
}
