//! Every record type round-trips exactly through `encode_record`/`decode_record` and
//! through serde_json, compact and pretty (histories are also kept as readable JSON
//! files), and the strategies really do reach every variant.

use std::collections::BTreeSet;
use std::fmt::Debug;

use keel_core::{
    Codec, EventKind, Format, InstanceId, InstanceStatus, Message, Payload, QueueName, SideEffect,
    decode_record, encode_record,
};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::strategies::{
    QUEUE_NAME_MAX, activity_options, event, event_kind, failure, instance_status, message,
    parent_link, payload, retry_policy, side_effect, text, work_item,
};

/// Asserts that `value` comes back equal from the record format and from JSON.
fn assert_round_trips<T>(value: &T) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let bytes = encode_record(value).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let back: T = decode_record(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&back, value, "record format");

    let json = serde_json::to_string(value).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let back: T = serde_json::from_str(&json)
        .map_err(|e| TestCaseError::fail(format!("{e} in JSON {json}")))?;
    prop_assert_eq!(&back, value, "JSON {}", json);

    let pretty =
        serde_json::to_string_pretty(value).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let back: T = serde_json::from_str(&pretty)
        .map_err(|e| TestCaseError::fail(format!("{e} in JSON {pretty}")))?;
    prop_assert_eq!(&back, value, "pretty JSON {}", pretty);
    Ok(())
}

proptest! {
    #![proptest_config(crate::config())]

    #[test]
    fn events_round_trip(value in event()) {
        assert_round_trips(&value)?;
    }

    #[test]
    fn event_kinds_round_trip(value in event_kind()) {
        assert_round_trips(&value)?;
    }

    #[test]
    fn messages_round_trip(value in message()) {
        assert_round_trips(&value)?;
    }

    #[test]
    fn work_items_round_trip(value in work_item()) {
        assert_round_trips(&value)?;
        // The jitter seed depends only on identity, so it survives storage.
        let back: keel_core::WorkItem = decode_record(&encode_record(&value).unwrap()).unwrap();
        prop_assert_eq!(back.retry_seed(), value.retry_seed());
    }

    #[test]
    fn failures_round_trip(value in failure()) {
        assert_round_trips(&value)?;
    }

    /// Every finite `f64`, not only the short decimals the composite records use: a
    /// policy read from a JSON history must have the very numbers it was written with,
    /// or the same item gets different retry delays depending on where it was read.
    #[test]
    fn retry_policies_round_trip(value in retry_policy()) {
        assert_round_trips(&value)?;
    }

    #[test]
    fn instance_statuses_round_trip(value in instance_status()) {
        assert_round_trips(&value)?;
        prop_assert_eq!(value.as_str().parse::<InstanceStatus>().unwrap(), value);
    }

    #[test]
    fn parent_links_round_trip(value in parent_link()) {
        assert_round_trips(&value)?;
    }

    #[test]
    fn activity_options_round_trip(value in activity_options()) {
        assert_round_trips(&value)?;
    }

    #[test]
    fn side_effects_round_trip(value in side_effect()) {
        assert_round_trips(&value)?;
    }

    #[test]
    fn payloads_round_trip(value in payload()) {
        assert_round_trips(&value)?;
    }

    /// Not only what a `Codec` writes: any bytes `Payload::from_bytes` accepts are a
    /// payload a record can carry, and must come back byte for byte.
    #[test]
    fn any_accepted_payload_round_trips(
        tag in prop::sample::select(&[0x01_u8, 0x02, 0x81, 0x82][..]),
        body in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..48),
            (text(), "[ \t\r\n]{0,2}", "[ \t\r\n]{0,2}")
                .prop_map(|(t, a, b)| format!("{a}{}{b}", serde_json::json!(t)).into_bytes()),
        ],
    ) {
        let mut bytes = vec![tag];
        bytes.extend_from_slice(&body);
        let value = Payload::from_bytes(bytes).unwrap();
        // Compared as bytes first: `Payload`'s Debug shows JSON text, which hides
        // whitespace.
        let json = serde_json::to_string(&value).unwrap();
        let back: Payload = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(back.as_bytes(), value.as_bytes(), "JSON {}", json);
        assert_round_trips(&value)?;
    }

    /// Ids are checked on the way in from storage as well as on construction: a stored
    /// string decodes to an id exactly when `new` would accept it, in both encodings.
    #[test]
    fn stored_ids_are_validated(
        s in prop_oneof![
            text(),
            "\\PC{250,260}",
            "[a-z]{120,260}",
            Just("x".repeat(InstanceId::MAX_LEN)),
            Just("x".repeat(InstanceId::MAX_LEN + 1)),
            Just("é".repeat(QUEUE_NAME_MAX / 2)),
            Just(format!("{}é", "x".repeat(QUEUE_NAME_MAX - 1))),
        ],
    ) {
        let record = encode_record(&s).unwrap();
        let json = serde_json::to_string(&s).unwrap();

        // postcard drops a custom error's message, so a record error can only name the
        // type; JSON keeps the reason.
        let expected = InstanceId::new(s.as_str()).map_err(|e| e.to_string());
        for (decoded, names) in [
            (decode_record::<InstanceId>(&record).map_err(|e| e.to_string()), "InstanceId"),
            (serde_json::from_str::<InstanceId>(&json).map_err(|e| e.to_string()), "instance id"),
        ] {
            match (&decoded, &expected) {
                (Ok(id), Ok(want)) => prop_assert_eq!(id, want),
                (Err(got), Err(_)) => prop_assert!(got.contains(names), "{}", got),
                _ => prop_assert!(false, "decoded {:?}, new gave {:?}", decoded, expected),
            }
        }

        let expected = QueueName::new(s.as_str()).map_err(|e| e.to_string());
        for (decoded, names) in [
            (decode_record::<QueueName>(&record).map_err(|e| e.to_string()), "QueueName"),
            (serde_json::from_str::<QueueName>(&json).map_err(|e| e.to_string()), "queue name"),
        ] {
            match (&decoded, &expected) {
                (Ok(name), Ok(want)) => prop_assert_eq!(name, want),
                (Err(got), Err(_)) => prop_assert!(got.contains(names), "{}", got),
                _ => prop_assert!(false, "decoded {:?}, new gave {:?}", decoded, expected),
            }
        }
    }
}

