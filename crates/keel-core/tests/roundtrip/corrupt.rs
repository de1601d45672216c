//! Damaged records: noise, truncations, bit flips, a foreign version byte and trailing
//! garbage give a `RecordError` that names the record type, and never a panic.

use std::fmt::Debug;

use keel_core::{
    Event, Message, RECORD_VERSION, RecordError, WorkItem, decode_record, encode_record,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::strategies::{event, message, work_item};

/// A valid encoding of an event, a message or a work item, with a decoder for its type.
#[derive(Debug, Clone)]
struct Valid {
    bytes: Vec<u8>,
    /// Decodes bytes as this record's type, reporting whether they equal the original.
    check: fn(&[u8], &[u8]) -> Result<bool, RecordError>,
    /// The last segment of the type's name, which every error must mention.
    short_name: &'static str,
}

fn check_as<T: Serialize + DeserializeOwned + PartialEq>(
    original: &[u8],
    bytes: &[u8],
) -> Result<bool, RecordError> {
    let decoded: T = decode_record(bytes)?;
    let original: T = decode_record(original)?;
    Ok(decoded == original)
}

fn valid_record() -> impl Strategy<Value = Valid> {
    fn valid<T: Serialize + DeserializeOwned + PartialEq>(
        value: &T,
        short_name: &'static str,
    ) -> Valid {
        Valid {
            bytes: encode_record(value).expect("records encode"),
            check: check_as::<T>,
            short_name,
        }
    }
    prop_oneof![
        event().prop_map(|v| valid(&v, "Event")),
        message().prop_map(|v| valid(&v, "Message")),
        work_item().prop_map(|v| valid(&v, "WorkItem")),
    ]
}

/// Asserts that `err` is a clear record error: non-empty, naming the type.
fn assert_clear(err: &RecordError, short_name: &str) -> Result<(), TestCaseError> {
    let msg = err.to_string();
    prop_assert!(
        msg.contains(short_name),
        "{:?} does not name {}",
        msg,
        short_name
    );
    let type_name = match err {
        RecordError::Corrupt { type_name, detail } => {
            prop_assert!(!detail.is_empty(), "{}", msg);
            type_name
        }
        RecordError::Version { type_name, .. } | RecordError::Encode { type_name, .. } => type_name,
        _ => return Err(TestCaseError::fail(format!("unexpected error {err:?}"))),
    };
    prop_assert!(type_name.ends_with(short_name), "{}", type_name);
    Ok(())
}

/// Decodes noise as `T`: a value or a clear error, never a panic.
fn decode_noise<T: DeserializeOwned + Debug>(
    bytes: &[u8],
    short_name: &str,
) -> Result<(), TestCaseError> {
    if let Err(err) = decode_record::<T>(bytes) {
        assert_clear(&err, short_name)?;
        if bytes.first() != Some(&RECORD_VERSION) {
            let is_version = matches!(err, RecordError::Version { .. });
            prop_assert!(bytes.is_empty() || is_version, "{:?}", err);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(crate::config())]

    #[test]
    fn noise_never_panics(
        mut bytes in vec(any::<u8>(), 0..160),
        versioned in any::<bool>(),
    ) {
        // Half the time past the version check, so postcard sees the noise.
        if versioned && !bytes.is_empty() {
            bytes[0] = RECORD_VERSION;
        }
        decode_noise::<Event>(&bytes, "Event")?;
        decode_noise::<Message>(&bytes, "Message")?;
        decode_noise::<WorkItem>(&bytes, "WorkItem")?;
    }

    /// A record cut short anywhere, even to nothing, is an error: postcard reads a
    /// record in full, so no proper prefix can decode.
    #[test]
    fn every_truncation_is_an_error(record in valid_record()) {
        for len in 0..record.bytes.len() {
            match (record.check)(&record.bytes, &record.bytes[..len]) {
                Ok(_) => prop_assert!(false, "a {len}-byte prefix decoded"),
                Err(err) => {
                    assert_clear(&err, record.short_name)?;
                    prop_assert!(matches!(err, RecordError::Corrupt { .. }), "{:?}", err);
                }
            }
        }
    }

    /// Flipping one bit gives an error or some value, never a panic.
    #[test]
    fn single_bit_flips_never_panic(record in valid_record(), bits in vec(any::<Index>(), 1..24)) {
        for bit in bits {
            let bit = bit.index(record.bytes.len() * 8);
            let mut bytes = record.bytes.clone();
            bytes[bit / 8] ^= 1 << (bit % 8);
            // Some value is fine: a flip inside a string, a payload or a number leaves
            // a well-formed record (and a flipped sign of 0.0 even an equal one).
            if let Err(err) = (record.check)(&record.bytes, &bytes) {
                assert_clear(&err, record.short_name)?;
            }
        }
    }

    #[test]
    fn a_foreign_version_is_named(record in valid_record(), version in any::<u8>()) {
        prop_assume!(version != RECORD_VERSION);
        let mut bytes = record.bytes.clone();
        bytes[0] = version;
        let err = (record.check)(&record.bytes, &bytes).unwrap_err();
        assert_clear(&err, record.short_name)?;
        prop_assert!(
            matches!(err, RecordError::Version { found, expected, .. }
                if found == version && expected == RECORD_VERSION),
            "{:?}", err
        );
        let msg = err.to_string();
        prop_assert!(msg.contains(&format!("format version {version}")), "{}", msg);
        prop_assert!(msg.contains(&format!("reads version {RECORD_VERSION}")), "{}", msg);
    }

    #[test]
    fn trailing_garbage_is_an_error(record in valid_record(), garbage in vec(any::<u8>(), 1..32)) {
        prop_assert!((record.check)(&record.bytes, &record.bytes).unwrap(), "the record itself decodes");
        let bytes = [&record.bytes[..], &garbage[..]].concat();
        let err = (record.check)(&record.bytes, &bytes).unwrap_err();
        assert_clear(&err, record.short_name)?;
        let msg = err.to_string();
        prop_assert!(msg.contains(&format!("{} trailing bytes", garbage.len())), "{}", msg);
    }
}
