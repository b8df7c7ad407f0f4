//! The built-in test guest and the oracle that checks it.
//!
//! The guest (C and assembly in `vmm/testguest/`, built by `build.rs`) is a
//! multiboot kernel: wanmig, QEMU (`-kernel`) and GRUB can all boot it.
//! `wanmig testguest --write FILE` saves it. It stamps every page of RAM from
//! 2 MiB up with a pattern, walks a working set rewriting each page with the
//! next generation, writes generation-stamped blocks to its first virtio-blk
//! disk (up to [`DISK_QUEUE_DEPTH`] writes in flight),
//! answers ARP, ICMP echo and a UDP sequence service ([`UDP_SEQ_PORT`]) on
//! its first virtio-net NIC, and keeps its own status page at
//! [`STATUS_GPA`]. Asked to (`poweroff_after_s`, `reset_after_s`), it finds
//! the ACPI tables the way an OS does and powers off or resets through the
//! registers they declare. `vmm/testguest/abi.h` is the contract; the
//! constants here mirror it.
//!
//! Realism: `mem_entropy` percent of every page it writes (and
//! `disk_entropy` percent of every block) is pseudo-random, a window of a
//! [`Pool`] chosen by hashing (page, generation) or (write, block), so it
//! defeats zstd and XBZRLE the way real data does while the oracle can still
//! recompute every byte. The host writes the pool and the generation-0 stamp
//! before the guest starts ([`prestamp`]): the emulated vCPU this project is
//! tested on copies about 10 MiB/s, too slow to stamp a big guest itself.
//!
//! After any save/restore or migration the oracle ([`check_memory`],
//! [`check_disk`]) holds the guest to:
//! - the pool is intact, and every page outside the working set holds its
//!   generation-0 content, every byte of it;
//! - the working set holds N and N−1 with one transition edge, its counters
//!   add up to the step count the guest recorded (or one more, and then the
//!   page being written may be torn between its two generations' random
//!   words, at one point), and every byte of every page is that of its
//!   generation;
//! - the guest's own check of every page it touched found no error;
//! - the disk holds exactly the writes the guest completed (its completed
//!   prefix), plus any of those still in flight, and nothing else.

use std::fmt::Write as _;

use vm_memory::{Bytes, GuestAddress};

use crate::config::{NetConfig, TestGuestConfig};
use crate::memory::GuestMem;

/// The guest image (a multiboot ELF).
pub static IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/testguest.elf"));

/// RAM below this is the guest's own (image, page tables, boot info).
pub const RESERVED_END: u64 = 0x20_0000;
/// Guest-physical address of the status page.
pub const STATUS_GPA: u64 = 0x10_1000;
/// Word 0 of every page is `PAGE_MAGIC ^ gpa`.
pub const PAGE_MAGIC: u64 = 0x574d_4750_4147_4530;
/// Word 0 of every written disk block.
pub const DISK_MAGIC: u64 = 0x574d_4744_4953_4b30;
/// Word 0 of the status page ("WMGSTAT2": the page layout with entropy).
pub const STATUS_MAGIC: u64 = 0x574d_4753_5441_5432;
/// Seed of the pseudo-random pool.
pub const POOL_SEED: u64 = 0x574d_4750_4f4f_4c30;
/// splitmix64's increment, also the multiplier of generations and writes in
/// window keys.
pub const POOL_GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
/// Salt of a page's window key.
pub const PAGE_SALT: u64 = 0x574d_4750_524e_4430;
/// Salt of a disk block's window key.
pub const DISK_SALT: u64 = 0x574d_4744_524e_4430;
/// The pool's size is a multiple of this.
pub const POOL_ALIGN: u64 = 0x1_0000;
/// Largest default pool.
pub const POOL_MAX_BYTES: u64 = 0x100_0000;
/// A default pool takes at most 1/this of the low RAM above [`RESERVED_END`].
pub const POOL_RAM_SHARE: u64 = 8;
/// The host's word in the status page saying it stamped generation 0.
pub const PRESTAMP_MAGIC: u64 = 0x574d_4750_5245_5354;
/// Index of that word (`host_stamped`) in the status page.
const HOST_STAMPED_WORD: u64 = 21;
/// Most disk writes the guest has in flight.
pub const DISK_QUEUE_DEPTH: u64 = 8;
pub use crate::config::{DEFAULT_DISK_ENTROPY, DEFAULT_MEM_ENTROPY};
/// Stride of scattered disk writes (`disk_scatter`).
pub const DISK_SCATTER_STRIDE: u64 = 40503;
/// Phase: stamping done, working set and disk writer running.
pub const PHASE_RUNNING: u64 = 2;
/// UDP port of the guest's sequence service: each reply is the next value
/// of a counter in the status page (8 bytes, big-endian, starting at 1)
/// followed by the request's payload, truncated to [`UDP_SEQ_MAX_ECHO`].
pub const UDP_SEQ_PORT: u16 = 7;
/// Most payload bytes the sequence service echoes.
pub const UDP_SEQ_MAX_ECHO: usize = 1024;
const PAGE: u64 = 4096;
const BLOCK: usize = 4096;
/// The largest pool an oracle accepts from a status page: half of low RAM.
const POOL_LIMIT: u64 = (crate::layout::MMIO_GAP_START - RESERVED_END) / 2;

/// splitmix64's output function (abi.h `MIX64`).
pub fn mix64(z: u64) -> u64 {
    let z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Pseudo-random words in a page of `mem_entropy` percent (abi.h `MEM_WORDS`).
pub fn mem_words(entropy: u64) -> usize {
    (510 * entropy.min(100) / 100) as usize
}

/// Pseudo-random words in a block of `disk_entropy` percent (`DISK_WORDS`).
pub fn disk_words(entropy: u64) -> usize {
    (509 * entropy.min(100) / 100) as usize
}

/// The pool a guest with `low_free` bytes of low RAM above [`RESERVED_END`]
/// makes by default: none without entropy, else [`POOL_MAX_BYTES`] or
/// 1/[`POOL_RAM_SHARE`] of that RAM if less, in [`POOL_ALIGN`] units.
pub fn default_pool_bytes(low_free: u64, mem_entropy: u64, disk_entropy: u64) -> u64 {
    if mem_entropy == 0 && disk_entropy == 0 {
        return 0;
    }
    (low_free / POOL_RAM_SHARE).min(POOL_MAX_BYTES).min(low_free / 2) & !(POOL_ALIGN - 1)
}

/// The guest's pseudo-random pool: word i is splitmix64's i-th output for
/// [`POOL_SEED`]. Pages and blocks copy windows of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// Little-endian, as guest memory holds it.
    bytes: Vec<u8>,
}

