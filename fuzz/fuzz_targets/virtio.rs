//! virtio-blk queue processing against a 1 MiB guest-memory model: the input programs the
//! queue registers (size, ring addresses) and fills guest memory (descriptor table, avail
//! ring, request headers, data); then the guest notifies. The device must never panic, loop
//! forever, or touch memory outside the guest's (ASan checks the last).
#![no_main]

#[path = "harness/virtio.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    harness::run(data);
});
