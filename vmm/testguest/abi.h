/*
 * The contract between the wanmig test guest and the host-side oracle
 * (vmm/src/testguest.rs mirrors every number here; a unit test there checks
 * the guest binary against it).
 *
 * Memory: every 4 KiB page of RAM at or above RESERVED_END holds
 *   word 0 = PAGE_MAGIC ^ guest-physical address of the page
 *   word 1 = generation counter (0 outside the working set)
 * The working set is ws_pages pages from RESERVED_END. Each step increments
 * word 1 of the next working-set page by one, in address order, wrapping
 * around, so at any moment the working set holds N and N-1 with one edge,
 * and the sum of word 1 over it is `steps` or `steps + 1` (the page is
 * written just before the step is counted).
 *
 * Disk: write number `seq` (0, 1, 2, ...) goes to block
 * (seq * disk_stride) % disk_blocks (4 KiB blocks from sector 0; the stride
 * is 1, or with disk_scatter=1 a prime that spreads consecutive writes over
 * the region while still writing every block once per disk_blocks writes);
 * word i of the block is
 *   i == 0: DISK_MAGIC, i == 1: seq, i == 2: block index,
 *   i >= 3: DISK_MAGIC ^ (seq << 16) ^ i
 * Blocks never written stay zero; blocks past the region are not the
 * guest's (the oracle ignores them).
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
#define STATUS_MAGIC 0x574d475354415431ull /* "WMGSTAT1" */

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
};

#endif
