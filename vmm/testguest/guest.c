/*
 * wanmig built-in test guest: the deterministic oracle of every save/restore
 * and migration test.
 *
 * It stamps every page of RAM above RESERVED_END with a known pattern (part
 * of it pseudo-random, copied from a pool), then rewrites the pages of a
 * working set with the next generation at a configurable rate, writes
 * generation-stamped blocks to its virtio-blk disk at a configurable rate
 * with several writes in flight, and reports progress on the 8250 serial
 * port. abi.h describes exactly what the host can check afterwards.
 *
 * Command line (multiboot cmdline, "key=value" separated by spaces):
 *   ws_mib=N       working set in MiB (default 16; clamped to low RAM)
 *   rate_mib=N|max working-set dirtying rate in MiB/s (default 0 = idle)
 *   disk_kib=N     disk write rate in KiB/s (default 0 = no disk writes)
 *   disk_mib=N     size of the disk region written, MiB (default 1)
 *   disk_scatter=1 scatter the writes over the region (see abi.h)
 *   mem_entropy=N  pseudo-random share of each written page, 0..100
 *                  (default DEFAULT_MEM_ENTROPY)
 *   disk_entropy=N the same for disk blocks (default DEFAULT_DISK_ENTROPY)
 *   pool_kib=N     size of the pseudo-random pool (default: abi.h's rule)
 *   net_ip=A.B.C.D the guest's IPv4 address: drive the NIC (see abi.h)
 *   net_mac=MAC    use the virtio-net device with this MAC (default: the first)
 *   mmio=ADDR mmio_stride=N mmio_count=N   virtio-mmio window to probe
 *   poweroff_after_s=N  after N s of running, power off the ACPI way: find
 *                  the RSDP in the BIOS area, follow it to the FADT and the
 *                  DSDT, write \_S5_'s SLP_TYP | SLP_EN to the sleep control
 *                  register
 *   reset_after_s=N     after N s, write RESET_VALUE to the FADT's reset
 *                  register (then, if still alive, pulse the i8042 reset)
 *
 * Built freestanding, 64-bit, general registers only: the software KVM
 * backend this project is tested on emulates every guest instruction and
 * may lack SSE/AVX. It emulates a `rep movsq` iteration about as fast as a
 * whole instruction, so pseudo-random bytes are copied 8 at a time from a
 * pool the host writes at boot rather than computed per word (which costs
 * ten times as much).
 */
#include <stdint.h>
#include "abi.h"

#define PAGE_SIZE 4096ull
#define TICK_HZ 100
#define PIT_HZ 1193182

__attribute__((section(".status"), aligned(4096))) volatile struct guest_status status;

/* ---------------------------------------------------------------- low level */

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint32_t mmio_read(uint64_t a) { return *(volatile uint32_t *)a; }
static inline void mmio_write(uint64_t a, uint32_t v) { *(volatile uint32_t *)a = v; }
static inline void barrier(void) { __asm__ volatile("mfence" ::: "memory"); }
static inline void copy_words(volatile uint64_t *d, const uint64_t *s, uint64_t n) {
    __asm__ volatile("cld; rep movsq" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
}

void *memset(void *d, int c, unsigned long n) { unsigned char *p = d; while (n--) *p++ = (unsigned char)c; return d; }
void *memcpy(void *d, const void *s, unsigned long n) { unsigned char *p = d; const unsigned char *q = s; while (n--) *p++ = *q++; return d; }

static void putc(char c) {
    while (!(inb(0x3f8 + 5) & 0x20)) {}
    outb(0x3f8, (uint8_t)c);
}
static void puts(const char *s) { while (*s) putc(*s++); }
static void putu(uint64_t v) {
    char b[21]; int i = 20; b[i] = 0;
    do { b[--i] = (char)('0' + v % 10); v /= 10; } while (v);
    puts(&b[i]);
}
static void putx(uint64_t v) {
    puts("0x");
    for (int s = 60; s >= 0; s -= 4) putc("0123456789abcdef"[(v >> s) & 0xf]);
}

/* ---------------------------------------------------------------- interrupts */

struct idt_entry { uint16_t off0, sel; uint8_t ist, attr; uint16_t off1; uint32_t off2, zero; };
static struct idt_entry idt[256] __attribute__((aligned(16)));
static volatile uint64_t ticks;
struct interrupt_frame;

__attribute__((interrupt)) static void timer_isr(struct interrupt_frame *f) {
    (void)f;
    ticks++;
    status.ticks = ticks;
    outb(0x20, 0x20);
}
__attribute__((interrupt)) static void spurious_isr(struct interrupt_frame *f) { (void)f; }
__attribute__((interrupt)) static void fault_isr(struct interrupt_frame *f) {
    (void)f;
    puts("wanmig-testguest: unexpected exception or interrupt, halting\n");
    for (;;) __asm__ volatile("cli; hlt");
}

static void set_gate(int v, void (*h)(struct interrupt_frame *)) {
    uint64_t a = (uint64_t)h;
    idt[v] = (struct idt_entry){ (uint16_t)a, 0x08, 0, 0x8e, (uint16_t)(a >> 16), (uint32_t)(a >> 32), 0 };
}

static void interrupts_init(void) {
    for (int v = 0; v < 256; v++) set_gate(v, fault_isr);
    set_gate(0x20, timer_isr);
    set_gate(0x27, spurious_isr);
    set_gate(0x2f, spurious_isr);
    set_gate(0xff, spurious_isr);
    struct __attribute__((packed)) { uint16_t limit; uint64_t base; } idtr = { sizeof(idt) - 1, (uint64_t)idt };
    __asm__ volatile("lidt %0" ::"m"(idtr));

    /* 8259 PICs: vectors 0x20/0x28, only IRQ0 (PIT) unmasked. */
    outb(0x20, 0x11); outb(0xa0, 0x11);
    outb(0x21, 0x20); outb(0xa1, 0x28);
    outb(0x21, 0x04); outb(0xa1, 0x02);
    outb(0x21, 0x01); outb(0xa1, 0x01);
    outb(0x21, 0xfe); outb(0xa1, 0xff);

    /*
     * Local APIC in virtual-wire mode (LINT0 = ExtINT, LINT1 = NMI), so the
     * 8259 reaches the CPU whatever the firmware left: SeaBIOS does this,
     * QEMU microvm's qboot does not.
     */
    mmio_write(0xfee000f0, 0x1ff); /* spurious vector 0xff, APIC enabled */
    mmio_write(0xfee00350, 0x700);
    mmio_write(0xfee00360, 0x400);

    /* PIT channel 0, mode 2, TICK_HZ. */
    uint16_t div = PIT_HZ / TICK_HZ;
    outb(0x43, 0x34);
    outb(0x40, (uint8_t)div);
    outb(0x40, (uint8_t)(div >> 8));
}

/* ---------------------------------------------------------------- command line */

struct params {
    uint64_t ws_mib, rate_mib, disk_kib, disk_mib, mmio, mmio_stride, mmio_count;
    uint64_t mem_entropy, disk_entropy, pool_kib;
    int have_pool_kib;
    int flat_out, disk_scatter;
    int have_ip, have_mac;
    uint8_t ip[4], mac[6];
    uint64_t poweroff_after_s, reset_after_s;
};

static int streq_prefix(const char *s, const char *key, const char **val) {
    while (*key) if (*s++ != *key++) return 0;
    if (*s != '=') return 0;
    *val = s + 1;
    return 1;
}

static uint64_t parse_num(const char *s) {
    uint64_t v = 0;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        for (s += 2;; s++) {
            char c = *s;
            if (c >= '0' && c <= '9') v = v * 16 + (uint64_t)(c - '0');
            else if (c >= 'a' && c <= 'f') v = v * 16 + (uint64_t)(c - 'a' + 10);
            else if (c >= 'A' && c <= 'F') v = v * 16 + (uint64_t)(c - 'A' + 10);
            else return v;
        }
    }
    while (*s >= '0' && *s <= '9') v = v * 10 + (uint64_t)(*s++ - '0');
    return v;
}

