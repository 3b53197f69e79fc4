//! Hook overhead: what crossing into the guest costs, with no database in the way: a hook with
//! no rule to run, and a hook that makes one host `sql` call answered by a stub.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use host_harness::bindings::{Client, Configuration, Message, RowSet, SqlError, Value};
use host_harness::metrics::Metrics;
use host_harness::sql::{SqlBackend, SqlTransaction};
use integration_tests::guest_module;

use crate::median;

/// Answers every statement at once with nothing.
pub struct Stub;

#[async_trait]
impl SqlBackend for Stub {
    async fn query(&self, _: &str, _: &str, _: &[Value]) -> Result<RowSet, SqlError> {
        Ok(RowSet { columns: vec![], rows: vec![] })
    }

    async fn execute(&self, _: &str, _: &str, _: &[Value]) -> Result<u64, SqlError> {
        Ok(1)
    }

    async fn begin(&self, _: &str) -> Result<Box<dyn SqlTransaction>, SqlError> {
        Err(SqlError::Connection("the stub has no transactions".into()))
    }
}

const CALLS: u32 = 100_000;

pub async fn run(runs: usize) -> anyhow::Result<()> {
    let mut instance = guest_module().instantiate(Arc::new(Stub), Arc::new(Metrics::default())).await?;
    let rules = Configuration {
        source: "bench".into(),
        text: "backend.pgsql.hook.message.acked.1 = {\"action\": {\"function\": \"on_message_acked\"}, \"pool\": \"stub\"}\n\
               backend.pgsql.hook.message.publish.1 = {\"action\": {\"function\": \"on_message_publish\"}, \"pool\": \"stub\"}"
            .into(),
        pools: vec!["stub".into()],
        node: "bench".into(),
    };
    instance.configure(&rules).await?.map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let client = Client { clientid: "c".into(), username: None, peerhost: None };
    // The ack moves the position of one subscription, as a broker names it.
    let positions = vec!["t/#".to_owned()];
    let message = Message {
        id: Some(1),
        msgid: "m".into(),
        sender: "p".into(),
        topic: "t".into(),
        payload: vec![0; 100],
        qos: 1,
        retain: false,
        timestamp: 0,
        properties: vec![],
    };
    let (mut no_op, mut one_sql, mut publish) = (Vec::new(), Vec::new(), Vec::new());
    let to_publish = [Message { id: None, ..message.clone() }];
    for _ in 0..runs {
        let started = Instant::now();
        for _ in 0..CALLS {
            instance.message_delivered(&client, &message).await?.map_err(|e| anyhow::anyhow!("{e:?}"))?;
        }
        no_op.push(started.elapsed().as_nanos() as f64 / f64::from(CALLS));
        let started = Instant::now();
        for _ in 0..CALLS {
            instance.message_acked(&client, &message, &positions).await?.map_err(|e| anyhow::anyhow!("{e:?}"))?;
        }
        one_sql.push(started.elapsed().as_nanos() as f64 / f64::from(CALLS));
        let started = Instant::now();
        for _ in 0..CALLS {
            instance.message_publish(&to_publish).await?;
        }
        publish.push(started.elapsed().as_nanos() as f64 / f64::from(CALLS));
    }
    println!("\n## hook overhead ({CALLS} calls, a 100-byte message)");
    println!("| call | median µs per call |\n|---|---|");
    println!("| message-delivered, no rule (a no-op hook) | {:.2} |", median(no_op) / 1000.0);
    println!("| message-acked, one host `sql` call (stubbed) | {:.2} |", median(one_sql) / 1000.0);
    println!(
        "| message-publish of one message, on_message_publish (its INSERT stubbed) | {:.2} |",
        median(publish) / 1000.0
    );
    Ok(())
}
