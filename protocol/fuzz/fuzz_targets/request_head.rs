//! `RequestHead::decode` and `decode_shared` (which must agree) on arbitrary bytes: never
//! panics, and a head that decodes is well-formed (origin-form target or `*`) and survives
//! encode → decode unchanged.
#![no_main]

use jobgate_protocol::RequestHead;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let decoded = RequestHead::decode(data);
    let shared = RequestHead::decode_shared(&bytes::Bytes::copy_from_slice(data));
    assert_eq!(shared, decoded, "the sharing decoder disagrees with the copying one");
    let Ok(head) = decoded else {
        return;
    };
    assert!(head.target.scheme().is_none(), "absolute target accepted");
    assert!(
        head.target.path_and_query().is_some() || head.target == "*",
        "target without a path accepted"
    );
    let mut encoded = Vec::new();
    head.encode(&mut encoded);
    let again = RequestHead::decode(&encoded).expect("a decoded head re-encodes decodably");
    assert_eq!(again, head, "encode -> decode changed the head");
});
