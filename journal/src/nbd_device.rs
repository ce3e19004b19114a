//! [`NbdDevice`]: a [`BlockDevice`] served by an NBD server, spoken to directly over
//! TCP, so that a node needs no kernel NBD driver (`nbd://HOST:PORT/EXPORT`).
//!
//! One TCP connection (TCP_NODELAY, keepalive) carries every request of the device.
//! A caller registers its request under a fresh cookie, sends it under the writer
//! mutex and waits on its own channel; one reader thread reads the replies and hands
//! each to its caller (simple replies, or the chunks of structured replies when the
//! server agreed to them). Large requests are split at the server's payload limit
//! and sent together.
//!
//! When the connection breaks, the reader thread tells every waiting caller its
//! request was lost and connects again (with backoff, for
//! [`NbdOptions::reconnect_for`]); the callers then send their requests again. NBD
//! promises that a flush covers the writes completed on *its* connection, and on
//! every connection only if the server says `NBD_FLAG_CAN_MULTI_CONN`: so when
//! writes acknowledged on the lost connection were not yet flushed and the server
//! does not say that, the device does not reconnect, as it could not know they are
//! durable. When it gives up, every waiting and later call fails with
//! [`DeviceError::NbdDisconnected`], and the file system withdraws.
//! docs/internals/nbd.md has the design.

use std::collections::HashMap;
use std::io::{BufReader, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::device::{check_io, BlockDevice, DeviceError, BLOCK_SIZE};
use crate::nbd_proto::{self as proto, Chunk, Export, NbdUrl, ReadCover, ReplyHeader, WireError};

/// How to open an [`NbdDevice`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdOptions {
    /// Writes, trims and flushes fail with [`DeviceError::ReadOnly`].
    pub read_only: bool,
    /// How long to keep trying to connect again after the connection breaks.
    pub reconnect_for: Duration,
    /// How long one connection attempt (TCP connect and handshake) may take.
    pub connect_timeout: Duration,
    /// Most requests in flight at once; a caller beyond waits for one to finish.
    pub max_in_flight: usize,
}

impl Default for NbdOptions {
    fn default() -> NbdOptions {
        NbdOptions {
            read_only: false,
            reconnect_for: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            max_in_flight: 256,
        }
    }
}

/// Largest piece one read or write is split into.
const MAX_REQUEST: usize = 4 << 20;
/// How many times one request is sent again after connections broke under it.
const MAX_RESENDS: u32 = 8;
/// Read buffer of the reply stream.
const READ_BUFFER: usize = 256 << 10;

/// What a caller's channel receives.
enum Outcome {
    /// The reply: the read data (empty for other commands) or the server's error.
    Done(Result<Vec<u8>, DeviceError>),
    /// The connection broke before the reply came: send it again.
    Lost,
}

/// A request sent and not yet answered.
struct Pending {
    cmd: u16,
    offset: u64,
    len: u32,
    tx: mpsc::SyncSender<Outcome>,
    /// A read's data as it arrives (taken out while the reader thread fills it).
    buf: Vec<u8>,
    /// A structured read's chunks so far.
    cover: Option<ReadCover>,
    /// The first error chunk of a structured reply.
    error: Option<(u32, String, u64)>,
    /// A flush: the count of acknowledged writes when it was registered.
    covers_writes: u64,
}

/// What callers and the reader thread share, under [`Shared::state`].
struct State {
    /// Generation of the connection: one more each time it is made again.
    gen: u64,
    /// A connection is up (false while the reader thread connects again).
    up: bool,
    /// Why the device gave up for good.
    failed: Option<DeviceError>,
    /// The device is being dropped.
    closing: bool,
    next_cookie: u64,
    pending: HashMap<u64, Pending>,
    /// Writes and trims the server acknowledged, and how many of them a completed
    /// flush covers.
    acked_writes: u64,
    flushed_writes: u64,
}

/// The sending half: the connection of generation `gen`, or none while it is down.
struct Out {
    gen: u64,
    stream: Option<TcpStream>,
}

struct Shared {
    url: NbdUrl,
    /// `host:port/export`, for messages.
    name: String,
    size: u64,
    flags: u16,
    opts: NbdOptions,
    state: Mutex<State>,
    changed: Condvar,
    out: Mutex<Out>,
}

/// A block device on an NBD server; see the module doc.
pub struct NbdDevice {
    shared: Arc<Shared>,
    len: u64,
    max_request: usize,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for NbdDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdDevice").field("url", &self.shared.name).field("len", &self.len).finish()
    }
}

/// A connection after its handshake: the reply stream, the request stream.
struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    export: Export,
}

fn connect(url: &NbdUrl, name: &str, timeout: Duration) -> Result<Conn, DeviceError> {
    let io = |e: std::io::Error| DeviceError::NbdConnect { server: name.to_string(), why: e.to_string() };
    let addrs: Vec<_> = url.addr().to_socket_addrs().map_err(io)?.collect();
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, format!("{} resolves to no address", url.host));
    let mut stream = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = e,
        }
    }
    let mut s = stream.ok_or_else(|| io(last))?;
    s.set_nodelay(true).map_err(io)?;
    keepalive(&s);
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    let export = proto::handshake(&mut s, &url.export).map_err(|e| wire_error(e, name, "handshake"))?;
    s.set_read_timeout(None).map_err(io)?;
    s.set_write_timeout(None).map_err(io)?;
    let writer = s.try_clone().map_err(io)?;
    Ok(Conn { reader: BufReader::with_capacity(READ_BUFFER, s), writer, export })
}

/// TCP keepalive after 5 s idle, probes every 2 s, dead after 3: a server that
/// vanishes without closing the connection (a machine lost) is noticed in ~11 s.
fn keepalive(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let set = |level, opt, v: libc::c_int| {
        // SAFETY: setsockopt on a socket this stream owns, with a c_int value.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                level,
                opt,
                &v as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 5);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 2);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3);
}

fn wire_error(e: WireError, name: &str, op: &'static str) -> DeviceError {
    match e {
        WireError::Io(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            DeviceError::NbdConnect {
                server: name.to_string(),
                why: format!("{op}: the server did not answer in time"),
            }
        }
        WireError::Io(e) => DeviceError::NbdConnect { server: name.to_string(), why: format!("{op}: {e}") },
        WireError::Refused(why) => DeviceError::NbdRefused { server: name.to_string(), why },
        WireError::Protocol(why) => DeviceError::NbdProtocol { server: name.to_string(), why },
    }
}

fn op_name(cmd: u16) -> &'static str {
    match cmd {
        proto::CMD_READ => "read",
        proto::CMD_WRITE => "write",
        proto::CMD_FLUSH => "flush",
        proto::CMD_TRIM => "trim",
        _ => "request",
    }
}

