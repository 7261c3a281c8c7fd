//! `RequestHead::decode` on arbitrary bytes: never panics, and a head that decodes is
//! well-formed (origin-form target or `*`) and survives encode → decode unchanged.
#![no_main]

use jobgate_protocol::RequestHead;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(head) = RequestHead::decode(data) else {
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
