//! The network hand-over after a migration's commit: both hosts run the
//! ends of the tunnel ([`wanmig_tunnel`]) on a second two-way stream of the
//! migration's own connection, so the guest's address stays reachable
//! through the old host until routing follows (Bradford et al., VEE'07).
//!
//! The source asks for it (`send --tunnel-via IFACE`) and offers
//! [`features::TUNNEL`](wanmig_wire::features::TUNNEL); a destination that
//! can run its end (the VM's first NIC has an IPv4 address and a TAP here)
//! accepts. After the commit acknowledgement the source opens the stream and
//! starts its end on `IFACE`; the destination accepts it and starts its end
//! on the guest's TAP. A tunnel that fails to start does not undo the
//! migration: the summary and the logs say why.
//!
//! A [`TunnelRun`] keeps what the tunnel lives on — the connection and the
//! runtime that drives it — for as long as the tunnel runs.

use std::net::Ipv4Addr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use wanmig_transport::Conn;
use wanmig_tunnel::{MacAddr, Role, Tunnel, TunnelConfig, TunnelControl, TunnelStatus, Until};
use wanmig_vmm::config::NetConfig;

/// The network tunnel a migration should leave behind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelRequest {
    /// This host's interface on the guest's segment (where it answers ARP
    /// for the guest's address).
    pub interface: String,
    /// How long it lives.
    pub lifetime: TunnelLifetime,
}

/// How long a tunnel lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TunnelLifetime {
    /// Until an operator says the routes converged (`wanmig routes-converged`).
    UntilConverged,
    /// Until the routes converged or this many seconds passed.
    Seconds(u64),
    /// For good (a disaster-recovery move): only a shutdown ends it.
    Forever,
}

/// How long the destination waits for the source to open the tunnel's
/// stream after the commit.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// A tunnel end started inside a migration's runtime, not yet given the runtime.
#[derive(Debug)]
pub struct Started {
    pub(crate) tunnel: Tunnel,
    pub(crate) conn: Conn,
}

/// A tunnel end left running after a migration, with the connection and the
/// runtime it lives on.
pub struct TunnelRun {
    control: TunnelControl,
    task: tokio::task::JoinHandle<TunnelStatus>,
    _conn: Conn,
    // Last: dropped after the tasks and the connection it drives.
    rt: std::sync::Arc<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for TunnelRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelRun").field("running", &!self.task.is_finished()).finish_non_exhaustive()
    }
}

impl TunnelRun {
    pub(crate) fn new(started: Started, rt: std::sync::Arc<tokio::runtime::Runtime>) -> Self {
        let control = started.tunnel.control();
        let task = rt.spawn(started.tunnel.wait());
        TunnelRun { control, task, _conn: started.conn, rt }
    }

    /// The tunnel's status.
    pub fn status(&self) -> TunnelStatus {
        self.control.status()
    }

    /// Whether it still runs.
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }

    /// Ends it at both ends: the routes converged.
    pub fn routes_converged(&self) -> Result<(), String> {
        self.control.routes_converged().map_err(|e| e.to_string())
    }

    /// Ends it at both ends, whatever its lifetime.
    pub fn shutdown(&self, why: &str) {
        let _ = self.control.shutdown(why);
    }

    /// Waits up to `timeout` for it to end; its final status.
    pub fn wait(self, timeout: Duration) -> TunnelStatus {
        let TunnelRun { control, task, _conn, rt } = self;
        let end = rt.block_on(async { tokio::time::timeout(timeout, task).await });
        let status = match end {
            Ok(Ok(s)) => s,
            _ => control.status(),
        };
        if let Ok(rt) = std::sync::Arc::try_unwrap(rt) {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
        status
    }
}

/// The guest's address and MAC, from its first NIC; why not, when it has none.
pub(crate) fn guest_of(nets: &[NetConfig]) -> Result<(Ipv4Addr, MacAddr, String), String> {
    let nic = nets.first().ok_or("the VM has no NIC")?;
    let ip = nic.ip.ok_or("the VM's first NIC has no IPv4 address in its configuration ([[net]] ip)")?;
    Ok((ip.addr, nic.mac, nic.tap.clone()))
}

/// The source end's configuration for `req`.
pub(crate) fn source_config(req: &TunnelRequest, nets: &[NetConfig]) -> Result<TunnelConfig, String> {
    let (ip, mac, _) = guest_of(nets)?;
    let until = match req.lifetime {
        TunnelLifetime::UntilConverged => Until::Signal,
        TunnelLifetime::Seconds(s) => Until::Timeout(Duration::from_secs(s)),
        TunnelLifetime::Forever => Until::Forever,
    };
    Ok(TunnelConfig::new(vec![ip], mac, Role::Source { interface: req.interface.clone() }, until))
}

/// The destination end's configuration: on the guest's TAP, until the
/// source ends it (or an operator here says the routes converged).
pub(crate) fn destination_config(nets: &[NetConfig]) -> Result<TunnelConfig, String> {
    let (ip, mac, tap) = guest_of(nets)?;
    Ok(TunnelConfig::new(vec![ip], mac, Role::Destination { interface: tap }, Until::Signal))
}
