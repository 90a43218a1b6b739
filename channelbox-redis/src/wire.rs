//! The pub/sub wire format, written once: every payload channelbox sends on a
//! Redis pub/sub channel is one [`Wire`] value, [`Wire::encode`] writes it and
//! [`Wire::decode`] reads it back (a typed [`WireError`] for anything else,
//! never a panic). The broker and the directory send and parse only through
//! here; the Lua scripts (`scripts`) build the `S`, `R` and `M` payloads
//! themselves, inside the script that saves the message, in exactly the
//! layout below — a test runs the real scripts and decodes what they publish.
//!
//! The first byte names the kind; fields follow, separated by `\n`, and the
//! last field is the rest of the payload (so it may hold newlines):
//!
//! | kind | layout | on |
//! | --- | --- | --- |
//! | saved | `S<epoch>\n<offset>\n<except>\n<message>` | group channel (append script) |
//! | reset | `R<epoch>` | group channel (flush script) |
//! | moved | `M<epoch>\n<last>` | group channel (rollback check) |
//! | unsaved | `U<node>\n<except>\n<message>` | group channel |
//! | member | `E<node>\n<J\|L>\n<channel>\n<+user\|->` | group channel |
//! | direct | `D<channel>\n<frame>` | a server's own channel |
//! | close all | `C<node>` | the channel of all servers |
//!
//! `<except>` is a channel id or empty; `<message>` is
//! [`NewMessage::encode`]; ids are hyphenated UUIDs; offsets are decimal.
//! An epoch is a name without `\n` (and not empty): one with a newline
//! cannot be written, as it would run into the next field.

use channelbox_core::{Epoch, NewMessage, StreamPosition};
use uuid::Uuid;

/// A member joining or leaving a group (in a member event).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberChange {
    /// The member joined.
    Joined,
    /// The member left.
    Left,
}

/// One pub/sub payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wire {
    /// A saved message with its position (published by the append script).
    Saved {
        /// Its epoch and offset.
        position: StreamPosition,
        /// A channel that must not receive it.
        except: Option<Uuid>,
        /// The message.
        message: NewMessage,
    },
    /// The group was flushed: it continues in this epoch from offset 1
    /// (published by the flush script).
    Reset {
        /// The new epoch.
        epoch: Epoch,
    },
    /// The group moved to a new epoch after its head went back; `position`
    /// is the new epoch and its newest offset (published by the scripts'
    /// rollback check).
    Moved {
        /// The new epoch and its newest offset.
        position: StreamPosition,
    },
    /// An unsaved message from server `node`.
    Unsaved {
        /// The server that sent it (it ignores its own).
        node: Uuid,
        /// A channel that must not receive it.
        except: Option<Uuid>,
        /// The message.
        message: NewMessage,
    },
    /// A member of the group joined or left on server `node`.
    Member {
        /// The server the member is on.
        node: Uuid,
        /// Joined or left.
        change: MemberChange,
        /// The member's channel.
        channel: Uuid,
        /// The member's user, if it has one.
        user: Option<String>,
    },
    /// A frame for one channel, sent to the server that runs it.
    Direct {
        /// The channel.
        to: Uuid,
        /// The frame's text.
        frame: String,
    },
    /// Every server closes every channel (admin close-all), sent by `node`.
    CloseAll {
        /// The server that asked.
        node: Uuid,
    },
}

/// Why a payload is not one of ours, or a value cannot be written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WireError {
    /// The payload is empty.
    Empty,
    /// The first byte names no kind.
    UnknownKind(u8),
    /// A field is missing (the payload ends too early).
    MissingField(&'static str),
    /// A field is there but not what it must be.
    BadField(&'static str),
    /// The epoch is empty or holds a newline: it cannot be written.
    BadEpoch,
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Empty => f.write_str("empty pub/sub payload"),
            WireError::UnknownKind(k) => write!(f, "unknown pub/sub payload kind {k:#04x}"),
            WireError::MissingField(name) => write!(f, "pub/sub payload lacks its {name}"),
            WireError::BadField(name) => write!(f, "pub/sub payload has a malformed {name}"),
            WireError::BadEpoch => f.write_str("an epoch must be non-empty and without newlines"),
        }
    }
}

impl std::error::Error for WireError {}

/// The fields of a payload after its kind byte, read front to back.
struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    /// The next field, up to the next newline.
    fn next(&mut self, name: &'static str) -> Result<&'a [u8], WireError> {
        let at = self
            .rest
            .iter()
            .position(|b| *b == b'\n')
            .ok_or(WireError::MissingField(name))?;
        let field = &self.rest[..at];
        self.rest = &self.rest[at + 1..];
        Ok(field)
    }

    fn text(&mut self, name: &'static str) -> Result<&'a str, WireError> {
        text(self.next(name)?, name)
    }
}

fn text<'a>(bytes: &'a [u8], name: &'static str) -> Result<&'a str, WireError> {
    std::str::from_utf8(bytes).map_err(|_| WireError::BadField(name))
}

fn uuid(s: &str, name: &'static str) -> Result<Uuid, WireError> {
    Uuid::parse_str(s).map_err(|_| WireError::BadField(name))
}

fn except(s: &str) -> Result<Option<Uuid>, WireError> {
    if s.is_empty() {
        Ok(None)
    } else {
        uuid(s, "except").map(Some)
    }
}

fn offset(s: &str, name: &'static str) -> Result<u64, WireError> {
    // Only digits: `u64::from_str` takes a leading `+` too.
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(WireError::BadField(name));
    }
    s.parse().map_err(|_| WireError::BadField(name))
}

