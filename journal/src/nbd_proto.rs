//! The NBD wire format, as `doc/proto.md` of the NBD project describes it: the
//! `nbd://` URL, the fixed-newstyle handshake (over any `Read + Write`), request
//! headers, and the decoding of simple and structured replies. Everything here is
//! plain functions over bytes; [`crate::NbdDevice`] moves them over TCP.
//!
//! Integers on the wire are big-endian. Bytes from the server never panic: every
//! length is checked before it is used, and what does not fit the protocol is a
//! [`WireError::Protocol`] naming what was wrong.

use std::collections::BTreeMap;
use std::io::{Read, Write};

/// The port an NBD server listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 10809;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
const CLIENT_NO_ZEROES: u32 = 1 << 1;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR: u32 = 1 << 31;
const REP_ERR_UNSUP: u32 = REP_ERR + 1;
const REP_ERR_POLICY: u32 = REP_ERR + 2;
const REP_ERR_INVALID: u32 = REP_ERR + 3;
const REP_ERR_TLS_REQD: u32 = REP_ERR + 5;
const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;
const REP_ERR_SHUTDOWN: u32 = REP_ERR + 7;
const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR + 8;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags (NBD_FLAG_*), from the server's export information.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// The server accepts NBD_CMD_FLUSH.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// The server accepts NBD_CMD_FLAG_FUA on writes.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// The server accepts NBD_CMD_TRIM.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// A flush on one connection covers the writes completed on every connection.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Commands (NBD_CMD_*).
pub const CMD_READ: u16 = 0;
/// NBD_CMD_WRITE.
pub const CMD_WRITE: u16 = 1;
/// NBD_CMD_DISC: the client is leaving.
pub const CMD_DISC: u16 = 2;
/// NBD_CMD_FLUSH.
pub const CMD_FLUSH: u16 = 3;
/// NBD_CMD_TRIM.
pub const CMD_TRIM: u16 = 4;
/// NBD_CMD_FLAG_FUA: the write is durable when its reply comes.
pub const CMD_FLAG_FUA: u16 = 1 << 0;

const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The first four bytes of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// The first four bytes of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// NBD_REPLY_FLAG_DONE: the last chunk of a structured reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// NBD_REPLY_TYPE_OFFSET_DATA: a 64-bit offset, then data.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_NONE: u16 = 0;
const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT + 2;

/// Size of a request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Largest request payload any NBD server must accept (32 MiB), and the most this
/// client ever asks for in one request.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option reply or non-data reply chunk this client reads (the protocol's
/// strings are at most 4096 bytes; anything much longer is a broken server).
pub const MAX_META_LEN: u32 = 64 << 10;

/// What went wrong on the wire, before the device names the server in it.
#[derive(Debug)]
pub enum WireError {
    /// The socket failed or closed.
    Io(std::io::Error),
    /// The server refused what the client asked for.
    Refused(String),
    /// The server broke the protocol.
    Protocol(String),
}

impl From<std::io::Error> for WireError {
    fn from(e: std::io::Error) -> WireError {
        WireError::Io(e)
    }
}

/// A parsed `nbd://HOST[:PORT]/[EXPORT]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUrl {
    /// Host name or address (an IPv6 address without its brackets).
    pub host: String,
    /// TCP port ([`DEFAULT_PORT`] if the URL names none).
    pub port: u16,
    /// Export name (may be empty: the server's default export).
    pub export: String,
}

impl NbdUrl {
    /// Whether a device argument names an NBD export rather than a path.
    pub fn is_nbd(arg: &str) -> bool {
        arg.starts_with("nbd://")
    }