/// Draws `n` values from `strategy` with a fixed seed.
fn draw<T: Debug>(strategy: &impl Strategy<Value = T>, n: usize) -> Vec<T> {
    let mut runner = TestRunner::deterministic();
    (0..n)
        .map(|_| strategy.new_tree(&mut runner).expect("strategy").current())
        .collect()
}

/// The variant's position. The match is exhaustive on purpose: a new variant does not
/// compile until it is listed here, and then fails the coverage test until
/// `strategies::event_kind` makes it.
fn event_kind_index(kind: &EventKind) -> usize {
    match kind {
        EventKind::ExecutionStarted { .. } => 0,
        EventKind::ActivityScheduled { .. } => 1,
        EventKind::ActivityCompleted { .. } => 2,
        EventKind::ActivityFailed { .. } => 3,
        EventKind::TimerCreated { .. } => 4,
        EventKind::TimerFired { .. } => 5,
        EventKind::ChildScheduled { .. } => 6,
        EventKind::ChildCompleted { .. } => 7,
        EventKind::ChildFailed { .. } => 8,
        EventKind::SignalReceived { .. } => 9,
        EventKind::SideEffectRecorded { .. } => 10,
        EventKind::CustomStatusSet { .. } => 11,
        EventKind::Patched { .. } => 12,
        EventKind::OpCancelled { .. } => 13,
        EventKind::CancelRequested { .. } => 14,
        EventKind::ContinuedAsNew { .. } => 15,
        EventKind::ExecutionCompleted { .. } => 16,
        EventKind::ExecutionFailed { .. } => 17,
        EventKind::ExecutionCancelled { .. } => 18,
    }
}
const EVENT_KINDS: usize = 19;

