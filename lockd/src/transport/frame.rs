//! Wire frames: versioned, size-limited, checksummed.
//!
//! ```text
//!  0      2       3      4          8                8+len      12+len
//!  +------+-------+------+----------+----------------+----------+
//!  | magic| vers. | kind | len (LE) | payload        | crc32c   |
//!  | u16  | u8    | u8   | u32      | len bytes      | u32 (LE) |
//!  +------+-------+------+----------+----------------+----------+
//! ```
//!
//! * `magic` is [`MAGIC`] (little-endian), `version` is [`FRAME_VERSION`].
//! * `kind` is a [`FrameKind`]; unknown kinds are errors.
//! * `len` is at most [`MAX_PAYLOAD`]; a larger length is refused from the header alone,
//!   before any payload is read or buffered.
//! * the trailer is CRC-32C (Castagnoli) over the header and the payload.
//! * the payload is bincode 2 (`standard()` configuration: little-endian, variable-length
//!   integers) of a serde value, decoded with a limit of [`MAX_PAYLOAD`] bytes and
//!   required to consume the whole payload.
//!
//! Decoding never panics on any input (checked by a property test over random and
//! mutated bytes); every problem is a [`FrameError`].

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// First two bytes of every frame.
pub const MAGIC: u16 = 0xC0DC;
/// Version of the frame layout.
pub const FRAME_VERSION: u8 = 1;
/// Bytes before the payload.
pub const HEADER_LEN: usize = 8;
/// Bytes after the payload (the CRC).
pub const TRAILER_LEN: usize = 4;
/// Largest payload, in bytes (1 MiB).
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Largest whole frame, in bytes.
pub const MAX_FRAME: usize = HEADER_LEN + MAX_PAYLOAD + TRAILER_LEN;

/// Version of the peer protocol carried in [`Hello`]; peers with another version are
/// refused.
///
/// History: 1, the first; 2, lockd's `PeerMsg::Plock` (a lockd of version 1 could
/// not decode it and would close the connection as malformed: refusing it at the
/// hello says why); 3, names of GFS2's glock form placed by their number
/// ([`crate::core::directory::directory_key`]): peers that place names differently
/// would ask different directory nodes for one resource.
pub const PROTOCOL_VERSION: u16 = 3;

const _: () = assert!(MAX_PAYLOAD <= u32::MAX as usize);

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_PAYLOAD>()
}

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// [`Hello`], the first frame in each direction of a connection's message stream.
    Hello = 1,
    /// One user message.
    Message = 2,
    /// A round-trip probe, `u64` nonce; answered by [`FrameKind::Pong`].
    Ping = 3,
    /// Answer to [`FrameKind::Ping`] with the same nonce.
    Pong = 4,
}

impl FrameKind {
    fn from_u8(b: u8) -> Option<FrameKind> {
        Some(match b {
            1 => FrameKind::Hello,
            2 => FrameKind::Message,
            3 => FrameKind::Ping,
            4 => FrameKind::Pong,
            _ => return None,
        })
    }
}

/// The first frame each side sends on a new connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub protocol: u16,
    /// The sender's cluster name.
    pub cluster: String,
    /// The sender's node id; must match the node id in its certificate.
    pub from: u32,
    /// The node id the sender believes it is talking to.
    pub to: u32,
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// More bytes are needed: at least `needed` in total.
    #[error("incomplete frame: {needed} bytes needed")]
    Incomplete { needed: usize },
    #[error("bad magic {0:#06x}")]
    BadMagic(u16),
    #[error("unsupported frame version {0}")]
    BadVersion(u8),
    #[error("unknown frame kind {0}")]
    BadKind(u8),
    #[error("frame payload of {0} bytes is over the limit of {MAX_PAYLOAD}")]
    TooLarge(u64),
    #[error("frame checksum mismatch")]
    BadChecksum,
    #[error("expected a {expected:?} frame, got {got:?}")]
    UnexpectedKind { expected: FrameKind, got: FrameKind },
    #[error("payload does not decode: {0}")]
    Decode(String),
    #[error("payload does not encode: {0}")]
    Encode(String),
    #[error("{0} trailing payload bytes")]
    TrailingBytes(usize),
}

/// A validated frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    /// Payload length, at most [`MAX_PAYLOAD`].
    pub len: u32,
}

