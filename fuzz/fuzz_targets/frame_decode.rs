//! `wire::frame::decode` on arbitrary bytes, as read from a peer's socket.
//!
//! Checks, besides "no panic": `consumed` never passes the input, a partial frame is
//! reported as partial on every shorter read, and an accepted frame re-encodes to a frame that
//! decodes to itself (see `frame_roundtrip` for the byte-exact check).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use wire::frame::{self, Frame, HEADER_LEN};

#[global_allocator]
static ALLOC: damselfly_fuzz::CappedAlloc = damselfly_fuzz::CappedAlloc;

fuzz_target!(|data: &[u8]| {
    let Ok(Some((frame, used))) = frame::decode(data) else {
        return;
    };
    assert!(used >= HEADER_LEN && used <= data.len());
    // A reader that got the frame in two reads saw "need more" first, never an error.
    assert_eq!(frame::decode(&data[..used - 1]), Ok(None));
    let mut again = BytesMut::new();
    frame::encode(&frame, &mut again);
    let (decoded, n) = frame::decode(&again)
        .expect("an encoded frame decodes")
        .expect("an encoded frame is complete");
    assert_eq!(n, again.len());
    match (&frame, &decoded) {
        // Lossy UTF-8 replacement can lengthen a message past the limit; encode then cuts it.
        (Frame::Error { code: a, message: m }, Frame::Error { code: b, message: d }) => {
            assert_eq!(a, b);
            assert!(m.starts_with(d.as_str()));
        }
        _ => assert_eq!(frame, decoded),
    }
});
