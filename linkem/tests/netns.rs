//! The emulator between two real namespaces: delay by ping-pong, rate by a
//! UDP flood, loss by counting, outages (scripted, timed and manual) by a
//! numbered UDP stream, and the cleanup of the namespaces. Needs root.

use std::net::{Ipv4Addr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wanmig_linkem::{Direction, LinkConfig, LinkParams, OutageSchedule, WanPair};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn need_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "these tests create network namespaces and TAP devices: run them as root");
}

fn namespaces() -> String {
    String::from_utf8_lossy(&std::process::Command::new("ip").args(["netns", "list"]).output().expect("ip").stdout)
        .into_owned()
}

/// An echo service on B's address, port 7000, until `stop`.
fn echo(pair: &WanPair, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Result<(), wanmig_linkem::NetnsError>> {
    let b = pair.addr_b();
    pair.b()
        .spawn(move || {
            let s = UdpSocket::bind((b, 7000)).expect("bind");
            s.set_read_timeout(Some(ms(20))).expect("timeout");
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(&buf[..n], from);
                }
            }
        })
        .expect("spawn")
}

/// Round trips of `n` ping-pongs from A, 5 ms apart (lost ones left out).
fn ping(pair: &WanPair, n: u64) -> Vec<Duration> {
    let b = pair.addr_b();
    pair.a()
        .run(move || {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
            s.set_read_timeout(Some(Duration::from_secs(1))).expect("timeout");
            s.connect((b, 7000)).expect("connect");
            let mut rtts = Vec::new();
            let mut buf = [0u8; 64];
            for i in 0..n {
                let t = Instant::now();
                s.send(&i.to_le_bytes()).expect("send");
                // Skip stale replies of earlier (late) pings.
                while let Ok(k) = s.recv(&mut buf) {
                    if k == 8 && buf[..8] == i.to_le_bytes() {
                        rtts.push(t.elapsed());
                        break;
                    }
                }
                std::thread::sleep(ms(5));
            }
            rtts
        })
        .expect("client")
}

#[test]
fn delay_and_jitter_show_in_round_trips() {
    need_root();
    let params = LinkParams { delay: ms(20), ..LinkParams::default() };
    let pair = WanPair::new("delay", LinkConfig::symmetric(params)).expect("topology");
    let stop = Arc::new(AtomicBool::new(false));
    let server = echo(&pair, stop.clone());
    ping(&pair, 3); // ARP on both sides
    let mut rtts = ping(&pair, 100);
    rtts.sort();
    assert_eq!(rtts.len(), 100, "no loss configured");
    let (min, median) = (rtts[0], rtts[50]);
    assert!(min >= ms(40), "a round trip shorter than 2 × 20 ms: {min:?}");
    assert!(median <= ms(42), "median round trip {median:?} for 2 × 20 ms");

    // Jitter ±8 ms each way, changed at runtime: round trips spread within
    // 2 × [12, 28] ms (plus processing), and over most of that range.
    pair.control().set_params_both(params.with_jitter(ms(8))).expect("params");
    let mut rtts = ping(&pair, 200);
    rtts.sort();
    // The lower bound is hard (scheduling only adds); the upper one is
    // taken at the 95th percentile, as a busy machine adds outliers.
    let (min, p5, p95) = (rtts[0], rtts[rtts.len() / 20], rtts[rtts.len() * 19 / 20]);
    assert!(min >= ms(24), "{min:?} below 2 × (20 - 8) ms");
    assert!(p95 <= ms(58), "95th percentile {p95:?} above 2 × (20 + 8) ms (+2 ms processing)");
    assert!(p95 - p5 >= ms(12), "jitter of ±8 ms each way spread round trips over only {:?}", p95 - p5);
    stop.store(true, Ordering::Relaxed);
    server.join().expect("server").expect("namespace");
}

