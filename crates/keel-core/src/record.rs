//! The binary encoding of internal records (history events, messages, work items):
//! one format-version byte, then postcard.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::RecordError;

/// The record format this build writes; a reader refuses any other.
pub const RECORD_VERSION: u8 = 1;

/// Encodes an internal record for storage.
pub fn encode_record<T: Serialize>(record: &T) -> Result<Vec<u8>, RecordError> {
    let mut bytes = vec![RECORD_VERSION];
    postcard::to_io(record, &mut bytes).map_err(|e| RecordError::Encode {
        type_name: std::any::type_name::<T>(),
        detail: e.to_string(),
    })?;
    Ok(bytes)
}

/// Decodes a record written by [`encode_record`].
///
/// Damaged or foreign bytes give a [`RecordError`] naming the type, never a panic;
/// trailing bytes are an error too, since they mean the record is not what it seems.
pub fn decode_record<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, RecordError> {
    let type_name = std::any::type_name::<T>();
    let (&version, body) = bytes.split_first().ok_or_else(|| RecordError::Corrupt {
        type_name,
        detail: "no bytes".to_owned(),
    })?;
    if version != RECORD_VERSION {
        return Err(RecordError::Version {
            type_name,
            found: version,
            expected: RECORD_VERSION,
        });
    }
    let (record, rest) = postcard::take_from_bytes(body).map_err(|e| RecordError::Corrupt {
        type_name,
        detail: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(RecordError::Corrupt {
            type_name,
            detail: format!("{} trailing bytes", rest.len()),
        });
    }
    Ok(record)
}