impl FrameHeader {
    /// Validates the first [`HEADER_LEN`] bytes of a frame.
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<FrameHeader, FrameError> {
        let magic = u16::from_le_bytes([bytes[0], bytes[1]]);
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        if bytes[2] != FRAME_VERSION {
            return Err(FrameError::BadVersion(bytes[2]));
        }
        let kind = FrameKind::from_u8(bytes[3]).ok_or(FrameError::BadKind(bytes[3]))?;
        let len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        if len as usize > MAX_PAYLOAD {
            return Err(FrameError::TooLarge(len.into()));
        }
        Ok(FrameHeader { kind, len })
    }

    /// Length of the whole frame this header starts.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.len as usize + TRAILER_LEN
    }
}

/// A decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub payload: Vec<u8>,
}

impl Frame {
    /// Encodes a frame around raw `payload` bytes.
    pub fn encode(kind: FrameKind, payload: &[u8]) -> Result<Vec<u8>, FrameError> {
        let mut buf = Vec::with_capacity(HEADER_LEN + payload.len() + TRAILER_LEN);
        buf.extend_from_slice(&[0; HEADER_LEN]);
        buf.extend_from_slice(payload);
        seal(kind, buf)
    }

    /// Encodes `value` with bincode as the payload of a `kind` frame.
    pub fn encode_value<T: Serialize + ?Sized>(kind: FrameKind, value: &T) -> Result<Vec<u8>, FrameError> {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&[0; HEADER_LEN]);
        bincode::serde::encode_into_std_write(value, &mut buf, bincode_config())
            .map_err(|e| FrameError::Encode(e.to_string()))?;
        seal(kind, buf)
    }

    /// Decodes the frame at the start of `buf`; returns it and the number of bytes it
    /// took. [`FrameError::Incomplete`] if `buf` ends before the frame does.
    pub fn decode(buf: &[u8]) -> Result<(Frame, usize), FrameError> {
        let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
            return Err(FrameError::Incomplete { needed: HEADER_LEN });
        };
        let header = FrameHeader::decode(head)?;
        let total = header.frame_len();
        if buf.len() < total {
            return Err(FrameError::Incomplete { needed: total });
        }
        let body_end = total - TRAILER_LEN;
        let crc = u32::from_le_bytes([buf[body_end], buf[body_end + 1], buf[body_end + 2], buf[body_end + 3]]);
        if crc32c::crc32c(&buf[..body_end]) != crc {
            return Err(FrameError::BadChecksum);
        }
        let frame = Frame { kind: header.kind, payload: buf[HEADER_LEN..body_end].to_vec() };
        Ok((frame, total))
    }

    /// Decodes the payload as a `T`, which must use all of it.
    pub fn value<T: DeserializeOwned>(&self) -> Result<T, FrameError> {
        decode_payload(&self.payload)
    }

    /// Like [`Frame::value`], after checking the frame is of kind `expected`.
    pub fn value_of<T: DeserializeOwned>(&self, expected: FrameKind) -> Result<T, FrameError> {
        if self.kind != expected {
            return Err(FrameError::UnexpectedKind { expected, got: self.kind });
        }
        self.value()
    }
}

/// Decodes a bincode payload that must be used up entirely.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let (value, used) =
        bincode::serde::decode_from_slice(payload, bincode_config()).map_err(|e| FrameError::Decode(e.to_string()))?;
    if used != payload.len() {
        return Err(FrameError::TrailingBytes(payload.len() - used));
    }
    Ok(value)
}

