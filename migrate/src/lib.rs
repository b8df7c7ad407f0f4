//! The migration orchestrator (not built yet).
//!
//! This crate will own: the source and destination drivers that compose the
//! VMM, memory and disk sync, transport and tunnel; the two-phase commit;
//! progress events and the final summary. It is the only crate that knows
//! all the others.
