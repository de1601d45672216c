#![doc = include_str!("../README.md")]

mod ack;
mod activity;
mod convert;
mod dead_letter;
mod error;
mod instance;
mod lease;
mod migrations;
mod options;
mod orchestration;
mod provider;
mod query;
mod reader;
mod wake;
mod writer;

pub use options::{SqliteOptions, Synchronous};
pub use provider::SqliteProvider;
