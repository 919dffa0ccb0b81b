//! The data-plane frame codec (sans-IO).
//!
//! Every frame starts with a fixed 8-byte header:
//!
//! ```text
//! 0       1       2               4                               8
//! +-------+-------+---------------+-------------------------------+
//! |version| type  |  flags (u16)  |      payload length (u32)     |
//! +-------+-------+---------------+-------------------------------+
//! ```
//!
//! followed by `payload length` bytes of payload. All integers are big-endian.
//! A [`Frame::Piece`] header is special only in that exactly [`PieceHeader::length`] raw
//! piece bytes follow its payload, unframed, so that a sender can `sendfile`/`splice` them
//! straight from the task file and a receiver can read them straight into place. The codec
//! never buffers those bytes: after decoding a piece header the caller reads them itself.
//!
//! Call order on a connection:
//! 1. the client writes [`Frame::BitmapRequest`] and/or [`Frame::PieceRequest`] frames, as many
//!    as it wants in flight;
//! 2. the server answers each request in order, with a [`Frame::Bitmap`], a [`Frame::Piece`]
//!    header plus its bytes, or a [`Frame::Error`].
//!
//! [`decode`] checks the header before waiting for the payload: an unknown version or type,
//! or a payload length over the limit of that frame type, is rejected at once, so a peer's
//! declared length is never used as an allocation size.

use crate::piece::{MAX_PIECE_COUNT, MAX_PIECE_LENGTH};
use crate::task::TaskId;
use bytes::{BufMut, BytesMut};

/// Protocol version carried in every header.
pub const VERSION: u8 = 1;
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 8;
/// Longest error message carried in an [`Frame::Error`] (longer ones are cut).
pub const MAX_ERROR_MESSAGE: usize = 1024;
/// Longest bitmap payload: header fields plus one bit per piece for the most pieces a task can
/// have.
pub const MAX_BITMAP_PAYLOAD: usize = BITMAP_FIXED + (MAX_PIECE_COUNT as usize).div_ceil(8);

const TYPE_PIECE_REQUEST: u8 = 1;
const TYPE_PIECE: u8 = 2;
const TYPE_ERROR: u8 = 3;
const TYPE_BITMAP_REQUEST: u8 = 4;
const TYPE_BITMAP: u8 = 5;

const PIECE_REQUEST_LEN: usize = 32 + 4;
const PIECE_LEN: usize = 32 + 4 + 8 + 4 + 4;
const ERROR_FIXED: usize = 2;
const BITMAP_REQUEST_LEN: usize = 32 + 4 + 4;
const BITMAP_FIXED: usize = 32 + 8 + 4 + 4;

/// Why an error frame was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// The server does not know the task.
    TaskNotFound = 1,
    /// The server knows the task but does not hold that piece (yet).
    PieceNotAvailable = 2,
    /// The piece number is past the end of the task.
    PieceOutOfRange = 3,
    /// The request could not be parsed; the server closes the connection after this.
    Malformed = 4,
    /// The server is at its upload limit; try another parent or later.
    Busy = 5,
    /// Something failed on the server (I/O error reading the piece).
    Internal = 6,
    /// A code this version does not know.
    Unknown = 0xffff,
}

impl ErrorCode {
    fn from_u16(v: u16) -> Self {
        match v {
            1 => Self::TaskNotFound,
            2 => Self::PieceNotAvailable,
            3 => Self::PieceOutOfRange,
            4 => Self::Malformed,
            5 => Self::Busy,
            6 => Self::Internal,
            _ => Self::Unknown,
        }
    }
}

/// Header of a piece transfer; exactly `length` raw bytes follow it on the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PieceHeader {
    /// Task the piece belongs to.
    pub task: TaskId,
    /// Piece number.
    pub number: u32,
    /// Byte offset of the piece in the task's content.
    pub offset: u64,
    /// Number of raw bytes that follow (at most [`MAX_PIECE_LENGTH`]).
    pub length: u32,
    /// crc32c of those bytes.
    pub crc32c: u32,
}

