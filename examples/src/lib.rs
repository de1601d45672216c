//! Runnable Keel programs; see the `[[example]]`s of this package.
