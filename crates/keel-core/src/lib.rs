#![doc = include_str!("../README.md")]

mod error;
mod event;
mod failure;
mod ids;
mod message;
mod payload;
mod record;
mod retry;
mod rng;
mod status;
mod time;
mod work_item;

pub use error::{CodecError, InvalidInput, RecordError, Result};
pub use event::{ActivityOptions, Event, EventKind, ParentLink, SideEffect};
pub use failure::{Failure, IntoFailure};
pub use ids::{ExecutionId, InstanceId, OpId, QueueName};
pub use message::{Message, Outcome};
pub use payload::{Codec, Format, Payload};
pub use record::{RECORD_VERSION, decode_record, encode_record};
pub use retry::{RetryDecision, RetryPolicy};
pub use rng::SplitMix64;
pub use status::InstanceStatus;
pub use time::Timestamp;
pub use work_item::WorkItem;
