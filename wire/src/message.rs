//! The messages of the migration protocol and their encoding.
//!
//! Every frame on a stream is `u32 length` + body, the body `u8 type` +
//! fields, all little-endian. [`frame_len`] checks the length against
//! [`MAX_FRAME`] before the receiver allocates anything.
//!
//! | type | message | direction |
//! |---|---|---|
//! | 1 | `Hello` | source → destination |
//! | 2 | `Accept` | destination → source |
//! | 3 | `Refuse` | destination → source |
//! | 4 | `Pages` | source → destination |
//! | 5 | `Compressed`: the next flushed piece of the migration's one zstd stream, decoding to a `Pages` body without its type byte | source → destination |
//! | 6 | `RoundDone` | source → destination |
//! | 7 | `DeviceState` | source → destination |
//! | 8 | `Ready` | destination → source |
//! | 9 | `Commit` | source → destination |
//! | 10 | `CommitAck` | destination → source |
//! | 11 | `Abort` | either way |
//! | 12 | `RoundApplied` | destination → source |
//! | 13 | `DiskManifest`: chunk ids of a run of a disk image | source → destination |
//! | 14 | `DiskNeed`: which of them the destination lacks | destination → source |
//! | 15 | `DiskChunk`: one chunk's bytes | source → destination |
//! | 16 | `DiskWrites`: extents the guest wrote | source → destination |
//! | 17 | `DiskDone`: a disk is complete, with its digest | source → destination |
//! | 18 | `TunnelPacket`: one IPv4 packet of the migrated guest | either way |
//! | 19 | `TunnelClose`: the tunnel ends, and why | either way |
//! | 20 | `TunnelKeepalive`: nothing to carry, the tunnel lives | either way |
//! | 21 | `SettleQuery`: did this migration commit here? | source → destination |
//! | 22 | `SettleAnswer`: committed, not committed, or unknown (also the answer to a `Resume` no attempt waits for) | destination → source |
//! | 23 | `Resume`: take migration X up again on this connection | source → destination |
//! | 24 | `Resumed`: what the destination holds ([`crate::resume`]) | destination → source |
//! | 25 | `PostcopyDiscard`: pages the destination must treat as missing ([`crate::postcopy`]) | source → destination |
//! | 26 | `PostcopyStart`: the guest moves now; pages follow on demand | source → destination |
//! | 27 | `PageRequest`: pages vCPUs wait for | destination → source |
//! | 28 | `PostcopyComplete`: every page is placed, with the destination's figures | destination → source |
//!
//! Control-stream messages: 1–3, 7–14 and 28. Bulk-stream messages: 4–6,
//! 15–17, 25 and 26; a `Compressed` decodes to the body (type byte
//! included) of 4, 15 or 16. In post-copy two one-way streams join them:
//! the urgent stream (source → destination) carries requested pages (4,
//! 5), the request stream (destination → source) page requests (27).
//! Tunnel messages (18–20) travel after the commit, on the stream the
//! network tunnel (`wanmig-tunnel`) runs over, and nowhere else. A settle
//! query (21, 22) is a connection's only exchange, on its control stream;
//! so is a `Resume` (23) the destination answers from its journal (22)
//! because no attempt there waits for it (`features::SETTLE_ON_RESUME`).
//!
//! Type 0, and every tag 0 inside messages, is invalid.

use crate::codec::{DecodeError, Reader, Writer};
use crate::disk::{Chunk, ChunkParams, DiskDone, DiskWrites, Manifest, Need};
use crate::postcopy::{MAX_DISCARD_RUNS, PostcopyReport, read_request, read_runs, write_request, write_runs};
use crate::resume::ResumePoint;
use wanmig_types::PageRange;

/// Protocol version spoken by this build.
pub const PROTOCOL_VERSION: u16 = 3;
/// Largest frame body (a `DeviceState` with a full state container).
pub const MAX_FRAME: u32 = 17 << 20;
/// Most pages in one `Pages` batch.
pub const MAX_BATCH_PAGES: u32 = 4096;
/// Longest free-text field (reasons, paths).
pub const MAX_TEXT: u32 = 4096;
/// Most memory regions a VM may declare.
pub const MAX_REGIONS: u32 = 8;
/// Most disks a VM may declare.
pub const MAX_DISKS: u32 = 8;
/// Most NICs a VM may have.
pub const MAX_NICS: u32 = 8;
/// Largest device-state blob.
pub const MAX_DEVICE_STATE: u32 = 16 << 20 | 64;
/// Largest IPv4 packet a `TunnelPacket` carries: a 9000-byte jumbo MTU
/// with room to spare, far below what a guest could ask a host to buffer.
pub const MAX_TUNNEL_PACKET: u32 = 9216;
/// Smallest: an IPv4 header without options.
pub const MIN_TUNNEL_PACKET: u32 = 20;

