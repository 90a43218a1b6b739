//! Round trips of every payload kind, the exact layout the scripts share,
//! and malformed input (a typed error, never a panic).

use bytes::Bytes;
use channelbox_core::{Epoch, NewMessage, PayloadKind, StreamPosition};
use proptest::prelude::*;
use uuid::Uuid;

use super::{MemberChange, Wire, WireError};

fn message(payload: &[u8]) -> NewMessage {
    NewMessage {
        kind: PayloadKind::Binary,
        payload: Bytes::copy_from_slice(payload),
        meta: Bytes::from_static(b"m\ne"),
        timestamp_ms: 42,
    }
}

fn id(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

fn every_kind() -> Vec<Wire> {
    vec![
        Wire::Saved {
            position: StreamPosition::new(Epoch::from("e1"), 7),
            except: Some(id(1)),
            message: message(b"a\nb"),
        },
        Wire::Saved {
            position: StreamPosition::new(Epoch::from("e1"), 8),
            except: None,
            message: message(b""),
        },
        Wire::Reset {
            epoch: Epoch::from("e2"),
        },
        Wire::Moved {
            position: StreamPosition::new(Epoch::from("e3"), 0),
        },
        Wire::Unsaved {
            node: id(2),
            except: None,
            message: message(b"\n\n"),
        },
        Wire::Member {
            node: id(3),
            change: MemberChange::Joined,
            channel: id(4),
            user: Some("a\nb".to_owned()),
        },
        Wire::Member {
            node: id(3),
            change: MemberChange::Left,
            channel: id(4),
            user: None,
        },
        Wire::Direct {
            to: id(5),
            frame: "{\"x\":\n1}".to_owned(),
        },
        Wire::CloseAll { node: id(6) },
    ]
}

#[test]
fn every_kind_round_trips() {
    for wire in every_kind() {
        let bytes = wire.encode().expect("encodable");
        assert_eq!(Wire::decode(&bytes), Ok(wire));
    }
}

/// The layout the Lua scripts write by hand (see `scripts`): a change here
/// must change them too.
#[test]
fn the_layout_is_the_scripts() {
    let m = message(b"x");
    let mut saved = b"Sep\n12\n\n".to_vec();
    saved.extend_from_slice(&m.encode());
    assert_eq!(
        Wire::decode(&saved),
        Ok(Wire::Saved {
            position: StreamPosition::new(Epoch::from("ep"), 12),
            except: None,
            message: m,
        })
    );
    assert_eq!(
        Wire::Reset {
            epoch: Epoch::from("ep")
        }
        .encode(),
        Ok(b"Rep".to_vec())
    );
    assert_eq!(
        Wire::Moved {
            position: StreamPosition::new(Epoch::from("ep"), 3)
        }
        .encode(),
        Ok(b"Mep\n3".to_vec())
    );
    let close = format!("C{}", id(9));
    assert_eq!(Wire::decode(close.as_bytes()), Ok(Wire::CloseAll { node: id(9) }));
}

#[test]
fn an_epoch_with_a_newline_or_empty_is_not_written() {
    for bad in ["a\nb", ""] {
        let epoch = Epoch::from(bad);
        assert_eq!(Wire::Reset { epoch: epoch.clone() }.encode(), Err(WireError::BadEpoch));
        let position = StreamPosition::new(epoch, 1);
        assert_eq!(Wire::Moved { position }.encode(), Err(WireError::BadEpoch));
    }
}

#[test]
fn malformed_payloads_are_typed_errors() {
    assert_eq!(Wire::decode(b""), Err(WireError::Empty));
    assert_eq!(Wire::decode(b"Zabc"), Err(WireError::UnknownKind(b'Z')));
    assert_eq!(Wire::decode(b"Se\n1\n"), Err(WireError::MissingField("except")));
    assert_eq!(Wire::decode(b"Se\n+1\n\n"), Err(WireError::BadField("offset")));
    assert_eq!(Wire::decode(b"Se\n1\nnot-a-uuid\n"), Err(WireError::BadField("except")));
    assert_eq!(Wire::decode(b"Se\n1\n\n"), Err(WireError::BadField("message")));
    assert_eq!(Wire::decode(b"R"), Err(WireError::BadField("epoch")));
    assert_eq!(
        Wire::decode(b"Me\n99999999999999999999"),
        Err(WireError::BadField("offset"))
    );
    assert_eq!(Wire::decode(b"Me"), Err(WireError::MissingField("epoch")));
    let member = format!("E{}\nX\n{}\n-", id(1), id(2));
    assert_eq!(Wire::decode(member.as_bytes()), Err(WireError::BadField("change")));
    let member = format!("E{}\nJ\n{}\nuser", id(1), id(2));
    assert_eq!(Wire::decode(member.as_bytes()), Err(WireError::BadField("user")));
    assert_eq!(Wire::decode(b"Dnope\nframe"), Err(WireError::BadField("channel")));
    assert_eq!(Wire::decode(b"C\xff"), Err(WireError::BadField("node")));
}

/// Every prefix of every valid payload decodes to something or a typed
/// error: truncation never panics.
#[test]
fn truncated_payloads_never_panic() {
    for wire in every_kind() {
        let bytes = wire.encode().expect("encodable");
        for end in 0..bytes.len() {
            let _ = Wire::decode(&bytes[..end]);
        }
    }
}

fn any_uuid() -> impl Strategy<Value = Uuid> {
    any::<u128>().prop_map(Uuid::from_u128)
}

fn any_epoch() -> impl Strategy<Value = Epoch> {
    // Any text but newlines, as an epoch must be.
    "[^\n]{1,40}".prop_map(Epoch::from)
}

fn any_message() -> impl Strategy<Value = NewMessage> {
    (
        prop_oneof![
            Just(PayloadKind::Json),
            Just(PayloadKind::Text),
            Just(PayloadKind::Binary)
        ],
        proptest::collection::vec(any::<u8>(), 0..200),
        proptest::collection::vec(prop_oneof![Just(b'\n'), any::<u8>()], 0..40),
        any::<u64>(),
    )
        .prop_map(|(kind, payload, meta, timestamp_ms)| NewMessage {
            kind,
            payload: Bytes::from(payload),
            meta: Bytes::from(meta),
            timestamp_ms,
        })
}

fn any_wire() -> impl Strategy<Value = Wire> {
    let position = || (any_epoch(), any::<u64>()).prop_map(|(e, o)| StreamPosition::new(e, o));
    prop_oneof![
        (position(), proptest::option::of(any_uuid()), any_message()).prop_map(|(position, except, message)| {
            Wire::Saved {
                position,
                except,
                message,
            }
        }),
        any_epoch().prop_map(|epoch| Wire::Reset { epoch }),
        position().prop_map(|position| Wire::Moved { position }),
        (any_uuid(), proptest::option::of(any_uuid()), any_message())
            .prop_map(|(node, except, message)| Wire::Unsaved { node, except, message }),
        (
            any_uuid(),
            any::<bool>(),
            any_uuid(),
            proptest::option::of("(?s).{0,30}")
        )
            .prop_map(|(node, joined, channel, user)| Wire::Member {
                node,
                change: if joined {
                    MemberChange::Joined
                } else {
                    MemberChange::Left
                },
                channel,
                user,
            }),
        (any_uuid(), "(?s).{0,60}").prop_map(|(to, frame)| Wire::Direct { to, frame }),
        any_uuid().prop_map(|node| Wire::CloseAll { node }),
    ]
}

proptest! {
    #[test]
    fn arbitrary_payloads_round_trip(wire in any_wire()) {
        let bytes = wire.encode().expect("an epoch without newlines is writable");
        prop_assert_eq!(Wire::decode(&bytes), Ok(wire));
    }

    #[test]
    fn arbitrary_bytes_never_panic(kind in proptest::sample::select(b"SRMUEDCX".to_vec()),
                                   body in proptest::collection::vec(prop_oneof![Just(b'\n'), any::<u8>()], 0..80)) {
        let mut payload = vec![kind];
        payload.extend_from_slice(&body);
        // Whatever it is, decoding answers; what decodes writes back the same.
        if let Ok(wire) = Wire::decode(&payload) {
            let again = wire.encode().expect("a decoded epoch is writable");
            prop_assert_eq!(Wire::decode(&again), Ok(wire));
        }
    }
}
