//! `ResponseHead::decode` and `decode_shared` (which must agree) on arbitrary bytes: never
//! panics, and a head that decodes survives encode → decode unchanged.
#![no_main]

use jobgate_protocol::ResponseHead;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let decoded = ResponseHead::decode(data);
    let shared = ResponseHead::decode_shared(&bytes::Bytes::copy_from_slice(data));
    assert_eq!(shared, decoded, "the sharing decoder disagrees with the copying one");
    let Ok(head) = decoded else {
        return;
    };
    assert!((100..=999).contains(&head.status.as_u16()));
    let mut encoded = Vec::new();
    head.encode(&mut encoded);
    let again = ResponseHead::decode(&encoded).expect("a decoded head re-encodes decodably");
    assert_eq!(again, head, "encode -> decode changed the head");
});