static int hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* "A.B.C.D" (each 0..255) followed by a space or the end; 1 if valid. */
static int parse_ip(const char *s, uint8_t ip[4]) {
    for (int i = 0; i < 4; i++) {
        uint32_t v = 0; int digits = 0;
        while (*s >= '0' && *s <= '9' && digits < 3) { v = v * 10 + (uint32_t)(*s++ - '0'); digits++; }
        if (!digits || v > 255) return 0;
        ip[i] = (uint8_t)v;
        if (i < 3 && *s++ != '.') return 0;
    }
    return *s == 0 || *s == ' ';
}

/* "xx:xx:xx:xx:xx:xx" followed by a space or the end; 1 if valid. */
static int parse_mac(const char *s, uint8_t mac[6]) {
    for (int i = 0; i < 6; i++) {
        int hi = hex_digit(s[0]), lo = hi < 0 ? -1 : hex_digit(s[1]);
        if (lo < 0) return 0;
        mac[i] = (uint8_t)(hi << 4 | lo);
        s += 2;
        if (i < 5 && *s++ != ':') return 0;
    }
    return *s == 0 || *s == ' ';
}

static void parse_cmdline(const char *s, struct params *p) {
    while (s && *s) {
        while (*s == ' ') s++;
        const char *v;
        if (streq_prefix(s, "ws_mib", &v)) p->ws_mib = parse_num(v);
        else if (streq_prefix(s, "rate_mib", &v)) {
            if (v[0] == 'm' && v[1] == 'a' && v[2] == 'x') p->flat_out = 1;
            else p->rate_mib = parse_num(v);
        }
        else if (streq_prefix(s, "disk_kib", &v)) p->disk_kib = parse_num(v);
        else if (streq_prefix(s, "disk_mib", &v)) p->disk_mib = parse_num(v);
        else if (streq_prefix(s, "disk_scatter", &v)) p->disk_scatter = parse_num(v) != 0;
        else if (streq_prefix(s, "mem_entropy", &v)) p->mem_entropy = parse_num(v);
        else if (streq_prefix(s, "disk_entropy", &v)) p->disk_entropy = parse_num(v);
        else if (streq_prefix(s, "pool_kib", &v)) { p->pool_kib = parse_num(v); p->have_pool_kib = 1; }
        else if (streq_prefix(s, "net_ip", &v)) p->have_ip = parse_ip(v, p->ip);
        else if (streq_prefix(s, "net_mac", &v)) p->have_mac = parse_mac(v, p->mac);
        else if (streq_prefix(s, "mmio", &v)) p->mmio = parse_num(v);
        else if (streq_prefix(s, "mmio_stride", &v)) p->mmio_stride = parse_num(v);
        else if (streq_prefix(s, "mmio_count", &v)) p->mmio_count = parse_num(v);
        else if (streq_prefix(s, "poweroff_after_s", &v)) p->poweroff_after_s = parse_num(v);
        else if (streq_prefix(s, "reset_after_s", &v)) p->reset_after_s = parse_num(v);
        while (*s && *s != ' ') s++;
    }
}

/* ---------------------------------------------------------------- virtio-blk */

#define VIRTIO_MAGIC 0x74726976
#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_DEVICE_FEATURES 0x010
#define R_DEVICE_FEATURES_SEL 0x014
#define R_DRIVER_FEATURES 0x020
#define R_DRIVER_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_INTERRUPT_STATUS 0x060
#define R_INTERRUPT_ACK 0x064
#define R_STATUS 0x070
#define R_QUEUE_DESC 0x080
#define R_QUEUE_DRIVER 0x090
#define R_QUEUE_DEVICE 0x0a0
#define R_CONFIG 0x100
/* Three descriptors per write (header, data, status): DISK_QUEUE_DEPTH
 * writes fit, write k always in slot k % DISK_QUEUE_DEPTH. */
#define QSZ 32
#define QD DISK_QUEUE_DEPTH

struct vq_desc { uint64_t addr; uint32_t len; uint16_t flags, next; };
struct vq_avail { uint16_t flags, idx, ring[QSZ], used_event; };
struct vq_used { uint16_t flags, idx; struct { uint32_t id, len; } ring[QSZ]; uint16_t avail_event; };
struct blk_req { uint32_t type, reserved; uint64_t sector; };

