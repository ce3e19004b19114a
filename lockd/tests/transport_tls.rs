//! Real QUIC on loopback: only certificates from the cluster CA, naming the node the
//! peer claims to be, get a connection.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use concord_lockd::tls::{self, NodeIdentity, TlsError};
use concord_lockd::transport::frame::{Frame, FrameKind, Hello, PROTOCOL_VERSION};
use concord_lockd::transport::testing::LocalCluster;
use concord_lockd::transport::{Endpoint, PeerEvent, TransportError, CLOSE_REFUSED};

const LIMIT: Duration = Duration::from_secs(60);

type Msg = (u32, u64);

/// A copy of node `node`'s TLS files in a fresh folder: its key and certificate from
/// `from_dir`, the CA certificate from `ca_dir`.
fn tls_dir(dir: &Path, node: u32, from_dir: &Path, as_node: u32, ca_dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(ca_dir.join("ca.crt"), dir.join("ca.crt")).unwrap();
    std::fs::copy(from_dir.join(tls::node_cert_file(node)), dir.join(tls::node_cert_file(as_node))).unwrap();
    std::fs::copy(from_dir.join(tls::node_key_file(node)), dir.join(tls::node_key_file(as_node))).unwrap();
}

/// A CA unrelated to the cluster's, with certificates for nodes 1..=4.
fn foreign_ca(dir: &Path) {
    tls::ca_init(dir, "intruders", false).unwrap();
    for n in 1..=4 {
        tls::ca_issue(dir, n, false).unwrap();
    }
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The legitimate endpoints exchange messages; nothing from `stranger` arrives and no
/// connection to it comes up.
async fn legit_traffic_flows(legit: &[&Endpoint<Msg>], stranger: u32) {
    for a in legit {
        for b in legit {
            if a.node() != b.node() {
                a.send(b.node(), (a.node(), 7)).unwrap();
            }
        }
    }
    for b in legit {
        for _ in 0..legit.len() - 1 {
            let (from, msg) = tokio::time::timeout(LIMIT, b.recv()).await.unwrap().unwrap();
            assert_ne!(from, stranger);
            assert_eq!(msg, (from, 7));
        }
        while let Some(e) = b.try_next_event() {
            assert_ne!(e, PeerEvent::Up(stranger), "node {} accepted the stranger", b.node());
        }
        assert!(!b.is_up(stranger));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_with_foreign_ca_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = LocalCluster::create(dir.path(), "alpha", 4).unwrap();
    let foreign = dir.path().join("foreign");
    foreign_ca(&foreign);
    // Node 4 (which nodes 1..3 dial) has a certificate and root from another CA.
    let mut cfg4 = cluster.config.clone();
    cfg4.tls_dir = dir.path().join("stranger");
    tls_dir(&cfg4.tls_dir, 4, &foreign, 4, &foreign);
    let mut opts4 = cluster.options(4);
    opts4.backoff_max = Duration::from_millis(50);
    let stranger: Endpoint<Msg> = Endpoint::bind_with(&cfg4, 4, opts4).unwrap();
    let legit: Vec<Endpoint<Msg>> = (1..=3).map(|n| cluster.bind(n).unwrap()).collect();
    for n in 1..=3 {
        stranger.send(n, (4, 666)).unwrap();
    }
    // Every legitimate dialer tried node 4 and refused its certificate.
    wait_until("dialers to refuse node 4", || legit.iter().all(|e| e.stats().connections_refused >= 1)).await;
    let refs: Vec<&Endpoint<Msg>> = legit.iter().collect();
    legit_traffic_flows(&refs, 4).await;
    for p in 1..=3 {
        assert!(!stranger.is_up(p));
    }
    assert!(stranger.try_recv().is_none());
    assert_eq!(stranger.stats().connections_up, 0);
    stranger.close().await;
    for ep in legit {
        ep.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_with_foreign_ca_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = LocalCluster::create(dir.path(), "alpha", 3).unwrap();
    let foreign = dir.path().join("foreign");
    foreign_ca(&foreign);
    // Node 1 (which dials 2 and 3) trusts the cluster CA but has a foreign certificate:
    // the servers' client verification must refuse it.
    let mut cfg1 = cluster.config.clone();
    cfg1.tls_dir = dir.path().join("stranger");
    tls_dir(&cfg1.tls_dir, 1, &foreign, 1, &cluster.config.tls_dir);
    let mut opts1 = cluster.options(1);
    opts1.backoff_max = Duration::from_millis(50);
    let stranger: Endpoint<Msg> = Endpoint::bind_with(&cfg1, 1, opts1).unwrap();
    let legit: Vec<Endpoint<Msg>> = (2..=3).map(|n| cluster.bind(n).unwrap()).collect();
    stranger.send(2, (1, 666)).unwrap();
    stranger.send(3, (1, 666)).unwrap();
    wait_until("servers to refuse node 1", || legit.iter().all(|e| e.stats().connections_refused >= 1)).await;
    let refs: Vec<&Endpoint<Msg>> = legit.iter().collect();
    legit_traffic_flows(&refs, 1).await;
    assert_eq!(stranger.stats().connections_up, 0);
    stranger.close().await;
    for ep in legit {
        ep.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_claiming_another_nodes_id_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = LocalCluster::create(dir.path(), "alpha", 4).unwrap();
    // Nodes 2 and 3 are configured but not running; 1 and 4 are.
    let one: Endpoint<Msg> = cluster.bind(1).unwrap();
    let four: Endpoint<Msg> = cluster.bind(4).unwrap();
    tokio::time::timeout(LIMIT, one.wait_up(4)).await.unwrap().unwrap();
    // Node 4 sees the connection up on its own side a little later.
    tokio::time::timeout(LIMIT, four.wait_up(1)).await.unwrap().unwrap();
    while four.try_next_event().is_some() {}
    let addr4 = cluster.config.node(4).unwrap().addr;

    // A client holding node 3's (valid, cluster-signed) certificate says it is node 2.
    let id3 = NodeIdentity::from_config(&cluster.config, 3).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls::client_config(&id3).unwrap()).unwrap();
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let hello = |from: u32| Hello { protocol: PROTOCOL_VERSION, cluster: "alpha".into(), from, to: 4 };
    let conn = client.connect(addr4, &tls::node_dns_name(4)).unwrap().await.unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&Frame::encode_value(FrameKind::Hello, &hello(2)).unwrap()).await.unwrap();
    let _ = send.write_all(&Frame::encode_value(FrameKind::Message, &(2u32, 666u64)).unwrap()).await;
    match tokio::time::timeout(LIMIT, conn.closed()).await.unwrap() {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, quinn::VarInt::from(CLOSE_REFUSED));
            let reason = String::from_utf8_lossy(&c.reason).to_string();
            assert!(reason.contains("certificate names node 3"), "{reason}");
        }
        e => panic!("expected a refusal, got {e}"),
    }
    assert_eq!(four.stats().connections_refused, 1);
    assert!(!four.is_up(2) && !four.is_up(3));
    // Nothing about node 2 or 3 (the connection with node 1 may come and go on a
    // loaded machine; that is not this test's business).
    while let Some(ev) = four.try_next_event() {
        assert!(matches!(ev, PeerEvent::Up(1) | PeerEvent::Down(1)), "unexpected {ev:?}");
    }

    // Control: the same certificate, honestly claiming node 3, is accepted.
    let conn = client.connect(addr4, &tls::node_dns_name(4)).unwrap().await.unwrap();
    let (mut send, recv) = conn.open_bi().await.unwrap();
    send.write_all(&Frame::encode_value(FrameKind::Hello, &hello(3)).unwrap()).await.unwrap();
    let mut recv = tokio::io::BufReader::new(recv);
    let mut head = [0u8; 64];
    let n = tokio::time::timeout(LIMIT, tokio::io::AsyncReadExt::read(&mut recv, &mut head)).await.unwrap().unwrap();
    let (reply, _) = Frame::decode(&head[..n]).unwrap();
    let reply: Hello = reply.value_of(FrameKind::Hello).unwrap();
    assert_eq!((reply.from, reply.to), (4, 3));
    tokio::time::timeout(LIMIT, four.wait_up(3)).await.unwrap().unwrap();
    send.write_all(&Frame::encode_value(FrameKind::Message, &(3u32, 1u64)).unwrap()).await.unwrap();
    let got = tokio::time::timeout(LIMIT, four.recv()).await.unwrap().unwrap();
    assert_eq!(got, (3, (3, 1)));

    conn.close(0u32.into(), b"done");
    client.close(0u32.into(), b"done");
    client.wait_idle().await;
    one.close().await;
    four.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_refuses_to_start_with_another_nodes_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::create(dir.path(), "alpha", 3).unwrap();
    let mut cfg = cluster.config.clone();
    cfg.tls_dir = dir.path().join("mixed");
    tls_dir(&cfg.tls_dir, 3, &cluster.config.tls_dir, 2, &cluster.config.tls_dir);
    match Endpoint::<Msg>::bind(&cfg, 2) {
        Err(TransportError::Tls(TlsError::WrongNode { expected: 2, found: 3, .. })) => {}
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("node 2 started with node 3's certificate"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_files_make_working_tls_configs() {
    let dir = tempfile::tempdir().unwrap();
    let tls_dir = dir.path().join("tls");
    let ca = tls::ca_init(&tls_dir, "beta", false).unwrap();
    assert_eq!(ca.cert, tls_dir.join("ca.crt"));
    for n in 1..=2 {
        tls::ca_issue(&tls_dir, n, false).unwrap();
    }
    let ids: Vec<NodeIdentity> = (1..=2)
        .map(|n| {
            NodeIdentity::load(&ca.cert, &tls_dir.join(tls::node_cert_file(n)), &tls_dir.join(tls::node_key_file(n)), n)
                .unwrap()
        })
        .collect();
    // A bare quinn server and client built from the files complete a mutual handshake.
    let server_crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(tls::server_config(&ids[1]).unwrap()).unwrap();
    let server = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(server_crypto)),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let client_crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls::client_config(&ids[0]).unwrap()).unwrap();
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(quinn::ClientConfig::new(Arc::new(client_crypto)));
    let accept = tokio::spawn(async move {
        // The first client asks for the wrong server name and gives up.
        assert!(server.accept().await.unwrap().await.is_err());
        let conn = server.accept().await.unwrap().await.unwrap();
        let certs = conn.peer_identity().unwrap();
        let certs = certs.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().unwrap();
        let id = tls::cert_node_id(&certs[0]).unwrap();
        let alpn = conn.handshake_data().unwrap();
        let alpn = alpn.downcast::<quinn::crypto::rustls::HandshakeData>().unwrap().protocol;
        conn.close(0u32.into(), b"");
        server.wait_idle().await;
        (id, alpn)
    });
    // Asking for another node's name fails the server's verification.
    let wrong = client.connect(addr, &tls::node_dns_name(3)).unwrap().await;
    assert!(wrong.is_err());
    let conn = client.connect(addr, &tls::node_dns_name(2)).unwrap().await.unwrap();
    let certs = conn.peer_identity().unwrap();
    let certs = certs.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().unwrap();
    assert_eq!(tls::cert_node_id(&certs[0]).unwrap(), 2);
    let (client_id, alpn) = accept.await.unwrap();
    assert_eq!(client_id, 1);
    assert_eq!(alpn.as_deref(), Some(tls::ALPN));
    client.close(0u32.into(), b"");
    client.wait_idle().await;
}