use wanmig_types::MigrationId;
/// The guest page size this protocol version moves; feature bits negotiated
/// in the hello.
pub use wanmig_types::{PAGE_SIZE, features};

/// A disk as the source describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// Image size in bytes.
    pub size: u64,
    /// The image's path on the source (a hint for the destination).
    pub path: String,
    /// Attached read-only.
    pub read_only: bool,
}

/// A NIC as the source describes it: what the guest knows of itself (the
/// destination attaches it to a TAP of its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NicInfo {
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// The guest's IPv4 address and prefix length, if configured.
    pub ipv4: Option<([u8; 4], u8)>,
}

/// What the destination must be able to host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmShape {
    /// VM name.
    pub name: String,
    /// RAM regions: (guest-physical start, length), page-aligned.
    pub memory: Vec<(u64, u64)>,
    /// vCPU count.
    pub vcpus: u8,
    /// Disks in attachment order.
    pub disks: Vec<DiskInfo>,
    /// NICs in attachment order (after the disks).
    pub nics: Vec<NicInfo>,
}

/// How one page travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageData<'a> {
    /// All zero.
    Zero,
    /// The full 4096 bytes.
    Raw(&'a [u8]),
    /// An XBZRLE delta against the version of the page sent last.
    Delta(&'a [u8]),
}

/// One page of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRef<'a> {
    /// Guest-physical address, page-aligned.
    pub gpa: u64,
    /// Its content.
    pub data: PageData<'a>,
}

const PAGE_ZERO: u8 = 1;
const PAGE_RAW: u8 = 2;
const PAGE_DELTA: u8 = 3;

/// A validated batch of pages, parsed on iteration.
///
/// On the wire, after the type byte: `payload, headers, round u32,
/// count u32, headers_len u32`. The headers hold, per page, its address gap
/// and encoding (and a delta's length); the payload holds the page bytes
/// and deltas back to back. Kept apart, the page contents sit together as
/// in memory and the headers (mostly the same two bytes) compress to nearly
/// nothing; and with the payload first, zstd's fast match finder sees pages
/// at the start of its input, which measured ~20% smaller on test-guest
/// pages than with a 13-byte prefix (zstd -1, 256 pages: 898 vs 1092 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pages {
    /// Pre-copy round the batch belongs to.
    pub round: u32,
    count: u32,
    headers: Vec<u8>,
    payload: Vec<u8>,
}

impl Pages {
    /// Number of pages.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The pages, in order.
    pub fn iter(&self) -> impl Iterator<Item = PageRef<'_>> {
        let (mut h, mut p) = (Reader::new(&self.headers), Reader::new(&self.payload));
        let mut next = 0u64;
        // Validated when decoded or built, so parsing cannot fail here;
        // stop quietly rather than panic if it ever did.
        (0..self.count).map_while(move |_| read_page(&mut h, &mut p, &mut next).ok())
    }
}

/// Reads one page. Addresses are ascending within a batch and travel as the
/// number of pages skipped since the previous one (a ULEB128, usually the
/// single byte 0), which costs next to nothing once compressed.
fn read_page<'a>(r: &mut Reader<'a>, payload: &mut Reader<'a>, next: &mut u64) -> Result<PageRef<'a>, DecodeError> {
    let skip = r.uleb("page gap")?;
    let gpa = skip
        .checked_mul(PAGE_SIZE as u64)
        .and_then(|g| g.checked_add(*next))
        .filter(|g| g.checked_add(PAGE_SIZE as u64).is_some())
        .ok_or(DecodeError::Invalid { field: "page gap", reason: "address overflows" })?;
    *next = gpa + PAGE_SIZE as u64;
    let data = match r.u8("page encoding")? {
        PAGE_ZERO => PageData::Zero,
        PAGE_RAW => PageData::Raw(payload.bytes("raw page", PAGE_SIZE)?),
        PAGE_DELTA => {
            let n = r.u16("delta length")?;
            if n as usize >= PAGE_SIZE {
                return Err(DecodeError::TooLarge {
                    field: "delta length",
                    value: n.into(),
                    limit: PAGE_SIZE as u64 - 1,
                });
            }
            PageData::Delta(payload.bytes("delta", n as usize)?)
        }
        tag => return Err(DecodeError::UnknownTag { what: "page encoding", tag: tag.into() }),
    };
    Ok(PageRef { gpa, data })
}

