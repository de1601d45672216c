#![doc = include_str!("../README.md")]

mod error;
mod hub;
mod link;
mod notifier;
mod options;
mod publisher;
mod subscriber;

pub use error::{Error, Result};
pub use notifier::RedisNotifier;
pub use options::RedisOptions;
