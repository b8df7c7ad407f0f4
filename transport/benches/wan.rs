//! Bulk goodput of one QUIC connection over an emulated WAN link, Cubic and
//! BBR side by side.
//!
//! Each row is a fresh pair of network namespaces joined by the link
//! emulator (`wanmig-linkem`, a queue of one bandwidth-delay product, at
//! least 1 MiB), a destination in B (`Listener::bind`) and a source in A
//! (`connect`), pinned identities, `LinkTuning` windows for the row's rate
//! and RTT (2 × BDP), and one bulk stream carrying 1 MiB `Pages` frames as
//! a migration's pre-copy does, for a fixed time. Goodput is the stream's
//! bytes the destination decoded per second, as a fraction of the link's
//! configured rate (which counts whole Ethernet frames: QUIC's ceiling is
//! about 94%, see below); "steady" leaves out the first 3 s. The last
//! columns say what the link did (frames lost at random, dropped by its full
//! queue), whether the emulator or the destination's UDP socket fell behind
//! (kernel drops at the TAP, `RcvbufErrors`), and the CPU this process used
//! (both endpoints, the emulator and their kernel work) against the
//! machine's cores. Prints a table; asserts nothing. Needs root.
//!
//! `cargo bench -p wanmig-transport --bench wan` (`WAN_BENCH_SECS=N` to
//! change the 15 s each row runs; `-- RATE_MBPS:LOSS_PCT …` for other rows,
//! rate 0 for an unlimited link with no delay).
//!
//! QUIC's ceiling: a 1514-byte frame (s2n-quic's largest, a 1500 MTU)
//! carries at most about 1420 bytes of stream data (Ethernet, IP and UDP
//! 42; short header with a 16-byte connection id, packet number, AEAD tag
//! and STREAM frame header about 50), 94% of the link. Measured on this project's
//! development machine (2 vCPUs shared with other work, load average about
//! 2–3, Linux 6.18), steady goodput as % of the link, Cubic / BBR; run C
//! is the code as committed, runs A and B had the UDP socket buffers
//! capped at 4 MiB (`rmem_max`) instead of the full window:
//!
//! | link | loss | run A | run B | run C |
//! |---|---|---|---|---|
//! | no limit, no delay | 0 | 2311 / 2157 Mbit/s | 2540 / 1750 Mbit/s | 2431 / 2237 Mbit/s |
//! | 1 Gbit/s | 0 | 89.7 / 90.9 | 93.4 / 86.3 | 93.1 / 90.0 |
//! | 1 Gbit/s | 0.1% | 1.0 / 73.0 | 0.9 / 62.1 | 1.0 / 77.4 |
//! | 1 Gbit/s | 1% | 0.3 / 40.4 | 0.3 / 36.9 | 0.3 / 58.6 |
//! | 200 Mbit/s | 0 | 93.7 / 91.6 | 92.7 / 87.4 | 93.7 / 90.6 |
//! | 200 Mbit/s | 0.1% | 4.5 / 89.5 | 4.2 / 68.5 | 4.5 / 91.6 |
//! | 200 Mbit/s | 1% | 1.4 / 70.6 | 1.4 / 77.6 | 1.4 / 83.9 |
//!
//! Cubic's figures under loss are the loss-based throughput formula's
//! (about 1.2 × MSS / (RTT × √p): 9 Mbit/s at 0.1%, 3 Mbit/s at 1%), and
//! Linux's own TCP Cubic gets the same through the same link (10 and
//! 3 Mbit/s, `cargo bench -p wanmig-linkem --bench tcp -- 1000:50:0:0.1`).
//! No run saw kernel drops at the emulator, nor `RcvbufErrors` but 38 in
//! run A's unlimited Cubic row; before the
//! socket buffers were sized (the kernel's 208 KiB), 1 Gbit/s without
//! loss gave Cubic 14.5% and BBR 66.3%, with 270 and 9704 `RcvbufErrors`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use wanmig_linkem::{Direction, LinkConfig, LinkParams, WanPair};
use wanmig_transport::{CongestionControl, Identity, LinkTuning, Listener, connect};
use wanmig_wire::{Message, PageData, PageRef, PagesBuilder};

const RTT: Duration = Duration::from_millis(50);
const WARMUP: Duration = Duration::from_secs(3);

