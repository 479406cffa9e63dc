//! Every message decoder on an arbitrary body: first byte is the type, the rest the body.
#![no_main]

use bytes::{BufMut, BytesMut};
use libfuzzer_sys::fuzz_target;
use pglease::codec::Frame;
use pglease::codec::messages::*;

fuzz_target!(|data: &[u8]| {
    let Some((&tag, body)) = data.split_first() else { return };
    let mut raw = BytesMut::with_capacity(body.len() + 5);
    raw.put_u8(tag);
    raw.put_i32(body.len() as i32 + 4);
    raw.put_slice(body);
    let frame = Frame::from_encoded(raw.freeze());
    let _ = Query::decode(&frame);
    let _ = Parse::decode(&frame);
    let _ = Bind::decode(&frame);
    let _ = Execute::decode(&frame);
    let _ = Target::decode("Describe", &frame);
    let _ = SaslInitialResponse::decode(&frame);
    let _ = decode_single_cstr("password", &frame);
    let _ = AuthRequest::decode(&frame);
    let _ = ParameterStatus::decode(&frame);
    let _ = BackendKeyData::decode(&frame);
    let _ = TxStatus::decode(&frame);
    let _ = ErrorFields::decode(&frame);
    let _ = decode_command_tag(&frame);
});