/// One data-plane frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Client asks for one piece.
    PieceRequest {
        /// Task id.
        task: TaskId,
        /// Piece number.
        number: u32,
    },
    /// Server sends one piece: this header, then `length` raw bytes.
    Piece(PieceHeader),
    /// Server refuses a request.
    Error {
        /// Why.
        code: ErrorCode,
        /// Human-readable detail (at most [`MAX_ERROR_MESSAGE`] bytes).
        message: String,
    },
    /// Client asks which pieces the server holds. The server answers at once when it holds more
    /// than `known` pieces or the task is complete, otherwise it may wait up to `wait_ms` for a
    /// new piece first (a long poll).
    BitmapRequest {
        /// Task id.
        task: TaskId,
        /// Number of pieces the client already knows the server has.
        known: u32,
        /// Longest time the server may hold the answer, in milliseconds.
        wait_ms: u32,
    },
    /// Server's piece bitmap for a task, with the task's layout.
    Bitmap {
        /// Task id.
        task: TaskId,
        /// Total bytes of the task.
        content_length: u64,
        /// Piece length of the task.
        piece_length: u32,
        /// Number of pieces; `bits` has `ceil(piece_count / 8)` bytes.
        piece_count: u32,
        /// Bit `n` (byte `n / 8`, bit `n % 8`, least significant first) is set when the server
        /// holds piece `n`.
        bits: Vec<u8>,
    },
}

/// Why bytes could not be decoded into a frame. Every variant means the stream is unusable:
/// the caller answers with [`ErrorCode::Malformed`] (if it is the server) and closes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The version byte is not [`VERSION`].
    #[error("unsupported protocol version {0}")]
    Version(u8),
    /// The frame type is not known.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// The declared payload length does not fit the frame type.
    #[error("frame type {frame_type} cannot have a {len}-byte payload")]
    BadLength {
        /// Frame type.
        frame_type: u8,
        /// Declared payload length.
        len: u32,
    },
    /// A field is out of its allowed range.
    #[error("invalid field: {0}")]
    Invalid(&'static str),
}

/// A bounds-checked big-endian reader over a payload (in the manner of rustls' `Reader`).
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Invalid("payload shorter than its fields"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn task(&mut self) -> Result<TaskId, DecodeError> {
        Ok(TaskId(self.array()?))
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    fn finish(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Invalid("trailing bytes in payload"))
        }
    }
}

/// Checks a header and returns (frame type, payload length) when its length is allowed.
fn check_header(h: &[u8; HEADER_LEN]) -> Result<(u8, usize), DecodeError> {
    if h[0] != VERSION {
        return Err(DecodeError::Version(h[0]));
    }
    let ty = h[1];
    let len = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
    let ok = match ty {
        TYPE_PIECE_REQUEST => len as usize == PIECE_REQUEST_LEN,
        TYPE_PIECE => len as usize == PIECE_LEN,
        TYPE_ERROR => (ERROR_FIXED..=ERROR_FIXED + MAX_ERROR_MESSAGE).contains(&(len as usize)),
        TYPE_BITMAP_REQUEST => len as usize == BITMAP_REQUEST_LEN,
        TYPE_BITMAP => (BITMAP_FIXED..=MAX_BITMAP_PAYLOAD).contains(&(len as usize)),
        other => return Err(DecodeError::UnknownType(other)),
    };
    if ok {
        Ok((ty, len as usize))
    } else {
        Err(DecodeError::BadLength {
            frame_type: ty,
            len,
        })
    }
}

