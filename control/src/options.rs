//! A control request's migration, made into send options.

use std::time::Duration;

use wanmig_migrate::source::SendOptions;
use wanmig_transport::{Fingerprint, Identity, LinkTuning};
use wanmig_vmm::config::VmConfig;

use crate::protocol::MigrateRequest;

/// The send options for `req` on the VM of `cfg`, or why they cannot be.
pub fn send_options(req: &MigrateRequest, cfg: &VmConfig) -> Result<SendOptions, String> {
    let dest = wanmig_migrate::resolve(&req.dest)?;
    let identity = Identity::load(&req.identity).map_err(|e| format!("identity: {e}"))?;
    let peer: Fingerprint = req.peer.parse().map_err(|e| format!("peer: {e}"))?;
    let mut tuning = LinkTuning::default();
    if let Some(bw) = req.link_bandwidth_bps.or(req.max_bandwidth_bps) {
        tuning.bandwidth_bps = bw;
    }
    if let Some(rtt) = req.rtt_ms {
        tuning.rtt = Duration::from_millis(rtt);
    }
    let mut o = SendOptions::new(dest, identity, req.identity.clone(), peer, cfg.state_dir.clone());
    o.downtime = Duration::from_millis(req.downtime_ms);
    o.max_bandwidth = req.max_bandwidth_bps.map(|b| b as f64 / 8.0);
    o.min_bandwidth = req.min_bandwidth_bps.map(|b| b as f64 / 8.0);
    o.timeout = Duration::from_secs(req.timeout_s);
    o.tuning = tuning;
    o.store = req.store.clone();
    o.sync = req.sync;
    o.tunnel = req.tunnel.clone();
    o.resume_window = Duration::from_secs(req.resume_window_s);
    o.postcopy = req.postcopy;
    o.early_commit = !req.commit_after_ready;
    Ok(o)
}
