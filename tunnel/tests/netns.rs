//! The tunnel end to end, in network namespaces: a guest moves from host A's
//! subnet to host B's (its port moves from A's bridge to B's), and the
//! tunnel keeps its address reachable over a WAN-like link with 20 ms each
//! way. A UDP request stream and a TCP connection opened before the move
//! keep going; new connections work; the longest gap is printed. Then
//! hand-driven hostile peers show that each end drops what it must not
//! deliver. Needs root (namespaces, raw sockets).

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use wanmig_linkem::LinkParams;
use wanmig_transport::{FrameReceiver, FrameSender};
use wanmig_tunnel::packet::{PROTO_UDP, ipv4_fix_header};
use wanmig_tunnel::{CloseReason, Role, Tunnel, TunnelConfig, TunnelState, TunnelStatus, Until};
use wanmig_wire::Message;

const TICK: Duration = Duration::from_millis(5);

fn config(role: Role) -> TunnelConfig {
    // Both hosts forward IPv4 here: without the kernel guard, hostB's
    // kernel would route the guest's packets to the client itself, and
    // the client would see every reply twice.
    TunnelConfig::new(vec![GUEST_IP], guest_mac(), role, Until::Signal)
}

/// What one UDP request saw.
#[derive(Debug, Clone, Copy)]
struct Sent {
    at: Instant,
    replies: u32,
    replied_at: Option<Instant>,
}

/// Sends a numbered request every TICK and counts the replies to each.
fn udp_stream(ns: &str, stop: &Stop) -> (Arc<Mutex<Vec<Sent>>>, Vec<std::thread::JoinHandle<()>>) {
    let log = Arc::new(Mutex::new(Vec::<Sent>::new()));
    let sock = Arc::new(
        common::spawn_in(ns, || {
            let s = UdpSocket::bind((CLIENT_IP, 0)).expect("bind");
            s.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
            s
        })
        .join()
        .expect("socket"),
    );
    let sender = {
        let (sock, log, stop) = (sock.clone(), log.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut seq = 0u64;
            while !stop.stopped() {
                let mut msg = [0u8; 64];
                msg[..8].copy_from_slice(&seq.to_le_bytes());
                msg[8..16].copy_from_slice(&(seq ^ 0x5555_aaaa).to_le_bytes());
                log.lock().expect("log").push(Sent { at: Instant::now(), replies: 0, replied_at: None });
                let _ = sock.send_to(&msg, (GUEST_IP, 7000));
                seq += 1;
                std::thread::sleep(TICK);
            }
        })
    };
    let receiver = {
        let (log, stop) = (log.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 128];
            while !stop.stopped() {
                let Ok(n) = sock.recv(&mut buf) else { continue };
                assert_eq!(n, 64, "echo length");
                let seq = u64::from_le_bytes(buf[..8].try_into().expect("8"));
                assert_eq!(u64::from_le_bytes(buf[8..16].try_into().expect("8")), seq ^ 0x5555_aaaa, "echo content");
                let mut l = log.lock().expect("log");
                let s = &mut l[seq as usize];
                s.replies += 1;
                s.replied_at.get_or_insert(Instant::now());
            }
        })
    };
    (log, vec![sender, receiver])
}

/// A TCP connection to the guest's echo service: writes a numbered 16-byte
/// record every TICK, checks every echoed record is the next one, and logs
/// when each arrived.
fn tcp_stream(ns: &str, stop: &Stop) -> (Arc<Mutex<Vec<Instant>>>, Vec<std::thread::JoinHandle<()>>) {
    let conn =
        common::spawn_in(ns, || TcpStream::connect((GUEST_IP, 7001)).expect("connect")).join().expect("connect thread");
    conn.set_nodelay(true).expect("nodelay");
    let mut reader = conn.try_clone().expect("clone");
    reader.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let writer = {
        let stop = stop.clone();
        let mut conn = conn;
        std::thread::spawn(move || {
            let mut seq = 0u64;
            while !stop.stopped() {
                let mut rec = [0u8; 16];
                rec[..8].copy_from_slice(&seq.to_le_bytes());
                rec[8..].copy_from_slice(&seq.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
                conn.write_all(&rec).expect("the connection opened before the move keeps working");
                seq += 1;
                std::thread::sleep(TICK);
            }
        })
    };
    let read = {
        let (stop, arrivals) = (stop.clone(), arrivals.clone());
        std::thread::spawn(move || {
            let mut expect = 0u64;
            let mut rec = [0u8; 16];
            let mut have = 0;
            while !stop.stopped() {
                match reader.read(&mut rec[have..]) {
                    Ok(0) => panic!("the guest closed the connection"),
                    Ok(n) => have += n,
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                        continue;
                    }
                    Err(e) => panic!("the connection broke: {e}"),
                }
                if have == 16 {
                    let seq = u64::from_le_bytes(rec[..8].try_into().expect("8"));
                    assert_eq!(seq, expect, "records arrive in order, none lost or repeated");
                    assert_eq!(
                        u64::from_le_bytes(rec[8..].try_into().expect("8")),
                        seq.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    );
                    arrivals.lock().expect("arrivals").push(Instant::now());
                    expect += 1;
                    have = 0;
                }
            }
        })
    };
    (arrivals, vec![writer, read])
}

