//! The running tunnel: three tokio tasks around the sockets and the peer
//! stream, applying [`crate::policy`].
//!
//! - *capture* reads the host's interface: answers ARP, and queues the
//!   packets to carry (after [`crate::offload::split`]) on a bounded queue;
//!   a full queue drops, as a router's would, rather than buffer without
//!   end.
//! - *downlink* reads the peer's stream: checks each packet and delivers it
//!   (destination: to the guest's MAC on its interface; source: through the
//!   host's routing on segment A), and notes the peer's `TunnelClose`.
//! - the *supervisor* owns the sending half: batches queued packets into
//!   stream writes, announces the guest, keeps the tunnel alive when idle,
//!   and decides when and why the tunnel ends.
//!
//! Ending, from either side (routes converged, time up, shutdown, a failed
//! interface): the side that ends sends `TunnelClose { reason }`, the other
//! answers with its own `TunnelClose` and both finish their stream; the
//! first side waits for that answer at most [`CLOSE_WAIT`].

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch};
use wanmig_transport::{FrameReceiver, FrameSender};
use wanmig_types::error_chain;
use wanmig_wire::Message;

use crate::guard::KernelGuard;
use crate::link::{Link, LinkError, MAX_CAPTURE, RawIpv4};
use crate::offload;
use crate::packet::ETH_HEADER;
use crate::policy::{self, DropReason, Policy, Verdict};
use crate::{CloseReason, Drops, Traffic, TunnelConfig, TunnelState, TunnelStatus};

/// Packets waiting for the peer stream, at most.
pub const QUEUE_PACKETS: usize = 2048;
/// Bytes of frames gathered into one stream write, at most.
pub const BATCH_BYTES: usize = 64 << 10;
/// A tunnel that sent nothing for this long sends a keepalive.
pub const KEEPALIVE: Duration = Duration::from_secs(2);
/// How long a closing side waits for the peer's `TunnelClose`.
pub const CLOSE_WAIT: Duration = Duration::from_secs(3);
/// The guest is told again that a neighbour moved after this long.
const STEER_AGAIN: Duration = Duration::from_secs(2);
/// Neighbours remembered for steering, at most (then forgotten all at once).
const STEER_TABLE: usize = 256;

/// What ends the tunnel from this side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stop {
    Converged,
    Shutdown(String),
}

/// Counters and state shared by the tasks and the handles.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: TunnelConfig,
    pub(crate) interface_mac: crate::packet::MacAddr,
    started: SystemTime,
    started_at: Instant,
    deadline: Option<Instant>,
    to_peer: [AtomicU64; 2],
    from_peer: [AtomicU64; 2],
    arp_replies: AtomicU64,
    announcements: AtomicU64,
    steered: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
    state: Mutex<TunnelState>,
    guard: Mutex<Vec<String>>,
    pub(crate) stop: watch::Sender<Option<Stop>>,
}

impl Shared {
    pub(crate) fn new(config: TunnelConfig, interface_mac: crate::packet::MacAddr) -> Self {
        let now = Instant::now();
        let deadline = match config.until {
            crate::Until::Timeout(d) => now.checked_add(d),
            _ => None,
        };
        Shared {
            config,
            interface_mac,
            started: SystemTime::now(),
            started_at: now,
            deadline,
            to_peer: Default::default(),
            from_peer: Default::default(),
            arp_replies: AtomicU64::new(0),
            announcements: AtomicU64::new(0),
            steered: AtomicU64::new(0),
            drops: Default::default(),
            state: Mutex::new(TunnelState::Starting),
            guard: Mutex::new(Vec::new()),
            stop: watch::channel(None).0,
        }
    }

    fn drop_packet(&self, why: DropReason) {
        self.drops[why.index()].fetch_add(1, Ordering::Relaxed);
    }

    fn count(pair: &[AtomicU64; 2], bytes: usize) {
        pair[0].fetch_add(1, Ordering::Relaxed);
        pair[1].fetch_add(bytes as u64, Ordering::Relaxed);
    }

    fn set_state(&self, s: TunnelState) {
        if let Ok(mut st) = self.state.lock() {
            *st = s;
        }
    }

