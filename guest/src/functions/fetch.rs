//! on_message_fetch: hand a subscriber the stored messages it has not read, oldest first, one
//! page at a time.
//!
//! A read position is kept per (clientid, subscription filter) in `mqtt_acked.mid`: every stored
//! message up to that id has been acked. Because publishers take the commit-order lock, ids
//! become visible in order, so nothing below a position can still appear later.

use crate::bindings::broker::extension::sql::{self, Value};
use crate::bindings::broker::extension::types::{Message, Property};
use crate::db;
use crate::rules::OfflineOpts;
use crate::topic;

/// Finds or creates the subscriber's position. A first subscription starts at the newest stored
/// message (EMQX's behaviour): what was published before it is not offline for this client.
/// Also stores the filter's regex, which on_message_acked matches topics with.
const POSITION: &str = "INSERT INTO mqtt_acked (clientid, topic, topic_re, mid) \
                        VALUES ($1, $2, $3, (SELECT coalesce(max(id), 0) FROM mqtt_msg)) \
                        ON CONFLICT (clientid, topic) DO UPDATE SET topic_re = excluded.topic_re \
                        RETURNING mid";

const PAGE: &str = "SELECT id, msgid, sender, topic, qos, retain, payload, arrived, properties::text \
                    FROM mqtt_msg WHERE id > $1";

/// Where the next page starts: the rule that made the page (its `N`) and the last id handed out.
/// The host treats it as opaque.
#[derive(Debug, PartialEq, Eq)]
pub struct Cursor {
    pub rule_index: u32,
    pub after_id: i64,
}

impl Cursor {
    pub fn encode(&self) -> String {
        format!("{}:{}", self.rule_index, self.after_id)
    }

    pub fn decode(text: &str) -> Result<Cursor, String> {
        let bad = || format!("malformed cursor `{text}`");
        let (rule, id) = text.split_once(':').ok_or_else(bad)?;
        Ok(Cursor { rule_index: rule.parse().map_err(|_| bad())?, after_id: id.parse().map_err(|_| bad())? })
    }
}

pub struct Page {
    pub messages: Vec<Message>,
    pub next: Option<Cursor>,
}

/// The first page for a (new) subscription.
pub fn first_page(
    pool: &str,
    rule_index: u32,
    opts: &OfflineOpts,
    clientid: &str,
    filter: &str,
) -> Result<Page, sql::Error> {
    let params = [db::text(clientid), db::text(filter), Value::Text(topic::filter_regex(filter))];
    let position = sql::query(pool, POSITION, &params)?;
    let after_id = db::int64(position.rows.first().map_or(&[][..], |r| r), 0)?;
    page(pool, opts, filter, Cursor { rule_index, after_id })
}

/// The page after `cursor`.
pub fn page(pool: &str, opts: &OfflineOpts, filter: &str, cursor: Cursor) -> Result<Page, sql::Error> {
    // The statement is built from fixed fragments; the filter and every other value are parameters.
    let mut statement = String::from(PAGE);
    let mut params = vec![Value::Int64(cursor.after_id)];
    let mut bind = |statement: &mut String, fragment: &str, value: Value| {
        params.push(value);
        statement.push_str(&fragment.replace('?', &format!("${}", params.len())));
    };
    if !topic::has_wildcard(filter) {
        bind(&mut statement, " AND topic = ?", db::text(filter));
    } else {
        if let Some((low, high)) = topic::literal_prefix_range(filter) {
            bind(&mut statement, " AND topic >= ?", Value::Text(low));
            bind(&mut statement, " AND topic < ?", Value::Text(high));
        }
        bind(&mut statement, " AND topic ~ ?", Value::Text(topic::filter_regex(filter)));
    }
    if let Some(secs) = opts.time_range_secs {
        bind(&mut statement, " AND arrived >= now() - ?::float8 * interval '1 second'", Value::Float64(secs as f64));
    }
    let limit = opts.max_returned_count;
    bind(&mut statement, " ORDER BY id LIMIT ?", Value::Int64(i64::from(limit)));

    let mut rows = sql::query(pool, &statement, &params)?.rows;
    let messages = rows.iter_mut().map(|row| decode(row)).collect::<Result<Vec<_>, _>>()?;
    let full = messages.len() >= limit as usize;
    let next = match messages.last() {
        Some(last) if full => Some(Cursor { rule_index: cursor.rule_index, after_id: last.id.unwrap_or(cursor.after_id) }),
        _ => None,
    };
    Ok(Page { messages, next })
}

fn decode(row: &mut [Value]) -> Result<Message, sql::Error> {
    let properties = match db::optional_string(row, 8)? {
        None => Vec::new(),
        Some(json) => serde_json::from_str::<Vec<(String, String)>>(&json)
            .unwrap_or_default()
            .into_iter()
            .map(|(key, value)| Property { key, value })
            .collect(),
    };
    Ok(Message {
        id: Some(db::int64(row, 0)?),
        msgid: db::string(row, 1)?,
        sender: db::string(row, 2)?,
        topic: db::string(row, 3)?,
        qos: u8::try_from(db::int64(row, 4)?).unwrap_or(1),
        retain: db::boolean(row, 5)?,
        payload: db::bytes(row, 6)?,
        timestamp: db::timestamp_micros(row, 7)?.div_euclid(1000),
        properties,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        let cursor = Cursor { rule_index: 3, after_id: 9_000_000_000 };
        assert_eq!(Cursor::decode(&cursor.encode()), Ok(cursor));
        for bad in ["", "3", "x:1", "3:y", "3:1:2"] {
            assert!(Cursor::decode(bad).is_err(), "{bad:?}");
        }
    }
}
