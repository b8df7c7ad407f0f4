//! The test topology, shared by the namespace test and the benchmark.
//!
//! ```text
//!   client (10.1.1.10/24)            guest (10.1.1.5/24, gw 10.1.1.1, MAC 52:54:00:12:34:56)
//!      │ eth0                            │ eth0
//!      │ pc                              │ pg   (a port of brA; at cutover moved to brB in hostB)
//!   hostA: brA 10.1.1.1/24            hostB: brB 10.1.2.1/24
//!          wan 10.1.9.1/30 ════ link emulator ════ wan 10.1.9.2/30
//! ```
//!
//! Optionally a second guest `guest2` (10.1.2.7/24, gw 10.1.2.1) on brB,
//! reached from the client by ordinary routing over the same link: the
//! direct path the benchmark compares the tunnel with.
//!
//! Namespaces are named after the process and a tag, and deleted on drop
//! (which takes every interface in them along).

#![allow(dead_code)] // each user takes what it needs

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

pub use wanmig_linkem::NsRuntime as HostRuntime;
use wanmig_linkem::{LinkConfig, LinkEmulator, LinkParams, enter_netns};
use wanmig_transport::{FrameReceiver, FrameSender, Identity, LinkTuning, Listener, connect};
use wanmig_tunnel::MacAddr;

pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 5);
pub const GUEST_MAC: &str = "52:54:00:12:34:56";
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 10);
pub const GUEST2_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 2, 7);
pub const HOST_B_WAN: Ipv4Addr = Ipv4Addr::new(10, 1, 9, 2);

pub fn guest_mac() -> MacAddr {
    GUEST_MAC.parse().expect("MAC")
}

/// A network namespace (`wanmig_linkem::Netns`), deleted on drop; its
/// helpers fail loudly.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
    inner: wanmig_linkem::Netns,
}

impl Netns {
    pub fn new(name: String) -> Netns {
        let inner = wanmig_linkem::Netns::new(&name).unwrap_or_else(|e| panic!("namespace {name}: {e}"));
        Netns { name, inner }
    }

    /// `ip -n NAME args`.
    pub fn ip(&self, args: &str) {
        self.inner.ip(args).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        self.inner.sysctl(key, value).unwrap_or_else(|e| panic!("{e}"));
    }

    /// A one-worker tokio runtime whose threads live in the namespace.
    pub fn runtime(&self) -> HostRuntime {
        self.inner.runtime(1).unwrap_or_else(|e| panic!("{e}"))
    }
}

/// Spawns a thread inside namespace `ns`.
pub fn spawn_in<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter_netns(&ns).expect("enter the namespace");
        f()
    })
}

/// The namespaces, the link between the hosts, and a runtime per host.
pub struct Topology {
    pub client: Netns,
    pub guest: Netns,
    pub guest2: Option<Netns>,
    pub host_a: Netns,
    pub host_b: Netns,
    pub a: HostRuntime,
    pub b: HostRuntime,
    pub link: Option<LinkEmulator>,
}

impl Topology {
    /// Builds it all, the guest on hostA's bridge.
    pub fn build(tag: &str, link: LinkParams, with_guest2: bool) -> Topology {
        let pid = std::process::id();
        let ns = |n: &str| Netns::new(format!("wmt{pid}{tag}-{n}"));
        let (client, guest, host_a, host_b) = (ns("client"), ns("guest"), ns("hostA"), ns("hostB"));
        let guest2 = with_guest2.then(|| ns("guest2"));
        for h in [&host_a, &host_b] {
            h.sysctl("net.ipv4.ip_forward", "1");
            h.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
        }
        // Bridges with fixed MACs: a bridge otherwise takes its ports' lowest
        // MAC, which changes when the guest's port leaves.
        host_a.ip("link add brA address 02:00:00:00:0a:01 type bridge");
        host_a.ip("addr add 10.1.1.1/24 dev brA");
        host_a.ip("link set brA up");
        host_b.ip("link add brB address 02:00:00:00:0b:01 type bridge");
        host_b.ip("addr add 10.1.2.1/24 dev brB");
        host_b.ip("link set brB up");

        client.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
        client.ip(&format!("link add eth0 type veth peer name pc netns {}", host_a.name));
        client.ip("addr add 10.1.1.10/24 dev eth0");
        client.ip("link set eth0 up");
        client.ip("route add 10.1.2.0/24 via 10.1.1.1");
        host_a.ip("link set pc master brA up");

        guest.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
        guest.ip(&format!("link add eth0 address {GUEST_MAC} type veth peer name pg netns {}", host_a.name));
        guest.ip("addr add 10.1.1.5/24 dev eth0");
        guest.ip("link set eth0 up");
        guest.ip("route add default via 10.1.1.1");
        // A VM keeps its neighbour cache when it moves; a veth would flush it
        // on the carrier loss of the move unless told not to.
        guest.sysctl("net.ipv4.conf.eth0.arp_evict_nocarrier", "0");
        host_a.ip("link set pg master brA up");

        if let Some(g2) = &guest2 {
            g2.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
            g2.ip(&format!("link add eth0 type veth peer name pg2 netns {}", host_b.name));
            g2.ip("addr add 10.1.2.7/24 dev eth0");
            g2.ip("link set eth0 up");
            g2.ip("route add default via 10.1.2.1");
            host_b.ip("link set pg2 master brB up");
        }

        let emu = LinkEmulator::start(&host_a.name, "wan", &host_b.name, "wan", LinkConfig::symmetric(link))
            .expect("link emulator");
        host_a.ip("addr add 10.1.9.1/30 dev wan");
        host_a.ip("link set wan up");
        host_b.ip("addr add 10.1.9.2/30 dev wan");
        host_b.ip("link set wan up");
        // Subnet B behind hostB, for the direct path (hostB already routes
        // 10.1.1.0/24 nowhere: the guest's subnet is not at B).
        host_a.ip("route add 10.1.2.0/24 via 10.1.9.2");
        host_b.ip("route add 10.1.1.10/32 via 10.1.9.1");

        let a = host_a.runtime();
        let b = host_b.runtime();
        Topology { client, guest, guest2, host_a, host_b, a, b, link: Some(emu) }
    }