    /// Parses `nbd://HOST[:PORT]/[EXPORT]`; `[v6addr]` for IPv6. The export is the
    /// rest of the path after the first `/`, taken as it is (no %-decoding).
    pub fn parse(url: &str) -> Result<NbdUrl, String> {
        let rest = url.strip_prefix("nbd://").ok_or("it does not start with nbd://")?;
        let (authority, export) = match rest.split_once('/') {
            Some((a, e)) => (a, e),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err("user names are not supported".into());
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or("an IPv6 address without its closing ]")?;
            match after {
                "" => (h, None),
                p => (h, Some(p.strip_prefix(':').ok_or("junk after the IPv6 address")?)),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err("no host".into());
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => match p.parse::<u16>() {
                Ok(0) | Err(_) => return Err(format!("bad port {p:?}")),
                Ok(n) => n,
            },
        };
        if export.len() > 4096 {
            return Err("export name longer than 4096 bytes".into());
        }
        if export.contains('\0') || export.contains('?') || export.contains('#') {
            return Err("the export name holds NUL, ? or #".into());
        }
        Ok(NbdUrl { host: host.to_string(), port, export: export.to_string() })
    }

    /// `host:port` for connecting (brackets around an IPv6 address).
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl std::fmt::Display for NbdUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "nbd://{}/{}", self.addr(), self.export)
    }
}

/// What the handshake agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Export {
    /// Size of the export in bytes.
    pub size: u64,
    /// Transmission flags (`FLAG_*`).
    pub flags: u16,
    /// Structured replies are in use.
    pub structured: bool,
    /// Largest payload of one request.
    pub max_payload: u32,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn read_u16(r: &mut impl Read) -> std::io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn send_option(w: &mut impl Write, option: u32, data: &[u8]) -> std::io::Result<()> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    w.write_all(&m)?;
    w.flush()
}

/// One option reply: (reply type, data).
fn read_option_reply(r: &mut impl Read, option: u32) -> Result<(u32, Vec<u8>), WireError> {
    let mut h = [0u8; 20];
    r.read_exact(&mut h)?;
    let (magic, opt, kind, len) = (be64(&h), be32(&h[8..]), be32(&h[12..]), be32(&h[16..]));
    if magic != OPT_REPLY_MAGIC {
        return Err(WireError::Protocol(format!("option reply magic {magic:#x}")));
    }
    if opt != option {
        return Err(WireError::Protocol(format!("reply to option {opt} while option {option} was asked")));
    }
    if len > MAX_META_LEN {
        return Err(WireError::Protocol(format!("option reply of {len} bytes")));
    }
    let mut data = vec![0u8; len as usize];
    r.read_exact(&mut data)?;
    Ok((kind, data))
}

/// Words for an error reply to an option.
fn option_error(kind: u32, data: &[u8], export: &str) -> String {
    let what = match kind {
        REP_ERR_UNSUP => "option not supported".to_string(),
        REP_ERR_POLICY => "forbidden by the server's policy".to_string(),
        REP_ERR_INVALID => "invalid request".to_string(),
        REP_ERR_TLS_REQD => "the server requires TLS (not supported by this client)".to_string(),
        REP_ERR_UNKNOWN => format!("no export named {export:?}"),
        REP_ERR_SHUTDOWN => "the server is shutting down".to_string(),
        REP_ERR_BLOCK_SIZE_REQD => "the export requires block size negotiation".to_string(),
        k => format!("error {k:#x}"),
    };
    let msg = String::from_utf8_lossy(data);
    if msg.trim().is_empty() {
        what
    } else {
        format!("{what}: {}", msg.trim())
    }
}

