//! Helpers the suite's tests share: building records and driving the provider through
//! common steps.

use std::time::Duration;

use keel_core::{Codec, ExecutionId, InstanceId, Message, Payload};
use keel_provider::{Ack, FetchOrchestrations, NewInstance, OrchestrationWork, Provider};

/// The lock time tests use when they do not test locks.
pub const LOCK: Duration = Duration::from_secs(60);

/// An instance id, panicking on a bad literal (tests only pass good ones).
pub fn id(s: &str) -> InstanceId {
    InstanceId::new(s).expect("test ids are valid")
}

/// A JSON payload of `value`.
pub fn payload(value: &serde_json::Value) -> Payload {
    Codec::default().encode(value).expect("JSON values encode")
}

/// A new instance of orchestration "test" with input `{"n": 1}`.
pub fn new_instance(instance: &str) -> NewInstance {
    NewInstance::new(id(instance), "test", payload(&serde_json::json!({"n": 1})))
}

/// A signal message.
pub fn signal(name: &str, n: i64) -> Message {
    Message::Signal {
        name: name.to_owned(),
        payload: payload(&serde_json::json!(n)),
    }
}

/// Fetches up to `max` instances with their history, locked for [`LOCK`].
pub async fn fetch(provider: &dyn Provider, max: usize) -> Vec<OrchestrationWork> {
    provider
        .fetch_orchestrations(FetchOrchestrations {
            max_instances: max,
            lock_for: LOCK,
            with_history: true,
        })
        .await
        .expect("fetch succeeds")
}

/// Fetches exactly one instance, panicking otherwise.
pub async fn fetch_one(provider: &dyn Provider) -> OrchestrationWork {
    let mut work = fetch(provider, 10).await;
    assert_eq!(
        work.len(),
        1,
        "expected exactly one instance with work, got {}",
        work.len()
    );
    work.remove(0)
}

/// An ack of `work` that consumes all its messages and changes nothing else.
pub fn ack_all(work: &OrchestrationWork) -> Ack {
    Ack::new(
        work.lock.clone(),
        work.messages.iter().map(|m| m.id).collect(),
    )
}

/// The first execution.
pub const FIRST: ExecutionId = ExecutionId::FIRST;
