//! Length-prefixed framing: a 4-byte big-endian payload length, then the payload.

use thiserror::Error;

/// Bytes in a frame header (the big-endian `u32` payload length).
pub const FRAME_HEADER_LEN: usize = 4;

/// Why a frame could not be decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    /// The announced payload is larger than the limit for this stream.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced payload length.
        len: usize,
        /// The limit that applied.
        max: usize,
    },
}

/// Appends one frame holding `payload` to `out`.
///
/// # Panics
/// Never for payloads up to 4 GiB; callers keep payloads under the protocol limits.
pub fn encode_frame(payload: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.reserve(FRAME_HEADER_LEN + payload.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
}

/// Appends one frame whose payload `write` appends to `out`: the length is filled in
/// afterwards, so the payload is encoded in place without a second buffer.
pub fn encode_frame_with(out: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_LEN]);
    write(out);
    let len = u32::try_from(out.len() - start - FRAME_HEADER_LEN).unwrap_or(u32::MAX);
    out[start..start + FRAME_HEADER_LEN].copy_from_slice(&len.to_be_bytes());
}

/// Splits the first complete frame off `buf`.
///
/// Returns `Ok(None)` while more bytes are needed, or `Ok(Some((payload, consumed)))`
/// where `consumed` counts the header and the payload.
pub fn decode_frame(buf: &[u8], max: usize) -> Result<Option<(&[u8], usize)>, FrameError> {
    let Some(header) = buf.get(..FRAME_HEADER_LEN) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let end = FRAME_HEADER_LEN + len;
    Ok(buf.get(FRAME_HEADER_LEN..end).map(|payload| (payload, end)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_partial_input() {
        let mut out = Vec::new();
        encode_frame(b"hello", &mut out);
        assert_eq!(out.len(), 9);
        for cut in 0..out.len() {
            assert_eq!(decode_frame(&out[..cut], 100), Ok(None));
        }
        assert_eq!(decode_frame(&out, 100), Ok(Some((&b"hello"[..], 9))));
    }

    #[test]
    fn oversized_frame_is_refused_before_reading_it() {
        let buf = (1_000_000u32).to_be_bytes();
        assert_eq!(
            decode_frame(&buf, 1000),
            Err(FrameError::TooLarge {
                len: 1_000_000,
                max: 1000
            })
        );
    }
}
