//! `ControlMessage::from_payload` on arbitrary bytes: never panics, and a message that
//! parses survives to_payload → from_payload unchanged.
#![no_main]

use jobgate_protocol::ControlMessage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(message) = ControlMessage::from_payload(data) else {
        return;
    };
    let payload = message.to_payload();
    let again = ControlMessage::from_payload(&payload).expect("a parsed message re-parses");
    assert_eq!(
        again, message,
        "to_payload -> from_payload changed the message"
    );
});