/// Decodes one frame from the front of `buf`.
///
/// Returns `Ok(None)` when `buf` holds only part of a frame (read more and call again),
/// `Ok(Some((frame, consumed)))` when a frame was decoded from the first `consumed` bytes.
/// For [`Frame::Piece`], the `length` raw bytes that follow are *not* part of `consumed`.
/// Never allocates more than the frame type's limit, whatever the input.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, DecodeError> {
    let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
        // Check what we have of the header early, so garbage fails fast.
        if let Some(&v) = buf.first() {
            if v != VERSION {
                return Err(DecodeError::Version(v));
            }
        }
        return Ok(None);
    };
    let (ty, len) = check_header(header)?;
    let Some(payload) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
        return Ok(None);
    };
    let mut r = Reader { buf: payload };
    let frame = match ty {
        TYPE_PIECE_REQUEST => Frame::PieceRequest {
            task: r.task()?,
            number: r.u32()?,
        },
        TYPE_PIECE => {
            let h = PieceHeader {
                task: r.task()?,
                number: r.u32()?,
                offset: r.u64()?,
                length: r.u32()?,
                crc32c: r.u32()?,
            };
            if u64::from(h.length) > MAX_PIECE_LENGTH {
                return Err(DecodeError::Invalid("piece length over the protocol limit"));
            }
            Frame::Piece(h)
        }
        TYPE_ERROR => {
            let code = ErrorCode::from_u16(r.u16()?);
            let message = String::from_utf8_lossy(r.rest()).into_owned();
            Frame::Error { code, message }
        }
        TYPE_BITMAP_REQUEST => Frame::BitmapRequest {
            task: r.task()?,
            known: r.u32()?,
            wait_ms: r.u32()?,
        },
        TYPE_BITMAP => {
            let task = r.task()?;
            let content_length = r.u64()?;
            let piece_length = r.u32()?;
            let piece_count = r.u32()?;
            if u64::from(piece_count) > MAX_PIECE_COUNT {
                return Err(DecodeError::Invalid("piece count over the protocol limit"));
            }
            let bits = r.take((piece_count as usize).div_ceil(8))?.to_vec();
            Frame::Bitmap {
                task,
                content_length,
                piece_length,
                piece_count,
                bits,
            }
        }
        // check_header returned an error for every other type.
        other => return Err(DecodeError::UnknownType(other)),
    };
    r.finish()?;
    Ok(Some((frame, HEADER_LEN + len)))
}

fn put_header(dst: &mut BytesMut, ty: u8, len: usize) {
    dst.put_u8(VERSION);
    dst.put_u8(ty);
    dst.put_u16(0);
    // Every payload is bounded far below u32::MAX by the constants above.
    dst.put_u32(len as u32);
}

/// Appends the encoding of `frame` to `dst`. Error messages longer than
/// [`MAX_ERROR_MESSAGE`] are cut at a character boundary; a bitmap's `bits` are written as
/// given and must have `ceil(piece_count / 8)` bytes (see [`bitmap_len`]).
pub fn encode(frame: &Frame, dst: &mut BytesMut) {
    match frame {
        Frame::PieceRequest { task, number } => {
            put_header(dst, TYPE_PIECE_REQUEST, PIECE_REQUEST_LEN);
            dst.put_slice(&task.0);
            dst.put_u32(*number);
        }
        Frame::Piece(h) => {
            put_header(dst, TYPE_PIECE, PIECE_LEN);
            dst.put_slice(&h.task.0);
            dst.put_u32(h.number);
            dst.put_u64(h.offset);
            dst.put_u32(h.length);
            dst.put_u32(h.crc32c);
        }
        Frame::Error { code, message } => {
            let mut end = message.len().min(MAX_ERROR_MESSAGE);
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            put_header(dst, TYPE_ERROR, ERROR_FIXED + end);
            dst.put_u16(*code as u16);
            dst.put_slice(&message.as_bytes()[..end]);
        }
        Frame::BitmapRequest {
            task,
            known,
            wait_ms,
        } => {
            put_header(dst, TYPE_BITMAP_REQUEST, BITMAP_REQUEST_LEN);
            dst.put_slice(&task.0);
            dst.put_u32(*known);
            dst.put_u32(*wait_ms);
        }
        Frame::Bitmap {
            task,
            content_length,
            piece_length,
            piece_count,
            bits,
        } => {
            put_header(dst, TYPE_BITMAP, BITMAP_FIXED + bits.len());
            dst.put_slice(&task.0);
            dst.put_u64(*content_length);
            dst.put_u32(*piece_length);
            dst.put_u32(*piece_count);
            dst.put_slice(bits);
        }
    }
}

/// Number of bitmap bytes for `piece_count` pieces.
pub fn bitmap_len(piece_count: u32) -> usize {
    (piece_count as usize).div_ceil(8)
}

