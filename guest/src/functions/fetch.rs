//! on_message_fetch: hand a subscriber the stored messages it has not read, oldest first, one
//! page at a time.
//!
//! A read position is kept per (clientid, subscription filter) in `mqtt_acked.mid`: every stored
//! message up to that id has been acked. Because publishers take the commit-order lock, ids
//! become visible in order, so nothing below a position can still appear later.

use crate::bindings::broker::extension::sql::{self, Value};
use crate::bindings::broker::extension::types::Message;
use crate::db::{self, Query};
use crate::functions::rows;
use crate::rules::{FirstFetch, OfflineOpts};
use crate::topic;

/// Finds or creates the subscriber's position. A first subscription starts after the newest
/// stored message (`first_fetch: latest`, EMQX's behaviour) or before all of them (`earliest`).
/// Also stores the filter's regex, which on_message_acked matches topics with.
const POSITION: &str = "INSERT INTO mqtt_acked (clientid, topic, topic_re, mid) \
                        VALUES ($1, $2, $3, CASE WHEN $4 THEN 0 ELSE (SELECT coalesce(max(id), 0) FROM mqtt_msg) END) \
                        ON CONFLICT (clientid, topic) DO UPDATE SET topic_re = excluded.topic_re \
                        RETURNING mid";

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
    let params = [
        db::text(clientid),
        db::text(filter),
        Value::Text(topic::filter_regex(filter)),
        Value::Boolean(opts.first_fetch == FirstFetch::Earliest),
    ];
    let position = sql::query(pool, POSITION, &params)?;
    let after_id = db::int64(position.rows.first().map_or(&[][..], |r| r), 0)?;
    page(pool, opts, filter, Cursor { rule_index, after_id })
}

/// The page after `cursor`: unread, unexpired, within time_range, oldest first.
pub fn page(pool: &str, opts: &OfflineOpts, filter: &str, cursor: Cursor) -> Result<Page, sql::Error> {
    let select = format!("SELECT id, retain, {} FROM mqtt_msg WHERE id > $1{}", rows::COLUMNS, rows::NOT_EXPIRED);
    let mut query = Query::new(&select, vec![Value::Int64(cursor.after_id)]);
    topic::push_match(&mut query, filter);
    if let Some(secs) = opts.time_range_secs {
        query.bind(" AND arrived >= now() - ?::float8 * interval '1 second'", Value::Float64(secs as f64));
    }
    let limit = opts.max_returned_count;
    query.bind(" ORDER BY id LIMIT ?", Value::Int64(i64::from(limit)));

    let mut rows = query.run(pool)?.rows;
    let messages = rows.iter_mut().map(|row| rows::decode(row)).collect::<Result<Vec<_>, _>>()?;
    let next = match messages.last() {
        Some(last) if messages.len() >= limit as usize => {
            Some(Cursor { rule_index: cursor.rule_index, after_id: last.id.unwrap_or(cursor.after_id) })
        }
        _ => None,
    };
    Ok(Page { messages, next })
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