/// Builds a `Pages` frame without copying pages twice.
#[derive(Debug)]
pub struct PagesBuilder {
    round: u32,
    count: u32,
    next: u64,
    headers: Writer,
    payload: Writer,
}

impl PagesBuilder {
    /// An empty batch for `round`.
    pub fn new(round: u32) -> Self {
        PagesBuilder { round, count: 0, next: 0, headers: Writer::default(), payload: Writer::default() }
    }

    /// Pages so far.
    pub fn len(&self) -> u32 {
        self.count
    }

    /// Whether no page was added.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether the batch has reached [`MAX_BATCH_PAGES`].
    pub fn is_full(&self) -> bool {
        self.count >= MAX_BATCH_PAGES
    }

    /// Encoded size so far.
    pub fn bytes(&self) -> usize {
        self.headers.buf.len() + self.payload.buf.len()
    }

    /// Adds a page. Panics on a misaligned or descending address, a raw
    /// page that is not one page, a delta that is not smaller than a page,
    /// or a full batch: all are bugs of the caller, never peer input.
    pub fn push(&mut self, page: PageRef<'_>) {
        assert!(
            page.gpa % PAGE_SIZE as u64 == 0 && page.gpa >= self.next && !self.is_full(),
            "pages go into a batch aligned, ascending, and up to MAX_BATCH_PAGES"
        );
        self.headers.uleb((page.gpa - self.next) / PAGE_SIZE as u64);
        self.next = page.gpa + PAGE_SIZE as u64;
        match page.data {
            PageData::Zero => self.headers.u8(PAGE_ZERO),
            PageData::Raw(b) => {
                assert_eq!(b.len(), PAGE_SIZE, "raw pages are whole pages");
                self.headers.u8(PAGE_RAW);
                self.payload.bytes(b);
            }
            PageData::Delta(d) => {
                assert!(d.len() < PAGE_SIZE, "deltas are smaller than a page");
                self.headers.u8(PAGE_DELTA);
                self.headers.u16(d.len() as u16);
                self.payload.bytes(d);
            }
        }
        self.count += 1;
    }

    /// The batch.
    pub fn finish(self) -> Pages {
        Pages { round: self.round, count: self.count, headers: self.headers.buf, payload: self.payload.buf }
    }
}

/// Decodes a `Pages` body after its type byte (also what a `Compressed`
/// message decompresses to).
fn decode_pages(rest: &[u8]) -> Result<Pages, DecodeError> {
    // The fixed fields close the message: read them from the end.
    let split = rest.len().checked_sub(12).ok_or(DecodeError::Truncated {
        field: "pages trailer",
        need: 12,
        have: rest.len(),
    })?;
    let (front, trailer) = rest.split_at(split);
    let mut t = Reader::new(trailer);
    let round = t.u32("round")?;
    let count = t.count("page count", MAX_BATCH_PAGES)?;
    let headers_len = t.u32("headers length")? as usize;
    let payload_len = front.len().checked_sub(headers_len).ok_or(DecodeError::Truncated {
        field: "page headers",
        need: headers_len,
        have: front.len(),
    })?;
    let (payload, headers) = front.split_at(payload_len);
    let (mut h, mut p) = (Reader::new(headers), Reader::new(payload));
    let mut next = 0;
    for _ in 0..count {
        read_page(&mut h, &mut p, &mut next)?;
    }
    h.finish()?;
    p.finish()?;
    Ok(Pages { round, count: count as u32, headers: headers.to_vec(), payload: payload.to_vec() })
}

