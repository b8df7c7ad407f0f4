//! Loopback tests of the pinned mutual TLS and the framed streams.

use std::net::SocketAddr;
use std::time::Duration;

use wanmig_wire::{Message, PageData, PageRef, PagesBuilder};

use crate::*;

fn ids() -> (Identity, Identity) {
    (Identity::generate("src").expect("gen").0, Identity::generate("dst").expect("gen").0)
}

fn local() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_peers_exchange_frames() {
    let (src, dst) = ids();
    let mut listener = Listener::bind(local(), &dst, &[src.fingerprint()], LinkTuning::default()).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        let mut conn = listener.accept().await.expect("a connection");
        let (mut tx, mut rx) = conn.accept_control().await.expect("control");
        let hello = rx.recv().await.expect("recv").expect("a frame");
        tx.send(&Message::Accept { features: 0, chunking: wanmig_wire::ChunkParams::DEFAULT, based: Vec::new() })
            .await
            .expect("send");
        let mut bulk = conn.accept_bulk().await.expect("bulk");
        let mut pages = 0;
        while let Some(m) = bulk.recv().await.expect("bulk frame") {
            if let Message::Pages(p) = m {
                pages += p.len();
            }
        }
        (hello, pages)
    });
    let mut conn = connect(addr, &src, &[dst.fingerprint()], LinkTuning::default()).await.expect("connect");
    let (mut tx, mut rx) = conn.open_control().await.expect("control");
    tx.send(&Message::Abort { reason: "hello stand-in".into() }).await.expect("send");
    assert_eq!(
        rx.recv().await.expect("recv"),
        Some(Message::Accept { features: 0, chunking: wanmig_wire::ChunkParams::DEFAULT, based: Vec::new() })
    );
    let mut bulk = conn.open_bulk().await.expect("bulk");
    let page = [1u8; 4096];
    for round in 0..20 {
        let mut b = PagesBuilder::new(round);
        for i in 0..256 {
            b.push(PageRef { gpa: i * 4096, data: PageData::Raw(&page) });
        }
        bulk.send(&Message::Pages(b.finish())).await.expect("send pages");
    }
    bulk.finish().await.expect("finish");
    let (hello, pages) = server.await.expect("server task");
    assert_eq!(hello, Message::Abort { reason: "hello stand-in".into() });
    assert_eq!(pages, 20 * 256);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpinned_peers_are_refused_on_both_sides() {
    let (src, dst) = ids();
    let (stranger, _, _) = Identity::generate("stranger").expect("gen");
    // The destination does not know this source.
    let mut listener = Listener::bind(local(), &dst, &[stranger.fingerprint()], LinkTuning::default()).expect("bind");
    let addr = listener.local_addr().expect("addr");
    // TLS 1.3: the client's handshake completes before the server checks
    // the client certificate, so the refusal shows at the first exchange.
    let err = async {
        let mut conn = connect(addr, &src, &[dst.fingerprint()], LinkTuning::default()).await?;
        let (mut tx, mut rx) = conn.open_control().await?;
        tx.send(&Message::Ready).await?;
        rx.recv().await
    }
    .await
    .expect_err("refused");
    assert!(err.to_string().contains("refused our certificate"), "{err}");
    let accepted = tokio::time::timeout(std::time::Duration::from_millis(300), listener.accept()).await;
    assert!(accepted.is_err(), "an unpinned source got a connection");
    assert_eq!(listener.take_refusal(), Some(src.fingerprint()));

    // The source does not know this destination.
    let listener = Listener::bind(local(), &dst, &[src.fingerprint()], LinkTuning::default()).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let err = connect(addr, &src, &[stranger.fingerprint()], LinkTuning::default()).await.expect_err("refused");
    assert!(matches!(err, TransportError::PeerNotPinned(fp) if fp == dst.fingerprint()), "{err}");
}

#[test]
fn fingerprints_parse_and_identities_persist() {
    let dir = tempfile::tempdir().expect("tempdir");
    let id = Identity::create(dir.path(), "host").expect("create");
    let back = Identity::load(dir.path()).expect("load");
    assert_eq!(id.fingerprint(), back.fingerprint());
    let text = id.fingerprint().to_string();
    assert_eq!(text.parse::<Fingerprint>().expect("parse"), id.fingerprint());
    assert!("abc".parse::<Fingerprint>().is_err());
    assert!("zz".repeat(32).parse::<Fingerprint>().is_err());
    assert!(Identity::create(dir.path(), "host").is_err(), "an existing key is never overwritten");
    assert_eq!(LinkTuning::default().window(), 25_000_000);
    assert_eq!(LinkTuning::default().socket_buffer(), 25_000_000);
    let lan = LinkTuning { rtt: Duration::from_millis(1), ..LinkTuning::default() };
    assert_eq!((lan.window(), lan.socket_buffer()), (4 << 20, 4 << 20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alives_hold_an_idle_connection_past_its_idle_timeout() {
    let (src, dst) = ids();
    // 500 ms of silence would end the connection; it stays idle for 2.5 s.
    let tuning = LinkTuning { idle_timeout: Duration::from_millis(500), ..LinkTuning::default() };
    let mut listener = Listener::bind(local(), &dst, &[src.fingerprint()], tuning).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        let mut conn = listener.accept().await.expect("a connection");
        let (mut tx, mut rx) = conn.accept_control().await.expect("control");
        // Echo until the stream ends.
        while let Some(m) = rx.recv().await.expect("the idle connection survived at the destination") {
            tx.send(&m).await.expect("send");
        }
    });
    let mut conn = connect(addr, &src, &[dst.fingerprint()], tuning).await.expect("connect");
    let (mut tx, mut rx) = conn.open_control().await.expect("control");
    for round in 0..2 {
        tx.send(&Message::Ready).await.expect("send");
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(2)).await.expect("the idle connection survived"),
            Some(Message::Ready),
            "round {round}"
        );
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
    tx.finish().await.expect("finish");
    server.await.expect("server task");
}

#[test]
fn a_zero_idle_timeout_is_refused() {
    let (_, dst) = ids();
    let tuning = LinkTuning { idle_timeout: Duration::ZERO, ..LinkTuning::default() };
    let err = Listener::bind(local(), &dst, &[], tuning).expect_err("zero idle timeout");
    assert!(err.to_string().contains("idle timeout"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_knows_which_pinned_peer_connected() {
    let (a, dst) = ids();
    let (b, _, _) = Identity::generate("b").expect("gen");
    let mut listener =
        Listener::bind(local(), &dst, &[a.fingerprint(), b.fingerprint()], LinkTuning::default()).expect("bind");
    let addr = listener.local_addr().expect("addr");
    for who in [&b, &a] {
        let mut conn = connect(addr, who, &[dst.fingerprint()], LinkTuning::default()).await.expect("connect");
        assert_eq!(conn.peer_fingerprint(), None, "a client does not record it");
        let (mut tx, _rx) = conn.open_control().await.expect("control");
        tx.send(&Message::Ready).await.expect("send");
        let mut accepted = listener.accept().await.expect("accepted");
        let (_tx, mut rx) = accepted.accept_control().await.expect("control");
        assert_eq!(rx.recv().await.expect("recv"), Some(Message::Ready));
        assert_eq!(accepted.peer_fingerprint(), Some(who.fingerprint()));
    }
}
