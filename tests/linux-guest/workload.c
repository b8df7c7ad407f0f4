/*
 * wanmig-workload: what the Linux test guest runs while it is migrated.
 *
 * One process, one poll() loop, so that a single status line a second can
 * report every part. The parts are chosen on the command line, each a
 * keyword followed by its arguments:
 *
 *   entropy MEM_PCT DISK_PCT  pseudo-random share of each page and block
 *                           written, 0..100 (default 35 and 60, as the built-in
 *                           test guest's); must come before mem and disk
 *   mem WS_MIB RATE_MIB     keep rewriting a WS_MIB working set at RATE_MIB MiB/s
 *   disk KIB_S FILE MIB     write 4 KiB blocks at KIB_S KiB/s, cycling over the
 *                           first MIB MiB of FILE (emptied first), fdatasync'd
 *                           after every batch
 *   tcp PORT                TCP echo service (RFC 862)
 *   udp PORT                UDP sequence service (below)
 *   status FILE             also keep the last status line in FILE
 *
 * Memory: page i of the working set at generation g is
 *   word 0 = i, word 1 = g,
 *   words 2 .. 2+n = RANDOM(PAGE_SALT ^ i * GOLDEN ^ g, j) for j = 0 .. n,
 *             n = 510 * mem_entropy / 100,
 *   the rest zero,
 * where RANDOM(key, j) = MIX64(key + (j + 1) * GOLDEN), splitmix64 (the
 * built-in test guest's mixer; its random words come from a pool instead,
 * because its emulated vCPU is too slow to compute them). Pages start at
 * generation 0. A pass over the set checks every byte of each page against
 * the generation the previous pass wrote, then writes the next one, so a
 * page's random words change with every generation (neither zstd nor an
 * XBZRLE delta against its old copy finds them again). A page that does not
 * hold what was written is reported as "MEMORY CORRUPT": after a migration
 * that is the oracle.
 *
 * Disk: block b at generation g (its g-th write, from 1) is
 *   word 0 = DISK_MAGIC, 1 = b, 2 = g, 3 = the write's number,
 *   words 4 .. 4+n = RANDOM(DISK_SALT ^ b * GOLDEN ^ g, j), n = 508 * disk_entropy / 100,
 *   the rest DISK_MAGIC ^ word index.
 * Before each write the block is read back and must hold generation g - 1
 * (zeros for g = 1: the file is emptied at start); a block that does not is
 * reported as "DISK CORRUPT" and counted in disk_errors.
 *
 * UDP sequence service, the contract of the built-in test guest's
 * (vmm/testguest/abi.h): each datagram is answered, from the service's port
 * to the sender, with a 64-bit big-endian sequence number (1 for the first
 * reply, then 2, 3, ...) followed by the request's payload truncated to
 * UDP_SEQ_MAX_ECHO bytes.
 *
 * Status, once a second on stdout:
 *   wanmig-linux: t=SECONDS mem_steps=N mem_passes=N disk_errors=N mem_errors=N
 *                 disk_writes=N tcp_conns=OPEN tcp_total=N udp_replies=N
 *
 * Rates are kept by a token bucket on CLOCK_MONOTONIC; after a pause (a VM
 * stopped for a snapshot or a migration's stop-and-copy) at most one second
 * of backlog is caught up, so a pause does not turn into a burst.
 *
 * Built static (gcc -static -O2) by scripts/guest-assets.sh: the initramfs
 * has no C library.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define BLOCK 4096u
#define TICK_MS 10
#define MAX_CLIENTS 128
#define CLIENT_BUF 16384
#define UDP_MAX 65507
#define UDP_SEQ_MAX_ECHO 1024 /* as the test guest's abi.h */
#define DISK_MAGIC 0x4b44474d4e41575full /* "_WANMGDK" */
#define GOLDEN 0x9e3779b97f4a7c15ull
#define PAGE_SALT 0x574d4750524e4430ull /* as abi.h */
#define DISK_SALT 0x574d4744524e4430ull

static uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Pseudo-random share of each page and block (entropy MEM DISK). */
static uint64_t mem_entropy = 35, disk_entropy = 60;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "wanmig-linux: workload: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void usage(void) {
    fprintf(stderr, "usage: wanmig-workload [entropy MEM_PCT DISK_PCT] [mem WS_MIB RATE_MIB] [disk KIB_S FILE MIB] "
                    "[tcp PORT] [udp PORT] [status FILE]\n");
    exit(2);
}

static uint64_t number(const char *s) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end) usage();
    return v;
}

