//! The payload codec: values round-trip in both formats with and without compression,
//! any codec reads any payload, the size limit is enforced both ways, and arbitrary
//! bytes never make it panic.

use std::fmt::Debug;

use keel_core::{Codec, CodecError, Format, Payload};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{Index, select};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::strategies::{Sample, compress_above, finite_f64, format, large_text, sample, text};

fn other(format: Format) -> Format {
    if format == Format::Json {
        Format::Postcard
    } else {
        Format::Json
    }
}

fn fail(e: impl ToString) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

/// Encodes `value` in `format` uncompressed and eagerly compressed, and checks every
/// codec decodes both payloads back to it.
fn assert_codec_round_trips<T>(value: &T, format: Format) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let plain = Codec::new(format).compress_above(usize::MAX);
    let eager = Codec::new(format).compress_above(0);

    let p = plain.encode(value).map_err(fail)?;
    prop_assert!(!p.is_compressed());
    prop_assert_eq!(p.format(), format);
    prop_assert_eq!(
        &plain.encode(value).map_err(fail)?,
        &p,
        "encoding is deterministic"
    );
    // The body is exactly the format's own encoding, after the one-byte header.
    match format {
        Format::Json => {
            let text = serde_json::to_string(value).map_err(fail)?;
            prop_assert_eq!(p.as_json_text(), Some(text.as_str()));
        }
        _ => prop_assert_eq!(
            &p.as_bytes()[1..],
            &postcard::to_stdvec(value).map_err(fail)?[..]
        ),
    }

    let c = eager.encode(value).map_err(fail)?;
    prop_assert_eq!(c.format(), format);
    if c.is_compressed() {
        prop_assert!(
            c.len() < p.len(),
            "compressed {} >= plain {}",
            c.len(),
            p.len()
        );
        prop_assert_eq!(c.as_json_text(), None);
    } else {
        // Compression is kept only when it pays; otherwise the bytes are the plain ones.
        prop_assert_eq!(&c, &p);
    }

    let readers = [
        plain,
        eager,
        Codec::new(other(format)),
        Codec::new(other(format)).compress_above(usize::MAX),
        Codec::default(),
    ];
    for payload in [&p, &c] {
        for reader in readers {
            let back: T = reader.decode(payload).map_err(fail)?;
            prop_assert_eq!(&back, value, "read by {:?}", reader);
        }
        // Stored and read back as raw bytes, it is the same payload.
        let stored = Payload::from_bytes(payload.as_bytes().to_vec()).map_err(fail)?;
        prop_assert_eq!(&stored, payload);
    }
    Ok(())
}

/// Strings of any size up to about 20 KB: free text, random characters (many of them
/// multi-byte), and long repetitive runs that compress well.
fn any_string() -> impl Strategy<Value = String> {
    prop_oneof![
        text(),
        vec(any::<char>(), 0..5_000).prop_map(String::from_iter),
        large_text(100..1_300),
    ]
}

/// Bytes offered as a stored payload: pure noise, noise behind a valid header, valid
/// zstd frames of noise, JSON of the wrong shape, and valid payloads with bits flipped.
fn payload_bytes() -> impl Strategy<Value = Vec<u8>> {
    let tag = select(&[0x01_u8, 0x02, 0x81, 0x82][..]);
    prop_oneof![
        vec(any::<u8>(), 0..96),
        (tag.clone(), vec(any::<u8>(), 0..96)).prop_map(|(t, body)| [vec![t], body].concat()),
        (select(&[0x81_u8, 0x82][..]), vec(any::<u8>(), 0..96)).prop_map(|(t, noise)| {
            let frame = zstd::bulk::compress(&noise, 1).expect("zstd compresses");
            [vec![t], frame].concat()
        }),
        text().prop_map(|t| {
            let wrong = serde_json::json!({ "name": t, "count": -1 });
            [vec![0x01], wrong.to_string().into_bytes()].concat()
        }),
        (
            sample(),
            format(),
            compress_above(),
            vec(any::<Index>(), 1..4)
        )
            .prop_map(|(value, format, above, flips)| {
                let codec = Codec::new(format).compress_above(above);
                let mut bytes = codec.encode(&value).expect("encodes").into_bytes();
                for flip in flips {
                    let bit = flip.index(bytes.len() * 8);
                    bytes[bit / 8] ^= 1 << (bit % 8);
                }
                bytes
            }),
    ]
}

