//! The two topic matchers agree: the SQL a fetch runs (a prefix range on the `"C"`-collated
//! topic column plus a regular expression, evaluated by PostgreSQL) and `mqtt-topic`'s Rust
//! matcher, on generated topics and filters with regular-expression metacharacters, `$` topics,
//! empty levels and non-ASCII text: every (filter, stored topic) pair, thousands of them.

use std::collections::BTreeSet;

use host_harness::bindings::{Client, Message, PublishOutcome, Subscription};
use integration_tests::cases::Cases;
use integration_tests::{TestDb, offline_rules};

/// Level pieces: plain, regex metacharacters, empty, non-ASCII.
const PIECES: [&str; 16] =
    ["a", "b", "ab", "a.b", ".*", "(x)", "[y]", "a|b", "^$", "\\", "{2}", "?", "", "é", "中文", "🦀"];

fn topic(cases: &mut Cases) -> String {
    let levels = 1 + cases.below(4) as usize;
    let mut topic: Vec<String> = (0..levels).map(|_| cases.pick(&PIECES).to_string()).collect();
    if cases.below(8) == 0 {
        topic[0] = "$SYS".into();
    }
    topic.join("/")
}

/// A filter made from a topic (so that it matches some): levels turned into `+`, or cut off by
/// `#`; now and then one from scratch.
fn filter(cases: &mut Cases, topics: &[String]) -> String {
    let source = if cases.below(4) == 0 { topic(cases) } else { cases.pick(topics).clone() };
    let mut levels: Vec<String> = source.split('/').map(str::to_owned).collect();
    for level in &mut levels {
        if cases.below(3) == 0 {
            *level = "+".into();
        }
    }
    if cases.below(3) == 0 {
        let keep = cases.below(levels.len() as u64 + 1) as usize;
        levels.truncate(keep);
        levels.push("#".into());
    }
    levels.join("/")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sql_matcher_and_the_rust_matcher_agree_on_generated_topics_and_filters() {
    let db = TestDb::create("topic_matching").await;
    // `#` does not match `$` topics (MQTT 4.7.2): second rules store and fetch those.
    let opts = r#"{"first_fetch": "earliest", "max_returned_count": 1000}"#;
    let sys = format!(
        "backend.pgsql.hook.message.publish.2 = {{\"topic\": \"$SYS/#\", \"action\": {{\"function\": \"on_message_publish\"}}, \"pool\": \"pool1\"}}\n\
         backend.pgsql.hook.session.subscribed.2 = {{\"topic\": \"$SYS/#\", \"action\": {{\"function\": \"on_message_fetch\"}}, \"offline_opts\": {opts}, \"pool\": \"pool1\"}}"
    );
    let rules = format!("{}\n{sys}\n", db.rules(&offline_rules(opts)));
    let host = db.host(&rules).await;
    let mut cases = Cases(0xD1B5_4A32_D192_ED03);

    let mut topics: Vec<String> = (0..120).map(|_| topic(&mut cases)).collect();
    topics.extend(["a", "a/", "/a", "/", "a//b", "$SYS/a"].map(String::from));
    let messages: Vec<Message> = topics
        .iter()
        .enumerate()
        .map(|(i, topic)| Message {
            id: None,
            msgid: format!("m{i}"),
            sender: "generator".into(),
            topic: topic.clone(),
            payload: i.to_string().into_bytes(),
            qos: 1,
            retain: false,
            timestamp: 0,
            properties: vec![],
        })
        .collect();
    let outcomes = host.call(async |i| i.message_publish(&messages).await).await.unwrap();
    assert!(outcomes.iter().all(|o| matches!(o, PublishOutcome::Stored(_))), "{outcomes:?}");

    let mut filters: BTreeSet<String> = (0..60).map(|_| filter(&mut cases, &topics)).collect();
    filters.extend(["#", "+", "+/#", "/#", "+/+", "$SYS/#", "a/#", "a/+"].map(String::from));
    let mut pairs = 0;
    for (n, filter) in filters.iter().enumerate() {
        if let Err(e) = mqtt_topic::validate_filter(filter) {
            panic!("the generator made an invalid filter {filter:?}: {e}");
        }
        let client = Client { clientid: format!("c{n}"), username: None, peerhost: None };
        let subscription = Subscription { filter: filter.clone(), qos: 1 };
        let page = host.call(async |i| i.session_subscribed(&client, &subscription).await).await.unwrap().unwrap();
        assert!(page.next.is_none(), "one page holds them all");
        let fetched: BTreeSet<usize> =
            page.messages.iter().map(|m| String::from_utf8_lossy(&m.payload).parse().unwrap()).collect();
        let expected: BTreeSet<usize> =
            (0..topics.len()).filter(|&i| mqtt_topic::matches(filter, &topics[i])).collect();
        let differ: Vec<(&str, bool)> =
            fetched.symmetric_difference(&expected).map(|&i| (topics[i].as_str(), fetched.contains(&i))).collect();
        assert!(differ.is_empty(), "filter {filter:?}: (topic, fetched by SQL) where Rust disagrees: {differ:?}");
        pairs += topics.len();
    }
    assert!(pairs > 5_000, "{pairs} pairs");
}
