//! The contract's `value` to and from PostgreSQL: parameters converted to the type the server
//! inferred for each, and result cells to values.

use std::error::Error as StdError;

use postgres_types::{FromSql, IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::types::private::BytesMut;
use tokio_postgres::{Row, Statement};

use super::MAX_RESULT_ROWS;
use crate::bindings::{RowSet, SqlError, Value};

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
pub(super) const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// A contract value bound to a parameter, converted to the type the server inferred for it.
#[derive(Debug)]
pub(super) struct Param<'a>(pub(super) &'a Value);

type BoxError = Box<dyn StdError + Sync + Send>;

impl ToSql for Param<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        let mismatch = || -> BoxError {
            format!("cannot bind {} to a parameter of type {ty}; cast it in SQL", kind(self.0)).into()
        };
        match self.0 {
            Value::Null => Ok(IsNull::Yes),
            Value::Boolean(b) => match *ty {
                Type::BOOL => b.to_sql(ty, out),
                Type::INT2 | Type::INT4 | Type::INT8 => integer_to_sql(i64::from(*b), ty, out),
                _ => Err(mismatch()),
            },
            Value::Int32(v) => integer_to_sql(i64::from(*v), ty, out),
            Value::Int64(v) => integer_to_sql(*v, ty, out),
            Value::Float64(v) => match *ty {
                Type::FLOAT8 => v.to_sql(ty, out),
                Type::FLOAT4 => (*v as f32).to_sql(ty, out),
                _ => Err(mismatch()),
            },
            Value::Text(s) => text_to_sql(s, ty, out).ok_or_else(mismatch)?,
            Value::Bytes(b) => match *ty {
                Type::BYTEA => b.as_slice().to_sql(ty, out),
                _ => match std::str::from_utf8(b) {
                    Ok(s) => text_to_sql(s, ty, out).ok_or_else(mismatch)?,
                    Err(_) => Err(format!("cannot bind non-UTF-8 bytes to a parameter of type {ty}").into()),
                },
            },
            Value::Timestamp(micros) => match *ty {
                Type::TIMESTAMPTZ | Type::TIMESTAMP => {
                    out.extend_from_slice(&(micros - PG_EPOCH_MICROS).to_be_bytes());
                    Ok(IsNull::No)
                }
                _ => Err(mismatch()),
            },
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

pub(super) fn integer_to_sql(v: i64, ty: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
    let out_of_range = || -> BoxError { format!("{v} is out of range for type {ty}").into() };
    match *ty {
        Type::INT2 => i16::try_from(v).map_err(|_| out_of_range())?.to_sql(ty, out),
        Type::INT4 => i32::try_from(v).map_err(|_| out_of_range())?.to_sql(ty, out),
        Type::INT8 => v.to_sql(ty, out),
        Type::OID => u32::try_from(v).map_err(|_| out_of_range())?.to_sql(ty, out),
        Type::FLOAT8 => (v as f64).to_sql(ty, out),
        Type::TEXT | Type::VARCHAR => v.to_string().to_sql(ty, out),
        _ => Err(format!("cannot bind an integer to a parameter of type {ty}; cast it in SQL").into()),
    }
}

/// Text goes to text-like types as is, and to json/jsonb as their wire format. `None` for a
/// type text does not convert to.
pub(super) fn text_to_sql(s: &str, ty: &Type, out: &mut BytesMut) -> Option<Result<IsNull, BoxError>> {
    match *ty {
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => Some(s.to_sql(&Type::TEXT, out)),
        Type::JSON => {
            out.extend_from_slice(s.as_bytes());
            Some(Ok(IsNull::No))
        }
        Type::JSONB => {
            out.extend_from_slice(&[1]); // jsonb wire format version
            out.extend_from_slice(s.as_bytes());
            Some(Ok(IsNull::No))
        }
        Type::BYTEA => Some(s.as_bytes().to_sql(ty, out)),
        _ => None,
    }
}

pub(super) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Boolean(_) => "a boolean",
        Value::Int32(_) | Value::Int64(_) => "an integer",
        Value::Float64(_) => "a float",
        Value::Text(_) => "text",
        Value::Bytes(_) => "bytes",
        Value::Timestamp(_) => "a timestamp",
    }
}

/// A result cell of any type, read as a contract value.
pub(super) struct Cell(Value);

impl<'a> FromSql<'a> for Cell {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Cell, BoxError> {
        let value = match *ty {
            Type::BOOL => Value::Boolean(bool::from_sql(ty, raw)?),
            Type::INT2 => Value::Int32(i32::from(i16::from_sql(ty, raw)?)),
            Type::INT4 => Value::Int32(i32::from_sql(ty, raw)?),
            Type::INT8 => Value::Int64(i64::from_sql(ty, raw)?),
            Type::OID => Value::Int64(i64::from(u32::from_sql(ty, raw)?)),
            Type::FLOAT4 => Value::Float64(f64::from(f32::from_sql(ty, raw)?)),
            Type::FLOAT8 => Value::Float64(f64::from_sql(ty, raw)?),
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN | Type::JSON => {
                Value::Text(String::from_utf8(raw.to_vec())?)
            }
            Type::JSONB => Value::Text(String::from_utf8(raw.get(1..).unwrap_or_default().to_vec())?),
            Type::BYTEA => Value::Bytes(raw.to_vec()),
            Type::TIMESTAMPTZ | Type::TIMESTAMP => Value::Timestamp(i64::from_sql(&Type::INT8, raw)? + PG_EPOCH_MICROS),
            _ => return Err(format!("type {ty} has no contract value; cast the column (e.g. ::text)").into()),
        };
        Ok(Cell(value))
    }

    fn from_sql_null(_: &Type) -> Result<Cell, BoxError> {
        Ok(Cell(Value::Null))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

pub(super) fn row_set(statement: &Statement, rows: Vec<Row>) -> Result<RowSet, SqlError> {
    if rows.len() > MAX_RESULT_ROWS {
        return Err(SqlError::TooLarge(format!("the result has more than {MAX_RESULT_ROWS} rows; page it (LIMIT)")));
    }
    let columns: Vec<String> = statement.columns().iter().map(|c| c.name().to_owned()).collect();
    let rows = rows
        .iter()
        .map(|row| {
            (0..columns.len())
                .map(|i| {
                    row.try_get::<_, Cell>(i).map(|cell| cell.0).map_err(|e| {
                        SqlError::UnsupportedType(format!(
                            "column {}: {}",
                            columns[i],
                            e.source().map_or(e.to_string(), |s| s.to_string())
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RowSet { columns, rows })
}
