//! Moving one frame over an async byte stream (a QUIC stream in practice).

use crate::frame::{FrameError, FRAME_HEADER_LEN};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why a frame could not be read.
#[derive(Debug, Error)]
pub enum ReadFrameError {
    /// The stream failed or ended inside a frame.
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
    /// The frame was over the limit.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Reads one frame of at most `max` payload bytes.
///
/// Returns `Ok(None)` if the stream ended cleanly before a frame began.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> Result<Option<Vec<u8>>, ReadFrameError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    let mut filled = 0;
    while filled < FRAME_HEADER_LEN {
        let n = reader.read(&mut header[filled..]).await?;
        if n == 0 {
            if filled == 0 {
                return Ok(None);
            }
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        filled += n;
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max }.into());
    }
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload).await?;
    Ok(Some(payload))
}

/// Writes one frame holding `payload`.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(FRAME_HEADER_LEN + payload.len());
    crate::encode_frame(payload, &mut buf);
    writer.write_all(&buf).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_cross_a_pipe_and_oversize_is_refused() {
        let (mut a, mut b) = tokio::io::duplex(64);
        write_frame(&mut a, b"first").await.expect("write");
        write_frame(&mut a, &[7u8; 40]).await.expect("write");
        drop(a);
        assert_eq!(
            read_frame(&mut b, 100).await.expect("read").as_deref(),
            Some(&b"first"[..])
        );
        assert!(matches!(
            read_frame(&mut b, 10).await,
            Err(ReadFrameError::Frame(_))
        ));
    }
}
