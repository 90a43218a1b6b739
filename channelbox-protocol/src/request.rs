//! Client requests, typed: a text frame becomes its `ref` and a [`Request`].
//!
//! Parsing goes in the order docs/protocol.md's errors need: the nesting bound and
//! JSON itself, then `ref` (so every later error can echo it), then `type`,
//! then the request's fields by serde. A field of the wrong JSON type is a
//! `bad_request` from serde; rules on a well-typed value (group names) are
//! checked by the handlers with the shared types of [`crate::fields`], so
//! `invalid_group` stays distinct.

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::fields::{present, too_deep, Limit, ReplayCount, Since};
use crate::frames::{ErrorCode, ProtocolError};

/// A request's `ref`: a JSON string or number the client chose, echoed on the
/// reply or error the request causes.
pub type Ref = Option<Value>;

/// What a client asks for; one variant per `type`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Request {
    /// Broadcast to a group.
    Publish(Publish),
    /// Join another group, optionally recovering or replaying it.
    Join(Join),
    /// Leave a group.
    Leave(Leave),
    /// Read a group's history.
    History(History),
    /// Send to one channel.
    Direct(Direct),
    /// The groups and their member counts.
    Groups,
    /// Who is in a group.
    Presence(Presence),
    /// A liveness check; counts as activity.
    Ping,
}

impl Request {
    /// The request's `type`, as on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Publish(_) => "publish",
            Request::Join(_) => "join",
            Request::Leave(_) => "leave",
            Request::History(_) => "history",
            Request::Direct(_) => "direct",
            Request::Groups => "groups",
            Request::Presence(_) => "presence",
            Request::Ping => "ping",
        }
    }
}

/// The `type` names [`Request`] knows.
const TYPES: [&str; 8] = [
    "publish", "join", "leave", "history", "direct", "groups", "presence", "ping",
];

fn yes() -> bool {
    true
}

/// `{"type":"publish"}`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Publish {
    /// Any JSON value, `null` included; required.
    pub data: Value,
    /// The group; the URL group when absent.
    #[serde(default, deserialize_with = "present")]
    pub group: Option<String>,
    /// Whether the message is saved to history.
    #[serde(default = "yes")]
    pub history: bool,
    /// Whether the sender receives its own message too.
    #[serde(default = "yes")]
    pub echo: bool,
}

/// `{"type":"join"}`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Join {
    /// The group to join.
    pub group: String,
    /// Recover after this offset (with `epoch`).
    #[serde(default, deserialize_with = "present")]
    pub since: Option<Since>,
    /// The epoch the client saw, for `since`.
    #[serde(default, deserialize_with = "present")]
    pub epoch: Option<String>,
    /// Replay the newest n messages (ignored with `since`).
    #[serde(default, deserialize_with = "present")]
    pub history: Option<ReplayCount>,
    /// Receive member events of the group.
    #[serde(default)]
    pub events: bool,
}

/// `{"type":"leave"}`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Leave {
    /// The group to leave.
    pub group: String,
}

/// `{"type":"history"}`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct History {
    /// The group; the URL group when absent.
    #[serde(default, deserialize_with = "present")]
    pub group: Option<String>,
    /// How many messages.
    #[serde(default, deserialize_with = "present")]
    pub limit: Option<Limit>,
    /// Page forward after this offset instead of reading the newest.
    #[serde(default, deserialize_with = "present")]
    pub since: Option<Since>,
}

/// `{"type":"presence"}`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Presence {
    /// The group; the URL group when absent.
    #[serde(default, deserialize_with = "present")]
    pub group: Option<String>,
}

/// `{"type":"direct"}`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Direct {
    /// The receiving channel's id, a hyphenated UUID.
    pub to: String,
    /// Any JSON value; required.
    pub data: Value,
}

fn bad(message: impl Into<String>) -> ProtocolError {
    ProtocolError::new(ErrorCode::BadRequest, message)
}

