//! The startup packet body (after its length): StartupMessage, SSLRequest, GSSENCRequest,
//! CancelRequest, or garbage. Must answer with a value or an error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = pglease::codec::startup::parse_body(data);
});
