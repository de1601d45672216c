//! Hand-written strategies for every record type of keel-core, and for `Sample`, the
//! user value the codec properties encode.
//!
//! They reach the corners a hand-picked example misses: every variant of `EventKind`,
//! `SideEffect` and `Message`; payloads of both formats, compressed and not; failures
//! with causes and data; `Option` fields both ways; control and non-ASCII text; and
//! ids exactly at their length limits.

use std::collections::BTreeMap;
use std::time::Duration;

use keel_core::{
    ActivityOptions, Codec, Event, EventKind, ExecutionId, Failure, Format, InstanceId,
    InstanceStatus, Message, OpId, Outcome, ParentLink, Payload, QueueName, RetryPolicy,
    SideEffect, Timestamp, WorkItem,
};
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use proptest::sample::select;
use serde::{Deserialize, Serialize};

/// `QueueName::new` accepts at most this many bytes; the crate exports no constant.
pub(crate) const QUEUE_NAME_MAX: usize = 128;

/// Text that trips up encoders: multi-byte UTF-8, combining marks, emoji, escapes and
/// control characters (free text may hold them; ids may not).
const AWKWARD: &[&str] = &[
    "café",
    "Zürich",
    "日本語の注文",
    "🦀🚢",
    "Ωμέγα",
    "e\u{301}",
    "\u{200b}zero-width\u{feff}",
    "\"quoted\" and \\back\\slashed",
    "line\nbreak\ttab\r",
    "nul\u{0}byte",
    "",
];

/// Free text: names, messages, reasons. Anything goes, control characters included.
pub(crate) fn text() -> impl Strategy<Value = String> + Clone {
    prop_oneof![
        3 => "[a-zA-Z0-9_.-]{0,12}",
        3 => vec(any::<char>(), 0..24).prop_map(String::from_iter),
        1 => select(AWKWARD).prop_map(str::to_owned),
    ]
}

/// A string of at least `min` and at most `max` bytes made of `chars` (cut at a char
/// boundary, then padded with ASCII), so multi-byte text lands exactly on a limit.
fn fit(chars: &[char], min: usize, max: usize) -> String {
    let mut s = String::new();
    for &c in chars {
        if s.len() + c.len_utf8() > max {
            break;
        }
        s.push(c);
    }
    while s.len() < min {
        s.push('x');
    }
    s
}

/// Any character but a control character, which ids refuse.
fn id_char() -> impl Strategy<Value = char> + Clone {
    any::<char>().prop_map(|c| if c.is_control() { '·' } else { c })
}

/// Valid id text of 1 to `max` bytes; a fifth of the time exactly `max` bytes, a
/// tenth of the time exactly 1.
fn id_text(max: usize) -> impl Strategy<Value = String> + Clone {
    prop_oneof![
        4 => "[a-z0-9-]{1,16}",
        3 => vec(id_char(), 1..40).prop_map(move |cs| fit(&cs, 1, max)),
        2 => vec(id_char(), 1..=max).prop_map(move |cs| fit(&cs, max, max)),
        1 => id_char().prop_map(|c| fit(&[c], 1, 1)),
    ]
}

pub(crate) fn instance_id() -> BoxedStrategy<InstanceId> {
    id_text(InstanceId::MAX_LEN)
        .prop_map(|s| InstanceId::new(s).expect("a valid instance id"))
        .boxed()
}

pub(crate) fn queue_name() -> impl Strategy<Value = QueueName> + Clone {
    prop_oneof![
        1 => Just(QueueName::default()),
        4 => id_text(QUEUE_NAME_MAX).prop_map(|s| QueueName::new(s).expect("a valid queue name")),
    ]
}

pub(crate) fn execution_id() -> impl Strategy<Value = ExecutionId> + Clone {
    prop_oneof![
        Just(ExecutionId::FIRST),
        any::<u32>().prop_map(ExecutionId::from_raw)
    ]
}

pub(crate) fn op_id() -> impl Strategy<Value = OpId> + Clone {
    prop_oneof![0..64_u64, any::<u64>()].prop_map(OpId::from_raw)
}

pub(crate) fn timestamp() -> impl Strategy<Value = Timestamp> + Clone {
    prop_oneof![
        Just(0),
        1_700_000_000_000..1_900_000_000_000_u64,
        any::<u64>(),
    ]
    .prop_map(Timestamp::from_millis)
}

