//! The built-in functions, one module each (retained messages share one), each holding its own
//! SQL. The tables are those of `schema/schema.sql`.

pub mod acked;
pub mod client;
pub mod fetch;
pub mod housekeeping;
pub mod publish;
pub mod retain;
pub mod rows;