/* A token bucket: how many units are due at `now` for `per_s` a second. */
struct pace {
    uint64_t per_s, start_ns, done;
};

static uint64_t pace_due(struct pace *p, uint64_t now) {
    if (!p->per_s) return 0;
    uint64_t allowed = (now - p->start_ns) / 1000 * p->per_s / 1000000;
    if (allowed > p->done + p->per_s) p->done = allowed - p->per_s; /* at most 1 s of backlog */
    return allowed - p->done;
}

/* ------------------------------------------------------------------ memory */

static struct {
    uint8_t *base;
    uint64_t pages, cursor, gen, steps, passes, errors, words;
    struct pace pace;
} mem;

/* Page i at generation g (see above), all 4096 bytes. */
static void mem_page(uint64_t *w, uint64_t i, uint64_t g) {
    uint64_t key = PAGE_SALT ^ i * GOLDEN ^ g;
    w[0] = i, w[1] = g;
    for (uint64_t j = 0; j < mem.words; j++) w[2 + j] = mix64(key + (j + 1) * GOLDEN);
    memset(w + 2 + mem.words, 0, PAGE - 8 * (2 + mem.words));
}

static void mem_init(uint64_t ws_mib, uint64_t rate_mib, uint64_t now) {
    mem.pages = ws_mib * (1024 * 1024 / PAGE);
    if (!mem.pages) return;
    mem.base = mmap(NULL, mem.pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (mem.base == MAP_FAILED) die("mmap working set");
    mem.words = 510 * mem_entropy / 100;
    for (uint64_t i = 0; i < mem.pages; i++) mem_page((uint64_t *)(mem.base + i * PAGE), i, 0);
    mem.gen = 1;
    mem.pace = (struct pace){ rate_mib * (1024 * 1024 / PAGE), now, 0 };
}

static void mem_step(void) {
    static uint64_t want[PAGE / 8];
    uint64_t *w = (uint64_t *)(mem.base + mem.cursor * PAGE);
    mem_page(want, mem.cursor, mem.gen - 1);
    if (memcmp(w, want, PAGE)) {
        unsigned j = 0;
        while (w[j] == want[j]) j++;
        if (mem.errors++ < 10)
            printf("wanmig-linux: MEMORY CORRUPT page=%llu gen=%llu want gen=%llu: word %u is %#llx, want %#llx\n",
                   (unsigned long long)mem.cursor, (unsigned long long)w[1], (unsigned long long)(mem.gen - 1), j,
                   (unsigned long long)w[j], (unsigned long long)want[j]);
    }
    mem_page(w, mem.cursor, mem.gen);
    mem.steps++;
    if (++mem.cursor == mem.pages) mem.cursor = 0, mem.gen++, mem.passes++;
}

/* -------------------------------------------------------------------- disk */

static struct {
    int fd;
    uint64_t blocks, cursor, gen, writes, errors, words;
    struct pace pace;
} disk = { .fd = -1 };

static void disk_init(uint64_t kib_s, const char *path, uint64_t mib, uint64_t now) {
    disk.blocks = mib * (1024 * 1024 / BLOCK);
    if (!disk.blocks || !kib_s) return;
    disk.fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (disk.fd < 0) die(path);
    disk.words = 508 * disk_entropy / 100;
    /* Allocated up front so that the writes overwrite blocks in place, as a
     * database does, rather than growing the file. */
    int e = posix_fallocate(disk.fd, 0, (off_t)(disk.blocks * BLOCK));
    if (e) errno = e, die("fallocate");
    disk.gen = 1;
    disk.pace = (struct pace){ kib_s * 1024 / BLOCK, now, 0 };
}

/* Block b at generation g (see above); zeros for generation 0. */
static void disk_block(uint64_t *buf, uint64_t b, uint64_t g) {
    if (!g) {
        memset(buf, 0, BLOCK);
        return;
    }
    uint64_t key = DISK_SALT ^ b * GOLDEN ^ g;
    buf[0] = DISK_MAGIC, buf[1] = b, buf[2] = g, buf[3] = (g - 1) * disk.blocks + b;
    for (uint64_t j = 4; j < BLOCK / 8; j++)
        buf[j] = j < 4 + disk.words ? mix64(key + (j - 3) * GOLDEN) : DISK_MAGIC ^ j;
}

static void disk_write(void) {
    static uint64_t buf[BLOCK / 8], held[BLOCK / 8];
    off_t at = (off_t)(disk.cursor * BLOCK);
    disk_block(buf, disk.cursor, disk.gen - 1);
    if (pread(disk.fd, held, BLOCK, at) != BLOCK) die("disk read");
    if (memcmp(held, buf, BLOCK)) {
        unsigned j = 0;
        while (held[j] == buf[j]) j++;
        if (disk.errors++ < 10)
            printf("wanmig-linux: DISK CORRUPT block=%llu gen=%llu: word %u is %#llx, want %#llx\n",
                   (unsigned long long)disk.cursor, (unsigned long long)(disk.gen - 1), j, (unsigned long long)held[j],
                   (unsigned long long)buf[j]);
    }
    disk_block(buf, disk.cursor, disk.gen);
    if (pwrite(disk.fd, buf, BLOCK, at) != BLOCK) die("disk write");
    disk.writes++;
    if (++disk.cursor == disk.blocks) disk.cursor = 0, disk.gen++;
}

/* ---------------------------------------------------------------- network */

struct client {
    int fd;
    size_t off, len; /* bytes of buf still to echo back */
    char buf[CLIENT_BUF];
};

static struct client *clients[MAX_CLIENTS];
static unsigned nclients;
static uint64_t tcp_total, udp_replies, udp_seq;

static int listen_on(int type, uint64_t port) {
    int fd = socket(AF_INET, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), one = 1;
    if (fd < 0) die("socket");
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
    if (bind(fd, (struct sockaddr *)&a, sizeof a)) die("bind");
    if (type == SOCK_STREAM && listen(fd, 64)) die("listen");
    return fd;
}

static void tcp_accept(int lfd) {
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) return; /* EAGAIN, or a client that went before we took it */
        tcp_total++;
        if (nclients == MAX_CLIENTS) { close(fd); continue; }
        /* A client that vanishes without a FIN (its host gone, a path cut
         * during a move) is found by keepalive and dropped in about 45 s,
         * instead of holding a slot for ever. */
        int one = 1, idle = 30, intvl = 5, cnt = 3;
        unsigned timeout_ms = 45000;
        setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof intvl);
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof cnt);
        setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &timeout_ms, sizeof timeout_ms);
        struct client *c = calloc(1, sizeof *c);
        if (!c) { close(fd); continue; }
        c->fd = fd;
        clients[nclients++] = c;
    }
}