/// Durations from zero through everyday ones to the largest `Duration` there is.
pub(crate) fn duration() -> impl Strategy<Value = Duration> + Clone {
    prop_oneof![
        Just(Duration::ZERO),
        (0..86_400_000_u64).prop_map(Duration::from_millis),
        (any::<u64>(), 0..1_000_000_000_u32).prop_map(|(s, n)| Duration::new(s, n)),
        Just(Duration::MAX),
    ]
}

/// Any finite `f64`: both signs, zeros, subnormals, huge and tiny normals.
pub(crate) fn finite_f64() -> impl Strategy<Value = f64> + Clone {
    use proptest::num::f64::{NEGATIVE, NORMAL, POSITIVE, SUBNORMAL, ZERO};
    prop_oneof![
        Just(0.1),
        0.0..4.0_f64,
        POSITIVE | NEGATIVE | NORMAL | SUBNORMAL | ZERO,
    ]
}

/// The user value the codec properties encode: strings, numbers up to 128 bits,
/// vectors, a map, options, and a recursive enum of every serde variant shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Sample {
    pub(crate) name: String,
    pub(crate) count: u64,
    pub(crate) delta: i64,
    pub(crate) big: u128,
    pub(crate) flag: bool,
    pub(crate) tags: Vec<String>,
    pub(crate) attrs: BTreeMap<String, Option<i32>>,
    pub(crate) note: Option<String>,
    pub(crate) bytes: Vec<u8>,
    pub(crate) shape: Shape,
}

/// Unit, newtype, tuple, struct and nested variants.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum Shape {
    Empty,
    Label(String),
    Pair(u8, Option<bool>),
    Point { x: i32, y: i32 },
    Boxed(Box<Shape>),
    Nested(Vec<Shape>),
}

pub(crate) fn shape() -> impl Strategy<Value = Shape> + Clone {
    let leaf = prop_oneof![
        Just(Shape::Empty),
        text().prop_map(Shape::Label),
        (any::<u8>(), option::of(any::<bool>())).prop_map(|(a, b)| Shape::Pair(a, b)),
        (any::<i32>(), any::<i32>()).prop_map(|(x, y)| Shape::Point { x, y }),
    ];
    leaf.prop_recursive(3, 12, 3, |inner| {
        prop_oneof![
            inner.clone().prop_map(|s| Shape::Boxed(Box::new(s))),
            vec(inner, 0..3).prop_map(Shape::Nested),
        ]
    })
}

prop_compose! {
    fn sample_unboxed()(
        name in text(),
        count in any::<u64>(),
        delta in any::<i64>(),
        big in any::<u128>(),
        flag in any::<bool>(),
        tags in vec(text(), 0..4),
        attrs in btree_map(text(), option::of(any::<i32>()), 0..4),
        note in option::of(text()),
        bytes in vec(any::<u8>(), 0..32),
        shape in shape(),
    ) -> Sample {
        Sample { name, count, delta, big, flag, tags, attrs, note, bytes, shape }
    }
}

pub(crate) fn sample() -> BoxedStrategy<Sample> {
    sample_unboxed().boxed()
}

pub(crate) fn format() -> impl Strategy<Value = Format> + Clone {
    prop_oneof![Just(Format::Json), Just(Format::Postcard)]
}

/// Compression off, always, or at the default threshold.
pub(crate) fn compress_above() -> impl Strategy<Value = usize> + Clone {
    prop_oneof![
        Just(usize::MAX),
        Just(0),
        Just(Codec::DEFAULT_COMPRESS_ABOVE)
    ]
}

/// A long, repetitive (so compressible) string of `len` to `len * 8` bytes.
pub(crate) fn large_text(len: std::ops::Range<usize>) -> impl Strategy<Value = String> + Clone {
    ("[a-z]{1,3}|\\PC{1,4}", len).prop_map(|(unit, n)| unit.repeat(n))
}

/// Payloads as a `Codec` makes them, in both formats, compressed and not.
pub(crate) fn payload() -> BoxedStrategy<Payload> {
    fn encode<T: Serialize>(format: Format, above: usize, value: &T) -> Payload {
        let codec = Codec::new(format).compress_above(above);
        codec.encode(value).expect("the sample values encode")
    }
    prop_oneof![
        3 => (format(), compress_above(), sample()).prop_map(|(f, c, v)| encode(f, c, &v)),
        2 => (format(), compress_above(), text()).prop_map(|(f, c, v)| encode(f, c, &v)),
        1 => (format(), any::<Option<u64>>()).prop_map(|(f, v)| encode(f, usize::MAX, &v)),
        // Large and repetitive: compressed under both the default threshold and 0.
        2 => (format(), prop_oneof![Just(0), Just(Codec::DEFAULT_COMPRESS_ABOVE)],
              large_text(400..1200))
            .prop_map(|(f, c, v)| encode(f, c, &v)),
        // Large and kept uncompressed.
        1 => (format(), large_text(300..600)).prop_map(|(f, v)| encode(f, usize::MAX, &v)),
    ]
    .boxed()
}