static struct vq_desc vq_desc[QSZ] __attribute__((aligned(4096)));
static struct vq_avail vq_avail __attribute__((aligned(4096)));
static volatile struct vq_used vq_used __attribute__((aligned(4096)));
static struct blk_req blk_req[QD];
static volatile uint8_t blk_status[QD];
static uint8_t blk_complete[QD];
static uint64_t blk_buf[QD][512] __attribute__((aligned(4096)));
static uint64_t blk_base, blk_qd, disk_words;
static uint16_t used_seen;

static int blk_probe(const struct params *p) {
    for (uint64_t i = 0; i < p->mmio_count; i++) {
        uint64_t b = p->mmio + i * p->mmio_stride;
        if (mmio_read(b + R_MAGIC) != VIRTIO_MAGIC || mmio_read(b + R_DEVICE_ID) != 2) continue;
        if (mmio_read(b + R_VERSION) != 2) {
            puts("wanmig-testguest: legacy virtio-mmio (version 1) block device skipped\n");
            continue;
        }
        mmio_write(b + R_STATUS, 0);
        mmio_write(b + R_STATUS, 1 | 2); /* ACKNOWLEDGE | DRIVER */
        mmio_write(b + R_DEVICE_FEATURES_SEL, 1);
        if (!(mmio_read(b + R_DEVICE_FEATURES) & 1)) continue; /* needs VIRTIO_F_VERSION_1 */
        mmio_write(b + R_DRIVER_FEATURES_SEL, 0);
        mmio_write(b + R_DRIVER_FEATURES, 0);
        mmio_write(b + R_DRIVER_FEATURES_SEL, 1);
        mmio_write(b + R_DRIVER_FEATURES, 1);
        mmio_write(b + R_STATUS, 1 | 2 | 8); /* FEATURES_OK */
        if (!(mmio_read(b + R_STATUS) & 8)) continue;
        mmio_write(b + R_QUEUE_SEL, 0);
        if (mmio_read(b + R_QUEUE_NUM_MAX) < QSZ) continue;
        vq_avail.flags = 1; /* VRING_AVAIL_F_NO_INTERRUPT: completions are polled */
        mmio_write(b + R_QUEUE_NUM, QSZ);
        mmio_write(b + R_QUEUE_DESC, (uint32_t)(uint64_t)vq_desc);
        mmio_write(b + R_QUEUE_DESC + 4, (uint32_t)((uint64_t)vq_desc >> 32));
        mmio_write(b + R_QUEUE_DRIVER, (uint32_t)(uint64_t)&vq_avail);
        mmio_write(b + R_QUEUE_DRIVER + 4, (uint32_t)((uint64_t)&vq_avail >> 32));
        mmio_write(b + R_QUEUE_DEVICE, (uint32_t)(uint64_t)&vq_used);
        mmio_write(b + R_QUEUE_DEVICE + 4, (uint32_t)((uint64_t)&vq_used >> 32));
        mmio_write(b + R_QUEUE_READY, 1);
        mmio_write(b + R_STATUS, 1 | 2 | 8 | 4); /* DRIVER_OK */
        blk_base = b;
        uint64_t sectors = mmio_read(b + R_CONFIG) | ((uint64_t)mmio_read(b + R_CONFIG + 4) << 32);
        uint64_t blocks = sectors / 8;
        uint64_t want = p->disk_mib * 256;
        status.disk_blocks = want < blocks ? want : blocks;
        status.disk_stride = p->disk_scatter && status.disk_blocks % DISK_SCATTER_STRIDE ? DISK_SCATTER_STRIDE : 1;
        /* In-flight writes must go to different blocks. */
        blk_qd = status.disk_blocks < QD ? status.disk_blocks : QD;
        /* The compressible tail of every block never changes: written once. */
        for (uint64_t k = 0; k < QD; k++)
            for (uint64_t i = 3 + disk_words; i < 512; i++) blk_buf[k][i] = DISK_MAGIC ^ i;
        puts("wanmig-testguest: virtio-blk at "); putx(b);
        puts(" sectors="); putu(sectors); puts("\n");
        return 1;
    }
    return 0;
}

/* The pseudo-random pool at RESERVED_END (abi.h). */
static const uint64_t *pool = (const uint64_t *)RESERVED_END;
static uint64_t pool_words;

/* Makes the request of write number seq (see abi.h) in its slot, counts it
 * as issued and makes it available; the caller notifies. */
static void blk_issue(uint64_t seq) {
    uint64_t k = seq % QD, block = seq * status.disk_stride % status.disk_blocks;
    uint64_t *buf = blk_buf[k];
    buf[0] = DISK_MAGIC;
    buf[1] = seq;
    buf[2] = block;
    if (disk_words)
        copy_words(buf + 3, pool + POOL_OFF(DISK_SALT ^ block ^ seq * POOL_GOLDEN, disk_words, pool_words), disk_words);
    blk_req[k] = (struct blk_req){ 1 /* VIRTIO_BLK_T_OUT */, 0, block * 8 };
    blk_status[k] = 0xff;
    blk_complete[k] = 0;
    uint16_t d = (uint16_t)(3 * k);
    vq_desc[d] = (struct vq_desc){ (uint64_t)&blk_req[k], sizeof(blk_req[k]), 1 /* NEXT */, (uint16_t)(d + 1) };
    vq_desc[d + 1] = (struct vq_desc){ (uint64_t)buf, 4096, 1, (uint16_t)(d + 2) };
    vq_desc[d + 2] = (struct vq_desc){ (uint64_t)&blk_status[k], 1, 2 /* WRITE */, 0 };
    status.disk_issued = seq + 1; /* before the device can see it */
    vq_avail.ring[vq_avail.idx % QSZ] = d;
    barrier();
    vq_avail.idx++;
}

/* Takes what the device completed and moves disk_done over the completed
 * prefix; returns 1 if a write failed. */
static int blk_reap(void) {
    while (used_seen != vq_used.idx) {
        barrier();
        uint32_t id = vq_used.ring[used_seen % QSZ].id;
        used_seen++;
        if (id % 3 || id / 3 >= blk_qd) return 1;
        if (blk_status[id / 3] != 0) return 1;
        blk_complete[id / 3] = 1;
    }
    while (status.disk_done < status.disk_issued && blk_complete[status.disk_done % QD]) {
        blk_complete[status.disk_done % QD] = 0;
        status.disk_done++;
    }
    return 0;
}