impl Pool {
    /// The pool of `bytes` (a multiple of 8).
    pub fn new(bytes: u64) -> Self {
        let bytes = (0..bytes / 8)
            .flat_map(|i| mix64(POOL_SEED.wrapping_add((i + 1).wrapping_mul(POOL_GOLDEN))).to_le_bytes())
            .collect();
        Pool { bytes }
    }

    /// Its bytes, as guest memory holds them.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Word `i`.
    pub fn word(&self, i: usize) -> u64 {
        word_at(&self.bytes, i)
    }

    /// The bytes of the `n`-word window that `key` picks (abi.h
    /// `POOL_OFF`); empty if the pool is smaller than `n` words.
    pub fn window(&self, key: u64, n: usize) -> &[u8] {
        let words = self.bytes.len() / 8;
        if n == 0 || words < n {
            return &[];
        }
        let off = (mix64(key) % (words - n + 1) as u64) as usize;
        &self.bytes[8 * off..8 * (off + n)]
    }
}

/// Window key of page `gpa` at generation `generation`.
fn page_key(gpa: u64, generation: u64) -> u64 {
    PAGE_SALT ^ gpa ^ generation.wrapping_mul(POOL_GOLDEN)
}

/// Window key of write `seq` to `block`.
fn disk_key(seq: u64, block: u64) -> u64 {
    DISK_SALT ^ block ^ seq.wrapping_mul(POOL_GOLDEN)
}

/// Page `gpa` at generation `generation` with `n` pseudo-random words: its
/// bytes up to the zero tail (16 + 8n bytes; the rest of the page is zero).
pub fn page_head(pool: &Pool, gpa: u64, generation: u64, n: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + 8 * n);
    b.extend_from_slice(&(PAGE_MAGIC ^ gpa).to_le_bytes());
    b.extend_from_slice(&generation.to_le_bytes());
    b.extend_from_slice(pool.window(page_key(gpa, generation), n));
    b
}

/// Writes what the guest would stamp at boot before it runs: the pool and,
/// with `mem_entropy`, generation 0 of every page above it, and says so in
/// the status page's `host_stamped` (the guest then checks one page at each
/// end of a RAM region instead of stamping: copying the random words itself
/// would take it minutes on a large guest here). Only for a fresh boot,
/// after the image is loaded and before the first run.
pub fn prestamp(
    mem: &GuestMem,
    cfg: &TestGuestConfig,
    ram: &[(GuestAddress, u64)],
) -> Result<(), vm_memory::GuestMemoryError> {
    let (me, de) = (u64::from(cfg.mem_entropy), u64::from(cfg.disk_entropy));
    let low_end = ram.iter().find(|(s, l)| s.0 <= RESERVED_END && s.0 + l > RESERVED_END).map_or(0, |(s, l)| s.0 + l);
    let pool_bytes = default_pool_bytes(low_end.saturating_sub(RESERVED_END), me, de);
    let pool = Pool::new(pool_bytes);
    mem.write_slice(pool.bytes(), GuestAddress(RESERVED_END))?;
    let n = mem_words(if pool_bytes == 0 { 0 } else { me });
    if n == 0 {
        // Two words a page: the guest writes them as fast as it checks them.
        return Ok(());
    }
    let ws_start = RESERVED_END + pool_bytes;
    // A MiB at a time; the pages' zero tails stay zero in the buffer.
    let mut buf = vec![0u8; 1 << 20];
    for &(start, len) in ram {
        let mut gpa = start.0.max(ws_start).next_multiple_of(PAGE);
        let end = start.0 + len;
        while gpa + PAGE <= end {
            let bytes = ((end - gpa) / PAGE * PAGE).min(buf.len() as u64) as usize;
            for (i, page) in buf[..bytes].chunks_exact_mut(PAGE as usize).enumerate() {
                let at = gpa + i as u64 * PAGE;
                page[..8].copy_from_slice(&(PAGE_MAGIC ^ at).to_le_bytes());
                page[16..16 + 8 * n].copy_from_slice(pool.window(page_key(at, 0), n));
            }
            mem.write_slice(&buf[..bytes], GuestAddress(gpa))?;
            gpa += bytes as u64;
        }
    }
    // So that the guest checks a page a region rather than every page (the
    // loader has written the status page: it is in the image).
    mem.write_obj(PRESTAMP_MAGIC ^ me ^ (pool_bytes << 8), GuestAddress(STATUS_GPA + 8 * HOST_STAMPED_WORD))
}

/// The guest's command line for `cfg`; the guest drives the first NIC of
/// `nets` if it has an address.
pub fn cmdline(cfg: &TestGuestConfig, nets: &[NetConfig]) -> String {
    let mut s = format!(
        "ws_mib={} disk_kib={} disk_mib={} mem_entropy={} disk_entropy={}",
        cfg.ws_mib, cfg.disk_kib, cfg.disk_mib, cfg.mem_entropy, cfg.disk_entropy
    );
    if cfg.disk_scatter {
        s.push_str(" disk_scatter=1");
    }
    if cfg.flat_out {
        s.push_str(" rate_mib=max");
    } else {
        let _ = write!(s, " rate_mib={}", cfg.rate_mib);
    }
    if let Some(net) = nets.first()
        && let Some(ip) = net.ip
    {
        let _ = write!(s, " net_ip={} net_mac={}", ip.addr, net.mac);
    }
    if let Some(n) = cfg.poweroff_after_s {
        let _ = write!(s, " poweroff_after_s={n}");
    }
    if let Some(n) = cfg.reset_after_s {
        let _ = write!(s, " reset_after_s={n}");
    }
    s
}

/// The guest's status page.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct GuestStatus {
    /// 0 booting, 1 stamping, 2 running.
    pub phase: u64,
    /// Working-set steps taken (one page incremented per step).
    pub steps: u64,
    /// First page of the working set.
    pub ws_start: u64,
    /// Pages in the working set.
    pub ws_pages: u64,
    /// Pages stamped at boot.
    pub stamped_pages: u64,
    /// Disk writes completed: writes `0..disk_done` all have.
    pub disk_done: u64,
    /// Blocks in the disk region written cyclically.
    pub disk_blocks: u64,
    /// Mismatches the guest found itself.
    pub errors: u64,
    /// 10 ms timer ticks seen.
    pub ticks: u64,
    /// Address of the first mismatch.
    pub first_error_gpa: u64,
    /// Write `seq` goes to block `seq * disk_stride % disk_blocks`.
    pub disk_stride: u64,
    /// virtio-mmio base of the NIC the guest drives; 0: none.
    pub net_base: u64,
    /// Frames the guest received.
    pub net_rx: u64,
    /// Frames the guest sent.
    pub net_tx: u64,
    /// Frames received and not answered (not for it, or malformed).
    pub net_dropped: u64,
    /// Replies of the UDP sequence service so far (the last one carried it).
    pub udp_seq: u64,
    /// Pseudo-random percentage of each page written.
    pub mem_entropy: u64,
    /// Pseudo-random percentage of each disk block written.
    pub disk_entropy: u64,
    /// Size of the pool at [`RESERVED_END`]; the working set follows it.
    pub pool_bytes: u64,
    /// Disk writes handed to the device; `disk_done..disk_issued` may each
    /// have reached the disk or not.
    pub disk_issued: u64,
    /// What the host wrote before boot if it stamped generation 0
    /// ([`PRESTAMP_MAGIC`] ^ mem_entropy ^ pool_bytes << 8), else 0.
    pub host_stamped: u64,
}

