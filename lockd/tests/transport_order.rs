//! Real QUIC on loopback: three endpoints exchange pipelined messages in order, probe
//! round trips, and recover from a dropped connection.

use std::collections::BTreeMap;
use std::time::Duration;

use concord_lockd::transport::testing::LocalCluster;
use concord_lockd::transport::{Endpoint, PeerEvent, SendError};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Msg {
    Seq { from: u32, seq: u64, pad: Vec<u8> },
    Text(String),
}

const LIMIT: Duration = Duration::from_secs(60);

async fn wait_all_up(eps: &[Endpoint<Msg>]) {
    for ep in eps {
        for p in ep.peers() {
            tokio::time::timeout(LIMIT, ep.wait_up(p)).await.expect("peers come up").unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_peers_deliver_pipelined_messages_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = LocalCluster::create(dir.path(), "order", 3).unwrap();
    let eps: Vec<Endpoint<Msg>> = (1..=3).map(|n| cluster.bind(n).unwrap()).collect();
    wait_all_up(&eps).await;

    const N: u64 = 10_000;
    // Every node sends N messages to each other node without waiting for anything.
    for ep in &eps {
        for seq in 0..N {
            for to in ep.peers() {
                let pad = vec![seq as u8; (seq % 64) as usize];
                ep.send(to, Msg::Seq { from: ep.node(), seq, pad }).unwrap();
            }
        }
    }
    for ep in &eps {
        let mut next: BTreeMap<u32, u64> = ep.peers().into_iter().map(|p| (p, 0)).collect();
        let mut got = 0;
        while got < 2 * N {
            let (from, msg) =
                tokio::time::timeout(LIMIT, ep.recv()).await.expect("messages arrive").expect("endpoint open");
            let Msg::Seq { from: claimed, seq, pad } = msg else {
                panic!("unexpected {msg:?}");
            };
            assert_eq!(from, claimed, "sender id is the authenticated peer");
            let want = next.get_mut(&from).unwrap();
            assert_eq!(seq, *want, "per-peer FIFO order at node {}", ep.node());
            assert_eq!(pad, vec![seq as u8; (seq % 64) as usize]);
            *want += 1;
            got += 1;
        }
        assert!(ep.try_recv().is_none());
        let stats = ep.stats();
        assert_eq!(stats.messages_received, 2 * N);
        assert_eq!(stats.malformed_frames, 0);
        assert_eq!(stats.connections_refused, 0);
    }
    for ep in eps {
        ep.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtt_probe_measures_a_round_trip_and_self_send_loops_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = LocalCluster::create(dir.path(), "probe", 2).unwrap();
    let eps: Vec<Endpoint<Msg>> = (1..=2).map(|n| cluster.bind(n).unwrap()).collect();
    wait_all_up(&eps).await;
    for (ep, peer) in [(&eps[0], 2), (&eps[1], 1)] {
        for _ in 0..20 {
            let rtt = ep.rtt_probe(peer).await.unwrap();
            assert!(rtt < Duration::from_secs(5), "{rtt:?}");
        }
    }
    eps[0].send(1, Msg::Text("me".into())).unwrap();
    assert_eq!(eps[0].recv().await, Some((1, Msg::Text("me".into()))));
    assert_eq!(eps[0].send(7, Msg::Text("x".into())), Err(SendError::UnknownPeer(7)));
    assert!(eps[0].rtt_probe(7).await.is_err());
    for ep in eps {
        ep.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_connection_is_reported_and_reestablished() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = LocalCluster::create(dir.path(), "reconnect", 2).unwrap();
    let a: Endpoint<Msg> = cluster.bind(1).unwrap();
    let b: Endpoint<Msg> = cluster.bind(2).unwrap();
    assert_eq!(event(&a).await, PeerEvent::Up(2));
    assert_eq!(event(&b).await, PeerEvent::Up(1));

    // The acceptor (node 2) drops the connection; the dialer (node 1) redials.
    b.disconnect(1).unwrap();
    assert_eq!(event(&a).await, PeerEvent::Down(2));
    assert_eq!(event(&a).await, PeerEvent::Up(2));
    assert_eq!(event(&b).await, PeerEvent::Down(1));
    assert_eq!(event(&b).await, PeerEvent::Up(1));
    b.send(1, Msg::Text("after".into())).unwrap();
    assert_eq!(recv(&a).await, (2, Msg::Text("after".into())));
    assert_eq!(a.stats().connections_up, 2);

    // Node 2 stops; messages to it wait in node 1's queue and reach the restarted
    // node 2 (same address) once node 1 has redialed it.
    b.close().await;
    assert_eq!(event(&a).await, PeerEvent::Down(2));
    for i in 0..100 {
        a.send(2, Msg::Text(format!("queued {i}"))).unwrap();
    }
    let b: Endpoint<Msg> = rebind(&cluster, 2).await;
    assert_eq!(event(&a).await, PeerEvent::Up(2));
    for i in 0..100 {
        assert_eq!(recv(&b).await, (1, Msg::Text(format!("queued {i}"))));
    }
    a.close().await;
    b.close().await;
}

async fn event(ep: &Endpoint<Msg>) -> PeerEvent {
    tokio::time::timeout(LIMIT, ep.next_event()).await.expect("event in time").expect("endpoint open")
}

async fn recv(ep: &Endpoint<Msg>) -> (u32, Msg) {
    tokio::time::timeout(LIMIT, ep.recv()).await.expect("message in time").expect("endpoint open")
}

/// Binds `node` at its configured address, retrying while the closed endpoint's
/// socket is still being released by its driver task.
async fn rebind(cluster: &LocalCluster, node: u32) -> Endpoint<Msg> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Endpoint::bind(&cluster.config, node) {
            Ok(ep) => return ep,
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("rebind node {node}: {e}"),
        }
    }
}

/// Run by hand: `cargo test --release -p concord-lockd --test transport_order --
/// --ignored --nocapture`. Prints the raw QUIC round trip and pipelined message rates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark, run by hand"]
async fn bench_rtt_and_throughput() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = LocalCluster::create(dir.path(), "bench", 2).unwrap();
    let eps: Vec<Endpoint<Msg>> = (1..=2).map(|n| cluster.bind(n).unwrap()).collect();
    wait_all_up(&eps).await;
    let mut rtts = Vec::new();
    for _ in 0..2000 {
        rtts.push(eps[0].rtt_probe(2).await.unwrap());
    }
    rtts.sort();
    println!("rtt_probe: p50 {:?} p99 {:?}", rtts[rtts.len() / 2], rtts[rtts.len() * 99 / 100]);
    // Message ping-pong: one message each way, waited for.
    let mut pp = Vec::new();
    for seq in 0..2000 {
        let start = std::time::Instant::now();
        eps[0].send(2, Msg::Seq { from: 1, seq, pad: vec![] }).unwrap();
        let (_, m) = eps[1].recv().await.unwrap();
        eps[1].send(1, m).unwrap();
        eps[0].recv().await.unwrap();
        pp.push(start.elapsed());
    }
    pp.sort();
    println!("message ping-pong: p50 {:?}", pp[pp.len() / 2]);
    const N: u64 = 200_000;
    let start = std::time::Instant::now();
    let mut seq = 0;
    let mut got = 0;
    while got < N {
        while seq < N {
            match eps[0].send(2, Msg::Seq { from: 1, seq, pad: vec![0; 32] }) {
                Ok(()) => seq += 1,
                Err(SendError::QueueFull(_)) => break,
                Err(e) => panic!("{e}"),
            }
        }
        while let Some(_m) = eps[1].try_recv() {
            got += 1;
        }
        tokio::task::yield_now().await;
    }
    let secs = start.elapsed().as_secs_f64();
    println!("pipelined one-way: {:.0} messages/s", N as f64 / secs);
    for ep in eps {
        ep.close().await;
    }
}

/// A raw QUIC client holding node `as_node`'s certificate, which completes the hello
/// with node `to` (standing in for a peer process that crashed and restarted).
async fn raw_peer(
    cluster: &LocalCluster,
    client: &quinn::Endpoint,
    as_node: u32,
    to: u32,
) -> (quinn::Connection, quinn::SendStream) {
    use concord_lockd::transport::frame::{Frame, FrameKind, Hello, PROTOCOL_VERSION};
    let addr = cluster.config.node(to).unwrap().addr;
    let conn = client.connect(addr, &concord_lockd::tls::node_dns_name(to)).unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let hello = Hello { protocol: PROTOCOL_VERSION, cluster: cluster.config.cluster_name.clone(), from: as_node, to };
    send.write_all(&Frame::encode_value(FrameKind::Hello, &hello).unwrap()).await.unwrap();
    let mut reply = [0u8; 64];
    let n = recv.read(&mut reply).await.unwrap().unwrap();
    Frame::decode(&reply[..n]).unwrap();
    (conn, send)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_connection_from_a_restarted_peer_replaces_the_old_one() {
    use concord_lockd::transport::frame::{Frame, FrameKind};
    use concord_lockd::transport::CLOSE_REPLACED;
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = LocalCluster::create(dir.path(), "replace", 2).unwrap();
    let b: Endpoint<Msg> = cluster.bind(2).unwrap();
    let id1 = concord_lockd::tls::NodeIdentity::from_config(&cluster.config, 1).unwrap();
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(concord_lockd::tls::client_config(&id1).unwrap()).unwrap();
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));

    let (old, _old_send) = raw_peer(&cluster, &client, 1, 2).await;
    assert_eq!(event(&b).await, PeerEvent::Up(1));
    // The "restarted" node 1 connects again without the old connection being closed.
    let (new, mut new_send) = raw_peer(&cluster, &client, 1, 2).await;
    match tokio::time::timeout(LIMIT, old.closed()).await.unwrap() {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, quinn::VarInt::from(CLOSE_REPLACED))
        }
        e => panic!("old connection: {e}"),
    }
    assert_eq!(event(&b).await, PeerEvent::Down(1));
    assert_eq!(event(&b).await, PeerEvent::Up(1));
    let frame = Frame::encode_value(FrameKind::Message, &Msg::Text("new".into())).unwrap();
    new_send.write_all(&frame).await.unwrap();
    assert_eq!(recv(&b).await, (1, Msg::Text("new".into())));
    new.close(0u32.into(), b"done");
    client.wait_idle().await;
    b.close().await;
}
