//! A fake database for the fast protocol tier: it answers the extension's fetch and ack
//! statements from memory, records what the guest asked, and fails the page it is told to. With
//! it, the real guest runs in the real host and the real protocol (`Host::with_sql`), and edge
//! cases of the protocol take milliseconds, without PostgreSQL. It knows the guest's statements
//! by how they start and answers in the shape the guest reads (`guest/src/functions/fetch.rs`,
//! `acked.rs`); any other statement is an error that names it, so a test never passes on a
//! statement the fake did not understand. The real-PostgreSQL tiers check the SQL itself.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use host_harness::bindings::{RowSet, SqlError, Value};
use host_harness::sql::{SqlBackend, SqlTransaction};

#[derive(Default)]
pub struct FakeSql {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Stored messages: (id, topic, payload), by id. Every filter matches every message: tests
    /// use one topic.
    messages: Vec<(i64, String, Vec<u8>)>,
    /// Read positions by (clientid, filter): where each started (`since`), and where it is.
    positions: HashMap<(String, String), Position>,
    /// The page statements served so far, and their LIMITs.
    page_limits: Vec<i64>,
    /// The page (0-based, counted over the fake's life) that fails, if any.
    failing_page: Option<usize>,
    /// What `on_message_acked` asked: (clientid, stored id, filters), in order.
    acks: Vec<(String, i64, Vec<String>)>,
}

/// A read position: where it started (`since`), and where it is (`mid`).
struct Position {
    since: i64,
    mid: i64,
}

impl FakeSql {
    /// Stores a message; returns its id.
    pub fn store(&self, topic: &str, payload: &str) -> i64 {
        let mut state = self.state.lock().unwrap();
        let id = state.messages.len() as i64 + 1;
        state.messages.push((id, topic.to_owned(), payload.as_bytes().to_vec()));
        id
    }

    /// Stores messages with payloads "1" to "n" on `topic`.
    pub fn store_many(&self, topic: &str, n: usize) {
        for i in 1..=n {
            self.store(topic, &i.to_string());
        }
    }

    /// The page statement number `n` (0-based, from the fake's start) fails as a lost
    /// connection would; `None`: none does.
    pub fn fail_page(&self, n: Option<usize>) {
        self.state.lock().unwrap().failing_page = n;
    }

    pub fn acks(&self) -> Vec<(String, i64, Vec<String>)> {
        self.state.lock().unwrap().acks.clone()
    }

    pub fn page_limits(&self) -> Vec<i64> {
        self.state.lock().unwrap().page_limits.clone()
    }

    pub fn position(&self, clientid: &str, filter: &str) -> Option<i64> {
        self.state.lock().unwrap().positions.get(&(clientid.to_owned(), filter.to_owned())).map(|p| p.mid)
    }

    fn answer(&self, statement: &str, params: &[Value]) -> Result<RowSet, SqlError> {
        let mut state = self.state.lock().unwrap();
        let text = |i: usize| match params.get(i) {
            Some(Value::Text(t)) => Ok(t.clone()),
            other => Err(SqlError::InvalidParameter(format!("fake: parameter {i} is not text: {other:?}"))),
        };
        let int = |i: usize| match params.get(i) {
            Some(Value::Int64(v)) => Ok(*v),
            other => Err(SqlError::InvalidParameter(format!("fake: parameter {i} is not an int64: {other:?}"))),
        };
        let rows = |rows: Vec<Vec<Value>>| Ok(RowSet { columns: Vec::new(), rows });
        if statement.starts_with("INSERT INTO mqtt_acked") {
            // The position: found, or created (first_fetch: earliest starts at 0, latest after
            // the newest message).
            let earliest = matches!(params.get(3), Some(Value::Boolean(true)));
            let newest = state.messages.last().map_or(0, |m| m.0);
            let key = (text(0)?, text(1)?);
            let start = if earliest { 0 } else { newest };
            let position = state.positions.entry(key).or_insert(Position { since: start, mid: start });
            return rows(vec![vec![Value::Int64(position.mid)]]);
        }
        if statement.starts_with("SELECT topic, since, mid FROM mqtt_acked") {
            // The client's positions of its other filters that passed something since they started.
            let (clientid, filter) = (text(0)?, text(1)?);
            let others = state.positions.iter().filter(|((c, f), p)| *c == clientid && *f != filter && p.since < p.mid);
            return rows(
                others
                    .map(|((_, f), p)| vec![Value::Text(f.clone()), Value::Int64(p.since), Value::Int64(p.mid)])
                    .collect(),
            );
        }
        if statement.starts_with("SELECT mid FROM mqtt_acked") {
            let mid = state.positions.get(&(text(0)?, text(1)?)).map(|p| p.mid);
            return rows(mid.into_iter().map(|m| vec![Value::Int64(m)]).collect());
        }
        if statement.starts_with("SELECT id, false,") {
            // A page: after the cursor ($1), the first LIMIT (the last parameter but one) by id.
            let after = int(0)?;
            let limit = int(params.len().saturating_sub(2))?;
            let served = state.page_limits.len();
            state.page_limits.push(limit);
            if state.failing_page == Some(served) {
                return Err(SqlError::Connection("fake: the connection was lost during this page".into()));
            }
            let page: Vec<&(i64, String, Vec<u8>)> =
                state.messages.iter().filter(|m| m.0 > after).take(limit as usize).collect();
            let candidates = page.len() as i64;
            return rows(
                page.into_iter()
                    .map(|(id, topic, payload)| {
                        vec![
                            Value::Int64(*id),
                            Value::Boolean(false),
                            Value::Text(format!("m{id}")),
                            Value::Text("p".into()),
                            Value::Text(topic.clone()),
                            Value::Int32(1),
                            Value::Bytes(payload.clone()),
                            Value::Timestamp(0),
                            Value::Null,
                            Value::Null,
                            Value::Int64(candidates),
                        ]
                    })
                    .collect(),
            );
        }
        let start: String = statement.chars().take(60).collect();
        Err(SqlError::InvalidParameter(format!("fake: a statement it does not know: {start}...")))
    }
}

#[async_trait]
impl SqlBackend for FakeSql {
    async fn query(&self, _pool: &str, statement: &str, params: &[Value]) -> Result<RowSet, SqlError> {
        self.answer(statement, params)
    }

    async fn execute(&self, _pool: &str, statement: &str, params: &[Value]) -> Result<u64, SqlError> {
        if statement.starts_with("UPDATE mqtt_acked SET mid") {
            // on_message_acked: ($1 clientid, $2 id, $3 the filters as a JSON array), forward only.
            let (Some(Value::Text(clientid)), Some(Value::Int64(id)), Some(Value::Text(filters))) =
                (params.first(), params.get(1), params.get(2))
            else {
                return Err(SqlError::InvalidParameter(format!("fake: ack parameters {params:?}")));
            };
            let filters: Vec<String> = serde_json::from_str(filters).unwrap_or_default();
            let mut state = self.state.lock().unwrap();
            state.acks.push((clientid.clone(), *id, filters.clone()));
            let mut moved = 0;
            for filter in filters {
                if let Some(position) = state.positions.get_mut(&(clientid.clone(), filter)).filter(|p| p.mid < *id) {
                    position.mid = *id;
                    moved += 1;
                }
            }
            return Ok(moved);
        }
        self.answer(statement, params).map(|rows| rows.rows.len() as u64)
    }

    async fn begin(&self, _pool: &str) -> Result<Box<dyn SqlTransaction>, SqlError> {
        Err(SqlError::Connection("fake: no transactions".into()))
    }
}
