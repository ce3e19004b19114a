//! lockd's wire frame decoder on arbitrary bytes: errors, never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| concord_lockd::transport::frame::fuzz_decode(data));
