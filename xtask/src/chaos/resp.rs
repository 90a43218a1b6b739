//! RESP (Redis's protocol) frames in what Redis sends, for the chaos proxy:
//! [`PushFilter`] finds their boundaries and drops whole pub/sub messages,
//! the way Redis pub/sub, at most once, may lose them.

/// Cuts what Redis sends on one connection into RESP frames (RESP2 and
/// RESP3) and, when asked, drops the pub/sub messages among them: arrays or
/// pushes `message`/`smessage` (3 elements) and `pmessage` (4). Only a
/// connection that Redis confirmed a subscription on is filtered — on it
/// Redis sends nothing but pushes and `PING` answers, so no command's reply
/// can be taken for a message — and the confirmations themselves always
/// pass. A frame split over reads waits for its end, so a message is dropped
/// whole or passes whole. Bytes that are not RESP turn the filter off for
/// the connection: from then on everything passes as it comes.
#[derive(Debug, Default)]
pub(crate) struct PushFilter {
    /// The start of a frame whose end has not arrived yet.
    pending: Vec<u8>,
    /// Redis confirmed a subscription on this connection.
    subscribed: bool,
    /// The stream could not be read as RESP: no more filtering.
    raw: bool,
}

impl PushFilter {
    /// Takes one read's `chunk` and appends to `out` what may go on: every
    /// whole frame, except pub/sub messages when `drop`. Returns how many
    /// messages were dropped.
    pub(crate) fn feed(&mut self, chunk: &[u8], drop: bool, out: &mut Vec<u8>) -> u64 {
        if self.raw {
            out.extend_from_slice(chunk);
            return 0;
        }
        self.pending.extend_from_slice(chunk);
        let mut dropped = 0;
        let mut at = 0;
        while at < self.pending.len() {
            let frame = match frame_len(&self.pending[at..]) {
                Ok(Some(len)) => &self.pending[at..at + len],
                Ok(None) => break,
                Err(()) => {
                    self.raw = true;
                    out.extend_from_slice(&self.pending[at..]);
                    at = self.pending.len();
                    break;
                }
            };
            at += frame.len();
            match push_kind(frame) {
                Some(Push::Subscribed) => self.subscribed = true,
                Some(Push::Message) if drop && self.subscribed => {
                    dropped += 1;
                    continue;
                }
                _ => {}
            }
            out.extend_from_slice(frame);
        }
        self.pending.drain(..at);
        dropped
    }
}

/// The pub/sub frames the filter tells apart.
#[derive(Debug, PartialEq, Eq)]
enum Push {
    /// `subscribe`, `ssubscribe` or `psubscribe` confirmed.
    Subscribed,
    /// A message delivered to the subscriber.
    Message,
}

/// What a whole frame is, if it is a pub/sub push the filter cares about.
fn push_kind(frame: &[u8]) -> Option<Push> {
    let body = frame.strip_prefix(b"*").or_else(|| frame.strip_prefix(b">"))?;
    let (count, first) = split_line(body)?;
    let (len, rest) = split_line(first.strip_prefix(b"$")?)?;
    let len: usize = std::str::from_utf8(len).ok()?.parse().ok()?;
    let name = rest.get(..len)?;
    match (count, name) {
        (b"3", b"message" | b"smessage") | (b"4", b"pmessage") => Some(Push::Message),
        (b"3", b"subscribe" | b"ssubscribe" | b"psubscribe") => Some(Push::Subscribed),
        _ => None,
    }
}

/// The line at the start of `buf` (without its CRLF) and what follows it.
fn split_line(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = buf.windows(2).position(|w| w == b"\r\n")?;
    Some((&buf[..end], &buf[end + 2..]))
}

