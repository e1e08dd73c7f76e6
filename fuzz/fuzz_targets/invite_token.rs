//! Invite token decoding on arbitrary input: never panics, and anything it accepts verifies.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_proto::invite::InviteToken;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(token) = InviteToken::decode(text) {
        // Only a token whose admin signature and secrets check out decodes.
        let _ = token.group_key();
        assert!(InviteToken::decode(&token.encode()).is_ok());
    }
});
