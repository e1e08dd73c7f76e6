//! Broker frame decoding on arbitrary bytes: never panics; a frame that decodes re-encodes to one that
//! decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_proto::wire;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(frame) = wire::decode_client(text) {
        assert_eq!(wire::decode_client(&frame.to_json()).ok(), Some(frame));
    }
    if let Ok(frame) = wire::decode_server(text) {
        assert_eq!(wire::decode_server(&frame.to_json()).ok(), Some(frame));
    }
});
