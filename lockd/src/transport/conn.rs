//! One connection: the dial and accept handshakes (TLS identity + hello), reading
//! frames off a stream, answering probes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::frame::{Frame, FrameError, FrameHeader, FrameKind, Hello, HEADER_LEN, PROTOCOL_VERSION};
use super::{TransportError, Wire, CLOSE_MALFORMED, CLOSE_REFUSED};
use crate::tls;

/// Read buffer per stream.
const READ_BUF_BYTES: usize = 64 * 1024;

/// Shared counters behind [`super::TransportStats`].
#[derive(Default, Debug)]
pub(crate) struct Counters {
    pub connections_up: AtomicU64,
    pub connections_refused: AtomicU64,
    pub malformed_frames: AtomicU64,
    pub frames_sent: AtomicU64,
    pub messages_received: AtomicU64,
    pub events_dropped: AtomicU64,
}

impl Counters {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// An authenticated connection with its message stream, after the hello exchange.
pub(crate) struct Established {
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: BufReader<quinn::RecvStream>,
}

/// What this node is, for handshakes.
pub(crate) struct Local<'a> {
    pub node: u32,
    pub cluster: &'a str,
}

impl Local<'_> {
    fn hello(&self, to: u32) -> Hello {
        Hello { protocol: PROTOCOL_VERSION, cluster: self.cluster.to_string(), from: self.node, to }
    }

    /// Checks a peer's hello against what we expect and what its certificate says.
    fn check_hello(&self, hello: &Hello, cert_id: u32) -> Result<(), String> {
        if hello.protocol != PROTOCOL_VERSION {
            return Err(format!("protocol version {} (we speak {PROTOCOL_VERSION})", hello.protocol));
        }
        if hello.cluster != self.cluster {
            return Err(format!("cluster {:?} (we are {:?})", hello.cluster, self.cluster));
        }
        if hello.from != cert_id {
            return Err(format!("claims node {} but its certificate names node {cert_id}", hello.from));
        }
        if hello.to != self.node {
            return Err(format!("wants node {} but this is node {}", hello.to, self.node));
        }
        Ok(())
    }
}

/// Why a dial failed.
#[derive(Debug)]
pub(crate) enum DialError {
    /// Could not reach the peer (timeout, lost connection): retry quietly.
    Unreachable(String),
    /// The peer or we refused the other's identity: retry, but say so loudly.
    Refused(String),
}

/// Why an incoming connection was not accepted.
pub(crate) struct Refusal {
    pub reason: String,
    /// False when the connection simply went away during the handshake.
    pub counted: bool,
}

/// The node id in the peer's certificate.
pub(crate) fn peer_cert_id(conn: &quinn::Connection) -> Result<u32, String> {
    let identity = conn.peer_identity().ok_or_else(|| "no peer certificate".to_string())?;
    let certs =
        identity.downcast::<Vec<CertificateDer<'static>>>().map_err(|_| "unexpected peer identity type".to_string())?;
    let leaf = certs.first().ok_or_else(|| "empty peer certificate chain".to_string())?;
    tls::cert_node_id(leaf).map_err(|e| e.to_string())
}

fn classify(e: quinn::ConnectionError) -> DialError {
    use quinn::ConnectionError as E;
    let is_crypto = |code: quinn::TransportErrorCode| (0x100..0x200).contains(&u64::from(code));
    match e {
        E::TransportError(ref t) if is_crypto(t.code) => DialError::Refused(e.to_string()),
        E::ConnectionClosed(ref c) if is_crypto(c.error_code) => {
            DialError::Refused(format!("peer refused our certificate: {e}"))
        }
        E::ApplicationClosed(ref c) if u64::from(c.error_code) == u64::from(CLOSE_REFUSED) => {
            DialError::Refused(format!("peer refused us: {}", String::from_utf8_lossy(&c.reason)))
        }
        e => DialError::Unreachable(e.to_string()),
    }
}

