//! permessage-deflate (RFC 7692): the negotiation, and the compression of
//! outgoing frames — once per frame, whoever receives it.
//!
//! The server always answers `server_no_context_takeover`: each message is
//! compressed on its own, so its compressed frame does not depend on the
//! connection and one copy, cached on the shared core [`Frame`], goes to
//! every member that negotiated the extension. It also answers
//! `client_no_context_takeover` (RFC 7692 §7.1.1.2 lets a server ask for it
//! unasked): the inflater then lives only while a compressed message is
//! read, and an idle connection holds no window. Reading compressed client
//! messages is [`crate::inflate`]'s.

use std::cell::RefCell;

use bytes::Bytes;
use channelbox_core::{Frame, FrameKind};
use flate2::{Compress, Compression, FlushCompress, Status};

/// The `Sec-WebSocket-Extensions` answer when an offer is accepted.
pub const ACCEPTED: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// Frames with fewer payload bytes go out uncompressed. Measured with
/// `cargo test -p channelbox-ws --lib threshold -- --nocapture` (which also
/// asserts where it starts to pay) on the frames of a chat conversation (docs/protocol.md's
/// `message` frames and the short frames between them): up to 64 bytes the
/// compressed frame is 2-12% longer than the plain one (the block header and
/// Huffman table cost more than the few repeats save), at 80 bytes it is 8%
/// shorter, at 128 bytes 19%, at 1 KB about half. Frames that do not shrink
/// go out plain anyway; the threshold spares compressing them.
pub const MIN_COMPRESSED_BYTES: usize = 80;

/// The deflate level. A message is compressed once for all its receivers,
/// so a better level costs little per delivery: on 1 KB chat messages
/// level 6 makes frames 7% shorter than level 1 (the same test prints both),
/// on 4 KB 16% shorter.
const LEVEL: u32 = 6;

/// The sync-flush tail every compressed message ends with, removed before
/// sending and added back before inflating (RFC 7692 §7.2.1).
pub(crate) const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// What a client offered that the server accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Agreed {
    /// The client's `client_max_window_bits`, when it gave one: the window
    /// it compresses with. The server inflates with the full 32 KiB window,
    /// which reads every smaller one, so any value from 8 to 15 is accepted.
    pub client_max_window_bits: Option<u8>,
}

impl Agreed {
    /// The `Sec-WebSocket-Extensions` response header's value.
    pub fn response(&self) -> &'static str {
        ACCEPTED
    }
}

/// Why an offer of permessage-deflate was passed over.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum OfferError {
    /// A parameter RFC 7692 does not define.
    #[error("unknown parameter {0:?}")]
    Unknown(String),
    /// A parameter given twice.
    #[error("parameter {0:?} given twice")]
    Duplicate(&'static str),
    /// A window size that is not 8 to 15, or a value where none is allowed.
    #[error("bad value for {0:?}")]
    BadValue(&'static str),
    /// `server_max_window_bits` below 15: the one compressed copy of a
    /// message is made with the full window, which that client cannot read.
    #[error("server_max_window_bits below 15 cannot share one compressed copy")]
    SmallServerWindow,
}

/// Picks the first acceptable permessage-deflate offer among the values of
/// the request's `Sec-WebSocket-Extensions` headers (each a comma-separated
/// list of offers, in the client's order of preference); `None` when there
/// is none, and the connection goes uncompressed.
pub fn negotiate<'a>(headers: impl IntoIterator<Item = &'a str>) -> Option<Agreed> {
    headers
        .into_iter()
        .flat_map(|value| value.split(','))
        .filter_map(|offer| {
            let mut parts = offer.split(';');
            let name = parts.next()?.trim();
            name.eq_ignore_ascii_case("permessage-deflate").then_some(parts)
        })
        .find_map(|params| parse_offer(params).ok())
}

