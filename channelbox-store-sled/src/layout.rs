//! The on-disk layout: keys under three prefixes in sled's default tree, and
//! the encoding of a message value. See `store.rs` for what lives where.

use bytes::Bytes;
use channelbox_core::{NewMessage, PayloadKind};

/// The on-disk format this build reads and writes.
pub(crate) const FORMAT: &str = "channelbox-sled/1";

pub(crate) const KEY_FORMAT: &[u8] = b"\x00format";
pub(crate) const KEY_INSTANCE: &[u8] = b"\x00instance";
pub(crate) const KEY_FLUSHES: &[u8] = b"\x00flushes";
/// How many groups the total budget evicted (see `channelbox_core::TotalBudget`);
/// absent in stores written before it existed, where it counts as 0.
pub(crate) const KEY_EVICTIONS: &[u8] = b"\x00evictions";
/// The record of the newest batch the writer started (see `marker.rs`).
pub(crate) const KEY_UNDO: &[u8] = b"\x00undo";
pub(crate) const GROUP_PREFIX: u8 = 1;
pub(crate) const MESSAGE_PREFIX: u8 = 2;

pub(crate) fn group_key(group: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + group.len());
    k.push(GROUP_PREFIX);
    k.extend_from_slice(group.as_bytes());
    k
}

pub(crate) fn message_prefix(group: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + group.len() + 8);
    k.push(MESSAGE_PREFIX);
    k.extend_from_slice(&(group.len() as u16).to_be_bytes());
    k.extend_from_slice(group.as_bytes());
    k
}

pub(crate) fn message_key(group: &str, offset: u64) -> Vec<u8> {
    let mut k = message_prefix(group);
    k.extend_from_slice(&offset.to_be_bytes());
    k
}

/// A group's head as stored: generation and newest offset.
pub(crate) fn group_value(generation: u64, last: u64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&generation.to_be_bytes());
    v[8..].copy_from_slice(&last.to_be_bytes());
    v
}

pub(crate) fn encode_message(m: &NewMessage) -> Vec<u8> {
    m.encode()
}

/// Decodes a stored message value: (kind, timestamp, meta, payload).
pub(crate) fn decode_message(v: &[u8]) -> Option<(PayloadKind, u64, Bytes, Bytes)> {
    NewMessage::decode(v).map(|m| (m.kind, m.timestamp_ms, m.meta, m.payload))
}

pub(crate) fn u64_at(v: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(v.get(at..at + 8)?.try_into().ok()?))
}
