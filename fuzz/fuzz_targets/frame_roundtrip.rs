//! Structured frames: encode an arbitrary frame, decode it (whole, then cut short), mutate its
//! bytes and decode again. An accepted canonical encoding (flags zero, a known error code, a
//! UTF-8 message) must re-encode to exactly the bytes it was read from.
#![no_main]

use arbitrary::Arbitrary;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use wire::frame::{self, ErrorCode, Frame, PieceHeader, MAX_ERROR_MESSAGE};
use wire::piece::{MAX_PIECE_COUNT, MAX_PIECE_LENGTH};
use wire::TaskId;
use ErrorCode::*;

#[global_allocator]
static ALLOC: damselfly_fuzz::CappedAlloc = damselfly_fuzz::CappedAlloc;

#[derive(Arbitrary, Debug)]
enum Input {
    PieceRequest([u8; 32], u32),
    Piece([u8; 32], u32, u64, u32, u32),
    Error(u8, String),
    BitmapRequest([u8; 32], u32, u32),
    Bitmap([u8; 32], u64, u32, u32, u8),
}

const CODES: [ErrorCode; 7] =
    [TaskNotFound, PieceNotAvailable, PieceOutOfRange, Malformed, Busy, Internal, Unknown];

/// The frame, and the frame `decode` must give back for its encoding (`None`: an error).
fn build(input: Input) -> (Frame, Option<Frame>) {
    let f = match input {
        Input::PieceRequest(t, number) => Frame::PieceRequest { task: TaskId(t), number },
        Input::Piece(t, number, offset, length, crc32c) => {
            let h = PieceHeader { task: TaskId(t), number, offset, length, crc32c };
            let ok = u64::from(length) <= MAX_PIECE_LENGTH;
            return (Frame::Piece(h), ok.then_some(Frame::Piece(h)));
        }
        Input::Error(c, message) => {
            let code = CODES[usize::from(c) % CODES.len()];
            let end = (0..=message.len().min(MAX_ERROR_MESSAGE))
                .rev()
                .find(|&i| message.is_char_boundary(i));
            let cut = Frame::Error { code, message: message[..end.unwrap_or(0)].to_owned() };
            return (Frame::Error { code, message }, Some(cut));
        }
        Input::BitmapRequest(t, known, wait_ms) => {
            Frame::BitmapRequest { task: TaskId(t), known, wait_ms }
        }
        Input::Bitmap(t, content_length, piece_length, count, fill) => {
            let piece_count = count % (2 * MAX_PIECE_COUNT as u32 + 1); // Up to twice the limit.
            let bits = vec![fill; frame::bitmap_len(piece_count)];
            let f =
                Frame::Bitmap { task: TaskId(t), content_length, piece_length, piece_count, bits };
            return (f.clone(), (u64::from(piece_count) <= MAX_PIECE_COUNT).then_some(f));
        }
    };
    (f.clone(), Some(f))
}

fuzz_target!(|case: (Input, u16, Vec<u8>, Vec<(u16, u8)>)| {
    let (input, cut, tail, mutations) = case;
    let (frame, expected) = build(input);
    let mut buf = BytesMut::new();
    frame::encode(&frame, &mut buf);
    let len = buf.len();
    buf.extend_from_slice(&tail);
    match expected {
        Some(f) => {
            assert_eq!(frame::decode(&buf), Ok(Some((f, len))));
            assert_eq!(frame::decode(&buf[..usize::from(cut) % len]), Ok(None));
        }
        None => assert!(frame::decode(&buf).is_err()),
    }
    let n = buf.len();
    for (at, byte) in mutations {
        buf[usize::from(at) % n] = byte;
    }
    let Ok(Some((got, used))) = frame::decode(&buf) else {
        return;
    };
    // Decoding ignores the flags, maps unknown codes to one and replaces invalid UTF-8.
    let exact = |c: &ErrorCode| {
        buf[8..10] == (*c as u16).to_be_bytes() && std::str::from_utf8(&buf[10..used]).is_ok()
    };
    if buf[2..4] == [0, 0] && !matches!(&got, Frame::Error { code, .. } if !exact(code)) {
        let mut again = BytesMut::new();
        frame::encode(&got, &mut again);
        assert_eq!(&again[..], &buf[..used]);
    }
});