/// The client's side of the fixed-newstyle handshake for `export`: asks for
/// structured replies, then NBD_OPT_GO (with the block size information), or, from a
/// server that lacks GO, NBD_OPT_EXPORT_NAME.
pub fn handshake<S: Read + Write>(s: &mut S, export: &str) -> Result<Export, WireError> {
    let magic = read_u64(s)?;
    if magic != NBDMAGIC {
        return Err(WireError::Protocol(format!("not an NBD server (greeting {magic:#018x})")));
    }
    match read_u64(s)? {
        IHAVEOPT => {}
        OLDSTYLE_MAGIC => return Err(WireError::Refused("the server speaks the oldstyle handshake only".into())),
        m => return Err(WireError::Protocol(format!("greeting magic {m:#018x}"))),
    }
    let hflags = read_u16(s)?;
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(WireError::Refused("the server does not speak the fixed-newstyle handshake".into()));
    }
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let cflags = CLIENT_FIXED_NEWSTYLE | if no_zeroes { CLIENT_NO_ZEROES } else { 0 };
    s.write_all(&cflags.to_be_bytes())?;

    send_option(s, OPT_STRUCTURED_REPLY, &[])?;
    let structured = match read_option_reply(s, OPT_STRUCTURED_REPLY)? {
        (REP_ACK, _) => true,
        (k, _) if k & REP_ERR != 0 => false,
        (k, _) => return Err(WireError::Protocol(format!("reply type {k} to NBD_OPT_STRUCTURED_REPLY"))),
    };

    let mut go = Vec::with_capacity(8 + export.len());
    go.extend_from_slice(&(export.len() as u32).to_be_bytes());
    go.extend_from_slice(export.as_bytes());
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &go)?;
    let mut info: Option<(u64, u16)> = None;
    let mut max_payload = MAX_PAYLOAD;
    loop {
        match read_option_reply(s, OPT_GO)? {
            (REP_INFO, d) => {
                if d.len() < 2 {
                    return Err(WireError::Protocol(format!("NBD_REP_INFO of {} bytes", d.len())));
                }
                match be16(&d) {
                    INFO_EXPORT if d.len() == 12 => info = Some((be64(&d[2..]), be16(&d[10..]))),
                    INFO_BLOCK_SIZE if d.len() == 14 => {
                        let (min, max) = (be32(&d[2..]), be32(&d[10..]));
                        if min > crate::BLOCK_SIZE as u32 || max < crate::BLOCK_SIZE as u32 {
                            return Err(WireError::Refused(format!(
                                "the export's block sizes ({min} to {max} bytes) exclude {}",
                                crate::BLOCK_SIZE
                            )));
                        }
                        max_payload = max.min(MAX_PAYLOAD);
                    }
                    INFO_EXPORT | INFO_BLOCK_SIZE => {
                        return Err(WireError::Protocol(format!("NBD_REP_INFO type {} of {} bytes", be16(&d), d.len())))
                    }
                    _ => {} // information this client did not ask for: ignored.
                }
            }
            (REP_ACK, _) => {
                let (size, flags) =
                    info.ok_or_else(|| WireError::Protocol("NBD_OPT_GO acked without NBD_INFO_EXPORT".into()))?;
                return Ok(Export { size, flags, structured, max_payload });
            }
            (REP_ERR_UNSUP, _) => break,
            (k, d) if k & REP_ERR != 0 => return Err(WireError::Refused(option_error(k, &d, export))),
            (k, _) => return Err(WireError::Protocol(format!("reply type {k} to NBD_OPT_GO"))),
        }
    }

    // A server without NBD_OPT_GO: it answers EXPORT_NAME with the export's size and
    // flags, or closes the connection if there is no such export.
    send_option(s, OPT_EXPORT_NAME, export.as_bytes())?;
    let mut h = vec![0u8; if no_zeroes { 10 } else { 134 }];
    match s.read_exact(&mut h) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(WireError::Refused(format!("the server closed the connection (no export named {export:?}?)")));
        }
        Err(e) => return Err(e.into()),
    }
    Ok(Export { size: be64(&h), flags: be16(&h[8..]), structured, max_payload })
}

/// A request header.
pub fn request_header(flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) -> [u8; REQUEST_HEADER_LEN] {
    let mut h = [0u8; REQUEST_HEADER_LEN];
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&cmd.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&len.to_be_bytes());
    h
}

/// The header of a reply, after its magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply; for a successful read, the data follows.
    Simple { error: u32, cookie: u64 },
    /// A structured reply chunk; `len` bytes of payload follow.
    Chunk { flags: u16, kind: u16, cookie: u64, len: u32 },
}