/* Echoes what the client sent; returns 0 when the connection is done. */
static int tcp_serve(struct client *c, short revents) {
    if (revents & (POLLERR | POLLNVAL)) return 0;
    if (!c->len) {
        ssize_t n = read(c->fd, c->buf, sizeof c->buf);
        if (n == 0) return 0;
        if (n < 0) return errno == EAGAIN || errno == EINTR;
        c->off = 0, c->len = (size_t)n;
    }
    while (c->len) {
        ssize_t n = send(c->fd, c->buf + c->off, c->len, MSG_NOSIGNAL);
        if (n < 0) return errno == EAGAIN || errno == EINTR;
        c->off += (size_t)n, c->len -= (size_t)n;
    }
    return 1;
}

static void udp_serve(int fd) {
    static uint8_t req[UDP_MAX], rep[8 + UDP_SEQ_MAX_ECHO];
    for (int i = 0; i < 64; i++) {
        struct sockaddr_in from;
        socklen_t fl = sizeof from;
        ssize_t n = recvfrom(fd, req, sizeof req, 0, (struct sockaddr *)&from, &fl);
        if (n < 0) return;
        if (n > UDP_SEQ_MAX_ECHO) n = UDP_SEQ_MAX_ECHO;
        uint64_t seq = ++udp_seq;
        for (int b = 0; b < 8; b++) rep[b] = (uint8_t)(seq >> (56 - 8 * b));
        memcpy(rep + 8, req, (size_t)n);
        if (sendto(fd, rep, 8 + (size_t)n, 0, (struct sockaddr *)&from, fl) >= 0) udp_replies++;
    }
}

/* ------------------------------------------------------------------- main */

static void status(uint64_t t, const char *path) {
    char line[256];
    int n = snprintf(line, sizeof line,
                     "wanmig-linux: t=%llu mem_steps=%llu mem_passes=%llu disk_errors=%llu mem_errors=%llu "
                     "disk_writes=%llu tcp_conns=%u tcp_total=%llu udp_replies=%llu\n",
                     (unsigned long long)t, (unsigned long long)mem.steps, (unsigned long long)mem.passes,
                     (unsigned long long)disk.errors, (unsigned long long)mem.errors, (unsigned long long)disk.writes,
                     nclients,
                     (unsigned long long)tcp_total, (unsigned long long)udp_replies);
    fputs(line, stdout);
    fflush(stdout);
    if (!path) return;
    /* Written aside and renamed, so that a reader never sees half a line. */
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return;
    if (write(fd, line, (size_t)n) == n) rename(tmp, path);
    close(fd);
}

