//! Reading compressed client messages (permessage-deflate, RFC 7692): a
//! filter between the socket and tungstenite.
//!
//! tungstenite refuses every frame with RSV1 set and has no deflate. Rather
//! than read frames with our own code and redo what tungstenite does after
//! the frame (control frames between fragments, pings answered, the close
//! handshake, fragment order, UTF-8, size limits), this filter sits under
//! it and rewrites only compressed messages: their frames are unmasked and
//! inflated as they arrive, and what comes out is handed up as plain
//! fragments (masked with a zero key, which leaves the bytes as they are).
//! Every other frame passes through byte for byte, so tungstenite judges it
//! as before — an RSV1 where RFC 7692 allows none still fails.
//!
//! Memory is bounded whatever the client sends: frames are never read
//! whole (a 512-byte input buffer, an output of at most one 16 KiB
//! fragment at a time, inflated only as tungstenite reads), the inflater
//! exists only during a compressed message, and a message whose inflated
//! or compressed size passes the limit stops being inflated at once: the
//! filter hands up a fragment header longer than the limit, tungstenite
//! reports it as too large (the protocol answers `too_large` and closes
//! with 1009), and the rest of the message is dropped unread by the
//! inflater. A zip bomb of a few KB inflating to 1 GB costs one fragment.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use flate2::{Decompress, FlushDecompress};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::deflate::TAIL;

/// Bytes read from the socket at a time.
const INPUT: usize = 512;
/// The largest fragment handed up at a time.
const CHUNK: usize = 16 * 1024;

/// A socket whose reads go through the filter when the extension was
/// negotiated; writes pass through.
#[derive(Debug)]
pub(crate) struct Inflating<S> {
    io: S,
    filter: Option<Box<Filter>>,
}

impl<S> Inflating<S> {
    /// `max` is the largest message (inflated) a client may send; `None`
    /// when the extension was not negotiated: every byte passes as it is.
    pub(crate) fn new(io: S, max: Option<usize>) -> Self {
        Inflating {
            io,
            filter: max.map(|max| Box::new(Filter::new(max))),
        }
    }
}

/// Where the filter is in the client's stream of frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a frame header.
    Header,
    /// Copying `left` payload bytes of a frame that passes as it is.
    Pass { left: u64 },
    /// Inflating `left` payload bytes of a compressed message's frame.
    Inflate {
        left: u64,
        key: [u8; 4],
        at: usize,
        fin: bool,
    },
    /// The message's last frame was read: inflating the tail that the
    /// client removed, then handing up the final fragment.
    Finish { fed: usize },
}

/// The message being read.
#[derive(Debug)]
enum Message {
    None,
    /// A fragmented uncompressed message: its continuations pass.
    Plain,
    /// A compressed message; `inflater` is `None` once it went over the
    /// limit (its remaining bytes are dropped).
    Compressed {
        inflater: Option<Box<Decompress>>,
        inflated: usize,
        compressed: usize,
    },
}

/// The filter's state; boxed in [`Inflating`], allocated only for the
/// connections that negotiated the extension.
#[derive(Debug)]
pub(crate) struct Filter {
    max: usize,
    input: Box<[u8; INPUT]>,
    start: usize,
    end: usize,
    output: Vec<u8>,
    taken: usize,
    state: State,
    message: Message,
}

/// What a step needs next.
enum Step {
    /// It produced output or changed state: step again (or hand up).
    Again,
    /// It needs more input.
    Read,
}

impl Filter {
    pub(crate) fn new(max: usize) -> Self {
        Filter {
            max,
            input: Box::new([0; INPUT]),
            start: 0,
            end: 0,
            output: Vec::new(),
            taken: 0,
            state: State::Header,
            message: Message::None,
        }
    }

    fn available(&self) -> &[u8] {
        &self.input[self.start..self.end]
    }

    /// Handles what the input buffer holds until there is output to hand
    /// up or more input is needed.
    fn step(&mut self) -> io::Result<Step> {
        match self.state {
            State::Header => Ok(self.header()),
            State::Pass { left } => {
                let n = self.available().len().min(usize::try_from(left).unwrap_or(usize::MAX));
                if n == 0 {
                    return Ok(Step::Read);
                }
                self.output.extend_from_slice(&self.input[self.start..self.start + n]);
                self.start += n;
                self.state = next_or_header(left - n as u64, |left| State::Pass { left });
                Ok(Step::Again)
            }
            State::Inflate { left, key, at, fin } => self.inflate_payload(left, key, at, fin),
            State::Finish { fed } => self.finish(fed),
        }
    }

