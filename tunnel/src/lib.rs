//! Network continuity across subnets after a live migration.
//!
//! After a VM moves from host A (its subnet, segment A) to host B (another
//! subnet), the guest keeps its IPv4 address, which now belongs nowhere near
//! it. Until routing catches up, this tunnel keeps the address reachable
//! through host A, over an authenticated, encrypted stream between the two
//! hosts (in practice the migration's own QUIC connection: the same pinned
//! identities).
//!
//! # Packet flow
//!
//! ```text
//!  segment A                 host A (source end)                      host B (destination end)          guest
//!  client ──ARP who-has G──▶ proxy ARP: G is at A's MAC
//!         ◀──gratuitous ARP─ (on start: G at A's MAC)                 gratuitous ARP from the guest's MAC ──▶ segment B
//!  client ──IPv4 to G──────▶ capture (AF_PACKET) ──TunnelPacket──▶    check: to G ──▶ frame to the guest's MAC ──▶ guest
//!  client ◀──IPv4 from G──── host routing (raw IPv4) ◀─TunnelPacket── check: from G ◀── capture ◀── any frame from the guest
//!                                                                     proxy ARP for the guest's neighbours ◀──▶ guest
//! ```
//!
//! - **Source end** (host A), on the interface of segment A (in practice
//!   the bridge the guest was on, where A has an address): answers ARP for
//!   the guest's addresses with the interface's MAC, and announces them so
//!   with gratuitous ARP on start (both forms, `arping -U` and `-A`, a few
//!   times); captures every IPv4 packet for those addresses and sends it to
//!   B. Packets from the guest leave through A's own routing on that
//!   interface ([`link::RawIpv4`]: the kernel resolves the next hop as for
//!   its own packets; no MAC learning or ARP of our own to get wrong), so
//!   they appear on segment A, and stateful firewalls on the old path keep
//!   seeing both directions.
//! - **Destination end** (host B), on the guest's interface (best its own
//!   port: its TAP, or the bridge port it is on, which sees every frame the
//!   guest sends, whatever MAC it is addressed to; the bridge itself works
//!   too but only sees frames to its own MAC): delivers packets from A to
//!   the guest's MAC; carries every IPv4 packet from the guest's MAC and
//!   addresses to A, including those the guest still addresses to MACs it
//!   learnt on segment A (and then tells the guest, with one ARP request,
//!   that the neighbour is at B now); answers the guest's ARP for any other
//!   address with its own MAC (the guest's subnet does not exist at B:
//!   everything goes through A); announces the guest's MAC on B's segment
//!   (gratuitous ARP on the bridge above the port, if any) so that switches
//!   learn where it is.
//! - Both ends keep the host's own IP stack out of it ([`guard`]).
//!
//! The tunnel carries IPv4 packets, not Ethernet frames: each host builds
//! the link header of its own segment, so nothing the peer sends can put
//! arbitrary frames (other EtherTypes, VLAN tags, ARP) on a segment, and
//! every packet from the peer is parsed and checked ([`policy`]): a
//! well-formed IPv4 header, to a guest address (at B) or from one (at A);
//! anything else is dropped and counted by reason in [`TunnelStatus`].
//!
//! # What it does not carry
//!
//! Only unicast IPv4 to and from the guest's addresses: no broadcast or
//! multicast (DHCP, mDNS), no IPv6, no VLAN-tagged frames, no traffic
//! between host A itself and the guest (A's kernel still thinks the guest is
//! on segment A). Packets ride a reliable, ordered stream, so a WAN loss
//! delays the packets behind it instead of losing one, and a busy tunnel
//! queues in the stream's send buffer; a full queue toward the peer
//! ([`engine::QUEUE_PACKETS`]) drops. Packets larger than 9216 bytes
//! (`wanmig_wire::message::MAX_TUNNEL_PACKET`) and larger than segment A's
//! MTU are dropped.
//!
//! # Running it
//!
//! Each end runs over a pair of framed streams of a connection both hosts
//! already hold: [`Tunnel::start`] with a [`TunnelConfig`], a
//! [`FrameSender`] and a [`FrameReceiver`]. A [`TunnelControl`] reads the
//! [`TunnelStatus`] (serde-serializable) and ends the tunnel when the routes
//! have converged ([`TunnelControl::routes_converged`]), which ends it
//! cleanly on both sides; [`Until`] says whether it also ends after a time.
//!
//! The tests and the benchmark run over `wanmig-linkem`, the workspace's
//! user-space WAN link emulator.

