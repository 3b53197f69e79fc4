//! The built-in functions, one module each, each holding its own SQL. The tables are those of
//! `schema/schema.sql`.

pub mod acked;
pub mod fetch;
pub mod publish;