/// How many header bytes follow a reply's magic, or why the magic is wrong.
pub fn reply_rest_len(magic: u32, structured: bool) -> Result<usize, String> {
    match magic {
        SIMPLE_REPLY_MAGIC => Ok(12),
        STRUCTURED_REPLY_MAGIC if structured => Ok(16),
        STRUCTURED_REPLY_MAGIC => Err("a structured reply, which was not negotiated".into()),
        m => Err(format!("reply magic {m:#010x}")),
    }
}

/// Decodes the `rest` of a reply header ([`reply_rest_len`] bytes) after `magic`.
pub fn decode_reply_header(magic: u32, rest: &[u8]) -> Result<ReplyHeader, String> {
    match magic {
        SIMPLE_REPLY_MAGIC if rest.len() == 12 => {
            Ok(ReplyHeader::Simple { error: be32(rest), cookie: be64(&rest[4..]) })
        }
        STRUCTURED_REPLY_MAGIC if rest.len() == 16 => Ok(ReplyHeader::Chunk {
            flags: be16(rest),
            kind: be16(&rest[2..]),
            cookie: be64(&rest[4..]),
            len: be32(&rest[12..]),
        }),
        m => Err(format!("reply header of {} bytes after magic {m:#010x}", rest.len())),
    }
}

/// A structured reply chunk other than OFFSET_DATA (whose data the device reads
/// straight into the caller's buffer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// NBD_REPLY_TYPE_NONE.
    None,
    /// NBD_REPLY_TYPE_OFFSET_HOLE: `len` bytes of zeroes at `offset`.
    Hole { offset: u64, len: u32 },
    /// An error chunk (NBD_REPLY_TYPE_ERROR, _ERROR_OFFSET, or one this client does
    /// not know, which it must still treat as an error).
    Error { errno: u32, message: String, offset: Option<u64> },
}

/// Decodes the payload of a non-data chunk of type `kind`.
pub fn decode_chunk(kind: u16, p: &[u8]) -> Result<Chunk, String> {
    match kind {
        REPLY_TYPE_NONE if p.is_empty() => Ok(Chunk::None),
        REPLY_TYPE_NONE => Err(format!("NBD_REPLY_TYPE_NONE with {} bytes of payload", p.len())),
        REPLY_TYPE_OFFSET_HOLE if p.len() == 12 => {
            let len = be32(&p[8..]);
            if len == 0 {
                return Err("a hole of 0 bytes".into());
            }
            Ok(Chunk::Hole { offset: be64(p), len })
        }
        REPLY_TYPE_OFFSET_HOLE => Err(format!("NBD_REPLY_TYPE_OFFSET_HOLE of {} bytes", p.len())),
        k if k & REPLY_TYPE_ERROR_BIT != 0 => {
            if p.len() < 6 {
                return Err(format!("error chunk of {} bytes", p.len()));
            }
            let errno = be32(p);
            let mlen = be16(&p[4..]) as usize;
            let rest = &p[6..];
            if mlen > rest.len() {
                return Err(format!("error message of {mlen} bytes in a chunk of {}", p.len()));
            }
            let message = String::from_utf8_lossy(&rest[..mlen]).into_owned();
            let offset = if k == REPLY_TYPE_ERROR_OFFSET {
                if rest.len() != mlen + 8 {
                    return Err(format!("NBD_REPLY_TYPE_ERROR_OFFSET of {} bytes", p.len()));
                }
                Some(be64(&rest[mlen..]))
            } else {
                None
            };
            if errno == 0 {
                return Err("an error chunk with error 0".into());
            }
            Ok(Chunk::Error { errno, message, offset })
        }
        k => Err(format!("unknown reply chunk type {k}")),
    }
}