pub mod engine;
pub mod guard;
pub mod link;
pub mod offload;
pub mod packet;
pub mod policy;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use wanmig_transport::{FrameReceiver, FrameSender};

use crate::engine::{Emitter, Parts, Shared, Stop};
use crate::guard::{KernelGuard, Rule};
use crate::link::{Link, LinkOptions, RawIpv4};
pub use crate::packet::MacAddr;
pub use crate::policy::End;
use crate::policy::Policy;

/// Most guest addresses one tunnel carries.
pub const MAX_GUEST_ADDRS: usize = 16;

/// Errors starting or steering a tunnel.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The configuration cannot work.
    #[error("invalid tunnel configuration: {0}")]
    Config(String),
    /// The interface could not be opened.
    #[error("cannot open the tunnel's interface")]
    Link(#[from] link::LinkError),
    /// The kernel guard could not be put in place.
    #[error("cannot keep the host's IP stack out of the tunnel's way")]
    Guard(#[from] guard::GuardError),
    /// A tunnel of `Until::Forever` does not end when the routes converge.
    #[error("this tunnel runs until shut down (Until::Forever): converged routes do not end it")]
    Forever,
    /// The tunnel has ended already.
    #[error("the tunnel has already ended")]
    Ended,
}

/// Which end this host runs, and on which interface.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Host A, where the guest was: `interface` is on the guest's old
    /// segment (the bridge it was on, or the NIC of that segment).
    Source {
        /// Interface name.
        interface: String,
    },
    /// Host B, which runs the guest: `interface` is the guest's own (its
    /// TAP or its bridge port; or the bridge it is on).
    Destination {
        /// Interface name.
        interface: String,
    },
}

impl Role {
    /// Which end.
    pub fn end(&self) -> End {
        match self {
            Role::Source { .. } => End::Source,
            Role::Destination { .. } => End::Destination,
        }
    }

    /// The interface.
    pub fn interface(&self) -> &str {
        match self {
            Role::Source { interface } | Role::Destination { interface } => interface,
        }
    }
}

/// How long the tunnel lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Until {
    /// Until an operator says the routes converged
    /// ([`TunnelControl::routes_converged`], on either end).
    Signal,
    /// Until the routes converged or this time has passed, whichever first.
    Timeout(Duration),
    /// For good (a disaster-recovery move whose old address stays): only a
    /// shutdown, or the connection's end, ends it.
    Forever,
}

/// Gratuitous ARP on start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Announce {
    /// Announcements (each: both ARP forms for every guest address).
    pub count: u32,
    /// Time between two.
    pub interval: Duration,
}

impl Default for Announce {
    /// Three, a second apart: the first updates every neighbour at once;
    /// the others cover a lost frame and Linux's one-second ARP lock time.
    fn default() -> Self {
        Announce { count: 3, interval: Duration::from_secs(1) }
    }
}

/// What one end of a tunnel needs to know.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TunnelConfig {
    /// The guest's IPv4 addresses (1 to [`MAX_GUEST_ADDRS`]).
    pub guest_ips: Vec<Ipv4Addr>,
    /// The guest's MAC address.
    pub guest_mac: MacAddr,
    /// This host's end.
    pub role: Role,
    /// How long the tunnel lives.
    pub until: Until,
    /// Gratuitous ARP on start.
    pub announce: Announce,
    /// Install the [`guard`] FIB rules (default: yes; needed on a host that
    /// forwards IPv4).
    pub kernel_guard: bool,
}

impl TunnelConfig {
    /// A configuration with the default announcements and the kernel guard on.
    pub fn new(guest_ips: Vec<Ipv4Addr>, guest_mac: MacAddr, role: Role, until: Until) -> Self {
        TunnelConfig { guest_ips, guest_mac, role, until, announce: Announce::default(), kernel_guard: true }
    }