/// One offer's parameters (after the extension's name).
pub(crate) fn parse_offer<'a>(params: impl Iterator<Item = &'a str>) -> Result<Agreed, OfferError> {
    let (mut server_nct, mut client_nct, mut server_bits, mut client_bits) = (false, false, false, None);
    for param in params {
        let (key, value) = match param.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim().trim_matches('"'))),
            None => (param.trim(), None),
        };
        let key = key.to_ascii_lowercase();
        match key.as_str() {
            "server_no_context_takeover" | "client_no_context_takeover" => {
                let (seen, name) = if key.starts_with("server") {
                    (&mut server_nct, "server_no_context_takeover")
                } else {
                    (&mut client_nct, "client_no_context_takeover")
                };
                if value.is_some() {
                    return Err(OfferError::BadValue(name));
                }
                if std::mem::replace(seen, true) {
                    return Err(OfferError::Duplicate(name));
                }
            }
            "server_max_window_bits" => {
                const NAME: &str = "server_max_window_bits";
                if std::mem::replace(&mut server_bits, true) {
                    return Err(OfferError::Duplicate(NAME));
                }
                let bits = value.and_then(window_bits).ok_or(OfferError::BadValue(NAME))?;
                if bits < 15 {
                    return Err(OfferError::SmallServerWindow);
                }
            }
            "client_max_window_bits" => {
                const NAME: &str = "client_max_window_bits";
                if client_bits.is_some() {
                    return Err(OfferError::Duplicate(NAME));
                }
                // Without a value the client only says it understands the
                // parameter; the window it uses is then the default 15.
                let bits = match value {
                    None => 15,
                    Some(v) => window_bits(v).ok_or(OfferError::BadValue(NAME))?,
                };
                client_bits = Some((bits, value.is_some()));
            }
            _ => return Err(OfferError::Unknown(key)),
        }
    }
    Ok(Agreed {
        client_max_window_bits: client_bits.and_then(|(bits, given)| given.then_some(bits)),
    })
}

/// A window size parameter: 8 to 15, digits only (no sign, no leading zero).
fn window_bits(value: &str) -> Option<u8> {
    if value.is_empty() || value.starts_with('0') || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().filter(|b| (8..=15).contains(b))
}

thread_local! {
    /// One compressor per writer thread, reset for each message: its tables
    /// are a few hundred KB, too many to allocate per message.
    static COMPRESSOR: RefCell<Compress> = RefCell::new(Compress::new(Compression::new(LEVEL), false));
}

/// The whole compressed frame (header with RSV1, then the deflated payload
/// without its sync-flush tail) for a data frame worth compressing; `None`
/// for pings, short frames and frames that do not shrink.
pub(crate) fn compress_frame(frame: &Frame) -> Option<Bytes> {
    let opcode = match frame.kind() {
        FrameKind::Text => 0x01,
        FrameKind::Binary => 0x02,
        FrameKind::Ping => return None,
    };
    let data = frame.data();
    if data.len() < MIN_COMPRESSED_BYTES {
        return None;
    }
    let payload = deflate(data)?;
    if payload.len() >= data.len() {
        return None;
    }
    let mut out = Vec::with_capacity(payload.len() + 10);
    header(&mut out, 0x80 | 0x40 | opcode, payload.len());
    out.extend_from_slice(&payload);
    Some(Bytes::from(out))
}

/// Raw deflate of one message with a sync flush, the tail removed; `None`
/// only if the compressor fails, which it does not on a fresh stream.
pub(crate) fn deflate(data: &[u8]) -> Option<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut compressor = cell.borrow_mut();
        compressor.reset();
        let mut out = Vec::with_capacity(data.len() / 2 + 64);
        loop {
            let consumed = usize::try_from(compressor.total_in()).ok()?;
            let status = compressor
                .compress_vec(&data[consumed..], &mut out, FlushCompress::Sync)
                .ok()?;
            let done = usize::try_from(compressor.total_in()).ok()? == data.len() && out.len() < out.capacity();
            if done || status == Status::StreamEnd {
                break;
            }
            out.reserve(out.capacity().max(64));
        }
        if out.ends_with(&TAIL) {
            out.truncate(out.len() - TAIL.len());
        }
        Some(out)
    })
}

/// Appends an unmasked frame header: first byte, then the length.
pub(crate) fn header(out: &mut Vec<u8>, first: u8, len: usize) {
    out.push(first);
    match len {
        n if n < 126 => out.push(n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
}

#[cfg(test)]
#[path = "deflate_tests.rs"]
mod tests;