    /// Moves the guest's port from hostA's bridge to hostB's.
    pub fn move_guest(&self) {
        self.host_a.ip(&format!("link set pg netns {}", self.host_b.name));
        self.host_b.ip("link set pg master brB up");
    }

    /// A QUIC connection from hostA to hostB over the emulated link, and one
    /// bidirectional stream of it: (hostA's pair, hostB's pair).
    pub fn connect(&self) -> Connected {
        let (src, dst) = (Identity::generate("hostA").expect("id").0, Identity::generate("hostB").expect("id").0);
        let (src_fp, dst_fp) = (src.fingerprint(), dst.fingerprint());
        let tuning = LinkTuning { rtt: Duration::from_millis(50), ..LinkTuning::default() };
        let listener = self
            .b
            .run(async move { Listener::bind((HOST_B_WAN, 4750).into(), &dst, &[src_fp], tuning).expect("listen") });
        let accept = self.b.spawn(async move {
            let mut listener = listener;
            let conn = listener.accept().await.expect("a connection");
            (listener, conn)
        });
        let conn_a = self
            .a
            .run(async move { connect((HOST_B_WAN, 4750).into(), &src, &[dst_fp], tuning).await.expect("connect") });
        let (listener, conn_b) = self.b.block_on(accept).expect("accept task");
        Connected { a: Some(conn_a), b: Some(conn_b), _listener: listener }
    }
}

/// Both ends of the hosts' connection.
pub struct Connected {
    pub a: Option<wanmig_transport::Conn>,
    pub b: Option<wanmig_transport::Conn>,
    _listener: Listener,
}

pub type Pair = (FrameSender, FrameReceiver);

impl Connected {
    /// A new bidirectional stream: hostA's end, hostB's end. hostA opens it
    /// and sends one keepalive so that hostB sees it.
    pub fn stream(&mut self, topo: &Topology) -> (Pair, Pair) {
        let mut ca = self.a.take().expect("conn");
        let mut cb = self.b.take().expect("conn");
        let (ca, pa) = topo.a.run(async move {
            let (mut tx, rx) = ca.open_control().await.expect("open");
            tx.send(&wanmig_wire::Message::TunnelKeepalive).await.expect("send");
            (ca, (tx, rx))
        });
        let (cb, pb) = topo.b.run(async move {
            let (tx, mut rx) = cb.accept_control().await.expect("accept");
            let first = rx.recv().await.expect("recv");
            assert_eq!(first, Some(wanmig_wire::Message::TunnelKeepalive));
            (cb, (tx, rx))
        });
        self.a = Some(ca);
        self.b = Some(cb);
        (pa, pb)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // The emulator's threads first, then the namespaces (fields drop in order).
        self.link.take();
    }
}

/// A flag threads poll to stop.
#[derive(Clone, Default)]
pub struct Stop(Arc<AtomicBool>);

impl Stop {
    pub fn stop(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
    pub fn stopped(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
    /// Stops the threads when dropped, a failed assertion included.
    pub fn guard(&self) -> StopOnDrop {
        StopOnDrop(self.clone())
    }
}

pub struct StopOnDrop(Stop);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// UDP and TCP echo services in namespace `ns` on `ip`: UDP 7000, TCP 7001.
pub fn echo_services(ns: &str, ip: Ipv4Addr, stop: &Stop) -> Vec<JoinHandle<()>> {
    let udp = {
        let stop = stop.clone();
        spawn_in(ns, move || {
            let s = std::net::UdpSocket::bind((ip, 7000)).expect("bind udp");
            s.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
            let mut buf = [0u8; 2048];
            while !stop.stopped() {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(&buf[..n], from);
                }
            }
        })
    };
    let tcp = {
        let stop = stop.clone();
        spawn_in(ns, move || {
            let l = std::net::TcpListener::bind((ip, 7001)).expect("bind tcp");
            l.set_nonblocking(true).expect("nonblocking");
            let mut conns = Vec::new();
            while !stop.stopped() {
                match l.accept() {
                    Ok((mut c, _)) => {
                        let stop = stop.clone();
                        conns.push(std::thread::spawn(move || {
                            use std::io::{Read, Write};
                            c.set_nonblocking(false).expect("blocking");
                            c.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
                            let mut buf = vec![0u8; 256 << 10];
                            while !stop.stopped() {
                                match c.read(&mut buf) {
                                    Ok(0) => return,
                                    Ok(n) => {
                                        if c.write_all(&buf[..n]).is_err() {
                                            return;
                                        }
                                    }
                                    Err(e)
                                        if matches!(
                                            e.kind(),
                                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                        ) => {}
                                    Err(_) => return,
                                }
                            }
                        }));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            for c in conns {
                let _ = c.join();
            }
        })
    };
    vec![udp, tcp]
}
