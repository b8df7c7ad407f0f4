//! The control plane of a VM: the per-VM control socket that `wanmig run`,
//! `restore` and `receive` serve beside the VM they run, and the client the
//! other commands use.
//!
//! - [`protocol`]: requests and answers (status with a migration's live
//!   progress, pause, resume, snapshot, migrate, cancel, set, settle,
//!   routes-converged, shutdown), typed on both ends.
//! - [`socket`]: the socket (owner-only, peers checked) and the client.
//! - [`server`]: serves a VM and the migrations of it concurrently.
//! - [`host`]: how a destination builds a received VM and what it writes
//!   at the commit (`DIR/NAME.toml`).
//! - [`settle`]: asking a migration's destination what became of it.
//! - [`dr`]: a sync's write-tracking map per destination, and the record
//!   of the last good sync.
//!
//! It sits between the CLI and `wanmig-migrate`: the VMM knows nothing of
//! it, and the migration drivers only see a [`wanmig_migrate::steer::Steering`].

pub mod dr;
pub mod host;
pub mod options;
pub mod protocol;
pub mod server;
pub mod settle;
pub mod socket;

pub use protocol::{Request, Response};
pub use server::{ServeEnd, serve};
pub use socket::{ControlError, request, request_with_progress};