/* Issues writes up to `target` (never more than blk_qd in flight), one
 * notification per batch, reaping as completions arrive; returns 1 if a
 * write failed. A device that completes during the notification (wanmig)
 * is kept busy to the target; one that completes later (QEMU) is reaped on
 * the next call. */
static int blk_pump(uint64_t target) {
    for (;;) {
        if (blk_reap()) return 1;
        int issued = 0;
        while (status.disk_issued < target && status.disk_issued < status.disk_done + blk_qd) {
            blk_issue(status.disk_issued);
            issued = 1;
        }
        if (!issued) return 0;
        barrier();
        mmio_write(blk_base + R_QUEUE_NOTIFY, 0);
    }
}

/* ---------------------------------------------------------------- virtio-net */

/*
 * A polled virtio-net driver: NET_QSZ receive buffers of NET_BUF bytes
 * (12-byte virtio header included) always posted, one transmit buffer. The
 * device is asked not to interrupt (VRING_AVAIL_F_NO_INTERRUPT); the main
 * loop polls the used ring at least every timer tick. Transmit completes
 * within the QueueNotify write (wanmig processes it synchronously).
 */
#define NET_QSZ 16
#define NET_BUF 2048
#define VNET_HDR 12
#define ETH_HDR 14
#define IP_HDR 20
#define UDP_HDR 8
#define AVAIL_F_NO_INTERRUPT 1

struct vq16_avail { uint16_t flags, idx, ring[NET_QSZ], used_event; };
struct vq16_used { uint16_t flags, idx; struct { uint32_t id, len; } ring[NET_QSZ]; uint16_t avail_event; };

static struct vq_desc rxq_desc[NET_QSZ] __attribute__((aligned(16)));
static struct vq16_avail rxq_avail __attribute__((aligned(16)));
static volatile struct vq16_used rxq_used __attribute__((aligned(16)));
static struct vq_desc txq_desc[NET_QSZ] __attribute__((aligned(16)));
static struct vq16_avail txq_avail __attribute__((aligned(16)));
static volatile struct vq16_used txq_used __attribute__((aligned(16)));
static uint8_t rx_bufs[NET_QSZ][NET_BUF] __attribute__((aligned(16)));
static uint8_t tx_buf[NET_BUF] __attribute__((aligned(16)));
static uint16_t rx_used_seen, tx_used_seen, ip_id;
static uint8_t my_mac[6], my_ip[4];

static int mem_eq(const uint8_t *a, const uint8_t *b, unsigned n) { while (n--) if (*a++ != *b++) return 0; return 1; }
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }

/* Internet checksum: add n bytes (only the last piece of a sum may be odd). */
static uint32_t csum_add(uint32_t sum, const uint8_t *p, uint32_t n) {
    for (; n > 1; p += 2, n -= 2) sum += (uint32_t)(p[0] << 8 | p[1]);
    if (n) sum += (uint32_t)p[0] << 8;
    return sum;
}
static uint16_t csum_fold(uint32_t sum) {
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}
/* The UDP pseudo-header's contribution: addresses, protocol, length. */
static uint32_t pseudo_sum(const uint8_t *src, const uint8_t *dst, uint32_t len) {
    uint32_t sum = csum_add(csum_add(0, src, 4), dst, 4);
    return sum + 17 + len;
}

static int vq_setup(uint64_t b, uint32_t q, void *desc, void *avail, volatile void *used) {
    mmio_write(b + R_QUEUE_SEL, q);
    if (mmio_read(b + R_QUEUE_NUM_MAX) < NET_QSZ) return 0;
    mmio_write(b + R_QUEUE_NUM, NET_QSZ);
    mmio_write(b + R_QUEUE_DESC, (uint32_t)(uint64_t)desc);
    mmio_write(b + R_QUEUE_DESC + 4, (uint32_t)((uint64_t)desc >> 32));
    mmio_write(b + R_QUEUE_DRIVER, (uint32_t)(uint64_t)avail);
    mmio_write(b + R_QUEUE_DRIVER + 4, (uint32_t)((uint64_t)avail >> 32));
    mmio_write(b + R_QUEUE_DEVICE, (uint32_t)(uint64_t)used);
    mmio_write(b + R_QUEUE_DEVICE + 4, (uint32_t)((uint64_t)used >> 32));
    mmio_write(b + R_QUEUE_READY, 1);
    return mmio_read(b + R_QUEUE_READY) == 1;
}

static int net_probe(const struct params *p) {
    for (uint64_t i = 0; i < p->mmio_count; i++) {
        uint64_t b = p->mmio + i * p->mmio_stride;
        if (mmio_read(b + R_MAGIC) != VIRTIO_MAGIC || mmio_read(b + R_DEVICE_ID) != 1 || mmio_read(b + R_VERSION) != 2)
            continue;
        mmio_write(b + R_STATUS, 0);
        mmio_write(b + R_STATUS, 1 | 2); /* ACKNOWLEDGE | DRIVER */
        mmio_write(b + R_DEVICE_FEATURES_SEL, 0);
        uint32_t lo = mmio_read(b + R_DEVICE_FEATURES);
        mmio_write(b + R_DEVICE_FEATURES_SEL, 1);
        if (!(mmio_read(b + R_DEVICE_FEATURES) & 1) || !(lo & (1u << 5))) { /* VERSION_1, MAC */
            mmio_write(b + R_STATUS, 0x80); /* FAILED */
            continue;
        }
        uint8_t mac[6];
        for (int k = 0; k < 6; k++) mac[k] = *(volatile uint8_t *)(b + R_CONFIG + (uint64_t)k);
        if (p->have_mac && !mem_eq(mac, p->mac, 6)) { mmio_write(b + R_STATUS, 0); continue; }
        mmio_write(b + R_DRIVER_FEATURES_SEL, 0);
        mmio_write(b + R_DRIVER_FEATURES, 1u << 5);
        mmio_write(b + R_DRIVER_FEATURES_SEL, 1);
        mmio_write(b + R_DRIVER_FEATURES, 1);
        mmio_write(b + R_STATUS, 1 | 2 | 8); /* FEATURES_OK */
        if (!(mmio_read(b + R_STATUS) & 8)) continue;
        rxq_avail.flags = AVAIL_F_NO_INTERRUPT;
        txq_avail.flags = AVAIL_F_NO_INTERRUPT;
        for (uint16_t k = 0; k < NET_QSZ; k++) {
            rxq_desc[k] = (struct vq_desc){ (uint64_t)rx_bufs[k], NET_BUF, 2 /* WRITE */, 0 };
            rxq_avail.ring[k] = k;
        }
        rxq_avail.idx = NET_QSZ;
        if (!vq_setup(b, 0, rxq_desc, &rxq_avail, &rxq_used) || !vq_setup(b, 1, txq_desc, &txq_avail, &txq_used)) {
            mmio_write(b + R_STATUS, 0x80);
            continue;
        }
        barrier();
        mmio_write(b + R_STATUS, 1 | 2 | 8 | 4); /* DRIVER_OK */
        mmio_write(b + R_QUEUE_NOTIFY, 0);
        memcpy(my_mac, mac, 6);
        memcpy(my_ip, p->ip, 4);
        status.net_base = b;
        puts("wanmig-testguest: virtio-net at "); putx(b);
        puts(" ip="); for (int k = 0; k < 4; k++) { putu(my_ip[k]); if (k < 3) putc('.'); }
        puts("\n");
        return 1;
    }
    return 0;
}

