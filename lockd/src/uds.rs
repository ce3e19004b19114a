//! A unix stream socket registered with the tokio reactor for reads only: the
//! client socket of lockd, on both ends.
//!
//! Tokio's `UnixStream` registers read and write interest, and the kernel wakes a
//! socket's epoll entry with EPOLLOUT each time the peer reads and so frees send
//! space. With one request and one answer in flight, each end of the lockd socket
//! was therefore woken twice per message it sent: once when the other end read it
//! (nothing to do), once for the answer. A wake-up of a sleeping thread is the
//! largest cost of a local lock on a VM (`perf`: `unix_write_space` led lockd's
//! profile). Here the socket is registered for reads only; a write that finds the
//! socket full (the peer does not read) waits for room through a duplicate
//! descriptor registered for writes only while it waits.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// A non-blocking unix stream, readable through the reactor; see the module docs.
pub(crate) struct Uds {
    fd: AsyncFd<UnixStream>,
}

impl Uds {
    /// Takes over `stream` (made non-blocking). Must be called inside a tokio runtime.
    pub(crate) fn new(stream: UnixStream) -> io::Result<Uds> {
        stream.set_nonblocking(true)?;
        Ok(Uds { fd: register(stream, Interest::READABLE)? })
    }

    /// Waits until bytes are available, reads them through `scratch` and appends them
    /// to `buf`. 0 means the peer closed its end. Cancel-safe: bytes read are in `buf`.
    pub(crate) async fn read_into(&self, scratch: &mut [u8], buf: &mut Vec<u8>) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| fd.get_ref().read(scratch)) {
                Ok(Ok(n)) => {
                    if n > 0 && n < scratch.len() {
                        // The socket is drained (as tokio's own streams assume after a
                        // short read); a later arrival is a new edge, not lost.
                        guard.clear_ready();
                    }
                    buf.extend_from_slice(&scratch[..n]);
                    return Ok(n);
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Err(e),
                // Would block: readiness cleared, wait again.
                Err(_) => {}
            }
        }
    }

    /// Shuts both directions down at once: the peer reads end of file, as when this
    /// process dies; our reader does too.
    pub(crate) fn shutdown(&self) -> io::Result<()> {
        self.fd.get_ref().shutdown(std::net::Shutdown::Both)
    }

    /// Writes what fits now, without waiting (`WouldBlock` if nothing fits).
    pub(crate) fn try_write(&self, bytes: &[u8]) -> io::Result<usize> {
        self.fd.get_ref().write(bytes)
    }

    /// Writes all of `bytes`, waiting for room when the socket is full.
    pub(crate) async fn write_all(&self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            match self.try_write(bytes) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable().await?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Waits until the socket has room for a write (or an error to report). Only
    /// for the slow path: registers a duplicate descriptor for the time of the wait
    /// (epoll reports a socket already writable at once on registration).
    pub(crate) async fn writable(&self) -> io::Result<()> {
        let dup = self.fd.get_ref().try_clone()?;
        let w = register(dup, Interest::WRITABLE)?;
        let _ready = w.writable().await?;
        Ok(())
    }
}

fn register(stream: UnixStream, interest: Interest) -> io::Result<AsyncFd<UnixStream>> {
    // SAFETY: a `UnixStream` owns its descriptor: it stays open, and `as_raw_fd`
    // returns it, until the stream is dropped with the `AsyncFd` (which never hands
    // out the stream mutably: `get_mut` and `into_inner` are not used here).
    Ok(unsafe { AsyncFd::register_with_interest(stream, interest) }?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_socket_is_written_once_the_peer_reads() {
        let (a, b) = UnixStream::pair().unwrap();
        let (a, b) = (Uds::new(a).unwrap(), Uds::new(b).unwrap());
        let big = vec![7u8; 4 << 20];
        let reader = async {
            let (mut scratch, mut got) = (vec![0u8; 64 * 1024], Vec::new());
            while got.len() < big.len() {
                assert!(b.read_into(&mut scratch, &mut got).await.unwrap() > 0);
            }
            got
        };
        let (w, got) = tokio::join!(a.write_all(&big), reader);
        w.unwrap();
        assert_eq!(got, big);
        drop(a);
        let mut scratch = [0u8; 16];
        assert_eq!(b.read_into(&mut scratch, &mut Vec::new()).await.unwrap(), 0);
    }
}
