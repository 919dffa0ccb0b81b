//! The seed corpora of the wire fuzz targets (`fuzz/fuzz_targets/{frame_decode,
//! frame_roundtrip,task_id}.rs`), replayed through the same checks as an ordinary test, so
//! that `cargo test` runs them without libFuzzer (see `needs::fuzz`).

use bytes::BytesMut;
use damselfly_wire::frame::{self, ErrorCode, Frame, PieceHeader, HEADER_LEN, MAX_ERROR_MESSAGE};
use damselfly_wire::piece::{MAX_PIECE_COUNT, MAX_PIECE_LENGTH};
use damselfly_wire::task::{TaskId, TaskIdOptions};
use needs::fuzz::{inputs, text_inputs, Unstructured};
use ErrorCode::*;

/// `frame_decode`'s body.
fn frame_decode(data: &[u8]) {
    let Ok(Some((frame, used))) = frame::decode(data) else {
        return;
    };
    assert!(used >= HEADER_LEN && used <= data.len());
    assert_eq!(frame::decode(&data[..used - 1]), Ok(None));
    let mut again = BytesMut::new();
    frame::encode(&frame, &mut again);
    let (decoded, n) = frame::decode(&again)
        .expect("an encoded frame decodes")
        .expect("an encoded frame is complete");
    assert_eq!(n, again.len());
    match (&frame, &decoded) {
        (
            Frame::Error {
                code: a,
                message: m,
            },
            Frame::Error {
                code: b,
                message: d,
            },
        ) => {
            assert_eq!(a, b);
            assert!(m.starts_with(d.as_str()));
        }
        _ => assert_eq!(frame, decoded),
    }
}

#[test]
fn frame_decode_corpus() {
    let all = inputs("frame_decode");
    assert!(
        all.iter().any(|d| matches!(frame::decode(d), Ok(Some(_)))),
        "no input decodes to a frame: the replay would check nothing"
    );
    for data in all {
        frame_decode(&data);
    }
}

const CODES: [ErrorCode; 7] = [
    TaskNotFound,
    PieceNotAvailable,
    PieceOutOfRange,
    Malformed,
    Busy,
    Internal,
    Unknown,
];

fn task(u: &mut Unstructured) -> TaskId {
    let mut t = [0u8; 32];
    for b in &mut t {
        *b = u.uint(1) as u8;
    }
    TaskId(t)
}

/// `frame_roundtrip`'s `build`: the frame an input describes, and the frame `decode` must give
/// back for its encoding (`None`: an error).
fn build(u: &mut Unstructured) -> (Frame, Option<Frame>) {
    let f = match (u.uint(4) * 5) >> 32 {
        0 => Frame::PieceRequest {
            task: task(u),
            number: u.uint(4) as u32,
        },
        1 => {
            let h = PieceHeader {
                task: task(u),
                number: u.uint(4) as u32,
                offset: u.uint(8),
                length: u.uint(4) as u32,
                crc32c: u.uint(4) as u32,
            };
            let ok = u64::from(h.length) <= MAX_PIECE_LENGTH;
            return (Frame::Piece(h), ok.then_some(Frame::Piece(h)));
        }
        2 => {
            let code = CODES[u.uint(1) as usize % CODES.len()];
            let message = u.str().to_owned();
            let end = (0..=message.len().min(MAX_ERROR_MESSAGE))
                .rev()
                .find(|&i| message.is_char_boundary(i));
            let cut = Frame::Error {
                code,
                message: message[..end.unwrap_or(0)].to_owned(),
            };
            return (Frame::Error { code, message }, Some(cut));
        }
        3 => Frame::BitmapRequest {
            task: task(u),
            known: u.uint(4) as u32,
            wait_ms: u.uint(4) as u32,
        },
        _ => {
            let task = task(u);
            let content_length = u.uint(8);
            let piece_length = u.uint(4) as u32;
            let piece_count = u.uint(4) as u32 % (2 * MAX_PIECE_COUNT as u32 + 1);
            let bits = vec![u.uint(1) as u8; frame::bitmap_len(piece_count)];
            let f = Frame::Bitmap {
                task,
                content_length,
                piece_length,
                piece_count,
                bits,
            };
            return (
                f.clone(),
                (u64::from(piece_count) <= MAX_PIECE_COUNT).then_some(f),
            );
        }
    };
    (f.clone(), Some(f))
}

/// `frame_roundtrip`'s body.
fn frame_roundtrip(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let (frame, expected) = build(&mut u);
    let cut = u.uint(2) as u16;
    let tail = u.str().as_bytes().to_vec();
    let mutations: Vec<(u16, u8)> = u
        .rest()
        .chunks_exact(3)
        .map(|c| (u16::from_le_bytes([c[0], c[1]]), c[2]))
        .collect();
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
    let exact = |c: &ErrorCode| {
        buf[8..10] == (*c as u16).to_be_bytes() && std::str::from_utf8(&buf[10..used]).is_ok()
    };
    if buf[2..4] == [0, 0] && !matches!(&got, Frame::Error { code, .. } if !exact(code)) {
        let mut again = BytesMut::new();
        frame::encode(&got, &mut again);
        assert_eq!(&again[..], &buf[..used]);
    }
}

#[test]
fn frame_roundtrip_corpus() {
    for data in inputs("frame_roundtrip") {
        frame_roundtrip(&data);
    }
}

/// `task_id`'s body.
fn task_id(text: &str) {
    let mut parts = text.split('\0');
    let url = parts.next().unwrap_or_default();
    let tag = parts.next().unwrap_or_default();
    let application = parts.next().unwrap_or_default();
    let filtered: Vec<String> = parts.map(str::to_owned).collect();
    let piece_length = (text.len() as u64 % 3) << 20;
    let opts = TaskIdOptions {
        tag,
        application,
        piece_length,
        filtered_query_params: &filtered,
    };
    if let Ok(id) = TaskId::from_url(url, &opts) {
        assert_eq!(TaskId::from_url(url, &opts), Ok(id));
        assert_eq!(TaskId::parse(&id.to_hex()), Ok(id));
    }
    if let Ok(id) = TaskId::parse(url) {
        assert_eq!(id.to_hex(), url.to_ascii_lowercase());
    }
}

#[test]
fn task_id_corpus() {
    let texts = text_inputs("task_id");
    assert!(
        texts.iter().any(|t| {
            let url = t.split('\0').next().unwrap_or_default();
            TaskId::from_url(url, &TaskIdOptions::default()).is_ok()
        }),
        "no seed is an accepted URL: the replay would check nothing"
    );
    for text in texts {
        task_id(&text);
    }
}