    /// Checks that the configuration can work.
    pub fn check(&self) -> Result<(), TunnelError> {
        let bad = |s: String| Err(TunnelError::Config(s));
        if self.guest_ips.is_empty() || self.guest_ips.len() > MAX_GUEST_ADDRS {
            return bad(format!("1 to {MAX_GUEST_ADDRS} guest addresses, not {}", self.guest_ips.len()));
        }
        for (i, ip) in self.guest_ips.iter().enumerate() {
            if !packet::is_unicast_ip(*ip) {
                return bad(format!("guest address {ip} is not a unicast address"));
            }
            if self.guest_ips[..i].contains(ip) {
                return bad(format!("guest address {ip} is listed twice"));
            }
        }
        if !self.guest_mac.is_unicast() {
            return bad(format!("guest MAC {} is not a unicast address", self.guest_mac));
        }
        if let Until::Timeout(d) = self.until
            && d.is_zero()
        {
            return bad("a timeout of zero".into());
        }
        if self.announce.count > 100 || (self.announce.count > 0 && self.announce.interval < Duration::from_millis(10))
        {
            return bad("at most 100 announcements, at least 10 ms apart".into());
        }
        // Only the name: whether it exists is checked where it is opened,
        // in the namespace it is opened in.
        link::check_name(self.role.interface())?;
        Ok(())
    }
}

/// Packets and bytes (IPv4, without link headers) one way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Traffic {
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

/// Packets dropped, by reason (see [`policy::DropReason`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Drops {
    /// From the peer: not well-formed IPv4.
    pub peer_malformed: u64,
    /// From the peer: not to or from the guest as it must be.
    pub peer_wrong_address: u64,
    /// From the peer: to or from a broadcast, multicast or reserved address.
    pub peer_not_unicast: u64,
    /// From the guest: malformed IPv4.
    pub guest_malformed: u64,
    /// From the guest's MAC with another source address.
    pub guest_spoofed_source: u64,
    /// From the guest: broadcast or multicast (not carried).
    pub guest_not_unicast: u64,
    /// Captured packets whose offloads could not be undone.
    pub offload: u64,
    /// Larger than a tunnel packet may be.
    pub too_large: u64,
    /// The queue toward the peer was full.
    pub queue_full: u64,
    /// Sending on this host's interface failed.
    pub send_failed: u64,
    /// ARP from another host claiming a guest address (source end).
    pub address_conflict: u64,
}

impl Drops {
    /// All drops.
    pub fn total(&self) -> u64 {
        self.peer_malformed
            + self.peer_wrong_address
            + self.peer_not_unicast
            + self.guest_malformed
            + self.guest_spoofed_source
            + self.guest_not_unicast
            + self.offload
            + self.too_large
            + self.queue_full
            + self.send_failed
            + self.address_conflict
    }
}

/// Why a tunnel ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CloseReason {
    /// Told here that the routes converged.
    RoutesConverged,
    /// Its [`Until::Timeout`] passed.
    Expired,
    /// The peer ended it.
    PeerClosed {
        /// The peer's reason.
        reason: String,
    },
    /// Shut down here.
    Shutdown {
        /// Why.
        reason: String,
    },
    /// The stream or the interface failed.
    Failed {
        /// What failed.
        error: String,
    },
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::RoutesConverged => write!(f, "routes converged"),
            CloseReason::Expired => write!(f, "time is up"),
            CloseReason::PeerClosed { reason } => write!(f, "the peer closed the tunnel: {reason}"),
            CloseReason::Shutdown { reason } => write!(f, "shut down: {reason}"),
            CloseReason::Failed { error } => write!(f, "failed: {error}"),
        }
    }
}

/// Where a tunnel is in its life.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum TunnelState {
    /// Forwarding, but nothing heard from the peer yet.
    Starting,
    /// Forwarding; the peer is there.
    Forwarding,
    /// Ending: closing handshake with the peer.
    Closing {
        /// Why.
        reason: CloseReason,
    },
    /// Ended.
    Closed {
        /// Why.
        reason: CloseReason,
    },
}