fn longest_gap(times: &[Instant], from: Instant) -> Duration {
    times.windows(2).filter(|w| w[1] >= from).map(|w| w[1] - w[0]).max().unwrap_or_default()
}

/// A new connection: sends `len` bytes, reads them back, compares.
fn tcp_round_trip(ns: &str, len: usize) -> Duration {
    common::spawn_in(ns, move || {
        let t = Instant::now();
        let mut c = TcpStream::connect((GUEST_IP, 7001)).expect("a new connection after the move");
        c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let mut w = c.try_clone().expect("clone");
        let d = data.clone();
        let writer = std::thread::spawn(move || w.write_all(&d).expect("write"));
        let mut back = vec![0u8; len];
        c.read_exact(&mut back).expect("the echo");
        writer.join().expect("writer");
        assert!(back == data, "the echo differs");
        t.elapsed()
    })
    .join()
    .expect("round trip")
}

fn print_status(name: &str, s: &TunnelStatus) {
    println!("{name}: {}", serde_json::to_string(s).expect("json"));
}

#[test]
fn the_guest_stays_reachable_across_subnets() {
    let topo = Topology::build(
        "m",
        LinkParams { delay: Duration::from_millis(20), rate_bps: 200_000_000, ..LinkParams::default() },
        false,
    );
    let stop = Stop::default();
    let _stop_on_exit = stop.guard();
    let services = echo_services(&topo.guest.name, GUEST_IP, &stop);
    std::thread::sleep(Duration::from_millis(200));
    let mut conn = topo.connect();
    let ((a_tx, a_rx), (b_tx, b_rx)) = conn.stream(&topo);

    let (udp, mut threads) = udp_stream(&topo.client.name, &stop);
    let (tcp, t) = tcp_stream(&topo.client.name, &stop);
    threads.extend(t);
    std::thread::sleep(Duration::from_secs(1));
    let before = (udp.lock().expect("log").iter().filter(|s| s.replies > 0).count(), tcp.lock().expect("tcp").len());
    assert!(before.0 > 100 && before.1 > 100, "traffic flows before the move: {before:?}");

    // Cutover: the guest's port moves to hostB's bridge; both ends start.
    let cut = Instant::now();
    topo.move_guest();
    let moved = cut.elapsed();
    let source = config(Role::Source { interface: "brA".into() });
    let destination = config(Role::Destination { interface: "pg".into() });
    let tb = topo.b.spawn(async move { Tunnel::start(destination, b_tx, b_rx).await.expect("destination end") });
    let ta = topo.a.run(async move { Tunnel::start(source, a_tx, a_rx).await.expect("source end") });
    let tb = topo.b.block_on(tb).expect("start task");
    let started = cut.elapsed();

    std::thread::sleep(Duration::from_millis(1500));
    // Neighbour entries that expire: the client asks hostA for the guest,
    // the guest asks hostB for the client; both are answered at once.
    topo.client.ip("neigh flush dev eth0");
    topo.guest.ip("neigh flush dev eth0");
    std::thread::sleep(Duration::from_millis(1500));
    // New connections, with enough data to go through segmentation offloads both ways.
    let rtt_1m = tcp_round_trip(&topo.client.name, 1 << 20);
    std::thread::sleep(Duration::from_millis(500));
    stop.stop();
    for t in threads {
        t.join().expect("a client thread failed");
    }
    let (sa, sb) = (ta.status(), tb.status());
    print_status("source", &sa);
    print_status("destination", &sb);

    // (1) UDP: replies keep coming; no duplicates; losses only inside the gap.
    let log = udp.lock().expect("log").clone();
    let sent_after = log.iter().filter(|s| s.at > cut).count();
    let duplicated: Vec<_> = log.iter().enumerate().filter(|(_, s)| s.replies > 1).map(|(i, _)| i).collect();
    assert!(duplicated.is_empty(), "duplicated replies: {duplicated:?}");
    // The last requests may still be in flight when the stream stops.
    let settled = &log[..log.len().saturating_sub(40)];
    let lost: Vec<_> = settled.iter().enumerate().filter(|(_, s)| s.replies == 0).map(|(i, _)| i).collect();
    // Requests sent just after the cut may still pass before the port
    // moves: the gap ends with the first answer to one sent once both ends
    // were up.
    let up = cut + started;
    let recovered = settled.iter().position(|s| s.at > up && s.replies > 0).expect("replies after the move");
    for &i in &lost {
        assert!(
            settled[i].at + Duration::from_millis(100) > cut && i < recovered,
            "request {i} lost outside the cutover ({:?} after the cut; first answered once both ends were up: \
             {recovered})",
            settled[i].at.saturating_duration_since(cut)
        );
    }
    let mut replies: Vec<Instant> = log.iter().filter_map(|s| s.replied_at).collect();
    replies.sort();
    let udp_gap = longest_gap(&replies, cut - Duration::from_millis(200));
    assert!(settled.len() - lost.len() > 500, "most requests answered");

    // (2) TCP opened before the move: every record in order (checked as
    // they arrived), and it kept going after the move.
    let arrivals = tcp.lock().expect("tcp").clone();
    let after = arrivals.iter().filter(|t| **t > cut + Duration::from_secs(1)).count();
    assert!(after > 200, "the old TCP connection carries data after the move ({after} records)");
    let tcp_gap = longest_gap(&arrivals, cut - Duration::from_millis(200));

    println!(
        "cutover: port moved in {moved:?}, both ends up after {started:?}; UDP: {} sent after the cut, {} lost, longest \
         gap {udp_gap:?}; TCP: longest gap {tcp_gap:?}; new 1 MiB echo over the tunnel in {rtt_1m:?}",
        sent_after,
        lost.len()
    );
    assert!(udp_gap < Duration::from_secs(2), "the gap is bounded by the cutover, not by timeouts: {udp_gap:?}");

    // The statuses agree with what flowed.
    for s in [&sa, &sb] {
        assert_eq!(s.state, TunnelState::Forwarding);
        assert!(s.to_peer.packets > 1000 && s.from_peer.packets > 1000, "{s:?}");
        // Nothing dropped: no malformed or foreign packet, no offload left
        // undone, no overflow.
        assert_eq!(s.drops.total(), 0, "{:?}", s.drops);
        assert_eq!(s.kernel_guard.len(), 1);
    }
    assert!(sa.announcements >= 2 && sb.announcements >= 2);
    assert!(sa.arp_replies >= 1 && sb.arp_replies >= 1, "each end answered ARP after the flush");

    // (4) Routes converged: one call ends both ends cleanly.
    ta.control().routes_converged().expect("signal");
    let fa = topo.a.block_on(ta.wait());
    let fb = topo.b.block_on(tb.wait());
    assert_eq!(fa.state, TunnelState::Closed { reason: CloseReason::RoutesConverged });
    assert_eq!(fb.state, TunnelState::Closed { reason: CloseReason::PeerClosed { reason: "routes converged".into() } });
    assert!(fa.kernel_guard.is_empty() && fb.kernel_guard.is_empty(), "the guard rules are gone");
    assert!(fa.expires_in_ms.is_none());

    // (5) Hostile peers: each end, driven by a hand-written peer.
    hostile_source_peer(&topo, &mut conn);
    hostile_destination_peer(&topo, &mut conn);
    for s in services {
        s.join().expect("service");
    }
}

fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, PROTO_UDP, 0, 0];
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&40000u16.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]); // no UDP checksum
    p.extend_from_slice(payload);
    ipv4_fix_header(&mut p);
    p
}

async fn send_packets(tx: &mut FrameSender, packets: &[Vec<u8>]) {
    for p in packets {
        tx.send(&Message::TunnelPacket { packet: p.clone() }).await.expect("send");
    }
}

/// Closes a hand-driven peer's side: asks the tunnel to close, and reads
/// until it answers.
async fn close_by_hand(mut tx: FrameSender, mut rx: FrameReceiver) -> Vec<Message> {
    tx.send(&Message::TunnelClose { reason: "test over".into() }).await.expect("close");
    let mut seen = Vec::new();
    while let Ok(Some(m)) = rx.recv_timeout(Duration::from_secs(5)).await {
        let end = matches!(m, Message::TunnelClose { .. });
        seen.push(m);
        if end {
            break;
        }
    }
    let _ = tx.finish().await;
    seen
}

/// A source end whose peer claims to be the destination but sends packets
/// that are not the guest's: they must not reach segment A.
fn hostile_source_peer(topo: &Topology, conn: &mut Connected) {
    let ((a_tx, a_rx), (mut b_tx, b_rx)) = conn.stream(topo);
    let client = common::spawn_in(&topo.client.name, || {
        let s = UdpSocket::bind((CLIENT_IP, 9999)).expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(1500))).expect("timeout");
        s
    })
    .join()
    .expect("socket");
    let mut source = config(Role::Source { interface: "brA".into() });
    source.announce.count = 0;
    let ta = topo.a.run(async move { Tunnel::start(source, a_tx, a_rx).await.expect("source end") });
    let other = Ipv4Addr::new(10, 1, 1, 66);
    let mut bad_checksum = udp_packet(GUEST_IP, CLIENT_IP, 9999, b"corrupt");
    bad_checksum[10] ^= 0x55;
    let peer = topo.b.run(async move {
        send_packets(
            &mut b_tx,
            &[
                udp_packet(other, CLIENT_IP, 9999, b"spoofed"), // not from the guest
                udp_packet(GUEST_IP, GUEST_IP, 9999, b"loop"),  // to the guest itself
                udp_packet(GUEST_IP, Ipv4Addr::BROADCAST, 9999, b"bc"), // broadcast
                bad_checksum,
                udp_packet(GUEST_IP, CLIENT_IP, 9999, b"genuine"),
            ],
        )
        .await;
        (b_tx, b_rx)
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 100];
    while let Ok((n, from)) = client.recv_from(&mut buf) {
        got.push((from.ip(), buf[..n].to_vec()));
    }
    assert_eq!(got, vec![(std::net::IpAddr::from(GUEST_IP), b"genuine".to_vec())], "only the guest's packet arrives");
    let s = ta.status();
    print_status("source with a hostile peer", &s);
    assert_eq!((s.drops.peer_wrong_address, s.drops.peer_not_unicast, s.drops.peer_malformed), (2, 1, 1));
    assert_eq!(s.from_peer.packets, 1);
    ta.control().shutdown("test over").expect("shutdown");
    let f = topo.a.block_on(ta.wait());
    assert!(matches!(f.state, TunnelState::Closed { reason: CloseReason::Shutdown { .. } }), "{:?}", f.state);
    topo.b.run(async move { drop(peer) });
}