pub(crate) fn failure_kind() -> impl Strategy<Value = String> + Clone {
    prop_oneof![
        1 => select(&[
            Failure::PANIC,
            Failure::TIMEOUT,
            Failure::CANCELLED,
            Failure::DECODE,
            Failure::ENCODE,
            Failure::UNREGISTERED,
        ][..])
        .prop_map(str::to_owned),
        3 => text(),
    ]
}

prop_compose! {
    fn failure_unboxed()(
        kind in failure_kind(),
        message in text(),
        causes in prop_oneof![Just(Vec::new()), vec(text(), 1..4)],
        retryable in any::<bool>(),
        data in option::of(payload()),
    ) -> Failure {
        Failure { kind, message, causes, retryable, data }
    }
}

pub(crate) fn failure() -> BoxedStrategy<Failure> {
    failure_unboxed().boxed()
}

prop_compose! {
    /// Any policy the types allow, valid or not (`validate` is not the codec's job),
    /// with its two floats drawn from `floats`.
    fn retry_policy_unboxed(floats: BoxedStrategy<f64>)(
        max_attempts in any::<u32>(),
        initial_interval in duration(),
        multiplier in floats.clone(),
        max_interval in duration(),
        jitter in floats,
        non_retryable in vec(text(), 0..3),
        attempt_timeout in option::of(duration()),
    ) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            initial_interval,
            multiplier,
            max_interval,
            jitter,
            non_retryable,
            attempt_timeout,
        }
    }
}

/// Any policy, its floats any finite `f64`.
pub(crate) fn retry_policy() -> BoxedStrategy<RetryPolicy> {
    retry_policy_unboxed(finite_f64().boxed()).boxed()
}

prop_compose! {
    /// Policies that `validate` accepts, from everyday ones to extreme but legal ones.
    fn valid_retry_policy_unboxed()(
        max_attempts in prop_oneof![1..10_u32, 1..=u32::MAX],
        a in duration(),
        b in duration(),
        multiplier in prop_oneof![Just(1.0), 1.0..3.0_f64, 1.0..1e6_f64, 1.0..f64::MAX],
        jitter in prop_oneof![Just(0.0), Just(1.0), 0.0..=1.0_f64],
        non_retryable in vec(text(), 0..2),
        attempt_timeout in option::of(duration().prop_map(|d| d.max(Duration::from_nanos(1)))),
    ) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            initial_interval: a.min(b),
            multiplier,
            max_interval: a.max(b),
            jitter,
            non_retryable,
            attempt_timeout,
        }
    }
}

pub(crate) fn valid_retry_policy() -> BoxedStrategy<RetryPolicy> {
    valid_retry_policy_unboxed().boxed()
}

pub(crate) fn instance_status() -> impl Strategy<Value = InstanceStatus> + Clone {
    select(InstanceStatus::ALL.to_vec())
}

prop_compose! {
    fn parent_link_unboxed()(
        instance in instance_id(),
        execution in execution_id(),
        op in op_id(),
    ) -> ParentLink {
        ParentLink { instance, execution, op }
    }
}

pub(crate) fn parent_link() -> BoxedStrategy<ParentLink> {
    parent_link_unboxed().boxed()
}

prop_compose! {
    fn activity_options_unboxed()(
        queue in queue_name(),
        priority in any::<i32>(),
        retry in prop_oneof![Just(RetryPolicy::default()), retry_policy()],
    ) -> ActivityOptions {
        ActivityOptions { queue, priority, retry }
    }
}

pub(crate) fn activity_options() -> BoxedStrategy<ActivityOptions> {
    activity_options_unboxed().boxed()
}

pub(crate) fn side_effect() -> impl Strategy<Value = SideEffect> + Clone {
    prop_oneof![
        timestamp().prop_map(SideEffect::Time),
        any::<u128>().prop_map(SideEffect::Uuid),
        any::<u64>().prop_map(SideEffect::Random),
    ]
}