/// Dials `peer` at `addr`, checks its identity, exchanges hellos.
pub(crate) async fn dial(
    quic: &quinn::Endpoint,
    local: Local<'_>,
    peer: u32,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<Established, DialError> {
    let attempt = async {
        let connecting =
            quic.connect(addr, &tls::node_dns_name(peer)).map_err(|e| DialError::Unreachable(e.to_string()))?;
        let conn = connecting.await.map_err(classify)?;
        let refuse = |conn: &quinn::Connection, reason: String| {
            conn.close(CLOSE_REFUSED.into(), reason.as_bytes());
            DialError::Refused(reason)
        };
        let cert_id = match peer_cert_id(&conn) {
            Ok(id) if id == peer => id,
            Ok(id) => return Err(refuse(&conn, format!("certificate names node {id}"))),
            Err(e) => return Err(refuse(&conn, e)),
        };
        let (mut send, recv) = conn.open_bi().await.map_err(classify)?;
        let hello = Frame::encode_value(FrameKind::Hello, &local.hello(peer))
            .map_err(|e| DialError::Unreachable(e.to_string()))?;
        send.write_all(&hello).await.map_err(|e| DialError::Unreachable(e.to_string()))?;
        let mut recv = BufReader::with_capacity(READ_BUF_BYTES, recv);
        let mut buf = Vec::new();
        let reply: Hello = match read_frame(&mut recv, &mut buf).await {
            Ok(Some(f)) => match f.value_of(FrameKind::Hello) {
                Ok(h) => h,
                Err(e) => return Err(refuse(&conn, format!("bad hello: {e}"))),
            },
            Ok(None) => {
                let reason = conn.close_reason().map(classify);
                return Err(reason.unwrap_or_else(|| DialError::Unreachable("stream closed before hello".into())));
            }
            Err(ReadError::Frame(e)) => return Err(refuse(&conn, format!("bad hello: {e}"))),
            Err(ReadError::Io(e)) => {
                let reason = conn.close_reason().map(classify);
                return Err(reason.unwrap_or_else(|| DialError::Unreachable(e.to_string())));
            }
        };
        if let Err(reason) = local.check_hello(&reply, cert_id) {
            return Err(refuse(&conn, reason));
        }
        Ok(Established { conn, send, recv })
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(DialError::Unreachable("handshake timed out".into())),
    }
}

/// Completes an incoming connection: TLS (the CA-rooted client verifier has already
/// checked the chain), the id in the certificate, the hello. `is_peer` says which ids
/// may connect to us (configured peers with an id below ours).
pub(crate) async fn accept(
    incoming: quinn::Incoming,
    local: Local<'_>,
    is_peer: impl Fn(u32) -> bool,
    timeout: Duration,
) -> Result<(u32, Established), Refusal> {
    let attempt = async {
        let conn = incoming.await.map_err(|e| Refusal {
            counted: !matches!(e, quinn::ConnectionError::TimedOut),
            reason: format!("TLS handshake failed: {e}"),
        })?;
        let refuse = |conn: &quinn::Connection, reason: String| {
            conn.close(CLOSE_REFUSED.into(), reason.as_bytes());
            Refusal { reason, counted: true }
        };
        let cert_id = match peer_cert_id(&conn) {
            Ok(id) => id,
            Err(e) => return Err(refuse(&conn, e)),
        };
        if !is_peer(cert_id) {
            return Err(refuse(&conn, format!("node {cert_id} may not dial node {}", local.node)));
        }
        let (mut send, recv) = conn
            .accept_bi()
            .await
            .map_err(|e| Refusal { reason: format!("connection lost before hello: {e}"), counted: false })?;
        let mut recv = BufReader::with_capacity(READ_BUF_BYTES, recv);
        let mut buf = Vec::new();
        let hello: Hello = match read_frame(&mut recv, &mut buf).await {
            Ok(Some(f)) => match f.value_of(FrameKind::Hello) {
                Ok(h) => h,
                Err(e) => return Err(refuse(&conn, format!("bad hello: {e}"))),
            },
            Ok(None) => return Err(refuse(&conn, "stream closed before hello".into())),
            Err(ReadError::Frame(e)) => return Err(refuse(&conn, format!("bad hello: {e}"))),
            Err(ReadError::Io(e)) => {
                return Err(Refusal { reason: format!("connection lost before hello: {e}"), counted: false })
            }
        };
        if let Err(reason) = local.check_hello(&hello, cert_id) {
            return Err(refuse(&conn, reason));
        }
        let reply = Frame::encode_value(FrameKind::Hello, &local.hello(cert_id))
            .map_err(|e| Refusal { reason: e.to_string(), counted: false })?;
        send.write_all(&reply)
            .await
            .map_err(|e| Refusal { reason: format!("connection lost during hello: {e}"), counted: false })?;
        Ok((cert_id, Established { conn, send, recv }))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(Refusal { reason: "handshake timed out".into(), counted: true }),
    }
}

/// Why reading a frame failed.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The bytes are not a valid frame: the peer is at fault.
    Frame(FrameError),
    /// The stream or connection failed.
    Io(std::io::Error),
}

/// Reads one frame; `Ok(None)` on a clean end of stream at a frame boundary. The
/// header is validated (including the size limit) before the payload is read.
pub(crate) async fn read_frame<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Option<Frame>, ReadError> {
    if r.fill_buf().await.map_err(ReadError::Io)?.is_empty() {
        return Ok(None);
    }
    let mut head = [0u8; HEADER_LEN];
    read_exact(r, &mut head).await?;
    let header = FrameHeader::decode(&head).map_err(ReadError::Frame)?;
    buf.clear();
    buf.extend_from_slice(&head);
    buf.resize(header.frame_len(), 0);
    read_exact(r, &mut buf[HEADER_LEN..]).await?;
    let (frame, _) = Frame::decode(buf).map_err(ReadError::Frame)?;
    Ok(Some(frame))
}

