//! VMM control protocol: request parsing, reply parsing, the bounded reply reader and the
//! server's request framing. Any bytes must give a value or an error, never a panic; what
//! parses must round-trip; no reply line over `MAX_REPLY_LINE` is returned; and the framing
//! hands out exactly the newline-terminated lines of at most `MAX_REQUEST_LINE` bytes,
//! refusing a longer one however the stream is cut into reads.
#![no_main]

#[path = "harness/control.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    harness::run(data);
});
