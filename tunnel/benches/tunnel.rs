//! What the tunnel costs: TCP bulk throughput both ways and UDP ping-pong
//! round trips, through the tunnel and without it, side by side in one run
//! on the topology of the namespace test (`tests/common`):
//!
//! - *same bridge*: the guest on hostA's bridge, next to the client (before
//!   the move);
//! - *routed*: a second guest on hostB's bridge, reached by ordinary
//!   routing hostA → link → hostB: the path the tunnel stands in for;
//! - *tunnel*: the guest moved to hostB, reached through the tunnel over
//!   the same link.
//!
//! The link emulator adds no delay and no rate limit here, so the figures
//! show the processing cost; it is itself a user-space hop, in both the
//! routed and the tunnel path. Needs root. `cargo bench -p wanmig-tunnel`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::*;
use wanmig_linkem::LinkParams;
use wanmig_tunnel::{Role, Tunnel, TunnelConfig, Until};

const BULK: usize = 64 << 20;
const PINGS: usize = 2000;

/// A service on `ip` in `ns`: port 7002 swallows what it is sent and
/// answers the byte count at its end; port 7003 sends BULK bytes.
fn bulk_services(ns: &str, ip: Ipv4Addr, stop: &Stop) -> Vec<std::thread::JoinHandle<()>> {
    let serve = |port: u16, sink: bool| {
        let stop = stop.clone();
        spawn_in(ns, move || {
            let l = TcpListener::bind((ip, port)).expect("bind");
            l.set_nonblocking(true).expect("nonblocking");
            while !stop.stopped() {
                let Ok((mut c, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                c.set_nonblocking(false).expect("blocking");
                let mut buf = vec![0u8; 256 << 10];
                if sink {
                    let mut n = 0u64;
                    while let Ok(k) = c.read(&mut buf) {
                        if k == 0 {
                            break;
                        }
                        n += k as u64;
                    }
                    let _ = c.write_all(&n.to_le_bytes());
                } else {
                    let mut left = BULK;
                    while left > 0 {
                        let k = left.min(buf.len());
                        if c.write_all(&buf[..k]).is_err() {
                            break;
                        }
                        left -= k;
                    }
                }
            }
        })
    };
    vec![serve(7002, true), serve(7003, false)]
}

/// (upload, download) in Mbit/s of BULK bytes between the client and `ip`.
fn bulk(client: &str, ip: Ipv4Addr) -> (f64, f64) {
    spawn_in(client, move || {
        let mbps = |d: Duration| BULK as f64 * 8.0 / d.as_secs_f64() / 1e6;
        let buf = vec![7u8; 256 << 10];
        let t = Instant::now();
        let mut c = TcpStream::connect((ip, 7002)).expect("connect");
        let mut left = BULK;
        while left > 0 {
            let k = left.min(buf.len());
            c.write_all(&buf[..k]).expect("upload");
            left -= k;
        }
        c.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut n = [0u8; 8];
        c.read_exact(&mut n).expect("count");
        assert_eq!(u64::from_le_bytes(n), BULK as u64, "the sink got everything");
        let up = mbps(t.elapsed());

        let t = Instant::now();
        let mut c = TcpStream::connect((ip, 7003)).expect("connect");
        let mut got = 0;
        let mut buf = vec![0u8; 256 << 10];
        while got < BULK {
            let k = c.read(&mut buf).expect("download");
            assert!(k > 0, "download ended early");
            got += k;
        }
        (up, mbps(t.elapsed()))
    })
    .join()
    .expect("bulk")
}

/// UDP ping-pong round trips to `ip`'s echo service, sorted.
fn pings(client: &str, ip: Ipv4Addr) -> Vec<Duration> {
    spawn_in(client, move || {
        let s = UdpSocket::bind((CLIENT_IP, 0)).expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
        s.connect((ip, 7000)).expect("connect");
        let mut rtts = Vec::with_capacity(PINGS);
        let mut buf = [0u8; 64];
        for i in 0..PINGS as u64 {
            let t = Instant::now();
            s.send(&i.to_le_bytes()).expect("send");
            loop {
                match s.recv(&mut buf) {
                    Ok(8) if buf[..8] == i.to_le_bytes() => {
                        rtts.push(t.elapsed());
                        break;
                    }
                    Ok(_) => continue,
                    Err(_) => break, // lost: not counted
                }
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        rtts.sort();
        rtts
    })
    .join()
    .expect("pings")
}

fn row(name: &str, client: &str, ip: Ipv4Addr) {
    let (up, down) = bulk(client, ip);
    let r = pings(client, ip);
    let p = |q: f64| r.get(((r.len() as f64 * q) as usize).min(r.len().saturating_sub(1))).copied().unwrap_or_default();
    println!(
        "{name:<12} {up:>9.0} {down:>9.0}   {:>7.0} {:>7.0} {:>7.0} {:>7.0}   {}/{PINGS}",
        p(0.5).as_secs_f64() * 1e6,
        p(0.9).as_secs_f64() * 1e6,
        p(0.99).as_secs_f64() * 1e6,
        r.last().copied().unwrap_or_default().as_secs_f64() * 1e6,
        r.len()
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a list; nothing to list.
    }
    let topo = Topology::build("b", LinkParams::default(), true);
    let stop = Stop::default();
    let _stop_on_exit = stop.guard();
    let mut services = echo_services(&topo.guest.name, GUEST_IP, &stop);
    services.extend(bulk_services(&topo.guest.name, GUEST_IP, &stop));
    let g2 = topo.guest2.as_ref().expect("guest2").name.clone();
    services.extend(echo_services(&g2, GUEST2_IP, &stop));
    services.extend(bulk_services(&g2, GUEST2_IP, &stop));
    std::thread::sleep(Duration::from_millis(300));
    let mut conn = topo.connect();
    let ((a_tx, a_rx), (b_tx, b_rx)) = conn.stream(&topo);

    println!(
        "tunnel bench: {} MiB TCP each way, {PINGS} UDP ping-pongs; link emulator without delay or rate limit",
        BULK >> 20
    );
    println!(
        "{:<12} {:>9} {:>9}   {:>7} {:>7} {:>7} {:>7}   answered",
        "path", "up Mb/s", "down Mb/s", "p50 µs", "p90 µs", "p99 µs", "max µs"
    );
    row("same bridge", &topo.client.name, GUEST_IP);
    row("routed", &topo.client.name, GUEST2_IP);

    topo.move_guest();
    let cfg = |role| TunnelConfig::new(vec![GUEST_IP], guest_mac(), role, Until::Signal);
    let (src, dst) = (cfg(Role::Source { interface: "brA".into() }), cfg(Role::Destination { interface: "pg".into() }));
    let tb = topo.b.spawn(async move { Tunnel::start(dst, b_tx, b_rx).await.expect("destination end") });
    let ta = topo.a.run(async move { Tunnel::start(src, a_tx, a_rx).await.expect("source end") });
    let tb = topo.b.block_on(tb).expect("start");
    std::thread::sleep(Duration::from_millis(500));
    row("tunnel", &topo.client.name, GUEST_IP);

    let (sa, sb) = (ta.status(), tb.status());
    println!(
        "tunnel drops: source {:?} (total {}), destination {:?} (total {})",
        sa.drops,
        sa.drops.total(),
        sb.drops,
        sb.drops.total()
    );
    ta.control().routes_converged().expect("converged");
    topo.a.block_on(ta.wait());
    topo.b.block_on(tb.wait());
    stop.stop();
    for s in services {
        let _ = s.join();
    }
}