/// What a destination knows of a migration a `SettleQuery` asks about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Settlement {
    /// It committed: the destination owns (and ran) the VM.
    Committed,
    /// It never committed and never will (it ended before `Commit`
    /// arrived): the source owns the VM.
    NotCommitted,
    /// The destination has no record of it.
    Unknown,
    /// It committed in post-copy and the guest runs there, but pages it
    /// lacks are still at the source: the destination waits for them.
    PostcopyRunning,
    /// It committed in post-copy and the destination lost the guest before
    /// every page arrived (its process ended): the guest's state there is
    /// gone; the source holds the guest as it was at the switch.
    PostcopyLost,
}

/// A protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Opens a migration.
    Hello {
        /// Protocol version.
        version: u16,
        /// Features the source can use.
        features: u64,
        /// Guest page size.
        page_size: u32,
        /// Random id of this migration attempt.
        migration_id: MigrationId,
        /// The VM.
        shape: VmShape,
        /// How the source proposes to cut disk images.
        chunking: ChunkParams,
        /// A secret of this migration's two ends: a `Resume` must carry it.
        resume_secret: [u8; 32],
        /// Per disk, the earlier sync since which the source tracked every
        /// block the guest wrote (`features::DISK_BASE` offered; else
        /// empty): a destination holding that sync's replica needs only
        /// those blocks.
        bases: Vec<Option<MigrationId>>,
    },
    /// The destination will host the VM with these features.
    Accept {
        /// Features both sides use.
        features: u64,
        /// How to cut disk images: what the destination's chunk store holds.
        chunking: ChunkParams,
        /// Per disk, whether its image starts from the base the source
        /// named (`features::DISK_BASE` agreed; else empty): no first copy,
        /// only the written blocks.
        based: Vec<bool>,
    },
    /// The destination will not host the VM.
    Refuse {
        /// Why.
        reason: String,
    },
    /// Guest pages.
    Pages(Pages),
    /// The body of a bulk message (`Pages`, `DiskChunk` or `DiskWrites`),
    /// type byte included, compressed as the next piece of the migration's
    /// one zstd stream.
    Compressed {
        /// Length of the body once decompressed (at most [`MAX_FRAME`]).
        raw_len: u32,
        /// The compressed body.
        data: Vec<u8>,
    },
    /// The end of a pre-copy round.
    RoundDone {
        /// The round.
        round: u32,
        /// Pages sent in it.
        pages: u64,
    },
    /// vCPU and device state, after the last pages (the source is paused).
    DeviceState {
        /// A state container as written by the VMM; zstd-compressed when
        /// both sides agreed on `features::ZSTD`.
        state: Vec<u8>,
    },
    /// The destination holds everything and can run the VM.
    Ready,
    /// The source hands the VM over; it will never run it again.
    Commit,
    /// The destination runs the VM.
    CommitAck,
    /// Either side gives up (before commit).
    Abort {
        /// Why.
        reason: String,
    },
    /// The destination has applied every page of a pre-copy round.
    RoundApplied {
        /// The round.
        round: u32,
    },
    /// Chunk ids of a run of a disk image.
    DiskManifest(Manifest),
    /// The chunks of a manifest part the destination lacks.
    DiskNeed(Need),
    /// One chunk's bytes.
    DiskChunk(Chunk),
    /// Extents the guest wrote.
    DiskWrites(DiskWrites),
    /// A disk is complete.
    DiskDone(DiskDone),
    /// One IPv4 packet to or from the migrated guest, without its link-layer
    /// header: each host builds the Ethernet header of its own segment. The
    /// codec bounds its length ([`MIN_TUNNEL_PACKET`]..=[`MAX_TUNNEL_PACKET`]);
    /// the tunnel parses and checks the packet itself.
    TunnelPacket {
        /// The packet, IPv4 header first.
        packet: Vec<u8>,
    },
    /// The tunnel ends (the routes converged, its time ran out, or the
    /// sender stops); the receiver answers with its own `TunnelClose`.
    TunnelClose {
        /// Why.
        reason: String,
    },
    /// Sent when the tunnel has carried nothing for a while, so that an idle
    /// tunnel does not let the connection's idle timeout end it.
    TunnelKeepalive,
    /// `wanmig settle`: did migration `migration_id` commit here? The first
    /// message of a connection of its own (instead of `Hello`).
    SettleQuery {
        /// The migration asked about.
        migration_id: MigrationId,
    },
    /// The destination's answer to a `SettleQuery`, from its journal.
    SettleAnswer {
        /// The migration asked about.
        migration_id: MigrationId,
        /// What became of it here.
        outcome: Settlement,
    },
    /// Resumes migration `migration_id` on this new connection (its first
    /// message, instead of `Hello`).
    Resume {
        /// The migration.
        migration_id: MigrationId,
        /// The secret of its hello.
        secret: [u8; 32],
    },
    /// The destination takes the migration up again from this point.
    Resumed(ResumePoint),
    /// Pages (runs of page frame numbers) the destination must treat as
    /// missing when the guest moves: dirtied since they were sent, or
    /// never sent.
    PostcopyDiscard {
        /// Ascending, disjoint runs.
        pages: Vec<PageRange>,
    },
    /// The end of pre-copy: the guest moves with `missing` pages (every
    /// page the discards named) still at the source. From here the bulk
    /// stream pushes them and the urgent stream answers requests.
    PostcopyStart {
        /// Pages the discards named, to check against.
        missing: u64,
    },
    /// Pages (page frame numbers) vCPUs or devices wait for, in the order
    /// they faulted.
    PageRequest {
        /// The pages.
        pages: Vec<u64>,
    },
    /// Every page is placed at the destination: the source may let go.
    PostcopyComplete(PostcopyReport),
}

