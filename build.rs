//! Link options of the `stead` binaries.
//!
//! They are linked as fixed-address (non-PIE) executables unless `STEAD_LINK_PIE=1` is set
//! at build time. A PIE's loader must rewrite every pointer in its read-only-after-relocation
//! data before `main` (about 91,000 relocations over 2 MiB here), which copies ~500 pages per
//! process start: half of a `stead validate`'s CPU time. Without PIE those pages stay shared
//! with the page cache and are read only when used. The price is that the executable's own
//! code and data are not randomised (shared libraries, heap, stack and mmaps still are), as
//! for Go programs built by default (etcd, containerd, kubelet). See docs/performance.md.

fn main() {
    println!("cargo:rerun-if-env-changed=STEAD_LINK_PIE");
    println!("cargo:rerun-if-changed=build.rs");
    let pie = std::env::var("STEAD_LINK_PIE").is_ok_and(|v| v == "1");
    if !pie && std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux") {
        println!("cargo:rustc-link-arg-bins=-no-pie");
    }
}