/// Clones an error for each caller it fails (`DeviceError` holds an io::Error, which
/// is not Clone).
fn clone_error(e: &DeviceError) -> DeviceError {
    match e {
        DeviceError::NbdProtocol { server, why } => {
            DeviceError::NbdProtocol { server: server.clone(), why: why.clone() }
        }
        DeviceError::NbdRefused { server, why } => DeviceError::NbdRefused { server: server.clone(), why: why.clone() },
        DeviceError::NbdConnect { server, why } => DeviceError::NbdConnect { server: server.clone(), why: why.clone() },
        DeviceError::NbdDisconnected { server, why } => {
            DeviceError::NbdDisconnected { server: server.clone(), why: why.clone() }
        }
        other => DeviceError::NbdDisconnected { server: String::new(), why: other.to_string() },
    }
}

impl NbdDevice {
    /// Connects to `url` (`nbd://HOST[:PORT]/[EXPORT]`) and negotiates the export.
    pub fn open(url: &str, opts: &NbdOptions) -> Result<NbdDevice, DeviceError> {
        let parsed = NbdUrl::parse(url).map_err(|why| DeviceError::NbdUrl { url: url.to_string(), why })?;
        let name = format!("{}/{}", parsed.addr(), parsed.export);
        let conn = connect(&parsed, &name, opts.connect_timeout)?;
        let e = conn.export;
        if e.flags & proto::FLAG_READ_ONLY != 0 && !opts.read_only {
            return Err(DeviceError::NbdRefused { server: name, why: "the export is read-only".into() });
        }
        if e.flags & proto::FLAG_SEND_FLUSH == 0 && !opts.read_only {
            tracing::warn!(server = %name, "the NBD server takes no flush: durability is up to the server");
        }
        let shared = Arc::new(Shared {
            url: parsed,
            name,
            size: e.size,
            flags: e.flags,
            opts: opts.clone(),
            state: Mutex::new(State {
                gen: 1,
                up: true,
                failed: None,
                closing: false,
                next_cookie: 1,
                pending: HashMap::new(),
                acked_writes: 0,
                flushed_writes: 0,
            }),
            changed: Condvar::new(),
            out: Mutex::new(Out {
                gen: 1,
                stream: Some(conn.writer.try_clone().map_err(|source| DeviceError::Io {
                    op: "connect",
                    offset: 0,
                    source,
                })?),
            }),
        });
        let s = shared.clone();
        let reader = std::thread::Builder::new()
            .name("nbd-reader".into())
            .spawn(move || reader_thread(s, conn))
            .map_err(|source| DeviceError::Io { op: "open", offset: 0, source })?;
        let max_request = (e.max_payload as usize).min(MAX_REQUEST) / BLOCK_SIZE * BLOCK_SIZE;
        tracing::debug!(server = %shared.name, size = e.size, flags = e.flags, structured = e.structured, "NBD export open");
        Ok(NbdDevice {
            len: e.size / BLOCK_SIZE as u64 * BLOCK_SIZE as u64,
            shared,
            max_request: max_request.max(BLOCK_SIZE),
            reader: Some(reader),
        })
    }

    /// How many times the connection was made again after it broke.
    pub fn reconnects(&self) -> u64 {
        self.shared.state.lock().gen - 1
    }

    /// The export's transmission flags (`NBD_FLAG_*`) as the server sent them.
    pub fn flags(&self) -> u16 {
        self.shared.flags
    }

    /// Writes `buf` at `offset` with NBD_CMD_FLAG_FUA: durable when this returns
    /// (a write and a flush if the server does not take FUA).
    pub fn write_at_fua(&self, offset: u64, buf: &[u8]) -> Result<(), DeviceError> {
        if self.shared.flags & proto::FLAG_SEND_FUA == 0 {
            self.write_at(offset, buf)?;
            return self.flush();
        }
        self.write_with(offset, buf, proto::CMD_FLAG_FUA)
    }

    /// Tells the server that `len` bytes at `offset` are no longer needed
    /// (NBD_CMD_TRIM; nothing if the server does not take it). What they read
    /// afterwards is undefined.
    pub fn trim(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        if self.shared.opts.read_only {
            return Err(DeviceError::ReadOnly);
        }
        let l =
            usize::try_from(len).map_err(|_| DeviceError::OutOfRange { offset, len: usize::MAX, size: self.len })?;
        check_io(offset, l, self.len)?;
        if self.shared.flags & proto::FLAG_SEND_TRIM == 0 || len == 0 {
            return Ok(());
        }
        let mut reqs: Vec<Req<'_>> = Vec::new();
        let mut at = 0u64;
        while at < len {
            let n = (len - at).min(self.max_request as u64) as u32;
            reqs.push(Req { cmd: proto::CMD_TRIM, flags: 0, offset: offset + at, len: n, data: None, dest: None });
            at += u64::from(n);
        }
        self.run(reqs)
    }

    fn write_with(&self, offset: u64, buf: &[u8], flags: u16) -> Result<(), DeviceError> {
        if self.shared.opts.read_only {
            return Err(DeviceError::ReadOnly);
        }
        check_io(offset, buf.len(), self.len)?;
        let reqs = buf
            .chunks(self.max_request)
            .enumerate()
            .map(|(i, piece)| Req {
                cmd: proto::CMD_WRITE,
                flags,
                offset: offset + (i * self.max_request) as u64,
                len: piece.len() as u32,
                data: Some(piece),
                dest: None,
            })
            .collect();
        self.run(reqs)
    }

    /// Sends `reqs` together and waits for all of them, sending again those a broken
    /// connection lost; returns the first error.
    fn run(&self, mut reqs: Vec<Req<'_>>) -> Result<(), DeviceError> {
        let mut done = vec![false; reqs.len()];
        for attempt in 0.. {
            let mut waits = Vec::new();
            for (i, r) in reqs.iter().enumerate().filter(|(i, _)| !done[*i]) {
                waits.push((i, self.shared.submit(r)?));
            }
            let mut lost = false;
            let mut first_err = None;
            for (i, rx) in waits {
                match rx.recv() {
                    Ok(Outcome::Done(Ok(data))) => {
                        if let Some(dest) = reqs[i].dest.as_deref_mut() {
                            // The reader thread completes a read only with exactly
                            // `len` bytes, the length of `dest`.
                            dest.copy_from_slice(&data);
                        }
                        done[i] = true;
                    }
                    Ok(Outcome::Done(Err(e))) => {
                        done[i] = true;
                        first_err.get_or_insert(e);
                    }
                    Ok(Outcome::Lost) | Err(_) => lost = true,
                }
            }
            if let Some(e) = first_err {
                return Err(e);
            }
            if !lost {
                return Ok(());
            }
            if attempt >= MAX_RESENDS {
                break;
            }
        }
        Err(DeviceError::NbdDisconnected {
            server: self.shared.name.clone(),
            why: format!("a request was lost with {} connections in a row", MAX_RESENDS + 1),
        })
    }
}

