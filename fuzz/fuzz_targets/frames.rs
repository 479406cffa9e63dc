//! The framed reader on an arbitrary byte stream, with small limits: every message is returned
//! whole, streamed, or refused with an error; never a panic, never more than the limit buffered.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pglease::codec::frame::FrameLimits;
use pglease::codec::{FramedReader, ReadEvent};

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        let limits = FrameLimits { max_frame: 4096, streamable: b"dD", stream_threshold: 1024 };
        let mut reader = FramedReader::new(data, limits);
        loop {
            match reader.next().await {
                Ok(Some(ReadEvent::Frame(f))) => assert!(f.len() <= 4096),
                Ok(Some(ReadEvent::Large { body_len, .. })) => {
                    if reader.stream_body(body_len, &mut tokio::io::sink()).await.is_err() {
                        break;
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
    });
});