/* Sends the frame of len bytes at tx_buf + VNET_HDR. */
static void net_send(uint32_t len) {
    if (len < 60) { memset(tx_buf + VNET_HDR + len, 0, 60 - len); len = 60; } /* Ethernet minimum */
    memset(tx_buf, 0, VNET_HDR);
    txq_desc[0] = (struct vq_desc){ (uint64_t)tx_buf, VNET_HDR + len, 0, 0 };
    txq_avail.ring[txq_avail.idx % NET_QSZ] = 0;
    barrier();
    txq_avail.idx++;
    barrier();
    mmio_write(status.net_base + R_QUEUE_NOTIFY, 1);
    /* Completed during the write; a device that does not complete it loses the NIC. */
    for (int i = 0; i < 1000 && txq_used.idx == tx_used_seen; i++) __asm__ volatile("pause");
    if (txq_used.idx == tx_used_seen) {
        puts("wanmig-testguest: virtio-net transmit did not complete, NIC disabled\n");
        status.net_base = 0;
        return;
    }
    tx_used_seen++;
    status.net_tx++;
}

/* Starts a reply to frame f: Ethernet header back to its sender; returns the payload. */
static uint8_t *eth_reply(const uint8_t *f, uint16_t type) {
    uint8_t *o = tx_buf + VNET_HDR;
    memcpy(o, f + 6, 6);
    memcpy(o + 6, my_mac, 6);
    put16(o + 12, type);
    return o + ETH_HDR;
}

static int arp_in(const uint8_t *f, uint32_t len) {
    const uint8_t *a = f + ETH_HDR;
    if (len < ETH_HDR + 28 || get16(a) != 1 || get16(a + 2) != 0x0800 || a[4] != 6 || a[5] != 4 || get16(a + 6) != 1)
        return 0;
    if (!mem_eq(a + 24, my_ip, 4)) return 0;
    uint8_t *r = eth_reply(f, 0x0806);
    put16(r, 1); put16(r + 2, 0x0800); r[4] = 6; r[5] = 4; put16(r + 6, 2);
    memcpy(r + 8, my_mac, 6);
    memcpy(r + 14, my_ip, 4);
    memcpy(r + 18, a + 8, 10); /* target = the asker's MAC and IP */
    net_send(ETH_HDR + 28);
    return 1;
}

/* Writes an IPv4 header for a reply of payload_len bytes to dst; returns the payload. */
static uint8_t *ip_reply(uint8_t *ip, const uint8_t *dst, uint8_t proto, uint32_t payload_len) {
    ip[0] = 0x45; ip[1] = 0;
    put16(ip + 2, (uint16_t)(IP_HDR + payload_len));
    put16(ip + 4, ip_id++);
    put16(ip + 6, 0x4000); /* DF */
    ip[8] = 64; ip[9] = proto;
    put16(ip + 10, 0);
    memcpy(ip + 12, my_ip, 4);
    memcpy(ip + 16, dst, 4);
    put16(ip + 10, csum_fold(csum_add(0, ip, IP_HDR)));
    return ip + IP_HDR;
}

static int icmp_in(const uint8_t *f, const uint8_t *ip, const uint8_t *m, uint32_t mlen) {
    if (mlen < 8 || m[0] != 8 || m[1] != 0 || csum_fold(csum_add(0, m, mlen)) != 0) return 0;
    if (ETH_HDR + IP_HDR + mlen > NET_BUF - VNET_HDR) return 0;
    uint8_t *r = ip_reply(eth_reply(f, 0x0800), ip + 12, 1, mlen);
    memcpy(r, m, mlen);
    r[0] = 0; /* echo reply */
    put16(r + 2, 0);
    put16(r + 2, csum_fold(csum_add(0, r, mlen)));
    net_send(ETH_HDR + IP_HDR + mlen);
    return 1;
}

static int udp_in(const uint8_t *f, const uint8_t *ip, const uint8_t *u, uint32_t avail) {
    if (avail < UDP_HDR) return 0;
    uint32_t ulen = get16(u + 4);
    if (ulen < UDP_HDR || ulen > avail || get16(u + 2) != UDP_SEQ_PORT) return 0;
    if (get16(u + 6) && csum_fold(csum_add(pseudo_sum(ip + 12, ip + 16, ulen), u, ulen)) != 0) return 0;
    uint32_t echo = ulen - UDP_HDR;
    if (echo > UDP_SEQ_MAX_ECHO) echo = UDP_SEQ_MAX_ECHO;
    uint32_t rlen = UDP_HDR + 8 + echo;
    /* The counter is incremented before the reply exists: paused in between,
     * the saved guest still sends this reply once it runs again. */
    uint64_t seq = ++status.udp_seq;
    uint8_t *r = ip_reply(eth_reply(f, 0x0800), ip + 12, 17, rlen);
    put16(r, UDP_SEQ_PORT);
    memcpy(r + 2, u, 2); /* to the sender's port */
    put16(r + 4, (uint16_t)rlen);
    put16(r + 6, 0);
    for (int i = 0; i < 8; i++) r[UDP_HDR + i] = (uint8_t)(seq >> (56 - 8 * i));
    memcpy(r + UDP_HDR + 8, u + UDP_HDR, echo);
    uint16_t sum = csum_fold(csum_add(pseudo_sum(my_ip, ip + 12, rlen), r, rlen));
    put16(r + 6, sum ? sum : 0xffff);
    net_send(ETH_HDR + IP_HDR + rlen);
    return 1;
}