    /// Reads one frame header and decides whether its frame is inflated.
    fn header(&mut self) -> Step {
        let avail = self.available();
        if avail.len() < 2 {
            return Step::Read;
        }
        let (b0, b1) = (avail[0], avail[1]);
        let masked = b1 & 0x80 != 0;
        let extended = match b1 & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let len_at = 2 + extended;
        let header_len = len_at + if masked { 4 } else { 0 };
        if avail.len() < header_len {
            return Step::Read;
        }
        let len = match extended {
            0 => u64::from(b1 & 0x7f),
            _ => avail[2..len_at].iter().fold(0u64, |n, b| (n << 8) | u64::from(*b)),
        };
        let mut key = [0; 4];
        if masked {
            key.copy_from_slice(&avail[len_at..header_len]);
        }
        let (fin, rsv1, rsv23, opcode) = (b0 & 0x80 != 0, b0 & 0x40 != 0, b0 & 0x30 != 0, b0 & 0x0f);
        let starts = rsv1 && matches!(opcode, 1 | 2) && matches!(self.message, Message::None);
        let continues = !rsv1 && opcode == 0 && matches!(self.message, Message::Compressed { .. });
        if masked && !rsv23 && (starts || continues) {
            self.start += header_len;
            if starts {
                self.message = Message::Compressed {
                    inflater: Some(Box::new(Decompress::new(false))),
                    inflated: 0,
                    compressed: 0,
                };
                fragment_header(&mut self.output, opcode, false, 0);
            }
            self.state = State::Inflate {
                left: len,
                key,
                at: 0,
                fin,
            };
            return Step::Again;
        }
        // Everything else passes; tungstenite refuses what is wrong in it.
        if !rsv1 && !rsv23 {
            match (opcode, fin, &self.message) {
                (1 | 2, false, Message::None) => self.message = Message::Plain,
                (0, true, Message::Plain) => self.message = Message::None,
                _ => {}
            }
        }
        self.output
            .extend_from_slice(&self.input[self.start..self.start + header_len]);
        self.start += header_len;
        self.state = next_or_header(len, |left| State::Pass { left });
        Step::Again
    }

    /// Unmasks and inflates what has arrived of a compressed frame.
    fn inflate_payload(&mut self, left: u64, key: [u8; 4], at: usize, fin: bool) -> io::Result<Step> {
        let n = self.available().len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if n == 0 && left > 0 {
            return Ok(Step::Read);
        }
        let (start, max) = (self.start, self.max);
        for (i, byte) in self.input[start..start + n].iter_mut().enumerate() {
            *byte ^= key[(at + i) % 4];
        }
        let Message::Compressed {
            inflater,
            inflated,
            compressed,
        } = &mut self.message
        else {
            return Err(corrupt());
        };
        *compressed += n;
        let consumed = match inflater {
            Some(_) if *compressed > max => {
                *inflater = None;
                too_large(&mut self.output, max);
                n
            }
            Some(one) => match inflate_some(one, &self.input[start..start + n], &mut self.output, inflated, max)? {
                Some((used, _)) => used,
                None => {
                    *inflater = None;
                    n
                }
            },
            // Over the limit already: the rest is dropped.
            None => n,
        };
        self.start += consumed;
        let left = left - consumed as u64;
        let at = (at + consumed) % 4;
        self.state = match (left, fin) {
            (0, true) => State::Finish { fed: 0 },
            (0, false) => State::Header,
            _ => State::Inflate { left, key, at, fin },
        };
        Ok(Step::Again)
    }

    /// Inflates the removed tail, then hands up the final fragment.
    fn finish(&mut self, fed: usize) -> io::Result<Step> {
        let Message::Compressed { inflater, inflated, .. } = &mut self.message else {
            return Err(corrupt());
        };
        if let Some(one) = inflater {
            match inflate_some(one, &TAIL[fed..], &mut self.output, inflated, self.max)? {
                // More to come while the tail is not all in or the last
                // call filled a whole fragment.
                Some((used, produced)) if fed + used < TAIL.len() || produced == CHUNK => {
                    self.state = State::Finish { fed: fed + used };
                    return Ok(Step::Again);
                }
                Some(_) => fragment_header(&mut self.output, 0, true, 0),
                None => {}
            }
        }
        self.message = Message::None;
        self.state = State::Header;
        Ok(Step::Again)
    }
}

