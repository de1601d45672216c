//! Property tests for keel-core's encodings: every record type round-trips through the
//! binary record format and through JSON, the payload codec round-trips in every format
//! and compression setting, damaged bytes give errors instead of panics, and retry
//! delays stay bounded, deterministic and monotonic.
//!
//! One binary (see STYLE.md: one per area, to keep link time down); each module is one
//! group of properties, and `strategies` makes their inputs.

mod codec;
mod corrupt;
mod records;
mod retry;
mod strategies;

use proptest::test_runner::Config;

/// Cases per property: enough to reach every variant many times over, few enough that
/// the whole binary runs in seconds in the dev profile.
const CASES: u32 = 256;

/// The shared proptest configuration. Failures are not persisted to files: a failing
/// case is printed, minimised, with its seed.
fn config() -> Config {
    config_with_cases(CASES)
}

/// As [`config`], with `cases` cases, for the properties that are slow per case.
fn config_with_cases(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}