/// What the oracle found wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OracleError {
    /// No status page: the guest did not start, or this is not the test guest.
    #[error("no test-guest status page at {STATUS_GPA:#x} (magic {0:#x})")]
    NoStatus(u64),
    /// The guest has not finished stamping its memory.
    #[error("the test guest is not running yet (phase {0})")]
    NotRunning(u64),
    /// The status page describes a working set outside RAM.
    #[error("status page describes a working set outside RAM ({start:#x}, {pages} pages)")]
    BadWorkingSet {
        /// Its start.
        start: u64,
        /// Its length.
        pages: u64,
    },
    /// The status page describes an impossible pool or entropy.
    #[error("status page describes a bad pool ({pool_bytes} bytes) or entropy ({mem_entropy}, {disk_entropy})")]
    BadPool {
        /// Pool size.
        pool_bytes: u64,
        /// mem_entropy.
        mem_entropy: u64,
        /// disk_entropy.
        disk_entropy: u64,
    },
    /// The pool is not what the guest and the host wrote.
    #[error("pool word at {gpa:#x} is {found:#x}, expected {expected:#x}")]
    Pool {
        /// Where.
        gpa: u64,
        /// What it holds.
        found: u64,
        /// What it should hold.
        expected: u64,
    },
    /// A page lost its pattern.
    #[error("page {gpa:#x}: word {word} is {found:#x}, expected {expected:#x}")]
    Page {
        /// The page.
        gpa: u64,
        /// Which word (0: magic, 1: generation, 2..: pseudo-random, then zero).
        word: u16,
        /// What it holds.
        found: u64,
        /// What it should hold.
        expected: u64,
    },
    /// The working set has more than one edge or a jump of more than one.
    #[error("working set is not N/N-1 with one edge: page {gpa:#x} holds {found} after {previous}")]
    Edge {
        /// The page.
        gpa: u64,
        /// Its counter.
        found: u64,
        /// The counter of the page before it.
        previous: u64,
    },
    /// The counters do not add up to the guest's step count.
    #[error("working-set counters add up to {sum}, the guest counted {steps} steps")]
    Steps {
        /// Sum of counters.
        sum: u64,
        /// The guest's count.
        steps: u64,
    },
    /// The guest itself saw a page that was not what it last wrote.
    #[error("the guest found {errors} mismatched pages, the first at {first:#x}")]
    GuestErrors {
        /// How many.
        errors: u64,
        /// The first.
        first: u64,
    },
    /// The disk image is not what the guest wrote.
    #[error("disk block {block} is not what writes 0..{done} (and any of those in flight) left there")]
    Disk {
        /// First block that differs.
        block: u64,
        /// Writes the guest completed.
        done: u64,
    },
    /// The disk image is smaller than the region the guest writes.
    #[error("disk image is {len} bytes, the guest writes {need}")]
    DiskTooSmall {
        /// Image size.
        len: u64,
        /// Bytes the guest writes.
        need: u64,
    },
}

/// Reads the status page from guest memory.
pub fn read_status(mem: &GuestMem) -> Result<GuestStatus, OracleError> {
    let mut w = [0u64; 22];
    for (i, word) in w.iter_mut().enumerate() {
        *word = mem.read_obj(GuestAddress(STATUS_GPA + 8 * i as u64)).map_err(|_| OracleError::NoStatus(0))?;
    }
    if w[0] != STATUS_MAGIC {
        return Err(OracleError::NoStatus(w[0]));
    }
    Ok(GuestStatus {
        phase: w[1],
        steps: w[2],
        ws_start: w[3],
        ws_pages: w[4],
        stamped_pages: w[5],
        disk_done: w[6],
        disk_blocks: w[7],
        errors: w[8],
        ticks: w[9],
        first_error_gpa: w[10],
        disk_stride: w[11],
        net_base: w[12],
        net_rx: w[13],
        net_tx: w[14],
        net_dropped: w[15],
        udp_seq: w[16],
        mem_entropy: w[17],
        disk_entropy: w[18],
        pool_bytes: w[19],
        disk_issued: w[20],
        host_stamped: w[21],
    })
}

/// What a passing memory check saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryReport {
    /// The guest's status page.
    pub status: GuestStatus,
    /// Highest generation in the working set.
    pub generation: u64,
    /// Pages checked.
    pub pages_checked: u64,
}

/// The pool a status page describes, once its size and entropy are checked.
fn status_pool(status: &GuestStatus) -> Result<Pool, OracleError> {
    let bad = || OracleError::BadPool {
        pool_bytes: status.pool_bytes,
        mem_entropy: status.mem_entropy,
        disk_entropy: status.disk_entropy,
    };
    let needs_pool = status.mem_entropy > 0 || status.disk_entropy > 0;
    if status.mem_entropy > 100
        || status.disk_entropy > 100
        || status.pool_bytes % POOL_ALIGN != 0
        || status.pool_bytes > POOL_LIMIT
        || needs_pool != (status.pool_bytes > 0)
    {
        return Err(bad());
    }
    Ok(Pool::new(status.pool_bytes))
}

fn word_at(page: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(page[8 * i..8 * i + 8].try_into().expect("8 bytes"))
}

/// Compares a page's pseudo-random words with `want`; the first that
/// differs, as (word index, found, expected).
fn first_diff(page: &[u8], want: &[u8]) -> Option<(usize, u64, u64)> {
    if page[16..16 + want.len()] == *want {
        return None;
    }
    (0..want.len() / 8).map(|j| (2 + j, word_at(page, 2 + j), word_at(want, j))).find(|(_, f, w)| f != w)
}

/// Whether the random words are `new`'s up to some point and `old`'s after
/// it: a page paused while `rep movsq` rewrote them.
fn torn_between(page: &[u8], new: &[u8], old: &[u8]) -> bool {
    let random = &page[16..16 + new.len()];
    if old.len() != new.len() {
        return false;
    }
    let k = random.chunks_exact(8).zip(new.chunks_exact(8)).take_while(|(a, b)| a == b).count();
    random[8 * k..] == old[8 * k..]
}