fn epoch(s: &str) -> Result<Epoch, WireError> {
    if s.is_empty() || s.contains('\n') {
        return Err(WireError::BadField("epoch"));
    }
    Ok(Epoch::from(s))
}

fn message(bytes: &[u8]) -> Result<NewMessage, WireError> {
    NewMessage::decode(bytes).ok_or(WireError::BadField("message"))
}

fn writable(epoch: &Epoch) -> Result<&str, WireError> {
    let s = epoch.as_str();
    if s.is_empty() || s.contains('\n') {
        return Err(WireError::BadEpoch);
    }
    Ok(s)
}

fn except_text(except: Option<Uuid>) -> String {
    except.map(|e| e.to_string()).unwrap_or_default()
}

impl Wire {
    /// The payload's bytes; [`WireError::BadEpoch`] for an epoch that
    /// cannot be written.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let with_message = |head: String, message: &NewMessage| {
            let mut body = head.into_bytes();
            body.extend_from_slice(&message.encode());
            body
        };
        Ok(match self {
            Wire::Saved {
                position,
                except,
                message,
            } => with_message(
                format!(
                    "S{}\n{}\n{}\n",
                    writable(&position.epoch)?,
                    position.offset,
                    except_text(*except)
                ),
                message,
            ),
            Wire::Reset { epoch } => format!("R{}", writable(epoch)?).into_bytes(),
            Wire::Moved { position } => format!("M{}\n{}", writable(&position.epoch)?, position.offset).into_bytes(),
            Wire::Unsaved { node, except, message } => {
                with_message(format!("U{node}\n{}\n", except_text(*except)), message)
            }
            Wire::Member {
                node,
                change,
                channel,
                user,
            } => {
                let kind = match change {
                    MemberChange::Joined => 'J',
                    MemberChange::Left => 'L',
                };
                let user = user.as_deref().map_or("-".to_owned(), |u| format!("+{u}"));
                format!("E{node}\n{kind}\n{channel}\n{user}").into_bytes()
            }
            Wire::Direct { to, frame } => format!("D{to}\n{frame}").into_bytes(),
            Wire::CloseAll { node } => format!("C{node}").into_bytes(),
        })
    }

    /// Reads a payload written by [`Wire::encode`] or by the scripts.
    pub fn decode(payload: &[u8]) -> Result<Wire, WireError> {
        let (&kind, body) = payload.split_first().ok_or(WireError::Empty)?;
        let mut f = Fields { rest: body };
        match kind {
            b'S' => {
                let epoch = epoch(f.text("epoch")?)?;
                let offset = offset(f.text("offset")?, "offset")?;
                let except = except(f.text("except")?)?;
                Ok(Wire::Saved {
                    position: StreamPosition::new(epoch, offset),
                    except,
                    message: message(f.rest)?,
                })
            }
            b'R' => Ok(Wire::Reset {
                epoch: epoch(text(body, "epoch")?)?,
            }),
            b'M' => {
                let epoch = epoch(f.text("epoch")?)?;
                let last = offset(text(f.rest, "offset")?, "offset")?;
                Ok(Wire::Moved {
                    position: StreamPosition::new(epoch, last),
                })
            }
            b'U' => {
                let node = uuid(f.text("node")?, "node")?;
                let except = except(f.text("except")?)?;
                Ok(Wire::Unsaved {
                    node,
                    except,
                    message: message(f.rest)?,
                })
            }
            b'E' => {
                let node = uuid(f.text("node")?, "node")?;
                let change = match f.next("change")? {
                    b"J" => MemberChange::Joined,
                    b"L" => MemberChange::Left,
                    _ => return Err(WireError::BadField("change")),
                };
                let channel = uuid(f.text("channel")?, "channel")?;
                let user = match text(f.rest, "user")? {
                    "-" => None,
                    u => Some(u.strip_prefix('+').ok_or(WireError::BadField("user"))?.to_owned()),
                };
                Ok(Wire::Member {
                    node,
                    change,
                    channel,
                    user,
                })
            }
            b'D' => {
                let to = uuid(f.text("channel")?, "channel")?;
                Ok(Wire::Direct {
                    to,
                    frame: text(f.rest, "frame")?.to_owned(),
                })
            }
            b'C' => Ok(Wire::CloseAll {
                node: uuid(text(body, "node")?, "node")?,
            }),
            other => Err(WireError::UnknownKind(other)),
        }
    }
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