/// As [`event_kind_index`], for messages.
fn message_index(message: &Message) -> usize {
    match message {
        Message::Start { .. } => 0,
        Message::ActivityDone { .. } => 1,
        Message::TimerFired { .. } => 2,
        Message::ChildDone { .. } => 3,
        Message::Signal { .. } => 4,
        Message::Cancel { .. } => 5,
    }
}
const MESSAGES: usize = 6;

/// The round-trip properties only prove something for the inputs they see: check that
/// the strategies reach every variant and every payload form they claim to.
#[test]
fn strategies_reach_every_variant() {
    let kinds: BTreeSet<usize> = draw(&event_kind(), 1_000)
        .iter()
        .map(event_kind_index)
        .collect();
    assert_eq!(
        kinds,
        (0..EVENT_KINDS).collect(),
        "EventKind variants reached"
    );
    // Inside events, too, and every optional part both ways.
    let events = draw(&event(), 1_000);
    let kinds: BTreeSet<usize> = events.iter().map(|e| event_kind_index(&e.kind)).collect();
    assert_eq!(kinds.len(), EVENT_KINDS);
    let options: BTreeSet<(&str, bool)> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::ExecutionStarted { parent, .. } => Some(("parent", parent.is_some())),
            EventKind::ChildScheduled { version, .. } => Some(("version", version.is_some())),
            EventKind::CustomStatusSet { status, .. } => Some(("status", status.is_some())),
            _ => None,
        })
        .collect();
    assert_eq!(options.len(), 6, "optional fields reached: {options:?}");

    let messages: BTreeSet<usize> = draw(&message(), 300).iter().map(message_index).collect();
    assert_eq!(
        messages,
        (0..MESSAGES).collect(),
        "Message variants reached"
    );

    let effects: BTreeSet<&str> = draw(&side_effect(), 100)
        .iter()
        .map(|e| match e {
            SideEffect::Time(_) => "Time",
            SideEffect::Uuid(_) => "Uuid",
            SideEffect::Random(_) => "Random",
        })
        .collect();
    assert_eq!(effects.len(), 3, "SideEffect variants reached: {effects:?}");

    let forms: BTreeSet<(&str, bool)> = draw(&payload(), 400)
        .iter()
        .map(|p| {
            let format = if p.format() == Format::Json {
                "json"
            } else {
                "postcard"
            };
            (format, p.is_compressed())
        })
        .collect();
    assert_eq!(forms.len(), 4, "payload forms reached: {forms:?}");

    let failures = draw(&failure(), 200);
    assert!(
        failures
            .iter()
            .any(|f| !f.causes.is_empty() && f.data.is_some())
    );
    assert!(
        failures
            .iter()
            .any(|f| f.causes.is_empty() && f.data.is_none())
    );

    let items = draw(&work_item(), 200);
    let id_lens: BTreeSet<usize> = items.iter().map(|w| w.instance.as_str().len()).collect();
    assert!(
        id_lens.contains(&1) && id_lens.contains(&InstanceId::MAX_LEN),
        "{id_lens:?}"
    );
    assert!(items.iter().any(|w| !w.instance.as_str().is_ascii()));
    let queue_lens: BTreeSet<usize> = items
        .iter()
        .map(|w| w.options.queue.as_str().len())
        .collect();
    assert!(queue_lens.contains(&QUEUE_NAME_MAX), "{queue_lens:?}");

    // A payload large enough to compress really is compressed by the default codec.
    let big = Codec::new(Format::Postcard)
        .encode(&"ab".repeat(2_000))
        .unwrap();
    assert!(big.is_compressed());
}