static ZERO_PAGE: [u8; PAGE as usize] = [0; PAGE as usize];

/// Checks every RAM page of a paused (or restored, not yet resumed) test
/// guest, every byte of it.
pub fn check_memory(mem: &GuestMem, regions: &[(GuestAddress, u64)]) -> Result<MemoryReport, OracleError> {
    let status = read_status(mem)?;
    if status.phase != PHASE_RUNNING {
        return Err(OracleError::NotRunning(status.phase));
    }
    let pool = status_pool(&status)?;
    let ws = status.ws_start..status.ws_start.saturating_add(status.ws_pages.saturating_mul(PAGE));
    let ws_inside_ram = regions.iter().any(|(s, l)| s.0 <= RESERVED_END && ws.end <= s.0 + l);
    if status.ws_start != RESERVED_END + status.pool_bytes || !ws_inside_ram {
        return Err(OracleError::BadWorkingSet { start: status.ws_start, pages: status.ws_pages });
    }
    if status.errors != 0 {
        return Err(OracleError::GuestErrors { errors: status.errors, first: status.first_error_gpa });
    }
    // The pool, word by word.
    let mut held = vec![0u8; status.pool_bytes as usize];
    mem.read_slice(&mut held, GuestAddress(RESERVED_END)).map_err(|_| OracleError::NoStatus(0))?;
    if held != pool.bytes() {
        let i = held.chunks_exact(8).zip(pool.bytes().chunks_exact(8)).position(|(h, w)| h != w).expect("a word");
        return Err(OracleError::Pool {
            gpa: RESERVED_END + 8 * i as u64,
            found: word_at(&held, i),
            expected: pool.word(i),
        });
    }
    drop(held);
    let n = mem_words(status.mem_entropy);
    // Paused between writing a page's generation and counting the step, the
    // guest may have left that page's random words half rewritten.
    let writing = (status.ws_pages > 0).then(|| status.ws_start + status.steps % status.ws_pages * PAGE);
    let mut torn = false;
    let mut pages_checked = 0;
    let (mut sum, mut first, mut previous, mut generation) = (0u64, None::<u64>, 0u64, 0u64);
    let mut buf = vec![0u8; 1 << 20];
    for &(start, len) in regions {
        let mut at = start.0.max(status.ws_start);
        let end = start.0 + len;
        while at < end {
            let n_bytes = (end - at).min(buf.len() as u64) as usize;
            mem.read_slice(&mut buf[..n_bytes], GuestAddress(at)).map_err(|_| OracleError::NoStatus(0))?;
            for (i, page) in buf[..n_bytes].chunks_exact(PAGE as usize).enumerate() {
                let gpa = at + i as u64 * PAGE;
                let (w0, w1) = (word_at(page, 0), word_at(page, 1));
                if w0 != PAGE_MAGIC ^ gpa {
                    return Err(OracleError::Page { gpa, word: 0, found: w0, expected: PAGE_MAGIC ^ gpa });
                }
                if ws.contains(&gpa) {
                    // Non-increasing along the working set, one step at most.
                    match first {
                        None => {
                            first = Some(w1);
                            generation = w1;
                        }
                        Some(f) if w1 == previous || (w1 + 1 == previous && w1 + 1 == f) => {}
                        Some(_) => return Err(OracleError::Edge { gpa, found: w1, previous }),
                    }
                    previous = w1;
                    sum += w1;
                } else if w1 != 0 {
                    return Err(OracleError::Page { gpa, word: 1, found: w1, expected: 0 });
                }
                let want = pool.window(page_key(gpa, w1), n);
                if let Some((word, found, expected)) = first_diff(page, want) {
                    let old = if w1 > 0 { pool.window(page_key(gpa, w1 - 1), n) } else { &[] };
                    if Some(gpa) != writing || torn || w1 == 0 || !torn_between(page, want, old) {
                        return Err(OracleError::Page { gpa, word: word as u16, found, expected });
                    }
                    torn = true;
                }
                let tail = 16 + 8 * n;
                if page[tail..] != ZERO_PAGE[tail..] {
                    let word =
                        page[tail..].chunks_exact(8).position(|w| w != [0; 8]).expect("a non-zero word") + tail / 8;
                    return Err(OracleError::Page { gpa, word: word as u16, found: word_at(page, word), expected: 0 });
                }
                pages_checked += 1;
            }
            at += n_bytes as u64;
        }
    }
    // A torn page is the one being written: its step is not counted yet.
    let counted = if torn { sum == status.steps + 1 } else { sum == status.steps || sum == status.steps + 1 };
    if !counted {
        return Err(OracleError::Steps { sum, steps: status.steps });
    }
    Ok(MemoryReport { status, generation, pages_checked })
}

/// The block written by write `seq`.
pub fn block_of(seq: u64, blocks: u64, stride: u64) -> u64 {
    (u128::from(seq) * u128::from(stride) % u128::from(blocks)) as u64
}

/// `a`⁻¹ mod `n`, if `a` and `n` are coprime.
fn inverse_mod(a: u64, n: u64) -> Option<u64> {
    let (mut r0, mut r1) = (i128::from(n), i128::from(a));
    let (mut t0, mut t1) = (0i128, 1i128);
    while r1 != 0 {
        let q = r0 / r1;
        (r0, r1) = (r1, r0 - q * r1);
        (t0, t1) = (t1, t0 - q * t1);
    }
    (r0 == 1).then(|| t0.rem_euclid(i128::from(n)) as u64)
}

/// The 4 KiB block that write number `seq` leaves at block
/// `seq * stride % blocks`, with `n` pseudo-random words from `pool`.
pub fn disk_block(pool: &Pool, n: usize, seq: u64, blocks: u64, stride: u64) -> [u8; BLOCK] {
    let mut b = [0u8; BLOCK];
    let block = block_of(seq, blocks, stride);
    let random = pool.window(disk_key(seq, block), n);
    for (i, w) in b.chunks_exact_mut(8).enumerate() {
        let v = match i {
            0 => DISK_MAGIC,
            1 => seq,
            2 => block,
            _ => DISK_MAGIC ^ i as u64,
        };
        w.copy_from_slice(&v.to_le_bytes());
    }
    b[24..24 + random.len()].copy_from_slice(random);
    b
}

