//! One local client connection: reads its frames, applies them to the node state,
//! writes back what is queued for it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use super::proto::{ClientFrame, ServerMsg, MAX_CLIENT_FRAME};
use super::Shared;
use crate::transport::frame::{Frame, FrameError, FrameHeader, FrameKind, HEADER_LEN, TRAILER_LEN};

/// Messages queued for one client before it counts as not reading (and is dropped).
/// Each accepted request gets one AST and each lock at most one BAST per mode, so a
/// client that reads its answers stays far below this.
const SESSION_QUEUE: usize = 256 * 1024;
/// Read buffer growth step.
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

pub(crate) async fn run(shared: Arc<Shared>, stream: UnixStream, mut shutdown: watch::Receiver<bool>) {
    let pid = stream.peer_cred().ok().and_then(|c| c.pid());
    let (tx, mut rx) = mpsc::channel::<ServerMsg>(SESSION_QUEUE);
    let overflowed = Arc::new(AtomicBool::new(false));
    let sid = shared.lock().add_session(tx, pid, overflowed.clone());
    debug!(client = sid, ?pid, "client connected");
    let (mut rd, mut wr) = stream.into_split();
    let mut inbuf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut outbuf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let why: String = 'session: loop {
        let mut first: Option<ServerMsg> = None;
        tokio::select! {
            r = rd.read_buf(&mut inbuf) => match r {
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
                    if inbuf.capacity() - inbuf.len() < READ_CHUNK / 4 {
                        inbuf.reserve(READ_CHUNK);
                    }
                    if !frames.is_empty() {
                        let mut st = shared.lock();
                        for f in frames {
                            st.handle_client(sid, f);
                        }
                    }
                }
                Err(e) => break 'session format!("read: {e}"),
            },
            m = rx.recv() => match m {
                Some(m) => first = Some(m),
                // The state dropped the session (cannot happen while we run).
                None => break 'session "dropped".into(),
            },
            _ = shutdown.changed() => break 'session "lockd shutting down".into(),
        }
        if overflowed.load(Ordering::Relaxed) {
            break 'session "answer queue overflow".into();
        }
        // Write everything queued, in as few writes as possible.
        let mut next = first.or_else(|| rx.try_recv().ok());
        while let Some(m) = next {
            match Frame::encode_value(FrameKind::Message, &m) {
                Ok(bytes) => outbuf.extend_from_slice(&bytes),
                Err(e) => warn!(client = sid, %e, "answer does not encode; dropped"),
            }
            if outbuf.len() >= WRITE_BATCH_BYTES {
                if let Err(e) = wr.write_all(&outbuf).await {
                    break 'session format!("write: {e}");
                }
                outbuf.clear();
            }
            next = rx.try_recv().ok();
        }
        if !outbuf.is_empty() {
            if let Err(e) = wr.write_all(&outbuf).await {
                break 'session format!("write: {e}");
            }
            outbuf.clear();
        }
    };
    debug!(client = sid, ?pid, why, "client connection closed");
    shared.lock().remove_session(sid);
}
