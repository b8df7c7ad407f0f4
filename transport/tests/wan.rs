//! Connections across the WAN link emulator (`wanmig-linkem`): a 5 s
//! outage is survived when the idle timeout is longer (with either
//! congestion controller; a frame sent into the outage is delivered and
//! answered once the link is back), and kills the connection (at both
//! ends, one idle timeout after the cut) when it is shorter. Needs root
//! (network namespaces).
//!
//! After the outage, the frame comes back when QUIC's next probe goes out,
//! and its probe timeout has doubled at each unanswered probe: seen here
//! (debug build) from 135 ms to 5.3 s after the link was back for the 5 s
//! outage, and 9.8 s and 10.4 s for a 12 s one (idle timeout 40 s, a
//! one-off run).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use wanmig_linkem::{Direction, LinkConfig, LinkParams, NsRuntime, WanPair};
use wanmig_transport::{
    CongestionControl, Conn, FrameReceiver, FrameSender, Identity, LinkTuning, Listener, TransportError, connect,
};
use wanmig_wire::Message;

const OUTAGE: Duration = Duration::from_secs(5);

fn need_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "these tests create network namespaces and TAP devices: run them as root");
}

/// How the destination's echo loop ended, and when.
type EchoEnd = (Result<(), TransportError>, Instant);

/// A source in A and a destination in B, 100 Mbit/s with 50 ms RTT, one
/// control stream open; the destination echoes every frame until the
/// stream or the connection ends.
struct Setup {
    // Drop order: the runtimes (and the connections on them) before the
    // namespaces.
    a: NsRuntime,
    b: NsRuntime,
    pair: WanPair,
}

/// The source's end of the control stream.
struct Source {
    tx: FrameSender,
    rx: FrameReceiver,
    // The connection outlives its streams.
    _conn: Conn,
}

fn setup(tag: &str, tuning: LinkTuning) -> (Setup, Source, tokio::task::JoinHandle<EchoEnd>) {
    let link = LinkParams::wan(100_000_000, Duration::from_millis(50));
    let pair = WanPair::new(tag, LinkConfig::symmetric(link)).expect("topology");
    let (a, b) = (pair.a().runtime(1).expect("runtime"), pair.b().runtime(1).expect("runtime"));
    let (src, dst) = (Identity::generate("src").expect("id").0, Identity::generate("dst").expect("id").0);
    let (src_fp, dst_fp) = (src.fingerprint(), dst.fingerprint());
    let addr = SocketAddr::from((pair.addr_b(), 4750));
    let mut listener = b.run(async move { Listener::bind(addr, &dst, &[src_fp], tuning).expect("listen") });
    let echo = b.spawn(async move {
        let mut conn = listener.accept().await.expect("a connection");
        let (mut tx, mut rx) = conn.accept_control().await.expect("control");
        let end = async {
            while let Some(m) = rx.recv().await? {
                tx.send(&m).await?;
            }
            Ok(())
        }
        .await;
        (end, Instant::now())
    });
    let source = a.run(async move {
        let mut conn = connect(addr, &src, &[dst_fp], tuning).await.expect("connect");
        let (mut tx, mut rx) = conn.open_control().await.expect("control");
        tx.send(&Message::Ready).await.expect("send");
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).await.expect("echo"), Some(Message::Ready));
        Source { tx, rx, _conn: conn }
    });
    (Setup { a, b, pair }, source, echo)
}

/// Cuts the link for OUTAGE and sends a frame into it; returns what became
/// of its echo (waiting up to `wait`), when the link came back, and when
/// the echo arrived or the wait failed.
fn outage_with_a_frame_in_flight(
    s: &Setup,
    mut src: Source,
    wait: Duration,
) -> (Result<Option<Message>, TransportError>, Instant, Instant, Source) {
    let cut = Instant::now();
    s.pair.control().outage_for(OUTAGE);
    let msg = Message::Abort { reason: "sent into the outage".into() };
    s.a.run(async move {
        let got = async {
            src.tx.send(&msg).await?;
            src.rx.recv_timeout(wait).await
        }
        .await;
        (got, cut + OUTAGE, Instant::now(), src)
    })
}