/// Every one of the 19 variants, equally likely.
pub(crate) fn event_kind() -> BoxedStrategy<EventKind> {
    prop_oneof![
        (text(), any::<u32>(), payload(), option::of(parent_link())).prop_map(
            |(name, version, input, parent)| EventKind::ExecutionStarted {
                name,
                version,
                input,
                parent
            }
        ),
        (op_id(), text(), payload(), activity_options()).prop_map(|(op, name, input, options)| {
            EventKind::ActivityScheduled {
                op,
                name,
                input,
                options,
            }
        }),
        (op_id(), payload()).prop_map(|(op, output)| EventKind::ActivityCompleted { op, output }),
        (op_id(), failure()).prop_map(|(op, failure)| EventKind::ActivityFailed { op, failure }),
        (op_id(), timestamp()).prop_map(|(op, fire_at)| EventKind::TimerCreated { op, fire_at }),
        op_id().prop_map(|op| EventKind::TimerFired { op }),
        (
            op_id(),
            text(),
            option::of(any::<u32>()),
            instance_id(),
            payload()
        )
            .prop_map(|(op, name, version, instance, input)| {
                EventKind::ChildScheduled {
                    op,
                    name,
                    version,
                    instance,
                    input,
                }
            }),
        (op_id(), payload()).prop_map(|(op, output)| EventKind::ChildCompleted { op, output }),
        (op_id(), failure()).prop_map(|(op, failure)| EventKind::ChildFailed { op, failure }),
        (text(), payload()).prop_map(|(name, payload)| EventKind::SignalReceived { name, payload }),
        (op_id(), side_effect())
            .prop_map(|(op, value)| EventKind::SideEffectRecorded { op, value }),
        (op_id(), option::of(payload()))
            .prop_map(|(op, status)| EventKind::CustomStatusSet { op, status }),
        (op_id(), text()).prop_map(|(op, change_id)| EventKind::Patched { op, change_id }),
        (op_id(), op_id()).prop_map(|(op, cancel_op)| EventKind::OpCancelled { op, cancel_op }),
        text().prop_map(|reason| EventKind::CancelRequested { reason }),
        payload().prop_map(|input| EventKind::ContinuedAsNew { input }),
        payload().prop_map(|output| EventKind::ExecutionCompleted { output }),
        failure().prop_map(|failure| EventKind::ExecutionFailed { failure }),
        text().prop_map(|reason| EventKind::ExecutionCancelled { reason }),
    ]
    .boxed()
}

prop_compose! {
    fn event_unboxed()(at in timestamp(), kind in event_kind()) -> Event {
        Event { at, kind }
    }
}

pub(crate) fn event() -> BoxedStrategy<Event> {
    event_unboxed().boxed()
}

pub(crate) fn outcome() -> BoxedStrategy<Outcome> {
    prop_oneof![payload().prop_map(Ok), failure().prop_map(Err)].boxed()
}

/// Every one of the 6 variants, equally likely.
pub(crate) fn message() -> BoxedStrategy<Message> {
    prop_oneof![
        (
            execution_id(),
            text(),
            option::of(any::<u32>()),
            payload(),
            option::of(parent_link())
        )
            .prop_map(|(execution, name, version, input, parent)| Message::Start {
                execution,
                name,
                version,
                input,
                parent
            }),
        (execution_id(), op_id(), outcome()).prop_map(|(execution, op, outcome)| {
            Message::ActivityDone {
                execution,
                op,
                outcome,
            }
        }),
        (execution_id(), op_id()).prop_map(|(execution, op)| Message::TimerFired { execution, op }),
        (execution_id(), op_id(), outcome()).prop_map(|(execution, op, outcome)| {
            Message::ChildDone {
                execution,
                op,
                outcome,
            }
        }),
        (text(), payload()).prop_map(|(name, payload)| Message::Signal { name, payload }),
        text().prop_map(|reason| Message::Cancel { reason }),
    ]
    .boxed()
}

prop_compose! {
    fn work_item_unboxed()(
        instance in instance_id(),
        execution in execution_id(),
        op in op_id(),
        name in text(),
        input in payload(),
        options in activity_options(),
        attempt in prop_oneof![1..5_u32, any::<u32>()],
        scheduled_at in timestamp(),
    ) -> WorkItem {
        WorkItem { instance, execution, op, name, input, options, attempt, scheduled_at }
    }
}

pub(crate) fn work_item() -> BoxedStrategy<WorkItem> {
    work_item_unboxed().boxed()
}