/// The parts of a read request that the chunks of a structured reply have covered
/// so far: every chunk must lie inside the request and overlap no other, and at the
/// end they must cover it all.
#[derive(Debug)]
pub struct ReadCover {
    offset: u64,
    len: u64,
    /// start -> end of each covered piece, relative to `offset`.
    pieces: BTreeMap<u64, u64>,
    covered: u64,
}

/// Most chunks one read reply may have (a 32 MiB read in 512-byte pieces); a server
/// that sends more is broken.
const MAX_CHUNKS: usize = 1 << 16;

impl ReadCover {
    /// A read of `len` bytes at `offset`, nothing covered yet.
    pub fn new(offset: u64, len: u32) -> ReadCover {
        ReadCover { offset, len: u64::from(len), pieces: BTreeMap::new(), covered: 0 }
    }

    /// Records a chunk of `len` bytes at device offset `at`; returns its position in
    /// the read's buffer.
    pub fn claim(&mut self, at: u64, len: u64) -> Result<usize, String> {
        let start = at.checked_sub(self.offset).filter(|&s| s < self.len);
        let Some(start) = start else {
            return Err(format!("a chunk at {at} outside the read of {} bytes at {}", self.len, self.offset));
        };
        let end = start.checked_add(len).filter(|&e| e <= self.len && len > 0);
        let Some(end) = end else {
            return Err(format!(
                "a chunk of {len} bytes at {at} past the read of {} bytes at {}",
                self.len, self.offset
            ));
        };
        let before = self.pieces.range(..end).next_back();
        if before.is_some_and(|(_, &e)| e > start) {
            return Err(format!("chunks overlap at {at}"));
        }
        if self.pieces.len() >= MAX_CHUNKS {
            return Err(format!("more than {MAX_CHUNKS} chunks in one read reply"));
        }
        self.pieces.insert(start, end);
        self.covered += len;
        Ok(start as usize)
    }

    /// Whether every byte of the read was covered.
    pub fn complete(&self) -> bool {
        self.covered == self.len
    }

