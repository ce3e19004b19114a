//! A tiny NBD server in the test process, for the tests of [`crate::NbdDevice`] and
//! of the handshake: an export held in memory, the options and flags a test asks
//! for, connections it can drop on purpose, and scripted servers that send what a
//! test wants (malformed replies). Loopback only.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// What the fake server offers.
#[derive(Clone, Debug)]
pub struct FakeConfig {
    pub export: String,
    pub size: u64,
    /// Accept NBD_OPT_STRUCTURED_REPLY.
    pub structured: bool,
    /// Support NBD_OPT_GO (otherwise answer it NBD_REP_ERR_UNSUP).
    pub go: bool,
    /// Transmission flags besides HAS_FLAGS.
    pub flags: u16,
}

impl FakeConfig {
    pub fn new(export: &str, size: u64) -> FakeConfig {
        FakeConfig {
            export: export.into(),
            size,
            structured: true,
            go: true,
            flags: (1 << 2) | (1 << 3) | (1 << 5) | (1 << 8), // FLUSH, FUA, TRIM, MULTI_CONN
        }
    }
}

/// What the server saw.
#[derive(Default, Debug)]
pub struct FakeStats {
    pub connections: usize,
    pub writes: usize,
    pub fua_writes: usize,
    pub flushes: usize,
    pub trims: usize,
    pub disconnects: usize,
}

struct Inner {
    cfg: FakeConfig,
    disk: Mutex<Vec<u8>>,
    stats: Mutex<FakeStats>,
    /// Drop the connection instead of answering the write with this number (1-based,
    /// counted over the server's life); 0: never.
    drop_write: AtomicUsize,
    /// Refuse new connections (close them at once).
    refuse: AtomicBool,
    stop: AtomicBool,
    conns: Mutex<Vec<TcpStream>>,
}

/// A running fake server; stops on drop.
pub struct FakeServer {
    inner: Arc<Inner>,
    pub addr: SocketAddr,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl FakeServer {
    pub fn start(cfg: FakeConfig) -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let size = cfg.size as usize;
        let inner = Arc::new(Inner {
            cfg,
            disk: Mutex::new(vec![0u8; size]),
            stats: Mutex::default(),
            drop_write: AtomicUsize::new(0),
            refuse: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            conns: Mutex::default(),
        });
        let i = inner.clone();
        let accept = std::thread::spawn(move || {
            for s in listener.incoming() {
                if i.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(s) = s else { continue };
                if i.refuse.load(Ordering::SeqCst) {
                    continue;
                }
                i.conns.lock().unwrap().push(s.try_clone().unwrap());
                let i2 = i.clone();
                std::thread::spawn(move || serve(&i2, s));
            }
        });
        FakeServer { inner, addr, accept: Some(accept) }
    }

    pub fn url(&self) -> String {
        format!("nbd://{}/{}", self.addr, self.inner.cfg.export)
    }

    pub fn disk(&self) -> Vec<u8> {
        self.inner.disk.lock().unwrap().clone()
    }

    pub fn stats(&self) -> std::sync::MutexGuard<'_, FakeStats> {
        self.inner.stats.lock().unwrap()
    }

    /// Drops the connection that carries write number `n` (1-based, over the
    /// server's life), before applying or answering it.
    pub fn drop_at_write(&self, n: usize) {
        self.inner.drop_write.store(n, Ordering::SeqCst);
    }

    /// Closes every connection and refuses new ones.
    pub fn go_away(&self) {
        self.inner.refuse.store(true, Ordering::SeqCst);
        for c in self.inner.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        for c in self.inner.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

fn rd<const N: usize>(s: &mut impl Read) -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    s.read_exact(&mut b)?;
    Ok(b)
}

/// Sends an option reply.
pub fn opt_reply(s: &mut impl Write, opt: u32, kind: u32, data: &[u8]) -> std::io::Result<()> {
    let mut m = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m)
}

/// The server side of the handshake; Ok(structured) once in transmission, Err if the
/// client went away or asked for an export that does not exist.
pub fn server_handshake(s: &mut TcpStream, cfg: &FakeConfig) -> std::io::Result<bool> {
    let mut g = 0x4e42_444d_4147_4943u64.to_be_bytes().to_vec();
    g.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    g.extend_from_slice(&3u16.to_be_bytes()); // FIXED_NEWSTYLE | NO_ZEROES
    s.write_all(&g)?;
    let cflags = u32::from_be_bytes(rd::<4>(s)?);
    let no_zeroes = cflags & 2 != 0;
    let mut structured = false;
    let flags = cfg.flags | 1;
    loop {
        let h = rd::<16>(s)?;
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap()) as usize;
        let mut data = vec![0u8; len];
        s.read_exact(&mut data)?;
        match opt {
            8 if cfg.structured => {
                structured = true;
                opt_reply(s, 8, 1, &[])?;
            }
            7 if cfg.go => {
                let nlen = u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize;
                let name = String::from_utf8_lossy(&data[4..4 + nlen]).into_owned();
                if name != cfg.export {
                    opt_reply(s, 7, (1 << 31) + 6, b"no such export")?;
                    continue;
                }
                let mut info = 0u16.to_be_bytes().to_vec();
                info.extend_from_slice(&cfg.size.to_be_bytes());
                info.extend_from_slice(&flags.to_be_bytes());
                opt_reply(s, 7, 3, &info)?;
                opt_reply(s, 7, 1, &[])?;
                return Ok(structured);
            }
            1 => {
                if String::from_utf8_lossy(&data) != cfg.export {
                    return Err(std::io::Error::other("no such export"));
                }
                let mut m = cfg.size.to_be_bytes().to_vec();
                m.extend_from_slice(&flags.to_be_bytes());
                if !no_zeroes {
                    m.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&m)?;
                return Ok(structured);
            }
            o => opt_reply(s, o, (1 << 31) + 1, &[])?,
        }
    }
}

