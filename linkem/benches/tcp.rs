//! How close the emulator gets to its configured rate, for each rate and
//! RTT on a fresh [`WanPair`]: the idle round trip of a UDP ping-pong; a
//! UDP flood offered at 120% of the rate (what arrives, and what the
//! emulator delivered, in Ethernet-frame bits: pacing accuracy alone); one
//! TCP bulk flow with Cubic (set on the socket: this machine's default is
//! BBR; `LINKEM_BENCH_CC=bbr` for that) from side A to side B. Prints a
//! table; asserts nothing. Needs root.
//!
//! `cargo bench -p wanmig-linkem --bench tcp` (`LINKEM_BENCH_SECS=N` to
//! change the 10 s each flow runs; the first 2 s are left out of "steady";
//! `-- RATE_MBPS:RTT_MS[:QUEUE_KIB[:LOSS_PCT]] …` for other rows, rate 0
//! for no limit, queue 0 for the default).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use wanmig_linkem::{Direction, LinkConfig, LinkParams, WanPair};

const WARMUP: Duration = Duration::from_secs(2);

/// CPU time (user + system) of this whole process: sender, receiver,
/// emulator and the kernel work done in their system calls.
fn cpu_time() -> Duration {
    // SAFETY: a zeroed rusage is a valid out-parameter, exclusively borrowed.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Median round trip of 200 UDP ping-pongs from A to B over the idle link.
fn udp_rtt(pair: &WanPair) -> Duration {
    let b = pair.addr_b();
    let server = pair
        .b()
        .spawn(move || {
            let s = UdpSocket::bind((b, 7100)).expect("bind");
            s.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
            let mut buf = [0u8; 64];
            for _ in 0..200 {
                let Ok((n, from)) = s.recv_from(&mut buf) else { return };
                let _ = s.send_to(&buf[..n], from);
            }
        })
        .expect("spawn");
    std::thread::sleep(Duration::from_millis(100));
    let mut rtts = pair
        .a()
        .run(move || {
            let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
            s.set_read_timeout(Some(Duration::from_secs(1))).expect("timeout");
            s.connect((b, 7100)).expect("connect");
            let mut rtts = Vec::new();
            let mut buf = [0u8; 64];
            for i in 0u64..200 {
                let t = Instant::now();
                s.send(&i.to_le_bytes()).expect("send");
                if matches!(s.recv(&mut buf), Ok(8)) {
                    rtts.push(t.elapsed());
                }
            }
            rtts
        })
        .expect("client");
    let _ = server.join();
    rtts.sort();
    rtts.get(rtts.len() / 2).copied().unwrap_or_default()
}

/// A UDP flood A → B of 1472-byte datagrams (1514-byte frames) offered at
/// 120% of `rate` for 3 s: (what B received, what the emulator delivered),
/// both in frame bits/s over the flood's steady second half.
fn udp_flood(pair: &WanPair, rate: u64) -> (f64, f64) {
    let b = pair.addr_b();
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sink = pair.b().run(move || UdpSocket::bind((b, 7300)).expect("bind")).expect("sink");
    let big: libc::c_int = 16 << 20;
    // SAFETY: a valid socket and a c_int option value of its size.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sink),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&big as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    sink.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    let counter = {
        let (received, stop) = (received.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(1472) = sink.recv(&mut buf) {
                    received.fetch_add(1514, Ordering::Relaxed);
                }
            }
        })
    };
    let source = {
        let stop = stop.clone();
        pair.a()
            .spawn(move || {
                let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
                s.connect((b, 7300)).expect("connect");
                let buf = [0x5au8; 1472];
                let per_ms = (rate as f64 * 1.2 / 8.0 / 1514.0 / 1000.0).max(1.0);
                let t0 = Instant::now();
                let mut sent = 0f64;
                while !stop.load(Ordering::Relaxed) {
                    let due = t0.elapsed().as_secs_f64() * 1000.0 * per_ms;
                    while sent < due {
                        let _ = s.send(&buf);
                        sent += 1.0;
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
            })
            .expect("spawn")
    };
    std::thread::sleep(Duration::from_millis(1500));
    let (r0, c0) = (received.load(Ordering::Relaxed), pair.counters(Direction::AtoB));
    std::thread::sleep(Duration::from_millis(1500));
    let (r1, c1) = (received.load(Ordering::Relaxed), pair.counters(Direction::AtoB));
    stop.store(true, Ordering::Relaxed);
    let _ = source.join();
    let _ = counter.join();
    let secs = c1.at.duration_since(c0.at).as_secs_f64();
    ((r1 - r0) as f64 * 8.0 / secs, c1.rate_bps_since(&c0))
}

struct Row {
    whole_bps: f64,
    steady_bps: f64,
    link_bps: f64,
    overflowed: u64,
    kernel_drops: u64,
    cpu: f64,
}

/// Sets the TCP congestion control of `c` (before it sends anything).
fn set_congestion(c: &TcpStream, cc: &str) {
    // SAFETY: a valid socket, and a byte string of the given length, only
    // read by the kernel during the call.
    let r = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(c),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            cc.as_ptr().cast(),
            cc.len() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "TCP congestion control {cc}: {}", std::io::Error::last_os_error());
}