    /// Bytes covered so far.
    pub fn covered(&self) -> u64 {
        self.covered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = NbdUrl::parse("nbd://127.0.0.1:10900/disk1").unwrap();
        assert_eq!(u, NbdUrl { host: "127.0.0.1".into(), port: 10900, export: "disk1".into() });
        assert_eq!(u.to_string(), "nbd://127.0.0.1:10900/disk1");
        let u = NbdUrl::parse("nbd://server").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.export.as_str()), ("server", DEFAULT_PORT, ""));
        let u = NbdUrl::parse("nbd://server/").unwrap();
        assert_eq!(u.export, "");
        let u = NbdUrl::parse("nbd://[::1]:99/a/b").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.export.as_str()), ("::1", 99, "a/b"));
        assert_eq!(u.addr(), "[::1]:99");
        for bad in [
            "nbd:/x",
            "nbd://",
            "nbd://:10809/x",
            "nbd://h:0/x",
            "nbd://h:70000/x",
            "nbd://h:port/x",
            "nbd://[::1/x",
            "nbd://[::1]x/y",
            "nbd://u@h/x",
            "nbd://h/x?y",
            "/dev/nbd0",
        ] {
            assert!(NbdUrl::parse(bad).is_err(), "{bad} should not parse");
        }
        assert!(NbdUrl::is_nbd("nbd://h/x") && !NbdUrl::is_nbd("/var/img"));
    }

    #[test]
    fn request_header_layout() {
        let h = request_header(CMD_FLAG_FUA, CMD_WRITE, 0x0102_0304_0506_0708, 4096, 8192);
        assert_eq!(&h[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&h[4..8], &[0, 1, 0, 1]);
        assert_eq!(&h[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(be64(&h[16..]), 4096);
        assert_eq!(be32(&h[24..]), 8192);
    }

    #[test]
    fn reply_headers() {
        assert_eq!(reply_rest_len(SIMPLE_REPLY_MAGIC, false), Ok(12));
        assert_eq!(reply_rest_len(STRUCTURED_REPLY_MAGIC, true), Ok(16));
        assert!(reply_rest_len(STRUCTURED_REPLY_MAGIC, false).is_err());
        assert!(reply_rest_len(0xdead_beef, true).unwrap_err().contains("0xdeadbeef"));
        let mut r = vec![0, 0, 0, 5];
        r.extend_from_slice(&9u64.to_be_bytes());
        assert_eq!(decode_reply_header(SIMPLE_REPLY_MAGIC, &r), Ok(ReplyHeader::Simple { error: 5, cookie: 9 }));
        let mut c = vec![0, 1, 0, 1];
        c.extend_from_slice(&7u64.to_be_bytes());
        c.extend_from_slice(&100u32.to_be_bytes());
        assert_eq!(
            decode_reply_header(STRUCTURED_REPLY_MAGIC, &c),
            Ok(ReplyHeader::Chunk { flags: 1, kind: 1, cookie: 7, len: 100 })
        );
        assert!(decode_reply_header(STRUCTURED_REPLY_MAGIC, &c[..10]).is_err());
        assert!(decode_reply_header(1, &c).is_err());
    }

    #[test]
    fn chunks() {
        assert_eq!(decode_chunk(0, &[]), Ok(Chunk::None));
        assert!(decode_chunk(0, &[1]).is_err());
        let mut hole = 8192u64.to_be_bytes().to_vec();
        hole.extend_from_slice(&4096u32.to_be_bytes());
        assert_eq!(decode_chunk(2, &hole), Ok(Chunk::Hole { offset: 8192, len: 4096 }));
        assert!(decode_chunk(2, &hole[..11]).is_err());
        let mut e = 5u32.to_be_bytes().to_vec();
        e.extend_from_slice(&3u16.to_be_bytes());
        e.extend_from_slice(b"bad");
        assert_eq!(decode_chunk(0x8001, &e), Ok(Chunk::Error { errno: 5, message: "bad".into(), offset: None }));
        // An unknown error type is still an error.
        assert!(matches!(decode_chunk(0x8077, &e), Ok(Chunk::Error { errno: 5, .. })));
        let mut eo = e.clone();
        eo.extend_from_slice(&4096u64.to_be_bytes());
        assert_eq!(decode_chunk(0x8002, &eo), Ok(Chunk::Error { errno: 5, message: "bad".into(), offset: Some(4096) }));
        assert!(decode_chunk(0x8002, &e).is_err(), "ERROR_OFFSET without its offset");
        // A message length that runs past the chunk.
        let mut long = 5u32.to_be_bytes().to_vec();
        long.extend_from_slice(&1000u16.to_be_bytes());
        long.extend_from_slice(b"short");
        assert!(decode_chunk(0x8001, &long).is_err());
        assert!(decode_chunk(0x8001, &[0, 0]).is_err());
        assert!(decode_chunk(0x8001, &[0, 0, 0, 0, 0, 0]).is_err(), "error 0");
        assert!(decode_chunk(77, &[]).is_err(), "unknown non-error type");
    }

    #[test]
    fn read_cover() {
        let mut c = ReadCover::new(4096, 3 * 4096);
        assert_eq!(c.claim(4096 + 8192, 4096), Ok(8192));
        assert_eq!(c.claim(4096, 4096), Ok(0));
        assert!(!c.complete());
        assert!(c.claim(4096 + 4000, 200).is_err(), "overlaps the first piece");
        assert!(c.claim(4096 + 8000, 200).is_err(), "overlaps the last piece");
        assert!(c.claim(0, 4096).is_err(), "before the read");
        assert!(c.claim(4096 + 4096, 8192).is_err(), "past the end");
        assert!(c.claim(4096 + 4096, 0).is_err(), "empty");
        assert!(c.claim(u64::MAX, u64::MAX).is_err(), "overflow");
        assert_eq!(c.claim(4096 + 4096, 4096), Ok(4096));
        assert!(c.complete());
        assert_eq!(c.covered(), 3 * 4096);
    }
}
