//! Feeds arbitrary bytes to `proxy_protocol::parse` and checks what the worker relies on: no
//! panic; a header lies within the buffer and parses the same without the bytes after it; every
//! strict prefix of a header or of an Incomplete buffer is Incomplete; Incomplete only below
//! MAX_INBOUND (so reading until an answer is bounded).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringlb::proxy_protocol::{parse, Parsed, MAX_INBOUND};

fuzz_target!(|data: &[u8]| {
    let got = parse(data);
    let checked = match got {
        Ok(Parsed::Header { len, .. }) => {
            assert!(len <= data.len() && len <= MAX_INBOUND);
            assert_eq!(parse(&data[..len]), got);
            len
        }
        Ok(Parsed::Incomplete) => {
            assert!(data.len() < MAX_INBOUND);
            data.len()
        }
        Err(_) => return,
    };
    for k in 0..checked {
        assert_eq!(parse(&data[..k]), Ok(Parsed::Incomplete));
    }
});