static int ipv4_in(const uint8_t *f, uint32_t len) {
    if (len < ETH_HDR + IP_HDR) return 0;
    const uint8_t *ip = f + ETH_HDR;
    uint32_t ihl = (uint32_t)(ip[0] & 15) * 4, total = get16(ip + 2);
    if (ip[0] >> 4 != 4 || ihl < IP_HDR || total < ihl || total > len - ETH_HDR) return 0;
    if ((get16(ip + 6) & 0x3fff) != 0) return 0; /* a fragment */
    if (!mem_eq(ip + 16, my_ip, 4) || csum_fold(csum_add(0, ip, ihl)) != 0) return 0;
    if (ip[9] == 1) return icmp_in(f, ip, ip + ihl, total - ihl);
    if (ip[9] == 17) return udp_in(f, ip, ip + ihl, total - ihl);
    return 0;
}

static int frame_in(const uint8_t *f, uint32_t len) {
    static const uint8_t broadcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
    if (len < ETH_HDR || (!mem_eq(f, my_mac, 6) && !mem_eq(f, broadcast, 6))) return 0;
    switch (get16(f + 12)) {
    case 0x0806: return arp_in(f, len);
    case 0x0800: return ipv4_in(f, len);
    default: return 0;
    }
}

/* Answers what arrived and gives the buffers back (one notification). */
static void net_poll(void) {
    int reposted = 0;
    for (int n = 0; n < NET_QSZ && status.net_base && rx_used_seen != rxq_used.idx; n++) {
        barrier();
        uint16_t at = rx_used_seen % NET_QSZ;
        uint32_t id = rxq_used.ring[at].id, len = rxq_used.ring[at].len;
        rx_used_seen++;
        if (id >= NET_QSZ) { status.net_dropped++; continue; }
        status.net_rx++;
        if (len < VNET_HDR || len > NET_BUF || !frame_in(rx_bufs[id] + VNET_HDR, len - VNET_HDR)) status.net_dropped++;
        rxq_desc[id] = (struct vq_desc){ (uint64_t)rx_bufs[id], NET_BUF, 2 /* WRITE */, 0 };
        rxq_avail.ring[rxq_avail.idx % NET_QSZ] = (uint16_t)id;
        barrier();
        rxq_avail.idx++;
        reposted = 1;
    }
    if (reposted && status.net_base) {
        barrier();
        mmio_write(status.net_base + R_QUEUE_NOTIFY, 0);
    }
}

/* ---------------------------------------------------------------- ACPI power */

/* Where an OS without a boot loader's hint scans for the RSDP (16-byte steps). */
#define ACPI_SCAN_START 0xe0000ull
#define ACPI_SCAN_END 0x100000ull

/* The power registers, as the FADT and the DSDT declare them. */
struct acpi_power {
    uint16_t sleep_control, reset;
    uint8_t slp_typ_s5, reset_value;
};

static inline uint8_t rd8(uint64_t a) { return *(volatile uint8_t *)a; }
static inline uint32_t rd32(uint64_t a) { return *(volatile uint32_t *)a; }
static inline uint64_t rd64(uint64_t a) { return *(volatile uint64_t *)a; }

static int bytes_eq(uint64_t a, const char *s, int n) {
    for (int i = 0; i < n; i++) if (rd8(a + (uint64_t)i) != (uint8_t)s[i]) return 0;
    return 1;
}

static uint8_t sum8(uint64_t a, uint64_t n) {
    uint8_t s = 0;
    while (n--) s = (uint8_t)(s + rd8(a++));
    return s;
}

/* A table at `a` with signature `sig` and a valid checksum (below 4 GiB, as
 * the identity map covers it, and of a sane length). */
static int is_table(uint64_t a, const char *sig) {
    if (a == 0 || a >= (1ull << 32) || !bytes_eq(a, sig, 4)) return 0;
    uint32_t len = rd32(a + 4);
    return len >= 36 && len <= 0x10000 && sum8(a, len) == 0;
}

/*
 * SLP_TYPa of S5: the first element of the \_S5_ package. Found the way small
 * kernels do without an AML interpreter: Name(_S5_, Package(){a, b}) encodes
 * as "_S5_" 0x12 PkgLength count element..., and the element is ZeroOp,
 * OneOp or BytePrefix n. Returns -1 when there is none.
 */
static int s5_slp_typ(uint64_t dsdt) {
    uint32_t len = rd32(dsdt + 4);
    for (uint64_t i = 36; i + 8 < len; i++) {
        if (!bytes_eq(dsdt + i, "_S5_", 4) || rd8(dsdt + i + 4) != 0x12) continue;
        uint64_t p = dsdt + i + 5;
        p += 1 + (rd8(p) >> 6); /* PkgLength */
        p += 1;                 /* element count */
        switch (rd8(p)) {
        case 0x00: return 0;
        case 0x01: return 1;
        case 0x0a: return rd8(p + 1);
        default: return -1;
        }
    }
    return -1;
}

/* Finds the power registers through RSDP -> XSDT -> FADT (-> DSDT); 0 if the
 * tables are missing or do not declare them as I/O ports. */
static int acpi_find_power(struct acpi_power *out) {
    for (uint64_t a = ACPI_SCAN_START; a < ACPI_SCAN_END; a += 16) {
        if (!bytes_eq(a, "RSD PTR ", 8) || sum8(a, 20) || rd8(a + 15) < 2 || sum8(a, 36)) continue;
        uint64_t xsdt = rd64(a + 24);
        if (!is_table(xsdt, "XSDT")) return 0;
        uint64_t entries = (rd32(xsdt + 4) - 36) / 8;
        for (uint64_t i = 0; i < entries; i++) {
            uint64_t fadt = rd64(xsdt + 36 + 8 * i);
            if (!is_table(fadt, "FACP") || rd32(fadt + 4) < 268) continue;
            /* Generic address structures: space id 1 is system I/O. */
            if (rd8(fadt + 244) != 1 || rd8(fadt + 116) != 1) return 0;
            uint64_t dsdt = rd64(fadt + 140);
            if (!dsdt) dsdt = rd32(fadt + 40);
            int typ = is_table(dsdt, "DSDT") ? s5_slp_typ(dsdt) : -1;
            if (typ < 0 || typ > 7) return 0;
            out->sleep_control = (uint16_t)rd64(fadt + 248);
            out->reset = (uint16_t)rd64(fadt + 120);
            out->reset_value = rd8(fadt + 128);
            out->slp_typ_s5 = (uint8_t)typ;
            return 1;
        }
        return 0;
    }
    return 0;
}

