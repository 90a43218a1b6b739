//! What the client knows: where it stands in each group (kept across
//! connections), and what one connection waits for (replies, recoveries).
//! No I/O here: each server frame becomes events and, at most, a reason to
//! end the connection.

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::{ClientError, Event};

/// A position in a group: an epoch and an offset in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Position {
    pub(super) epoch: String,
    pub(super) offset: u64,
}

impl Position {
    /// The `epoch` and `offset` fields of a frame (`welcome`, `joined`).
    fn of(v: &Value) -> Option<Position> {
        Some(Position {
            epoch: v["epoch"].as_str()?.to_owned(),
            offset: v["offset"].as_u64()?,
        })
    }
}

/// The groups the client is in, each with its position: the last saved
/// message delivered, or where live delivery started; `None` until the
/// server named one. The URL group is among them until the application
/// leaves it (each connection still joins it, and leaves it again at once).
#[derive(Debug)]
pub(super) struct Groups {
    url: String,
    at: BTreeMap<String, Option<Position>>,
}

impl Groups {
    /// The client's groups at the start: the URL group alone.
    pub(super) fn new(url: &str) -> Self {
        let mut at = BTreeMap::new();
        at.insert(url.to_owned(), None);
        Groups {
            url: url.to_owned(),
            at,
        }
    }

    /// The URL group.
    pub(super) fn url(&self) -> &str {
        &self.url
    }

    fn position(&self, group: &str) -> Option<&Position> {
        self.at.get(group).and_then(Option::as_ref)
    }

    /// The query that recovers the URL group (empty before any position).
    pub(super) fn url_query(&self) -> String {
        match self.position(&self.url) {
            Some(p) => format!("?since={}&epoch={}", p.offset, p.epoch),
            None => String::new(),
        }
    }

    /// Whether the application left the URL group: a new connection, which
    /// joins it by its URL, must leave it again.
    pub(super) fn url_left(&self) -> bool {
        !self.at.contains_key(&self.url)
    }

    /// Whether the client is in `group`.
    fn member(&self, group: &str) -> bool {
        self.at.contains_key(group)
    }

    /// The groups to rejoin after a reconnect: all but the URL group.
    pub(super) fn others(&self) -> Vec<String> {
        self.at.keys().filter(|g| **g != self.url).cloned().collect()
    }

    /// A `join` of `group` that recovers it from its position, if it has one.
    pub(super) fn join_frame(&self, group: &str, reference: u64) -> Value {
        match self.position(group) {
            Some(p) => json!({"type": "join", "group": group, "since": p.offset, "epoch": p.epoch, "ref": reference}),
            None => json!({"type": "join", "group": group, "ref": reference}),
        }
    }

    /// Moves a group's position forward, or to another epoch; never back.
    fn advance(&mut self, group: &str, to: Position) {
        if let Some(slot) = self.at.get_mut(group) {
            match slot {
                Some(p) if p.epoch == to.epoch && p.offset >= to.offset => {}
                _ => *slot = Some(to),
            }
        }
    }

    /// Whether a saved message is new (and records it): offsets already
    /// delivered in the same epoch are dropped, and so is everything of a
    /// group the client is not in (left, the request perhaps still in
    /// flight).
    pub(super) fn take(&mut self, group: &str, epoch: &str, offset: u64) -> bool {
        match self.at.get_mut(group) {
            Some(Some(p)) if p.epoch == epoch && offset <= p.offset => false,
            Some(slot) => {
                *slot = Some(Position {
                    epoch: epoch.to_owned(),
                    offset,
                });
                true
            }
            None => false,
        }
    }

    /// Forgets a group (left, or refused for good), the URL group too: it is
    /// not rejoined, nor recovered, after a reconnect.
    pub(super) fn remove(&mut self, group: &str) {
        self.at.remove(group);
    }
}

/// How a join replays its group, which decides when its position is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Replay {
    /// Nothing: live delivery starts after the `joined` position.
    Nothing,
    /// `since`: the position moves to `joined`'s once `recovered` came.
    Since,
    /// `history`: the newest messages are replayed, then live ones.
    History,
}

/// What a request in flight is, for what its reply means.
#[derive(Debug)]
pub(super) enum Kind {
    Publish(String),
    Join {
        group: String,
        replay: Replay,
        rejoin: bool,
        /// The application left the group after this join was sent: its
        /// `joined` must not make the client a member again.
        left: bool,
    },
    Other,
}

