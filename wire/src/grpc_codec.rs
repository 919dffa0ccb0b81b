//! The prost codec every generated gRPC client and server uses, with small per-stream buffers.
//!
//! tonic's default codec gives every call an 8 KiB encode buffer and an 8 KiB decode buffer
//! up front. A scheduler holds one `AnnouncePeer` call per peer of every running download,
//! and its messages are a few hundred bytes at most (a registration with its host, a few
//! candidate parents, a 10-byte piece report): at 10,000 peers the defaults reserve 160 MiB,
//! and faulting that memory in costs the scheduler CPU during a registration burst. Buffers
//! here start at [`BUFFER_SIZE`] and grow on demand (by that much at a time, amortised by
//! `BytesMut`), so large messages still work, only with a few more reallocations.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial size of each call's encode and decode buffer, bytes.
pub const BUFFER_SIZE: usize = 1024;

/// Encoded bytes a stream accumulates before handing them to HTTP/2 (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`ProstCodec`] with [`BUFFER_SIZE`] buffers; named by `tonic_prost_build::codec_path` in
/// `build.rs`, so every service in [`crate::proto`] uses it.
#[derive(Debug, Clone)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::scheduler::TaskSource;
    use tonic::codec::{Decoder as _, Encoder as _, Streaming};

    /// Two gRPC-framed messages, one 100x larger than the initial buffer, decode through
    /// tonic's own stream decoder with our codec (the buffer grows as needed).
    #[test]
    fn messages_larger_than_the_buffer_decode() {
        let big = TaskSource {
            url: "x".repeat(100 * BUFFER_SIZE),
            headers: vec![],
            digest: String::new(),
        };
        let small = TaskSource {
            url: "http://origin/blob".to_owned(),
            headers: vec![],
            digest: String::new(),
        };
        let mut body = Vec::new();
        for m in [&big, &small] {
            let bytes = m.encode_to_vec();
            body.push(0u8);
            body.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            body.extend_from_slice(&bytes);
        }
        let mut codec = SmallBufferCodec::<TaskSource, TaskSource>::default();
        // The settings have no getters; their Debug form names the size.
        let want = format!("buffer_size: {BUFFER_SIZE},");
        assert!(format!("{:?}", codec.encoder().buffer_settings()).contains(&want));
        let decoder = codec.decoder();
        assert!(format!("{:?}", decoder.buffer_settings()).contains(&want));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let got = rt.block_on(async move {
            let mut s = Streaming::new_request(
                decoder,
                http_body_util::Full::new(bytes::Bytes::from(body)),
                None,
                None,
            );
            let mut got = Vec::new();
            while let Some(m) = s.message().await.expect("decodes") {
                got.push(m);
            }
            got
        });
        assert_eq!(got, vec![big, small]);
    }
}
