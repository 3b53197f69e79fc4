//! `tick`: deletes expired messages, and messages past a store rule's `retention`, in small
//! batches, each its own short transaction: no long locks, no long scans (both deletes walk an
//! index).

use crate::bindings::broker::extension::sql::{self, Value};

/// Rows one statement deletes at most.
pub const BATCH: i64 = 1000;

const EXPIRED_MESSAGES: &str = "DELETE FROM mqtt_msg WHERE id IN \
                                (SELECT id FROM mqtt_msg WHERE expires_at <= now() ORDER BY expires_at LIMIT $1)";

const EXPIRED_RETAINED: &str = "DELETE FROM mqtt_retain WHERE topic IN \
                                (SELECT topic FROM mqtt_retain WHERE expires_at <= now() LIMIT $1)";

const TOO_OLD: &str = "DELETE FROM mqtt_msg WHERE id IN \
                       (SELECT id FROM mqtt_msg WHERE arrived < now() - $1::float8 * interval '1 second' \
                        ORDER BY arrived LIMIT $2)";

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
