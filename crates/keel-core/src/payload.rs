//! User values as stored bytes: the [`Payload`] and the [`Codec`] that makes it.
//!
//! A payload carries a one-byte header naming its format and compression, so it
//! decodes correctly whatever codec the reader is configured with.

use std::fmt;

use serde::de::{self, DeserializeOwned};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::CodecError;

const FORMAT_MASK: u8 = 0x0f;
const JSON: u8 = 0x01;
const POSTCARD: u8 = 0x02;
const ZSTD: u8 = 0x80;
/// zstd's fastest level: compression is on the hot path of every large payload.
const ZSTD_LEVEL: i32 = 1;

/// The serialisation format of user values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Format {
    /// JSON: readable in the CLI and dashboard. The default.
    #[default]
    Json,
    /// postcard: compact and fast, not self-describing.
    Postcard,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Self::Json => "JSON",
            Self::Postcard => "postcard",
        }
    }

    fn tag(self) -> u8 {
        match self {
            Self::Json => JSON,
            Self::Postcard => POSTCARD,
        }
    }
}

/// An encoded user value (an input, output, signal or error datum) as Keel stores it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Payload(Vec<u8>);

impl Payload {
    /// Wraps stored bytes, checking the header; the body is checked when decoded.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, CodecError> {
        header(&bytes)?;
        Ok(Self(bytes))
    }

    /// The stored bytes, header included.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The stored bytes, header included.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    /// The stored size in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false: a payload has at least its header. Here for clippy's sake.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The format of the value inside.
    pub fn format(&self) -> Format {
        // The header was checked on construction.
        header(&self.0).map_or(Format::Json, |(format, _)| format)
    }

    /// Whether the body is zstd-compressed.
    pub fn is_compressed(&self) -> bool {
        self.0.first().is_some_and(|tag| tag & ZSTD != 0)
    }

    /// The JSON text of an uncompressed JSON payload, for display.
    pub fn as_json_text(&self) -> Option<&str> {
        (self.0.first() == Some(&JSON)).then(|| std::str::from_utf8(&self.0[1..]).ok())?
    }
}

fn header(bytes: &[u8]) -> Result<(Format, bool), CodecError> {
    let &tag = bytes
        .first()
        .ok_or_else(|| CodecError::Corrupt("empty payload".to_owned()))?;
    let format = match tag & FORMAT_MASK {
        JSON => Format::Json,
        POSTCARD => Format::Postcard,
        _ => {
            return Err(CodecError::Corrupt(format!(
                "unknown payload header 0x{tag:02x}"
            )));
        }
    };
    if tag & !(FORMAT_MASK | ZSTD) != 0 {
        return Err(CodecError::Corrupt(format!(
            "unknown payload header 0x{tag:02x}"
        )));
    }
    Ok((format, tag & ZSTD != 0))
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.as_json_text() {
            Some(text) if text.len() <= 256 => write!(f, "Payload({text})"),
            _ => write!(f, "Payload({:?}, {} bytes)", self.format(), self.len()),
        }
    }
}

/// Turns user values into [`Payload`]s and back: a format, a compression threshold and
/// a size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Codec {
    format: Format,
    compress_above: usize,
    max_size: usize,
}

impl Default for Codec {
    fn default() -> Self {
        Self::new(Format::Json)
    }
}

impl Codec {
    /// Bodies larger than this many bytes are compressed unless configured otherwise.
    pub const DEFAULT_COMPRESS_ABOVE: usize = 1024;
    /// The default limit on a value's encoded size.
    pub const DEFAULT_MAX_SIZE: usize = 16 * 1024 * 1024;

    /// A codec writing `format`, compressing above 1 KiB, refusing values over 16 MiB.
    pub const fn new(format: Format) -> Self {
        Self {
            format,
            compress_above: Self::DEFAULT_COMPRESS_ABOVE,
            max_size: Self::DEFAULT_MAX_SIZE,
        }
    }

    /// Compresses bodies larger than `bytes` (`usize::MAX` turns compression off).
    #[must_use]
    pub const fn compress_above(mut self, bytes: usize) -> Self {
        self.compress_above = bytes;
        self
    }

    /// Refuses values whose encoding, before compression, exceeds `bytes`.
    ///
    /// Decoding enforces the same limit on the decompressed size, so a small
    /// compressed payload cannot expand into an unbounded allocation.
    #[must_use]
    pub const fn max_size(mut self, bytes: usize) -> Self {
        self.max_size = bytes;
        self
    }

    /// The format this codec writes.
    pub const fn format(&self) -> Format {
        self.format
    }

    /// The size limit in bytes.
    pub const fn limit(&self) -> usize {
        self.max_size
    }