#[test]
fn the_rate_holds_and_the_queue_drops_the_excess() {
    need_root();
    // 40 Mbit/s, 10 ms each way, a 100 KB queue; offered 80 Mbit/s of
    // 1400-byte datagrams (1442-byte frames) for 3 s.
    let rate = 40_000_000u64;
    let params = LinkParams { rate_bps: rate, delay: ms(10), queue_bytes: 100_000, ..LinkParams::default() };
    let pair = WanPair::new("rate", LinkConfig::symmetric(params)).expect("topology");
    let b = pair.addr_b();
    let sink = pair.b().run(move || UdpSocket::bind((b, 7001)).expect("bind")).expect("sink");
    sink.set_read_timeout(Some(ms(500))).expect("timeout");
    let counter = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let (mut n, mut first, mut last) = (0u64, None, None);
        while let Ok(k) = sink.recv(&mut buf) {
            if k == 1400 {
                n += 1;
                first.get_or_insert_with(Instant::now);
                last = Some(Instant::now());
            }
        }
        (n, first, last)
    });
    let c0 = pair.counters(Direction::AtoB);
    pair.a()
        .run(move || {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
            s.connect((b, 7001)).expect("connect");
            let buf = [0x5au8; 1400];
            let t0 = Instant::now();
            // 80 Mbit/s: one 1442-byte frame every 144.2 µs, sent in
            // bursts of 10 every 1.442 ms.
            let mut i = 0u64;
            while t0.elapsed() < Duration::from_secs(3) {
                for _ in 0..10 {
                    let _ = s.send(&buf);
                }
                i += 1;
                let next = t0 + Duration::from_micros(1442 * i);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        })
        .expect("sender");
    let (n, first, last) = counter.join().expect("counter");
    let c1 = pair.counters(Direction::AtoB);
    let (first, last) = (first.expect("something arrived"), last.expect("something arrived"));
    let achieved = (n - 1) as f64 * 1442.0 * 8.0 / (last - first).as_secs_f64();
    assert!((achieved / rate as f64 - 1.0).abs() < 0.03, "received at {achieved:.0} bit/s on a {rate} bit/s link");
    // The emulator's own view agrees, and it dropped about half.
    let link = c1.achieved_bps();
    assert!((link / rate as f64 - 1.0).abs() < 0.03, "the emulator delivered at {link:.0} bit/s");
    let offered = (c1.forwarded + c1.overflowed) - (c0.forwarded + c0.overflowed);
    let dropped = c1.overflowed - c0.overflowed;
    assert!((0.40..0.60).contains(&(dropped as f64 / offered as f64)), "{dropped} of {offered} overflowed");
    assert_eq!(c1.lost + c1.dropped_down, 0);
    assert_eq!(pair.emulator().kernel_drops().expect("kernel counters"), [0, 0], "the emulator kept up");
}

#[test]
fn loss_is_near_its_rate_and_counted() {
    need_root();
    let params = LinkParams { loss: 0.1, ..LinkParams::default() };
    let pair = WanPair::new("loss", LinkConfig::symmetric(params).with_seed(42)).expect("topology");
    let b = pair.addr_b();
    // A static neighbour entry: no ARP frames for the loss to hit.
    pair.b().ip("link set wan address 02:00:00:00:00:02").expect("mac");
    pair.a().ip(&format!("neigh replace {b} lladdr 02:00:00:00:00:02 dev wan")).expect("neigh");
    let sink = pair.b().run(move || UdpSocket::bind((b, 7002)).expect("bind")).expect("sink");
    sink.set_read_timeout(Some(ms(300))).expect("timeout");
    let counter = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        std::iter::from_fn(|| sink.recv(&mut buf).ok()).filter(|&k| k == 16).count()
    });
    let c0 = pair.counters(Direction::AtoB);
    pair.a()
        .run(move || {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
            s.connect((b, 7002)).expect("connect");
            for i in 0u64..4000 {
                s.send(&[i.to_le_bytes(), i.to_be_bytes()].concat()).expect("send");
                if i % 100 == 0 {
                    std::thread::sleep(ms(1));
                }
            }
        })
        .expect("sender");
    let got = counter.join().expect("counter");
    let c1 = pair.counters(Direction::AtoB);
    // Binomial(4000, 0.9): sd 19.
    assert!((3520..3680).contains(&got), "{got} of 4000 arrived at 10% loss");
    assert_eq!((c1.forwarded - c0.forwarded) as usize, got, "every forwarded frame arrived, nothing else did");
    assert_eq!((c1.lost - c0.lost) as usize, 4000 - got, "every missing frame is counted as lost");
}

/// What a numbered UDP stream saw: each datagram's send instant and
/// whether it arrived.
struct Stream {
    sent: Vec<Instant>,
    arrived: Vec<bool>,
}

/// Sends numbered datagrams A → B every 2 ms for `total`; the closure
/// waits for the end and says what arrived.
fn stream(pair: &WanPair, port: u16, total: Duration) -> impl FnOnce() -> Stream {
    let b = pair.addr_b();
    let sent = Arc::new(Mutex::new(Vec::new()));
    let arrived = Arc::new(Mutex::new(Vec::new()));
    let sink = pair.b().run(move || UdpSocket::bind((b, port)).expect("bind")).expect("sink");
    sink.set_read_timeout(Some(ms(50))).expect("timeout");
    let done = Arc::new(AtomicBool::new(false));
    let receiver = {
        let (arrived, done) = (arrived.clone(), done.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            // Until the sender is done and nothing came for 50 ms.
            loop {
                let Ok(k) = sink.recv(&mut buf) else {
                    if done.load(Ordering::Relaxed) {
                        break;
                    }
                    continue;
                };
                if k == 8 {
                    let i = u64::from_le_bytes(buf[..8].try_into().expect("8")) as usize;
                    let mut a = arrived.lock().expect("lock");
                    if a.len() <= i {
                        a.resize(i + 1, false);
                    }
                    a[i] = true;
                }
            }
        })
    };
    let sender = {
        let sent = sent.clone();
        pair.a()
            .spawn(move || {
                let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
                s.connect((b, port)).expect("connect");
                let t0 = Instant::now();
                let mut i = 0u64;
                while t0.elapsed() < total {
                    sent.lock().expect("lock").push(Instant::now());
                    let _ = s.send(&i.to_le_bytes());
                    i += 1;
                    std::thread::sleep((t0 + ms(2 * i)).saturating_duration_since(Instant::now()));
                }
            })
            .expect("spawn")
    };
    move || {
        sender.join().expect("sender").expect("namespace");
        // The last datagrams are a one-way delay behind.
        std::thread::sleep(ms(100));
        done.store(true, Ordering::Relaxed);
        receiver.join().expect("receiver");
        let sent = std::mem::take(&mut *sent.lock().expect("lock"));
        let arrived = std::mem::take(&mut *arrived.lock().expect("lock"));
        Stream { sent, arrived }
    }
}