/// A destination end whose peer sends packets for other addresses: only the
/// guest's reach it, and the guest's answer comes back through the tunnel.
fn hostile_destination_peer(topo: &Topology, conn: &mut Connected) {
    let ((mut a_tx, a_rx), (b_tx, b_rx)) = conn.stream(topo);
    let mut destination = config(Role::Destination { interface: "pg".into() });
    destination.announce.count = 0;
    let tb = topo.b.run(async move { Tunnel::start(destination, b_tx, b_rx).await.expect("destination end") });
    let seen = topo.a.run(async move {
        send_packets(
            &mut a_tx,
            &[
                udp_packet(CLIENT_IP, Ipv4Addr::new(10, 1, 1, 66), 7000, b"for another host"),
                udp_packet(CLIENT_IP, Ipv4Addr::new(10, 1, 2, 1), 7000, b"for host B"),
                vec![0x45; 20], // a header that does not add up
                udp_packet(CLIENT_IP, GUEST_IP, 7000, b"echo me"),
            ],
        )
        .await;
        // The guest's echo comes back; then close.
        tokio::time::sleep(Duration::from_millis(500)).await;
        close_by_hand(a_tx, a_rx).await
    });
    let echoed = seen.iter().any(|m| match m {
        Message::TunnelPacket { packet } => {
            packet.ends_with(b"echo me") && packet[12..16] == GUEST_IP.octets() && packet[16..20] == CLIENT_IP.octets()
        }
        _ => false,
    });
    assert!(echoed, "the guest answered the genuine packet through the tunnel: {seen:?}");
    let f = topo.b.block_on(tb.wait());
    print_status("destination with a hostile peer", &f);
    assert_eq!((f.drops.peer_wrong_address, f.drops.peer_malformed), (2, 1));
    assert_eq!(f.from_peer.packets, 1);
    assert_eq!(f.state, TunnelState::Closed { reason: CloseReason::PeerClosed { reason: "test over".into() } });
}