    /// Encodes `value`.
    pub fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Payload, CodecError> {
        let mut bytes = vec![self.format.tag()];
        let written = match self.format {
            Format::Json => serde_json::to_writer(&mut bytes, value).map_err(|e| e.to_string()),
            Format::Postcard => postcard::to_io(value, &mut bytes)
                .map(drop)
                .map_err(|e| e.to_string()),
        };
        written.map_err(|detail| CodecError::Encode {
            type_name: std::any::type_name::<T>(),
            format: self.format.name(),
            detail,
        })?;
        let size = bytes.len() - 1;
        if size > self.max_size {
            return Err(CodecError::TooLarge {
                size,
                limit: self.max_size,
            });
        }
        if size > self.compress_above {
            // Only keep the compressed form when it is actually smaller.
            if let Ok(compressed) = zstd::bulk::compress(&bytes[1..], ZSTD_LEVEL)
                && compressed.len() < size
            {
                let mut packed = Vec::with_capacity(compressed.len() + 1);
                packed.push(self.format.tag() | ZSTD);
                packed.extend_from_slice(&compressed);
                return Ok(Payload(packed));
            }
        }
        Ok(Payload(bytes))
    }

    /// Decodes a `T` from `payload`, in whatever format the payload was written.
    pub fn decode<T: DeserializeOwned>(&self, payload: &Payload) -> Result<T, CodecError> {
        let (format, compressed) = header(&payload.0)?;
        let body = &payload.0[1..];
        let decompressed;
        let body = if compressed {
            decompressed = zstd::bulk::decompress(body, self.max_size).map_err(|e| {
                CodecError::Corrupt(format!(
                    "cannot decompress (or larger than the limit of {} bytes): {e}",
                    self.max_size
                ))
            })?;
            &decompressed[..]
        } else {
            if body.len() > self.max_size {
                return Err(CodecError::TooLarge {
                    size: body.len(),
                    limit: self.max_size,
                });
            }
            body
        };
        let decoded = match format {
            Format::Json => {
                let mut deserializer = serde_json::Deserializer::from_slice(body);
                match serde_path_to_error::deserialize(&mut deserializer) {
                    Ok(value) => deserializer
                        .end()
                        .map(|()| value)
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(with_path(e.path(), e.inner())),
                }
            }
            Format::Postcard => {
                let mut deserializer = postcard::Deserializer::from_bytes(body);
                serde_path_to_error::deserialize(&mut deserializer)
                    .map_err(|e| with_path(e.path(), e.inner()))
            }
        };
        decoded.map_err(|detail| CodecError::Decode {
            type_name: std::any::type_name::<T>(),
            format: format.name(),
            detail,
        })
    }
}

/// A deserializer's message, prefixed with the field where it failed when known, so
/// that "invalid type: string, expected u32" says which field was wrong.
fn with_path(path: &serde_path_to_error::Path, error: &dyn std::fmt::Display) -> String {
    match path.to_string().as_str() {
        "" | "." => error.to_string(),
        field => format!("at field `{field}`: {error}"),
    }
}

/// Human-readable serialisers (JSON history files, the CLI) show an uncompressed JSON
/// payload as the JSON value itself and any other payload as hex; binary serialisers
/// store the raw bytes.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Readable {
    Json(Box<serde_json::value::RawValue>),
    Hex(String),
}

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if !serializer.is_human_readable() {
            return serializer.serialize_bytes(&self.0);
        }
        let readable = match self
            .as_json_text()
            .map(|t| serde_json::value::RawValue::from_string(t.to_owned()))
        {
            // RawValue trims surrounding whitespace; such text would not round-trip
            // byte for byte, so it is shown as hex.
            Some(Ok(raw)) if Some(raw.get().len()) == self.as_json_text().map(str::len) => {
                Readable::Json(raw)
            }
            _ => Readable::Hex(self.0.iter().map(|b| format!("{b:02x}")).collect()),
        };
        readable.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let bytes = if deserializer.is_human_readable() {
            match Readable::deserialize(deserializer)? {
                Readable::Json(raw) => {
                    let mut bytes = vec![JSON];
                    bytes.extend_from_slice(raw.get().as_bytes());
                    bytes
                }
                Readable::Hex(hex) => decode_hex(&hex).map_err(de::Error::custom)?,
            }
        } else {
            deserializer.deserialize_byte_buf(BytesVisitor)?
        };
        Self::from_bytes(bytes).map_err(de::Error::custom)
    }
}

