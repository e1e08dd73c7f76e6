//! Decoders of bytes from other processes never panic, and answer bad input with typed errors.

use mesh_proto::invite::InviteToken;
use mesh_proto::wire::{self, ErrorCode};
use mesh_proto::{ProtoError, codec};
use proptest::prelude::*;

const CLIENT_TYPES: &[&str] = &["hello", "send", "ack", "roster", "read", "join_group", "leave_group"];

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        ".{0,40}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_text_decodes_or_fails_with_a_typed_code(text in ".{0,400}") {
        if let Err(e) = wire::decode_client(&text) {
            prop_assert!(matches!(e.code, ErrorCode::BadFrame | ErrorCode::UnknownType));
        }
        let _ = wire::decode_server(&text);
    }

    #[test]
    fn known_types_with_random_fields_are_bad_frames_not_panics(
        t in prop::sample::select(CLIENT_TYPES),
        mut fields in prop::collection::btree_map("[a-z_]{1,16}", json_value(), 0..8),
        id in prop::option::of(any::<u64>()),
    ) {
        fields.insert("type".into(), serde_json::Value::from(t));
        if let Some(id) = id {
            fields.insert("id".into(), serde_json::Value::from(id));
        }
        let text = serde_json::Value::Object(fields.into_iter().collect()).to_string();
        match wire::decode_client(&text) {
            Ok(frame) => prop_assert_eq!(wire::decode_client(&frame.to_json()).ok(), Some(frame)),
            Err(e) => {
                prop_assert_eq!(e.code, ErrorCode::BadFrame);
                prop_assert_eq!(e.id, id);
            }
        }
    }

    #[test]
    fn unknown_types_are_named_unknown_type(t in "[a-z]{1,12}", id in any::<u64>()) {
        prop_assume!(!CLIENT_TYPES.contains(&t.as_str()));
        let e = wire::decode_client(&format!(r#"{{"type":"{t}","id":{id}}}"#)).expect_err("unknown");
        prop_assert_eq!((e.code, e.id), (ErrorCode::UnknownType, Some(id)));
    }

    #[test]
    fn invite_tokens_of_any_shape_are_typed_errors(text in ".{0,300}", payload in prop::collection::vec(any::<u8>(), 0..400)) {
        prop_assert!(matches!(InviteToken::decode(&text), Err(ProtoError::BadToken(_))));
        let token = format!("mesh-invite-v1.{}", codec::b64url(&payload));
        prop_assert!(matches!(InviteToken::decode(&token), Err(ProtoError::BadToken(_))));
    }

    #[test]
    fn keys_targets_and_mesh_ids_parse_or_fail_cleanly(text in ".{0,80}") {
        let _ = text.parse::<mesh_proto::PublicKey>();
        let _ = text.parse::<mesh_proto::Target>();
        let _ = text.parse::<mesh_proto::MeshId>();
        let _ = text.parse::<mesh_proto::Sig>();
    }
}