/* Powers off (or resets) as the FADT says; returns only if nothing happened. */
static void acpi_power_off(const struct acpi_power *a) {
    puts("wanmig-testguest: powering off (ACPI S5)\n");
    outb(a->sleep_control, (uint8_t)((a->slp_typ_s5 << 2) | 0x20 /* SLP_EN */));
    puts("wanmig-testguest: still running after the power-off write\n");
}

static void acpi_reset(const struct acpi_power *a) {
    puts("wanmig-testguest: resetting (ACPI reset register)\n");
    outb(a->reset, a->reset_value);
    puts("wanmig-testguest: still running after the ACPI reset; trying the i8042\n");
    outb(0x64, 0xfe);
    puts("wanmig-testguest: still running after the i8042 reset\n");
}

/* ---------------------------------------------------------------- main */

struct mb_info { uint32_t flags, mem_lower, mem_upper, boot_device, cmdline, mods_count, mods_addr, syms[4], mmap_length, mmap_addr; };
struct __attribute__((packed)) mb_mmap { uint32_t size; uint64_t addr, len; uint32_t type; };

static uint64_t mem_words, rewritten;

static inline uint64_t page_off(uint64_t a, uint64_t gen) {
    return POOL_OFF(PAGE_SALT ^ a ^ gen * POOL_GOLDEN, mem_words, pool_words);
}

/* Whether page a holds generation gen (words 0, 1, and the first and last
 * pseudo-random word). */
static inline int page_holds(volatile uint64_t *p, uint64_t a, uint64_t gen) {
    if (p[0] != (PAGE_MAGIC ^ a) || p[1] != gen) return 0;
    if (!mem_words) return 1;
    uint64_t off = page_off(a, gen);
    return p[2] == pool[off] && p[1 + mem_words] == pool[off + mem_words - 1];
}

/* Generation 0 on every page in [start, end) above the pool, unless the
 * host already wrote it. */
static int host_stamped;

static void stamp(uint64_t start, uint64_t end) {
    if (start < status.ws_start) start = status.ws_start;
    /* The host says it stamped every page: trust it if the region's first
     * and last pages agree (the oracle checks every byte anyway). */
    uint64_t last = end >= PAGE_SIZE ? ((end - PAGE_SIZE) & ~(PAGE_SIZE - 1)) : 0;
    if (host_stamped && start + PAGE_SIZE <= end && page_holds((volatile uint64_t *)start, start, 0) &&
        page_holds((volatile uint64_t *)last, last, 0)) {
        status.stamped_pages += (last - start) / PAGE_SIZE + 1;
        return;
    }
    for (uint64_t a = start; a + PAGE_SIZE <= end; a += PAGE_SIZE) {
        volatile uint64_t *p = (volatile uint64_t *)a;
        if (!page_holds(p, a, 0)) {
            rewritten++;
            p[0] = PAGE_MAGIC ^ a;
            p[1] = 0;
            if (mem_words) copy_words(p + 2, pool + page_off(a, 0), mem_words);
        }
        status.stamped_pages++;
    }
}

/* The pool of pool_bytes at RESERVED_END: kept if one word in every 4 KiB
 * is right (the host wrote it), else computed here; 1 if it was kept. */
static int pool_setup(uint64_t pool_bytes) {
    uint64_t *w = (uint64_t *)RESERVED_END;
    pool_words = pool_bytes / 8;
    status.pool_bytes = pool_bytes;
    for (uint64_t i = 0; i < pool_words; i += 512) {
        if (w[i] != POOL_WORD(i) || w[i + 511] != POOL_WORD(i + 511)) {
            puts("wanmig-testguest: computing the pool\n");
            for (uint64_t j = 0; j < pool_words; j++) w[j] = POOL_WORD(j);
            return 0;
        }
    }
    return 1;
}

static void report_error(uint64_t gpa, uint64_t found, uint64_t want) {
    if (status.errors++ == 0) status.first_error_gpa = gpa;
    if (status.errors <= 8) {
        puts("wanmig-testguest: MISMATCH at "); putx(gpa);
        puts(" found "); putx(found); puts(" want "); putx(want); puts("\n");
    }
}

/*
 * One step of the generation walk: check and increment one working-set page.
 * The page is written before status.steps, and steps is one word, so the host
 * sees sum(word 1 over the working set) == steps or steps + 1 at any pause.
 */
static uint64_t cursor, pass;
static inline void step(void) {
    uint64_t a = status.ws_start + cursor * PAGE_SIZE;
    volatile uint64_t *p = (volatile uint64_t *)a;
    if (!page_holds(p, a, pass)) report_error(a, p[1], pass);
    p[1] = pass + 1;
    if (mem_words) copy_words(p + 2, pool + page_off(a, pass + 1), mem_words);
    status.steps++;
    if (++cursor == status.ws_pages) {
        cursor = 0;
        pass++;
    }
}