/// The header of an inflated fragment: always the 16-bit length form, so
/// that it can be written before the length is known (tungstenite does not
/// ask for the shortest form, and this never goes on the wire).
const FRAGMENT_HEADER: usize = 8;

/// Inflates from `input` into at most one fragment of [`CHUNK`] bytes
/// written to `output` (empty on entry); returns the input bytes used and
/// the bytes produced, or `None` when the message went over `max`: then
/// `output` holds a header that tungstenite refuses as too large.
fn inflate_some(
    inflater: &mut Decompress,
    input: &[u8],
    output: &mut Vec<u8>,
    inflated: &mut usize,
    max: usize,
) -> io::Result<Option<(usize, usize)>> {
    output.clear();
    output.resize(FRAGMENT_HEADER + CHUNK, 0);
    let (in_before, out_before) = (inflater.total_in(), inflater.total_out());
    inflater
        .decompress(input, &mut output[FRAGMENT_HEADER..], FlushDecompress::Sync)
        .map_err(|_| corrupt())?;
    let used = usize::try_from(inflater.total_in() - in_before).map_err(|_| corrupt())?;
    let produced = usize::try_from(inflater.total_out() - out_before).map_err(|_| corrupt())?;
    if used == 0 && produced == 0 && !input.is_empty() {
        // Input the inflater will not take: data after the stream's end.
        return Err(corrupt());
    }
    *inflated += produced;
    if *inflated > max {
        output.clear();
        too_large(output, max);
        return Ok(None);
    }
    if produced == 0 {
        output.clear();
    } else {
        output.truncate(FRAGMENT_HEADER + produced);
        let len = u16::try_from(produced).map_err(|_| corrupt())?.to_be_bytes();
        output[..4].copy_from_slice(&[0x00, 0x80 | 126, len[0], len[1]]);
        output[4..FRAGMENT_HEADER].fill(0);
    }
    Ok(Some((used, produced)))
}

/// The state after a frame's header: `None` when its payload is empty.
fn next_or_header(left: u64, state: impl FnOnce(u64) -> State) -> State {
    if left == 0 {
        State::Header
    } else {
        state(left)
    }
}

/// A continuation header announcing more than `max` bytes: tungstenite
/// refuses it as too large before reading any payload.
fn too_large(output: &mut Vec<u8>, max: usize) {
    output.push(0x00);
    output.push(0x80 | 127);
    output.extend_from_slice(&(max as u64).saturating_add(1).to_be_bytes());
    output.extend_from_slice(&[0; 4]);
}

/// A client fragment header (masked with a zero key) for `len` bytes.
fn fragment_header(output: &mut Vec<u8>, opcode: u8, fin: bool, len: usize) {
    let start = output.len();
    crate::deflate::header(output, if fin { 0x80 } else { 0 } | opcode, len);
    output[start + 1] |= 0x80;
    output.extend_from_slice(&[0; 4]);
}

fn corrupt() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "invalid permessage-deflate data")
}

impl<S: AsyncRead + Unpin> AsyncRead for Inflating<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let Some(filter) = this.filter.as_deref_mut() else {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        };
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if filter.taken < filter.output.len() {
                let n = buf.remaining().min(filter.output.len() - filter.taken);
                buf.put_slice(&filter.output[filter.taken..filter.taken + n]);
                filter.taken += n;
                return Poll::Ready(Ok(()));
            }
            if !filter.output.is_empty() {
                filter.taken = 0;
                // Kept for the next fragment during a compressed message,
                // given back after it.
                if filter.output.capacity() > INPUT && matches!(filter.message, Message::None) {
                    filter.output = Vec::new();
                } else {
                    filter.output.clear();
                }
            }
            if let Step::Read = filter.step()? {
                if filter.start > 0 {
                    filter.input.copy_within(filter.start..filter.end, 0);
                    filter.end -= filter.start;
                    filter.start = 0;
                }
                let mut read = ReadBuf::new(&mut filter.input[filter.end..]);
                std::task::ready!(Pin::new(&mut this.io).poll_read(cx, &mut read))?;
                let n = read.filled().len();
                if n == 0 {
                    // The end of the stream: tungstenite sees it too.
                    return Poll::Ready(Ok(()));
                }
                filter.end += n;
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Inflating<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[path = "inflate_tests.rs"]
mod tests;