/// Fills in the header of `buf` (which starts with [`HEADER_LEN`] placeholder bytes)
/// and appends the CRC.
fn seal(kind: FrameKind, mut buf: Vec<u8>) -> Result<Vec<u8>, FrameError> {
    let len = buf.len() - HEADER_LEN;
    if len > MAX_PAYLOAD {
        return Err(FrameError::TooLarge(len as u64));
    }
    buf[0..2].copy_from_slice(&MAGIC.to_le_bytes());
    buf[2] = FRAME_VERSION;
    buf[3] = kind as u8;
    // Cannot truncate: len <= MAX_PAYLOAD <= u32::MAX, checked above.
    buf[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    let crc = crc32c::crc32c(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    Ok(buf)
}

/// Fuzzing entry point: runs every decoder of this module over `data` (a stream of
/// frames, each payload decoded as a [`Hello`], a `u64` and a sample enum with strings,
/// vectors and options). Must never panic. A cargo-fuzz target is one line:
///
/// ```ignore
/// libfuzzer_sys::fuzz_target!(|data: &[u8]| concord_lockd::transport::frame::fuzz_decode(data));
/// ```
#[doc(hidden)]
pub fn fuzz_decode(data: &[u8]) {
    #[derive(Deserialize)]
    #[allow(dead_code)] // only decoded
    enum Sample {
        A(u64, i32),
        B { name: String, data: Vec<u8>, flags: Option<u32> },
        C(Vec<(String, bool)>),
    }
    let mut rest = data;
    while let Ok((frame, used)) = Frame::decode(rest) {
        let _ = frame.value::<Hello>();
        let _ = frame.value::<u64>();
        let _ = frame.value::<Sample>();
        rest = &rest[used..];
    }
    let _ = decode_payload::<Hello>(data);
    let _ = decode_payload::<Sample>(data);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Msg {
        A(u64),
        B { name: String, data: Vec<u8> },
    }

    #[test]
    fn round_trip() {
        let m = Msg::B { name: "inode/42".into(), data: vec![7; 100] };
        let bytes = Frame::encode_value(FrameKind::Message, &m).unwrap();
        let (f, used) = Frame::decode(&bytes).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(f.value_of::<Msg>(FrameKind::Message).unwrap(), m);
        assert!(matches!(f.value_of::<Msg>(FrameKind::Hello), Err(FrameError::UnexpectedKind { .. })));
    }

    #[test]
    fn oversized_length_is_refused_from_header() {
        let mut bytes = Frame::encode(FrameKind::Message, b"x").unwrap();
        bytes[4..8].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        assert!(matches!(Frame::decode(&bytes[..HEADER_LEN]), Err(FrameError::TooLarge(_))));
        assert!(matches!(Frame::encode(FrameKind::Message, &vec![0; MAX_PAYLOAD + 1]), Err(FrameError::TooLarge(_))));
        assert!(Frame::encode(FrameKind::Message, &vec![0; MAX_PAYLOAD]).is_ok());
    }

    #[test]
    fn bincode_length_claims_are_limited() {
        // A Vec<u8> claiming 2^40 elements in a few bytes must fail, not allocate.
        let mut payload = vec![1u8]; // variant B
        payload.push(0); // empty name
        payload.push(253); // u64 varint marker
        payload.extend_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(decode_payload::<Msg>(&payload).is_err());
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut payload = bincode::serde::encode_to_vec(Msg::A(5), bincode_config()).unwrap();
        payload.push(0);
        assert_eq!(decode_payload::<Msg>(&payload), Err(FrameError::TrailingBytes(1)));
    }

    proptest! {
        #[test]
        fn decode_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            fuzz_decode(&bytes);
            if let Ok((f, _)) = Frame::decode(&bytes) {
                let _ = f.value::<Msg>();
                let _ = f.value::<Hello>();
            }
            let _ = decode_payload::<Msg>(&bytes);
            let _ = decode_payload::<Hello>(&bytes);
        }

        #[test]
        fn decode_never_panics_on_mutated_frames(
            n in any::<u64>(),
            name in ".{0,20}",
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<prop::sample::Index>(),
            fix_crc in any::<bool>(),
        ) {
            let m = Msg::B { name, data: n.to_le_bytes().to_vec() };
            let mut bytes = Frame::encode_value(FrameKind::Message, &m).unwrap();
            for (i, b) in flips {
                let i = i.index(bytes.len());
                bytes[i] ^= b;
            }
            if fix_crc && bytes.len() >= HEADER_LEN + TRAILER_LEN {
                // Re-seal so the mutation reaches the payload decoder.
                let end = bytes.len() - TRAILER_LEN;
                let crc = crc32c::crc32c(&bytes[..end]);
                bytes[end..].copy_from_slice(&crc.to_le_bytes());
            }
            let cut = cut.index(bytes.len() + 1);
            for slice in [&bytes[..], &bytes[..cut]] {
                if let Ok((f, used)) = Frame::decode(slice) {
                    prop_assert!(used <= slice.len());
                    let _ = f.value::<Msg>();
                }
            }
        }

        #[test]
        fn valid_frames_round_trip(n in any::<u64>(), name in ".{0,40}", data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let m = Msg::B { name, data };
            let mut bytes = Frame::encode_value(FrameKind::Message, &m).unwrap();
            let one = bytes.len();
            bytes.extend(Frame::encode_value(FrameKind::Ping, &n).unwrap());
            let (f, used) = Frame::decode(&bytes).unwrap();
            prop_assert_eq!(used, one);
            prop_assert_eq!(f.value::<Msg>().unwrap(), m);
            let (f, _) = Frame::decode(&bytes[used..]).unwrap();
            prop_assert_eq!(f.value_of::<u64>(FrameKind::Ping).unwrap(), n);
        }
    }
}
