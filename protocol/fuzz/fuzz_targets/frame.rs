//! `decode_frame` on arbitrary bytes, under both protocol limits: it never panics, never
//! hands out more than the limit, and what it splits off re-encodes to the same bytes.
#![no_main]

use jobgate_protocol::{decode_frame, encode_frame, FrameError, MAX_CONTROL_FRAME, MAX_HEAD_FRAME};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for max in [MAX_CONTROL_FRAME, MAX_HEAD_FRAME, 0, 7] {
        match decode_frame(data, max) {
            Ok(Some((payload, consumed))) => {
                assert!(payload.len() <= max, "payload over the limit");
                assert_eq!(consumed, payload.len() + 4);
                assert!(consumed <= data.len());
                let mut again = Vec::new();
                encode_frame(payload, &mut again);
                assert_eq!(&again[..], &data[..consumed], "re-encoding differs");
            }
            Ok(None) => {
                // Only a frame still incomplete may ask for more bytes.
                if data.len() >= 4 {
                    let len = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
                    assert!(
                        len <= max && data.len() < 4 + len,
                        "complete frame not returned"
                    );
                }
            }
            Err(FrameError::TooLarge { len, max: m }) => {
                assert_eq!(m, max);
                assert!(len > max);
            }
        }
    }
});
