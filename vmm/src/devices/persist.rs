//! What each virtio device saves: the data a restored or received device
//! must find again, separate from the devices' runtime types (so the
//! transport, which carries it, depends on no device).

use serde::{Deserialize, Serialize};
use wanmig_types::MacAddr;

/// Saved state of any device behind the transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceSnapshot {
    /// A virtio-blk device.
    Block(BlockSnapshot),
    /// A virtio-net device.
    Net(NetSnapshot),
}

/// Saved state of a block device: what it must find again on restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockSnapshot {
    /// Image size in bytes.
    pub size: u64,
    /// Attached read-only.
    pub read_only: bool,
}

/// What a NIC has done, counted since it was created (and carried across
/// save/restore).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetCounters {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Bytes delivered to the guest (frames, without virtio headers).
    pub rx_bytes: u64,
    /// Frames from the TAP not delivered: too long for the guest's buffer,
    /// malformed, or held past `net::RX_STALE`.
    pub rx_dropped: u64,
    /// Frames sent to the TAP.
    pub tx_frames: u64,
    /// Bytes sent to the TAP (frames, without virtio headers).
    pub tx_bytes: u64,
    /// Guest chains not sent: malformed, too long, or refused by the TAP.
    pub tx_dropped: u64,
}

/// Saved state of a NIC (its queues are the transport's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSnapshot {
    /// The MAC the guest saw.
    #[serde(with = "wanmig_types::mac_as_bytes")]
    pub mac: MacAddr,
    /// Its counters.
    pub counters: NetCounters,
    /// The frame (with its virtio header) taken from the TAP and held for
    /// want of a guest buffer, if any.
    pub held: Option<Vec<u8>>,
}