proptest! {
    #![proptest_config(crate::config())]

    #[test]
    fn samples_round_trip_in_both_formats(value in sample(), format in format()) {
        assert_codec_round_trips(&value, format)?;
    }

    #[test]
    fn strings_round_trip_in_both_formats(value in any_string(), format in format()) {
        assert_codec_round_trips(&value, format)?;
    }

    #[test]
    fn optional_and_nested_values_round_trip(
        value in proptest::option::of(vec(proptest::option::of(text()), 0..4)),
        format in format(),
    ) {
        assert_codec_round_trips(&value, format)?;
    }

    /// User values hold floats too: every finite `f64` must come back bit for bit
    /// (compared by bits, so that -0.0 is told from 0.0).
    #[test]
    fn floats_round_trip_in_both_formats(
        value in vec(finite_f64(), 1..4),
        format in format(),
    ) {
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for above in [usize::MAX, 0] {
            let payload = Codec::new(format).compress_above(above).encode(&value).map_err(fail)?;
            for reader in [Codec::new(Format::Json), Codec::new(Format::Postcard)] {
                let back: Vec<f64> = reader.decode(&payload).map_err(fail)?;
                prop_assert_eq!(bits(&back), bits(&value), "{:?} read back as {:?}", value, back);
            }
        }
    }

    /// Encoding a value over `max_size` is refused with both numbers; exactly at the
    /// limit it is accepted. Reading an oversize payload is refused the same way.
    #[test]
    fn the_size_limit_is_enforced(
        value in prop_oneof![sample().prop_map(|s| s.name), any_string()],
        format in format(),
        above in compress_above(),
        short_by in prop_oneof![Just(1_usize), 1..64_usize, any::<usize>()],
    ) {
        let plain = Codec::new(format).compress_above(usize::MAX).encode(&value).map_err(fail)?;
        let size = plain.len() - 1;
        let limit = size.saturating_sub(short_by);
        let codec = Codec::new(format).compress_above(above);

        let at_limit = codec.max_size(size).encode(&value).map_err(fail)?;
        prop_assert_eq!(codec.max_size(size).decode::<String>(&at_limit).map_err(fail)?, value.as_str());

        let err = codec.max_size(limit).encode(&value).unwrap_err();
        let msg = err.to_string();
        prop_assert!(
            matches!(err, CodecError::TooLarge { size: s, limit: l } if s == size && l == limit),
            "{:?}", err
        );
        prop_assert!(msg.contains(&format!("{size} bytes")), "{}", msg);
        prop_assert!(msg.contains(&format!("limit of {limit} bytes")), "{}", msg);

        let reader = Codec::new(format).max_size(limit);
        let err = reader.decode::<String>(&plain).unwrap_err();
        prop_assert!(
            matches!(err, CodecError::TooLarge { size: s, limit: l } if s == size && l == limit),
            "{:?}", err
        );
        if at_limit.is_compressed() {
            // A compressed payload must not expand past the limit either.
            let msg = reader.decode::<String>(&at_limit).unwrap_err().to_string();
            prop_assert!(msg.contains(&format!("limit of {limit} bytes")), "{}", msg);
        }
    }

    /// Whatever bytes come back from storage, `from_bytes` and `decode` answer with a
    /// value or an error that says what went wrong, and never panic.
    #[test]
    fn arbitrary_payload_bytes_never_panic(bytes in payload_bytes()) {
        let payload = match Payload::from_bytes(bytes.clone()) {
            Ok(payload) => payload,
            Err(err) => {
                prop_assert!(matches!(err, CodecError::Corrupt(_)), "{:?}", err);
                prop_assert!(err.to_string().starts_with("corrupt payload: "), "{}", err);
                prop_assert!(err.to_string().len() > "corrupt payload: ".len());
                return Ok(());
            }
        };
        prop_assert_eq!(payload.as_bytes(), &bytes[..]);
        let format_name = if payload.format() == Format::Json { "JSON" } else { "postcard" };
        for reader in [Codec::new(Format::Json), Codec::new(Format::Postcard).max_size(4096)] {
            let Err(err) = reader.decode::<Sample>(&payload) else { continue };
            let msg = err.to_string();
            prop_assert!(!msg.trim().is_empty());
            match &err {
                CodecError::Decode { type_name, format, .. } => {
                    prop_assert!(type_name.ends_with("Sample"), "{}", type_name);
                    prop_assert_eq!(*format, format_name);
                    prop_assert!(msg.contains("Sample") && msg.contains(format_name), "{}", msg);
                }
                CodecError::Corrupt(detail) => {
                    prop_assert!(payload.is_compressed(), "{}", msg);
                    prop_assert!(!detail.is_empty());
                }
                _ => prop_assert!(false, "unexpected error {:?}", err),
            }
        }
    }
}
