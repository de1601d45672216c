#![doc = include_str!("../README.md")]

mod ack;
mod activity;
mod convert;
mod dead_letter;
mod error;
mod instance;
mod lease;
mod options;
mod orchestration;
mod provider;
mod schema;
mod statement;
mod wake;

pub use options::PostgresOptions;
pub use provider::PostgresProvider;
