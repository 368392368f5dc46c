//! Feeds arbitrary bytes to the frame decoder, with a small frame limit
//! taken from the input, decoding frame after frame until the input runs
//! out or is rejected.
//!
//! Checks: no panic; an incomplete buffer is left untouched; an accepted
//! frame is within the limit and re-encodes to exactly the bytes it was
//! decoded from (the encoding is canonical), so it decodes again to itself.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use msgc::protocol::{decode, DecodeError};

fuzz_target!(|data: &[u8]| {
    let Some((&limit, input)) = data.split_first() else {
        return;
    };
    // Limits from 0 to 4080 bytes: small enough that the fuzzer reaches them.
    let limit = usize::from(limit) * 16;
    let mut buf = BytesMut::from(input);
    loop {
        let before = buf.clone();
        match decode(&mut buf, limit) {
            Ok(None) => {
                assert_eq!(buf, before, "Ok(None) must leave the buffer alone");
                break;
            }
            Ok(Some(frame)) => {
                let used = before.len() - buf.len();
                assert!(
                    used - 4 <= limit,
                    "a {used}-byte frame passed limit {limit}"
                );
                let bytes = frame.to_bytes();
                assert_eq!(&bytes[..], &before[..used], "re-encoding differs");
                let mut again = BytesMut::from(&bytes[..]);
                assert_eq!(decode(&mut again, limit), Ok(Some(frame)));
                assert!(again.is_empty());
            }
            Err(e) => {
                if matches!(e, DecodeError::TooLarge { .. } | DecodeError::ZeroLength) {
                    assert_eq!(buf, before, "a bad prefix must leave the buffer alone");
                }
                let _ = e.code();
                break;
            }
        }
    }
});