/// A tunnel end's status, for `wanmig status` and for tests.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TunnelStatus {
    /// Which end.
    pub end: End,
    /// Its interface.
    pub interface: String,
    /// The interface's MAC (what this end answers ARP with).
    pub interface_mac: MacAddr,
    /// The guest's addresses.
    pub guest_ips: Vec<Ipv4Addr>,
    /// The guest's MAC.
    pub guest_mac: MacAddr,
    /// State.
    #[serde(flatten)]
    pub state: TunnelState,
    /// When it started, ms since the Unix epoch.
    pub started_at_unix_ms: u64,
    /// Time since it started, ms.
    pub uptime_ms: u64,
    /// Time left before an [`Until::Timeout`] ends it, ms.
    pub expires_in_ms: Option<u64>,
    /// Packets sent to the peer.
    pub to_peer: Traffic,
    /// Packets from the peer delivered here.
    pub from_peer: Traffic,
    /// ARP requests answered.
    pub arp_replies: u64,
    /// Gratuitous ARP frames sent.
    pub announcements: u64,
    /// Times the guest was told that a neighbour it still addressed by its
    /// old MAC is at this host's now (destination end).
    pub steered: u64,
    /// Drops by reason.
    pub drops: Drops,
    /// The kernel guard rules in force.
    pub kernel_guard: Vec<String>,
}

/// A running tunnel end. Dropping it does not stop the tunnel (its tasks
/// run until it ends): end it with [`TunnelControl::routes_converged`] or
/// [`TunnelControl::shutdown`].
#[derive(Debug)]
pub struct Tunnel {
    control: TunnelControl,
    task: tokio::task::JoinHandle<TunnelStatus>,
}

/// Reads a tunnel's status and ends it; cheap to clone, usable from any
/// thread.
#[derive(Debug, Clone)]
pub struct TunnelControl {
    shared: Arc<Shared>,
}

impl Tunnel {
    /// Starts this host's end over `tx` and `rx`, a pair of framed streams
    /// to the peer (e.g. a connection's control stream after the commit).
    /// Opens its sockets in the calling thread's network namespace and
    /// spawns its tasks on the current tokio runtime; returns once it
    /// forwards. Needs `CAP_NET_RAW` and (for the guard) `CAP_NET_ADMIN`.
    pub async fn start(config: TunnelConfig, tx: FrameSender, rx: FrameReceiver) -> Result<Tunnel, TunnelError> {
        config.check()?;
        let interface = config.role.interface().to_string();
        let link = Arc::new(Link::open(&interface, LinkOptions::default())?);
        let master = guard::master_of(link.index())?.and_then(link::if_name);
        let l3 = master.clone().unwrap_or_else(|| interface.clone());
        let (emitter, announce_on, rules) = match config.role.end() {
            End::Source => {
                let rules = config.guest_ips.iter().map(|&ip| Rule { to: Some(ip), from: None, iif: l3.clone() });
                (Emitter::Routed(RawIpv4::open(&interface)?), None, rules.collect::<Vec<_>>())
            }
            End::Destination => {
                let rules = config.guest_ips.iter().map(|&ip| Rule { to: None, from: Some(ip), iif: l3.clone() });
                // Announce on the bridge above the guest's port: the port
                // itself leads only to the guest.
                let announce = match &master {
                    Some(m) => Some(Arc::new(Link::open(m, LinkOptions { receive: false, ..LinkOptions::default() })?)),
                    None => None,
                };
                (Emitter::ToGuest(link.clone()), announce, rules.collect())
            }
        };
        let guard = if config.kernel_guard { Some(KernelGuard::install(rules)?) } else { None };
        let policy = Arc::new(Policy::new(config.role.end(), config.guest_ips.clone(), config.guest_mac, link.mac()));
        let shared = Arc::new(Shared::new(config, link.mac()));
        let parts = Parts { shared: shared.clone(), policy, link, announce_on, emitter, guard };
        let task = tokio::spawn(engine::run(parts, tx, rx));
        Ok(Tunnel { control: TunnelControl { shared }, task })
    }