impl Kind {
    /// The kind of a request frame sent by the application. A `leave` is
    /// recorded at once: it always succeeds, and a group left must not be
    /// rejoined even if the reply is lost.
    pub(super) fn of(frame: &Value, groups: &mut Groups) -> Kind {
        let group = frame["group"].as_str();
        match frame["type"].as_str() {
            Some("publish") => Kind::Publish(group.unwrap_or(groups.url()).to_owned()),
            Some("join") => match group {
                Some(g) => Kind::Join {
                    group: g.to_owned(),
                    replay: if frame.get("since").is_some() {
                        Replay::Since
                    } else if frame.get("history").is_some() {
                        Replay::History
                    } else {
                        Replay::Nothing
                    },
                    rejoin: false,
                    left: false,
                },
                None => Kind::Other,
            },
            Some("leave") => {
                if let Some(g) = group {
                    groups.remove(g);
                }
                Kind::Other
            }
            _ => Kind::Other,
        }
    }
}

/// Who waits for a reply.
pub(super) type Reply = oneshot::Sender<Result<Value, ClientError>>;

/// A request sent on this connection and not answered yet.
#[derive(Debug)]
struct Pending {
    kind: Kind,
    reply: Option<Reply>,
}

/// What one connection waits for.
#[derive(Debug, Default)]
pub(super) struct Connection {
    pending: HashMap<u64, Pending>,
    /// Where live delivery starts in each group recovering with `since`.
    starts: HashMap<String, Position>,
}

fn text(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_default().to_owned()
}

impl Connection {
    /// Records a request sent, to match its reply by `ref`.
    pub(super) fn expect(&mut self, reference: u64, kind: Kind, reply: Option<Reply>) {
        self.pending.insert(reference, Pending { kind, reply });
    }

    /// Records a request frame of the application: what its reply will mean,
    /// and for a `leave`, that the group is left at once — neither a join of
    /// it still in flight nor a reconnect makes the client a member again.
    pub(super) fn request(&mut self, groups: &mut Groups, frame: &Value, reference: u64, reply: Option<Reply>) {
        let kind = Kind::of(frame, groups);
        if let (Some("leave"), Some(g)) = (frame["type"].as_str(), frame["group"].as_str()) {
            for pending in self.pending.values_mut() {
                if let Kind::Join { group, left, .. } = &mut pending.kind {
                    *left |= group == g;
                }
            }
            self.starts.remove(g);
        }
        self.expect(reference, kind, reply);
    }