impl Stream {
    /// Checks that every datagram sent within an outage `[down, up)` was
    /// dropped and every one sent clear of all of them (its one-way
    /// `delay` before, 25 ms of scheduling slack either side) arrived.
    fn check_outages(&self, outages: &[(Instant, Instant)], delay: Duration) {
        // The emulator stamps a frame when it reads it, which a busy
        // machine can delay by a few milliseconds.
        let slack = ms(25);
        let mut inside = vec![0usize; outages.len()];
        let mut clear = 0;
        for (i, &at) in self.sent.iter().enumerate() {
            let got = self.arrived.get(i).copied().unwrap_or(false);
            let within = outages.iter().position(|&(down, up)| at >= down + slack && at + slack < up);
            let near = outages.iter().any(|&(down, up)| at + delay + slack >= down && at < up + slack);
            if let Some(k) = within {
                let (down, up) = outages[k];
                assert!(!got, "datagram {i} sent {:?} into a {:?} outage arrived", at - down, up - down);
                inside[k] += 1;
            } else if !near {
                let rel: Vec<_> = outages.iter().map(|&(d, _)| at.duration_since(d).as_millis()).collect();
                assert!(got, "datagram {i}, sent clear of the outages ({rel:?} ms after their starts), was lost");
                clear += 1;
            }
        }
        for (k, &(down, up)) in outages.iter().enumerate() {
            let expected = ((up - down).saturating_sub(2 * slack).as_millis() / 2) as usize;
            assert!(inside[k] + 10 >= expected, "{} datagrams in outage {k}, {expected} expected", inside[k]);
        }
        assert!(clear > 200, "too few datagrams clear of the outages: {clear}");
    }
}

#[test]
fn outages_drop_everything_for_their_duration_and_traffic_resumes() {
    need_root();
    let params = LinkParams::wan(100_000_000, ms(20));
    // Scripted: down from 1.0 s to 2.0 s after the start.
    let config = LinkConfig::symmetric(params).with_outages(OutageSchedule::new([(ms(1000), ms(1000))]));
    let pair = WanPair::new("out", config).expect("topology");
    let control = pair.control();
    let start = Instant::now() - control.elapsed();
    let s = stream(&pair, 7003, ms(3000))();
    s.check_outages(&[(start + ms(1000), start + ms(2000))], params.delay);
    let c = pair.counters(Direction::AtoB);
    assert!(c.dropped_down >= 450, "{} frames dropped while down", c.dropped_down);
    assert_eq!(c.lost + c.overflowed, 0);

    // Live: a 700 ms outage_for at a moment of the test's choosing, then a
    // manual cut and restore.
    let finish = stream(&pair, 7004, ms(3000));
    std::thread::sleep(ms(800));
    let down = Instant::now();
    control.outage_for(ms(700));
    assert!(control.is_down());
    std::thread::sleep(ms(1200));
    assert!(!control.is_down());
    let down2 = Instant::now();
    control.set_down(true);
    std::thread::sleep(ms(500));
    let up2 = Instant::now();
    control.set_down(false);
    let s = finish();
    s.check_outages(&[(down, down + ms(700)), (down2, up2)], params.delay);
}

#[test]
fn namespaces_go_away_on_drop_and_on_panic() {
    need_root();
    let pid = std::process::id();
    let pair = WanPair::new("gone", LinkConfig::default()).expect("topology");
    assert!(namespaces().contains(&format!("lk{pid}gonea")));
    drop(pair);
    assert!(!namespaces().contains(&format!("lk{pid}gone")), "{}", namespaces());

    let r = std::panic::catch_unwind(|| {
        let _pair = WanPair::new("panic", LinkConfig::default()).expect("topology");
        assert!(namespaces().contains(&format!("lk{pid}panicb")));
        panic!("a failing test");
    });
    assert!(r.is_err());
    assert!(!namespaces().contains(&format!("lk{pid}panic")), "{}", namespaces());
}