/// CPU time (user + system) of this process.
fn cpu_time() -> Duration {
    // SAFETY: a zeroed rusage is a valid out-parameter, exclusively borrowed.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// `Udp: … RcvbufErrors` of the calling thread's namespace.
fn udp_rcvbuf_errors() -> u64 {
    let text = std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap_or_default();
    let mut udp = text.lines().filter(|l| l.starts_with("Udp: "));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else { return u64::MAX };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(u64::MAX)
}

/// A 1 MiB `Pages` frame of incompressible-looking pages.
fn frame() -> Vec<u8> {
    let mut page = [0u8; 4096];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut b = PagesBuilder::new(0);
    for i in 0..256u64 {
        for chunk in page.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        b.push(PageRef { gpa: i * 4096, data: PageData::Raw(&page) });
    }
    Message::Pages(b.finish()).encode()
}

struct Row {
    steady_bps: f64,
    whole_bps: f64,
    lost: u64,
    overflowed: u64,
    kernel_drops: u64,
    rcvbuf_errors: u64,
    cpu: f64,
}

fn run(tag: &str, rate: u64, loss: f64, congestion: CongestionControl, secs: Duration) -> Row {
    let link = if rate == 0 { LinkParams::default() } else { LinkParams::wan(rate, RTT).with_loss(loss) };
    let pair = WanPair::new(tag, LinkConfig::symmetric(link).with_seed(7)).expect("topology");
    let (a, b) = (pair.a().runtime(1).expect("runtime"), pair.b().runtime(1).expect("runtime"));
    let tuning = LinkTuning {
        bandwidth_bps: if rate == 0 { 1_000_000_000 } else { rate },
        rtt: if rate == 0 { Duration::from_millis(1) } else { RTT },
        congestion,
        ..LinkTuning::default()
    };
    let (src, dst) = (Identity::generate("src").expect("id").0, Identity::generate("dst").expect("id").0);
    let (src_fp, dst_fp) = (src.fingerprint(), dst.fingerprint());
    let addr = SocketAddr::from((pair.addr_b(), 4750));
    let frame = Arc::new(frame());
    let frame_len = frame.len() as u64;
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));

    let mut listener = b.run(async move { Listener::bind(addr, &dst, &[src_fp], tuning).expect("listen") });
    let sink = {
        let received = received.clone();
        b.spawn(async move {
            let mut conn = listener.accept().await.expect("a connection");
            let mut bulk = conn.accept_bulk().await.expect("bulk");
            while let Ok(Some(m)) = bulk.recv().await {
                if let Message::Pages(_) = m {
                    received.fetch_add(frame_len, Ordering::Relaxed);
                }
            }
            (conn, listener)
        })
    };
    let source = {
        let stop = stop.clone();
        a.spawn(async move {
            let mut conn = connect(addr, &src, &[dst_fp], tuning).await.expect("connect");
            let mut bulk = conn.open_bulk().await.expect("bulk");
            while !stop.load(Ordering::Relaxed) {
                if bulk.send_encoded(&frame).await.is_err() {
                    break;
                }
            }
            conn.close(0);
        })
    };
    let rcvbuf0 = pair.b().run(udp_rcvbuf_errors).expect("snmp");
    let (t0, cpu0, c0) = (Instant::now(), cpu_time(), pair.counters(Direction::AtoB));
    std::thread::sleep(WARMUP);
    let (r1, t1) = (received.load(Ordering::Relaxed), Instant::now());
    std::thread::sleep(secs.saturating_sub(WARMUP));
    let (r2, t2, cpu2, c2) =
        (received.load(Ordering::Relaxed), Instant::now(), cpu_time(), pair.counters(Direction::AtoB));
    let rcvbuf2 = pair.b().run(udp_rcvbuf_errors).expect("snmp");
    stop.store(true, Ordering::Relaxed);
    let _ = a.block_on(source);
    let _ = b.block_on(async { tokio::time::timeout(Duration::from_secs(3), sink).await });
    let kernel_drops = pair.emulator().kernel_drops().map(|d| d[0]).unwrap_or(u64::MAX);
    drop((a, b));
    Row {
        steady_bps: (r2 - r1) as f64 * 8.0 / (t2 - t1).as_secs_f64(),
        whole_bps: r2 as f64 * 8.0 / (t2 - t0).as_secs_f64(),
        lost: c2.lost - c0.lost,
        overflowed: c2.overflowed - c0.overflowed,
        kernel_drops,
        rcvbuf_errors: rcvbuf2.saturating_sub(rcvbuf0),
        cpu: (cpu2 - cpu0).as_secs_f64() / (t2 - t0).as_secs_f64(),
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a list; nothing to list.
    }
    let secs = std::env::var("WAN_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(15u64);
    let secs = Duration::from_secs(secs.max(WARMUP.as_secs() + 2));
    // Rows: RATE_MBPS:LOSS_PCT arguments, or the standard table.
    let mut rows: Vec<(u64, f64)> = std::env::args()
        .skip(1)
        .filter_map(|a| {
            let (r, l) = a.split_once(':')?;
            Some((r.parse::<u64>().ok()? * 1_000_000, l.parse::<f64>().ok()? / 100.0))
        })
        .collect();
    if rows.is_empty() {
        rows = vec![
            (0, 0.0),
            (1_000_000_000, 0.0),
            (1_000_000_000, 0.001),
            (1_000_000_000, 0.01),
            (200_000_000, 0.0),
            (200_000_000, 0.001),
            (200_000_000, 0.01),
        ];
    }
    println!(
        "wanmig-transport WAN bench: one QUIC connection, one bulk stream of 1 MiB Pages frames, {secs:?} per run \
         (steady: after {WARMUP:?}), RTT {RTT:?}, goodput as % of the link's rate; {} cores; load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "{:>10} {:>5} {:>5} | {:>9} {:>7} {:>7} | {:>7} {:>8} {:>6} {:>7} {:>5}",
        "link", "loss", "cc", "steady", "%", "whole %", "lost", "overflow", "kdrop", "rcvbuf", "cpu"
    );
    let mut n = 0;
    for (rate, loss) in rows {
        for congestion in [CongestionControl::Cubic, CongestionControl::Bbr] {
            n += 1;
            let r = run(&format!("w{n}"), rate, loss, congestion, secs);
            let pct = |bps: f64| if rate == 0 { f64::NAN } else { bps / rate as f64 * 100.0 };
            let link = if rate == 0 { "no limit".to_string() } else { format!("{} Mb/s", rate / 1_000_000) };
            println!(
                "{link:>10} {:>4.1}% {:>5} | {:>4.0} Mb/s {:>6.1}% {:>6.1}% | {:>7} {:>8} {:>6} {:>7} {:>4.0}%",
                loss * 100.0,
                format!("{congestion:?}"),
                r.steady_bps / 1e6,
                pct(r.steady_bps),
                pct(r.whole_bps),
                r.lost,
                r.overflowed,
                r.kernel_drops,
                r.rcvbuf_errors,
                r.cpu * 100.0,
            );
        }
    }
}