fn tuning(idle_timeout: Duration, congestion: CongestionControl) -> LinkTuning {
    LinkTuning { bandwidth_bps: 100_000_000, rtt: Duration::from_millis(50), idle_timeout, congestion }
}

#[test]
fn a_connection_survives_an_outage_shorter_than_its_idle_timeout() {
    need_root();
    for (tag, congestion) in [("long1", CongestionControl::Cubic), ("long2", CongestionControl::Bbr)] {
        let (s, src, echo) = setup(tag, tuning(Duration::from_secs(15), congestion));
        let (got, up, at, mut src) = outage_with_a_frame_in_flight(&s, src, Duration::from_secs(25));
        let got = got.unwrap_or_else(|e| panic!("{congestion:?}: the connection died in a 5 s outage: {e}"));
        assert_eq!(got, Some(Message::Abort { reason: "sent into the outage".into() }), "{congestion:?}");
        assert!(at >= up, "{congestion:?}: an echo crossed a link that was down");
        println!("{congestion:?}: the frame sent into the outage came back {:?} after the link did", at - up);
        // QUIC's probe timeout doubles each time it fires unanswered, so
        // the first probe after the link is back comes up to about the
        // outage's length (plus one probe timeout) later.
        let bound = OUTAGE + Duration::from_secs(1);
        assert!(at - up <= bound, "{congestion:?}: traffic resumed only {:?} after the link did", at - up);
        // And the connection is as good as before.
        let rtt = s.a.run(async move {
            let t = Instant::now();
            src.tx.send(&Message::Ready).await.expect("send after the outage");
            let m = src.rx.recv_timeout(Duration::from_secs(5)).await.expect("echo after the outage");
            assert_eq!(m, Some(Message::Ready));
            let rtt = t.elapsed();
            src.tx.finish().await.expect("finish");
            rtt
        });
        assert!(rtt < Duration::from_secs(1), "{congestion:?}: a round trip after the outage took {rtt:?}");
        let (end, _) = s.b.block_on(echo).expect("echo task");
        end.expect("the destination's end survived");
        let c = s.pair.counters(Direction::AtoB);
        assert!(c.dropped_down > 0, "the outage dropped nothing: {c:?}");
    }
}

#[test]
fn a_connection_dies_of_an_outage_longer_than_its_idle_timeout() {
    need_root();
    let idle = Duration::from_secs(2);
    let (s, src, echo) = setup("short", tuning(idle, CongestionControl::Cubic));
    let cut = Instant::now();
    let (got, up, at, mut src) = outage_with_a_frame_in_flight(&s, src, Duration::from_secs(25));
    match &got {
        Err(TransportError::Lost(why)) => assert!(why.contains("idle"), "died, but not of its idle timer: {why}"),
        other => panic!("the connection outlived a 5 s outage with a 2 s idle timeout: {other:?}"),
    }
    // It died of its idle timer within the outage, about `idle` after the
    // last packet it received (just before the cut).
    assert!(at < up, "it died only {:?} after the link came back", at - up);
    assert!(at - cut >= idle - Duration::from_millis(100), "it died {:?} into the outage", at - cut);
    println!("the source's end died {:?} into the outage", at - cut);
    let (end, died) = s.b.block_on(echo).expect("echo task");
    assert!(end.is_err(), "the destination's end of a dead connection ended cleanly");
    assert!(died < up, "the destination noticed only {:?} after the link came back", died - up);
    // Nothing comes back to life with the link.
    std::thread::sleep(up.saturating_duration_since(Instant::now()) + Duration::from_millis(200));
    let after = s.a.run(async move {
        let sent = src.tx.send(&Message::Ready).await;
        (sent.is_err(), src.rx.recv_timeout(Duration::from_secs(2)).await)
    });
    assert!(after.0 || after.1.is_err(), "a dead connection carried a frame: {:?}", after.1);
}