/// One request of a call.
struct Req<'a> {
    cmd: u16,
    flags: u16,
    offset: u64,
    len: u32,
    /// A write's data.
    data: Option<&'a [u8]>,
    /// Where a read's data goes.
    dest: Option<&'a mut [u8]>,
}

impl Shared {
    /// Registers `r` under a new cookie and sends it; the returned channel gets its
    /// outcome.
    fn submit(&self, r: &Req<'_>) -> Result<mpsc::Receiver<Outcome>, DeviceError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let mut st = self.state.lock();
        loop {
            if let Some(e) = &st.failed {
                return Err(clone_error(e));
            }
            if st.closing {
                return Err(DeviceError::NbdDisconnected {
                    server: self.name.clone(),
                    why: "the device is closed".into(),
                });
            }
            if st.up && st.pending.len() < self.opts.max_in_flight.max(1) {
                break;
            }
            self.changed.wait(&mut st);
        }
        let cookie = st.next_cookie;
        st.next_cookie += 1;
        let gen = st.gen;
        let pending = Pending {
            cmd: r.cmd,
            offset: r.offset,
            len: r.len,
            tx,
            buf: Vec::new(),
            cover: None,
            error: None,
            covers_writes: st.acked_writes,
        };
        st.pending.insert(cookie, pending);
        drop(st);
        let header = proto::request_header(r.flags, r.cmd, cookie, r.offset, r.len);
        let mut out = self.out.lock();
        // A connection of another generation (or none) means the one this request
        // was registered under broke: the reader thread has told it Lost already.
        if out.gen == gen {
            if let Some(s) = out.stream.as_mut() {
                if let Err(e) = send(s, &header, r.data.unwrap_or(&[])) {
                    // The reader thread sees the connection end and takes it from there.
                    tracing::warn!(server = %self.name, error = %e, "NBD send failed");
                    let _ = s.shutdown(Shutdown::Both);
                }
            }
        }
        Ok(rx)
    }

    /// Completes the request `p` (removed from the pending map), and wakes a caller
    /// that waits for a free place in flight.
    fn complete(&self, st: &mut State, p: Pending, result: Result<Vec<u8>, DeviceError>) {
        if result.is_ok() {
            match p.cmd {
                proto::CMD_WRITE | proto::CMD_TRIM => st.acked_writes += 1,
                proto::CMD_FLUSH => st.flushed_writes = st.flushed_writes.max(p.covers_writes),
                _ => {}
            }
        }
        let _ = p.tx.try_send(Outcome::Done(result));
        if st.pending.len() + 1 == self.opts.max_in_flight.max(1) {
            self.changed.notify_all();
        }
    }

    /// The connection broke: every request in flight is told it was lost (its caller
    /// sends it again once a connection is back). Returns why reconnecting is unsafe,
    /// if it is.
    fn lost(&self) -> Option<String> {
        let mut st = self.state.lock();
        st.up = false;
        for (_, p) in st.pending.drain() {
            let _ = p.tx.try_send(Outcome::Lost);
        }
        let unflushed = st.acked_writes - st.flushed_writes.min(st.acked_writes);
        drop(st);
        self.changed.notify_all();
        if let Some(s) = self.out.lock().stream.take() {
            let _ = s.shutdown(Shutdown::Both);
        }
        (unflushed > 0 && self.flags & proto::FLAG_CAN_MULTI_CONN == 0).then(|| {
            format!(
                "{unflushed} write(s) acknowledged on it were not flushed, and the server does not promise \
                 (NBD_FLAG_CAN_MULTI_CONN) that a flush on a new connection covers them"
            )
        })
    }

