//! A misbehaving extension, for the host's sandbox tests. `message-publish` does what the
//! message's topic says: `loop` never returns, `bomb` allocates until it is stopped, `panic`
//! panics, `print` writes to stdout; anything else is simply not stored.

mod bindings {
    wit_bindgen::generate!({ path: "../../wit", world: "extension" });
}

use bindings::broker::extension::types::{Client, Message, Subscription};
use bindings::exports::broker::extension::hooks::{
    ConfigError, Configuration, FetchPage, Guest, HookError, Interest, PublishOutcome, Skipped,
};

struct Hostile;

impl Guest for Hostile {
    /// Every hook, for every topic: the host calls each.
    fn configure(_: Configuration) -> Result<Vec<Interest>, ConfigError> {
        use bindings::exports::broker::extension::hooks::Hookpoint::*;
        let every = [
            ClientConnected,
            ClientDisconnected,
            SessionSubscribed,
            SessionUnsubscribed,
            MessagePublish,
            MessageDelivered,
            MessageAcked,
        ];
        Ok(every.into_iter().map(|hookpoint| Interest { hookpoint, topics: None }).collect())
    }

    fn message_publish(messages: Vec<Message>) -> Vec<PublishOutcome> {
        for message in &messages {
            match message.topic.as_str() {
                "loop" => loop {
                    std::hint::black_box(());
                },
                "bomb" => {
                    let mut hoard: Vec<Vec<u8>> = Vec::new();
                    loop {
                        hoard.push(vec![1; 1 << 20]);
                        std::hint::black_box(&hoard);
                    }
                }
                "panic" => panic!("the hostile guest panics on purpose"),
                "print" => println!("hello from the hostile guest"),
                _ => {}
            }
        }
        messages.iter().map(|_| PublishOutcome::NotStored).collect()
    }

    fn client_connected(_: Client) -> Result<Vec<Subscription>, HookError> {
        Ok(Vec::new())
    }

    fn client_disconnected(_: Client, _: String) -> Result<(), HookError> {
        Ok(())
    }

    fn session_subscribed(_: Client, _: Subscription) -> Result<FetchPage, HookError> {
        Ok(FetchPage { messages: Vec::new(), next: None })
    }

    fn session_fetch_next(_: Client, _: Subscription, _: String) -> Result<FetchPage, HookError> {
        Ok(FetchPage { messages: Vec::new(), next: None })
    }

    fn session_resume(_: Client, _: Subscription) -> Result<FetchPage, HookError> {
        Ok(FetchPage { messages: Vec::new(), next: None })
    }

    fn session_fetch_one(_: Client, _: Subscription, _: Option<String>) -> Result<FetchPage, HookError> {
        Ok(FetchPage { messages: Vec::new(), next: None })
    }

    fn session_skip(_: Client, _: Subscription, _: Option<String>) -> Result<Option<Skipped>, HookError> {
        Ok(None)
    }

    fn session_unsubscribed(_: Client, _: String) -> Result<(), HookError> {
        Ok(())
    }

    fn message_delivered(_: Client, _: Message) -> Result<(), HookError> {
        Ok(())
    }

    fn message_acked(_: Client, _: Message, _: Vec<String>) -> Result<(), HookError> {
        Ok(())
    }

    fn tick() -> Result<u64, HookError> {
        Ok(0)
    }
}

bindings::export!(Hostile with_types_in bindings);