/// One request: (flags, cmd, cookie, offset, len, data).
pub fn read_request(s: &mut impl Read) -> std::io::Result<(u16, u16, u64, u64, u32, Vec<u8>)> {
    let h = rd::<28>(s)?;
    let flags = u16::from_be_bytes([h[4], h[5]]);
    let cmd = u16::from_be_bytes([h[6], h[7]]);
    let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
    let offset = u64::from_be_bytes(h[16..24].try_into().unwrap());
    let len = u32::from_be_bytes(h[24..28].try_into().unwrap());
    let mut data = Vec::new();
    if cmd == 1 {
        data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
    }
    Ok((flags, cmd, cookie, offset, len, data))
}

pub fn simple_reply(error: u32, cookie: u64) -> Vec<u8> {
    let mut m = 0x6744_6698u32.to_be_bytes().to_vec();
    m.extend_from_slice(&error.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m
}

pub fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut m = 0x668e_33efu32.to_be_bytes().to_vec();
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    m.extend_from_slice(payload);
    m
}

/// Serves one connection, and closes it when done (the server keeps a clone of
/// every connection, for [`FakeServer::go_away`]).
fn serve(i: &Inner, s: TcpStream) {
    serve_requests(i, s.try_clone().unwrap());
    let _ = s.shutdown(Shutdown::Both);
}

fn serve_requests(i: &Inner, mut s: TcpStream) {
    i.stats.lock().unwrap().connections += 1;
    let Ok(structured) = server_handshake(&mut s, &i.cfg) else { return };
    while let Ok((flags, cmd, cookie, offset, len, data)) = read_request(&mut s) {
        let (o, l) = (offset as usize, len as usize);
        let mut out = Vec::new();
        match cmd {
            0 => {
                let d = i.disk.lock().unwrap()[o..o + l].to_vec();
                if !structured {
                    out = simple_reply(0, cookie);
                    out.extend_from_slice(&d);
                } else {
                    // The second half first, then the first half (as a hole if it is
                    // all zeroes), then an empty DONE chunk.
                    let half = (l / 2) & !511;
                    if half < l {
                        let mut p = (offset + half as u64).to_be_bytes().to_vec();
                        p.extend_from_slice(&d[half..]);
                        out.extend(chunk(0, 1, cookie, &p));
                    }
                    if half > 0 {
                        if d[..half].iter().all(|&b| b == 0) {
                            let mut p = offset.to_be_bytes().to_vec();
                            p.extend_from_slice(&(half as u32).to_be_bytes());
                            out.extend(chunk(0, 2, cookie, &p));
                        } else {
                            let mut p = offset.to_be_bytes().to_vec();
                            p.extend_from_slice(&d[..half]);
                            out.extend(chunk(0, 1, cookie, &p));
                        }
                    }
                    out.extend(chunk(1, 0, cookie, &[]));
                }
            }
            1 => {
                let n = {
                    let mut st = i.stats.lock().unwrap();
                    st.writes += 1;
                    st.fua_writes += usize::from(flags & 1 != 0);
                    st.writes
                };
                if i.drop_write.load(Ordering::SeqCst) == n {
                    let _ = s.shutdown(Shutdown::Both);
                    return;
                }
                i.disk.lock().unwrap()[o..o + l].copy_from_slice(&data);
                out = simple_reply(0, cookie);
            }
            2 => {
                i.stats.lock().unwrap().disconnects += 1;
                return;
            }
            3 => {
                i.stats.lock().unwrap().flushes += 1;
                out = if structured { chunk(1, 0, cookie, &[]) } else { simple_reply(0, cookie) };
            }
            4 => {
                i.stats.lock().unwrap().trims += 1;
                i.disk.lock().unwrap()[o..o + l].fill(0);
                out = simple_reply(0, cookie);
            }
            _ => out = simple_reply(22, cookie),
        }
        if s.write_all(&out).is_err() {
            return;
        }
    }
}

/// A server for one connection that runs `f` on it (after nothing: `f` does the
/// handshake too, with [`server_handshake`] or by hand).
pub fn scripted(f: impl FnOnce(TcpStream) + Send + 'static) -> (SocketAddr, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        if let Ok((s, _)) = listener.accept() {
            f(s);
        }
    });
    (addr, h)
}

/// A TCP proxy in front of a server that can cut every connection through it at
/// once (a network failure, as the client sees it); stops on drop.
pub struct CutProxy {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl CutProxy {
    pub fn start(target: SocketAddr) -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (st, cs) = (stop.clone(), conns.clone());
        let accept = std::thread::spawn(move || {
            for c in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(c) = c else { continue };
                let Ok(s) = TcpStream::connect(target) else { continue };
                let _ = (c.set_nodelay(true), s.set_nodelay(true));
                cs.lock().unwrap().extend([c.try_clone().unwrap(), s.try_clone().unwrap()]);
                let pump = |mut from: TcpStream, mut to: TcpStream| {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = (from.shutdown(Shutdown::Both), to.shutdown(Shutdown::Both));
                    });
                };
                pump(c.try_clone().unwrap(), s.try_clone().unwrap());
                pump(s, c);
            }
        });
        CutProxy { addr, stop, conns, accept: Some(accept) }
    }

    /// Cuts every connection through the proxy now.
    pub fn cut(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        self.cut();
    }
}