/// Whether bit `n` is set in a bitmap as carried by [`Frame::Bitmap`].
pub fn bitmap_get(bits: &[u8], n: u32) -> bool {
    bits.get(n as usize / 8)
        .is_some_and(|b| b & (1 << (n % 8)) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn task() -> impl Strategy<Value = TaskId> {
        any::<[u8; 32]>().prop_map(TaskId)
    }

    fn frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (task(), any::<u32>()).prop_map(|(task, number)| Frame::PieceRequest { task, number }),
            (
                task(),
                any::<u32>(),
                any::<u64>(),
                0..=MAX_PIECE_LENGTH as u32,
                any::<u32>()
            )
                .prop_map(|(task, number, offset, length, crc32c)| Frame::Piece(
                    PieceHeader {
                        task,
                        number,
                        offset,
                        length,
                        crc32c
                    }
                )),
            (1u16..=6, "[a-z ]{0,100}").prop_map(|(c, message)| Frame::Error {
                code: ErrorCode::from_u16(c),
                message
            }),
            (task(), any::<u32>(), any::<u32>()).prop_map(|(task, known, wait_ms)| {
                Frame::BitmapRequest {
                    task,
                    known,
                    wait_ms,
                }
            }),
            (task(), any::<u64>(), any::<u32>(), 0u32..5000).prop_flat_map(
                |(task, content_length, piece_length, piece_count)| {
                    proptest::collection::vec(any::<u8>(), bitmap_len(piece_count)).prop_map(
                        move |bits| Frame::Bitmap {
                            task,
                            content_length,
                            piece_length,
                            piece_count,
                            bits,
                        },
                    )
                }
            ),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(f in frame()) {
            let mut buf = BytesMut::new();
            encode(&f, &mut buf);
            let (g, used) = decode(&buf).expect("decodes").expect("complete");
            prop_assert_eq!(used, buf.len());
            prop_assert_eq!(g, f);
        }

        #[test]
        fn every_prefix_asks_for_more(f in frame()) {
            let mut buf = BytesMut::new();
            encode(&f, &mut buf);
            for cut in 0..buf.len() {
                prop_assert_eq!(decode(&buf[..cut]), Ok(None));
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn declared_lengths_are_bounded(ty in any::<u8>(), len in any::<u32>()) {
            let mut h = [0u8; HEADER_LEN];
            h[0] = VERSION;
            h[1] = ty;
            h[4..].copy_from_slice(&len.to_be_bytes());
            // Whatever a header claims, an accepted payload is within the bitmap limit,
            // the largest one the codec ever reads.
            if let Ok((_, l)) = check_header(&h) {
                prop_assert!(l <= MAX_BITMAP_PAYLOAD);
            }
        }
    }

    #[test]
    fn oversize_header_fails_before_payload_arrives() {
        let mut h = vec![VERSION, TYPE_BITMAP, 0, 0];
        h.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(decode(&h), Err(DecodeError::BadLength { .. })));
        assert_eq!(decode(&[9]), Err(DecodeError::Version(9)));
        assert_eq!(
            decode(&[VERSION, 77, 0, 0, 0, 0, 0, 0]),
            Err(DecodeError::UnknownType(77))
        );
    }

    #[test]
    fn oversize_piece_length_is_rejected() {
        let mut buf = BytesMut::new();
        encode(
            &Frame::Piece(PieceHeader {
                task: TaskId([0; 32]),
                number: 0,
                offset: 0,
                length: MAX_PIECE_LENGTH as u32 + 1,
                crc32c: 0,
            }),
            &mut buf,
        );
        assert!(matches!(decode(&buf), Err(DecodeError::Invalid(_))));
    }

    #[test]
    fn bitmap_with_wrong_bit_bytes_is_rejected() {
        let mut buf = BytesMut::new();
        encode(
            &Frame::Bitmap {
                task: TaskId([1; 32]),
                content_length: 10,
                piece_length: 1,
                piece_count: 16,
                bits: vec![0xff; 3],
            },
            &mut buf,
        );
        assert!(matches!(decode(&buf), Err(DecodeError::Invalid(_))));
    }

    #[test]
    fn long_error_message_is_cut_on_a_char_boundary() {
        let mut buf = BytesMut::new();
        let message = "é".repeat(MAX_ERROR_MESSAGE);
        encode(
            &Frame::Error {
                code: ErrorCode::Internal,
                message,
            },
            &mut buf,
        );
        let (f, _) = decode(&buf).expect("ok").expect("complete");
        let Frame::Error { message, .. } = f else {
            panic!("not an error frame")
        };
        assert!(message.len() <= MAX_ERROR_MESSAGE);
        assert!(message.chars().all(|c| c == 'é'));
    }
}