    /// Gives up: every waiting and later call fails with `e`.
    fn fail(&self, e: DeviceError) {
        let mut st = self.state.lock();
        if st.failed.is_none() && !st.closing {
            tracing::error!(server = %self.name, error = %e, "NBD device failed");
        }
        for (_, p) in st.pending.drain() {
            let _ = p.tx.try_send(Outcome::Done(Err(clone_error(&e))));
        }
        st.failed.get_or_insert(e);
        st.up = false;
        drop(st);
        self.changed.notify_all();
        if let Some(s) = self.out.lock().stream.take() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Connects again, with backoff, until `reconnect_for` has passed.
    fn reconnect(&self, why: &str) -> Result<Conn, DeviceError> {
        let deadline = Instant::now() + self.opts.reconnect_for;
        let mut pause = Duration::from_millis(20);
        tracing::warn!(server = %self.name, why, "NBD connection lost; connecting again");
        loop {
            if self.state.lock().closing {
                return Err(DeviceError::NbdDisconnected { server: self.name.clone(), why: "closed".into() });
            }
            let err = match connect(&self.url, &self.name, self.opts.connect_timeout) {
                Ok(c) if c.export.size != self.size => {
                    let why = format!("the export's size changed from {} to {} bytes", self.size, c.export.size);
                    return Err(DeviceError::NbdProtocol { server: self.name.clone(), why });
                }
                Ok(c) => return Ok(c),
                Err(e) => e,
            };
            let now = Instant::now();
            if now >= deadline {
                let why = format!("{why}; no new connection in {:?}: {err}", self.opts.reconnect_for);
                return Err(DeviceError::NbdDisconnected { server: self.name.clone(), why });
            }
            let mut st = self.state.lock();
            if !st.closing {
                self.changed.wait_for(&mut st, pause.min(deadline - now));
            }
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// Puts a new connection in place and lets the callers send again.
    fn install(&self, c: &Conn) -> Result<(), std::io::Error> {
        let w = c.writer.try_clone()?;
        let mut out = self.out.lock();
        let mut st = self.state.lock();
        if st.closing {
            return Err(std::io::Error::other("the device is closed"));
        }
        st.gen += 1;
        st.up = true;
        out.gen = st.gen;
        let st_gen = st.gen;
        out.stream = Some(w);
        drop(st);
        drop(out);
        self.changed.notify_all();
        tracing::warn!(server = %self.name, gen = st_gen, "NBD connection made again");
        Ok(())
    }
}

fn send(s: &mut TcpStream, header: &[u8], data: &[u8]) -> std::io::Result<()> {
    let mut bufs = [IoSlice::new(header), IoSlice::new(data)];
    let mut bufs = &mut bufs[..];
    while !bufs.is_empty() {
        match s.write_vectored(bufs) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Why the reader thread stopped reading a connection.
enum ReadStop {
    /// The socket failed or closed: connect again.
    Lost(String),
    /// The server broke the protocol: give up.
    Protocol(String),
}

/// Fails the device if the reader thread ends for any reason it did not handle (so
/// that no caller waits forever).
struct ReaderExit(Arc<Shared>);

impl Drop for ReaderExit {
    fn drop(&mut self) {
        let why = if std::thread::panicking() { "the reply reader panicked" } else { "the reply reader ended" };
        self.0.fail(DeviceError::NbdDisconnected { server: self.0.name.clone(), why: why.into() });
    }
}

fn reader_thread(shared: Arc<Shared>, mut conn: Conn) {
    let _exit = ReaderExit(shared.clone());
    loop {
        let stop = loop {
            if let Err(stop) = read_reply(&shared, &mut conn) {
                break stop;
            }
        };
        if shared.state.lock().closing {
            return;
        }
        match stop {
            ReadStop::Protocol(why) => {
                shared.fail(DeviceError::NbdProtocol { server: shared.name.clone(), why });
                return;
            }
            ReadStop::Lost(why) => {
                if let Some(unsafe_why) = shared.lost() {
                    let why = format!("{why}; not connecting again: {unsafe_why}");
                    shared.fail(DeviceError::NbdDisconnected { server: shared.name.clone(), why });
                    return;
                }
                match shared.reconnect(&why).and_then(|c| {
                    shared.install(&c).map_err(|source| DeviceError::Io { op: "connect", offset: 0, source })?;
                    Ok(c)
                }) {
                    Ok(c) => conn = c,
                    Err(e) => {
                        shared.fail(e);
                        return;
                    }
                }
            }
        }
    }
}

fn lost(e: std::io::Error) -> ReadStop {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        return ReadStop::Lost("the server closed the connection".into());
    }
    ReadStop::Lost(e.to_string())
}

/// Reads one reply (or one chunk of a structured reply) and hands it on.
fn read_reply(shared: &Shared, conn: &mut Conn) -> Result<(), ReadStop> {
    let r = &mut conn.reader;
    let mut m = [0u8; 4];
    r.read_exact(&mut m).map_err(lost)?;
    let magic = u32::from_be_bytes(m);
    let rest_len = proto::reply_rest_len(magic, conn.export.structured).map_err(ReadStop::Protocol)?;
    let mut rest = [0u8; 16];
    r.read_exact(&mut rest[..rest_len]).map_err(lost)?;
    let header = proto::decode_reply_header(magic, &rest[..rest_len]).map_err(ReadStop::Protocol)?;
    let unknown = |cookie: u64| ReadStop::Protocol(format!("a reply to cookie {cookie}, which is not in flight"));
    match header {
        ReplyHeader::Simple { error, cookie } => {
            let mut st = shared.state.lock();
            let p = st.pending.remove(&cookie).ok_or_else(|| unknown(cookie))?;
            if p.cover.as_ref().is_some_and(|c| c.covered() > 0) || p.error.is_some() {
                return Err(ReadStop::Protocol(format!("a simple reply to cookie {cookie} after structured chunks")));
            }
            if error != 0 {
                let e = DeviceError::Nbd { op: op_name(p.cmd), offset: p.offset, errno: error, message: String::new() };
                shared.complete(&mut st, p, Err(e));
                return Ok(());
            }
            if p.cmd != proto::CMD_READ {
                shared.complete(&mut st, p, Ok(Vec::new()));
                return Ok(());
            }
            drop(st);
            let mut buf = vec![0u8; p.len as usize];
            // Whatever happens to the connection now, this request is lost with it.
            let res = r.read_exact(&mut buf);
            let mut st = shared.state.lock();
            match res {
                Ok(()) => shared.complete(&mut st, p, Ok(buf)),
                Err(e) => {
                    let _ = p.tx.try_send(Outcome::Lost);
                    return Err(lost(e));
                }
            }
        }
        ReplyHeader::Chunk { flags, kind, cookie, len } => {
            let mut st = shared.state.lock();
            let p = st.pending.get_mut(&cookie).ok_or_else(|| unknown(cookie))?;
            let is_read = p.cmd == proto::CMD_READ;
            if kind == proto::REPLY_TYPE_OFFSET_DATA {
                if !is_read {
                    return Err(ReadStop::Protocol(format!("data in the reply to a {}", op_name(p.cmd))));
                }
                if len <= 8 || len - 8 > p.len {
                    return Err(ReadStop::Protocol(format!("a data chunk of {len} bytes for a read of {}", p.len)));
                }
                drop(st);
                let mut off = [0u8; 8];
                r.read_exact(&mut off).map_err(lost)?;
                let at = u64::from_be_bytes(off);
                let data_len = u64::from(len - 8);
                let mut st = shared.state.lock();
                let p = st.pending.get_mut(&cookie).ok_or_else(|| unknown(cookie))?;
                let (o, l) = (p.offset, p.len);
                let pos = p
                    .cover
                    .get_or_insert_with(|| ReadCover::new(o, l))
                    .claim(at, data_len)
                    .map_err(ReadStop::Protocol)?;
                let mut buf = std::mem::take(&mut p.buf);
                drop(st);
                if buf.len() != l as usize {
                    buf = vec![0u8; l as usize];
                }
                r.read_exact(&mut buf[pos..pos + data_len as usize]).map_err(lost)?;
                let mut st = shared.state.lock();
                let p = st.pending.get_mut(&cookie).ok_or_else(|| unknown(cookie))?;
                p.buf = buf;
            } else {
                if len > proto::MAX_META_LEN {
                    return Err(ReadStop::Protocol(format!("a reply chunk of type {kind} and {len} bytes")));
                }
                drop(st);
                let mut payload = vec![0u8; len as usize];
                r.read_exact(&mut payload).map_err(lost)?;
                let chunk = proto::decode_chunk(kind, &payload).map_err(ReadStop::Protocol)?;
                let mut st = shared.state.lock();
                let p = st.pending.get_mut(&cookie).ok_or_else(|| unknown(cookie))?;
                match chunk {
                    Chunk::None if flags & proto::REPLY_FLAG_DONE == 0 => {
                        return Err(ReadStop::Protocol("NBD_REPLY_TYPE_NONE without the DONE flag".into()));
                    }
                    Chunk::None => {}
                    Chunk::Hole { .. } if !is_read => {
                        return Err(ReadStop::Protocol(format!("a hole in the reply to a {}", op_name(p.cmd))));
                    }
                    Chunk::Hole { offset, len } => {
                        let (o, l) = (p.offset, p.len);
                        let cover = p.cover.get_or_insert_with(|| ReadCover::new(o, l));
                        let pos = cover.claim(offset, u64::from(len)).map_err(ReadStop::Protocol)?;
                        if p.buf.len() != l as usize {
                            p.buf = vec![0u8; l as usize];
                        }
                        p.buf[pos..pos + len as usize].fill(0);
                    }
                    Chunk::Error { errno, message, offset } => {
                        let at = offset.unwrap_or(p.offset);
                        p.error.get_or_insert((errno, message, at));
                    }
                }
            }
            if flags & proto::REPLY_FLAG_DONE != 0 {
                let mut st = shared.state.lock();
                let mut p = st.pending.remove(&cookie).ok_or_else(|| unknown(cookie))?;
                let result = if let Some((errno, message, offset)) = p.error.clone() {
                    Err(DeviceError::Nbd { op: op_name(p.cmd), offset, errno, message })
                } else if is_read {
                    let covered = p.cover.as_ref().map_or(0, ReadCover::covered);
                    if !p.cover.as_ref().is_some_and(ReadCover::complete) {
                        return Err(ReadStop::Protocol(format!(
                            "the reply to a read of {} bytes at {} covers {covered} bytes",
                            p.len, p.offset
                        )));
                    }
                    Ok(std::mem::take(&mut p.buf))
                } else {
                    Ok(Vec::new())
                };
                shared.complete(&mut st, p, result);
            }
        }
    }
    Ok(())
}

impl BlockDevice for NbdDevice {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        check_io(offset, buf.len(), self.len)?;
        let step = self.max_request;
        let reqs = buf
            .chunks_mut(step)
            .enumerate()
            .map(|(i, piece)| Req {
                cmd: proto::CMD_READ,
                flags: 0,
                offset: offset + (i * step) as u64,
                len: piece.len() as u32,
                data: None,
                dest: Some(piece),
            })
            .collect();
        self.run(reqs)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), DeviceError> {
        self.write_with(offset, buf, 0)
    }

    fn flush(&self) -> Result<(), DeviceError> {
        if self.shared.opts.read_only {
            return Err(DeviceError::ReadOnly);
        }
        if self.shared.flags & proto::FLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        self.run(vec![Req { cmd: proto::CMD_FLUSH, flags: 0, offset: 0, len: 0, data: None, dest: None }])
    }
}

impl Drop for NbdDevice {
    fn drop(&mut self) {
        let mut st = self.shared.state.lock();
        st.closing = true;
        drop(st);
        self.shared.changed.notify_all();
        if let Some(mut s) = self.shared.out.lock().stream.take() {
            let _ = send(&mut s, &proto::request_header(0, proto::CMD_DISC, 0, 0, 0), &[]);
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd_fake::{chunk, read_request, scripted, server_handshake, simple_reply, FakeConfig, FakeServer};
    use std::net::SocketAddr;

    const BS: usize = BLOCK_SIZE;
    const MIB: u64 = 1 << 20;

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1).collect()
    }

    fn quick() -> NbdOptions {
        NbdOptions { reconnect_for: Duration::from_secs(5), ..NbdOptions::default() }
    }

    #[test]
    fn reads_and_writes_with_every_negotiation() {
        for (structured, go) in [(true, true), (false, true), (true, false), (false, false)] {
            let mut cfg = FakeConfig::new("disk", 12 * MIB);
            cfg.structured = structured;
            cfg.go = go;
            let srv = FakeServer::start(cfg);
            let dev = NbdDevice::open(&srv.url(), &quick()).unwrap();
            assert_eq!(dev.len(), 12 * MIB);
            // Bigger than one request (MAX_REQUEST): split and sent together.
            let big = pattern(1, 5 << 20);
            dev.write_at(4 * MIB, &big).unwrap();
            let small = pattern(2, 3 * BS);
            dev.write_at(BS as u64, &small).unwrap();
            dev.flush().unwrap();
            let mut back = vec![0u8; big.len()];
            dev.read_at(4 * MIB, &mut back).unwrap();
            assert!(back == big, "structured={structured} go={go}: the big write reads back");
            let mut back = vec![0u8; 3 * BS];
            dev.read_at(BS as u64, &mut back).unwrap();
            assert_eq!(back, small);
            // Zeroes (a hole in the first half of a structured reply) next to data.
            let mut z = vec![7u8; 2 * BS];
            dev.read_at(2 * MIB, &mut z).unwrap();
            assert!(z.iter().all(|&b| b == 0));
            let disk = srv.disk();
            assert!(disk[4 << 20..9 << 20] == big[..] && disk[BS..4 * BS] == small[..]);
            assert!(matches!(dev.read_at(12 * MIB, &mut z), Err(DeviceError::OutOfRange { .. })));
            assert!(matches!(dev.write_at(3, &z), Err(DeviceError::Unaligned { .. })));
            drop(dev);
            let start = Instant::now();
            while srv.stats().disconnects == 0 && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_eq!(srv.stats().disconnects, 1, "dropping the device sends NBD_CMD_DISC");
            assert!(srv.stats().flushes >= 1);
        }
    }

    #[test]
    fn many_threads_share_one_connection() {
        let srv = FakeServer::start(FakeConfig::new("", 4 * MIB));
        let dev = Arc::new(NbdDevice::open(&srv.url(), &quick()).unwrap());
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let dev = dev.clone();
                std::thread::spawn(move || {
                    for k in 0..40u8 {
                        let at = (u64::from(t) * 64 + u64::from(k % 16)) * BS as u64;
                        let data = pattern(t.wrapping_mul(40).wrapping_add(k), BS);
                        dev.write_at(at, &data).unwrap();
                        let mut back = vec![0u8; BS];
                        dev.read_at(at, &mut back).unwrap();
                        assert_eq!(back, data, "thread {t} round {k}");
                    }
                    dev.flush().unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(srv.stats().connections, 1);
        assert_eq!(srv.stats().writes, 8 * 40);
    }

    #[test]
    fn callers_beyond_the_in_flight_limit_wait_their_turn() {
        let srv = FakeServer::start(FakeConfig::new("", 16 * MIB));
        let opts = NbdOptions { max_in_flight: 2, ..quick() };
        let dev = Arc::new(NbdDevice::open(&srv.url(), &opts).unwrap());
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let dev = dev.clone();
                std::thread::spawn(move || {
                    for k in 0..20u8 {
                        let at = (u64::from(t) * 32 + u64::from(k)) * BS as u64;
                        dev.write_at(at, &pattern(t ^ k, BS)).unwrap();
                    }
                    // One read split in 4 pieces of 4 MiB: more than the places.
                    let mut all = vec![0u8; 16 << 20];
                    dev.read_at(0, &mut all).unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let disk = srv.disk();
        for t in 0..8u8 {
            for k in 0..20u8 {
                let at = (usize::from(t) * 32 + usize::from(k)) * BS;
                assert!(disk[at..at + BS] == pattern(t ^ k, BS)[..]);
            }
        }
    }

    #[test]
    fn fua_and_trim() {
        let srv = FakeServer::start(FakeConfig::new("d", MIB));
        let dev = NbdDevice::open(&srv.url(), &quick()).unwrap();
        dev.write_at_fua(0, &pattern(3, 2 * BS)).unwrap();
        assert_eq!(srv.stats().fua_writes, 1);
        dev.trim(0, BS as u64).unwrap();
        assert_eq!(srv.stats().trims, 1);
        let mut b = vec![1u8; BS];
        dev.read_at(0, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0), "the fake server zeroes what is trimmed");
        // A server without FUA: a write and a flush.
        let mut cfg = FakeConfig::new("d", MIB);
        cfg.flags = 1 << 2;
        let srv = FakeServer::start(cfg);
        let dev = NbdDevice::open(&srv.url(), &quick()).unwrap();
        dev.write_at_fua(0, &pattern(3, BS)).unwrap();
        dev.trim(0, BS as u64).unwrap();
        let st = srv.stats();
        assert_eq!((st.fua_writes, st.flushes, st.trims), (0, 1, 0));
    }

    #[test]
    fn refusals_and_bad_urls() {
        let srv = FakeServer::start(FakeConfig::new("disk", MIB));
        let url = format!("nbd://{}/nosuch", srv.addr);
        match NbdDevice::open(&url, &quick()) {
            Err(e @ DeviceError::NbdRefused { .. }) => {
                assert!(e.to_string().contains("no export named \"nosuch\""), "{e}")
            }
            other => panic!("{other:?}"),
        }
        let mut cfg = FakeConfig::new("disk", MIB);
        cfg.go = false;
        let old = FakeServer::start(cfg);
        match NbdDevice::open(&format!("nbd://{}/nosuch", old.addr), &quick()) {
            Err(e @ DeviceError::NbdRefused { .. }) => assert!(e.to_string().contains("closed the connection"), "{e}"),
            other => panic!("{other:?}"),
        }
        let mut cfg = FakeConfig::new("ro", MIB);
        cfg.flags |= 1 << 1;
        let ro = FakeServer::start(cfg);
        assert!(matches!(NbdDevice::open(&ro.url(), &quick()), Err(DeviceError::NbdRefused { .. })));
        let dev = NbdDevice::open(&ro.url(), &NbdOptions { read_only: true, ..quick() }).unwrap();
        assert!(matches!(dev.write_at(0, &[0u8; BS]), Err(DeviceError::ReadOnly)));
        for bad in ["nbd://", "nbd://h:x/e", "nbd://h:0/"] {
            assert!(matches!(NbdDevice::open(bad, &quick()), Err(DeviceError::NbdUrl { .. })), "{bad}");
        }
        // Nothing listens: a connect error, not a hang.
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let r = NbdDevice::open(&format!("nbd://{free}/x"), &quick());
        assert!(matches!(r, Err(DeviceError::NbdConnect { .. })), "{r:?}");
    }

    #[test]
    fn a_dropped_connection_is_made_again_and_lost_writes_are_sent_again() {
        let srv = FakeServer::start(FakeConfig::new("d", MIB));
        let dev = Arc::new(NbdDevice::open(&srv.url(), &quick()).unwrap());
        for k in 0..4u8 {
            dev.write_at(u64::from(k) * BS as u64, &pattern(k, BS)).unwrap();
        }
        // Write 7 is never answered: the server drops the connection under it (and
        // under whatever else is in flight).
        srv.drop_at_write(7);
        let threads: Vec<_> = (4..12u8)
            .map(|k| {
                let dev = dev.clone();
                std::thread::spawn(move || dev.write_at(u64::from(k) * BS as u64, &pattern(k, BS)))
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        dev.flush().unwrap();
        for k in 12..16u8 {
            dev.write_at(u64::from(k) * BS as u64, &pattern(k, BS)).unwrap();
        }
        let disk = srv.disk();
        for k in 0..16u8 {
            let at = usize::from(k) * BS;
            assert!(disk[at..at + BS] == pattern(k, BS)[..], "block {k} after the reconnect");
            let mut b = vec![0u8; BS];
            dev.read_at(at as u64, &mut b).unwrap();
            assert_eq!(b, pattern(k, BS));
        }
        assert_eq!(srv.stats().connections, 2, "one reconnect");
        assert_eq!(dev.reconnects(), 1);
    }

    #[test]
    fn without_multi_conn_unflushed_writes_forbid_a_reconnect() {
        let mut cfg = FakeConfig::new("d", MIB);
        cfg.flags = 1 << 2; // FLUSH only
        let srv = FakeServer::start(cfg);
        let dev = NbdDevice::open(&srv.url(), &quick()).unwrap();
        // Flushed before the drop: reconnecting is safe.
        dev.write_at(0, &pattern(1, BS)).unwrap();
        dev.flush().unwrap();
        srv.drop_at_write(2);
        dev.write_at(BS as u64, &pattern(2, BS)).unwrap();
        assert_eq!(srv.stats().connections, 2);
        // The server has seen writes 1, 2 (dropped) and 2 again (its third); the
        // fourth is acknowledged and not flushed when the fifth's connection drops.
        dev.write_at(2 * BS as u64, &pattern(3, BS)).unwrap();
        srv.drop_at_write(5);
        match dev.write_at(3 * BS as u64, &pattern(4, BS)) {
            Err(e @ DeviceError::NbdDisconnected { .. }) => assert!(e.to_string().contains("not flushed"), "{e}"),
            other => panic!("{other:?}"),
        }
        let mut b = vec![0u8; BS];
        assert!(matches!(dev.read_at(0, &mut b), Err(DeviceError::NbdDisconnected { .. })), "later calls fail too");
        assert!(matches!(dev.flush(), Err(DeviceError::NbdDisconnected { .. })));
    }

    #[test]
    fn a_server_that_stays_away_fails_the_device() {
        let srv = FakeServer::start(FakeConfig::new("d", MIB));
        let opts = NbdOptions { reconnect_for: Duration::from_millis(300), ..quick() };
        let dev = NbdDevice::open(&srv.url(), &opts).unwrap();
        dev.write_at(0, &pattern(1, BS)).unwrap();
        dev.flush().unwrap();
        srv.go_away();
        let mut b = vec![0u8; BS];
        let r = dev.read_at(0, &mut b);
        assert!(matches!(r, Err(DeviceError::NbdDisconnected { .. })), "{r:?}");
        assert!(matches!(dev.write_at(0, &b), Err(DeviceError::NbdDisconnected { .. })));
    }

    /// A scripted server that does the handshake, reads one request and answers it
    /// with `reply(cookie, offset, len)`; then the test's one call must fail with an
    /// error `check` accepts (and never panic or hang).
    fn one_bad_reply(
        structured: bool,
        call: impl FnOnce(&NbdDevice) -> Result<(), DeviceError>,
        reply: impl FnOnce(u64, u64, u32) -> Vec<u8> + Send + 'static,
    ) -> DeviceError {
        let mut cfg = FakeConfig::new("x", MIB);
        cfg.structured = structured;
        let (addr, h) = scripted(move |mut s| {
            if server_handshake(&mut s, &cfg).is_err() {
                return;
            }
            if let Ok((_, _, cookie, offset, len, _)) = read_request(&mut s) {
                let _ = s.write_all(&reply(cookie, offset, len));
            }
            // Hold the connection until the client closes it.
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        });
        let dev = NbdDevice::open(&format!("nbd://{addr}/x"), &quick()).unwrap();
        let e = call(&dev).expect_err("the bad reply must fail the call");
        drop(dev);
        h.join().unwrap();
        e
    }

    fn read4k(d: &NbdDevice) -> Result<(), DeviceError> {
        d.read_at(0, &mut vec![0u8; BS])
    }

    fn write4k(d: &NbdDevice) -> Result<(), DeviceError> {
        d.write_at(0, &[9u8; BS])
    }

    fn protocol(e: &DeviceError, what: &str) {
        match e {
            DeviceError::NbdProtocol { why, .. } => assert!(why.contains(what), "{why:?} should say {what:?}"),
            other => panic!("expected a protocol error saying {what:?}, got {other:?}"),
        }
    }

    #[test]
    fn malformed_replies_are_protocol_errors() {
        let e = one_bad_reply(true, read4k, |c, _, _| {
            let mut m = 0xdead_beefu32.to_be_bytes().to_vec();
            m.extend_from_slice(&c.to_be_bytes());
            m
        });
        protocol(&e, "reply magic 0xdeadbeef");
        let e = one_bad_reply(true, write4k, |c, _, _| simple_reply(0, c + 1000));
        protocol(&e, "not in flight");
        // A data chunk longer than the read.
        let e = one_bad_reply(true, read4k, |c, o, l| {
            let mut p = o.to_be_bytes().to_vec();
            p.resize(8 + l as usize + 512, 1);
            chunk(1, 1, c, &p)
        });
        protocol(&e, "data chunk of");
        // A data chunk that claims a length of 4 GiB (only its header is sent).
        let e = one_bad_reply(true, read4k, |c, _, _| {
            let mut m = chunk(1, 1, c, &[]);
            let n = m.len();
            m[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
            m
        });
        protocol(&e, "data chunk of 4294967295 bytes");
        // A non-data chunk far over the limit.
        let e = one_bad_reply(true, write4k, |c, _, _| {
            let mut m = chunk(1, 0x8001, c, &[]);
            let n = m.len();
            m[n - 4..].copy_from_slice(&(proto::MAX_META_LEN + 1).to_be_bytes());
            m
        });
        protocol(&e, "reply chunk of type");
        // Data outside the read.
        let e = one_bad_reply(true, read4k, |c, o, l| {
            let mut p = (o + 8192).to_be_bytes().to_vec();
            p.resize(8 + l as usize, 1);
            chunk(1, 1, c, &p)
        });
        protocol(&e, "outside the read");
        // DONE with half the read covered.
        let e = one_bad_reply(true, read4k, |c, o, _| {
            let mut p = o.to_be_bytes().to_vec();
            p.resize(8 + 2048, 1);
            chunk(1, 1, c, &p)
        });
        protocol(&e, "covers 2048 bytes");
        // A structured chunk when none were negotiated.
        let e = one_bad_reply(false, read4k, |c, _, _| chunk(1, 0, c, &[]));
        protocol(&e, "not negotiated");
        // Data in the reply to a write; NONE without DONE; an unknown chunk type.
        let e = one_bad_reply(true, write4k, |c, o, _| {
            let mut p = o.to_be_bytes().to_vec();
            p.resize(8 + 512, 1);
            chunk(1, 1, c, &p)
        });
        protocol(&e, "data in the reply to a write");
        let e = one_bad_reply(true, write4k, |c, _, _| chunk(0, 0, c, &[]));
        protocol(&e, "without the DONE flag");
        let e = one_bad_reply(true, write4k, |c, _, _| chunk(1, 77, c, &[]));
        protocol(&e, "unknown reply chunk type 77");
        // A truncated error chunk.
        let e = one_bad_reply(true, write4k, |c, _, _| chunk(1, 0x8001, c, &[0, 0, 0, 5, 0, 200, b'x']));
        protocol(&e, "error message of 200 bytes");
    }

    #[test]
    fn server_errors_are_reported_with_their_message() {
        let e = one_bad_reply(true, read4k, |c, _, _| {
            let mut p = 5u32.to_be_bytes().to_vec();
            p.extend_from_slice(&9u16.to_be_bytes());
            p.extend_from_slice(b"media bad");
            chunk(1, 0x8001, c, &p)
        });
        match e {
            DeviceError::Nbd { op: "read", errno: 5, ref message, .. } => assert_eq!(message, "media bad"),
            other => panic!("{other:?}"),
        }
        let e = one_bad_reply(false, write4k, |c, _, _| simple_reply(28, c));
        assert!(matches!(e, DeviceError::Nbd { op: "write", errno: 28, .. }), "{e:?}");
    }

    /// A server that sends `bytes` as its greeting and closes.
    fn handshake_error(bytes: Vec<u8>) -> DeviceError {
        let (addr, h) = scripted(move |mut s| {
            let _ = s.write_all(&bytes);
            let _ = s.shutdown(Shutdown::Write);
            let mut sink = [0u8; 256];
            let _ = s.read(&mut sink);
        });
        let e = NbdDevice::open(&format!("nbd://{addr}/x"), &quick()).expect_err("a bad greeting");
        h.join().unwrap();
        e
    }

    #[test]
    fn bad_handshakes_are_refused_clearly() {
        let e = handshake_error(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec());
        protocol(&e, "not an NBD server");
        let mut old = 0x4e42_444d_4147_4943u64.to_be_bytes().to_vec();
        old.extend_from_slice(&0x0000_4202_8186_1253u64.to_be_bytes());
        assert!(matches!(handshake_error(old), DeviceError::NbdRefused { .. }));
        let mut not_fixed = 0x4e42_444d_4147_4943u64.to_be_bytes().to_vec();
        not_fixed.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
        not_fixed.extend_from_slice(&0u16.to_be_bytes());
        assert!(matches!(handshake_error(not_fixed), DeviceError::NbdRefused { .. }));
        // A greeting cut short: an error, not a panic.
        let e = handshake_error(vec![0x4e, 0x42]);
        assert!(matches!(e, DeviceError::NbdConnect { ref why, .. } if why.starts_with("handshake: ")), "{e:?}");
        // Option replies that break the rules.
        let bad_option = |reply: Box<dyn FnOnce(&mut TcpStream) + Send>| -> DeviceError {
            let (addr, h) = scripted(move |mut s| {
                let mut g = 0x4e42_444d_4147_4943u64.to_be_bytes().to_vec();
                g.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
                g.extend_from_slice(&3u16.to_be_bytes());
                let _ = s.write_all(&g);
                let mut buf = [0u8; 4 + 16];
                let _ = s.read_exact(&mut buf);
                reply(&mut s);
                let mut sink = [0u8; 256];
                let _ = s.read(&mut sink);
            });
            let e = NbdDevice::open(&format!("nbd://{addr}/x"), &quick()).expect_err("a bad option reply");
            h.join().unwrap();
            e
        };
        let e = bad_option(Box::new(|s| {
            let _ = crate::nbd_fake::opt_reply(s, 7, 1, &[]);
        }));
        protocol(&e, "reply to option 7 while option 8 was asked");
        let e = bad_option(Box::new(|s| {
            let mut m = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
            m.extend_from_slice(&8u32.to_be_bytes());
            m.extend_from_slice(&1u32.to_be_bytes());
            m.extend_from_slice(&u32::MAX.to_be_bytes());
            let _ = s.write_all(&m);
        }));
        protocol(&e, "option reply of 4294967295 bytes");
        let e = bad_option(Box::new(|s| {
            let _ = s.write_all(&[0u8; 20]);
        }));
        protocol(&e, "option reply magic");
        // GO acknowledged without the export's size.
        let e = bad_option(Box::new(|s| {
            let _ = crate::nbd_fake::opt_reply(s, 8, 1, &[]);
            let mut go = [0u8; 16 + 4 + 1 + 4];
            let _ = s.read_exact(&mut go);
            let _ = crate::nbd_fake::opt_reply(s, 7, 1, &[]);
        }));
        protocol(&e, "without NBD_INFO_EXPORT");
        let _: Option<SocketAddr> = None;
    }

    fn qemu_image(size: u64) -> (tempfile::TempDir, std::path::PathBuf) {
        // A real disk file system (/tmp may be tmpfs).
        let dir = tempfile::Builder::new().prefix("concord-nbd-test").tempdir_in("/var/tmp").unwrap();
        let img = dir.path().join("disk.img");
        std::fs::File::create(&img).unwrap().set_len(size).unwrap();
        (dir, img)
    }

    #[test]
    fn qemu_nbd_writes_reach_the_image_file() {
        const T: &str = "qemu_nbd_writes_reach_the_image_file";
        if !crate::nbd_test::have_qemu_nbd(T) {
            return;
        }
        let (_dir, img) = qemu_image(64 * MIB);
        let q = crate::nbd_test::QemuNbd::start(&img, "disk");
        let dev = Arc::new(NbdDevice::open(&q.url, &quick()).unwrap());
        assert_eq!(dev.len(), 64 * MIB);
        let f = dev.flags();
        for (bit, what) in [
            (proto::FLAG_SEND_FLUSH, "flush"),
            (proto::FLAG_SEND_FUA, "FUA"),
            (proto::FLAG_CAN_MULTI_CONN, "multi-conn"),
        ] {
            assert!(f & bit != 0, "qemu-nbd --shared=8 offers {what} (flags {f:#x})");
        }
        let big = pattern(5, 5 << 20);
        dev.write_at(8 * MIB, &big).unwrap();
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let dev = dev.clone();
                std::thread::spawn(move || {
                    for k in 0..32u8 {
                        let at = (u64::from(t) * 32 + u64::from(k)) * BS as u64;
                        dev.write_at(at, &pattern(t * 32 + k, BS)).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        dev.write_at_fua(32 * MIB, &pattern(9, 2 * BS)).unwrap();
        dev.flush().unwrap();
        let mut back = vec![0u8; big.len()];
        dev.read_at(8 * MIB, &mut back).unwrap();
        assert!(back == big);
        // Never written: zeroes (qemu-nbd answers with a hole).
        let mut z = vec![1u8; 8 * BS];
        dev.read_at(40 * MIB, &mut z).unwrap();
        assert!(z.iter().all(|&b| b == 0));
        dev.trim(48 * MIB, 16 * BS as u64).unwrap();
        let raw = std::fs::read(&img).unwrap();
        assert!(raw[8 << 20..13 << 20] == big[..], "the big write is in the image file");
        for n in 0..128usize {
            assert!(raw[n * BS..(n + 1) * BS] == pattern(n as u8, BS)[..], "block {n} in the image file");
        }
        assert!(raw[32 << 20..(32 << 20) + 2 * BS] == pattern(9, 2 * BS)[..]);
    }

    #[test]
    fn qemu_nbd_connections_cut_mid_stream_lose_nothing() {
        const T: &str = "qemu_nbd_connections_cut_mid_stream_lose_nothing";
        if !crate::nbd_test::have_qemu_nbd(T) {
            return;
        }
        let (_dir, img) = qemu_image(16 * MIB);
        let q = crate::nbd_test::QemuNbd::start(&img, "disk");
        let proxy = crate::nbd_fake::CutProxy::start(format!("127.0.0.1:{}", q.port).parse().unwrap());
        let dev = Arc::new(NbdDevice::open(&format!("nbd://{}/disk", proxy.addr), &quick()).unwrap());
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        // Four writers, each rewriting its 64 blocks 6 times (round r writes
        // pattern(r * 16 + t) everywhere), while the proxy cuts the connection
        // three times under them.
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let (dev, done) = (dev.clone(), done.clone());
                std::thread::spawn(move || {
                    for r in 0..6u8 {
                        for k in 0..64u64 {
                            let at = (u64::from(t) * 64 + k) * BS as u64;
                            dev.write_at(at, &pattern(r * 16 + t, BS)).unwrap();
                            done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        for cut_at in [200, 600, 1100] {
            while done.load(std::sync::atomic::Ordering::SeqCst) < cut_at {
                std::thread::sleep(Duration::from_millis(1));
            }
            proxy.cut();
        }
        for t in threads {
            t.join().unwrap();
        }
        dev.flush().unwrap();
        let raw = std::fs::read(&img).unwrap();
        for t in 0..4u8 {
            for k in 0..64usize {
                let n = usize::from(t) * 64 + k;
                assert!(raw[n * BS..(n + 1) * BS] == pattern(5 * 16 + t, BS)[..], "block {n} holds the last round");
            }
        }
        let mut b = vec![0u8; BS];
        dev.read_at(0, &mut b).unwrap();
        assert_eq!(b, pattern(5 * 16, BS));
        assert_eq!(dev.reconnects(), 3, "each cut broke a live connection, made again each time");
    }
}
