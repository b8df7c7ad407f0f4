//! What arrives on the bulk stream, carried out: pages into guest RAM,
//! chunks and written extents into the images, each disk's digest
//! compared, rounds made durable. Every message has been through the
//! session machine first, which said what to do with it.

use vm_memory::{Bytes, GuestAddress};
use wanmig_mem_sync::{PAGE_SIZE, compress, xbzrle};
use wanmig_vmm::memory::GuestRam;
use wanmig_wire::{DestAction, DestSession, Message, PageData, Pages, Stream};

use super::disks::DestDisks;
use super::error::ReceiveError;

/// What the destination keeps while data arrive.
#[derive(Debug)]
pub struct Incoming {
    /// Guest RAM (none for a disk-only sync).
    pub ram: Option<GuestRam>,
    /// The decoder of the source's zstd stream.
    zstd: compress::StreamDecompressor,
    /// The disks being copied.
    pub disks: Option<DestDisks>,
    /// Pages of the round in progress applied so far, one bit per guest
    /// page frame (what a resume need not have sent again).
    round_received: Vec<u64>,
}

/// What a bulk-stream message amounted to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bulk {
    /// Data applied.
    Applied,
    /// A round is complete and applied: hash what it wrote, then tell the
    /// source.
    RoundDone(u32),
    /// A disk's last word: compare the image with its digest (the disk
    /// takes no more data).
    CheckDisk(wanmig_wire::DiskDone),
    /// Enough chunks arrived since the store last committed: commit it.
    Commit,
    /// The source ended the stream.
    End,
}

fn bad(e: impl std::fmt::Display) -> ReceiveError {
    ReceiveError::BadInput(e.to_string())
}

impl Incoming {
    /// Keeps `ram` and `disks` for the data to come.
    pub fn new(ram: Option<GuestRam>, disks: Option<DestDisks>) -> Result<Self, ReceiveError> {
        let zstd = compress::StreamDecompressor::new().map_err(|e| bad(format!("zstd: {e}")))?;
        let frames = ram
            .as_ref()
            .map_or(0, |r| r.regions().iter().map(|(s, l)| (s.0 + l) / PAGE_SIZE as u64).max().unwrap_or(0));
        Ok(Incoming { ram, zstd, disks, round_received: vec![0; frames.div_ceil(64) as usize] })
    }

    /// The pages of the round in progress applied so far, as runs of page
    /// frame numbers.
    pub fn round_received(&self) -> Vec<wanmig_types::PageRange> {
        wanmig_mem_sync::to_ranges(&self.round_received, self.round_received.len() as u64 * 64)
    }

    /// After a resume: a new connection brings a new zstd stream, and the
    /// round starts over.
    pub fn reset_stream(&mut self) -> Result<(), ReceiveError> {
        self.zstd = compress::StreamDecompressor::new().map_err(|e| bad(format!("zstd: {e}")))?;
        self.round_received.fill(0);
        Ok(())
    }

    fn disks(&mut self) -> Result<&mut DestDisks, ReceiveError> {
        // The session admits disk data only when a copy was agreed, and one
        // is then always set up.
        self.disks.as_mut().ok_or_else(|| bad("disk data, but no disk is being copied"))
    }

    /// Feeds one message of the bulk stream (`None`: its end) through
    /// `session` and carries out what it says.
    pub fn on_bulk(&mut self, session: &mut DestSession, msg: Option<Message>) -> Result<Bulk, ReceiveError> {
        let Some(msg) = msg else {
            session.on_bulk_end()?;
            return Ok(Bulk::End);
        };
        let action = session.on_message(Stream::Bulk, &msg)?;
        self.carry_out(session, action, msg)
    }

    fn carry_out(&mut self, session: &mut DestSession, action: DestAction, msg: Message) -> Result<Bulk, ReceiveError> {
        match (action, msg) {
            (DestAction::ApplyPages, Message::Pages(p)) => {
                let ram = self.ram.as_ref().ok_or_else(|| bad("pages, but no memory is being received"))?;
                apply(ram, &p)?;
                for page in p.iter() {
                    let frame = page.gpa / PAGE_SIZE as u64;
                    // Within RAM: `apply` checked every address.
                    if let Some(w) = self.round_received.get_mut((frame / 64) as usize) {
                        *w |= 1 << (frame % 64);
                    }
                }
            }
            (DestAction::Decompress, Message::Compressed { raw_len, data }) => {
                let body = self.zstd.decompress(&data, raw_len as usize).map_err(bad)?;
                let inner = Message::decode_compressed_body(body).map_err(bad)?;
                let action = session.on_decompressed(&inner)?;
                return self.carry_out(session, action, inner);
            }
            (DestAction::StoreChunk, Message::DiskChunk(c)) => {
                let disks = self.disks()?;
                disks.on_chunk(&c)?;
                if disks.commit_due() {
                    return Ok(Bulk::Commit);
                }
            }
            (DestAction::WriteExtents, Message::DiskWrites(w)) => self.disks()?.on_writes(&w)?,
            // Hashing is the driver's, off the connection's task.
            (DestAction::CheckDisk, Message::DiskDone(d)) => {
                self.disks()?;
                return Ok(Bulk::CheckDisk(d));
            }
            (DestAction::RoundComplete(round), Message::RoundDone { .. }) => {
                self.round_received.fill(0);
                return Ok(Bulk::RoundDone(round));
            }
            (a, m) => return Err(bad(format!("{} on the bulk stream ({a:?})", m.name()))),
        }
        Ok(Bulk::Applied)
    }
}

/// Writes a batch into guest RAM, checking every address.
fn apply(ram: &GuestRam, pages: &Pages) -> Result<(), ReceiveError> {
    let mem = ram.mem();
    let mut page = [0u8; PAGE_SIZE];
    let outside = |gpa: u64| bad(format!("page {gpa:#x} is outside guest memory"));
    for p in pages.iter() {
        let at = GuestAddress(p.gpa);
        match p.data {
            PageData::Zero => mem.write_slice(&[0u8; PAGE_SIZE], at).map_err(|_| outside(p.gpa))?,
            PageData::Raw(b) => mem.write_slice(b, at).map_err(|_| outside(p.gpa))?,
            PageData::Delta(d) => {
                mem.read_slice(&mut page, at).map_err(|_| outside(p.gpa))?;
                xbzrle::decode(d, &mut page).map_err(|e| bad(format!("page {:#x}: {e}", p.gpa)))?;
                mem.write_slice(&page, at).map_err(|_| outside(p.gpa))?;
            }
        }
    }
    Ok(())
}