    /// Handles one server frame: pushes its events; `Some(reason)` when the
    /// connection must end.
    pub(super) fn on_frame(&mut self, groups: &mut Groups, v: &Value, out: &mut Vec<Event>) -> Option<&'static str> {
        match v["type"].as_str().unwrap_or_default() {
            "welcome" => self.welcome(groups, v, out),
            "message" => out.extend(message(groups, v)),
            "recovered" => {
                let group = text(v, "group");
                if !groups.member(&group) {
                    // The recovery of a group left meanwhile.
                    return None;
                }
                if let Some(start) = self.starts.remove(&group) {
                    // Every saved message up to the start was replayed or
                    // reported lost: live ones follow it.
                    groups.advance(&group, start);
                }
                out.push(Event::Recovered {
                    from: v["from"].as_u64().unwrap_or_default(),
                    to: v["to"].as_u64().unwrap_or_default(),
                    complete: v["complete"].as_bool().unwrap_or(false),
                    group,
                });
            }
            "direct" => out.push(Event::Direct {
                from: text(v, "from"),
                data: v["data"].clone(),
            }),
            "member_joined" | "member_left" => out.push(Event::Member(v.clone())),
            "error" => return self.error(groups, v, out),
            _ => self.reply(groups, v, out),
        }
        None
    }

    fn welcome(&mut self, groups: &mut Groups, v: &Value, out: &mut Vec<Event>) {
        let Some(start) = Position::of(v) else { return };
        let url = groups.url().to_owned();
        if groups.position(&url).is_some() {
            // Recovering with the URL's `since`: `recovered` completes it.
            self.starts.insert(url, start.clone());
        } else {
            groups.advance(&url, start.clone());
        }
        out.push(Event::Connected {
            channel_id: text(v, "channel_id"),
            epoch: start.epoch,
            offset: start.offset,
        });
    }

    /// A reply that is not an error: `joined`, `published`, `left`, `pong`…
    fn reply(&mut self, groups: &mut Groups, v: &Value, out: &mut Vec<Event>) {
        let Some(reference) = v["ref"].as_u64() else { return };
        let Some(Pending { kind, reply }) = self.pending.remove(&reference) else {
            return;
        };
        match (v["type"].as_str(), kind) {
            // A join or rejoin of a group the application left meanwhile is
            // not kept.
            (
                Some("joined"),
                Kind::Join {
                    group,
                    replay,
                    rejoin,
                    left,
                },
            ) if !left && (!rejoin || groups.member(&group)) => {
                self.joined(groups, &group, replay, v, reference, out);
            }
            (Some("published"), Kind::Publish(group)) => out.push(Event::Published {
                reference,
                group,
                offset: v["offset"].as_u64(),
                epoch: v["epoch"].as_str().map(str::to_owned),
            }),
            _ => {}
        }
        if let Some(r) = reply {
            let _ = r.send(Ok(v.clone()));
        }
    }

    fn joined(
        &mut self,
        groups: &mut Groups,
        group: &str,
        replay: Replay,
        v: &Value,
        reference: u64,
        out: &mut Vec<Event>,
    ) {
        groups.at.entry(group.to_owned()).or_default();
        let Some(start) = Position::of(v) else { return };
        match replay {
            Replay::Since => {
                self.starts.insert(group.to_owned(), start.clone());
            }
            // The replay of the newest messages comes first: count from 0.
            Replay::History => groups.advance(
                group,
                Position {
                    epoch: start.epoch.clone(),
                    offset: 0,
                },
            ),
            Replay::Nothing => groups.advance(group, start.clone()),
        }
        out.push(Event::Joined {
            group: group.to_owned(),
            epoch: start.epoch,
            offset: start.offset,
            reference,
        });
    }

    fn error(&mut self, groups: &mut Groups, v: &Value, out: &mut Vec<Event>) -> Option<&'static str> {
        let (code, message) = (text(v, "code"), text(v, "message"));
        let pending = v["ref"].as_u64().and_then(|r| Some((r, self.pending.remove(&r)?)));
        let Some((reference, Pending { kind, reply })) = pending else {
            out.push(Event::ServerError { code, message });
            return None;
        };
        let mut end = None;
        match kind {
            Kind::Join {
                group, rejoin: true, ..
            } => {
                // A group left meanwhile is not worth a reconnect.
                let retrying = code == "unavailable" && groups.member(&group);
                if retrying {
                    // The store cannot take it now: reconnect after a
                    // backoff that grows until a connection stays up.
                    end = Some("rejoin failed");
                } else {
                    groups.remove(&group);
                }
                out.push(Event::RejoinFailed {
                    group,
                    code: code.clone(),
                    message: message.clone(),
                    retrying,
                });
            }
            Kind::Publish(group) => out.push(Event::PublishRefused {
                reference,
                group,
                code: code.clone(),
                message: message.clone(),
            }),
            _ => {}
        }
        if let Some(r) = reply {
            let _ = r.send(Err(ClientError::Rejected { code, message }));
        }
        end
    }

    /// The connection ended: every request in flight fails, and publishes
    /// among them are reported unanswered (in the order they were sent).
    pub(super) fn ended(self, out: &mut Vec<Event>) {
        let mut pending: Vec<(u64, Pending)> = self.pending.into_iter().collect();
        pending.sort_by_key(|(r, _)| *r);
        for (reference, Pending { kind, reply }) in pending {
            if let Kind::Publish(group) = kind {
                out.push(Event::PublishUnanswered { reference, group });
            }
            if let Some(r) = reply {
                let _ = r.send(Err(ClientError::Disconnected));
            }
        }
    }
}

/// A `message` frame: delivered, a duplicate of one delivered already, or
/// nothing for a group the client left (the server may send a few before it
/// reads the `leave`, and a new connection joins the URL group until it
/// reads the `leave` the client sends again).
fn message(groups: &mut Groups, v: &Value) -> Option<Event> {
    let group = text(v, "group");
    if !groups.member(&group) {
        return None;
    }
    let epoch = v["epoch"].as_str().map(str::to_owned);
    let offset = v["offset"].as_u64();
    if let (Some(e), Some(o)) = (&epoch, offset) {
        if !groups.take(&group, e, o) {
            return Some(Event::Duplicate {
                group,
                epoch: e.clone(),
                offset: o,
            });
        }
    }
    Some(Event::Message {
        group,
        epoch,
        offset,
        from: v["from"].as_str().map(str::to_owned),
        data: v["data"].clone(),
    })
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