/// Checks a disk image against the guest's status: it must hold exactly
/// writes `0..disk_done`, any of the writes `disk_done..disk_issued` still
/// in flight, and zeros everywhere else in the region.
/// Returns the number of writes it holds.
pub fn check_disk(image: &[u8], status: &GuestStatus) -> Result<u64, OracleError> {
    let n = status.disk_blocks;
    let done = status.disk_done;
    if n == 0 {
        // The guest writes no disk.
        return Ok(done);
    }
    let bad = |block| OracleError::Disk { block, done };
    let issued = status.disk_issued.max(done);
    if issued - done > DISK_QUEUE_DEPTH.min(n) {
        return Err(bad(0));
    }
    let pool = status_pool(status)?;
    let words = disk_words(status.disk_entropy);
    let stride = status.disk_stride.max(1);
    // Block b is written by the writes seq = first(b) (mod n).
    let inverse = inverse_mod(stride % n, n).ok_or(bad(0))?;
    let first = |block: u64| (u128::from(block) * u128::from(inverse) % u128::from(n)) as u64;
    let need = n * BLOCK as u64;
    if (image.len() as u64) < need {
        return Err(OracleError::DiskTooSmall { len: image.len() as u64, need });
    }
    // Past the region, the image is not the guest's to check.
    let mut landed = 0;
    for (block, data) in image.chunks(BLOCK).take(n as usize).enumerate() {
        let block = block as u64;
        let k = first(block);
        // The last completed write to the block, and the one in flight.
        let last = (done > k).then(|| k + (done - 1 - k) / n * n);
        let in_flight = last.map_or(k, |s| s + n);
        let holds = |seq: Option<u64>| match seq {
            Some(s) => data == disk_block(&pool, words, s, n, stride).as_slice(),
            None => data.iter().all(|&b| b == 0),
        };
        if holds(last) {
            continue;
        }
        if in_flight < issued && holds(Some(in_flight)) {
            landed += 1;
            continue;
        }
        return Err(bad(block));
    }
    Ok(done + landed)
}