/// One TCP flow A → B for `secs` with congestion control `cc`.
fn tcp_flow(pair: &WanPair, secs: Duration, cc: &str) -> Row {
    let cc = cc.to_string();
    let b = pair.addr_b();
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let listener = pair.b().run(move || TcpListener::bind((b, 7200)).expect("bind")).expect("listen");
    let sink = {
        let received = received.clone();
        std::thread::spawn(move || {
            let (mut c, _) = listener.accept().expect("accept");
            let mut buf = vec![0u8; 256 << 10];
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 {
                    break;
                }
                received.fetch_add(n as u64, Ordering::Relaxed);
            }
        })
    };
    let source = {
        let stop = stop.clone();
        pair.a()
            .spawn(move || {
                let mut c = TcpStream::connect((b, 7200)).expect("connect");
                set_congestion(&c, &cc);
                let buf = vec![0x5au8; 256 << 10];
                while !stop.load(Ordering::Relaxed) {
                    if c.write_all(&buf).is_err() {
                        break;
                    }
                }
                let _ = c.shutdown(std::net::Shutdown::Write);
            })
            .expect("spawn")
    };
    let (t0, cpu0, c0) = (Instant::now(), cpu_time(), pair.counters(Direction::AtoB));
    std::thread::sleep(WARMUP);
    let (r1, t1) = (received.load(Ordering::Relaxed), Instant::now());
    std::thread::sleep(secs.saturating_sub(WARMUP));
    let (r2, t2, cpu2, c2) =
        (received.load(Ordering::Relaxed), Instant::now(), cpu_time(), pair.counters(Direction::AtoB));
    stop.store(true, Ordering::Relaxed);
    let _ = source.join();
    let _ = sink.join();
    let drops = pair.emulator().kernel_drops().map(|d| d[0]).unwrap_or(u64::MAX);
    Row {
        whole_bps: r2 as f64 * 8.0 / (t2 - t0).as_secs_f64(),
        steady_bps: (r2 - r1) as f64 * 8.0 / (t2 - t1).as_secs_f64(),
        link_bps: c2.rate_bps_since(&c0),
        overflowed: c2.overflowed - c0.overflowed,
        kernel_drops: drops,
        cpu: (cpu2 - cpu0).as_secs_f64() / (t2 - t0).as_secs_f64(),
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a list; nothing to list.
    }
    let secs = std::env::var("LINKEM_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(10u64);
    let secs = Duration::from_secs(secs.max(3));
    let cc = std::env::var("LINKEM_BENCH_CC").unwrap_or_else(|_| "cubic".into());
    println!(
        "linkem TCP bench: one TCP flow A→B ({cc}) for {secs:?} per row; steady = after the first {WARMUP:?}; \
         goodput as % of the configured rate (TCP's ceiling is 95.6%); link = frames the emulator delivered A→B; \
         cpu = this process (sender, receiver, emulator, kernel work in their syscalls), of {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:>9} {:>6} {:>9} {:>8} | {:>7} {:>7} | {:>9} {:>7} {:>9} {:>7} {:>7} | {:>9} {:>6} {:>5}",
        "rate",
        "RTT",
        "queue",
        "idle RTT",
        "UDP rx",
        "UDP lnk",
        "TCP stdy",
        "%",
        "whole",
        "%",
        "link %",
        "overflow",
        "kdrop",
        "cpu"
    );
    // Rows: RATE_MBPS:RTT_MS[:QUEUE_KIB[:LOSS_PCT]] arguments (QUEUE_KIB 0:
    // the default), or the standard table.
    let mut rows: Vec<(u64, u64, Option<usize>, f64)> = std::env::args()
        .skip(1)
        .filter_map(|a| {
            let f: Vec<f64> = a.split(':').filter_map(|x| x.parse().ok()).collect();
            (f.len() >= 2).then(|| {
                let queue = f.get(2).filter(|&&k| k > 0.0).map(|&k| k as usize * 1024);
                ((f[0] * 1e6) as u64, f[1] as u64, queue, f.get(3).copied().unwrap_or(0.0) / 100.0)
            })
        })
        .collect();
    if rows.is_empty() {
        for rtt_ms in [0u64, 50] {
            for rate in [100_000_000u64, 200_000_000, 1_000_000_000] {
                rows.push((rate, rtt_ms, None, 0.0));
            }
        }
    }
    {
        for (rate, rtt_ms, queue, loss) in rows {
            let rtt = Duration::from_millis(rtt_ms);
            let mut params = LinkParams::wan(rate, rtt).with_loss(loss);
            if let Some(q) = queue {
                params.queue_bytes = q;
            }
            let pair = WanPair::new("tb", LinkConfig::symmetric(params)).expect("topology");
            let idle = udp_rtt(&pair);
            let (udp_rx, udp_link) = if rate > 0 { udp_flood(&pair, rate) } else { (0.0, 0.0) };
            let r = tcp_flow(&pair, secs, &cc);
            let pct = |bps: f64| if rate == 0 { 0.0 } else { bps / rate as f64 * 100.0 };
            println!(
                "{:>5} Mb/s {:>3} ms {:>6} KiB {:>4.1}% {:>5.2} ms | {:>6.1}% {:>6.1}% | {:>4.0} Mb/s {:>6.1}% {:>4.0} Mb/s {:>6.1}% {:>6.1}% | {:>9} {:>6} {:>4.0}%",
                rate / 1_000_000,
                rtt_ms,
                params.queue_bytes >> 10,
                loss * 100.0,
                idle.as_secs_f64() * 1e3,
                pct(udp_rx),
                pct(udp_link),
                r.steady_bps / 1e6,
                pct(r.steady_bps),
                r.whole_bps / 1e6,
                pct(r.whole_bps),
                pct(r.link_bps),
                r.overflowed,
                r.kernel_drops,
                r.cpu * 100.0,
            );
        }
    }
}