    fn peer_heard(&self) {
        if let Ok(mut st) = self.state.lock()
            && *st == TunnelState::Starting
        {
            *st = TunnelState::Forwarding;
        }
    }

    pub(crate) fn state(&self) -> TunnelState {
        self.state.lock().map(|s| s.clone()).unwrap_or(TunnelState::Starting)
    }

    pub(crate) fn status(&self) -> TunnelStatus {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let traffic = |p: &[AtomicU64; 2]| Traffic { packets: load(&p[0]), bytes: load(&p[1]) };
        let d = |r: DropReason| load(&self.drops[r.index()]);
        let state = self.state();
        let now = Instant::now();
        let open = !matches!(state, TunnelState::Closed { .. });
        TunnelStatus {
            end: self.config.role.end(),
            interface: self.config.role.interface().to_string(),
            interface_mac: self.interface_mac,
            guest_ips: self.config.guest_ips.clone(),
            guest_mac: self.config.guest_mac,
            state,
            started_at_unix_ms: self
                .started
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            uptime_ms: u64::try_from(now.duration_since(self.started_at).as_millis()).unwrap_or(u64::MAX),
            expires_in_ms: self
                .deadline
                .filter(|_| open)
                .map(|dl| u64::try_from(dl.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX)),
            to_peer: traffic(&self.to_peer),
            from_peer: traffic(&self.from_peer),
            arp_replies: load(&self.arp_replies),
            announcements: load(&self.announcements),
            steered: load(&self.steered),
            drops: Drops {
                peer_malformed: d(DropReason::PeerMalformed),
                peer_wrong_address: d(DropReason::PeerWrongAddress),
                peer_not_unicast: d(DropReason::PeerNotUnicast),
                guest_malformed: d(DropReason::GuestMalformed),
                guest_spoofed_source: d(DropReason::GuestSpoofedSource),
                guest_not_unicast: d(DropReason::GuestNotUnicast),
                offload: d(DropReason::Offload),
                too_large: d(DropReason::TooLarge),
                queue_full: d(DropReason::QueueFull),
                send_failed: d(DropReason::SendFailed),
                address_conflict: d(DropReason::AddressConflict),
            },
            kernel_guard: self.guard.lock().map(|g| g.clone()).unwrap_or_default(),
        }
    }
}

/// Where packets from the peer go.
#[derive(Debug)]
pub(crate) enum Emitter {
    /// Source: the host's routing on segment A.
    Routed(RawIpv4),
    /// Destination: the guest's interface.
    ToGuest(Arc<Link>),
}

/// Everything a running tunnel owns.
#[derive(Debug)]
pub(crate) struct Parts {
    pub(crate) shared: Arc<Shared>,
    pub(crate) policy: Arc<Policy>,
    pub(crate) link: Arc<Link>,
    pub(crate) announce_on: Option<Arc<Link>>,
    pub(crate) emitter: Emitter,
    pub(crate) guard: Option<KernelGuard>,
}

/// What the downlink task reports.
enum PeerEvent {
    Closed(String),
    Lost(String),
}