async fn read_exact<R: AsyncBufRead + Unpin>(r: &mut R, out: &mut [u8]) -> Result<(), ReadError> {
    match r.read_exact(out).await {
        Ok(_) => Ok(()),
        // The stream ended inside a frame: a truncated frame.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(ReadError::Frame(FrameError::Incomplete { needed: out.len() }))
        }
        Err(e) => Err(ReadError::Io(e)),
    }
}

/// Closes `conn` because of a malformed frame from `peer`, and says so.
pub(crate) fn close_malformed(conn: &quinn::Connection, peer: u32, e: &FrameError, counters: &Counters) {
    warn!(
        peer,
        remote = %conn.remote_address(),
        error = %e,
        "malformed frame from peer; closing this connection"
    );
    Counters::bump(&counters.malformed_frames);
    conn.close(CLOSE_MALFORMED.into(), b"malformed frame");
}

/// Reads messages from the message stream into `incoming` until the connection ends or
/// a frame is malformed.
pub(crate) async fn read_messages<M: Wire>(
    peer: u32,
    conn: quinn::Connection,
    mut recv: BufReader<quinn::RecvStream>,
    incoming: mpsc::Sender<(u32, M)>,
    counters: &Counters,
) {
    let mut buf = Vec::new();
    loop {
        match read_frame(&mut recv, &mut buf).await {
            Ok(Some(frame)) => match frame.value_of::<M>(FrameKind::Message) {
                Ok(msg) => {
                    // Counted before it is handed over: a receiver that has taken the
                    // message then always finds it counted.
                    Counters::bump(&counters.messages_received);
                    if incoming.send((peer, msg)).await.is_err() {
                        return; // the endpoint is gone
                    }
                }
                Err(e) => return close_malformed(&conn, peer, &e, counters),
            },
            Ok(None) => {
                debug!(peer, "peer finished its message stream");
                return;
            }
            Err(ReadError::Frame(e)) => return close_malformed(&conn, peer, &e, counters),
            Err(ReadError::Io(e)) => {
                debug!(peer, error = %e, "message stream ended");
                return;
            }
        }
    }
}

/// Answers `Ping` frames on every further bidirectional stream the peer opens.
pub(crate) async fn serve_probes(peer: u32, conn: quinn::Connection, counters: &Counters) {
    let mut buf = Vec::new();
    while let Ok((mut send, recv)) = conn.accept_bi().await {
        let mut recv = BufReader::new(recv);
        let nonce: u64 = match read_frame(&mut recv, &mut buf).await {
            Ok(Some(f)) => match f.value_of(FrameKind::Ping) {
                Ok(n) => n,
                Err(e) => return close_malformed(&conn, peer, &e, counters),
            },
            Ok(None) => continue,
            Err(ReadError::Frame(e)) => return close_malformed(&conn, peer, &e, counters),
            Err(ReadError::Io(_)) => continue,
        };
        // Cannot fail: a u64 payload is far below the frame limit.
        let Ok(pong) = Frame::encode_value(FrameKind::Pong, &nonce) else {
            continue;
        };
        if send.write_all(&pong).await.is_ok() {
            let _ = send.finish();
        }
    }
}

/// One round trip on a fresh stream: `Ping(nonce)` out, `Pong(nonce)` back.
pub(crate) async fn probe(conn: &quinn::Connection, nonce: u64) -> Result<(), TransportError> {
    let (mut send, recv) = conn.open_bi().await?;
    let ping = Frame::encode_value(FrameKind::Ping, &nonce).map_err(|e| TransportError::Protocol(e.to_string()))?;
    send.write_all(&ping).await.map_err(|e| TransportError::Protocol(e.to_string()))?;
    let _ = send.finish();
    let mut recv = BufReader::new(recv);
    let mut buf = Vec::new();
    match read_frame(&mut recv, &mut buf).await {
        Ok(Some(f)) => {
            let echoed: u64 = f.value_of(FrameKind::Pong).map_err(|e| TransportError::Protocol(e.to_string()))?;
            if echoed != nonce {
                return Err(TransportError::Protocol(format!("pong {echoed} for ping {nonce}")));
            }
            Ok(())
        }
        Ok(None) => Err(TransportError::Protocol("probe stream closed".into())),
        Err(ReadError::Frame(e)) => Err(TransportError::Protocol(e.to_string())),
        Err(ReadError::Io(e)) => Err(TransportError::Protocol(e.to_string())),
    }
}
