//! The replay engine's integration tests: one binary, one module per area.

mod golden;
mod operations;
mod properties;
mod support;