/// Runs the tunnel to its end; returns the final status.
pub(crate) async fn run(parts: Parts, mut tx: FrameSender, rx: FrameReceiver) -> TunnelStatus {
    let Parts { shared, policy, link, announce_on, emitter, guard } = parts;
    if let Some(g) = &guard {
        if let Ok(mut r) = shared.guard.lock() {
            *r = g.rules().iter().map(|r| r.to_string()).collect();
        }
    }
    let (queue_tx, mut queue) = mpsc::channel::<Vec<u8>>(QUEUE_PACKETS);
    let (event_tx, mut events) = mpsc::channel::<PeerEvent>(2);
    let (capture_end_tx, mut capture_end) = mpsc::channel::<LinkError>(1);
    let capture = tokio::spawn({
        let (shared, policy, link) = (shared.clone(), policy.clone(), link.clone());
        async move {
            if let Err(e) = capture_loop(&shared, &policy, &link, queue_tx).await {
                let _ = capture_end_tx.send(e).await;
            }
        }
    });
    let downlink = tokio::spawn(downlink_loop(shared.clone(), policy.clone(), emitter, rx, event_tx));
    let mut stop = shared.stop.subscribe();

    let announce_link = announce_on.unwrap_or(link.clone());
    let mut announce = tokio::time::interval(shared.config.announce.interval);
    let mut announcements_left = shared.config.announce.count;
    let mut last_send = Instant::now();
    let mut keepalive = tokio::time::interval(KEEPALIVE / 2);
    let deadline = shared.deadline;
    let expired = async move {
        match deadline {
            Some(d) => tokio::time::sleep_until(d.into()).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(expired);

    // Tell the peer at once that this end is up.
    let mut reason = match tx.send(&Message::TunnelKeepalive).await {
        Ok(_) => None,
        Err(e) => Some(CloseReason::Failed { error: format!("sending to the peer: {e}") }),
    };
    let mut batch = Vec::with_capacity(BATCH_BYTES + 10_000);
    while reason.is_none() {
        tokio::select! {
            first = queue.recv() => {
                let Some(first) = first else { continue };
                batch.clear();
                let mut packets = 0u64;
                let mut bytes = 0usize;
                let mut next = Some(first);
                while let Some(p) = next {
                    bytes += p.len();
                    packets += 1;
                    batch.extend_from_slice(&Message::TunnelPacket { packet: p }.encode());
                    next = if batch.len() < BATCH_BYTES { queue.try_recv().ok() } else { None };
                }
                match tx.send_encoded(&batch).await {
                    Ok(_) => {
                        shared.to_peer[0].fetch_add(packets, Ordering::Relaxed);
                        shared.to_peer[1].fetch_add(bytes as u64, Ordering::Relaxed);
                        last_send = Instant::now();
                    }
                    Err(e) => reason = Some(CloseReason::Failed { error: format!("sending to the peer: {e}") }),
                }
            }
            _ = announce.tick(), if announcements_left > 0 => {
                announcements_left -= 1;
                for f in policy.announcement() {
                    match announce_link.send(&f).await {
                        Ok(()) => { shared.announcements.fetch_add(1, Ordering::Relaxed); }
                        Err(_) => shared.drop_packet(DropReason::SendFailed),
                    }
                }
            }
            _ = keepalive.tick() => {
                if last_send.elapsed() >= KEEPALIVE {
                    match tx.send(&Message::TunnelKeepalive).await {
                        Ok(_) => last_send = Instant::now(),
                        Err(e) => reason = Some(CloseReason::Failed { error: format!("sending to the peer: {e}") }),
                    }
                }
            }
            () = &mut expired => reason = Some(CloseReason::Expired),
            changed = stop.changed() => {
                let s = stop.borrow_and_update().clone();
                reason = match (changed, s) {
                    (Ok(()), Some(Stop::Converged)) => Some(CloseReason::RoutesConverged),
                    (Ok(()), Some(Stop::Shutdown(why))) => Some(CloseReason::Shutdown { reason: why }),
                    (Ok(()), None) => None,
                    // Cannot happen (`shared` holds the sender); never spin on it.
                    (Err(_), _) => Some(CloseReason::Shutdown { reason: "the stop signal vanished".into() }),
                };
            }
            e = events.recv() => reason = Some(match e {
                Some(PeerEvent::Closed(why)) => CloseReason::PeerClosed { reason: why },
                Some(PeerEvent::Lost(why)) => CloseReason::Failed { error: why },
                None => CloseReason::Failed { error: "the peer reader stopped".into() },
            }),
            e = capture_end.recv() => reason = Some(CloseReason::Failed {
                error: e.map_or_else(|| "capture stopped".into(), |e| error_chain(&e)),
            }),
        }
    }
    let reason = reason.expect("the loop ends with a reason");
    shared.set_state(TunnelState::Closing { reason: reason.clone() });
    capture.abort();

    // The closing handshake. Each wait is bounded: a peer that vanished
    // costs CLOSE_WAIT, never a hang.
    let close = match &reason {
        CloseReason::PeerClosed { .. } => Message::TunnelClose { reason: "closing as asked".into() },
        r => Message::TunnelClose { reason: r.to_string() },
    };
    let answered = matches!(reason, CloseReason::PeerClosed { .. });
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        if tx.send(&close).await.is_ok() {
            if !answered {
                // The peer's answer, or the end of the downlink (which
                // drops its sender): whichever comes first.
                let _ = events.recv().await;
            }
            let _ = tx.finish().await;
        }
    })
    .await;
    downlink.abort();
    let _ = downlink.await;
    let _ = capture.await;
    drop(guard);
    if let Ok(mut g) = shared.guard.lock() {
        g.clear();
    }
    shared.set_state(TunnelState::Closed { reason });
    shared.status()
}