/// Reads a frame header: the body length, checked against [`MAX_FRAME`].
pub fn frame_len(header: [u8; 4]) -> Result<usize, DecodeError> {
    let n = u32::from_le_bytes(header);
    if n == 0 || n > MAX_FRAME {
        return Err(DecodeError::TooLarge { field: "frame length", value: n.into(), limit: MAX_FRAME.into() });
    }
    Ok(n as usize)
}

impl Message {
    /// The message as a frame: length prefix and body.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer { buf: vec![0; 4] };
        match self {
            Message::Hello { version, features, page_size, migration_id, shape, chunking, resume_secret, bases } => {
                w.u8(1);
                w.u16(*version);
                w.u64(*features);
                w.u32(*page_size);
                w.bytes(&migration_id.0);
                w.blob(shape.name.as_bytes());
                w.u32(shape.memory.len() as u32);
                for (start, len) in &shape.memory {
                    w.u64(*start);
                    w.u64(*len);
                }
                w.u8(shape.vcpus);
                w.u32(shape.disks.len() as u32);
                for d in &shape.disks {
                    w.u64(d.size);
                    w.blob(d.path.as_bytes());
                    w.u8(u8::from(d.read_only));
                }
                w.u32(shape.nics.len() as u32);
                for n in &shape.nics {
                    w.bytes(&n.mac);
                    match n.ipv4 {
                        None => w.u8(0),
                        Some((addr, prefix)) => {
                            w.u8(1);
                            w.bytes(&addr);
                            w.u8(prefix);
                        }
                    }
                }
                chunking.write(&mut w);
                w.bytes(resume_secret);
                if features & features::DISK_BASE != 0 {
                    w.u32(bases.len() as u32);
                    for b in bases {
                        match b {
                            None => w.u8(0),
                            Some(id) => {
                                w.u8(1);
                                w.bytes(&id.0);
                            }
                        }
                    }
                }
            }
            Message::Accept { features, chunking, based } => {
                w.u8(2);
                w.u64(*features);
                chunking.write(&mut w);
                if features & features::DISK_BASE != 0 {
                    w.u32(based.len() as u32);
                    for &b in based {
                        w.u8(u8::from(b));
                    }
                }
            }
            Message::Refuse { reason } => {
                w.u8(3);
                w.blob(truncated(reason));
            }
            Message::Pages(p) => {
                w.u8(4);
                w.bytes(&p.payload);
                w.bytes(&p.headers);
                w.u32(p.round);
                w.u32(p.count);
                w.u32(u32::try_from(p.headers.len()).expect("headers of at most MAX_BATCH_PAGES pages"));
            }
            Message::Compressed { raw_len, data } => {
                w.u8(5);
                w.u32(*raw_len);
                w.bytes(data);
            }
            Message::RoundDone { round, pages } => {
                w.u8(6);
                w.u32(*round);
                w.u64(*pages);
            }
            Message::DeviceState { state } => {
                w.u8(7);
                w.bytes(state);
            }
            Message::Ready => w.u8(8),
            Message::Commit => w.u8(9),
            Message::CommitAck => w.u8(10),
            Message::Abort { reason } => {
                w.u8(11);
                w.blob(truncated(reason));
            }
            Message::RoundApplied { round } => {
                w.u8(12);
                w.u32(*round);
            }
            Message::DiskManifest(m) => {
                w.u8(13);
                m.write(&mut w);
            }
            Message::DiskNeed(n) => {
                w.u8(14);
                n.write(&mut w);
            }
            Message::DiskChunk(c) => {
                w.u8(15);
                c.write(&mut w);
            }
            Message::DiskWrites(d) => {
                w.u8(16);
                d.write(&mut w);
            }
            Message::DiskDone(d) => {
                w.u8(17);
                d.write(&mut w);
            }
            Message::TunnelPacket { packet } => {
                w.u8(18);
                w.bytes(packet);
            }
            Message::TunnelClose { reason } => {
                w.u8(19);
                w.blob(truncated(reason));
            }
            Message::TunnelKeepalive => w.u8(20),
            Message::SettleQuery { migration_id } => {
                w.u8(21);
                w.bytes(&migration_id.0);
            }
            Message::SettleAnswer { migration_id, outcome } => {
                w.u8(22);
                w.bytes(&migration_id.0);
                w.u8(match outcome {
                    Settlement::Committed => 1,
                    Settlement::NotCommitted => 2,
                    Settlement::Unknown => 3,
                    Settlement::PostcopyRunning => 4,
                    Settlement::PostcopyLost => 5,
                });
            }
            Message::Resume { migration_id, secret } => {
                w.u8(23);
                w.bytes(&migration_id.0);
                w.bytes(secret);
            }
            Message::Resumed(point) => {
                w.u8(24);
                point.write(&mut w);
            }
            Message::PostcopyDiscard { pages } => {
                w.u8(25);
                write_runs(&mut w, pages);
            }
            Message::PostcopyStart { missing } => {
                w.u8(26);
                w.u64(*missing);
            }
            Message::PageRequest { pages } => {
                w.u8(27);
                write_request(&mut w, pages);
            }
            Message::PostcopyComplete(report) => {
                w.u8(28);
                report.write(&mut w);
            }
        }
        let body = u32::try_from(w.buf.len() - 4).expect("frames are far below 4 GiB");
        w.buf[..4].copy_from_slice(&body.to_le_bytes());
        w.buf
    }

    /// Decodes a frame body (without its length prefix).
    pub fn decode(body: &[u8]) -> Result<Message, DecodeError> {
        if body.len() > MAX_FRAME as usize {
            return Err(DecodeError::TooLarge { field: "frame", value: body.len() as u64, limit: MAX_FRAME.into() });
        }
        let mut r = Reader::new(body);
        let msg = match r.u8("message type")? {
            1 => {
                let version = r.u16("version")?;
                let features = r.u64("features")?;
                let page_size = r.u32("page size")?;
                let migration_id = MigrationId(r.id16("migration id")?);
                let name = r.string("VM name", 64)?;
                let n = r.count("region count", MAX_REGIONS)?;
                let mut memory = Vec::with_capacity(n);
                for _ in 0..n {
                    let (start, len) = (r.u64("region start")?, r.u64("region length")?);
                    if start % PAGE_SIZE as u64 != 0 || len % PAGE_SIZE as u64 != 0 || start.checked_add(len).is_none()
                    {
                        return Err(DecodeError::Invalid {
                            field: "memory region",
                            reason: "unaligned or overflowing",
                        });
                    }
                    memory.push((start, len));
                }
                let vcpus = r.u8("vCPU count")?;
                let n = r.count("disk count", MAX_DISKS)?;
                let mut disks = Vec::with_capacity(n);
                for _ in 0..n {
                    let size = r.u64("disk size")?;
                    let path = r.string("disk path", MAX_TEXT)?;
                    let read_only = match r.u8("disk read-only flag")? {
                        0 => false,
                        1 => true,
                        _ => return Err(DecodeError::Invalid { field: "disk read-only flag", reason: "not 0 or 1" }),
                    };
                    disks.push(DiskInfo { size, path, read_only });
                }
                let n = r.count("NIC count", MAX_NICS)?;
                let mut nics = Vec::with_capacity(n);
                for _ in 0..n {
                    let mac: [u8; 6] = r.bytes("NIC MAC", 6)?.try_into().expect("6 bytes read");
                    let ipv4 = match r.u8("NIC address flag")? {
                        0 => None,
                        1 => {
                            let addr: [u8; 4] = r.bytes("NIC address", 4)?.try_into().expect("4 bytes read");
                            let prefix = r.u8("NIC prefix length")?;
                            if !(1..=32).contains(&prefix) {
                                return Err(DecodeError::Invalid { field: "NIC prefix length", reason: "not 1..=32" });
                            }
                            Some((addr, prefix))
                        }
                        _ => return Err(DecodeError::Invalid { field: "NIC address flag", reason: "not 0 or 1" }),
                    };
                    nics.push(NicInfo { mac, ipv4 });
                }
                Message::Hello {
                    version,
                    features,
                    page_size,
                    migration_id,
                    shape: VmShape { name, memory, vcpus, disks, nics },
                    chunking: ChunkParams::read(&mut r)?,
                    resume_secret: r.bytes("resume secret", 32)?.try_into().expect("32 bytes read"),
                    bases: match features & features::DISK_BASE {
                        0 => Vec::new(),
                        _ => read_per_disk(&mut r, "disk base", |r| {
                            Ok(match r.u8("disk base flag")? {
                                0 => None,
                                1 => Some(MigrationId(r.id16("disk base")?)),
                                _ => {
                                    return Err(DecodeError::Invalid { field: "disk base flag", reason: "not 0 or 1" });
                                }
                            })
                        })?,
                    },
                }
            }
            2 => {
                let (features, chunking) = (r.u64("features")?, ChunkParams::read(&mut r)?);
                let based = match features & features::DISK_BASE {
                    0 => Vec::new(),
                    _ => read_per_disk(&mut r, "based disk", |r| match r.u8("based disk flag")? {
                        0 => Ok(false),
                        1 => Ok(true),
                        _ => Err(DecodeError::Invalid { field: "based disk flag", reason: "not 0 or 1" }),
                    })?,
                };
                Message::Accept { features, chunking, based }
            }
            3 => Message::Refuse { reason: r.string("reason", MAX_TEXT)? },
            4 => {
                let all = r.remaining();
                Message::Pages(decode_pages(r.bytes("pages", all)?)?)
            }
            5 => {
                let raw_len = r.u32("decompressed length")?;
                if raw_len > MAX_FRAME {
                    return Err(DecodeError::TooLarge {
                        field: "decompressed length",
                        value: raw_len.into(),
                        limit: MAX_FRAME.into(),
                    });
                }
                let n = r.remaining();
                Message::Compressed { raw_len, data: r.bytes("compressed data", n)?.to_vec() }
            }
            6 => Message::RoundDone { round: r.u32("round")?, pages: r.u64("pages")? },
            7 => {
                let n = r.remaining();
                if n > MAX_DEVICE_STATE as usize {
                    return Err(DecodeError::TooLarge {
                        field: "device state",
                        value: n as u64,
                        limit: MAX_DEVICE_STATE.into(),
                    });
                }
                Message::DeviceState { state: r.bytes("device state", n)?.to_vec() }
            }
            8 => Message::Ready,
            9 => Message::Commit,
            10 => Message::CommitAck,
            11 => Message::Abort { reason: r.string("reason", MAX_TEXT)? },
            12 => Message::RoundApplied { round: r.u32("round")? },
            13 => Message::DiskManifest(Manifest::read(&mut r)?),
            14 => Message::DiskNeed(Need::read(&mut r)?),
            15 => Message::DiskChunk(Chunk::read(&mut r)?),
            16 => Message::DiskWrites(DiskWrites::read(&mut r)?),
            17 => Message::DiskDone(DiskDone::read(&mut r)?),
            18 => {
                // The packet is the rest of the frame: its length is the frame's.
                let n = r.remaining();
                if n > MAX_TUNNEL_PACKET as usize {
                    return Err(DecodeError::TooLarge {
                        field: "tunnelled packet",
                        value: n as u64,
                        limit: MAX_TUNNEL_PACKET.into(),
                    });
                }
                if n < MIN_TUNNEL_PACKET as usize {
                    return Err(DecodeError::Truncated {
                        field: "tunnelled packet",
                        need: MIN_TUNNEL_PACKET as usize,
                        have: n,
                    });
                }
                Message::TunnelPacket { packet: r.bytes("tunnelled packet", n)?.to_vec() }
            }
            19 => Message::TunnelClose { reason: r.string("reason", MAX_TEXT)? },
            20 => Message::TunnelKeepalive,
            21 => Message::SettleQuery { migration_id: MigrationId(r.id16("migration id")?) },
            22 => Message::SettleAnswer {
                migration_id: MigrationId(r.id16("migration id")?),
                outcome: match r.u8("settlement")? {
                    1 => Settlement::Committed,
                    2 => Settlement::NotCommitted,
                    3 => Settlement::Unknown,
                    4 => Settlement::PostcopyRunning,
                    5 => Settlement::PostcopyLost,
                    tag => return Err(DecodeError::UnknownTag { what: "settlement", tag: tag.into() }),
                },
            },
            23 => Message::Resume {
                migration_id: MigrationId(r.id16("migration id")?),
                secret: r.bytes("resume secret", 32)?.try_into().expect("32 bytes read"),
            },
            24 => Message::Resumed(ResumePoint::read(&mut r, MAX_DISKS)?),
            25 => Message::PostcopyDiscard { pages: read_runs(&mut r, "discarded runs", MAX_DISCARD_RUNS)? },
            26 => Message::PostcopyStart { missing: r.u64("missing pages")? },
            27 => Message::PageRequest { pages: read_request(&mut r)? },
            28 => Message::PostcopyComplete(PostcopyReport::read(&mut r)?),
            tag => return Err(DecodeError::UnknownTag { what: "message type", tag: tag.into() }),
        };
        r.finish()?;
        Ok(msg)
    }

    /// Decodes what a `Compressed` message decompresses to: the body of a
    /// `Pages`, `DiskChunk` or `DiskWrites`; anything else is refused.
    pub fn decode_compressed_body(body: &[u8]) -> Result<Message, DecodeError> {
        match body.first() {
            Some(4 | 15 | 16) => Message::decode(body),
            Some(&tag) => Err(DecodeError::UnknownTag { what: "compressed message type", tag: tag.into() }),
            None => Err(DecodeError::Truncated { field: "compressed message", need: 1, have: 0 }),
        }
    }

    /// Short name, for messages and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Accept { .. } => "Accept",
            Message::Refuse { .. } => "Refuse",
            Message::Pages(_) => "Pages",
            Message::Compressed { .. } => "Compressed",
            Message::RoundDone { .. } => "RoundDone",
            Message::DeviceState { .. } => "DeviceState",
            Message::Ready => "Ready",
            Message::Commit => "Commit",
            Message::CommitAck => "CommitAck",
            Message::Abort { .. } => "Abort",
            Message::RoundApplied { .. } => "RoundApplied",
            Message::DiskManifest(_) => "DiskManifest",
            Message::DiskNeed(_) => "DiskNeed",
            Message::DiskChunk(_) => "DiskChunk",
            Message::DiskWrites(_) => "DiskWrites",
            Message::DiskDone(_) => "DiskDone",
            Message::TunnelPacket { .. } => "TunnelPacket",
            Message::TunnelClose { .. } => "TunnelClose",
            Message::TunnelKeepalive => "TunnelKeepalive",
            Message::SettleQuery { .. } => "SettleQuery",
            Message::SettleAnswer { .. } => "SettleAnswer",
            Message::Resume { .. } => "Resume",
            Message::Resumed(_) => "Resumed",
            Message::PostcopyDiscard { .. } => "PostcopyDiscard",
            Message::PostcopyStart { .. } => "PostcopyStart",
            Message::PageRequest { .. } => "PageRequest",
            Message::PostcopyComplete(_) => "PostcopyComplete",
        }
    }
}

/// Cuts free text to [`MAX_TEXT`] bytes at a character boundary.
/// A list with one entry per disk: its count (at most [`MAX_DISKS`]),
/// then each entry as `item` reads it.
fn read_per_disk<T>(
    r: &mut Reader<'_>,
    field: &'static str,
    item: impl Fn(&mut Reader<'_>) -> Result<T, DecodeError>,
) -> Result<Vec<T>, DecodeError> {
    let n = r.count(field, MAX_DISKS)?;
    (0..n).map(|_| item(r)).collect()
}

fn truncated(s: &str) -> &[u8] {
    let mut end = s.len().min(MAX_TEXT as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s.as_bytes()[..end]
}