int main(int argc, char **argv) {
    uint64_t t0 = now_ns();
    const char *status_path = NULL;
    int tcp_fd = -1, udp_fd = -1;
    signal(SIGPIPE, SIG_IGN);
    for (int i = 1; i < argc;) {
        const char *k = argv[i++];
        int left = argc - i;
        if (!strcmp(k, "entropy") && left >= 2) {
            mem_entropy = number(argv[i]), disk_entropy = number(argv[i + 1]), i += 2;
            if (mem_entropy > 100 || disk_entropy > 100) usage();
        } else if (!strcmp(k, "mem") && left >= 2) mem_init(number(argv[i]), number(argv[i + 1]), t0), i += 2;
        else if (!strcmp(k, "disk") && left >= 3) disk_init(number(argv[i]), argv[i + 1], number(argv[i + 2]), t0), i += 3;
        else if (!strcmp(k, "tcp") && left >= 1) tcp_fd = listen_on(SOCK_STREAM, number(argv[i++]));
        else if (!strcmp(k, "udp") && left >= 1) udp_fd = listen_on(SOCK_DGRAM, number(argv[i++]));
        else if (!strcmp(k, "status") && left >= 1) status_path = argv[i++];
        else usage();
    }
    printf("wanmig-linux: workload: mem %llu MiB at %llu MiB/s, disk %llu KiB/s over %llu MiB, "
           "entropy mem %llu%% disk %llu%%, tcp %s, udp %s\n",
           (unsigned long long)(mem.pages * PAGE >> 20), (unsigned long long)(mem.pace.per_s * PAGE >> 20),
           (unsigned long long)(disk.pace.per_s * BLOCK >> 10), (unsigned long long)(disk.blocks * BLOCK >> 20),
           (unsigned long long)mem_entropy, (unsigned long long)disk_entropy,
           tcp_fd >= 0 ? "on" : "off", udp_fd >= 0 ? "on" : "off");
    fflush(stdout); /* the host waits for this line: the sockets are bound */

    uint64_t next_status = t0 + 1000000000ull;
    int busy = mem.pace.per_s || disk.pace.per_s;
    for (;;) {
        struct pollfd p[2 + MAX_CLIENTS];
        unsigned n = 0;
        p[n++] = (struct pollfd){ tcp_fd, nclients < MAX_CLIENTS ? POLLIN : 0, 0 };
        p[n++] = (struct pollfd){ udp_fd, POLLIN, 0 };
        for (unsigned i = 0; i < nclients; i++)
            p[n++] = (struct pollfd){ clients[i]->fd, clients[i]->len ? POLLOUT : POLLIN, 0 };
        uint64_t now = now_ns();
        int timeout = busy ? TICK_MS : now >= next_status ? 0 : (int)((next_status - now) / 1000000 + 1);
        if (poll(p, n, timeout) < 0 && errno != EINTR) die("poll");

        if (p[0].revents) tcp_accept(tcp_fd);
        if (p[1].revents) udp_serve(udp_fd);
        /* clients[0 .. n-2) are the ones polled this round; tcp_accept may
         * have appended new ones after them, polled from the next round. */
        for (unsigned k = 2; k < n; k++) {
            struct client *c = clients[k - 2];
            if (p[k].revents && !tcp_serve(c, p[k].revents)) close(c->fd), c->fd = -1;
        }
        unsigned kept = 0;
        for (unsigned i = 0; i < nclients; i++) {
            if (clients[i]->fd >= 0) clients[kept++] = clients[i];
            else free(clients[i]);
        }
        nclients = kept;

        now = now_ns();
        uint64_t due = mem.pages ? pace_due(&mem.pace, now) : 0;
        for (uint64_t i = 0; i < due; i++) mem_step();
        mem.pace.done += due;
        due = disk.fd >= 0 ? pace_due(&disk.pace, now) : 0;
        for (uint64_t i = 0; i < due; i++) disk_write();
        disk.pace.done += due;
        if (due && fdatasync(disk.fd)) die("disk fsync");
        if (now >= next_status) {
            status((now - t0) / 1000000000ull, status_path);
            while (next_status <= now) next_status += 1000000000ull;
        }
    }
}
