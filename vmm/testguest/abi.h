/*
 * The contract between the wanmig test guest and the host-side oracle
 * (vmm/src/testguest.rs mirrors every number here; a unit test there checks
 * the guest binary against it).
 *
 * Memory: every 4 KiB page of RAM at or above RESERVED_END + pool_bytes holds
 *   word 0 = PAGE_MAGIC ^ guest-physical address of the page
 *   word 1 = generation counter g (0 outside the working set)
 *   words 2 .. 2+n: n = MEM_WORDS(mem_entropy) pseudo-random words, a copy of
 *            the pool's words from POOL_OFF(PAGE_SALT ^ gpa ^ g * POOL_GOLDEN,
 *            n, pool_bytes / 8) on
 *   words 2+n .. 512: zero
 * The working set is ws_pages pages from ws_start = RESERVED_END + pool_bytes.
 * Each step rewrites the next working-set page, in address order, wrapping
 * around: it checks words 0, 1 and the first and last random word against
 * generation g, stores g + 1 in word 1, then copies generation g + 1's window
 * (ascending, `rep movsq`), then counts the step. So at any moment the
 * working set holds N and N-1 with one edge, the sum of word 1 over it is
 * `steps` or `steps + 1`, and when it is `steps + 1` the page being written
 * (page steps % ws_pages) may be torn: its random words are generation
 * g + 1's for some prefix and generation g's after it. Every other page is
 * exactly as above.
 *
 * The pool: pool_bytes at RESERVED_END, never written once running.
 * pool_bytes is 0 when mem_entropy and disk_entropy are both 0; else
 * pool_kib * 1024 if the command line gives pool_kib=, or POOL_MAX_BYTES or
 * 1/POOL_RAM_SHARE of the low RAM above RESERVED_END if that is less; at
 * most half of that RAM; rounded down to POOL_ALIGN (if that leaves 0, the
 * guest runs with both entropies 0). The status page says what it chose.
 * word i is POOL_WORD(i) (splitmix64 of POOL_SEED). The host may write it
 * before the guest starts; the guest checks one word in every 4 KiB of it
 * and computes it itself if any is wrong. The host may also write the
 * generation-0 stamp of every page above the pool, and then says so in the
 * status page: host_stamped = PRESTAMP_MAGIC ^ mem_entropy ^ pool_bytes << 8.
 * If that matches what the guest runs with and the pool was right, the
 * guest checks only the first and last page of each RAM region; otherwise
 * it stamps every page whose words 0, 1 and first and last random word are
 * not already right. Windows are picked by hashing (page,
 * generation), so a page's random words change with each generation and
 * two pages share a byte sequence only where their windows overlap by
 * chance (about n * 8 * pages / pool_bytes of the bytes in a span of
 * `pages` pages).
 *
 * Disk: write number `seq` (0, 1, 2, ...) goes to block
 * (seq * disk_stride) % disk_blocks (4 KiB blocks from sector 0; the stride
 * is 1, or with disk_scatter=1 a prime that spreads consecutive writes over
 * the region while still writing every block once per disk_blocks writes);
 * word i of the block is
 *   i == 0: DISK_MAGIC, i == 1: seq, i == 2: block index,
 *   3 <= i < 3+n, n = DISK_WORDS(disk_entropy): pool word
 *          POOL_OFF(DISK_SALT ^ block ^ seq * POOL_GOLDEN, n, pool_bytes / 8) + (i - 3),
 *   i >= 3+n: DISK_MAGIC ^ i
 * Blocks never written stay zero; blocks past the region are not the
 * guest's (the oracle ignores them).
 * Up to DISK_QUEUE_DEPTH writes are in flight at once (each its own
 * descriptor chain, buffer and status byte; all in the queue with one
 * notification; completions reaped in whatever order the device returns
 * them). disk_issued counts writes handed to the device (it is raised before
 * the chain is made available); disk_done counts the completed prefix:
 * writes 0 .. disk_done have all completed. Writes disk_done .. disk_issued
 * (at most DISK_QUEUE_DEPTH, and at most disk_blocks, so each goes to a
 * different block) may each have reached the disk or not, in any
 * combination; none after disk_issued has. The oracle accepts exactly that.
 *
 * Entropy: MEM_WORDS(e) = 510 * e / 100 and DISK_WORDS(e) = 509 * e / 100
 * (e = 0..100), so e is the pseudo-random share of each written page and
 * block; the rest compresses to almost nothing.
 *
 * Network (with net_ip=A.B.C.D on the command line and a virtio-net device,
 * the first one, or the one whose MAC is net_mac=): the guest answers ARP
 * requests for its address, ICMP echo requests to it, and runs the UDP
 * sequence service on UDP_SEQ_PORT: to each datagram it replies, from that
 * port to the sender's address and port, with
 *   bytes 0..8: the sequence number, big-endian: status.udp_seq after
 *               incrementing it (1 for the first reply, then 2, 3, ...)
 *   bytes 8.. : the request's payload, truncated to UDP_SEQ_MAX_ECHO bytes.
 * The counter lives in the status page, so it survives save/restore and
 * migration: the first reply after a restore carries the last one's + 1.
 * Frames it does not answer (not for it, malformed, fragments, bad
 * checksums) are counted in net_dropped and otherwise ignored.
 */
