//! Restore and verify of a tampered backup store: any bytes as a backup manifest must give
//! an error or a restore confined to the target directory — never a write outside it, a
//! panic, or a hang.
#![no_main]

#[path = "harness/restore.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    harness::run(data);
});