/// Checks a disk image the guest wrote up to some unknown moment (a
/// replica synced while it ran, or an epoch of one): it must hold exactly
/// the writes `0..D` for some `D`, with at most [`DISK_QUEUE_DEPTH`] writes
/// after `D` that may have landed or not, and zeros elsewhere in the
/// region. `status` gives the guest's disk parameters (blocks, stride,
/// entropy, pool) — those of a guest booted from the same configuration
/// serve; its counters are ignored. Returns `D`.
pub fn check_disk_prefix(image: &[u8], status: &GuestStatus) -> Result<u64, OracleError> {
    let n = status.disk_blocks;
    if n == 0 {
        return Ok(0);
    }
    // The newest write the image holds: every block names its write, and
    // the full check below proves the name right.
    let newest = image
        .chunks(BLOCK)
        .take(n as usize)
        .filter(|b| b.len() >= 16 && word_at(b, 0) == DISK_MAGIC)
        .map(|b| word_at(b, 1))
        .max();
    let issued = newest.map_or(0, |s| s.saturating_add(1));
    let mut last = Err(OracleError::Disk { block: 0, done: issued });
    for done in (issued.saturating_sub(DISK_QUEUE_DEPTH)..=issued).rev() {
        let s = GuestStatus { disk_done: done, disk_issued: issued, ..*status };
        match check_disk(image, &s) {
            Ok(_) => return Ok(done),
            Err(e) => last = Err(e),
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_of_the_guests_writes_is_recognised_and_anything_else_is_not() {
        let status = GuestStatus { disk_blocks: 64, disk_stride: 5, disk_entropy: 0, ..GuestStatus::default() };
        let pool = Pool::new(0);
        let mut image = vec![0u8; 64 * BLOCK + 4096];
        assert_eq!(check_disk_prefix(&image, &status).expect("nothing written"), 0);
        // 100 writes (wrapping the 64-block region), the last three in
        // flight and only one of those landed.
        for seq in 0..98u64 {
            let b = block_of(seq, 64, 5) as usize;
            image[b * BLOCK..(b + 1) * BLOCK].copy_from_slice(&disk_block(&pool, 0, seq, 64, 5));
        }
        let b = block_of(99, 64, 5) as usize;
        image[b * BLOCK..(b + 1) * BLOCK].copy_from_slice(&disk_block(&pool, 0, 99, 64, 5));
        assert_eq!(check_disk_prefix(&image, &status).expect("a prefix"), 98);
        // A block from the future, or a damaged one, is no prefix.
        let mut torn = image.clone();
        torn[3 * BLOCK + 100] ^= 1;
        assert!(check_disk_prefix(&torn, &status).is_err());
        let mut gap = image.clone();
        let b = block_of(10, 64, 5) as usize;
        let b2 = block_of(74, 64, 5) as usize;
        assert_eq!(b, b2);
        gap[b * BLOCK..(b + 1) * BLOCK].copy_from_slice(&disk_block(&pool, 0, 10, 64, 5));
        assert!(check_disk_prefix(&gap, &status).is_err(), "write 74 lost while 99 landed");
    }

    #[test]
    fn image_matches_the_abi() {
        // The status page lives where the linker script puts it, and the
        // multiboot header is in the first 8 KiB.
        assert!(IMAGE.len() > 4096);
        let h = IMAGE.windows(4).take(8192).position(|w| w == 0x1BAD_B002u32.to_le_bytes());
        assert!(h.is_some());
        let abi = include_str!("../testguest/abi.h");
        for (name, value) in [
            ("RESERVED_END", RESERVED_END),
            ("STATUS_GPA", STATUS_GPA),
            ("PAGE_MAGIC", PAGE_MAGIC),
            ("DISK_MAGIC", DISK_MAGIC),
            ("STATUS_MAGIC", STATUS_MAGIC),
            ("PHASE_RUNNING", PHASE_RUNNING),
            ("UDP_SEQ_PORT", u64::from(UDP_SEQ_PORT)),
            ("UDP_SEQ_MAX_ECHO", UDP_SEQ_MAX_ECHO as u64),
            ("POOL_SEED", POOL_SEED),
            ("POOL_GOLDEN", POOL_GOLDEN),
            ("PAGE_SALT", PAGE_SALT),
            ("DISK_SALT", DISK_SALT),
            ("POOL_ALIGN", POOL_ALIGN),
            ("POOL_MAX_BYTES", POOL_MAX_BYTES),
            ("POOL_RAM_SHARE", POOL_RAM_SHARE),
            ("DEFAULT_MEM_ENTROPY", u64::from(DEFAULT_MEM_ENTROPY)),
            ("DEFAULT_DISK_ENTROPY", u64::from(DEFAULT_DISK_ENTROPY)),
            ("DISK_QUEUE_DEPTH", DISK_QUEUE_DEPTH),
            ("PRESTAMP_MAGIC", PRESTAMP_MAGIC),
        ] {
            let line = abi.lines().find(|l| l.starts_with(&format!("#define {name} "))).expect(name);
            let text = line.split_whitespace().nth(2).expect("value").trim_end_matches("ull");
            let parsed =
                if let Some(hex) = text.strip_prefix("0x") { u64::from_str_radix(hex, 16) } else { text.parse() };
            assert_eq!(parsed, Ok(value), "{name}");
        }
        // The multipliers of MIX64, and the entropy-to-words rules.
        for needle in ["0xbf58476d1ce4e5b9ull", "0x94d049bb133111ebull", "(510ull * (e) / 100)", "(509ull * (e) / 100)"]
        {
            assert!(abi.contains(needle), "{needle}");
        }
        assert_eq!((mem_words(100), mem_words(35), disk_words(100), disk_words(60)), (510, 178, 509, 305));
    }

    #[test]
    fn pool_is_splitmix64_and_windows_move_with_the_generation() {
        // splitmix64 seeded with 0 starts 0xe220a8397b1dcdaf (its reference
        // output); our pool is the same generator from POOL_SEED.
        assert_eq!(mix64(POOL_GOLDEN), 0xe220_a839_7b1d_cdaf);
        let pool = Pool::new(1 << 20);
        assert_eq!(pool.bytes().len(), 1 << 20);
        assert_eq!(pool.word(0), mix64(POOL_SEED.wrapping_add(POOL_GOLDEN)));
        assert_eq!(pool.word(9), mix64(POOL_SEED.wrapping_add(10u64.wrapping_mul(POOL_GOLDEN))));
        let (a, b) = (pool.window(page_key(0x40_0000, 7), 200), pool.window(page_key(0x40_0000, 8), 200));
        assert_eq!(a.len(), 1600);
        assert_ne!(a, b);
        assert!(pool.window(1, 1 << 18).is_empty(), "a window larger than the pool");
        assert_eq!(default_pool_bytes(1 << 30, 35, 0), POOL_MAX_BYTES);
        assert_eq!(default_pool_bytes(30 << 20, 0, 60), 0x3c_0000);
        assert_eq!(default_pool_bytes(30 << 20, 0, 0), 0);
    }

    #[test]
    fn cmdline_carries_every_option() {
        let mut cfg = TestGuestConfig {
            ws_mib: 4,
            rate_mib: 2,
            flat_out: false,
            disk_kib: 8,
            disk_mib: 1,
            disk_scatter: true,
            mem_entropy: 40,
            disk_entropy: 0,
            poweroff_after_s: Some(3),
            reset_after_s: None,
        };
        assert_eq!(
            cmdline(&cfg, &[]),
            "ws_mib=4 disk_kib=8 disk_mib=1 mem_entropy=40 disk_entropy=0 disk_scatter=1 rate_mib=2 poweroff_after_s=3"
        );
        (cfg.flat_out, cfg.poweroff_after_s, cfg.reset_after_s) = (true, None, Some(7));
        assert!(cmdline(&cfg, &[]).ends_with(" rate_mib=max reset_after_s=7"));
        // The guest parses each key it is given.
        let guest = include_str!("../testguest/guest.c");
        for key in cmdline(&cfg, &[]).split(' ').chain(["poweroff_after_s=1"]).filter_map(|kv| kv.split('=').next()) {
            assert!(guest.contains(&format!("streq_prefix(s, \"{key}\", &v)")), "the guest ignores {key}");
        }
    }

    const POOL: u64 = 1 << 20;

    fn status(done: u64, blocks: u64) -> GuestStatus {
        GuestStatus {
            phase: PHASE_RUNNING,
            ws_start: RESERVED_END,
            disk_done: done,
            disk_issued: done,
            disk_blocks: blocks,
            disk_stride: 1,
            ..GuestStatus::default()
        }
    }

    fn with_entropy(s: GuestStatus, e: u64) -> GuestStatus {
        GuestStatus { disk_entropy: e, pool_bytes: if e > 0 { POOL } else { 0 }, ..s }
    }

    /// An image that holds the writes in `seqs`, in order.
    fn image(seqs: impl IntoIterator<Item = u64>, blocks: u64, stride: u64, e: u64, len: usize) -> Vec<u8> {
        let pool = Pool::new(if e > 0 { POOL } else { 0 });
        let mut img = vec![0u8; len];
        for seq in seqs {
            let b = block_of(seq, blocks, stride) as usize;
            img[b * BLOCK..(b + 1) * BLOCK].copy_from_slice(&disk_block(&pool, disk_words(e), seq, blocks, stride));
        }
        img
    }

    fn written(writes: u64, blocks: u64, len: usize) -> Vec<u8> {
        image(0..writes, blocks, 1, 0, len)
    }

    #[test]
    fn scattered_writes_check_like_ordered_ones() {
        let (blocks, stride) = (256, DISK_SCATTER_STRIDE);
        for writes in [0, 1, 100, 255, 256, 700] {
            let img = image(0..writes, blocks, stride, 0, blocks as usize * BLOCK);
            let s = GuestStatus { disk_stride: stride, ..status(writes, blocks) };
            assert_eq!(check_disk(&img, &s), Ok(writes), "{writes} writes");
            if writes > 3 {
                // Read as ordered writes, the same image is wrong.
                assert!(check_disk(&img, &status(writes, blocks)).is_err());
            }
        }
        assert_eq!(inverse_mod(3, 7), Some(5));
        assert_eq!(inverse_mod(4, 8), None);
    }

    #[test]
    fn disk_oracle_accepts_exact_and_any_in_flight() {
        let img = written(11, 4, 8 * BLOCK);
        assert_eq!(check_disk(&img, &status(11, 4)), Ok(11));
        assert_eq!(check_disk(&img, &GuestStatus { disk_issued: 11, ..status(10, 4) }), Ok(11));
        assert!(matches!(check_disk(&img, &status(10, 4)), Err(OracleError::Disk { .. })), "11 is not in flight");
        assert!(matches!(check_disk(&img, &status(9, 4)), Err(OracleError::Disk { .. })));
        assert!(matches!(check_disk(&img, &status(12, 4)), Err(OracleError::Disk { .. })));
        let mut stray = written(3, 4, 8 * BLOCK);
        stray[3 * BLOCK + 5] = 1;
        assert!(matches!(check_disk(&stray, &status(3, 4)), Err(OracleError::Disk { block: 3, .. })));
        // Past the region, the image is not the guest's.
        let mut other = img.clone();
        other[6 * BLOCK + 5] = 1;
        assert_eq!(check_disk(&other, &status(11, 4)), Ok(11));
        assert!(matches!(check_disk(&img[..BLOCK], &status(11, 4)), Err(OracleError::DiskTooSmall { .. })));
        assert_eq!(check_disk(&img, &status(0, 0)), Ok(0), "no disk writer, nothing to check");

        // Eight in flight over 64 blocks: any of them may have landed, in
        // any order; none past disk_issued.
        let (blocks, e) = (64, 60);
        let s = with_entropy(GuestStatus { disk_issued: 108, ..status(100, blocks) }, e);
        for landed in [vec![], vec![100], vec![103, 107], vec![101, 102, 104, 105, 106], (100..108).collect()] {
            let img = image((0..100).chain(landed.iter().copied()), blocks, 1, e, blocks as usize * BLOCK);
            assert_eq!(check_disk(&img, &s), Ok(100 + landed.len() as u64), "{landed:?}");
        }
        let img = image(0..109, blocks, 1, e, blocks as usize * BLOCK);
        assert!(matches!(check_disk(&img, &s), Err(OracleError::Disk { block: 44, .. })), "108 was never issued");
        let img = image((0..100).chain([105]), blocks, 1, e, blocks as usize * BLOCK);
        let too_many = GuestStatus { disk_issued: 109, ..s };
        assert!(check_disk(&img, &too_many).is_err(), "more in flight than the queue holds");
    }

    #[test]
    fn every_random_disk_byte_counts() {
        let (blocks, e) = (16, 60);
        let s = with_entropy(status(40, blocks), e);
        let img = image(0..40, blocks, 1, e, blocks as usize * BLOCK);
        assert_eq!(check_disk(&img, &s), Ok(40));
        // The random words of 8 blocks differ from the pool's start: windows.
        let pool = Pool::new(POOL);
        assert_ne!(img[24..32], pool.word(0).to_le_bytes());
        for at in [24, 100, 8 * (3 + disk_words(e)) - 1, 8 * (3 + disk_words(e)), BLOCK - 1] {
            let mut bad = img.clone();
            bad[5 * BLOCK + at] ^= 0x40;
            assert!(matches!(check_disk(&bad, &s), Err(OracleError::Disk { block: 5, .. })), "byte {at}");
        }
        // The right header with the wrong write's random words.
        let mut stale = img.clone();
        let other = disk_block(&pool, disk_words(e), 21, blocks, 1);
        stale[5 * BLOCK + 24..6 * BLOCK].copy_from_slice(&other[24..]);
        assert!(check_disk(&stale, &s).is_err());
        // Read without entropy, or with another pool, it is wrong.
        assert!(check_disk(&img, &status(40, blocks)).is_err());
        assert!(check_disk(&img, &GuestStatus { pool_bytes: 2 * POOL, ..s }).is_err());
        assert!(matches!(check_disk(&img, &GuestStatus { pool_bytes: 5, ..s }), Err(OracleError::BadPool { .. })));
    }
}

#[cfg(test)]
mod memory_oracle_tests {
    use super::*;
    use crate::memory::GuestRam;

    const POOL: u64 = 1 << 20;

    /// A fake guest of 16 MiB at `entropy`: a 1 MiB pool (none at 0), every
    /// page stamped, an 8-page working set after 12 steps (pages 0..4 at
    /// generation 2, pages 4..8 at 1).
    fn guest(entropy: u64) -> GuestRam {
        let ram = GuestRam::new(16 << 20).expect("map");
        let mem = ram.mem();
        let pool_bytes = if entropy > 0 { POOL } else { 0 };
        let pool = Pool::new(pool_bytes);
        mem.write_slice(pool.bytes(), GuestAddress(RESERVED_END)).expect("write");
        let ws = RESERVED_END + pool_bytes;
        for gpa in (ws..16 << 20).step_by(PAGE as usize) {
            let i = (gpa - ws) / PAGE;
            let generation = match i {
                0..4 => 2,
                4..8 => 1,
                _ => 0,
            };
            mem.write_slice(&page_head(&pool, gpa, generation, mem_words(entropy)), GuestAddress(gpa)).expect("write");
        }
        let status =
            [STATUS_MAGIC, PHASE_RUNNING, 12, ws, 8, 3584, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, entropy, 0, pool_bytes];
        for (i, w) in status.iter().enumerate() {
            mem.write_obj(*w, GuestAddress(STATUS_GPA + 8 * i as u64)).expect("write");
        }
        ram
    }

    fn check(ram: &GuestRam) -> Result<MemoryReport, OracleError> {
        check_memory(ram.mem(), &ram.regions())
    }

    fn poke(ram: &GuestRam, gpa: u64, v: u64) {
        ram.mem().write_obj(v, GuestAddress(gpa)).expect("write");
    }

    fn peek(ram: &GuestRam, gpa: u64) -> u64 {
        ram.mem().read_obj(GuestAddress(gpa)).expect("read")
    }

    fn ws(entropy: u64) -> u64 {
        RESERVED_END + if entropy > 0 { POOL } else { 0 }
    }

    #[test]
    fn accepts_a_consistent_guest() {
        for e in [0, 1, 35, 100] {
            let g = guest(e);
            let r = check(&g).expect("consistent");
            assert_eq!((r.generation, r.pages_checked), (2, ((16 << 20) - ws(e)) / PAGE), "entropy {e}");
            // One step further (page written, step not yet counted) also passes.
            let page = ws(e) + 4 * PAGE;
            let pool = Pool::new(if e > 0 { POOL } else { 0 });
            g.mem().write_slice(&page_head(&pool, page, 2, mem_words(e)), GuestAddress(page)).expect("write");
            assert!(check(&g).is_ok(), "entropy {e}");
        }
    }

    #[test]
    fn prestamp_writes_what_the_oracle_expects_of_a_fresh_guest() {
        for (me, de) in [(0, 0), (35, 60), (0, 60), (100, 0)] {
            let ram = GuestRam::new(32 << 20).expect("map");
            let cfg = TestGuestConfig {
                ws_mib: 1,
                rate_mib: 0,
                flat_out: false,
                disk_kib: 0,
                disk_mib: 1,
                disk_scatter: false,
                mem_entropy: me,
                disk_entropy: de,
                poweroff_after_s: None,
                reset_after_s: None,
            };
            prestamp(ram.mem(), &cfg, &ram.regions()).expect("prestamp");
            let pool_bytes = default_pool_bytes((32 << 20) - RESERVED_END, me.into(), de.into());
            assert_eq!(pool_bytes, if me + de > 0 { 0x3c_0000 } else { 0 });
            let ws = RESERVED_END + pool_bytes;
            if me == 0 {
                // The host leaves two-word pages to the guest: stamp as it does.
                for gpa in (ws..32 << 20).step_by(PAGE as usize) {
                    assert_eq!(peek(&ram, gpa), 0, "the host stamped {gpa:#x}");
                    poke(&ram, gpa, PAGE_MAGIC ^ gpa);
                }
            }
            let status = [STATUS_MAGIC, PHASE_RUNNING, 0, ws, 256, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            for (i, w) in status.iter().chain(&[me.into(), de.into(), pool_bytes]).enumerate() {
                ram.mem().write_obj(*w, GuestAddress(STATUS_GPA + 8 * i as u64)).expect("write");
            }
            let r = check(&ram).expect("a freshly stamped guest");
            let said = if me > 0 { PRESTAMP_MAGIC ^ u64::from(me) ^ (pool_bytes << 8) } else { 0 };
            assert_eq!(r.status.host_stamped, said);
            assert_eq!((r.generation, r.pages_checked), (0, ((32 << 20) - ws) / PAGE), "{me} {de}");
        }
    }

    #[test]
    fn a_page_paused_mid_copy_passes_only_where_the_guest_was_writing() {
        let e = 100;
        let n = mem_words(e);
        let pool = Pool::new(POOL);
        let page = ws(e) + 4 * PAGE; // page 12 % 8: the next one to write
        let (old, new) = (page_head(&pool, page, 1, n), page_head(&pool, page, 2, n));
        for k in [0, 1, 200, n - 1, n] {
            // Generation 2 in word 1, the first k random words copied.
            let g = guest(e);
            let mut torn = old.clone();
            torn[8..16].copy_from_slice(&2u64.to_le_bytes());
            torn[16..16 + 8 * k].copy_from_slice(&new[16..16 + 8 * k]);
            g.mem().write_slice(&torn, GuestAddress(page)).expect("write");
            assert!(check(&g).is_ok(), "torn after {k} words");
            // The same page with the step counted is not allowed to be torn.
            poke(&g, STATUS_GPA + 16, 13);
            assert_eq!(check(&g).is_ok(), k == n, "counted step, torn after {k} words");
        }
        // Torn anywhere else, or not along one cut, it fails.
        let g = guest(e);
        let other = ws(e) + 2 * PAGE;
        let (o1, o2) = (page_head(&pool, other, 1, n), page_head(&pool, other, 2, n));
        let mut torn = o2.clone();
        torn[16 + 80..].copy_from_slice(&o1[16 + 80..]);
        g.mem().write_slice(&torn, GuestAddress(other)).expect("write");
        assert!(matches!(check(&g), Err(OracleError::Page { word: 12, .. })));
        let g = guest(e);
        let mut two_cuts = old.clone();
        two_cuts[8..16].copy_from_slice(&2u64.to_le_bytes());
        two_cuts[16..96].copy_from_slice(&new[16..96]);
        two_cuts[400..408].copy_from_slice(&new[400..408]);
        g.mem().write_slice(&two_cuts, GuestAddress(page)).expect("write");
        assert!(check(&g).is_err());
    }

    #[test]
    fn every_random_byte_counts() {
        for e in [1, 35, 100] {
            let n = mem_words(e) as u64;
            let (ws_page, outside) = (ws(e) + 5 * PAGE, ws(e) + 100 * PAGE);
            for page in [ws_page, outside] {
                for word in [2, 2 + n / 2, 1 + n] {
                    let g = guest(e);
                    let at = page + 8 * word;
                    poke(&g, at, peek(&g, at) ^ 1 << 37);
                    let err = check(&g).expect_err("a flipped random bit");
                    assert!(
                        matches!(err, OracleError::Page { gpa, word: w, .. } if gpa == page && u64::from(w) == word),
                        "{err}"
                    );
                }
            }
            // The zero tail, and the pool itself.
            if n < 510 {
                let g = guest(e);
                poke(&g, outside + 8 * (2 + n), 1);
                let err = check(&g).expect_err("tail");
                assert!(matches!(err, OracleError::Page { gpa, .. } if gpa == outside), "tail, entropy {e}: {err}");
            }
            let g = guest(e);
            poke(&g, RESERVED_END + 4096 * 7 + 8, 0);
            assert!(matches!(check(&g), Err(OracleError::Pool { gpa: 0x207008, .. })));
            // A page holding another generation's random words.
            let g = guest(e);
            let pool = Pool::new(POOL);
            let mut stale = page_head(&pool, ws_page, 0, n as usize);
            stale[8..16].copy_from_slice(&1u64.to_le_bytes());
            g.mem().write_slice(&stale, GuestAddress(ws_page)).expect("write");
            assert!(matches!(check(&g), Err(OracleError::Page { word: 2, .. })));
        }
        // Without entropy the whole page after word 1 is zero, and checked.
        let g = guest(0);
        poke(&g, 0x80_0ff8, 3);
        assert!(matches!(check(&g), Err(OracleError::Page { gpa: 0x80_0000, word: 511, .. })));
    }

    #[test]
    fn catches_every_kind_of_damage() {
        for e in [0, 35] {
            let w = ws(e);
            let g = guest(e);
            poke(&g, 0x80_0000, 0);
            assert!(matches!(check(&g), Err(OracleError::Page { gpa: 0x80_0000, word: 0, .. })));
            let g = guest(e);
            poke(&g, 0x80_0008, 5);
            assert!(matches!(check(&g), Err(OracleError::Page { word: 1, .. })));
            let pool = Pool::new(if e > 0 { POOL } else { 0 });
            let stale = |gpa: u64, generation: u64| {
                let g = guest(e);
                g.mem()
                    .write_slice(&page_head(&pool, gpa, generation, mem_words(e)), GuestAddress(gpa))
                    .expect("write");
                g
            };
            // A stale page behind the edge (two edges), a page two generations behind.
            assert!(matches!(check(&stale(w + 2 * PAGE, 1)), Err(OracleError::Edge { .. })));
            assert!(matches!(check(&stale(w + 7 * PAGE, 0)), Err(OracleError::Edge { .. })));
            let g = guest(e); // the counters disagree with the guest's step count
            poke(&g, STATUS_GPA + 16, 20);
            assert!(matches!(check(&g), Err(OracleError::Steps { sum: 12, steps: 20 })));
            let g = guest(e);
            poke(&g, STATUS_GPA + 64, 1);
            assert!(matches!(check(&g), Err(OracleError::GuestErrors { errors: 1, .. })));
            let g = guest(e);
            poke(&g, STATUS_GPA, 0);
            assert!(matches!(check(&g), Err(OracleError::NoStatus(0))));
            let g = guest(e);
            poke(&g, STATUS_GPA + 32, 1 << 40);
            assert!(matches!(check(&g), Err(OracleError::BadWorkingSet { .. })));
            let g = guest(e); // the working set does not follow the pool
            poke(&g, STATUS_GPA + 24, w + PAGE);
            assert!(matches!(check(&g), Err(OracleError::BadWorkingSet { .. })));
            let g = guest(e);
            poke(&g, STATUS_GPA + 8 * 17, 101);
            assert!(matches!(check(&g), Err(OracleError::BadPool { .. })));
        }
    }
}