#ifndef WANMIG_TESTGUEST_ABI_H
#define WANMIG_TESTGUEST_ABI_H

#define RESERVED_END 0x200000ull
#define STATUS_GPA 0x101000ull
#define PAGE_MAGIC 0x574d475041474530ull   /* "WMGPAGE0" */
#define DISK_MAGIC 0x574d474449534b30ull   /* "WMGDISK0" */
#define STATUS_MAGIC 0x574d475354415432ull /* "WMGSTAT2" */

/* The pseudo-random pool and the windows copied from it (see above). */
#define POOL_SEED 0x574d47504f4f4c30ull   /* "WMGPOOL0" */
#define POOL_GOLDEN 0x9e3779b97f4a7c15ull
#define PAGE_SALT 0x574d4750524e4430ull   /* "WMGPRND0" */
#define DISK_SALT 0x574d4744524e4430ull   /* "WMGDRND0" */
#define POOL_ALIGN 0x10000ull
/* Default pool: POOL_MAX_BYTES, at most 1/POOL_RAM_SHARE of the low RAM
 * above RESERVED_END, rounded down to POOL_ALIGN (pool_kib= overrides). */
#define POOL_MAX_BYTES 0x1000000ull
#define POOL_RAM_SHARE 8
/* splitmix64's output function. */
#define MIX64(z0) ({ uint64_t z_ = (z0); z_ = (z_ ^ (z_ >> 30)) * 0xbf58476d1ce4e5b9ull; \
                     z_ = (z_ ^ (z_ >> 27)) * 0x94d049bb133111ebull; z_ ^ (z_ >> 31); })
#define POOL_WORD(i) MIX64(POOL_SEED + ((uint64_t)(i) + 1) * POOL_GOLDEN)
/* First word of an n-word window of a pool of pool_words words. */
#define POOL_OFF(key, n, pool_words) (MIX64(key) % ((pool_words) - (n) + 1))
#define MEM_WORDS(e) (510ull * (e) / 100)
#define DISK_WORDS(e) (509ull * (e) / 100)
/* Defaults (vm.toml and the command line): see vmm/src/config.rs for why. */
#define DEFAULT_MEM_ENTROPY 35
#define DEFAULT_DISK_ENTROPY 60

/* host_stamped's magic (see above). */
#define PRESTAMP_MAGIC 0x574d475052455354ull /* "WMGPREST" */

/* Disk writes in flight at once. */
#define DISK_QUEUE_DEPTH 8

/* The stride of scattered disk writes. */
#define DISK_SCATTER_STRIDE 40503ull

#define PHASE_BOOT 0
#define PHASE_STAMPING 1
#define PHASE_RUNNING 2

/* The UDP sequence service (see above). */
#define UDP_SEQ_PORT 7
#define UDP_SEQ_MAX_ECHO 1024

/* Default virtio-mmio window probed for devices (overridable on the command line). */
#define VIRTIO_MMIO_BASE 0xd0000000ull
#define VIRTIO_MMIO_STRIDE 0x1000ull
#define VIRTIO_MMIO_COUNT 8

/* The status page, at STATUS_GPA: all fields little-endian u64, in this order. */
struct guest_status {
    unsigned long long magic;
    unsigned long long phase;
    unsigned long long steps;
    unsigned long long ws_start;
    unsigned long long ws_pages;
    unsigned long long stamped_pages;
    unsigned long long disk_done;
    unsigned long long disk_blocks;
    unsigned long long errors;
    unsigned long long ticks;
    unsigned long long first_error_gpa;
    unsigned long long disk_stride;
    unsigned long long net_base;    /* virtio-mmio base of the NIC in use; 0: none */
    unsigned long long net_rx;      /* frames received */
    unsigned long long net_tx;      /* frames sent */
    unsigned long long net_dropped; /* frames received and not answered */
    unsigned long long udp_seq;     /* UDP sequence replies sent (the last one carried this) */
    unsigned long long mem_entropy; /* 0..100, as run */
    unsigned long long disk_entropy;
    unsigned long long pool_bytes;  /* the pool at RESERVED_END; ws_start = RESERVED_END + pool_bytes */
    unsigned long long disk_issued; /* writes handed to the device (>= disk_done) */
    unsigned long long host_stamped; /* written by the host before boot, see above */
};

#endif
