//! The migration protocol vocabulary, no I/O (not built yet).
//!
//! This crate will own: versioned message types, a codec that checks every
//! length before reading or allocating, and the sans-IO source and
//! destination session state machines.