/// The length of the RESP frame at the start of `buf`: `Ok(None)` while its
/// end has not arrived, `Err` for bytes that are not RESP. Aggregates are
/// walked without recursion, counting the elements still to come.
fn frame_len(buf: &[u8]) -> Result<Option<usize>, ()> {
    let mut at = 0;
    let mut to_come: u64 = 1;
    while to_come > 0 {
        to_come -= 1;
        let Some(&kind) = buf.get(at) else { return Ok(None) };
        let Some(end) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
            // A header line is short: a long one without its end is no RESP.
            return if buf.len() - at > 64 * 1024 { Err(()) } else { Ok(None) };
        };
        let line = &buf[at + 1..at + end];
        at += end + 2;
        let number = || -> Result<i64, ()> {
            std::str::from_utf8(line)
                .map_err(|_| ())?
                .parse::<i64>()
                .map_err(|_| ())
        };
        match kind {
            // Simple strings, errors, integers, nulls, doubles, booleans, big numbers.
            b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => {}
            // Bulk strings, bulk errors, verbatim strings; -1 is a null.
            b'$' | b'!' | b'=' => {
                let Ok(len) = usize::try_from(number()?) else { continue };
                if buf.len() < at + len + 2 {
                    return Ok(None);
                }
                if &buf[at + len..at + len + 2] != b"\r\n" {
                    return Err(());
                }
                at += len + 2;
            }
            // Arrays, pushes, sets; -1 is a null array.
            b'*' | b'>' | b'~' => to_come += u64::try_from(number()?).unwrap_or(0),
            // Maps and attributes: a key and a value per entry.
            b'%' | b'|' => to_come += 2 * u64::try_from(number()?).unwrap_or(0),
            _ => return Err(()),
        }
    }
    Ok(Some(at))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A pub/sub message as Redis 7 sends it to a RESP2 subscriber.
    pub(crate) fn message(channel: &str, payload: &str) -> Vec<u8> {
        format!(
            "*3\r\n$7\r\nmessage\r\n${}\r\n{channel}\r\n${}\r\n{payload}\r\n",
            channel.len(),
            payload.len()
        )
        .into_bytes()
    }

    pub(crate) const SUBSCRIBED: &[u8] = b"*3\r\n$9\r\nsubscribe\r\n$4\r\ncb:g\r\n:1\r\n";
    const PONG: &[u8] = b"*2\r\n$4\r\npong\r\n$0\r\n\r\n";

    /// Feeds `stream` cut at `cuts` (offsets into it) and returns what
    /// passed and how many messages were dropped.
    fn feed_cut(stream: &[u8], cuts: &[usize], drop: bool) -> (Vec<u8>, u64) {
        let mut filter = PushFilter::default();
        let (mut out, mut dropped, mut from) = (Vec::new(), 0, 0);
        for &to in cuts.iter().chain([&stream.len()]) {
            dropped += filter.feed(&stream[from..to], drop, &mut out);
            from = to;
        }
        (out, dropped)
    }

    /// Every way of cutting `stream` in two, and one byte at a time.
    fn every_cut(stream: &[u8], drop: bool) -> Vec<(Vec<u8>, u64)> {
        let mut results: Vec<_> = (0..=stream.len()).map(|cut| feed_cut(stream, &[cut], drop)).collect();
        let bytes: Vec<usize> = (1..stream.len()).collect();
        results.push(feed_cut(stream, &bytes, drop));
        results
    }

    #[test]
    fn pubsub_messages_are_dropped_whole_wherever_the_reads_cut_them() {
        // A payload holding what looks like a frame must not be cut there.
        let tricky = message("cb:g", "*3\r\n$7\r\nmessage\r\n$1\r\nx\r\n$1\r\ny\r\n");
        let smessage = b"*3\r\n$8\r\nsmessage\r\n$4\r\ncb:g\r\n$2\r\nhi\r\n".to_vec();
        let pmessage = b"*4\r\n$8\r\npmessage\r\n$3\r\ncb*\r\n$4\r\ncb:g\r\n$2\r\nhi\r\n".to_vec();
        let resp3 = b">3\r\n$7\r\nmessage\r\n$4\r\ncb:g\r\n$2\r\nhi\r\n".to_vec();
        let stream = [
            SUBSCRIBED,
            &message("cb:g", "one"),
            PONG,
            &tricky,
            &smessage,
            b"*3\r\n$10\r\nssubscribe\r\n$4\r\ncb:h\r\n:2\r\n",
            &pmessage,
            &resp3,
            &message("cb:g", ""),
            PONG,
        ]
        .concat();
        let kept = [
            SUBSCRIBED,
            PONG,
            b"*3\r\n$10\r\nssubscribe\r\n$4\r\ncb:h\r\n:2\r\n",
            PONG,
        ]
        .concat();
        for (out, dropped) in every_cut(&stream, true) {
            assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(&kept));
            assert_eq!(dropped, 6);
        }
        for (out, dropped) in every_cut(&stream, false) {
            assert_eq!(out, stream);
            assert_eq!(dropped, 0);
        }
    }

    #[test]
    fn replies_on_a_connection_without_subscriptions_pass_untouched() {
        // Command replies of every RESP type, one of them shaped like a
        // message (a script may answer anything): no subscription was
        // confirmed on this connection, so nothing is dropped.
        let stream = [
            b"+OK\r\n".as_slice(),
            b"-ERR no\r\n",
            b":42\r\n",
            b"$-1\r\n",
            b"*-1\r\n",
            b"$5\r\na\r\nbc\r\n",
            b"*2\r\n*2\r\n:1\r\n$1\r\nx\r\n*0\r\n",
            &message("not", "a push"),
            b"%2\r\n+a\r\n:1\r\n+b\r\n*1\r\n_\r\n",
            b"|1\r\n+ttl\r\n:3\r\n$2\r\nok\r\n",
            b"~2\r\n#t\r\n,1.5\r\n",
            b"=8\r\ntxt:abcd\r\n(123\r\n!3\r\nerr\r\n",
        ]
        .concat();
        for (out, dropped) in every_cut(&stream, true) {
            assert_eq!(out, stream);
            assert_eq!(dropped, 0);
        }
    }

    #[test]
    fn bytes_that_are_not_resp_pass_as_they_come() {
        let mut filter = PushFilter::default();
        let mut out = Vec::new();
        filter.feed(SUBSCRIBED, true, &mut out);
        filter.feed(b"GET / HTTP/1.1\r\n", true, &mut out);
        filter.feed(&message("cb:g", "after"), true, &mut out);
        assert_eq!(
            out,
            [SUBSCRIBED, b"GET / HTTP/1.1\r\n", &message("cb:g", "after")].concat()
        );
    }
}
