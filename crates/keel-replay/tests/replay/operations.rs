//! One test per operation.
