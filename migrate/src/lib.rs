//! The migration orchestrator: the source and destination drivers that
//! compose the VMM, memory pre-copy, the wire protocol and the transport.
//!
//! - [`source::send`]: runs in the process that owns the VM (`wanmig run`),
//!   reached through the control socket by `wanmig send`.
//! - [`destination::receive`]: `wanmig receive`.
//! - `disk_source.rs` / `disk_dest.rs`: the two halves of disk migration
//!   (block-sync over the session: manifests, chunks, written extents, the
//!   final digest), built from `wanmig-block-sync` and `wanmig-dedup`.
//! - [`handover`]: after the commit, the network tunnel's two ends on the
//!   migration's own connection (`wanmig-tunnel`), kept alive by a
//!   [`handover::TunnelRun`].
//! - [`report`]: progress events and the final summary.
//!
//! The protocol and its commit rule are documented in `wanmig_wire::session`.

pub mod destination;
mod disk_dest;
mod disk_source;
pub mod handover;
pub mod report;
pub mod source;

use std::time::Duration;

use wanmig_transport::{Fingerprint, Identity, LinkTuning};
use wanmig_vmm::Vm;
use wanmig_vmm::control::{MigrateOutcome, MigrateRequest, Migrator};

/// Runs `migrate` requests of the control socket with [`source::send`],
/// and holds the network tunnel a migration left running at this host (to
/// a VM that moved away, or from the source of a VM received here).
#[derive(Debug, Default)]
pub struct SourceMigrator {
    /// The tunnel's end at this host, while it runs.
    pub tunnel: Option<handover::TunnelRun>,
}

/// Turns a control-socket request into send options.
pub fn send_options(req: &MigrateRequest) -> Result<source::SendOptions, String> {
    let dest = resolve(&req.dest)?;
    let identity = Identity::load(&req.identity).map_err(|e| format!("identity: {e}"))?;
    let peer: Fingerprint = req.peer.parse().map_err(|e| format!("peer: {e}"))?;
    let mut tuning = LinkTuning::default();
    if let Some(bw) = req.link_bandwidth_bps.or(req.max_bandwidth_bps) {
        tuning.bandwidth_bps = bw;
    }
    if let Some(rtt) = req.rtt_ms {
        tuning.rtt = Duration::from_millis(rtt);
    }
    Ok(source::SendOptions {
        dest,
        identity,
        peer,
        downtime: Duration::from_millis(req.downtime_ms),
        max_bandwidth: req.max_bandwidth_bps.map(|b| b as f64 / 8.0),
        min_bandwidth: req.min_bandwidth_bps.map(|b| b as f64 / 8.0),
        timeout: Duration::from_secs(req.timeout_s),
        tuning,
        xbzrle_cache: wanmig_mem_sync::encode::DEFAULT_CACHE_BYTES,
        compress: true,
        chunking: wanmig_wire::ChunkParams::DEFAULT,
        store: req.store.clone(),
        sync: req.sync,
        tunnel: req.tunnel.clone(),
    })
}

/// Resolves `host:port` to one address.
pub fn resolve(dest: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    dest.to_socket_addrs()
        .map_err(|e| format!("destination `{dest}`: {e}"))?
        .next()
        .ok_or_else(|| format!("destination `{dest}` resolves to no address"))
}

impl Migrator for SourceMigrator {
    fn migrate(
        &mut self,
        vm: &mut Vm,
        req: &MigrateRequest,
        progress: &mut dyn FnMut(serde_json::Value),
    ) -> (MigrateOutcome, serde_json::Value) {
        let opts = match send_options(req) {
            Ok(o) => o,
            Err(e) => {
                let summary = report::Summary { error: Some(e), ..Default::default() };
                return (MigrateOutcome::FailedSourceRunning, serde_json::to_value(summary).unwrap_or_default());
            }
        };
        let (outcome, summary, tunnel) = source::send(vm, &opts, &mut |e| {
            progress(serde_json::to_value(e).unwrap_or_default());
        });
        if tunnel.is_some() {
            // A tunnel of an earlier migration (from the host this VM came
            // from) gives way to the one that reaches the VM now.
            if let Some(old) = self.tunnel.take() {
                old.shutdown("the VM moved on");
            }
            self.tunnel = tunnel;
        }
        (outcome, serde_json::to_value(summary).unwrap_or_default())
    }

    fn tunnel_status(&self) -> Option<serde_json::Value> {
        self.tunnel.as_ref().map(|t| serde_json::to_value(t.status()).unwrap_or_default())
    }

    fn routes_converged(&mut self) -> Result<(), String> {
        self.tunnel.as_ref().ok_or_else(|| "no network tunnel runs here".to_string())?.routes_converged()
    }

    fn tunnel_running(&self) -> bool {
        self.tunnel.as_ref().is_some_and(handover::TunnelRun::is_running)
    }

    fn end_tunnel(&mut self, why: &str) {
        if let Some(t) = self.tunnel.take() {
            t.shutdown(why);
            t.wait(Duration::from_secs(3));
        }
    }
}
