//! Any bytes from a peer: the frame header check and the message decoder
//! must return, never panic or allocate beyond the frame limit; whatever
//! decodes must encode back to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wanmig_wire::{Message, frame_len};

fuzz_target!(|data: &[u8]| {
    if data.len() >= 4 {
        let _ = frame_len(data[..4].try_into().expect("4 bytes"));
    }
    if let Ok(m) = Message::decode(data) {
        let frame = m.encode();
        assert_eq!(Message::decode(&frame[4..]).as_ref(), Ok(&m));
        if let Message::Pages(p) = &m {
            assert_eq!(p.iter().count(), p.len());
        }
    }
});
