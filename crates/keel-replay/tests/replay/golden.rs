//! Golden histories.
