//! One local client connection: reads its frames, applies them to the node state,
//! writes back what is queued for it.

use std::sync::Arc;

use tokio::net::UnixStream;
use tokio::sync::{watch, Notify};
use tracing::{debug, warn};

use super::proto::{ClientFrame, ErrorKind, RemoteError, ServerMsg, MAX_CLIENT_FRAME};
use super::Shared;
use crate::transport::frame::{Frame, FrameError, FrameHeader, FrameKind, HEADER_LEN, TRAILER_LEN};
use crate::uds::Uds;

/// Most bytes taken from the socket by one read.
const READ_CHUNK: usize = 64 * 1024;
/// Largest batch of queued messages encoded into one write.
const WRITE_BATCH_BYTES: usize = 256 * 1024;

/// Splits complete frames off the front of `buf`. `Ok(None)` when more bytes are
/// needed. Frames above [`MAX_CLIENT_FRAME`] are refused from the header alone.
pub(crate) fn next_frame(buf: &[u8]) -> Result<Option<(ClientFrame, usize)>, FrameError> {
    let Some(head) = buf.first_chunk::<HEADER_LEN>() else { return Ok(None) };
    let header = FrameHeader::decode(head)?;
    if header.len as usize > MAX_CLIENT_FRAME {
        return Err(FrameError::TooLarge(header.len.into()));
    }
    if buf.len() < HEADER_LEN + header.len as usize + TRAILER_LEN {
        return Ok(None);
    }
    let (frame, used) = Frame::decode(buf)?;
    Ok(Some((frame.value_of(FrameKind::Message)?, used)))
}

/// How long a refused client is given to read its refusal.
const REFUSE_LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// Tells a client that may not use lockd why (one `Error` with id 0 and
/// `AccessDenied`), then closes its connection. What the client sent (its hello) is
/// read and dropped until it closes its end or [`REFUSE_LINGER`] passes: closing a
/// unix socket with unread bytes resets the connection, and the client might then
/// not read the refusal.
pub(crate) async fn refuse(mut stream: UnixStream, message: String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let msg = ServerMsg::Error { id: 0, error: RemoteError { kind: ErrorKind::AccessDenied, message } };
    let Ok(bytes) = Frame::encode_value(FrameKind::Message, &msg) else { return };
    let told = async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut left = MAX_CLIENT_FRAME;
        while left > 0 {
            let n = stream.read(&mut sink).await?;
            if n == 0 {
                break;
            }
            left = left.saturating_sub(n);
        }
        Ok::<(), std::io::Error>(())
    };
    let _ = tokio::time::timeout(REFUSE_LINGER, told).await;
}

pub(crate) async fn run(shared: Arc<Shared>, stream: UnixStream, mut shutdown: watch::Receiver<bool>) {
    let pid = stream.peer_cred().ok().and_then(|c| c.pid());
    let wake = Arc::new(Notify::new());
    let sid = shared.lock().add_session(wake.clone(), pid);
    debug!(client = sid, ?pid, "client connected");
    let sock = match stream.into_std().and_then(Uds::new) {
        Ok(s) => s,
        Err(e) => {
            warn!(client = sid, ?pid, %e, "cannot set up the client socket: closing it");
            shared.lock().remove_session(sid);
            return;
        }
    };
    let mut scratch = vec![0u8; READ_CHUNK];
    let mut inbuf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut outbuf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    // Messages taken from the state, to encode and write.
    let mut out: Vec<ServerMsg> = Vec::new();
    let why: String = 'session: loop {
        let taken = tokio::select! {
            r = sock.read_into(&mut scratch, &mut inbuf) => match r {
                Ok(0) => break 'session "disconnected".into(),
                Ok(_) => {
                    let mut used = 0;
                    let mut frames = Vec::new();
                    loop {
                        match next_frame(&inbuf[used..]) {
                            Ok(Some((f, n))) => {
                                frames.push(f);
                                used += n;
                            }
                            Ok(None) => break,
                            Err(e) => {
                                warn!(client = sid, ?pid, %e, "malformed frame from client: closing its connection");
                                break 'session format!("malformed frame: {e}");
                            }
                        }
                    }
                    inbuf.drain(..used);
                    if frames.is_empty() {
                        Ok(())
                    } else {
                        // Applied, and the answers taken, under one lock of the state:
                        // a request on a resource this node masters is answered here
                        // with no other task involved.
                        shared.lock().serve(sid, frames, &mut out)
                    }
                }
                Err(e) => break 'session format!("read: {e}"),
            },
            () = wake.notified() => shared.lock().take_out(sid, &mut out),
            _ = shutdown.changed() => break 'session "lockd shutting down".into(),
        };
        if taken.is_err() {
            break 'session "answer queue overflow".into();
        }
        // Write everything taken, in as few writes as possible.
        for m in out.drain(..) {
            match Frame::encode_value(FrameKind::Message, &m) {
                Ok(bytes) => outbuf.extend_from_slice(&bytes),
                Err(e) => warn!(client = sid, %e, "answer does not encode; dropped"),
            }
            if outbuf.len() >= WRITE_BATCH_BYTES {
                if let Err(e) = sock.write_all(&outbuf).await {
                    break 'session format!("write: {e}");
                }
                outbuf.clear();
            }
        }
        if !outbuf.is_empty() {
            if let Err(e) = sock.write_all(&outbuf).await {
                break 'session format!("write: {e}");
            }
            outbuf.clear();
        }
    };
    debug!(client = sid, ?pid, why, "client connection closed");
    shared.lock().remove_session(sid);
}