    /// A handle to read the status and end the tunnel.
    pub fn control(&self) -> TunnelControl {
        self.control.clone()
    }

    /// The current status.
    pub fn status(&self) -> TunnelStatus {
        self.control.status()
    }

    /// Waits for the tunnel to end; its final status.
    pub async fn wait(self) -> TunnelStatus {
        match self.task.await {
            Ok(s) => s,
            // The task panicked or was cancelled: say so in the status.
            Err(e) => {
                let mut s = self.control.status();
                s.state = TunnelState::Closed { reason: CloseReason::Failed { error: format!("tunnel task: {e}") } };
                s
            }
        }
    }
}

impl TunnelControl {
    /// The current status.
    pub fn status(&self) -> TunnelStatus {
        self.shared.status()
    }

    /// The routes to the guest's new location have converged: ends the
    /// tunnel on both sides. Refused for [`Until::Forever`].
    pub fn routes_converged(&self) -> Result<(), TunnelError> {
        if self.shared.config.until == Until::Forever {
            return Err(TunnelError::Forever);
        }
        self.send(Stop::Converged)
    }

    /// Ends the tunnel on both sides, whatever its lifetime.
    pub fn shutdown(&self, reason: &str) -> Result<(), TunnelError> {
        self.send(Stop::Shutdown(reason.into()))
    }

    fn send(&self, stop: Stop) -> Result<(), TunnelError> {
        if matches!(self.shared.state(), TunnelState::Closed { .. } | TunnelState::Closing { .. }) {
            return Err(TunnelError::Ended);
        }
        self.shared.stop.send_replace(Some(stop));
        Ok(())
    }
}

#[cfg(test)]
mod fuzz_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> TunnelConfig {
        TunnelConfig::new(
            vec![Ipv4Addr::new(10, 1, 1, 5)],
            "52:54:00:00:00:05".parse().expect("mac"),
            Role::Source { interface: "br0".into() },
            Until::Timeout(Duration::from_secs(60)),
        )
    }

    #[test]
    fn configurations_that_cannot_work_are_refused() {
        assert!(config().check().is_ok());
        let refused = |f: &dyn Fn(&mut TunnelConfig)| {
            let mut c = config();
            f(&mut c);
            c.check().expect_err("refused")
        };
        refused(&|c| c.guest_ips.clear());
        refused(&|c| c.guest_ips = (0..17).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect());
        refused(&|c| c.guest_ips.push(Ipv4Addr::new(10, 1, 1, 5)));
        refused(&|c| c.guest_ips[0] = Ipv4Addr::BROADCAST);
        refused(&|c| c.guest_mac = MacAddr::BROADCAST);
        refused(&|c| c.until = Until::Timeout(Duration::ZERO));
        refused(&|c| c.announce.interval = Duration::from_millis(1));
        refused(&|c| c.role = Role::Destination { interface: "no/slash".into() });
    }

    #[test]
    fn status_serializes_for_operators() {
        let shared = Shared::new(config(), MacAddr([2, 0, 0, 0, 0, 1]));
        let s = shared.status();
        assert_eq!(s.state, TunnelState::Starting);
        assert!(s.expires_in_ms.is_some_and(|ms| ms <= 60_000 && ms > 59_000));
        let json = serde_json::to_value(&s).expect("json");
        assert_eq!(json["end"], "source");
        assert_eq!(json["state"], "starting");
        assert_eq!(json["guest_mac"], "52:54:00:00:00:05");
        assert_eq!(json["drops"]["peer_wrong_address"], 0);
        let closed = TunnelState::Closed { reason: CloseReason::PeerClosed { reason: "routes converged".into() } };
        let json = serde_json::to_value(&closed).expect("json");
        assert_eq!(json["state"], "closed");
        assert_eq!(json["reason"]["kind"], "peer_closed");
        let back: TunnelStatus = serde_json::from_value(serde_json::to_value(&s).expect("json")).expect("back");
        assert_eq!(back, s);
    }
}