fn decode_hex(hex: &str) -> Result<Vec<u8>, String> {
    if !hex.len().is_multiple_of(2) || !hex.is_ascii() {
        return Err(format!(
            "payload hex {hex:?} is not an even number of hex digits"
        ));
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).map_err(|e| format!("payload hex: {e}")))
        .collect()
}

struct BytesVisitor;

impl<'de> de::Visitor<'de> for BytesVisitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("payload bytes")
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
        Ok(v.to_vec())
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
        Ok(v)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
        let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(b) = seq.next_element()? {
            bytes.push(b);
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code, reason = "only decoded, to see which field fails")]
    struct Shipment {
        id: String,
        lines: Vec<Line>,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code, reason = "only decoded, to see which field fails")]
    struct Line {
        qty: u32,
    }

    #[test]
    fn a_decode_error_names_the_type_and_the_field() {
        let codec = Codec::default();
        let bad = codec
            .encode(&serde_json::json!({"id": "o-1", "lines": [{"qty": "three"}]}))
            .unwrap();
        let message = codec.decode::<Shipment>(&bad).unwrap_err().to_string();
        assert!(message.contains("Shipment"), "{message}");
        assert!(message.contains("at field `lines[0].qty`"), "{message}");
        assert!(message.contains("invalid type: string"), "{message}");
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Order {
        id: u64,
        items: Vec<String>,
    }

    #[test]
    fn small_values_stay_uncompressed_and_readable() {
        let p = Codec::default()
            .encode(&Order {
                id: 1,
                items: vec!["tea".into()],
            })
            .unwrap();
        assert!(!p.is_compressed());
        assert_eq!(p.as_json_text(), Some(r#"{"id":1,"items":["tea"]}"#));
    }

    #[test]
    fn large_values_are_compressed_and_round_trip() {
        let order = Order {
            id: 7,
            items: vec!["x".repeat(100); 50],
        };
        for format in [Format::Json, Format::Postcard] {
            let codec = Codec::new(format);
            let p = codec.encode(&order).unwrap();
            assert!(p.is_compressed(), "{format:?}");
            assert!(p.len() < 1000);
            assert_eq!(codec.decode::<Order>(&p).unwrap(), order);
        }
    }

    #[test]
    fn payloads_decode_whatever_codec_reads_them() {
        let p = Codec::new(Format::Postcard).encode(&42_u32).unwrap();
        assert_eq!(Codec::default().decode::<u32>(&p).unwrap(), 42);
    }

    #[test]
    fn the_limit_names_itself_and_the_size() {
        let codec = Codec::default().max_size(10);
        let err = codec.encode(&"a string of twenty-two").unwrap_err();
        assert_eq!(
            err.to_string(),
            "payload is 24 bytes, over the limit of 10 bytes"
        );
    }

    #[test]
    fn decompression_is_bounded_by_the_limit() {
        let big = Codec::default().encode(&"z".repeat(100_000)).unwrap();
        assert!(big.len() < 1000, "zeros compress well");
        let err = Codec::default()
            .max_size(1000)
            .decode::<String>(&big)
            .unwrap_err();
        assert!(err.to_string().contains("limit of 1000 bytes"), "{err}");
    }

    #[test]
    fn decode_errors_name_the_type_and_the_field() {
        let p = Codec::default()
            .encode(&serde_json::json!({"id": 1}))
            .unwrap();
        let err = Codec::default()
            .decode::<Order>(&p)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("Order") && err.contains("missing field `items`"),
            "{err}"
        );
    }

    #[test]
    fn corrupt_payloads_are_refused() {
        assert!(Payload::from_bytes(vec![]).is_err());
        assert!(Payload::from_bytes(vec![0x07, 1]).is_err());
        assert!(Payload::from_bytes(vec![0x41, 1]).is_err());
        let bad_zstd = Payload::from_bytes(vec![JSON | ZSTD, 1, 2, 3]).unwrap();
        assert!(matches!(
            Codec::default().decode::<u8>(&bad_zstd),
            Err(CodecError::Corrupt(_))
        ));
    }

    #[test]
    fn readable_serialisation_shows_json_and_hex() {
        let json = Codec::default().encode(&[1, 2]).unwrap();
        assert_eq!(serde_json::to_string(&json).unwrap(), r#"{"json":[1,2]}"#);
        let binary = Codec::new(Format::Postcard).encode(&3_u8).unwrap();
        assert_eq!(serde_json::to_string(&binary).unwrap(), r#"{"hex":"0203"}"#);
        for p in [json, binary] {
            let text = serde_json::to_string(&p).unwrap();
            assert_eq!(serde_json::from_str::<Payload>(&text).unwrap(), p);
        }
        assert!(serde_json::from_str::<Payload>(r#"{"hex":"0"}"#).is_err());
    }
}