void guest_main(uint32_t magic, uint32_t info_addr) {
    status.magic = STATUS_MAGIC;
    status.phase = PHASE_BOOT;
    puts("wanmig-testguest: boot\n");
    if (magic != 0x2BADB002) { puts("wanmig-testguest: not started by a multiboot loader\n"); return; }
    const struct mb_info *mb = (const struct mb_info *)(uint64_t)info_addr;

    struct params p = { 16, 0, 0, 1, VIRTIO_MMIO_BASE, VIRTIO_MMIO_STRIDE, VIRTIO_MMIO_COUNT,
                        DEFAULT_MEM_ENTROPY, DEFAULT_DISK_ENTROPY, 0, 0, 0, 0, 0, 0, { 0 }, { 0 }, 0, 0 };
    if (mb->flags & (1u << 2)) parse_cmdline((const char *)(uint64_t)mb->cmdline, &p);

    struct acpi_power acpi = { 0, 0, 0, 0 };
    uint64_t stop_after_s = p.poweroff_after_s ? p.poweroff_after_s : p.reset_after_s;
    if (stop_after_s) {
        if (acpi_find_power(&acpi)) {
            puts("wanmig-testguest: ACPI: sleep control port "); putx(acpi.sleep_control);
            puts(" S5 type "); putu(acpi.slp_typ_s5);
            puts(", reset port "); putx(acpi.reset);
            puts(" value "); putx(acpi.reset_value); puts("\n");
        } else {
            puts("wanmig-testguest: no usable ACPI tables: cannot power off or reset\n");
            stop_after_s = 0;
        }
    }

    status.phase = PHASE_STAMPING;
    int have_mmap = (mb->flags & (1u << 6)) != 0;
    uint64_t low_end = 0x100000ull + (uint64_t)mb->mem_upper * 1024;
    if (have_mmap) {
        low_end = 0;
        for (uint64_t at = mb->mmap_addr; at < (uint64_t)mb->mmap_addr + mb->mmap_length;) {
            const struct mb_mmap *e = (const struct mb_mmap *)at;
            if (e->type == 1 && e->addr <= RESERVED_END && e->addr + e->len > low_end) low_end = e->addr + e->len;
            at += e->size + 4;
        }
    }
    uint64_t low_free = low_end > RESERVED_END ? low_end - RESERVED_END : 0;

    /* The pool, then the working set right after it. */
    if (p.mem_entropy > 100) p.mem_entropy = 100;
    if (p.disk_entropy > 100) p.disk_entropy = 100;
    status.mem_entropy = p.mem_entropy;
    status.disk_entropy = p.disk_entropy;
    uint64_t pool_bytes = 0;
    if (p.mem_entropy || p.disk_entropy) {
        pool_bytes = p.have_pool_kib ? p.pool_kib * 1024 : low_free / POOL_RAM_SHARE;
        if (!p.have_pool_kib && pool_bytes > POOL_MAX_BYTES) pool_bytes = POOL_MAX_BYTES;
        if (pool_bytes > low_free / 2) pool_bytes = low_free / 2;
        pool_bytes &= ~(POOL_ALIGN - 1);
        if (!pool_bytes) {
            puts("wanmig-testguest: no room for a pool: entropy 0\n");
            status.mem_entropy = status.disk_entropy = 0;
        }
    }
    int pool_kept = pool_setup(pool_bytes);
    host_stamped = pool_kept && status.host_stamped == (PRESTAMP_MAGIC ^ status.mem_entropy ^ (pool_bytes << 8));
    mem_words = MEM_WORDS(status.mem_entropy);
    disk_words = DISK_WORDS(status.disk_entropy);
    status.ws_start = RESERVED_END + pool_bytes;

    if (have_mmap) {
        for (uint64_t at = mb->mmap_addr; at < (uint64_t)mb->mmap_addr + mb->mmap_length;) {
            const struct mb_mmap *e = (const struct mb_mmap *)at;
            if (e->type == 1) stamp(e->addr, e->addr + e->len);
            at += e->size + 4;
        }
    } else {
        stamp(RESERVED_END, low_end);
    }

    uint64_t ws_max = low_end > status.ws_start ? (low_end - status.ws_start) / PAGE_SIZE : 0;
    status.ws_pages = p.ws_mib * 256 < ws_max ? p.ws_mib * 256 : ws_max;

    int have_disk = p.disk_kib && blk_probe(&p) && status.disk_blocks;
    if (p.have_ip && !net_probe(&p)) puts("wanmig-testguest: net_ip given but no usable virtio-net device\n");
    interrupts_init();
    status.phase = PHASE_RUNNING;
    puts("wanmig-testguest: running stamped="); putu(status.stamped_pages);
    puts(" (written here "); putu(rewritten); puts(")");
    puts(" ws_pages="); putu(status.ws_pages);
    puts(" rate_mib="); if (p.flat_out) puts("max"); else putu(p.rate_mib);
    puts(" disk_kib="); putu(have_disk ? p.disk_kib : 0);
    puts(" mem_entropy="); putu(status.mem_entropy);
    puts(" disk_entropy="); putu(status.disk_entropy);
    puts(" pool_kib="); putu(status.pool_bytes / 1024);
    puts("\n");
    __asm__ volatile("sti");

    uint64_t pages_per_sec = p.rate_mib * 256, blocks_per_sec = p.disk_kib / 4;
    uint64_t pages_done = 0, last_report = 0, start = ticks;
    for (;;) {
        uint64_t now = ticks - start;
        if (status.ws_pages && p.flat_out) {
            for (int i = 0; i < 256; i++) step();
        } else if (status.ws_pages && pages_per_sec) {
            uint64_t target = now * pages_per_sec / TICK_HZ;
            if (target > pages_done + pages_per_sec) pages_done = target - pages_per_sec; /* cap the backlog at 1 s */
            for (; pages_done < target; pages_done++) step();
        }
        if (have_disk && blocks_per_sec) {
            uint64_t target = now * blocks_per_sec / TICK_HZ;
            if (target > status.disk_issued + blocks_per_sec) target = status.disk_issued + blocks_per_sec;
            if (blk_pump(target)) {
                puts("wanmig-testguest: disk write failed, disk writer stopped\n");
                have_disk = 0;
            }
        }
        if (now >= last_report + TICK_HZ) {
            last_report = now;
            puts("wanmig-testguest: t="); putu(now / TICK_HZ);
            puts("s pass="); putu(pass);
            puts(" cursor="); putu(cursor);
            puts(" disk="); putu(status.disk_done);
            puts(" errors="); putu(status.errors);
            if (status.net_base) {
                puts(" net_rx="); putu(status.net_rx);
                puts(" net_tx="); putu(status.net_tx);
                puts(" net_dropped="); putu(status.net_dropped);
                puts(" udp_seq="); putu(status.udp_seq);
            }
            puts("\n");
        }
        if (status.net_base) net_poll();
        if (stop_after_s && now >= stop_after_s * TICK_HZ) {
            if (p.poweroff_after_s) acpi_power_off(&acpi);
            else acpi_reset(&acpi);
            stop_after_s = 0;
        }
        if (!p.flat_out) __asm__ volatile("sti; hlt");
    }
}
