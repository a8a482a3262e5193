//! Fuzzes the text-log value escaping: whatever a client puts in a name, a
//! path or an error, its logged form is one line without control characters
//! and of bounded length, and nothing panics.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_shared::process::log_fields::{escaped, MAX_VALUE_BYTES};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let out = escaped(&text);
    assert!(!out.chars().any(char::is_control), "{out:?}");
    assert!(out.len() <= MAX_VALUE_BYTES * 10 + 32, "{} bytes", out.len());
    if text.len() <= MAX_VALUE_BYTES && !text.chars().any(char::is_control) {
        assert_eq!(out, text);
    }
});