async fn capture_loop(
    shared: &Shared,
    policy: &Policy,
    link: &Link,
    queue: mpsc::Sender<Vec<u8>>,
) -> Result<(), LinkError> {
    let mut buf = vec![0u8; MAX_CAPTURE];
    let mut steered: HashMap<Ipv4Addr, Instant> = HashMap::new();
    loop {
        let (vnet, n) = link.recv(&mut buf).await?;
        if n > buf.len() {
            shared.drop_packet(DropReason::TooLarge);
            continue;
        }
        match policy.on_frame(&buf[..n]) {
            Verdict::Ignore => {}
            Verdict::Drop(why) => shared.drop_packet(why),
            Verdict::Reply(frame) => match link.send(&frame).await {
                Ok(()) => {
                    shared.arp_replies.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => shared.drop_packet(DropReason::SendFailed),
            },
            Verdict::Tunnel { packet, stale_neighbour } => {
                let push = |p: Vec<u8>| {
                    if !policy::fits(&p) {
                        shared.drop_packet(DropReason::TooLarge);
                    } else if queue.try_send(p).is_err() {
                        shared.drop_packet(DropReason::QueueFull);
                    }
                };
                if vnet.is_plain() {
                    push(packet.bytes().to_vec());
                } else if offload::split(&vnet, ETH_HEADER, &packet, push).is_err() {
                    shared.drop_packet(DropReason::Offload);
                }
                if let Some(neighbour) = stale_neighbour {
                    let now = Instant::now();
                    let due = steered.get(&neighbour).is_none_or(|t| now.duration_since(*t) >= STEER_AGAIN);
                    if due {
                        if steered.len() >= STEER_TABLE {
                            steered.clear();
                        }
                        steered.insert(neighbour, now);
                        if link.send(&policy.steer(packet.src(), neighbour)).await.is_ok() {
                            shared.steered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
    }
}

async fn downlink_loop(
    shared: Arc<Shared>,
    policy: Arc<Policy>,
    emitter: Emitter,
    mut rx: FrameReceiver,
    events: mpsc::Sender<PeerEvent>,
) {
    let event = loop {
        let msg = match rx.recv().await {
            Ok(Some(m)) => m,
            Ok(None) => break PeerEvent::Lost("the peer ended the tunnel's stream without closing".into()),
            Err(e) => break PeerEvent::Lost(format!("receiving from the peer: {}", error_chain(&e))),
        };
        shared.peer_heard();
        let packet = match msg {
            Message::TunnelPacket { packet } => packet,
            Message::TunnelKeepalive => continue,
            Message::TunnelClose { reason } => break PeerEvent::Closed(reason),
            other => break PeerEvent::Lost(format!("the peer sent {} inside the tunnel", other.name())),
        };
        let ip = match policy.on_peer(&packet) {
            Ok(ip) => ip,
            Err(why) => {
                shared.drop_packet(why);
                continue;
            }
        };
        let sent = match &emitter {
            Emitter::Routed(raw) => raw.send(ip.bytes(), ip.dst()).await,
            Emitter::ToGuest(link) => link.send(&policy.frame_for_guest(&ip)).await,
        };
        match sent {
            Ok(()) => Shared::count(&shared.from_peer, packet.len()),
            Err(_) => shared.drop_packet(DropReason::SendFailed),
        }
    };
    let _ = events.send(event).await;
}