/// Parses one text frame. The error carries the `ref` when it was read before
/// the request failed.
pub fn parse(text: &str) -> Result<(Ref, Request), (Ref, ProtocolError)> {
    let obj = parse_object(text).map_err(|e| (None, e))?;
    let reference = match obj.get("ref") {
        None => None,
        Some(r @ (Value::String(_) | Value::Number(_))) => Some(r.clone()),
        Some(_) => return Err((None, bad("\"ref\" must be a string or a number"))),
    };
    let checked = match obj.get("type") {
        Some(Value::String(t)) if TYPES.contains(&t.as_str()) => Ok(()),
        Some(Value::String(t)) => Err(bad(format!("unknown type {t:?}"))),
        Some(_) => Err(bad("\"type\" must be a string")),
        None => Err(bad("the field \"type\" is required")),
    };
    if let Err(e) = checked {
        return Err((reference, e));
    }
    match Request::deserialize(Value::Object(obj)) {
        Ok(request) => Ok((reference, request)),
        Err(e) => Err((reference, bad(e.to_string()))),
    }
}

/// The frame as a JSON object, its nesting bounded first.
fn parse_object(text: &str) -> Result<Map<String, Value>, ProtocolError> {
    if too_deep(text) {
        return Err(bad("the frame nests deeper than 128 levels"));
    }
    let mut de = serde_json::Deserializer::from_str(text);
    // `too_deep` bounds the recursion; serde_json's own limit (127) is one
    // level short of the protocol's 128.
    de.disable_recursion_limit();
    let value = Value::deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| bad(format!("the frame is not valid JSON: {e}")))?;
    match value {
        Value::Object(obj) => Ok(obj),
        _ => Err(bad("the frame must be a JSON object")),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn refused(text: &str) -> (Ref, ProtocolError) {
        parse(text).expect_err(text)
    }

    #[test]
    fn requests_parse_into_their_variants() {
        let (r, req) = parse(r#"{"type":"publish","data":null,"ref":7}"#).unwrap();
        assert_eq!(r, Some(json!(7)));
        assert_eq!(
            req,
            Request::Publish(Publish {
                data: Value::Null,
                group: None,
                history: true,
                echo: true,
            })
        );
        assert_eq!(parse(r#"{"type":"ping","extra":1}"#).unwrap().1, Request::Ping);
        let (_, req) = parse(r#"{"type":"history","limit":5000,"since":3}"#).unwrap();
        let Request::History(h) = req else { panic!("{req:?}") };
        assert_eq!((h.limit.map(Limit::get), h.since), (Some(1000), Some(Since(3))));
    }

    #[test]
    fn errors_before_ref_carry_none_and_after_it_carry_it() {
        assert_eq!(refused("not json").0, None);
        assert_eq!(refused("[1]").0, None);
        assert_eq!(refused(r#"{"type":"ping","ref":[1]}"#).0, None);
        let (r, e) = refused(r#"{"type":"nope","ref":"a"}"#);
        assert_eq!((r, e.code), (Some(json!("a")), ErrorCode::BadRequest));
        let (r, e) = refused(r#"{"type":"publish","ref":"b"}"#);
        assert_eq!((r, e.code), (Some(json!("b")), ErrorCode::BadRequest), "missing data");
        assert!(e.message.contains("data"), "{}", e.message);
        for wrong in [
            r#"{"type":"join","group":5}"#,
            r#"{"type":"publish","data":1,"group":null}"#,
            r#"{"type":"publish","data":1,"history":"yes"}"#,
            r#"{"type":"history","limit":0}"#,
            r#"{"type":"history","since":-1}"#,
            r#"{"type":5}"#,
            r#"{"data":1}"#,
        ] {
            assert_eq!(refused(wrong).1.code, ErrorCode::BadRequest, "{wrong}");
        }
    }

    #[test]
    fn nesting_of_128_levels_is_accepted_and_129_refused() {
        // The frame object is level 1; `data` holds the rest.
        let frame = |levels: usize| {
            let arrays = levels - 1;
            format!(
                r#"{{"type":"publish","data":{}{}}}"#,
                "[".repeat(arrays),
                "]".repeat(arrays)
            )
        };
        assert!(parse(&frame(128)).is_ok());
        let (_, e) = refused(&frame(129));
        assert_eq!(e.code, ErrorCode::BadRequest);
    }
}
