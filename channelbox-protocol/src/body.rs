//! Reading a request body with the bounds of docs/protocol.md: at most the
//! server's largest message, and never waiting more than 10 seconds for the
//! next piece of it. Nothing is read before the caller has checked the
//! request's authorization.

use std::time::Duration;

use bytes::Buf;
use futures_util::{Stream, StreamExt};

/// How long a body may stall between two pieces (docs/protocol.md "Deadlines").
pub(crate) const BODY_STALL: Duration = Duration::from_secs(10);

/// Why a body was not read whole.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Longer than the limit; reading stopped at the limit.
    TooLarge,
    /// Nothing arrived for [`BODY_STALL`].
    Stalled,
    /// The connection failed.
    Failed,
}

/// Reads a whole body of at most `max` bytes.
pub(crate) async fn read<S, B, E>(body: S, max: usize) -> Result<Vec<u8>, Refused>
where
    S: Stream<Item = Result<B, E>>,
    B: Buf,
{
    futures_util::pin_mut!(body);
    let mut out = Vec::new();
    loop {
        let mut chunk = match tokio::time::timeout(BODY_STALL, body.next()).await {
            Err(_) => return Err(Refused::Stalled),
            Ok(None) => return Ok(out),
            Ok(Some(Err(_))) => return Err(Refused::Failed),
            Ok(Some(Ok(chunk))) => chunk,
        };
        if out.len() + chunk.remaining() > max {
            return Err(Refused::TooLarge);
        }
        while chunk.has_remaining() {
            let piece = chunk.chunk();
            out.extend_from_slice(piece);
            let n = piece.len();
            chunk.advance(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn pieces(parts: &[&'static str]) -> impl Stream<Item = Result<Bytes, std::io::Error>> {
        futures_util::stream::iter(
            parts
                .iter()
                .map(|p| Ok(Bytes::from_static(p.as_bytes())))
                .collect::<Vec<_>>(),
        )
    }

    #[tokio::test]
    async fn bodies_are_read_whole_up_to_the_limit() {
        assert_eq!(read(pieces(&["ab", "cd"]), 4).await, Ok(b"abcd".to_vec()));
        assert_eq!(read(pieces(&["ab", "cde"]), 4).await, Err(Refused::TooLarge));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_is_refused_after_the_deadline() {
        let stalled = futures_util::stream::pending::<Result<Bytes, std::io::Error>>();
        assert_eq!(read(stalled, 10).await, Err(Refused::Stalled));
    }
}
