//! Offline pool verification.
